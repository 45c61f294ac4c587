"""Every broken or truncated file of a run folder is named in a one-line error, no traceback."""

from __future__ import annotations

import json
import shutil

import pytest

from moekit.cli import main

TINY = ["--layers", "1", "--d-model", "32", "--heads", "2", "--d-ff", "64", "--context-length", "32",
        "--experts", "4", "--top-k", "2", "--batch-size", "4", "--vocab-size", "300", "--eval-every", "2",
        "--eval-batches", "1", "--checkpoint-every", "2"]
STEP = "checkpoints/step-000004"


@pytest.fixture(scope="module")
def trained(tmp_path_factory, corpus_dir):
    run = tmp_path_factory.mktemp("folder") / "run"
    assert main(["train", "--data", str(corpus_dir), "--out", str(run), "--steps", "4", *TINY]) == 0
    return run


def _edit_json(path, change):
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _truncate(path):
    path.write_bytes(path.read_bytes()[:1000])


CASES = {
    "config.json cut off": (lambda r: (r / "config.json").write_text("{"), "eval",
                            "config.json' is not valid JSON"),
    "unknown config key": (lambda r: _edit_json(r / "config.json", lambda d: d["model"].update(bogus=1)), "eval",
                           "unknown model setting(s) 'bogus'"),
    "unknown layer key": (lambda r: _edit_json(r / "config.json", lambda d: d["model"]["moe"].update(bogus=1)),
                          "eval", "MoEConfig got an unexpected keyword argument 'bogus'"),
    "tokenizer.json cut off": (lambda r: (r / "tokenizer.json").write_text("{"), "eval",
                               "tokenizer.json' is not valid JSON"),
    "latest.json cut off": (lambda r: (r / "checkpoints/latest.json").write_text("{"), "eval",
                            "latest.json' is not a checkpoint pointer"),
    "trainer state cut off": (lambda r: (r / STEP / "trainer_state.json").write_text("{"), "resume",
                              "trainer_state.json' is not valid JSON"),
    "trainer state without rng": (lambda r: _edit_json(r / STEP / "trainer_state.json", lambda d: d.pop("rng")),
                                  "resume", "trainer_state.json' lacks 'rng'"),
    "model file cut off": (lambda r: _truncate(r / STEP / "model.safetensors"), "eval",
                           "model.safetensors' does not load into this model"),
    "optimizer file cut off": (lambda r: _truncate(r / STEP / "optimizer.safetensors"), "resume",
                               "optimizer.safetensors' cannot be read as safetensors"),
    "state-dict size mismatch": (lambda r: _edit_json(r / "config.json",
                                                      lambda d: d["model"]["moe"].update(num_experts=2)),
                                 "eval", "size mismatch for blocks.0.ffn.router.weight"),
}


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("checksums", [True, False])
def test_a_broken_run_folder_file_is_named(trained, tmp_path, capsys, case, checksums):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    if not checksums:  # a run written before checksums existed: each loader names the problem itself
        (run / STEP / "checksums.json").unlink()
    mutate, command, message = CASES[case]
    mutate(run)
    argv = ["eval", str(run), "--batches", "1"] if command == "eval" else ["train", "--resume", str(run),
                                                                           "--resume-steps", "6"]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    in_checkpoint = STEP in message or any(name in message for name in ("model.safetensors", "optimizer", "trainer_state"))
    if checksums and in_checkpoint:
        assert "has changed since its checkpoint was written" in err, err
    else:
        assert message in err, err
    assert err.startswith(f"moekit {argv[0]}: error:")


def test_a_torn_last_metrics_line_is_dropped_on_resume(trained, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "lo')  # a writer killed mid-line
    assert main(["train", "--resume", str(run), "--resume-steps", "6"]) == 0
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 6
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "lo\n{"step": 8}\n')  # broken in the middle: named
    assert main(["report", str(run)]) == 2
    assert "metrics.jsonl' line" in capsys.readouterr().err
