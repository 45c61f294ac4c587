"""Routers by name. Each maps tokens (T, D) to a routing record: ``Routing`` for
token choice, ``ExpertChoiceRouting`` and ``SoftRouting`` for the two routers
that do not fit the top-k fields.

``ROUTERS`` maps each name ``MoEConfig.router`` accepts to its class;
``register_router(name)`` adds one (a decorator on a ``Router`` subclass).
"""

from __future__ import annotations

from .base import GateOptions, GateRouter, Router, RouterOptions, check_causal
from .expert_choice import ExpertChoiceOptions, ExpertChoiceRouter
from .forcing import BalancedRouting, FixedRouting, forced
from .hash import HashOptions, HashRouter
from .noisy_topk import NoisyTopKOptions, NoisyTopKRouter
from .records import AnyRouting, ExpertChoiceRouting, LazyMapping, Routing, SoftRouting
from .sigmoid import SigmoidOptions, SigmoidRouter, attach_bias_updates, update_router_biases
from .soft import SoftOptions, SoftRouter
from .softmax import SoftmaxRouter
from .stats import normalized_entropy, routing_stats
from .switch import SwitchOptions, SwitchRouter
from .topk import TopKOptions, TopKRouter

ROUTERS: dict[str, type[Router]] = {}


def register_router(name: str):
    """Class decorator: make ``MoEConfig(router=name)`` build this ``Router`` subclass."""

    def register(cls: type[Router]) -> type[Router]:
        if not (isinstance(cls, type) and issubclass(cls, Router)):
            raise TypeError(f"register_router({name!r}) takes a Router subclass, got {cls!r}")
        cls.name = name
        ROUTERS[name] = cls
        return cls

    return register


def router_class(name: str) -> type[Router]:
    try:
        return ROUTERS[name]
    except KeyError:
        raise ValueError(f"unknown router {name!r}; valid routers: {', '.join(sorted(ROUTERS))}") from None


for _name, _cls in {
    "softmax": SoftmaxRouter, "topk": TopKRouter, "noisy_topk": NoisyTopKRouter, "switch": SwitchRouter,
    "expert_choice": ExpertChoiceRouter, "sigmoid": SigmoidRouter, "soft": SoftRouter, "hash": HashRouter,
}.items():
    register_router(_name)(_cls)


__all__ = [
    "ROUTERS", "AnyRouting", "BalancedRouting", "ExpertChoiceOptions", "ExpertChoiceRouting", "FixedRouting",
    "GateOptions", "GateRouter", "HashOptions", "LazyMapping", "NoisyTopKOptions", "Router", "RouterOptions",
    "Routing", "SigmoidOptions", "SoftOptions", "SoftRouting", "SwitchOptions", "TopKOptions",
    "attach_bias_updates", "check_causal", "forced", "normalized_entropy", "register_router", "router_class",
    "routing_stats", "update_router_biases",
]
