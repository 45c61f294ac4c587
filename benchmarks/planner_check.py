"""The cost model of ``moekit plan`` against what it predicts: measured training steps on 1, 2 and 4
gloo ranks here, and one published configuration.

    python benchmarks/planner_check.py [--record]   # --record writes docs/figures/planner.json

1. Calibration, on this machine: the GEMM rate (the model's three kinds of matrix
   product, forward shapes, one thread), the memory bandwidth (a 64 MiB copy), and
   gloo's all-to-all latency and bandwidth between 2 processes (4 KiB and 4 MiB).
2. Measured: the LM training step of ``benchmarks/expert_parallel_lm.py``'s shape
   (4 MoE blocks, D = 128, E = 8, K = 2, expert width 256, vocabulary 4096, 16 × 128
   tokens per step) at 1, 2 and 4 processes (EP = processes, DDP), one thread each:
   the median of 5 steps after 2, the slowest rank; and the memory each rank added to its
   resident set between start-up and the end of a forward (activations held, weights,
   gradients and AdamW state allocated), the largest over steps and ranks.
3. Predicted: ``moekit.parallel.planner.predict`` with the calibrated rates (the
   GEMM rate shared when there are more processes than cores), fp32.
4. Published: GPT-OSS-120B on 64 B200 GPUs, EP 8, no TP/PP/CP, BF16, global batch
   512 × 4096, micro-batch 4, 2 micro-batches: 8213 tokens/s per GPU reported in
   NVIDIA Megatron-Bridge's performance summary (NeMo 25.11, DGX-B200 table),
   against the planner's ``b200`` hardware.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ranks import init_rank, spawn_ranks, timed_train_step

FIGURES = Path(__file__).resolve().parent.parent / "docs" / "figures" / "planner.json"
SHAPE = dict(n_layer=4, d_model=128, n_head=4, vocab=4096, seq=128, num_experts=8, top_k=2, expert_d_ff=256)
GLOBAL_SEQUENCES = 16
PUBLISHED = {"model": "gpt-oss-120b", "hardware": "b200", "devices": 64, "ep": 8, "tokens": 4 * 4096,
             "grad_accumulation": 2, "tokens_per_s_per_device": 8213.0,
             "source": "NVIDIA Megatron-Bridge docs/performance-summary.md, NeMo 25.11 container, DGX-B200 table "
                       "(GPT OSS 120B, 64 GPUs, BF16, GBS 512, MBS 4, seq 4096, FSDP 0, TP 1, PP 1, CP 1, EP 8, GA 2)"}


def _time(fn, repeats: int = 7) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def calibrate_compute() -> dict:
    torch.set_num_threads(1)
    T, D, F, V = GLOBAL_SEQUENCES * SHAPE["seq"], SHAPE["d_model"], SHAPE["expert_d_ff"], SHAPE["vocab"]
    shapes = [(T, D, 3 * D), (T * SHAPE["top_k"] // SHAPE["num_experts"], D, 2 * F), (T, D, V)]
    flops = seconds = 0.0
    for m, k, n in shapes:
        a, b = torch.randn(m, k), torch.randn(k, n)
        seconds += _time(lambda a=a, b=b: a @ b)
        flops += 2.0 * m * k * n
    src, dst = torch.randn(16 * 2**20), torch.empty(16 * 2**20)
    copy = _time(lambda: dst.copy_(src))
    return {"gemm_flops": flops / seconds, "memory_bandwidth": 2 * src.numel() * 4 / copy}


def _a2a_rank(rank, world, port, results):
    init_rank(rank, world, port)
    out = {}
    for size in (4096, 4 * 2**20):
        x = torch.randn(size // 4)
        y = torch.empty_like(x)
        out[size] = _time(lambda x=x, y=y: (dist.barrier(), dist.all_to_all_single(y, x)), repeats=11)
    results.put((rank, out))
    dist.destroy_process_group()


def calibrate_all_to_all() -> dict:
    times = spawn_ranks(_a2a_rank, 2)[0]
    small, large = times[4096], times[4 * 2**20]
    # Each rank sends half of the buffer to the other rank.
    return {"latency": small, "bandwidth": (4 * 2**20 - 4096) / 2 / max(large - small, 1e-9)}


def _resident_bytes() -> int:
    """This process's resident memory now (Linux)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _step_rank(rank, world, port, results):
    from moekit import MoEConfig
    from moekit.models.lm import LanguageModel, LMConfig
    from moekit.parallel import parallelize, setup_parallel

    init_rank(rank, world, port)
    base_rss = _resident_bytes()
    D = SHAPE["d_model"]
    config = LMConfig(vocab_size=SHAPE["vocab"], context_length=SHAPE["seq"], n_layer=SHAPE["n_layer"],
                      n_head=SHAPE["n_head"], d_model=D, d_ff=2 * D,
                      moe=MoEConfig(d_model=D, d_ff=SHAPE["expert_d_ff"], num_experts=SHAPE["num_experts"],
                                    top_k=SHAPE["top_k"]))
    torch.manual_seed(0)
    model = LanguageModel(config)
    parallel = setup_parallel(world, 600)
    train_model = parallelize(model, parallel)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    idx = torch.randint(0, SHAPE["vocab"], (GLOBAL_SEQUENCES, SHAPE["seq"]), generator=torch.Generator().manual_seed(1))
    times, resident = [], []
    for step in range(7):
        elapsed = timed_train_step(train_model, model, parallel, optimizer, idx,
                                   after_forward=lambda: resident.append(_resident_bytes()))
        if step >= 2:
            times.append(elapsed)
    peak = max(resident) - base_rss
    results.put((rank, {"step_s": statistics.median(times), "memory_bytes": peak}))
    dist.destroy_process_group()


def measure_steps(world: int) -> dict:
    reports = spawn_ranks(_step_rank, world)
    return {"step_s": reports[0]["step_s"], "memory_bytes": max(r["memory_bytes"] for r in reports.values())}


def main() -> None:
    from moekit.parallel.planner import (
        HARDWARE,
        MODELS,
        PRECISIONS,
        Hardware,
        Layout,
        ModelShape,
        predict,
    )

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--record", action="store_true", help=f"write the figures to {FIGURES}")
    args = parser.parse_args()
    compute, a2a = calibrate_compute(), calibrate_all_to_all()
    cores = len(os.sched_getaffinity(0))
    shape = ModelShape("benchmark LM", head_dim=SHAPE["d_model"] // SHAPE["n_head"], tied_embeddings=True, **SHAPE)
    rows = []
    device_rate = None  # the rate one process sustains on the whole step, from the 1-process measurement
    for world in (1, 2, 4):
        share = min(1.0, cores / world)
        tokens = GLOBAL_SEQUENCES * SHAPE["seq"] // world

        def hardware(rate, share=share, world=world):
            return Hardware("this machine", rate * share, 24 * 2**30, compute["memory_bandwidth"] * share, world,
                            a2a["bandwidth"], a2a["latency"], a2a["bandwidth"], a2a["latency"])

        predicted = predict(shape, hardware(compute["gemm_flops"]), Layout(world, world), tokens,
                            precision=PRECISIONS["fp32"])
        measured = measure_steps(world)
        if device_rate is None:
            other = predicted.step_s - predicted.seconds["compute"]
            device_rate = compute["gemm_flops"] * predicted.seconds["compute"] / (measured["step_s"] - other)
        calibrated = predict(shape, hardware(device_rate), Layout(world, world), tokens, precision=PRECISIONS["fp32"])
        rows.append({"processes": world, "predicted_step_s": round(predicted.step_s, 4),
                     "measured_step_s": round(measured["step_s"], 4),
                     "step_error": round(predicted.step_s / measured["step_s"] - 1, 3),
                     "step_calibrated_s": round(calibrated.step_s, 4),
                     "step_calibrated_error": round(calibrated.step_s / measured["step_s"] - 1, 3),
                     "predicted_memory_mib": round(predicted.memory_bytes / 2**20, 1),
                     "measured_memory_mib": round(measured["memory_bytes"] / 2**20, 1),
                     "memory_error": round(predicted.memory_bytes / measured["memory_bytes"] - 1, 3),
                     "predicted_seconds": {k: round(v, 4) for k, v in predicted.seconds.items()}})
    compute["device_rate"] = device_rate
    published = dict(PUBLISHED)
    prediction = predict(MODELS[published["model"]], HARDWARE[published["hardware"]],
                         Layout(published["devices"], published["ep"]), published["tokens"],
                         grad_accumulation=published["grad_accumulation"])
    published["predicted_tokens_per_s_per_device"] = round(prediction.tokens_per_s / published["devices"])
    published["error"] = round(published["predicted_tokens_per_s_per_device"]
                               / published["tokens_per_s_per_device"] - 1, 3)
    figures = {"calibration": {**{k: float(f"{v:.4g}") for k, v in compute.items()},
                               **{f"all_to_all_{k}": float(f"{v:.4g}") for k, v in a2a.items()}, "cores": cores},
               "local": rows, "published": published}
    print(markdown_tables(figures))
    print(json.dumps(figures))
    if args.record:
        FIGURES.write_text(json.dumps(figures, indent=1) + "\n")


def markdown_tables(figures: dict) -> str:
    lines = ["| processes | measured step | predicted (GEMM rate) | error | predicted (1-process rate) | error | "
             "predicted memory | measured memory | error |", "|---|---|---|---|---|---|---|---|---|"]
    for row in figures["local"]:
        lines.append(f"| {row['processes']} | {1e3 * row['measured_step_s']:.0f} ms | "
                     f"{1e3 * row['predicted_step_s']:.0f} ms | {100 * row['step_error']:+.0f} % | "
                     f"{1e3 * row['step_calibrated_s']:.0f} ms | {100 * row['step_calibrated_error']:+.0f} % | "
                     f"{row['predicted_memory_mib']:.0f} MiB | {row['measured_memory_mib']:.0f} MiB | "
                     f"{100 * row['memory_error']:+.0f} % |")
    p = figures["published"]
    lines += ["", "| configuration | reported tokens/s/GPU | predicted | error |", "|---|---|---|---|",
              f"| GPT-OSS-120B, {p['devices']} × B200, EP {p['ep']}, BF16 | {p['tokens_per_s_per_device']:.0f} | "
              f"{p['predicted_tokens_per_s_per_device']:.0f} | {100 * p['error']:+.0f} % |"]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
