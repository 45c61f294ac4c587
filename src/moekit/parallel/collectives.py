"""The collectives expert parallelism needs, autograd-aware and checked.

``all_to_all_rows`` sends rows with uneven splits (its backward sends the
gradients back); ``all_reduce_sum`` sums over a group (its backward sums the
gradients too). gloo does not check that ranks agree on split sizes, so the
per-expert counts are exchanged first and validated (``check_received_counts``,
``check_send_splits``). A failed collective names the likely cause (a peer rank
exited, crashed or is late) instead of a backend error.

Shapes: R rows this rank sends, N rows it receives, D model dim, P ranks,
L local experts, C = L + 1 (per-expert counts and their total).
"""

from __future__ import annotations

import contextlib
import re

import torch
import torch.distributed as dist
from torch import Tensor


def collective_failed(what: str, group, err: Exception) -> RuntimeError:
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return RuntimeError(
        f"expert parallel: {what} failed on rank {rank} of {size}; a peer rank probably exited, "
        f"crashed or did not reach this step within the process-group timeout ({detail})"
    )


# What gloo's and NCCL's errors say when a peer exited or a collective timed out.
_BACKEND_FAILURE = re.compile(r"gloo|nccl|connection (closed|reset)|timed out|timeout", re.IGNORECASE)


def backend_failure(err: BaseException, what: str, group=None) -> RuntimeError | None:
    """moekit's ``collective_failed`` error for a backend error raised by a collective moekit did
    not issue itself (FSDP's all-gather and reduce-scatter, DDP's all-reduce); None for any
    other error, which must surface as it is."""
    if not isinstance(err, RuntimeError) or str(err).startswith("expert parallel:"):
        return None
    if isinstance(err, getattr(dist, "DistError", ())) or _BACKEND_FAILURE.search(str(err)):
        return collective_failed(what, group, err)
    return None


@contextlib.contextmanager
def named_collective(what: str, group=None):
    """Turn the backend's error of a collective (a peer died or timed out) into moekit's
    ``collective_failed`` message, on every collective moekit issues."""
    try:
        yield
    except RuntimeError as err:  # DistBackendError is a RuntimeError
        if str(err).startswith("expert parallel:"):
            raise
        raise collective_failed(what, group, err) from err


def all_to_all(out: Tensor, inp: Tensor, recv_splits, send_splits, group, what: str) -> Tensor:
    try:
        dist.all_to_all_single(out, inp, output_split_sizes=recv_splits, input_split_sizes=send_splits, group=group)
    except RuntimeError as err:  # DistBackendError is a RuntimeError
        raise collective_failed(what, group, err) from err
    return out


class _AllToAllRows(torch.autograd.Function):
    """all_to_all_single of rows with uneven splits; backward sends gradients back."""

    @staticmethod
    def forward(ctx, x_RD: Tensor, send_splits: list[int], recv_splits: list[int], group) -> Tensor:
        ctx.send_splits, ctx.recv_splits, ctx.group = send_splits, recv_splits, group
        out = x_RD.new_empty(sum(recv_splits), x_RD.shape[1])
        return all_to_all(out, x_RD.contiguous(), recv_splits, send_splits, group, "all-to-all of rows")

    @staticmethod
    def backward(ctx, grad_ND: Tensor):
        grad_RD = grad_ND.new_empty(sum(ctx.send_splits), grad_ND.shape[1])
        all_to_all(grad_RD, grad_ND.contiguous(), ctx.send_splits, ctx.recv_splits, ctx.group,
                   "backward all-to-all of row gradients")
        return grad_RD, None, None, None


def all_to_all_rows(x_RD: Tensor, send_splits: list[int], recv_splits: list[int], group) -> Tensor:
    """Send ``send_splits[p]`` rows to rank p, receive ``recv_splits[p]`` from it (autograd-aware)."""
    return _AllToAllRows.apply(x_RD, send_splits, recv_splits, group)


class _AllReduceSum(torch.autograd.Function):
    """Sum over the group. The backward sums the gradients too: each rank's input
    feeds every rank's output, so this is the gradient of the sum of the ranks' losses."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        out = x.clone(memory_format=torch.contiguous_format)
        try:
            dist.all_reduce(out, group=group)
        except RuntimeError as err:
            raise collective_failed("all-reduce of routing statistics", group, err) from err
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.clone(memory_format=torch.contiguous_format)
        try:
            dist.all_reduce(grad, group=ctx.group)
        except RuntimeError as err:
            raise collective_failed("backward all-reduce of routing statistics", ctx.group, err) from err
        return grad, None


def all_reduce_sum(x: Tensor, group) -> Tensor:
    """Autograd-aware sum of ``x`` over the ranks of ``group``."""
    return _AllReduceSum.apply(x, group)


def check_received_counts(received_PC: Tensor, rank: int) -> Tensor:
    """Validate the count exchange: row p is what rank p sends to this rank,
    L per-expert counts then their total as a checksum. Returns the (P, L) counts."""
    counts_PL, totals_P = received_PC[:, :-1], received_PC[:, -1]
    if bool((counts_PL < 0).any()):
        raise RuntimeError(
            f"expert parallel: rank {rank} received negative row counts {counts_PL.tolist()}; "
            "the ranks disagree on the expert layout (num_experts or group size)"
        )
    sums_P = counts_PL.sum(1)
    if not torch.equal(sums_P, totals_P):
        raise RuntimeError(
            f"expert parallel: rank {rank} received per-expert counts summing to {sums_P.tolist()} "
            f"but totals {totals_P.tolist()} from ranks 0..{len(totals_P) - 1}; "
            "the ranks disagree on the expert layout (num_experts or group size)"
        )
    return counts_PL


# Dtypes ranks may exchange rows in, by code (the codes ride along with the row counts).
DTYPE_CODES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def check_same_dtypes(received_PD: Tensor, codes: list[int], rank: int) -> None:
    """Every rank must send rows of this rank's dtype and compute in its dtype (autocast on
    all ranks or none)."""
    names = ("rows", "computes")
    def dtype(code):
        return DTYPE_CODES[code] if 0 <= code < len(DTYPE_CODES) else "another dtype"

    for p, row in enumerate(received_PD.tolist()):
        for what, theirs, ours in zip(names, row, codes, strict=True):
            if theirs != ours:
                raise RuntimeError(
                    f"expert parallel: rank {p} {what} in {dtype(theirs)}, rank {rank} in {dtype(ours)}; every rank "
                    "must run the layer in one dtype (the same input dtype, and torch.autocast on all ranks or none)")


def check_send_splits(send_splits: list[int], num_rows: int, rank: int) -> None:
    """The rows this rank sends must be exactly the rows it routed."""
    if any(n < 0 for n in send_splits) or sum(send_splits) != num_rows:
        raise RuntimeError(
            f"expert parallel: rank {rank} would send splits {send_splits} (sum {sum(send_splits)}) "
            f"but routed {num_rows} rows; expected non-negative splits summing to {num_rows}"
        )
