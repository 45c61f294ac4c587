"""Auxiliary losses for routers, each a formula of sums over the batch's real tokens.

Every loss below is computed from named **sums** (per expert, or scalars) over
the tokens of a batch, weighted 1 for real tokens and 0 for padding. A router
reports the sums its losses need (``standard_sums`` for the usual ones), and
``losses_from_sums`` applies the formulas. Because the formulas read only sums,
expert parallelism gets the losses of the global batch by summing the sums over
ranks (one all-reduce) and applying the same formulas: the definitions live
here once. Formulas: ../shared/REFERENCES.md.

Sums: ``tokens`` (real tokens), ``assigned_E`` (assignments per expert, each of
the K choices counted, before capacity), ``prob_mass_E`` (Σ_t p_te),
``z_squared`` (Σ_t (log Σ_e exp logit_te)²), ``importance_E`` (Σ_t G_te, the
sparse gate), ``load_E`` (the load the ``load`` loss takes: counted, or the
smooth estimator of noisy top-k), ``sequence_balance`` and ``sequences`` (the
sequence-wise loss summed over non-empty sequences, and their number).

Shapes: T tokens, E experts, K experts per token.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch
from torch import Tensor

from .records import LazyMapping

# The sums each loss is a formula of.
LOSS_SUMS: dict[str, tuple[str, ...]] = {
    "load_balance": ("tokens", "assigned_E", "prob_mass_E"),
    "z_loss": ("tokens", "z_squared"),
    "importance": ("importance_E",),
    "load": ("load_E",),
    "sequence_balance": ("sequence_balance", "sequences"),
}


def _token_weights(num_tokens: int, token_weight_T: Tensor | None, device, dtype: torch.dtype) -> Tensor:
    if token_weight_T is None:
        return torch.ones(num_tokens, device=device, dtype=dtype)
    return token_weight_T.to(dtype)


def assignment_counts(indices_TK: Tensor, num_experts: int, token_weight_T: Tensor | None = None,
                      dtype: torch.dtype | None = None) -> Tensor:
    """Assignments per expert (E,), each of the K choices counted once (padding not)."""
    T, K = indices_TK.shape
    if dtype is None:
        dtype = token_weight_T.dtype if token_weight_T is not None and token_weight_T.is_floating_point() \
            else torch.float32
    counts_E = torch.zeros(num_experts, device=indices_TK.device, dtype=dtype)
    if token_weight_T is None:
        return counts_E.scatter_add_(0, indices_TK.reshape(-1), counts_E.new_ones(T * K))
    w_T = token_weight_T.to(dtype)
    return counts_E.scatter_add_(0, indices_TK.reshape(-1), w_T.repeat_interleave(K))


def cv_squared(x_E: Tensor, eps: float = 1e-10) -> Tensor:
    """Squared coefficient of variation, population variance / mean² (0 for one expert)."""
    if x_E.numel() <= 1:
        return x_E.new_zeros(())
    mean = x_E.mean()
    return (x_E - mean).square().mean() / (mean.square() + eps)


def _count(n) -> Tensor | float:
    """A token or sequence count as a divisor: at least one."""
    return n.clamp_min(1.0) if isinstance(n, Tensor) else max(float(n), 1.0)


def losses_from_sums(names, sums: Mapping[str, Tensor], num_experts: int) -> dict[str, Tensor]:
    """Each loss of ``names`` from the sums it needs (``LOSS_SUMS``)."""
    return {name: _FORMULAS[name](sums, num_experts) for name in names}


def _load_balance(s: Mapping, E: int) -> Tensor:
    # E·Σ_i f_i·P_i with f_i = assigned_i / n and P_i = prob_mass_i / n: E/n²·⟨assigned, mass⟩.
    n = _count(s["tokens"])
    overlap = torch.dot(s["assigned_E"], s["prob_mass_E"])
    # A Python n folds E/n² into one multiply (the layer computes this loss on every call).
    return overlap * E / n.square() if isinstance(n, Tensor) else overlap * (E / n**2)


_FORMULAS: dict[str, Callable[[Mapping, int], Tensor]] = {
    "load_balance": _load_balance,
    "z_loss": lambda s, E: s["z_squared"] / _count(s["tokens"]),
    "importance": lambda s, E: cv_squared(s["importance_E"]),
    "load": lambda s, E: cv_squared(s["load_E"]),
    "sequence_balance": lambda s, E: s["sequence_balance"] / _count(s["sequences"]),
}


class _Losses(LazyMapping):
    """Losses by name, each computed from the sums when first read."""

    def __init__(self, names, sums: Mapping[str, Tensor], num_experts: int):
        super().__init__(dict.fromkeys(names))
        self._sums, self._num_experts = sums, num_experts

    def _compute(self, name: str) -> Tensor:
        if name not in self._thunks:
            raise KeyError(name)
        return _FORMULAS[name](self._sums, self._num_experts)


def lazy_losses(names, sums: Mapping[str, Tensor], num_experts: int) -> LazyMapping:
    """``losses_from_sums`` computed on first read, loss by loss."""
    return _Losses(names, sums, num_experts)


def gates_from_topk(indices_TK: Tensor, weights_TK: Tensor, num_experts: int) -> Tensor:
    """The sparse gate G(x) as a dense (T, E) matrix: combine weights, zero elsewhere."""
    gates_TE = weights_TK.new_zeros(weights_TK.shape[0], num_experts)
    return gates_TE.scatter(1, indices_TK, weights_TK)


def z_squared_sum(logits_TE: Tensor, token_weight_T: Tensor | None = None) -> Tensor:
    z_T = torch.logsumexp(logits_TE, dim=-1)
    if token_weight_T is None:
        return z_T.square().sum()
    return (z_T.square() * token_weight_T.to(z_T.dtype)).sum()


def weighted_column_sums(values_TE: Tensor, token_weight_T: Tensor | None = None) -> Tensor:
    """Σ_t w_t·values_te (E,)."""
    if token_weight_T is None:
        return values_TE.sum(0)
    return (values_TE * token_weight_T.to(values_TE.dtype)[:, None]).sum(0)


class StandardSums(LazyMapping):
    """The sums of the standard losses (load balance, z-loss, importance, load), each computed
    when first read. ``load_E`` overrides the counted load (noisy top-k's smooth estimator)."""

    NAMES = ("tokens", "assigned_E", "prob_mass_E", "z_squared", "importance_E", "load_E")

    def __init__(self, logits_TE: Tensor, probs_TE: Tensor, indices_TK: Tensor, weights_TK: Tensor,
                 token_weight_T: Tensor | None, load_E: Callable[[], Tensor] | None = None):
        super().__init__(dict.fromkeys(self.NAMES))
        self._tensors = logits_TE, probs_TE, indices_TK, weights_TK, token_weight_T
        self._load_E = load_E

    def _compute(self, name: str) -> Tensor:
        logits_TE, probs_TE, indices_TK, weights_TK, w_T = self._tensors
        E, dtype = probs_TE.shape[1], probs_TE.dtype
        if name == "tokens":
            # A Python count when every token is real: the load-balance loss then takes 2 kernels fewer.
            return len(indices_TK) if w_T is None else w_T.to(dtype).sum()
        if name == "assigned_E":
            return assignment_counts(indices_TK, E, w_T, dtype)
        if name == "prob_mass_E":
            return weighted_column_sums(probs_TE, w_T)
        if name == "z_squared":
            return z_squared_sum(logits_TE, w_T)
        if name == "importance_E":
            return weighted_column_sums(gates_from_topk(indices_TK, weights_TK, E), w_T)
        if name == "load_E":
            return self._load_E() if self._load_E is not None else self["assigned_E"]
        raise KeyError(name)


standard_sums = StandardSums


# --- the losses as functions of routing tensors (the formulas on one batch) -------------


def load_balancing_loss(probs_TE: Tensor, indices_TK: Tensor, token_weight_T: Tensor | None = None) -> Tensor:
    """Switch/GShard loss E·Σ_i f_i·P_i, generalised to top-K.

    f_i is the number of assignments to expert i over the number of tokens
    (summed over the K slots), P_i the mean router probability of expert i.
    Equals K under uniform routing and E under full collapse.
    """
    sums = standard_sums(probs_TE, probs_TE, indices_TK, probs_TE[:, :1], token_weight_T)
    return _load_balance(sums, probs_TE.shape[1])


def router_z_loss(logits_TE: Tensor, token_weight_T: Tensor | None = None) -> Tensor:
    """ST-MoE z-loss (1/T)·Σ_t (log Σ_j exp(logits_tj))²."""
    n = len(logits_TE) if token_weight_T is None else token_weight_T.sum()
    return z_squared_sum(logits_TE, token_weight_T) / _count(n)


def importance_loss(gates_TE: Tensor, token_weight_T: Tensor | None = None) -> Tensor:
    """Shazeer 2017: CV(Importance)², Importance_i = Σ_x G(x)_i."""
    return cv_squared(weighted_column_sums(gates_TE, token_weight_T))


def smooth_load(
    clean_logits_TE: Tensor,
    noisy_logits_TE: Tensor,
    noise_std_TE: Tensor,
    top_k: int,
    token_weight_T: Tensor | None = None,
) -> Tensor:
    """Shazeer's differentiable load estimator Load_i = Σ_x P(x, i).

    P(x, i) = Φ((clean_i − kth_excluding(H, k, i)) / noise_std_i): the
    probability that expert i stays in the top k if its noise were redrawn.
    kth_excluding(H, k, i) is the k-th largest of H without component i: the
    (k+1)-th largest of H when i is in the top k, the k-th largest otherwise.
    """
    T, E = noisy_logits_TE.shape
    w_T = _token_weights(T, token_weight_T, noisy_logits_TE.device, noisy_logits_TE.dtype)
    if top_k >= E:
        return w_T.sum().expand(E).clone()
    top_values_TK1, _ = noisy_logits_TE.topk(top_k + 1, dim=-1)
    threshold_if_in_T1 = top_values_TK1[:, top_k : top_k + 1]
    threshold_if_out_T1 = top_values_TK1[:, top_k - 1 : top_k]
    is_in_TE = noisy_logits_TE > threshold_if_in_T1
    normal = torch.distributions.Normal(
        torch.zeros((), device=noisy_logits_TE.device), torch.ones((), device=noisy_logits_TE.device)
    )
    prob_if_in_TE = normal.cdf((clean_logits_TE - threshold_if_in_T1) / noise_std_TE)
    prob_if_out_TE = normal.cdf((clean_logits_TE - threshold_if_out_T1) / noise_std_TE)
    prob_TE = torch.where(is_in_TE, prob_if_in_TE, prob_if_out_TE)
    return (prob_TE * w_T[:, None]).sum(0)
