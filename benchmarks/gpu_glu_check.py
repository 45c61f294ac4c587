"""Fused Triton GLU vs the torch formula on a CUDA GPU: correctness in bf16, then
forward+backward time (median of 20, CUDA events).

    python benchmarks/gpu_glu_check.py [--rows 32768] [--d-ff 4096]
"""

from __future__ import annotations

import argparse
import statistics

import torch
import torch.nn.functional as F

from moekit.compute.kernels.triton_glu import glu

TORCH_ACT = {"silu": F.silu, "gelu": F.gelu}


def torch_glu(h: torch.Tensor, activation: str) -> torch.Tensor:
    gate, up = h.chunk(2, dim=-1)
    return TORCH_ACT[activation](gate) * up


def fwd_bwd(fn, h, grad_a):
    h = h.detach().requires_grad_(True)
    a = fn(h)
    a.backward(grad_a)
    return a, h.grad


def median_ms(fn, repeats: int = 20) -> float:
    for _ in range(3):  # compile and warm up
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=32768)
    parser.add_argument("--d-ff", type=int, default=4096)
    args = parser.parse_args()
    R, F_ = args.rows, args.d_ff
    torch.manual_seed(0)
    h = 3 * torch.randn(R, 2 * F_, device="cuda", dtype=torch.bfloat16)
    grad_a = torch.randn(R, F_, device="cuda", dtype=torch.bfloat16)
    # bytes moved by the fused pair: fwd reads h, writes a; bwd reads h and grad_a, writes grad_h
    gbytes = (2 * F_ + F_ + 2 * F_ + F_ + 2 * F_) * R * h.element_size() / 1e9
    print(f"R={R} F={F_} bf16, {torch.cuda.get_device_name()}")
    for activation in ("silu", "gelu"):
        check_and_time(h, grad_a, activation, gbytes)


def check_and_time(h: torch.Tensor, grad_a: torch.Tensor, activation: str, gbytes: float) -> None:
    def fused(x):
        return glu(x, activation)

    def plain(x):
        return torch_glu(x, activation)

    a, grad_h = fwd_bwd(fused, h, grad_a)
    # Reference: the formula in float32 on the same bf16 inputs, rounded once.
    ref_a, ref_grad_h = fwd_bwd(plain, h.float(), grad_a.float())
    torch.testing.assert_close(a, ref_a.bfloat16())
    torch.testing.assert_close(grad_h, ref_grad_h.bfloat16())
    t_fused = median_ms(lambda: fwd_bwd(fused, h, grad_a))
    t_plain = median_ms(lambda: fwd_bwd(plain, h, grad_a))
    print(f"{activation}: values ok; fwd+bwd fused {t_fused:.3f} ms ({gbytes / t_fused * 1e3:.0f} GB/s), "
          f"torch {t_plain:.3f} ms, speedup {t_plain / t_fused:.2f}x")


if __name__ == "__main__":
    main()
