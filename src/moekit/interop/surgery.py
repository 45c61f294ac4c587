"""Expert surgery: turn a trained dense FFN into an MoE (sparse upcycling).

``upcycle(ffn, num_experts)`` copies a dense FFN into every expert of a new
``moekit.MoE`` (Komatsuzaki et al. 2022). With identical experts and combine
weights that sum to one (``topk`` with renormalisation, ``softmax``,
``noisy_topk``), the upcycled layer computes exactly what the dense FFN did,
whatever the router's fresh weights; training then lets the experts diverge.
``perturb`` and ``reinit_fraction`` break the symmetry from the start.

``grow(moe, n, x)`` adds n experts to a trained layer without changing what it
computes for tokens like ``x``; ``freeze_experts`` keeps chosen experts'
weights fixed while the rest of the stacked tensor trains.

Dense FFNs understood: moekit's own (an ``MoE`` with one expert,
``StackedExperts`` with one expert, or the language model's dense ``SwiGLU``
with ``w_in``/``w_out`` linears); gated MLPs with ``gate_proj``/``up_proj``/
``down_proj`` (Llama, Qwen, Mistral); GPT-2's MLP (``c_fc``/``c_proj``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..config import MoEConfig
from ..experts import StackedExperts
from ..freezing import freeze_experts, freeze_router_rows  # noqa: F401  (part of surgery's API)
from ..layer import MoE
from ..routing import ROUTERS

_HF_ACTIVATIONS = {
    "silu": "silu", "swish": "silu", "gelu": "gelu", "relu": "relu",
    "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh",
}
_GLU_EXPERT = {"silu": "swiglu", "gelu": "geglu"}


@dataclass
class DenseFFN:
    """A dense FFN in moekit's stacked layout: w_in (H, D), w_out (D, F), optional biases."""

    w_in: Tensor
    w_out: Tensor
    b_in: Tensor | None
    b_out: Tensor | None
    expert: str
    activation: str


def _hf_activation(name: str) -> str:
    if name not in _HF_ACTIVATIONS:
        raise ValueError(f"activation {name!r} is not supported; supported: {', '.join(_HF_ACTIVATIONS)}")
    return _HF_ACTIVATIONS[name]


def read_dense_ffn(ffn: nn.Module) -> DenseFFN:
    """Weights of a dense FFN in moekit's layout, from any supported module."""
    if isinstance(ffn, MoE):
        ffn = ffn.experts
    if getattr(ffn, "stacked_mlp", False):
        if ffn.num_experts != 1:
            raise ValueError(f"a dense FFN has one expert; these StackedExperts have {ffn.num_experts}")
        return DenseFFN(ffn.w_in[0], ffn.w_out[0], None if ffn.b_in is None else ffn.b_in[0],
                        None if ffn.b_out is None else ffn.b_out[0], ffn.kind, ffn.activation)
    if isinstance(getattr(ffn, "w_in", None), nn.Linear) and isinstance(getattr(ffn, "w_out", None), nn.Linear):
        # moekit.models.lm.SwiGLU: w_in holds the gate rows then the up rows, like a swiglu expert.
        return DenseFFN(ffn.w_in.weight, ffn.w_out.weight, ffn.w_in.bias, ffn.w_out.bias, "swiglu", "silu")
    if all(hasattr(ffn, n) for n in ("gate_proj", "up_proj", "down_proj")):
        act_name = getattr(getattr(ffn, "config", None), "hidden_act", "silu")
        activation = _hf_activation(act_name)
        if activation not in _GLU_EXPERT:
            raise ValueError(f"gated MLP with activation {act_name!r}: moekit GLU experts use silu or gelu")
        biases = [ffn.gate_proj.bias, ffn.up_proj.bias]
        b_in = None if biases[0] is None else torch.cat(biases)
        return DenseFFN(torch.cat([ffn.gate_proj.weight, ffn.up_proj.weight]), ffn.down_proj.weight, b_in,
                        ffn.down_proj.bias, _GLU_EXPERT[activation], activation)
    if hasattr(ffn, "c_fc") and hasattr(ffn, "c_proj"):
        # GPT-2's Conv1D stores (in, out): transpose to nn.Linear's (out, in).
        act_name = getattr(getattr(ffn, "act", None), "__class__", type(None)).__name__
        activation = {"NewGELUActivation": "gelu_tanh", "GELUTanh": "gelu_tanh", "PytorchGELUTanh": "gelu_tanh",
                      "GELUActivation": "gelu", "ReLU": "relu", "SiLU": "silu"}.get(act_name)
        if activation is None:
            raise ValueError(f"GPT-2 MLP activation {act_name!r} is not supported")
        return DenseFFN(ffn.c_fc.weight.t(), ffn.c_proj.weight.t(), ffn.c_fc.bias, ffn.c_proj.bias, "ffn",
                        activation)
    raise TypeError(
        f"cannot read a dense FFN from {type(ffn).__name__}: expected a one-expert moekit MoE/StackedExperts, "
        "a gated MLP (gate_proj/up_proj/down_proj) or a GPT-2 MLP (c_fc/c_proj)"
    )


@torch.no_grad()
def upcycle(
    ffn: nn.Module,
    num_experts: int,
    top_k: int | None = None,
    *,
    perturb: float = 0.0,
    reinit_fraction: float = 0.0,
    seed: int = 0,
    **config_fields,
) -> MoE:
    """An E-expert MoE whose experts start as copies of ``ffn``.

    Args:
        ffn: the trained dense FFN (see module docstring for supported kinds).
        num_experts, top_k: E and K of the new layer (``top_k=None``: the router's default).
        perturb: multiply each copy's weights by (1 + perturb·N(0, 1)) noise;
            expert 0 stays an exact copy.
        reinit_fraction: share of each copy's hidden units (rows of w_in,
            columns of w_out) drawn afresh; expert 0 stays an exact copy.
        seed: seed of the router init, the noise and the re-initialisation.
        config_fields: further ``MoEConfig`` fields (router, capacity_factor, ...).
    """
    if not 0.0 <= reinit_fraction <= 1.0:
        raise ValueError(f"reinit_fraction ({reinit_fraction}) must be in [0, 1]")
    if perturb < 0:
        raise ValueError(f"perturb ({perturb}) must be >= 0")
    dense = read_dense_ffn(ffn)
    d_model = dense.w_out.shape[0]
    d_ff = dense.w_out.shape[1]
    generator = torch.Generator().manual_seed(seed)
    config = MoEConfig(d_model=d_model, d_ff=d_ff, num_experts=num_experts, top_k=top_k, expert=dense.expert,
                       activation=dense.activation, expert_bias=dense.b_in is not None, **config_fields)
    moe = MoE(config)
    moe.router.weight.copy_(torch.randn(moe.router.weight.shape, generator=generator) * 0.02)
    experts = moe.experts
    experts.to(dtype=dense.w_in.dtype)
    experts.w_in.copy_(dense.w_in.expand_as(experts.w_in))
    experts.w_out.copy_(dense.w_out.expand_as(experts.w_out))
    if dense.b_in is not None:
        experts.b_in.copy_(dense.b_in.expand_as(experts.b_in))
    if dense.b_out is not None:
        experts.b_out.copy_(dense.b_out.expand_as(experts.b_out))
    fresh = StackedExperts(num_experts, d_model, d_ff, kind=dense.expert, activation=dense.activation)
    n_reinit = round(reinit_fraction * d_ff)
    glu = experts.is_glu
    for e in range(1, num_experts):
        if perturb > 0:
            for weight in (experts.w_in, experts.w_out):
                noise = torch.randn(weight.shape[1:], generator=generator, dtype=weight.dtype)
                weight[e].mul_(1 + perturb * noise)
        if n_reinit:
            units = torch.randperm(d_ff, generator=generator)[:n_reinit]
            rows = torch.cat([units, units + d_ff]) if glu else units
            experts.w_in[e, rows] = fresh.w_in[e, rows].to(experts.w_in.dtype)
            experts.w_out[e][:, units] = fresh.w_out[e][:, units].to(experts.w_out.dtype)
    return moe.to(device=dense.w_in.device)


@torch.no_grad()
def measure_load(moe: MoE, batches) -> Tensor:
    """Assignments each expert processed over ``batches`` (tensors of (..., D)), in eval mode."""
    was_training = moe.training
    moe.eval()
    load_E = torch.zeros(moe.config.num_experts, dtype=torch.long)
    for x in batches:
        load_E += moe(x).routing.tokens_per_expert_E.cpu()
    moe.train(was_training)
    return load_E


def _stacked(moe: MoE) -> StackedExperts:
    if not moe.experts.stacked_mlp:
        raise TypeError("expert surgery needs stacked experts; these are arbitrary modules")
    return moe.experts


@torch.no_grad()
def keep_experts(moe: MoE, keep: list[int] | Tensor) -> MoE:
    """A new MoE with only the experts in ``keep`` (and their router rows), in that order.

    The router's softmax renormalises over the experts that remain; a token
    none of whose chosen experts was removed keeps its combine weights when
    they are renormalised over the top k (``normalize_weights=True``).
    """
    experts = _stacked(moe)
    keep = torch.as_tensor(keep, dtype=torch.long)
    E = moe.config.num_experts
    if keep.numel() == 0 or keep.unique().numel() != keep.numel() or keep.min() < 0 or keep.max() >= E:
        raise ValueError(f"keep ({keep.tolist()}) must list distinct expert ids in [0, {E})")
    # A router with a fixed K (every expert, or one) keeps it; the others keep theirs, at most E.
    top_k = None if moe.router.top_k_fixed else min(moe.config.top_k, keep.numel())
    fields = {**moe.config.__dict__, "num_experts": keep.numel(), "top_k": top_k}
    pruned = MoE(MoEConfig(**fields), name=moe.name).to(device=experts.w_in.device, dtype=experts.w_in.dtype)
    source_state = moe.state_dict()
    new_state = {}
    for name, value in pruned.state_dict().items():
        old = source_state[name]
        if old.dim() >= 1 and old.shape[0] == E and value.shape[0] == keep.numel():
            new_state[name] = old[keep.to(old.device)]
        else:
            new_state[name] = old
    pruned.load_state_dict(new_state)
    return pruned


def prune_least_used(moe: MoE, load_E: Tensor, num_remove: int) -> tuple[MoE, list[int]]:
    """Drop the ``num_remove`` experts with the lowest measured load; returns (layer, removed ids)."""
    E = moe.config.num_experts
    if not 0 <= num_remove < E:
        raise ValueError(f"num_remove ({num_remove}) must be in [0, {E - 1}]")
    order = torch.argsort(load_E.float(), stable=True)
    removed = sorted(order[:num_remove].tolist())
    keep = sorted(order[num_remove:].tolist())
    return keep_experts(moe, keep), removed


@torch.no_grad()
def expert_output_similarity(moe: MoE, x_ND: Tensor) -> Tensor:
    """Cosine similarity (E, E) of the experts' outputs on the same rows."""
    experts = _stacked(moe)
    outputs = torch.stack([experts.forward_expert(e, x_ND).flatten() for e in range(experts.num_experts)])
    outputs = torch.nn.functional.normalize(outputs.float(), dim=1)
    return outputs @ outputs.t()


@torch.no_grad()
def merge_most_similar(moe: MoE, x_ND: Tensor) -> tuple[MoE, tuple[int, int]]:
    """Merge the pair of experts whose outputs on ``x_ND`` agree most.

    The merged expert averages the pair's weights and router rows; it takes
    the lower id. Returns (layer with E − 1 experts, the merged pair).
    """
    E = moe.config.num_experts
    if E < 2:
        raise ValueError("merging needs at least two experts")
    similarity = expert_output_similarity(moe, x_ND)
    similarity.fill_diagonal_(-float("inf"))
    flat = int(similarity.argmax())
    a, b = sorted((flat // E, flat % E))
    merged = keep_experts(moe, [e for e in range(E) if e != b])
    experts, source = _stacked(merged), _stacked(moe)
    for name in ("w_in", "w_out", "b_in", "b_out"):
        target = getattr(experts, name)
        if target is not None:
            weights = getattr(source, name)
            target[a] = (weights[a] + weights[b]) / 2
    merged.router.weight[a] = (moe.router.weight[a] + moe.router.weight[b]) / 2
    if moe.router.logit_bias is not None:
        merged.router.logit_bias[a] = (moe.router.logit_bias[a] + moe.router.logit_bias[b]) / 2
    return merged, (a, b)


@torch.no_grad()
def router_logits(moe: MoE, x_ND: Tensor) -> Tensor:
    """The router's logits (N, E) in float32 as in evaluation (no jitter, no noise)."""
    weight = moe.router.weight.float()
    logits_NE = x_ND.reshape(-1, weight.shape[1]).float() @ weight.t()
    if moe.router.logit_bias is not None:
        logits_NE = logits_NE + moe.router.logit_bias.float()
    return logits_NE


@torch.no_grad()
def grow(moe: MoE, num_new: int, x_ND: Tensor, *, margin: float = 1.0, seed: int = 0) -> MoE:
    """A new MoE with ``num_new`` extra experts that no token of ``x_ND`` chooses yet.

    The old experts, their router rows and every other weight are copied. Each
    new expert gets fresh weights, a random router row (the old rows' scale,
    so the new experts differ from one another) and a logit bias that puts its
    logit ``margin`` below the K-th largest old logit of every token in
    ``x_ND``. Those tokens therefore choose exactly the experts they chose
    before with the same combine weights (renormalised top-k weights do not
    depend on the logits left out), so the layer's output is unchanged.

    New experts are not dead: their logits are finite, so the load-balancing
    loss (which falls when probability mass spreads to idle experts) and the
    z-loss give their router rows and biases gradient from the first step;
    once a new expert enters a token's top K, the task loss trains it. Noisy
    top-k also samples them in training. Tokens unlike ``x_ND`` may choose a new
    expert from the start: pass representative inputs (the layer's inputs on
    validation data).

    Args:
        moe: a trained layer with stacked experts and a top-k router (topk, noisy_topk) that
            renormalises its weights (``normalize_weights=True``).
        num_new: experts to add (n ≥ 1).
        x_ND: representative router inputs (N, D), e.g. captured on validation data.
        margin: how far (in logits) below each token's K-th choice the new experts start.
        seed: seed of the new experts' weights and router rows.
    """
    experts = _stacked(moe)
    config = moe.config
    if not moe.router.growable:
        # Growable routers choose the top K of the logits, so a logit below every token's K-th
        # largest is never chosen, and their renormalised weights do not depend on the logits
        # left out (Switch's weight is the raw probability, whose denominator a new expert changes).
        growable = ", ".join(name for name, cls in ROUTERS.items() if cls.growable)
        raise ValueError(f"grow supports the routers {growable}; this layer's router is {config.router!r}")
    if not getattr(config.router_options, "normalize_weights", True):
        raise ValueError("grow needs normalize_weights=True: raw top-k probabilities change when experts are "
                         "added, so the output would not be preserved")
    if isinstance(num_new, bool) or not isinstance(num_new, int) or num_new < 1:
        raise ValueError(f"num_new ({num_new!r}) must be a positive integer")
    if not margin > 0:
        raise ValueError(f"margin ({margin}) must be > 0")
    if x_ND.numel() == 0:
        raise ValueError("grow needs representative inputs x_ND; got none")
    E, K = config.num_experts, config.top_k
    options = dataclasses.replace(config.router_options, logit_bias=True)
    fields = {**config.__dict__, "num_experts": E + num_new, "router_options": options}
    grown = MoE(MoEConfig(**fields), name=moe.name).to(device=experts.w_in.device, dtype=experts.w_in.dtype)
    generator = torch.Generator().manual_seed(seed)
    fresh = StackedExperts(num_new, config.d_model, config.d_ff, kind=experts.kind, activation=experts.activation,
                           bias=experts.b_in is not None)
    for name in ("w_in", "w_out", "b_in", "b_out"):
        target = getattr(grown.experts, name)
        if target is not None:
            new_values = getattr(fresh, name)
            if name.startswith("w"):
                new_values = torch.randn(new_values.shape, generator=generator) * new_values.std()
            target.copy_(torch.cat([getattr(experts, name), new_values.to(target)]))
    old_weight = moe.router.weight
    new_rows = torch.randn(num_new, config.d_model, generator=generator) * old_weight.float().std()
    grown.router.weight.copy_(torch.cat([old_weight, new_rows.to(old_weight)]))
    kth_old_N = router_logits(moe, x_ND).topk(K, dim=-1).values[:, -1]
    new_logits_Nn = x_ND.reshape(-1, config.d_model).float() @ new_rows.t().to(x_ND.device)
    new_bias = (kth_old_N[:, None] - new_logits_Nn).min(dim=0).values - margin
    old_bias = moe.router.logit_bias if moe.router.logit_bias is not None else torch.zeros(E)
    grown.router.logit_bias.copy_(torch.cat([old_bias.float().cpu(), new_bias.cpu()]))
    if moe.shared_experts is not None:
        grown.shared_experts.load_state_dict(moe.shared_experts.state_dict())
    return grown
