"""transformers MoE blocks and models against their moekit conversions."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")
from transformers import (  # noqa: E402
    DeepseekV3Config,
    DeepseekV3ForCausalLM,
    MixtralConfig,
    MixtralForCausalLM,
    OlmoeConfig,
    OlmoeForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
    SwitchTransformersConfig,
    SwitchTransformersForConditionalGeneration,
)

from moekit.interop.hf import (  # noqa: E402
    HFMoEBlock,
    convert_model,
    export_model,
    from_hf_block,
    load_pretrained,
    to_hf_block,
)

TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=101, max_position_embeddings=64, num_experts_per_tok=2)

FAMILIES = {
    "mixtral": (MixtralForCausalLM, lambda: MixtralConfig(**TINY, intermediate_size=48, num_local_experts=4)),
    "qwen3_moe": (Qwen3MoeForCausalLM, lambda: Qwen3MoeConfig(**TINY, intermediate_size=64, moe_intermediate_size=48,
                                                              num_experts=4, norm_topk_prob=False)),
    "olmoe": (OlmoeForCausalLM, lambda: OlmoeConfig(**TINY, intermediate_size=48, num_experts=4)),
    "qwen2_moe": (Qwen2MoeForCausalLM, lambda: Qwen2MoeConfig(**TINY, intermediate_size=64, moe_intermediate_size=48,
                                                              shared_expert_intermediate_size=40, num_experts=4,
                                                              norm_topk_prob=True)),
    "deepseek_v3": (DeepseekV3ForCausalLM, lambda: DeepseekV3Config(
        **{**TINY, "num_key_value_heads": 4}, intermediate_size=64, moe_intermediate_size=48, n_routed_experts=8, n_shared_experts=2,
        n_group=4, topk_group=2, routed_scaling_factor=2.5, first_k_dense_replace=0, kv_lora_rank=16,
        q_lora_rank=None, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)),
}


def _model(family):
    cls, config = FAMILIES[family]
    torch.manual_seed(0)
    model = cls(config()).eval()
    with torch.no_grad():  # router weights start at zero in some families: give them a real choice
        for name, p in model.named_parameters():
            if name.endswith("gate.weight") or "experts" in name or "shared_expert" in name:
                p.normal_(std=0.2)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.normal_(std=0.1)
    return model


def _blocks(model):
    return [m for m in model.modules() if type(m).__name__.endswith(("SparseMoeBlock", "V3MoE"))]


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("path", ["loop", "segment", "fused", "grouped_mm"])
def test_block_outputs_match(family, path):
    model = _model(family)
    for block in _blocks(model):
        moe = from_hf_block(block, compute=path).eval()
        x = torch.randn(3, 7, 32)
        expected = block(x)
        torch.testing.assert_close(moe(x).y, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", FAMILIES)
def test_block_round_trip_restores_identical_state(family):
    model = _model(family)
    block = _blocks(model)[0]
    back = to_hf_block(from_hf_block(block), block.experts.config, type(block).__name__)
    original, restored = block.state_dict(), back.state_dict()
    assert original.keys() == restored.keys()
    for name in original:
        assert torch.equal(original[name], restored[name]), name


@pytest.mark.parametrize("family", FAMILIES)
def test_whole_model_logits_match_and_export_restores_state(family):
    model = _model(family)
    ids = torch.randint(0, 101, (2, 9))
    reference = model(ids).logits
    state = {k: v.clone() for k, v in model.state_dict().items()}
    convert_model(model)
    wrappers = [m for m in model.modules() if isinstance(m, HFMoEBlock)]
    assert len(wrappers) == 2
    torch.testing.assert_close(model(ids).logits, reference, rtol=1e-4, atol=1e-4)
    assert wrappers[0].last_output.routing.tokens_per_expert_E.sum() == 2 * 9 * 2
    export_model(model)
    assert not any(isinstance(m, HFMoEBlock) for m in model.modules())
    restored = model.state_dict()
    assert restored.keys() == state.keys()
    for name in state:
        assert torch.equal(restored[name], state[name]), name


def test_load_pretrained_folder_offline(tmp_path):
    model = _model("mixtral")
    ids = torch.randint(0, 101, (1, 6))
    reference = model(ids).logits
    model.save_pretrained(tmp_path)
    converted = load_pretrained(tmp_path).eval()
    assert any(isinstance(m, HFMoEBlock) for m in converted.modules())
    torch.testing.assert_close(converted(ids).logits, reference, rtol=1e-4, atol=1e-4)


def test_load_pretrained_refuses_a_folder_missing_a_router_tensor_truncated_weights_and_a_missing_path(tmp_path):
    from safetensors.torch import load_file, save_file

    model = _model("mixtral")
    model.save_pretrained(tmp_path / "model")
    weights = tmp_path / "model" / "model.safetensors"
    tensors = load_file(str(weights))
    router = next(k for k in tensors if k.startswith("model.layers.1.") and k.endswith("gate.weight"))
    save_file({k: v for k, v in tensors.items() if k != router}, str(weights), metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"do not match its config.json; tensors missing: model\.layers\.1\.\S*gate"):
        load_pretrained(tmp_path / "model")
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"could not load the weights in .*\(model.safetensors\)"):
        load_pretrained(tmp_path / "model")
    with pytest.raises(ValueError, match="is not a local folder; load_pretrained reads a folder"):
        load_pretrained(tmp_path / "nowhere")


def test_unsupported_inputs_get_clear_errors():
    with pytest.raises(TypeError, match="Linear is not a supported transformers MoE block"):
        from_hf_block(torch.nn.Linear(2, 2))
    with pytest.raises(ValueError, match="holds no supported MoE block"):
        convert_model(torch.nn.Sequential(torch.nn.Linear(2, 2)))
    with pytest.raises(ValueError, match="unknown family 'gpt2'"):
        to_hf_block(None, None, "gpt2")


def _switch_model(expert_capacity=3, router_bias=False):
    config = SwitchTransformersConfig(vocab_size=101, d_model=32, d_ff=48, d_kv=8, num_heads=4, num_layers=2,
                                      num_decoder_layers=2, num_sparse_encoder_layers=1,
                                      num_sparse_decoder_layers=1, num_experts=4,
                                      expert_capacity=expert_capacity, dropout_rate=0.0, router_bias=router_bias)
    torch.manual_seed(0)
    model = SwitchTransformersForConditionalGeneration(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "router" in name or "experts" in name:
                p.normal_(std=0.3)
    return model


@pytest.mark.parametrize("path", ["loop", "segment", "fused", "grouped_mm"])
def test_switch_block_matches_with_per_sequence_capacity(path):
    model = _switch_model()
    blocks = [m for m in model.modules() if type(m).__name__ == "SwitchTransformersSparseMLP"]
    assert len(blocks) == 2
    for block in blocks:
        moe = from_hf_block(block, model.config, compute=path).eval()
        x = torch.randn(3, 8, 32)
        out = moe(x)
        assert int(out.routing.num_dropped) > 0  # capacity 3 per sequence of 8 tokens binds
        torch.testing.assert_close(out.y, block(x), rtol=1e-5, atol=1e-5)
        back = to_hf_block(moe, model.config, "SwitchTransformersSparseMLP")
        for name, value in block.state_dict().items():
            assert torch.equal(back.state_dict()[name], value), name


def test_switch_router_bias_becomes_the_routers_logit_bias():
    model = _switch_model(router_bias=True)
    block = next(m for m in model.modules() if type(m).__name__ == "SwitchTransformersSparseMLP")
    with torch.no_grad():
        block.router.classifier.bias.normal_(std=2.0)  # large enough to change which expert wins
    moe = from_hf_block(block, model.config).eval()
    assert moe.config.router_options.logit_bias
    assert torch.equal(moe.router.logit_bias, block.router.classifier.bias)
    x = torch.randn(3, 8, 32)
    torch.testing.assert_close(moe(x).y, block(x), rtol=1e-5, atol=1e-5)
    back = to_hf_block(moe, model.config, "SwitchTransformersSparseMLP")
    assert torch.equal(back.router.classifier.bias, block.router.classifier.bias)


def test_switch_whole_model_logits_match():
    model = _switch_model()
    ids = torch.randint(0, 101, (2, 7))
    decoder_ids = torch.randint(0, 101, (2, 5))
    reference = model(input_ids=ids, decoder_input_ids=decoder_ids).logits
    convert_model(model)
    torch.testing.assert_close(model(input_ids=ids, decoder_input_ids=decoder_ids).logits, reference,
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "olmoe"])
def test_converted_model_generates_the_original_tokens_with_its_own_cache(family):
    model = _model(family)
    ids = torch.randint(0, 101, (2, 6))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # a left-padded prompt
    kwargs = dict(attention_mask=mask, max_new_tokens=10, pad_token_id=0)
    greedy = model.generate(ids, do_sample=False, **kwargs)
    torch.manual_seed(3)
    sampled = model.generate(ids, do_sample=True, top_k=20, **kwargs)
    convert_model(model)
    assert torch.equal(model.generate(ids, do_sample=False, **kwargs), greedy)
    torch.manual_seed(3)
    assert torch.equal(model.generate(ids, do_sample=True, top_k=20, **kwargs), sampled)
