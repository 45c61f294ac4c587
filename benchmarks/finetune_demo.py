"""The fine-tuning comparison of ``moekit demo``, as recorded figures and a Markdown table.

``moekit demo`` (``make demo``) ends by adapting its trained models to text they saw
little of (``--finetune-data``, default ``stdlib-tests``: the standard library's test
suites, which the embedded corpus leaves out): the MoE frozen, with LoRA r = 8 and 32 on
its experts, and fully fine-tuned; the dense twin with a mixture of LoRA experts in each
FFN. This script reads the demo folder's ``demo.json``, writes the figures docs/finetune.md
quotes, and prints the table:

    .venv/bin/moekit demo --threads 1                                    # runs/demo
    .venv/bin/python benchmarks/finetune_demo.py --demo runs/demo --write  # docs/figures/finetune.json

Held-out losses and memory are deterministic on one machine (fixed seeds, counted
bytes); step times are medians over each run's metrics lines on this 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
FIGURES = ROOT / "docs" / "figures" / "finetune.json"
MIB = 2**20


def figures_of(demo_dir: Path) -> dict:
    demo = json.loads((demo_dir / "demo.json").read_text())
    finetune = demo.get("finetune")
    if not finetune:
        raise SystemExit(f"{demo_dir}/demo.json has no fine-tuning results: run moekit demo with --finetune-steps > 0")
    rows = [{"label": r["label"], "trainable_parameters": r["trainable_parameters"], "parameters": r["parameters"],
             "val_loss": round(r["val_loss"], 4),
             "step_time_ms": None if r["step_time"] is None else round(1000 * r["step_time"]),
             "memory_mib": None if r["memory"] is None else round(r["memory"]["total"] / MIB, 1),
             "activations_mib": None if r["memory"] is None else round(r["memory"]["activations"] / MIB, 1)}
            for r in finetune["rows"]]
    settings = {"data": finetune["data"], "steps": finetune["steps"], "python": platform.python_version(),
                "torch": torch.__version__, "threads": demo["settings"].get("threads")}
    return {"settings": settings, "rows": rows}


def markdown_table(figures: dict) -> str:
    def cell(value, unit=""):
        return "–" if value is None else f"{value}{unit}"

    lines = ["| model, method | trainable parameters | share | held-out loss | step time | training memory "
             "| of which activations |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in figures["rows"]:
        share = 100 * r["trainable_parameters"] / r["parameters"]
        lines.append(f"| {r['label']} | {r['trainable_parameters']:,} | {share:.1f} % | {r['val_loss']:.4f} | "
                     f"{cell(r['step_time_ms'], ' ms')} | {cell(r['memory_mib'], ' MiB')} | "
                     f"{cell(r['activations_mib'], ' MiB')} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--demo", default="runs/demo", help="the demo folder (default: %(default)s)")
    parser.add_argument("--write", action="store_true", help=f"record the figures in {FIGURES.relative_to(ROOT)}")
    args = parser.parse_args()
    figures = figures_of(Path(args.demo))
    if args.write:
        FIGURES.write_text(json.dumps(figures, indent=1) + "\n")
    print(markdown_table(figures))


if __name__ == "__main__":
    main()
