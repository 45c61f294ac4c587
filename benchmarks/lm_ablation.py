"""The language-model demo's MoE, varied one choice at a time, against its dense model.

Every row is one ``moekit train`` command with the demo's settings (4 blocks, d_model 64,
context 128, 800 steps of 16 sequences, lr 5·10⁻³, the embedded corpus, seed 0) and the
row's MoE flags, at the dense model's active parameters per token (the routed experts'
widths times top-k, plus any shared expert, equal the dense MLP width 256). For each row:
the final validation loss, the step at which the MoE first reaches the dense model's
final validation loss (evaluated every 40 steps) and that step over the dense model's
800, and the median step time over the dense model's.

    .venv/bin/python benchmarks/lm_ablation.py --out runs/ablation          # trains every row (about 3 min each)
    .venv/bin/python benchmarks/lm_ablation.py --out runs/ablation --write  # and records docs/figures/lm_ablation.json

Runs already in --out are reused.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
FIGURES = ROOT / "docs" / "figures" / "lm_ablation.json"
COMMON = ["--layers", "4", "--d-model", "64", "--heads", "4", "--d-ff", "256", "--steps", "800", "--lr", "5e-3",
          "--eval-every", "40", "--vocab-size", "2048", "--threads", "1", "--seed", "0"]
ROWS = {
    "dense": ["--experts", "0"],
    "demo MoE: E=8, K=2, width 128": ["--experts", "8", "--top-k", "2", "--expert-d-ff", "128"],
    "finer: E=16, K=4, width 64": ["--experts", "16", "--top-k", "4", "--expert-d-ff", "64"],
    "finest: E=32, K=8, width 32": ["--experts", "32", "--top-k", "8", "--expert-d-ff", "32"],
    "shared expert: E=16, K=3 + 1 shared, width 64": ["--experts", "16", "--top-k", "3", "--expert-d-ff", "64",
                                                      "--shared-experts", "1"],
    "sigmoid gate, bias balancing: E=8, K=2": ["--experts", "8", "--top-k", "2", "--expert-d-ff", "128",
                                               "--router", "sigmoid"],
    "more experts + shared: E=32, K=3 + 1 shared, width 64": ["--experts", "32", "--top-k", "3", "--expert-d-ff",
                                                              "64", "--shared-experts", "1"],
    "finer + shared: E=64, K=7 + 1 shared, width 32": ["--experts", "64", "--top-k", "7", "--expert-d-ff", "32",
                                                       "--shared-experts", "1"],
    "more experts: E=32, K=2, width 128": ["--experts", "32", "--top-k", "2", "--expert-d-ff", "128"],
    "many experts: E=64, K=2, width 128": ["--experts", "64", "--top-k", "2", "--expert-d-ff", "128"],
    "many experts + shared: E=64, K=3 + 1 shared, width 64": ["--experts", "64", "--top-k", "3", "--expert-d-ff",
                                                              "64", "--shared-experts", "1"],
}


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]


def row_figures(run: Path, dense_final: float, dense_step_time: float) -> dict:
    metrics = _metrics(run)
    curve = [(m["step"], m["val_loss"]) for m in metrics if "val_loss" in m]
    reach = next((step for step, loss in curve if loss <= dense_final), None)
    step_time = statistics.median(m["step_time"] for m in metrics if "step_time" in m)
    return {"val_loss": round(curve[-1][1], 4), "steps_to_dense_loss": reach,
            "steps_ratio": None if reach is None else round(reach / curve[-1][0], 3),
            "step_time_ratio": round(step_time / dense_step_time, 2)}


def markdown_table(figures: dict) -> str:
    lines = ["| run | `moekit train` flags | final val loss | steps to dense's final loss | × dense steps "
             "| step time × dense |", "|---|---|---:|---:|---:|---:|"]
    for name, row in figures["rows"].items():
        reach = "not reached" if row["steps_to_dense_loss"] is None else str(row["steps_to_dense_loss"])
        ratio = "–" if row["steps_ratio"] is None else f"{row['steps_ratio']:.2f}"
        lines.append(f"| {name} | `{' '.join(ROWS[name])}` | {row['val_loss']:.4f} | {reach} | {ratio} | "
                     f"{row['step_time_ratio']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="runs/ablation")
    parser.add_argument("--write", action="store_true", help=f"record {FIGURES.relative_to(ROOT)}")
    args = parser.parse_args()
    out = Path(args.out)
    for i, flags in enumerate(ROWS.values()):
        run = out / f"row{i}"
        if (run / "metrics.jsonl").exists() and _metrics(run)[-1]["step"] >= 800:
            continue
        if (run / "config.json").exists():
            command = [sys.executable, "-m", "moekit", "train", "--resume", str(run)]
        else:
            command = [sys.executable, "-m", "moekit", "train", "--out", str(run), *COMMON, *flags]
        print(" ".join(command[2:]), file=sys.stderr)
        subprocess.run(command, check=True)
    dense = _metrics(out / "row0")
    dense_final = [m["val_loss"] for m in dense if "val_loss" in m][-1]
    dense_step_time = statistics.median(m["step_time"] for m in dense if "step_time" in m)
    figures = {"settings": {"common": COMMON}, "rows": {
        name: row_figures(out / f"row{i}", dense_final, dense_step_time) for i, name in enumerate(ROWS)}}
    if args.write:
        FIGURES.write_text(json.dumps(figures, indent=1) + "\n")
    print(markdown_table(figures))


if __name__ == "__main__":
    main()
