"""Nothing lost, nothing silent: divergence stops a run with its last good checkpoint named,
checkpoints are checksummed and validated on load, disk trouble is named and cleaned up."""

from __future__ import annotations

import errno
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from lm_fixtures import tiny_model_config, tiny_train_config
from moekit.train import CheckpointError, NonFiniteError, latest_checkpoint, new_run, resume_run
from moekit.train import checkpoint as checkpoint_module


def _run(tmp_path, prepared, tiny_data_config, name="run", steps=4, **changes):
    config = tiny_train_config(steps=steps, checkpoint_every=2, **changes)
    return new_run(tmp_path / name, tiny_model_config(prepared.tokenizer.vocab_size), config, tiny_data_config,
                   prepared=prepared, progress=False, tensorboard=False)


def _poison(trainer):
    with torch.no_grad():
        next(trainer.model.parameters())[0, 0] = float("nan")


def test_divergence_stops_the_run_before_the_weights_or_a_checkpoint_turn_nan(tmp_path, prepared, tiny_data_config):
    trainer = _run(tmp_path, prepared, tiny_data_config, steps=8)
    poisoned = {}

    def at_step(t):
        if t.step == 3:  # a NaN in the embedding makes the next loss NaN
            poisoned["weights"] = [p.detach().clone() for p in t.model.parameters()]
            _poison(t)

    with pytest.raises(NonFiniteError, match=r"training diverged at step 4: loss nan.*The last good checkpoint is "
                                             r".*step-000002 \(step 2\)"):
        trainer.fit(on_step=at_step)
    assert trainer.step == 3  # the bad step was not counted or applied
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert records and all("NaN" not in line for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines())
    folders = sorted(p.name for p in (tmp_path / "run" / "checkpoints").glob("step-*"))
    assert folders == ["step-000002"]  # nothing written or rotated after the divergence
    resumed = resume_run(tmp_path / "run", progress=False, tensorboard=False)  # and it still loads, finite
    assert all(bool(torch.isfinite(p).all()) for p in resumed.model.parameters())


def test_a_non_finite_weight_is_never_written(tmp_path, prepared, tiny_data_config):
    trainer = _run(tmp_path, prepared, tiny_data_config)
    _poison(trainer)
    with pytest.raises(NonFiniteError, match="embed.weight holds NaN"):
        trainer.save()
    assert not (tmp_path / "run" / "checkpoints" / "latest.json").exists()


def test_metrics_with_a_nan_stay_standard_json(tmp_path):
    from moekit.train.metrics import MetricsLog

    log = MetricsLog(tmp_path, None, tensorboard=False)
    log.write({"step": 1, "loss": float("nan"), "routing_entropy": [0.5, float("inf")]})
    line = (tmp_path / "metrics.jsonl").read_text()
    assert json.loads(line, parse_constant=lambda name: pytest.fail(f"bare {name}")) == {
        "step": 1, "loss": None, "routing_entropy": [0.5, None]}


@pytest.fixture
def finished(tmp_path, prepared, tiny_data_config):
    trainer = _run(tmp_path, prepared, tiny_data_config)
    assert trainer.fit()
    return tmp_path / "run", latest_checkpoint(tmp_path / "run")


def _flip_bytes(path: Path, count=16) -> None:
    data = bytearray(path.read_bytes())
    for i in range(count):  # well inside the tensor data, past the header
        data[len(data) // 2 + 97 * i] ^= 0xFF
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.safetensors", "trainer_state.json"])
def test_a_changed_checkpoint_file_is_refused_by_name(finished, name):
    run, folder = finished
    target = folder / name
    if name.endswith(".json"):
        target.write_text(target.read_text().replace('"step": 4', '"step": 3'))
    else:
        _flip_bytes(target)
    with pytest.raises(CheckpointError, match=f"{name}' has changed since its checkpoint was written"):
        resume_run(run, progress=False, tensorboard=False)


@pytest.mark.parametrize("step,message", [(-5, "records step -5; expected a whole number >= 0"),
                                          (10**9, "is at step 1000000000, past this run's 4 steps")])
def test_an_impossible_step_is_refused(finished, step, message):
    run, folder = finished
    state = json.loads((folder / "trainer_state.json").read_text())
    (folder / "trainer_state.json").write_text(json.dumps(dict(state, step=step)))
    (folder / "checksums.json").unlink()  # as a run written before checksums would be
    with pytest.raises(CheckpointError, match=message):
        resume_run(run, progress=False, tensorboard=False)


def test_latest_json_pointing_outside_the_run_is_refused(finished):
    run, _ = finished
    (run / "checkpoints" / "latest.json").write_text(json.dumps({"step": 4, "folder": "../../elsewhere"}))
    with pytest.raises(CheckpointError, match="names '../../elsewhere', which is not a step folder of this run"):
        resume_run(run, progress=False, tensorboard=False)
    (run / "checkpoints" / "latest.json").write_text("{")
    with pytest.raises(CheckpointError, match="is not a checkpoint pointer"):
        resume_run(run, progress=False, tensorboard=False)


def test_an_optimizer_state_of_another_configuration_is_refused_at_load(finished, tmp_path, prepared,
                                                                       tiny_data_config):
    run, folder = finished
    other_config = tiny_model_config(prepared.tokenizer.vocab_size, experts=2)
    other = new_run(tmp_path / "other", other_config, tiny_train_config(steps=2, checkpoint_every=2),
                    tiny_data_config, prepared=prepared, progress=False, tensorboard=False)
    assert other.fit()
    shutil.copy(latest_checkpoint(tmp_path / "other") / "optimizer.safetensors", folder / "optimizer.safetensors")
    (folder / "checksums.json").unlink()
    with pytest.raises(CheckpointError, match="optimizer.safetensors.*written for another configuration"):
        resume_run(run, progress=False, tensorboard=False)


def test_a_nan_weight_in_a_checkpoint_is_refused(finished):
    from safetensors.torch import load_file, save_file

    run, folder = finished
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["norm_out.weight"][0] = float("nan")
    save_file(tensors, str(folder / "model.safetensors"))
    (folder / "checksums.json").unlink()
    with pytest.raises(CheckpointError, match="norm_out.weight holds NaN"):
        resume_run(run, progress=False, tensorboard=False)


def test_too_little_disk_space_is_named_before_writing(finished, monkeypatch):
    run, _ = finished
    trainer = resume_run(run, steps=6, progress=False, tensorboard=False)
    usage = shutil.disk_usage(run)
    monkeypatch.setattr(checkpoint_module.shutil, "disk_usage", lambda path: usage._replace(free=1000))
    with pytest.raises(CheckpointError, match=r"not enough disk space for the next checkpoint.*needs [0-9.]+ MiB, "
                                              r"0.0 MiB are free"):
        trainer.save()


def test_running_out_of_space_while_writing_is_named_and_leaves_no_temporary_file(finished, monkeypatch):
    run, _ = finished
    trainer = resume_run(run, steps=6, progress=False, tensorboard=False)

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoint_module, "save_file", full_disk)
    with pytest.raises(CheckpointError, match="no space left on the disk .* while writing optimizer.safetensors"):
        trainer.save()
    assert not list(run.rglob("*.tmp-*"))


def test_temporary_files_of_killed_writers_are_removed(finished):
    run, folder = finished
    dead_pid = 2**22 + 12345  # above the default pid_max: no process has it
    stale = folder / f".model.safetensors.tmp-{dead_pid}"
    stale.write_bytes(b"x" * 1000)
    live = folder / f".model.safetensors.tmp-{os.getpid()}"
    live.write_bytes(b"x")
    assert checkpoint_module.remove_stale_temporary_files(run / "checkpoints") == [stale]
    assert live.exists() and not stale.exists()


def test_resume_steps_below_the_run_names_the_option(finished):
    run, _ = finished
    with pytest.raises(ValueError, match=r"--resume-steps \(2\) cannot shorten the run below its 4 steps"):
        resume_run(run, steps=2, progress=False, tensorboard=False)
