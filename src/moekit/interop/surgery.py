"""Expert surgery: turn a trained dense FFN into an MoE (sparse upcycling).

``upcycle(ffn, num_experts)`` copies a dense FFN into every expert of a new
``moekit.MoE`` (Komatsuzaki et al. 2022). With identical experts and combine
weights that sum to one (``topk`` with renormalisation, ``softmax``,
``noisy_topk``), the upcycled layer computes exactly what the dense FFN did,
whatever the router's fresh weights; training then lets the experts diverge.
``perturb`` and ``reinit_fraction`` break the symmetry from the start.

Dense FFNs understood: moekit's own (an ``MoE`` with one expert, or
``StackedExperts`` with one expert); gated MLPs with ``gate_proj``/``up_proj``/
``down_proj`` (Llama, Qwen, Mistral); GPT-2's MLP (``c_fc``/``c_proj``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..config import MoEConfig
from ..experts import StackedExperts
from ..layer import MoE

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
    if isinstance(ffn, StackedExperts):
        if ffn.num_experts != 1:
            raise ValueError(f"a dense FFN has one expert; these StackedExperts have {ffn.num_experts}")
        return DenseFFN(ffn.w_in[0], ffn.w_out[0], None if ffn.b_in is None else ffn.b_in[0],
                        None if ffn.b_out is None else ffn.b_out[0], ffn.kind, ffn.activation)
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
