"""Switch Transformer router (Fedus, Zoph & Shazeer 2021): top-1 with input jitter.

The input is multiplied by U(1−ε, 1+ε) in training (ε = ``router_jitter``, 0.01
by default); the combine weight is the chosen expert's softmax probability (not
renormalised, so the router learns from the task loss). Shapes: T tokens, D model
dim, E experts.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from .base import GateOptions, GateRouter
from .records import Routing
from .topk import STANDARD_LOSSES, standard_routing


@dataclass(kw_only=True)
class SwitchOptions(GateOptions):
    jitter: float = 0.01


class SwitchRouter(GateRouter):
    Options = SwitchOptions
    replayable = True
    default_top_k = 1
    top_k_fixed = True
    losses = STANDARD_LOSSES
    global_losses = frozenset(STANDARD_LOSSES)

    def route(self, logits_TE: Tensor, x_TD: Tensor, valid_T: Tensor | None, sequence_length) -> Routing:
        probs_TE = logits_TE.softmax(dim=-1)
        if self.replayed_TK is None:
            weights_TK, indices_TK = probs_TE.max(dim=-1, keepdim=True)
        else:
            indices_TK = self.choose(probs_TE, 1)
            weights_TK = probs_TE.gather(1, indices_TK)
        return standard_routing(indices_TK, weights_TK, logits_TE, probs_TE, valid_T)
