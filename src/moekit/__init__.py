"""moekit: a Mixture-of-Experts toolkit for PyTorch."""

from .compute import COMPUTE_PATHS, ComputePath, keep_freed_memory, register_compute_path
from .config import MoEConfig
from .dispatch import Dispatched, Dispatcher, LocalDispatcher
from .experts import (
    EXPERTS,
    Experts,
    ModuleExperts,
    SharedExperts,
    StackedExperts,
    register_experts,
)
from .layer import MoE, MoEOutput, MoERouting
from .routing import (
    ROUTERS,
    ExpertChoiceRouting,
    Router,
    RouterOptions,
    Routing,
    SoftRouting,
    attach_bias_updates,
    check_causal,
    register_router,
    update_router_biases,
)

__version__ = "0.1.0"

__all__ = [
    "COMPUTE_PATHS",
    "EXPERTS",
    "ROUTERS",
    "ComputePath",
    "Dispatched",
    "Dispatcher",
    "ExpertChoiceRouting",
    "Experts",
    "LocalDispatcher",
    "MoE",
    "MoEConfig",
    "MoEOutput",
    "MoERouting",
    "ModuleExperts",
    "Router",
    "RouterOptions",
    "Routing",
    "SharedExperts",
    "SoftRouting",
    "StackedExperts",
    "attach_bias_updates",
    "check_causal",
    "keep_freed_memory",
    "register_compute_path",
    "register_experts",
    "register_router",
    "update_router_biases",
]
