"""How close does each router's MoE layer come to a dense layer of equal FLOPs?

For every router: η = t_dense / t_moe, forward + backward, where the dense
layer is one SwiGLU of hidden width K·F on the same T tokens (the FLOPs of the
K experts each token uses), run through moekit's own experts. K is what each
router really uses: top_k for token choice, 1 for switch and hash, E for the
dense softmax gate, the capacity factor (= top_k) for expert choice, and
E·P / L for Soft MoE, whose P is set so that E·P / L = top_k.

The fine-grained shape (E = 64, K = 8, F = 128) is also run through
transformers' Qwen3MoeSparseMoeBlock with its grouped_mm experts, configured
the same way; ratio = t_transformers / t_moekit (above 1: moekit is faster).

Medians of --repeats timed runs after --warmup, the candidates interleaved in one
process so that load from other processes hits them alike. Prints a table and
writes JSON (default bench-results/routers.json, --json to change).

    .venv/bin/python benchmarks/routers.py            # CPU fp32, a few minutes on 2 cores
    .venv/bin/python benchmarks/routers.py --quick    # smaller, for a smoke run

Shapes: T tokens, D model dim, F expert hidden dim, E experts, K experts per token.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch

from moekit import MoE, MoEConfig, StackedExperts  # noqa: E402
from moekit.apps.bench import machine_info, median_times  # noqa: E402

ROUTER_FIELDS = {
    "softmax": {"router": "softmax"},
    "topk": {"router": "topk"},
    "noisy_topk": {"router": "noisy_topk"},
    "switch": {"router": "switch", "router_jitter": 0.0},
    "expert_choice": {"router": "expert_choice"},
    "sigmoid": {"router": "sigmoid"},
    "sigmoid_groups": {"router": "sigmoid", "num_expert_groups": 4, "topk_groups": 2},
    "soft": {"router": "soft"},
    "hash": {"router": "hash", "hash_vocab_size": 50_000},
    "topk_shared": {"router": "topk", "num_shared_experts": 1},
}


def active_experts(name: str, config: MoEConfig, seq_len: int) -> float:
    """Experts' worth of FLOPs each token uses (shared experts counted too)."""
    router = config.router
    if router == "softmax":
        k = config.num_experts
    elif router in ("switch", "hash"):
        k = 1
    elif router == "soft":
        k = config.num_experts * config.slots_per_expert / seq_len
    else:
        k = config.top_k
    return k + config.num_shared_experts * config.shared_d_ff / config.d_ff


def fwd_bwd(module: torch.nn.Module, forward, x: torch.Tensor, grad: torch.Tensor):
    def step():
        for p in module.parameters():
            p.grad = None
        x.grad = None
        forward(x).backward(grad)

    return step


def interleaved_medians(steps: dict, repeats: int, warmup: int) -> dict[str, float]:
    return {name: statistics.median(t) for name, t in median_times(steps, repeats, warmup).items()}


def dense_swiglu(d_model: int, hidden: int) -> StackedExperts:
    return StackedExperts(1, d_model, hidden, kind="swiglu")


def router_rows(args) -> list[dict]:
    D, F, E, K, L, B = args.d_model, args.d_ff, args.experts, args.top_k, args.seq_len, args.batch
    x = torch.randn(B, L, D, requires_grad=True)
    grad = torch.randn(B, L, D)
    token_ids = torch.randint(0, 50_000, (B, L))
    rows = []
    for name, fields in ROUTER_FIELDS.items():
        extra = {}
        if fields["router"] == "soft":
            extra["slots_per_expert"] = max(1, K * L // E)
        top_k = {"softmax": E, "switch": 1, "hash": 1}.get(fields["router"], K)
        config = MoEConfig(d_model=D, d_ff=F, num_experts=E, top_k=top_k, compute=args.compute, **fields, **extra)
        torch.manual_seed(0)
        moe = MoE(config).train()
        k_active = active_experts(name, config, L)
        dense = dense_swiglu(D, round(k_active * F))
        steps = {
            "moe": fwd_bwd(moe, lambda x, m=moe: m(x, token_ids=token_ids).y, x, grad),
            "dense": fwd_bwd(dense, lambda x, d=dense: d.forward_expert(0, x), x, grad),
        }
        t = interleaved_medians(steps, args.repeats, args.warmup)
        rows.append({
            "router": name, "T": B * L, "D": D, "F": F, "E": E, "K_active": k_active,
            "t_moe_ms": 1e3 * t["moe"], "t_dense_ms": 1e3 * t["dense"], "eta": t["dense"] / t["moe"],
        })
        print(f"{name:>15}  K={k_active:<5g} moe {1e3 * t['moe']:8.2f} ms  dense {1e3 * t['dense']:8.2f} ms  "
              f"η = {t['dense'] / t['moe']:.2f}", flush=True)
    return rows


def qwen3_block(moe: MoE):
    """transformers' Qwen3-MoE block with grouped_mm experts holding exactly moekit's
    weights (same softmax top-k routing, renormalised), or None without transformers."""
    try:
        from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock
    except ImportError:
        return None
    c = moe.config
    config = Qwen3MoeConfig(hidden_size=c.d_model, moe_intermediate_size=c.d_ff, num_experts=c.num_experts,
                            num_experts_per_tok=c.top_k, norm_topk_prob=True, hidden_act="silu")
    config._experts_implementation = "grouped_mm"
    block = Qwen3MoeSparseMoeBlock(config)
    with torch.no_grad():
        block.gate.weight.copy_(moe.router.weight)
        block.experts.gate_up_proj.copy_(moe.experts.w_in)
        block.experts.down_proj.copy_(moe.experts.w_out)
    return block


def fine_grained_rows(args) -> list[dict]:
    D, F, E, K, L, B = args.d_model, 128, 64, 8, args.seq_len, args.batch
    x = torch.randn(B, L, D, requires_grad=True)
    grad = torch.randn(B, L, D)
    dense = dense_swiglu(D, K * F)
    steps = {"dense": fwd_bwd(dense, lambda x: dense.forward_expert(0, x), x, grad)}
    for compute in ("segment", "grouped_mm"):
        torch.manual_seed(0)
        moe = MoE(MoEConfig(d_model=D, d_ff=F, num_experts=E, top_k=K, router="topk", compute=compute))
        with torch.no_grad():
            moe.router.weight.normal_(0, 0.5)  # decisive routing, so both libraries pick the same experts
        steps[f"moekit_{compute}"] = fwd_bwd(moe, lambda x, m=moe: m(x).y, x, grad)
    block = qwen3_block(moe)
    if block is not None:
        with torch.no_grad():
            difference = (block(x) - moe(x).y).abs().max().item()
        if difference > 1e-4:
            raise RuntimeError(f"transformers' block and moekit disagree by {difference:.2e}: not the same layer")
        steps["transformers_grouped_mm"] = fwd_bwd(block, block, x, grad)
    t = interleaved_medians(steps, args.repeats, args.warmup)
    rows = []
    for name, seconds in t.items():
        if name == "dense":
            continue
        row = {"impl": name, "T": B * L, "D": D, "F": F, "E": E, "K": K, "t_ms": 1e3 * seconds,
               "eta": t["dense"] / seconds}
        if "transformers_grouped_mm" in t and name.startswith("moekit"):
            row["transformers_over_moekit"] = t["transformers_grouped_mm"] / seconds
        rows.append(row)
        ratio = f"  transformers/moekit = {row['transformers_over_moekit']:.2f}" if "transformers_over_moekit" in row else ""
        print(f"{name:>24}  {1e3 * seconds:8.2f} ms  η = {row['eta']:.2f}{ratio}", flush=True)
    print(f"{'dense SwiGLU (K·F)':>24}  {1e3 * t['dense']:8.2f} ms")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--d-ff", type=int, default=256)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--compute", default="auto")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    parser.add_argument("--quick", action="store_true", help="T = 256, D = 64, 5 repeats: a smoke run")
    parser.add_argument("--json", type=Path, default=Path("bench-results/routers.json"))
    args = parser.parse_args()
    if args.quick:
        args.d_model, args.d_ff, args.seq_len, args.batch, args.repeats, args.warmup = 64, 64, 64, 4, 5, 1
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    machine = machine_info()
    print(f"CPU fp32, {machine}; median of {args.repeats} fwd+bwd after {args.warmup} warm-up")
    print(f"\nRouters: T={args.batch * args.seq_len}, D={args.d_model}, F={args.d_ff}, E={args.experts}, "
          f"K={args.top_k}, compute={args.compute}")
    routers = router_rows(args)
    print(f"\nFine-grained: T={args.batch * args.seq_len}, D={args.d_model}, F=128, E=64, K=8")
    fine = fine_grained_rows(args)
    args.json.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "device": "cpu", "dtype": "float32", "machine": machine, "repeats": args.repeats,
        "warmup": args.warmup, "routers": routers, "fine_grained": fine,
    }
    args.json.write_text(json.dumps(result, indent=2))
    print(f"\nwrote {args.json}")


if __name__ == "__main__":
    main()
