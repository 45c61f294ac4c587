"""Surgery on the language model: upcycle, grow and prune every MoE block."""

from __future__ import annotations

import pytest
import torch

from moekit import MoEConfig
from moekit.interop.lm_surgery import capture_moe_inputs, grow_lm, prune_lm, upcycle_lm
from moekit.interop.surgery import measure_load
from moekit.models.lm import LanguageModel, LMConfig


def _model(experts: int = 0) -> LanguageModel:
    moe = MoEConfig(d_model=32, d_ff=32, num_experts=experts, top_k=2, expert="swiglu") if experts else None
    model = LanguageModel(LMConfig(vocab_size=64, context_length=16, n_layer=2, n_head=2, d_model=32, d_ff=48, moe=moe))
    with torch.no_grad():  # trained-looking weights: larger than the init, so surgery errors would show
        for p in model.parameters():
            p.mul_(3)
    return model.eval()


def _batches(n: int = 3):
    generator = torch.Generator().manual_seed(1)
    return [(torch.randint(0, 64, (4, 16), generator=generator),) * 2 for _ in range(n)]


def test_upcycled_model_equals_the_dense_one():
    dense = _model()
    upcycled = upcycle_lm(dense, 4, 2, seed=3).eval()
    assert upcycled.config.moe.num_experts == 4 and upcycled.moe_layers == [0, 1]
    for x_BS, _ in _batches():
        torch.testing.assert_close(upcycled(x_BS).logits, dense(x_BS).logits, atol=1e-5, rtol=0)
    # Each expert is the dense FFN; the router is fresh, so tokens spread over experts.
    assert torch.equal(upcycled.blocks[1].ffn.experts.w_out[3], dense.blocks[1].ffn.w_out.weight)
    assert (upcycled(_batches()[0][0]).routings[0].tokens_per_expert_E > 0).sum() >= 2


def test_grown_model_equals_the_original_on_the_captured_data():
    model = _model(4)
    batches = _batches()
    grown = grow_lm(model, 2, capture_moe_inputs(model, batches)).eval()
    assert grown.config.moe.num_experts == 6 and grown.config.moe.router_options.logit_bias
    for x_BS, _ in batches:
        out = grown(x_BS)
        # The renormalised top-k weights round differently in the last bit (the softmax
        # denominator has more terms); two blocks and a vocabulary head spread that to ~2e-6
        # (the layer itself agrees to 1e-6: tests/interop/test_grow.py).
        torch.testing.assert_close(out.logits, model(x_BS).logits, atol=5e-6, rtol=0)
        assert all(r.tokens_per_expert_E[4:].sum() == 0 for r in out.routings)


def test_prune_by_load_removes_the_least_used_experts():
    model = _model(4)
    inputs = capture_moe_inputs(model, _batches())
    pruned, removed = prune_lm(model, 1, inputs, by="load")
    assert pruned.config.moe.num_experts == 3
    for block in (0, 1):
        load_E = measure_load(model.blocks[block].ffn, [inputs[block]])
        assert load_E[removed[block][0]] == load_E.min()
        kept = [e for e in range(4) if e not in removed[block]]
        assert torch.equal(pruned.blocks[block].ffn.experts.w_in, model.blocks[block].ffn.experts.w_in[kept])


def test_prune_by_similarity_merges_pairs():
    model = _model(4)
    pruned, merged = prune_lm(model, 2, capture_moe_inputs(model, _batches()), by="similarity")
    assert pruned.config.moe.num_experts == 2
    assert all(len(pairs) == 2 for pairs in merged.values())
    a, b = merged[0][0]
    expected = (model.blocks[0].ffn.experts.w_in[a] + model.blocks[0].ffn.experts.w_in[b]) / 2
    assert torch.allclose(pruned.blocks[0].ffn.experts.w_in[a], expected) or merged[0][1][0] == a


def test_surgery_refuses_the_wrong_model():
    with pytest.raises(ValueError, match="already has 4 experts"):
        upcycle_lm(_model(4), 4)
    with pytest.raises(ValueError, match="dense"):
        prune_lm(_model(), 1, {})
    with pytest.raises(ValueError, match=r"num_remove \(4\)"):
        prune_lm(_model(4), 4, {})
    with pytest.raises(ValueError, match=r"by \('size'\)"):
        prune_lm(_model(4), 1, {}, by="size")
