"""Where the time of one MoE layer call goes: the profiler's table of kernels and
ops for moekit's paths and transformers' block at one shape, and whether a call
waits on the device (a host sync).

    python benchmarks/profile_layer.py --device cuda --dtype bfloat16 --shape standard
    python benchmarks/profile_layer.py --shape fine-grained --mode fwd --rows 30
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from moekit.apps.bench import (
    FINE_GRAINED,
    SCALED,
    STANDARD,
    Case,
    DenseSwiGLU,
    _hf_peer,
    fixed_assignment,
    synchronize,
)
from moekit.config import MoEConfig
from moekit.layer import MoE
from moekit.routing import FixedRouting

SHAPES = {"standard": STANDARD, "fine-grained": FINE_GRAINED, "scaled": SCALED,
          "decode": dict(STANDARD, tokens=1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--shape", choices=SHAPES, default="standard")
    parser.add_argument("--mode", choices=["fwd", "fwdbwd"], default="fwdbwd")
    parser.add_argument("--paths", default="grouped_mm", help="comma-separated moekit paths")
    parser.add_argument("--peer", default="", help="e.g. mixtral:grouped_mm or qwen3:grouped_mm")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--rows", type=int, default=20)
    args = parser.parse_args()
    shape = SHAPES[args.shape]
    case = Case(name=args.shape, dtype=args.dtype, device=args.device, mode=args.mode, **shape)
    dtype, device = getattr(torch, case.dtype), torch.device(case.device)
    T, D, E, K = case.tokens, case.d_model, case.num_experts, case.top_k
    base = MoE(MoEConfig(d_model=D, d_ff=case.d_ff, num_experts=E, top_k=K, load_balance_coef=0.0))
    base = base.to(device, dtype)
    forced = fixed_assignment(T, E, K, "uniform").to(device)
    x = torch.randn(1, T, D, device=device, dtype=dtype, requires_grad=args.mode == "fwdbwd")
    grad = torch.randn_like(x)
    impls = {"dense": DenseSwiGLU(D, K * case.d_ff).to(device, dtype)}
    for path in filter(None, args.paths.split(",")):
        layer = MoE(MoEConfig(**{**base.config.__dict__, "compute": path})).to(device, dtype)
        layer.load_state_dict(base.state_dict())
        layer.force_routing(FixedRouting(forced))
        impls[f"moekit {path}"] = lambda x, m=layer: m(x).y
    if args.peer:
        impls[f"transformers {args.peer}"] = _hf_peer(base, args.peer, forced)

    def call(fn):
        if args.mode == "fwdbwd":
            fn(x).backward(grad)
        else:
            with torch.no_grad():
                fn(x)

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    for name, fn in impls.items():
        for _ in range(3):
            call(fn)
        synchronize(device)
        if device.type == "cuda":
            torch.cuda.set_sync_debug_mode("warn")
            import warnings

            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                call(fn)
            torch.cuda.set_sync_debug_mode(0)
            syncs = [str(w.message).splitlines()[0] for w in caught if "synchroniz" in str(w.message)]
            print(f"== {name}: {len(syncs)} host syncs per call {syncs[:3]}")
        with profile(activities=activities) as prof:
            for _ in range(args.iters):
                call(fn)
            synchronize(device)
        sort = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
        averages = prof.key_averages()
        print(f"== {name}: {args.shape} {args.mode} {args.dtype}, {args.iters} calls")
        print(averages.table(sort_by=sort, row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
