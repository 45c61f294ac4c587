"""The application demos beside the language model, each with a report page:
``moekit demo multitask`` (MMoE and PLE against one-gate MoE and a shared bottom,
``moekit.analysis.multitask``) and ``moekit demo timeseries`` (a classic mixture on a
regime-switching series, ``moekit.analysis.timeseries``)."""

from __future__ import annotations

import sys
import time
from pathlib import Path

MULTITASK_OUT = "runs/demo-multitask"


def cmd_demo_multitask(args) -> int:
    import torch

    from ..analysis.multitask import (
        correlation_sweep,
        recommendation,
        recommendation_table,
        summarize_sweep,
        sweep_table,
        write_multitask_report,
    )

    started = time.perf_counter()
    out = Path(args.out if args.out != args.default_out else MULTITASK_OUT)
    seeds = list(range(args.seed, args.seed + args.seeds))
    torch.set_num_threads(1)  # tiny models: a second thread only adds synchronisation
    print(f"moekit demo multitask → {out}  ({len(seeds)} seed(s), {args.steps} steps per model)", file=sys.stderr)
    rows = correlation_sweep(seeds, args.steps, batch_size=args.batch_size)
    summary = summarize_sweep(rows)
    rec = recommendation(seeds[0], args.steps, batch_size=args.batch_size)
    results = {"settings": {"seeds": seeds, "steps": args.steps, "batch_size": args.batch_size},
               "sweep": rows, "summary": summary, "recommendation": rec}
    index = write_multitask_report(results, out / "report")
    print("\nheld-out MSE, median (min–max) over seeds:\n" + sweep_table(summary), file=sys.stderr)
    print("\nclick/conversion, held-out AUC:\n" + recommendation_table(rec), file=sys.stderr)
    print(f"report: {index}  ({time.perf_counter() - started:.0f} s in all)", file=sys.stderr)
    return 0


TIMESERIES_OUT = "runs/demo-timeseries"


def cmd_demo_timeseries(args) -> int:
    from tqdm.auto import tqdm

    from ..analysis.timeseries import forecast, summary_table, write_timeseries_report

    started = time.perf_counter()
    out = Path(args.out if args.out != args.default_out else TIMESERIES_OUT)
    seeds = list(range(args.seed, args.seed + args.seeds))
    print(f"moekit demo timeseries → {out}  ({len(seeds)} seed(s))", file=sys.stderr)
    runs = [forecast(seed) for seed in tqdm(seeds, desc="forecasts", unit="seed")]
    index = write_timeseries_report(runs, out / "report")
    print("\none-step forecasts, test MSE:\n" + summary_table(runs), file=sys.stderr)
    print(f"report: {index}  ({time.perf_counter() - started:.0f} s in all)", file=sys.stderr)
    return 0


VISION_OUT = "runs/demo-vision"


def cmd_demo_vision(args) -> int:
    import torch

    from ..analysis.vision import accuracy_table, capacity_table, run, write_vision_report

    started = time.perf_counter()
    out = Path(args.out if args.out != args.default_out else VISION_OUT)
    seeds = list(range(args.seed, args.seed + args.seeds))
    steps = args.steps if args.steps != args.default_steps else 600
    torch.set_num_threads(1)  # 16 patches of 64 dims: a second thread only adds synchronisation
    print(f"moekit demo vision → {out}  ({len(seeds)} seed(s), {steps} steps per model)", file=sys.stderr)
    results = run(seeds, steps)
    index = write_vision_report(results, out / "report")
    print("\ntest accuracy:\n" + accuracy_table(results), file=sys.stderr)
    print("\nV-MoE, capacity shrunk after training:\n" + capacity_table(results), file=sys.stderr)
    print(f"report: {index}  ({time.perf_counter() - started:.0f} s in all)", file=sys.stderr)
    return 0
