"""Experts kinds behind one contract (``Experts``: rows grouped by expert → outputs).

``EXPERTS`` maps each name ``MoEConfig.expert`` accepts to a builder of the experts
from the config; ``register_experts`` adds a kind. Lists of arbitrary modules go
through ``MoE(..., experts=[...])`` (``ModuleExperts``).
"""

from __future__ import annotations

from collections.abc import Callable

from .base import Experts
from .lora import LoRAExperts
from .modules import ModuleExperts
from .shared import SharedExperts
from .shared_base import SharedBaseExperts
from .stacked import KINDS, StackedExperts

EXPERTS: dict[str, Callable[..., Experts]] = {kind: StackedExperts.from_config for kind in KINDS}


def register_experts(name: str, build: Callable[..., Experts]) -> Callable[..., Experts]:
    """Make ``MoEConfig(expert=name)`` build its experts with ``build(config)``; returns ``build``."""
    if not name:
        raise ValueError("an experts kind needs a name")
    EXPERTS[name] = build
    return build


def build_experts(config) -> Experts:
    """The experts ``config.expert`` names, for the layer ``config`` describes."""
    try:
        build = EXPERTS[config.expert]
    except KeyError:
        raise ValueError(f"unknown expert {config.expert!r}; valid experts: {', '.join(EXPERTS)}") from None
    experts = build(config)
    if experts.num_experts != config.num_experts:
        raise ValueError(f"expert kind {config.expert!r} built {experts.num_experts} experts; "
                         f"num_experts is {config.num_experts}")
    return experts


__all__ = ["EXPERTS", "Experts", "LoRAExperts", "ModuleExperts", "SharedBaseExperts", "SharedExperts", "StackedExperts", "build_experts",
           "register_experts"]
