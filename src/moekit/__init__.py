"""moekit: a Mixture-of-Experts toolkit for PyTorch."""

from .config import MoEConfig
from .experts import EXPERTS, ModuleExperts, StackedExperts
from .layer import COMPUTE_PATHS, MoE, MoEOutput
from .routing import ROUTERS, Router, Routing

__version__ = "0.1.0"

__all__ = [
    "COMPUTE_PATHS",
    "EXPERTS",
    "ROUTERS",
    "MoE",
    "MoEConfig",
    "MoEOutput",
    "ModuleExperts",
    "Router",
    "Routing",
    "StackedExperts",
]
