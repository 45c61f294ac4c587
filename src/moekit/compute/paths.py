"""Compute paths: how the experts' part of an MoE layer runs, one record per path.

Every path has a **rows** form: experts on rows already grouped by expert,
``(experts, x_RD, counts_E) -> y_RD``. Any dispatcher can use it (the local one,
expert parallelism on the rows it received, the expert-choice and Soft MoE plans).
Some paths also have a **routed** form that goes from tokens to the combined output of
a token-choice plan in one pass, ``(experts, x_TD, plan, out_dtype) -> y_TD``, skipping
the (R, D) row tensors; a dispatcher that holds the tokens locally runs it.

The record says what the path needs (``missing``: None when it can run these experts
on this input, else what is missing), whether its routed form runs from an unsorted
plan (``reference_plan``: the loop reference, small_batch, gemv), its place in ``auto``
and the devices ``moekit bench`` times it on. ``register_compute_path`` adds one; ``resolve_path``
turns a name (or ``"auto"``) into a record. A path asks the experts for the traits it
needs (``stacked_mlp``), never for their class.

Shapes: T tokens, D model dim, E experts, K experts per token, R routed rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor, nn

from . import mlp
from .ops import weighted_sum
from .precision import compute_dtype
from .switches import Switches, current


class AutoContext(NamedTuple):
    """What ``auto`` decides on: the experts, the tokens, K, whether the dispatcher
    can run routed forms, and the process switches (one snapshot)."""

    experts: nn.Module
    x_TD: Tensor
    top_k: int
    fuses: bool
    switches: Switches


@dataclass(frozen=True)
class ComputePath:
    """One way to compute the experts (see the module docstring).

    Attributes:
        name: the name ``MoEConfig.compute`` selects it by.
        summary: one line for error messages and docs.
        rows: experts on rows grouped by expert, or None for a path that only fuses.
        routed: tokens to combined output for a token-choice plan, or None.
        missing: ``(experts, x) -> str | None``, what is missing to run (x may be a meta
            tensor: the layer checks a path when it is built).
        reference_plan: the routed form takes an unsorted plan: which assignments are kept,
            decided the plain way (one expert at a time), without the sort by expert.
        auto_rank: place in ``auto`` (lower first), None: never picked by ``auto``.
        auto_when: ``(AutoContext) -> bool``, when ``auto`` takes this path (if supported).
        benchmark_devices: device types ``moekit bench`` times this path on by default.
    """

    name: str
    summary: str
    rows: Callable[[nn.Module, Tensor, Tensor], Tensor] | None
    routed: Callable[..., Tensor] | None = None
    missing: Callable[[nn.Module, Tensor], str | None] = lambda experts, x: None
    reference_plan: bool = False
    auto_rank: int | None = None
    auto_when: Callable[[AutoContext], bool] = lambda context: True
    benchmark_devices: frozenset[str] = frozenset()


COMPUTE_PATHS: dict[str, ComputePath] = {}
# The registry's records as last ranked, and the ranking auto walks (re-sorted when the registry changes).
_ranked_cache: tuple[tuple, list] = ((), [])


def register_compute_path(path: ComputePath) -> ComputePath:
    """Make ``path`` selectable as ``MoEConfig(compute=path.name)``; returns it."""
    if path.name == "auto" or not path.name:
        raise ValueError(f"a compute path cannot be named {path.name!r}")
    if path.rows is None and path.routed is None:
        raise ValueError(f"compute path {path.name!r} needs a rows form, a routed form or both")
    COMPUTE_PATHS[path.name] = path
    return path


def _ranked() -> list[ComputePath]:
    """The paths ``auto`` may take, lowest rank first."""
    global _ranked_cache
    registered = tuple(COMPUTE_PATHS.values())
    if registered != _ranked_cache[0]:
        _ranked_cache = (registered, sorted((p for p in registered if p.auto_rank is not None),
                                            key=lambda p: p.auto_rank))
    return _ranked_cache[1]


def resolve_path(name: str, experts: nn.Module, x_TD: Tensor, top_k: int = 1, *, fuses: bool = True,
                 switches: Switches | None = None) -> ComputePath:
    """The record of path ``name`` for these experts and input; ``"auto"`` takes the first
    path by ``auto_rank`` that supports them and whose ``auto_when`` holds.

    ``fuses``: the dispatcher can run routed forms (False under expert parallelism).
    Raises ``ValueError`` naming the path and what it lacks."""
    if name == "auto":
        context = AutoContext(experts, x_TD, top_k, fuses, switches or current())
        for path in _ranked():
            if (path.rows is not None or fuses) and path.missing(experts, x_TD) is None and path.auto_when(context):
                return path
        raise ValueError(f"no compute path supports {type(experts).__name__} with {x_TD.dtype} input")
    path = COMPUTE_PATHS.get(name)
    if path is None:
        raise ValueError(f"unknown compute path {name!r}; valid paths: auto, {', '.join(COMPUTE_PATHS)}")
    missing = path.missing(experts, x_TD)
    if missing is not None:
        raise ValueError(
            f"compute path {name!r} needs {missing}, for {type(experts).__name__} with {x_TD.dtype} input on "
            f"{x_TD.device.type}; use compute='auto' or one of {', '.join(COMPUTE_PATHS)}"
        )
    return path


# --- rows forms -----------------------------------------------------------------------


def rows_one_expert_at_a_time(experts: nn.Module, x_RD: Tensor, counts_E: Tensor) -> Tensor:
    """Each expert's ``forward_expert`` on its block of rows: the readable reference."""
    counts = counts_E.tolist()  # NOTE: .tolist() syncs with the device
    pieces = [experts.forward_expert(e, x_ND) for e, x_ND in enumerate(x_RD.split(counts)) if x_ND.shape[0] > 0]
    if not pieces:
        return x_RD.new_zeros(0, x_RD.shape[1])
    return torch.cat(pieces) if len(pieces) > 1 else pieces[0]


def rows_by_the_experts(experts: nn.Module, x_RD: Tensor, counts_E: Tensor) -> Tensor:
    """The experts' own rows form, ``experts(x_RD, counts_E)``."""
    return experts(x_RD, counts_E)


# --- routed forms (token-choice plans: moekit.dispatch.plans.TokenChoicePlan) ---------


def loop_tokens(experts: nn.Module, x_TD: Tensor, plan, out_dtype: torch.dtype) -> Tensor:
    """Reference: for each expert, find its kept assignments, run it on their tokens, add
    weight · output to each token."""
    y_TD = x_TD.new_zeros(x_TD.shape, dtype=plan.weights_TK.dtype)
    ran = False
    for e in range(experts.num_experts):
        chosen_TK = plan.indices_TK == e
        if plan.kept_TK is not None:
            chosen_TK = chosen_TK & plan.kept_TK
        tokens, slots = torch.nonzero(chosen_TK, as_tuple=True)
        if tokens.numel() == 0:
            continue
        out_ND = experts.forward_expert(e, x_TD[tokens])
        y_TD = y_TD.index_add(0, tokens, plan.weights_TK[tokens, slots, None] * out_ND.to(y_TD.dtype))
        ran = True
    return (y_TD if ran else _connected(y_TD, x_TD, plan)).to(out_dtype)


def _connected(zeros_TD: Tensor, x_TD: Tensor, plan) -> Tensor:
    """The zero output of a call whose tokens reached no expert (all padding), tied into the
    autograd graph of x and the gate weights so that it backpropagates as the other paths do."""
    if torch.is_grad_enabled() and (x_TD.requires_grad or plan.weights_TK.requires_grad):
        zeros_TD = zeros_TD + 0 * (x_TD.sum() + plan.weights_TK.sum()).to(zeros_TD.dtype)
    return zeros_TD


def small_batch_tokens(experts: nn.Module, x_TD: Tensor, plan, out_dtype: torch.dtype) -> Tensor:
    """For a handful of tokens (decoding): group assignments by expert on the host and run
    each chosen expert once, with as few tensor ops as possible."""
    T, K = plan.indices_TK.shape
    experts_flat = plan.indices_TK.reshape(-1).tolist()  # NOTE: .tolist() syncs with the device
    weights_TK = plan.weights_TK
    if T == 1 and plan.kept_TK is None:
        # One token: each chosen expert on x itself, weights taken by slicing; no index tensors.
        y_1D = None
        for k, e in enumerate(experts_flat):
            term = weights_TK[:, k:k + 1] * experts.forward_expert(e, x_TD).to(weights_TK.dtype)
            y_1D = term if y_1D is None else y_1D + term
        return y_1D.to(out_dtype)
    keep_flat = plan.kept_TK.reshape(-1).tolist() if plan.kept_TK is not None else None
    by_expert: dict[int, list[int]] = {}
    for assignment, e in enumerate(experts_flat):
        if keep_flat is None or keep_flat[assignment]:
            by_expert.setdefault(e, []).append(assignment)
    weights_A = weights_TK.reshape(-1)
    y_TD = x_TD.new_zeros(x_TD.shape, dtype=weights_TK.dtype)
    if not by_expert:
        return _connected(y_TD, x_TD, plan).to(out_dtype)
    for e, assignments in by_expert.items():
        a_N = torch.tensor(assignments, device=x_TD.device)
        tokens_N = a_N // K
        out_ND = experts.forward_expert(e, x_TD.index_select(0, tokens_N))
        y_TD = y_TD.index_add(0, tokens_N, weights_A[a_N, None] * out_ND.to(y_TD.dtype))
    return y_TD.to(out_dtype)


def fused_tokens(experts: nn.Module, x_TD: Tensor, plan, out_dtype: torch.dtype) -> Tensor:
    """Each expert's token gather, MLP and weighted scatter-add in one autograd node."""
    return mlp.routed_tokens(experts, x_TD, plan.weights_TK, plan.order_R, plan.counts_E).to(out_dtype)


def shared_base_routed(experts: nn.Module, x_TD: Tensor, plan, out_dtype: torch.dtype) -> Tensor:
    """Experts sharing one base MLP: the base projections once per token (``mlp.shared_base_tokens``)."""
    return mlp.shared_base_tokens(experts, x_TD, plan.weights_TK, plan.order_R, plan.counts_E).to(out_dtype)


def gemv_tokens(experts: nn.Module, x_TD: Tensor, plan, out_dtype: torch.dtype) -> Tensor:
    """Gather, MLP and weighted sum in one numba kernel call (``mlp.gemv_tokens``), from a
    plan that need not be sorted: the kernel groups the kept assignments by expert itself."""
    experts_TK = plan.indices_TK
    if plan.kept_TK is not None:  # expert E: not routed
        experts_TK = torch.where(plan.kept_TK, experts_TK, plan.num_experts)
    return mlp.gemv_tokens(experts, x_TD, plan.weights_TK, experts_TK).to(out_dtype)


def triton_tokens(experts: nn.Module, x_TD: Tensor, plan, out_dtype: torch.dtype) -> Tensor:
    """Token gather and un-permute inside the Triton GEMMs, then the weighted sum over K."""
    T, K = plan.indices_TK.shape
    y_AD = mlp.triton_rows(experts, x_TD, plan.counts_E, plan.order_R, K, T * K)
    return weighted_sum(y_AD.view(T, K, x_TD.shape[1]), plan.weights_TK, out_dtype)


# --- what each path needs, and when auto takes it ----------------------------------------


def _fused_missing(experts: nn.Module, x: Tensor) -> str | None:
    if not getattr(experts, "stacked_mlp", False):
        return f"stacked MLP experts (got {type(experts).__name__})"
    # A per-expert loop from host-side counts: on a GPU grouped_mm does the same without a sync.
    if x.device.type not in ("cpu", "meta"):
        return f"a CPU input (got {x.device.type})"
    return None


# On CPU, "auto" runs "fused" when the (T·K, D) row tensors of the sorted paths would
# be at least 32 MiB: glibc maps blocks that large fresh and unmaps them on free, so
# each step page-faults them in again, which costs more than fused's per-expert loop
# (fine-grained shape: 1.2× faster forward + backward). With freed memory kept, and
# for 16-bit inputs, grouped_mm is as fast or faster (BENCHMARKS.md, "The fused path").
FUSED_MIN_ROW_BYTES = 32 << 20


def _fused_pays(context: AutoContext) -> bool:
    x, switches = context.x_TD, context.switches
    itemsize = compute_dtype(x).itemsize
    return (
        context.fuses
        and x.device.type == "cpu"
        and itemsize >= 4
        and x.shape[0] * context.top_k * x.shape[1] * itemsize >= FUSED_MIN_ROW_BYTES
        and not switches.freed_memory_kept
        and not switches.compiling  # its host-side loop would break the graph
    )


def _grouped_mm_pays(context: AutoContext) -> bool:
    x = context.x_TD
    # torch 2.13's fake kernel of grouped_mm on CPU accepts bfloat16 only: while compiling,
    # other dtypes take segment instead (a graph break at its host-side counts, not a failure).
    if context.switches.compiling and x.device.type == "cpu" and compute_dtype(x) != torch.bfloat16:
        return False
    # Without gradients on CPU, segment's inference form (one whole expert at a time
    # through cache-sized buffers) runs float32 1.07-1.24x faster (BENCHMARKS.md, "Forward
    # without gradients"), for the experts gemv takes (test-sized ones keep grouped_mm's sums).
    return not (x.device.type == "cpu" and not torch.is_grad_enabled() and compute_dtype(x) == torch.float32
                and _large_float_experts(context.experts))


# Up to this many tokens without gradients the numba decode kernel beats small_batch and
# grouped_mm from experts of 0.75 MiB up (BENCHMARKS.md, "The gemv path"). auto takes it
# for int8 experts (1.27-1.43x small_batch's packed int8 kernel at one token on the standard
# shape: benchmarks/quantized.py) and for float experts whose first projection takes
# 256 KiB or more; smaller float experts (test-sized models) stay on the BLAS paths, whose sums
# equal transformers' bitwise (the parity of converted models) and cost little there.
GEMV_MAX_TOKENS = 64
GEMV_MIN_WEIGHT_BYTES = 256 << 10


def _gemv_decode(context: AutoContext) -> bool:
    x, experts = context.x_TD, context.experts
    if not (x.device.type == "cpu" and not context.switches.compiling and not torch.is_grad_enabled()
            and x.shape[0] <= GEMV_MAX_TOKENS):
        return False
    return mlp.int8_capable(experts) or _large_float_experts(experts)


def _large_float_experts(experts: nn.Module) -> bool:
    w_in = getattr(experts, "w_in", None) if getattr(experts, "stacked_mlp", False) else None
    return w_in is not None and w_in.numel() // max(w_in.shape[0], 1) * w_in.element_size() >= GEMV_MIN_WEIGHT_BYTES


def _cpu_decode(context: AutoContext) -> bool:
    # One token: each chosen expert once beats one grouped_mm over all experts. Up to 16
    # tokens without gradients, experts whose weights take oneDNN's faster kernel
    # (``mlp.linear``) still beat it (1.5-1.8x at the standard shape); smaller experts
    # and gradient-taking calls do better on grouped_mm (BENCHMARKS.md). On a GPU
    # small_batch's host syncs cost more than they save.
    x, experts = context.x_TD, context.experts
    if not (context.fuses and x.device.type == "cpu" and not context.switches.compiling):
        return False
    if x.shape[0] == 1:
        return True
    w_in = getattr(experts, "w_in", None) if getattr(experts, "stacked_mlp", False) else None
    return (w_in is not None and x.shape[0] <= mlp.DECODE_MAX_ROWS and not torch.is_grad_enabled()
            and compute_dtype(x) == torch.float32 and w_in.dtype == torch.float32
            and w_in[0].numel() * w_in.element_size() >= mlp.ONEDNN_MIN_WEIGHT_BYTES)


for _path in (
    ComputePath(
        name="loop", summary="each expert on its tokens, one at a time (the reference)",
        rows=rows_one_expert_at_a_time, routed=loop_tokens, reference_plan=True, auto_rank=50,
    ),
    ComputePath(
        name="small_batch", summary="assignments grouped on the host, each chosen expert once (decoding)",
        rows=rows_one_expert_at_a_time, routed=small_batch_tokens, reference_plan=True, auto_rank=10,
        auto_when=_cpu_decode,
    ),
    ComputePath(
        name="segment", summary="rows sorted by expert, the experts' own rows form",
        rows=rows_by_the_experts, auto_rank=40, benchmark_devices=frozenset({"cpu"}),
    ),
    ComputePath(
        name="fused", summary="per expert: gather, MLP and weighted scatter-add in one node, no (R, D) rows (CPU)",
        rows=mlp.routed_rows, routed=fused_tokens, missing=_fused_missing, auto_rank=20, auto_when=_fused_pays,
        benchmark_devices=frozenset({"cpu"}),
    ),
    ComputePath(
        name="grouped_mm", summary="rows sorted by expert, one torch grouped_mm per projection",
        rows=mlp.grouped_rows, missing=lambda experts, x: mlp.grouped_mm_missing(experts, compute_dtype(x)),
        auto_rank=30, auto_when=_grouped_mm_pays, benchmark_devices=frozenset({"cpu", "cuda"}),
    ),
    ComputePath(
        name="gemv", summary="no gradients, a few rows per expert: gather, MLP and weighted sum in one numba "
        "kernel call that reads the reached experts at memory speed (CPU decoding)",
        rows=mlp.gemv_rows, routed=gemv_tokens, reference_plan=True, auto_rank=9, auto_when=_gemv_decode,
        missing=lambda experts, x: mlp.gemv_missing(experts, compute_dtype(x), x.device.type),
    ),
    # A mixture of LoRA experts computes its shared base once per token: K times less base work.
    ComputePath(
        name="shared_base", summary="experts sharing one base MLP: the base once per token, adapters per row",
        rows=rows_by_the_experts, routed=shared_base_routed, auto_rank=5,
        missing=lambda experts, x: None if getattr(experts, "shared_base", False) else
        f"experts that share one base MLP, a mixture of LoRA experts (got {type(experts).__name__})",
    ),
    # Slower than grouped_mm on an H100 at every case measured (BENCHMARKS.md): not in auto.
    ComputePath(
        name="triton", summary="Triton grouped GEMMs that gather and scatter rows in the kernel",
        rows=lambda experts, x_RD, counts_E: mlp.triton_rows(experts, x_RD, counts_E), routed=triton_tokens,
        missing=lambda experts, x: mlp.triton_missing(experts, compute_dtype(x), x.device.type),
    ),
):
    register_compute_path(_path)
