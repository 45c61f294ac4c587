"""The benchmark compares like with like: peers hold the same weights and route
the same tokens, and the activation-memory probe counts what autograd keeps."""

from __future__ import annotations

import pytest
import torch

from moekit import MoE, MoEConfig
from moekit.bench import _hf_peer, _skew_router, activation_bytes


@pytest.mark.parametrize("spec", ["mixtral:eager", "mixtral:grouped_mm", "qwen3:grouped_mm"])
@pytest.mark.parametrize("balanced", [True, False])
def test_peer_blocks_compute_what_moekit_computes(spec, balanced):
    moe = MoE(MoEConfig(d_model=16, d_ff=32, num_experts=4, top_k=2, debug_balanced_routing=balanced))
    x = _skew_router(moe, torch.randn(1, 24, 16))
    block = _hf_peer(moe, spec, balanced)
    torch.testing.assert_close(block(x), moe(x).y, rtol=1e-5, atol=1e-5)


def test_skewed_router_concentrates_load():
    moe = MoE(MoEConfig(d_model=32, d_ff=8, num_experts=8, top_k=2))
    load = moe(_skew_router(moe, torch.randn(1, 2048, 32))).routing.tokens_per_expert_E.float()
    assert load[0] == load.max() and load[0] > 3 * load.mean()
    assert load[-1] < load.mean()


def test_activation_bytes_counts_saved_storages_once():
    x = torch.randn(100, requires_grad=True)
    assert activation_bytes(lambda: x.sin(), [x]) == 0  # sin keeps only its input, excluded
    assert activation_bytes(lambda: x.exp(), [x]) == 400  # exp keeps its float32 result
    # Two exp results, each kept by its exp and again by the mul: counted once each.
    assert activation_bytes(lambda: x.exp() * x.exp(), [x]) == 2 * 400
