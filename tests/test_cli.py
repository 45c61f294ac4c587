import json
import sys
from pathlib import Path

import pytest

from moekit.cli import main

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lm_fixtures  # noqa: E402

# Fixtures shared with tests/{models,data,train,analysis}.
corpus_dir = lm_fixtures.corpus_dir
one_torch_thread = lm_fixtures._one_torch_thread

TINY = ["--layers", "1", "--d-model", "32", "--heads", "2", "--d-ff", "64", "--context-length", "32",
        "--experts", "4", "--top-k", "2", "--batch-size", "4", "--vocab-size", "300", "--eval-every", "3",
        "--eval-batches", "2", "--log-every", "1"]


@pytest.mark.parametrize("command", [[], ["train"], ["eval"], ["generate"], ["report"], ["demo"], ["finetune"]])
def test_every_help_is_complete(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([*command, "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    expected = {
        (): ["train", "eval", "generate", "report", "demo", "finetune"],
        ("train",): ["--data", "--resume", "--experts", "--top-k", "--router", "--steps", "--bf16", "--seed", "--lr"],
        ("eval",): ["RUN_DIR", "--batches"],
        ("generate",): ["--prompt", "--temperature", "--top-k", "--top-p", "--max-new-tokens"],
        ("report",): ["RUN_DIR", "--baseline"],
        ("demo",): ["--seeds", "--out", "--steps", "--finetune-steps"],
        ("finetune",): ["SOURCE", "--method", "--rank", "--targets", "--data", "--merge", "--context-length"],
    }[tuple(command)]
    for word in expected:
        assert word in text, word


def test_train_generate_eval_and_resume(tmp_path, corpus_dir, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", str(corpus_dir), "--out", str(run), "--steps", "6", *TINY]) == 0
    metrics = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    final_val = [r["val_loss"] for r in metrics if "val_loss" in r][-1]
    capsys.readouterr()

    assert main(["generate", str(run), "--prompt", "def ", "--max-new-tokens", "12", "--ignore-eot"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("def ") and len(text) > len("def \n")

    # The same validation windows as in training give the same loss.
    assert main(["eval", str(run), "--batches", "2", "--batch-size", "4"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["step"] == 6 and result["val_loss"] == pytest.approx(final_val, abs=1e-6)

    assert main(["report", str(run)]) == 0
    page = (run / "report" / "index.html").read_text()
    assert "specialisation_moe.png" in page and "Sample generations" in page

    assert main(["train", "--resume", str(run), "--resume-steps", "8"]) == 0
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))

    assert main(["train", "--data", str(corpus_dir), "--out", str(run), "--steps", "6", *TINY]) == 2
    assert "already holds a run" in capsys.readouterr().err


@pytest.mark.parametrize(
    "make_data, message",
    [
        (lambda tmp: tmp / "missing", "does not exist"),
        (lambda tmp: (tmp / "empty").mkdir() or tmp / "empty", "holds no text files"),
        (lambda tmp: (tmp / "blob.txt").write_bytes(b"\x00\x01\x02" * 100) and tmp / "blob.txt", "looks binary"),
    ],
    ids=["missing", "empty-folder", "binary"],
)
def test_bad_data_gets_a_one_line_error(tmp_path, capsys, make_data, message):
    path = make_data(tmp_path)
    assert main(["train", "--data", str(path), "--out", str(tmp_path / "run"), *TINY]) == 2
    err = capsys.readouterr().err
    assert message in err and str(path) in err and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("router", ["expert_choice", "soft"])
def test_non_causal_router_is_refused(tmp_path, capsys, corpus_dir, router):
    assert main(["train", "--data", str(corpus_dir), "--out", str(tmp_path / "r"), *TINY, "--router", router]) == 2
    assert f"--router '{router}' is not causal" in capsys.readouterr().err


def test_demo_trains_both_models_for_each_seed_and_writes_the_report(tmp_path, corpus_dir, capsys):
    out = tmp_path / "demo"
    args = ["demo", "--data", str(corpus_dir), "--out", str(out), "--steps", "3", "--seeds", "2", *TINY,
            "--finetune-steps", "2", "--finetune-data", str(corpus_dir)]
    assert main(args) == 0
    demo = json.loads((out / "demo.json").read_text())
    assert [c["seed"] for c in demo["comparisons"]] == [0, 1]
    assert demo["seeds"]["summary"]["seeds"] == 2
    assert (out / "report" / "index.html").exists()
    for name in ("moe-seed0", "dense-seed0", "moe-seed1", "dense-seed1"):
        assert (out / name / "checkpoints" / "latest.json").exists()
    page = (out / "report" / "index.html").read_text()
    assert "Run-to-run spread" in page
    labels = [r["label"] for r in demo["finetune"]["rows"]]
    assert labels == ["MoE, frozen", "MoE, LoRA r=8", "MoE, LoRA r=32", "MoE, full", "dense, frozen",
                      "dense, MixLoRA E=8 K=2 r=8"]
    assert "Fine-tuning</h2>" in page and "MixLoRA" in page
    capsys.readouterr()
    assert main(args) == 0  # a second run reuses the trained models
    assert capsys.readouterr().err.count("already trained") == 4


def test_bench_on_cuda_without_a_gpu_says_so(tmp_path, capsys, monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["bench", "--device", "cuda", "--json", str(tmp_path / "b.json")]) == 2
    assert "no CUDA device" in capsys.readouterr().err
    assert not (tmp_path / "b.json").exists()


def test_gpu_cases_put_the_scaled_shape_first_and_leave_out_batched_mm():
    from moekit.apps.bench import SCALED, default_cases

    cases = default_cases(("bfloat16",), device="cuda")
    assert [c.name for c in cases[:2]] == ["scaled uniform", "scaled skewed"]
    assert (cases[0].tokens, cases[0].d_model, cases[0].d_ff) == (SCALED["tokens"], 2048, 4096)
    assert all(c.device == "cuda" and c.dtype == "bfloat16" and c.paths == ("grouped_mm",) for c in cases)
    assert not any("batched_mm" in p for c in cases for p in c.peers)
    cpu = default_cases()
    assert all(c.device == "cpu" and "scaled" not in c.name for c in cpu)
    assert "mixtral:batched_mm" in cpu[0].peers


def test_a_diverging_run_exits_with_a_named_error_and_keeps_its_last_good_checkpoint(tmp_path, corpus_dir, capsys):
    run = tmp_path / "run"
    code = main(["train", "--data", str(corpus_dir), "--out", str(run), "--steps", "40", "--lr", "100",
                 "--grad-clip", "0", *TINY, "--checkpoint-every", "2"])
    err = capsys.readouterr().err
    assert code == 2
    assert "moekit train: error: training diverged at step" in err and "The last good checkpoint is" in err
    assert "Traceback" not in err
    for line in (run / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=lambda name: pytest.fail(f"bare {name} in metrics.jsonl"))
    assert main(["eval", str(run), "--batches", "1", "--batch-size", "2"]) == 0  # the kept checkpoint is finite
    assert json.loads(capsys.readouterr().out)["val_loss"] < 1e3


def test_version_and_a_missing_gpu_are_answered_before_any_work(capsys, tmp_path):
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.startswith("moekit 0.")
    if not __import__("torch").cuda.is_available():
        assert main(["demo", "--device", "cuda", "--out", str(tmp_path / "demo")]) == 2
        assert "no CUDA device" in capsys.readouterr().err
        assert not (tmp_path / "demo").exists()  # nothing trained, not even the tokenizer


def test_eval_and_generate_on_a_demo_folder_point_to_its_runs(tmp_path, capsys):
    demo = tmp_path / "demo"
    (demo / "moe-seed0").mkdir(parents=True)
    (demo / "moe-seed0" / "config.json").write_text("{}")
    (demo / "demo.json").write_text("{}")
    for command in (["eval", str(demo)], ["generate", str(demo)]):
        assert main(command) == 2
        assert f"is a demo folder; pass one of its runs: {demo / 'moe-seed0'}" in capsys.readouterr().err


def test_bench_names_an_allocation_it_could_not_make_in_one_short_line():
    from moekit.apps.bench import failure_reason

    error = RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: "
                         "you tried to allocate 34359738368 bytes. Error code 12 (Cannot allocate memory)")
    assert failure_reason(error) == "out of memory: it asks for 32.0 GiB at once"


def test_ctrl_c_during_a_command_is_one_line_and_exit_130(monkeypatch, capsys):
    import moekit.apps.commands as commands

    def interrupted(args):
        raise KeyboardInterrupt

    monkeypatch.setattr(commands, "cmd_eval", interrupted)
    assert main(["eval", "somewhere"]) == 130
    err = capsys.readouterr().err
    assert "moekit eval: interrupted" in err and "Traceback" not in err


def test_threads_are_recorded_with_the_run_and_reused(tmp_path, corpus_dir, capsys):
    import torch

    run = tmp_path / "run"
    try:
        assert main(["train", "--data", str(corpus_dir), "--out", str(run), "--steps", "2", *TINY,
                     "--threads", "2"]) == 0
        assert json.loads((run / "config.json").read_text())["runtime"]["threads"] == 2
        torch.set_num_threads(1)
        assert main(["eval", str(run), "--batches", "1", "--batch-size", "2"]) == 0
        assert torch.get_num_threads() == 2  # the run's count, not torch's default
        torch.set_num_threads(1)
        assert main(["train", "--resume", str(run), "--resume-steps", "3"]) == 0
        assert torch.get_num_threads() == 2
        assert main(["generate", str(run), "--max-new-tokens", "2", "--threads", "1"]) == 0
        assert torch.get_num_threads() == 1  # given explicitly
    finally:
        torch.set_num_threads(1)


def test_the_default_thread_count_leaves_busy_cores_alone(monkeypatch):
    import moekit.apps.common as common

    monkeypatch.setattr(common.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    monkeypatch.setattr(common.os, "cpu_count", lambda: 4)
    for idle_share, expected in ((1.0, 4), (0.5, 2), (0.3, 1), (0.0, 1)):
        monkeypatch.setattr(common, "_idle_share", lambda window, share=idle_share: share)
        assert common.default_threads() == expected


def test_hash_routing_trains_on_the_tokenizer_vocabulary_without_a_top_k(tmp_path, corpus_dir, capsys):
    run = tmp_path / "run"
    assert main(["train", "--data", str(corpus_dir), "--out", str(run), "--steps", "2", *TINY, "--router", "hash"]) == 0
    moe = json.loads((run / "config.json").read_text())["model"]["moe"]
    assert moe["router_options"]["vocab_size"] == 300 and moe["top_k"] == 1
    assert main(["generate", str(run), "--max-new-tokens", "3"]) == 0


def test_train_accumulates_micro_batches_and_names_a_split_that_does_not_divide(tmp_path, capsys, corpus_dir):
    run = tmp_path / "acc"
    assert main(["train", "--data", str(corpus_dir), "--out", str(run), "--steps", "2", *TINY,
                 "--batch-size", "4", "--grad-accumulation", "2"]) == 0
    assert json.loads((run / "config.json").read_text())["train"]["grad_accumulation"] == 2
    capsys.readouterr()
    assert main(["train", "--data", str(corpus_dir), "--out", str(tmp_path / "bad"), *TINY,
                 "--batch-size", "4", "--grad-accumulation", "3"]) == 2
    err = capsys.readouterr().err
    assert "batch_size (4) must be divisible by grad_accumulation (3)" in err and len(err.strip().splitlines()) == 1


def test_demo_multitask_trains_every_model_per_correlation_and_seed_and_writes_its_report(tmp_path, capsys):
    out = tmp_path / "multitask"
    assert main(["demo", "multitask", "--steps", "3", "--seeds", "2", "--out", str(out)]) == 0
    results = json.loads((out / "report" / "results.json").read_text())
    runs = {(r["correlation"], r["seed"], r["model"]) for r in results["sweep"]}
    assert len(runs) == 4 * 2 * 4
    assert set(results["recommendation"]["models"]) == {"shared-bottom", "OMoE", "MMoE", "PLE"}
    assert set(results["recommendation"]["gates"]["PLE"]) == {"layer0/task0", "layer0/task1"}
    page = (out / "report" / "index.html").read_text()
    assert "correlation_sweep.png" in page and "gates.png" in page
    assert "held-out MSE" in capsys.readouterr().err


def test_demo_timeseries_forecasts_each_seed_and_writes_its_report(tmp_path, capsys):
    out = tmp_path / "timeseries"
    assert main(["demo", "timeseries", "--seeds", "1", "--out", str(out)]) == 0
    runs = json.loads((out / "report" / "results.json").read_text())["runs"]
    assert [r["seed"] for r in runs] == [0]
    assert runs[0]["mse"]["oracle"] < runs[0]["mse"]["mixture"]
    assert "regimes.png" in (out / "report" / "index.html").read_text()
    assert "one-step forecasts" in capsys.readouterr().err


def test_demo_vision_trains_the_three_models_and_writes_its_report(tmp_path, capsys):
    out = tmp_path / "vision"
    assert main(["demo", "vision", "--steps", "4", "--seeds", "1", "--out", str(out)]) == 0
    results = json.loads((out / "report" / "results.json").read_text())
    assert [r["model"] for r in results["runs"]] == ["dense", "V-MoE", "Soft MoE"]
    assert len(results["classes_per_expert"]) == 10 and len(results["capacity"]["batch_priority"]) == 6
    assert "experts.png" in (out / "report" / "index.html").read_text()
    assert "V-MoE, capacity shrunk" in capsys.readouterr().err


def test_shared_experts_reach_the_model_config():
    from moekit.apps.common import configs_from_args
    from moekit.cli import build_parser

    args = build_parser().parse_args(["train", "--experts", "16", "--top-k", "3", "--expert-d-ff", "64",
                                      "--shared-experts", "1", "--shared-d-ff", "32"])
    model_config, _ = configs_from_args(args, vocab_size=300)
    assert model_config.moe.num_shared_experts == 1 and model_config.moe.shared_d_ff == 32
    assert model_config.moe.top_k == 3 and model_config.moe.d_ff == 64


def test_the_demo_skips_its_fine_tuning_comparison_when_the_held_out_text_is_missing(tmp_path, corpus_dir, capsys):
    out = tmp_path / "demo"
    args = ["demo", "--data", str(corpus_dir), "--out", str(out), "--steps", "2", *TINY,
            "--finetune-steps", "2", "--finetune-data", str(tmp_path / "no-such-text")]
    assert main(args) == 0
    assert "fine-tuning comparison skipped: --data path" in capsys.readouterr().err
    assert json.loads((out / "demo.json").read_text())["finetune"] is None
