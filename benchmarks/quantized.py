"""Quantized experts: memory, decode speed against float32 and bfloat16, loss change.

    python benchmarks/quantized.py --threads 2 --repeats 5 [--run runs/demo/moe-seed0]

Part 1: the MoE layer at the standard shape (D = 512, F = 1024, E = 8, K = 2, SwiGLU)
at decode sizes T = 1, 4, 16: forward time per call, no gradients, medians of
interleaved rounds, on ``auto``'s path (and int8 also on ``small_batch``). Part 2 (with ``--run``): the run's language model generating 64
tokens after a 32-token prompt, tokens/s per precision, and its validation loss
(the run's validation split, 16 batches). Its last row, "experts free", is the float32
model with its experts' computation taking no time (they return zeros; the router,
attention, norms and the MoE layers' host work still run): the speed no expert
format can exceed, so the bound on any quantization's speed-up there.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics
import time
from pathlib import Path

import torch

from moekit import MoE, MoEConfig
from moekit.apps.bench import median_times
from moekit.experts.base import Experts
from moekit.inference import quantize_model

PRECISIONS = ("float32", "bfloat16", "int8", "int4")
EXPERTS_FREE = "experts free"
INT8_SMALL_BATCH = "int8 (small_batch)"


def variant(module: torch.nn.Module, precision: str) -> torch.nn.Module:
    module = copy.deepcopy(module)
    if precision == "bfloat16":
        return module.to(torch.bfloat16)
    if precision in ("int8", "int4"):
        return quantize_model(module, bits=int(precision[3:]), group_size=64)
    return module


def weight_mib(module: torch.nn.Module) -> float:
    return sum(t.numel() * t.element_size() for t in module.state_dict().values()) / 2**20


def layer_table(repeats: int) -> list[dict]:
    torch.manual_seed(0)
    layer = MoE(MoEConfig(d_model=512, d_ff=1024, num_experts=8, top_k=2)).eval()
    variants = {p: variant(layer, p) for p in PRECISIONS}
    # int8 on torch's packed kernel, the path auto took for one token before gemv did.
    variants[INT8_SMALL_BATCH] = copy.deepcopy(variants["int8"])
    variants[INT8_SMALL_BATCH].config = dataclasses.replace(variants["int8"].config, compute="small_batch")
    rows = []
    for T in (1, 4, 16):
        x = torch.randn(T, 512)
        inputs = {p: x.to(torch.bfloat16) if p == "bfloat16" else x for p in variants}
        fns = {p: (lambda m=m, x=inputs[p]: m(x)) for p, m in variants.items()}
        with torch.no_grad():
            times = median_times(fns, repeats, calls=20)
        base = statistics.median(times["float32"])
        for p in variants:
            t = statistics.median(times[p])
            rows.append({"tokens": T, "precision": p, "us": t * 1e6, "speedup_vs_float32": base / t,
                         "weights_mib": weight_mib(variants[p])})
    return rows


def lm_table(run: str, repeats: int) -> list[dict]:
    from moekit.apps.common import load_model
    from moekit.data import load_corpus, validation_batches
    from moekit.data.dataset import encode_documents
    from moekit.train import evaluate, read_run_config

    model, tokenizer, _, _ = load_model(run)
    _, _, data_info = read_run_config(Path(run))
    corpus = load_corpus(data_info["data"], data_info["val_fraction"])
    val = encode_documents(tokenizer, [d.text for d in corpus.val])
    batches = validation_batches(val, 16, model.config.context_length, 16)
    prompt = val[:32].view(1, -1)
    variants = {p: variant(model, p) for p in PRECISIONS}
    speeds: dict[str, list[float]] = {p: [] for p in (*PRECISIONS, EXPERTS_FREE)}

    def tokens_per_s(m) -> float:
        start = time.perf_counter()
        list(m.generate(prompt, 64, temperature=0))
        return 64 / (time.perf_counter() - start)

    for _ in range(repeats):
        for p, m in variants.items():
            speeds[p].append(tokens_per_s(m))
        run = Experts.run
        Experts.run = lambda self, compute, x, *args: x.new_zeros(x.shape[0], x.shape[-1])
        try:
            speeds[EXPERTS_FREE].append(tokens_per_s(variants["float32"]))
        finally:
            Experts.run = run
    losses = {p: evaluate(m, batches, "cpu") for p, m in variants.items()}
    base_speed, base_loss = statistics.median(speeds["float32"]), losses["float32"]
    rows = [{"precision": p, "tokens_per_s": statistics.median(speeds[p]),
             "speedup_vs_float32": statistics.median(speeds[p]) / base_speed, "val_loss": losses[p],
             "loss_change_pct": 100 * (losses[p] / base_loss - 1), "weights_mib": weight_mib(variants[p]),
             "expert_mib": sum(weight_mib(layer.experts) for layer in variants[p].modules() if isinstance(layer, MoE))}
            for p in PRECISIONS]
    free = statistics.median(speeds[EXPERTS_FREE])
    return rows + [{"precision": EXPERTS_FREE, "tokens_per_s": free, "speedup_vs_float32": free / base_speed}]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--run", default=None, help="a trained MoE run (the demo's) for part 2")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"threads {args.threads}\n\n## The layer at decode sizes (standard shape)\n")
    print("| T | precision | µs per call | × float32 speed | expert weights MiB |")
    print("|---|---|---|---|---|")
    for r in layer_table(args.repeats):
        print(f"| {r['tokens']} | {r['precision']} | {r['us']:.0f} | {r['speedup_vs_float32']:.2f} | "
              f"{r['weights_mib']:.1f} |")
    if args.run:
        print(f"\n## Generation and validation loss: {args.run}\n")
        print("| precision | tokens/s | × float32 speed | validation loss | change | model MiB | experts MiB |")
        print("|---|---|---|---|---|---|---|")
        for r in lm_table(args.run, args.repeats):
            if r["precision"] == EXPERTS_FREE:
                print(f"| {r['precision']} | {r['tokens_per_s']:.1f} | {r['speedup_vs_float32']:.2f} | | | | |")
                continue
            print(f"| {r['precision']} | {r['tokens_per_s']:.1f} | {r['speedup_vs_float32']:.2f} | "
                  f"{r['val_loss']:.4f} | {r['loss_change_pct']:+.3f} % | {r['weights_mib']:.2f} | "
                  f"{r['expert_mib']:.2f} |")


if __name__ == "__main__":
    main()
