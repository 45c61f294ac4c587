"""Capacity: which assignments each expert keeps, by sorting and by the plain reference.

``sorted_assignments`` sorts the T·K assignments by expert id (stable), drops
those over capacity and those of padding or declined by the router, and
returns the permutation the sorted dispatch plan gathers and combines by.
``reference_keep`` computes the same kept set the plain way, one expert at a
time; the ``loop`` reference path plans with it, so every other path's
capacity is checked against it.

Shapes: T tokens, E experts, K experts per token, R routed rows (T·K when
nothing is dropped or padded).
"""

from __future__ import annotations

import torch
from torch import Tensor


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


def sorted_assignments(
    indices_TK: Tensor,
    num_experts: int,
    *,
    capacity: int | None = None,
    priority_TK: Tensor | None = None,
    drop_priority: str = "probability",
    valid_T: Tensor | None = None,
    active_TK: Tensor | None = None,
    group_size: int | None = None,
) -> tuple[Tensor, Tensor, Tensor | None, Tensor, Tensor | None]:
    """(order_R, counts_E, kept_TK, num_dropped, inverse_R): the routed assignments (flat
    index t·K + k) sorted by expert, rows per expert, which assignments were kept (None
    when all were), drops of real tokens for capacity (0-dim long), and the inverse
    permutation of order_R when every assignment is routed (dropless, no padding).

    With ``capacity`` set, each expert keeps at most ``capacity`` assignments
    (per group of ``group_size`` consecutive tokens when given, as Switch
    Transformers applies capacity per sequence): by ``drop_priority="probability"``
    the highest ``priority_TK`` first, by ``"position"`` first choices before
    second choices and earlier tokens first, by ``"batch_priority"`` (V-MoE's batch
    prioritized routing, Riquelme et al. 2021) first choices before second choices and,
    within a choice, the tokens with the highest top priority first. Assignments outside ``active_TK``
    (declined by the router) are left out like padding and not counted as
    dropped. The dropless, unpadded case needs no host sync.
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
        return order_R, counts_E, None, no_drops, inverse_R

    # Padding goes to a sentinel expert E, which sorts last and is cut off below.
    if valid_T is not None:
        flat_E = torch.where(valid_T.repeat_interleave(K), flat_E, num_experts)
    if active_TK is not None:
        flat_E = torch.where(active_TK.reshape(-1), flat_E, num_experts)
    if capacity is None:
        candidate_order = torch.arange(T * K, device=device)
    elif drop_priority == "probability":
        candidate_order = torch.argsort(-priority_TK.reshape(-1), stable=True)
    elif drop_priority == "batch_priority":
        # V-MoE's batch prioritized routing: slot-major, and within a slot the tokens whose best
        # choice is most confident first.
        token_order = torch.argsort(-priority_TK.max(dim=1).values, stable=True)
        candidate_order = (token_order[None, :] * K + torch.arange(K, device=device)[:, None]).reshape(-1)
    else:
        # Slot-major: every token's first choice ranks above any second choice.
        candidate_order = torch.arange(T * K, device=device).view(T, K).t().reshape(-1)
    # Buckets are experts, or (group, expert) pairs when capacity is per group.
    num_buckets = num_experts + 1
    bucket = flat_E
    if capacity is not None and group_size is not None:
        group = torch.arange(T * K, device=device) // (K * group_size)
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
    return order_R, counts_E, kept_flat.view(T, K), real_assignments - counts_E.sum(), None


def reference_keep(
    indices_TK: Tensor,
    priority_TK: Tensor,
    num_experts: int,
    capacity: int | None,
    drop_priority: str,
    valid_T: Tensor | None,
    active_TK: Tensor | None = None,
    group_size: int | None = None,
) -> Tensor:
    """Which assignments an expert keeps, computed the plain way, one expert at a time
    (and one group of ``group_size`` tokens at a time when capacity is per group)."""
    T, K = indices_TK.shape
    if group_size is not None and capacity is not None and T > group_size:
        pieces = []
        for start in range(0, T, group_size):
            rows = slice(start, start + group_size)
            pieces.append(reference_keep(
                indices_TK[rows], priority_TK[rows], num_experts, capacity, drop_priority,
                None if valid_T is None else valid_T[rows], None if active_TK is None else active_TK[rows],
            ))
        return torch.cat(pieces)
    keep_TK = torch.zeros(T, K, dtype=torch.bool, device=indices_TK.device)
    valid_TK = torch.ones_like(keep_TK) if valid_T is None else valid_T[:, None].expand(T, K)
    if active_TK is not None:
        valid_TK = valid_TK & active_TK
    for e in range(num_experts):
        tokens, slots = torch.nonzero((indices_TK == e) & valid_TK, as_tuple=True)
        if capacity is not None and tokens.numel() > capacity:
            if drop_priority == "probability":
                # Highest probability first; ties keep the earlier assignment.
                rank = sorted(
                    range(tokens.numel()),
                    key=lambda i: (-priority_TK[tokens[i], slots[i]].item(), tokens[i].item() * K + slots[i].item()),
                )
            elif drop_priority == "batch_priority":
                # Choice slot first, then the token's top probability, then its position.
                best_T = priority_TK.max(dim=1).values
                rank = sorted(range(tokens.numel()),
                              key=lambda i: (slots[i].item(), -best_T[tokens[i]].item(), tokens[i].item()))
            else:
                rank = sorted(range(tokens.numel()), key=lambda i: (slots[i].item(), tokens[i].item()))
            chosen = torch.tensor(rank[:capacity], dtype=torch.long, device=tokens.device)
            tokens, slots = tokens[chosen], slots[chosen]
        keep_TK[tokens, slots] = True
    return keep_TK
