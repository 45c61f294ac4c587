"""Shared experts (DeepSeekMoE, Qwen2-MoE gate) and per-layer routing statistics."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moekit import MoE, MoEConfig
from moekit.routing.stats import normalized_entropy


def _swiglu(x, w_in, w_out):
    gate, up = (x @ w_in.t()).chunk(2, dim=-1)
    return (F.silu(gate) * up) @ w_out.t()


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("router", ["topk", "expert_choice", "soft"])
def test_shared_experts_add_the_sum_of_n_ffns_to_the_routed_output(router, gated):
    torch.manual_seed(0)
    fields = dict(d_model=8, d_ff=8, num_experts=4, router=router)
    moe = MoE(MoEConfig(**fields, num_shared_experts=2, shared_d_ff=4, shared_expert_gate=gated)).double()
    routed_only = MoE(MoEConfig(**fields)).double()
    routed_only.load_state_dict({k: v for k, v in moe.state_dict().items() if not k.startswith("shared")})
    x = torch.randn(2, 3, 8, dtype=torch.float64)

    # Two shared experts of width 4: rows [0:4] and [4:8] of the stacked gate and
    # up halves, columns [0:4] and [4:8] of the down projection.
    w_in, w_out = moe.shared_experts.ffn.w_in[0], moe.shared_experts.ffn.w_out[0]
    gate_rows, up_rows = w_in[:8], w_in[8:]
    shared = sum(
        _swiglu(x, torch.cat([gate_rows[4 * i : 4 * i + 4], up_rows[4 * i : 4 * i + 4]]), w_out[:, 4 * i : 4 * i + 4])
        for i in range(2)
    )
    if gated:
        shared = torch.sigmoid(x @ moe.shared_experts.gate.weight.t()) * shared
    torch.testing.assert_close(moe(x).y, routed_only(x).y + shared)


def test_shared_experts_leave_padding_at_zero_and_validate():
    moe = MoE(MoEConfig(d_model=8, d_ff=8, num_experts=4, num_shared_experts=1))
    out = moe(torch.randn(2, 3, 8), mask=torch.tensor([[True, True, False], [True, True, True]]))
    assert torch.all(out.y[0, 2] == 0)
    with pytest.raises(ValueError, match="shared_expert_gate=True needs num_shared_experts >= 1"):
        MoEConfig(d_model=8, d_ff=8, num_experts=4, shared_expert_gate=True)
    with pytest.raises(ValueError, match="num_shared_experts \\(-1\\)"):
        MoEConfig(d_model=8, d_ff=8, num_experts=4, num_shared_experts=-1)


def test_normalized_entropy_by_hand():
    probs = torch.tensor([[0.25] * 4, [1.0, 0, 0, 0], [0.5, 0.5, 0, 0]])
    # Per token: 1, 0, log 2 / log 4 = 0.5.
    assert normalized_entropy(probs).item() == pytest.approx(0.5)
    assert normalized_entropy(probs, torch.tensor([True, False, True])).item() == pytest.approx(0.75)
    assert normalized_entropy(torch.ones(3, 1)).item() == 0.0


def test_stats_of_a_hash_layer_by_hand():
    # Hash routing makes the load known: ids 0..5 under the table.
    moe = MoE(MoEConfig(d_model=4, d_ff=4, num_experts=4, router="hash", hash_vocab_size=8))
    ids = torch.tensor([0, 0, 0, 1, 1, 2])
    with torch.no_grad():
        moe.router.expert_of_token_V.copy_(torch.tensor([0, 1, 2, 3, 0, 1, 2, 3]))
    stats = moe(torch.randn(6, 4), token_ids=ids).routing
    assert stats.tokens_per_expert_E.tolist() == [3, 2, 1, 0]
    s = stats.stats
    assert s["dead_expert_share"].item() == pytest.approx(0.25)
    assert s["max_over_mean_load"].item() == pytest.approx(3 / 1.5)
    assert s["entropy"].item() == 0.0
    assert s["dropped_share"].item() == 0.0 and s["unrouted_share"].item() == 0.0


def test_every_router_reports_every_statistic():
    names = {"entropy", "dead_expert_share", "max_over_mean_load", "dropped_share", "unrouted_share"}
    for router in ("softmax", "topk", "noisy_topk", "switch", "expert_choice", "sigmoid", "soft", "hash"):
        options = {"hash_vocab_size": 5} if router == "hash" else {}
        moe = MoE(MoEConfig(d_model=4, d_ff=4, num_experts=4, router=router, **options))
        out = moe(torch.randn(2, 3, 4), token_ids=torch.randint(0, 5, (2, 3)))
        assert set(out.routing.stats) == names, router
        entropy = out.routing.stats["entropy"].item()
        assert 0.0 <= entropy <= 1.0 + 1e-6, router
        assert not out.routing.stats["entropy"].requires_grad
    # The dense softmax gate of a fresh layer is close to uniform.
    moe = MoE(MoEConfig(d_model=4, d_ff=4, num_experts=4, router="softmax"))
    assert moe(torch.randn(8, 4)).routing.stats["entropy"].item() == pytest.approx(1.0, abs=0.01)
    assert math.isclose(moe(torch.randn(8, 4)).routing.stats["max_over_mean_load"].item(), 1.0)
