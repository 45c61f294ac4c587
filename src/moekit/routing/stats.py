"""Per-layer routing statistics, computed from a filled routing record.

``routing_stats`` returns detached 0-dim float32 tensors (no host sync):
- ``entropy``: mean over real tokens of the routing distribution's entropy
  divided by log E (0: each token certain of one expert, 1: uniform);
- ``dead_expert_share``: share of experts that processed nothing;
- ``max_over_mean_load``: the busiest expert's load over the mean load (1 is balanced);
- ``dropped_share``: share of real assignments dropped for capacity;
- ``unrouted_share``: share of real tokens that reached no expert (under expert
  choice, tokens no expert took; under capacity, tokens whose every choice was dropped).
Tokens per expert are the record's ``tokens_per_expert_E``.

Shapes: T tokens, E experts, K experts per token.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .base import AnyRouting, ExpertChoiceRouting, Routing


def normalized_entropy(probs_TE: Tensor, valid_T: Tensor | None = None) -> Tensor:
    """Mean over real tokens of −Σ p·log p / log E; 0 for a single expert."""
    T, E = probs_TE.shape
    p_TE = probs_TE.float()
    if E == 1:
        return p_TE.new_zeros(())
    entropy_T = -torch.special.xlogy(p_TE, p_TE).sum(-1) / math.log(E)
    w_T = p_TE.new_ones(T) if valid_T is None else valid_T.float()
    return (entropy_T * w_T).sum() / w_T.sum().clamp_min(1.0)


def _unrouted_and_dropped(routing: AnyRouting) -> tuple[Tensor, Tensor]:
    """(tokens reached by no expert (T,) bool, dropped assignments, 0-dim float)."""
    T = routing.num_tokens
    device = routing.probs_TE.device
    if isinstance(routing, ExpertChoiceRouting):
        return routing.experts_per_token() == 0, torch.zeros((), device=device)
    if not isinstance(routing, Routing):  # Soft MoE: every token gets every slot's output
        return torch.zeros(T, dtype=torch.bool, device=device), torch.zeros((), device=device)
    reached_TK = routing.kept_TK if routing.kept_TK is not None else routing.active_TK
    if reached_TK is None:
        unrouted_T = torch.zeros(T, dtype=torch.bool, device=device)
    else:
        unrouted_T = ~reached_TK.any(dim=1)
    dropped = torch.zeros((), device=device) if routing.num_dropped is None else routing.num_dropped.float()
    return unrouted_T, dropped


def _real_assignments(routing: Routing) -> Tensor:
    T, K = routing.indices_TK.shape
    real_TK = torch.ones(T, K, dtype=torch.bool, device=routing.indices_TK.device)
    if routing.active_TK is not None:
        real_TK = real_TK & routing.active_TK
    if routing.valid_T is not None:
        real_TK = real_TK & routing.valid_T[:, None]
    return real_TK.sum().float()


@torch.no_grad()
def routing_stats(routing: AnyRouting) -> dict[str, Tensor]:
    """The statistics listed in the module docstring, for a record the layer has filled."""
    if routing.tokens_per_expert_E is None:
        raise ValueError("routing_stats needs tokens_per_expert_E; pass a record returned by MoE")
    load_E = routing.tokens_per_expert_E.float()
    valid_T = routing.valid_T
    unrouted_T, dropped = _unrouted_and_dropped(routing)
    if valid_T is not None:
        unrouted_T = unrouted_T & valid_T
    real_tokens = load_E.new_tensor(routing.num_tokens) if valid_T is None else valid_T.sum().float()
    if isinstance(routing, Routing):
        dropped_share = dropped / _real_assignments(routing).clamp_min(1.0)
    else:
        dropped_share = dropped
    return {
        "entropy": normalized_entropy(routing.probs_TE.detach(), valid_T),
        "dead_expert_share": (load_E == 0).float().mean(),
        "max_over_mean_load": load_E.max() / load_E.mean().clamp_min(torch.finfo(load_E.dtype).tiny),
        "dropped_share": dropped_share,
        "unrouted_share": unrouted_T.sum().float() / real_tokens.clamp_min(1.0),
    }
