"""Pruning and merging experts: what stays must compute exactly what it did."""

from __future__ import annotations

import pytest
import torch

from moekit import MoE
from moekit.interop.surgery import keep_experts, measure_load, merge_most_similar, prune_least_used


def _moe(**kw):
    return MoE(d_model=8, d_ff=16, num_experts=6, top_k=2, **kw).double().eval()


def test_pruning_leaves_untouched_tokens_exactly_unchanged():
    moe = _moe()
    x = torch.randn(200, 8, dtype=torch.float64)
    load = measure_load(moe, [x[:100], x[100:]])
    assert load.sum() == 200 * 2
    pruned, removed = prune_least_used(moe, load, 2)
    assert removed == sorted(torch.argsort(load.float(), stable=True)[:2].tolist())
    assert pruned.config.num_experts == 4
    before = moe(x)
    after = pruned(x)
    untouched = ~torch.isin(before.routing.indices_TK, torch.tensor(removed)).any(dim=1)
    assert untouched.sum() > 0
    torch.testing.assert_close(after.y[untouched], before.y[untouched], rtol=1e-12, atol=1e-12)


def test_keep_experts_reorders_weights():
    moe = _moe()
    kept = keep_experts(moe, [4, 1])
    assert torch.equal(kept.experts.w_in[0], moe.experts.w_in[4])
    assert torch.equal(kept.router.weight[1], moe.router.weight[1])
    with pytest.raises(ValueError, match="distinct expert ids"):
        keep_experts(moe, [1, 1])


def test_merging_picks_identical_pair_and_averages():
    moe = _moe()
    with torch.no_grad():
        moe.experts.w_in[5].copy_(moe.experts.w_in[2])
        moe.experts.w_out[5].copy_(moe.experts.w_out[2])
    x = torch.randn(50, 8, dtype=torch.float64)
    merged, pair = merge_most_similar(moe, x)
    assert pair == (2, 5)
    assert merged.config.num_experts == 5
    torch.testing.assert_close(merged.experts.w_in[2], moe.experts.w_in[2])
    torch.testing.assert_close(merged.router.weight[2], (moe.router.weight[2] + moe.router.weight[5]) / 2)
