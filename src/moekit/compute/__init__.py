"""The low floor every fast path stands on: ops with hand-written backwards, the stacked
MLP kernels, optional Triton kernels, memory and process switches, and the registry of
compute paths that the layer, expert parallelism and the benchmark all read."""

from .memory import keep_freed_memory
from .paths import COMPUTE_PATHS, ComputePath, register_compute_path, resolve_path

__all__ = ["COMPUTE_PATHS", "ComputePath", "keep_freed_memory", "register_compute_path", "resolve_path"]
