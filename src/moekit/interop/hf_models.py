"""Whole transformers models with moekit layers: ``convert_model`` swaps every MoE block
for an ``HFMoEBlock`` that behaves as the block did where transformers looks (router
logits, padding, jitter, saving in transformers' layout); ``export_model`` restores the
blocks; ``load_pretrained`` reads a local ``save_pretrained`` folder, refusing one whose
weights do not match its config. Block-level conversion is ``moekit.interop.hf``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..experts.lora import LoRAExperts
from ..layer import MoE
from .hf import FAMILIES, _block_config, from_hf_block, to_hf_block


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

    @torch.no_grad()
    def initialize_with(self, init_weights) -> None:
        """Initialise the layer as ``init_weights`` (a transformers model's ``_init_weights``)
        initialises the original block."""
        if not hasattr(self.moe.experts, "w_in"):
            return
        block = to_hf_block(self.moe, self.hf_config, self.family)
        for module in block.modules():
            init_weights(module)
        self.moe.load_state_dict(from_hf_block(block, self.hf_config).state_dict())

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
        mask = self.padding_mask  # None when the model's mask has no padding (checked once per forward)
        if mask is None or hidden_states.dim() != 3 or mask.shape[0] != hidden_states.shape[0]:
            return None
        mask = mask[:, -hidden_states.shape[1]:].to(device=hidden_states.device, dtype=torch.bool)
        return mask if mask.shape[1] == hidden_states.shape[1] else None


def _state_dict_in_hf_layout(module: HFMoEBlock, state_dict: dict, prefix: str, local_metadata) -> None:
    if not hasattr(module.moe.experts, "w_in"):
        return  # experts that transformers' block cannot hold (quantized, offloaded) keep moekit's layout
    # LoRA adapters have no place in transformers' block: they keep moekit's names.
    moekit_keys = [k for k in state_dict if k.startswith(prefix + "moe.") and not _is_adapter(k)]
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
    own = [k for k in state_dict if k.startswith(prefix) and not _is_adapter(k)]
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
    wrapped = isinstance(module.moe.experts, LoRAExperts)
    router_adapted = parametrize.is_parametrized(module.moe.router, "weight")
    for key, value in converted.state_dict().items():
        if wrapped and key.startswith("experts."):
            key = "experts.base." + key[len("experts."):]
        if router_adapted and key == "router.weight":
            key = "router.parametrizations.weight.original"
        state_dict[prefix + "moe." + key] = value


def _is_adapter(key: str) -> bool:
    return ".lora_" in key


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

        def __reduce__(self):
            # A class made here cannot be found by name: pickle and deepcopy rebuild it from the router class.
            return _recorder_for, (router_class,), self.__dict__

        recorder = type(router_class.__name__, (router_class,), {"__init__": __init__, "forward": forward,
                                                                 "__reduce__": __reduce__, "__module__": __name__})
        _RECORDERS[router_class] = recorder
    return recorder()


def _router_class(block: nn.Module) -> type | None:
    for child in block.children():
        if type(child).__name__.lower().endswith(("router", "topkrouter", "top1router")):
            return type(child)
    return None


def _install_padding_mask_hook(model: nn.Module) -> None:
    """Hand the model's ``attention_mask`` (1 = real token) to its converted blocks each forward."""
    if getattr(model, "_moekit_padding_hook_installed", False):
        return
    model.register_forward_pre_hook(_pass_padding_mask, with_kwargs=True)
    model._moekit_padding_hook_installed = True


def _pass_padding_mask(module: nn.Module, args, kwargs) -> None:
    # A module-level function, so that the model still pickles (torch.save) and deep-copies.
    mask = kwargs.get("attention_mask")
    mask = mask if isinstance(mask, Tensor) and mask.dim() == 2 else None
    if mask is not None and bool(mask.all()):  # NOTE: syncs with the device, once per forward, not per layer
        mask = None
    for block in module.modules():
        if isinstance(block, HFMoEBlock):
            block.padding_mask = mask


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
    _initialize_blocks_as_transformers_does(model)
    return model


def _initialize_blocks_as_transformers_does(model: nn.Module) -> None:
    """Make transformers' ``init_weights`` (after materialising from the meta device, or
    ``post_init``) initialise each converted block as it would the original: the block is
    rebuilt in transformers' layout, initialised by the model's own ``_init_weights``, and
    copied back. The moekit modules inside a block are left to that."""
    for owner in [m for m in model.modules() if hasattr(type(m), "_init_weights") and hasattr(m, "config")]:
        if not isinstance(owner.__dict__.get("_init_weights"), _InitWeightsWithBlocks):
            owner._init_weights = _InitWeightsWithBlocks(model, owner._init_weights)


class _InitWeightsWithBlocks:
    """``_init_weights`` of a model holding converted blocks (an object, not a closure, so the
    model pickles and deep-copies with it)."""

    def __init__(self, root: nn.Module, original):
        self.root, self.original = root, original

    def __call__(self, module: nn.Module) -> None:
        if isinstance(module, HFMoEBlock):
            module.initialize_with(self.original)
        elif not any(module is inner for block in self.root.modules() if isinstance(block, HFMoEBlock)
                     for inner in block.modules()):
            self.original(module)


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
    from transformers.utils import logging as hf_logging

    folder = Path(path)
    if not folder.is_dir():
        raise ValueError(f"{str(path)!r} is not a local folder; load_pretrained reads a folder written by "
                         "save_pretrained (it downloads nothing)")
    cls = model_class or AutoModelForCausalLM
    verbosity = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # its load report would repeat, over many lines, what is checked below
    try:
        model, info = cls.from_pretrained(folder, local_files_only=True, output_loading_info=True)
    except (OSError, RuntimeError, ValueError, SafetensorError) as error:
        if "mismatched" in str(error):
            raise ValueError(f"the weights in {str(folder)!r} do not match its config.json: tensors of another "
                             "shape than the config gives") from None
        files = ", ".join(sorted(p.name for p in folder.glob("*.safetensors"))) or "no .safetensors file"
        raise ValueError(f"could not load the weights in {str(folder)!r} ({files}): "
                         f"{str(error).strip().splitlines()[0]}") from None
    finally:
        hf_logging.set_verbosity(verbosity)
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
