"""A decoder-only transformer language model whose FFN is dense or a moekit MoE.

Notable features:
- pre-norm blocks with RMSNorm, rotary position embeddings (no learned positions)
- causal self-attention through ``F.scaled_dot_product_attention``
- the FFN is a dense SwiGLU or a ``moekit.MoE``, in every layer or every n-th layer
- tied input and output embeddings
- the MoE layers' auxiliary losses come back summed in ``LMOutput.aux_loss``;
  the training loss is ``loss + aux_loss``
- a key/value cache (``KVCache``) and a padding mask for batched, left-padded
  prompts; ``generate`` prefills once, then runs one token per step (the same
  tokens as recomputing the window every step), sampling with temperature,
  top-k and top-p

Shapes: B batch, S sequence length, D model dim, H heads, V vocabulary,
T = B·S tokens as an MoE layer sees them.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from ..config import MoEConfig
from ..layer import MoE, MoERouting
from ..routing import ROUTERS, router_class
from .adapters import AdapterConfig, apply_adapter


def router_is_causal(name: str) -> bool:
    """Whether a router decides each token's experts from that token alone: a router that
    looks at later tokens would show the model the future in training and route
    differently at generation."""
    return router_class(name).causal


def causal_routers() -> list[str]:
    return sorted(name for name, cls in ROUTERS.items() if cls.causal)


@dataclass(kw_only=True)
class LMConfig:
    """The language model.

    Args:
        vocab_size: V.
        context_length: longest sequence the model reads (rotary tables are this long).
        n_layer: transformer blocks.
        n_head: attention heads; must divide d_model.
        d_model: D.
        d_ff: hidden width of the dense SwiGLU FFN (layers without an MoE).
        moe: the MoE layer's config, or None for a dense model. Its ``d_model``
            must equal ours; its ``d_ff`` is each expert's hidden width.
        moe_every: put the MoE in every n-th block (1: all blocks; 2: blocks 1, 3, …),
            dense FFNs elsewhere.
        router_init_std: standard deviation of the router weights at init. With the
            layer's own 0.02 the first logits are ~0.2, routing is near-uniform and
            near-random, and it takes thousands of steps to sharpen; 0.1 gives logits
            of order 1, so each token goes to experts of its own from the first step and
            experts specialise within a few hundred steps (measured in docs/lm.md).
        adapter: what fine-tuning added (``moekit.models.adapters.AdapterConfig``): LoRA
            on the experts, or mixtures of LoRA experts in place of the dense FFNs; the
            base weights are then frozen. None: a plain model.
    """

    vocab_size: int
    context_length: int = 128
    n_layer: int = 4
    n_head: int = 4
    d_model: int = 128
    d_ff: int = 512
    moe: MoEConfig | None = None
    moe_every: int = 1
    router_init_std: float = 0.1
    adapter: AdapterConfig | None = None

    def __post_init__(self) -> None:
        if isinstance(self.moe, dict):  # from config.json, nested or as older runs wrote it
            self.moe = MoEConfig.from_dict(self.moe)
        if isinstance(self.adapter, dict):
            self.adapter = AdapterConfig(**self.adapter)
        for name in ("vocab_size", "context_length", "n_layer", "n_head", "d_model", "d_ff", "moe_every"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} ({value!r}) must be a positive integer")
        if self.d_model % self.n_head:
            raise ValueError(f"n_head ({self.n_head}) must divide d_model ({self.d_model})")
        if not self.router_init_std >= 0:
            raise ValueError(f"router_init_std ({self.router_init_std}) must be >= 0")
        if (self.d_model // self.n_head) % 2:
            raise ValueError(f"head size d_model/n_head ({self.d_model // self.n_head}) must be even for rotary embeddings")
        if self.moe is not None:
            if self.moe.d_model != self.d_model:
                raise ValueError(f"moe.d_model ({self.moe.d_model}) must equal d_model ({self.d_model})")
            if not router_is_causal(self.moe.router):
                raise ValueError(
                    f"router {self.moe.router!r} is not causal: it routes a token using the other "
                    "tokens of the batch, which leaks the future into a language model; choose a "
                    f"causal router ({', '.join(causal_routers())})"
                )

    def is_moe_layer(self, layer: int) -> bool:
        return self.moe is not None and layer % self.moe_every == self.moe_every - 1

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)


def rotary_tables(context_length: int, head_dim: int, base: float = 10000.0) -> tuple[Tensor, Tensor]:
    """cos and sin of each position's rotation angles, (S, head_dim / 2) each."""
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(context_length, dtype=torch.float32), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate each (first half, second half) pair of x (B, H, S, hd) by its position's angle
    (cos, sin: (S, hd/2), or (B, 1, S, hd/2) when rows have positions of their own)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x1 * sin + x2 * cos), dim=-1).type_as(x)


class KVCache:
    """Each block's keys and values (B, H, S, hd) for the tokens seen so far, so that a
    decoding step attends to them instead of recomputing them."""

    def __init__(self, n_layer: int):
        self.keys: list[Tensor | None] = [None] * n_layer
        self.values: list[Tensor | None] = [None] * n_layer

    @property
    def length(self) -> int:
        return 0 if self.keys[0] is None else self.keys[0].shape[2]

    def extend(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Append this step's keys and values of block ``layer``; return all of them."""
        if self.keys[layer] is not None:
            k, v = torch.cat((self.keys[layer], k), dim=2), torch.cat((self.values[layer], v), dim=2)
        self.keys[layer], self.values[layer] = k, v
        return k, v


class Attend(NamedTuple):
    """How this call's tokens attend: rotary tables at their positions, the attention mask
    (bool (B, 1, S, past + S), None for plain causal or one new token), the cache, and which
    of the new tokens are real (None: all)."""

    cos: Tensor
    sin: Tensor
    mask: Tensor | None = None
    is_causal: bool = True
    cache: KVCache | None = None
    real_BS: Tensor | None = None


class CausalSelfAttention(nn.Module):
    def __init__(self, config: LMConfig):
        super().__init__()
        self.n_head = config.n_head
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model, bias=False)
        self.proj = nn.Linear(config.d_model, config.d_model, bias=False)

    def forward(self, x: Tensor, attend: Attend, layer: int = 0) -> Tensor:
        B, S, D = x.size()  # batch size, sequence length, model dim
        q, k, v = self.qkv(x).split(D, dim=2)
        q, k, v = (t.view(B, S, self.n_head, D // self.n_head).transpose(1, 2) for t in (q, k, v))
        q, k = apply_rotary(q, attend.cos, attend.sin), apply_rotary(k, attend.cos, attend.sin)
        if attend.cache is not None:
            k, v = attend.cache.extend(layer, k, v)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=attend.mask, is_causal=attend.is_causal)  # (B, H, S, hd)
        return self.proj(y.transpose(1, 2).contiguous().view(B, S, D))


class SwiGLU(nn.Module):
    """The dense FFN: the same computation as one moekit ``swiglu`` expert."""

    def __init__(self, d_model: int, d_ff: int):
        super().__init__()
        self.w_in = nn.Linear(d_model, 2 * d_ff, bias=False)
        self.w_out = nn.Linear(d_ff, d_model, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        gate, up = self.w_in(x).chunk(2, dim=-1)
        return self.w_out(F.silu(gate) * up)


class Block(nn.Module):
    def __init__(self, config: LMConfig, layer: int):
        super().__init__()
        self.norm_attn = RMSNorm(config.d_model)
        self.attn = CausalSelfAttention(config)
        self.norm_ffn = RMSNorm(config.d_model)
        self.is_moe = config.is_moe_layer(layer)
        if self.is_moe:
            self.ffn = MoE(config.moe, name=f"block {layer} MoE")
        else:
            self.ffn = SwiGLU(config.d_model, config.d_ff)

    def forward(self, x: Tensor, attend: Attend, idx: Tensor, layer: int = 0, aux_loss: bool = True
                ) -> tuple[Tensor, Tensor | None, MoERouting | None]:
        x = x + self.attn(self.norm_attn(x), attend, layer)
        h = self.norm_ffn(x)
        if not self.is_moe:
            return x + self.ffn(h), None, None
        extra = {"token_ids": idx} if self.ffn.router.needs_token_ids else {}
        out = self.ffn(h, mask=attend.real_BS, aux_loss=aux_loss, **extra)
        return x + out.y, out.aux_loss, out.routing


class LMOutput(NamedTuple):
    """logits (B, S, V); loss: mean cross-entropy (None without targets);
    aux_loss: the MoE layers' weighted auxiliary losses, summed (0 for a dense model; None
    from ``forward(..., aux_loss=False)``); routings: one ``MoERouting`` per MoE block, in order."""

    logits: Tensor
    loss: Tensor | None
    aux_loss: Tensor | None
    routings: list[MoERouting]


class LanguageModel(nn.Module):
    def __init__(self, config: LMConfig):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = nn.ModuleList(Block(config, layer) for layer in range(config.n_layer))
        self.norm_out = RMSNorm(config.d_model)
        self.head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        self.head.weight = self.embed.weight  # tied embeddings
        cos, sin = rotary_tables(config.context_length, config.d_model // config.n_head)
        self.register_buffer("rotary_cos", cos, persistent=False)
        self.register_buffer("rotary_sin", sin, persistent=False)
        self.apply(self._init_weights)
        # GPT-2: scale the projections that write into the residual stream by depth.
        # Experts start like the dense FFN so that the comparison is only about routing.
        for name, p in self.named_parameters():
            if name.endswith("router.weight"):
                nn.init.normal_(p, mean=0.0, std=config.router_init_std)
            elif name.endswith("experts.w_in"):
                nn.init.normal_(p, mean=0.0, std=0.02)
            elif name.endswith(("proj.weight", "ffn.w_out.weight", "experts.w_out")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))
        if config.adapter is not None:
            apply_adapter(self, config.adapter, config.router_init_std)
        # Recompute each block's activations in backward (memory for time); a runtime choice, not config.
        self.activation_checkpointing = False

    def _init_weights(self, module: nn.Module) -> None:
        if isinstance(module, nn.Linear | nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    @property
    def moe_layers(self) -> list[int]:
        return [i for i, block in enumerate(self.blocks) if block.is_moe]

    def num_parameters(self, active: bool = False) -> int:
        """All parameters, or those one token uses (K of E experts per MoE layer)."""
        total = sum(p.numel() for p in self.parameters())
        if active:
            for block in self.blocks:
                if block.is_moe:
                    moe = block.ffn.config
                    experts = block.ffn.experts
                    expert_params = sum(p.numel() for p in experts.parameters())
                    if getattr(experts, "shared_base", False):  # every token uses a mixture's shared base
                        expert_params -= sum(p.numel() for p in experts.base.parameters())
                    total -= expert_params * (moe.num_experts - moe.top_k) // moe.num_experts
        return total

    def forward(self, idx: Tensor, targets: Tensor | None = None, *, attention_mask: Tensor | None = None,
                cache: KVCache | None = None, aux_loss: bool = True) -> LMOutput:
        """idx (B, S) the new tokens; attention_mask: optional bool (B, past + S) marking real
        tokens of the whole sequence, padding on the left; cache: the keys and values of
        the ``past`` tokens before idx, extended in place; aux_loss False skips the MoE
        layers' auxiliary losses (``generate`` does: nothing in a decoding step reads them)."""
        B, S = idx.size()  # batch size, sequence length
        past = 0 if cache is None else cache.length
        if past + S > self.config.context_length:
            raise ValueError(f"sequence length ({past + S}) exceeds context_length ({self.config.context_length})")
        attend = self._attend(S, past, attention_mask, cache)
        x = self.embed(idx)  # (B, S, D)
        # Losses in float32 at least (float64 models keep float64, for exact tests).
        loss_dtype = torch.promote_types(x.dtype, torch.float32)
        total_aux = x.new_zeros((), dtype=loss_dtype) if aux_loss else None
        routings = []
        recompute = self.activation_checkpointing and torch.is_grad_enabled() and cache is None
        for layer, block in enumerate(self.blocks):
            if recompute:  # keep only each block's input; backward runs the block again
                x, block_aux, routing = checkpoint(block, x, attend, idx, layer, aux_loss, use_reentrant=False)
            else:
                x, block_aux, routing = block(x, attend, idx, layer, aux_loss)
            if routing is not None:
                if aux_loss:
                    total_aux = total_aux + block_aux
                routings.append(routing)
        logits = self.head(self.norm_out(x))  # (B, S, V)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.to(loss_dtype).view(-1, logits.size(-1)), targets.reshape(-1))
        return LMOutput(logits, loss, total_aux, routings)

    def _attend(self, S: int, past: int, attention_mask: Tensor | None, cache: KVCache | None) -> Attend:
        if attention_mask is None:
            cos, sin = self.rotary_cos[past:past + S], self.rotary_sin[past:past + S]
            # A prefill is plainly causal, and one new token attends to everything before it.
            if past == 0 or S == 1:
                return Attend(cos, sin, None, past == 0 and S > 1, cache)
            attend_SK = torch.ones(S, past + S, dtype=torch.bool, device=cos.device).tril(past)
            return Attend(cos, sin, attend_SK, False, cache)
        B = attention_mask.shape[0]
        if attention_mask.dtype != torch.bool or attention_mask.shape[1] != past + S:
            raise ValueError(f"attention_mask must be bool of shape ({B}, {past + S}) (cached + new tokens); "
                             f"got {attention_mask.dtype} {tuple(attention_mask.shape)}")
        # Each row's first real token is at position 0, whatever padding comes before it.
        positions_BK = (attention_mask.long().cumsum(1) - 1).clamp_min(0)
        positions_BS = positions_BK[:, past:]
        cos, sin = self.rotary_cos[positions_BS].unsqueeze(1), self.rotary_sin[positions_BS].unsqueeze(1)
        causal_SK = torch.ones(S, past + S, dtype=torch.bool, device=attention_mask.device).tril(past)
        # A query attends to real keys before it; padding queries attend to themselves, to stay finite.
        itself_SK = torch.eye(S, past + S, dtype=torch.bool, device=attention_mask.device).roll(past, dims=1)
        mask_BSK = (causal_SK & attention_mask[:, None, :]) | itself_SK
        real_BS = attention_mask[:, past:]
        # NOTE: .all() syncs with the device; it spares the MoE layers a mask when every new token is real.
        return Attend(cos, sin, mask_BSK.unsqueeze(1), False, cache, None if bool(real_BS.all()) else real_BS)

    @torch.no_grad()
    def generate(
        self,
        idx: Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        generator: torch.Generator | None = None,
        attention_mask: Tensor | None = None,
        use_cache: bool = True,
    ) -> Iterator[Tensor]:
        """Yield one sampled token (B, 1) at a time after the prompts idx (B, S).

        temperature 0 is greedy; top_k keeps the k likeliest tokens; top_p keeps the
        smallest set whose probability reaches p (nucleus sampling). Prompts of
        different lengths are padded on the left, ``attention_mask`` (B, S) marking
        their real tokens. With ``use_cache`` the prompts run once and each step
        only the new token; once the sequence outgrows ``context_length`` the
        window of its last tokens is run afresh, as without the cache.
        """
        if temperature < 0:
            raise ValueError(f"temperature ({temperature}) must be >= 0")
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p ({top_p}) must be in (0, 1]")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k ({top_k}) must be >= 1")
        mask = _left_padding_mask(attention_mask, idx)
        C = self.config.context_length
        cache = None
        for _ in range(max_new_tokens):
            if not use_cache or cache is None or cache.length >= C:
                # Run the window afresh: the prompt, each step without a cache, or a full cache.
                cache = KVCache(len(self.blocks)) if use_cache else None
                window_mask = None if mask is None else mask[:, -C:]
                logits = self(idx[:, -C:], attention_mask=window_mask, cache=cache, aux_loss=False).logits[:, -1, :]
            else:
                step_mask = None if mask is None else mask[:, -(cache.length + 1):]
                logits = self(idx[:, -1:], attention_mask=step_mask, cache=cache, aux_loss=False).logits[:, -1, :]
            logits = logits.float()  # (B, V)
            if temperature == 0:
                next_token = logits.argmax(dim=-1, keepdim=True)
            else:
                next_token = sample_next(logits / temperature, top_k, top_p, generator)
            idx = torch.cat((idx, next_token), dim=1)
            if mask is not None:
                mask = torch.cat((mask, torch.ones_like(next_token, dtype=torch.bool)), dim=1)
            yield next_token


def _left_padding_mask(attention_mask: Tensor | None, idx: Tensor) -> Tensor | None:
    """The prompts' mask of real tokens, checked; None when every token is real."""
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, Tensor) or attention_mask.shape != idx.shape:
        raise ValueError(f"attention_mask must have the prompts' shape {tuple(idx.shape)}; "
                         f"got {tuple(getattr(attention_mask, 'shape', ()))}")
    mask = attention_mask.to(device=idx.device, dtype=torch.bool)
    # NOTE: the checks sync with the device once per generate call.
    if not bool(mask[:, -1].all()):
        raise ValueError("attention_mask must pad prompts on the left: every row's last token must be real")
    if bool((mask[:, 1:] < mask[:, :-1]).any()):
        raise ValueError("attention_mask must pad prompts on the left: padding only before a row's first real token")
    return None if bool(mask.all()) else mask


def sample_next(logits_BV: Tensor, top_k: int | None, top_p: float | None, generator=None) -> Tensor:
    """Draw one token per row from softmax(logits) restricted by top-k and top-p."""
    if top_k is not None and top_k < logits_BV.size(-1):
        kth = logits_BV.topk(top_k, dim=-1).values[:, -1:]
        logits_BV = logits_BV.masked_fill(logits_BV < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = logits_BV.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens before it already reach top_p (the first always stays).
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
        drop = drop_sorted.scatter(1, order, drop_sorted)
        logits_BV = logits_BV.masked_fill(drop, float("-inf"))
    probs = logits_BV.softmax(dim=-1)
    return torch.multinomial(probs, num_samples=1, generator=generator)
