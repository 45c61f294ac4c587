"""Quantize the experts of a model in place, and count which experts an evaluation pass uses.

``quantize_model(model, bits=8)`` replaces the stacked MLP experts of every MoE layer
with ``QuantizedExperts`` (weight-only int8 or int4); everything else keeps its
precision. ``expert_coverage(model, batches)`` counts the tokens each expert of each
layer processed over the batches: an expert that never fires is one whose quantization
error no evaluation can see.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ..experts.quantized import QuantizedExperts
from ..layer import moe_layers

# Paths whose kernels need float stacked weights fall back to ``auto`` once the experts are integers.
_AUTO = "auto"


def quantize_model(model: nn.Module, bits: int = 8, group_size: int = 64, kernel: str = "auto") -> nn.Module:
    """Replace every MoE layer's stacked experts by ``QuantizedExperts``; returns ``model``.

    Raises ``ValueError`` when the model has no MoE layer or a layer's experts are not
    stacked MLPs (lists of arbitrary modules cannot be quantized this way)."""
    layers = moe_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no MoE layer to quantize")
    for name, layer in layers:
        if isinstance(layer.experts, QuantizedExperts):
            raise ValueError(f"the experts of {name!r} are already quantized ({layer.experts.bits}-bit)")
        if not getattr(layer.experts, "stacked_mlp", False):
            raise ValueError(f"the experts of {name!r} are {type(layer.experts).__name__}; only stacked MLP "
                             "experts (swiglu, geglu, ffn) can be quantized")
    for _, layer in layers:
        layer.experts = QuantizedExperts.from_stacked(layer.experts, bits, group_size, kernel)
        if layer.config.compute != _AUTO:
            probe = torch.empty(0, layer.config.d_model, device="meta")
            try:
                layer.compute_path(probe)
            except ValueError:
                layer.config.compute = _AUTO
    return model


@dataclass
class Coverage:
    """Tokens each expert processed, per MoE layer (``counts[layer_name]`` has E entries)."""

    counts: dict[str, list[int]]

    @property
    def never_fired(self) -> dict[str, list[int]]:
        """Experts with no token, by layer (only layers that have some)."""
        return {name: [e for e, c in enumerate(counts) if c == 0] for name, counts in self.counts.items()
                if 0 in counts}

    def to_dict(self) -> dict:
        return {"tokens_per_expert": self.counts, "never_fired": self.never_fired}

    def format(self) -> str:
        lines = ["expert coverage (tokens per expert in the evaluation pass):"]
        for name, counts in self.counts.items():
            total = sum(counts) or 1
            shares = " ".join(f"{100 * c / total:4.1f}%" for c in counts)
            flag = f"  never fired: {self.never_fired[name]}" if name in self.never_fired else ""
            lines.append(f"  {name}: {shares}{flag}")
        if not self.never_fired:
            lines.append("  every expert fired")
        return "\n".join(lines)


@torch.no_grad()
def expert_coverage(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor] | Tensor]) -> Coverage:
    """Run the model on the batches (inputs, or (inputs, targets) pairs) and count the tokens
    each expert of each MoE layer processed."""
    layers = moe_layers(model)
    counts = {name: torch.zeros(layer.config.num_experts, dtype=torch.long) for name, layer in layers}

    def counter(name):
        def hook(module, args, output):
            counts[name] += output.routing.tokens_per_expert_E.detach().long().cpu()
        return hook

    handles = [layer.register_forward_hook(counter(name)) for name, layer in layers]
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            model(batch[0] if isinstance(batch, tuple | list) else batch)
    finally:
        model.train(was_training)
        for handle in handles:
            handle.remove()
    return Coverage({name: c.tolist() for name, c in counts.items()})
