"""Expert parallelism on 2 gloo processes equals the single-process layer (on the concatenated
batch, or, where a rule applies per rank's tokens, on each rank's batch alone); the gradient
convention is that of ``tests.distributed_harness.check_sharded_equals_reference``.

Shapes: T tokens, D model dim, E experts, P ranks.
"""

from __future__ import annotations

import copy
import re

import pytest
import torch
from tests.distributed_harness import check_sharded_equals_reference, expect_ok, run_ranks

from moekit import MoE, MoEConfig
from moekit.parallel import (
    check_fingerprints,
    check_received_counts,
    check_send_splits,
    config_fingerprint,
    expert_parallel,
    full_state_dict,
    load_full_state_dict,
)

FP32_TOL = {"rtol": 1e-6, "atol": 1e-6}
FP64_TOL = {"rtol": 1e-12, "atol": 1e-12}


def _layer(config_kwargs: dict, dtype, steer_to_first_half: bool) -> MoE:
    torch.manual_seed(0)
    moe = MoE(MoEConfig(**config_kwargs)).to(dtype)
    if steer_to_first_half:
        # Input feature 0 is a large constant (see _batch): experts of the second
        # half get a very negative logit, so every token goes to rank 0's experts.
        E = moe.config.num_experts
        with torch.no_grad():
            moe.router.weight[:, 0] = torch.where(torch.arange(E) < E // 2, 1.0, -1.0)
    return moe


def _batch(sizes: list[int], d_model: int, dtype, steer_to_first_half: bool, masked: bool):
    gen = torch.Generator().manual_seed(7)
    x_TD = torch.randn(sum(sizes), d_model, generator=gen, dtype=dtype)
    if steer_to_first_half:
        x_TD[:, 0] = 20.0
    proj_TD = torch.randn(sum(sizes), d_model, generator=gen, dtype=dtype)
    mask_T = torch.rand(sum(sizes), generator=gen) > 0.3 if masked else None
    return x_TD, proj_TD, mask_T


def _check_parity(rank, world, scenario):
    config_kwargs = scenario["config"]
    dtype, sizes = scenario.get("dtype", torch.float32), scenario["sizes"]
    steer, masked = scenario.get("steer_to_first_half", False), scenario.get("masked", False)
    tol = FP64_TOL if dtype == torch.float64 else FP32_TOL
    reference = _layer(config_kwargs, dtype, steer)
    sharded = expert_parallel(copy.deepcopy(reference))
    for layer in (reference, sharded):
        layer.train(scenario.get("train", True))
    x_TD, proj_TD, mask_T = _batch(sizes, config_kwargs["d_model"], dtype, steer, masked)
    start, stop = sum(sizes[:rank]), sum(sizes[: rank + 1])
    out, ref = check_sharded_equals_reference(
        reference, sharded, x_TD, proj_TD, slice(start, stop), rank, world, tol, full_kwargs={"mask": mask_T},
        local_kwargs={"mask": None if mask_T is None else mask_T[start:stop]})
    assert set(out.routing.losses) == set(ref.routing.losses)
    for name in ref.routing.losses:
        torch.testing.assert_close(out.routing.losses[name], ref.routing.losses[name], **tol,
                                   msg=lambda m, n=name: f"loss {n}: {m}")
    for name in ("dead_expert_share", "max_over_mean_load"):  # functions of the global loads
        torch.testing.assert_close(out.routing.stats[name], ref.routing.stats[name], **tol)
    return out.routing.tokens_per_expert_E.tolist()


BASE = dict(d_model=16, d_ff=12, num_experts=4, top_k=2, expert_bias=True,
            z_loss_coef=1e-2, importance_coef=0.1, load_coef=0.1)
SCENARIOS = {
    "uneven_batches_grouped_mm": dict(config=BASE, sizes=[5, 11]),
    "rank_with_zero_tokens": dict(config=BASE, sizes=[9, 0]),
    "all_tokens_to_rank0_experts": dict(config=BASE, sizes=[6, 7], steer_to_first_half=True),
    "segment_path_padding_mask": dict(config={**BASE, "compute": "segment"}, sizes=[8, 5], masked=True),
    "loop_path_geglu": dict(config={**BASE, "compute": "loop", "expert": "geglu"}, sizes=[4, 6]),
    "float64_switch": dict(config={**BASE, "router": "switch", "top_k": 1, "router_jitter": 0.0},
                           sizes=[7, 3], dtype=torch.float64),
    "softmax_dense_gate": dict(config={**BASE, "router": "softmax", "top_k": 4}, sizes=[3, 5]),
    # The smooth load of noisy top-k is a sum over tokens too: in eval (no noise) it matches exactly.
    "noisy_topk_eval_smooth_load": dict(config={**BASE, "router": "noisy_topk"}, sizes=[6, 6], train=False),
    # Every compute path runs its own rows form on the received rows; rank 1 routes no tokens
    # and its experts receive none, yet runs every backward collective. float64 where the path
    # takes it: the steered inputs are large, and fp32 summation orders differ by kernel.
    **{f"{path}_path_rank_without_tokens_or_rows": dict(
        config={**BASE, "compute": path}, sizes=[9, 0], steer_to_first_half=True,
        dtype=torch.float32 if path == "grouped_mm" else torch.float64)
       for path in ("loop", "small_batch", "segment", "fused", "grouped_mm", "triton")},
    "fused_path_float64_padding": dict(config={**BASE, "compute": "fused"}, sizes=[7, 6], dtype=torch.float64,
                                       masked=True),
}


def _parity_worker(rank, world):
    # One process pair runs every scenario: starting processes costs more than the checks.
    loads = {}
    for name, scenario in SCENARIOS.items():
        try:
            loads[name] = _check_parity(rank, world, scenario)
        except Exception as err:
            raise AssertionError(f"scenario {name!r}: {err}") from err
    for name, check in (("capacity", _check_capacity), ("sequences", _check_sequence_routers),
                        ("hash", _check_hash), ("expert_choice", _check_expert_choice)):
        try:
            check(rank, world)
        except Exception as err:
            raise AssertionError(f"{name}: {err}") from err
    return loads


def test_ep2_equals_ep1_outputs_losses_and_gradients():
    loads = expect_ok(run_ranks(_parity_worker))
    assert loads[0] == loads[1]  # both ranks report the same global load
    steered = loads[0]["all_tokens_to_rank0_experts"]
    assert steered[2:] == [0, 0] and sum(steered) == 2 * 13  # rank 1's experts got nothing


def _equals_each_ranks_batch_alone(rank, config, sizes):
    """EP = 2 equals the single-process layer run on each rank's batch separately (loads summed)."""
    reference = _layer(config, torch.float32, False)
    sharded = expert_parallel(copy.deepcopy(reference))
    x_TD, _, _ = _batch(sizes, BASE["d_model"], torch.float32, False, False)
    local_refs = [reference(part) for part in x_TD.split(sizes)]
    out = sharded(x_TD.split(sizes)[rank])
    torch.testing.assert_close(out.y, local_refs[rank].y, **FP32_TOL)
    assert torch.equal(out.routing.tokens_per_expert_E, sum(r.routing.tokens_per_expert_E for r in local_refs))
    return out, local_refs


def _check_capacity(rank, world):
    # Capacity applies to each rank's own tokens (GShard's groups).
    out, local_refs = _equals_each_ranks_batch_alone(rank, {**BASE, "capacity_factor": 0.75}, [10, 7])
    assert int(out.routing.num_dropped) == int(local_refs[rank].routing.num_dropped)  # this rank's drops
    assert sum(int(r.routing.num_dropped) for r in local_refs) > 0  # capacity did bind


def _check_sequence_routers(rank, world):
    # Whole sequences live on one rank, so the sequence-wise balance loss (sigmoid) and Soft MoE's
    # slots per sequence are those of the single-process layer on the concatenated batch.
    cases = {
        "sigmoid": dict(BASE, router="sigmoid", num_expert_groups=2, topk_groups=1, sequence_balance_coef=0.3,
                        load_balance_coef=0.0),
        "soft": dict(BASE, router="soft", top_k=None, slots_per_expert=2, load_balance_coef=0.0),
    }
    for name, config in cases.items():
        reference = _layer(config, torch.float64, False)
        sharded = expert_parallel(copy.deepcopy(reference))
        gen = torch.Generator().manual_seed(11)
        x_BSD = torch.randn(5, 4, BASE["d_model"], generator=gen, dtype=torch.float64)
        proj_BSD = torch.randn(x_BSD.shape, generator=gen, dtype=torch.float64)
        rows = slice(0, 3) if rank == 0 else slice(3, 5)
        try:
            check_sharded_equals_reference(reference, sharded, x_BSD, proj_BSD, rows, rank, world, FP64_TOL)
        except AssertionError as err:
            raise AssertionError(f"{name}: {err}") from err


def _check_hash(rank, world):
    config = dict(BASE, router="hash", top_k=None, hash_vocab_size=50)
    reference = _layer(config, torch.float32, False)
    sharded = expert_parallel(copy.deepcopy(reference))
    x_TD, _, _ = _batch([6, 5], BASE["d_model"], torch.float32, False, False)
    ids_T = torch.arange(11) * 3 % 50
    rows = slice(0, 6) if rank == 0 else slice(6, 11)
    ref = reference(x_TD, token_ids=ids_T)
    out = sharded(x_TD[rows], token_ids=ids_T[rows])
    torch.testing.assert_close(out.y, ref.y[rows], **FP32_TOL)
    assert torch.equal(out.routing.tokens_per_expert_E, ref.routing.tokens_per_expert_E)


def _check_expert_choice(rank, world):
    # Each expert chooses among each rank's own tokens, as capacity applies per rank.
    config = dict(BASE, router="expert_choice", top_k=None, capacity_factor=1.5, load_balance_coef=0.0)
    _equals_each_ranks_batch_alone(rank, config, [8, 6])


def _mismatch_worker(rank, world):
    config = dict(BASE, d_ff=12 if rank == 0 else 20)
    moe = MoE(MoEConfig(**config))
    try:
        expert_parallel(moe)
    except ValueError as err:
        mismatch = str(err)
    else:
        mismatch = None
    try:
        expert_parallel(MoE(MoEConfig(**dict(BASE, num_experts=3))))
    except ValueError as err:
        indivisible = str(err)
    else:
        indivisible = None
    return mismatch, indivisible


def test_setup_errors_are_named_value_errors_on_every_rank():
    # The process-group timeout (20 s) is longer than the run's deadline, so a rank
    # left waiting in a collective would fail this test instead of passing late.
    messages = expect_ok(run_ranks(_mismatch_worker, deadline_s=15.0, pg_timeout_s=20.0))
    for mismatch, indivisible in messages:
        assert mismatch is not None and "d_ff" in mismatch and "rank 0 has 12, rank 1 has 20" in mismatch
        assert indivisible is not None and "num_experts (3)" in indivisible and "size (2)" in indivisible


def _reshard_worker(rank, world):
    torch.manual_seed(0)
    full = MoE(MoEConfig(**BASE))
    canonical = {k: v.clone() for k, v in full.state_dict().items()}
    sharded = expert_parallel(copy.deepcopy(full))
    # EP = 2 → canonical: every expert present and identical.
    gathered = full_state_dict(sharded)
    assert gathered.keys() == canonical.keys()
    for key in canonical:
        assert torch.equal(gathered[key], canonical[key]), key
    # Canonical → EP = 1: a fresh single-process layer loads it exactly.
    torch.manual_seed(1)
    single = MoE(MoEConfig(**BASE))
    load_full_state_dict(single, gathered)
    for key, value in single.state_dict().items():
        assert torch.equal(value, canonical[key]), key
    # EP = 1 → EP = 2 again, from a differently initialised sharded model.
    torch.manual_seed(2)
    resharded = expert_parallel(MoE(MoEConfig(**BASE)))
    load_full_state_dict(resharded, single.state_dict())
    w_in = resharded.experts.w_in
    assert torch.equal(w_in, canonical["experts.w_in"][rank * 2:(rank + 1) * 2])
    again = full_state_dict(resharded)
    for key in canonical:
        assert torch.equal(again[key], canonical[key]), key


def test_checkpoint_reshards_ep2_to_ep1_and_back_exactly():
    expect_ok(run_ranks(_reshard_worker))


def _dead_rank_worker(rank, world):
    import os

    moe = expert_parallel(MoE(MoEConfig(**BASE)))
    if rank == 1:
        os._exit(3)  # dies without a word, mid-training
    try:
        for _ in range(3):
            moe(torch.randn(5, BASE["d_model"]))
    except RuntimeError as err:
        return str(err)
    return None


def test_dead_rank_makes_the_others_fail_with_a_clear_error():
    reports = run_ranks(_dead_rank_worker, deadline_s=20.0, pg_timeout_s=5.0)
    assert 1 not in reports
    status, message = reports[0]
    assert status == "ok" and message is not None, reports
    assert "expert parallel" in message and "rank 0 of 2" in message


def _autocast_on_one_rank_worker(rank, world):
    moe = expert_parallel(MoE(MoEConfig(**BASE)))
    x = torch.randn(6, BASE["d_model"])
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=rank == 1):
            moe(x)
    except RuntimeError as err:
        return str(err)
    return None


def test_ranks_computing_in_different_dtypes_are_named_before_rows_move():
    messages = expect_ok(run_ranks(_autocast_on_one_rank_worker, deadline_s=20.0, pg_timeout_s=20.0))
    assert "rank 1 computes in torch.bfloat16, rank 0 in torch.float32" in messages[0]
    assert "rank 0 computes in torch.float32, rank 1 in torch.bfloat16" in messages[1]
    assert all("torch.autocast on all ranks or none" in m for m in messages)


def _dead_before_a_collective_worker(rank, world, which):
    import os

    import torch.distributed as dist

    from moekit.parallel.collectives import named_collective

    if rank == 1:
        os._exit(3)
    try:
        with named_collective(which):
            if which == "barrier":
                dist.barrier()
            else:
                dist.all_reduce(torch.ones(3))
    except RuntimeError as err:
        return str(err)
    return None


@pytest.mark.parametrize("which", ["barrier", "all-reduce of gradients"])
def test_a_peer_dying_before_any_collective_gives_moekits_error(which):
    reports = run_ranks(_dead_before_a_collective_worker, which, deadline_s=20.0, pg_timeout_s=5.0)
    status, message = reports[0]
    assert status == "ok" and message is not None, reports
    assert message.startswith(f"expert parallel: {which} failed on rank 0 of 2; a peer rank probably exited")


def test_count_validation_rejects_inconsistent_counts():
    good_PC = torch.tensor([[2, 1, 3], [0, 0, 0]])
    assert torch.equal(check_received_counts(good_PC, rank=0), good_PC[:, :2])
    with pytest.raises(RuntimeError, match=r"summing to \[3, 1\] but totals \[3, 0\]"):
        check_received_counts(torch.tensor([[2, 1, 3], [1, 0, 0]]), rank=0)
    with pytest.raises(RuntimeError, match="negative"):
        check_received_counts(torch.tensor([[-1, 1, 0]]), rank=1)
    check_send_splits([2, 3], 5, rank=0)
    with pytest.raises(RuntimeError, match=r"splits \[2, 2\] \(sum 4\) but routed 5 rows"):
        check_send_splits([2, 2], 5, rank=0)


def test_fingerprint_check_names_the_field_and_both_values():
    layer = MoE(MoEConfig(**BASE))
    ours = [("blocks.0.moe", config_fingerprint(layer))]
    theirs = [("blocks.0.moe", config_fingerprint(MoE(MoEConfig(**dict(BASE, router="switch", top_k=1)))))]
    check_fingerprints([ours, ours])
    with pytest.raises(ValueError, match=r"top_k of layer 'blocks.0.moe' differs.*rank 0 has 2, rank 1 has 1"):
        check_fingerprints([ours, theirs])
    with pytest.raises(ValueError, match="MoE layers differ"):
        check_fingerprints([ours, ours + ours])


class _Block(torch.nn.Module):
    """A residual block around an MoE: replicated (norm, head) and sharded (experts) parameters."""

    def __init__(self):
        super().__init__()
        self.norm = torch.nn.LayerNorm(BASE["d_model"])
        self.moe = MoE(MoEConfig(**BASE))
        self.head = torch.nn.Linear(BASE["d_model"], 3)

    def forward(self, x):
        out = self.moe(self.norm(x))
        return self.head(x + out.y), out.aux_loss


def _ddp_worker(rank, world):
    from moekit.parallel import data_parallel, expert_parallel_mesh, reduce_expert_gradients

    torch.manual_seed(0)
    reference = _Block()
    mesh = expert_parallel_mesh(2)
    model = data_parallel(expert_parallel(copy.deepcopy(reference), mesh.get_group("ep")))
    gen = torch.Generator().manual_seed(3)
    x_TD, target_T = torch.randn(12, BASE["d_model"], generator=gen), torch.randint(0, 3, (12,), generator=gen)
    logits, aux = reference(x_TD)
    (torch.nn.functional.cross_entropy(logits, target_T) + aux).backward()

    local = slice(6 * rank, 6 * rank + 6)  # equal shares: the global mean is the mean of the local means
    logits, aux = model(x_TD[local])
    (torch.nn.functional.cross_entropy(logits, target_T[local]) + aux).backward()
    reduce_expert_gradients(model, mesh)
    ref_params = dict(reference.named_parameters())
    for name, param in model.module.named_parameters():
        expected = ref_params[name].grad
        if name.startswith("moe.experts."):
            expected = expected[2 * rank:2 * rank + 2]
        torch.testing.assert_close(param.grad, expected, **FP32_TOL, msg=lambda m, n=name: f"grad {n}: {m}")


def test_ddp_for_replicated_parameters_and_expert_gradients_over_the_ep_mesh():
    expect_ok(run_ranks(_ddp_worker))


def test_layers_expert_parallelism_cannot_run_exactly_are_refused_by_name():
    from moekit.finetune import add_lora
    from moekit.parallel.setup import check_shardable

    for router in ("topk", "noisy_topk", "switch", "softmax", "sigmoid", "expert_choice"):
        top_k = {"switch": 1, "softmax": 4}.get(router, 2)
        check_shardable("block", MoE(MoEConfig(**dict(BASE, router=router, top_k=top_k))))
    modules = MoE(d_model=4, d_ff=1, top_k=2, experts=[torch.nn.Linear(4, 4) for _ in range(2)])
    with pytest.raises(TypeError, match="layer 'block' has ModuleExperts, which does not declare shardable"):
        check_shardable("block", modules)
    from moekit.finetune import mixlora
    from moekit.models.lm import SwiGLU

    with pytest.raises(TypeError, match="mixture of LoRA experts whose experts share one base weight"):
        check_shardable("block", mixlora(SwiGLU(4, 8), num_experts=2, top_k=1, rank=2))
    lora = MoE(MoEConfig(**BASE))
    add_lora(lora, rank=1)
    check_shardable("block", lora)  # adapters on stacked experts shard with them
    local_only = MoE(MoEConfig(**BASE))
    local_only.router.global_losses = frozenset({"z_loss"})  # as a router whose load_balance is per rank
    with pytest.raises(NotImplementedError, match="reports load_balance, importance, load as a per-rank loss"):
        check_shardable("block", local_only)


def test_fingerprint_covers_dtype_router_options_and_shared_experts():
    base = MoE(MoEConfig(**BASE))
    ours = [("moe", config_fingerprint(base))]
    for field, other in [
        ("experts dtype", MoE(MoEConfig(**BASE)).double()),
        ("router_options.logit_bias", MoE(MoEConfig(**BASE, router_logit_bias=True))),
        ("router_options.jitter", MoE(MoEConfig(**BASE, router_jitter=0.1))),
        ("num_shared_experts", MoE(MoEConfig(**BASE, num_shared_experts=1))),
        ("shared_d_ff", MoE(MoEConfig(**BASE, shared_d_ff=24))),
    ]:
        theirs = [("moe", config_fingerprint(other))]
        with pytest.raises(ValueError, match=rf"{re.escape(field)} of layer 'moe' differs"):
            check_fingerprints([ours, theirs])
