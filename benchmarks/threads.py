"""Intra-op threads on a machine whose cores may be shared: the LM training step with 1 and
with all cores' threads, alone and next to busy processes, and the thread count moekit's
default (``moekit.apps.common.default_threads``) picks in each situation.

    python benchmarks/threads.py --repeats 5

Each configuration runs in a fresh process (torch fixes its thread pool at first use);
"busy" processes spin on one core each for the duration of the measurement.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import statistics
import subprocess
import sys
import time

CHILD = r"""
import json, statistics, sys, time, torch
from moekit.apps.common import default_threads
threads = int(sys.argv[1]) if sys.argv[1] != "default" else default_threads()
torch.set_num_threads(threads)
from moekit.apps.bench import run_lm_step
rows = run_lm_step(repeats=int(sys.argv[2]), vocab_size=2048, batch_size=16, context_length=128, d_model=64, d_ff=256)
print(json.dumps({"threads": threads, "moe_step_s": next(r["median_s"] for r in rows if r["model"] == "MoE")}))
"""


def spin(seconds: float) -> None:
    end = time.time() + seconds
    while time.time() < end:
        pass


def measure(threads: str, repeats: int, busy: int) -> dict:
    spinners = [multiprocessing.Process(target=spin, args=(600,)) for _ in range(busy)]
    for p in spinners:
        p.start()
    time.sleep(0.5 if busy else 0)
    try:
        out = subprocess.run([sys.executable, "-c", CHILD, threads, str(repeats)], capture_output=True, text=True,
                             check=True)
    finally:
        for p in spinners:
            p.terminate()
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds; medians over them")
    args = parser.parse_args()
    cores = len(os.sched_getaffinity(0))
    print(f"{cores} cores; MoE training step of the demo model (median of {args.repeats} steps, then of "
          f"{args.rounds} rounds; the range in brackets)\n")
    print("| busy processes | threads | step ms | default's picks |")
    print("|---|---|---|---|")
    for busy in range(cores):
        times: dict[str, list[float]] = {t: [] for t in ("1", str(cores), "default")}
        picks = []
        for _ in range(args.rounds):
            for t in times:
                result = measure(t, args.repeats, busy)
                times[t].append(1e3 * result["moe_step_s"])
                if t == "default":
                    picks.append(result["threads"])
        for t, values in times.items():
            label = f"default ({', '.join(map(str, picks))})" if t == "default" else t
            print(f"| {busy} | {label} | {statistics.median(values):.0f} ({min(values):.0f}–{max(values):.0f}) | |")


if __name__ == "__main__":
    main()
