"""The application demos beside the language model, each writing a report page:
``moekit demo multitask`` (MMoE and PLE against one-gate MoE and a shared bottom,
``moekit.analysis.multitask``), ``moekit demo timeseries`` (a classic mixture on a
regime-switching series, ``moekit.analysis.timeseries``) and ``moekit demo vision`` (a ViT,
V-MoE and Soft MoE on scikit-learn's digits, ``moekit.analysis.vision``)."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from pathlib import Path

OUT = {"multitask": "runs/demo-multitask", "timeseries": "runs/demo-timeseries", "vision": "runs/demo-vision"}
# Steps per model when --steps is left at the language model's default.
STEPS = {"multitask": 800, "vision": 600}


def _run_demo(args, measure: Callable[[list[int], int], tuple[Path, list[tuple[str, str]]]]) -> int:
    """Run ``measure(seeds, steps) -> (report index, [(title, table)])`` and print its tables."""
    import torch

    started = time.perf_counter()
    args.out_dir = Path(args.out if args.out != args.default_out else OUT[args.app])
    seeds = list(range(args.seed, args.seed + args.seeds))
    steps = args.steps if args.steps != args.default_steps else STEPS.get(args.app, args.steps)
    torch.set_num_threads(1)  # tiny models: a second thread only adds synchronisation
    what = f"{len(seeds)} seed(s)" + (f", {steps} steps per model" if args.app in STEPS else "")
    print(f"moekit demo {args.app} → {args.out_dir}  ({what})", file=sys.stderr)
    index, tables = measure(seeds, steps)
    for title, table in tables:
        print(f"\n{title}:\n{table}", file=sys.stderr)
    print(f"report: {index}  ({time.perf_counter() - started:.0f} s in all)", file=sys.stderr)
    return 0


def cmd_demo_multitask(args) -> int:
    from ..analysis import multitask as m

    def measure(seeds, steps):
        rows = m.correlation_sweep(seeds, steps, batch_size=args.batch_size)
        summary = m.summarize_sweep(rows)
        rec = m.recommendation(seeds[0], steps, batch_size=args.batch_size)
        results = {"settings": {"seeds": seeds, "steps": steps, "batch_size": args.batch_size},
                   "sweep": rows, "summary": summary, "recommendation": rec}
        return m.write_multitask_report(results, args.out_dir / "report"), [
            ("held-out MSE, median (min–max) over seeds", m.sweep_table(summary)),
            ("click/conversion, held-out AUC", m.recommendation_table(rec))]

    return _run_demo(args, measure)


def cmd_demo_timeseries(args) -> int:
    from tqdm.auto import tqdm

    from ..analysis import timeseries as t

    def measure(seeds, steps):
        runs = [t.forecast(seed) for seed in tqdm(seeds, desc="forecasts", unit="seed")]
        return t.write_timeseries_report(runs, args.out_dir / "report"), [
            ("one-step forecasts, test MSE", t.summary_table(runs))]

    return _run_demo(args, measure)


def cmd_demo_vision(args) -> int:
    from ..analysis import vision as v

    def measure(seeds, steps):
        results = v.run(seeds, steps)
        return v.write_vision_report(results, args.out_dir / "report"), [
            ("test accuracy", v.accuracy_table(results)),
            ("V-MoE, capacity shrunk after training", v.capacity_table(results))]

    return _run_demo(args, measure)
