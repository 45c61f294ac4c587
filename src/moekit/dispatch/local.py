"""Local dispatch: group routed rows by expert, and put expert outputs back.

``plan_dispatch`` sorts the T·K assignments by expert id (stable), applies
capacity (token dropping) and padding, and records the permutation;
``gather_rows`` builds the expert-sorted rows, ``combine_rows`` un-permutes and
takes the weighted sum over each token's K assignments in float32.

Shapes: T tokens, D model dim, E experts, K experts per token, R routed rows
(T·K when nothing is dropped or padded).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from ..ops import gather_tokens, permute_rows


@dataclass(frozen=True)
class DispatchPlan:
    """Where each routed row comes from and goes back to.

    Attributes:
        order_R: flat assignment index (t·K + k) of each routed row, sorted by expert.
        counts_E: rows per expert (long).
        kept_TK: assignments that reached an expert, or None when all did.
        num_dropped: assignments of real tokens dropped for capacity (0-dim long).
        top_k: K.
        inverse_R: the inverse permutation of order_R when every assignment is
            routed (dropless, no padding), else None.
    """

    order_R: Tensor
    counts_E: Tensor
    kept_TK: Tensor | None
    num_dropped: Tensor
    top_k: int
    inverse_R: Tensor | None = None

    @property
    def token_R(self) -> Tensor:
        return self.order_R // self.top_k

    @property
    def dropless(self) -> bool:
        return self.kept_TK is None


def sort_keys(keys: Tensor, num_values: int) -> Tensor:
    """``keys`` (values in [0, num_values)) in the narrowest integer dtype that holds them:
    a stable radix sort makes one pass per key byte, so 8-bit expert ids sort
    several times faster than int64 ones, on CPU and GPU alike."""
    if num_values <= 256:
        return keys.to(torch.uint8)
    if num_values <= 2**15:
        return keys.to(torch.int16)
    if num_values <= 2**31:
        return keys.to(torch.int32)
    return keys


def plan_dispatch(
    indices_TK: Tensor,
    num_experts: int,
    *,
    capacity: int | None = None,
    priority_TK: Tensor | None = None,
    drop_priority: str = "probability",
    valid_T: Tensor | None = None,
    active_TK: Tensor | None = None,
    capacity_group_size: int | None = None,
) -> DispatchPlan:
    """Sort assignments by expert; drop those over capacity and those of padding.

    With ``capacity`` set, each expert keeps at most ``capacity`` assignments
    (per group of ``capacity_group_size`` consecutive tokens when given, as
    Switch Transformers applies capacity per sequence):
    by ``drop_priority="probability"`` the highest ``priority_TK`` first, by
    ``"position"`` first choices before second choices and earlier tokens first.
    Assignments outside ``active_TK`` (declined by the router) are left out
    like padding and not counted as dropped. The dropless, unpadded case needs
    no host sync.
    """
    T, K = indices_TK.shape
    device = indices_TK.device
    flat_E = indices_TK.reshape(-1)
    if capacity is None and valid_T is None and active_TK is None:
        order_R = torch.argsort(sort_keys(flat_E, num_experts), stable=True)
        counts_E = torch.zeros(num_experts, dtype=torch.long, device=device)
        counts_E.scatter_add_(0, flat_E, torch.ones_like(flat_E))
        inverse_R = torch.empty_like(order_R).scatter_(0, order_R, torch.arange(T * K, device=device))
        no_drops = torch.zeros((), dtype=torch.long, device=device)
        return DispatchPlan(order_R, counts_E, None, no_drops, K, inverse_R)

    # Padding goes to a sentinel expert E, which sorts last and is cut off below.
    if valid_T is not None:
        flat_E = torch.where(valid_T.repeat_interleave(K), flat_E, num_experts)
    if active_TK is not None:
        flat_E = torch.where(active_TK.reshape(-1), flat_E, num_experts)
    if capacity is None:
        candidate_order = torch.arange(T * K, device=device)
    elif drop_priority == "probability":
        candidate_order = torch.argsort(-priority_TK.reshape(-1), stable=True)
    else:
        # Slot-major: every token's first choice ranks above any second choice.
        candidate_order = torch.arange(T * K, device=device).view(T, K).t().reshape(-1)
    # Buckets are experts, or (group, expert) pairs when capacity is per group.
    num_buckets = num_experts + 1
    bucket = flat_E
    if capacity is not None and capacity_group_size is not None:
        group = torch.arange(T * K, device=device) // (K * capacity_group_size)
        num_buckets = (int(group[-1]) + 1 if T else 1) * (num_experts + 1)
        bucket = group * (num_experts + 1) + flat_E
    sorted_order = candidate_order[torch.argsort(sort_keys(bucket[candidate_order], num_buckets), stable=True)]
    sorted_bucket = bucket[sorted_order]
    bucket_counts = torch.zeros(num_buckets, dtype=torch.long, device=device)
    bucket_counts.scatter_add_(0, bucket, torch.ones_like(bucket))
    starts = bucket_counts.cumsum(0) - bucket_counts
    rank_in_bucket = torch.arange(T * K, device=device) - starts[sorted_bucket]
    keep_sorted = flat_E[sorted_order] < num_experts
    if capacity is not None:
        keep_sorted &= rank_in_bucket < capacity
    order_R = sorted_order[keep_sorted]  # NOTE: boolean indexing syncs with the device
    if num_buckets != num_experts + 1:
        order_R = order_R[torch.argsort(sort_keys(flat_E[order_R], num_experts + 1), stable=True)]
    counts_E = torch.zeros(num_experts + 1, dtype=torch.long, device=device)
    counts_E = counts_E.scatter_add_(0, flat_E[order_R], torch.ones_like(order_R))[:num_experts]
    kept_flat = torch.zeros(T * K, dtype=torch.bool, device=device)
    kept_flat[order_R] = True
    real_assignments = (flat_E < num_experts).sum()
    return DispatchPlan(order_R, counts_E, kept_flat.view(T, K), real_assignments - counts_E.sum(), K)


def gather_rows(x_TD: Tensor, plan: DispatchPlan) -> Tensor:
    """Rows of x for each routed assignment, sorted by expert: (R, D)."""
    return gather_tokens(x_TD, plan.order_R, plan.top_k, plan.inverse_R)


def combine_rows(y_RD: Tensor, weights_TK: Tensor, plan: DispatchPlan, out_dtype: torch.dtype) -> Tensor:
    """y_TD = Σ_k weights_TK·y for each token's kept assignments, in the weights' dtype."""
    T, K = weights_TK.shape
    D = y_RD.shape[-1]
    if plan.inverse_R is not None and y_RD.device.type == "cpu" and T > 0:
        # One pass on CPU: each token gathers its K rows and sums them weighted, with
        # no (T·K, D) un-permuted copy; forward + backward take half the time of
        # permute-then-multiply at the fine-grained shape (BENCHMARKS.md).
        y_TD = F.embedding_bag(plan.inverse_R.view(T, K), y_RD.to(weights_TK.dtype),
                               per_sample_weights=weights_TK, mode="sum")
        return y_TD.to(out_dtype)
    if plan.inverse_R is not None:
        y_TKD = permute_rows(y_RD, plan.inverse_R, plan.order_R).view(T, K, D)
    else:
        y_TKD = y_RD.new_zeros(T * K, D).index_copy(0, plan.order_R, y_RD).view(T, K, D)
    return weighted_sum(y_TKD, weights_TK, out_dtype)


def weighted_sum(y_TKD: Tensor, weights_TK: Tensor, out_dtype: torch.dtype) -> Tensor:
    """Σ_k weights_TK·y_TKD in the weights' dtype, then cast to ``out_dtype``.

    On CPU a batched (1×K)·(K×D) product is fastest; on a GPU that product runs as
    a slow batched GEMV (and its backward as a float32 GEMM), so there a
    broadcast multiply, which promotes y to the weights' dtype on the fly, and a
    sum over K are several times faster.
    """
    broadcast = y_TKD.device.type != "cpu"
    return weighted_sum_by(y_TKD, weights_TK, broadcast).to(out_dtype)


def weighted_sum_by(y_TKD: Tensor, weights_TK: Tensor, broadcast: bool) -> Tensor:
    """Σ_k weights_TK·y_TKD in the weights' dtype, by a broadcast multiply and sum
    or by a batched matrix product (both are tested against each other on CPU)."""
    if broadcast:
        return (y_TKD * weights_TK.unsqueeze(-1)).sum(1)
    return torch.bmm(weights_TK.unsqueeze(1), y_TKD.to(weights_TK.dtype)).squeeze(1)
