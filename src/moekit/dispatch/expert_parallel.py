"""Expert-parallel dispatch: experts sharded by id over a ``torch.distributed`` group.

Rank p of an expert-parallel (EP) group of P ranks holds experts
[p·L, (p+1)·L), L = E/P. Each forward step, on every rank:

1. plan locally (the local dispatcher's sort by global expert id), so routed
   rows are already grouped by destination rank;
2. exchange per-expert row counts with an integer all-to-all and validate them
   (gloo does not check that ranks agree on split sizes);
3. send rows with ``all_to_all_single`` (uneven splits), regroup them from
   (source rank, expert) order to (expert, source rank) order;
4. run the local experts on the layer's compute path;
5. undo the regrouping, send results back, combine in float32 as locally.

Autograd flows through both all-to-alls: the backward of an all-to-all is the
all-to-all with send and receive splits swapped. Every rank runs both backward
collectives whatever it routed, so a rank with no tokens does not hang the others.

The balancing losses and load statistics are recomputed over the global batch
from per-expert sums all-reduced once per step (autograd-aware), so an EP run
reports the losses of the single-process run on the concatenated batch.

Shapes: T tokens on this rank, D model dim, E experts (global), L local experts
(E/P), P ranks in the EP group, K experts per token, R rows this rank routes,
N rows this rank's experts receive, S packed statistics.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from ..config import MoEConfig
from ..experts import run_segments
from ..ops import permute_rows
from ..routing.base import Routing
from ..routing.losses import assignment_counts, cv_squared, gates_from_topk
from .local import combine_rows, gather_rows, plan_dispatch, sort_keys

STANDARD_LOSSES = ("load_balance", "z_loss", "importance", "load")
# Routers whose losses are all functions of per-expert sums over tokens that the
# Routing record carries, so they can be recomputed over the global batch. The
# noisy router's "load" needs its noise, which the record does not keep.
GLOBAL_LOSSES = {
    "softmax": ("load_balance", "z_loss", "importance", "load"),
    "topk": ("load_balance", "z_loss", "importance", "load"),
    "switch": ("load_balance", "z_loss", "importance", "load"),
    "noisy_topk": ("load_balance", "z_loss", "importance"),
}


def _collective_failed(what: str, group, err: Exception) -> RuntimeError:
    rank, size = dist.get_rank(group), dist.get_world_size(group)
    return RuntimeError(
        f"expert parallel: {what} failed on rank {rank} of {size}; a peer rank probably exited, "
        f"crashed or did not reach this step within the process-group timeout ({err})"
    )


def _all_to_all(out: Tensor, inp: Tensor, recv_splits, send_splits, group, what: str) -> Tensor:
    try:
        dist.all_to_all_single(out, inp, output_split_sizes=recv_splits, input_split_sizes=send_splits, group=group)
    except RuntimeError as err:  # DistBackendError is a RuntimeError
        raise _collective_failed(what, group, err) from err
    return out


class _AllToAllRows(torch.autograd.Function):
    """all_to_all_single of rows with uneven splits; backward sends gradients back."""

    @staticmethod
    def forward(ctx, x_RD: Tensor, send_splits: list[int], recv_splits: list[int], group) -> Tensor:
        ctx.send_splits, ctx.recv_splits, ctx.group = send_splits, recv_splits, group
        out = x_RD.new_empty(sum(recv_splits), x_RD.shape[1])
        return _all_to_all(out, x_RD.contiguous(), recv_splits, send_splits, group, "all-to-all of rows")

    @staticmethod
    def backward(ctx, grad_ND: Tensor):
        grad_RD = grad_ND.new_empty(sum(ctx.send_splits), grad_ND.shape[1])
        _all_to_all(grad_RD, grad_ND.contiguous(), ctx.send_splits, ctx.recv_splits, ctx.group,
                    "backward all-to-all of row gradients")
        return grad_RD, None, None, None


def all_to_all_rows(x_RD: Tensor, send_splits: list[int], recv_splits: list[int], group) -> Tensor:
    """Send ``send_splits[p]`` rows to rank p, receive ``recv_splits[p]`` from it (autograd-aware)."""
    return _AllToAllRows.apply(x_RD, send_splits, recv_splits, group)


class _AllReduceSum(torch.autograd.Function):
    """Sum over the group. The backward sums the gradients too: each rank's input
    feeds every rank's output, so this is the gradient of the sum of the ranks' losses."""

    @staticmethod
    def forward(ctx, x: Tensor, group) -> Tensor:
        ctx.group = group
        out = x.clone(memory_format=torch.contiguous_format)
        try:
            dist.all_reduce(out, group=group)
        except RuntimeError as err:
            raise _collective_failed("all-reduce of routing statistics", group, err) from err
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        grad = grad.clone(memory_format=torch.contiguous_format)
        try:
            dist.all_reduce(grad, group=ctx.group)
        except RuntimeError as err:
            raise _collective_failed("backward all-reduce of routing statistics", ctx.group, err) from err
        return grad, None


def all_reduce_sum(x: Tensor, group) -> Tensor:
    """Autograd-aware sum of ``x`` over the ranks of ``group``."""
    return _AllReduceSum.apply(x, group)


def check_received_counts(received_PC: Tensor, rank: int) -> Tensor:
    """Validate the count exchange: row p is what rank p sends to this rank,
    L per-expert counts then their total as a checksum. Returns the (P, L) counts."""
    counts_PL, totals_P = received_PC[:, :-1], received_PC[:, -1]
    if bool((counts_PL < 0).any()):
        raise RuntimeError(
            f"expert parallel: rank {rank} received negative row counts {counts_PL.tolist()}; "
            "the ranks disagree on the expert layout (num_experts or group size)"
        )
    sums_P = counts_PL.sum(1)
    if not torch.equal(sums_P, totals_P):
        raise RuntimeError(
            f"expert parallel: rank {rank} received per-expert counts summing to {sums_P.tolist()} "
            f"but totals {totals_P.tolist()} from ranks 0..{len(totals_P) - 1}; "
            "the ranks disagree on the expert layout (num_experts or group size)"
        )
    return counts_PL


def check_send_splits(send_splits: list[int], num_rows: int, rank: int) -> None:
    """The rows this rank sends must be exactly the rows it routed."""
    if any(n < 0 for n in send_splits) or sum(send_splits) != num_rows:
        raise RuntimeError(
            f"expert parallel: rank {rank} would send splits {send_splits} (sum {sum(send_splits)}) "
            f"but routed {num_rows} rows; expected non-negative splits summing to {num_rows}"
        )


def _run_local_experts(path: str, experts, x_ND: Tensor, counts_L: Tensor, counts: list[int]) -> Tensor:
    # grouped_mm's backward rejects zero rows; the segment path handles them and
    # still connects the rows to the graph, so the backward all-to-all runs here too.
    if path == "grouped_mm" and x_ND.shape[0] > 0:
        return experts.forward_grouped(x_ND, counts_L)
    if path == "loop":
        return run_segments(experts, x_ND, counts)
    return experts.forward_segments(x_ND, counts)


def check_supported(config: MoEConfig) -> None:
    """Raise ``NotImplementedError`` for a layer whose global-batch losses EP cannot compute."""
    router = config.router
    if router not in GLOBAL_LOSSES:
        raise NotImplementedError(
            f"expert parallelism needs the global-batch losses of router {router!r}, which moekit "
            f"does not compute yet; supported routers: {', '.join(GLOBAL_LOSSES)}"
        )
    unsupported = [
        name
        for name, coef in config.loss_coefficients.items()
        if coef != 0 and name in STANDARD_LOSSES and name not in GLOBAL_LOSSES[router]
    ]
    if unsupported:
        raise NotImplementedError(
            f"expert parallelism cannot compute the global-batch {', '.join(unsupported)} loss of router "
            f"{router!r} (it needs the router's noise); set its coefficient to 0"
        )


class ExpertParallel:
    """The expert-parallel dispatcher of one MoE layer.

    Args:
        group: the EP process group; its size P must divide ``config.num_experts``.
        config: the layer's ``MoEConfig`` (E, the router, the loss weights).
    """

    def __init__(self, group, config: MoEConfig):
        num_experts, router = config.num_experts, config.router
        check_supported(config)
        self.group, self.config = group, config
        self.ep_size = dist.get_world_size(group)
        self.ep_rank = dist.get_rank(group)
        if num_experts % self.ep_size != 0:
            raise ValueError(
                f"num_experts ({num_experts}) must be divisible by the expert-parallel size ({self.ep_size})"
            )
        self.num_experts = num_experts
        self.num_local = num_experts // self.ep_size
        self.first_expert = self.ep_rank * self.num_local
        self.router = router

    def __deepcopy__(self, memo) -> ExpertParallel:
        # Process groups are shared handles, not copyable state.
        return ExpertParallel(self.group, self.config)

    def exchange_counts(self, counts_E: Tensor) -> Tensor:
        """Integer all-to-all of per-expert row counts: (P, L) received from each rank."""
        P, L = self.ep_size, self.num_local
        counts_PL = counts_E.view(P, L)
        send_PC = torch.cat([counts_PL, counts_PL.sum(1, keepdim=True)], dim=1).contiguous()
        received_PC = torch.empty_like(send_PC)
        _all_to_all(received_PC, send_PC, None, None, self.group, "all-to-all of row counts")
        return check_received_counts(received_PC, self.ep_rank)

    def run(
        self, path: str, x_TD: Tensor, routing: Routing, experts, capacity, drop_priority, out_dtype, group_size=None
    ):
        """Same contract as a local compute path: (y_TD, tokens_per_expert_E, kept_TK, num_dropped),
        the statistics still local to this rank (``globalize`` reduces them)."""
        P, L = self.ep_size, self.num_local
        plan = plan_dispatch(
            routing.indices_TK,
            self.num_experts,
            capacity=capacity,
            priority_TK=routing.probs_TE.gather(1, routing.indices_TK) if capacity is not None else None,
            drop_priority=drop_priority,
            valid_T=routing.valid_T,
            active_TK=routing.active_TK,
            capacity_group_size=group_size,
        )
        x_RD = gather_rows(x_TD, plan)
        if torch.is_grad_enabled() and not x_RD.requires_grad:
            # Every rank must run the backward all-to-all of rows, whether or not its own input needs a gradient.
            x_RD = x_RD.detach().requires_grad_()
        recv_counts_PL = self.exchange_counts(plan.counts_E)
        # NOTE: .tolist() syncs with the device; the splits are host-side arguments of all_to_all_single.
        send_splits = plan.counts_E.view(P, L).sum(1).tolist()
        recv_splits = recv_counts_PL.sum(1).tolist()
        check_send_splits(send_splits, x_RD.shape[0], self.ep_rank)
        x_ND = all_to_all_rows(x_RD, send_splits, recv_splits, self.group)

        # Received rows come grouped by source rank, then by local expert; the experts want them by expert.
        local_expert_N = torch.arange(L, device=x_ND.device).repeat(P).repeat_interleave(
            recv_counts_PL.reshape(-1), output_size=x_ND.shape[0]
        )
        by_expert_N = torch.argsort(sort_keys(local_expert_N, L), stable=True)
        by_source_N = torch.empty_like(by_expert_N)
        by_source_N[by_expert_N] = torch.arange(x_ND.shape[0], device=x_ND.device)
        counts_L = recv_counts_PL.sum(0)
        y_ND = _run_local_experts(
            path, experts, permute_rows(x_ND, by_expert_N, by_source_N), counts_L, counts_L.tolist()
        )
        y_ND = permute_rows(y_ND, by_source_N, by_expert_N)
        y_RD = all_to_all_rows(y_ND, recv_splits, send_splits, self.group)
        y_TD = combine_rows(y_RD, routing.weights_TK, plan, out_dtype)
        return y_TD, plan.counts_E, plan.kept_TK, plan.num_dropped

    def globalize(self, routing: Routing) -> Routing:
        """The routing record with its losses and ``tokens_per_expert_E`` over the global batch
        (one all-reduce). Per-token fields, ``kept_TK`` and ``num_dropped`` stay this rank's."""
        E = self.num_experts
        dtype = routing.probs_TE.dtype
        T = routing.num_tokens
        w_T = (
            torch.ones(T, device=routing.probs_TE.device, dtype=dtype)
            if routing.valid_T is None
            else routing.valid_T.to(dtype)
        )
        gates_TE = gates_from_topk(routing.indices_TK, routing.weights_TK, E)
        z_T = torch.logsumexp(routing.logits_TE, dim=-1)
        # Sums over this rank's tokens; the losses are functions of their global totals.
        local_S = torch.cat([
            w_T.sum()[None],                                       # real tokens
            assignment_counts(routing.indices_TK, E, w_T),         # assignments per expert (before capacity)
            (routing.probs_TE * w_T[:, None]).sum(0),              # router probability mass per expert
            (z_T.square() * w_T).sum()[None],                      # z-loss numerator
            (gates_TE * w_T[:, None]).sum(0),                      # importance per expert
            routing.tokens_per_expert_E.to(dtype),                 # assignments processed per expert
        ])
        global_S = all_reduce_sum(local_S, self.group)
        num_tokens, assigned_E, prob_mass_E, z_sum, importance_E, processed_E = global_S.split([1, E, E, 1, E, E])
        n = num_tokens[0].clamp_min(1.0)
        all_losses = {
            "load_balance": E * ((assigned_E / n) * (prob_mass_E / n)).sum(),
            "z_loss": z_sum[0] / n,
            "importance": cv_squared(importance_E),
            "load": cv_squared(assigned_E),
        }
        losses = {name: all_losses[name] for name in GLOBAL_LOSSES[self.router]}
        return routing.replace(losses=losses, tokens_per_expert_E=processed_E.detach().round().long())
