"""The fused Triton GLU against the torch formula: values and gradients on ragged
shapes, and a whole MoE layer with the kernel on vs off. Without a GPU the kernels
run in Triton's interpreter (conftest sets TRITON_INTERPRET=1)."""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
import torch.nn.functional as F

from moekit import MoE
from moekit.compute import switches
from moekit.compute.kernels import triton_glu
from moekit.compute.kernels.triton_glu import glu

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TORCH_ACT = {"silu": F.silu, "gelu": F.gelu}


def _reference(h: torch.Tensor, activation: str) -> torch.Tensor:
    gate, up = h.chunk(2, dim=-1)
    return TORCH_ACT[activation](gate) * up


def _fwd_bwd(fn, h, grad_a):
    h = h.detach().requires_grad_(True)
    a = fn(h)
    (grad_h,) = torch.autograd.grad(a, h, grad_a)
    return a, grad_h


def test_runs_on_this_machine():
    # The checks below are only worth something if the kernel really runs.
    assert triton_glu.HAS_TRITON
    assert triton_glu.glu_supported(torch.empty(1, 2, device=DEVICE))
    assert not triton_glu.glu_supported(torch.empty(1, 2, device=DEVICE, dtype=torch.float64))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("activation", ["silu", "gelu"])
@pytest.mark.parametrize("R", [0, 1, 37])
@pytest.mark.parametrize("F_", [1, 5, 130])
def test_matches_torch_formula(F_, R, activation, dtype):
    if dtype == torch.float64 and DEVICE == "cuda":
        pytest.skip("float64 runs only under the interpreter")  # glu_supported excludes it
    h = 3 * torch.randn(R, 2 * F_, dtype=dtype, device=DEVICE)
    grad_a = torch.randn(R, F_, dtype=dtype, device=DEVICE)
    # Transposed storage: the kernel must not assume grad_a has row stride F.
    grad_a_t = torch.randn(F_, R, dtype=dtype, device=DEVICE).t()
    assert R <= 1 or F_ == 1 or not grad_a_t.is_contiguous()
    # float32: torch's defaults; 1 + erf(x) cancels for negative x, in either implementation.
    tol = {"rtol": 1e-12, "atol": 1e-12} if dtype == torch.float64 else {}
    for upstream in (grad_a, grad_a_t):
        a, grad_h = _fwd_bwd(lambda x: glu(x, activation), h, upstream)
        ref_a, ref_grad_h = _fwd_bwd(lambda x: _reference(x, activation), h, upstream)
        assert a.shape == (R, F_) and a.dtype == dtype and grad_h.shape == h.shape
        torch.testing.assert_close(a, ref_a, **tol)
        torch.testing.assert_close(grad_h, ref_grad_h, **tol)


@pytest.mark.parametrize("activation", ["silu", "gelu"])
def test_expanded_upstream_grad_and_leading_dims(activation):
    h = torch.randn(2, 3, 10, device=DEVICE, requires_grad=True)
    glu(h, activation).sum().backward()  # sum()'s grad is an expanded, zero-stride tensor
    ref = h.detach().requires_grad_(True)
    _reference(ref, activation).sum().backward()
    torch.testing.assert_close(h.grad, ref.grad)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("activation", ["silu", "gelu"])
def test_half_precision_rounds_the_float32_result_once(activation, dtype):
    h = 3 * torch.randn(37, 2 * 130, device=DEVICE).to(dtype)
    grad_a = torch.randn(37, 130, device=DEVICE).to(dtype)
    a, grad_h = _fwd_bwd(lambda x: glu(x, activation), h, grad_a)
    ref_a, ref_grad_h = _fwd_bwd(lambda x: _reference(x, activation), h.float(), grad_a.float())
    assert a.dtype == dtype and grad_h.dtype == dtype
    # Math in float32, one rounding at the store: within one half-precision ulp.
    torch.testing.assert_close(a, ref_a.to(dtype))
    torch.testing.assert_close(grad_h, ref_grad_h.to(dtype))


def test_rejects_unknown_activation_and_odd_width():
    with pytest.raises(ValueError, match="activation"):
        glu(torch.randn(2, 4, device=DEVICE), "relu")
    with pytest.raises(ValueError, match="2F"):
        glu(torch.randn(2, 5, device=DEVICE), "silu")


def _run(moe: MoE, path: str, x: torch.Tensor, fused: bool | None, monkeypatch):
    calls = []

    def counting_glu(h, activation):
        calls.append(h.shape)
        return glu(h, activation)

    monkeypatch.setattr(triton_glu, "glu", counting_glu)
    layer = copy.deepcopy(moe)
    layer.config = dataclasses.replace(layer.config, compute=path)
    x = x.detach().clone().requires_grad_(True)
    with switches.fused_glu(fused):
        out = layer(x)
        proj = torch.randn(out.y.shape, generator=torch.Generator().manual_seed(1)).to(out.y)
        ((out.y * proj).sum() + out.aux_loss).backward()
    grads = {name: p.grad for name, p in layer.named_parameters() if p.grad is not None}
    grads["input"] = x.grad
    return out.y, grads, len(calls)


@pytest.mark.parametrize("path", ["grouped_mm", "loop"])
@pytest.mark.parametrize("expert", ["swiglu", "geglu"])
def test_moe_layer_same_with_kernel_on_and_off(expert, path, monkeypatch):
    moe = MoE(d_model=16, d_ff=20, num_experts=4, top_k=2, expert=expert, expert_bias=True).to(DEVICE)
    x = torch.randn(3, 8, 16, device=DEVICE)
    y_off, grads_off, calls_off = _run(moe, path, x, False, monkeypatch)
    y_on, grads_on, calls_on = _run(moe, path, x, True, monkeypatch)
    assert calls_off == 0 and calls_on > 0
    torch.testing.assert_close(y_on, y_off, rtol=1e-5, atol=1e-5)
    assert grads_on.keys() == grads_off.keys() and "experts.w_in" in grads_on
    for name in grads_on:
        torch.testing.assert_close(grads_on[name], grads_off[name], rtol=1e-5, atol=1e-5, msg=name)


def test_default_uses_the_kernel_on_cuda_only():
    with switches.fused_glu(None):
        assert switches.use_fused_glu(torch.empty(2, 4, device=DEVICE)) == (DEVICE == "cuda")
    with switches.fused_glu(False):
        assert not switches.use_fused_glu(torch.empty(2, 4, device=DEVICE))
    with switches.fused_glu(True):
        assert switches.use_fused_glu(torch.empty(2, 4, device=DEVICE))
    with pytest.raises(ValueError, match="fused_glu"):
        switches.set_fused_glu("yes")
