"""Expert-choice routing (Zhou et al. 2022, "Mixture-of-Experts with Expert Choice Routing").

S = softmax(X·W_g) over experts (T × E). Each expert j takes the C tokens with
the largest S_tj, C = ceil(capacity_factor · T / E), capacity_factor being the
average number of experts per token (``top_k`` when unset). Token t's output is
Σ over the experts j that took it of S_tj·E_j(x_t): a token may get zero or
many experts, every expert is exactly full, and no balancing loss is needed.

Not causal: an expert's choice for one token depends on every other token in
the batch, later ones included. ``check_causal`` refuses it in causal models.

Shapes: T tokens, D model dim, E experts, C tokens per expert.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import Tensor

from .base import GateOptions, GateRouter, check_number
from .losses import lazy_losses, z_squared_sum
from .records import ExpertChoiceRouting, LazyMapping


@dataclass(kw_only=True)
class ExpertChoiceOptions(GateOptions):
    """Args:
        capacity_factor: the average number of experts per token; each expert takes
            ceil(capacity_factor · T / E) tokens. None: ``top_k``.
    """

    capacity_factor: float | None = None

    def validate(self, *, num_experts: int, top_k: int) -> None:
        super().validate(num_experts=num_experts, top_k=top_k)
        if self.capacity_factor is not None:
            check_number("capacity_factor", self.capacity_factor, low_inclusive=False)


class ExpertChoiceRouter(GateRouter):
    Options = ExpertChoiceOptions
    causal = False
    token_choice = False
    losses = ("z_loss",)
    global_losses = frozenset(losses)

    def capacity(self, num_tokens: int) -> int:
        """Tokens each expert takes: ceil(capacity_factor · T / E), in [1, T] (0 for an empty batch)."""
        factor = self.top_k if self.options.capacity_factor is None else self.options.capacity_factor
        return max(min(1, num_tokens), min(num_tokens, math.ceil(factor * num_tokens / self.num_experts)))

    def route(self, logits_TE: Tensor, x_TD: Tensor, valid_T: Tensor | None,
              sequence_length) -> ExpertChoiceRouting:
        probs_TE = logits_TE.softmax(dim=-1)
        # Probabilities are >= 0, so -1 ranks padding below every real token.
        scores_ET = probs_TE.detach().t()
        if valid_T is not None:
            scores_ET = scores_ET.masked_fill(~valid_T[None, :], -1.0)
        _, tokens_EC = scores_ET.topk(self.capacity(probs_TE.shape[0]), dim=1)
        weights_EC = probs_TE.t().gather(1, tokens_EC)
        if valid_T is not None:
            # Only reached when an expert has more room than there are real tokens.
            weights_EC = weights_EC * valid_T[tokens_EC].to(weights_EC.dtype)
        token_weight_T = None if valid_T is None else valid_T.to(logits_TE.dtype)
        sums = LazyMapping({
            "tokens": lambda: len(logits_TE) if token_weight_T is None else token_weight_T.sum(),
            "z_squared": lambda: z_squared_sum(logits_TE, token_weight_T),
        })
        return ExpertChoiceRouting(tokens_EC=tokens_EC, weights_EC=weights_EC, logits_TE=logits_TE,
                                   probs_TE=probs_TE, sums=sums, losses=lazy_losses(self.losses, sums, self.num_experts),
                                   valid_T=valid_T)

    def extra_repr(self) -> str:
        factor = self.options.capacity_factor or self.top_k
        return f"{super().extra_repr()}, capacity_factor={factor}, causal=False"
