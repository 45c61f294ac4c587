"""The local dispatcher: every expert in this process.

Plans sort each token's assignments by expert (``dispatch.plans``); paths with a
routed form run token-choice plans from tokens to output in one pass, the others
get the gathered rows and hand back their outputs to the plan's combine.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import Tensor

from .base import Capacity, Dispatched, Dispatcher
from .plans import make_plan


class LocalDispatcher(Dispatcher):
    """Rows gathered and combined in this process; reports the router's own losses."""

    routed_forms = True

    def plan(self, routing, capacity: Capacity, path, x_TD=None):
        # The loop reference plans capacity the plain way, but only a routed form can run from such a plan.
        return make_plan(routing, capacity, reference=path.reference_plan and path.routed is not None)

    def fuses(self, path, plan) -> bool:
        return path.routed is not None and plan.token_choice

    def dispatch(self, x_TD: Tensor, plan) -> tuple[Tensor, Tensor]:
        return plan.gather(x_TD)

    def combine(self, y_RD: Tensor, plan, out_dtype: torch.dtype) -> Tensor:
        return plan.combine(y_RD, out_dtype)

    def report(self, routing, plan) -> tuple[Dispatched, Mapping[str, Tensor]]:
        return plan.dispatched(), routing.losses
