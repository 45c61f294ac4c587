"""Options of the top-k routers: GShard's random second expert, drop priority
under capacity, and expert biases, each against a hand-computed case."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moekit import MoE, MoEConfig
from moekit.routing.gshard import random_second_expert

PATHS = ["loop", "segment", "fused", "grouped_mm", "small_batch"]


def test_random_second_expert_probability_is_twice_its_normalised_weight():
    torch.manual_seed(0)
    n = 20000
    # Normalised second weights 0.5 (always), 0.25 (half the time), ~0 (never).
    weights = torch.tensor([[0.4, 0.4], [0.6, 0.2], [1.0, 1e-12]]).repeat_interleave(n, dim=0)
    active = random_second_expert(weights).view(3, n, 2)
    assert active[..., 0].all()
    assert active[0, :, 1].all()
    assert active[1, :, 1].float().mean().item() == pytest.approx(0.5, abs=0.02)
    assert not active[2, :, 1].any()


@pytest.mark.parametrize("router", ["topk", "noisy_topk"])
@pytest.mark.parametrize("compute", PATHS)
def test_declined_second_expert_contributes_nothing_and_is_not_a_drop(router, compute):
    torch.manual_seed(0)
    moe = MoE(MoEConfig(d_model=8, d_ff=8, num_experts=4, top_k=2, router=router,
                        second_expert_policy="random", compute=compute))
    with torch.no_grad():
        moe.router.weight.normal_()  # decisive gates, so some second weights are small
    x = torch.randn(40, 8)
    torch.manual_seed(1)
    out = moe.train()(x)
    r = out.routing
    active = r.active_TK
    assert active is not None and active[:, 0].all() and not active[:, 1].all() and active[:, 1].any()
    expected = torch.zeros_like(x)
    for t in range(40):
        for k in range(2):
            if active[t, k]:
                e = int(r.indices_TK[t, k])
                expected[t] += r.weights_TK[t, k] * moe.experts.forward_expert(e, x[t : t + 1])[0]
    torch.testing.assert_close(out.y, expected.detach(), atol=1e-6, rtol=1e-5)
    assert r.tokens_per_expert_E.sum().item() == active.sum().item()
    assert r.num_dropped.item() == 0
    assert r.stats["dropped_share"].item() == 0.0
    # Evaluation is deterministic: every second choice goes out.
    assert moe.eval()(x).routing.active_TK is None


def test_random_second_expert_config_errors():
    with pytest.raises(ValueError, match="top_k = 2; got top_k \\(3\\)"):
        MoEConfig(d_model=4, d_ff=4, num_experts=4, top_k=3, second_expert_policy="random")
    with pytest.raises(ValueError, match="option of router 'topk' / 'noisy_topk', not of 'sigmoid'"):
        MoEConfig(d_model=4, d_ff=4, num_experts=4, router="sigmoid", second_expert_policy="random")
    with pytest.raises(ValueError, match="second_expert_policy \\('sometimes'\\)"):
        MoEConfig(d_model=4, d_ff=4, num_experts=4, second_expert_policy="sometimes")


def _capacity_moe(router: str, top_k: int, capacity_factor: float, priority: str, compute: str) -> MoE:
    moe = MoE(MoEConfig(d_model=2, d_ff=4, num_experts=2, top_k=top_k, router=router,
                        capacity_factor=capacity_factor, drop_priority=priority, compute=compute)).double()
    with torch.no_grad():
        moe.router.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    return moe.eval()  # noisy_topk adds no noise in eval


# noisy_topk is not in the top-1 case: its probabilities are the sparse gate,
# which is 1 for every top-1 token, so "probability" ties fall back to position.
# grouped_mm needs 16-byte row strides (D = 2 is too narrow); the parity tests
# cover it under capacity.
@pytest.mark.parametrize("compute", PATHS[:2])
@pytest.mark.parametrize("priority,kept_tokens", [("probability", [1, 2]), ("position", [0, 1])])
def test_top1_drop_priority_by_hand(compute, priority, kept_tokens):
    # logits = x: all four tokens choose expert 0 with probabilities rising with
    # x0 - x1 = 1, 3, 2, 0.5. Capacity ceil(1.0·4·1/2) = 2.
    moe = _capacity_moe("topk", 1, 1.0, priority, compute)
    x = torch.tensor([[1.0, 0.0], [3.0, 0.0], [2.0, 0.0], [0.5, 0.0]], dtype=torch.float64)
    out = moe(x)
    r = out.routing
    assert r.indices_TK.flatten().tolist() == [0, 0, 0, 0]
    assert r.kept_TK.flatten().nonzero().flatten().tolist() == kept_tokens
    dropped = [t for t in range(4) if t not in kept_tokens]
    assert torch.all(out.y[dropped] == 0)  # a dropped token passes through the residual only
    assert r.num_dropped.item() == 2
    assert r.stats["dropped_share"].item() == pytest.approx(0.5)
    assert r.stats["unrouted_share"].item() == pytest.approx(0.5)
    assert r.stats["dead_expert_share"].item() == pytest.approx(0.5)
    assert r.stats["max_over_mean_load"].item() == pytest.approx(2.0)


@pytest.mark.parametrize("router", ["topk", "noisy_topk"])
@pytest.mark.parametrize("compute", PATHS[:2])
@pytest.mark.parametrize(
    "priority,expected_kept",
    [
        # probability: expert 0 keeps its two most probable assignments (t0 .88, t1 .73)
        # and expert 1 its (t2 .82, t1 .27) over t0's .12.
        ("probability", [[True, False], [True, True], [True, False]]),
        # position: first choices before second choices. Expert 0 keeps the first
        # choices of t0 and t1, expert 1 the first choice of t2 and the earliest
        # second choice, t0's.
        ("position", [[True, True], [True, False], [True, False]]),
    ],
)
def test_top2_drop_priority_by_hand(router, compute, priority, expected_kept):
    # logits = x; t0, t1 prefer expert 0, t2 prefers expert 1. Every expert gets
    # three assignments; capacity ceil((2/3)·3·2/2) = 2. With K = E = 2 the
    # noisy router's gate (softmax over the top two) equals the full softmax.
    moe = _capacity_moe(router, 2, 2 / 3, priority, compute)
    x = torch.tensor([[2.0, 0.0], [1.0, 0.0], [0.0, 1.5]], dtype=torch.float64)
    r = moe(x).routing
    probs = torch.tensor([[1 / (1 + math.exp(-d)), 1 / (1 + math.exp(d))] for d in (2.0, 1.0, -1.5)],
                         dtype=torch.float64)
    torch.testing.assert_close(r.probs_TE, probs)
    assert r.indices_TK.tolist() == [[0, 1], [0, 1], [1, 0]]
    assert r.kept_TK.tolist() == expected_kept
    assert r.tokens_per_expert_E.tolist() == [2, 2]
    assert r.num_dropped.item() == 2


@pytest.mark.parametrize("compute", PATHS)
def test_expert_biases_enter_each_expert(compute):
    torch.manual_seed(0)
    moe = MoE(MoEConfig(d_model=4, d_ff=4, num_experts=2, top_k=1, router="topk",
                        expert_bias=True, expert="ffn", activation="relu", compute=compute))
    with torch.no_grad():
        moe.experts.b_in.normal_()
        moe.experts.b_out.normal_()
    x = torch.randn(6, 4)
    out = moe(x)
    ex = moe.experts
    expected = torch.zeros_like(x)
    for t in range(6):
        e = int(out.routing.indices_TK[t, 0])
        h = F.relu(x[t] @ ex.w_in[e].t() + ex.b_in[e])
        expected[t] = out.routing.weights_TK[t, 0] * (h @ ex.w_out[e].t() + ex.b_out[e])
    torch.testing.assert_close(out.y, expected.detach())
    out.y.sum().backward()
    assert ex.b_in.grad.abs().sum() > 0 and ex.b_out.grad.abs().sum() > 0
