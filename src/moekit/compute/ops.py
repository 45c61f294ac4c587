"""The ops every fast path stands on, each with a hand-written backward where autograd's is slow.

``segment_mlp`` runs E expert MLPs over rows sorted by expert as one autograd
node: per-expert matrix multiplies write into preallocated buffers, gradients
of the stacked weights are written in place (no per-expert zero tensors, no
concatenations), and the activation is recomputed in backward from the
pre-activation instead of being stored. ``routed_mlp`` goes one step further:
from tokens to the combined output in one node, one expert at a time, with no
(R, D) tensor at all. ``permute_rows`` and
``gather_tokens`` replace indexing whose autograd backward would be a serial
scatter-add with gathers by the inverse permutation. ``glu`` keeps only the
pre-activation for backward. ``weighted_sum`` combines each token's K outputs.

Shapes: T tokens, K experts per token, R routed rows, D model dim, H first
projection width (F, or 2F for GLU), F expert hidden dim, E experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def _activation_forward(h_RH: Tensor, activation: str, glu: bool) -> Tensor:
    if glu:
        gate, up = h_RH.chunk(2, dim=-1)
        if torch.compiler.is_compiling() or torch.is_grad_enabled():
            return _act(gate, activation) * up
        # One buffer for the result, filled in place: on CPU every fresh large
        # allocation pays its page faults, which cost more than the arithmetic here
        # (3.5× at 32768 × 128, 1.6× at 8192 × 1024, measured).
        a_RF = h_RH.new_empty(gate.shape)
        _act_out(gate, activation, a_RF)
        return a_RF.mul_(up)
    return _act(h_RH, activation)


def _act_out(x: Tensor, activation: str, out: Tensor) -> Tensor:
    """act(x) written into ``out``."""
    aten = torch.ops.aten
    if activation == "silu":
        return aten.silu.out(x, out=out)
    if activation in ("gelu", "gelu_tanh"):
        return aten.gelu.out(x, approximate="tanh" if activation == "gelu_tanh" else "none", out=out)
    return torch.clamp_min(x, 0, out=out)


def _gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu, "gelu_tanh": _gelu_tanh, "silu": F.silu}


def _act(x: Tensor, activation: str) -> Tensor:
    return ACTIVATIONS[activation](x)


def _act_backward(grad_out: Tensor, x: Tensor, activation: str, out: Tensor | None = None) -> Tensor:
    """grad_out · act'(x) with torch's fused backward kernels, written into ``out`` when given."""
    aten = torch.ops.aten
    if out is None:
        if activation == "silu":
            return aten.silu_backward(grad_out, x)
        if activation in ("gelu", "gelu_tanh"):
            return aten.gelu_backward(grad_out, x, approximate="tanh" if activation == "gelu_tanh" else "none")
        return aten.threshold_backward(grad_out, x, 0)
    if activation == "silu":
        return aten.silu_backward.grad_input(grad_out, x, grad_input=out)
    if activation in ("gelu", "gelu_tanh"):
        return aten.gelu_backward.grad_input(grad_out, x, approximate="tanh" if activation == "gelu_tanh" else "none",
                                             grad_input=out)
    return aten.threshold_backward.grad_input(grad_out, x, 0, grad_input=out)


def _activation_backward(h_RH: Tensor, grad_a_RF: Tensor, activation: str, glu: bool) -> Tensor:
    if not glu:
        return _act_backward(grad_a_RF, h_RH, activation)
    gate, up = h_RH.chunk(2, dim=-1)
    # Both halves are computed in their slots of the one output buffer (see
    # _activation_forward on allocations): grad_up = grad_a·act(gate),
    # grad_gate = (grad_a·up)·act'(gate).
    grad_h_RH = torch.empty_like(h_RH)
    grad_gate, grad_up = grad_h_RH.chunk(2, dim=-1)
    _act_out(gate, activation, grad_up).mul_(grad_a_RF)
    torch.mul(grad_a_RF, up, out=grad_gate)
    _act_backward(grad_gate, gate, activation, out=grad_gate)
    return grad_h_RH


class _GLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, h_RH: Tensor, activation: str) -> Tensor:
        ctx.save_for_backward(h_RH)
        ctx.activation = activation
        return _activation_forward(h_RH, activation, glu=True)

    @staticmethod
    def backward(ctx, grad_a_RF: Tensor):
        (h_RH,) = ctx.saved_tensors
        return _activation_backward(h_RH, grad_a_RF.contiguous(), ctx.activation, glu=True), None


def glu(h_RH: Tensor, activation: str) -> Tensor:
    """``act(gate) · up`` for ``gate, up = h.chunk(2, -1)``, keeping only h for backward
    and writing both halves of its gradient in place (no concatenation)."""
    if not (torch.is_grad_enabled() and h_RH.requires_grad) or torch.compiler.is_compiling():
        return _activation_forward(h_RH, activation, glu=True)
    return _GLU.apply(h_RH, activation)


class _SegmentMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_RD, w_in_EHD, b_in_EH, w_out_EDF, b_out_ED, counts, activation, glu):
        R = x_RD.shape[0]
        E, H, D = w_in_EHD.shape
        h_RH = x_RD.new_empty(R, H)
        y_RD = x_RD.new_empty(R, D)
        bounds = _bounds(counts)
        for e, (start, stop) in enumerate(bounds):
            if stop > start:
                torch.mm(x_RD[start:stop], w_in_EHD[e].t(), out=h_RH[start:stop])
                if b_in_EH is not None:
                    h_RH[start:stop] += b_in_EH[e]
        a_RF = _activation_forward(h_RH, activation, glu)
        for e, (start, stop) in enumerate(bounds):
            if stop > start:
                torch.mm(a_RF[start:stop], w_out_EDF[e].t(), out=y_RD[start:stop])
                if b_out_ED is not None:
                    y_RD[start:stop] += b_out_ED[e]
        ctx.save_for_backward(x_RD, h_RH, w_in_EHD, w_out_EDF)
        ctx.bounds, ctx.activation, ctx.glu = bounds, activation, glu
        ctx.has_bias = (b_in_EH is not None, b_out_ED is not None)
        return y_RD

    @staticmethod
    def backward(ctx, grad_y_RD):
        x_RD, h_RH, w_in_EHD, w_out_EDF = ctx.saved_tensors
        grad_y_RD = grad_y_RD.contiguous()
        bounds = ctx.bounds
        a_RF = _activation_forward(h_RH, ctx.activation, ctx.glu)  # recomputed, not stored
        grad_a_RF = torch.empty_like(a_RF)
        grad_w_out = torch.empty_like(w_out_EDF)
        grad_b_out = grad_y_RD.new_zeros(w_out_EDF.shape[:2]) if ctx.has_bias[1] else None
        for e, (start, stop) in enumerate(bounds):
            if stop > start:
                g = grad_y_RD[start:stop]
                torch.mm(g, w_out_EDF[e], out=grad_a_RF[start:stop])
                torch.mm(g.t(), a_RF[start:stop], out=grad_w_out[e])
                if grad_b_out is not None:
                    grad_b_out[e] = g.sum(0)
            else:
                grad_w_out[e].zero_()
        del a_RF
        grad_h_RH = _activation_backward(h_RH, grad_a_RF, ctx.activation, ctx.glu)
        del grad_a_RF
        grad_x_RD = torch.empty_like(x_RD) if ctx.needs_input_grad[0] else None
        grad_w_in = torch.empty_like(w_in_EHD)
        grad_b_in = grad_h_RH.new_zeros(w_in_EHD.shape[:2]) if ctx.has_bias[0] else None
        for e, (start, stop) in enumerate(bounds):
            if stop > start:
                g = grad_h_RH[start:stop]
                if grad_x_RD is not None:
                    torch.mm(g, w_in_EHD[e], out=grad_x_RD[start:stop])
                torch.mm(g.t(), x_RD[start:stop], out=grad_w_in[e])
                if grad_b_in is not None:
                    grad_b_in[e] = g.sum(0)
            else:
                grad_w_in[e].zero_()
        return grad_x_RD, grad_w_in, grad_b_in, grad_w_out, grad_b_out, None, None, None


def _bounds(counts: list[int]) -> list[tuple[int, int]]:
    bounds, start = [], 0
    for n in counts:
        bounds.append((start, start + n))
        start += n
    return bounds


def segment_mlp(
    x_RD: Tensor,
    w_in_EHD: Tensor,
    b_in_EH: Tensor | None,
    w_out_EDF: Tensor,
    b_out_ED: Tensor | None,
    counts: list[int],
    activation: str,
    glu: bool,
) -> Tensor:
    """E expert MLPs on rows sorted by expert (``counts[e]`` rows each), one autograd node.

    ``y = act(x·w_inᵀ + b_in)·w_outᵀ + b_out`` per expert, with the GLU form
    ``act(gate)·up`` when ``glu`` (w_in rows: gate first, then up). A call that needs
    no gradient runs ``_segment_mlp_inference``.
    """
    tensors = (x_RD, w_in_EHD, b_in_EH, w_out_EDF, b_out_ED)
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors):
        return _SegmentMLP.apply(*tensors, counts, activation, glu)
    return _segment_mlp_inference(*tensors, counts, activation, glu)


def _segment_mlp_inference(x_RD, w_in_EHD, b_in_EH, w_out_EDF, b_out_ED, counts, activation, glu) -> Tensor:
    """``segment_mlp`` without autograd, one whole expert at a time through cache-sized
    buffers (first product, activation, second product into the output) instead of each
    step over all rows: the same operations on each row, so the same bits; at the
    standard shape 1.07-1.24x faster than grouped_mm (BENCHMARKS.md, "Forward without
    gradients")."""
    y_RD = x_RD.new_empty(x_RD.shape[0], w_out_EDF.shape[1])
    most = max(counts, default=0)
    h_NH = x_RD.new_empty(most, w_in_EHD.shape[1])
    a_NF = x_RD.new_empty(most, w_out_EDF.shape[2]) if glu else None
    for e, (start, stop) in enumerate(_bounds(counts)):
        if stop == start:
            continue
        n = stop - start
        h = torch.mm(x_RD[start:stop], w_in_EHD[e].t(), out=h_NH[:n])
        if b_in_EH is not None:
            h += b_in_EH[e]
        if glu:
            gate, up = h.chunk(2, dim=-1)
            a = _act_out(gate, activation, a_NF[:n]).mul_(up)
        else:
            a = _act_out(h, activation, h)
        y = torch.mm(a, w_out_EDF[e].t(), out=y_RD[start:stop])
        if b_out_ED is not None:
            y += b_out_ED[e]
    return y_RD


class _PermuteRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_ND: Tensor, perm_N: Tensor, inverse_N: Tensor) -> Tensor:
        ctx.save_for_backward(inverse_N)
        return x_ND.index_select(0, perm_N)

    @staticmethod
    def backward(ctx, grad_ND: Tensor):
        (inverse_N,) = ctx.saved_tensors
        return grad_ND.index_select(0, inverse_N), None, None


def permute_rows(x_ND: Tensor, perm_N: Tensor, inverse_N: Tensor) -> Tensor:
    """``x[perm]`` for a permutation, whose backward gathers by ``inverse`` (no scatter-add)."""
    if not (torch.is_grad_enabled() and x_ND.requires_grad):
        return x_ND.index_select(0, perm_N)  # no backward: skip the autograd node's overhead
    return _PermuteRows.apply(x_ND, perm_N, inverse_N)


class _GatherTokens(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD: Tensor, order_R: Tensor, top_k: int, inverse_R: Tensor | None) -> Tensor:
        ctx.save_for_backward(order_R, inverse_R)
        ctx.num_tokens, ctx.top_k = x_TD.shape[0], top_k
        return x_TD.index_select(0, order_R // top_k)

    @staticmethod
    def backward(ctx, grad_RD: Tensor):
        order_R, inverse_R = ctx.saved_tensors
        T, K = ctx.num_tokens, ctx.top_k
        if inverse_R is not None and grad_RD.device.type == "cpu" and T > 0:
            # Gather each token's K row gradients and sum them in one pass.
            grad_TD = F.embedding_bag(inverse_R.view(T, K), grad_RD.contiguous(), mode="sum")
            return grad_TD, None, None, None
        if inverse_R is not None:  # every assignment was routed: a permutation
            grad_TKD = grad_RD.index_select(0, inverse_R)
        else:
            grad_TKD = grad_RD.new_zeros(T * K, grad_RD.shape[1]).index_copy_(0, order_R, grad_RD)
        return grad_TKD.view(T, K, grad_RD.shape[1]).sum(1), None, None, None


def gather_tokens(x_TD: Tensor, order_R: Tensor, top_k: int, inverse_R: Tensor | None) -> Tensor:
    """Row ``order_R[r] // K`` of x for each routed row r.

    The backward sums each token's K row gradients by gathering (by
    ``inverse_R`` when all T·K assignments are routed) instead of scatter-adding.
    """
    if not (torch.is_grad_enabled() and x_TD.requires_grad):
        return x_TD.index_select(0, order_R // top_k)
    return _GatherTokens.apply(x_TD, order_R, top_k, inverse_R)


def _activation_into(h_NH: Tensor, activation: str, glu: bool, out_NF: Tensor) -> Tensor:
    """act(h), or act(gate)·up for GLU, written into ``out_NF``."""
    if not glu:
        return _act_out(h_NH, activation, out_NF)
    gate, up = h_NH.chunk(2, dim=-1)
    return _act_out(gate, activation, out_NF).mul_(up)


class _RoutedMLP(torch.autograd.Function):
    """See ``routed_mlp``. Per expert e, on its n routed rows (tokens ``tok``, gate
    weights ``w``): x_e = x[tok], h_e = x_e·w_inᵀ + b_in, a_e = act(h_e),
    y[tok] += w·(a_e·w_outᵀ + b_out). Only h (R, H) is stored; x_e and a_e are
    recomputed in backward, where dw = <dy[tok]·w_out, a_e> + dy[tok]·b_out
    needs no expert output either."""

    @staticmethod
    def forward(ctx, x_TD, weights_TK, w_in_EHD, b_in_EH, w_out_EDF, b_out_ED, order_R, counts, activation, glu):
        T, K = weights_TK.shape
        D, F_ = w_out_EDF.shape[1:]
        R = order_R.shape[0]
        token_R = order_R // K
        weights_R = weights_TK.reshape(-1).index_select(0, order_R)
        bounds = _bounds(counts)
        longest = max(counts, default=0)
        # Per-expert buffers of at most `longest` rows, reused across experts: they
        # stay in cache, and no (R, D) tensor is ever allocated (on CPU each fresh
        # large allocation is paid again in page faults).
        x_buf = x_TD.new_empty(longest, D)
        a_buf = x_TD.new_empty(longest, F_)
        y_buf = x_TD.new_empty(longest, D)
        h_RH = x_TD.new_empty(R, w_in_EHD.shape[1])
        y_TD = x_TD.new_zeros(T, D, dtype=weights_TK.dtype)
        for e, (start, stop) in enumerate(bounds):
            n = stop - start
            if n == 0:
                continue
            tok_N, w_N1 = token_R[start:stop], weights_R[start:stop, None]
            x_ND = torch.index_select(x_TD, 0, tok_N, out=x_buf[:n])
            h_NH = h_RH[start:stop]
            if b_in_EH is None:
                torch.mm(x_ND, w_in_EHD[e].t(), out=h_NH)
            else:
                torch.addmm(b_in_EH[e], x_ND, w_in_EHD[e].t(), out=h_NH)
            a_NF = _activation_into(h_NH, activation, glu, a_buf[:n])
            if b_out_ED is None:
                y_ND = torch.mm(a_NF, w_out_EDF[e].t(), out=y_buf[:n])
            else:
                y_ND = torch.addmm(b_out_ED[e], a_NF, w_out_EDF[e].t(), out=y_buf[:n])
            y_ND = y_ND.mul_(w_N1) if y_ND.dtype == y_TD.dtype else y_ND.to(y_TD.dtype).mul_(w_N1)
            y_TD.index_add_(0, tok_N, y_ND)
        ctx.save_for_backward(x_TD, weights_R, order_R, h_RH, w_in_EHD, w_out_EDF, b_out_ED)
        ctx.bounds, ctx.longest, ctx.activation, ctx.glu = bounds, longest, activation, glu
        ctx.has_bias, ctx.top_k = (b_in_EH is not None, b_out_ED is not None), K
        return y_TD

    @staticmethod
    def backward(ctx, grad_y_TD):
        x_TD, weights_R, order_R, h_RH, w_in_EHD, w_out_EDF, b_out_ED = ctx.saved_tensors
        T, D = x_TD.shape
        K, n_max, dtype = ctx.top_k, ctx.longest, x_TD.dtype
        token_R = order_R // K
        F_ = w_out_EDF.shape[-1]
        grad_y_buf = grad_y_TD.new_empty(n_max, D)
        x_buf, grad_x_buf = x_TD.new_empty(n_max, D), x_TD.new_empty(n_max, D)
        a_buf, grad_a_buf = x_TD.new_empty(n_max, F_), x_TD.new_empty(n_max, F_)
        need_x = ctx.needs_input_grad[0]
        # K rows add into each token's gradient: accumulate 16-bit inputs in float32.
        accumulate = torch.float32 if dtype.itemsize < 4 else dtype
        grad_x_TD = x_TD.new_zeros(T, D, dtype=accumulate) if need_x else None
        grad_weights_R = weights_R.new_empty(weights_R.shape)
        grad_w_in, grad_w_out = torch.empty_like(w_in_EHD), torch.empty_like(w_out_EDF)
        grad_b_in = w_in_EHD.new_zeros(w_in_EHD.shape[:2]) if ctx.has_bias[0] else None
        grad_b_out = w_out_EDF.new_zeros(w_out_EDF.shape[:2]) if ctx.has_bias[1] else None
        for e, (start, stop) in enumerate(ctx.bounds):
            n = stop - start
            if n == 0:
                grad_w_in[e].zero_()
                grad_w_out[e].zero_()
                continue
            tok_N, w_N1 = token_R[start:stop], weights_R[start:stop, None]
            h_NH = h_RH[start:stop]
            g_ND = torch.index_select(grad_y_TD, 0, tok_N, out=grad_y_buf[:n])  # dL/dy of these tokens
            g_c = g_ND if g_ND.dtype == dtype else g_ND.to(dtype)
            a_NF = _activation_into(h_NH, ctx.activation, ctx.glu, a_buf[:n])
            u_NF = torch.mm(g_c, w_out_EDF[e], out=grad_a_buf[:n])  # dL/da before the gate weight
            grad_w = (u_NF * a_NF).sum(1, dtype=grad_weights_R.dtype)
            if b_out_ED is not None:
                grad_w += g_c @ b_out_ED[e].to(g_c.dtype)
            grad_weights_R[start:stop] = grad_w
            # dL/d(expert output) = w·dL/dy
            g_c = g_ND.mul_(w_N1) if g_ND.dtype == dtype else (g_ND * w_N1).to(dtype)
            torch.mm(g_c.t(), a_NF, out=grad_w_out[e])
            if grad_b_out is not None:
                grad_b_out[e] = g_c.sum(0)
            grad_h_NH = _activation_backward(h_NH, u_NF.mul_(w_N1.to(dtype)), ctx.activation, ctx.glu)
            x_ND = torch.index_select(x_TD, 0, tok_N, out=x_buf[:n])
            torch.mm(grad_h_NH.t(), x_ND, out=grad_w_in[e])
            if grad_b_in is not None:
                grad_b_in[e] = grad_h_NH.sum(0)
            if need_x:
                grad_x_ND = torch.mm(grad_h_NH, w_in_EHD[e], out=grad_x_buf[:n])
                grad_x_TD.index_add_(0, tok_N, grad_x_ND.to(accumulate))
        grad_weights_TK = None
        if ctx.needs_input_grad[1]:
            grad_weights_TK = weights_R.new_zeros(T * K).index_copy_(0, order_R, grad_weights_R).view(T, K)
        if grad_x_TD is not None:
            grad_x_TD = grad_x_TD.to(dtype)
        return grad_x_TD, grad_weights_TK, grad_w_in, grad_b_in, grad_w_out, grad_b_out, None, None, None, None


def routed_mlp(
    x_TD: Tensor,
    weights_TK: Tensor,
    w_in_EHD: Tensor,
    b_in_EH: Tensor | None,
    w_out_EDF: Tensor,
    b_out_ED: Tensor | None,
    order_R: Tensor,
    counts: list[int],
    activation: str,
    glu: bool,
) -> Tensor:
    """``y_t = Σ_k weights_TK[t, k]·E_{e(t,k)}(x_t)`` over the routed assignments, one
    autograd node from tokens to combined output, in the weights' dtype.

    ``order_R`` lists the routed assignments (flat index t·K + k) sorted by
    expert, ``counts[e]`` of them for expert e; the experts are MLPs as in
    ``segment_mlp``. Each expert gathers its token rows, runs both projections
    and adds its weighted output into y in cache-sized per-expert buffers: no
    (R, D) gathered input, expert output or their gradients exist, which on CPU
    saves both the memory passes and the page faults of fresh (R, D) tensors.
    Runs one expert at a time from host-side counts, so it suits the CPU.
    """
    return _RoutedMLP.apply(x_TD, weights_TK, w_in_EHD, b_in_EH, w_out_EDF, b_out_ED, order_R, counts,
                            activation, glu)


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
