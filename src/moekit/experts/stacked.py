"""Stacked experts: E FFN or GLU experts of one kind, with weights stacked on dim 0.

Stacked weights use the ``nn.Linear`` layout per expert, (out, in), stacked on
dim 0, so expert parallelism shards dim 0 and one ``grouped_mm`` runs them all:
``w_in`` is (E, F, D) for ``ffn`` and (E, 2F, D) for GLU experts (gate rows
first, then up rows), ``w_out`` is (E, D, F). That is the layout
``moekit.compute.mlp`` runs (``stacked_mlp``).

Shapes: R routed rows (sorted by expert), N rows of one expert, D model dim,
F expert hidden dim, E experts.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..compute.mlp import expert_mlp, segment_rows
from ..compute.ops import ACTIVATIONS
from .base import Experts

KINDS = ("swiglu", "geglu", "ffn")
_GLU_ACTIVATION = {"swiglu": "silu", "geglu": "gelu"}


class StackedExperts(Experts):
    """E experts of one kind with stacked weights.

    Args:
        num_experts: E.
        d_model: D.
        d_ff: F, the hidden width of each expert.
        kind: ``swiglu``, ``geglu`` (gated) or ``ffn`` (plain two-layer MLP).
        activation: activation of ``ffn`` experts (``relu``, ``gelu``, ``gelu_tanh``, ``silu``).
        bias: add biases to both projections.
    """

    stacked_mlp = True
    shardable = True

    def __init__(
        self,
        num_experts: int,
        d_model: int,
        d_ff: int,
        kind: str = "swiglu",
        activation: str = "gelu",
        bias: bool = False,
    ):
        super().__init__()
        if kind not in KINDS:
            raise ValueError(f"unknown expert {kind!r}; valid stacked experts: {', '.join(KINDS)}")
        activation = _GLU_ACTIVATION.get(kind, activation)
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"unknown activation {activation!r}; valid activations: {', '.join(ACTIVATIONS)}"
            )
        self.num_experts, self.d_model, self.d_ff = num_experts, d_model, d_ff
        self.kind, self.activation = kind, activation
        self.is_glu = kind in _GLU_ACTIVATION
        hidden_out = 2 * d_ff if self.is_glu else d_ff
        self.w_in = nn.Parameter(torch.empty(num_experts, hidden_out, d_model))
        self.w_out = nn.Parameter(torch.empty(num_experts, d_model, d_ff))
        self.b_in = nn.Parameter(torch.zeros(num_experts, hidden_out)) if bias else None
        self.b_out = nn.Parameter(torch.zeros(num_experts, d_model)) if bias else None
        self.reset_parameters()

    @classmethod
    def from_config(cls, config) -> StackedExperts:
        """The experts an ``MoEConfig`` describes (``expert``, ``activation``, ``expert_bias``)."""
        return cls(config.num_experts, config.d_model, config.d_ff, kind=config.expert,
                   activation=config.activation, bias=config.expert_bias)

    def reset_parameters(self) -> None:
        # Same scale as nn.Linear's default, per expert.
        for weight in (self.w_in, self.w_out):
            bound = 1.0 / math.sqrt(weight.shape[-1])
            nn.init.uniform_(weight, -bound, bound)
        for bias in (self.b_in, self.b_out):
            if bias is not None:
                nn.init.zeros_(bias)

    def forward(self, x_RD: Tensor, counts_E: Tensor) -> Tensor:
        """Rows sorted by expert, one matrix multiply per non-empty expert, fused backward."""
        return segment_rows(self, x_RD, counts_E)

    def forward_expert(self, e: int, x_ND: Tensor) -> Tensor:
        """Expert e on its rows: the readable reference."""
        return expert_mlp(self, e, x_ND)

    @torch.no_grad()
    def shard(self, first: int, count: int) -> StackedExperts:
        shard = StackedExperts(count, self.d_model, self.d_ff, kind=self.kind, activation=self.activation,
                               bias=self.b_in is not None).to(device=self.w_in.device, dtype=self.w_in.dtype)
        for name, param in shard.named_parameters():
            param.copy_(getattr(self, name)[first:first + count])
        return shard

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, d_model={self.d_model}, d_ff={self.d_ff}, "
            f"kind={self.kind!r}, activation={self.activation!r}, bias={self.b_in is not None}"
        )
