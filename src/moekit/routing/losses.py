"""Auxiliary losses for routers, as pure functions of routing tensors.

Every function takes an optional float weight per token (1 real, 0 padding), so
padding counts in no loss. Formulas: ../shared/REFERENCES.md.

Shapes: T tokens, E experts, K experts per token.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping

import torch
from torch import Tensor


class LazyDict(Mapping):
    """A read-only mapping whose values are computed on first access and kept.

    Routers report every loss by name, but a layer only needs the ones with a
    nonzero coefficient in its forward: the rest cost nothing unless read.
    """

    def __init__(self, thunks: dict[str, Callable[[], Tensor]]):
        self._thunks = dict(thunks)
        self._values: dict[str, Tensor] = {}

    def __getitem__(self, name: str) -> Tensor:
        if name not in self._values:
            self._values[name] = self._thunks[name]()
        return self._values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._thunks)

    def __len__(self) -> int:
        return len(self._thunks)

    def __repr__(self) -> str:
        return f"LazyDict({dict(self)!r})"


def _token_weights(
    num_tokens: int, token_weight_T: Tensor | None, device, dtype: torch.dtype = torch.float32
) -> Tensor:
    if token_weight_T is None:
        return torch.ones(num_tokens, device=device, dtype=dtype)
    return token_weight_T.to(dtype)


def assignment_counts(
    indices_TK: Tensor, num_experts: int, token_weight_T: Tensor | None = None
) -> Tensor:
    """Assignments per expert (E,), each of the K choices counted once (padding not)."""
    T, K = indices_TK.shape
    dtype = token_weight_T.dtype if token_weight_T is not None and token_weight_T.is_floating_point() else torch.float32
    w_T = _token_weights(T, token_weight_T, indices_TK.device, dtype)
    counts_E = torch.zeros(num_experts, device=indices_TK.device, dtype=dtype)
    return counts_E.scatter_add_(0, indices_TK.reshape(-1), w_T.repeat_interleave(K))


def load_balancing_loss(
    probs_TE: Tensor, indices_TK: Tensor, token_weight_T: Tensor | None = None
) -> Tensor:
    """Switch/GShard loss E·Σ_i f_i·P_i, generalised to top-K.

    f_i is the number of assignments to expert i over the number of tokens
    (summed over the K slots), P_i the mean router probability of expert i.
    Equals K under uniform routing and E under full collapse.
    """
    T, E = probs_TE.shape
    if token_weight_T is None:
        # Every token real: E/T²·Σ_i count_i·Σ_t p_ti, in 6 kernels instead of 15 (the
        # layer computes this loss on every call, decoding steps included).
        counts_E = probs_TE.new_zeros(E).scatter_add_(0, indices_TK.reshape(-1), probs_TE.new_ones(indices_TK.numel()))
        return torch.dot(counts_E, probs_TE.sum(0)) * (E / max(T, 1) ** 2)
    w_T = _token_weights(T, token_weight_T, probs_TE.device, probs_TE.dtype)
    n = w_T.sum().clamp_min(1.0)
    f_E = assignment_counts(indices_TK, E, w_T) / n
    P_E = (probs_TE * w_T[:, None]).sum(0) / n
    return E * (f_E * P_E).sum()


def router_z_loss(logits_TE: Tensor, token_weight_T: Tensor | None = None) -> Tensor:
    """ST-MoE z-loss (1/T)·Σ_t (log Σ_j exp(logits_tj))²."""
    T = logits_TE.shape[0]
    w_T = _token_weights(T, token_weight_T, logits_TE.device, logits_TE.dtype)
    z_T = torch.logsumexp(logits_TE, dim=-1)
    return (z_T.square() * w_T).sum() / w_T.sum().clamp_min(1.0)


def cv_squared(x_E: Tensor, eps: float = 1e-10) -> Tensor:
    """Squared coefficient of variation, population variance / mean² (0 for one expert)."""
    if x_E.numel() <= 1:
        return x_E.new_zeros(())
    mean = x_E.mean()
    return (x_E - mean).square().mean() / (mean.square() + eps)


def importance_loss(gates_TE: Tensor, token_weight_T: Tensor | None = None) -> Tensor:
    """Shazeer 2017: CV(Importance)², Importance_i = Σ_x G(x)_i."""
    w_T = _token_weights(gates_TE.shape[0], token_weight_T, gates_TE.device, gates_TE.dtype)
    return cv_squared((gates_TE * w_T[:, None]).sum(0))


def load_loss(load_E: Tensor) -> Tensor:
    """Shazeer 2017: CV(Load)², for a (smooth or counted) load per expert."""
    return cv_squared(load_E)


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


def gates_from_topk(indices_TK: Tensor, weights_TK: Tensor, num_experts: int) -> Tensor:
    """The sparse gate G(x) as a dense (T, E) matrix: combine weights, zero elsewhere."""
    gates_TE = weights_TK.new_zeros(weights_TK.shape[0], num_experts)
    return gates_TE.scatter(1, indices_TK, weights_TK)


def standard_losses(
    logits_TE: Tensor,
    probs_TE: Tensor,
    indices_TK: Tensor,
    weights_TK: Tensor,
    token_weight_T: Tensor | None,
) -> dict[str, Tensor]:
    """The losses every router reports (load balance, z-loss, importance, counted
    load), each computed when first read."""
    E = logits_TE.shape[1]

    def counted_load() -> Tensor:
        w_T = _token_weights(len(logits_TE), token_weight_T, logits_TE.device, logits_TE.dtype)
        return load_loss(assignment_counts(indices_TK, E, w_T))

    return LazyDict({
        "load_balance": lambda: load_balancing_loss(probs_TE, indices_TK, token_weight_T),
        "z_loss": lambda: router_z_loss(logits_TE, token_weight_T),
        "importance": lambda: importance_loss(gates_from_topk(indices_TK, weights_TK, E), token_weight_T),
        "load": counted_load,
    })
