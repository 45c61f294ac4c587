"""Sharded checkpoints (torch.distributed.checkpoint) on 4 gloo processes.

Saved at (data 2, expert 2) under FSDP, a checkpoint loads at (data 1, expert 4)
and in one process with identical weights; a sharded run resumed at its own
layout continues the uninterrupted curve bitwise; and a step folder converts
to the single-file layout and back without changing a tensor.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tests.distributed_harness import expect_ok, run_ranks

from lm_fixtures import tiny_model_config, tiny_train_config
from moekit.models import LanguageModel
from moekit.train import latest_checkpoint, load_checkpoint, new_run, read_metrics, resume_run
from moekit.train.sharded import SHARDS_DIR, convert_checkpoint, is_sharded_checkpoint

STEPS, STOP_AT = 12, 6
# A one-block MoE language model for the command-line tests.
TINY_TRAIN = ["--layers", "1", "--d-model", "32", "--heads", "2", "--d-ff", "64", "--context-length", "32",
              "--experts", "4", "--batch-size", "4", "--vocab-size", "300", "--eval-batches", "2", "--log-every", "1"]


def _canonical(model) -> dict:
    from moekit.parallel import full_state_dict

    # As numpy arrays: tensors would travel back to the parent as shared memory of an exited process.
    return {name: tensor.detach().numpy().copy() for name, tensor in full_state_dict(model).items()}


def _save_worker(rank, world, root, prepared, model_config, train_config, data_config):
    """(dp 2, ep 2) under FSDP 4: the whole run, and one stopped at STOP_AT then resumed."""
    from moekit.parallel import setup_parallel

    root = Path(root)
    options = dict(prepared=prepared, progress=False, sharded_checkpoints=True)
    parallel = setup_parallel(ep_size=2, timeout_s=30, fsdp_size=4)
    assert new_run(root / "whole", model_config, train_config, data_config, parallel=parallel, **options).fit()
    stopped = new_run(root / "stopped", model_config, train_config, data_config, parallel=parallel, **options)
    assert not stopped.fit(on_step=lambda t: t.request_stop() if t.step == STOP_AT else None)
    saved = _canonical(stopped.model)
    shutil.copytree(root / "stopped", root / f"copy-{rank}")  # the folder the (1, 4) worker reads
    torch.manual_seed(1234)  # the resumed run must not depend on the process's RNG state
    resumed = resume_run(root / "stopped", progress=False, parallel=parallel, sharded_checkpoints=True)
    assert resumed.step == STOP_AT and resumed.fit()
    return saved if rank == 0 else None


def _load_worker(rank, world, root, model_config):
    """Load the stopped run's checkpoint at (dp 1, ep 4), no FSDP: every rank one expert of each layer."""
    from moekit.parallel import parallelize, setup_parallel
    from moekit.train.sharded import load_sharded_checkpoint

    parallel = setup_parallel(ep_size=4, timeout_s=30)
    model = LanguageModel(model_config)
    parallelize(model, parallel)
    assert model.blocks[0].ffn.experts.num_experts == 1
    load_sharded_checkpoint(latest_checkpoint(Path(root) / "copy-0"), model, None, parallel)
    weights = _canonical(model)  # collective: every rank gathers
    return weights if rank == 0 else None


@pytest.fixture(scope="module")
def saved(tmp_path_factory, prepared, tiny_data_config):
    root = tmp_path_factory.mktemp("sharded")
    model_config = tiny_model_config(prepared.tokenizer.vocab_size)
    train_config = tiny_train_config(steps=STEPS, log_every=1, eval_every=STOP_AT, checkpoint_every=STOP_AT)
    arrays = expect_ok(run_ranks(_save_worker, str(root), prepared, model_config, train_config, tiny_data_config,
                                  world_size=4, deadline_s=240), world_size=4)[0]
    return root, model_config, {name: torch.from_numpy(array) for name, array in arrays.items()}


def test_a_resumed_sharded_run_continues_the_curve_bitwise(saved):
    root, *_ = saved
    whole, resumed = read_metrics(root / "whole"), read_metrics(root / "stopped")
    assert [r["step"] for r in resumed] == list(range(1, STEPS + 1))
    clock = ("elapsed", "step_time", "tokens_per_s")
    for ours, theirs in zip(resumed, whole, strict=True):
        assert {k: v for k, v in ours.items() if k not in clock} == {k: v for k, v in theirs.items() if k not in clock}


def test_each_rank_wrote_its_own_shards_and_the_commit_is_checksummed(saved):
    root, *_ = saved
    folder = latest_checkpoint(root / "whole")
    assert is_sharded_checkpoint(folder) and not (folder / "model.safetensors").exists()
    assert sorted(p.name for p in (folder / SHARDS_DIR).glob("*.distcp")) == [f"__{r}_0.distcp" for r in range(4)]
    checksums = json.loads((folder / "checksums.json").read_text())
    assert f"{SHARDS_DIR}/.metadata" in checksums and "trainer_state.json" in checksums
    assert not list((root / "whole" / "checkpoints").glob("incomplete-*"))


def test_saved_at_data_2_expert_2_loads_at_expert_4_and_in_one_process_identically(saved, tmp_path):
    root, model_config, weights = saved
    at_ep4 = expect_ok(run_ranks(_load_worker, str(root), model_config, world_size=4, deadline_s=120),
                       world_size=4)[0]
    one = LanguageModel(model_config)
    load_checkpoint(latest_checkpoint(root / "copy-0"), one)
    for name, tensor in weights.items():
        assert torch.equal(torch.from_numpy(at_ep4[name]), tensor), name
        assert torch.equal(one.state_dict()[name], tensor), name


def test_a_step_folder_converts_to_one_file_and_back_unchanged(saved, tmp_path, prepared):
    from moekit.train.settings import build_optimizer

    root, model_config, weights = saved
    shutil.copytree(root / "copy-1", tmp_path / "run")
    folder = latest_checkpoint(tmp_path / "run")

    def fresh():
        model = LanguageModel(model_config)
        return model, build_optimizer(model, tiny_train_config())

    convert_checkpoint(folder, *fresh(), "canonical")
    assert not is_sharded_checkpoint(folder)
    one_file = load_file(str(folder / "model.safetensors"))
    assert all(torch.equal(one_file[name], tensor) for name, tensor in weights.items() if name in one_file)
    optimizer_file = load_file(str(folder / "optimizer.safetensors"))
    convert_checkpoint(folder, *fresh(), "sharded")
    assert is_sharded_checkpoint(folder) and not (folder / "model.safetensors").exists()
    model, optimizer = fresh()
    load_checkpoint(folder, model, optimizer)
    assert all(torch.equal(model.state_dict()[name], tensor) for name, tensor in weights.items())
    from moekit.train.checkpoint import optimizer_tensors

    again, _ = optimizer_tensors(optimizer)
    assert again.keys() == optimizer_file.keys()
    assert all(torch.equal(again[name], tensor) for name, tensor in optimizer_file.items())
    # And the run goes on in one process from the converted folder.
    trainer = resume_run(tmp_path / "run", progress=False)
    assert trainer.step == STOP_AT and trainer.fit()


def test_the_command_line_writes_shards_in_one_process_converts_and_evaluates(tmp_path, corpus_dir, capsys):
    from moekit.cli import main

    tiny = [*TINY_TRAIN, "--steps", "3", "--eval-every", "3", "--data", str(corpus_dir)]
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--sharded-checkpoints", *tiny]) == 0
    assert is_sharded_checkpoint(latest_checkpoint(run))
    capsys.readouterr()
    assert main(["eval", str(run), "--batches", "2", "--batch-size", "4"]) == 0
    sharded_loss = json.loads(capsys.readouterr().out)["val_loss"]
    assert main(["convert-checkpoint", str(run), "--to", "canonical"]) == 0
    assert (latest_checkpoint(run) / "model.safetensors").exists() and not is_sharded_checkpoint(latest_checkpoint(run))
    capsys.readouterr()
    assert main(["eval", str(run), "--batches", "2", "--batch-size", "4"]) == 0
    assert json.loads(capsys.readouterr().out)["val_loss"] == sharded_loss


def test_offloading_a_sharded_run_says_to_convert_it_first(tmp_path, corpus_dir, capsys):
    from moekit.cli import main

    tiny = [*TINY_TRAIN, "--steps", "2", "--eval-every", "2", "--data", str(corpus_dir)]
    run = tmp_path / "run"
    assert main(["train", "--out", str(run), "--sharded-checkpoints", *tiny]) == 0
    capsys.readouterr()
    assert main(["eval", str(run), "--batches", "1", "--batch-size", "2", "--max-memory", "2GB"]) == 2
    err = capsys.readouterr().err
    assert "holds sharded checkpoint files" in err and f"moekit convert-checkpoint {run} --to canonical" in err
