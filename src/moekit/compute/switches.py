"""Process-wide switches that change which kernels moekit runs, set and read here only.

- ``freed_memory_kept``: ``moekit.compute.memory.keep_freed_memory()`` is in effect (glibc
  keeps freed blocks). On CPU it decides whether ``auto`` prefers the ``fused`` path,
  whose point is to avoid page-faulting fresh (T·K, D) row tensors in every step.
- ``fused_glu``: whether GLU experts run the fused Triton activation kernel. ``None``
  (the default): on CUDA tensors only; ``True``: on any tensor the kernel takes, CPU
  ones included under ``TRITON_INTERPRET=1`` (so tests compare a whole layer both ways
  without a GPU); ``False``: never.
- ``compiling``: ``torch.compile`` is tracing; host-side loops and Triton calls would
  break its graph.

Everything else in moekit asks ``current()`` (or ``use_fused_glu``), never the
settings themselves, so what a call ran is a function of its inputs and one snapshot.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import NamedTuple

import torch
from torch import Tensor

from .kernels import triton_glu


class Switches(NamedTuple):
    freed_memory_kept: bool
    fused_glu: bool | None
    compiling: bool


_settings = {"freed_memory_kept": False, "fused_glu": None}


def current() -> Switches:
    """The switches as they stand now."""
    return Switches(_settings["freed_memory_kept"], _settings["fused_glu"], torch.compiler.is_compiling())


def record_freed_memory_kept() -> None:
    """Called by ``keep_freed_memory`` once the allocator setting took effect (it cannot be undone)."""
    _settings["freed_memory_kept"] = True


def set_fused_glu(value: bool | None) -> None:
    """Use the fused GLU kernel on CUDA only (None), wherever it runs (True), or never (False)."""
    if value not in (None, True, False):
        raise ValueError(f"fused_glu ({value!r}) must be None, True or False")
    _settings["fused_glu"] = value


@contextmanager
def fused_glu(value: bool | None):
    """``set_fused_glu(value)`` inside the block, the previous setting after it."""
    previous = _settings["fused_glu"]
    set_fused_glu(value)
    try:
        yield
    finally:
        _settings["fused_glu"] = previous


def use_fused_glu(h: Tensor) -> bool:
    """Whether a GLU activation on ``h`` should run the fused Triton kernel."""
    setting = _settings["fused_glu"]
    if setting is False or torch.compiler.is_compiling():
        return False  # the compiler fuses the torch ops itself; a kernel call would break the graph
    if setting is None and not h.is_cuda:
        return False  # on CPU the torch ops are the fast path; the interpreter is for tests only
    return triton_glu.glu_supported(h)
