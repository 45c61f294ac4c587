"""The numba kernel behind ``cpu_gemv.decode_mlp`` (imported on first use: it imports numba).

Compiled functions live at module level so numba's on-disk cache finds them again in
the next process."""

from __future__ import annotations

import math

import numba
import numpy as np
from numba import prange

# Output rows per work item: 64 rows of a 512-wide float32 weight are 128 KiB, which
# stay in L2 while the expert's input rows pass over them.
BLOCK_ROWS = 64
# Experts with at least this many rows take four at a time (``project``).
TILE_FROM_ROWS = 8
SQRT_HALF = np.float32(0.7071067811865476)
SQRT_TWO_OVER_PI = np.float32(0.7978845608028654)


@numba.njit(inline="always", fastmath=True, cache=True)
def activate(v, code):  # pragma: no cover - compiled
    """relu, gelu, gelu_tanh, silu for codes 0-3 (``cpu_gemv.ACTIVATION_CODES``)."""
    one, half = np.float32(1.0), np.float32(0.5)
    if code == 0:
        return max(v, np.float32(0.0))
    if code == 1:
        return half * v * (one + np.float32(math.erf(v * SQRT_HALF)))
    if code == 2:
        return half * v * (one + np.float32(math.tanh(SQRT_TWO_OVER_PI * (v + np.float32(0.044715) * v * v * v))))
    return v / (one + np.float32(math.exp(-v)))


@numba.njit(inline="always", fastmath=True, cache=True)
def dots_4(w_I, x_RI, m, width_in):  # pragma: no cover - compiled
    """w·x[m + j] for j < 4: one pass over the weight row feeds four input rows."""
    x0, x1, x2, x3 = x_RI[m], x_RI[m + 1], x_RI[m + 2], x_RI[m + 3]
    t0 = t1 = t2 = t3 = np.float32(0.0)
    for i in range(width_in):
        w = np.float32(w_I[i])
        t0 += w * x0[i]
        t1 += w * x1[i]
        t2 += w * x2[i]
        t3 += w * x3[i]
    return t0, t1, t2, t3


@numba.njit(inline="always", fastmath=True, cache=True)
def dot_1(w_I, x_RI, m, width_in):  # pragma: no cover - compiled
    x0 = x_RI[m]
    t0 = np.float32(0.0)
    for i in range(width_in):
        t0 += np.float32(w_I[i]) * x0[i]
    return t0


@numba.njit(parallel=True, fastmath=True, nogil=True, cache=True)
def project(w_EOI, scale_EO, x_RI, starts_E1, reached_J, out_RO):  # pragma: no cover - compiled
    """out[r] = w[e]·x[r] for the rows starts[e]:starts[e+1] of each reached expert e, in
    parallel over (expert, block of output rows). Float32 weights with an empty scale, or
    int8 ones with a scale per output row (w = q·scale); numba compiles one loop for each.

    An expert with fewer than ``TILE_FROM_ROWS`` rows meets each weight row with all of its
    rows while that row is in L1. One with more passes over the block (in L2) four rows at
    a time, one load of a weight feeding four multiply-adds: the layer is 1.3-1.4x faster
    at 64 tokens on the standard shape (16 rows per expert). Passes of four for every
    expert made 4 and 16 tokens 1.1-1.25x slower (BENCHMARKS.md, "Leaner decode calls")."""
    width_out, width_in = w_EOI.shape[1], w_EOI.shape[2]
    scaled = scale_EO.shape[0] > 0
    blocks = (width_out + BLOCK_ROWS - 1) // BLOCK_ROWS
    for item in prange(reached_J.shape[0] * blocks):
        e = reached_J[item // blocks]
        first = (item % blocks) * BLOCK_ROWS
        last = min(width_out, first + BLOCK_ROWS)
        m, end = starts_E1[e], starts_E1[e + 1]
        if end - m >= TILE_FROM_ROWS:
            while end - m >= 4:
                for o in range(first, last):
                    s = scale_EO[e, o] if scaled else np.float32(1.0)
                    t0, t1, t2, t3 = dots_4(w_EOI[e, o], x_RI, m, width_in)
                    out_RO[m, o], out_RO[m + 1, o] = t0 * s, t1 * s
                    out_RO[m + 2, o], out_RO[m + 3, o] = t2 * s, t3 * s
                m += 4
        for o in range(first, last):
            s = scale_EO[e, o] if scaled else np.float32(1.0)
            for r in range(m, end):
                out_RO[r, o] = dot_1(w_EOI[e, o], x_RI, r, width_in) * s


@numba.njit(nogil=True, cache=True)
def project_any(bits, weights, x_RI, starts_E1, reached_J, out_RO):  # pragma: no cover - compiled
    """The projection in the weights' format: float32 (bits 32) or int8."""
    w, q8, scale = weights
    if bits == 32:
        project(w, scale, x_RI, starts_E1, reached_J, out_RO)
    else:
        project(q8, scale, x_RI, starts_E1, reached_J, out_RO)


@numba.njit(nogil=True, cache=True)
def group_by_expert(experts_A, num_experts):  # pragma: no cover - compiled
    """(order_R, starts_E1, reached_J, bad): the assignments whose expert is below
    ``num_experts`` in a stable order by expert, where each expert's rows start, the
    experts that have rows, and the first assignment whose expert is out of [0, E] (-1:
    none). Expert E marks an assignment that is not routed (dropped, padding)."""
    counts_E1 = np.zeros(num_experts + 1, np.int64)
    for a in range(experts_A.shape[0]):
        e = experts_A[a]
        if e < 0 or e > num_experts:
            return np.empty(0, np.int64), counts_E1, np.empty(0, np.int64), a
        counts_E1[e] += 1
    starts_E1 = np.zeros(num_experts + 1, np.int64)
    reached = 0
    for e in range(num_experts):
        starts_E1[e + 1] = starts_E1[e] + counts_E1[e]
        reached += counts_E1[e] > 0
    reached_J = np.empty(reached, np.int64)
    j = 0
    for e in range(num_experts):
        if counts_E1[e] > 0:
            reached_J[j] = e
            j += 1
    next_row = starts_E1[:num_experts].copy()
    order_R = np.empty(starts_E1[num_experts], np.int64)
    for a in range(experts_A.shape[0]):
        e = experts_A[a]
        if e < num_experts:
            order_R[next_row[e]] = a
            next_row[e] += 1
    return order_R, starts_E1, reached_J, -1


@numba.njit(fastmath=True, nogil=True, cache=True)
def decode_mlp_kernel(x_TD, experts_A, weights_A, top_k, num_experts, bits, w_in, w_out, hidden, b_in, b_out,
                      activation, glu, out_TD):  # pragma: no cover - compiled
    """out_TD = Σ weights_A[a]·E_e(x_TD[a // top_k]) over the assignments a, e = experts_A[a],
    whose expert is below ``num_experts`` (E marks one not routed); returns ``bad`` of
    ``group_by_expert`` (-1, or nothing computed). w_in and w_out are (float32 w, int8 q,
    (E, O) scale), of which ``bits`` (32 or 8) says which are used; hidden is w_in's output
    width H; b_in (E, H) and b_out (E, D) have no rows for experts without biases."""
    order_R, starts_E1, reached_J, bad = group_by_expert(experts_A, num_experts)
    if bad >= 0:
        return bad
    R, D = order_R.shape[0], x_TD.shape[1]
    H = hidden
    F = H // 2 if glu else H
    zero = np.float32(0.0)
    has_b_in, has_b_out = b_in.shape[0] > 0, b_out.shape[0] > 0
    x_RD = np.empty((R, D), np.float32)
    for r in range(R):
        x_RD[r] = x_TD[order_R[r] // top_k]
    h_RH = np.empty((R, H), np.float32)
    project_any(bits, w_in, x_RD, starts_E1, reached_J, h_RH)
    a_RF = np.empty((R, F), np.float32)
    for e in reached_J:
        for r in range(starts_E1[e], starts_E1[e + 1]):
            for f in range(F):
                v = h_RH[r, f] + (b_in[e, f] if has_b_in else zero)
                if glu:
                    up = h_RH[r, F + f] + (b_in[e, F + f] if has_b_in else zero)
                    a_RF[r, f] = activate(v, activation) * up
                else:
                    a_RF[r, f] = activate(v, activation)
    y_RD = np.empty((R, D), np.float32)
    project_any(bits, w_out, a_RF, starts_E1, reached_J, y_RD)
    out_TD[:] = zero
    for e in reached_J:
        for r in range(starts_E1[e], starts_E1[e + 1]):
            t, weight = order_R[r] // top_k, weights_A[order_R[r]]
            for d in range(D):
                out_TD[t, d] += weight * (y_RD[r, d] + (b_out[e, d] if has_b_out else zero))
    return -1
