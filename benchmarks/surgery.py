"""Expert surgery on the language model: upcycling, growing onto new text, pruning.

Questions:
1. Upcycling: from the same dense checkpoint and for the same extra tokens, does an
   upcycled MoE (experts = copies of the dense FFN) reach a lower validation loss
   than continuing to train the dense model?
2. Growing: after adding experts and training on a second corpus, how much does the
   model learn the new text, and how far does the validation loss on the old text move
   (with the old experts frozen, and without)?
3. Pruning: how does the validation loss grow with the number of experts removed,
   by measured load and by merging the most similar pair?
4. Two-stage training: experts trained on their clusters with fixed routing, then
   the gate alone; how does it compare with training everything at once?

Everything runs through the ``moekit`` command, so the table rows are the commands a
user would type (printed as they run). Small settings, one CPU thread:

    .venv/bin/python benchmarks/surgery.py --out runs/surgery   # tables on stdout, JSON in --out

Corpora, both local: the old text is 40 modules of the running interpreter's standard
library (Python source); the new text is the standard library's non-Python text files
(.txt, .rst, .html: licences, e-mail test messages, the IDLE help page, ...).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import shlex
import shutil
import sysconfig
import time
from pathlib import Path

from moekit.cli import main

PY_MODULES = ("argparse bisect calendar colorsys configparser contextlib copy csv dataclasses datetime difflib "
              "enum fnmatch fractions functools glob gzip heapq inspect ipaddress json/decoder json/encoder "
              "keyword locale logging/__init__ operator pathlib pprint queue random sched shlex shutil "
              "statistics string tarfile textwrap threading typing").split()
TEXT_SUFFIXES = (".txt", ".rst", ".html")
MODEL = ["--layers", "2", "--d-model", "64", "--heads", "4", "--context-length", "64", "--d-ff", "256",
         "--vocab-size", "1024", "--batch-size", "16", "--lr", "3e-3", "--eval-every", "50", "--eval-batches", "8",
         "--checkpoint-every", "100", "--threads", "1"]
SURGERY = ["--threads", "1", "--eval-batches", "8"]


def moekit(*argv) -> str:
    """Run one moekit command, echo it, return its stdout."""
    print("$ moekit " + shlex.join(str(a) for a in argv), flush=True)
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        code = main([str(a) for a in argv])
    if code != 0:
        raise SystemExit(f"moekit {argv[0]} failed with exit code {code}")
    return stdout.getvalue()


def last_json(text: str) -> dict:
    return json.loads(text.strip().splitlines()[-1])


def val_curve(run: Path) -> list[tuple[int, float]]:
    lines = (json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines())
    return [(r["step"], r["val_loss"]) for r in lines if "val_loss" in r]


def last_interval(run: Path, old_experts: int) -> dict:
    """Training loss and the new experts' share of the load in the last logged interval."""
    last = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in line][-1]
    share = sum(sum(layer[old_experts:]) for layer in last["load"]) / len(last["load"])
    return {"train_loss": last["loss"], "new_expert_share": share}


def eval_loss(run: Path, data_of: Path | None = None) -> float:
    extra = ["--data-of", data_of] if data_of else []
    # The same windows as the runs' own validation (8 batches of 16), so numbers compare with the curves.
    return last_json(moekit("eval", run, "--batches", "8", "--batch-size", "16", "--threads", "1", *extra))["val_loss"]


def make_corpora(out: Path) -> tuple[Path, Path]:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    code, text = out / "corpus-python", out / "corpus-text"
    for folder in (code, text):
        folder.mkdir(parents=True, exist_ok=True)
    for name in PY_MODULES:
        shutil.copy(stdlib / f"{name}.py", code / f"{name.replace('/', '_')}.py")
    for path in sorted(stdlib.rglob("*")):
        if path.suffix in TEXT_SUFFIXES and "site-packages" not in path.parts and path.stat().st_size > 500:
            try:  # moekit reads UTF-8 text only; some test data files are other encodings
                path.read_bytes().decode("utf-8")
            except UnicodeDecodeError:
                continue
            shutil.copy(path, text / path.relative_to(stdlib).as_posix().replace("/", "_"))
    if len(list(text.iterdir())) < 20:
        raise SystemExit(f"this interpreter's standard library has too few text files for the second corpus ({text})")
    return code, text


def upcycling(out: Path, code: Path, base_steps: int, extra_steps: int) -> dict:
    dense = out / "dense"
    moekit("train", "--out", dense, "--data", code, "--experts", "0", "--steps", base_steps, *MODEL)
    runs = {"dense, continued": out / "dense-continued", "upcycled E=4 K=1": out / "upcycled-k1",
            "upcycled E=4 K=2": out / "upcycled-k2"}
    # Same schedule and batches for all three: the derived runs use seed + 1 and extra_steps.
    moekit("train", "--init-from", dense, "--out", runs["dense, continued"], "--steps", extra_steps,
           "--seed", "1", "--lr", "3e-3", "--eval-every", "50", "--eval-batches", "8", "--batch-size", "16",
           "--threads", "1")
    for k, label in ((1, "upcycled E=4 K=1"), (2, "upcycled E=4 K=2")):
        moekit("upcycle", dense, "--experts", "4", "--top-k", k, "--out", runs[label], "--steps", extra_steps,
               *SURGERY)
        moekit("train", "--resume", runs[label], "--threads", "1")
    curves = {label: val_curve(run) for label, run in runs.items()}
    start = val_curve(dense)[-1][1]
    print(f"\nUpcycling: dense trained {base_steps} steps (val {start:.4f}), then {extra_steps} more steps each")
    steps = [s for s, _ in curves["dense, continued"]]
    print("step  " + "  ".join(f"{label:>18s}" for label in curves))
    for i, step in enumerate(steps):
        print(f"{step:4d}  " + "  ".join(f"{curves[label][i][1]:18.4f}" for label in curves))
    return {"dense_val_at_start": start, "curves": curves}


def growing(out: Path, code: Path, text: Path, base_steps: int, extra_steps: int) -> dict:
    base = out / "moe-base"
    moekit("train", "--out", base, "--data", code, "--experts", "4", "--top-k", "2", "--expert-d-ff", "128",
           "--steps", base_steps, *MODEL)
    variants = {"grow +4, old experts frozen": ["--freeze-old"], "grow +4, all trained": []}
    rows = {}
    old_before = eval_loss(base)
    new_before = None
    for label, flags in variants.items():
        run = out / ("grown-frozen" if flags else "grown-all")
        report = last_json(moekit("grow", base, "--add", "4", *flags, "--data", text, "--out", run,
                                  "--steps", extra_steps, *SURGERY))
        assert abs(report["val_loss_change"]) < 1e-5, report
        new_before = new_before if new_before is not None else eval_loss(run)  # step 0 = the base model
        moekit("train", "--resume", run, "--threads", "1")
        rows[label] = {"old_val": eval_loss(run, data_of=base), "new_val": eval_loss(run),
                       "step0_change": report["val_loss_change"], **last_interval(run, old_experts=4)}
    # Baseline without new experts: fine-tune the base model itself on the new text.
    tuned = out / "finetuned"
    moekit("train", "--init-from", base, "--data", text, "--out", tuned, "--steps", extra_steps, "--seed", "1",
           "--lr", "3e-3", "--eval-every", "50", "--eval-batches", "8", "--batch-size", "16", "--threads", "1")
    rows["no growth, fine-tuned"] = {"old_val": eval_loss(tuned, data_of=base), "new_val": eval_loss(tuned),
                                     "step0_change": 0.0, **last_interval(tuned, old_experts=4)}
    print(f"\nGrowing: MoE E=4 trained {base_steps} steps on Python; +{extra_steps} steps on the text corpus")
    print(f"{'':28s}  {'old val (Python)':>17s}  {'new val (text)':>15s}  {'new train':>9s}  {'new experts':>11s}")
    print(f"{'before (base model)':28s}  {old_before:17.4f}  {new_before:15.4f}")
    for label, r in rows.items():
        print(f"{label:28s}  {r['old_val']:17.4f}  {r['new_val']:15.4f}  {r['train_loss']:9.4f}  "
              f"{r['new_expert_share']:11.0%}   (old {r['old_val'] - old_before:+.4f}, "
              f"new {r['new_val'] - new_before:+.4f})")
    print("new train: training loss on the text over the last logged steps; new experts: their share of the "
          "routed assignments then")
    return {"old_before": old_before, "new_before": new_before, "after": rows}


def pruning(out: Path, code: Path, base_steps: int) -> dict:
    base = out / "moe8"
    moekit("train", "--out", base, "--data", code, "--experts", "8", "--top-k", "2", "--expert-d-ff", "64",
           "--steps", base_steps, *MODEL)
    table = {}
    for by in ("load", "similarity"):
        for k in range(1, 8):
            report = last_json(moekit("prune", base, "--remove", k, "--by", by, "--out", out / f"pruned-{by}-{k}",
                                      "--steps", "1", *SURGERY))
            table.setdefault(0, report["val_loss_before"])
            table[(by, k)] = report["val_loss_after"]
    print(f"\nPruning: MoE E=8 K=2 trained {base_steps} steps; validation loss right after removing k experts")
    print(f"{'removed':>7s}  {'experts left':>12s}  {'by load':>8s}  {'by similarity':>13s}")
    print(f"{0:7d}  {8:12d}  {table[0]:8.4f}  {table[0]:13.4f}")
    for k in range(1, 8):
        print(f"{k:7d}  {8 - k:12d}  {table[('load', k)]:8.4f}  {table[('similarity', k)]:13.4f}")
    return {"unpruned": table[0], "load": [table[("load", k)] for k in range(1, 8)],
            "similarity": [table[("similarity", k)] for k in range(1, 8)]}


def two_stage(out: Path, code: Path, base_steps: int, gate_steps: int) -> dict:
    experts, gate = out / "stage-experts", out / "stage-gate"
    moekit("train", "--stage", "experts", "--out", experts, "--data", code, "--experts", "4", "--top-k", "2",
           "--expert-d-ff", "128", "--steps", base_steps, *MODEL)
    moekit("train", "--stage", "gate", "--init-from", experts, "--out", gate, "--steps", gate_steps, "--lr", "3e-3",
           "--eval-every", "50", "--eval-batches", "8", "--batch-size", "16", "--threads", "1")
    # moekit eval loads the plain model: its (untrained) routers decide, as at the gate stage's step 0.
    result = {"experts_stage_cluster_routed": val_curve(experts)[-1][1], "gate_stage_step0": eval_loss(experts),
              "gate_stage": val_curve(gate)}
    full = out / "moe-base"
    if (full / "metrics.jsonl").exists():
        result["one_stage_same_model"] = val_curve(full)[-1][1]
    print(f"\nTwo-stage training: MoE E=4 K=2, stage experts {base_steps} steps, stage gate {gate_steps} steps")
    print(f"stage experts, routed by cluster:   val {result['experts_stage_cluster_routed']:.4f}")
    print(f"stage gate, step    0 (router):     val {result['gate_stage_step0']:.4f}")
    for step, loss in result["gate_stage"]:
        print(f"stage gate, step {step:4d}:            val {loss:.4f}")
    if "one_stage_same_model" in result:
        print(f"one stage (moe-base, {base_steps} steps):     val {result['one_stage_same_model']:.4f}")
    return result


FIGURES = Path(__file__).resolve().parent.parent / "docs" / "figures" / "surgery.json"


def markdown_tables(results: dict) -> dict[str, str]:
    """The tables docs/surgery.md quotes, by name, as this script's results give them
    (tests/test_doc_figures.py holds the page to them)."""
    tables = {}
    up = results["upcycling"]["curves"]
    names = ["dense, continued", "upcycled E=4 K=1", "upcycled E=4 K=2"]
    rows = ["| extra steps | dense, continued | upcycled E=4 K=1 | upcycled E=4 K=2 |", "|---:|---:|---:|---:|"]
    for i, (step, _) in enumerate(up[names[0]]):
        values = [up[n][i][1] for n in names]
        best = min(values)
        cells = [f"**{v:.4f}**" if v == best else f"{v:.4f}" for v in values]
        rows.append(f"| {step} | " + " | ".join(cells) + " |")
    tables["upcycling"] = "\n".join(rows)
    g = results["growing"]
    labels = {"grow +4, old experts frozen": "`grow --add 4 --freeze-old`",
              "grow +4, all trained": "`grow --add 4` (everything trains)",
              "no growth, fine-tuned": "no growth, fine-tuned (`train --init-from --data`)"}
    rows = ["| | old val (Python) | new val (text) | new train | new experts |", "|---|---:|---:|---:|---:|",
            f"| before (base model) | {g['old_before']:.4f} | {g['new_before']:.4f} | | |"]
    for key, label in labels.items():
        r = g["after"][key]
        share = f"{100 * r['new_expert_share']:.0f}%" if r["new_expert_share"] else ""
        rows.append(f"| {label} | {r['old_val']:.4f} ({r['old_val'] - g['old_before']:+.3f}) | {r['new_val']:.4f} "
                    f"({r['new_val'] - g['new_before']:+.3f}) | {r['train_loss']:.2f} | {share} |")
    tables["growing"] = "\n".join(rows).replace("-0.", "−0.").replace("(−", "(−")
    pr = results["pruning"]
    rows = ["| removed | experts left | by load | by similarity |", "|---:|---:|---:|---:|",
            f"| 0 | {len(pr['load']) + 1} | {pr['unpruned']:.4f} | {pr['unpruned']:.4f} |"]
    for k, (load, similarity) in enumerate(zip(pr["load"], pr["similarity"], strict=True), start=1):
        rows.append(f"| {k} | {len(pr['load']) + 1 - k} | {load:.4f} | {similarity:.4f} |")
    tables["pruning"] = "\n".join(rows)
    st = results["two_stage"]
    rows = ["| | val |", "|---|---:|", f"| stage experts, routed by cluster | {st['experts_stage_cluster_routed']:.4f} |",
            f"| stage gate, step 0 (untrained router decides) | {st['gate_stage_step0']:.4f} |"]
    rows += [f"| stage gate, step {step} | {value:.4f} |" for step, value in st["gate_stage"]]
    rows.append(f"| one stage, everything trained together 300 steps | {st['one_stage_same_model']:.4f} |")
    tables["two_stage"] = "\n".join(rows)
    return tables


def main_cli() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("runs/surgery"), help="folder for every run (must be new)")
    parser.add_argument("--base-steps", type=int, default=300)
    parser.add_argument("--extra-steps", type=int, default=300)
    parser.add_argument("--gate-steps", type=int, default=100)
    parser.add_argument("--only", default="upcycle,grow,prune,stages", help="comma-separated parts to run")
    parser.add_argument("--tables", action="store_true",
                        help=f"print the markdown tables of {FIGURES.name} (the figures docs/surgery.md quotes) and stop")
    args = parser.parse_args()
    if args.tables:
        for name, table in markdown_tables(json.loads(FIGURES.read_text())).items():
            print(f"<!-- figures: surgery {name} -->\n{table}\n<!-- /figures -->\n")
        return
    if args.out.exists():
        raise SystemExit(f"{args.out} exists; pass a new --out (runs are never overwritten)")
    started = time.perf_counter()
    code, text = make_corpora(args.out)
    results = {"settings": vars(args) | {"out": str(args.out)}}
    parts = args.only.split(",")
    if "upcycle" in parts:
        results["upcycling"] = upcycling(args.out, code, args.base_steps, args.extra_steps)
    if "grow" in parts:
        results["growing"] = growing(args.out, code, text, args.base_steps, args.extra_steps)
    if "prune" in parts:
        results["pruning"] = pruning(args.out, code, args.base_steps)
    if "stages" in parts:
        results["two_stage"] = two_stage(args.out, code, args.base_steps, args.gate_steps)
    results["seconds"] = time.perf_counter() - started
    (args.out / "surgery.json").write_text(json.dumps(results, indent=2))
    print(f"\n{results['seconds']:.0f} s in all; results in {args.out / 'surgery.json'} (copy it to "
          f"{FIGURES.relative_to(FIGURES.parent.parent.parent)} and paste `--tables` into docs/surgery.md when the "
          "figures change)")


if __name__ == "__main__":
    main_cli()
