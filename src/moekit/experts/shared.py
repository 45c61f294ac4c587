"""Always-on experts (DeepSeekMoE), optionally scaled by a sigmoid gate (Qwen2-MoE).

Shapes: T tokens, D model dim.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..compute.mlp import expert_mlp
from .stacked import StackedExperts


class SharedExperts(nn.Module):
    """n shared experts of hidden width F run as one dense FFN of width n·F: the
    sum of n FFNs is that FFN with its hidden units concatenated. The gate is
    sigmoid(x·w), one scalar per token."""

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        *,
        num_experts: int = 1,
        kind: str = "swiglu",
        activation: str = "gelu",
        bias: bool = False,
        gate: bool = False,
    ):
        super().__init__()
        self.num_experts = num_experts
        self.ffn = StackedExperts(1, d_model, num_experts * d_ff, kind=kind, activation=activation, bias=bias)
        self.gate = nn.Linear(d_model, 1, bias=False) if gate else None

    def forward(self, x_TD: Tensor, valid_T: Tensor | None = None) -> Tensor:
        """Every token's shared output; padding (``valid_T`` False) gets zero."""
        y_TD = expert_mlp(self.ffn, 0, x_TD)
        if self.gate is not None:
            y_TD = torch.sigmoid(self.gate(x_TD)) * y_TD
        if valid_T is not None:
            y_TD = y_TD * valid_T[:, None].to(y_TD.dtype)
        return y_TD

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, gate={self.gate is not None}"
