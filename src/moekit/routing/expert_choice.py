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

from torch import Tensor

from .base import ExpertChoiceRouting, Router
from .losses import router_z_loss


class ExpertChoiceRouter(Router):
    causal = False

    def route(
        self, logits_TE: Tensor, x_TD: Tensor, valid_T: Tensor | None, **kwargs
    ) -> ExpertChoiceRouting:
        probs_TE = logits_TE.softmax(dim=-1)
        T = probs_TE.shape[0]
        capacity = self.config.expert_choice_capacity(T)
        # Probabilities are >= 0, so -1 ranks padding below every real token.
        scores_ET = probs_TE.detach().t()
        if valid_T is not None:
            scores_ET = scores_ET.masked_fill(~valid_T[None, :], -1.0)
        _, tokens_EC = scores_ET.topk(capacity, dim=1)
        weights_EC = probs_TE.t().gather(1, tokens_EC)
        if valid_T is not None:
            # Only reached when an expert has more room than there are real tokens.
            weights_EC = weights_EC * valid_T[tokens_EC].to(weights_EC.dtype)
        token_weight_T = None if valid_T is None else valid_T.float()
        return ExpertChoiceRouting(
            tokens_EC=tokens_EC,
            weights_EC=weights_EC,
            logits_TE=logits_TE,
            probs_TE=probs_TE,
            losses={"z_loss": router_z_loss(logits_TE, token_weight_T)},
            valid_T=valid_T,
        )

    def extra_repr(self) -> str:
        factor = self.config.capacity_factor or self.top_k
        return f"{super().extra_repr()}, capacity_factor={factor}, causal=False"
