"""A mixture of LoRA experts on the shared_base compute path against grouped_mm, which runs
the shared base once per routed row: forward + backward of one layer, 2,048 tokens, E = 8,
K = 2, rank 8, float32, at the demo model's FFN (D = 64, F = 256) and the standard layer
shape (D = 512, F = 1024).

    .venv/bin/python benchmarks/mixlora.py --threads 1 --repeats 7

Medians of interleaved rounds after two warm-up rounds; both paths are checked equal first.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import time

import torch

from moekit.finetune import mixlora
from moekit.models.lm import SwiGLU

SHAPES = ((64, 256), (512, 1024))
PATHS = ("grouped_mm", "shared_base")


def measure(repeats: int, tokens: int = 2048) -> list[dict]:
    rows = []
    for d_model, d_ff in SHAPES:
        torch.manual_seed(0)
        layer = mixlora(SwiGLU(d_model, d_ff), num_experts=8, top_k=2, rank=8)
        x = torch.randn(tokens, d_model)
        layers = {}
        for path in PATHS:
            layers[path] = copy.deepcopy(layer)
            layers[path].config = dataclasses.replace(layer.config, compute=path)
        with torch.no_grad():
            difference = (layers["grouped_mm"](x).y - layers["shared_base"](x).y).abs().max().item()
        if difference > 1e-4:
            raise SystemExit(f"the paths disagree by {difference:g}")
        times = {path: [] for path in PATHS}
        for round_ in range(repeats + 2):
            for path in PATHS:
                xi = x.clone().requires_grad_(True)
                started = time.perf_counter()
                y = layers[path](xi).y
                (y * y).sum().backward()
                if round_ >= 2:
                    times[path].append(time.perf_counter() - started)
        medians = {path: statistics.median(t) for path, t in times.items()}
        rows.append({"d_model": d_model, "d_ff": d_ff, **{f"{p}_ms": 1e3 * medians[p] for p in PATHS},
                     "speedup": medians["grouped_mm"] / medians["shared_base"]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print("| D | F | grouped_mm ms | shared_base ms | speed-up |\n|---|---|---|---|---|")
    for r in measure(args.repeats):
        print(f"| {r['d_model']} | {r['d_ff']} | {r['grouped_mm_ms']:.1f} | {r['shared_base_ms']:.1f} | "
              f"{r['speedup']:.2f}× |")


if __name__ == "__main__":
    main()
