"""Grouped expert GEMMs in Triton that gather and scatter rows inside the kernel.

Rows are sorted by expert (expert e owns rows ``offsets[e-1]:offsets[e]`` of
the routed rows, ``counts_E`` rows each), as the sorted dispatch plan orders them.
Instead of materialising the expert-sorted copy of the tokens and the
un-permuted copy of the outputs, the kernels read input rows through an index
vector and write output rows through another (the idea of ScatterMoE).

Two kernels:

* ``grouped_row_mm``: ``out[dst(r)] = A[src(r)] @ W[e(r)]ᵀ`` for every routed row r,
  with ``W`` taken through arbitrary strides, so ``W`` and ``Wᵀ`` need no copy.
* ``grouped_weight_grad``: ``dW[e] = Σ_{r in e} G[srcG(r)]ᵀ ⊗ A[srcA(r)]``, zero
  for experts with no rows.

Both accumulate in float32, take float32, bfloat16 or float16 operands and
write the operands' dtype. The launch grid is an upper bound that needs no
host sync: each program finds its (expert, row tile) from ``counts_E`` on the
device, and programs past the last tile return at once.

Two autograd functions run an expert MLP's two projections on them:
``gather_grouped_mm`` (tokens → sorted hidden rows) and ``grouped_mm_scatter``
(sorted hidden rows → un-permuted assignment rows). Their forward and
input-gradient GEMMs gather and scatter in the kernel; their weight gradients
read a gathered copy (see ``_gather`` for why).

Shapes: T tokens, K experts per token, A = T·K assignments, R routed rows,
D model dim, H first projection width (F, or 2F for GLU), F expert hidden
dim, E experts.

Set ``TRITON_INTERPRET=1`` before this module is imported to run the kernels
on CPU tensors in Triton's interpreter (tests do this when there is no GPU).
"""

from __future__ import annotations

import os

import torch
from torch import Tensor

try:
    import triton
    import triton.language as tl
except ImportError:  # Triton is optional: only the "triton" compute path needs it.
    triton = None
    tl = None

HAS_TRITON = triton is not None
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def interpreting() -> bool:
    """Whether Triton kernels run in the interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def supported_dtypes() -> tuple[torch.dtype, ...]:
    """Operand dtypes the kernels take; the interpreter also takes float64, which
    lets CPU tests check the kernels' indexing to float64 precision."""
    return DTYPES + (torch.float64,) if interpreting() else DTYPES


def _check(*tensors: Tensor) -> None:
    if not HAS_TRITON:
        raise RuntimeError("moekit's Triton kernels need the triton package (pip install triton)")
    dtype = tensors[0].dtype
    if dtype not in supported_dtypes() or any(t.dtype != dtype for t in tensors):
        raise TypeError(
            f"Triton grouped kernels take operands of one dtype among "
            f"{', '.join(str(d).removeprefix('torch.') for d in supported_dtypes())}; "
            f"got {[t.dtype for t in tensors]}"
        )


def _dot_options(dtype: torch.dtype) -> dict:
    # The interpreter's bf16 dot returns garbage (Triton 3.6), so it multiplies in fp32 there.
    upcast = interpreting() and dtype == torch.bfloat16
    # fp32 follows torch's own matmul setting, so results match torch's matmuls on the GPU.
    tf32 = dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32
    # float32 for every GPU dtype; float64 exists for the interpreter's exact checks.
    acc = tl.float64 if dtype == torch.float64 else tl.float32
    return {"UPCAST": upcast, "PRECISION": "tf32" if tf32 else "ieee", "ACC_DTYPE": acc}


if HAS_TRITON:

    def _configs(block_m: str, block_n: str, block_k: str) -> list:
        if interpreting():
            # One small tile: fast in the interpreter, and ragged edges get exercised.
            return [triton.Config({block_m: 16, block_n: 16, block_k: 16}, num_warps=1, num_stages=1)]
        shapes = [  # (m, n, k, warps, stages), sized for an H100's 228 KB of shared memory
            (128, 128, 64, 8, 3),
            (128, 128, 64, 4, 4),
            (128, 64, 64, 4, 4),
            (64, 128, 64, 4, 4),
            (64, 64, 64, 4, 4),
            (128, 128, 128, 8, 3),
        ]
        return [
            triton.Config({block_m: m, block_n: n, block_k: k}, num_warps=w, num_stages=s)
            for m, n, k, w, s in shapes
        ]

    def _prune(configs, named_args, **kwargs):
        # Narrow matrices (tests, toy layers) take the smallest tile: compiling
        # and timing every config would cost far more than it could save there.
        if named_args["N"] <= 64 and named_args["K"] <= 64:
            return [min(configs, key=lambda c: sorted(c.kwargs.values()))]
        return configs

    @triton.jit
    def _expert_rows(counts_ptr, E, e, E_POW2: tl.constexpr):
        """(first row, end row) of expert e's block of sorted rows."""
        experts = tl.arange(0, E_POW2)
        counts = tl.load(counts_ptr + experts, mask=experts < E, other=0)
        ends = tl.cumsum(counts, 0)
        end = tl.sum(tl.where(experts == e, ends, 0), 0)
        count = tl.sum(tl.where(experts == e, counts, 0), 0)
        return end - count, end

    @triton.autotune(configs=_configs("BLOCK_M", "BLOCK_N", "BLOCK_K"), key=["N", "K", "HAS_SRC", "HAS_DST"],
                     prune_configs_by={"early_config_prune": _prune})
    @triton.jit
    def _grouped_row_mm_kernel(
        a_ptr, w_ptr, out_ptr, src_ptr, dst_ptr, counts_ptr,
        N, K, E, src_div,
        stride_am, stride_ak, stride_we, stride_wn, stride_wk, stride_om, stride_on,
        HAS_SRC: tl.constexpr, HAS_DST: tl.constexpr, E_POW2: tl.constexpr,
        UPCAST: tl.constexpr, PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        pid = tl.program_id(0)
        num_n = tl.cdiv(N, BLOCK_N)
        # Neighbouring programs share a row tile, so its gathered rows are read from L2.
        pid_m = pid // num_n
        pid_n = pid % num_n

        experts = tl.arange(0, E_POW2)
        counts = tl.load(counts_ptr + experts, mask=experts < E, other=0)
        tiles = (counts + BLOCK_M - 1) // BLOCK_M
        tile_ends = tl.cumsum(tiles, 0)
        e = tl.sum((tile_ends <= pid_m).to(tl.int32), 0)
        if e >= E:  # the grid is an upper bound on the number of tiles
            return
        first_tile = tl.sum(tl.where(experts == e, tile_ends - tiles, 0), 0)
        row_end = tl.sum(tl.where(experts == e, tl.cumsum(counts, 0), 0), 0)
        row_start = row_end - tl.sum(tl.where(experts == e, counts, 0), 0)

        rows = row_start + (pid_m - first_tile) * BLOCK_M + tl.arange(0, BLOCK_M)
        row_ok = rows < row_end
        if HAS_SRC:
            src = tl.load(src_ptr + rows, mask=row_ok, other=0).to(tl.int64) // src_div
        else:
            src = rows.to(tl.int64)
        cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        col_ok = cols < N
        ks = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + src[:, None] * stride_am + ks[None, :] * stride_ak
        w_ptrs = w_ptr + e.to(tl.int64) * stride_we + cols[None, :] * stride_wn + ks[:, None] * stride_wk

        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
        for k0 in range(0, K, BLOCK_K):
            k_ok = ks < K - k0
            a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
            if UPCAST:
                a = a.to(tl.float32)
                w = w.to(tl.float32)
            acc = tl.dot(a, w, acc, input_precision=PRECISION, out_dtype=acc.dtype)
            a_ptrs += BLOCK_K * stride_ak
            w_ptrs += BLOCK_K * stride_wk

        if HAS_DST:
            dst = tl.load(dst_ptr + rows, mask=row_ok, other=0).to(tl.int64)
        else:
            dst = rows.to(tl.int64)
        out_ptrs = out_ptr + dst[:, None] * stride_om + cols[None, :] * stride_on
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])

    @triton.autotune(configs=_configs("BLOCK_M", "BLOCK_N", "BLOCK_K"), key=["N", "K", "HAS_G_SRC", "HAS_A_SRC"],
                     prune_configs_by={"early_config_prune": _prune})
    @triton.jit
    def _grouped_weight_grad_kernel(
        g_ptr, a_ptr, out_ptr, g_src_ptr, a_src_ptr, counts_ptr,
        N, K, E, g_div, a_div,
        stride_gm, stride_gn, stride_am, stride_ak, stride_oe, stride_on, stride_ok,
        HAS_G_SRC: tl.constexpr, HAS_A_SRC: tl.constexpr, E_POW2: tl.constexpr,
        UPCAST: tl.constexpr, PRECISION: tl.constexpr, ACC_DTYPE: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    ):
        pid = tl.program_id(0)
        num_n = tl.cdiv(N, BLOCK_N)
        num_k = tl.cdiv(K, BLOCK_K)
        e = pid // (num_n * num_k)
        pid_n = (pid // num_k) % num_n
        pid_k = pid % num_k
        row_start, row_end = _expert_rows(counts_ptr, E, e, E_POW2)

        ns = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_ok = ns < N
        ks = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
        k_ok = ks < K
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=ACC_DTYPE)
        for m0 in range(row_start, row_end, BLOCK_M):
            rows = m0 + tl.arange(0, BLOCK_M)
            row_ok = rows < row_end
            if HAS_G_SRC:
                g_rows = tl.load(g_src_ptr + rows, mask=row_ok, other=0).to(tl.int64) // g_div
            else:
                g_rows = rows.to(tl.int64)
            if HAS_A_SRC:
                a_rows = tl.load(a_src_ptr + rows, mask=row_ok, other=0).to(tl.int64) // a_div
            else:
                a_rows = rows.to(tl.int64)
            # G's tile is loaded transposed, (BLOCK_N, BLOCK_M), to feed the dot directly.
            g = tl.load(g_ptr + g_rows[None, :] * stride_gm + ns[:, None] * stride_gn,
                        mask=row_ok[None, :] & n_ok[:, None], other=0.0)
            a = tl.load(a_ptr + a_rows[:, None] * stride_am + ks[None, :] * stride_ak,
                        mask=row_ok[:, None] & k_ok[None, :], other=0.0)
            if UPCAST:
                g = g.to(tl.float32)
                a = a.to(tl.float32)
            acc = tl.dot(g, a, acc, input_precision=PRECISION, out_dtype=acc.dtype)

        out_ptrs = out_ptr + e.to(tl.int64) * stride_oe + ns[:, None] * stride_on + ks[None, :] * stride_ok
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=n_ok[:, None] & k_ok[None, :])


def grouped_row_mm(
    a: Tensor,
    w_ENK: Tensor,
    counts_E: Tensor,
    *,
    src_R: Tensor | None = None,
    src_div: int = 1,
    dst_R: Tensor | None = None,
    num_out_rows: int | None = None,
) -> Tensor:
    """``out[dst(r)] = a[src(r)] @ w[e(r)]ᵀ`` for the R routed rows, sorted by expert.

    Args:
        a: (rows, K) input; row ``src_R[r] // src_div`` feeds routed row r
            (row r itself when ``src_R`` is None, then a has R rows).
        w_ENK: (E, N, K) weights, any strides (pass ``w.transpose(1, 2)`` to multiply by w).
        counts_E: routed rows per expert (R = their sum = the length of the index vectors).
        dst_R: output row of each routed row (row r itself when None).
        num_out_rows: rows of the output (R when None); rows that no routed row
            writes are zero.

    Returns:
        (num_out_rows, N) in a's dtype.
    """
    _check(a, w_ENK)
    E, N, K = w_ENK.shape
    R = src_R.shape[0] if src_R is not None else (dst_R.shape[0] if dst_R is not None else a.shape[0])
    num_out_rows = R if num_out_rows is None else num_out_rows
    if dst_R is None and num_out_rows != R:
        raise ValueError(f"without dst_R the output has the R = {R} routed rows; got num_out_rows={num_out_rows}")
    # With R rows written to R distinct destinations every output row is written.
    out = (a.new_empty if num_out_rows == R else a.new_zeros)(num_out_rows, N)
    if R == 0 or N == 0:
        return out
    if K == 0:
        return out.zero_()
    counts_E = counts_E.contiguous()
    index = counts_E  # a stand-in pointer for an index vector the kernel does not read
    src = index if src_R is None else src_R.contiguous()
    dst = index if dst_R is None else dst_R.contiguous()

    def grid(meta):
        return ((triton.cdiv(R, meta["BLOCK_M"]) + E) * triton.cdiv(N, meta["BLOCK_N"]),)

    _grouped_row_mm_kernel[grid](
        a, w_ENK, out, src, dst, counts_E,
        N, K, E, src_div,
        a.stride(0), a.stride(1), w_ENK.stride(0), w_ENK.stride(1), w_ENK.stride(2),
        out.stride(0), out.stride(1),
        HAS_SRC=src_R is not None, HAS_DST=dst_R is not None,
        E_POW2=triton.next_power_of_2(E), **_dot_options(a.dtype),
    )
    return out


def grouped_weight_grad(
    g: Tensor,
    a: Tensor,
    counts_E: Tensor,
    *,
    g_src_R: Tensor | None = None,
    g_div: int = 1,
    a_src_R: Tensor | None = None,
    a_div: int = 1,
) -> Tensor:
    """``dW[e] = Σ_{r in e} g[srcG(r)]ᵀ ⊗ a[srcA(r)]``: (E, N, K), zero for experts without rows.

    Args:
        g: (rows, N); row ``g_src_R[r] // g_div`` belongs to routed row r (row r when None).
        a: (rows, K); row ``a_src_R[r] // a_div`` belongs to routed row r (row r when None).
        counts_E: routed rows per expert, rows sorted by expert.
    """
    _check(g, a)
    N, K, E = g.shape[1], a.shape[1], counts_E.shape[0]
    if g_src_R is not None:
        R = g_src_R.shape[0]
    elif a_src_R is not None:
        R = a_src_R.shape[0]
    else:
        R = g.shape[0]
    if R == 0 or N == 0 or K == 0:
        return g.new_zeros(E, N, K)
    out = g.new_empty(E, N, K)
    counts_E = counts_E.contiguous()
    g_src = counts_E if g_src_R is None else g_src_R.contiguous()
    a_src = counts_E if a_src_R is None else a_src_R.contiguous()

    def grid(meta):
        return (E * triton.cdiv(N, meta["BLOCK_N"]) * triton.cdiv(K, meta["BLOCK_K"]),)

    _grouped_weight_grad_kernel[grid](
        g, a, out, g_src, a_src, counts_E,
        N, K, E, g_div, a_div,
        g.stride(0), g.stride(1), a.stride(0), a.stride(1), out.stride(0), out.stride(1), out.stride(2),
        HAS_G_SRC=g_src_R is not None, HAS_A_SRC=a_src_R is not None,
        E_POW2=triton.next_power_of_2(E), **_dot_options(g.dtype),
    )
    return out


def _gather(x: Tensor, order_R: Tensor | None, div: int) -> Tensor:
    """Rows ``order_R // div`` of x, copied, for the weight gradient.

    grouped_weight_grad can gather in the kernel, but there the row indices
    are read inside the reduction loop, which on an H100 (Triton 3.6) halved
    its speed: dW of (8, 8192, 2048) from 32768 bf16 rows took 4.0 ms
    gathering in the kernel, 2.2 ms with this copy first. The forward and
    input-gradient kernels read their indices once per tile and gather freely.
    """
    if order_R is None:
        return x
    return x.index_select(0, order_R // div if div != 1 else order_R)


class _GatherGroupedMM(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, w_EHD, order_R, counts_E, top_k):
        ctx.save_for_backward(x_TD, w_EHD, order_R, counts_E)
        ctx.top_k = top_k
        return grouped_row_mm(x_TD, w_EHD, counts_E, src_R=order_R, src_div=top_k)

    @staticmethod
    def backward(ctx, grad_h_RH):
        x_TD, w_EHD, order_R, counts_E = ctx.saved_tensors
        T, D = x_TD.shape
        K = ctx.top_k
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            if order_R is None:
                grad_x = grouped_row_mm(grad_h_RH, w_EHD.transpose(1, 2), counts_E)
            else:
                # Each routed row's gradient lands on its assignment (t·K + k); the
                # K assignments of a token then sum. Dropped assignments stay zero.
                grad_AD = grouped_row_mm(grad_h_RH, w_EHD.transpose(1, 2), counts_E,
                                         dst_R=order_R, num_out_rows=T * K)
                grad_x = grad_AD if K == 1 else grad_AD.view(T, K, D).sum(1)
        if ctx.needs_input_grad[1]:
            grad_w = grouped_weight_grad(grad_h_RH, _gather(x_TD, order_R, K), counts_E)
        return grad_x, grad_w, None, None, None


class _GroupedMMScatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, a_RF, w_EDF, order_R, counts_E, num_assignments):
        ctx.save_for_backward(a_RF, w_EDF, order_R, counts_E)
        return grouped_row_mm(a_RF, w_EDF, counts_E, dst_R=order_R, num_out_rows=num_assignments)

    @staticmethod
    def backward(ctx, grad_y_AD):
        a_RF, w_EDF, order_R, counts_E = ctx.saved_tensors
        grad_a = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_a = grouped_row_mm(grad_y_AD, w_EDF.transpose(1, 2), counts_E, src_R=order_R)
        if ctx.needs_input_grad[1]:
            grad_w = grouped_weight_grad(_gather(grad_y_AD, order_R, 1), a_RF, counts_E)
        return grad_a, grad_w, None, None, None


def gather_grouped_mm(
    x_TD: Tensor, w_EHD: Tensor, order_R: Tensor | None, counts_E: Tensor, top_k: int
) -> Tensor:
    """Sorted hidden rows ``h[r] = x[order_R[r] // top_k] @ w[e(r)]ᵀ``: (R, H), differentiable.

    ``order_R`` is ``TokenChoicePlan.order_R`` (assignment index t·K + k of each
    routed row, sorted by expert); None takes x's rows as already sorted. The
    gradient of x sums each token's K assignments; dropped ones contribute zero.
    """
    return _GatherGroupedMM.apply(x_TD, w_EHD, order_R, counts_E, top_k)


def grouped_mm_scatter(
    a_RF: Tensor, w_EDF: Tensor, order_R: Tensor | None, counts_E: Tensor, num_assignments: int
) -> Tensor:
    """Un-permuted output rows ``y[order_R[r]] = a[r] @ w[e(r)]ᵀ``: (num_assignments, D), differentiable.

    Rows that no routed row writes (dropped or padded assignments) are zero;
    ``order_R`` None keeps the sorted order (then num_assignments = R).
    """
    return _GroupedMMScatter.apply(a_RF, w_EDF, order_R, counts_E, num_assignments)
