"""A small vision transformer whose MLP blocks can be moekit MoE layers: V-MoE and Soft MoE.

``ViT(ViTConfig(...))`` cuts an image into p×p patches, embeds them with learned
positions, runs pre-norm transformer blocks and classifies the mean of the patch
tokens. Every ``moe_every``-th block's MLP is ``MoE(config.moe)``:

- V-MoE (Riquelme et al. 2021): ``router="topk"`` with a ``capacity_factor`` and
  ``drop_priority="batch_priority"``: over capacity, first choices go before second
  choices and, within a choice, the patches whose top choice is most confident first;
- Soft MoE (Puigcerver et al. 2023): ``router="soft"``: each expert's slots are soft
  mixtures of an image's patches (every image is one sequence of patch tokens).

Shapes: B images, C channels, H = W image side, p patch side, S = (H/p)² patches,
D model dim.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import MoEConfig
from ..layer import MoE, MoERouting


@dataclass(kw_only=True)
class ViTConfig:
    """The vision transformer.

    Args:
        image_size: H = W, pixels per side.
        patch_size: p; must divide image_size.
        channels: C.
        num_classes: classes of the head.
        d_model, n_layer, n_head: D, blocks, attention heads (n_head divides D).
        d_ff: hidden width of the dense MLP blocks.
        moe: the MoE layer's config (its d_model must be D), or None for a dense model.
        moe_every: the MoE in every n-th block (2: blocks 1, 3, …, as V-MoE does).
    """

    image_size: int = 8
    patch_size: int = 2
    channels: int = 1
    num_classes: int = 10
    d_model: int = 64
    n_layer: int = 4
    n_head: int = 4
    d_ff: int = 128
    moe: MoEConfig | None = None
    moe_every: int = 2

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):
            self.moe = MoEConfig.from_dict(self.moe)
        for name in ("image_size", "patch_size", "channels", "num_classes", "d_model", "n_layer", "n_head", "d_ff",
                     "moe_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} ({value!r}) must be a positive integer")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size ({self.image_size}) is not divisible by patch_size ({self.patch_size})")
        if self.d_model % self.n_head:
            raise ValueError(f"n_head ({self.n_head}) must divide d_model ({self.d_model})")
        if self.moe is not None and self.moe.d_model != self.d_model:
            raise ValueError(f"moe.d_model ({self.moe.d_model}) must equal d_model ({self.d_model})")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe is not None and layer % self.moe_every == self.moe_every - 1

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class ViTOutput(NamedTuple):
    """logits (B, classes); aux_loss: the MoE layers' weighted auxiliary losses; routings:
    one ``MoERouting`` per MoE block (token order: image-major, patches in raster order)."""

    logits: Tensor
    aux_loss: Tensor
    routings: list[MoERouting]


class _Block(nn.Module):
    def __init__(self, config: ViTConfig, layer: int):
        super().__init__()
        self.norm_attn = nn.LayerNorm(config.d_model)
        self.attn = nn.MultiheadAttention(config.d_model, config.n_head, batch_first=True)
        self.norm_mlp = nn.LayerNorm(config.d_model)
        self.is_moe = config.is_moe_layer(layer)
        if self.is_moe:
            self.mlp = MoE(config.moe, name=f"block {layer} MoE")
        else:
            self.mlp = nn.Sequential(nn.Linear(config.d_model, config.d_ff), nn.GELU(),
                                     nn.Linear(config.d_ff, config.d_model))

    def forward(self, x_BSD: Tensor) -> tuple[Tensor, Tensor | None, MoERouting | None]:
        h = self.norm_attn(x_BSD)
        x_BSD = x_BSD + self.attn(h, h, h, need_weights=False)[0]
        h = self.norm_mlp(x_BSD)
        if not self.is_moe:
            return x_BSD + self.mlp(h), None, None
        out = self.mlp(h)  # (B, S, D): each image's patches are one sequence (Soft MoE's slots mix them)
        return x_BSD + out.y, out.aux_loss, out.routing


class ViT(nn.Module):
    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = config
        p = config.patch_size
        self.embed = nn.Linear(config.channels * p * p, config.d_model)
        self.position = nn.Parameter(torch.randn(config.num_patches, config.d_model) * 0.02)
        self.blocks = nn.ModuleList(_Block(config, layer) for layer in range(config.n_layer))
        self.norm = nn.LayerNorm(config.d_model)
        self.head = nn.Linear(config.d_model, config.num_classes)

    def patches(self, images: Tensor) -> Tensor:
        """(B, C, H, W) or (B, H, W) images → (B, S, C·p²) patches in raster order."""
        c = self.config
        if images.dim() == 3 and c.channels == 1:
            images = images.unsqueeze(1)
        expected = (c.channels, c.image_size, c.image_size)
        if images.dim() != 4 or tuple(images.shape[1:]) != expected:
            raise ValueError(f"images of shape {tuple(images.shape)}: expected (batch, {', '.join(map(str, expected))})"
                             + (" or (batch, H, W)" if c.channels == 1 else ""))
        return F.unfold(images, c.patch_size, stride=c.patch_size).transpose(1, 2)

    def forward(self, images: Tensor) -> ViTOutput:
        x_BSD = self.embed(self.patches(images)) + self.position
        aux_loss = x_BSD.new_zeros(())
        routings = []
        for block in self.blocks:
            x_BSD, block_aux, routing = block(x_BSD)
            if routing is not None:
                aux_loss = aux_loss + block_aux
                routings.append(routing)
        return ViTOutput(self.head(self.norm(x_BSD).mean(dim=1)), aux_loss, routings)

    @property
    def moe_layers(self) -> list[int]:
        return [i for i, block in enumerate(self.blocks) if block.is_moe]
