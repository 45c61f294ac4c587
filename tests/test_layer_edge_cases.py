"""The layer on empty batches, all-padding batches, mismatched dtypes and overflowing experts:
an output like the other routers give, or an error naming the problem."""

from __future__ import annotations

import pytest
import torch

from moekit import MoE, MoEConfig

ROUTERS = {"topk": {"top_k": 2}, "expert_choice": {}, "soft": {}, "sigmoid": {"top_k": 2},
           "hash": {"hash_vocab_size": 10}, "switch": {}}


@pytest.mark.parametrize("router", list(ROUTERS))
def test_an_empty_batch_gives_an_empty_output_and_a_finite_loss(router):
    layer = MoE(MoEConfig(d_model=8, d_ff=8, num_experts=4, router=router, **ROUTERS[router]))
    x = torch.randn(0, 8, requires_grad=True)
    extra = {"token_ids": torch.zeros(0, dtype=torch.long)} if router == "hash" else {}
    out = layer(x, **extra)
    assert out.y.shape == (0, 8) and bool(torch.isfinite(out.aux_loss))
    (out.y.sum() + out.aux_loss).backward()
    assert x.grad.shape == (0, 8)


@pytest.mark.parametrize("router", ["topk", "sigmoid", "hash"])
@pytest.mark.parametrize("path", ["loop", "small_batch", "segment", "grouped_mm", "fused"])
def test_a_batch_of_padding_only_backpropagates_on_every_path(router, path):
    options = {k: v for k, v in ROUTERS[router].items() if k != "top_k"}
    layer = MoE(MoEConfig(d_model=8, d_ff=8, num_experts=4, router=router, compute=path,
                          top_k=ROUTERS[router].get("top_k"), **options))
    x = torch.randn(3, 8, requires_grad=True)
    extra = {"token_ids": torch.zeros(3, dtype=torch.long)} if router == "hash" else {}
    out = layer(x, mask=torch.zeros(3, dtype=torch.bool), **extra)
    assert torch.equal(out.y, torch.zeros(3, 8))
    out.y.sum().backward()
    assert torch.equal(x.grad, torch.zeros(3, 8))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_an_input_of_another_dtype_than_the_layer_is_named(dtype):
    layer = MoE(MoEConfig(d_model=8, d_ff=8, num_experts=4, top_k=2))
    with pytest.raises(TypeError, match=f"input dtype {dtype} differs from the layer's parameters \\(torch.float32\\)"):
        layer(torch.randn(3, 8, dtype=dtype))
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast is the way to mix them
        assert layer(torch.randn(3, 8, dtype=torch.bfloat16)).y.shape == (3, 8)


def test_check_finite_catches_an_expert_that_overflows_a_finite_input():
    layer = MoE(MoEConfig(d_model=8, d_ff=8, num_experts=4, top_k=2, check_finite=True))
    x = torch.randn(3, 8)
    assert bool(torch.isfinite(layer(x).y).all())
    with torch.no_grad():
        layer.experts.w_out.fill_(3e38)
    with pytest.raises(FloatingPointError, match="output contains NaN or Inf for a finite input"):
        layer(x)
    with pytest.raises(FloatingPointError, match="input contains NaN or Inf"):
        layer(torch.full((2, 8), float("nan")))


def test_router_options_of_the_wrong_type_name_the_field():
    with pytest.raises(ValueError, match=r"router_jitter \('0.1'\) must be a finite number"):
        MoEConfig(d_model=8, d_ff=8, num_experts=4, top_k=2, router_jitter="0.1")
