"""Noisy top-k gating (Shazeer et al. 2017, "Outrageously large neural networks").

H(x)_i = (x·W_g)_i + ε·softplus((x·W_noise)_i), ε ~ N(0, 1), in training only;
G(x) = softmax(KeepTopK(H(x), k)). Reports Shazeer's importance loss on G and
the smooth load estimator's CV² as the ``load`` loss.
Shapes: T tokens, D model dim, E experts, K experts per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import MoEConfig
from .base import Router, Routing
from .losses import (
    LazyDict,
    gates_from_topk,
    importance_loss,
    load_balancing_loss,
    load_loss,
    router_z_loss,
    smooth_load,
)


class NoisyTopKRouter(Router):
    def __init__(self, config: MoEConfig):
        super().__init__(config)
        # Zero init as in the paper: the noise starts at softplus(0) ≈ 0.69 per expert.
        self.noise_weight = nn.Parameter(torch.zeros(config.num_experts, config.d_model))

    def route(self, clean_TE: Tensor, x_TD: Tensor, valid_T: Tensor | None, **kwargs) -> Routing:
        noise_std_TE = F.softplus(x_TD @ self.noise_weight.to(x_TD.dtype).t())
        if self.training:
            noisy_TE = clean_TE + torch.randn_like(clean_TE) * noise_std_TE
        else:
            noisy_TE = clean_TE
        top_values_TK, indices_TK = noisy_TE.topk(self.top_k, dim=-1)
        weights_TK = top_values_TK.softmax(dim=-1)  # softmax over KeepTopK(H, k)
        gates_TE = gates_from_topk(indices_TK, weights_TK, self.num_experts)
        token_weight_T = None if valid_T is None else valid_T.float()
        return Routing(
            indices_TK=indices_TK,
            weights_TK=weights_TK,
            logits_TE=clean_TE,
            probs_TE=gates_TE,
            losses=LazyDict({
                "load_balance": lambda: load_balancing_loss(gates_TE, indices_TK, token_weight_T),
                "z_loss": lambda: router_z_loss(clean_TE, token_weight_T),
                "importance": lambda: importance_loss(gates_TE, token_weight_T),
                "load": lambda: load_loss(smooth_load(clean_TE, noisy_TE, noise_std_TE, self.top_k, token_weight_T)),
            }),
            valid_T=valid_T,
            active_TK=self.active_assignments(weights_TK),
        )
