"""moekit: a Mixture-of-Experts toolkit for PyTorch."""

from .config import MoEConfig
from .experts import EXPERTS, ModuleExperts, SharedExperts, StackedExperts
from .layer import COMPUTE_PATHS, MoE, MoEOutput
from .routing import (
    ROUTERS,
    ExpertChoiceRouting,
    Router,
    Routing,
    SoftRouting,
    attach_bias_updates,
    check_causal,
    update_router_biases,
)

__version__ = "0.1.0"

__all__ = [
    "COMPUTE_PATHS",
    "EXPERTS",
    "ROUTERS",
    "ExpertChoiceRouting",
    "MoE",
    "MoEConfig",
    "MoEOutput",
    "ModuleExperts",
    "Router",
    "Routing",
    "SharedExperts",
    "SoftRouting",
    "StackedExperts",
    "attach_bias_updates",
    "check_causal",
    "update_router_biases",
]
