"""The main job: an MoE language model and a dense one with the same active parameters,
trained for the same tokens on the embedded corpus, then a comparative report.

Re-running with the same options reuses finished runs and resumes interrupted ones.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from .common import CLIError, check_router, configs_from_args, data_config_from_args, record_threads


def cmd_demo(args) -> int:
    if getattr(args, "app", "lm") != "lm":
        from .applications import cmd_demo_multitask, cmd_demo_timeseries, cmd_demo_vision

        demos = {"multitask": cmd_demo_multitask, "timeseries": cmd_demo_timeseries, "vision": cmd_demo_vision}
        return demos[args.app](args)

    from ..analysis.compare import compare, seed_summary
    from ..analysis.report import write_report
    from ..train import (
        latest_checkpoint,
        new_run,
        prepare_data,
        read_metrics,
        read_run_config,
        resume_run,
    )
    from ..train.checkpoint import atomic_write_text

    check_router(args.router)
    out = Path(args.out)
    started = time.perf_counter()
    data_config = data_config_from_args(args)
    print(f"moekit demo → {out}  (MoE vs dense, {args.seeds} seed(s), {args.steps} steps each)", file=sys.stderr)
    prepared = prepare_data(data_config, out / "tokenizer.json")
    print(f"corpus: {prepared.corpus.info['train_files']} training / {prepared.corpus.info['val_files']} validation "
          f"files, {prepared.tokens.train_N.numel():,} training tokens, vocabulary {prepared.tokenizer.vocab_size}",
          file=sys.stderr)
    comparisons = []
    report_runs = {}
    for seed in range(args.seed, args.seed + args.seeds):
        args.seed_value = seed
        run_dirs = {}
        for label, use_moe in (("MoE", True), ("dense", False)):
            seed_args = argparse.Namespace(**vars(args))
            seed_args.seed = seed
            model_config, train_config = configs_from_args(seed_args, prepared.tokenizer.vocab_size, moe=use_moe)
            run_dir = out / f"{label.lower()}-seed{seed}"
            run_dirs[label] = run_dir
            description = f"{label:5s} seed {seed}"
            if (run_dir / "config.json").exists():
                saved_model, saved_train, _ = read_run_config(run_dir)
                if saved_model != model_config or saved_train != train_config:
                    raise CLIError(f"{str(run_dir)!r} holds a run with other settings; pass another --out "
                                   "to keep it, or delete it")
                folder = latest_checkpoint(run_dir)
                done = folder is not None and json.loads((folder / "trainer_state.json").read_text())["step"] >= train_config.steps
                if done:
                    print(f"{description}: already trained, reusing {run_dir}", file=sys.stderr)
                    continue
                trainer = resume_run(run_dir, description=description) if folder else new_run(
                    run_dir, model_config, train_config, data_config, prepared=prepared, overwrite=True,
                    description=description)
            else:
                trainer = new_run(run_dir, model_config, train_config, data_config, prepared=prepared,
                                  description=description)
            trainer.resume_command = f"moekit demo --out {out} (with the same options)"
            record_threads(trainer.run_dir, args.threads)
            if not trainer.fit():
                return 130
        comparison = compare(read_metrics(run_dirs["MoE"]), read_metrics(run_dirs["dense"]))
        comparison["seed"] = seed
        comparisons.append(comparison)
        if not report_runs:
            report_runs = {label: path.name for label, path in run_dirs.items()}
    seeds = {"runs": comparisons, "summary": seed_summary(comparisons)} if len(comparisons) > 1 else None
    finetune = None
    if args.finetune_steps:
        from ..data import DataError
        from .finetune import finetune_comparison

        try:
            rows = finetune_comparison({label: out / name for label, name in report_runs.items()}, out / "finetune",
                                       steps=args.finetune_steps, data=args.finetune_data,
                                       batch_size=args.batch_size)
        except DataError as error:  # e.g. a Python installed without its test suites
            print(f"fine-tuning comparison skipped: {error}", file=sys.stderr)
            rows = []
        if rows is None:
            return 130
        finetune = {"data": args.finetune_data, "steps": args.finetune_steps, "rows": rows} if rows else None
    demo = {"report_runs": report_runs, "seeds": seeds, "comparisons": comparisons,
            "settings": {k: v for k, v in vars(args).items() if k not in ("func", "seed_value")},
            "data": prepared.info, "finetune": finetune}
    atomic_write_text(out / "demo.json", json.dumps(demo, indent=2))
    index = write_report({label: out / name for label, name in report_runs.items()}, out / "report",
                         seeds=seeds, title="moekit demo: MoE vs dense language model", finetune=finetune)
    _print_demo_summary(comparisons, seeds)
    if finetune:
        _print_finetune_summary(finetune)
    print(f"report: {index}  ({time.perf_counter() - started:.0f} s in all)", file=sys.stderr)
    return 0


def _print_demo_summary(comparisons: list[dict], seeds: dict | None) -> None:
    print("\nseed  MoE val  dense val  dense-MoE  MoE steps to dense loss  step-time ratio", file=sys.stderr)
    for c in comparisons:
        reach = c["moe_steps_to_dense_loss"]
        reach_text = "not reached" if reach is None else f"{reach} / {c['dense_steps']}"
        print(f"{c['seed']:>4}  {c['moe_val_loss']:.4f}   {c['dense_val_loss']:.4f}    "
              f"{c['dense_val_loss'] - c['moe_val_loss']:+.4f}    "
              f"{reach_text:>22}   "
              f"{c['step_time_ratio']:.2f}x", file=sys.stderr)
    if seeds:
        s = seeds["summary"]
        d = s["dense_minus_moe"]
        print(f"over {s['seeds']} seeds: MoE {s['moe_val_loss']['mean']:.4f} ± {s['moe_val_loss']['std']:.4f}, "
              f"dense {s['dense_val_loss']['mean']:.4f} ± {s['dense_val_loss']['std']:.4f}, "
              f"dense − MoE {d['mean']:+.4f} ± {d['std']:.4f} (MoE better in {d['moe_better_in']}/{d['n']})",
              file=sys.stderr)


def _print_finetune_summary(finetune: dict) -> None:
    print(f"\nfine-tuned on {finetune['data']} for {finetune['steps']} steps:", file=sys.stderr)
    print(f"{'model, method':34s} {'trainable':>10s}  held-out loss  step time  training memory", file=sys.stderr)
    for r in finetune["rows"]:
        step = "–" if r["step_time"] is None else f"{1000 * r['step_time']:.0f} ms"
        memory = "–" if r["memory"] is None else f"{r['memory']['total'] / 2**20:.1f} MiB"
        print(f"{r['label']:34s} {r['trainable_parameters']:>10,}  {r['val_loss']:13.4f}  {step:>9s}  {memory:>15s}",
              file=sys.stderr)
