"""A converted transformers causal LM behind the interface moekit's trainer drives.

``HFCausalLM(model, spec)`` wraps a transformers MoE model converted by
``convert_model`` (its MoE blocks are moekit layers) so that ``moekit.train.Trainer``
trains it as it trains moekit's own ``LanguageModel``: ``forward(idx, targets)``
returns an ``LMOutput`` whose loss is the mean next-token cross-entropy, whose
``aux_loss`` is the MoE layers' weighted auxiliary losses and whose ``routings`` are
their ``MoERouting`` records. ``build_hf_model(spec)`` reads the folder an
``HFModelSpec`` names and adds its adapters; the wrapper's state dict is the
converted model's (transformers' layout, adapters under their moekit names).

Shapes: B batch, S sequence length, V vocabulary.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..models.adapters import add_lora
from ..models.hf_spec import HFModelSpec
from ..models.lm import LMOutput
from .hf_models import HFMoEBlock, load_pretrained


class HFCausalLM(nn.Module):
    """A converted transformers causal LM with ``LanguageModel``'s training interface."""

    def __init__(self, model: nn.Module, spec: HFModelSpec):
        super().__init__()
        self.hf_model = model
        self.config = spec
        self.blocks = [m for m in model.modules() if isinstance(m, HFMoEBlock)]

    def forward(self, idx: Tensor, targets: Tensor | None = None) -> LMOutput:
        logits = self.hf_model(input_ids=idx, use_cache=False).logits  # (B, S, V)
        loss_dtype = torch.promote_types(logits.dtype, torch.float32)
        loss = None
        if targets is not None:
            loss = F.cross_entropy(logits.to(loss_dtype).reshape(-1, logits.shape[-1]), targets.reshape(-1))
        outputs = [block.last_output for block in self.blocks]
        aux_loss = sum((out.aux_loss.to(loss_dtype) for out in outputs), logits.new_zeros((), dtype=loss_dtype))
        return LMOutput(logits, loss, aux_loss, [out.routing for out in outputs])

    def num_parameters(self, active: bool = False) -> int:
        """All parameters, or those one token uses (K of E routed experts per MoE layer)."""
        total = sum(p.numel() for p in self.parameters())
        if active:
            for block in self.blocks:
                moe = block.moe.config
                expert_params = sum(p.numel() for p in block.moe.experts.parameters())
                total -= expert_params * (moe.num_experts - moe.top_k) // moe.num_experts
        return total


def build_hf_model(spec: HFModelSpec) -> HFCausalLM:
    """The converted model of ``spec.folder`` with ``spec.adapter`` added (base frozen)."""
    model = load_pretrained(spec.folder)
    adapter = spec.adapter
    if adapter is not None:
        if adapter.method != "lora":
            raise ValueError(f"adapter {adapter.method!r} on a Hugging Face model: moekit adapts its MoE experts "
                             "and routers with 'lora' (or trains everything: full)")
        add_lora(model, adapter.rank, adapter.alpha, targets=adapter.targets, rslora=adapter.rslora)
    return HFCausalLM(model, spec)
