"""Hugging Face transformers MoE blocks in and out of moekit, with exact numerics.

``from_hf_block(block)`` builds a ``moekit.MoE`` holding the block's weights;
``to_hf_block(moe, like=block)`` builds the transformers block back.
``convert_model(model)`` swaps every MoE block of a transformers model for a
``HFMoEBlock`` (a moekit layer that returns what the block returned), and
``export_model(model)`` restores the transformers blocks. Nothing is
downloaded: models come from a local config or a local ``save_pretrained``
folder.

Supported families (transformers v5 block classes): Mixtral
(``MixtralSparseMoeBlock``), Qwen3-MoE (``Qwen3MoeSparseMoeBlock``) and OLMoE
(``OlmoeSparseMoeBlock``): top-k softmax routing, SwiGLU experts stacked as
``gate_up_proj`` (E, 2F, D) and ``down_proj`` (E, D, F), the same layout moekit
uses, so weights copy without reshaping.

Shapes: D model dim, F expert hidden dim, E experts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ..config import MoEConfig
from ..layer import MoE

_HF_ACTIVATION_TO_EXPERT = {"silu": "swiglu", "swish": "swiglu", "gelu": "geglu"}


@dataclass(frozen=True)
class Family:
    """How one transformers MoE block maps onto a moekit layer."""

    name: str
    block_class: str
    module_path: str
    num_experts_attr: str
    expert_size_attr: str
    always_normalize: bool = False

    def block_type(self) -> type[nn.Module]:
        import importlib

        return getattr(importlib.import_module(self.module_path), self.block_class)


FAMILIES: dict[str, Family] = {
    f.block_class: f
    for f in (
        Family("mixtral", "MixtralSparseMoeBlock", "transformers.models.mixtral.modeling_mixtral",
               "num_local_experts", "intermediate_size", always_normalize=True),
        Family("qwen3_moe", "Qwen3MoeSparseMoeBlock", "transformers.models.qwen3_moe.modeling_qwen3_moe",
               "num_experts", "moe_intermediate_size"),
        Family("olmoe", "OlmoeSparseMoeBlock", "transformers.models.olmoe.modeling_olmoe",
               "num_experts", "intermediate_size"),
    )
}


def _family_of(block: nn.Module) -> Family:
    name = type(block).__name__
    if name not in FAMILIES:
        raise TypeError(
            f"{name} is not a supported transformers MoE block; supported: {', '.join(sorted(FAMILIES))}"
        )
    return FAMILIES[name]


def _block_config(block: nn.Module) -> Any:
    config = getattr(block.experts, "config", None)
    if config is None:
        raise TypeError(f"{type(block).__name__}.experts carries no config; expected a transformers v5 block")
    return config


def config_from_hf(block: nn.Module, **overrides) -> MoEConfig:
    """The MoEConfig that reproduces a transformers MoE block."""
    family = _family_of(block)
    config = _block_config(block)
    activation = config.hidden_act
    if activation not in _HF_ACTIVATION_TO_EXPERT:
        raise ValueError(
            f"hidden_act {activation!r} has no moekit expert; supported: {', '.join(_HF_ACTIVATION_TO_EXPERT)}"
        )
    normalize = True if family.always_normalize else bool(config.norm_topk_prob)
    fields = dict(
        d_model=config.hidden_size,
        d_ff=getattr(config, family.expert_size_attr),
        num_experts=getattr(config, family.num_experts_attr),
        top_k=config.num_experts_per_tok,
        router="topk",
        expert=_HF_ACTIVATION_TO_EXPERT[activation],
        normalize_weights=normalize,
        load_balance_coef=float(getattr(config, "router_aux_loss_coef", 0.0) or 0.0),
    )
    fields.update(overrides)
    return MoEConfig(**fields)


@torch.no_grad()
def from_hf_block(block: nn.Module, **overrides) -> MoE:
    """A moekit MoE with the block's weights, dtype and device; same outputs.

    ``overrides`` change config fields (e.g. ``compute="segment"``).
    """
    moe = MoE(config_from_hf(block, **overrides))
    weight = block.experts.gate_up_proj
    moe.to(device=weight.device, dtype=weight.dtype)
    moe.router.weight.copy_(block.gate.weight)
    moe.experts.w_in.copy_(block.experts.gate_up_proj)
    moe.experts.w_out.copy_(block.experts.down_proj)
    moe.hf_family = _family_of(block).block_class
    return moe


@torch.no_grad()
def to_hf_block(moe: MoE, config: Any, family: str) -> nn.Module:
    """Build the transformers block ``family`` (a block class name) from a moekit MoE."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; supported: {', '.join(sorted(FAMILIES))}")
    if not hasattr(moe.experts, "w_in"):
        raise TypeError("only stacked experts can be exported to a transformers block")
    block = FAMILIES[family].block_type()(config)
    block.to(device=moe.experts.w_in.device, dtype=moe.experts.w_in.dtype)
    expected = tuple(block.experts.gate_up_proj.shape)
    if tuple(moe.experts.w_in.shape) != expected:
        raise ValueError(
            f"moekit experts w_in {tuple(moe.experts.w_in.shape)} do not fit {family}'s gate_up_proj {expected}"
        )
    block.gate.weight.copy_(moe.router.weight)
    block.experts.gate_up_proj.copy_(moe.experts.w_in)
    block.experts.down_proj.copy_(moe.experts.w_out)
    return block


class HFMoEBlock(nn.Module):
    """A moekit MoE standing in for a transformers MoE block inside a model.

    Returns what the block returned (the mixed hidden states), and keeps the
    last ``MoEOutput`` in ``last_output`` for routing statistics and the
    auxiliary loss.
    """

    def __init__(self, moe: MoE, hf_config: Any, family: str):
        super().__init__()
        self.moe = moe
        self.hf_config = hf_config
        self.family = family
        self.last_output = None

    def forward(self, hidden_states: Tensor) -> Tensor:
        out = self.moe(hidden_states)
        self.last_output = out
        return out.y


def _replace_modules(model: nn.Module, match, build) -> int:
    replaced = 0
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if match(child):
                setattr(parent, child_name, build(child))
                replaced += 1
    return replaced


def convert_model(model: nn.Module, **overrides) -> nn.Module:
    """Replace every supported MoE block of a transformers model in place; returns the model."""
    count = _replace_modules(
        model,
        lambda m: type(m).__name__ in FAMILIES,
        lambda block: HFMoEBlock(from_hf_block(block, **overrides), _block_config(block), type(block).__name__),
    )
    if count == 0:
        raise ValueError(
            f"{type(model).__name__} holds no supported MoE block; supported: {', '.join(sorted(FAMILIES))}"
        )
    return model


def export_model(model: nn.Module) -> nn.Module:
    """Restore the transformers blocks that ``convert_model`` replaced; returns the model."""
    count = _replace_modules(
        model,
        lambda m: isinstance(m, HFMoEBlock),
        lambda wrapper: to_hf_block(wrapper.moe, wrapper.hf_config, wrapper.family),
    )
    if count == 0:
        raise ValueError(f"{type(model).__name__} holds no moekit HFMoEBlock to export")
    return model


def load_pretrained(path, model_class=None, **overrides) -> nn.Module:
    """Load a local ``save_pretrained`` folder (safetensors) offline and convert it."""
    from transformers import AutoModelForCausalLM

    cls = model_class or AutoModelForCausalLM
    model = cls.from_pretrained(path, local_files_only=True)
    return convert_model(model, **overrides)
