"""Balancing losses against REFERENCES.md in float64: hand-computed cases, the
uniform and collapsed extremes, and padding that leaves every loss unchanged."""

from __future__ import annotations

import math

import pytest
import torch

from moekit import MoE
from moekit.routing.losses import (
    assignment_counts,
    cv_squared,
    importance_loss,
    load_balancing_loss,
    router_z_loss,
    smooth_load,
)

f64 = torch.float64


def test_load_balancing_loss_hand_computed():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.5, 0.1, 0.4], [0.2, 0.2, 0.6]], dtype=f64)
    indices = torch.tensor([[0, 1], [1, 2], [0, 2], [2, 0]])
    # f = counts / T = [3, 2, 3] / 4; P = column means.
    f = torch.tensor([3, 2, 3], dtype=f64) / 4
    P = torch.tensor([1.5, 1.1, 1.4], dtype=f64) / 4
    expected = 3 * float((f * P).sum())
    assert load_balancing_loss(probs, indices).item() == pytest.approx(expected, rel=1e-12)


def test_load_balancing_loss_without_padding_equals_all_real_token_weights():
    probs = torch.softmax(torch.randn(37, 6, dtype=f64), dim=-1).requires_grad_(True)
    indices = torch.randint(0, 6, (37, 2))
    fast = load_balancing_loss(probs, indices)
    (fast_grad,) = torch.autograd.grad(fast, probs)
    weighted = load_balancing_loss(probs, indices, torch.ones(37, dtype=f64))
    (weighted_grad,) = torch.autograd.grad(weighted, probs)
    torch.testing.assert_close(fast, weighted, rtol=1e-14, atol=0)
    torch.testing.assert_close(fast_grad, weighted_grad, rtol=1e-14, atol=0)
    assert load_balancing_loss(probs[:0], indices[:0]).item() == 0.0


@pytest.mark.parametrize("E,K", [(4, 1), (8, 2), (6, 3)])
def test_load_balancing_loss_extremes(E, K):
    T = 4 * E
    uniform_probs = torch.full((T, E), 1.0 / E, dtype=f64)
    balanced = (torch.arange(T)[:, None] + torch.arange(K)[None, :]) % E  # each expert K·T/E times
    assert load_balancing_loss(uniform_probs, balanced).item() == pytest.approx(K, rel=1e-12)
    collapsed_probs = torch.zeros(T, E, dtype=f64)
    collapsed_probs[:, :K] = 1.0 / K
    collapsed = torch.arange(K).expand(T, K)
    assert load_balancing_loss(collapsed_probs, collapsed).item() == pytest.approx(E, rel=1e-12)


def test_z_loss_hand_computed():
    logits = torch.tensor([[0.0, 0.0], [1.0, -1.0], [2.0, 3.0]], dtype=f64)
    expected = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits.tolist()) / 3
    assert router_z_loss(logits).item() == pytest.approx(expected, rel=1e-12)


def test_cv_squared_and_importance_extremes():
    assert cv_squared(torch.ones(5, dtype=f64)).item() == 0.0
    # One expert takes everything: mean m = 1/E, var = (E−1)/E² → CV² = E − 1.
    E = 5
    gates = torch.zeros(10, E, dtype=f64)
    gates[:, 0] = 1.0
    assert importance_loss(gates).item() == pytest.approx(E - 1, rel=1e-9)
    x = torch.tensor([1.0, 2.0, 6.0], dtype=f64)
    mean = 3.0
    var = ((1 - 3) ** 2 + (2 - 3) ** 2 + (6 - 3) ** 2) / 3
    assert cv_squared(x).item() == pytest.approx(var / mean**2, rel=1e-9)


def test_smooth_load_matches_the_formula_elementwise():
    torch.manual_seed(3)
    T, E, k = 6, 4, 2
    clean = torch.randn(T, E, dtype=f64)
    std = torch.rand(T, E, dtype=f64) + 0.5
    noisy = clean + torch.randn(T, E, dtype=f64) * std
    normal_cdf = lambda z: 0.5 * (1 + math.erf(z / math.sqrt(2)))  # noqa: E731
    expected = torch.zeros(E, dtype=f64)
    for t in range(T):
        for i in range(E):
            others = sorted((noisy[t, j].item() for j in range(E) if j != i), reverse=True)
            kth_excluding = others[k - 1]
            expected[i] += normal_cdf((clean[t, i].item() - kth_excluding) / std[t, i].item())
    torch.testing.assert_close(smooth_load(clean, noisy, std, k), expected, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("router", ["softmax", "topk", "noisy_topk", "switch"])
def test_padding_leaves_losses_and_statistics_unchanged(router):
    moe = MoE(d_model=8, d_ff=8, num_experts=4, router=router, z_loss_coef=1e-3, importance_coef=0.1,
              load_coef=0.1).double().eval()
    real = torch.randn(2, 5, 8, dtype=f64)
    padded = torch.cat([real, torch.randn(2, 3, 8, dtype=f64) * 10], dim=1)
    mask = torch.zeros(2, 8, dtype=torch.bool)
    mask[:, :5] = True
    ref = moe(real)
    out = moe(padded, mask=mask)
    assert ref.routing.losses.keys() == out.routing.losses.keys()
    for name in ref.routing.losses:
        torch.testing.assert_close(out.routing.losses[name], ref.routing.losses[name], msg=name)
    torch.testing.assert_close(out.aux_loss, ref.aux_loss)
    assert torch.equal(out.routing.tokens_per_expert_E, ref.routing.tokens_per_expert_E)
    torch.testing.assert_close(out.y[:, :5], ref.y)
    assert out.y[:, 5:].abs().max() == 0  # padding reaches no expert


def test_aux_loss_is_the_weighted_sum_of_named_losses():
    moe = MoE(d_model=8, d_ff=8, num_experts=4, load_balance_coef=0.3, z_loss_coef=0.2, importance_coef=0.0,
              load_coef=0.5).double()
    out = moe(torch.randn(16, 8, dtype=f64))
    losses = out.routing.losses
    expected = 0.3 * losses["load_balance"] + 0.2 * losses["z_loss"] + 0.5 * losses["load"]
    torch.testing.assert_close(out.aux_loss, expected)
    none = MoE(d_model=8, d_ff=8, num_experts=4, load_balance_coef=0.0)
    assert none(torch.randn(16, 8)).aux_loss.item() == 0.0


def test_assignment_counts_ignore_padding():
    indices = torch.tensor([[0, 1], [1, 2], [2, 0]])
    counts = assignment_counts(indices, 4, torch.tensor([1.0, 0.0, 1.0]))
    assert counts.tolist() == [2.0, 1.0, 1.0, 0.0]


@pytest.mark.parametrize("router", ["softmax", "topk", "noisy_topk", "switch"])
def test_router_gradient_zero_without_losses_or_output_gradient(router):
    coefs = dict(load_balance_coef=0.0, z_loss_coef=0.0, importance_coef=0.0, load_coef=0.0)
    moe = MoE(d_model=8, d_ff=8, num_experts=4, router=router, **coefs)
    out = moe(torch.randn(12, 8))
    (out.y.sum() * 0 + out.aux_loss).backward()
    assert moe.router.weight.grad is None or moe.router.weight.grad.abs().max() == 0
    lossy = MoE(d_model=8, d_ff=8, num_experts=4, router=router, load_balance_coef=0.1, z_loss_coef=0.1,
                importance_coef=0.1, load_coef=0.1)
    out = lossy(torch.randn(12, 8))
    (out.y.sum() * 0 + out.aux_loss).backward()
    assert lossy.router.weight.grad.abs().max() > 0
    plain = MoE(d_model=8, d_ff=8, num_experts=4, router=router, **coefs)
    plain(torch.randn(12, 8)).y.pow(2).sum().backward()
    assert plain.router.weight.grad.abs().max() > 0
