"""Dispatch plans: what a routing record means for the rows the experts see.

A plan is made from a routing record and the layer's capacity
(``make_plan``); the planner is chosen by the record's type
(``register_planner`` adds one). Every plan holds ``counts_E`` (rows per
expert) and answers the same three questions:

- ``gather(x_TD) -> (x_RD, counts_E)``: the rows grouped by expert, ``counts_E[e]``
  rows for expert e;
- ``combine(y_RD, out_dtype) -> y_TD``: the experts' rows back into one output per token;
- ``dispatched() -> Dispatched``: rows per expert, kept assignments, drops.

``TokenChoicePlan`` sorts each token's K assignments by expert (or, for the loop
reference, only decides which are kept, the plain way); ``ExpertChoicePlan``
takes each expert's C tokens; ``SoftPlan`` mixes each sequence's tokens into
slots. Only token-choice plans have routed forms (``token_choice``), which run
from the plan's fields directly.

Shapes: T tokens, D model dim, E experts, K experts per token, R routed rows,
C tokens per expert, G sequences, L tokens per sequence, S = E·P slots.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ..compute.ops import gather_tokens, permute_rows, weighted_sum
from ..compute.precision import without_autocast
from ..routing import ExpertChoiceRouting, Routing, SoftRouting
from .base import Capacity, Dispatched
from .capacity import reference_keep, sorted_assignments


@dataclass(frozen=True)
class TokenChoicePlan:
    """Each token's K assignments, the ones kept, and (sorted plans) their order by expert.

    Attributes:
        indices_TK, weights_TK: the routing's choice and combine weights.
        num_experts: E.
        kept_TK: assignments that reach an expert, or None when all do.
        num_dropped: assignments of real tokens dropped for capacity (0-dim long).
        order_R: flat assignment index (t·K + k) of each routed row, sorted by expert;
            None for a reference plan, which only decides what is kept.
        inverse_R: the inverse permutation of order_R when every assignment is routed.
        sorted_counts_E: rows per expert as the sort counted them (None for a reference
            plan, whose ``counts_E`` are counted when first read).
    """

    token_choice: ClassVar[bool] = True
    indices_TK: Tensor
    weights_TK: Tensor
    num_experts: int
    kept_TK: Tensor | None
    num_dropped: Tensor
    order_R: Tensor | None = None
    inverse_R: Tensor | None = None
    sorted_counts_E: Tensor | None = None

    @property
    def counts_E(self) -> Tensor:
        """Rows per expert (long); a reference plan counts them here (``Dispatched`` keeps them)."""
        if self.sorted_counts_E is not None:
            return self.sorted_counts_E
        flat_E = self.indices_TK.reshape(-1) if self.kept_TK is None else self.indices_TK[self.kept_TK]
        return torch.bincount(flat_E, minlength=self.num_experts)

    def gather(self, x_TD: Tensor) -> tuple[Tensor, Tensor]:
        if self.order_R is None:
            raise ValueError("a reference plan has no row order; plan with reference=False to gather rows")
        return gather_tokens(x_TD, self.order_R, self.indices_TK.shape[1], self.inverse_R), self.counts_E

    def combine(self, y_RD: Tensor, out_dtype: torch.dtype) -> Tensor:
        """y_t = Σ_k weights_TK·y for each token's kept assignments, in the weights' dtype."""
        weights_TK = self.weights_TK
        T, K = weights_TK.shape
        D = y_RD.shape[-1]
        if self.inverse_R is not None and y_RD.device.type == "cpu" and T > 0:
            # One pass on CPU: each token gathers its K rows and sums them weighted, with
            # no (T·K, D) un-permuted copy; forward + backward take half the time of
            # permute-then-multiply at the fine-grained shape (BENCHMARKS.md).
            y_TD = F.embedding_bag(self.inverse_R.view(T, K), y_RD.to(weights_TK.dtype),
                                   per_sample_weights=weights_TK, mode="sum")
            return y_TD.to(out_dtype)
        if self.inverse_R is not None:
            y_TKD = permute_rows(y_RD, self.inverse_R, self.order_R).view(T, K, D)
        else:
            y_TKD = y_RD.new_zeros(T * K, D).index_copy(0, self.order_R, y_RD).view(T, K, D)
        return weighted_sum(y_TKD, weights_TK, out_dtype)

    def dispatched(self) -> Dispatched:
        counts = self.sorted_counts_E if self.sorted_counts_E is not None else (lambda: self.counts_E)
        return Dispatched(counts, self.kept_TK, self.num_dropped)


def sorted_plan(indices_TK: Tensor, num_experts: int, weights_TK: Tensor | None = None, **capacity) -> TokenChoicePlan:
    """A sorted token-choice plan from the choice itself (``capacity``: the keyword
    arguments of ``capacity.sorted_assignments``); weights default to one."""
    order_R, counts_E, kept_TK, num_dropped, inverse_R = sorted_assignments(indices_TK, num_experts, **capacity)
    if weights_TK is None:
        weights_TK = torch.ones(indices_TK.shape, device=indices_TK.device)
    return TokenChoicePlan(indices_TK, weights_TK, num_experts, kept_TK, num_dropped, order_R, inverse_R, counts_E)


def plan_token_choice(routing: Routing, capacity: Capacity, reference: bool = False) -> TokenChoicePlan:
    """Sort the assignments by expert, applying capacity and padding; with ``reference``
    decide only which are kept, the plain way (for the loop reference paths)."""
    indices_TK, E = routing.indices_TK, routing.num_experts
    limit = capacity.per_expert
    priority_TK = routing.probs_TE.gather(1, indices_TK) if limit is not None else None
    if not reference:
        return sorted_plan(indices_TK, E, routing.weights_TK, capacity=limit, priority_TK=priority_TK,
                           drop_priority=capacity.drop_priority, valid_T=routing.valid_T,
                           active_TK=routing.active_TK, group_size=capacity.group_size)
    real_TK = routing.real_TK()
    kept_TK = real_TK
    if limit is not None:
        kept_TK = reference_keep(indices_TK, priority_TK, E, limit, capacity.drop_priority, routing.valid_T,
                                 routing.active_TK, capacity.group_size)
    if kept_TK is None:
        num_dropped = torch.zeros((), dtype=torch.long, device=indices_TK.device)
    else:
        num_dropped = (kept_TK.numel() if real_TK is None else real_TK.sum()) - kept_TK.sum()
    return TokenChoicePlan(indices_TK, routing.weights_TK, E, kept_TK, torch.as_tensor(num_dropped))


@dataclass(frozen=True)
class ExpertChoicePlan:
    """Each expert's C chosen tokens are its rows; y_t = Σ over the experts e that took t
    of weight·E_e(x_t)."""

    token_choice: ClassVar[bool] = False
    tokens_EC: Tensor
    weights_EC: Tensor
    valid_T: Tensor | None
    num_tokens: int

    @property
    def counts_E(self) -> Tensor:
        E, C = self.tokens_EC.shape
        return torch.full((E,), C, dtype=torch.long, device=self.tokens_EC.device)

    def gather(self, x_TD: Tensor) -> tuple[Tensor, Tensor]:
        return x_TD[self.tokens_EC.reshape(-1)], self.counts_E

    def combine(self, y_RD: Tensor, out_dtype: torch.dtype) -> Tensor:
        E, C = self.tokens_EC.shape
        weighted_RD = self.weights_EC.reshape(E * C, 1) * y_RD.to(self.weights_EC.dtype)
        y_TD = weighted_RD.new_zeros(self.num_tokens, y_RD.shape[1])
        return y_TD.index_add(0, self.tokens_EC.reshape(-1), weighted_RD).to(out_dtype)

    def dispatched(self) -> Dispatched:
        real_tokens_E = self.counts_E if self.valid_T is None else self.valid_T[self.tokens_EC].sum(1)
        return Dispatched(real_tokens_E, None, None)


@dataclass(frozen=True)
class SoftPlan:
    """Slots = dispatchᵀ·X per sequence are the rows (expert-major), Y = combine·Ỹ."""

    token_choice: ClassVar[bool] = False
    dispatch_GLS: Tensor
    combine_GLS: Tensor
    num_experts: int
    slots_per_expert: int

    @property
    def counts_E(self) -> Tensor:
        G = self.dispatch_GLS.shape[0]
        return torch.full((self.num_experts,), G * self.slots_per_expert, dtype=torch.long,
                          device=self.dispatch_GLS.device)

    def gather(self, x_TD: Tensor) -> tuple[Tensor, Tensor]:
        G, L, S = self.dispatch_GLS.shape
        E, P, D = self.num_experts, self.slots_per_expert, x_TD.shape[1]
        # Dispatch and combine are router math: float32 even under autocast.
        with without_autocast(x_TD.device.type):
            slots_GSD = self.dispatch_GLS.transpose(1, 2) @ x_TD.view(G, L, D).to(self.dispatch_GLS.dtype)
        slots_RD = slots_GSD.view(G, E, P, D).transpose(0, 1).reshape(E * G * P, D).to(x_TD.dtype)
        return slots_RD, self.counts_E

    def combine(self, y_RD: Tensor, out_dtype: torch.dtype) -> Tensor:
        G, L, S = self.combine_GLS.shape
        E, P, D = self.num_experts, self.slots_per_expert, y_RD.shape[1]
        y_GSD = y_RD.view(E, G, P, D).transpose(0, 1).reshape(G, S, D).to(self.combine_GLS.dtype)
        with without_autocast(y_RD.device.type):
            y_TD = (self.combine_GLS @ y_GSD).reshape(G * L, D)
        return y_TD.to(out_dtype)

    def dispatched(self) -> Dispatched:
        return Dispatched(self.counts_E, None, None)


Planner = Callable[..., object]
PLANNERS: dict[type, Planner] = {
    Routing: plan_token_choice,
    ExpertChoiceRouting: lambda routing, capacity, reference=False: ExpertChoicePlan(
        routing.tokens_EC, routing.weights_EC, routing.valid_T, routing.num_tokens),
    SoftRouting: lambda routing, capacity, reference=False: SoftPlan(
        routing.dispatch_GLS, routing.combine_GLS, routing.num_experts, routing.slots_per_expert),
}


def register_planner(record_type: type, planner: Planner) -> Planner:
    """Plan records of ``record_type`` with ``planner(routing, capacity, reference=False)``."""
    PLANNERS[record_type] = planner
    return planner


def make_plan(routing, capacity: Capacity, reference: bool = False):
    """The plan for ``routing``'s record type."""
    for record_type in type(routing).__mro__:
        if record_type in PLANNERS:
            return PLANNERS[record_type](routing, capacity, reference)
    raise TypeError(f"no dispatch plan for {type(routing).__name__}; register one with register_planner")
