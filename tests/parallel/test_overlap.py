"""The overlapped (chunked, async) expert-parallel exchange equals the synchronous one, on 2 and
4 gloo processes: outputs, aux losses and every gradient, with and without shared experts,
with a rank that routes nothing, and in the training loop."""

from __future__ import annotations

import copy

import pytest
import torch
from tests.distributed_harness import check_sharded_equals_reference, expect_ok, run_ranks

from moekit import MoE, MoEConfig
from moekit.parallel import expert_parallel
from moekit.parallel.overlap import _rows_of_parts, split_counts

FP64_TOL = {"rtol": 1e-12, "atol": 1e-12}


def test_chunks_split_every_group_into_near_equal_parts_covering_each_row_once():
    counts_PL = torch.tensor([[5, 0, 2], [1, 7, 3]])
    parts_CPL = split_counts(counts_PL, 3)
    assert torch.equal(parts_CPL.sum(0), counts_PL)
    assert int((parts_CPL.amax(0) - parts_CPL.amin(0)).max()) <= 1
    rows = _rows_of_parts(counts_PL, parts_CPL)
    assert torch.equal(torch.cat(rows).sort().values, torch.arange(int(counts_PL.sum())))
    # Chunk 0 takes the first rows of each (rank, expert) group, in group order.
    assert rows[0].tolist() == [0, 1, 5, 7, 8, 9, 10, 15]


def _overlap_worker(rank, world, config_kwargs, chunks, sizes):
    torch.manual_seed(0)
    reference = MoE(MoEConfig(**config_kwargs)).double()
    synchronous = expert_parallel(copy.deepcopy(reference))
    overlapped = expert_parallel(copy.deepcopy(reference), overlap_chunks=chunks)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(sum(sizes), config_kwargs["d_model"], generator=gen, dtype=torch.float64)
    proj = torch.randn_like(x)
    rows = slice(sum(sizes[:rank]), sum(sizes[:rank + 1]))
    sync_out, ref_out = check_sharded_equals_reference(reference, synchronous, x, proj, rows, rank, world, FP64_TOL)
    reference.zero_grad()
    over_out, _ = check_sharded_equals_reference(reference, overlapped, x, proj, rows, rank, world, FP64_TOL)
    torch.testing.assert_close(over_out.y, sync_out.y, **FP64_TOL)
    for (name, a), (_, b) in zip(overlapped.named_parameters(), synchronous.named_parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, **FP64_TOL, msg=lambda m, n=name: f"grad {n}: {m}")
    return None


@pytest.mark.parametrize("world, chunks, sizes, shared", [
    (2, 3, [13, 9], 1),
    (2, 4, [11, 0], 0),  # rank 1 routes nothing: it still runs every collective
    (4, 2, [5, 7, 3, 6], 1),
])
def test_overlapped_exchange_equals_synchronous_and_single_process(world, chunks, sizes, shared):
    config = dict(d_model=8, d_ff=16, num_experts=4, top_k=2, num_shared_experts=shared, load_balance_coef=0.01,
                  z_loss_coef=1e-3)
    expect_ok(run_ranks(_overlap_worker, config, chunks, sizes, world_size=world, deadline_s=60), world_size=world)


def test_overlap_chunks_must_be_a_positive_integer():
    from moekit.parallel import ExpertParallelDispatcher

    with pytest.raises(ValueError, match=r"overlap_chunks \(0\) must be a positive integer"):
        ExpertParallelDispatcher.__init__(object.__new__(ExpertParallelDispatcher), None, 4, overlap_chunks=0)
