"""Weight-only quantized experts: int8 per output channel, int4 per group of inputs.

Calibration-free: the weights of trained ``StackedExperts`` are rounded to a grid
fitted to each output row (int8) or to each group of ``group_size`` inputs of a row
(int4); the router, attention and norms stay in full precision. Biases are kept as
they are.

Formats (``nn.Linear``'s (out, in) layout per expert, stacked on dim 0):

- int8, symmetric: ``w ≈ q · scale`` with q in [-127, 127] and one scale per output
  row, ``scale = max|w_row| / 127``;
- int4, asymmetric: ``w ≈ q · scale + low`` with q in [0, 15] and one (scale, low)
  per group of ``group_size`` consecutive inputs of a row, ``low = min``,
  ``scale = (max − min) / 15``; two values per byte, the even input in the low nibble.

``forward_expert`` runs torch's weight-packed CPU kernels for a few rows (decoding:
``_weight_int8pack_mm``, ``_weight_int4pack_mm_for_cpu``; both take bfloat16
activations, which is where their speed comes from) and otherwise multiplies by the
dequantized weights in the input's dtype. ``kernel="reference"`` always takes the
dequantized path. Without gradients, from 2 to 64 tokens, ``auto`` runs int8 experts
on the ``gemv`` path instead (``decode_weights``): one numba kernel call that reads
the int8 weights and computes in float32.

Shapes: N rows of one expert, D model dim, F expert hidden dim, H first projection
width (2F for GLU experts), E experts, G groups per row.
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from ..compute.mlp import hidden_activation
from .base import Experts

BITS = (8, 4)
INT4_GROUP_SIZES = (32, 64, 128, 256)
# Up to this many rows the packed kernels beat dequantizing (measured on CPU, BENCHMARKS.md).
PACKED_KERNEL_MAX_ROWS = 16
KERNELS = ("auto", "reference")


def quantize_int8(w: Tensor) -> tuple[Tensor, Tensor]:
    """(…, out, in) float weights → int8 q and float32 scales (…, out), symmetric per row."""
    w = w.detach().float()
    scale = (w.abs().amax(dim=-1) / 127).clamp(min=torch.finfo(torch.float32).tiny)
    q = torch.round(w / scale[..., None]).clamp(-127, 127).to(torch.int8)
    return q, scale


def dequantize_int8(q: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    return (q.to(dtype) * scale[..., None].to(dtype))


def check_int4_group_size(width: int, group_size: int, name: str = "input width") -> None:
    if group_size not in INT4_GROUP_SIZES:
        raise ValueError(f"int4 group_size must be one of {', '.join(map(str, INT4_GROUP_SIZES))}; got {group_size}")
    if width % group_size:
        raise ValueError(f"int4 group_size {group_size} does not divide the {name} {width}; "
                         f"choose one of {', '.join(str(g) for g in INT4_GROUP_SIZES if width % g == 0) or 'none'}")


def quantize_int4(w: Tensor, group_size: int) -> tuple[Tensor, Tensor, Tensor]:
    """(…, out, in) float weights → packed uint8 q (…, out, in/2), scale and low (…, out, in/G)."""
    w = w.detach().float()
    check_int4_group_size(w.shape[-1], group_size)
    groups = w.unflatten(-1, (-1, group_size))
    low, high = groups.amin(dim=-1), groups.amax(dim=-1)
    scale = ((high - low) / 15).clamp(min=torch.finfo(torch.float32).tiny)
    q = torch.round((groups - low[..., None]) / scale[..., None]).clamp(0, 15).to(torch.uint8).flatten(-2)
    return q[..., 0::2] | (q[..., 1::2] << 4), scale, low


def unpack_int4(packed: Tensor) -> Tensor:
    """uint8 (…, in/2) → the 4-bit values (…, in) as uint8."""
    return torch.stack((packed & 15, packed >> 4), dim=-1).flatten(-2)


def dequantize_int4(packed: Tensor, scale: Tensor, low: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    groups = unpack_int4(packed).to(dtype).unflatten(-1, (scale.shape[-1], -1))
    return (groups * scale[..., None].to(dtype) + low[..., None].to(dtype)).flatten(-2)


class QuantizedExperts(Experts):
    """Stacked MLP experts with int8 or int4 weights (see the module docstring).

    Build one from trained experts with ``QuantizedExperts.from_stacked(experts, bits)``,
    or empty (zeros) to load a quantized state dict into. Inference only: the quantized
    weights are buffers and get no gradients (inputs still do).
    """

    stacked_mlp: ClassVar[bool] = False  # integer weights: the float MLP kernels cannot run them
    shardable: ClassVar[bool] = False

    def __init__(self, num_experts: int, d_model: int, d_ff: int, *, kind: str = "swiglu", activation: str = "silu",
                 is_glu: bool = True, bias: bool = False, bits: int = 8, group_size: int = 64,
                 kernel: str = "auto"):
        super().__init__()
        if bits not in BITS:
            raise ValueError(f"bits must be 8 or 4; got {bits!r}")
        if kernel not in KERNELS:
            raise ValueError(f"kernel must be one of {', '.join(KERNELS)}; got {kernel!r}")
        self.num_experts, self.d_model, self.d_ff = num_experts, d_model, d_ff
        self.kind, self.activation, self.is_glu = kind, activation, is_glu
        self.bits, self.group_size, self.kernel = bits, group_size, kernel
        hidden = 2 * d_ff if is_glu else d_ff
        for name, (rows, cols) in (("w_in", (hidden, d_model)), ("w_out", (d_model, d_ff))):
            if bits == 8:
                self.register_buffer(f"{name}_q", torch.zeros(num_experts, rows, cols, dtype=torch.int8))
                self.register_buffer(f"{name}_scale", torch.ones(num_experts, rows))
            else:
                check_int4_group_size(cols, group_size, "d_model" if name == "w_in" else "d_ff")
                self.register_buffer(f"{name}_q", torch.zeros(num_experts, rows, cols // 2, dtype=torch.uint8))
                self.register_buffer(f"{name}_scale", torch.ones(num_experts, rows, cols // group_size))
                self.register_buffer(f"{name}_low", torch.zeros(num_experts, rows, cols // group_size))
        self.register_buffer("b_in", torch.zeros(num_experts, hidden) if bias else None)
        self.register_buffer("b_out", torch.zeros(num_experts, d_model) if bias else None)
        self._packed: dict[tuple, Tensor] = {}

    @classmethod
    @torch.no_grad()
    def from_stacked(cls, experts, bits: int = 8, group_size: int = 64, kernel: str = "auto") -> QuantizedExperts:
        """Quantize float stacked MLP experts (``stacked_mlp``: ``w_in``, ``w_out``, …)."""
        if not getattr(experts, "stacked_mlp", False):
            raise TypeError(f"only stacked MLP experts can be quantized; got {type(experts).__name__}")
        out = cls(experts.num_experts, experts.d_model, experts.d_ff, kind=getattr(experts, "kind", "swiglu"),
                  activation=experts.activation, is_glu=experts.is_glu, bias=experts.b_in is not None, bits=bits,
                  group_size=group_size, kernel=kernel)
        for name in ("w_in", "w_out"):
            w = getattr(experts, name)
            parts = quantize_int8(w) if bits == 8 else quantize_int4(w, group_size)
            for suffix, part in zip(("q", "scale", "low")[:len(parts)], parts, strict=True):
                getattr(out, f"{name}_{suffix}").copy_(part)
        for name in ("b_in", "b_out"):
            if getattr(experts, name) is not None:
                setattr(out, name, getattr(experts, name).detach().float().clone())
        return out.to(experts.w_in.device)

    def dequantized(self, name: str, e: int | slice = slice(None), dtype: torch.dtype = torch.float32) -> Tensor:
        """The float weights the quantized ones stand for: ``name`` is ``w_in`` or ``w_out``."""
        q, scale = getattr(self, f"{name}_q")[e], getattr(self, f"{name}_scale")[e]
        if self.bits == 8:
            return dequantize_int8(q, scale, dtype)
        return dequantize_int4(q, scale, getattr(self, f"{name}_low")[e], dtype)

    def decode_weights(self, name: str):
        """``name`` (``w_in`` or ``w_out``) as the CPU decode kernel's operands (the ``gemv``
        path), or None for int4 weights, which torch's packed kernel runs faster."""
        from ..compute.kernels.cpu_gemv import Weights

        return Weights(8, getattr(self, f"{name}_q"), getattr(self, f"{name}_scale")) if self.bits == 8 else None

    def weight_bytes(self) -> int:
        """Bytes of the quantized weights, scales and biases (what a decode step reads, per expert × E)."""
        return sum(t.numel() * t.element_size() for t in self.buffers())

    def _uses_packed_kernel(self, x_ND: Tensor) -> bool:
        return self.kernel == "auto" and x_ND.device.type == "cpu" and x_ND.shape[0] <= PACKED_KERNEL_MAX_ROWS

    def _packed_operands(self, name: str, e: int) -> tuple[Tensor, ...]:
        q, scale = getattr(self, f"{name}_q"), getattr(self, f"{name}_scale")
        key = (name, e, q._version, scale._version, q.data_ptr())
        operands = self._packed.get(key)
        if operands is None:
            if self.bits == 8:
                operands = (q[e].contiguous(), scale[e].to(torch.bfloat16))
            else:
                low = getattr(self, f"{name}_low")
                values = unpack_int4(q[e]).to(torch.int32).contiguous()
                # The kernel computes (q − 8)·scale + zero per group: zero = low + 8·scale.
                zeros = low[e] + 8 * scale[e]
                scales_and_zeros = torch.stack((scale[e], zeros), dim=-1).transpose(0, 1).contiguous()
                operands = (torch._convert_weight_to_int4pack_for_cpu(values, 1),
                            scales_and_zeros.to(torch.bfloat16))
            self._packed = {k: v for k, v in self._packed.items() if k[:2] != (name, e)}
            self._packed[key] = operands
        return operands

    def _linear(self, x_ND: Tensor, name: str, e: int, bias: Tensor | None) -> Tensor:
        if self._uses_packed_kernel(x_ND):
            x_bf16 = x_ND.to(torch.bfloat16)
            if self.bits == 8:
                weight, scale = self._packed_operands(name, e)
                y = torch._weight_int8pack_mm(x_bf16, weight, scale)
            else:
                weight, scales_and_zeros = self._packed_operands(name, e)
                y = torch._weight_int4pack_mm_for_cpu(x_bf16, weight, self.group_size, scales_and_zeros)
            y = y.to(x_ND.dtype)
            return y if bias is None else y + bias.to(x_ND.dtype)
        return F.linear(x_ND, self.dequantized(name, e, x_ND.dtype), None if bias is None else bias.to(x_ND.dtype))

    def forward_expert(self, e: int, x_ND: Tensor) -> Tensor:
        h = self._linear(x_ND, "w_in", e, None if self.b_in is None else self.b_in[e])
        return self._linear(hidden_activation(h, self.activation, self.is_glu), "w_out", e,
                            None if self.b_out is None else self.b_out[e])

    def extra_repr(self) -> str:
        group = f", group_size={self.group_size}" if self.bits == 4 else ""
        return (f"num_experts={self.num_experts}, d_model={self.d_model}, d_ff={self.d_ff}, kind={self.kind!r}, "
                f"bits={self.bits}{group}, kernel={self.kernel!r}")
