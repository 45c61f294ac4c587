"""Kernels for experts held as stacked MLP weights, whoever holds them.

An experts class that declares ``stacked_mlp = True`` exposes, in ``nn.Linear``'s
(out, in) layout stacked on dim 0: ``w_in`` (E, H, D), ``w_out`` (E, D, F), optional
``b_in`` (E, H) and ``b_out`` (E, D), ``activation`` (a name of ``ACTIVATIONS``) and
``is_glu`` (H = 2F, gate rows first, then up rows; otherwise H = F). Every function
here runs such an ``mlp`` on rows grouped by expert (``counts_E[e]`` rows each):

- ``segment_rows``: one matrix multiply per expert, fused backward (``ops.segment_mlp``);
- ``grouped_rows``: all experts in one ``torch.nn.functional.grouped_mm`` per projection;
- ``routed_tokens``: tokens to weighted output rows, one expert at a time, with no
  (R, D) tensor (``ops.routed_mlp``);
- ``triton_rows``: the Triton grouped GEMMs, optionally gathering input rows and
  scattering output rows inside the kernel;
- ``shared_base_tokens``: experts that share one base MLP (mixtures of LoRA experts),
  the base once per token;
- ``gemv_tokens``: a few rows per expert without gradients (decoding on CPU): gather,
  both projections and the weighted sum in one numba kernel call (``kernels.cpu_gemv``).

An ``mlp`` may also carry low-rank adapters on either projection (LoRA experts):
``low_rank_in`` and ``low_rank_out``, each None or a ``LowRank`` (A (E, r, in), B (E,
out, r), scale), adding scale·B_e(A_e·x) to the projection. Every function here adds
them, with two grouped GEMMs per projection where ``grouped_mm`` can run them
(``low_rank_rows``).

Shapes: T tokens (or source rows), K experts per token, R routed rows, D model dim,
H first projection width, F expert hidden dim, E experts, r adapter rank.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import switches
from .kernels import cpu_gemv
from .low_rank import (
    GROUPED_MM_ALIGN_BYTES,
    GROUPED_MM_DTYPES,
    LowRank,
    add_low_rank_,
    low_rank_expert,
    low_rank_rows,
)
from .ops import ACTIVATIONS, glu, routed_mlp, segment_mlp
from .precision import autocast_dtype, autocast_operands


def hidden_activation(h: Tensor, activation: str, is_glu: bool) -> Tensor:
    """act(h), or act(gate)·up for GLU experts, with the fastest kernel for h's device."""
    if not is_glu:
        return ACTIVATIONS[activation](h)
    # On CUDA one fused Triton kernel replaces the act, the multiply and their
    # temporaries (forward and backward).
    if switches.use_fused_glu(h):
        from .kernels import triton_glu

        return triton_glu.glu(h, activation)
    if h.device.type == "cpu":
        return glu(h, activation)
    gate, up = h.chunk(2, dim=-1)
    return ACTIVATIONS[activation](gate) * up


def _onednn_linear():
    try:
        return torch.ops.mkldnn._linear_pointwise if torch.backends.mkldnn.is_available() else None
    except (AttributeError, RuntimeError):
        return None


# oneDNN's inner product reads a float32 weight for a few rows at 2-3x the speed of the
# BLAS GEMM behind F.linear on CPU (BENCHMARKS.md, "Decode bandwidth"), but costs about
# 17 µs more per call: it pays from 1 MiB weights. It has no autograd formula, so only
# calls that need no gradient take it.
_ONEDNN_LINEAR = _onednn_linear()
DECODE_MAX_ROWS = 16
ONEDNN_MIN_WEIGHT_BYTES = 1 << 20


def linear(x_ND: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear``, through oneDNN for a few float32 rows on CPU when no gradient is needed."""
    if (_ONEDNN_LINEAR is not None and x_ND.shape[0] <= DECODE_MAX_ROWS and x_ND.dim() == 2
            and weight.numel() * weight.element_size() >= ONEDNN_MIN_WEIGHT_BYTES
            and x_ND.device.type == "cpu" and x_ND.dtype == weight.dtype == torch.float32
            and not (torch.is_grad_enabled() and (x_ND.requires_grad or weight.requires_grad
                                                  or (bias is not None and bias.requires_grad)))
            and (bias is None or bias.dtype == torch.float32)):
        return _ONEDNN_LINEAR(x_ND.contiguous(), weight, bias, "none", [], "")
    return F.linear(x_ND, weight, bias)


def low_rank_pair(mlp) -> tuple[LowRank | None, LowRank | None]:
    """The adapters of ``mlp``'s first and second projections (None where it has none)."""
    if not hasattr(type(mlp), "low_rank_in"):  # the common case, without nn.Module's slow attribute miss
        return None, None
    return mlp.low_rank_in, getattr(mlp, "low_rank_out", None)


def expert_mlp(mlp, e: int, x_ND: Tensor) -> Tensor:
    """Expert e of ``mlp`` on its rows, with torch's own layers: the readable reference."""
    b_in = None if mlp.b_in is None else mlp.b_in[e]
    b_out = None if mlp.b_out is None else mlp.b_out[e]
    delta_in, delta_out = low_rank_pair(mlp)
    h = linear(x_ND, mlp.w_in[e], b_in)
    if delta_in is not None:
        h = h + low_rank_expert(x_ND, delta_in, e)
    a = hidden_activation(h, mlp.activation, mlp.is_glu)
    y = linear(a, mlp.w_out[e], b_out)
    if delta_out is not None:
        y = y + low_rank_expert(a, delta_out, e)
    return y


def segment_rows(mlp, x_RD: Tensor, counts_E: Tensor) -> Tensor:
    """One matrix multiply per non-empty expert, one autograd node (see ``ops.segment_mlp``)."""
    x_RD, w_in, b_in, w_out, b_out = autocast_operands(x_RD.device.type, x_RD, mlp.w_in, mlp.b_in, mlp.w_out,
                                                       mlp.b_out)
    counts = counts_E.tolist()  # NOTE: .tolist() syncs with the device
    return segment_mlp(x_RD, w_in, b_in, w_out, b_out, counts, mlp.activation, mlp.is_glu)


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous.

    grouped_mm's backward rejects expanded gradients (those of ``y.sum()``).
    """

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: Tensor) -> Tensor:
        if grad.numel() == 0:  # an empty expanded grad stays "contiguous" with zero strides
            return grad.new_empty(grad.shape)
        return grad.contiguous()


def contiguous_grad(x: Tensor) -> Tensor:
    """x, whose gradient reaches the ops before it as a contiguous tensor."""
    return _ContiguousGrad.apply(x) if x.requires_grad else x


def grouped_mm_missing(mlp, dtype: torch.dtype) -> str | None:
    """What ``grouped_rows`` lacks to run ``mlp`` in ``dtype``, or None when it can."""
    if not getattr(mlp, "stacked_mlp", False):
        return f"stacked MLP experts (got {type(mlp).__name__})"
    if dtype not in GROUPED_MM_DTYPES:
        return f"float32, bfloat16 or float16 (got {dtype})"
    item = dtype.itemsize
    if any((n * item) % GROUPED_MM_ALIGN_BYTES for n in (mlp.d_model, mlp.d_ff)):
        return (f"d_model and d_ff whose rows are multiples of {GROUPED_MM_ALIGN_BYTES} bytes "
                f"(got {mlp.d_model} and {mlp.d_ff} in {dtype})")
    return None


def grouped_rows(mlp, x_RD: Tensor, counts_E: Tensor) -> Tensor:
    """All experts in one ``grouped_mm`` per projection; no host sync."""
    offsets_E = counts_E.cumsum(0, dtype=torch.int32)
    x_RD, w_in, w_out = autocast_operands(x_RD.device.type, x_RD, mlp.w_in, mlp.w_out)
    R = x_RD.shape[0]
    delta_in, delta_out = low_rank_pair(mlp)
    # h's gradient comes from the activation's backward, which is always contiguous.
    h_RH = F.grouped_mm(x_RD, w_in.transpose(-2, -1), offs=offsets_E)
    if delta_in is not None:
        h_RH = add_low_rank_(h_RH, x_RD, delta_in, counts_E, offsets_E)
    if mlp.b_in is not None:
        h_RH = h_RH + mlp.b_in.to(h_RH.dtype).repeat_interleave(counts_E, dim=0, output_size=R)
    a_RF = hidden_activation(h_RH, mlp.activation, mlp.is_glu)
    y_RD = F.grouped_mm(a_RF, w_out.transpose(-2, -1), offs=offsets_E)
    if delta_out is not None:
        y_RD = add_low_rank_(y_RD, a_RF, delta_out, counts_E, offsets_E)
    # Callers may hand back any gradient, expanded ones included.
    y_RD = contiguous_grad(y_RD)
    if mlp.b_out is not None:
        y_RD = y_RD + mlp.b_out.to(y_RD.dtype).repeat_interleave(counts_E, dim=0, output_size=R)
    return y_RD


def routed_tokens(mlp, x_TD: Tensor, weights_TK: Tensor, order_R: Tensor, counts_E: Tensor) -> Tensor:
    """Σ_k weights_TK·E_e(x_t) over the routed assignments ``order_R`` (t·K + k, sorted by
    expert), one expert at a time from host-side counts; (T, D) in the weights' dtype.
    Experts with low-rank adapters gather their rows and run their own rows form."""
    if any(delta is not None for delta in low_rank_pair(mlp)):
        return _routed_by_rows(mlp, x_TD, weights_TK, order_R, counts_E)
    x_TD, w_in, b_in, w_out, b_out = autocast_operands(x_TD.device.type, x_TD, mlp.w_in, mlp.b_in, mlp.w_out,
                                                       mlp.b_out)
    counts = counts_E.tolist()  # NOTE: .tolist() syncs with the device
    return routed_mlp(x_TD, weights_TK, w_in, b_in, w_out, b_out, order_R, counts, mlp.activation, mlp.is_glu)


def _routed_by_rows(mlp, x_TD: Tensor, weights_TK: Tensor, order_R: Tensor, counts_E: Tensor) -> Tensor:
    K = weights_TK.shape[1]
    tokens_R = order_R // K
    y_RD = mlp(x_TD.index_select(0, tokens_R), counts_E)
    weights_R1 = weights_TK.reshape(-1)[order_R, None]
    y_TD = x_TD.new_zeros(x_TD.shape, dtype=weights_TK.dtype)
    return y_TD.index_add(0, tokens_R, weights_R1 * y_RD.to(weights_TK.dtype))


def shared_base_tokens(mlp, x_TD: Tensor, weights_TK: Tensor, order_R: Tensor, counts_E: Tensor) -> Tensor:
    """Σ_k weights_TK·E_e(x_t) for experts that are one base MLP plus low-rank adapters each
    (``shared_base``: a mixture of LoRA experts): the base projections run once per token,
    not once per routed row; (T, D) in the weights' dtype.

    The first projection of token t is the same for all its experts, so it is computed once
    and gathered; the second is linear, so Σ_k g_k·W_out·a_k = W_out·(Σ_k g_k·a_k) runs once
    per token on the weighted sum of the activations. The adapters add per routed row."""
    base = mlp.base
    K, T = weights_TK.shape[1], x_TD.shape[0]
    x_TD, w_in, b_in, w_out, b_out = autocast_operands(x_TD.device.type, x_TD, base.dense_w_in, base.dense_b_in,
                                                       base.dense_w_out, base.dense_b_out)
    delta_in, delta_out = low_rank_pair(mlp)
    tokens_R = order_R // K
    weights_R1 = weights_TK.reshape(-1)[order_R, None].to(x_TD.dtype)
    h_RH = F.linear(x_TD, w_in, b_in).index_select(0, tokens_R)
    if delta_in is not None:
        h_RH = add_low_rank_(h_RH, x_TD.index_select(0, tokens_R), delta_in, counts_E)
    a_RF = hidden_activation(h_RH, mlp.activation, mlp.is_glu)
    mixed_TF = a_RF.new_zeros(T, a_RF.shape[1]).index_add(0, tokens_R, weights_R1 * a_RF)
    y_TD = F.linear(mixed_TF, w_out)
    if b_out is not None:  # each kept assignment adds its weight times the bias
        kept_weight_T1 = weights_R1.new_zeros(T, 1).index_add(0, tokens_R, weights_R1)
        y_TD = y_TD + kept_weight_T1 * b_out
    if delta_out is not None:
        update_RD = add_low_rank_(a_RF.new_zeros(a_RF.shape[0], y_TD.shape[1]), a_RF, delta_out, counts_E)
        y_TD = y_TD.index_add(0, tokens_R, weights_R1 * update_RD)
    return y_TD.to(weights_TK.dtype)


def gemv_missing(mlp, dtype: torch.dtype, device_type: str) -> str | None:
    """What ``gemv_tokens`` lacks to run ``mlp`` in ``dtype`` on ``device_type``, or None:
    float32 stacked MLP experts, or int8 ones (``decode_weights``)."""
    if not cpu_gemv.HAS_NUMBA:
        return "the numba package"
    quantized = int8_capable(mlp)
    if not (getattr(mlp, "stacked_mlp", False) or quantized):
        return f"stacked MLP or int8 experts (got {type(mlp).__name__})"
    if quantized and mlp.decode_weights("w_in") is None:
        return "float32 or int8 weights (int4 experts run faster on torch's packed kernel: small_batch, segment)"
    delta_in, delta_out = low_rank_pair(mlp)
    if delta_in is not None or delta_out is not None:
        return "experts without low-rank adapters"
    weights_dtype = torch.float32 if quantized else mlp.w_in.dtype
    if dtype != torch.float32 or weights_dtype != torch.float32:
        return f"float32 weights and input (got {weights_dtype} weights, {dtype} input)"
    if device_type not in ("cpu", "meta"):
        return f"a CPU input (got {device_type})"
    if not quantized and not (mlp.w_in.is_contiguous() and mlp.w_out.is_contiguous()):
        return "contiguous stacked weights (one base shared by every expert is a view)"
    return None


def int8_capable(mlp) -> bool:
    """Whether ``mlp`` hands the kernel integer weights (``decode_weights``, a method: looked
    up on the class, which spares nn.Module's slow attribute miss on every decode call)."""
    return hasattr(type(mlp), "decode_weights")


def gemv_tokens(mlp, x_TD: Tensor, weights_TK: Tensor, experts_TK: Tensor) -> Tensor:
    """Σ_k weights_TK·E_e(x_t), e = experts_TK[t, k], in one numba kernel call
    (``kernels.cpu_gemv.decode_mlp``): the decode form, reading the reached experts' weights at
    memory speed. An assignment to expert E (the number of experts) is not routed. The
    kernel groups the assignments by expert itself, so a plan need not sort them. It has
    no backward: a call that needs gradients, or one in a forked child of a process that
    ran the kernel, runs the autograd form instead."""
    stacked = mlp.stacked_mlp
    if not cpu_gemv.usable() or (torch.is_grad_enabled() and any(
            t is not None and t.requires_grad
            for t in (x_TD, weights_TK, *((mlp.w_in, mlp.w_out, mlp.b_in, mlp.b_out) if stacked else ())))):
        flat_A = experts_TK.reshape(-1)
        counts_E = torch.bincount(flat_A, minlength=mlp.num_experts + 1)[:mlp.num_experts]
        order_R = torch.argsort(flat_A, stable=True)[:int(counts_E.sum())]  # expert E (not routed) sorts last
        if stacked:
            return routed_tokens(mlp, x_TD, weights_TK, order_R, counts_E)
        return _routed_by_rows(mlp, x_TD, weights_TK, order_R, counts_E)
    if stacked:
        w_in, w_out = cpu_gemv.Weights(32, mlp.w_in), cpu_gemv.Weights(32, mlp.w_out)
    else:
        w_in, w_out = mlp.decode_weights("w_in"), mlp.decode_weights("w_out")
    return cpu_gemv.decode_mlp(x_TD, weights_TK.float(), experts_TK, w_in, w_out, mlp.b_in, mlp.b_out,
                               mlp.activation, mlp.is_glu)


def gemv_rows(mlp, x_RD: Tensor, counts_E: Tensor) -> Tensor:
    """``gemv_tokens`` on rows already grouped by expert: each row its own token, weight one."""
    R = x_RD.shape[0]
    ones_R1 = torch.ones(R, 1, dtype=torch.float32, device=x_RD.device)
    experts_R1 = torch.arange(len(counts_E), device=x_RD.device).repeat_interleave(counts_E, output_size=R)
    return gemv_tokens(mlp, x_RD, ones_R1, experts_R1.view(R, 1))


def routed_rows(mlp, x_RD: Tensor, counts_E: Tensor) -> Tensor:
    """``routed_tokens`` on rows already grouped by expert: each row its own token, weight one."""
    R = x_RD.shape[0]
    weights_R1 = torch.ones(R, 1, dtype=x_RD.dtype if x_RD.dtype == torch.float64 else torch.float32,
                            device=x_RD.device)
    order_R = torch.arange(R, device=x_RD.device)
    return routed_tokens(mlp, x_RD, weights_R1, order_R, counts_E).to(x_RD.dtype)


def triton_missing(mlp, dtype: torch.dtype, device_type: str) -> str | None:
    """What the Triton kernels lack to run ``mlp`` in ``dtype`` on ``device_type``, or None."""
    from . import kernels

    if not kernels.HAS_TRITON:
        return "the triton package"
    if not getattr(mlp, "stacked_mlp", False):
        return f"stacked MLP experts (got {type(mlp).__name__})"
    if dtype not in kernels.supported_dtypes():
        return f"float32, bfloat16 or float16 (got {dtype})"
    if device_type not in ("cuda", "meta") and not kernels.interpreting():
        return f"a CUDA input (got {device_type}), or TRITON_INTERPRET=1 set before moekit is imported"
    return None


def triton_rows(mlp, x_SD: Tensor, counts_E: Tensor, order_R: Tensor | None = None, top_k: int = 1,
                num_out: int | None = None) -> Tensor:
    """The experts' MLP by the Triton kernels on the rows ``order_R // top_k`` of x (all rows,
    already grouped by expert, when ``order_R`` is None). Output row r lands on row
    ``order_R[r]`` of a (num_out, D) result, zero where no routed row writes."""
    from .kernels import gather_grouped_mm, grouped_mm_scatter

    cast = autocast_dtype(x_SD.device.type)
    w_in, w_out = mlp.w_in, mlp.w_out
    if cast is not None:
        x_SD, w_in, w_out = x_SD.to(cast), w_in.to(cast), w_out.to(cast)
    R = x_SD.shape[0] if order_R is None else order_R.shape[0]
    num_out = R if num_out is None else num_out
    delta_in, delta_out = low_rank_pair(mlp)
    h_RH = gather_grouped_mm(x_SD, w_in, order_R, counts_E, top_k)
    if delta_in is not None:
        rows_RD = x_SD if order_R is None else x_SD.index_select(0, order_R // top_k)
        h_RH = h_RH + low_rank_rows(rows_RD.to(h_RH.dtype), delta_in, counts_E)
    if mlp.b_in is not None:
        h_RH = h_RH + mlp.b_in.to(h_RH.dtype).repeat_interleave(counts_E, dim=0, output_size=R)
    a_RF = hidden_activation(h_RH, mlp.activation, mlp.is_glu)
    y_AD = grouped_mm_scatter(a_RF, w_out, order_R, counts_E, num_out)
    if delta_out is not None:
        d_RD = low_rank_rows(a_RF, delta_out, counts_E).to(y_AD.dtype)
        y_AD = y_AD + d_RD if order_R is None else y_AD.index_add(0, order_R, d_RD)
    if mlp.b_out is not None:
        b_out_RD = mlp.b_out.to(y_AD.dtype).repeat_interleave(counts_E, dim=0, output_size=R)
        # Only routed rows get the bias: dropped and padded assignments stay zero.
        y_AD = y_AD + b_out_RD if order_R is None else y_AD.index_add(0, order_R, b_out_RD)
    return y_AD
