"""Growing a trained layer: unchanged output at step 0, new experts that learn, frozen old experts."""

from __future__ import annotations

import pytest
import torch

from moekit import MoE, MoEConfig
from moekit.interop.surgery import freeze_experts, grow


def _layer(router="topk", top_k=2, **fields):
    return MoE(MoEConfig(d_model=16, d_ff=32, num_experts=4, top_k=top_k, router=router, expert="swiglu", **fields))


@pytest.mark.parametrize("router, top_k", [("topk", 2), ("topk", 1), ("noisy_topk", 2), ("topk", 3)])
def test_grown_layer_computes_the_same_output_and_routing(router, top_k):
    layer = _layer(router, top_k).eval()
    x_ND = torch.randn(300, 16)
    grown = grow(layer, 3, x_ND).eval()
    before, after = layer(x_ND), grown(x_ND)
    torch.testing.assert_close(after.y, before.y, atol=1e-6, rtol=0)
    assert torch.equal(after.routing.indices_TK, before.routing.indices_TK)
    assert after.routing.tokens_per_expert_E[4:].tolist() == [0, 0, 0]
    assert grown.config.num_experts == 7 and grown.config.top_k == top_k
    # The old experts and router rows are copied, not re-drawn.
    assert torch.equal(grown.experts.w_in[:4], layer.experts.w_in)
    assert torch.equal(grown.router.weight[:4], layer.router.weight)


def test_growing_twice_keeps_the_first_bias():
    layer = _layer().eval()
    x_ND = torch.randn(200, 16)
    once = grow(layer, 1, x_ND)
    twice = grow(once, 2, x_ND).eval()
    assert torch.equal(twice.router.logit_bias[:5], once.router.logit_bias)
    torch.testing.assert_close(twice(x_ND).y, layer(x_ND).y, atol=1e-6, rtol=0)


def test_new_experts_get_router_gradient_at_once_and_are_used_after_training():
    torch.manual_seed(0)
    layer = _layer(load_balance_coef=0.01)
    grown = grow(layer, 2, torch.randn(256, 16))
    out = grown(torch.randn(128, 16))
    (out.y.square().mean() + out.aux_loss).backward()
    # Unchosen, the new experts' weights get no gradient yet; their router rows do (balancing loss).
    assert grown.experts.w_in.grad[4:].abs().sum() == 0
    assert grown.router.weight.grad[4:].abs().sum() > 0 and grown.router.logit_bias.grad[4:].abs().sum() > 0

    grown.zero_grad()
    new_weights_before = grown.experts.w_in[4:].detach().clone()
    target_DD = torch.randn(16, 16)
    optimizer = torch.optim.Adam(grown.parameters(), lr=3e-3)
    loads = torch.zeros(6)
    for step in range(250):
        x_ND = torch.randn(128, 16)
        out = grown(x_ND)
        loss = (out.y - x_ND @ target_DD).square().mean() + out.aux_loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step >= 200:
            loads += out.routing.tokens_per_expert_E
    assert (loads[4:] > 0).all(), loads
    assert not torch.allclose(grown.experts.w_in[4:], new_weights_before)


def test_frozen_experts_keep_their_weights_bitwise():
    layer = _layer(expert_bias=True)
    handles = freeze_experts(layer, [0, 2])
    frozen_params = [p for p in layer.experts.parameters() if getattr(p, "frozen_rows_E", None) is not None]
    assert len(frozen_params) == 4  # w_in, w_out, b_in, b_out
    before = {name: p.detach().clone() for name, p in layer.experts.named_parameters()}
    others = [p for p in layer.parameters() if getattr(p, "frozen_rows_E", None) is None]
    optimizer = torch.optim.AdamW([{"params": frozen_params, "weight_decay": 0.0},
                                   {"params": others, "weight_decay": 0.1}], lr=1e-2)
    for _ in range(5):
        out = layer(torch.randn(64, 16))
        (out.y.square().mean() + out.aux_loss).backward()
        assert layer.experts.w_in.grad[[0, 2]].abs().sum() == 0
        optimizer.step()
        optimizer.zero_grad()
    for name, p in layer.experts.named_parameters():
        assert torch.equal(p[[0, 2]], before[name][[0, 2]]), name
        assert not torch.equal(p[[1, 3]], before[name][[1, 3]]), name
    for handle in handles:
        handle.remove()


def test_grow_refuses_what_it_cannot_do():
    x_ND = torch.randn(10, 16)
    with pytest.raises(ValueError, match="'softmax'"):
        grow(MoE(MoEConfig(d_model=16, d_ff=32, num_experts=4, router="softmax")), 1, x_ND)
    with pytest.raises(ValueError, match="'switch'"):
        grow(MoE(MoEConfig(d_model=16, d_ff=32, num_experts=4, router="switch")), 1, x_ND)
    with pytest.raises(ValueError, match="normalize_weights"):
        grow(_layer(normalize_weights=False), 1, x_ND)
    with pytest.raises(ValueError, match=r"num_new \(0\)"):
        grow(_layer(), 0, x_ND)
    with pytest.raises(ValueError, match=r"margin \(0"):
        grow(_layer(), 1, x_ND, margin=0)
    with pytest.raises(ValueError, match=r"frozen \(\[4\]\)"):
        freeze_experts(_layer(), [4])
