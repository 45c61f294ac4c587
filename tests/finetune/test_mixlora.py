"""Mixture of LoRA experts: exact at step 0 for every dense FFN kind upcycle reads, the
formula Σ_k g_k·E_k(x) with E_k = the shared base plus expert k's update (float64), every
compute path against loop, the base held once and frozen, merge, and the errors."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tests.helpers import assert_close_dicts, run_path

from moekit import MoE, MoEConfig
from moekit.experts import LoRAExperts, SharedBaseExperts, StackedExperts
from moekit.finetune import merge_lora, mixlora
from moekit.models import LanguageModel, LMConfig
from moekit.models.adapters import AdapterConfig, apply_adapter
from moekit.models.lm import SwiGLU


def _llama_mlp():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    return LlamaMLP(LlamaConfig(hidden_size=16, intermediate_size=24, num_attention_heads=2, num_key_value_heads=2,
                                hidden_act="silu"))


def _gpt2_mlp():
    from transformers import GPT2Config
    from transformers.models.gpt2.modeling_gpt2 import GPT2MLP

    mlp = GPT2MLP(24, GPT2Config(n_embd=16))
    with torch.no_grad():  # biases start at zero: make them count
        mlp.c_fc.bias.normal_()
        mlp.c_proj.bias.normal_()
    return mlp


def _one_expert_moe():
    return MoE(MoEConfig(d_model=16, d_ff=24, num_experts=1, top_k=1, expert="geglu"))


DENSE_FFNS = {"moekit SwiGLU": lambda: SwiGLU(16, 24), "moekit one-expert MoE": _one_expert_moe,
              "Llama gated MLP": _llama_mlp, "GPT-2 MLP": _gpt2_mlp}


def _with_random_adapters(moe: MoE) -> MoE:
    with torch.no_grad():  # non-zero B, so every expert differs from the base
        for name, p in moe.experts.named_parameters():
            if name.startswith("lora_B"):
                p.normal_(std=0.1)
    return moe


@pytest.mark.parametrize("kind", list(DENSE_FFNS))
@pytest.mark.parametrize("router", ["topk", "softmax"])
def test_a_fresh_mixture_computes_exactly_what_the_dense_ffn_did(kind, router):
    torch.manual_seed(0)
    ffn = DENSE_FFNS[kind]().double().eval()  # GPT-2 drops out in training mode
    x = torch.randn(2, 5, 16, dtype=torch.float64)
    with torch.no_grad():
        expected = ffn(x)
        expected = expected.y if isinstance(ffn, MoE) else expected
    moe = mixlora(ffn, num_experts=4, top_k=None if router == "softmax" else 2, rank=4, router=router,
                  router_init_std=1.0)
    assert isinstance(moe.experts, LoRAExperts) and isinstance(moe.experts.base, SharedBaseExperts)
    torch.testing.assert_close(moe(x).y, expected, rtol=1e-12, atol=1e-12)


def _reference(moe: MoE, x_TD: torch.Tensor) -> torch.Tensor:
    """Σ_k g_k · E_k(x), E_k with weights W + s·B_k·A_k on the one shared W, from the formula."""
    lora, base = moe.experts, moe.experts.base
    routing = moe.router(x_TD)
    y = torch.zeros_like(x_TD)
    for t in range(x_TD.shape[0]):
        for k in range(routing.indices_TK.shape[1]):
            e = int(routing.indices_TK[t, k])
            w_in = base.dense_w_in + lora.scale * lora.lora_B_in[e] @ lora.lora_A_in[e]
            w_out = base.dense_w_out + lora.scale * lora.lora_B_out[e] @ lora.lora_A_out[e]
            gate, up = (w_in @ x_TD[t]).chunk(2)
            y[t] += routing.weights_TK[t, k] * (w_out @ (torch.nn.functional.silu(gate) * up))
    return y


def test_the_mixture_follows_the_formula_with_gradients_for_adapters_and_router_only():
    torch.manual_seed(0)
    ffn = SwiGLU(16, 24).double()
    moe = _with_random_adapters(mixlora(ffn, num_experts=4, top_k=2, rank=3, router_init_std=0.5, compute="loop"))
    x = torch.randn(9, 16, dtype=torch.float64)
    y = moe(x).y
    expected = _reference(moe, x)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    trained = [moe.router.weight, *(p for n, p in moe.experts.named_parameters() if n.startswith("lora_"))]
    grads = torch.autograd.grad(y.square().sum(), trained)
    expected_grads = torch.autograd.grad(expected.square().sum(), trained)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
        assert got.abs().sum() > 0
    base = moe.experts.base
    assert not base.dense_w_in.requires_grad and not base.dense_w_out.requires_grad


def test_the_base_is_the_dense_ffns_own_weight_held_once():
    ffn = SwiGLU(16, 24)
    moe = mixlora(ffn, num_experts=8, top_k=2, rank=4)
    base = moe.experts.base
    assert base.dense_w_in.data_ptr() == ffn.w_in.weight.data_ptr()
    assert base.w_in.shape == (8, 48, 16) and base.w_in.stride(0) == 0
    stored = {name: t.numel() for name, t in moe.state_dict().items() if name.startswith("experts.base")}
    assert stored == {"experts.base.dense_w_in": 48 * 16, "experts.base.dense_w_out": 16 * 24}


@pytest.mark.parametrize("path", ["shared_base", "grouped_mm", "segment", "fused", "small_batch", "triton"])
def test_every_path_matches_loop(path):
    torch.manual_seed(0)
    moe = _with_random_adapters(mixlora(SwiGLU(16, 24), num_experts=4, top_k=2, rank=4, router_init_std=0.5))
    x = torch.randn(3, 5, 16)
    out, grads = run_path(moe, path, x)
    ref, ref_grads = run_path(moe, "loop", x)
    torch.testing.assert_close(out.y, ref.y, rtol=1e-5, atol=1e-5)
    assert_close_dicts(grads, ref_grads, rtol=1e-4, atol=1e-5)


def test_merge_gives_an_ordinary_moe_with_each_experts_update_added():
    torch.manual_seed(0)
    moe = _with_random_adapters(mixlora(SwiGLU(16, 24).double(), num_experts=4, top_k=2, rank=4))
    x = torch.randn(6, 16, dtype=torch.float64)
    before = moe(x).y
    merge_lora(moe)
    assert type(moe.experts) is StackedExperts and moe.experts.w_in.stride(0) != 0
    torch.testing.assert_close(moe(x).y, before, rtol=1e-12, atol=1e-12)
    with pytest.raises(RuntimeError, match="share one base weight"):
        _with_random_adapters(mixlora(SwiGLU(16, 24), num_experts=2, top_k=1, rank=2)).experts.merge()


def test_a_dense_language_model_takes_mixtures_in_every_dense_block_exactly():
    torch.manual_seed(0)
    config = LMConfig(vocab_size=40, context_length=8, n_layer=2, n_head=2, d_model=16, d_ff=24,
                      moe=MoEConfig(d_model=16, d_ff=16, num_experts=4, top_k=2), moe_every=2)
    model = LanguageModel(config).double()
    idx = torch.randint(0, 40, (2, 8))
    before = model(idx).logits
    adapter = AdapterConfig(method="mixlora", num_experts=4, top_k=2, rank=4)
    apply_adapter(model, adapter)
    model.config = dataclasses.replace(config, adapter=adapter)
    out = model(idx)
    torch.testing.assert_close(out.logits, before, rtol=1e-12, atol=1e-12)
    assert len(out.routings) == 2  # the mixture's routing joins the MoE block's
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"blocks.0.ffn.router.weight"} | {f"blocks.0.ffn.experts.lora_{m}_{p}" for m in "AB"
                                                          for p in ("in", "out")}
    rebuilt = LanguageModel(model.config).double()
    rebuilt.load_state_dict(model.state_dict())
    assert torch.equal(rebuilt(idx).logits, out.logits)


@pytest.mark.parametrize("rank,match", [(0, "positive integer"), (25, "must be <= 16")])
def test_bad_ranks_are_named(rank, match):
    with pytest.raises(ValueError, match=match):
        mixlora(SwiGLU(16, 24), num_experts=4, top_k=2, rank=rank)


def test_a_model_without_the_adapters_target_is_named():
    dense = LanguageModel(LMConfig(vocab_size=40, context_length=8, n_layer=1, n_head=2, d_model=16, d_ff=24))
    with pytest.raises(ValueError, match="this model is dense"):
        apply_adapter(dense, AdapterConfig(method="lora"))
    moe = LanguageModel(LMConfig(vocab_size=40, context_length=8, n_layer=1, n_head=2, d_model=16, d_ff=24,
                                 moe=MoEConfig(d_model=16, d_ff=16, num_experts=4, top_k=2)))
    with pytest.raises(ValueError, match="every block of this model is an MoE"):
        apply_adapter(moe, AdapterConfig(method="mixlora"))


@pytest.mark.parametrize("fields", [dict(capacity_factor=0.5), dict(router="softmax", top_k=None)])
def test_the_shared_base_path_matches_loop_with_drops_and_dense_gates(fields):
    torch.manual_seed(0)
    fields = dict(dict(top_k=2), **fields)
    moe = _with_random_adapters(mixlora(_gpt2_mlp(), num_experts=4, rank=4, router_init_std=0.5, **fields))
    assert moe.compute_path(torch.empty(2, 16)).name == "shared_base"
    x = torch.randn(3, 5, 16)
    out, grads = run_path(moe, "shared_base", x)
    ref, ref_grads = run_path(moe, "loop", x)
    torch.testing.assert_close(out.y, ref.y, rtol=1e-5, atol=1e-5)
    assert_close_dicts(grads, ref_grads, rtol=1e-4, atol=1e-5)
    if "capacity_factor" in fields:
        assert int(out.routing.num_dropped) > 0
