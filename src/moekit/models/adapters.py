"""Adapters on a model: LoRA on its experts, or its dense FFNs turned into mixtures of LoRA experts.

- ``add_lora(model, rank, alpha)`` wraps the routed experts (and, with
  ``targets=("experts", "shared")``, the shared experts) of every MoE layer in
  ``LoRAExperts`` and freezes every other parameter. It works on any model whose
  MoE layers are moekit layers: moekit's language model and converted Hugging Face
  models alike.
- ``mixture_of_lora_experts(w_in, w_out, …)`` builds a MixLoRA layer (Li et al. 2024)
  from a frozen dense FFN: a router over E experts that all share the FFN's weights
  (``SharedBaseExperts``), each with adapters of its own. Adapters start at zero,
  so with combine weights that sum to one (``topk``, ``softmax``, ``noisy_topk``) the
  layer computes exactly what the FFN did, whatever the router's fresh weights.
- ``AdapterConfig`` names either in a language model's config (``LMConfig.adapter``),
  so a fine-tuned run's folder describes its own structure and every command that
  loads it (resume, eval, generate, report) rebuilds it.

``moekit.finetune`` is the user-facing API (``add_lora``, ``mixlora``, peft files);
this module is what ``LanguageModel`` itself needs to rebuild an adapted model.

Shapes: D model dim, F hidden dim, H first projection width, E experts, K top-k.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..config import MoEConfig
from ..experts.lora import PROJECTIONS, LoRAExperts, check_rank
from ..experts.shared_base import SharedBaseExperts
from ..layer import MoE, moe_layers
from ..routing import router_class

TARGETS = ("experts", "shared", "router")
METHODS = ("lora", "mixlora")


def _check_targets(targets: tuple[str, ...]) -> None:
    unknown = [t for t in targets if t not in TARGETS]
    if not targets or unknown:
        raise ValueError(f"LoRA targets {tuple(targets)!r}: choose from {TARGETS}")


def lora_sites(model: nn.Module, targets: tuple[str, ...] = ("experts",)) -> Iterator[tuple[str, nn.Module, str]]:
    """(qualified name, parent module, attribute) of every experts module LoRA adapts, and of
    every router whose ``weight`` it adapts (attribute ``weight``)."""
    for name, moe in moe_layers(model):
        prefix = f"{name}." if name else ""
        if "experts" in targets:
            yield f"{prefix}experts", moe, "experts"
        if "shared" in targets and moe.shared_experts is not None:
            yield f"{prefix}shared_experts.ffn", moe.shared_experts, "ffn"
        if "router" in targets:
            yield f"{prefix}router", moe.router, "weight"


class LowRankUpdate(nn.Module):
    """A parametrization ``weight ↦ weight + s·B·A`` of a 2-D weight (out, in): LoRA on a router.

    A (r, in) starts like ``nn.Linear``'s weight and B (out, r) at zero, so the router
    starts as it was; ``torch.nn.utils.parametrize`` keeps the weight frozen under
    ``parametrizations.weight.original`` and every read of ``router.weight`` adds the update.
    """

    def __init__(self, weight: Tensor, rank: int, alpha: float, rslora: bool = False):
        super().__init__()
        out_features, in_features = weight.shape
        self.rank, self.alpha, self.rslora = rank, float(alpha), bool(rslora)
        self.scale = alpha / math.sqrt(rank) if rslora else alpha / rank
        factory = {"device": weight.device, "dtype": weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, **factory))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, **factory))
        bound = 1.0 / math.sqrt(in_features)
        with torch.no_grad():
            self.lora_A.uniform_(-bound, bound)

    def forward(self, weight: Tensor) -> Tensor:
        return weight + self.scale * (self.lora_B @ self.lora_A)


def router_update(router: nn.Module) -> LowRankUpdate | None:
    """The router's LoRA parametrization, if it has one."""
    if not parametrize.is_parametrized(router, "weight"):
        return None
    return next((m for m in router.parametrizations.weight if isinstance(m, LowRankUpdate)), None)


def _add_router_lora(name: str, router: nn.Module, rank: int, alpha: float, rslora: bool) -> None:
    if router_update(router) is not None:
        raise ValueError(f"add_lora: {name} already has LoRA adapters")
    weight = getattr(router, "weight", None)
    if not isinstance(weight, nn.Parameter) or weight.dim() != 2:
        raise TypeError(f"add_lora: {name} ({type(router).__name__}) has no (experts, d_model) weight to adapt")
    check_rank(rank, widths=tuple(weight.shape), where=f"LoRA on {name}")
    parametrize.register_parametrization(router, "weight", LowRankUpdate(weight, rank, alpha, rslora))


def add_lora(model: nn.Module, rank: int = 8, alpha: float = 16.0, *, targets: tuple[str, ...] = ("experts",),
             projections: tuple[str, ...] = PROJECTIONS, rslora: bool = False,
             freeze_rest: bool = True) -> nn.Module:
    """Wrap the experts of every MoE layer of ``model`` in ``LoRAExperts``, in place.

    Args:
        rank, alpha, projections, rslora: as ``LoRAExperts``.
        targets: ``"experts"`` (the routed experts), ``"shared"`` (shared experts) and/or
            ``"router"`` (each router's weight, as a parametrization: ``LowRankUpdate``).
        freeze_rest: set requires_grad False on every parameter but the adapters.

    Returns the model. Raises ``ValueError`` when the model has no MoE layer, and
    names the layer whose experts cannot take adapters.
    """
    _check_targets(tuple(targets))
    sites = list(lora_sites(model, tuple(targets)))
    if not moe_layers(model):
        raise ValueError(f"add_lora: {type(model).__name__} has no MoE layer (moekit.MoE); for a Hugging Face "
                         "model, convert it first with moekit.interop.hf.convert_model")
    if freeze_rest:
        model.requires_grad_(False)
    for name, parent, attribute in sites:
        if attribute == "weight":
            _add_router_lora(name, parent, rank, alpha, rslora)
            continue
        experts = getattr(parent, attribute)
        if isinstance(experts, LoRAExperts):
            raise ValueError(f"add_lora: {name} already has LoRA adapters")
        if not getattr(experts, "stacked_mlp", False):
            raise TypeError(f"add_lora: {name} holds {type(experts).__name__}; LoRA adapts stacked MLP experts")
        setattr(parent, attribute, LoRAExperts(experts, rank, alpha, projections=projections, rslora=rslora))
    return model


def mixture_of_lora_experts(w_in: Tensor, w_out: Tensor, b_in: Tensor | None = None, b_out: Tensor | None = None,
                            *, kind: str = "swiglu", activation: str = "gelu", num_experts: int = 4,
                            top_k: int | None = 2, rank: int = 8, alpha: float = 16.0, rslora: bool = False,
                            projections: tuple[str, ...] = PROJECTIONS, router_init_std: float = 0.02,
                            seed: int | None = None, **moe_fields) -> MoE:
    """A MixLoRA layer over the dense FFN ``w_out · act(w_in · x + b_in) + b_out`` (weights not copied).

    Args:
        w_in, w_out, b_in, b_out, kind, activation: the frozen FFN, as ``SharedBaseExperts``.
        num_experts, top_k: E and K of the new router.
        rank, alpha, rslora, projections: each expert's adapters, as ``LoRAExperts``.
        router_init_std: std of the router's normal init.
        seed: seeds the router and adapter init (None: torch's global generator).
        moe_fields: further ``MoEConfig`` fields (router, load_balance_coef, …).
    """
    D, F = w_out.shape
    check_rank(rank, widths=(D, F), where="MixLoRA")
    config = MoEConfig(d_model=D, d_ff=F, num_experts=num_experts, top_k=top_k, expert=kind, activation=activation,
                       expert_bias=b_in is not None, **moe_fields)
    with torch.random.fork_rng(devices=[]) if seed is not None else contextlib.nullcontext():
        if seed is not None:
            torch.manual_seed(seed)
        # On the meta device: the layer's own stacked experts (E copies of the FFN) are never allocated.
        with torch.device("meta"):
            moe = MoE(config, name="MixLoRA")
        moe.router = router_class(config.router).from_config(config).to(device=w_in.device, dtype=w_in.dtype)
        if isinstance(getattr(moe.router, "weight", None), nn.Parameter):
            with torch.no_grad():
                nn.init.normal_(moe.router.weight, mean=0.0, std=router_init_std)
        base = SharedBaseExperts(num_experts, w_in, w_out, b_in, b_out, kind=kind, activation=activation)
        moe.experts = LoRAExperts(base, rank, alpha, projections=projections, rslora=rslora)
    return moe


@dataclass(kw_only=True)
class AdapterConfig:
    """What a fine-tuned language model adds to its base (``LMConfig.adapter``).

    Args:
        method: ``lora`` (adapters on the MoE layers' experts) or ``mixlora`` (each
            dense FFN becomes a router over ``num_experts`` LoRA experts sharing it).
        rank, alpha, rslora: the adapters' rank and scale (alpha / rank, or alpha / √rank).
        targets: ``lora``: ``experts``, ``shared`` and/or ``router``.
        num_experts, top_k, router, load_balance_coef, z_loss_coef: ``mixlora``'s layers.
    """

    method: str
    rank: int = 8
    alpha: float = 16.0
    rslora: bool = False
    targets: tuple[str, ...] = ("experts",)
    num_experts: int = 4
    top_k: int = 2
    router: str = "topk"
    load_balance_coef: float = 0.01
    z_loss_coef: float = 0.0

    def __post_init__(self) -> None:
        self.targets = tuple(self.targets)
        if self.method not in METHODS:
            raise ValueError(f"adapter method ({self.method!r}) must be one of {', '.join(METHODS)}")
        _check_targets(self.targets)
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"adapter rank ({self.rank!r}) must be a positive integer")
        if not self.alpha > 0:
            raise ValueError(f"adapter alpha ({self.alpha!r}) must be > 0")
        if self.method == "mixlora" and not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"mixlora: need 1 <= top_k ({self.top_k}) <= num_experts ({self.num_experts})")


def apply_adapter(model: nn.Module, adapter: AdapterConfig, router_init_std: float = 0.02) -> None:
    """Add ``adapter`` to a ``LanguageModel`` in place, freezing its base weights."""
    blocks = model.blocks
    if adapter.method == "lora":
        if not any(block.is_moe for block in blocks):
            raise ValueError("adapter 'lora' adapts the experts of MoE layers; this model is dense: "
                             "use 'mixlora' to give its FFNs LoRA experts")
        add_lora(model, adapter.rank, adapter.alpha, targets=adapter.targets, rslora=adapter.rslora)
        return
    dense = [i for i, block in enumerate(blocks) if not block.is_moe]
    if not dense:
        raise ValueError("adapter 'mixlora' turns dense FFNs into mixtures of LoRA experts; every block of "
                         "this model is an MoE: use 'lora' to adapt its experts")
    model.requires_grad_(False)
    for i in dense:
        ffn = blocks[i].ffn
        blocks[i].ffn = mixture_of_lora_experts(
            ffn.w_in.weight, ffn.w_out.weight, kind="swiglu", num_experts=adapter.num_experts, top_k=adapter.top_k,
            rank=adapter.rank, alpha=adapter.alpha, rslora=adapter.rslora, router_init_std=router_init_std,
            router=adapter.router, load_balance_coef=adapter.load_balance_coef, z_loss_coef=adapter.z_loss_coef)
        blocks[i].ffn.name = f"block {i} MixLoRA"
        blocks[i].is_moe = True
