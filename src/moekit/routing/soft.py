"""Soft MoE (Puigcerver et al. 2023, "From Sparse to Soft Mixtures of Experts").

Slot parameters Φ (S × D, S = E·P, P slots per expert). Per sequence of L
tokens, logits = X·Φᵀ (L × S);
- dispatch weights: softmax of the logits over the sequence's tokens (each
  slot's column sums to one); slot inputs X̃ = dispatchᵀ·X, expert j processes
  its P slots;
- combine weights: softmax over the slots (each token's row sums to one);
  Y = combine·Ỹ.
With ``soft_normalize`` the tokens and Φ are l2-normalised over D and the
logits multiplied by a learned scale (initialised to 1), the normalisation the
paper uses so that the logits do not grow with D.

Fully differentiable, nothing dropped, no balancing loss. Not causal: every
slot mixes every token of the sequence, later ones included; ``check_causal``
refuses it in causal models. Sequences are the input's second-to-last dim
(``MoE`` passes ``sequence_length``); a 2-D input is one sequence.

Shapes: T tokens, D model dim, E experts, P slots per expert, S = E·P slots,
G sequences, L tokens per sequence.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..compute.precision import gate_dtype, without_autocast
from .base import Router, RouterOptions, check_bool, check_positive_int
from .records import SoftRouting


@dataclass(kw_only=True)
class SoftOptions(RouterOptions):
    """Args:
        slots_per_expert: slots P each expert processes per sequence.
        normalize: l2-normalise tokens and slot parameters and multiply by a learned
            scale, as the Soft MoE paper does for stability.
    """

    flat_names: ClassVar[dict[str, str]] = {"normalize": "soft_normalize"}
    slots_per_expert: int = 1
    normalize: bool = True

    def validate(self, *, num_experts: int, top_k: int) -> None:
        check_positive_int("slots_per_expert", self.slots_per_expert)
        check_bool("soft_normalize", self.normalize)


class SoftRouter(Router):
    Options = SoftOptions
    causal = False
    token_choice = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.slots_per_expert = self.options.slots_per_expert
        num_slots = self.num_experts * self.slots_per_expert
        self.weight = nn.Parameter(torch.empty(num_slots, self.d_model))
        nn.init.normal_(self.weight, std=1.0 / math.sqrt(self.d_model))
        self.scale = nn.Parameter(torch.ones(())) if self.options.normalize else None

    def forward(self, x_TD: Tensor, *, valid_T: Tensor | None = None, sequence_length: int | None = None,
                token_ids_T: Tensor | None = None) -> SoftRouting:
        dtype = gate_dtype(x_TD)
        T, D = x_TD.shape
        L = T if sequence_length is None else sequence_length
        if T == 0:  # an empty batch: no sequence, whatever their length
            L = max(L, 1)
        if L < 1 or T % L != 0:
            raise ValueError(f"sequence_length ({sequence_length}) must divide the number of tokens ({T})")
        G = T // L
        with without_autocast(x_TD.device.type):
            x_GLD = x_TD.to(dtype).view(G, L, D)
            phi_SD = self.weight.to(dtype)
            if self.scale is not None:
                x_GLD = F.normalize(x_GLD, dim=-1)
                phi_SD = self.scale.to(dtype) * F.normalize(phi_SD, dim=-1)
            logits_GLS = x_GLD @ phi_SD.t()
            dispatch_logits_GLS = logits_GLS
            if valid_T is not None:
                valid_GL1 = valid_T.view(G, L, 1)
                # finfo.min rather than −inf: an all-padding sequence stays finite.
                dispatch_logits_GLS = logits_GLS.masked_fill(~valid_GL1, torch.finfo(dtype).min)
            dispatch_GLS = dispatch_logits_GLS.softmax(dim=1)
            combine_GLS = logits_GLS.softmax(dim=2)
            if valid_T is not None:
                combine_GLS = combine_GLS * valid_GL1.to(dtype)
        E, P = self.num_experts, self.slots_per_expert
        probs_TE = combine_GLS.view(G, L, E, P).sum(-1).reshape(T, E)
        return SoftRouting(dispatch_GLS=dispatch_GLS, combine_GLS=combine_GLS, logits_GLS=logits_GLS,
                           probs_TE=probs_TE, slots_per_expert=P, valid_T=valid_T)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, num_experts={self.num_experts}, "
            f"slots_per_expert={self.slots_per_expert}, normalize={self.scale is not None}, causal=False"
        )
