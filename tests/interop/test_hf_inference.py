"""Converted Hugging Face models with offloaded and quantized experts: the same tokens as
the converted model with its experts resident, through transformers' own generate."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")
from test_hf import _model  # noqa: E402

from moekit.inference import offload_model, quantize_model, record_cache_accesses, simulate  # noqa: E402
from moekit.interop.hf import convert_model  # noqa: E402
from moekit.layer import moe_layers  # noqa: E402


def _converted(family):
    model = convert_model(_model(family)).double()
    for _, layer in moe_layers(model):  # the path offloaded experts take: bitwise comparable
        layer.config.compute = "segment"
    return model


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "olmoe", "qwen2_moe", "deepseek_v3"])
@pytest.mark.parametrize("prefetch", [False, True])
def test_offloaded_converted_model_generates_the_resident_tokens(family, prefetch):
    resident = _converted(family)
    ids = torch.randint(0, 101, (2, 6))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    kwargs = dict(attention_mask=mask, max_new_tokens=10, pad_token_id=0, do_sample=False)
    expected = resident.generate(ids, **kwargs)
    model = copy.deepcopy(resident)
    offloaded = offload_model(model, experts_per_layer=1, policy="lfu", prefetch=prefetch)
    with torch.no_grad():
        assert torch.equal(model(ids, attention_mask=mask).logits, resident(ids, attention_mask=mask).logits)
    with record_cache_accesses(offloaded) as trace:
        assert torch.equal(model.generate(ids, **kwargs), expected)
    stats = offloaded.stats()
    assert stats["misses"] > 0 and (stats["prefetches"] > 0) == prefetch
    simulated = simulate(trace, "lfu", 1)
    assert (simulated.hits, simulated.misses) == (stats["hits"], stats["misses"] - _warmup_misses(trace, stats))
    offloaded.close()


def _warmup_misses(trace, stats) -> int:
    """The trace starts after the first forward; the cache's counts include it."""
    uses = sum(1 for events in trace.accesses.values() for kind, _ in events if kind == "use")
    return stats["hits"] + stats["misses"] - uses


@pytest.mark.parametrize("family", ["mixtral", "olmoe", "qwen2_moe"])
def test_quantized_converted_model_equals_the_model_with_dequantized_experts(family):
    model = convert_model(_model(family))
    with pytest.raises(ValueError, match="int4 group_size 32 does not divide the d_ff 48"):
        quantize_model(copy.deepcopy(model), bits=4, group_size=32)
    quantized = quantize_model(copy.deepcopy(model), bits=8, kernel="reference")
    with torch.no_grad():  # the float model with the weights the quantized ones stand for
        for (_, layer), (_, q_layer) in zip(moe_layers(model), moe_layers(quantized), strict=True):
            layer.experts.w_in.copy_(q_layer.experts.dequantized("w_in"))
            layer.experts.w_out.copy_(q_layer.experts.dequantized("w_out"))
    ids = torch.randint(0, 101, (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(quantized(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(quantized.generate(ids, **kwargs), model.generate(ids, **kwargs))
