"""Sigmoid gates with auxiliary-loss-free balancing (DeepSeek-V3, 2024).

Affinity s_ti = sigmoid(x_t·w_i). Experts are chosen by the top K of s + b,
b a per-expert bias that balancing moves; the gate uses s alone:
g_ti = s_ti / Σ_{selected j} s_tj (or s_ti unnormalised), times the routed
scaling factor. The bias never enters a gate value.

- Group-limited routing: the E experts form G equal groups; a group scores the
  sum of its two best (s + b); each token keeps the top M groups and picks its K
  experts inside them.
- Auxiliary-loss-free balancing: training forwards accumulate each expert's
  load; ``update_bias()`` (once per optimizer step, or from the hook that
  ``attach_bias_updates`` registers) applies b_i += γ·sign(mean load − load_i)
  and resets the count. Eval forwards count nothing, so they move nothing.
- Sequence-wise balance loss, reported as ``sequence_balance``:
  L = mean over sequences of Σ_i f_i·P_i, f_i = (E/(K·L))·Σ_t 1[i selected for t],
  P_i = (1/L)·Σ_t s'_ti with s' = s normalised over all experts. No
  ``load_balance`` loss is reported: balancing is the bias's job. As sums: the
  per-sequence values summed, and the number of non-empty sequences.

Shapes: T tokens, D model dim, E experts, K experts per token, G expert groups
(or sequences, in the loss), L tokens per sequence.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .base import GateOptions, GateRouter, check_bool, check_number, check_positive_int
from .losses import lazy_losses
from .records import LazyMapping, Routing


@dataclass(kw_only=True)
class SigmoidOptions(GateOptions):
    """Args:
        normalize_weights: divide each token's K gates by their sum (DeepSeek-V3).
        num_expert_groups: experts form this many equal groups (group-limited routing); 1 disables it.
        topk_groups: groups kept per token (None: all groups).
        routed_scaling_factor: multiplies the routed gates.
        bias_update_rate: step γ of the auxiliary-loss-free bias update b_i += γ·sign(mean load − load_i).
        outside_group_score: the choice score of experts outside a token's kept groups;
            None: −∞ (never chosen, so top_k ≤ topk_groups · experts per group). transformers'
            DeepSeek-V3 uses 0, so top_k above that picks some of them (converted models set it).
    """

    normalize_weights: bool = True
    num_expert_groups: int = 1
    topk_groups: int | None = None
    routed_scaling_factor: float = 1.0
    bias_update_rate: float = 0.001
    outside_group_score: float | None = None

    def validate(self, *, num_experts: int, top_k: int) -> None:
        super().validate(num_experts=num_experts, top_k=top_k)
        check_bool("normalize_weights", self.normalize_weights)
        check_positive_int("num_expert_groups", self.num_expert_groups)
        groups = self.num_expert_groups
        if num_experts % groups:
            raise ValueError(f"num_experts ({num_experts}) must be divisible by num_expert_groups ({groups})")
        kept = self.kept_groups
        if isinstance(kept, bool) or not isinstance(kept, int) or not 1 <= kept <= groups:
            raise ValueError(f"topk_groups ({self.topk_groups!r}) must be an int in [1, {groups}]")
        reachable = kept * (num_experts // groups)
        if self.outside_group_score is not None:
            check_number("outside_group_score", self.outside_group_score, low=-math.inf)
        elif top_k > reachable:
            raise ValueError(f"top_k ({top_k}) must be <= topk_groups · experts per group ({reachable}), or set "
                             "outside_group_score (the score of experts outside the kept groups) to choose among them")
        check_number("routed_scaling_factor", self.routed_scaling_factor, low_inclusive=False)
        check_number("bias_update_rate", self.bias_update_rate)

    @property
    def kept_groups(self) -> int:
        return self.num_expert_groups if self.topk_groups is None else self.topk_groups


def limit_to_top_groups(scores_TE: Tensor, num_groups: int, keep_groups: int,
                        outside_score: float | None = None) -> Tensor:
    """Scores of experts outside each token's ``keep_groups`` best groups set to
    ``outside_score`` (None: −inf).

    A group's score is the sum of its two best expert scores (its one score when
    a group holds a single expert).
    """
    T, E = scores_TE.shape
    scores_TGX = scores_TE.view(T, num_groups, E // num_groups)
    best = min(2, E // num_groups)
    group_score_TG = scores_TGX.topk(best, dim=-1).values.sum(dim=-1)
    kept_groups_TM = group_score_TG.topk(keep_groups, dim=-1).indices
    keep_TG = torch.zeros_like(group_score_TG, dtype=torch.bool).scatter_(1, kept_groups_TM, True)
    fill = float("-inf") if outside_score is None else outside_score
    return scores_TGX.masked_fill(~keep_TG[:, :, None], fill).view(T, E)


def sequence_balance_sums(
    norm_affinity_TE: Tensor,
    indices_TK: Tensor,
    sequence_length: int | None = None,
    token_weight_T: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """DeepSeek-V3's sequence-wise balance, Σ_i f_i·P_i, summed over the non-empty sequences;
    and their number.

    Tokens are taken as consecutive sequences of ``sequence_length`` (None: one
    sequence). Padding (weight 0) counts nowhere.
    """
    T, E = norm_affinity_TE.shape
    K = indices_TK.shape[1]
    L = T if sequence_length is None else sequence_length
    if L < 1 or T % L != 0:
        raise ValueError(f"sequence_length ({sequence_length}) must divide the number of tokens ({T})")
    w_T = (
        torch.ones(T, device=indices_TK.device, dtype=norm_affinity_TE.dtype)
        if token_weight_T is None
        else token_weight_T.to(norm_affinity_TE.dtype)
    )
    selected_TE = torch.zeros_like(norm_affinity_TE).scatter_(1, indices_TK, 1.0)
    G = T // L
    w_GL = w_T.view(G, L)
    n_G = w_GL.sum(1)
    n_safe_G = n_G.clamp_min(1.0)
    f_GE = (E / K) * (selected_TE.view(G, L, E) * w_GL[..., None]).sum(1) / n_safe_G[:, None]
    P_GE = (norm_affinity_TE.view(G, L, E) * w_GL[..., None]).sum(1) / n_safe_G[:, None]
    return (f_GE * P_GE).sum(), (n_G > 0).sum().to(norm_affinity_TE.dtype)


def sequence_balance_loss(
    norm_affinity_TE: Tensor,
    indices_TK: Tensor,
    sequence_length: int | None = None,
    token_weight_T: Tensor | None = None,
) -> Tensor:
    """DeepSeek-V3's sequence-wise balance loss, Σ_i f_i·P_i averaged over sequences.

    Equals 1 under uniform routing and E/K when every token puts all its mass on
    the same K experts.
    """
    total, sequences = sequence_balance_sums(norm_affinity_TE, indices_TK, sequence_length, token_weight_T)
    return total / sequences.clamp_min(1)


class SigmoidRouter(GateRouter):
    Options = SigmoidOptions
    replayable = True
    losses = ("sequence_balance",)
    global_losses = frozenset(losses)

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        # The balancing bias is state, not a parameter: no gradient ever reaches it.
        self.register_buffer("expert_bias_E", torch.zeros(self.num_experts))
        # Counted as integers, so that casting the model to a low precision leaves them exact.
        self.register_buffer(
            "load_since_update_E", torch.zeros(self.num_experts, dtype=torch.long), persistent=False
        )

    def _apply(self, fn, recurse=True):
        bias_E = self.expert_bias_E
        super()._apply(fn, recurse)
        if self.expert_bias_E.dtype in (torch.float16, torch.bfloat16):
            # Steps of γ = 0.001 vanish in bfloat16 near typical bias values: keep float32.
            self.expert_bias_E = bias_E.to(device=self.expert_bias_E.device, dtype=torch.float32)
        return self

    def route(self, logits_TE: Tensor, x_TD: Tensor, valid_T: Tensor | None, sequence_length) -> Routing:
        o = self.options
        affinity_TE = logits_TE.sigmoid()
        choice_TE = affinity_TE.detach() + self.expert_bias_E.to(affinity_TE.dtype)
        if o.kept_groups < o.num_expert_groups:
            choice_TE = limit_to_top_groups(choice_TE, o.num_expert_groups, o.kept_groups, o.outside_group_score)
        indices_TK = self.choose(choice_TE, self.top_k)
        selected_TK = affinity_TE.gather(1, indices_TK)
        if o.normalize_weights:
            selected_TK = selected_TK / selected_TK.sum(dim=-1, keepdim=True)
        weights_TK = selected_TK * o.routed_scaling_factor
        norm_affinity_TE = affinity_TE / affinity_TE.sum(dim=-1, keepdim=True)
        token_weight_T = None if valid_T is None else valid_T.to(affinity_TE.dtype)
        if self.training:
            self._count_load(indices_TK, valid_T)

        # One computation gives both sums.
        balance = functools.cache(
            lambda: sequence_balance_sums(norm_affinity_TE, indices_TK, sequence_length, token_weight_T))
        sums = LazyMapping({"sequence_balance": lambda: balance()[0], "sequences": lambda: balance()[1]})
        return Routing(
            indices_TK=indices_TK, weights_TK=weights_TK, logits_TE=logits_TE, probs_TE=norm_affinity_TE,
            sums=sums, losses=lazy_losses(self.losses, sums, self.num_experts), valid_T=valid_T,
        )

    @torch.no_grad()
    def _count_load(self, indices_TK: Tensor, valid_T: Tensor | None) -> None:
        ones_TK = torch.ones_like(indices_TK)
        if valid_T is not None:
            ones_TK = ones_TK * valid_T[:, None]
        self.load_since_update_E.scatter_add_(0, indices_TK.reshape(-1), ones_TK.reshape(-1))

    @torch.no_grad()
    def update_bias(self) -> None:
        """b_i += γ·sign(mean load − load_i) over the loads counted since the last call.

        Call once per optimizer step. With nothing counted (eval, or a second
        call) every sign is zero and the bias stays put.
        """
        load_E = self.load_since_update_E
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # Every data-parallel rank must move its bias the same way.
            torch.distributed.all_reduce(load_E)
        load_E = load_E.to(self.expert_bias_E.dtype)
        self.expert_bias_E += self.options.bias_update_rate * torch.sign(load_E.mean() - load_E)
        self.load_since_update_E.zero_()

    def extra_repr(self) -> str:
        o = self.options
        return (
            f"{super().extra_repr()}, groups={o.num_expert_groups}, topk_groups={o.kept_groups}, "
            f"routed_scaling_factor={o.routed_scaling_factor}, bias_update_rate={o.bias_update_rate}"
        )


def update_router_biases(model: nn.Module) -> None:
    """``update_bias()`` on every sigmoid router inside ``model``."""
    for module in model.modules():
        if isinstance(module, SigmoidRouter):
            module.update_bias()


def attach_bias_updates(model: nn.Module, optimizer: torch.optim.Optimizer):
    """Update the balancing biases of ``model``'s sigmoid routers after every
    ``optimizer.step()``. Returns the hook handle (``.remove()`` detaches it)."""
    return optimizer.register_step_post_hook(lambda opt, args, kwargs: update_router_biases(model))
