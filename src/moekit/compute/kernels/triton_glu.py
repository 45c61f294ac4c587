"""Fused GLU activation ``a = act(gate) · up`` for CUDA, in Triton.

``h`` (R, 2F) holds each row's gate columns first, then its up columns (the
layout of ``StackedExperts``). Forward reads both halves and writes ``a``
(R, F); backward reads ``h`` and ``grad_a`` and writes both halves of
``grad_h`` (R, 2F) itself, so neither pass materialises ``act(gate)``,
``act'(gate)`` or a concatenation, and only ``h`` is kept for backward. Math runs in float32
(float64 for float64 inputs), storage in ``h``'s dtype.

Without triton installed the module still imports; ``glu_supported`` is then
False. ``TRITON_INTERPRET=1`` runs the kernels on CPU tensors (for tests).
"""

from __future__ import annotations

import math
import os

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl

    HAS_TRITON = True
except ImportError:  # CPU installs need not have triton
    HAS_TRITON = False

ACTIVATIONS = ("silu", "gelu")
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# Elementwise and memory-bound: one large flat block per program is enough.
_BLOCK = 1024


# Read once, like triton, which decides interpreted or compiled when the kernels below are
# defined; a plain bool also keeps ``glu_supported`` free of os.environ under torch.compile.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def glu_supported(h: Tensor) -> bool:
    """Whether the fused kernel can run on ``h``: triton present, a CUDA tensor
    (or any tensor under the interpreter), a float32/bfloat16/float16 dtype."""
    return HAS_TRITON and (h.is_cuda or INTERPRET) and h.dtype in SUPPORTED_DTYPES



if HAS_TRITON:

    @triton.jit
    def _act_and_grad(g, ACT: tl.constexpr, NEED_GRAD: tl.constexpr):
        # act(g) and act'(g); d is a dummy when NEED_GRAD is False.
        if ACT == "silu":
            s = 1.0 / (1.0 + tl.exp(-g))
            act = g * s
            d = s * (1.0 + g * (1.0 - s)) if NEED_GRAD else act
        else:
            # Exact (erf) gelu, like F.gelu's default, not the tanh approximation.
            cdf = 0.5 * (1.0 + tl.math.erf(g * 0.7071067811865476))
            act = g * cdf
            d = cdf + g * 0.3989422804014327 * tl.exp(-0.5 * g * g) if NEED_GRAD else act
        return act, d

    @triton.jit
    def _glu_fwd_kernel(h_ptr, a_ptr, n, F, ACT: tl.constexpr, COMPUTE: tl.constexpr,
                        BLOCK: tl.constexpr):
        # Flat over the R·F outputs; int64 so R·2F past 2**31 still indexes correctly.
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        row = offs // F
        gate_offs = offs + row * F  # row·2F + col
        g = tl.load(h_ptr + gate_offs, mask=mask, other=0.0).to(COMPUTE)
        u = tl.load(h_ptr + gate_offs + F, mask=mask, other=0.0).to(COMPUTE)
        act, _ = _act_and_grad(g, ACT, False)
        tl.store(a_ptr + offs, (act * u).to(a_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _glu_bwd_kernel(h_ptr, grad_a_ptr, grad_h_ptr, n, F, ACT: tl.constexpr,
                        COMPUTE: tl.constexpr, BLOCK: tl.constexpr):
        offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < n
        row = offs // F
        gate_offs = offs + row * F
        g = tl.load(h_ptr + gate_offs, mask=mask, other=0.0).to(COMPUTE)
        u = tl.load(h_ptr + gate_offs + F, mask=mask, other=0.0).to(COMPUTE)
        ga = tl.load(grad_a_ptr + offs, mask=mask, other=0.0).to(COMPUTE)
        act, d = _act_and_grad(g, ACT, True)
        out_ty = grad_h_ptr.dtype.element_ty
        tl.store(grad_h_ptr + gate_offs, (ga * u * d).to(out_ty), mask=mask)
        tl.store(grad_h_ptr + gate_offs + F, (ga * act).to(out_ty), mask=mask)


def _launch(kernel, n: int, *args, compute) -> None:
    if n == 0:  # an empty grid is not a valid launch
        return
    kernel[(triton.cdiv(n, _BLOCK),)](*args, COMPUTE=compute, BLOCK=_BLOCK)


def _compute_dtype(dtype: torch.dtype):
    return tl.float64 if dtype == torch.float64 else tl.float32


class _GLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_RH: Tensor, activation: str) -> Tensor:
        R, F = h_RH.shape[0], h_RH.shape[1] // 2
        h_RH = h_RH.contiguous()
        a_RF = h_RH.new_empty(R, F)
        _launch(_glu_fwd_kernel, R * F, h_RH, a_RF, R * F, F, activation,
                compute=_compute_dtype(h_RH.dtype))
        ctx.save_for_backward(h_RH)
        ctx.activation = activation
        return a_RF

    @staticmethod
    def backward(ctx, grad_a_RF: Tensor):
        (h_RH,) = ctx.saved_tensors
        R, F = h_RH.shape[0], h_RH.shape[1] // 2
        # Expanded (sum()) or transposed upstream grads: the kernel assumes row stride F.
        grad_a_RF = grad_a_RF.contiguous()
        grad_h_RH = torch.empty_like(h_RH)
        _launch(_glu_bwd_kernel, R * F, h_RH, grad_a_RF, grad_h_RH, R * F, F, ctx.activation,
                compute=_compute_dtype(h_RH.dtype))
        return grad_h_RH, None


def glu(h_RH: Tensor, activation: str) -> Tensor:
    """``act(gate) · up`` for ``gate, up = h_RH.chunk(2, -1)``, fused; (R, 2F) → (R, F).

    Leading dims other than one R are flattened and restored: (..., 2F) → (..., F).

    ``activation``: ``silu`` (SwiGLU) or ``gelu`` (GeGLU, exact erf form).
    """
    if not HAS_TRITON:
        raise RuntimeError("moekit.compute.kernels.triton_glu needs triton installed")
    if activation not in ACTIVATIONS:
        raise ValueError(f"unknown activation {activation!r}; fused GLU supports {', '.join(ACTIVATIONS)}")
    if h_RH.dim() == 0 or h_RH.shape[-1] % 2:
        raise ValueError(f"expected h of shape (..., 2F), got {tuple(h_RH.shape)}")
    lead, H = h_RH.shape[:-1], h_RH.shape[-1]
    return _GLU.apply(h_RH.reshape(math.prod(lead), H), activation).view(*lead, H // 2)
