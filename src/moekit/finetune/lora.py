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

from torch import Tensor, nn
from torch.nn.utils import parametrize

from ..experts.lora import LoRAExperts
from ..models.adapters import TARGETS, add_lora, lora_sites, router_update


def lora_experts(model: nn.Module) -> list[tuple[str, LoRAExperts]]:
    """Every ``LoRAExperts`` module of the model, by qualified name."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, LoRAExperts)]


def adapter_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The adapters' tensors by their qualified names (``….experts.lora_A_in``,
    ``….router.parametrizations.weight.0.lora_A``, …)."""
    return {name: p.detach() for name, p in model.named_parameters() if ".lora_" in name}


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weights and put the plain experts back, in place."""
    for module in list(model.modules()):
        if router_update(module) is not None:
            parametrize.remove_parametrizations(module, "weight", leave_parametrized=True)
            module.weight.requires_grad_(True)
        for child_name, child in list(module.named_children()):
            if isinstance(child, LoRAExperts):
                setattr(module, child_name, child.merged_experts())
    return model


def trainable_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


__all__ = ["TARGETS", "add_lora", "adapter_state_dict", "lora_experts", "lora_sites", "merge_lora",
           "trainable_parameters"]
