"""One way to force routing: the debug balanced routing, the benchmark's fixed assignment and
two-stage training's clusters all go through ``MoE.force_routing``."""

from __future__ import annotations

import pytest
import torch

from moekit import MoE, MoEConfig
from moekit.routing import BalancedRouting, FixedRouting, forced


def test_forced_choice_replaces_the_routers_and_leaves_its_record_alone():
    moe = MoE(MoEConfig(d_model=8, d_ff=8, num_experts=4, top_k=2, z_loss_coef=1e-3)).double()
    x = torch.randn(6, 8, dtype=torch.float64)
    chosen = torch.tensor([[0, 1], [1, 2], [2, 3], [3, 0], [0, 2], [1, 3]])
    records = []
    moe.router.register_forward_hook(lambda module, args, routing: records.append(routing))
    moe.force_routing(FixedRouting(chosen))
    out = moe(x)
    assert torch.equal(out.routing.indices_TK, chosen)
    torch.testing.assert_close(out.routing.weights_TK, torch.full((6, 2), 0.5, dtype=torch.float64))
    # y = Σ_k 0.5·E_k(x) over the forced experts, by hand.
    expected = torch.stack([sum(0.5 * moe.experts.forward_expert(int(e), x[t:t + 1])[0] for e in chosen[t])
                            for t in range(6)])
    torch.testing.assert_close(out.y, expected, rtol=1e-12, atol=1e-12)
    assert dict(out.routing.losses) == {} and out.aux_loss.item() == 0.0  # the router decided nothing
    assert records[0] is not out.routing.decision and "load_balance" in records[0].losses
    moe.force_routing(None)
    assert not torch.equal(moe(x).routing.indices_TK, chosen)


def test_debug_balanced_routing_is_the_balanced_forced_choice():
    moe = MoE(d_model=8, d_ff=8, num_experts=4, top_k=2, debug_balanced_routing=True)
    assert isinstance(moe.forced_routing, BalancedRouting)
    out = moe(torch.randn(5, 8))
    assert out.routing.indices_TK.tolist() == [[0, 1], [2, 3], [0, 1], [2, 3], [0, 1]]
    assert out.routing.tokens_per_expert_E.tolist() == [3, 3, 2, 2]


def test_forced_routing_needs_a_token_choice_router_and_the_right_shape():
    soft = MoE(d_model=8, d_ff=8, num_experts=4, router="soft")
    with pytest.raises(ValueError, match="token-choice routers; 'soft' is not one"):
        soft.force_routing(BalancedRouting())
    moe = MoE(d_model=8, d_ff=8, num_experts=4, top_k=2)
    moe.force_routing(FixedRouting(torch.zeros(3, 2, dtype=torch.long)))
    with pytest.raises(ValueError, match=r"indices and weights of shape \(5, K\); got \(3, 2\)"):
        moe(torch.randn(5, 8))
    with pytest.raises(ValueError, match="token-choice routers only; got SoftRouting"):
        forced(soft.router(torch.randn(4, 8)), torch.zeros(4, 1, dtype=torch.long), torch.ones(4, 1))
