"""Mixture of LoRA experts (MixLoRA, Li et al. 2024; MoLoRA): a frozen dense FFN becomes
a router over E experts that share its weights, each with LoRA adapters of its own.

``mixlora(ffn, num_experts, top_k, rank=8, alpha=16)`` reads any dense FFN that
``moekit.interop.surgery.upcycle`` reads (a one-expert moekit MoE or
``StackedExperts``, moekit's dense ``SwiGLU``, a Llama/Qwen/Mistral gated MLP, GPT-2's
MLP) and returns a ``moekit.MoE`` whose experts are ``LoRAExperts`` over
``SharedBaseExperts``: the FFN's weights are held once, frozen, never copied. Any
moekit router and balancing loss applies (``MoEConfig`` fields as keywords). The
adapters start at zero, so with combine weights that sum to one (``topk``,
``softmax``, ``noisy_topk``) the layer computes exactly what the FFN did.

``merge_lora`` turns a trained mixture into an ordinary MoE of E stacked experts
(each the base plus its own update).
"""

from __future__ import annotations

from torch import nn

from ..experts.lora import PROJECTIONS
from ..interop.surgery import read_dense_ffn
from ..layer import MoE
from ..models.adapters import mixture_of_lora_experts


def mixlora(ffn: nn.Module, num_experts: int, top_k: int | None = 2, *, rank: int = 8, alpha: float = 16.0,
            rslora: bool = False, projections: tuple[str, ...] = PROJECTIONS, router_init_std: float = 0.02,
            seed: int | None = None, **moe_fields) -> MoE:
    """A mixture of ``num_experts`` LoRA experts over the frozen dense ``ffn``.

    Args:
        ffn: the dense FFN (see the module docstring for the kinds understood).
        num_experts, top_k: E and K of the new router.
        rank, alpha, rslora, projections: each expert's adapters, as ``LoRAExperts``.
        router_init_std: std of the router's normal init.
        seed: seeds the router and adapter init (None: torch's global generator).
        moe_fields: further ``MoEConfig`` fields (router, load_balance_coef, …).
    """
    dense = read_dense_ffn(ffn)
    return mixture_of_lora_experts(
        dense.w_in, dense.w_out, dense.b_in, dense.b_out, kind=dense.expert, activation=dense.activation,
        num_experts=num_experts, top_k=top_k, rank=rank, alpha=alpha, rslora=rslora, projections=projections,
        router_init_std=router_init_std, seed=seed, **moe_fields)


__all__ = ["mixlora"]
