"""``moekit bench`` of an older source tree against this checkout, alternating: does a change cost speed?

    git worktree add /tmp/moekit-old <commit>
    python benchmarks/ab_bench.py --old /tmp/moekit-old/src --rounds 6 [-- --repeats 5 --threads 1]

Each round runs ``moekit bench`` twice in fresh processes, once with the old
tree first on ``PYTHONPATH`` and once with this checkout, the order swapped
every round so that drift in the machine's load falls on both alike.
Options after ``--`` go to ``moekit bench``. It prints, per case, the median
over rounds and the spread (min–max) of every moekit path's η, of each peer's
ratio to the best moekit path, of the decode speed-up over transformers'
block and of the LM step's time over dense, for old and new, and the new/old
ratio of the medians; the raw results go to ``--out`` as JSON. ``--table FILE``
prints the summary of an earlier ``--out`` as a Markdown table instead of running.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def run_bench(src: Path, bench_args: list[str], workdir: Path, tag: str) -> dict:
    out = workdir / f"{tag}.json"
    env = {**os.environ, "PYTHONPATH": str(src)}
    command = [sys.executable, "-m", "moekit", "bench", "--json", str(out), *bench_args]
    subprocess.run(command, env=env, check=True, stdout=subprocess.DEVNULL, cwd=workdir)
    return json.loads(out.read_text())


def metrics(result: dict) -> dict[str, float]:
    """The ratios the bench reports, by name: η per path, peer/best-moekit, decode, LM step."""
    values = {}
    for case in result["cases"]:
        name = case["case"]["name"]
        rows = {row["impl"]: row for row in case["rows"]}
        best = min(row["median_s"] for impl, row in rows.items() if impl.startswith("moekit"))
        for impl, row in rows.items():
            if impl.startswith("moekit"):
                values[f"{name}: η {impl}"] = row["eta"]
            elif impl.startswith("transformers"):
                values[f"{name}: {impl} ÷ best moekit"] = row["median_s"] / best
    for row in result.get("decode", []):
        if row.get("transformers_grouped_mm_us"):
            values[f"decode T={row['tokens']}: transformers ÷ moekit"] = \
                row["transformers_grouped_mm_us"] / row["median_us"]
    for row in result.get("lm_step", []):
        if row["model"] == "MoE":
            values["LM step: MoE ÷ dense"] = row["ratio_to_dense"]
    return values


def summarize(runs: dict[str, list[dict]]) -> list[dict]:
    per_run = {side: [metrics(r) for r in results] for side, results in runs.items()}
    rows = []
    for name in per_run["new"][0]:
        old = [m[name] for m in per_run["old"] if name in m]
        new = [m[name] for m in per_run["new"] if name in m]
        if not old or not new:
            continue
        rows.append({"metric": name, "old_median": statistics.median(old), "old_min": min(old), "old_max": max(old),
                     "new_median": statistics.median(new), "new_min": min(new), "new_max": max(new),
                     "new_over_old": statistics.median(new) / statistics.median(old)})
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| metric | old: median (min–max) | new: median (min–max) | new ÷ old |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['metric']} | {r['old_median']:.3f} ({r['old_min']:.3f}–"
                     f"{r['old_max']:.3f}) | {r['new_median']:.3f} ({r['new_min']:.3f}–{r['new_max']:.3f}) | "
                     f"{r['new_over_old']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--old", type=Path, help="the old checkout's src folder")
    parser.add_argument("--table", type=Path, help="print an earlier result file's summary as Markdown")
    parser.add_argument("--rounds", type=int, default=6, help="runs of each side (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("bench-results/ab_bench.json"))
    args, bench_args = parser.parse_known_args()
    if args.table:
        print(markdown(json.loads(args.table.read_text())["summary"]))
        return
    if args.old is None:
        parser.error("--old (the old checkout's src folder) is needed to run")
    bench_args = [a for a in bench_args if a != "--"]
    runs: dict[str, list[dict]] = {"old": [], "new": []}
    sources = {"old": args.old.resolve(), "new": ROOT / "src"}
    with tempfile.TemporaryDirectory() as tmp:
        for round_ in range(args.rounds):
            order = ("old", "new") if round_ % 2 == 0 else ("new", "old")
            for side in order:
                runs[side].append(run_bench(sources[side], bench_args, Path(tmp), f"{side}-{round_}"))
                print(f"round {round_ + 1}/{args.rounds}: {side} done", file=sys.stderr, flush=True)
    rows = summarize(runs)
    print(f"{'metric':70s} {'old median (min–max)':>26s} {'new median (min–max)':>26s} {'new/old':>8s}")
    for r in rows:
        print(f"{r['metric']:70s} {r['old_median']:8.3f} ({r['old_min']:.3f}–{r['old_max']:.3f}) "
              f"{r['new_median']:8.3f} ({r['new_min']:.3f}–{r['new_max']:.3f}) {r['new_over_old']:8.3f}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"bench_args": bench_args, "rounds": args.rounds, "summary": rows,
                                    "runs": runs}, indent=1))
    print(f"results: {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
