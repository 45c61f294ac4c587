"""The Routing record every router returns, and the base class routers share.

Shapes: T tokens, D model dim, E experts, K experts per token.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..config import MoEConfig


@dataclass(frozen=True)
class Routing:
    """What a router decided for a batch of T tokens, and what dispatch made of it.

    Attributes:
        indices_TK: chosen expert ids (long).
        weights_TK: combine weights (float32; float64 for float64 input); dropped assignments keep their
            weight here, ``kept_TK`` says which ones reached an expert.
        logits_TE: router logits (float32 or float64, as weights_TK).
        probs_TE: router probabilities that the balancing losses use.
        losses: each auxiliary loss by name, unweighted.
        valid_T: mask of real (non-padding) tokens, or None when all are real.
        tokens_per_expert_E: assignments each expert processed (filled by the layer).
        kept_TK: assignments that survived capacity and padding (filled by the layer).
        num_dropped: assignments of real tokens dropped for capacity (filled by the layer).
    """

    indices_TK: Tensor
    weights_TK: Tensor
    logits_TE: Tensor
    probs_TE: Tensor
    losses: dict[str, Tensor] = field(default_factory=dict)
    valid_T: Tensor | None = None
    tokens_per_expert_E: Tensor | None = None
    kept_TK: Tensor | None = None
    num_dropped: Tensor | None = None

    @property
    def num_tokens(self) -> int:
        return self.indices_TK.shape[0]

    @property
    def num_experts(self) -> int:
        return self.logits_TE.shape[1]

    def replace(self, **changes) -> Routing:
        return dataclasses.replace(self, **changes)

    def load_fractions(self) -> Tensor:
        """Share of processed assignments per expert (E,), summing to one."""
        counts = self.tokens_per_expert_E.float()
        return counts / counts.sum().clamp_min(1.0)


def valid_weights(valid_T: Tensor | None, num_tokens: int, device: torch.device) -> Tensor:
    """Float weight per token: 1 for real tokens, 0 for padding."""
    if valid_T is None:
        return torch.ones(num_tokens, device=device, dtype=torch.float32)
    return valid_T.to(torch.float32)


class Router(nn.Module):
    """Base router: a linear gate ``logits = x·W_gᵀ`` computed in float32.

    Subclasses implement ``route(logits_TE, x_TD, valid_T)``; the base class
    handles the precision rules (float32 whatever the input dtype or autocast).
    """

    def __init__(self, config: MoEConfig):
        super().__init__()
        self.config = config
        self.num_experts = config.num_experts
        self.top_k = config.top_k
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.d_model))
        nn.init.normal_(self.weight, std=0.02)

    def router_input(self, x_TD: Tensor) -> Tensor:
        return x_TD

    def forward(self, x_TD: Tensor, *, valid_T: Tensor | None = None, **kwargs) -> Routing:
        # Selective precision (Switch): gate math in float32 (float64 stays float64),
        # never under autocast.
        dtype = torch.float64 if x_TD.dtype == torch.float64 else torch.float32
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            xr_TD = self.router_input(x_TD.to(dtype))
            logits_TE = xr_TD @ self.weight.to(dtype).t()
            return self.route(logits_TE, xr_TD, valid_T, **kwargs)

    def route(self, logits_TE: Tensor, x_TD: Tensor, valid_T: Tensor | None, **kwargs) -> Routing:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"d_model={self.weight.shape[1]}, num_experts={self.num_experts}, top_k={self.top_k}"
