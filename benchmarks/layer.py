"""How fast is one MoE layer against the ideal and against its peers?

Side by side in one process, on the same inputs and the same routing: moekit's
compute paths, a dense SwiGLU with the same active FLOPs (hidden K·F on the
same T tokens: the ideal), and Hugging Face transformers' MixtralSparseMoeBlock
with the same weights (eager and grouped_mm experts). Efficiency
η = t_dense / t_moe. Prints a table and writes JSON.

    python benchmarks/layer.py                      # the standard shape, fwd+bwd
    python benchmarks/layer.py --mode fwd --repeats 9
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from moekit import MoE, MoEConfig  # noqa: E402
from timing import machine_info, median, median_times  # noqa: E402


def dense_swiglu(d_model: int, hidden: int, dtype: torch.dtype):
    w_in = torch.nn.Parameter(torch.randn(2 * hidden, d_model, dtype=dtype) / d_model**0.5)
    w_out = torch.nn.Parameter(torch.randn(d_model, hidden, dtype=dtype) / hidden**0.5)

    def forward(x):
        gate, up = F.linear(x, w_in).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, w_out)

    return forward, [w_in, w_out]


def mixtral_block(moe: MoE, implementation: str):
    """A transformers Mixtral block holding exactly moekit's weights."""
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    c = moe.config
    config = MixtralConfig(hidden_size=c.d_model, intermediate_size=c.d_ff, num_local_experts=c.num_experts,
                           num_experts_per_tok=c.top_k, router_jitter_noise=0.0)
    config._experts_implementation = implementation
    block = MixtralSparseMoeBlock(config).to(moe.experts.w_in.dtype)
    with torch.no_grad():
        block.gate.weight.copy_(moe.router.weight)
        block.experts.gate_up_proj.copy_(moe.experts.w_in)
        block.experts.down_proj.copy_(moe.experts.w_out)
    return block


def step_fn(forward, params, x, grad_y, backward: bool):
    def run():
        for p in params:
            p.grad = None
        if backward:
            x.grad = None
            forward(x).backward(grad_y)
        else:
            with torch.no_grad():
                forward(x)

    return run


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--d-ff", type=int, default=1024)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--mode", choices=["fwd", "fwdbwd"], default="fwdbwd")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--paths", default="grouped_mm,segment,loop")
    parser.add_argument("--peers", default="eager,grouped_mm", help="transformers experts implementations, or ''")
    parser.add_argument("--threads", type=int, default=None, help="intra-op threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=Path("bench-results/layer.json"))
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)
    T, D, Fh, E, K = args.tokens, args.d_model, args.d_ff, args.experts, args.top_k
    backward = args.mode == "fwdbwd"
    x = torch.randn(1, T, D, dtype=dtype, requires_grad=backward)
    grad_y = torch.randn(1, T, D, dtype=dtype)

    base = MoE(MoEConfig(d_model=D, d_ff=Fh, num_experts=E, top_k=K, load_balance_coef=0.0)).to(dtype)
    cases = {}
    dense_forward, dense_params = dense_swiglu(D, K * Fh, dtype)
    cases["dense (ideal)"] = step_fn(dense_forward, dense_params, x, grad_y, backward)
    for path in [p for p in args.paths.split(",") if p]:
        layer = MoE(MoEConfig(**{**base.config.__dict__, "compute": path})).to(dtype)
        layer.load_state_dict(base.state_dict())
        cases[f"moekit {path}"] = step_fn(lambda x, m=layer: m(x).y, list(layer.parameters()), x, grad_y, backward)
    for impl in [p for p in args.peers.split(",") if p]:
        block = mixtral_block(base, impl)
        cases[f"transformers {impl}"] = step_fn(block, list(block.parameters()), x, grad_y, backward)

    times = median_times(cases, repeats=args.repeats)
    t_dense = median(times["dense (ideal)"])
    flops = 6 * D * Fh * T * K * (3 if backward else 1)
    rows = []
    for name, ts in times.items():
        t = median(ts)
        rows.append({"case": name, "median_s": t, "min_s": min(ts), "max_s": max(ts), "eta": t_dense / t,
                     "gflops": flops / t / 1e9})
    moekit_best = min(r["median_s"] for r in rows if r["case"].startswith("moekit"))
    print(f"T={T} D={D} F={Fh} E={E} K={K} {args.dtype} {args.mode}, median of {args.repeats} "
          f"(threads={torch.get_num_threads()})")
    print(f"{'case':28s} {'median ms':>10s} {'η':>6s} {'GFLOP/s':>8s} {'best moekit ×':>14s}")
    for r in rows:
        print(f"{r['case']:28s} {r['median_s'] * 1e3:10.1f} {r['eta']:6.2f} {r['gflops']:8.1f} "
              f"{r['median_s'] / moekit_best:14.2f}")
    result = {"args": {k: str(v) for k, v in vars(args).items()}, "machine": machine_info(), "rows": rows}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
