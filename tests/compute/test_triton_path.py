"""The Triton compute path: its kernels and autograd functions against plain torch,
and the whole path against ``loop``.

Without a GPU the kernels run in Triton's interpreter on CPU tensors
(tests/conftest.py sets TRITON_INTERPRET=1), where float64 is also available,
so indexing mistakes show up at float64 precision. On a GPU the same tests run
the compiled kernels in float32.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys

import pytest
import torch
from tests.helpers import assert_close_dicts, run_path

from moekit import MoE, MoEConfig
from moekit.compute.kernels import (
    HAS_TRITON,
    gather_grouped_mm,
    grouped_mm_scatter,
    grouped_row_mm,
    grouped_weight_grad,
    interpreting,
)
from moekit.compute.paths import COMPUTE_PATHS, resolve_path
from moekit.dispatch import sorted_plan

DEVICE = "cpu" if interpreting() else "cuda"
# The most exact dtype the kernels take here, and the tolerance it allows.
EXACT = torch.float64 if interpreting() else torch.float32
TOL = {"rtol": 1e-10, "atol": 1e-10} if EXACT == torch.float64 else {"rtol": 1e-4, "atol": 1e-5}
FP32_TOL = {"rtol": 1e-5, "atol": 1e-5}


def test_triton_is_installed_for_the_tests():
    assert HAS_TRITON, "the dev extra installs triton; without it these tests would check nothing"


# --- kernels and autograd functions against torch ---------------------------------

def _plan(T, K, E, case, seed=0):
    """A dispatch plan with expert 1 unused and, by case, drops or padding."""
    g = torch.Generator().manual_seed(seed)
    indices_TK = torch.stack([torch.randperm(E - 1, generator=g)[:K] for _ in range(T)])
    indices_TK = torch.where(indices_TK >= 1, indices_TK + 1, indices_TK)  # nobody picks expert 1
    kwargs = {}
    if case == "capacity":
        kwargs = dict(capacity=3, priority_TK=torch.rand(T, K, generator=g), drop_priority="probability")
    elif case == "padding":
        kwargs = dict(valid_T=torch.rand(T, generator=g) > 0.3)
    plan = sorted_plan(indices_TK, E, **kwargs)
    assert int(plan.counts_E[1]) == 0
    assert (plan.order_R.shape[0] < T * K) == (case != "dropless")
    return plan, indices_TK.reshape(-1)[plan.order_R].to(DEVICE)


def _grads(out, inputs, grad_out):
    return torch.autograd.grad(out, inputs, grad_out)


@pytest.mark.parametrize(
    "case,top_k", [("dropless", 1), ("dropless", 2), ("capacity", 2), ("padding", 2)]
)
def test_gather_grouped_mm_matches_torch(case, top_k):
    T, E, D, H = 11, 5, 20, 36  # D and H are not multiples of the tile sizes
    plan, expert_R = _plan(T, top_k, E, case)
    order_R, counts_E = plan.order_R.to(DEVICE), plan.counts_E.to(DEVICE)
    x = torch.randn(T, D, dtype=EXACT, device=DEVICE, requires_grad=True)
    w = torch.randn(E, H, D, dtype=EXACT, device=DEVICE, requires_grad=True)

    h = gather_grouped_mm(x, w, order_R, counts_E, top_k)
    ref = torch.einsum("rd,rhd->rh", x[order_R // top_k], w[expert_R])
    torch.testing.assert_close(h, ref, **TOL)
    grad_h = torch.randn_like(h)
    got, expected = _grads(h, (x, w), grad_h), _grads(ref, (x, w), grad_h)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, **TOL)
    assert got[1][1].abs().sum() == 0  # the unused expert's gradient is written, as zeros


@pytest.mark.parametrize("case", ["dropless", "capacity", "padding"])
def test_grouped_mm_scatter_matches_torch(case):
    T, K, E, D, F = 11, 2, 5, 20, 18
    plan, expert_R = _plan(T, K, E, case)
    order_R, counts_E = plan.order_R.to(DEVICE), plan.counts_E.to(DEVICE)
    a = torch.randn(order_R.shape[0], F, dtype=EXACT, device=DEVICE, requires_grad=True)
    w = torch.randn(E, D, F, dtype=EXACT, device=DEVICE, requires_grad=True)

    y = grouped_mm_scatter(a, w, order_R, counts_E, T * K)
    rows = torch.einsum("rf,rdf->rd", a, w[expert_R])
    ref = torch.zeros(T * K, D, dtype=EXACT, device=DEVICE).index_copy(0, order_R, rows)
    torch.testing.assert_close(y, ref, **TOL)
    grad_y = torch.randn_like(y)
    got, expected = _grads(y, (a, w), grad_y), _grads(ref, (a, w), grad_y)
    for g, r in zip(got, expected, strict=True):
        torch.testing.assert_close(g, r, **TOL)


def test_functions_accept_expanded_gradients():
    plan, _ = _plan(9, 2, 4, "capacity")
    order_R, counts_E = plan.order_R.to(DEVICE), plan.counts_E.to(DEVICE)
    x = torch.randn(9, 20, dtype=EXACT, device=DEVICE, requires_grad=True)
    w_in = torch.randn(4, 24, 20, dtype=EXACT, device=DEVICE, requires_grad=True)
    w_out = torch.randn(4, 20, 24, dtype=EXACT, device=DEVICE, requires_grad=True)
    y = grouped_mm_scatter(gather_grouped_mm(x, w_in, order_R, counts_E, 2), w_out, order_R, counts_E, 18)
    y.sum().backward()  # the gradient of sum() has stride 0
    got = [t.grad.clone() for t in (x, w_in, w_out)]
    for t in (x, w_in, w_out):
        t.grad = None
    y = grouped_mm_scatter(gather_grouped_mm(x, w_in, order_R, counts_E, 2), w_out, order_R, counts_E, 18)
    (y * torch.ones_like(y)).sum().backward()
    for g, t in zip(got, (x, w_in, w_out), strict=True):
        torch.testing.assert_close(g, t.grad, **TOL)


def test_kernels_on_several_row_and_reduction_tiles():
    # 40 rows in one expert, 40-wide reductions: several tiles each way, all ragged.
    E, R, N, K = 3, 45, 40, 40
    counts_E = torch.tensor([40, 0, 5], device=DEVICE)
    expert_R = torch.repeat_interleave(torch.arange(E, device=DEVICE), counts_E)
    a = torch.randn(60, K, dtype=EXACT, device=DEVICE)
    w = torch.randn(E, K, N, dtype=EXACT, device=DEVICE)  # used transposed: N rows of w[e]ᵀ
    src_R = torch.randperm(60, device=DEVICE)[:R]
    dst_R = torch.randperm(50, device=DEVICE)[:R]
    rows = torch.einsum("rk,rkn->rn", a[src_R], w[expert_R])
    out = grouped_row_mm(a, w.transpose(1, 2), counts_E, src_R=src_R, dst_R=dst_R, num_out_rows=50)
    torch.testing.assert_close(out, torch.zeros(50, N, dtype=EXACT, device=DEVICE).index_copy(0, dst_R, rows), **TOL)
    torch.testing.assert_close(grouped_row_mm(a[src_R], w.transpose(1, 2), counts_E), rows, **TOL)

    g = torch.randn(50, N, dtype=EXACT, device=DEVICE)
    dw = grouped_weight_grad(g, a, counts_E, g_src_R=dst_R, a_src_R=src_R)
    ref = torch.zeros(E, N, K, dtype=EXACT, device=DEVICE).index_add(
        0, expert_R, g[dst_R, :, None] * a[src_R, None, :]
    )
    torch.testing.assert_close(dw, ref, **TOL)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_functions_in_half_precision(dtype):
    T, K, E, D, F = 12, 2, 4, 24, 20
    plan, expert_R = _plan(T, K, E, "dropless")
    order_R, counts_E = plan.order_R.to(DEVICE), plan.counts_E.to(DEVICE)
    x = torch.randn(T, D, device=DEVICE)
    w_in = torch.randn(E, F, D, device=DEVICE) / D**0.5
    w_out = torch.randn(E, D, F, device=DEVICE) / F**0.5
    low = [t.to(dtype).requires_grad_(True) for t in (x, w_in, w_out)]
    ref = [t.to(dtype).double().requires_grad_(True) for t in (x, w_in, w_out)]

    h = gather_grouped_mm(low[0], low[1], order_R, counts_E, K)
    y = grouped_mm_scatter(torch.relu(h), low[2], order_R, counts_E, T * K)
    h_ref = torch.einsum("rd,rfd->rf", ref[0][order_R // K], ref[1][expert_R])
    rows = torch.einsum("rf,rdf->rd", torch.relu(h_ref), ref[2][expert_R])
    y_ref = torch.zeros(T * K, D, dtype=torch.float64, device=DEVICE).index_copy(0, order_R, rows)
    assert y.dtype == dtype
    torch.testing.assert_close(y.double(), y_ref, rtol=0.03, atol=0.03)
    grad_y = torch.randn(T * K, D, device=DEVICE)
    got = _grads(y, low, grad_y.to(dtype))
    expected = _grads(y_ref, ref, grad_y.double())
    for name, g, r in zip(("x", "w_in", "w_out"), got, expected, strict=True):
        assert g.dtype == dtype, name
        torch.testing.assert_close(g.double(), r, rtol=0.03, atol=0.05, msg=lambda m, n=name: f"{n}: {m}")


# --- the whole path against loop ---------------------------------------------------

PATH_CASES = {
    "swiglu-bias-dropless": dict(expert="swiglu", expert_bias=True),
    "geglu-bias-capacity-mask": dict(expert="geglu", expert_bias=True, capacity_factor=0.5),
    "ffn-bias-position-per-sequence": dict(
        expert="ffn", activation="relu", expert_bias=True, capacity_factor=1.0, drop_priority="position",
        capacity_per_sequence=True,
    ),
    "swiglu-mask": dict(expert="swiglu"),
    "ffn-random-second-expert": dict(expert="ffn", router="topk", second_expert_policy="random"),
}
MASKED = {"geglu-bias-capacity-mask", "swiglu-mask"}


def _layer(dtype, **fields) -> MoE:
    config = MoEConfig(**{"d_model": 20, "d_ff": 12, "num_experts": 5, "top_k": 2, "z_loss_coef": 1e-3, **fields})
    moe = MoE(config)
    with torch.no_grad():
        moe.router.weight.mul_(4.0)  # a skewed router leaves some experts with few or no rows
        if moe.experts.b_in is not None:
            moe.experts.b_in.normal_()
            moe.experts.b_out.normal_()
    return moe.to(device=DEVICE, dtype=dtype)


def _check_against_loop(moe, x, tol, **kwargs):
    ref, ref_grads = run_path(moe, "loop", x, **kwargs)
    out, grads = run_path(moe, "triton", x, **kwargs)
    torch.testing.assert_close(out.y, ref.y, **tol)
    torch.testing.assert_close(out.aux_loss, ref.aux_loss, **tol)
    assert torch.equal(out.routing.tokens_per_expert_E, ref.routing.tokens_per_expert_E)
    if ref.routing.num_dropped is not None:
        assert int(out.routing.num_dropped) == int(ref.routing.num_dropped)
    assert_close_dicts(grads, ref_grads, **tol)
    return out


@pytest.mark.parametrize("case", list(PATH_CASES))
def test_triton_path_matches_loop(case):
    moe = _layer(EXACT, **PATH_CASES[case])
    moe.train()
    x = torch.randn(2, 7, 20, dtype=EXACT, device=DEVICE)
    kwargs = {}
    if case in MASKED:
        kwargs["mask"] = torch.tensor([[1, 1, 0, 1, 1, 1, 0], [1, 0, 1, 1, 1, 1, 1]], dtype=torch.bool, device=DEVICE)
    out = _check_against_loop(moe, x, TOL, **kwargs)
    if "capacity" in case or "position" in case:
        assert int(out.routing.num_dropped) > 0


@pytest.mark.parametrize("case", ["swiglu-bias-dropless", "geglu-bias-capacity-mask"])
def test_triton_path_matches_loop_in_float32(case):
    moe = _layer(torch.float32, **PATH_CASES[case])
    x = torch.randn(2, 7, 20, device=DEVICE)
    mask = torch.rand(2, 7, device=DEVICE) > 0.3 if case in MASKED else None
    _check_against_loop(moe, x, FP32_TOL, mask=mask)


@pytest.mark.parametrize("router", ["expert_choice", "soft"])
def test_expert_choice_and_soft_rows_match_loop(router):
    moe = _layer(EXACT, router=router, top_k=1 if router == "soft" else 2, expert_bias=True)
    _check_against_loop(moe, torch.randn(2, 8, 20, dtype=EXACT, device=DEVICE), TOL)


def test_bf16_path_matches_loop_loosely():
    moe = _layer(torch.bfloat16, expert="swiglu", expert_bias=True, capacity_factor=1.0)
    x = torch.randn(3, 8, 20, dtype=torch.bfloat16, device=DEVICE)
    ref, ref_grads = run_path(moe, "loop", x)
    out, grads = run_path(moe, "triton", x)
    assert out.y.dtype == torch.bfloat16
    torch.testing.assert_close(out.y, ref.y, rtol=0.02, atol=0.02)
    assert torch.equal(out.routing.tokens_per_expert_E, ref.routing.tokens_per_expert_E)
    assert_close_dicts(grads, ref_grads, rtol=0.05, atol=0.05)


def test_autocast_runs_the_experts_in_bf16():
    moe = _layer(torch.float32, expert="swiglu", expert_bias=True)
    x = torch.randn(16, 20, device=DEVICE)
    ref, _ = run_path(moe, "loop", x)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out, grads = run_path(moe, "triton", x)
        bf16, _ = run_path(moe, "segment", x)
    assert out.y.dtype == torch.float32 and grads["experts.w_in"].dtype == torch.float32
    # Same bf16 arithmetic as another path under autocast, and close to float32.
    torch.testing.assert_close(out.y, bf16.y, rtol=0.02, atol=0.02)
    torch.testing.assert_close(out.y, ref.y, rtol=0.05, atol=0.05)
    assert not torch.equal(out.y, ref.y)


def test_zero_tokens():
    moe = _layer(EXACT, expert="swiglu", expert_bias=True)
    moe.config = dataclasses.replace(moe.config, compute="triton")
    x = torch.randn(0, 20, dtype=EXACT, device=DEVICE, requires_grad=True)
    out = moe(x)
    assert out.y.shape == (0, 20)
    assert out.routing.tokens_per_expert_E.tolist() == [0] * 5
    (out.y.sum() + out.aux_loss).backward()
    assert x.grad.shape == (0, 20)
    assert moe.experts.w_in.grad.abs().sum() == 0


# --- when the path applies -------------------------------------------------------

def test_triton_is_not_in_auto_and_refuses_what_it_cannot_run(monkeypatch):
    assert "triton" in COMPUTE_PATHS
    moe = MoE(d_model=16, d_ff=32, num_experts=4, compute="triton")  # no device check before forward
    assert resolve_path("auto", moe.experts, torch.randn(64, 16), top_k=2).name != "triton"
    experts = [torch.nn.Linear(4, 4) for _ in range(2)]
    with pytest.raises(ValueError, match=r"compute path 'triton' needs stacked MLP experts \(got ModuleExperts\)"):
        MoE(d_model=4, d_ff=4, experts=experts, compute="triton")
    monkeypatch.setattr("moekit.compute.kernels.interpreting", lambda: False)
    with pytest.raises(ValueError, match=r"needs a CUDA input \(got cpu\)"):
        resolve_path("triton", moe.experts, torch.randn(4, 16))


def test_moekit_imports_and_runs_without_triton():
    code = (
        "import sys; sys.modules['triton'] = None\n"
        "import torch, moekit, moekit.compute.kernels as k\n"
        "assert not k.HAS_TRITON\n"
        "moe = moekit.MoE(d_model=8, d_ff=16, num_experts=4)\n"
        "moe(torch.randn(5, 8)).y.sum().backward()\n"
        "try:\n"
        "    moekit.MoE(d_model=8, d_ff=16, num_experts=4, compute='triton')\n"
        "except ValueError as err:\n"
        "    assert 'triton package' in str(err), err\n"
        "else:\n"
        "    raise AssertionError('the triton path accepted a machine without triton')\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr
