"""Forcing the routing: the one way to replace what a token-choice router chose.

``MoE.force_routing(choice)`` makes a layer route every call by ``choice``, a
callable ``(routing) -> (indices_TK, weights_TK)`` that sees the router's record.
``forced`` then builds a new record: the forced choice, its gates as the
probabilities, no auxiliary losses (the router decided nothing, so nothing
balances it). The router's own record is left as it was. Uses:

- ``BalancedRouting``: expert (t·K + k) mod E, weights 1/K, so throughput can be
  measured whatever the router learned (``MoEConfig(debug_balanced_routing=True)``);
- ``FixedRouting``: a given assignment, so that every implementation a benchmark
  compares routes the same tokens to the same experts;
- two-stage training's cluster routing (``moekit.train.stages.ClusterRouting``).

Shapes: T tokens, E experts, K experts per token.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from .losses import gates_from_topk
from .records import Routing

RoutingChoice = Callable[[Routing], tuple[Tensor, Tensor]]


def forced(routing: Routing, indices_TK: Tensor, weights_TK: Tensor) -> Routing:
    """A record with the forced choice for the tokens of ``routing``."""
    if not isinstance(routing, Routing):
        raise ValueError(f"routing can be forced for token-choice routers only; got {type(routing).__name__}")
    T, E = routing.probs_TE.shape
    if indices_TK.shape != weights_TK.shape or indices_TK.dim() != 2 or indices_TK.shape[0] != T:
        raise ValueError(f"a forced choice needs indices and weights of shape ({T}, K); got "
                         f"{tuple(indices_TK.shape)} and {tuple(weights_TK.shape)}")
    indices_TK = indices_TK.to(routing.indices_TK.device)
    weights_TK = weights_TK.to(device=routing.weights_TK.device, dtype=routing.weights_TK.dtype)
    return Routing(indices_TK=indices_TK, weights_TK=weights_TK, logits_TE=None,
                   probs_TE=gates_from_topk(indices_TK, weights_TK, E), valid_T=routing.valid_T)


class BalancedRouting:
    """Token t's k-th expert is (t·K + k) mod E, every weight 1/K: a perfectly even load."""

    def __call__(self, routing: Routing) -> tuple[Tensor, Tensor]:
        T, K = routing.indices_TK.shape
        E = routing.num_experts
        t_T = torch.arange(T, device=routing.indices_TK.device)
        indices_TK = (t_T[:, None] * K + torch.arange(K, device=t_T.device)) % E
        return indices_TK, torch.full_like(routing.weights_TK, 1.0 / K)


class FixedRouting:
    """The same assignment ``indices_TK`` (T, K) for every call, weights 1/K."""

    def __init__(self, indices_TK: Tensor):
        self.indices_TK = indices_TK

    def __call__(self, routing: Routing) -> tuple[Tensor, Tensor]:
        K = self.indices_TK.shape[1]
        weights_TK = torch.full(self.indices_TK.shape, 1.0 / K, dtype=routing.weights_TK.dtype,
                                device=routing.weights_TK.device)
        return self.indices_TK.to(routing.indices_TK.device), weights_TK
