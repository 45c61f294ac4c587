"""Noisy top-k gating (Shazeer et al. 2017, "Outrageously large neural networks").

H(x)_i = (x·W_g)_i + ε·softplus((x·W_noise)_i), ε ~ N(0, 1), in training only;
G(x) = softmax(KeepTopK(H(x), k)). Reports Shazeer's importance loss on G and
the smooth load estimator's CV² as the ``load`` loss.
Shapes: T tokens, D model dim, E experts, K experts per token.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import GateOptions, GateRouter
from .gshard import dispatched_assignments
from .losses import gates_from_topk, lazy_losses, smooth_load, standard_sums
from .records import Routing
from .topk import STANDARD_LOSSES, check_second_expert_policy


@dataclass(kw_only=True)
class NoisyTopKOptions(GateOptions):
    """Args:
        second_expert_policy: as ``TopKOptions.second_expert_policy``.
    """

    second_expert_policy: str = "all"

    def validate(self, *, num_experts: int, top_k: int) -> None:
        super().validate(num_experts=num_experts, top_k=top_k)
        check_second_expert_policy(self.second_expert_policy, top_k)


class NoisyTopKRouter(GateRouter):
    Options = NoisyTopKOptions
    growable = True
    replayable = True
    losses = STANDARD_LOSSES
    global_losses = frozenset(STANDARD_LOSSES)

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        # Zero init as in the paper: the noise starts at softplus(0) ≈ 0.69 per expert.
        self.noise_weight = nn.Parameter(torch.zeros(self.num_experts, self.d_model))

    def route(self, clean_TE: Tensor, x_TD: Tensor, valid_T: Tensor | None, sequence_length) -> Routing:
        noise_std_TE = F.softplus(x_TD @ self.noise_weight.to(x_TD.dtype).t())
        noisy_TE = clean_TE + torch.randn_like(clean_TE) * noise_std_TE if self.training else clean_TE
        indices_TK = self.choose(noisy_TE, self.top_k)
        top_values_TK = noisy_TE.gather(1, indices_TK)
        weights_TK = top_values_TK.softmax(dim=-1)  # softmax over KeepTopK(H, k)
        gates_TE = gates_from_topk(indices_TK, weights_TK, self.num_experts)
        token_weight_T = None if valid_T is None else valid_T.to(clean_TE.dtype)
        sums = standard_sums(
            clean_TE, gates_TE, indices_TK, weights_TK, token_weight_T,
            load_E=lambda: smooth_load(clean_TE, noisy_TE, noise_std_TE, self.top_k, token_weight_T),
        )
        return Routing(
            indices_TK=indices_TK, weights_TK=weights_TK, logits_TE=clean_TE, probs_TE=gates_TE, sums=sums,
            losses=lazy_losses(STANDARD_LOSSES, sums, self.num_experts), valid_T=valid_T,
            active_TK=dispatched_assignments(self.options.second_expert_policy, weights_TK, self.training),
        )
