"""Dispatch plans: the sorted planner against the plain reference, and the expert-choice and
Soft MoE plans' rows and combines against their formulas.

Shapes: T tokens, D model dim, E experts, K experts per token, C tokens per expert.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moekit import MoE
from moekit.dispatch import Capacity, LocalDispatcher, make_plan
from moekit.dispatch.plans import plan_token_choice
from moekit.routing import Routing


@settings(max_examples=40, deadline=None)
@given(T=st.integers(0, 13), E=st.integers(1, 5), data=st.data(), limit=st.sampled_from([None, 1, 2, 4]),
       group=st.sampled_from([None, 3]), priority=st.sampled_from(["probability", "position", "batch_priority"]),
       padded=st.booleans(), seed=st.integers(0, 1000))
def test_sorted_plan_keeps_what_the_reference_keeps(T, E, data, limit, group, priority, padded, seed):
    K = data.draw(st.integers(1, E))
    g = torch.Generator().manual_seed(seed)
    probs_TE = torch.rand(T, E, generator=g).softmax(-1)
    indices_TK = probs_TE.topk(K, dim=-1).indices
    valid_T = torch.rand(T, generator=g) > 0.3 if padded else None
    routing = Routing(indices_TK=indices_TK, weights_TK=probs_TE.gather(1, indices_TK), logits_TE=None,
                      probs_TE=probs_TE, valid_T=valid_T)
    capacity = Capacity(limit, group if limit is not None else None, priority)
    fast, reference = plan_token_choice(routing, capacity), plan_token_choice(routing, capacity, reference=True)
    assert torch.equal(fast.counts_E, reference.counts_E)
    assert int(fast.num_dropped) == int(reference.num_dropped)
    kept = lambda plan: torch.ones(T, K, dtype=torch.bool) if plan.kept_TK is None else plan.kept_TK  # noqa: E731
    assert torch.equal(kept(fast), kept(reference))
    # The sorted order lists exactly the kept assignments, grouped by expert.
    assert sorted(fast.order_R.tolist()) == kept(reference).reshape(-1).nonzero().flatten().tolist()
    assert torch.equal(indices_TK.reshape(-1)[fast.order_R], indices_TK.reshape(-1)[fast.order_R].sort().values)


def test_a_reference_plan_has_no_row_order_to_gather_by():
    moe = MoE(d_model=4, d_ff=4, num_experts=2, top_k=1, compute="loop")
    routing = moe.router(torch.randn(3, 4))
    plan = plan_token_choice(routing, Capacity(), reference=True)
    with pytest.raises(ValueError, match="reference plan has no row order"):
        plan.gather(torch.randn(3, 4))


def test_expert_choice_plan_rows_are_each_experts_tokens_and_combine_weighs_them():
    moe = MoE(d_model=4, d_ff=4, num_experts=3, router="expert_choice", capacity_factor=1.0).double()
    x = torch.randn(6, 4, dtype=torch.float64)
    routing = moe.router(x)
    plan = make_plan(routing, Capacity())
    x_RD, counts_E = plan.gather(x)
    assert counts_E.tolist() == [2, 2, 2]
    torch.testing.assert_close(x_RD, x[routing.tokens_EC.reshape(-1)])
    y_RD = torch.randn_like(x_RD)
    expected = torch.zeros_like(x)
    for r, t in enumerate(routing.tokens_EC.reshape(-1).tolist()):
        expected[t] += routing.weights_EC.reshape(-1)[r] * y_RD[r]
    torch.testing.assert_close(plan.combine(y_RD, torch.float64), expected)
    assert plan.dispatched().tokens_per_expert_E.tolist() == [2, 2, 2]


def test_soft_plan_rows_are_slots_and_combine_is_the_combine_weights():
    moe = MoE(d_model=4, d_ff=4, num_experts=2, router="soft", slots_per_expert=2).double()
    x = torch.randn(2, 3, 4, dtype=torch.float64)  # two sequences of three tokens
    routing = moe.router(x.reshape(6, 4), sequence_length=3)
    plan = make_plan(routing, Capacity())
    slots_RD, counts_E = plan.gather(x.reshape(6, 4))
    assert counts_E.tolist() == [4, 4]  # G·P slots per expert
    slots_GSD = routing.dispatch_GLS.transpose(1, 2) @ x  # (G, S, D), slot s = expert s // P
    torch.testing.assert_close(slots_RD.view(2, 2, 2, 4), slots_GSD.view(2, 2, 2, 4).transpose(0, 1))
    y_RD = torch.randn_like(slots_RD)
    y_GSD = y_RD.view(2, 2, 2, 4).transpose(0, 1).reshape(2, 4, 4)
    torch.testing.assert_close(plan.combine(y_RD, torch.float64), (routing.combine_GLS @ y_GSD).reshape(6, 4))


def test_local_dispatcher_fuses_only_token_choice_plans_of_paths_with_a_routed_form():
    from moekit.compute.paths import COMPUTE_PATHS

    dispatcher = LocalDispatcher()
    token_choice = make_plan(MoE(d_model=4, d_ff=4, num_experts=2).router(torch.randn(3, 4)), Capacity())
    expert_choice = make_plan(MoE(d_model=4, d_ff=4, num_experts=2, router="expert_choice").router(
        torch.randn(3, 4)), Capacity())
    assert dispatcher.fuses(COMPUTE_PATHS["fused"], token_choice)
    assert not dispatcher.fuses(COMPUTE_PATHS["fused"], expert_choice)
    assert not dispatcher.fuses(COMPUTE_PATHS["grouped_mm"], token_choice)
