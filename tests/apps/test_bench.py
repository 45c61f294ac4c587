"""The benchmark compares like with like: peers hold the same weights and route
the same tokens, and the activation-memory probe counts what autograd keeps."""

from __future__ import annotations

import pytest
import torch

from moekit import MoE, MoEConfig
from moekit.apps.bench import _hf_peer, activation_bytes, fixed_assignment
from moekit.routing import FixedRouting


@pytest.mark.parametrize("spec", ["mixtral:eager", "mixtral:grouped_mm", "qwen3:grouped_mm"])
@pytest.mark.parametrize("routing", ["router", "uniform", "skewed"])
def test_peer_blocks_compute_what_moekit_computes(spec, routing):
    moe = MoE(MoEConfig(d_model=16, d_ff=32, num_experts=4, top_k=2))
    x = torch.randn(1, 24, 16)
    forced = None if routing == "router" else fixed_assignment(24, 4, 2, routing)
    block = _hf_peer(moe, spec, forced)
    if forced is not None:
        moe.force_routing(FixedRouting(forced))
    out = moe(x)
    if forced is not None:
        assert torch.equal(out.routing.indices_TK, forced)
    torch.testing.assert_close(block(x), out.y, rtol=1e-5, atol=1e-5)


def test_fixed_assignments_are_balanced_or_zipf():
    uniform = fixed_assignment(64, 8, 2, "uniform")
    assert torch.bincount(uniform.flatten(), minlength=8).tolist() == [16] * 8
    skewed = fixed_assignment(20000, 8, 2, "skewed")
    assert (skewed[:, 0] != skewed[:, 1]).all()
    load = torch.bincount(skewed.flatten(), minlength=8).float()
    assert (load[:-1] > load[1:]).all()  # decreasing with rank
    # Zipf(1.2) over 8 experts, two draws without replacement: the top expert appears in ~70% of tokens.
    assert 0.6 < load[0] / 20000 < 0.8


def test_activation_bytes_counts_saved_storages_once():
    x = torch.randn(100, requires_grad=True)
    assert activation_bytes(lambda: x.sin(), [x]) == 0  # sin keeps only its input, excluded
    assert activation_bytes(lambda: x.exp(), [x]) == 400  # exp keeps its float32 result
    # Two exp results, each kept by its exp and again by the mul: counted once each.
    assert activation_bytes(lambda: x.exp() * x.exp(), [x]) == 2 * 400
