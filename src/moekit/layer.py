"""The MoE layer: router → dispatch → experts → combine, behind one contract.

``MoE(config)(x)`` takes (..., D) and returns ``MoEOutput(y, aux_loss, routing)``
whatever the flags. Compute paths are registered by name in ``COMPUTE_PATHS``:
``loop`` is the readable reference, ``segment`` and ``grouped_mm`` sort rows by
expert and run them as contiguous blocks; ``fused`` (CPU) gathers, runs and
scatter-adds one expert at a time without (T·K, D) intermediates; ``triton``
(optional, GPU) fuses the row gather and un-permute into its grouped GEMMs;
``auto`` picks the fastest that supports the inputs. Every path is parity-tested against ``loop``.

Shapes: T tokens, D model dim, E experts, K experts per token, R routed rows.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .config import MoEConfig
from .dispatch.local import DispatchPlan, combine_rows, gather_rows, plan_dispatch, weighted_sum
from .experts import (
    ModuleExperts,
    SharedExperts,
    StackedExperts,
    _autocast_dtype,
    grouped_mm_supports,
)
from .memory import freed_memory_kept
from .routing import (
    AnyRouting,
    ExpertChoiceRouting,
    Routing,
    SoftRouting,
    build_router,
    routing_stats,
)


class LazyStats(Mapping):
    """``routing_stats`` of a record, computed when first read: monitoring that
    nobody reads costs nothing in the forward pass."""

    def __init__(self, routing: AnyRouting):
        self._routing = routing
        self._stats: dict[str, Tensor] | None = None

    def _computed(self) -> dict[str, Tensor]:
        if self._stats is None:
            self._stats = routing_stats(self._routing)
            self._routing = None
        return self._stats

    def __getitem__(self, name: str) -> Tensor:
        return self._computed()[name]

    def __iter__(self):
        return iter(self._computed())

    def __len__(self) -> int:
        return len(self._computed())

    def __repr__(self) -> str:
        return f"LazyStats({self._computed()!r})"


class MoEOutput(NamedTuple):
    """y: same shape as the input; aux_loss: weighted sum of the router's losses
    (a scalar, zero when every coefficient is zero); routing: the router's record
    (``Routing``, or ``ExpertChoiceRouting`` / ``SoftRouting``), with statistics."""

    y: Tensor
    aux_loss: Tensor
    routing: AnyRouting


# --- compute paths ---------------------------------------------------------------
# Each path maps (x_TD, routing, experts, capacity, drop_priority, out_dtype,
# group_size) to (y_TD, tokens_per_expert_E, kept_TK, num_dropped); group_size
# is the number of consecutive tokens capacity applies to (None: all of them).

PathResult = tuple[Tensor, Tensor, "Tensor | None", Tensor]


def _priority_TK(routing: Routing) -> Tensor:
    return routing.probs_TE.gather(1, routing.indices_TK)


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
            else:
                rank = sorted(range(tokens.numel()), key=lambda i: (slots[i].item(), tokens[i].item()))
            chosen = torch.tensor(rank[:capacity], dtype=torch.long, device=tokens.device)
            tokens, slots = tokens[chosen], slots[chosen]
        keep_TK[tokens, slots] = True
    return keep_TK


def loop_path(x_TD, routing, experts, capacity, drop_priority, out_dtype, group_size=None) -> PathResult:
    """Reference: for each expert, find its tokens, run it, add weight · output."""
    E = experts.num_experts
    keep_TK = reference_keep(
        routing.indices_TK, _priority_TK(routing), E, capacity, drop_priority, routing.valid_T,
        routing.active_TK, group_size,
    )
    y_TD = x_TD.new_zeros(x_TD.shape, dtype=routing.weights_TK.dtype)
    counts_E = torch.zeros(E, dtype=torch.long, device=x_TD.device)
    for e in range(E):
        tokens, slots = torch.nonzero((routing.indices_TK == e) & keep_TK, as_tuple=True)
        counts_E[e] = tokens.numel()
        if tokens.numel() == 0:
            continue
        out_ND = experts.forward_expert(e, x_TD[tokens])
        y_TD = y_TD.index_add(0, tokens, routing.weights_TK[tokens, slots, None] * out_ND.to(y_TD.dtype))
    real_TK = torch.ones_like(keep_TK)
    if routing.valid_T is not None:
        real_TK = real_TK & routing.valid_T[:, None]
    if routing.active_TK is not None:
        real_TK = real_TK & routing.active_TK
    num_dropped = (real_TK & ~keep_TK).sum()
    return y_TD.to(out_dtype), counts_E, keep_TK, num_dropped


def small_batch_path(x_TD, routing, experts, capacity, drop_priority, out_dtype, group_size=None) -> PathResult:
    """For a handful of tokens (decoding): group assignments by expert on the host
    and run each chosen expert once, with as few tensor ops as possible."""
    T, K = routing.indices_TK.shape
    E = experts.num_experts
    restricted = capacity is not None or routing.valid_T is not None or routing.active_TK is not None
    keep_TK = None
    if restricted:
        keep_TK = reference_keep(routing.indices_TK, _priority_TK(routing), E, capacity, drop_priority,
                                 routing.valid_T, routing.active_TK, group_size)
    experts_flat = routing.indices_TK.reshape(-1).tolist()  # NOTE: .tolist() syncs with the device
    if T == 1 and keep_TK is None:
        return _one_token(x_TD, routing.weights_TK, experts_flat, experts, out_dtype)
    keep_flat = keep_TK.reshape(-1).tolist() if keep_TK is not None else None
    by_expert: dict[int, list[int]] = {}
    for assignment, e in enumerate(experts_flat):
        if keep_flat is None or keep_flat[assignment]:
            by_expert.setdefault(e, []).append(assignment)
    weights_A = routing.weights_TK.reshape(-1)
    y_TD = x_TD.new_zeros(x_TD.shape, dtype=routing.weights_TK.dtype)
    counts = [0] * E
    for e, assignments in by_expert.items():
        a_N = torch.tensor(assignments, device=x_TD.device)
        tokens_N = a_N // K
        out_ND = experts.forward_expert(e, x_TD.index_select(0, tokens_N))
        y_TD = y_TD.index_add(0, tokens_N, weights_A[a_N, None] * out_ND.to(y_TD.dtype))
        counts[e] = len(assignments)
    counts_E = torch.tensor(counts, device=x_TD.device)
    if keep_TK is None:
        return y_TD.to(out_dtype), counts_E, None, torch.zeros((), dtype=torch.long, device=x_TD.device)
    real_TK = torch.ones_like(keep_TK)
    if routing.valid_T is not None:
        real_TK = real_TK & routing.valid_T[:, None]
    if routing.active_TK is not None:
        real_TK = real_TK & routing.active_TK
    return y_TD.to(out_dtype), counts_E, keep_TK, (real_TK & ~keep_TK).sum()


def _one_token(x_1D, weights_1K, experts_K: list[int], experts, out_dtype) -> PathResult:
    """One token (a decoding step): each chosen expert on x itself, weights taken by
    slicing; no index tensors, gathers or scatters."""
    y_1D = None
    counts = [0] * experts.num_experts
    for k, e in enumerate(experts_K):
        term = weights_1K[:, k : k + 1] * experts.forward_expert(e, x_1D).to(weights_1K.dtype)
        y_1D = term if y_1D is None else y_1D + term
        counts[e] += 1
    counts_E = torch.tensor(counts, device=x_1D.device)
    return y_1D.to(out_dtype), counts_E, None, torch.zeros((), dtype=torch.long, device=x_1D.device)


def _plan(routing: Routing, experts, capacity, drop_priority, group_size) -> DispatchPlan:
    return plan_dispatch(
        routing.indices_TK,
        experts.num_experts,
        capacity=capacity,
        priority_TK=_priority_TK(routing) if capacity is not None else None,
        drop_priority=drop_priority,
        valid_T=routing.valid_T,
        active_TK=routing.active_TK,
        capacity_group_size=group_size,
    )


def _sorted_path(run_rows: Callable[[Tensor, Tensor], Tensor]):
    def path(x_TD, routing, experts, capacity, drop_priority, out_dtype, group_size=None) -> PathResult:
        plan = _plan(routing, experts, capacity, drop_priority, group_size)
        y_RD = run_rows(experts, gather_rows(x_TD, plan), plan.counts_E)
        y_TD = combine_rows(y_RD, routing.weights_TK, plan, out_dtype)
        return y_TD, plan.counts_E, plan.kept_TK, plan.num_dropped

    return path


def fused_path(x_TD, routing, experts, capacity, drop_priority, out_dtype, group_size=None) -> PathResult:
    """Sorted like ``segment``, with each expert's token gather, MLP and weighted
    scatter-add fused in one autograd node (``moekit.ops.routed_mlp``): no (R, D)
    tensor is built, forward or backward."""
    plan = _plan(routing, experts, capacity, drop_priority, group_size)
    counts = plan.counts_E.tolist()  # NOTE: .tolist() syncs with the device
    y_TD = experts.forward_routed(x_TD, routing.weights_TK, plan.order_R, counts)
    return y_TD.to(out_dtype), plan.counts_E, plan.kept_TK, plan.num_dropped


def _run_segments(experts, x_RD: Tensor, counts_E: Tensor) -> Tensor:
    return experts.forward_segments(x_RD, counts_E.tolist())  # NOTE: .tolist() syncs


def _run_grouped(experts, x_RD: Tensor, counts_E: Tensor) -> Tensor:
    return experts.forward_grouped(x_RD, counts_E)


def _compute_dtype(x: Tensor) -> torch.dtype:
    if x.device.type != "meta" and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def _triton_rows(experts, x_TD: Tensor, counts_E: Tensor, order_R: Tensor | None, top_k: int,
                 num_assignments: int) -> Tensor:
    """The experts' MLP on the rows ``order_R`` selects, by the Triton kernels: tokens
    are read in place and outputs land on their assignment rows, (num_assignments, D).
    Without ``order_R`` the rows of x are already sorted by expert and stay so."""
    from .kernels import gather_grouped_mm, grouped_mm_scatter

    w_in, w_out, b_in, b_out = experts.w_in, experts.w_out, experts.b_in, experts.b_out
    cast = _autocast_dtype(x_TD.device.type)
    if cast is not None:
        x_TD, w_in, w_out = x_TD.to(cast), w_in.to(cast), w_out.to(cast)
    R = x_TD.shape[0] if order_R is None else order_R.shape[0]
    h_RH = gather_grouped_mm(x_TD, w_in, order_R, counts_E, top_k)
    if b_in is not None:
        h_RH = h_RH + b_in.to(h_RH.dtype).repeat_interleave(counts_E, dim=0, output_size=R)
    y_AD = grouped_mm_scatter(experts._hidden(h_RH), w_out, order_R, counts_E, num_assignments)
    if b_out is not None:
        b_out_RD = b_out.to(y_AD.dtype).repeat_interleave(counts_E, dim=0, output_size=R)
        # Only routed rows get the bias: dropped and padded assignments stay zero.
        y_AD = y_AD + b_out_RD if order_R is None else y_AD.index_add(0, order_R, b_out_RD)
    return y_AD


def triton_path(x_TD, routing, experts, capacity, drop_priority, out_dtype, group_size=None) -> PathResult:
    """Sorted rows like ``grouped_mm``, with the token gather and the un-permute
    fused into the Triton GEMMs instead of two (R, D) copies."""
    T, K = routing.indices_TK.shape
    plan = _plan(routing, experts, capacity, drop_priority, group_size)
    y_AD = _triton_rows(experts, x_TD, plan.counts_E, plan.order_R, K, T * K)
    y_TD = weighted_sum(y_AD.view(T, K, x_TD.shape[1]), routing.weights_TK, out_dtype)
    return y_TD, plan.counts_E, plan.kept_TK, plan.num_dropped


def _run_triton(experts, x_RD: Tensor, counts_E: Tensor) -> Tensor:
    return _triton_rows(experts, x_RD, counts_E, None, 1, x_RD.shape[0])


def triton_supports(experts: nn.Module, x: Tensor) -> bool:
    """Stacked experts in a dtype the kernels take, on a GPU or in Triton's interpreter.

    A meta tensor stands for an input whose device is not known yet (the
    layer's check at construction)."""
    from . import kernels

    return (
        kernels.HAS_TRITON
        and isinstance(experts, StackedExperts)
        and _compute_dtype(x) in kernels.supported_dtypes()
        and (x.is_cuda or x.is_meta or kernels.interpreting())
    )


class ComputePath(NamedTuple):
    run: Callable[..., PathResult]
    supports: Callable[[nn.Module, Tensor], bool]
    needs: str = ""  # what an unsupported input lacks, for the error message


COMPUTE_PATHS: dict[str, ComputePath] = {
    "loop": ComputePath(loop_path, lambda experts, x: True),
    "small_batch": ComputePath(small_batch_path, lambda experts, x: True),
    "segment": ComputePath(_sorted_path(_run_segments), lambda experts, x: True),
    "fused": ComputePath(
        fused_path,
        # A per-expert loop from host-side counts: on a GPU grouped_mm does the same without a sync.
        lambda experts, x: isinstance(experts, StackedExperts) and x.device.type in ("cpu", "meta"),
        "fused needs stacked experts and a CPU input",
    ),
    "grouped_mm": ComputePath(
        _sorted_path(_run_grouped),
        lambda experts, x: grouped_mm_supports(experts, _compute_dtype(x)),
        "grouped_mm needs stacked experts, float32/bfloat16/float16, and d_model, "
        "d_ff whose rows are multiples of 16 bytes",
    ),
    "triton": ComputePath(
        triton_path,
        triton_supports,
        "triton needs the triton package, stacked experts, float32/bfloat16/float16, and a "
        "CUDA input (or TRITON_INTERPRET=1 set before moekit is imported)",
    ),
}
# "auto" takes the first path that supports the inputs, fastest first as measured
# by benchmarks/layer.py (BENCHMARKS.md); "segment" covers what grouped_mm cannot
# (float64, unaligned widths, heterogeneous experts).
AUTO_ORDER = ("grouped_mm", "segment", "loop")


# --- expert choice and Soft MoE ---------------------------------------------------
# Their rows are already grouped by expert (each expert's C tokens, or its P
# slots per sequence), so no sort is needed: "loop" runs one expert at a time,
# the other paths hand all rows to the same runner as the top-k paths.

ROW_RUNNERS: dict[str, Callable[[nn.Module, Tensor, Tensor], Tensor]] = {
    "segment": _run_segments,
    "fused": _run_segments,
    "small_batch": _run_segments,
    "grouped_mm": _run_grouped,
    "triton": _run_triton,
}


def _run_expert_major(path: str, experts, x_ERD: Tensor) -> Tensor:
    """Experts on rows already grouped by expert, (E, N, D) → (E, N, D)."""
    E, N, D = x_ERD.shape
    if path == "loop":
        return torch.stack([experts.forward_expert(e, x_ERD[e]) for e in range(E)])
    counts_E = torch.full((E,), N, dtype=torch.long, device=x_ERD.device)
    return ROW_RUNNERS[path](experts, x_ERD.reshape(E * N, D), counts_E).view(E, N, D)


def expert_choice_compute(
    path: str, x_TD: Tensor, routing: ExpertChoiceRouting, experts, out_dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """y_t = Σ over the experts e that took t of weight·E_e(x_t); and real tokens per expert."""
    tokens_EC, weights_EC = routing.tokens_EC, routing.weights_EC
    E, C = tokens_EC.shape
    y_ECD = _run_expert_major(path, experts, x_TD[tokens_EC])
    y_TD = x_TD.new_zeros(x_TD.shape, dtype=weights_EC.dtype)
    y_TD = y_TD.index_add(0, tokens_EC.reshape(-1), (weights_EC[..., None] * y_ECD.to(y_TD.dtype)).reshape(E * C, -1))
    if routing.valid_T is None:
        tokens_per_expert_E = torch.full((E,), C, dtype=torch.long, device=x_TD.device)
    else:
        tokens_per_expert_E = routing.valid_T[tokens_EC].sum(1)
    return y_TD.to(out_dtype), tokens_per_expert_E


def soft_compute(
    path: str, x_TD: Tensor, routing: SoftRouting, experts, out_dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """Slots = dispatchᵀ·X per sequence, experts on their slots, Y = combine·Ỹ; and slots per expert."""
    dispatch_GLS, combine_GLS = routing.dispatch_GLS, routing.combine_GLS
    G, L, S = dispatch_GLS.shape
    E, P, D = experts.num_experts, routing.slots_per_expert, x_TD.shape[1]
    # Dispatch and combine are router math: float32 even under autocast.
    with torch.autocast(device_type=x_TD.device.type, enabled=False):
        slots_GSD = dispatch_GLS.transpose(1, 2) @ x_TD.view(G, L, D).to(dispatch_GLS.dtype)
    slots_ERD = slots_GSD.view(G, E, P, D).transpose(0, 1).reshape(E, G * P, D).to(x_TD.dtype)
    y_ERD = _run_expert_major(path, experts, slots_ERD)
    y_GSD = y_ERD.view(E, G, P, D).transpose(0, 1).reshape(G, S, D).to(combine_GLS.dtype)
    with torch.autocast(device_type=x_TD.device.type, enabled=False):
        y_TD = (combine_GLS @ y_GSD).reshape(G * L, D)
    tokens_per_expert_E = torch.full((E,), G * P, dtype=torch.long, device=x_TD.device)
    return y_TD.to(out_dtype), tokens_per_expert_E


# "auto" runs "small_batch" for a single token only: from two tokens on, one
# grouped_mm over all experts is faster than a loop over the chosen ones
# (measured at the standard and fine-grained shapes, BENCHMARKS.md).


# On CPU, "auto" runs "fused" when the (T·K, D) row tensors of the sorted paths
# would be at least 32 MiB: glibc maps blocks that large fresh and unmaps them on
# free, so each step page-faults them in again, which costs more than fused's
# per-expert loop (fine-grained shape: 1.2× faster forward + backward). With
# moekit.memory.keep_freed_memory() in effect, and for 16-bit inputs, grouped_mm
# is as fast or faster (BENCHMARKS.md, "The fused path").
FUSED_MIN_ROW_BYTES = 32 << 20


def _prefers_fused(experts: nn.Module, x_TD: Tensor, top_k: int) -> bool:
    itemsize = _compute_dtype(x_TD).itemsize
    return (
        x_TD.device.type == "cpu"
        and isinstance(experts, StackedExperts)
        and itemsize >= 4
        and x_TD.shape[0] * top_k * x_TD.shape[1] * itemsize >= FUSED_MIN_ROW_BYTES
        and not freed_memory_kept()
        and not torch.compiler.is_compiling()  # its host-side loop would break the graph
    )


def resolve_path(name: str, experts: nn.Module, x_TD: Tensor, top_k: int = 1) -> str:
    if name == "auto":
        # One decoding step on CPU; on a GPU, small_batch's host syncs cost more than they save.
        if x_TD.shape[0] == 1 and x_TD.device.type == "cpu":
            return "small_batch"
        if _prefers_fused(experts, x_TD, top_k):
            return "fused"
        for candidate in AUTO_ORDER:
            if COMPUTE_PATHS[candidate].supports(experts, x_TD):
                return candidate
    path = COMPUTE_PATHS[name]
    if not path.supports(experts, x_TD):
        needs = f" ({path.needs})" if path.needs else ""
        raise ValueError(
            f"compute path {name!r} does not support {type(experts).__name__} with {x_TD.dtype} "
            f"input on {x_TD.device.type}{needs}; use compute='auto' or one of "
            f"{', '.join(COMPUTE_PATHS)}"
        )
    return name


def balanced_routing(routing: Routing) -> Routing:
    """The same record with a perfectly balanced choice: expert (t·K + k) mod E, weight 1/K."""
    if not isinstance(routing, Routing):
        raise ValueError("debug_balanced_routing applies to token-choice routers only")
    T, K = routing.indices_TK.shape
    E = routing.probs_TE.shape[1]
    t_T = torch.arange(T, device=routing.indices_TK.device)
    indices_TK = (t_T[:, None] * K + torch.arange(K, device=t_T.device)) % E
    weights_TK = torch.full_like(routing.weights_TK, 1.0 / K)
    return routing.replace(indices_TK=indices_TK, weights_TK=weights_TK)


class MoE(nn.Module):
    """A Mixture-of-Experts layer: y = Σ_{i ∈ chosen} G(x)_i · E_i(x).

    Args:
        config: the layer's ``MoEConfig``; or pass its fields as keyword arguments.
        experts: optional list of arbitrary modules (N, D) → (N, D), one per
            expert, instead of the stacked experts the config describes; they
            run on the ``loop`` and ``segment`` paths.

    Example:
        >>> moe = MoE(MoEConfig(d_model=16, d_ff=32, num_experts=4, top_k=2))
        >>> out = moe(torch.randn(2, 5, 16))
        >>> out.y.shape, out.aux_loss.shape
        (torch.Size([2, 5, 16]), torch.Size([]))
    """

    def __init__(
        self,
        config: MoEConfig | None = None,
        *,
        experts: list[nn.Module] | None = None,
        name: str | None = None,
        **kwargs,
    ):
        super().__init__()
        if config is None:
            if experts is not None and "num_experts" not in kwargs:
                kwargs["num_experts"] = len(experts)
            config = MoEConfig(**kwargs)
        elif kwargs:
            raise TypeError(f"pass either a config or keyword fields, not both (got {sorted(kwargs)})")
        if config.compute != "auto" and config.compute not in COMPUTE_PATHS:
            raise ValueError(
                f"unknown compute path {config.compute!r}; valid paths: auto, {', '.join(COMPUTE_PATHS)}"
            )
        self.config = config
        self.name = name or "MoE"
        self.router = build_router(config)
        if experts is not None:
            if len(experts) != config.num_experts:
                raise ValueError(
                    f"got {len(experts)} expert modules but num_experts ({config.num_experts})"
                )
            self.experts = ModuleExperts(experts)
        else:
            self.experts = StackedExperts(
                config.num_experts,
                config.d_model,
                config.d_ff,
                kind=config.expert,
                activation=config.activation,
                bias=config.expert_bias,
            )
        self.shared_experts = None
        if config.num_shared_experts > 0:
            self.shared_experts = SharedExperts(
                config.d_model,
                config.shared_d_ff,
                num_experts=config.num_shared_experts,
                kind=config.expert,
                activation=config.activation,
                bias=config.expert_bias,
                gate=config.shared_expert_gate,
            )
        if config.compute != "auto":
            resolve_path(config.compute, self.experts, torch.empty(0, config.d_model, device="meta"))
        # Set by moekit.distributed.expert_parallel: an ExpertParallel dispatcher that
        # runs this rank's shard of the experts for every rank's tokens.
        self.expert_parallel = None

    def _check_input(self, x: Tensor, mask: Tensor | None) -> None:
        if not isinstance(x, Tensor):
            raise TypeError(f"{self.name}: input must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{self.name}: input dtype {x.dtype} is not floating point; expected float")
        if x.dim() < 1 or x.shape[-1] != self.config.d_model:
            raise ValueError(
                f"{self.name}: input last dim ({x.shape[-1] if x.dim() else 'scalar'}) must equal "
                f"d_model ({self.config.d_model}); got shape {tuple(x.shape)}"
            )
        if mask is not None:
            if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
                raise TypeError(f"{self.name}: mask must be a bool tensor, got {getattr(mask, 'dtype', type(mask))}")
            if mask.shape != x.shape[:-1]:
                raise ValueError(
                    f"{self.name}: mask shape {tuple(mask.shape)} must equal the input's leading "
                    f"shape {tuple(x.shape[:-1])}"
                )
        if self.config.check_finite and not bool(torch.isfinite(x).all()):
            raise FloatingPointError(f"{self.name}: input contains NaN or Inf")

    def forward(
        self, x: Tensor, *, mask: Tensor | None = None, token_ids: Tensor | None = None
    ) -> MoEOutput:
        """x: (..., D); mask: optional bool (...) marking real tokens (False = padding);
        token_ids: optional long (...) token ids, needed by the ``hash`` router.

        The second-to-last dim of x is the sequence (a 2-D x is one sequence);
        Soft MoE mixes tokens within a sequence and the sequence-wise balance
        loss averages over sequences.
        """
        self._check_input(x, mask)
        x_TD = x.reshape(-1, self.config.d_model)
        valid_T = None if mask is None else mask.reshape(-1)
        route_kwargs = {"sequence_length": x.shape[-2] if x.dim() >= 3 else None}
        if token_ids is not None:
            if not isinstance(token_ids, Tensor) or token_ids.shape != x.shape[:-1]:
                raise ValueError(
                    f"{self.name}: token_ids shape {tuple(getattr(token_ids, 'shape', ()))} must equal "
                    f"the input's leading shape {tuple(x.shape[:-1])}"
                )
            route_kwargs["token_ids_T"] = token_ids.reshape(-1)
        routing = self.router(x_TD, valid_T=valid_T, **route_kwargs)
        if self.config.debug_balanced_routing:
            routing = balanced_routing(routing)
        path = resolve_path(self.config.compute, self.experts, x_TD, self.config.top_k)
        if isinstance(routing, ExpertChoiceRouting):
            y_TD, tokens_per_expert_E = expert_choice_compute(path, x_TD, routing, self.experts, x.dtype)
            routing = routing.replace(tokens_per_expert_E=tokens_per_expert_E)
        elif isinstance(routing, SoftRouting):
            y_TD, tokens_per_expert_E = soft_compute(path, x_TD, routing, self.experts, x.dtype)
            routing = routing.replace(tokens_per_expert_E=tokens_per_expert_E)
        else:
            group_size = None
            if self.config.capacity_per_sequence and x.dim() >= 3:
                group_size = x.shape[-2]
            capacity = self.config.capacity(group_size or x_TD.shape[0])
            ep = self.expert_parallel
            run = COMPUTE_PATHS[path].run if ep is None else functools.partial(ep.run, path)
            y_TD, tokens_per_expert_E, kept_TK, num_dropped = run(
                x_TD, routing, self.experts, capacity, self.config.drop_priority, x.dtype, group_size
            )
            routing = routing.replace(tokens_per_expert_E=tokens_per_expert_E, kept_TK=kept_TK, num_dropped=num_dropped)
            if ep is not None:
                routing = ep.globalize(routing)  # losses and expert loads over every rank's tokens
        if self.shared_experts is not None:
            shared_TD = self.shared_experts(x_TD)
            if valid_T is not None:
                shared_TD = shared_TD * valid_T[:, None].to(shared_TD.dtype)
            y_TD = y_TD + shared_TD.to(y_TD.dtype)
        routing = routing.replace(stats=LazyStats(routing))
        return MoEOutput(y_TD.view(x.shape), self._aux_loss(routing, x_TD), routing)

    def _aux_loss(self, routing: AnyRouting, x_TD: Tensor) -> Tensor:
        aux_loss = None
        for name, coef in self.config.loss_coefficients.items():
            if coef != 0 and name in routing.losses:
                term = coef * routing.losses[name]
                aux_loss = term if aux_loss is None else aux_loss + term
        if aux_loss is None:
            return x_TD.new_zeros((), dtype=routing.probs_TE.dtype)
        return aux_loss

    @property
    def causal(self) -> bool:
        """False when a token's output depends on later tokens (expert choice, Soft MoE)."""
        return self.router.causal

    def extra_repr(self) -> str:
        c = self.config
        return f"router={c.router!r}, num_experts={c.num_experts}, top_k={c.top_k}, compute={c.compute!r}"
