"""Dense softmax gate of the classic mixture (Jacobs, Jordan, Nowlan & Hinton 1991).

g(x) = softmax(x·W_g) over all E experts; every expert sees every token and
y = Σ_i g_i(x)·E_i(x). Shapes: T tokens, D model dim, E experts.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Router, Routing


class SoftmaxRouter(Router):
    def route(self, logits_TE: Tensor, x_TD: Tensor, valid_T: Tensor | None, **kwargs) -> Routing:
        probs_TE = logits_TE.softmax(dim=-1)
        T, E = probs_TE.shape
        indices_TK = torch.arange(E, device=logits_TE.device).expand(T, E)
        weights_TK = probs_TE
        return Routing.with_standard_losses(
            indices_TK=indices_TK,
            weights_TK=weights_TK,
            logits_TE=logits_TE,
            probs_TE=probs_TE,
            valid_T=valid_T,
        )
