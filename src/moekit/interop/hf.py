"""Hugging Face transformers MoE blocks in and out of moekit, with exact numerics.

``from_hf_block(block)`` builds a ``moekit.MoE`` holding the block's weights;
``to_hf_block(moe, like=block)`` builds the transformers block back.
``convert_model(model)`` swaps every MoE block of a transformers model for a
``HFMoEBlock`` (a moekit layer that returns what the block returned), and
``export_model(model)`` restores the transformers blocks. Nothing is
downloaded: models come from a local config or a local ``save_pretrained``
folder.

Supported families (transformers v5 block classes), all with SwiGLU experts
stacked as ``gate_up_proj`` (E, 2F, D) and ``down_proj`` (E, D, F), the layout
moekit uses, so weights copy without reshaping:

- Mixtral (``MixtralSparseMoeBlock``), Qwen3-MoE (``Qwen3MoeSparseMoeBlock``),
  OLMoE (``OlmoeSparseMoeBlock``): top-k softmax routing;
- Qwen2-MoE (``Qwen2MoeSparseMoeBlock``): the same, plus a shared expert scaled
  by sigmoid(x·w_shared_gate);
- DeepSeek-V3 (``DeepseekV3MoE``): sigmoid router whose correction bias enters
  only the choice of experts, group-limited routing, routed scaling factor,
  shared experts;
- Switch Transformers (``SwitchTransformersSparseMLP``): top-1 router with
  input jitter (and, with ``router_bias``, a logit bias), ReLU FFN experts (one
  module each, stacked here), an absolute expert capacity applied per sequence
  with position priority.

Shapes: D model dim, F expert hidden dim, E experts.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..config import MoEConfig
from ..layer import MoE

_HF_ACTIVATION_TO_EXPERT = {"silu": "swiglu", "swish": "swiglu", "gelu": "geglu"}


def _topk_fields(config: Any) -> dict:
    return {"load_balance_coef": float(getattr(config, "router_aux_loss_coef", 0.0) or 0.0)}


def _sigmoid_fields(config: Any) -> dict:
    # transformers scores experts outside the kept groups 0 (not −inf): the same choice, and
    # configs with top_k above the kept groups' experts convert.
    return dict(num_expert_groups=config.n_group, topk_groups=config.topk_group,
                routed_scaling_factor=float(config.routed_scaling_factor), load_balance_coef=0.0,
                outside_group_score=0.0)


@dataclass(frozen=True)
class Family:
    """How one transformers MoE block maps onto a moekit layer: the router, and the
    MoEConfig fields (router options and loss weights) its config gives."""

    name: str
    block_class: str
    module_path: str
    num_experts_attr: str
    expert_size_attr: str
    always_normalize: bool = False
    router: str = "topk"
    router_fields: Callable[[Any], dict] = field(default=_topk_fields)
    shared: str | None = None  # None, "qwen2" (one gated shared expert) or "deepseek"

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
        Family("qwen2_moe", "Qwen2MoeSparseMoeBlock", "transformers.models.qwen2_moe.modeling_qwen2_moe",
               "num_experts", "moe_intermediate_size", shared="qwen2"),
        Family("deepseek_v3", "DeepseekV3MoE", "transformers.models.deepseek_v3.modeling_deepseek_v3",
               "num_local_experts", "moe_intermediate_size", router="sigmoid", router_fields=_sigmoid_fields,
               shared="deepseek"),
        Family("switch_transformers", "SwitchTransformersSparseMLP",
               "transformers.models.switch_transformers.modeling_switch_transformers",
               "num_experts", "d_ff", router="switch"),
    )
}


def _family_of(block: nn.Module) -> Family:
    name = type(block).__name__
    if name not in FAMILIES:
        raise TypeError(
            f"{name} is not a supported transformers MoE block; supported: {', '.join(sorted(FAMILIES))}"
        )
    return FAMILIES[name]


def _block_config(block: nn.Module, model_config: Any = None) -> Any:
    config = getattr(block.experts, "config", None) or model_config
    if config is None:
        raise TypeError(
            f"{type(block).__name__} carries no config: pass the model's config (hf_config=model.config)"
        )
    return config


def _switch_config(config: Any, overrides: dict) -> MoEConfig:
    fields = dict(
        d_model=config.d_model, d_ff=config.d_ff, num_experts=config.num_experts, router="switch",
        expert="ffn", activation=_hf_activation(config.dense_act_fn), expert_capacity=config.expert_capacity,
        capacity_per_sequence=True, drop_priority="position", router_jitter=float(config.router_jitter_noise),
        router_logit_bias=bool(config.router_bias), load_balance_coef=float(config.router_aux_loss_coef),
        z_loss_coef=float(config.router_z_loss_coef),
    )
    fields.update(overrides)
    return MoEConfig(**fields)


def _hf_activation(name: str) -> str:
    from .surgery import _hf_activation as activation

    return activation(name)


def config_from_hf(block: nn.Module, hf_config: Any = None, **overrides) -> MoEConfig:
    """The MoEConfig that reproduces a transformers MoE block."""
    family = _family_of(block)
    config = _block_config(block, hf_config)
    if family.name == "switch_transformers":
        return _switch_config(config, overrides)
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
        router=family.router,
        expert=_HF_ACTIVATION_TO_EXPERT[activation],
        normalize_weights=normalize,
        **family.router_fields(config),
    )
    if family.shared == "qwen2":
        fields.update(num_shared_experts=1, shared_d_ff=config.shared_expert_intermediate_size,
                      shared_expert_gate=True)
    elif family.shared == "deepseek":
        fields.update(num_shared_experts=config.n_shared_experts, shared_d_ff=config.moe_intermediate_size)
    fields.update(overrides)
    return MoEConfig(**fields)


def _shared_mlp(block: nn.Module) -> nn.Module | None:
    for name in ("shared_expert", "shared_experts"):
        if getattr(block, name, None) is not None:
            return getattr(block, name)
    return None


class _GatedPair:
    """A GLU input weight that transformers splits into gate_proj and up_proj (gate rows first)."""

    def __init__(self, mlp: nn.Module):
        self.mlp = mlp

    def read(self) -> Tensor:
        return torch.cat([self.mlp.gate_proj.weight, self.mlp.up_proj.weight])

    def write(self, w_in_HD: Tensor) -> None:
        F = self.mlp.gate_proj.weight.shape[0]
        self.mlp.gate_proj.weight.copy_(w_in_HD[:F])
        self.mlp.up_proj.weight.copy_(w_in_HD[F:])


class _Plain:
    def __init__(self, tensor: Tensor):
        self.tensor = tensor

    def read(self) -> Tensor:
        return self.tensor

    def write(self, value: Tensor) -> None:
        self.tensor.copy_(value)


def _router_weight(moe: MoE) -> Tensor:
    """The router's own weight: under a LoRA parametrization, the frozen original (the
    adapter is saved apart, as the experts' are)."""
    if parametrize.is_parametrized(moe.router, "weight"):
        return moe.router.parametrizations.weight.original
    return moe.router.weight


def _weight_pairs(block: nn.Module, moe: MoE) -> list[tuple[_Plain | _GatedPair, Tensor]]:
    """(transformers slot, moekit tensor) for every weight the two hold in common."""
    if type(block).__name__ == "SwitchTransformersSparseMLP":
        pairs = [(_Plain(block.router.classifier.weight), _router_weight(moe))]
        if block.router.classifier.bias is not None:
            pairs.append((_Plain(block.router.classifier.bias), moe.router.logit_bias))
        for e in range(moe.config.num_experts):
            expert = block.experts[f"expert_{e}"]
            pairs.append((_Plain(expert.wi.weight), moe.experts.w_in[e]))
            pairs.append((_Plain(expert.wo.weight), moe.experts.w_out[e]))
        return pairs
    pairs = [
        (_Plain(block.gate.weight), _router_weight(moe)),
        (_Plain(block.experts.gate_up_proj), moe.experts.w_in),
        (_Plain(block.experts.down_proj), moe.experts.w_out),
    ]
    if hasattr(block.gate, "e_score_correction_bias"):
        pairs.append((_Plain(block.gate.e_score_correction_bias), moe.router.expert_bias_E))
    mlp = _shared_mlp(block)
    if mlp is not None:
        shared = moe.shared_experts
        pairs.append((_GatedPair(mlp), shared.ffn.w_in[0]))
        pairs.append((_Plain(mlp.down_proj.weight), shared.ffn.w_out[0]))
        if getattr(block, "shared_expert_gate", None) is not None:
            pairs.append((_Plain(block.shared_expert_gate.weight), shared.gate.weight))
    return pairs


@torch.no_grad()
def from_hf_block(block: nn.Module, hf_config: Any = None, **overrides) -> MoE:
    """A moekit MoE with the block's weights, dtype and device; same outputs.

    ``hf_config`` is the model's config, needed for blocks that keep none
    (Switch Transformers); ``overrides`` change config fields (e.g.
    ``compute="segment"``).
    """
    moe = MoE(config_from_hf(block, hf_config, **overrides))
    weight = next(block.parameters())
    moe.to(device=weight.device, dtype=weight.dtype)
    moe.train(block.training)
    for hf_slot, moekit_tensor in _weight_pairs(block, moe):
        moekit_tensor.copy_(hf_slot.read())
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
    for hf_slot, moekit_tensor in _weight_pairs(block, moe):
        if tuple(hf_slot.read().shape) != tuple(moekit_tensor.shape):
            raise ValueError(
                f"moekit weight {tuple(moekit_tensor.shape)} does not fit {family}'s {tuple(hf_slot.read().shape)}"
            )
    for hf_slot, moekit_tensor in _weight_pairs(block, moe):
        hf_slot.write(moekit_tensor)
    return block.train(moe.training)


_MODEL_LEVEL = ("HFMoEBlock", "convert_model", "export_model", "load_pretrained")


def __getattr__(name: str):
    # The model-level API lives in hf_models, which imports this module: loaded on first use.
    if name in _MODEL_LEVEL:
        from . import hf_models

        return getattr(hf_models, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
