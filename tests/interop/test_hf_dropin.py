"""A converted model as a drop-in for transformers' own: router logits and aux_loss in its
output, the attention mask as moekit's padding mask, Mixtral's training-time jitter."""

from __future__ import annotations

import copy

import pytest
import torch

pytest.importorskip("transformers")
from test_hf import FAMILIES, _model  # noqa: E402

from moekit.interop.hf import HFMoEBlock, convert_model  # noqa: E402

CAUSAL = [f for f in FAMILIES if f != "switch"]


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "olmoe", "qwen2_moe", "deepseek_v3"])
@pytest.mark.parametrize("ran_before_conversion", [False, True])
def test_router_logits_and_aux_loss_are_returned_as_before_conversion(family, ran_before_conversion):
    model = _model(family)
    ids = torch.randint(0, 101, (2, 7))
    reference = model(ids, labels=ids, output_router_logits=True)
    converted = copy.deepcopy(model) if ran_before_conversion else _model(family)
    convert_model(converted)
    out = converted(ids, labels=ids, output_router_logits=True)
    assert len(out.router_logits) == len(reference.router_logits) == 2
    for mine, theirs in zip(out.router_logits, reference.router_logits, strict=True):
        torch.testing.assert_close(mine.float(), theirs.float(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.aux_loss, reference.aux_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, reference.loss, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["mixtral", "olmoe"])
def test_the_attention_mask_is_the_padding_mask(family):
    model = convert_model(_model(family))
    ids = torch.randint(1, 101, (2, 8))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    blocks = [m for m in model.modules() if isinstance(m, HFMoEBlock)]
    with torch.no_grad():
        model(ids, attention_mask=mask)
        routed = [int(b.last_output.routing.tokens_per_expert_E.sum()) for b in blocks]
        losses = [b.last_output.aux_loss for b in blocks]
        other = ids.clone()
        other[1, :3] = torch.randint(1, 101, (3,))  # other padding content
        model(other, attention_mask=mask)
    top_k = blocks[0].moe.config.top_k
    assert routed == [(16 - 3) * top_k] * len(blocks)  # padding reaches no expert
    for block, loss in zip(blocks, losses, strict=True):
        torch.testing.assert_close(block.last_output.aux_loss, loss)  # nor any loss


def test_mixtral_router_jitter_is_applied_in_training_as_transformers_does():
    from test_hf import TINY
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    model = MixtralForCausalLM(MixtralConfig(**TINY, intermediate_size=48, num_local_experts=4,
                                             router_jitter_noise=0.3)).train()
    converted = convert_model(copy.deepcopy(model)).train()
    ids = torch.randint(0, 101, (2, 7))
    torch.manual_seed(5)
    reference = model(ids).logits
    torch.manual_seed(5)
    torch.testing.assert_close(converted(ids).logits, reference, rtol=1e-4, atol=1e-4)
    torch.manual_seed(6)
    assert not torch.allclose(converted(ids).logits, reference, atol=1e-4)  # the noise is there
    with torch.no_grad():
        model.eval(), converted.eval()
        torch.testing.assert_close(converted(ids).logits, model(ids).logits, rtol=1e-4, atol=1e-4)


def test_deepseek_v3_with_top_k_above_the_kept_groups_converts_as_transformers_computes():
    from test_hf import TINY
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(0)
    config = DeepseekV3Config(**{**TINY, "num_key_value_heads": 4, "num_experts_per_tok": 8}, intermediate_size=64,
                              moe_intermediate_size=48, n_routed_experts=8, n_shared_experts=1, n_group=2,
                              topk_group=1, first_k_dense_replace=0, kv_lora_rank=16, q_lora_rank=None,
                              qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8)
    model = DeepseekV3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("gate.weight") or "experts" in name:
                p.normal_(std=0.2)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.normal_(std=0.5)  # negative biases too: the masked experts' 0 score then matters
    ids = torch.randint(0, 101, (2, 7))
    reference = model(ids).logits
    convert_model(model)
    torch.testing.assert_close(model(ids).logits, reference, rtol=1e-4, atol=1e-4)


def test_a_group_limit_that_top_k_cannot_meet_says_how_to_allow_it():
    from moekit import MoEConfig

    with pytest.raises(ValueError, match=r"top_k \(8\) must be <= topk_groups · experts per group \(4\), or set "
                                         "outside_group_score"):
        MoEConfig(d_model=8, d_ff=8, num_experts=8, top_k=8, router="sigmoid", num_expert_groups=2, topk_groups=1)


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "olmoe", "qwen2_moe", "deepseek_v3"])
def test_save_pretrained_of_a_converted_model_writes_what_transformers_and_moekit_load(family, tmp_path):
    from moekit.interop.hf import load_pretrained

    model = convert_model(_model(family))
    ids = torch.randint(0, 101, (1, 6))
    reference = model(ids).logits
    model.save_pretrained(tmp_path)
    original, info = FAMILIES[family][0].from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    torch.testing.assert_close(original.eval()(ids).logits, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(load_pretrained(tmp_path).eval()(ids).logits, reference, rtol=0, atol=0)
    fresh = convert_model(_model(family))  # a converted model loads the transformers layout back
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    fresh.load_state_dict(model.state_dict())
    torch.testing.assert_close(fresh(ids).logits, reference, rtol=0, atol=0)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_init_weights_after_the_meta_device_initialises_the_converted_blocks_as_transformers_does(family):
    cls, config = FAMILIES[family]
    with torch.device("meta"):
        model = cls(config())
    convert_model(model)
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float("nan"))
    model.init_weights()
    assert [n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())] == []
    std = model.config.initializer_range
    for block in (m for m in model.modules() if isinstance(m, HFMoEBlock)):
        assert abs(float(block.moe.experts.w_in.std()) - std) < 0.25 * std
        assert abs(float(block.moe.router.weight.std()) - std) < 0.5 * std


def test_a_converted_model_deep_copies_and_pickles_like_the_original(tmp_path):
    model = convert_model(_model("mixtral"))
    torch.save(model, tmp_path / "model.pt")  # before a forward, as transformers' own models pickle
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    ids = torch.randint(0, 101, (1, 5))
    with torch.no_grad():
        reference = model(ids).logits
        assert torch.equal(loaded(ids).logits, reference)
    twin = copy.deepcopy(model)
    out = twin(ids, labels=ids, output_router_logits=True)
    assert torch.equal(out.logits, reference) and len(out.router_logits) == 2
    twin.init_weights()  # the copy's init reaches the copy's blocks, not the original's
    assert not torch.equal(twin(ids).logits, reference)
    assert torch.equal(model(ids).logits, reference)
