"""LoRA on the router: logits from W + s·B·A (float64), gradients for A and B only, a fresh
adapter changes nothing, merge folds it into the weight, and the errors."""

from __future__ import annotations

import pytest
import torch

from moekit import MoE, MoEConfig
from moekit.finetune import add_lora, merge_lora
from moekit.models.adapters import router_update


def _layer():
    torch.manual_seed(0)
    return MoE(MoEConfig(d_model=16, d_ff=32, num_experts=6, top_k=2, compute="loop")).double()


def test_router_logits_follow_the_low_rank_update_with_gradients_for_the_adapter_only():
    moe = _layer()
    x = torch.randn(11, 16, dtype=torch.float64)
    before = moe(x).y
    add_lora(moe, rank=3, alpha=6, targets=("router",))
    assert torch.equal(moe(x).y, before)  # B = 0
    update = router_update(moe.router)
    with torch.no_grad():
        update.lora_B.normal_(std=0.5)
    base = moe.router.parametrizations.weight.original
    expected_logits = x @ (base + 2.0 * update.lora_B @ update.lora_A).t()
    routing = moe.router(x)
    torch.testing.assert_close(routing.logits_TE, expected_logits, rtol=1e-12, atol=1e-12)
    out = moe(x)
    (out.y.square().sum() + out.aux_loss).backward()
    assert update.lora_A.grad.abs().sum() > 0 and update.lora_B.grad.abs().sum() > 0
    assert base.grad is None and not base.requires_grad
    adapted = moe(x).y.detach()
    merge_lora(moe)
    assert router_update(moe.router) is None and moe.router.weight.requires_grad
    torch.testing.assert_close(moe(x).y, adapted, rtol=1e-12, atol=1e-12)


def test_router_rank_beyond_the_experts_and_twice_adapted_routers_are_named():
    with pytest.raises(ValueError, match=r"rank \(7\) must be <= 6"):
        add_lora(_layer(), rank=7, targets=("router",))
    moe = add_lora(_layer(), rank=2, targets=("router",))
    with pytest.raises(ValueError, match="router already has LoRA adapters"):
        add_lora(moe, rank=2, targets=("router",))
