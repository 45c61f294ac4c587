"""Per-layer routing statistics, from the router's record and what dispatch made of it.

``routing_stats`` returns detached 0-dim float32 tensors (no host sync), each
computed when first read:
- ``entropy``: mean over real tokens of the routing distribution's entropy
  divided by log E (0: each token certain of one expert, 1: uniform);
- ``dead_expert_share``: share of experts that processed nothing;
- ``max_over_mean_load``: the busiest expert's load over the mean load (1 is balanced);
- ``dropped_share``: share of real assignments dropped for capacity;
- ``unrouted_share``: share of real tokens that reached no expert (under expert
  choice, tokens no expert took; under capacity, tokens whose every choice was dropped).

``normalized_entropy`` is the one definition of routing entropy: the trainer logs it too.

Shapes: T tokens, E experts, K experts per token.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from .records import AnyRouting, LazyMapping


def normalized_entropy(probs_TE: Tensor, valid_T: Tensor | None = None) -> Tensor:
    """Mean over real tokens of −Σ p·log p / log E; 0 for a single expert."""
    return entropy_sum(probs_TE, valid_T) / _real_tokens(probs_TE, valid_T).clamp_min(1.0)


@torch.no_grad()
def entropy_sum(probs_TE: Tensor, valid_T: Tensor | None = None) -> Tensor:
    """Σ over real tokens of −Σ p·log p / log E (0-dim float32): summed over ranks or
    steps and divided by the real tokens, it gives ``normalized_entropy``."""
    T, E = probs_TE.shape
    p_TE = probs_TE.detach().float()
    if E == 1:
        return p_TE.new_zeros(())
    entropy_T = -torch.special.xlogy(p_TE, p_TE).sum(-1) / math.log(E)
    return entropy_T.sum() if valid_T is None else (entropy_T * valid_T.float()).sum()


def _real_tokens(probs_TE: Tensor, valid_T: Tensor | None) -> Tensor:
    if valid_T is None:
        return torch.tensor(float(probs_TE.shape[0]), device=probs_TE.device)
    return valid_T.sum().float()


def routing_stats(routing: AnyRouting, tokens_per_expert_E: Tensor, kept_TK: Tensor | None,
                  num_dropped: Tensor | None) -> LazyMapping:
    """The statistics listed in the module docstring, each computed when first read."""

    @torch.no_grad()
    def unrouted_share() -> Tensor:
        unrouted_T = routing.unreached_T(kept_TK)
        if routing.valid_T is not None:
            unrouted_T = unrouted_T & routing.valid_T
        return unrouted_T.sum().float() / _real_tokens(routing.probs_TE, routing.valid_T).clamp_min(1.0)

    @torch.no_grad()
    def dropped_share() -> Tensor:
        if num_dropped is None:
            return torch.zeros((), device=routing.probs_TE.device)
        return num_dropped.float() / routing.num_real_assignments().clamp_min(1.0)

    def load_E() -> Tensor:
        return tokens_per_expert_E.detach().float()

    return LazyMapping({
        "entropy": lambda: normalized_entropy(routing.probs_TE, routing.valid_T),
        "dead_expert_share": lambda: (load_E() == 0).float().mean(),
        "max_over_mean_load": lambda: load_E().max() / load_E().mean().clamp_min(torch.finfo(torch.float32).tiny),
        "dropped_share": dropped_share,
        "unrouted_share": unrouted_share,
    })
