"""Routers by name. Each maps tokens (T, D) to a routing record: ``Routing`` for
token choice, ``ExpertChoiceRouting`` and ``SoftRouting`` for the two routers
that do not fit the top-k fields."""

from __future__ import annotations

from ..config import MoEConfig
from .base import AnyRouting, ExpertChoiceRouting, Router, Routing, SoftRouting, check_causal
from .expert_choice import ExpertChoiceRouter
from .hash import HashRouter
from .noisy_topk import NoisyTopKRouter
from .sigmoid import SigmoidRouter, attach_bias_updates, update_router_biases
from .soft import SoftRouter
from .softmax import SoftmaxRouter
from .stats import routing_stats
from .switch import SwitchRouter
from .topk import TopKRouter

ROUTERS: dict[str, type[Router]] = {
    "softmax": SoftmaxRouter,
    "topk": TopKRouter,
    "noisy_topk": NoisyTopKRouter,
    "switch": SwitchRouter,
    "expert_choice": ExpertChoiceRouter,
    "sigmoid": SigmoidRouter,
    "soft": SoftRouter,
    "hash": HashRouter,
}


def build_router(config: MoEConfig) -> Router:
    try:
        cls = ROUTERS[config.router]
    except KeyError:
        raise ValueError(
            f"unknown router {config.router!r}; valid routers: {', '.join(sorted(ROUTERS))}"
        ) from None
    return cls(config)


__all__ = [
    "ROUTERS",
    "AnyRouting",
    "ExpertChoiceRouting",
    "Router",
    "Routing",
    "SoftRouting",
    "attach_bias_updates",
    "build_router",
    "check_causal",
    "routing_stats",
    "update_router_biases",
]
