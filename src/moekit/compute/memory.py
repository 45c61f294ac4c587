"""Process-level memory settings that make CPU training faster.

An MoE layer's temporaries are large: at T = 4096 tokens, K = 8 and D = 512
the routed rows alone take 64 MB, several times per step. glibc's allocator
serves blocks that large with fresh ``mmap`` pages and returns them on free,
so every step pays a page fault for every 4 KB page of every such buffer (a
64 MB ``torch.zeros`` takes about 27 ms on one core, mostly in faults). Keeping
freed memory in the process lets the next step reuse it.

``keep_freed_memory()`` asks glibc to do that for this process. moekit's own
commands (``moekit train``, ``demo``, ``eval``, ``generate``, …) call it;
library users call it themselves. It raises the process's resident memory to
its peak for the rest of its life, which a training loop reaches every step
anyway.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

from . import switches

# mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_ONE_GIB = 1 << 30


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of unmapping it; returns
    whether the setting is in effect (False off Linux or without glibc)."""
    if switches.current().freed_memory_kept:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other C libraries have no mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    # Blocks up to 1 GiB come from the heap, and the heap is trimmed only past 1 GiB free.
    applied = bool(mallopt(_M_MMAP_THRESHOLD, _ONE_GIB)) and bool(mallopt(_M_TRIM_THRESHOLD, _ONE_GIB))
    if applied:
        switches.record_freed_memory_kept()
    return applied
