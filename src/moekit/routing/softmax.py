"""Dense softmax gate of the classic mixture (Jacobs, Jordan, Nowlan & Hinton 1991).

g(x) = softmax(x·W_g) over all E experts; every expert sees every token and
y = Σ_i g_i(x)·E_i(x). Shapes: T tokens, D model dim, E experts.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import GateRouter
from .records import Routing
from .topk import STANDARD_LOSSES, standard_routing


class SoftmaxRouter(GateRouter):
    default_top_k = None  # every expert
    top_k_fixed = True
    losses = STANDARD_LOSSES
    global_losses = frozenset(STANDARD_LOSSES)

    def route(self, logits_TE: Tensor, x_TD: Tensor, valid_T: Tensor | None, sequence_length) -> Routing:
        probs_TE = logits_TE.softmax(dim=-1)
        T, E = probs_TE.shape
        indices_TK = torch.arange(E, device=logits_TE.device).expand(T, E)
        return standard_routing(indices_TK, probs_TE, logits_TE, probs_TE, valid_T)
