"""The experts' MLP at decode sizes on CPU, in one numba kernel call.

With a few rows per expert a layer's time is the time to read the reached experts'
weights. BLAS's float32 GEMM reads them at a quarter to a half of memory bandwidth
for one to four rows, oneDNN's at about half, and each call, activation and gather
between them costs tens of microseconds (BENCHMARKS.md, "Decode bandwidth of the
float32 layer"). ``decode_mlp`` runs the whole routed MLP in one call: gather the
tokens' rows, the first projection, the activation, the second projection and the
weighted sum over each token's experts. Each projection is one parallel loop over
(expert, block of output rows): a block's weight rows stream through the cache once
and meet all of that expert's input rows there, so the weights are read once, at
memory speed.

numba is imported, and the kernel (``_cpu_gemv_numba``) compiled or loaded from
numba's on-disk cache, on first use, never at ``import moekit``. numba's OpenMP threads cannot run in a
process forked from one that already ran them, so ``usable()`` is False there and
callers take another path.

Shapes: T tokens, K experts per token, R routed rows grouped by expert, D model dim,
H first projection width (2F for GLU experts), F hidden dim, E experts.
"""

from __future__ import annotations

import importlib.util
import os
import threading
from typing import NamedTuple

import numpy as np
import torch
from torch import Tensor

HAS_NUMBA = importlib.util.find_spec("numba") is not None
ACTIVATION_CODES = {"relu": 0, "gelu": 1, "gelu_tanh": 2, "silu": 3}

_kernel = None
_compile_lock = threading.Lock()
_launched_in_pid: int | None = None
_thread_state = threading.local()


def usable() -> bool:
    """numba is installed and this process is not a fork of one that ran the kernel."""
    return HAS_NUMBA and _launched_in_pid in (None, os.getpid())


def _compile():
    import numba

    from . import _cpu_gemv_numba

    return numba, _cpu_gemv_numba.decode_mlp_kernel


_TYPESTR = {torch.float32: "<f4", torch.int8: "|i1", torch.int64: "<i8"}
# What the kernel gets in place of the operands a call has none of (read-only, shared).
_NONE_F32_2D, _NONE_F32_3D, _NONE_I8_3D = (np.zeros(shape, dtype) for shape, dtype in (
    ((0, 0), np.float32), ((0, 0, 0), np.float32), ((0, 0, 0), np.int8)))


class _Memory:
    """Exposes a tensor's memory to numpy through the array interface."""

    __slots__ = ("__array_interface__",)


def numpy_view(t: Tensor, keep: list[Tensor]) -> np.ndarray:
    """A numpy array on a CPU tensor's memory, made contiguous first (that tensor is
    appended to ``keep``, which must outlive the array: the kernel call).

    Unlike ``Tensor.numpy()`` it leaves the storage resizable: FSDP frees the memory of
    gathered parameters by resizing their storage to zero after the forward."""
    t = t.contiguous()  # a parameter needs no detach: data_ptr() reads past autograd
    keep.append(t)
    memory = _Memory()
    memory.__array_interface__ = {"data": (t.data_ptr(), False), "shape": tuple(t.shape),
                                  "typestr": _TYPESTR[t.dtype], "version": 3}
    return np.asarray(memory)


class Weights(NamedTuple):
    """One projection's stacked weights in nn.Linear's (out, in) layout per expert: float32
    (bits 32), or int8 with a scale per output row (bits 8, ``moekit.experts.quantized``)."""

    bits: int
    values: Tensor  # (E, O, I) float32 or int8
    scale: Tensor | None = None  # (E, O), int8 only

    def operands(self, keep: list[Tensor]) -> tuple[np.ndarray, ...]:
        """The kernel's three arrays: float32 w, int8 q, (E, O) scale; those of the other
        format empty (``keep``: see ``numpy_view``)."""
        if self.bits == 32:
            return numpy_view(self.values, keep), _NONE_I8_3D, _NONE_F32_2D
        return _NONE_F32_3D, numpy_view(self.values, keep), numpy_view(self.scale, keep)


def decode_mlp(x_TD: Tensor, weights_TK: Tensor, experts_TK: Tensor, w_in: Weights, w_out: Weights,
               b_in: Tensor | None, b_out: Tensor | None, activation: str, glu: bool) -> Tensor:
    """Σ_k weights_TK[t, k]·E_e(x_t), e = experts_TK[t, k], on CPU, no autograd: (T, D) float32.
    An assignment whose expert is E (the number of experts) is not routed (dropped, padding)
    and adds nothing. The kernel groups the assignments by expert itself. Inputs, gate
    weights, biases and float weights are float32. Experts with no rows are not read."""
    global _kernel, _launched_in_pid
    if not usable():
        raise RuntimeError("decode_mlp needs numba (pip install numba), in a process not forked from one "
                           "that ran it")
    floats = [x_TD, weights_TK, b_in, b_out, w_in.values if w_in.bits == 32 else None,
              w_out.values if w_out.bits == 32 else None]
    for t in floats:
        if t is not None and (t.dtype != torch.float32 or t.device.type != "cpu"):
            raise ValueError("decode_mlp runs float32 CPU tensors; got "
                             + ", ".join(f"{t.dtype} on {t.device.type}" for t in floats if t is not None))
    if w_in.bits != w_out.bits or w_in.bits not in (32, 8):
        raise ValueError(f"decode_mlp: weights of {w_in.bits} and {w_out.bits} bits; both must be 32 or 8")
    (hidden, width), (width_out, width_hidden) = w_in.values.shape[1:], w_out.values.shape[1:]
    E = w_in.values.shape[0]
    if (experts_TK.dtype != torch.int64 or experts_TK.shape != weights_TK.shape or weights_TK.dim() != 2
            or x_TD.dim() != 2 or weights_TK.shape[0] != x_TD.shape[0] or x_TD.shape[1] != width
            or width_out != width or width_hidden * (2 if glu else 1) != hidden):
        raise ValueError(f"decode_mlp: input {tuple(x_TD.shape)}, gate weights {tuple(weights_TK.shape)} and "
                         f"{experts_TK.dtype} experts {tuple(experts_TK.shape)} do not fit weights of widths "
                         f"{tuple(w_in.values.shape[1:])} and {tuple(w_out.values.shape[1:])} (T tokens: "
                         "(T, D) input, (T, K) gate weights and int64 experts)")
    if activation not in ACTIVATION_CODES:
        raise ValueError(f"decode_mlp: activation {activation!r}; choose from {', '.join(ACTIVATION_CODES)}")
    if _kernel is None:
        with _compile_lock:
            _kernel = _kernel or _compile()
    numba, kernel = _kernel
    threads = max(1, min(torch.get_num_threads(), numba.config.NUMBA_NUM_THREADS))
    # numba's thread count is per calling thread, and reading it takes a lock: keep what was set.
    if getattr(_thread_state, "threads", None) != threads:
        numba.set_num_threads(threads)
        _thread_state.threads = threads
    keep: list[Tensor] = []
    biases = [_NONE_F32_2D if b is None else numpy_view(b, keep) for b in (b_in, b_out)]
    out_TD = torch.empty(x_TD.shape, dtype=torch.float32)
    _launched_in_pid = os.getpid()
    bad = kernel(numpy_view(x_TD, keep), numpy_view(experts_TK, keep).reshape(-1),
                 numpy_view(weights_TK, keep).reshape(-1), weights_TK.shape[1], E, w_in.bits, w_in.operands(keep),
                 w_out.operands(keep), hidden, *biases, ACTIVATION_CODES[activation], bool(glu),
                 numpy_view(out_TD, keep))
    if bad >= 0:
        t, k = divmod(int(bad), weights_TK.shape[1])
        raise ValueError(f"decode_mlp: experts_TK[{t}, {k}] = {int(experts_TK[t, k])} is not an expert id in "
                         f"[0, {E}] ({E}: not routed)")
    return out_TD
