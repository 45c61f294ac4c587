"""Low-rank updates of stacked expert projections (LoRA experts): scale·B_e(A_e·x) per expert.

``LowRank(A (E, r, in), B (E, out, r), scale)`` is one projection's update. Three forms:

- ``low_rank_expert``: one expert on its rows (the readable reference);
- ``low_rank_rows``: every expert on rows grouped by expert, as a new (R, out) tensor:
  two ``grouped_mm`` where the dtype and widths allow, else one expert at a time;
- ``add_low_rank_``: the update added in place into the base projection's output h,
  one autograd node. On CPU it runs per expert with preallocated buffers: torch's CPU
  grouped_mm is slow for a narrow r (its (R, r) product cost a third of the base
  projection, measured), and adding in place saves an (R, out) tensor and its pass.
  Elsewhere (GPU) it adds the grouped form, with no host sync.

Shapes: R rows grouped by expert, N rows of one expert, E experts, r rank.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .ops import _bounds
from .precision import autocast_operands

GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# grouped_mm needs every row stride to be a multiple of 16 bytes.
GROUPED_MM_ALIGN_BYTES = 16


class LowRank(NamedTuple):
    """A low-rank update of one stacked projection: ``scale · B_e (A_e x)``."""

    A: Tensor  # (E, r, in)
    B: Tensor  # (E, out, r)
    scale: float


def low_rank_expert(x_ND: Tensor, delta: LowRank, e: int) -> Tensor:
    """Expert e's update on its rows: the readable reference."""
    return F.linear(F.linear(x_ND, delta.A[e].to(x_ND.dtype)), delta.B[e].to(x_ND.dtype)) * delta.scale


def grouped_mm_fits(dtype: torch.dtype, *widths: int) -> bool:
    return dtype in GROUPED_MM_DTYPES and all((n * dtype.itemsize) % GROUPED_MM_ALIGN_BYTES == 0 for n in widths)


def low_rank_rows(x_RD: Tensor, delta: LowRank, counts_E: Tensor, offsets_E: Tensor | None = None) -> Tensor:
    """Every expert's update on its rows (grouped by expert): two ``grouped_mm`` over all
    experts where the dtype and widths allow, else one expert at a time."""
    A, B = autocast_operands(x_RD.device.type, delta.A, delta.B)
    x_RD = x_RD.to(A.dtype)
    _, r, width_in = A.shape
    width_out = B.shape[1]
    if grouped_mm_fits(x_RD.dtype, width_in, width_out):
        # grouped_mm needs 16-byte rows: zero rank-columns pad r and add nothing.
        pad = -r % (GROUPED_MM_ALIGN_BYTES // x_RD.dtype.itemsize)
        if pad:
            A, B = F.pad(A, (0, 0, 0, pad)), F.pad(B, (0, pad))
        offsets_E = counts_E.cumsum(0, dtype=torch.int32) if offsets_E is None else offsets_E
        u_Rr = F.grouped_mm(x_RD, A.transpose(-2, -1), offs=offsets_E)
        return F.grouped_mm(u_Rr, B.transpose(-2, -1), offs=offsets_E) * delta.scale
    counts = counts_E.tolist()  # NOTE: .tolist() syncs with the device
    pieces = [low_rank_expert(x_ND, LowRank(A, B, delta.scale), e)
              for e, x_ND in enumerate(x_RD.split(counts)) if x_ND.shape[0] > 0]
    if not pieces:
        return x_RD.new_zeros(0, width_out)
    return torch.cat(pieces) if len(pieces) > 1 else pieces[0]


class _AddLowRank(torch.autograd.Function):
    """h += scale·B_e(A_e x) per expert, in place; backward from the (R, r) product kept."""

    @staticmethod
    def forward(ctx, h_RO, x_RI, A_ErI, B_EOr, counts, scale):
        bounds = _bounds(counts)
        u_Rr = x_RI.new_empty(x_RI.shape[0], A_ErI.shape[1])
        for e, (lo, hi) in enumerate(bounds):
            if hi > lo:
                torch.mm(x_RI[lo:hi], A_ErI[e].t(), out=u_Rr[lo:hi])
        u_Rr.mul_(scale)
        for e, (lo, hi) in enumerate(bounds):
            if hi > lo:
                h_RO[lo:hi].addmm_(u_Rr[lo:hi], B_EOr[e].t())
        ctx.mark_dirty(h_RO)
        ctx.save_for_backward(x_RI, u_Rr, A_ErI, B_EOr)
        ctx.bounds, ctx.scale = bounds, scale
        return h_RO

    @staticmethod
    def backward(ctx, grad_h_RO):
        x_RI, u_Rr, A_ErI, B_EOr = ctx.saved_tensors
        grad_h_RO = grad_h_RO.contiguous()
        grad_u_Rr = torch.empty_like(u_Rr)
        grad_A = torch.zeros_like(A_ErI)
        grad_Bt = B_EOr.new_zeros(B_EOr.shape[0], B_EOr.shape[2], B_EOr.shape[1])
        grad_x_RI = torch.empty_like(x_RI) if ctx.needs_input_grad[1] else None
        # Products with r rows, not r columns: MKL runs (r, N)·(N, O) 2-3x faster than (O, N)·(N, r)
        # on CPU (measured), so both are taken transposed.
        for e, (lo, hi) in enumerate(ctx.bounds):
            if hi > lo:
                torch.mm(u_Rr[lo:hi].t(), grad_h_RO[lo:hi], out=grad_Bt[e])
                grad_u_Rr[lo:hi] = torch.mm(B_EOr[e].t(), grad_h_RO[lo:hi].t()).t()
        grad_u_Rr.mul_(ctx.scale)
        for e, (lo, hi) in enumerate(ctx.bounds):
            if hi > lo:
                torch.mm(grad_u_Rr[lo:hi].t(), x_RI[lo:hi], out=grad_A[e])
                if grad_x_RI is not None:
                    torch.mm(grad_u_Rr[lo:hi], A_ErI[e], out=grad_x_RI[lo:hi])
        return grad_h_RO, grad_x_RI, grad_A, grad_Bt.transpose(1, 2), None, None


def add_low_rank_(h_RO: Tensor, x_RI: Tensor, delta: LowRank, counts_E: Tensor,
                  offsets_E: Tensor | None = None) -> Tensor:
    """h + the update of x's rows, added in place on CPU (h must be a fresh result nobody
    else saved for backward); a new tensor elsewhere."""
    A, B = autocast_operands(x_RI.device.type, delta.A, delta.B)
    if h_RO.device.type != "cpu" or torch.compiler.is_compiling():
        return h_RO + low_rank_rows(x_RI, delta, counts_E, offsets_E).to(h_RO.dtype)
    dtype = h_RO.dtype
    counts = counts_E.tolist()  # NOTE: .tolist() syncs with the device (none on CPU)
    return _AddLowRank.apply(h_RO, x_RI.to(dtype), A.to(dtype), B.to(dtype), counts, delta.scale)
