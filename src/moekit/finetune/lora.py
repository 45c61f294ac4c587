"""LoRA on a whole model's experts: add, count, save, merge.

``add_lora(model, rank, alpha)`` wraps the routed experts (and, with
``targets=("experts", "shared")``, the shared experts) of every MoE layer in
``LoRAExperts`` and freezes every other parameter, so only the adapters train.
It works on moekit models and on converted Hugging Face models
(``moekit.interop.hf.convert_model``), whose MoE blocks are moekit layers. The
rest of a model (attention, embeddings) is what the ``peft`` library adapts:
``moekit.finetune.peft`` writes and reads adapters in its format.

``merge_lora(model)`` folds the updates into the base weights and drops the
adapters; ``adapter_state_dict(model)`` is the adapters alone.
"""

from __future__ import annotations

from collections.abc import Iterator

from torch import Tensor, nn

from ..experts.lora import PROJECTIONS, LoRAExperts
from ..layer import moe_layers

TARGETS = ("experts", "shared")


def _check_targets(targets: tuple[str, ...]) -> None:
    unknown = [t for t in targets if t not in TARGETS]
    if not targets or unknown:
        raise ValueError(f"LoRA targets {tuple(targets)!r}: choose from {TARGETS}")


def lora_sites(model: nn.Module, targets: tuple[str, ...] = ("experts",)) -> Iterator[tuple[str, nn.Module, str]]:
    """(qualified name, parent module, attribute) of every experts module LoRA adapts."""
    for name, moe in moe_layers(model):
        prefix = f"{name}." if name else ""
        if "experts" in targets:
            yield f"{prefix}experts", moe, "experts"
        if "shared" in targets and moe.shared_experts is not None:
            yield f"{prefix}shared_experts.ffn", moe.shared_experts, "ffn"


def add_lora(model: nn.Module, rank: int = 8, alpha: float = 16.0, *, targets: tuple[str, ...] = ("experts",),
             projections: tuple[str, ...] = PROJECTIONS, rslora: bool = False,
             freeze_rest: bool = True) -> nn.Module:
    """Wrap the experts of every MoE layer of ``model`` in ``LoRAExperts``, in place.

    Args:
        rank, alpha, projections, rslora: as ``LoRAExperts``.
        targets: ``"experts"`` (the routed experts) and/or ``"shared"`` (shared experts).
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
        experts = getattr(parent, attribute)
        if isinstance(experts, LoRAExperts):
            raise ValueError(f"add_lora: {name} already has LoRA adapters")
        if not getattr(experts, "stacked_mlp", False):
            raise TypeError(f"add_lora: {name} holds {type(experts).__name__}; LoRA adapts stacked MLP experts")
        setattr(parent, attribute, LoRAExperts(experts, rank, alpha, projections=projections, rslora=rslora))
    return model


def lora_experts(model: nn.Module) -> list[tuple[str, LoRAExperts]]:
    """Every ``LoRAExperts`` module of the model, by qualified name."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRAExperts)]


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapters' tensors by their qualified names (``….experts.lora_A_in``, …)."""
    return {f"{name}.{p_name}": p.detach() for name, m in lora_experts(model)
            for p_name, p in m.named_parameters(recurse=False)}


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weights and put the plain experts back, in place."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRAExperts):
                setattr(module, child_name, child.merged_experts())
    return model


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


__all__ = ["add_lora", "adapter_state_dict", "lora_experts", "lora_sites", "merge_lora",
           "trainable_parameters"]
