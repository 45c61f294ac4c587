"""Top-k softmax router (GShard, Mixtral, Qwen-MoE).

p(x) = softmax(x·W_g) over all E experts; keep the K largest; optionally
renormalise the K weights to sum to one (Mixtral) or keep them raw (Qwen option).
Shapes: T tokens, D model dim, E experts, K experts per token.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .base import GateOptions, GateRouter
from .gshard import SECOND_EXPERT_POLICIES, dispatched_assignments
from .losses import lazy_losses, standard_sums
from .records import Routing

STANDARD_LOSSES = ("load_balance", "z_loss", "importance", "load")


@dataclass(kw_only=True)
class TopKOptions(GateOptions):
    """Args:
        normalize_weights: renormalise the K combine weights to sum to one (Mixtral);
            False keeps the raw softmax probabilities (Qwen option).
        second_expert_policy: ``all`` dispatches every one of the K choices; ``random``
            (GShard, top_k = 2) dispatches the second choice in training only with
            probability min(1, 2·g2), g2 its weight normalised over the two choices.
    """

    normalize_weights: bool = True
    second_expert_policy: str = "all"

    def validate(self, *, num_experts: int, top_k: int) -> None:
        super().validate(num_experts=num_experts, top_k=top_k)
        if not isinstance(self.normalize_weights, bool):
            raise ValueError(f"normalize_weights ({self.normalize_weights!r}) must be True or False")
        check_second_expert_policy(self.second_expert_policy, top_k)


def check_second_expert_policy(policy: str, top_k: int) -> None:
    if policy not in SECOND_EXPERT_POLICIES:
        raise ValueError(f"second_expert_policy ({policy!r}) must be one of {', '.join(SECOND_EXPERT_POLICIES)}")
    if policy == "random" and top_k != 2:
        raise ValueError(f"second_expert_policy 'random' needs top_k = 2; got top_k ({top_k})")


def topk_weights(probs_TE: Tensor, top_k: int, normalize: bool) -> tuple[Tensor, Tensor]:
    """The K largest probabilities and their experts, renormalised if asked."""
    weights_TK, indices_TK = probs_TE.topk(top_k, dim=-1)
    if normalize:
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
    return weights_TK, indices_TK


def standard_routing(indices_TK: Tensor, weights_TK: Tensor, logits_TE: Tensor, probs_TE: Tensor,
                     valid_T: Tensor | None, active_TK: Tensor | None = None) -> Routing:
    """A token-choice record reporting the standard losses (load balance, z, importance, load)."""
    token_weight_T = None if valid_T is None else valid_T.to(probs_TE.dtype)
    sums = standard_sums(logits_TE, probs_TE, indices_TK, weights_TK, token_weight_T)
    return Routing(indices_TK=indices_TK, weights_TK=weights_TK, logits_TE=logits_TE, probs_TE=probs_TE,
                   sums=sums, losses=lazy_losses(STANDARD_LOSSES, sums, probs_TE.shape[1]), valid_T=valid_T,
                   active_TK=active_TK)


class TopKRouter(GateRouter):
    Options = TopKOptions
    growable = True
    replayable = True
    losses = STANDARD_LOSSES
    global_losses = frozenset(STANDARD_LOSSES)

    def route(self, logits_TE: Tensor, x_TD: Tensor, valid_T: Tensor | None, sequence_length) -> Routing:
        probs_TE = logits_TE.softmax(dim=-1)
        if self.replayed_TK is None:  # choose()'s top K, whose values are the weights: no gather
            weights_TK, indices_TK = probs_TE.topk(self.top_k, dim=-1)
        else:
            indices_TK = self.choose(probs_TE, self.top_k)
            weights_TK = probs_TE.gather(1, indices_TK)
        if self.options.normalize_weights:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        active_TK = dispatched_assignments(self.options.second_expert_policy, weights_TK, self.training)
        return standard_routing(indices_TK, weights_TK, logits_TE, probs_TE, valid_T, active_TK)
