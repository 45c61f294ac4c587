"""Expert-parallel dispatch: experts sharded by id over a ``torch.distributed`` group.

Rank p of an expert-parallel (EP) group of P ranks holds experts
[p·L, (p+1)·L), L = E/P. ``ExpertParallelDispatcher`` has the local dispatcher's
contract (``moekit.dispatch.base``) with an all-to-all between its steps:

1. plan: the local plan (any kind: token choice sorted by global expert id,
   expert choice, Soft MoE), so the rows are already grouped by destination
   rank; then an integer all-to-all of per-expert row counts, validated (gloo
   does not check that ranks agree on split sizes), with each rank's row and
   compute dtypes, which must agree (autocast on every rank or none);
2. dispatch: gather the rows, send them with ``all_to_all_single`` (uneven
   splits), regroup them from (source rank, expert) to (expert, source rank) order;
3. the layer runs the local experts on its compute path's rows form;
4. combine: undo the regrouping, send the results back, combine as locally.

Autograd flows through both all-to-alls. Every rank runs both backward
collectives whatever it routed, so a rank with no tokens does not hang the others.

``report`` sums over the group, in one all-reduce, the sums every weighted loss
of the router is a formula of (``moekit.routing.losses``) and the rows per
expert: an EP run reports the losses and loads of the single-process run on
the concatenated batch. ``kept_TK`` and ``num_dropped`` stay this rank's.

Shapes: T tokens on this rank, D model dim, E experts (global), L local experts
(E/P), P ranks in the EP group, R rows this rank routes, N rows this rank's
experts receive.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor

from ..compute.ops import permute_rows
from ..compute.precision import compute_dtype
from ..dispatch import Capacity, Dispatched, Dispatcher, make_plan
from ..routing.losses import LOSS_SUMS, losses_from_sums
from .collectives import (
    DTYPE_CODES,
    all_reduce_sum,
    all_to_all,
    all_to_all_rows,
    check_received_counts,
    check_same_dtypes,
    check_send_splits,
)
from .overlap import overlapped_exchange, plan_chunks, regroup_by_expert
from .replication import replica_experts, replicated_plan


@dataclass
class ExchangePlan:
    """The local plan and the exchange around it.

    Attributes:
        local: this rank's plan for its own tokens (rows by global expert id).
        send_splits, recv_splits: rows sent to / received from each rank.
        counts_L: rows each local expert receives, over all ranks.
        by_expert_N, by_source_N: the regrouping of received rows and its inverse.
        received_ND: the rows ``dispatch`` handed to the experts (set by it), so that
            ``combine`` can keep the backward all-to-all on this rank's graph whatever the
            experts return (an expert with no rows may return a fresh empty tensor).
    """

    local: object
    send_splits: list[int]
    recv_splits: list[int]
    counts_L: Tensor
    by_expert_N: Tensor | None  # None for the overlapped exchange: its chunks carry their own
    by_source_N: Tensor | None
    received_ND: Tensor | None = None
    chunks: list | None = None  # the overlapped exchange's chunks (moekit.parallel.overlap)


class ExpertParallelDispatcher(Dispatcher):
    """The dispatcher of one MoE layer whose experts are sharded over ``group``.

    Args:
        group: the EP process group; its size P must divide ``num_experts``.
        num_experts: E, over all ranks.
        global_losses: the losses the router reports as formulas of sums over tokens;
            ``report`` computes them over the global batch.
        loss_group: the ranks whose tokens make that batch (default: ``group``). With data
            parallelism over several EP groups, all ranks: the losses are then those of the
            single-process run on every rank's tokens.
        overlap_chunks: C > 1 exchanges the rows in C chunks, each chunk's all-to-all running
            behind the previous chunk's experts and the shared experts (``moekit.parallel.overlap``).
    """

    routed_forms = False

    def __init__(self, group, num_experts: int, global_losses: frozenset[str] = frozenset(), loss_group=None,
                 overlap_chunks: int = 1):
        self.group, self.num_experts, self.global_losses = group, num_experts, frozenset(global_losses)
        self.loss_group = group if loss_group is None else loss_group
        if isinstance(overlap_chunks, bool) or not isinstance(overlap_chunks, int) or overlap_chunks < 1:
            raise ValueError(f"overlap_chunks ({overlap_chunks!r}) must be a positive integer")
        self.overlap_chunks = overlap_chunks
        self.ep_size = dist.get_world_size(group)
        self.ep_rank = dist.get_rank(group)
        if num_experts % self.ep_size != 0:
            raise ValueError(
                f"num_experts ({num_experts}) must be divisible by the expert-parallel size ({self.ep_size})"
            )
        self.num_local = num_experts // self.ep_size
        self.first_expert = self.ep_rank * self.num_local
        # Hot-expert replicas (moekit.parallel.replication): the placement, the experts the replicas
        # copy, and the rows per expert routed since the placement was made (for re-planning).
        self.placement = self.replica_source = self.load_E = None
        self.track_load = False

    def replicate(self, experts, placement) -> None:
        """Hold ``placement``'s replicas of ``experts`` (this layer's experts); None: none."""
        if placement is not None:
            if (placement.num_experts, placement.ep_size) != (self.num_experts, self.ep_size):
                raise ValueError(f"the placement is for {placement.num_experts} experts over {placement.ep_size} "
                                 f"ranks; this layer has {self.num_experts} over {self.ep_size}")
            if self.overlap_chunks > 1:
                raise ValueError("hot-expert replication and the overlapped exchange do not combine yet: "
                                 "use overlap_chunks = 1 with replicas")
        self.placement, self.replica_source = placement, experts

    def __deepcopy__(self, memo) -> ExpertParallelDispatcher:
        # Process groups are shared handles, not copyable state.
        return ExpertParallelDispatcher(self.group, self.num_experts, self.global_losses, self.loss_group,
                                        self.overlap_chunks)

    def exchange_counts(self, counts_E: Tensor, dtypes: tuple[torch.dtype, torch.dtype] | None = None,
                        num_local: int | None = None) -> Tensor:
        """Integer all-to-all of per-expert row counts: (P, L) received from each rank.

        ``dtypes`` (the rows' dtype, the dtype the experts compute in) ride along and must
        be every rank's: rows of different dtypes cannot be exchanged (gloo would garble
        or abort)."""
        P, L = self.ep_size, num_local or self.num_local
        counts_PL = counts_E.view(P, L)
        codes = [DTYPE_CODES.index(d) if d in DTYPE_CODES else -1 for d in (dtypes or ())]
        extra = torch.tensor(codes, dtype=counts_PL.dtype, device=counts_PL.device).expand(P, len(codes))
        send_PC = torch.cat([counts_PL, counts_PL.sum(1, keepdim=True), extra], dim=1).contiguous()
        received_PC = torch.empty_like(send_PC)
        all_to_all(received_PC, send_PC, None, None, self.group, "all-to-all of row counts")
        if codes:
            check_same_dtypes(received_PC[:, L + 1:], codes, self.ep_rank)
        return check_received_counts(received_PC[:, :L + 1], self.ep_rank)

    def plan(self, routing, capacity: Capacity, path, x_TD: Tensor | None = None) -> ExchangePlan:
        P, L = self.ep_size, self.num_local
        if self.placement is None:
            local = make_plan(routing, capacity)  # rows must exist to be sent: never a reference plan
        else:  # each holder of an expert is a virtual expert: L' per rank, own experts first
            local, L = replicated_plan(routing, capacity, self.placement, self.ep_rank), self.placement.slots_per_rank
        dtypes = None if x_TD is None else (x_TD.dtype, compute_dtype(x_TD))
        recv_counts_PL = self.exchange_counts(local.counts_E, dtypes, L)
        # NOTE: .tolist() syncs with the device; the splits are host-side arguments of all_to_all_single.
        send_splits = local.counts_E.view(P, L).sum(1).tolist()
        recv_splits = recv_counts_PL.sum(1).tolist()
        if self.overlap_chunks > 1:  # each chunk is regrouped on its own; the whole exchange never is
            chunks = plan_chunks(local.counts_E.view(P, L), recv_counts_PL, self.overlap_chunks)
            return ExchangePlan(local, send_splits, recv_splits, recv_counts_PL.sum(0), None, None, chunks=chunks)
        return ExchangePlan(local, send_splits, recv_splits, recv_counts_PL.sum(0), *regroup_by_expert(recv_counts_PL))

    def exchange(self, x_TD: Tensor, plan: ExchangePlan, experts_rows, out_dtype: torch.dtype, side=None):
        if plan.chunks is not None:
            return overlapped_exchange(self, x_TD, plan, experts_rows, out_dtype, side)
        if self.placement is None:
            return super().exchange(x_TD, plan, experts_rows, out_dtype, side)
        x_ND, counts_Lr = self.dispatch(x_TD, plan)
        L = self.num_local
        own = int(counts_Lr[:L].sum())
        replicas, tie = replica_experts(self.replica_source, self.placement, self.group, self.ep_rank)
        y_own = experts_rows(x_ND[:own], counts_Lr[:L])
        y_ND = torch.cat([y_own, replicas(x_ND[own:], counts_Lr[L:]).to(y_own.dtype)]) + tie
        return self.combine(y_ND, plan, out_dtype), None if side is None else side()

    def dispatch(self, x_TD: Tensor, plan: ExchangePlan) -> tuple[Tensor, Tensor]:
        x_RD, _ = plan.local.gather(x_TD)
        if torch.is_grad_enabled() and not x_RD.requires_grad:
            # Every rank must run the backward all-to-all of rows, whether or not its own input needs a gradient.
            x_RD = x_RD.detach().requires_grad_()
        check_send_splits(plan.send_splits, x_RD.shape[0], self.ep_rank)
        x_ND = all_to_all_rows(x_RD, plan.send_splits, plan.recv_splits, self.group)
        plan.received_ND = permute_rows(x_ND, plan.by_expert_N, plan.by_source_N)
        return plan.received_ND, plan.counts_L

    def combine(self, y_ND: Tensor, plan: ExchangePlan, out_dtype: torch.dtype) -> Tensor:
        x_ND = plan.received_ND
        if x_ND is not None and x_ND.requires_grad:
            # Every rank must reach the backward all-to-all of its received rows, so their
            # gradient must flow back from the output: tie them in when the experts did not.
            if y_ND.shape[0] == 0:
                y_ND = y_ND + x_ND[:, :0].sum(1, keepdim=True)
            elif not y_ND.requires_grad:
                y_ND = y_ND + 0 * x_ND.sum()
        y_ND = permute_rows(y_ND, plan.by_source_N, plan.by_expert_N)
        y_RD = all_to_all_rows(y_ND, plan.recv_splits, plan.send_splits, self.group)
        return plan.local.combine(y_RD, out_dtype)

    def report(self, routing, plan: ExchangePlan) -> tuple[Dispatched, Mapping[str, Tensor]]:
        """Losses over the loss group's tokens, rows per expert over the EP group's."""
        E = self.num_experts
        local = plan.local.dispatched()
        names = [name for name in routing.losses if name in self.global_losses]
        sum_names = list(dict.fromkeys(s for name in names for s in LOSS_SUMS[name]))
        dtype = routing.probs_TE.dtype
        device = local.tokens_per_expert_E.device
        pieces = [torch.as_tensor(routing.sums[s], dtype=dtype, device=device).reshape(-1) for s in sum_names]
        sizes = [p.numel() for p in pieces]
        rows_E = local.tokens_per_expert_E.to(dtype)
        if self.placement is not None:  # rows per virtual expert → per expert
            rows_E = torch.zeros(E, dtype=dtype, device=device).index_add_(
                0, self.placement.expert_of_virtual(device), rows_E)
        if self.loss_group is self.group:  # one all-reduce
            *sums, processed_E = all_reduce_sum(torch.cat([*pieces, rows_E]), self.group).split([*sizes, E])
        else:
            sums = all_reduce_sum(torch.cat(pieces), self.loss_group).split(sizes) if pieces else []
            processed_E = all_reduce_sum(rows_E, self.group)
        shaped = {s: v.reshape(torch.as_tensor(routing.sums[s]).shape) for s, v in zip(sum_names, sums, strict=True)}
        losses = losses_from_sums(names, shaped, self.num_experts)
        if self.track_load and torch.is_grad_enabled():  # training batches only, not evaluation
            self.load_E = processed_E.detach() + (0 if self.load_E is None else self.load_E)
        return Dispatched(processed_E.detach().round().long(), local.kept_TK, local.num_dropped), losses
