"""Overlapping expert parallelism's all-to-alls with compute: the exchange in chunks.

The rows a rank sends to each (destination rank, expert) are split into C
near-equal parts; chunk c carries part c of every group. Part sizes follow
from the per-expert counts the dispatcher already exchanged, so chunking
costs no extra collective. In forward:

    send chunk 0 (async) ; shared experts
    for c: wait chunk c ; send chunk c + 1 (async) ; experts on chunk c ; send its results back (async)
    wait every result ; put the rows back in order ; combine

so each chunk's all-to-all runs while the previous chunk's experts (and, for
the first, the shared experts) compute: ``torch.distributed``'s async work
handles (``async_op=True``) progress on the backend's threads. Each row meets
the same expert weights as in the synchronous exchange, so the outputs and
gradients are the same up to the matrix products' blocking (tested against
the synchronous path). Backward runs the all-to-alls synchronously, chunk by
chunk.

Shapes: P ranks, L local experts, C chunks, R rows this rank routes,
N rows it receives (per chunk: R_c, N_c).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from ..compute.ops import permute_rows
from ..dispatch.capacity import sort_keys
from .collectives import all_to_all, collective_failed


def split_counts(counts_PL: Tensor, chunks: int) -> Tensor:
    """(C, P, L): part c of each count, the first ``n mod C`` parts one larger."""
    base, rest = counts_PL // chunks, counts_PL % chunks
    c = torch.arange(chunks, device=counts_PL.device).view(-1, 1, 1)
    return base.unsqueeze(0) + (c < rest.unsqueeze(0)).to(counts_PL.dtype)


def _rows_of_parts(counts_PL: Tensor, parts_CPL: Tensor) -> list[Tensor]:
    """For each chunk, the indices (into rows grouped by (p, l)) of its part of every group."""
    group_start = torch.cumsum(counts_PL.reshape(-1), 0) - counts_PL.reshape(-1)
    part_start = torch.cumsum(parts_CPL, 0) - parts_CPL
    rows = []
    for c in range(parts_CPL.shape[0]):
        lengths = parts_CPL[c].reshape(-1)
        total = int(lengths.sum())
        starts = group_start + part_start[c].reshape(-1)
        offsets = torch.repeat_interleave(starts - (torch.cumsum(lengths, 0) - lengths), lengths, output_size=total)
        rows.append(offsets + torch.arange(total, device=counts_PL.device))
    return rows


@dataclass
class Chunk:
    """One chunk of the exchange: the rows it sends, the splits both ways, and the regrouping
    of what it receives by local expert."""

    send_rows: Tensor
    send_splits: list[int]
    recv_splits: list[int]
    counts_L: Tensor
    by_expert_N: Tensor
    by_source_N: Tensor


def plan_chunks(send_counts_PL: Tensor, recv_counts_PL: Tensor, chunks: int) -> list[Chunk]:
    send_parts, recv_parts = split_counts(send_counts_PL, chunks), split_counts(recv_counts_PL, chunks)
    plans = []
    for c, send_rows in enumerate(_rows_of_parts(send_counts_PL, send_parts)):
        recv_PL = recv_parts[c]
        plans.append(Chunk(send_rows, send_parts[c].sum(1).tolist(), recv_PL.sum(1).tolist(), recv_PL.sum(0),
                           *regroup_by_expert(recv_PL)))
    return plans


def regroup_by_expert(recv_counts_PL: Tensor) -> tuple[Tensor, Tensor]:
    """Received rows come grouped by source rank, then by local expert; the experts want them
    by expert. Returns the permutation to that order and its inverse."""
    P, L = recv_counts_PL.shape
    N = int(recv_counts_PL.sum())
    local_expert_N = torch.arange(L, device=recv_counts_PL.device).repeat(P).repeat_interleave(
        recv_counts_PL.reshape(-1), output_size=N)
    by_expert_N = torch.argsort(sort_keys(local_expert_N, L), stable=True)
    by_source_N = torch.empty_like(by_expert_N)
    by_source_N[by_expert_N] = torch.arange(N, device=by_expert_N.device)
    return by_expert_N, by_source_N


class _Pending:
    """An async all-to-all in flight: its work handle, and what it was for (for the error)."""

    def __init__(self, what: str, group):
        self.work, self.what, self.group = None, what, group

    def wait(self) -> None:
        try:
            self.work.wait()
        except RuntimeError as err:  # DistBackendError is a RuntimeError
            raise collective_failed(self.what, self.group, err) from err


class _StartAllToAll(torch.autograd.Function):
    """Launch an all-to-all of rows (``async_op=True``); the output is filled once ``_Wait`` ran.
    Backward sends the gradients back, synchronously."""

    @staticmethod
    def forward(ctx, x_RD: Tensor, send_splits, recv_splits, group, pending: _Pending) -> Tensor:
        ctx.send_splits, ctx.recv_splits, ctx.group = send_splits, recv_splits, group
        out = x_RD.new_empty(sum(recv_splits), x_RD.shape[1])
        try:
            pending.work = dist.all_to_all_single(out, x_RD.contiguous(), output_split_sizes=recv_splits,
                                                  input_split_sizes=send_splits, group=group, async_op=True)
        except RuntimeError as err:
            raise collective_failed(pending.what, group, err) from err
        return out

    @staticmethod
    def backward(ctx, grad_ND: Tensor):
        grad_RD = grad_ND.new_empty(sum(ctx.send_splits), grad_ND.shape[1])
        all_to_all(grad_RD, grad_ND.contiguous(), ctx.send_splits, ctx.recv_splits, ctx.group,
                   "backward all-to-all of row gradients (overlapped chunk)")
        return grad_RD, None, None, None, None


class _Wait(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out: Tensor, pending: _Pending) -> Tensor:
        pending.wait()
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


def start(x_RD: Tensor, send_splits, recv_splits, group, what: str) -> tuple[Tensor, _Pending]:
    pending = _Pending(what, group)
    return _StartAllToAll.apply(x_RD, send_splits, recv_splits, group, pending), pending


def wait(out: Tensor, pending: _Pending) -> Tensor:
    return _Wait.apply(out, pending)


def tie_in(y_ND: Tensor, x_ND: Tensor) -> Tensor:
    """Keep the received rows on the graph whatever the experts returned (every rank must reach
    the backward all-to-all of its received rows)."""
    if not x_ND.requires_grad:
        return y_ND
    if y_ND.shape[0] == 0:
        return y_ND + x_ND[:, :0].sum(1, keepdim=True)
    return y_ND if y_ND.requires_grad else y_ND + 0 * x_ND.sum()


def overlapped_exchange(dispatcher, x_TD: Tensor, plan, experts_rows, out_dtype: torch.dtype, side=None):
    """``Dispatcher.exchange`` of an ``ExpertParallelDispatcher`` in ``plan.chunks``, pipelined."""
    from .collectives import check_send_splits

    group = dispatcher.group
    x_RD, _ = plan.local.gather(x_TD)
    if torch.is_grad_enabled() and not x_RD.requires_grad:
        x_RD = x_RD.detach().requires_grad_()
    check_send_splits(plan.send_splits, x_RD.shape[0], dispatcher.ep_rank)
    chunks = plan.chunks
    sent = [start(x_RD[chunks[0].send_rows], chunks[0].send_splits, chunks[0].recv_splits, group,
                  "all-to-all of rows (overlapped chunk 0)")]
    side_out = None if side is None else side()  # while chunk 0 travels
    returned = []
    for c, chunk in enumerate(chunks):
        x_ND = permute_rows(wait(*sent[c]), chunk.by_expert_N, chunk.by_source_N)
        if c + 1 < len(chunks):
            following = chunks[c + 1]
            sent.append(start(x_RD[following.send_rows], following.send_splits, following.recv_splits, group,
                              f"all-to-all of rows (overlapped chunk {c + 1})"))
        y_ND = tie_in(experts_rows(x_ND, chunk.counts_L), x_ND)
        y_ND = permute_rows(y_ND, chunk.by_source_N, chunk.by_expert_N)
        returned.append(start(y_ND, chunk.recv_splits, chunk.send_splits, group,
                              f"all-to-all of results (overlapped chunk {c})"))
    pieces = [wait(*pair) for pair in returned]
    order = torch.cat([chunk.send_rows for chunk in chunks])
    y_RD = torch.cat(pieces)[torch.argsort(order)]  # back to the local plan's row order
    return plan.local.combine(y_RD, out_dtype), side_out
