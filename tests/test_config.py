"""Bad input gets a clear error that names the value and what was expected."""

from __future__ import annotations

import pytest
import torch

from moekit import MoE, MoEConfig


@pytest.mark.parametrize(
    "kwargs,error,pattern",
    [
        (dict(top_k=9), ValueError, r"top_k \(9\) must be <= num_experts \(8\)"),
        (dict(top_k=0), ValueError, r"top_k \(0\) must be >= 1"),
        (dict(top_k=1.5), TypeError, r"top_k \(1.5\)"),
        (dict(capacity_factor=0.0), ValueError, r"capacity_factor \(0.0\)"),
        (dict(capacity_factor=-1), ValueError, r"capacity_factor \(-1\)"),
        (dict(num_experts=0), ValueError, r"num_experts \(0\)"),
        (dict(d_model=-3), ValueError, r"d_model \(-3\)"),
        (dict(drop_priority="random"), ValueError, r"drop_priority \('random'\).*probability, position"),
        (dict(z_loss_coef=-1.0), ValueError, r"z_loss_coef \(-1.0\)"),
        (dict(router="switch", top_k=2), ValueError, r"router 'switch' uses top_k = 1"),
    ],
)
def test_config_errors_name_the_value(kwargs, error, pattern):
    base = dict(d_model=16, d_ff=32, num_experts=8)
    with pytest.raises(error, match=pattern):
        MoEConfig(**{**base, **kwargs})


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        (dict(router="bogus"), r"unknown router 'bogus'; valid routers: .*noisy_topk.*softmax.*switch.*topk"),
        (dict(expert="moe"), r"unknown expert 'moe'; valid experts: swiglu, geglu, ffn"),
        (dict(expert="ffn", activation="tanh"), r"unknown activation 'tanh'; valid activations: relu, gelu, gelu_tanh, silu"),
        (dict(compute="cuda_magic"), r"unknown compute path 'cuda_magic'; valid paths: auto, loop, small_batch, segment, fused, grouped_mm"),
        (dict(d_model=6, compute="grouped_mm"), r"compute path 'grouped_mm' needs d_model and d_ff whose rows"),
    ],
)
def test_unknown_names_list_the_valid_ones(kwargs, pattern):
    base = dict(d_model=16, d_ff=32, num_experts=8)
    with pytest.raises(ValueError, match=pattern):
        MoE(**{**base, **kwargs})


def test_input_errors():
    moe = MoE(d_model=16, d_ff=32, num_experts=4, name="layers.3.moe")
    with pytest.raises(ValueError, match=r"layers.3.moe: input last dim \(15\) must equal d_model \(16\)"):
        moe(torch.randn(4, 15))
    with pytest.raises(TypeError, match=r"input dtype torch.int64 is not floating point"):
        moe(torch.ones(4, 16, dtype=torch.long))
    with pytest.raises(ValueError, match=r"mask shape \(2, 4\) must equal the input's leading shape \(2, 3\)"):
        moe(torch.randn(2, 3, 16), mask=torch.ones(2, 4, dtype=torch.bool))
    with pytest.raises(TypeError, match=r"mask must be a bool tensor"):
        moe(torch.randn(2, 3, 16), mask=torch.ones(2, 3))


def test_check_finite_names_the_layer():
    moe = MoE(d_model=4, d_ff=8, num_experts=2, check_finite=True, name="block7.moe")
    x = torch.randn(3, 4)
    moe(x)
    x[1, 2] = float("nan")
    with pytest.raises(FloatingPointError, match="block7.moe: input contains NaN or Inf"):
        moe(x)
    x[1, 2] = float("inf")
    with pytest.raises(FloatingPointError, match="block7.moe"):
        moe(x)


def test_config_and_kwargs_together_is_an_error():
    config = MoEConfig(d_model=4, d_ff=8, num_experts=2)
    with pytest.raises(TypeError, match="either a config or keyword fields"):
        MoE(config, top_k=1)
