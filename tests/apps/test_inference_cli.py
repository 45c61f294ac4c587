"""moekit quantize, generate/eval --max-memory and --trace, cache-sim: end to end on a tiny run."""

from __future__ import annotations

import json

import pytest

from moekit.cli import main
from moekit.inference.offload import process_rss_bytes

TINY = ["--layers", "2", "--d-model", "64", "--heads", "2", "--d-ff", "128", "--context-length", "32",
        "--experts", "4", "--top-k", "2", "--batch-size", "4", "--vocab-size", "300", "--eval-every", "3",
        "--eval-batches", "2", "--log-every", "1"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, corpus_dir):
    folder = tmp_path_factory.mktemp("inference") / "run"
    assert main(["train", "--data", str(corpus_dir), "--out", str(folder), "--steps", "4", *TINY]) == 0
    return folder


def _generate(capsys, *args) -> tuple[str, str]:
    capsys.readouterr()
    assert main(["generate", *args, "--prompt", "def ", "--max-new-tokens", "16", "--temperature", "0",
                 "--ignore-eot"]) == 0
    captured = capsys.readouterr()
    return captured.out, captured.err


def test_quantize_writes_a_run_that_eval_and_generate_load(run, tmp_path, capsys):
    for bits in (8, 4):
        out = tmp_path / f"int{bits}"
        assert main(["quantize", str(run), "--bits", str(bits), "--group-size", "32", "--out", str(out),
                     "--batches", "2", "--batch-size", "4"]) == 0
        report = json.loads((out / "coverage.json").read_text())
        assert report["bits"] == bits and abs(report["loss_change"]) < (0.003 if bits == 8 else 0.02)
        counts = report["coverage"]["tokens_per_expert"]
        assert set(counts) == {"blocks.0.ffn", "blocks.1.ffn"} and sum(counts["blocks.0.ffn"]) == 2 * 4 * 32 * 2
        assert report["model_mib_quantized"] < report["model_mib_float"]
        assert (out / "checkpoints" / "step-000004" / "checksums.json").exists()
        assert "expert coverage" in capsys.readouterr().err
        assert main(["eval", str(out), "--batches", "2", "--batch-size", "4"]) == 0
        result = json.loads(capsys.readouterr().out)
        assert result["val_loss"] == pytest.approx(report["val_loss_quantized"], abs=1e-6)
        text, _ = _generate(capsys, str(out))
        assert text.startswith("def ")
    assert main(["quantize", str(run), "--bits", "4", "--group-size", "48", "--out", str(tmp_path / "bad")]) == 2
    assert "group_size must be one of 32, 64, 128, 256" in capsys.readouterr().err


def test_generate_with_max_memory_gives_the_resident_text_and_a_trace_for_cache_sim(run, tmp_path, capsys):
    resident, _ = _generate(capsys, str(run))
    budget = str(process_rss_bytes() + (96 << 20))  # this test process is already large: its memory counts
    trace = tmp_path / "trace.json"
    offloaded, err = _generate(capsys, str(run), "--max-memory", budget, "--cache-policy", "lfu", "--trace", str(trace),
                               "--prefetch")
    assert offloaded == resident
    assert "offloading: 4 of 4 experts cached per layer" in err and "cache_hit_rate" in err
    assert main(["cache-sim", str(trace), "--sizes", "1,2,4"]) == 0
    table = capsys.readouterr().out
    assert "lru" in table and "optimal" in table and len(table.strip().splitlines()) == 5

    assert main(["eval", str(run), "--batches", "2", "--batch-size", "4", "--max-memory", budget, "--no-prefetch"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert main(["eval", str(run), "--batches", "2", "--batch-size", "4"]) == 0
    assert result["val_loss"] == pytest.approx(json.loads(capsys.readouterr().out)["val_loss"], abs=1e-6)
    assert result["prefetches"] == 0 and 0 < result["peak_rss_mib"]


@pytest.mark.parametrize("size,message", [
    ("1MB", "is below the non-expert weights"),
    ("lots", "'lots' is not a number"),
])
def test_bad_max_memory_is_a_one_line_error(run, capsys, size, message):
    assert main(["generate", str(run), "--max-memory", size, "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


@pytest.mark.parametrize("command,words", [
    (["quantize"], ["RUN_DIR", "--bits", "--group-size", "--out"]),
    (["cache-sim"], ["TRACE", "--sizes"]),
    (["generate"], ["--max-memory", "--cache-policy", "--no-prefetch", "--trace"]),
    (["eval"], ["--max-memory", "--cache-policy", "--no-prefetch"]),
])
def test_inference_options_are_in_the_help(command, words, capsys):
    with pytest.raises(SystemExit):
        main([*command, "--help"])
    text = capsys.readouterr().out
    assert all(word in text for word in words)


def test_an_error_during_generation_starts_on_its_own_line(run, capsys, monkeypatch):
    from moekit.models.lm import LanguageModel

    def failing(self, idx, *args, **kwargs):
        yield idx[:, -1:]
        raise ValueError("the model broke")

    monkeypatch.setattr(LanguageModel, "generate", failing)
    assert main(["generate", str(run), "--prompt", "def ", "--max-new-tokens", "4", "--ignore-eot"]) == 2
    captured = capsys.readouterr()
    assert captured.out.startswith("def ") and captured.out.endswith("\n")
    assert "moekit generate: error: the model broke" in captured.err


def test_a_changed_checkpoint_is_refused_when_offloading_too(run, tmp_path, capsys):
    import shutil

    copy = tmp_path / "run"
    shutil.copytree(run, copy)
    weights = copy / "checkpoints" / "step-000004" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2] ^= 0xFF
    weights.write_bytes(bytes(data))
    budget = str(process_rss_bytes() + (96 << 20))
    assert main(["generate", str(copy), "--max-memory", budget, "--max-new-tokens", "2"]) == 2
    assert "model.safetensors' has changed since its checkpoint was written" in capsys.readouterr().err
