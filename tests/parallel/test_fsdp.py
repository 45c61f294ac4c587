"""FSDP2 with expert parallelism on 2 and 4 gloo processes, against the single-process run.

The non-expert parameters are sharded over the "fsdp" ranks (replicated over
"replicate": HSDP), each expert over the ranks holding it. With a deterministic
router, fp32 and no capacity the loss curve over 20 steps is the single-process
one to 1e-5, and so are the final weights; checkpoints stay canonical, so a run
saved at one mesh shape resumes at another or in one process.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from tests.distributed_harness import expect_ok, run_ranks
from tests.parallel.test_expert_parallel_training import (
    _assert_same_curve,
    _checkpoint_tensors,
    _curve,
)

from lm_fixtures import tiny_model_config, tiny_train_config
from moekit.models import LanguageModel
from moekit.parallel.fsdp import check_fsdp_sizes
from moekit.train import latest_checkpoint, new_run, resume_run

STEPS, STOP_AT = 20, 10


def _local_numel(model) -> tuple[int, int]:
    """(non-expert, expert) parameter elements this rank holds."""
    from torch.distributed.tensor import DTensor

    from moekit.parallel import moe_layers

    experts = {id(p) for _, moe in moe_layers(model) for p in moe.experts.parameters()}
    counts = [0, 0]
    for param in model.parameters():
        local = param.to_local() if isinstance(param, DTensor) else param
        counts[int(id(param) in experts)] += local.numel()
    return counts[0], counts[1]


def _fsdp_worker(rank, world, root, prepared, model_config, train_config, data_config, layouts):
    """Each (name, fsdp, ep, stop_at[, mixed precision, activation checkpointing, overlap chunks]) layout
    trains its run."""
    from moekit.parallel import setup_parallel

    sizes = {}
    for name, fsdp, ep, stop_at, *options in layouts:
        precision, recompute, chunks = (*options, 1) if len(options) == 2 else (options or ("fp32", False, 1))
        parallel = setup_parallel(ep_size=ep, timeout_s=30, fsdp_size=fsdp, mixed_precision=precision,
                                  overlap_chunks=chunks)
        trainer = new_run(Path(root) / name, model_config, train_config, data_config, prepared=prepared,
                          progress=False, parallel=parallel, activation_checkpointing=recompute)
        sizes[name] = _local_numel(trainer.model)
        finished = trainer.fit(on_step=lambda t, s=stop_at: t.request_stop() if t.step == s else None)
        assert finished == (stop_at is None)
    return sizes


def _resume_worker(rank, world, root, name, fsdp, ep):
    from moekit.parallel import setup_parallel

    torch.manual_seed(1234)  # the resumed run must not depend on the process's RNG state
    trainer = resume_run(Path(root) / name, progress=False, parallel=setup_parallel(ep, 30, fsdp_size=fsdp))
    assert trainer.step == STOP_AT
    assert trainer.fit()
    return None


@pytest.fixture(scope="module")
def runs(tmp_path_factory, prepared, tiny_data_config):
    """The single-process run, and the FSDP runs of every layout the tests compare with it."""
    root = tmp_path_factory.mktemp("fsdp")
    model_config = tiny_model_config(prepared.tokenizer.vocab_size)  # top-k, dropless: no randomness in routing
    train_config = tiny_train_config(steps=STEPS, log_every=1, eval_every=STOP_AT, checkpoint_every=STOP_AT)
    assert new_run(root / "single", model_config, train_config, tiny_data_config, prepared=prepared,
                   progress=False).fit()
    args = (str(root), prepared, model_config, train_config, tiny_data_config)
    layouts = [("f2e2", 2, 2, None), ("bf16-recompute", 2, 2, None, "bf16", True),
               ("ddp-overlap", 0, 2, None, "fp32", False, 3)]
    sizes = expect_ok(run_ranks(_fsdp_worker, *args, layouts, world_size=2, deadline_s=180))
    layouts4 = [("f4e2", 4, 2, None), ("f2e2-hsdp", 2, 2, STOP_AT), ("f4e2-overlap", 4, 2, None, "fp32", False, 2)]
    sizes4 = expect_ok(run_ranks(_fsdp_worker, *args, layouts4, world_size=4, deadline_s=300), world_size=4)
    return root, model_config, sizes, sizes4


def _assert_close_weights(folder: Path, reference: Path) -> None:
    ours, theirs = _checkpoint_tensors(folder), _checkpoint_tensors(reference)
    assert ours.keys() == theirs.keys()
    for name, tensor in theirs.items():
        if name.startswith("model/"):
            torch.testing.assert_close(ours[name], tensor, rtol=1e-4, atol=1e-6, msg=lambda m, n=name: f"{n}: {m}")


def test_fsdp_with_expert_parallelism_trains_as_one_process(runs):
    root, *_ = runs
    for name in ("f2e2", "f4e2", "ddp-overlap", "f4e2-overlap"):
        _assert_same_curve(root / name, root / "single")
        assert latest_checkpoint(root / name).name == f"step-{STEPS:06d}"
        _assert_close_weights(latest_checkpoint(root / name), latest_checkpoint(root / "single"))
    assert [row[0] for row in _curve(root / "f4e2")] == list(range(1, STEPS + 1))


def test_bf16_policy_with_activation_checkpointing_follows_the_fp32_curve(runs):
    root, *_ = runs
    ours, reference = _curve(root / "bf16-recompute"), _curve(root / "single")
    # bfloat16 keeps 8 bits of mantissa: the curve follows, not to float rounding.
    assert max(abs(a[1] - b[1]) for a, b in zip(ours, reference, strict=True)) < 0.05
    assert ours[-1][1] < ours[0][1] - 0.3  # and it trains
    # Weights and AdamW moments stay float32 (the policy casts for compute only).
    assert {t.dtype for t in _checkpoint_tensors(latest_checkpoint(root / "bf16-recompute")).values()} == {torch.float32}


def test_each_rank_holds_its_share_of_the_parameters(runs):
    root, model_config, sizes, sizes4 = runs
    model = LanguageModel(model_config)
    expert_total = sum(p.numel() for name, p in model.named_parameters() if ".experts." in name)
    dense_total = model.num_parameters() - expert_total
    # 2 ranks, EP 2: every expert has one holder (kept whole), the rest is halved.
    sizes = [s["f2e2"] for s in sizes]
    assert sum(d for d, _ in sizes) == dense_total and all(e == expert_total // 2 for _, e in sizes)
    assert max(d for d, _ in sizes) - min(d for d, _ in sizes) <= model_config.d_model * 4  # uneven rows, no more
    # 4 ranks, FSDP 4 over EP 2: each expert sharded over its 2 holders, the rest over all 4.
    f4 = [s["f4e2"] for s in sizes4]
    assert sum(d for d, _ in f4) == dense_total and sum(e for _, e in f4) == expert_total
    assert all(e == expert_total // 4 for _, e in f4)
    # HSDP (FSDP 2, 2 replicas): the rest sharded over pairs, so every pair holds it once.
    hsdp = [s["f2e2-hsdp"] for s in sizes4]
    assert sum(d for d, _ in hsdp[:2]) == dense_total == sum(d for d, _ in hsdp[2:])


def test_a_sharded_run_resumes_at_another_mesh_shape_and_in_one_process(runs, tmp_path):
    import shutil

    root, *_ = runs
    # Stopped at step 10 under HSDP (fsdp 2 × 2 replicas, EP 2): resume at FSDP 2, EP 2 on 2 ranks.
    shutil.copytree(root / "f2e2-hsdp", tmp_path / "hsdp-then-f2")
    expect_ok(run_ranks(_resume_worker, str(tmp_path), "hsdp-then-f2", 2, 2, world_size=2, deadline_s=120))
    _assert_same_curve(tmp_path / "hsdp-then-f2", root / "single")
    # The same checkpoint in one process: canonical, it continues the same curve.
    shutil.copytree(root / "f2e2-hsdp", tmp_path / "hsdp-then-single")
    torch.manual_seed(1234)
    trainer = resume_run(tmp_path / "hsdp-then-single", progress=False)
    assert trainer.step == STOP_AT and trainer.fit()
    _assert_same_curve(tmp_path / "hsdp-then-single", root / "single")


def test_mesh_sizes_that_do_not_nest_are_refused_by_name():
    check_fsdp_sizes(world=8, fsdp_size=4, ep_size=2)
    with pytest.raises(ValueError, match=r"FSDP size \(3\) must divide the number of processes \(4\)"):
        check_fsdp_sizes(world=4, fsdp_size=3, ep_size=1)
    with pytest.raises(ValueError, match=r"expert-parallel size \(4\) must divide the FSDP size \(2\)"):
        check_fsdp_sizes(world=4, fsdp_size=2, ep_size=4)
    with pytest.raises(ValueError, match=r"FSDP size \(0\) must be a positive integer"):
        check_fsdp_sizes(world=4, fsdp_size=0, ep_size=1)


def test_activation_checkpointing_gives_the_same_gradients(prepared):
    torch.manual_seed(0)
    model = LanguageModel(tiny_model_config(prepared.tokenizer.vocab_size)).double()
    idx = torch.randint(0, prepared.tokenizer.vocab_size, (2, 16))
    grads = []
    for recompute in (False, True):
        model.zero_grad()
        model.activation_checkpointing = recompute
        out = model(idx, idx.roll(-1, 1))
        (out.loss + out.aux_loss).backward()
        grads.append({name: p.grad.clone() for name, p in model.named_parameters()})
    for name, grad in grads[0].items():
        torch.testing.assert_close(grads[1][name], grad, rtol=0, atol=1e-14, msg=lambda m, n=name: f"{n}: {m}")


def _exit_now(*args, **kwargs):
    import os

    os._exit(3)


def _dying_rank_worker(rank, world, root, prepared, model_config, train_config, data_config, where):
    """Rank 1 exits at ``where`` during step 2; rank 0 reports the error it got."""
    from moekit.parallel import setup_parallel

    parallel = setup_parallel(ep_size=2, timeout_s=5, fsdp_size=2)
    trainer = new_run(Path(root) / where, model_config, train_config, data_config, prepared=prepared,
                      progress=False, parallel=parallel)
    if rank == 1:
        model = trainer.model
        if where == "attention forward":
            model.blocks[1].attn.register_forward_pre_hook(_exit_now)
        elif where == "experts":
            model.blocks[0].ffn.experts.run = _exit_now
        elif where == "backward":
            model.blocks[0].register_full_backward_pre_hook(_exit_now)
        elif where == "optimizer step":
            trainer.optimizer.register_step_pre_hook(_exit_now)
        elif where == "checkpoint":
            trainer.save = _exit_now
        elif where == "evaluation":
            import moekit.train.trainer

            moekit.train.trainer.evaluate = _exit_now
    try:
        trainer.fit()
    except RuntimeError as err:
        return str(err)
    return None


@pytest.mark.parametrize("where", [
    "evaluation", "experts",
    pytest.param("attention forward", marks=pytest.mark.slow), pytest.param("backward", marks=pytest.mark.slow),
    pytest.param("optimizer step", marks=pytest.mark.slow), pytest.param("checkpoint", marks=pytest.mark.slow),
])
def test_a_rank_dying_mid_step_gives_the_others_moekits_error(where, tmp_path, prepared, tiny_data_config):
    model_config = tiny_model_config(prepared.tokenizer.vocab_size)
    train_config = tiny_train_config(steps=4, eval_every=2, checkpoint_every=2)
    reports = run_ranks(_dying_rank_worker, str(tmp_path), prepared, model_config, train_config, tiny_data_config,
                        where, deadline_s=60.0, pg_timeout_s=5.0)
    assert 1 not in reports
    status, message = reports[0]
    assert status == "ok" and message is not None, reports
    assert message.startswith("expert parallel: ") and "failed on rank 0 of 2; a peer rank probably exited" in message


def _different_models_worker(rank, world, vocab_size):
    from moekit.parallel import parallelize, setup_parallel

    config = tiny_model_config(vocab_size)
    config = type(config)(**{**config.__dict__, "moe_every": 2, "d_ff": 64 if rank == 0 else 96})
    try:
        parallelize(LanguageModel(config), setup_parallel(2, 20, fsdp_size=2))
    except ValueError as err:
        return str(err)
    return None


def test_ranks_with_different_dense_layers_get_a_named_error_on_every_rank():
    messages = expect_ok(run_ranks(_different_models_worker, 64, deadline_s=60.0))
    for message in messages:
        assert "FSDP: the ranks built different models" in message, message
        assert "('blocks.0.ffn.w_in.weight', (128, 32)" in message and "(192, 32)" in message, message


def test_fsdp_options_are_checked_before_any_process_starts(monkeypatch, capsys, tmp_path, corpus_dir):
    from moekit.cli import main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    common = ["--out", str(tmp_path / "run"), "--data", str(corpus_dir)]
    assert main(["train", "--fsdp", "4", "--expert-parallel", "2", *common]) == 2
    assert "FSDP size 4 needs 4 processes" in capsys.readouterr().err
    assert main(["train", "--mixed-precision", "bf16", *common]) == 2
    assert "--mixed-precision bf16 is FSDP's policy: add --fsdp N" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_torchrun_fsdp_with_sharded_checkpoints_then_resume_at_another_layout(tmp_path, corpus_dir):
    """docs/distributed.md's command lines: FSDP 2 × EP 2 under torchrun, sharded checkpoints,
    resumed at EP 2 without FSDP and in one process."""
    import os
    import subprocess
    import sys

    from tests.distributed_harness import _free_port

    common = ["--data", str(corpus_dir), "--vocab-size", "320", "--val-fraction", "0.2", "--layers", "2",
              "--d-model", "32", "--heads", "2", "--context-length", "32", "--d-ff", "64", "--experts", "4",
              "--steps", "6", "--batch-size", "4", "--eval-every", "3", "--eval-batches", "2", "--log-every", "1",
              "--checkpoint-every", "3", "--threads", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")

    def torchrun(*args):
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr",
                   "127.0.0.1", "--master-port", str(_free_port()), "-m", "moekit", "train", *args]
        subprocess.run(command, check=True, timeout=300, env=env, capture_output=True)

    torchrun("--fsdp", "2", "--expert-parallel", "2", "--sharded-checkpoints", "--dist-timeout", "60",
             "--out", str(tmp_path / "fsdp"), *common)
    subprocess.run([sys.executable, "-m", "moekit", "train", "--out", str(tmp_path / "single"), *common],
                   check=True, timeout=300, env=env, capture_output=True)
    _assert_same_curve(tmp_path / "fsdp", tmp_path / "single")
    torchrun("--resume", str(tmp_path / "fsdp"), "--resume-steps", "8", "--expert-parallel", "2",
             "--sharded-checkpoints", "--dist-timeout", "60")
    assert [row[0] for row in _curve(tmp_path / "fsdp")] == list(range(1, 9))
    subprocess.run([sys.executable, "-m", "moekit", "train", "--resume", str(tmp_path / "fsdp"), "--resume-steps",
                    "9"], check=True, timeout=300, env=env, capture_output=True)
    assert [row[0] for row in _curve(tmp_path / "fsdp")] == list(range(1, 10))
