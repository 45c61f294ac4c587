"""Routers by name. Each maps tokens (T, D) to a ``Routing`` record."""

from __future__ import annotations

from ..config import MoEConfig
from .base import Router, Routing
from .noisy_topk import NoisyTopKRouter
from .softmax import SoftmaxRouter
from .switch import SwitchRouter
from .topk import TopKRouter

ROUTERS: dict[str, type[Router]] = {
    "softmax": SoftmaxRouter,
    "topk": TopKRouter,
    "noisy_topk": NoisyTopKRouter,
    "switch": SwitchRouter,
}


def build_router(config: MoEConfig) -> Router:
    try:
        cls = ROUTERS[config.router]
    except KeyError:
        raise ValueError(
            f"unknown router {config.router!r}; valid routers: {', '.join(sorted(ROUTERS))}"
        ) from None
    return cls(config)


__all__ = ["ROUTERS", "Router", "Routing", "build_router"]
