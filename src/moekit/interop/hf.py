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


def _weight_pairs(block: nn.Module, moe: MoE) -> list[tuple[_Plain | _GatedPair, Tensor]]:
    """(transformers slot, moekit tensor) for every weight the two hold in common."""
    if type(block).__name__ == "SwitchTransformersSparseMLP":
        pairs = [(_Plain(block.router.classifier.weight), moe.router.weight)]
        if block.router.classifier.bias is not None:
            pairs.append((_Plain(block.router.classifier.bias), moe.router.logit_bias))
        for e in range(moe.config.num_experts):
            expert = block.experts[f"expert_{e}"]
            pairs.append((_Plain(expert.wi.weight), moe.experts.w_in[e]))
            pairs.append((_Plain(expert.wo.weight), moe.experts.w_out[e]))
        return pairs
    pairs = [
        (_Plain(block.gate.weight), moe.router.weight),
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


class HFMoEBlock(nn.Module):
    """A moekit MoE standing in for a transformers MoE block inside a model.

    Returns what the block returned (the mixed hidden states), and keeps the
    last ``MoEOutput`` in ``last_output`` for routing statistics and the
    auxiliary loss. It behaves as the block did where transformers looks:

    - ``output_router_logits=True``: the router logits reach transformers' output
      capture through ``router_logits_recorder``, an instance of (a parameter-free
      subclass of) the block's own router class, so the model returns
      ``router_logits`` and its ``aux_loss`` as before conversion;
    - the model's ``attention_mask`` (passed to the layer by ``convert_model``'s
      hook) is moekit's padding mask: padding reaches no expert and no loss;
    - Mixtral's ``router_jitter_noise`` scales the hidden states in training, as
      transformers' block does (routing and experts see the same jittered input).
    """

    def __init__(self, moe: MoE, hf_config: Any, family: str, router_class: type | None = None,
                 jitter_noise: float = 0.0):
        super().__init__()
        self.moe = moe
        self.hf_config = hf_config
        self.family = family
        self.last_output = None
        self.jitter_noise = float(jitter_noise or 0.0)
        self.router_logits_recorder = _recorder_for(router_class) if router_class is not None else None
        self.padding_mask: Tensor | None = None  # set per forward by the model's pre-hook
        # state_dict() is the transformers block's, so save_pretrained writes a folder transformers
        # and load_pretrained read; loading takes either layout.
        self._register_state_dict_hook(_state_dict_in_hf_layout)
        self._register_load_state_dict_pre_hook(_load_either_layout, with_module=True)

    def forward(self, hidden_states: Tensor) -> Tensor:
        if self.training and self.jitter_noise > 0:
            hidden_states = hidden_states * torch.empty_like(hidden_states).uniform_(
                1.0 - self.jitter_noise, 1.0 + self.jitter_noise)
        out = self.moe(hidden_states, mask=self._mask_for(hidden_states))
        self.last_output = out
        if self.router_logits_recorder is not None and out.routing.decision.logits_TE is not None:
            self.router_logits_recorder(out.routing.decision.logits_TE.to(hidden_states.dtype))
        return out.y

    def _mask_for(self, hidden_states: Tensor) -> Tensor | None:
        mask = self.padding_mask
        if mask is None or hidden_states.dim() != 3 or mask.dim() != 2 or mask.shape[0] != hidden_states.shape[0]:
            return None
        mask = mask[:, -hidden_states.shape[1]:].to(device=hidden_states.device, dtype=torch.bool)
        if mask.shape[1] != hidden_states.shape[1] or bool(mask.all()):
            return None
        return mask


def _state_dict_in_hf_layout(module: HFMoEBlock, state_dict: dict, prefix: str, local_metadata) -> None:
    if not hasattr(module.moe.experts, "w_in"):
        return  # experts that transformers' block cannot hold (quantized, offloaded) keep moekit's layout
    moekit_keys = [k for k in state_dict if k.startswith(prefix + "moe.")]
    if not moekit_keys:
        return
    with torch.no_grad():
        block = to_hf_block(module.moe, module.hf_config, module.family)
    for key in moekit_keys:
        del state_dict[key]
    for key, value in block.state_dict().items():
        state_dict[prefix + key] = value


def _load_either_layout(module: HFMoEBlock, state_dict: dict, prefix: str, local_metadata, strict: bool,
                        missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
    own = [k for k in state_dict if k.startswith(prefix)]
    if not own or any(k.startswith(prefix + "moe.") for k in own) or not hasattr(module.moe.experts, "w_in"):
        return  # moekit's own layout: nothing to convert
    with torch.no_grad():
        block = to_hf_block(module.moe, module.hf_config, module.family)
        incoming = {k[len(prefix):]: state_dict.pop(k) for k in own}
        result = block.load_state_dict(incoming, strict=False)
        if result.missing_keys or result.unexpected_keys:
            error_msgs.append(f"{prefix or 'the block'}: transformers-layout tensors missing "
                              f"{result.missing_keys}, unexpected {result.unexpected_keys}")
            return
        converted = from_hf_block(block, module.hf_config)
    for key, value in converted.state_dict().items():
        state_dict[prefix + "moe." + key] = value


_RECORDERS: dict[type, type] = {}


def _recorder_for(router_class: type) -> nn.Module:
    """A parameter-free module that is an instance of ``router_class`` and returns the logits
    it is called with where transformers' output capture reads them."""
    recorder = _RECORDERS.get(router_class)
    if recorder is None:
        def __init__(self):
            nn.Module.__init__(self)

        def forward(self, logits_TE):
            return logits_TE, logits_TE, logits_TE  # the logits at every index a recorder may read

        recorder = type(router_class.__name__, (router_class,), {"__init__": __init__, "forward": forward,
                                                                 "__module__": __name__})
        _RECORDERS[router_class] = recorder
    return recorder()


def _router_class(block: nn.Module) -> type | None:
    for child in block.children():
        if type(child).__name__.lower().endswith(("router", "topkrouter", "top1router")):
            return type(child)
    return None


def _install_padding_mask_hook(model: nn.Module) -> None:
    """Hand the model's ``attention_mask`` (1 = real token) to its converted blocks each forward."""
    if getattr(model, "_moekit_padding_hook", None) is not None:
        return

    def hook(module, args, kwargs):
        mask = kwargs.get("attention_mask")
        mask = mask if isinstance(mask, Tensor) and mask.dim() == 2 else None
        for block in module.modules():
            if isinstance(block, HFMoEBlock):
                block.padding_mask = mask

    model._moekit_padding_hook = model.register_forward_pre_hook(hook, with_kwargs=True)


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
    model_config = getattr(model, "config", None)
    count = _replace_modules(
        model,
        lambda m: type(m).__name__ in FAMILIES,
        lambda block: HFMoEBlock(
            from_hf_block(block, model_config, **overrides), _block_config(block, model_config), type(block).__name__,
            router_class=_router_class(block), jitter_noise=getattr(block, "jitter_noise", 0.0),
        ),
    )
    if count == 0:
        raise ValueError(
            f"{type(model).__name__} holds no supported MoE block; supported: {', '.join(sorted(FAMILIES))}"
        )
    _hook_recorders_if_capture_is_installed(model)
    _install_padding_mask_hook(model)
    return model


def _hook_recorders_if_capture_is_installed(model: nn.Module) -> None:
    """transformers hooks its output capture once per model, at its first forward: a model that
    ran before conversion gets the router-logits hook on its new recorders here."""
    if not any(getattr(m, "_output_capturing_hooks_installed", False) for m in model.modules()):
        return  # the first forward installs them, recorders included
    try:
        from transformers.utils.output_capturing import install_output_capuring_hook
    except ImportError:
        return
    for module in model.modules():
        recorder = getattr(module, "router_logits_recorder", None) if isinstance(module, HFMoEBlock) else None
        if recorder is not None and not getattr(recorder, "_moekit_hooked", False):
            install_output_capuring_hook(recorder, "router_logits", 0)
            recorder._moekit_hooked = True


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
    """Load a local ``save_pretrained`` folder (safetensors) offline and convert it.

    Raises ``ValueError`` for a path that is not a local folder, weights that cannot be
    read, and any tensor the model expects that the folder lacks (or MoE tensors it holds
    that the model does not expect): nothing is left at its random initial value."""
    from pathlib import Path

    from safetensors import SafetensorError
    from transformers import AutoModelForCausalLM

    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"{str(path)!r} is not a local folder; load_pretrained reads a folder written by "
                         "save_pretrained (it downloads nothing)")
    cls = model_class or AutoModelForCausalLM
    try:
        model, info = cls.from_pretrained(folder, local_files_only=True, output_loading_info=True)
    except (OSError, RuntimeError, ValueError, SafetensorError) as error:
        files = ", ".join(sorted(p.name for p in folder.glob("*.safetensors"))) or "no .safetensors file"
        raise ValueError(f"could not load the weights in {str(folder)!r} ({files}): "
                         f"{str(error).strip().splitlines()[0]}") from None
    missing = sorted(info.get("missing_keys", []))
    unexpected = sorted(k for k in info.get("unexpected_keys", []) if _is_moe_tensor(k))
    mismatched = sorted(str(k[0]) if isinstance(k, tuple) else str(k) for k in info.get("mismatched_keys", []))
    problems = [f"{label}: {', '.join(keys[:6])}{' …' if len(keys) > 6 else ''}" for label, keys in
                (("missing", missing), ("unexpected", unexpected), ("of another shape", mismatched)) if keys]
    if problems:
        raise ValueError(f"the weights in {str(folder)!r} do not match its config.json; tensors " + "; ".join(problems))
    return convert_model(model, **overrides)


def _is_moe_tensor(key: str) -> bool:
    return any(part in key for part in ("experts", ".gate.", "router", "shared_expert", "e_score_correction"))
