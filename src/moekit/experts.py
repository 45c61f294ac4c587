"""Experts: stacked FFN / GLU weights run by one grouped multiply, or any modules.

Stacked weights use the ``nn.Linear`` layout per expert, (out, in), stacked on
dim 0, so expert parallelism shards dim 0 and one ``grouped_mm`` runs them all:
``w_in`` is (E, F, D) for ``ffn`` and (E, 2F, D) for GLU experts (gate rows
first, then up rows), ``w_out`` is (E, D, F).

Shapes: R routed rows (sorted by expert), D model dim, F expert hidden dim,
E experts.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .kernels import triton_glu
from .ops import ACTIVATIONS, glu, routed_mlp, segment_mlp

EXPERTS = ("swiglu", "geglu", "ffn")
_GLU_ACTIVATION = {"swiglu": "silu", "geglu": "gelu"}
GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# grouped_mm needs every row stride to be a multiple of 16 bytes.
_GROUPED_MM_ALIGN_BYTES = 16


def grouped_mm_supports(experts: nn.Module, dtype: torch.dtype) -> bool:
    """Whether ``forward_grouped`` can run these experts on this dtype."""
    if not isinstance(experts, StackedExperts) or dtype not in GROUPED_MM_DTYPES:
        return False
    item = dtype.itemsize
    return all((n * item) % _GROUPED_MM_ALIGN_BYTES == 0 for n in (experts.d_model, experts.d_ff))


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


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    if torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def run_segments(experts: nn.Module, x_RD: Tensor, counts: list[int]) -> Tensor:
    """Apply ``experts.forward_expert(e, ·)`` to each expert's contiguous block of rows."""
    pieces = [experts.forward_expert(e, x_ND) for e, x_ND in enumerate(x_RD.split(counts)) if x_ND.shape[0] > 0]
    if not pieces:
        return x_RD.new_zeros(0, x_RD.shape[1])
    return torch.cat(pieces) if len(pieces) > 1 else pieces[0]


class StackedExperts(nn.Module):
    """E experts of one kind with stacked weights.

    Args:
        num_experts: E.
        d_model: D.
        d_ff: F, the hidden width of each expert.
        kind: ``swiglu``, ``geglu`` (gated) or ``ffn`` (plain two-layer MLP).
        activation: activation of ``ffn`` experts (``relu``, ``gelu``, ``silu``).
        bias: add biases to both projections.
    """

    def __init__(
        self,
        num_experts: int,
        d_model: int,
        d_ff: int,
        kind: str = "swiglu",
        activation: str = "gelu",
        bias: bool = False,
    ):
        super().__init__()
        if kind not in EXPERTS:
            raise ValueError(f"unknown expert {kind!r}; valid experts: {', '.join(EXPERTS)}")
        activation = _GLU_ACTIVATION.get(kind, activation)
        if activation not in ACTIVATIONS:
            raise ValueError(
                f"unknown activation {activation!r}; valid activations: {', '.join(ACTIVATIONS)}"
            )
        self.num_experts, self.d_model, self.d_ff = num_experts, d_model, d_ff
        self.kind, self.activation = kind, activation
        self.is_glu = kind in _GLU_ACTIVATION
        hidden_out = 2 * d_ff if self.is_glu else d_ff
        self.w_in = nn.Parameter(torch.empty(num_experts, hidden_out, d_model))
        self.w_out = nn.Parameter(torch.empty(num_experts, d_model, d_ff))
        self.b_in = nn.Parameter(torch.zeros(num_experts, hidden_out)) if bias else None
        self.b_out = nn.Parameter(torch.zeros(num_experts, d_model)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Same scale as nn.Linear's default, per expert.
        for weight in (self.w_in, self.w_out):
            bound = 1.0 / math.sqrt(weight.shape[-1])
            nn.init.uniform_(weight, -bound, bound)
        for bias in (self.b_in, self.b_out):
            if bias is not None:
                nn.init.zeros_(bias)

    def _hidden(self, h: Tensor) -> Tensor:
        act = ACTIVATIONS[self.activation]
        if self.is_glu:
            # On CUDA one fused Triton kernel replaces the act, the multiply and their
            # temporaries (forward and backward).
            if triton_glu.use_fused(h):
                return triton_glu.glu(h, self.activation)
            if h.device.type == "cpu":
                return glu(h, self.activation)
            gate, up = h.chunk(2, dim=-1)
            return act(gate) * up
        return act(h)

    def forward_expert(self, e: int, x_ND: Tensor) -> Tensor:
        """Expert e on its rows: the readable reference."""
        b_in = None if self.b_in is None else self.b_in[e]
        b_out = None if self.b_out is None else self.b_out[e]
        h = F.linear(x_ND, self.w_in[e], b_in)
        return F.linear(self._hidden(h), self.w_out[e], b_out)

    def _autocast_operands(self, x: Tensor) -> tuple[Tensor, ...]:
        """x, w_in, b_in, w_out, b_out in autocast's dtype when it is on: the hand-written
        ops below call matrix multiplies with ``out=``, which autocast does not cast."""
        operands = (x, self.w_in, self.b_in, self.w_out, self.b_out)
        cast = _autocast_dtype(x.device.type)
        if cast is None:
            return operands
        return tuple(None if t is None else t.to(cast) for t in operands)

    def forward_segments(self, x_RD: Tensor, counts: list[int]) -> Tensor:
        """Rows sorted by expert, one matrix multiply per non-empty expert, fused backward."""
        x_RD, w_in, b_in, w_out, b_out = self._autocast_operands(x_RD)
        return segment_mlp(x_RD, w_in, b_in, w_out, b_out, counts, self.activation, self.is_glu)

    def forward_routed(self, x_TD: Tensor, weights_TK: Tensor, order_R: Tensor, counts: list[int]) -> Tensor:
        """Tokens in, weighted sum of their experts' outputs out (``routed_mlp``):
        ``order_R`` holds the routed assignments t·K + k sorted by expert, ``counts[e]``
        for expert e. Returns (T, D) in the weights' dtype."""
        x_TD, w_in, b_in, w_out, b_out = self._autocast_operands(x_TD)
        return routed_mlp(x_TD, weights_TK, w_in, b_in, w_out, b_out, order_R, counts, self.activation, self.is_glu)

    def forward_grouped(self, x_RD: Tensor, counts_E: Tensor) -> Tensor:
        """Rows sorted by expert, all experts in one ``grouped_mm`` per projection."""
        offsets_E = counts_E.cumsum(0, dtype=torch.int32)
        w_in, w_out = self.w_in, self.w_out
        cast = _autocast_dtype(x_RD.device.type)
        if cast is not None:
            x_RD, w_in, w_out = x_RD.to(cast), w_in.to(cast), w_out.to(cast)
        # h's gradient comes from the activation's backward, which is always contiguous.
        h_RF = F.grouped_mm(x_RD, w_in.transpose(-2, -1), offs=offsets_E)
        if self.b_in is not None:
            h_RF = h_RF + self.b_in.to(h_RF.dtype).repeat_interleave(counts_E, dim=0, output_size=x_RD.shape[0])
        a_RF = self._hidden(h_RF)
        y_RD = F.grouped_mm(a_RF, w_out.transpose(-2, -1), offs=offsets_E)
        if y_RD.requires_grad:  # callers may hand back any gradient, expanded ones included
            y_RD = _ContiguousGrad.apply(y_RD)
        if self.b_out is not None:
            y_RD = y_RD + self.b_out.to(y_RD.dtype).repeat_interleave(counts_E, dim=0, output_size=x_RD.shape[0])
        return y_RD

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, d_model={self.d_model}, d_ff={self.d_ff}, "
            f"kind={self.kind!r}, activation={self.activation!r}, bias={self.b_in is not None}"
        )


class ModuleExperts(nn.Module):
    """Heterogeneous experts: any list of modules mapping (N, D) to (N, D)."""

    def __init__(self, experts: list[nn.Module] | nn.ModuleList):
        super().__init__()
        if len(experts) == 0:
            raise ValueError("experts must hold at least one module")
        for i, expert in enumerate(experts):
            if not isinstance(expert, nn.Module):
                raise TypeError(f"experts[{i}] is a {type(expert).__name__}, expected an nn.Module")
        self.experts = nn.ModuleList(experts)
        self.num_experts = len(self.experts)

    def forward_expert(self, e: int, x_ND: Tensor) -> Tensor:
        return self.experts[e](x_ND)

    def forward_segments(self, x_RD: Tensor, counts: list[int]) -> Tensor:
        """Rows sorted by expert, each expert module on its block."""
        return run_segments(self, x_RD, counts)


class SharedExperts(nn.Module):
    """Always-on experts (DeepSeekMoE), optionally scaled by a sigmoid gate (Qwen2-MoE).

    n shared experts of hidden width F run as one dense FFN of width n·F: the
    sum of n FFNs is that FFN with its hidden units concatenated. The gate is
    sigmoid(x·w), one scalar per token.
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        *,
        num_experts: int = 1,
        kind: str = "swiglu",
        activation: str = "gelu",
        bias: bool = False,
        gate: bool = False,
    ):
        super().__init__()
        self.num_experts = num_experts
        self.ffn = StackedExperts(1, d_model, num_experts * d_ff, kind=kind, activation=activation, bias=bias)
        self.gate = nn.Linear(d_model, 1, bias=False) if gate else None

    def forward(self, x_TD: Tensor) -> Tensor:
        y_TD = self.ffn.forward_expert(0, x_TD)
        if self.gate is not None:
            y_TD = torch.sigmoid(self.gate(x_TD)) * y_TD
        return y_TD

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, gate={self.gate is not None}"
