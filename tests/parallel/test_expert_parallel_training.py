"""Training the language model with expert parallelism on 2 gloo processes.

The single-process run is the reference: the same seed, data and global batch
at EP = 2 give the same loss curve (fp32, a deterministic top-k router, no
capacity), and checkpoints are canonical, so a run saved at EP = 2 resumes at
EP = 1 and the other way round, continuing the uninterrupted curve.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tests.distributed_harness import _free_port, expect_ok, run_ranks

from lm_fixtures import tiny_model_config, tiny_train_config
from moekit.train import Trainer, latest_checkpoint, new_run, read_metrics, resume_run

LOSS_TOL = 1e-5
STEPS, STOP_AT = 8, 4


CURVE_KEYS = ("loss", "val_loss", "grad_norm", "aux_loss")


def _curve(run_dir) -> list[tuple]:
    return [(r["step"], *(r.get(key) for key in CURVE_KEYS)) for r in read_metrics(run_dir)]


def _assert_same_curve(run_dir, reference_dir) -> None:
    ours, reference = _curve(run_dir), _curve(reference_dir)
    assert [row[0] for row in ours] == [row[0] for row in reference]
    for row, ref_row in zip(ours, reference, strict=True):
        for name, a, b in zip(CURVE_KEYS, row[1:], ref_row[1:], strict=True):
            assert (a is None) == (b is None), (row[0], name)
            if a is not None:
                assert abs(a - b) <= LOSS_TOL * max(1.0, abs(b)), f"step {row[0]} {name}: {a} vs single-process {b}"


def _checkpoint_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {f"model/{k}": v for k, v in load_file(str(folder / "model.safetensors")).items()}
    tensors.update({f"optimizer/{k}": v for k, v in load_file(str(folder / "optimizer.safetensors")).items()})
    return tensors


def _assert_same_tensors(ours: dict, reference: dict, **tol) -> None:
    assert ours.keys() == reference.keys()
    for name, tensor in reference.items():
        if tol:
            torch.testing.assert_close(ours[name], tensor, **tol, msg=lambda m, n=name: f"{n}: {m}")
        else:
            assert torch.equal(ours[name], tensor), name


def _record_writes_under(root: str) -> list:
    """An audit hook collecting every file this process creates, writes, renames or deletes under root."""
    writes: list = []
    write_flags = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC

    def hook(event, args):
        if event == "open":
            path, mode, flags = args
            writing = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & write_flags)
        elif event in ("os.rename", "os.remove", "os.mkdir", "shutil.rmtree", "os.truncate"):
            path, writing = args[0], True
        else:
            return
        if writing and isinstance(path, str | bytes | os.PathLike) and os.fsdecode(path).startswith(root):
            writes.append((event, os.fsdecode(path)))

    sys.addaudithook(hook)
    return writes


def _ep2_worker(rank, world, root, prepared, model_config, train_config, data_config):
    from moekit.parallel import setup_parallel

    root = Path(root)
    writes = _record_writes_under(str(root)) if rank > 0 else None
    parallel = setup_parallel(ep_size=2, timeout_s=20)
    quiet = dict(progress=False, parallel=parallel)

    # The whole run at EP = 2.
    assert new_run(root / "ep2", model_config, train_config, data_config, prepared=prepared, **quiet).fit()
    # EP = 2 for the first half; the parent resumes it at EP = 1.
    first_half = new_run(root / "ep2-then-ep1", model_config, train_config, data_config, prepared=prepared, **quiet)
    assert not first_half.fit(on_step=lambda t: t.request_stop() if t.step == STOP_AT else None)
    # The parent's EP = 1 first half, resumed here at EP = 2. Saving before training writes the
    # EP = 1 checkpoint again from this rank's shards: the round trip EP = 1 → 2 → canonical.
    torch.manual_seed(1234)  # the resumed run must not depend on the process's RNG state
    second_half = resume_run(root / "ep1-then-ep2", **quiet)
    assert second_half.step == STOP_AT and second_half.model.blocks[0].ffn.experts.num_experts == 2
    second_half.save()
    assert second_half.fit()

    # Setup errors name the bad value on every rank, before any collective could hang.
    errors = []
    for bad_model, bad_train in ((model_config, tiny_train_config(batch_size=3)),
                                 (tiny_model_config(model_config.vocab_size, experts=3, top_k=1), train_config)):
        try:
            Trainer(root / f"bad-{len(errors)}", bad_model, bad_train, prepared.tokens, **quiet)
        except ValueError as err:
            errors.append(str(err))
        else:
            errors.append(None)
    return writes, errors


def test_ep2_training_equals_single_process_and_checkpoints_reshard_both_ways(tmp_path, prepared, tiny_data_config):
    model_config = tiny_model_config(prepared.tokenizer.vocab_size)  # top-k, dropless: no randomness in routing
    train_config = tiny_train_config(steps=STEPS, log_every=1, eval_every=STOP_AT, checkpoint_every=100)
    quiet = dict(prepared=prepared, progress=False)
    assert new_run(tmp_path / "single", model_config, train_config, tiny_data_config, **quiet).fit()
    first_half = new_run(tmp_path / "ep1-then-ep2", model_config, train_config, tiny_data_config, **quiet)
    assert not first_half.fit(on_step=lambda t: t.request_stop() if t.step == STOP_AT else None)
    ep1_checkpoint = _checkpoint_tensors(latest_checkpoint(tmp_path / "ep1-then-ep2"))

    writes, errors = expect_ok(run_ranks(
        _ep2_worker, str(tmp_path), prepared, model_config, train_config, tiny_data_config,
        deadline_s=90.0, pg_timeout_s=20.0,
    ))[1]

    # The loss curve (training and validation) of EP = 2 is the single-process one.
    _assert_same_curve(tmp_path / "ep2", tmp_path / "single")
    # EP = 1 → EP = 2: the checkpoint rewritten from the shards is the one loaded, exactly
    # (weights and AdamW moments); the run continued on the uninterrupted curve.
    _assert_same_tensors(_checkpoint_tensors(tmp_path / "ep1-then-ep2/checkpoints/step-000004"), ep1_checkpoint)
    _assert_same_curve(tmp_path / "ep1-then-ep2", tmp_path / "single")

    # EP = 2 → EP = 1: its checkpoint is canonical (all experts, the single-process moments up to
    # float rounding), a single process reloads and rewrites it exactly, and continues the curve.
    ep2_folder = latest_checkpoint(tmp_path / "ep2-then-ep1")
    assert ep2_folder.name == "step-000004"
    ep2_checkpoint = _checkpoint_tensors(ep2_folder)
    _assert_same_tensors(ep2_checkpoint, ep1_checkpoint, rtol=1e-4, atol=1e-7)
    torch.manual_seed(1234)
    resumed = resume_run(tmp_path / "ep2-then-ep1", progress=False)
    assert resumed.step == STOP_AT and resumed.model.blocks[0].ffn.experts.num_experts == 4
    resumed.save()
    _assert_same_tensors(_checkpoint_tensors(ep2_folder), ep2_checkpoint)
    assert resumed.fit()
    _assert_same_curve(tmp_path / "ep2-then-ep1", tmp_path / "single")

    # Only rank 0 wrote: rank 1 created, wrote, renamed and deleted nothing in the run folders.
    assert writes == []
    assert (tmp_path / "ep2/tensorboard").is_dir() and latest_checkpoint(tmp_path / "ep2").name == "step-000008"
    assert errors[0] is not None and "batch_size (3)" in errors[0] and "processes (2)" in errors[0]
    assert errors[1] is not None and "experts per layer (3)" in errors[1] and "expert-parallel size (2)" in errors[1]


def test_expert_parallel_without_torchrun_says_how_to_start_it(monkeypatch, capsys, tmp_path, corpus_dir):
    from moekit.cli import main

    monkeypatch.delenv("WORLD_SIZE", raising=False)
    code = main(["train", "--expert-parallel", "2", "--out", str(tmp_path / "run"), "--data", str(corpus_dir)])
    err = capsys.readouterr().err
    assert code == 2 and "expert-parallel size 2 needs 2 processes" in err and "torchrun --nproc-per-node 2" in err
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_torchrun_moekit_train_expert_parallel_then_resume_single_process(tmp_path, corpus_dir):
    """The command line of docs/distributed.md, end to end (torchrun starts 2 processes)."""
    common = ["--data", str(corpus_dir), "--vocab-size", "320", "--val-fraction", "0.2", "--layers", "2",
              "--d-model", "32", "--heads", "2", "--context-length", "32", "--d-ff", "64", "--experts", "4",
              "--steps", "6", "--batch-size", "4", "--eval-every", "3", "--eval-batches", "2", "--log-every", "1",
              "--checkpoint-every", "3", "--threads", "1"]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                "--master-addr", "127.0.0.1", "--master-port", str(_free_port())]
    subprocess.run([*torchrun, "-m", "moekit", "train", "--expert-parallel", "2", "--dist-timeout", "30",
                    "--out", str(tmp_path / "ep2"), *common], check=True, timeout=240, env=env, capture_output=True)
    subprocess.run([sys.executable, "-m", "moekit", "train", "--out", str(tmp_path / "single"), *common],
                   check=True, timeout=240, env=env, capture_output=True)
    _assert_same_curve(tmp_path / "ep2", tmp_path / "single")
    # Resume the EP = 2 run on one process for 2 more steps; the other run goes on at EP = 2.
    shutil.copytree(tmp_path / "single", tmp_path / "single-then-ep2")
    subprocess.run([sys.executable, "-m", "moekit", "train", "--resume", str(tmp_path / "ep2"),
                    "--resume-steps", "8"], check=True, timeout=240, env=env, capture_output=True)
    subprocess.run([*torchrun, "-m", "moekit", "train", "--resume", str(tmp_path / "single-then-ep2"),
                    "--resume-steps", "8", "--expert-parallel", "2", "--dist-timeout", "30"],
                   check=True, timeout=240, env=env, capture_output=True)
    _assert_same_curve(tmp_path / "ep2", tmp_path / "single-then-ep2")
    assert [row[0] for row in _curve(tmp_path / "ep2")] == list(range(1, 9))
