"""moekit upcycle / grow / prune and train --stage / --init-from, end to end on tiny settings."""

import json
import sys
from pathlib import Path

import pytest
import torch

from moekit.cli import main

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import lm_fixtures  # noqa: E402

corpus_dir = lm_fixtures.corpus_dir
one_torch_thread = lm_fixtures._one_torch_thread

TINY = ["--layers", "1", "--d-model", "32", "--heads", "2", "--d-ff", "64", "--context-length", "32",
        "--top-k", "2", "--batch-size", "4", "--vocab-size", "300", "--eval-every", "3",
        "--eval-batches", "2", "--log-every", "1"]
SURGERY = ["--steps", "6", "--eval-batches", "2", "--batch-size", "4"]


@pytest.fixture
def text_dir(tmp_path):
    """A second corpus: English prose written here, nothing like Python source."""
    folder = tmp_path / "prose"
    folder.mkdir()
    words = "the river ran past old mills and quiet farms while evening light fell on the water".split()
    generator = torch.Generator().manual_seed(0)
    for i in range(6):
        picks = torch.randint(len(words), (1500,), generator=generator).tolist()
        (folder / f"story{i}.txt").write_text(" ".join(words[j] for j in picks) + ".\n")
    return folder


def _report(capsys) -> dict:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def _metrics(run):
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def test_upcycle_a_dense_run_and_train_on(tmp_path, corpus_dir, capsys):
    dense, up = tmp_path / "dense", tmp_path / "up"
    assert main(["train", "--data", str(corpus_dir), "--out", str(dense), "--steps", "6", "--experts", "0", *TINY]) == 0
    capsys.readouterr()
    assert main(["upcycle", str(dense), "--experts", "4", "--out", str(up), *SURGERY]) == 0
    report = _report(capsys)
    assert report["experts_before"] == 0 and report["experts_after"] == 4
    assert abs(report["val_loss_change"]) < 1e-5
    assert main(["eval", str(up), "--batches", "2", "--batch-size", "4"]) == 0
    assert _report(capsys)["step"] == 0
    assert main(["train", "--resume", str(up)]) == 0
    assert [r["step"] for r in _metrics(up)] == list(range(1, 7))
    assert len(_metrics(up)[-1]["load"][0]) == 4

    assert main(["upcycle", str(up), "--experts", "4", "--out", str(tmp_path / "again"), *SURGERY]) == 2
    assert "already an MoE model" in capsys.readouterr().err
    assert main(["upcycle", str(dense), "--experts", "4", "--out", str(up), *SURGERY]) == 2
    assert "already holds a run" in capsys.readouterr().err


def test_grow_on_new_data_with_frozen_old_experts(tmp_path, corpus_dir, text_dir, capsys):
    base, grown = tmp_path / "base", tmp_path / "grown"
    assert main(["train", "--data", str(corpus_dir), "--out", str(base), "--steps", "6", "--experts", "4", *TINY]) == 0
    capsys.readouterr()
    assert main(["grow", str(base), "--add", "2", "--freeze-old", "--data", str(text_dir), "--out", str(grown),
                 *SURGERY]) == 0
    report = _report(capsys)
    assert report["experts_after"] == 6 and report["val_loss_change"] == pytest.approx(0, abs=1e-5)
    config = json.loads((grown / "config.json").read_text())
    assert config["train"]["freeze_old_experts"] == 4 and config["data"]["data"] == str(text_dir)
    # The grown run trains on the prose with the base run's tokenizer.
    assert (grown / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()
    assert main(["train", "--resume", str(grown)]) == 0
    assert main(["eval", str(grown), "--data-of", str(base), "--batches", "2", "--batch-size", "4"]) == 0
    on_old_data = _report(capsys)
    assert on_old_data["data_of"] == str(base) and on_old_data["step"] == 6


@pytest.mark.parametrize("by", ["load", "similarity"])
def test_prune_reports_the_loss_change(tmp_path, corpus_dir, capsys, by):
    base, pruned = tmp_path / "base", tmp_path / "pruned"
    assert main(["train", "--data", str(corpus_dir), "--out", str(base), "--steps", "6", "--experts", "4", *TINY]) == 0
    capsys.readouterr()
    assert main(["prune", str(base), "--remove", "2", "--by", by, "--out", str(pruned), *SURGERY]) == 0
    report = _report(capsys)
    assert report["experts_after"] == 2 and report["by"] == by
    assert report["val_loss_change"] == pytest.approx(report["val_loss_after"] - report["val_loss_before"])
    assert main(["eval", str(pruned), "--batches", str(2), "--batch-size", "4"]) == 0
    assert _report(capsys)["val_loss"] == pytest.approx(report["val_loss_after"], abs=1e-6)
    assert main(["prune", str(base), "--remove", "4", "--out", str(tmp_path / "p2"), *SURGERY]) == 2
    assert "num_remove (4)" in capsys.readouterr().err


def test_two_stage_training_from_the_command_line(tmp_path, corpus_dir, capsys):
    experts, gate = tmp_path / "experts", tmp_path / "gate"
    assert main(["train", "--stage", "experts", "--data", str(corpus_dir), "--out", str(experts), "--steps", "6",
                 "--experts", "4", *TINY]) == 0
    assert main(["train", "--stage", "gate", "--data", str(corpus_dir), "--out", str(tmp_path / "x"), "--steps", "6",
                 *TINY]) == 2
    assert "--init-from" in capsys.readouterr().err
    assert main(["train", "--stage", "gate", "--init-from", str(experts), "--out", str(gate), "--steps", "6",
                 *TINY]) == 0
    config = json.loads((gate / "config.json").read_text())
    assert config["train"]["stage"] == "gate"
    assert config["model"] == json.loads((experts / "config.json").read_text())["model"]
    assert [r["step"] for r in _metrics(gate)] == list(range(1, 7))


@pytest.mark.parametrize("command, words", [
    ("upcycle", ["RUN_DIR", "--experts", "--top-k", "--out", "--steps", "--perturb"]),
    ("grow", ["RUN_DIR", "--add", "--freeze-old", "--data", "--out", "--margin"]),
    ("prune", ["RUN_DIR", "--remove", "--by", "--out"]),
    ("train", ["--stage", "--init-from"]),
    ("eval", ["--data-of"]),
])
def test_surgery_help_is_complete(command, words, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for word in words:
        assert word in text, word
