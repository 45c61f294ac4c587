"""Switch Transformer router (Fedus, Zoph & Shazeer 2021): top-1 with input jitter.

The input is multiplied by U(1−ε, 1+ε) in training; the combine weight is the
chosen expert's softmax probability (not renormalised, so the router learns
from the task loss). Shapes: T tokens, D model dim, E experts.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .base import Router, Routing


class SwitchRouter(Router):
    def router_input(self, x_TD: Tensor) -> Tensor:
        eps = self.config.router_jitter
        if self.training and eps > 0:
            return x_TD * torch.empty_like(x_TD).uniform_(1.0 - eps, 1.0 + eps)
        return x_TD

    def route(self, logits_TE: Tensor, x_TD: Tensor, valid_T: Tensor | None, **kwargs) -> Routing:
        probs_TE = logits_TE.softmax(dim=-1)
        weights_TK, indices_TK = probs_TE.max(dim=-1, keepdim=True)
        return Routing.with_standard_losses(
            indices_TK=indices_TK,
            weights_TK=weights_TK,
            logits_TE=logits_TE,
            probs_TE=probs_TE,
            valid_T=valid_T,
        )
