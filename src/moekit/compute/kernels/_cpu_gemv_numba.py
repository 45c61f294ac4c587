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


@numba.njit(parallel=True, fastmath=True, nogil=True, cache=True)
def project(w_EOI, scale_EO, x_RI, starts_E1, reached_J, out_RO):  # pragma: no cover - compiled
    """out[r] = w[e]·x[r] for the rows starts[e]:starts[e+1] of each reached expert e, in
    parallel over (expert, block of output rows). Float32 weights with an empty scale, or
    int8 ones with a scale per output row (w = q·scale); numba compiles one loop for each."""
    width_out, width_in = w_EOI.shape[1], w_EOI.shape[2]
    scaled = scale_EO.shape[0] > 0
    blocks = (width_out + BLOCK_ROWS - 1) // BLOCK_ROWS
    for item in prange(reached_J.shape[0] * blocks):
        e = reached_J[item // blocks]
        first = (item % blocks) * BLOCK_ROWS
        for o in range(first, min(width_out, first + BLOCK_ROWS)):
            for m in range(starts_E1[e], starts_E1[e + 1]):
                total = np.float32(0.0)
                for i in range(width_in):
                    total += np.float32(w_EOI[e, o, i]) * x_RI[m, i]
                out_RO[m, o] = total * scale_EO[e, o] if scaled else total


@numba.njit(nogil=True, cache=True)
def project_any(bits, weights, x_RI, starts_E1, reached_J, out_RO):  # pragma: no cover - compiled
    """The projection in the weights' format: float32 (bits 32) or int8."""
    w, q8, scale = weights
    if bits == 32:
        project(w, scale, x_RI, starts_E1, reached_J, out_RO)
    else:
        project(q8, scale, x_RI, starts_E1, reached_J, out_RO)


@numba.njit(fastmath=True, nogil=True, cache=True)
def decode_mlp_kernel(x_TD, order_R, weights_A, top_k, starts_E1, reached_J, bits, w_in, w_out, hidden, b_in,
                      b_out, activation, glu, out_TD):  # pragma: no cover - compiled
    """out_TD = Σ weights_A[a]·E_e(x_TD[a // top_k]) over the assignments a = order_R[r],
    grouped by expert. w_in and w_out are (float32 w, int8 q, (E, O) scale), of which
    ``bits`` (32 or 8) says which are used; hidden is w_in's output width H; b_in (E, H)
    and b_out (E, D) have no rows for experts without biases."""
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
