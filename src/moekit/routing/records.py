"""The records routers return. A router makes its record once; nobody rewrites it.

Token-choice routers (each token picks K experts) return ``Routing``. Expert
choice (each expert picks C tokens) returns ``ExpertChoiceRouting`` and Soft MoE
(each expert processes P soft slots per sequence) returns ``SoftRouting``: they
do not fit the top-k fields, so they get records of their own. What dispatch
makes of a record (tokens per expert, kept assignments, drops) is dispatch's
own record (``moekit.dispatch.Dispatched``).

Each record carries ``sums``: named sums over the batch's real tokens (per
expert, or scalars), and ``losses``: the auxiliary losses by name, each a
formula of those sums (``routing.losses``). Both are lazy: a loss nobody weighs
or reads costs nothing. Expert parallelism sums the sums over ranks to get the
losses of the global batch.

Shapes: T tokens, D model dim, E experts, K experts per token, C tokens per
expert (expert choice), G sequences, L tokens per sequence, S = E·P slots per
sequence (Soft MoE).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field

import torch
from torch import Tensor


class LazyMapping(Mapping):
    """A read-only mapping whose values are computed on first access and kept.

    Routers report every loss by name and the layer every statistic, but a call
    needs only the losses with a nonzero coefficient: the rest cost nothing unless read.
    """

    def __init__(self, thunks: Mapping[str, Callable[[], Tensor]]):
        self._thunks = thunks
        self._values: dict[str, Tensor] = {}

    def __getitem__(self, name: str) -> Tensor:
        value = self._values.get(name)
        if value is None:
            value = self._values[name] = self._compute(name)
        return value

    def _compute(self, name: str) -> Tensor:
        """The value of ``name``; subclasses that compute every name in one method override this."""
        return self._thunks[name]()

    def __iter__(self) -> Iterator[str]:
        return iter(self._thunks)

    def __len__(self) -> int:
        return len(self._thunks)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({dict(self)!r})"




def real_assignments_TK(indices_TK: Tensor, valid_T: Tensor | None, active_TK: Tensor | None) -> Tensor | None:
    """Which assignments belong to real tokens and were dispatched by the router (T, K),
    bool; None when all of them were."""
    if valid_T is None and active_TK is None:
        return None
    real_TK = torch.ones_like(indices_TK, dtype=torch.bool) if active_TK is None else active_TK
    if valid_T is not None:
        real_TK = real_TK & valid_T[:, None]
    return real_TK


class _Record:
    """What every routing record answers, whatever its fields."""

    @property
    def num_tokens(self) -> int:
        return self.probs_TE.shape[0]

    @property
    def num_experts(self) -> int:
        return self.probs_TE.shape[1]


@dataclass(frozen=True)
class Routing(_Record):
    """What a token-choice router decided for a batch of T tokens.

    Attributes:
        indices_TK: chosen expert ids (long).
        weights_TK: combine weights (float32; float64 for float64 input).
        logits_TE: router logits (float32 or float64, as weights_TK); None for routers
            without learned logits (hash, forced routing).
        probs_TE: router probabilities that the balancing losses and statistics use.
        sums: named sums over real tokens that the losses are formulas of.
        losses: each auxiliary loss by name, unweighted.
        valid_T: mask of real (non-padding) tokens, or None when all are real.
        active_TK: assignments the router chose to dispatch, or None when all are
            (GShard's random second expert declines some; declined ones are not drops).
    """

    indices_TK: Tensor
    weights_TK: Tensor
    logits_TE: Tensor | None
    probs_TE: Tensor
    sums: Mapping[str, Tensor] = field(default_factory=dict)
    losses: Mapping[str, Tensor] = field(default_factory=dict)
    valid_T: Tensor | None = None
    active_TK: Tensor | None = None

    def real_TK(self) -> Tensor | None:
        """Assignments of real tokens that the router dispatched; None when all are."""
        return real_assignments_TK(self.indices_TK, self.valid_T, self.active_TK)

    def num_real_assignments(self) -> Tensor:
        real_TK = self.real_TK()
        if real_TK is None:
            return torch.tensor(float(self.indices_TK.numel()), device=self.indices_TK.device)
        return real_TK.sum().float()

    def unreached_T(self, kept_TK: Tensor | None) -> Tensor:
        """Tokens none of whose assignments reached an expert (T,), bool."""
        reached_TK = kept_TK if kept_TK is not None else self.active_TK
        if reached_TK is None:
            return torch.zeros(self.num_tokens, dtype=torch.bool, device=self.indices_TK.device)
        return ~reached_TK.any(dim=1)


@dataclass(frozen=True)
class ExpertChoiceRouting(_Record):
    """Expert choice: each expert took the C tokens it scored highest.

    A token may be taken by zero, one or many experts.

    Attributes:
        tokens_EC: token ids each expert took, best first (long).
        weights_EC: combine weight of each (expert, token) pair: the router probability.
        logits_TE, probs_TE: router logits and softmax over experts (float32 or float64).
        sums, losses: as ``Routing``.
        valid_T: mask of real tokens, or None. Padding is never taken by an expert
            while real tokens remain; when it is, its weight is zero.
    """

    tokens_EC: Tensor
    weights_EC: Tensor
    logits_TE: Tensor
    probs_TE: Tensor
    sums: Mapping[str, Tensor] = field(default_factory=dict)
    losses: Mapping[str, Tensor] = field(default_factory=dict)
    valid_T: Tensor | None = None

    @property
    def capacity(self) -> int:
        return self.tokens_EC.shape[1]

    def experts_per_token(self) -> Tensor:
        """How many experts took each token (T,), long; padding counts zero."""
        taken_R = self.tokens_EC.reshape(-1)
        counts_T = torch.zeros(self.num_tokens, dtype=torch.long, device=taken_R.device)
        counts_T.scatter_add_(0, taken_R, torch.ones_like(taken_R))
        if self.valid_T is not None:
            counts_T = counts_T * self.valid_T
        return counts_T

    def num_real_assignments(self) -> Tensor:
        return self.experts_per_token().sum().float()

    def unreached_T(self, kept_TK: Tensor | None) -> Tensor:
        return self.experts_per_token() == 0


@dataclass(frozen=True)
class SoftRouting(_Record):
    """Soft MoE: every expert processes P slots per sequence, each slot a convex
    combination of the sequence's tokens; each token's output is a convex
    combination of the slots' outputs.

    Attributes:
        dispatch_GLS: dispatch weights, softmax over a sequence's tokens (columns sum to one).
        combine_GLS: combine weights, softmax over slots (rows sum to one).
        logits_GLS: slot logits.
        probs_TE: each token's combine mass on each expert (its P slots summed),
            flattened over sequences.
        slots_per_expert: P.
        sums, losses: as ``Routing`` (none: Soft MoE needs no balancing).
        valid_T: mask of real tokens, or None; padding neither feeds slots nor
            receives output.
    """

    dispatch_GLS: Tensor
    combine_GLS: Tensor
    logits_GLS: Tensor
    probs_TE: Tensor
    slots_per_expert: int
    sums: Mapping[str, Tensor] = field(default_factory=dict)
    losses: Mapping[str, Tensor] = field(default_factory=dict)
    valid_T: Tensor | None = None

    def num_real_assignments(self) -> Tensor:
        return torch.tensor(float(self.num_tokens), device=self.probs_TE.device)

    def unreached_T(self, kept_TK: Tensor | None) -> Tensor:
        return torch.zeros(self.num_tokens, dtype=torch.bool, device=self.probs_TE.device)


AnyRouting = Routing | ExpertChoiceRouting | SoftRouting


def with_added_sums(record, offset: Mapping[str, Tensor], global_losses, formulas) -> object:
    """The record with ``offset`` added to its sums, and its global losses recomputed from
    them by ``formulas(names, sums, E)`` (gradient accumulation over micro-batches)."""
    import dataclasses

    own = record.sums
    sums = LazyMapping({name: (lambda n=name: own[n] + offset[n].to(torch.as_tensor(own[n]).device)
                               if n in offset else own[n]) for name in own})
    E = record.num_experts
    losses = LazyMapping({name: (lambda n=name: formulas([n], sums, E)[n] if n in global_losses
                                 else record.losses[n]) for name in record.losses})
    return dataclasses.replace(record, sums=sums, losses=losses)
