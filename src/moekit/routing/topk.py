"""Top-k softmax router (GShard, Mixtral, Qwen-MoE).

p(x) = softmax(x·W_g) over all E experts; keep the K largest; optionally
renormalise the K weights to sum to one (Mixtral) or keep them raw (Qwen option).
Shapes: T tokens, D model dim, E experts, K experts per token.
"""

from __future__ import annotations

from torch import Tensor

from .base import Router, Routing


def topk_weights(probs_TE: Tensor, top_k: int, normalize: bool) -> tuple[Tensor, Tensor]:
    """The K largest probabilities and their experts, renormalised if asked."""
    weights_TK, indices_TK = probs_TE.topk(top_k, dim=-1)
    if normalize:
        weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
    return weights_TK, indices_TK


class TopKRouter(Router):
    def route(self, logits_TE: Tensor, x_TD: Tensor, valid_T: Tensor | None, **kwargs) -> Routing:
        probs_TE = logits_TE.softmax(dim=-1)
        weights_TK, indices_TK = topk_weights(probs_TE, self.top_k, self.config.normalize_weights)
        return Routing.with_standard_losses(
            indices_TK=indices_TK,
            weights_TK=weights_TK,
            logits_TE=logits_TE,
            probs_TE=probs_TE,
            valid_T=valid_T,
            active_TK=self.active_assignments(weights_TK),
        )
