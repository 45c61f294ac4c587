"""GShard's random routing of the second expert (Lepikhin et al. 2020).

With top-2 routing, the second choice is dispatched only with probability
min(1, 2·g2), g2 = w2 / (w1 + w2) its weight normalised over the two choices:
a second expert with nearly the first one's weight is almost always used, one
with a negligible weight rarely, which saves capacity for first choices. The
combine weights are left as they are; a declined assignment just contributes
nothing. Applied in training only, so evaluation is deterministic.

Shapes: T tokens, K = 2 experts per token.
"""

from __future__ import annotations

import torch
from torch import Tensor

SECOND_EXPERT_POLICIES = ("all", "random")


def random_second_expert(weights_TK: Tensor) -> Tensor:
    """Which assignments to dispatch (T, 2), bool: the first always, the second at random."""
    if weights_TK.shape[1] != 2:
        raise ValueError(f"random second-expert routing needs top_k = 2; got {weights_TK.shape[1]}")
    w_TK = weights_TK.detach()
    g2_T = w_TK[:, 1] / (w_TK[:, 0] + w_TK[:, 1]).clamp_min(torch.finfo(w_TK.dtype).tiny)
    second_T = torch.rand_like(g2_T) < 2.0 * g2_T
    return torch.stack([torch.ones_like(second_T), second_T], dim=1)


def dispatched_assignments(policy: str, weights_TK: Tensor, training: bool) -> Tensor | None:
    """Assignments to dispatch under ``second_expert_policy`` (None: all of them)."""
    if policy == "random" and training:
        return random_second_expert(weights_TK)
    return None
