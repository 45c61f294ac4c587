"""The vision transformer against its formula in float64 (patches, attention, MLP or MoE
blocks, mean pooling; outputs and gradients), V-MoE's capacity and Soft MoE inside it, and
the errors."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from moekit import MoEConfig
from moekit.models.vision import ViT, ViTConfig
from moekit.routing import router_class


def _patches(images, p):
    B, C, H, W = images.shape
    rows = []
    for i in range(0, H, p):
        for j in range(0, W, p):
            rows.append(images[:, :, i:i + p, j:j + p].reshape(B, -1))
    return torch.stack(rows, dim=1)


def _attention(block, x):
    D, H = x.shape[-1], block.attn.num_heads
    q, k, v = (x @ block.attn.in_proj_weight.t() + block.attn.in_proj_bias).split(D, dim=-1)
    split = lambda t: t.view(t.shape[0], t.shape[1], H, D // H).transpose(1, 2)  # noqa: E731
    q, k, v = split(q), split(k), split(v)
    weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D // H), dim=-1)
    y = (weights @ v).transpose(1, 2).reshape(x.shape)
    return y @ block.attn.out_proj.weight.t() + block.attn.out_proj.bias


def _reference(model, images):
    x = _patches(images.unsqueeze(1), model.config.patch_size) @ model.embed.weight.t() + model.embed.bias
    x = x + model.position
    for block in model.blocks:
        x = x + _attention(block, block.norm_attn(x))
        h = block.norm_mlp(x)
        if block.is_moe:
            x = x + block.mlp(h).y
        else:
            x = x + block.mlp[2](F.gelu(block.mlp[0](h)))
    return model.head(model.norm(x).mean(dim=1))


@pytest.mark.parametrize("moe", [None, "topk", "soft"])
def test_the_vit_follows_its_formula_with_gradients(moe):
    torch.manual_seed(0)
    config = None
    if moe == "topk":
        config = MoEConfig(d_model=16, d_ff=8, num_experts=4, top_k=2, expert="ffn", compute="loop")
    elif moe == "soft":
        config = MoEConfig(d_model=16, d_ff=8, num_experts=4, router="soft", expert="ffn", load_balance_coef=0.0,
                           router_options=router_class("soft").Options(slots_per_expert=2))
    model = ViT(ViTConfig(image_size=4, patch_size=2, d_model=16, n_layer=2, n_head=2, d_ff=12, moe=config)).double()
    images = torch.rand(3, 4, 4, dtype=torch.float64)
    out = model(images)
    expected = _reference(model, images)
    torch.testing.assert_close(out.logits, expected, rtol=1e-10, atol=1e-12)
    params = list(model.parameters())
    grads = torch.autograd.grad(out.logits.square().sum(), params, allow_unused=True)
    expected_grads = torch.autograd.grad(expected.square().sum(), params, allow_unused=True)
    for got, want in zip(grads, expected_grads, strict=True):
        if want is not None:
            torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)
    assert len(out.routings) == (0 if moe is None else 1)


def test_v_moe_drops_patches_over_capacity_by_batch_priority():
    torch.manual_seed(0)
    config = MoEConfig(d_model=16, d_ff=8, num_experts=4, top_k=2, expert="ffn", capacity_factor=0.5,
                       drop_priority="batch_priority")
    model = ViT(ViTConfig(image_size=4, patch_size=2, d_model=16, n_layer=2, n_head=2, moe=config))
    routing = model(torch.rand(8, 4, 4)).routings[0]
    capacity = math.ceil(0.5 * 8 * 4 * 2 / 4)
    assert int(routing.num_dropped) > 0 and int(routing.tokens_per_expert_E.max()) <= capacity
    # A patch's second choice is kept only if every kept first choice at that expert ranks above it.
    kept, indices = routing.kept_TK, routing.indices_TK
    for e in range(4):
        first, second = kept[:, 0] & (indices[:, 0] == e), kept[:, 1] & (indices[:, 1] == e)
        if second.any():
            assert int((indices[:, 0] == e).sum()) == int(first.sum())


@pytest.mark.parametrize("settings,message", [
    (dict(image_size=8, patch_size=3), r"image_size \(8\) is not divisible by patch_size \(3\)"),
    (dict(d_model=10, n_head=4), r"n_head \(4\) must divide d_model \(10\)"),
    (dict(d_model=16, n_head=2, moe=MoEConfig(d_model=8, d_ff=8, num_experts=2)), r"moe.d_model \(8\) must equal"),
])
def test_bad_configs_are_named(settings, message):
    with pytest.raises(ValueError, match=message):
        ViTConfig(**settings)


def test_images_of_the_wrong_shape_are_named():
    model = ViT(ViTConfig(image_size=8, patch_size=2, d_model=16, n_head=2))
    with pytest.raises(ValueError, match=r"images of shape \(2, 3, 8, 8\): expected \(batch, 1, 8, 8\)"):
        model(torch.rand(2, 3, 8, 8))
