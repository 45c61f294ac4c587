"""The experts contract: rows grouped by expert in, outputs out; traits; sharding; the registry."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from moekit import EXPERTS, Experts, MoE, MoEConfig, StackedExperts, register_experts
from moekit.experts import build_experts


class _Scaled(Experts):
    """Expert e multiplies its rows by (e + 1): implements only forward_expert."""

    def __init__(self, num_experts: int):
        super().__init__()
        self.num_experts = num_experts

    def forward_expert(self, e, x_ND):
        return x_ND * (e + 1)


class _ScaledRows(Experts):
    """The same experts, implementing only the rows form."""

    def __init__(self, num_experts: int):
        super().__init__()
        self.num_experts = num_experts

    def forward(self, x_RD, counts_E):
        scale_R = torch.arange(1, self.num_experts + 1, dtype=x_RD.dtype).repeat_interleave(counts_E)
        return x_RD * scale_R[:, None]


def test_a_class_implementing_either_form_gets_the_other():
    x = torch.randn(6, 3)
    counts = torch.tensor([1, 0, 3, 2])
    expected = x * torch.tensor([1.0, 3, 3, 3, 4, 4])[:, None]
    for experts in (_Scaled(4), _ScaledRows(4)):
        torch.testing.assert_close(experts(x, counts), expected)
        torch.testing.assert_close(experts.forward_expert(2, x), 3 * x)


def test_a_class_implementing_neither_form_says_so():
    class Empty(Experts):
        num_experts = 2

    with pytest.raises(NotImplementedError, match="Empty must implement forward or forward_expert"):
        Empty()(torch.randn(2, 3), torch.tensor([1, 1]))


def test_traits_are_declared_by_the_class():
    assert StackedExperts.stacked_mlp and StackedExperts.shardable
    assert not _Scaled.stacked_mlp and not _Scaled.shardable
    with pytest.raises(TypeError, match="_Scaled cannot be sharded over expert-parallel ranks"):
        _Scaled(4).shard(0, 2)


def test_stacked_shard_holds_the_chosen_experts():
    experts = StackedExperts(4, 6, 5, bias=True)
    shard = experts.shard(2, 2)
    assert shard.num_experts == 2
    for name, value in shard.state_dict().items():
        assert torch.equal(value, experts.state_dict()[name][2:4]), name
    x = torch.randn(3, 6)
    torch.testing.assert_close(shard.forward_expert(1, x), experts.forward_expert(3, x))


def test_registered_experts_kind_builds_from_the_config():
    register_experts("scaled_for_test", lambda config: _Scaled(config.num_experts))
    try:
        moe = MoE(d_model=3, d_ff=1, num_experts=4, top_k=2, expert="scaled_for_test")
        assert isinstance(moe.experts, _Scaled)
        x = torch.randn(5, 3, dtype=torch.float64)
        out = moe.double()(x)
        w, idx = out.routing.weights_TK, out.routing.indices_TK
        torch.testing.assert_close(out.y, (w * (idx + 1)).sum(1, keepdim=True) * x)
    finally:
        del EXPERTS["scaled_for_test"]
    with pytest.raises(ValueError, match="unknown expert 'scaled_for_test'; valid experts: swiglu, geglu, ffn"):
        MoEConfig(d_model=3, d_ff=1, num_experts=4, expert="scaled_for_test")


def test_built_experts_must_match_num_experts():
    register_experts("wrong_count_for_test", lambda config: _Scaled(config.num_experts + 1))
    try:
        with pytest.raises(ValueError, match="built 5 experts; num_experts is 4"):
            build_experts(MoEConfig(d_model=3, d_ff=1, num_experts=4, expert="wrong_count_for_test"))
    finally:
        del EXPERTS["wrong_count_for_test"]


def test_module_experts_refuse_non_modules_by_position():
    with pytest.raises(TypeError, match=r"experts\[1\] is a int"):
        MoE(d_model=3, d_ff=1, top_k=1, experts=[nn.Identity(), 3])
