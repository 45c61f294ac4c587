"""The dispatcher contract, and the records it reads and writes.

A dispatcher turns a routing record into rows grouped by expert and back:

- ``plan(routing, capacity, path, x_TD) -> plan``: what goes where (``dispatch.plans``;
  ``x_TD``, the tokens, for dispatchers that must agree on them with others),
  with capacity applied;
- ``fuses(path, plan) -> bool``: whether ``path``'s routed form can run this plan
  here, from tokens to combined output with no (R, D) rows (never when the class
  says ``routed_forms = False``);
- ``dispatch(x_TD, plan) -> (x_RD, counts_E)``: the rows the experts held here
  compute, grouped by expert;
- ``combine(y_RD, plan, out_dtype) -> y_TD``: their outputs back into one per token;
- ``report(routing, plan) -> (Dispatched, losses)``: rows per expert, kept and
  dropped assignments, and the losses to weigh (the router's, or, under expert
  parallelism, those of the global batch). Collective for dispatchers that span
  processes: every rank calls it once per forward.

``LocalDispatcher`` (``dispatch.local``) keeps everything in the process;
``moekit.parallel.ExpertParallelDispatcher`` adds an all-to-all between the steps.
The experts never know which one ran.

Shapes: T tokens, D model dim, E experts, K experts per token, R rows.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Capacity:
    """How many assignments each expert may keep.

    Attributes:
        per_expert: assignments per expert (per group), None: dropless.
        group_size: consecutive tokens capacity applies to (one sequence, as Switch
            Transformers does), None: all the tokens of the call.
        drop_priority: ``probability`` (highest router probability first) or
            ``position`` (first choices before second, earlier tokens first).
    """

    per_expert: int | None = None
    group_size: int | None = None
    drop_priority: str = "probability"


DROPLESS = Capacity()


class Dispatched:
    """What dispatch made of a routing record, made once by the dispatcher.

    Attributes:
        tokens_per_expert_E: rows each expert processed (assignments, tokens or slots;
            under expert parallelism, summed over the ranks of the group). A plan that
            did not need them counts them when first read (a decoding step never does).
        kept_TK: token-choice assignments that reached an expert, or None when all did
            (or the plan is not token choice).
        num_dropped: assignments of real tokens dropped for capacity (this process's),
            or None when the plan drops nothing by construction.
    """

    __slots__ = ("_tokens_per_expert_E", "kept_TK", "num_dropped")

    def __init__(self, tokens_per_expert_E: Tensor | Callable[[], Tensor], kept_TK: Tensor | None,
                 num_dropped: Tensor | None):
        self._tokens_per_expert_E = tokens_per_expert_E
        self.kept_TK, self.num_dropped = kept_TK, num_dropped

    @property
    def tokens_per_expert_E(self) -> Tensor:
        if not isinstance(self._tokens_per_expert_E, Tensor):
            self._tokens_per_expert_E = self._tokens_per_expert_E()
        return self._tokens_per_expert_E

    def __repr__(self) -> str:
        return (f"Dispatched(tokens_per_expert_E={self.tokens_per_expert_E!r}, kept_TK={self.kept_TK!r}, "
                f"num_dropped={self.num_dropped!r})")


class Dispatcher:
    """Base class of dispatchers; see the module docstring for the contract.

    ``routed_forms``: whether this dispatcher can run compute paths' routed forms at all
    (it holds the tokens and every expert in one process)."""

    routed_forms: bool = False

    def plan(self, routing, capacity: Capacity, path, x_TD: Tensor | None = None):
        raise NotImplementedError

    def fuses(self, path, plan) -> bool:
        return False

    def dispatch(self, x_TD: Tensor, plan) -> tuple[Tensor, Tensor]:
        raise NotImplementedError

    def combine(self, y_RD: Tensor, plan, out_dtype: torch.dtype) -> Tensor:
        raise NotImplementedError

    def exchange(self, x_TD: Tensor, plan, experts_rows, out_dtype: torch.dtype,
                 side=None) -> tuple[Tensor, Tensor | None]:
        """dispatch → ``experts_rows(x_RD, counts_E)`` → combine. ``side()`` (the shared experts)
        runs where a dispatcher can hide its communication behind it (expert parallelism with
        overlap). Returns (y_TD, what ``side`` returned, or None)."""
        x_RD, counts_E = self.dispatch(x_TD, plan)
        y_TD = self.combine(experts_rows(x_RD, counts_E), plan, out_dtype)
        return y_TD, None if side is None else side()

    def report(self, routing, plan) -> tuple[Dispatched, Mapping[str, Tensor]]:
        raise NotImplementedError
