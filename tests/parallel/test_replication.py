"""Hot-expert replication under expert parallelism: the layer with replicas computes exactly
what it computes without (outputs, aux loss, every gradient, replica gradients summed into the
owner), the placement lowers the busiest rank's load, and training re-plans it."""

from __future__ import annotations

import copy

import pytest
import torch
from tests.distributed_harness import check_sharded_equals_reference, expect_ok, run_ranks

from moekit import MoE, MoEConfig
from moekit.parallel import expert_parallel
from moekit.parallel.replication import Placement, assign_holders, max_over_mean, plan_placement

FP64_TOL = {"rtol": 1e-12, "atol": 1e-12}


def test_the_greedy_placement_replicates_the_hot_experts_of_the_busiest_rank():
    load_E = torch.tensor([100.0, 10, 10, 10, 10, 10, 10, 10])  # expert 0 (rank 0) is hot
    placement = plan_placement(load_E, ep_size=4, slots=1)
    before = max_over_mean(Placement(8, 4, 1).rank_loads(load_E))
    after = max_over_mean(placement.rank_loads(load_E))
    assert 0 in placement.replicas[1] + placement.replicas[2] + placement.replicas[3]
    assert round(before, 4) == round(110 / 42.5, 4) and round(after, 4) == round(45 / 42.5, 4)  # 25 + 10 + 10 rows
    assert all(len(held) <= 1 for held in placement.replicas)


def test_rows_of_a_replicated_expert_are_dealt_over_its_holders():
    placement = Placement(4, 2, 1, replicas=[[], [0]])  # expert 0 lives on rank 0, replicated on rank 1
    indices_TK = torch.tensor([[0, 1], [0, 2], [0, 3], [0, 1]])
    virtual = assign_holders(indices_TK, placement, ep_rank=0)
    # L' = 3: rank 0's virtual experts 0, 1 (own), 2 (slot); rank 1's 3, 4 (own), 5 (slot: expert 0).
    assert virtual[:, 0].tolist() == [0, 5, 0, 5]
    assert virtual[:, 1].tolist() == [1, 3, 4, 1]
    with pytest.raises(ValueError, match="experts of other ranks only"):
        Placement(4, 2, 1, replicas=[[1], []])


def _replication_worker(rank, world, config_kwargs, replicas, sizes):
    torch.manual_seed(0)
    reference = MoE(MoEConfig(**config_kwargs)).double()
    replicated = expert_parallel(copy.deepcopy(reference))
    placement = Placement(config_kwargs["num_experts"], world, len(max(replicas, key=len)), replicas=replicas)
    replicated.dispatcher.replicate(replicated.experts, placement)
    gen = torch.Generator().manual_seed(7)
    x = torch.randn(sum(sizes), config_kwargs["d_model"], generator=gen, dtype=torch.float64)
    proj = torch.randn_like(x)
    rows = slice(sum(sizes[:rank]), sum(sizes[:rank + 1]))
    out, _ = check_sharded_equals_reference(reference, replicated, x, proj, rows, rank, world, FP64_TOL)
    return out.routing.tokens_per_expert_E.tolist()


@pytest.mark.parametrize("world, replicas, sizes", [
    (2, [[2], [0]], [13, 9]),
    (2, [[], [0]], [12, 0]),  # rank 1 routes nothing but holds a replica
    (4, [[2, 7], [0], [], [1]], [5, 7, 3, 6]),
])
def test_replicated_layer_equals_the_single_process_layer(world, replicas, sizes):
    config = dict(d_model=8, d_ff=16, num_experts=8 if world == 4 else 4, top_k=2, num_shared_experts=1,
                  load_balance_coef=0.01, z_loss_coef=1e-3)
    loads = expect_ok(run_ranks(_replication_worker, config, replicas, sizes, world_size=world, deadline_s=60),
                      world_size=world)
    assert all(load == loads[0] for load in loads) and sum(loads[0]) == 2 * sum(sizes)  # rows per expert, global


def _training_worker(rank, world, root, prepared, model_config, train_config, data_config):
    from pathlib import Path

    from moekit.parallel import setup_parallel
    from moekit.train import new_run

    parallel = setup_parallel(ep_size=2, timeout_s=30, replicate_every=3, replica_slots=1)
    trainer = new_run(Path(root) / "replicas", model_config, train_config, data_config, prepared=prepared,
                      progress=False, parallel=parallel)
    assert trainer.fit()
    return [moe.dispatcher.placement.replicas for moe in (b.ffn for b in trainer.model.blocks)]


def test_training_with_replicas_re_planned_every_3_steps_follows_the_single_process_curve(tmp_path, prepared,
                                                                                         tiny_data_config):
    from tests.parallel.test_expert_parallel_training import _assert_same_curve

    from lm_fixtures import tiny_model_config, tiny_train_config
    from moekit.train import new_run, read_metrics

    model_config = tiny_model_config(prepared.tokenizer.vocab_size)
    train_config = tiny_train_config(steps=9, log_every=1, eval_every=9, checkpoint_every=9)
    assert new_run(tmp_path / "single", model_config, train_config, tiny_data_config, prepared=prepared,
                   progress=False).fit()
    placements = expect_ok(run_ranks(_training_worker, str(tmp_path), prepared, model_config, train_config,
                                     tiny_data_config, deadline_s=120))
    assert placements[0] == placements[1]  # both ranks placed the replicas alike
    _assert_same_curve(tmp_path / "replicas", tmp_path / "single")
    plans = [r for r in read_metrics(tmp_path / "replicas") if "replication" in r]
    assert [r["step"] for r in plans] == [3, 6, 9]
    for record in plans:
        assert len(record["replication"]) == 2  # both MoE layers
        for layer in record["replication"]:
            assert layer["new_max_over_mean"] <= layer["old_max_over_mean"]
