"""Where a decode call's time goes: the whole layer against its kernel and a bare read of the same weights.

    python benchmarks/decode_split.py --threads 2 --repeats 7
    python benchmarks/decode_split.py --count      (work per call, no timing)

The MoE layer at the standard shape (D = 512, F = 1024, E = 8, K = 2, float32), forward
without gradients at T = 1, 4 and 16 tokens, as ``moekit bench``'s decode case runs it
(the same input every call). In one process, interleaved rounds of:

- ``layer``: the whole call (router, plan, balancing loss, the ``gemv`` kernel, output);
- ``kernel``: ``cpu_gemv.decode_mlp`` alone on the same routing (the experts' MLP);
- ``read``: a sum over the reached experts' weights (one torch call per projection and
  expert), the time to read those bytes with no arithmetic to speak of;
- ``host alone``: the layer with the kernel replaced by one returning zeros, so that no
  weight streams through the caches between one call's host work and the next's;
- ``copy``: the copy bandwidth ``moekit bench`` divides by.

``layer − kernel`` is the host work around the kernel; set against ``host alone`` it
shows what the weights streaming through the caches cost that work. ``kernel / read``
is how far the kernel is from reading its weights at the rate a plain sum does. ``--count`` prints
instead what one call at T = 1 does on the host, a measure that the machine's load
does not move: the tensor operations dispatched, and the Python and builtin function
calls made.
"""

from __future__ import annotations

import statistics
import sys

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from moekit import MoE, MoEConfig
from moekit.apps.bench import copy_bandwidth, machine_info, median_times
from moekit.compute.kernels import cpu_gemv
from timing import timing_arguments, write_json


def _split(moe: MoE, x: torch.Tensor, repeats: int, calls: int) -> tuple[dict[str, float], list[int]]:
    """Median seconds of the layer, its kernel and a read of the reached experts' weights on x."""
    w_in, w_out = moe.experts.w_in.detach(), moe.experts.w_out.detach()
    weights = cpu_gemv.Weights(32, w_in), cpu_gemv.Weights(32, w_out)
    with torch.no_grad():
        out = moe(x)
        if moe.compute_path(x).name != "gemv":
            raise SystemExit(f"auto did not pick gemv at T = {x.shape[0]}: nothing to split")
        indices_TK, weights_TK = out.routing.indices_TK, out.routing.weights_TK.float()
        reached = sorted(set(indices_TK.reshape(-1).tolist()))

        experts = moe.experts

        def kernel():
            return cpu_gemv.decode_mlp(x, weights_TK, indices_TK, *weights, experts.b_in, experts.b_out,
                                       experts.activation, experts.is_glu)

        def read():
            for e in reached:
                w_in[e].sum()
                w_out[e].sum()

        def host_alone():
            decode_mlp = cpu_gemv.decode_mlp
            cpu_gemv.decode_mlp = lambda x_TD, *args: torch.zeros(x_TD.shape)
            try:
                return moe(x)
            finally:
                cpu_gemv.decode_mlp = decode_mlp

        torch.testing.assert_close(kernel(), out.y, rtol=1e-5, atol=1e-5)
        times = median_times({"layer": lambda: moe(x), "kernel": kernel, "read": read, "host_alone": host_alone},
                             repeats, calls=calls)
    return {name: statistics.median(t) for name, t in times.items()}, reached


def measure(repeats: int, tokens=(1, 4, 16), calls: int = 50) -> dict:
    torch.manual_seed(0)
    moe = MoE(MoEConfig(d_model=512, d_ff=1024, num_experts=8, top_k=2)).eval()
    per_expert = moe.experts.w_in[0].nbytes + moe.experts.w_out[0].nbytes
    rows = []
    for T in tokens:
        times, reached = _split(moe, torch.randn(T, 512), repeats, calls)
        weight_bytes = len(reached) * per_expert
        copy = copy_bandwidth()
        rows.append({"tokens": T, "experts_reached": len(reached), "weight_mib": weight_bytes / 2**20,
                     **{f"{name}_us": t * 1e6 for name, t in times.items()},
                     "host_us": (times["layer"] - times["kernel"]) * 1e6,
                     "copy_gb_s": copy / 1e9,
                     "layer_fraction_of_copy": weight_bytes / times["layer"] / copy,
                     "kernel_fraction_of_copy": weight_bytes / times["kernel"] / copy,
                     "read_fraction_of_copy": weight_bytes / times["read"] / copy})
    return {"machine": machine_info(), "repeats": repeats, "calls": calls, "rows": rows}


class _OpCounter(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        return func(*args, **(kwargs or {}))


def host_work_counts(tokens: int = 1) -> dict[str, int]:
    """Tensor operations, Python function calls and builtin calls of one decode call."""
    torch.manual_seed(0)
    moe = MoE(MoEConfig(d_model=512, d_ff=1024, num_experts=8, top_k=2)).eval()
    x = torch.randn(tokens, 512)
    calls = {"call": 0, "c_call": 0}

    def count(frame, event, arg):
        if event in calls:
            calls[event] += 1

    with torch.no_grad():
        moe(x)
        sys.setprofile(count)
        try:
            moe(x)
        finally:
            sys.setprofile(None)
        with _OpCounter() as counter:
            moe(x)
    return {"tensor_ops": counter.ops, "python_calls": calls["call"], "builtin_calls": calls["c_call"] - 1}


def main() -> None:
    args = timing_arguments(__doc__, more=lambda p: p.add_argument(
        "--count", action="store_true", help="count one T = 1 call's host work instead of timing"))
    if args.count:
        counts = host_work_counts()
        print(", ".join(f"{name.replace('_', ' ')}: {n}" for name, n in counts.items()))
        write_json(args.json, counts)
        return
    result = measure(args.repeats)
    print("| T | experts | MiB | layer µs | kernel µs | host µs (layer − kernel) | host alone µs | read µs "
          "| copy GB/s | fraction of copy: layer / kernel / read |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in result["rows"]:
        print(f"| {r['tokens']} | {r['experts_reached']} | {r['weight_mib']:.0f} | {r['layer_us']:.0f} "
              f"| {r['kernel_us']:.0f} | {r['host_us']:.0f} | {r['host_alone_us']:.0f} | {r['read_us']:.0f} "
              f"| {r['copy_gb_s']:.1f} "
              f"| {r['layer_fraction_of_copy']:.2f} / {r['kernel_fraction_of_copy']:.2f} / "
              f"{r['read_fraction_of_copy']:.2f} |")
    write_json(args.json, result)


if __name__ == "__main__":
    main()
