"""LoRA adapters shard with their experts under expert parallelism (2 gloo ranks) and give the
single-process layer's outputs and adapter gradients."""

from __future__ import annotations

import copy

import torch
from tests.distributed_harness import expect_ok, run_ranks

from moekit import MoE, MoEConfig
from moekit.finetune import add_lora


def _lora_ep_worker(rank, world):
    from moekit.parallel import average_gradients, expert_parallel

    torch.manual_seed(0)
    reference = MoE(MoEConfig(d_model=16, d_ff=32, num_experts=4, top_k=2, compute="grouped_mm"))
    add_lora(reference, rank=4)
    with torch.no_grad():
        reference.experts.lora_B_in.normal_(std=0.1)
        reference.experts.lora_B_out.normal_(std=0.1)
    sharded = expert_parallel(copy.deepcopy(reference))
    assert sharded.experts.num_experts == 2 and sharded.experts.lora_A_in.shape[0] == 2
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(12, 16, generator=gen)
    proj = torch.randn(12, 16, generator=gen)
    rows = slice(rank * 6, (rank + 1) * 6)
    ref = reference(x)
    (ref.y * proj).sum().backward()
    out = sharded(x[rows])
    (world * (out.y * proj[rows]).sum()).backward()
    average_gradients(sharded)
    torch.testing.assert_close(out.y, ref.y[rows], rtol=1e-5, atol=1e-6)
    local = slice(rank * 2, rank * 2 + 2)
    for name in ("lora_A_in", "lora_B_in", "lora_A_out", "lora_B_out"):
        torch.testing.assert_close(getattr(sharded.experts, name).grad, getattr(reference.experts, name).grad[local],
                                   rtol=1e-5, atol=1e-6)
    assert sharded.experts.base.w_in.grad is None and sharded.router.weight.grad is None
    return True


def test_lora_adapters_shard_with_their_experts():
    assert expect_ok(run_ranks(_lora_ep_worker)) == [True, True]


def _replay_ep_worker(rank, world):
    from moekit.finetune import flip_rate, record_choices, replay_choices
    from moekit.parallel import expert_parallel

    torch.manual_seed(0)
    sharded = expert_parallel(MoE(MoEConfig(d_model=16, d_ff=32, num_experts=4, top_k=2, capacity_factor=1.0)))
    x = torch.randn(10, 16, generator=torch.Generator().manual_seed(rank))
    with record_choices(sharded) as record:
        expected = sharded(x).y
    with replay_choices(sharded, record):
        assert torch.equal(sharded(x).y, expected)
    with torch.no_grad():
        sharded.router.weight.normal_()
    with replay_choices(sharded, record), record_choices(sharded) as again:
        sharded(x)
    assert flip_rate(record, again)["all"] == 0.0
    return True


def test_replay_under_expert_parallelism_runs_each_ranks_recorded_experts():
    assert expect_ok(run_ranks(_replay_ep_worker)) == [True, True]
