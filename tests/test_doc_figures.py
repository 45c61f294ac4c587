"""Figures quoted in docs come from the script named beside them: the page's tables are
what the recorded results give, and (``slow``, ``make test-all``) the script still gives
those results."""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _benchmark(name: str):
    """benchmarks/NAME.py as a module (its folder on the path, for its shared helpers)."""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
        script = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(script)
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    return script


def _page_tables(page: Path, source: str) -> dict[str, str]:
    pattern = rf"<!-- figures: {source} (\w+) -->\n(.*?)\n<!-- /figures -->"
    return {m.group(1): m.group(2) for m in re.finditer(pattern, page.read_text(), re.S)}


def test_docs_surgery_quotes_the_recorded_results():
    script = _benchmark("surgery")
    expected = script.markdown_tables(json.loads(script.FIGURES.read_text()))
    quoted = _page_tables(ROOT / "docs" / "surgery.md", "surgery")
    assert quoted.keys() == expected.keys()
    for name, table in expected.items():
        assert quoted[name] == table, f"docs/surgery.md's {name} table differs from docs/figures/surgery.json"


@pytest.mark.slow
def test_the_surgery_script_still_gives_the_recorded_results(tmp_path):
    out = tmp_path / "surgery"
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "surgery.py"), "--out", str(out)], check=True,
                   capture_output=True, cwd=ROOT)
    fresh = json.loads((out / "surgery.json").read_text())
    recorded = json.loads(_benchmark("surgery").FIGURES.read_text())

    def numbers(value):
        if isinstance(value, dict):
            return [n for key in sorted(value) if key not in ("settings", "seconds") for n in numbers(value[key])]
        if isinstance(value, list):
            return [n for item in value for n in numbers(item)]
        return [value] if isinstance(value, int | float) else []

    mine, theirs = numbers(fresh), numbers(recorded)
    assert len(mine) == len(theirs)
    drifted = [(a, b) for a, b in zip(mine, theirs, strict=True) if abs(a - b) > 5e-4]
    assert not drifted, f"benchmarks/surgery.py no longer gives docs/figures/surgery.json: {drifted[:5]}"


def _demo_sentence(figures: dict) -> str:
    return (f"MoE {figures['moe_val_loss']:.4f} against dense {figures['dense_val_loss']:.4f}, MoE reaching "
            f"dense's final loss at step {figures['moe_steps_to_dense_loss']}")


def test_docs_lm_quotes_the_recorded_demo():
    figures = json.loads((ROOT / "docs" / "figures" / "demo.json").read_text())
    quoted = re.search(r"<!-- figures: demo seed0 -->(.*?)<!-- /figures -->", (ROOT / "docs" / "lm.md").read_text(),
                       re.S).group(1)
    assert " ".join(quoted.split()) == _demo_sentence(figures)


@pytest.fixture(scope="module")
def fresh_demo(tmp_path_factory) -> Path:
    """``moekit demo`` as ``make demo`` runs it, once for the slow checks that need it."""
    out = tmp_path_factory.mktemp("demo") / "demo"
    subprocess.run([sys.executable, "-m", "moekit", "demo", "--threads", "1", "--out", str(out)],
                   check=True, capture_output=True, cwd=ROOT)
    return out


@pytest.mark.slow
def test_the_demo_still_gives_the_recorded_figures(fresh_demo):
    fresh = json.loads((fresh_demo / "demo.json").read_text())["comparisons"][0]
    recorded = json.loads((ROOT / "docs" / "figures" / "demo.json").read_text())
    for key in ("moe_val_loss", "dense_val_loss"):
        assert abs(fresh[key] - recorded[key]) < 5e-4, (key, fresh[key], recorded[key])
    assert fresh["moe_steps_to_dense_loss"] == recorded["moe_steps_to_dense_loss"]


def test_docs_finetune_quotes_the_recorded_fine_tuning_demo():
    script = _benchmark("finetune_demo")
    expected = script.markdown_table(json.loads(script.FIGURES.read_text()))
    assert _page_tables(ROOT / "docs" / "finetune.md", "finetune") == {"table": expected}


@pytest.mark.slow
def test_the_demo_still_gives_the_recorded_fine_tuning_losses(fresh_demo):
    fresh = _benchmark("finetune_demo").figures_of(fresh_demo)
    recorded = json.loads(_benchmark("finetune_demo").FIGURES.read_text())
    for mine, theirs in zip(fresh["rows"], recorded["rows"], strict=True):
        assert mine["label"] == theirs["label"] and mine["trainable_parameters"] == theirs["trainable_parameters"]
        assert abs(mine["val_loss"] - theirs["val_loss"]) < 5e-4, (mine, theirs)
        assert mine["memory_mib"] == theirs["memory_mib"]


def _multitask_tables(results: dict) -> dict[str, str]:
    from moekit.analysis.multitask import recommendation_table, sweep_table

    return {"sweep": sweep_table(results["summary"]), "recommendation": recommendation_table(results["recommendation"])}


def _fresh_application_results(kind: str, tmp_path) -> dict:
    """``moekit demo KIND`` run now, its results.json."""
    subprocess.run([sys.executable, "-m", "moekit", "demo", kind, "--out", str(tmp_path / kind)], check=True,
                   capture_output=True, cwd=ROOT)
    return json.loads((tmp_path / kind / "report" / "results.json").read_text())


def test_docs_multitask_quotes_the_recorded_demo():
    recorded = json.loads((ROOT / "docs" / "figures" / "multitask.json").read_text())
    assert _page_tables(ROOT / "docs" / "multitask.md", "multitask") == _multitask_tables(recorded)


@pytest.mark.slow
def test_the_multitask_demo_still_gives_the_recorded_figures(tmp_path):
    fresh = _fresh_application_results("multitask", tmp_path)
    recorded = json.loads((ROOT / "docs" / "figures" / "multitask.json").read_text())
    for mine, theirs in zip(fresh["summary"], recorded["summary"], strict=True):
        assert mine["model"] == theirs["model"] and abs(mine["median"] - theirs["median"]) < 1e-3, (mine, theirs)
    for name, aucs in recorded["recommendation"]["models"].items():
        for task, value in aucs.items():
            assert abs(fresh["recommendation"]["models"][name][task] - value) < 1e-3, (name, task)


def test_docs_timeseries_quotes_the_recorded_demo():
    from moekit.analysis.timeseries import summary_table

    recorded = json.loads((ROOT / "docs" / "figures" / "timeseries.json").read_text())
    assert _page_tables(ROOT / "docs" / "timeseries.md", "timeseries") == {"forecasts": summary_table(recorded["runs"])}


@pytest.mark.slow
def test_the_timeseries_demo_still_gives_the_recorded_figures(tmp_path):
    fresh = _fresh_application_results("timeseries", tmp_path)["runs"]
    recorded = json.loads((ROOT / "docs" / "figures" / "timeseries.json").read_text())["runs"]
    for mine, theirs in zip(fresh, recorded, strict=True):
        for name, value in theirs["mse"].items():
            assert abs(mine["mse"][name] - value) < 1e-4, (name, mine["mse"][name], value)


def test_docs_vision_quotes_the_recorded_demo():
    from moekit.analysis.vision import accuracy_table, capacity_table

    recorded = json.loads((ROOT / "docs" / "figures" / "vision.json").read_text())
    assert _page_tables(ROOT / "docs" / "vision.md", "vision") == {"accuracy": accuracy_table(recorded),
                                                                  "capacity": capacity_table(recorded)}


@pytest.mark.slow
def test_the_vision_demo_still_gives_the_recorded_figures(tmp_path):
    fresh = _fresh_application_results("vision", tmp_path)
    recorded = json.loads((ROOT / "docs" / "figures" / "vision.json").read_text())
    for mine, theirs in zip(fresh["runs"], recorded["runs"], strict=True):
        assert mine["model"] == theirs["model"] and abs(mine["accuracy"] - theirs["accuracy"]) < 5e-3, (mine, theirs)


def test_docs_lm_quotes_the_recorded_ablation():
    script = _benchmark("lm_ablation")
    expected = script.markdown_table(json.loads(script.FIGURES.read_text()))
    assert _page_tables(ROOT / "docs" / "lm.md", "lm_ablation") == {"table": expected}


def test_docs_distributed_quotes_the_recorded_memory():
    script = _benchmark("fsdp_memory")
    expected = script.markdown_table(json.loads(script.FIGURES.read_text()))
    assert _page_tables(ROOT / "docs" / "distributed.md", "fsdp_memory") == {"table": expected}


@pytest.mark.slow
def test_the_memory_script_still_gives_the_recorded_bytes(tmp_path):
    subprocess.run([sys.executable, str(ROOT / "benchmarks" / "fsdp_memory.py"), "--out", str(tmp_path / "m.json")],
                   check=True, capture_output=True, cwd=ROOT)
    assert json.loads((tmp_path / "m.json").read_text()) == json.loads(_benchmark("fsdp_memory").FIGURES.read_text())


def test_docs_distributed_quotes_the_recorded_planner_check():
    script = _benchmark("planner_check")
    expected = script.markdown_tables(json.loads(script.FIGURES.read_text()))
    assert _page_tables(ROOT / "docs" / "distributed.md", "planner") == {"tables": expected}
