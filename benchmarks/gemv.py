"""The gemv path (numba decode kernel) against the other CPU paths at decode sizes.

    python benchmarks/gemv.py --threads 2 --repeats 7

The MoE layer's forward without gradients, float32, for T = 1 … 64 tokens at several
expert sizes, on the paths ``auto`` chooses between at these sizes: ``gemv``,
``small_batch`` (each chosen expert once, oneDNN's linear for experts of ≥ 1 MiB) and
``grouped_mm``. Outputs are checked against ``loop`` first. Medians of interleaved
rounds; the last column is ``auto``'s pick.
"""

from __future__ import annotations

import copy
import dataclasses
import statistics

import torch

from moekit import MoE, MoEConfig
from moekit.apps.bench import machine_info, median_times
from timing import timing_arguments, write_json

SHAPES = (  # d_model, d_ff, experts, top_k
    (128, 512, 8, 2),
    (256, 512, 8, 2),
    (512, 1024, 8, 2),
    (512, 128, 64, 8),
)
PATHS = ("gemv", "small_batch", "grouped_mm")


def _on(moe: MoE, path: str) -> MoE:
    layer = copy.deepcopy(moe)
    layer.config = dataclasses.replace(layer.config, compute=path)
    return layer


def measure(repeats: int, tokens=(1, 4, 16, 64)) -> list[dict]:
    rows = []
    for d_model, d_ff, experts, top_k in SHAPES:
        torch.manual_seed(0)
        moe = MoE(MoEConfig(d_model=d_model, d_ff=d_ff, num_experts=experts, top_k=top_k)).eval()
        layers = {path: _on(moe, path) for path in (*PATHS, "loop")}
        for T in tokens:
            x = torch.randn(T, d_model)
            with torch.no_grad():
                reference = layers["loop"](x).y
                for path in PATHS:
                    torch.testing.assert_close(layers[path](x).y, reference, rtol=1e-4, atol=1e-5)
                times = median_times({p: (lambda m=layers[p], x=x: m(x)) for p in PATHS}, repeats, calls=20)
                auto = moe.compute_path(x).name
            medians = {p: statistics.median(t) * 1e6 for p, t in times.items()}
            rows.append({"d_model": d_model, "d_ff": d_ff, "experts": experts, "top_k": top_k, "tokens": T,
                         "expert_mib": 3 * d_model * d_ff * 4 / 2**20, "us": medians,
                         "gemv_speedup_vs_best_other": min(medians["small_batch"], medians["grouped_mm"])
                         / medians["gemv"], "auto": auto})
    return rows


def main() -> None:
    args = timing_arguments(__doc__)
    rows = measure(args.repeats)
    print("| D | F | E | K | MiB per expert | T | gemv µs | small_batch µs | grouped_mm µs "
          "| gemv speed-up vs the faster other | auto |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        us = r["us"]
        print(f"| {r['d_model']} | {r['d_ff']} | {r['experts']} | {r['top_k']} | {r['expert_mib']:.2f} | "
              f"{r['tokens']} | {us['gemv']:.0f} | {us['small_batch']:.0f} | {us['grouped_mm']:.0f} | "
              f"{r['gemv_speedup_vs_best_other']:.2f} | {r['auto']} |")
    write_json(args.json, {"machine": machine_info(), "repeats": args.repeats, "rows": rows})


if __name__ == "__main__":
    main()
