"""LoRA experts against the formula W + s·B·A per expert (float64), every path against loop,
merge and unmerge, sharding, and the errors."""

from __future__ import annotations

import pytest
import torch
from tests.helpers import assert_close_dicts, run_path

from moekit import MoE, MoEConfig
from moekit.experts import LoRAExperts, StackedExperts
from moekit.finetune import add_lora, merge_lora, trainable_parameters


def _adapted_layer(dtype=torch.float64, rank=4, kind="swiglu", bias=False, **fields):
    torch.manual_seed(0)
    moe = MoE(MoEConfig(d_model=16, d_ff=32, num_experts=4, top_k=2, expert=kind, expert_bias=bias,
                        **fields)).to(dtype)
    add_lora(moe, rank=rank, alpha=2.0 * rank)
    with torch.no_grad():  # non-zero B, so the update shows
        for p in (moe.experts.lora_B_in, moe.experts.lora_B_out):
            p.normal_(std=0.1)
    return moe


def _dense_delta_reference(moe: MoE, x_TD: torch.Tensor) -> torch.Tensor:
    """y = Σ_k g_k · E_k(x) with each expert's weights W + s·B·A, written out from the formula."""
    lora = moe.experts
    base = lora.base
    w_in = base.w_in + lora.scale * lora.lora_B_in @ lora.lora_A_in
    w_out = base.w_out + lora.scale * lora.lora_B_out @ lora.lora_A_out
    routing = moe.router(x_TD)
    y = torch.zeros_like(x_TD)
    for t in range(x_TD.shape[0]):
        for k in range(routing.indices_TK.shape[1]):
            e = int(routing.indices_TK[t, k])
            h = w_in[e] @ x_TD[t]
            if base.b_in is not None:
                h = h + base.b_in[e]
            gate, up = h.chunk(2) if base.is_glu else (h, None)
            a = torch.nn.functional.silu(gate) * up if base.is_glu else torch.nn.functional.gelu(h)
            out = w_out[e] @ a + (base.b_out[e] if base.b_out is not None else 0)
            y[t] += routing.weights_TK[t, k] * out
    return y


@pytest.mark.parametrize("kind,bias", [("swiglu", False), ("ffn", True)])
def test_lora_equals_the_dense_delta_formula_with_gradients_of_a_and_b_only(kind, bias):
    moe = _adapted_layer(kind=kind, bias=bias, compute="loop")
    x = torch.randn(7, 16, dtype=torch.float64, requires_grad=True)
    y = moe(x).y
    expected = _dense_delta_reference(moe, x)
    torch.testing.assert_close(y, expected, rtol=1e-12, atol=1e-12)
    params = (moe.experts.lora_A_in, moe.experts.lora_B_in, moe.experts.lora_A_out, moe.experts.lora_B_out)
    grads = torch.autograd.grad(y.square().sum(), params)
    expected_grads = torch.autograd.grad(expected.square().sum(), params)
    for got, want in zip(grads, expected_grads, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    assert not moe.experts.base.w_in.requires_grad and not moe.experts.base.w_out.requires_grad
    assert moe.experts.base.w_in.grad is None


def test_adapters_start_at_zero_so_the_adapted_layer_equals_the_base():
    torch.manual_seed(0)
    moe = MoE(MoEConfig(d_model=16, d_ff=32, num_experts=4, top_k=2)).double()
    x = torch.randn(5, 16, dtype=torch.float64)
    before = moe(x).y
    add_lora(moe, rank=4)
    assert torch.equal(moe(x).y, before)


@pytest.mark.parametrize("path", ["grouped_mm", "segment", "fused", "small_batch", "triton"])
@pytest.mark.parametrize("rank", [3, 8])
def test_every_path_matches_loop_with_adapters(path, rank):
    moe = _adapted_layer(torch.float32, rank=rank)
    x = torch.randn(3, 5, 16)
    out, grads = run_path(moe, path, x)
    ref, ref_grads = run_path(moe, "loop", x)
    torch.testing.assert_close(out.y, ref.y, rtol=1e-5, atol=1e-5)
    assert_close_dicts(grads, ref_grads, rtol=1e-4, atol=1e-5)
    assert grads["experts.lora_A_in"].abs().sum() > 0 and grads["experts.lora_B_out"].abs().sum() > 0


def test_float64_paths_without_grouped_mm_fall_back_to_one_expert_at_a_time():
    moe = _adapted_layer(torch.float64)
    x = torch.randn(3, 5, 16, dtype=torch.float64)
    ref, ref_grads = run_path(moe, "loop", x)
    for path in ("segment", "fused"):
        out, grads = run_path(moe, path, x)
        torch.testing.assert_close(out.y, ref.y, rtol=1e-12, atol=1e-12)
        assert_close_dicts(grads, ref_grads, rtol=1e-10, atol=1e-12)


def test_merge_gives_the_same_output_and_unmerge_restores_the_weights_bitwise():
    moe = _adapted_layer(torch.float32)
    x = torch.randn(6, 16)
    before = moe(x).y
    w_in, w_out = moe.experts.base.w_in.clone(), moe.experts.base.w_out.clone()
    moe.experts.merge()
    assert moe.experts.merged and moe.experts.low_rank_in is None
    torch.testing.assert_close(moe(x).y, before, rtol=1e-5, atol=1e-6)
    moe.experts.unmerge()
    assert torch.equal(moe.experts.base.w_in, w_in) and torch.equal(moe.experts.base.w_out, w_out)
    assert torch.equal(moe(x).y, before)
    with pytest.raises(RuntimeError, match="not merged"):
        moe.experts.unmerge()


def test_merge_lora_puts_plain_experts_back_with_the_update_folded_in():
    moe = _adapted_layer(torch.float64)
    x = torch.randn(6, 16, dtype=torch.float64)
    before = moe(x).y
    merge_lora(moe)
    assert type(moe.experts) is StackedExperts and moe.experts.w_in.requires_grad
    torch.testing.assert_close(moe(x).y, before, rtol=1e-12, atol=1e-12)


def test_shard_slices_base_and_adapters_by_expert():
    lora = _adapted_layer().experts
    shard = lora.shard(1, 2)
    assert isinstance(shard, LoRAExperts) and shard.num_experts == 2
    x = torch.randn(5, 16, dtype=torch.float64)
    for local, e in ((0, 1), (1, 2)):
        torch.testing.assert_close(shard.forward_expert(local, x), lora.forward_expert(e, x), rtol=0, atol=0)
    assert {k for k in shard.state_dict()} == {k for k in lora.state_dict()}


def test_add_lora_freezes_the_rest_and_adapts_shared_experts_on_request():
    torch.manual_seed(0)
    moe = MoE(MoEConfig(d_model=16, d_ff=32, num_experts=4, top_k=2, num_shared_experts=1))
    add_lora(moe, rank=2, targets=("experts", "shared"))
    trainable = {n for n, p in moe.named_parameters() if p.requires_grad}
    assert trainable == {f"{site}.lora_{ab}_{proj}" for site in ("experts", "shared_experts.ffn")
                         for ab in "AB" for proj in ("in", "out")}
    assert trainable_parameters(moe) == 4 * 2 * (16 + 64 + 32 + 16) + 2 * (16 + 64 + 32 + 16)
    with torch.no_grad():
        moe.shared_experts.ffn.lora_B_out.normal_()
    x = torch.randn(3, 16)
    shared_only = moe.shared_experts(x)
    base = moe.shared_experts.ffn.base
    assert not torch.allclose(shared_only, base.forward_expert(0, x))


def test_bad_lora_settings_get_named_errors():
    base = StackedExperts(4, 16, 32)
    with pytest.raises(ValueError, match=r"rank \(0\) must be a positive integer"):
        LoRAExperts(base, 0)
    with pytest.raises(ValueError, match=r"rank \(17\) must be <= 16"):
        LoRAExperts(base, 17)
    with pytest.raises(ValueError, match=r"alpha \(-1\) must be a positive number"):
        LoRAExperts(base, 4, -1)
    with pytest.raises(ValueError, match="projections"):
        LoRAExperts(base, 4, projections=("up",))
    with pytest.raises(TypeError, match="stacked MLP experts"):
        LoRAExperts(torch.nn.Linear(2, 2), 4)
    with pytest.raises(ValueError, match="has no MoE layer"):
        add_lora(torch.nn.Linear(2, 2))
    moe = MoE(MoEConfig(d_model=16, d_ff=32, num_experts=4, top_k=2))
    add_lora(moe)
    with pytest.raises(ValueError, match="already has LoRA adapters"):
        add_lora(moe)
