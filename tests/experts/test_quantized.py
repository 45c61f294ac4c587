"""Quantized experts against the formula: the quantized matmul equals the float64 product
with the dequantized weights, within the error of the format's activation rounding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moekit import MoE, MoEConfig, StackedExperts
from moekit.compute.ops import ACTIVATIONS
from moekit.experts.quantized import (
    PACKED_KERNEL_MAX_ROWS,
    QuantizedExperts,
    dequantize_int4,
    dequantize_int8,
    quantize_int4,
    quantize_int8,
)

BF16_UNIT = 2.0**-8  # relative rounding error of a bfloat16 value


def _experts(kind="swiglu", bias=False, d_model=64, d_ff=64):
    torch.manual_seed(0)
    return StackedExperts(3, d_model, d_ff, kind=kind, activation="gelu", bias=bias)


def _reference_f64(quantized: QuantizedExperts, e: int, x: torch.Tensor):
    """The expert's MLP on the dequantized weights in float64, and the same with |·| everywhere
    (the scale of the rounding error)."""
    w_in = quantized.dequantized("w_in", e, torch.float64)
    w_out = quantized.dequantized("w_out", e, torch.float64)
    b_in = None if quantized.b_in is None else quantized.b_in[e].double()
    b_out = None if quantized.b_out is None else quantized.b_out[e].double()
    h = F.linear(x.double(), w_in, b_in)
    if quantized.is_glu:
        gate, up = h.chunk(2, dim=-1)
        a = ACTIVATIONS[quantized.activation](gate) * up
    else:
        a = ACTIVATIONS[quantized.activation](h)
    y = F.linear(a, w_out, b_out)
    scale = F.linear(a.abs(), w_out.abs()) + (x.double().abs() @ w_in.abs().T).abs().amax() * w_out.abs().sum(-1)
    return y, scale


def test_int8_round_trip_is_within_half_a_step_per_row():
    w = torch.randn(5, 7, 33, dtype=torch.float64)
    q, scale = quantize_int8(w)
    assert q.dtype == torch.int8 and scale.shape == (5, 7)
    assert ((dequantize_int8(q, scale, torch.float64) - w).abs() <= scale[..., None].double() / 2 + 1e-7).all()
    assert q.abs().amax(-1).eq(127).all()  # each row uses the whole grid


def test_int4_round_trip_is_within_half_a_step_per_group_and_packs_two_per_byte():
    w = torch.randn(4, 6, 128, dtype=torch.float64)
    packed, scale, low = quantize_int4(w, 32)
    assert packed.dtype == torch.uint8 and packed.shape == (4, 6, 64) and scale.shape == (4, 6, 4)
    error = dequantize_int4(packed, scale, low, torch.float64) - w
    assert (error.abs() <= scale.double().repeat_interleave(32, -1) / 2 + 1e-6).all()


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("kind,bias", [("swiglu", False), ("ffn", True), ("geglu", False)])
@pytest.mark.parametrize("rows", [1, 5, PACKED_KERNEL_MAX_ROWS + 7])
def test_quantized_expert_equals_the_dequantized_float64_reference(bits, kind, bias, rows):
    quantized = QuantizedExperts.from_stacked(_experts(kind, bias), bits=bits, group_size=32)
    x = torch.randn(rows, 64)
    for e in range(3):
        y = quantized.forward_expert(e, x)
        reference, scale = _reference_f64(quantized, e, x)
        if rows <= PACKED_KERNEL_MAX_ROWS:  # the packed kernels round activations to bfloat16 (twice)
            assert ((y.double() - reference).abs() <= 4 * BF16_UNIT * scale + 1e-6).all()
        else:  # dequantized weights in float32
            torch.testing.assert_close(y.double(), reference, rtol=1e-5, atol=1e-5)


def test_the_reference_kernel_and_the_packed_kernel_agree():
    experts = _experts()
    fast = QuantizedExperts.from_stacked(experts, bits=8)
    reference = QuantizedExperts.from_stacked(experts, bits=8, kernel="reference")
    x = torch.randn(2, 64)
    y_fast, y_ref = fast.forward_expert(1, x), reference.forward_expert(1, x)
    assert not torch.equal(y_fast, y_ref)  # two different kernels ran
    torch.testing.assert_close(y_fast, y_ref, rtol=0.03, atol=0.03 * y_ref.abs().max().item())


def test_quantization_error_against_the_float_experts_is_small():
    experts = _experts()
    x = torch.randn(40, 64)
    for bits, tolerance in ((8, 0.02), (4, 0.15)):
        quantized = QuantizedExperts.from_stacked(experts, bits=bits, group_size=32)
        y, y_float = quantized.forward_expert(0, x), experts.forward_expert(0, x)
        assert (y - y_float).norm() / y_float.norm() < tolerance


def test_a_layer_with_quantized_experts_runs_every_path_that_takes_them():
    torch.manual_seed(0)
    layer = MoE(MoEConfig(d_model=64, d_ff=64, num_experts=3, top_k=2, compute="loop"))
    layer.experts = QuantizedExperts.from_stacked(layer.experts, bits=8, kernel="reference")
    x = torch.randn(9, 64, requires_grad=True)
    outputs = {}
    for path in ("loop", "small_batch", "segment"):
        layer.config.compute = path
        outputs[path] = layer(x).y
    torch.testing.assert_close(outputs["segment"], outputs["loop"])
    torch.testing.assert_close(outputs["small_batch"], outputs["loop"])
    outputs["loop"].sum().backward()  # inputs still get gradients; the integer weights have none
    assert x.grad is not None and x.grad.abs().sum() > 0
    layer.config.compute = "grouped_mm"
    with pytest.raises(ValueError, match="grouped_mm"):
        layer(x)


def test_bad_quantization_settings_are_named():
    experts = _experts(d_model=96)
    with pytest.raises(ValueError, match="group_size 64 does not divide the d_model 96"):
        QuantizedExperts.from_stacked(experts, bits=4, group_size=64)
    with pytest.raises(ValueError, match="group_size must be one of"):
        QuantizedExperts.from_stacked(experts, bits=4, group_size=48)
    with pytest.raises(ValueError, match="bits must be 8 or 4"):
        QuantizedExperts.from_stacked(experts, bits=3)


def test_a_quantized_state_dict_loads_into_empty_quantized_experts():
    quantized = QuantizedExperts.from_stacked(_experts(), bits=4, group_size=32)
    empty = QuantizedExperts(3, 64, 64, bits=4, group_size=32, activation="silu")
    empty.load_state_dict(quantized.state_dict())
    x = torch.randn(3, 64)
    y_before = empty.forward_expert(2, x)  # packs the kernel operands
    assert torch.equal(y_before, quantized.forward_expert(2, x))
    empty.load_state_dict(QuantizedExperts.from_stacked(_experts(d_ff=64), bits=4, group_size=32).state_dict())
    assert torch.equal(empty.forward_expert(2, x), y_before)  # same weights: same output
    other = QuantizedExperts.from_stacked(StackedExperts(3, 64, 64), bits=4, group_size=32)
    empty.load_state_dict(other.state_dict())  # new weights: the packed operands are rebuilt
    assert torch.equal(empty.forward_expert(2, x), other.forward_expert(2, x))
