"""Expert offloading: decode tokens/s against the expert cache size, with and without
prefetch, hit rate per policy (measured, and simulated on a recorded trace), and the
peak memory of a disk-backed ``moekit generate --max-memory`` run.

    python benchmarks/offload.py --threads 2 --repeats 3 [--trained runs/demo/moe-seed0]

The speed model is a moekit LM with 16 experts of 6 MiB per layer (4 MoE layers,
D = 512, expert width 1024, top-2; 384 MiB of experts), written as a run folder once
and read from its checkpoint file; its routing is that of a model trained one step
(a router initialised with std 1, so that tokens spread over the experts: the hard case for a cache). ``--trained`` adds hit rates on a
trained run's routing (the demo's MoE).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

from moekit.apps.common import load_model
from moekit.inference import load_offloaded_run, record_cache_accesses, record_routing, simulate
from moekit.layer import moe_layers

SPEED_RUN = Path("bench-results/offload-model")
TRAIN = ["--steps", "1", "--layers", "4", "--d-model", "512", "--heads", "8", "--d-ff", "2048", "--experts", "16",
         "--expert-d-ff", "1024", "--top-k", "2", "--tokenizer", "bytes", "--context-length", "256",
         "--batch-size", "2", "--eval-every", "1", "--eval-batches", "1", "--router-init-std", "1.0"]


def ensure_speed_run() -> Path:
    if not (SPEED_RUN / "checkpoints" / "latest.json").exists():
        subprocess.run([sys.executable, "-m", "moekit", "train", "--out", str(SPEED_RUN), *TRAIN], check=True,
                       stderr=subprocess.DEVNULL)
    return SPEED_RUN


def decode(model, prompt, new_tokens: int, temperature: float = 0.0) -> tuple[float, torch.Tensor]:
    """Tokens/s; sampling (temperature 1, a fixed seed) keeps the barely trained speed model
    from repeating one token, and so one routing."""
    generator = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    tokens = torch.cat(list(model.generate(prompt, new_tokens, temperature=temperature,
                                           generator=generator)), dim=1)
    return new_tokens / (time.perf_counter() - start), tokens


def speed_table(run: Path, repeats: int, new_tokens: int) -> list[dict]:
    resident, _, _, _ = load_model(str(run))
    prompt = torch.randint(0, resident.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(0))
    num_experts = resident.config.moe.num_experts
    setups = [("resident", None, None, False)]
    for cached in (num_experts, num_experts // 2, num_experts // 4, num_experts // 8):
        for prefetch in (False, True):
            setups.append((f"{cached}/{num_experts} cached", cached, "lru", prefetch))
    models = {}
    for name, cached, policy, prefetch in setups:
        if cached is None:
            models[(name, prefetch)] = (resident, None)
        else:
            model, _, _, offloaded, _ = load_offloaded_run(run, experts_per_layer=cached, policy=policy,
                                                           prefetch=prefetch)
            models[(name, prefetch)] = (model, offloaded)
    speeds: dict = {key: [] for key in models}
    hit_rates: dict = {}
    for _ in range(repeats):  # interleaved rounds: the machine's drift hits every setup alike
        for key, (model, offloaded) in models.items():
            if offloaded is not None:
                offloaded.reset_stats()
            tokens_per_s, _ = decode(model, prompt, new_tokens, temperature=1.0)
            speeds[key].append(tokens_per_s)
            if offloaded is not None:
                hit_rates[key] = offloaded.stats()["hit_rate"]
    base = statistics.median(speeds[("resident", False)])
    rows = []
    for key, values in speeds.items():
        median = statistics.median(values)
        rows.append({"setup": key[0], "prefetch": key[1], "tokens_per_s": median, "vs_resident": median / base,
                     "hit_rate": hit_rates.get(key)})
    for _, offloaded in models.values():
        if offloaded is not None:
            offloaded.close()
    return rows


def policy_table(run: Path, new_tokens: int) -> list[dict]:
    """Measured hit rates per policy and size with prefetch off, against the simulator on
    the resident model's trace of the same generation."""
    resident, _, _, _ = load_model(str(run))
    prompt = torch.randint(0, resident.config.vocab_size, (1, 32), generator=torch.Generator().manual_seed(1))
    for _, layer in moe_layers(resident):  # the path offloaded experts take: the same tokens bitwise
        layer.config.compute = "segment"
    with record_routing(resident) as trace:
        _, reference = decode(resident, prompt, new_tokens, temperature=1.0)
    num_experts = resident.config.moe.num_experts
    rows = []
    for cached in sorted({1, num_experts // 8, num_experts // 4, num_experts // 2, num_experts} - {0}):
        row = {"cached": cached}
        for policy in ("lru", "lfu"):
            for prefetch in (False, True):
                model, _, _, offloaded, _ = load_offloaded_run(run, experts_per_layer=cached, policy=policy,
                                                               prefetch=prefetch)
                with record_cache_accesses(offloaded) as own:
                    _, tokens = decode(model, prompt, new_tokens, temperature=1.0)
                measured = offloaded.stats()
                offloaded.close()
                assert torch.equal(tokens, reference)
                simulated = simulate(own if prefetch else trace, policy, cached)
                assert (simulated.hits, simulated.misses) == (measured["hits"], measured["misses"]), (policy, cached)
                row[f"{policy}{'+prefetch' if prefetch else ''}"] = measured["hit_rate"]
        row["optimal"] = simulate(trace, "optimal", cached).hit_rate
        rows.append(row)
    return rows


def peak_rss(run: Path, max_memory: str, new_tokens: int) -> dict:
    out = subprocess.run([sys.executable, "-m", "moekit", "eval", str(run), "--max-memory", max_memory,
                          "--batches", "2", "--batch-size", "1"], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    gen = subprocess.run([sys.executable, "-m", "moekit", "generate", str(run), "--max-memory", max_memory,
                          "--max-new-tokens", str(new_tokens), "--temperature", "0", "--ignore-eot"],
                         capture_output=True, text=True, check=True)
    plan = next(line for line in gen.stderr.splitlines() if line.startswith("offloading:"))
    stats = next(line for line in gen.stderr.splitlines() if line.startswith("expert cache:"))
    return {"max_memory": max_memory, "eval_peak_rss_mib": result["peak_rss_mib"], "plan": plan,
            "generate": stats}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--new-tokens", type=int, default=48)
    parser.add_argument("--trained", default=None, help="a trained MoE run for hit rates on real routing")
    parser.add_argument("--max-memory", default="600MB", help="budget of the peak-memory run")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run = ensure_speed_run()
    weights_mib = (run / "checkpoints").glob("step-*/model.safetensors")
    print(f"model file: {next(weights_mib).stat().st_size / 2**20:.0f} MiB; threads {args.threads}")
    print("\n## Decode speed against the cache size (LRU; tokens/s, median of interleaved rounds)\n")
    print("| experts cached per layer | prefetch | tokens/s | × resident | hit rate |")
    print("|---|---|---|---|---|")
    for r in speed_table(run, args.repeats, args.new_tokens):
        hit = "" if r["hit_rate"] is None else f"{r['hit_rate']:.3f}"
        print(f"| {r['setup']} | {'yes' if r['prefetch'] else 'no'} | {r['tokens_per_s']:.1f} | "
              f"{r['vs_resident']:.2f} | {hit} |")
    for name, path in (("near-uniform routing (speed model)", run), ("trained routing", args.trained)):
        if path is None:
            continue
        print(f"\n## Hit rate per policy, {name}: measured = simulated on the trace\n")
        rows = policy_table(Path(path), args.new_tokens)
        keys = [k for k in rows[0] if k != "cached"]
        print("| experts cached per layer | " + " | ".join(keys) + " |")
        print("|---" * (len(keys) + 1) + "|")
        for row in rows:
            print(f"| {row['cached']} | " + " | ".join(f"{row[k]:.3f}" for k in keys) + " |")
    print(f"\n## Peak memory (VmHWM) of the disk-backed runs, --max-memory {args.max_memory}\n")
    print(json.dumps(peak_rss(run, args.max_memory, args.new_tokens), indent=1))


if __name__ == "__main__":
    main()
