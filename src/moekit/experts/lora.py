"""LoRA experts: frozen stacked experts plus a low-rank adapter per expert and projection.

``LoRAExperts(base, rank, alpha)`` wraps ``StackedExperts`` (or any experts with
``stacked_mlp``) without copying them: every expert e computes

    h = W_in[e]·x + s·B_in[e](A_in[e]·x),    y = W_out[e]·a + s·B_out[e](A_out[e]·a),

with a = act(h) (act(gate)·up for GLU experts) and s = alpha / rank (alpha / √rank
with ``rslora``). The base weights are frozen; A starts like ``nn.Linear``'s weight
and B at zero, so the wrapped experts start equal to the base. The adapters ride
on the stacked-MLP contract of ``moekit.compute.mlp`` (``low_rank_in``,
``low_rank_out``), so every compute path runs them: ``grouped_mm`` and ``triton``
add two grouped GEMMs per projection, ``segment`` and ``fused`` run the grouped
form too (their single-node kernels have no place for the update), ``loop`` and
``small_batch`` run ``forward_expert``. ``merge()`` adds the updates into the base
weights (for export or fast inference) and ``unmerge()`` restores them bitwise.

Every tensor is stacked by expert on dim 0, so expert parallelism shards the
adapters with their experts (``shard``).

Shapes: R routed rows, N rows of one expert, D model dim, F expert hidden dim, H
first projection width (2F for GLU experts), E experts, r rank.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from ..compute.low_rank import LowRank
from ..compute.mlp import expert_mlp, grouped_mm_missing, grouped_rows
from ..compute.paths import rows_one_expert_at_a_time
from .base import Experts
from .stacked import StackedExperts

PROJECTIONS = ("in", "out")


def check_rank(rank, *, widths: tuple[int, ...], where: str = "LoRA") -> None:
    """A rank must be a positive int no larger than the narrowest side it adapts."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"{where}: rank ({rank!r}) must be a positive integer")
    if rank > min(widths):
        raise ValueError(f"{where}: rank ({rank}) must be <= {min(widths)}, the narrowest width it adapts "
                         f"(widths {', '.join(map(str, widths))}); a larger rank adds nothing a full update lacks")


class LoRAExperts(Experts):
    """Frozen stacked experts with a LoRA adapter on each expert's projections.

    Args:
        base: the experts to adapt (``stacked_mlp``); kept, frozen, never copied.
        rank: r.
        alpha: the adapters' scale is alpha / r (alpha / √r with ``rslora``).
        projections: which projections get adapters: ``("in", "out")`` (default),
            ``("in",)`` (gate and up) or ``("out",)`` (down).
        rslora: scale by alpha / √r (rank-stabilised LoRA).
    """

    stacked_mlp = True

    def __init__(self, base: nn.Module, rank: int = 8, alpha: float = 16.0, *,
                 projections: tuple[str, ...] = PROJECTIONS, rslora: bool = False):
        super().__init__()
        if not getattr(base, "stacked_mlp", False) or isinstance(base, LoRAExperts):
            raise TypeError(f"LoRA experts wrap stacked MLP experts (StackedExperts); got {type(base).__name__}")
        unknown = set(projections) - set(PROJECTIONS)
        if not projections or unknown:
            raise ValueError(f"projections {tuple(projections)!r}: choose from {PROJECTIONS}")
        E, H, D = base.w_in.shape
        F = base.w_out.shape[2]
        check_rank(rank, widths=(D, F))
        if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha) or alpha <= 0:
            raise ValueError(f"LoRA: alpha ({alpha!r}) must be a positive number")
        self.base = base.requires_grad_(False)
        self.rank, self.alpha, self.rslora = rank, float(alpha), bool(rslora)
        self.projections = tuple(p for p in PROJECTIONS if p in projections)
        self.scale = alpha / math.sqrt(rank) if rslora else alpha / rank
        factory = {"device": base.w_in.device, "dtype": base.w_in.dtype}
        self.lora_A_in = nn.Parameter(torch.empty(E, rank, D, **factory)) if "in" in projections else None
        self.lora_B_in = nn.Parameter(torch.zeros(E, H, rank, **factory)) if "in" in projections else None
        self.lora_A_out = nn.Parameter(torch.empty(E, rank, F, **factory)) if "out" in projections else None
        self.lora_B_out = nn.Parameter(torch.zeros(E, D, rank, **factory)) if "out" in projections else None
        self._unmerged: dict[str, Tensor] | None = None
        self.reset_adapters()

    # The stacked-MLP contract, read through to the base.
    num_experts = property(lambda self: self.base.num_experts)
    d_model = property(lambda self: self.base.d_model)
    d_ff = property(lambda self: self.base.d_ff)
    w_in = property(lambda self: self.base.w_in)
    w_out = property(lambda self: self.base.w_out)
    b_in = property(lambda self: self.base.b_in)
    b_out = property(lambda self: self.base.b_out)
    activation = property(lambda self: self.base.activation)
    is_glu = property(lambda self: self.base.is_glu)
    # Adapters shard with their experts when the base does (not a shared base).
    shardable = property(lambda self: self.base.shardable)
    shared_base = property(lambda self: getattr(self.base, "shared_base", False))

    @property
    def low_rank_in(self) -> LowRank | None:
        if self.lora_A_in is None or self.merged:
            return None
        return LowRank(self.lora_A_in, self.lora_B_in, self.scale)

    @property
    def low_rank_out(self) -> LowRank | None:
        if self.lora_A_out is None or self.merged:
            return None
        return LowRank(self.lora_A_out, self.lora_B_out, self.scale)

    @torch.no_grad()
    def reset_adapters(self) -> None:
        """A as ``nn.Linear`` initialises its weight, per expert; B zero (the base's output)."""
        for A, B in ((self.lora_A_in, self.lora_B_in), (self.lora_A_out, self.lora_B_out)):
            if A is not None:
                bound = 1.0 / math.sqrt(A.shape[-1])
                A.uniform_(-bound, bound)
                B.zero_()

    def forward(self, x_RD: Tensor, counts_E: Tensor) -> Tensor:
        """Base and adapters by grouped GEMMs where torch's grouped_mm runs the dtype, else per expert."""
        if grouped_mm_missing(self, x_RD.dtype) is None:
            return grouped_rows(self, x_RD, counts_E)
        return rows_one_expert_at_a_time(self, x_RD, counts_E)

    def forward_expert(self, e: int, x_ND: Tensor) -> Tensor:
        return expert_mlp(self, e, x_ND)

    @torch.no_grad()
    def delta_weights(self) -> dict[str, Tensor]:
        """s·B_e·A_e per adapted projection, by the base weight's name: (E, out, in)."""
        deltas = {}
        for name, A, B in (("w_in", self.lora_A_in, self.lora_B_in), ("w_out", self.lora_A_out, self.lora_B_out)):
            if A is not None:
                deltas[name] = torch.bmm(B.double(), A.double()).mul_(self.scale)
        return deltas

    @property
    def merged(self) -> bool:
        return self._unmerged is not None

    @torch.no_grad()
    def merge(self) -> None:
        """Add the updates into the base weights (the adapters then stop adding); ``unmerge`` undoes it."""
        if self.merged:
            raise RuntimeError("LoRA experts are already merged; call unmerge() first")
        if self.shared_base:
            raise RuntimeError("these experts share one base weight, which cannot hold E different updates; "
                               "merged_experts() gives E stacked experts with the updates added")
        deltas = self.delta_weights()
        self._unmerged = {name: getattr(self.base, name).detach().clone() for name in deltas}
        for name, delta in deltas.items():
            weight = getattr(self.base, name)
            weight.copy_((weight.double() + delta).to(weight.dtype))

    @torch.no_grad()
    def unmerge(self) -> None:
        """Restore the base weights exactly as they were before ``merge``."""
        if not self.merged:
            raise RuntimeError("LoRA experts are not merged")
        for name, weight in self._unmerged.items():
            getattr(self.base, name).copy_(weight)
        self._unmerged = None

    def merged_experts(self) -> nn.Module:
        """The base experts with the updates added (the adapters dropped): what export writes.
        Over a shared base (a mixture of LoRA experts) they become E ``StackedExperts``."""
        if self.shared_base:
            return self._materialized()
        if not self.merged:
            self.merge()
        self._unmerged = None
        return self.base.requires_grad_(True)

    @torch.no_grad()
    def _materialized(self) -> nn.Module:
        base = self.base
        experts = StackedExperts(self.num_experts, base.d_model, base.d_ff, kind=base.kind,
                                 activation=base.activation, bias=base.b_in is not None)
        experts.to(device=base.w_in.device, dtype=base.w_in.dtype)
        deltas = self.delta_weights()
        for name, param in experts.named_parameters():
            value = getattr(base, name).double()
            param.copy_((value + deltas[name] if name in deltas else value).to(param.dtype))
        return experts

    @torch.no_grad()
    def shard(self, first: int, count: int) -> LoRAExperts:
        shard = LoRAExperts(self.base.shard(first, count), self.rank, self.alpha, projections=self.projections,
                            rslora=self.rslora)
        for name, param in shard.named_parameters(recurse=False):
            param.copy_(getattr(self, name)[first:first + count])
        return shard

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha:g}, projections={self.projections}, merged={self.merged}"
