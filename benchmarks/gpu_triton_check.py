"""The "triton" compute path against "grouped_mm" on a CUDA GPU: parity, then speed.

    PYTHONPATH=src python benchmarks/gpu_triton_check.py

1. bf16 parity at T=4096, D=512, F=1024, E=8, K=2: the layer's output, the
   input gradient and every parameter gradient of both paths, as relative
   errors ‖a − b‖ / ‖b‖ (exits non-zero above 2e-2), and each path's error
   against the float32 "loop" reference on the same weights, for scale (the
   two bf16 paths can agree to the bit: both accumulate in float32 in K order).
2. Forward + backward time of each path (CUDA events, median of 20 after
   warm-up, which also runs Triton's autotuning) at that shape, at
   T=16384, D=2048, F=4096, E=8, K=2, and at the fine-grained
   T=4096, D=512, F=128, E=64, K=8.

Both paths share one layer's weights and inputs, so they route identically.
"""

from __future__ import annotations

import copy
import dataclasses
import statistics
import sys

import torch

from moekit import MoE, MoEConfig

DTYPE = torch.bfloat16
PARITY_SHAPE = dict(tokens=4096, d_model=512, d_ff=1024, num_experts=8, top_k=2)
TIMED_SHAPES = [
    PARITY_SHAPE,
    dict(tokens=16384, d_model=2048, d_ff=4096, num_experts=8, top_k=2),
    dict(tokens=4096, d_model=512, d_ff=128, num_experts=64, top_k=8),
]
MAX_REL_ERR = 2e-2


def layers(shape: dict) -> dict[str, MoE]:
    """The same layer (swiglu experts, top-k router) on each path."""
    config = MoEConfig(d_model=shape["d_model"], d_ff=shape["d_ff"], num_experts=shape["num_experts"],
                       top_k=shape["top_k"], compute="grouped_mm")
    base = MoE(config).to(device="cuda", dtype=DTYPE).train()
    out = {}
    for path in ("grouped_mm", "triton"):
        layer = copy.deepcopy(base)
        layer.config = dataclasses.replace(config, compute=path)
        out[path] = layer
    return out


def inputs(shape: dict) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(shape["tokens"], shape["d_model"], device="cuda", dtype=DTYPE, generator=g)
    grad_y = torch.randn(x.shape, device="cuda", dtype=DTYPE, generator=g)
    return x, grad_y


def step(layer: MoE, x: torch.Tensor, grad_y: torch.Tensor):
    """One forward + backward; returns the output and the input gradient."""
    layer.zero_grad(set_to_none=True)
    x = x.detach().requires_grad_(True)
    out = layer(x)
    ((out.y * grad_y).sum() + out.aux_loss).backward()
    return out, x.grad


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def ran_triton_kernels(y: torch.Tensor) -> bool:
    """Whether the autograd graph of y holds the Triton path's functions."""
    seen, stack = set(), [y.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if "GatherGroupedMM" in type(node).__name__:
            return True
        stack.extend(next_fn for next_fn, _ in node.next_functions)
    return False


def results(layer: MoE, x: torch.Tensor, grad_y: torch.Tensor):
    out, grad_x = step(layer, x, grad_y)
    values = {"y": out.y, "grad input": grad_x}
    values.update({f"grad {name}": p.grad for name, p in layer.named_parameters()})
    return values, out


def check_parity() -> bool:
    shape = PARITY_SHAPE
    paths = layers(shape)
    x, grad_y = inputs(shape)
    ref, ref_out = results(paths["grouped_mm"], x, grad_y)
    got, out = results(paths["triton"], x, grad_y)
    fp32 = copy.deepcopy(paths["grouped_mm"]).float()
    fp32.config = dataclasses.replace(fp32.config, compute="loop")
    exact, _ = results(fp32, x.float(), grad_y.float())
    same_routing = torch.equal(out.routing.tokens_per_expert_E, ref_out.routing.tokens_per_expert_E)
    used_triton = ran_triton_kernels(out.y)
    print(f"parity, bf16, {shape}: relative errors")
    print(f"  same tokens per expert: {same_routing}; triton kernels in the graph: {used_triton}")
    print(f"  {'':28s} {'triton vs grouped_mm':>21} {'triton vs fp32':>15} {'grouped_mm vs fp32':>19}")
    ok = same_routing and used_triton
    for name in ref:
        err = rel_err(got[name], ref[name])
        ok &= err <= MAX_REL_ERR
        print(f"  {name:28s} {err:>21.2e} {rel_err(got[name], exact[name]):>15.2e} "
              f"{rel_err(ref[name], exact[name]):>19.2e}{'' if err <= MAX_REL_ERR else '  <-- too large'}")
    return ok


def time_ms(layer: MoE, x: torch.Tensor, grad_y: torch.Tensor, warmup: int = 5, repeats: int = 20) -> float:
    for _ in range(warmup):
        step(layer, x, grad_y)
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step(layer, x, grad_y)
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> int:
    if not torch.cuda.is_available():
        print("needs a CUDA device")
        return 2
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}", end="")
    import triton

    print(f", triton {triton.__version__}")
    ok = check_parity()
    print("\nforward + backward, bf16, median of 20 (ms)")
    print(f"  {'T':>6} {'D':>5} {'F':>5} {'E':>3} {'K':>2} {'grouped_mm':>11} {'triton':>8} {'speedup':>8}")
    for shape in TIMED_SHAPES:
        paths = layers(shape)
        x, grad_y = inputs(shape)
        ms = {path: time_ms(layer, x, grad_y) for path, layer in paths.items()}
        print(f"  {shape['tokens']:>6} {shape['d_model']:>5} {shape['d_ff']:>5} {shape['num_experts']:>3} "
              f"{shape['top_k']:>2} {ms['grouped_mm']:>11.3f} {ms['triton']:>8.3f} "
              f"{ms['grouped_mm'] / ms['triton']:>7.2f}x")
        del paths, x, grad_y
        torch.cuda.empty_cache()
    print("\nparity: " + ("ok" if ok else "FAILED"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
