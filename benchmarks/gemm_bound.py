"""How fast could any MoE layer be on this machine? The matrix multiplies alone.

Times, side by side in one process, at the standard and fine-grained shapes
(fp32, forward + backward, perfectly balanced routing):

- ``expert GEMMs only``: the six matrix multiplies per expert that every
  dropless implementation must run (two forward, four backward), on buffers
  allocated and touched once, nothing else: no routing, gather, activation
  or combine;
- ``dense GEMMs only``: the same for the dense layer of equal FLOPs;
- moekit's layer (``auto``) and transformers' blocks on the same weights.

A layer cannot beat its own GEMMs, so ``t_peer / t_expert_GEMMs`` bounds the
speed-up any implementation built on this platform's GEMMs can show over that
peer.

    python benchmarks/gemm_bound.py --repeats 7
"""

from __future__ import annotations

import argparse
import statistics

import torch

from moekit.apps.bench import (
    FINE_GRAINED,
    STANDARD,
    DenseSwiGLU,
    _hf_peer,
    fixed_assignment,
    median_times,
)
from moekit.config import MoEConfig
from moekit.layer import MoE
from moekit.routing import FixedRouting


def gemm_steps(rows: int, d_model: int, d_ff: int, groups: int):
    """The six GEMMs of a GLU MLP's forward + backward on ``groups`` blocks of ``rows`` rows."""
    H = 2 * d_ff

    def buffers(*shape):
        return [torch.randn(*shape) for _ in range(groups)]

    x, g_h, g_y = buffers(rows, d_model), buffers(rows, H), buffers(rows, d_model)
    a = buffers(rows, d_ff)
    w_in, w_out = buffers(H, d_model), buffers(d_model, d_ff)
    h, y, g_a, g_x = buffers(rows, H), buffers(rows, d_model), buffers(rows, d_ff), buffers(rows, d_model)
    g_w_in, g_w_out = buffers(H, d_model), buffers(d_model, d_ff)

    def run():
        for e in range(groups):
            torch.mm(x[e], w_in[e].t(), out=h[e])
            torch.mm(a[e], w_out[e].t(), out=y[e])
            torch.mm(g_y[e], w_out[e], out=g_a[e])
            torch.mm(g_y[e].t(), a[e], out=g_w_out[e])
            torch.mm(g_h[e], w_in[e], out=g_x[e])
            torch.mm(g_h[e].t(), x[e], out=g_w_in[e])

    return run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    cases = {"standard": (STANDARD, ("mixtral:grouped_mm", "mixtral:eager")),
             "fine-grained": (FINE_GRAINED, ("qwen3:grouped_mm",))}
    for name, (shape, peers) in cases.items():
        T, D, F_, E, K = (shape[k] for k in ("tokens", "d_model", "d_ff", "num_experts", "top_k"))
        torch.manual_seed(0)
        forced = fixed_assignment(T, E, K, "uniform")
        moe = MoE(MoEConfig(d_model=D, d_ff=F_, num_experts=E, top_k=K, load_balance_coef=0.0))
        moe.force_routing(FixedRouting(forced))
        dense = DenseSwiGLU(D, K * F_)
        x = torch.randn(1, T, D, requires_grad=True)
        grad_y = torch.randn(1, T, D)

        def step(module, x=x, grad_y=grad_y):
            def run():
                x.grad = None
                module.zero_grad(set_to_none=True)
                out = module(x)
                (out.y if hasattr(out, "y") else out).backward(grad_y)

            return run

        fns = {
            "expert GEMMs only": gemm_steps(T * K // E, D, F_, E),
            "dense GEMMs only": gemm_steps(T, D, K * F_, 1),
            "dense layer": step(dense),
            "moekit (auto)": step(moe),
        }
        for spec in peers:
            fns[f"transformers {spec}"] = step(_hf_peer(moe, spec, forced))
        times = {k: statistics.median(v) for k, v in median_times(fns, args.repeats).items()}
        bound = times["expert GEMMs only"]
        print(f"\n{name}: T={T} D={D} F={F_} E={E} K={K}, fp32 forward + backward, median of {args.repeats}")
        print(f"  {'':32} {'ms':>8} {'÷ expert GEMMs':>15}")
        for impl, t in times.items():
            print(f"  {impl:32} {t * 1e3:8.1f} {t / bound:15.2f}")


if __name__ == "__main__":
    main()
