"""The Routing records routers return, and the base class routers share.

Token-choice routers (each token picks K experts) return ``Routing``. Expert
choice (each expert picks C tokens) returns ``ExpertChoiceRouting`` and Soft MoE
(each expert processes P soft slots per sequence) returns ``SoftRouting``: they
do not fit the top-k fields, so they get records of their own.

Shapes: T tokens, D model dim, E experts, K experts per token, C tokens per
expert (expert choice), G sequences, L tokens per sequence, S = E·P slots per
sequence (Soft MoE).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

from ..config import MoEConfig
from .gshard import random_second_expert


class _RoutingRecord:
    """What every routing record answers, whatever its fields."""

    @property
    def num_tokens(self) -> int:
        return self.probs_TE.shape[0]

    @property
    def num_experts(self) -> int:
        return self.probs_TE.shape[1]

    def replace(self, **changes):
        """A copy with ``changes`` applied. Records have no ``__post_init__``, so a
        shallow copy is what ``dataclasses.replace`` builds, at a fraction of its
        per-call cost (it runs twice in every forward pass)."""
        unknown = changes.keys() - self.__dataclass_fields__.keys()
        if unknown:
            raise TypeError(f"{type(self).__name__} has no field(s) {sorted(unknown)}")
        copy = object.__new__(type(self))
        copy.__dict__.update(self.__dict__)
        copy.__dict__.update(changes)
        return copy

    def load_fractions(self) -> Tensor:
        """Share of processed assignments (or tokens, or slots) per expert (E,), summing to one."""
        counts = self.tokens_per_expert_E.float()
        return counts / counts.sum().clamp_min(1.0)


@dataclass(frozen=True)
class Routing(_RoutingRecord):
    """What a router decided for a batch of T tokens, and what dispatch made of it.

    Attributes:
        indices_TK: chosen expert ids (long).
        weights_TK: combine weights (float32; float64 for float64 input); dropped assignments keep their
            weight here, ``kept_TK`` says which ones reached an expert.
        logits_TE: router logits (float32 or float64, as weights_TK); None for routers
            without learned logits (hash).
        probs_TE: router probabilities that the balancing losses use.
        losses: each auxiliary loss by name, unweighted.
        valid_T: mask of real (non-padding) tokens, or None when all are real.
        tokens_per_expert_E: assignments each expert processed (filled by the layer).
        kept_TK: assignments that survived capacity and padding (filled by the layer).
        num_dropped: assignments of real tokens dropped for capacity (filled by the layer).
        active_TK: assignments the router chose to dispatch, or None when all are
            (GShard's random second expert declines some; declined ones are not drops).
        stats: routing statistics by name (filled by the layer, see ``routing.stats``).
    """

    indices_TK: Tensor
    weights_TK: Tensor
    logits_TE: Tensor | None
    probs_TE: Tensor
    losses: dict[str, Tensor] = field(default_factory=dict)
    valid_T: Tensor | None = None
    tokens_per_expert_E: Tensor | None = None
    kept_TK: Tensor | None = None
    num_dropped: Tensor | None = None
    active_TK: Tensor | None = None
    stats: dict[str, Tensor] = field(default_factory=dict)

    @classmethod
    def with_standard_losses(
        cls, *, indices_TK: Tensor, weights_TK: Tensor, logits_TE: Tensor, probs_TE: Tensor,
        valid_T: Tensor | None, **fields,
    ) -> Routing:
        """A token-choice record reporting the standard losses (see ``losses.standard_losses``)."""
        from .losses import standard_losses

        token_weight_T = None if valid_T is None else valid_T.float()
        return cls(
            indices_TK=indices_TK, weights_TK=weights_TK, logits_TE=logits_TE, probs_TE=probs_TE,
            losses=standard_losses(logits_TE, probs_TE, indices_TK, weights_TK, token_weight_T),
            valid_T=valid_T, **fields,
        )



@dataclass(frozen=True)
class ExpertChoiceRouting(_RoutingRecord):
    """Expert choice: each expert took the C tokens it scored highest.

    A token may be taken by zero, one or many experts.

    Attributes:
        tokens_EC: token ids each expert took, best first (long).
        weights_EC: combine weight of each (expert, token) pair: the router probability.
        logits_TE, probs_TE: router logits and softmax over experts (float32 or float64).
        losses: auxiliary losses by name, unweighted.
        valid_T: mask of real tokens, or None. Padding is never taken by an expert
            while real tokens remain; when it is, its weight is zero.
        tokens_per_expert_E: real tokens each expert processed (filled by the layer).
        stats: routing statistics by name (filled by the layer).
    """

    tokens_EC: Tensor
    weights_EC: Tensor
    logits_TE: Tensor
    probs_TE: Tensor
    losses: dict[str, Tensor] = field(default_factory=dict)
    valid_T: Tensor | None = None
    tokens_per_expert_E: Tensor | None = None
    stats: dict[str, Tensor] = field(default_factory=dict)

    @property
    def capacity(self) -> int:
        return self.tokens_EC.shape[1]

    def experts_per_token(self) -> Tensor:
        """How many experts took each token (T,), long; padding counts zero."""
        taken_R = self.tokens_EC.reshape(-1)
        counts_T = torch.zeros(self.num_tokens, dtype=torch.long, device=taken_R.device)
        counts_T.scatter_add_(0, taken_R, torch.ones_like(taken_R))
        if self.valid_T is not None:
            counts_T = counts_T * self.valid_T
        return counts_T



@dataclass(frozen=True)
class SoftRouting(_RoutingRecord):
    """Soft MoE: every expert processes P slots per sequence, each slot a convex
    combination of the sequence's tokens; each token's output is a convex
    combination of the slots' outputs.

    Attributes:
        dispatch_GLS: dispatch weights, softmax over a sequence's tokens (columns sum to one).
        combine_GLS: combine weights, softmax over slots (rows sum to one).
        logits_GLS: slot logits.
        probs_TE: each token's combine mass on each expert (its P slots summed),
            flattened over sequences.
        slots_per_expert: P.
        losses: auxiliary losses by name (none: Soft MoE needs no balancing).
        valid_T: mask of real tokens, or None; padding neither feeds slots nor
            receives output.
        tokens_per_expert_E: slots each expert processed, G·P (filled by the layer).
        stats: routing statistics by name (filled by the layer).
    """

    dispatch_GLS: Tensor
    combine_GLS: Tensor
    logits_GLS: Tensor
    probs_TE: Tensor
    slots_per_expert: int
    losses: dict[str, Tensor] = field(default_factory=dict)
    valid_T: Tensor | None = None
    tokens_per_expert_E: Tensor | None = None
    stats: dict[str, Tensor] = field(default_factory=dict)



AnyRouting = Routing | ExpertChoiceRouting | SoftRouting


class Router(nn.Module):
    """Base router: a linear gate ``logits = x·W_gᵀ`` computed in float32.

    Subclasses implement ``route(logits_TE, x_TD, valid_T)``; the base class
    handles the precision rules (float32 whatever the input dtype or autocast).
    ``causal`` is False for routers whose choice for one token depends on later
    tokens (expert choice, Soft MoE); ``check_causal`` refuses them where
    causality is declared.
    """

    causal: bool = True

    def __init__(self, config: MoEConfig):
        super().__init__()
        self.config = config
        self.num_experts = config.num_experts
        self.top_k = config.top_k
        self.weight = nn.Parameter(torch.empty(config.num_experts, config.d_model))
        nn.init.normal_(self.weight, std=0.02)
        self.logit_bias = nn.Parameter(torch.zeros(config.num_experts)) if config.router_logit_bias else None

    def router_input(self, x_TD: Tensor) -> Tensor:
        return x_TD

    def forward(self, x_TD: Tensor, *, valid_T: Tensor | None = None, **kwargs) -> Routing:
        # Selective precision (Switch): gate math in float32 (float64 stays float64),
        # never under autocast.
        dtype = torch.float64 if x_TD.dtype == torch.float64 else torch.float32
        # Entering the context costs about 15 µs, 5 % of a small decoding step: only when needed.
        if not torch.is_autocast_enabled(x_TD.device.type):
            return self._route_in(dtype, x_TD, valid_T, **kwargs)
        with torch.autocast(device_type=x_TD.device.type, enabled=False):
            return self._route_in(dtype, x_TD, valid_T, **kwargs)

    def _route_in(self, dtype: torch.dtype, x_TD: Tensor, valid_T: Tensor | None, **kwargs) -> Routing:
        xr_TD = self.router_input(x_TD.to(dtype))
        logits_TE = xr_TD @ self.weight.to(dtype).t()
        if self.logit_bias is not None:
            logits_TE = logits_TE + self.logit_bias.to(dtype)
        return self.route(logits_TE, xr_TD, valid_T, **kwargs)

    def route(self, logits_TE: Tensor, x_TD: Tensor, valid_T: Tensor | None, **kwargs) -> Routing:
        raise NotImplementedError

    def active_assignments(self, weights_TK: Tensor) -> Tensor | None:
        """Assignments to dispatch under ``second_expert_policy`` (None: all of them)."""
        if self.config.second_expert_policy == "random" and self.training:
            return random_second_expert(weights_TK)
        return None

    def extra_repr(self) -> str:
        return f"d_model={self.weight.shape[1]}, num_experts={self.num_experts}, top_k={self.top_k}"


def check_causal(module: nn.Module, where: str = "a causal model") -> None:
    """Raise ValueError if any router inside ``module`` looks at other tokens of the batch.

    Expert choice and Soft MoE route each token using the whole batch (or
    sequence), so a token's output depends on later tokens: they cannot be used
    for autoregressive training or generation. Call this where causality is
    declared (e.g. a decoder LM's constructor and ``generate``).
    """
    for name, sub in module.named_modules():
        if isinstance(sub, Router) and not sub.causal:
            raise ValueError(
                f"router {sub.config.router!r} at {name or type(module).__name__!r} is not causal "
                f"(it routes each token using the whole batch), so it cannot be used in {where}; "
                f"use a token-choice router such as 'topk' or 'sigmoid'"
            )
