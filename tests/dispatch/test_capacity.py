"""Capacity: experts never exceed it, drops are counted independently, the
priority rules pick the right assignments, and infinite capacity is dropless."""

from __future__ import annotations

import math

import pytest
import torch
from tests.helpers import run_path

from moekit import MoE
from moekit.dispatch import sorted_plan


@pytest.mark.parametrize("path", ["loop", "segment", "fused", "grouped_mm", "small_batch"])
@pytest.mark.parametrize("capacity_factor", [0.25, 0.5, 1.0, 1.25])
@pytest.mark.parametrize("priority", ["probability", "position", "batch_priority"])
def test_tokens_per_expert_within_capacity_and_drops_counted(path, capacity_factor, priority):
    T, E, K = 40, 4, 2
    moe = MoE(d_model=8, d_ff=8, num_experts=E, top_k=K, capacity_factor=capacity_factor,
              drop_priority=priority, compute=path)
    with torch.no_grad():
        moe.router.weight.mul_(50)  # skewed routing so that experts overflow
    out = moe(torch.randn(T, 8))
    capacity = math.ceil(capacity_factor * T * K / E)
    counts = out.routing.tokens_per_expert_E
    assert counts.max() <= capacity
    wanted = torch.bincount(out.routing.indices_TK.flatten(), minlength=E)
    independent_drops = int((wanted - wanted.clamp(max=capacity)).sum())
    assert int(out.routing.num_dropped) == independent_drops
    assert int(out.routing.kept_TK.sum()) == T * K - independent_drops


def test_dropped_assignment_contributes_zero():
    moe = MoE(d_model=4, d_ff=8, num_experts=2, top_k=1, capacity_factor=0.5).double()
    with torch.no_grad():
        moe.router.weight.zero_()
        moe.router.weight[0, 0] = 10.0  # every token with x0 > 0 prefers expert 0
    x = torch.randn(12, 4, dtype=torch.float64)
    x[:, 0] = x[:, 0].abs() + 0.1
    out = moe(x)
    kept = out.routing.kept_TK[:, 0]
    assert (~kept).sum() == 12 - 3  # capacity ceil(0.5·12·1/2) = 3
    assert out.y[~kept].abs().max() == 0
    expected = out.routing.weights_TK[kept, :1] * moe.experts.forward_expert(0, x[kept])
    torch.testing.assert_close(out.y[kept], expected)


def test_probability_priority_keeps_the_most_confident_tokens():
    priority = torch.tensor([[0.1], [0.9], [0.5], [0.7], [0.3]])
    indices = torch.zeros(5, 1, dtype=torch.long)
    plan = sorted_plan(indices, 2, capacity=2, priority_TK=priority, drop_priority="probability")
    assert plan.kept_TK[:, 0].tolist() == [False, True, False, True, False]
    assert sorted(plan.order_R.tolist()) == [1, 3]


def test_position_priority_prefers_first_choices_then_earlier_tokens():
    indices = torch.tensor([[1, 0], [0, 1], [1, 0], [0, 1]])
    plan = sorted_plan(indices, 2, capacity=3, priority_TK=torch.rand(4, 2), drop_priority="position")
    # Expert 0: first choices of tokens 1 and 3, then second choices of tokens 0, 2 → drops token 2's.
    assert plan.kept_TK.tolist() == [[True, True], [True, True], [True, False], [True, False]]
    assert int(plan.num_dropped) == 2


@pytest.mark.parametrize("path", ["loop", "segment", "fused", "grouped_mm", "small_batch"])
def test_large_capacity_equals_dropless(path):
    moe = MoE(d_model=8, d_ff=8, num_experts=4, top_k=2, compute=path)
    x = torch.randn(30, 8)
    dropless = run_path(moe, path, x)
    moe.config.capacity_factor = 1e6
    capped = run_path(moe, path, x)
    torch.testing.assert_close(capped[0].y, dropless[0].y)
    assert int(capped[0].routing.num_dropped) == 0
    for name in dropless[1]:
        torch.testing.assert_close(capped[1][name], dropless[1][name])


@pytest.mark.parametrize("path", ["loop", "segment", "fused", "grouped_mm", "small_batch"])
@pytest.mark.parametrize("priority", ["probability", "position", "batch_priority"])
def test_capacity_per_sequence_equals_running_each_sequence_alone(path, priority):
    config = dict(d_model=8, d_ff=8, num_experts=4, top_k=2, expert_capacity=3, drop_priority=priority,
                  compute=path)
    per_sequence = MoE(**config, capacity_per_sequence=True)
    with torch.no_grad():
        per_sequence.router.weight.mul_(30)
    x = torch.randn(3, 10, 8)
    out = per_sequence(x)
    alone = [per_sequence(x[b]) for b in range(3)]
    torch.testing.assert_close(out.y, torch.stack([a.y for a in alone]))
    assert int(out.routing.num_dropped) == sum(int(a.routing.num_dropped) for a in alone) > 0
    # Over the whole batch the same absolute capacity drops far more.
    whole = MoE(**config)
    whole.load_state_dict(per_sequence.state_dict())
    assert int(whole(x).routing.num_dropped) > int(out.routing.num_dropped)


def test_expert_capacity_errors():
    with pytest.raises(ValueError, match=r"expert_capacity \(0\)"):
        MoE(d_model=8, d_ff=8, num_experts=4, expert_capacity=0)
    with pytest.raises(ValueError, match="not both"):
        MoE(d_model=8, d_ff=8, num_experts=4, expert_capacity=2, capacity_factor=1.0)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_both_ways_of_combining_agree_with_gradients(dtype):
    """The GPU combine (broadcast multiply and sum) against the CPU one (batched
    product), on CPU: outputs, and gradients of the rows and the weights."""
    from moekit.compute.ops import weighted_sum_by

    y_TKD = torch.randn(7, 3, 5, dtype=dtype)
    weights_TK = torch.rand(7, 3, dtype=torch.float64 if dtype == torch.float64 else torch.float32)
    probe = torch.randn(7, 5, dtype=weights_TK.dtype)
    results = []
    for broadcast in (False, True):
        y = y_TKD.clone().requires_grad_(True)
        w = weights_TK.clone().requires_grad_(True)
        out = weighted_sum_by(y, w, broadcast)
        assert out.dtype == weights_TK.dtype
        (out * probe).sum().backward()
        results.append((out, y.grad, w.grad))
    expected = (weights_TK[..., None] * y_TKD.to(weights_TK.dtype)).sum(1)
    tol = {} if dtype == torch.float64 else {"rtol": 1e-2, "atol": 1e-2}
    expected_grad_y = (weights_TK[..., None] * probe[:, None, :]).to(dtype)
    expected_grad_w = (y_TKD.to(weights_TK.dtype) * probe[:, None, :]).sum(-1)
    for out, grad_y, grad_w in results:
        torch.testing.assert_close(out, expected, **tol)
        torch.testing.assert_close(grad_y, expected_grad_y, **tol)
        torch.testing.assert_close(grad_w, expected_grad_w, **tol)


def test_batch_priority_keeps_first_choices_of_the_most_confident_tokens_first():
    from moekit.dispatch.capacity import sorted_assignments

    # Token t's choices (expert, probability): every first choice goes to expert 0, every
    # second to expert 1; capacity 2. Token 3 is the most confident, then 1, then 0.
    indices_TK = torch.tensor([[0, 1], [0, 1], [0, 1], [0, 1]])
    priority_TK = torch.tensor([[0.6, 0.3], [0.8, 0.1], [0.5, 0.45], [0.9, 0.05]])
    _, counts_E, kept_TK, dropped, _ = sorted_assignments(indices_TK, 2, capacity=2, priority_TK=priority_TK,
                                                          drop_priority="batch_priority")
    # Expert 0 keeps tokens 3 and 1; expert 1 takes second choices in the same token order.
    assert kept_TK.tolist() == [[False, False], [True, True], [False, False], [True, True]]
    assert counts_E.tolist() == [2, 2] and int(dropped) == 4
