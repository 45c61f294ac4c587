"""Heterogeneous experts: any list of modules, each mapping (N, D) to (N, D)."""

from __future__ import annotations

from torch import Tensor, nn

from .base import Experts


class ModuleExperts(Experts):
    """Any list of modules mapping (N, D) to (N, D), one per expert."""

    def __init__(self, experts: list[nn.Module] | nn.ModuleList):
        super().__init__()
        if len(experts) == 0:
            raise ValueError("experts must hold at least one module")
        for i, expert in enumerate(experts):
            if not isinstance(expert, nn.Module):
                raise TypeError(f"experts[{i}] is a {type(expert).__name__}, expected an nn.Module")
        self.experts = nn.ModuleList(experts)
        self.num_experts = len(self.experts)

    def forward_expert(self, e: int, x_ND: Tensor) -> Tensor:
        return self.experts[e](x_ND)
