"""The MoE layer: router → dispatch → experts → combine, behind one contract.

``MoE(config)(x)`` takes (..., D) and returns ``MoEOutput(y, aux_loss, routing)``
whatever the flags. Compute paths are registered by name in ``COMPUTE_PATHS``:
``loop`` is the readable reference, ``segment`` and ``grouped_mm`` sort rows by
expert and run them as contiguous blocks; ``auto`` picks the fastest that
supports the inputs. Every path is parity-tested against ``loop``.

Shapes: T tokens, D model dim, E experts, K experts per token, R routed rows.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .config import MoEConfig
from .dispatch.local import combine_rows, gather_rows, plan_dispatch
from .experts import ModuleExperts, StackedExperts, grouped_mm_supports
from .routing import Routing, build_router


class MoEOutput(NamedTuple):
    """y: same shape as the input; aux_loss: weighted sum of the router's losses
    (a scalar, zero when every coefficient is zero); routing: the Routing record."""

    y: Tensor
    aux_loss: Tensor
    routing: Routing


# --- compute paths ---------------------------------------------------------------
# Each path maps (x_TD, routing, experts, capacity, drop_priority, out_dtype) to
# (y_TD, tokens_per_expert_E, kept_TK, num_dropped).

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
) -> Tensor:
    """Which assignments an expert keeps, computed the plain way, one expert at a time."""
    T, K = indices_TK.shape
    keep_TK = torch.zeros(T, K, dtype=torch.bool, device=indices_TK.device)
    valid_TK = torch.ones_like(keep_TK) if valid_T is None else valid_T[:, None].expand(T, K)
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


def loop_path(x_TD, routing, experts, capacity, drop_priority, out_dtype) -> PathResult:
    """Reference: for each expert, find its tokens, run it, add weight · output."""
    E = experts.num_experts
    keep_TK = reference_keep(
        routing.indices_TK, _priority_TK(routing), E, capacity, drop_priority, routing.valid_T
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
    valid_TK = keep_TK if routing.valid_T is None else routing.valid_T[:, None].expand_as(keep_TK)
    num_dropped = (valid_TK & ~keep_TK).sum() if routing.valid_T is not None else (~keep_TK).sum()
    return y_TD.to(out_dtype), counts_E, keep_TK, num_dropped


def _sorted_path(run_rows: Callable[[Tensor, Tensor], Tensor]):
    def path(x_TD, routing, experts, capacity, drop_priority, out_dtype) -> PathResult:
        plan = plan_dispatch(
            routing.indices_TK,
            experts.num_experts,
            capacity=capacity,
            priority_TK=_priority_TK(routing) if capacity is not None else None,
            drop_priority=drop_priority,
            valid_T=routing.valid_T,
        )
        y_RD = run_rows(experts, gather_rows(x_TD, plan), plan.counts_E)
        y_TD = combine_rows(y_RD, routing.weights_TK, plan, out_dtype)
        return y_TD, plan.counts_E, plan.kept_TK, plan.num_dropped

    return path


def _run_segments(experts, x_RD: Tensor, counts_E: Tensor) -> Tensor:
    return experts.forward_segments(x_RD, counts_E.tolist())  # NOTE: .tolist() syncs


def _run_grouped(experts, x_RD: Tensor, counts_E: Tensor) -> Tensor:
    return experts.forward_grouped(x_RD, counts_E)


def _compute_dtype(x: Tensor) -> torch.dtype:
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


class ComputePath(NamedTuple):
    run: Callable[..., PathResult]
    supports: Callable[[nn.Module, Tensor], bool]


COMPUTE_PATHS: dict[str, ComputePath] = {
    "loop": ComputePath(loop_path, lambda experts, x: True),
    "segment": ComputePath(_sorted_path(_run_segments), lambda experts, x: True),
    "grouped_mm": ComputePath(
        _sorted_path(_run_grouped),
        lambda experts, x: grouped_mm_supports(experts, _compute_dtype(x)),
    ),
}
# "auto" takes the first path that supports the inputs, fastest first as measured
# by benchmarks/layer.py (BENCHMARKS.md); "segment" covers what grouped_mm cannot
# (float64, unaligned widths, heterogeneous experts).
AUTO_ORDER = ("grouped_mm", "segment", "loop")


def resolve_path(name: str, experts: nn.Module, x_TD: Tensor) -> str:
    if name == "auto":
        for candidate in AUTO_ORDER:
            if COMPUTE_PATHS[candidate].supports(experts, x_TD):
                return candidate
    if not COMPUTE_PATHS[name].supports(experts, x_TD):
        raise ValueError(
            f"compute path {name!r} does not support {type(experts).__name__} with {x_TD.dtype} "
            f"input (grouped_mm needs stacked experts, float32/bfloat16/float16, and d_model, "
            f"d_ff whose rows are multiples of 16 bytes); use compute='auto' or one of "
            f"{', '.join(COMPUTE_PATHS)}"
        )
    return name


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
        if config.compute != "auto":
            resolve_path(config.compute, self.experts, torch.empty(0, config.d_model))
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

    def forward(self, x: Tensor, *, mask: Tensor | None = None) -> MoEOutput:
        """x: (..., D); mask: optional bool (...) marking real tokens (False = padding)."""
        self._check_input(x, mask)
        x_TD = x.reshape(-1, self.config.d_model)
        valid_T = None if mask is None else mask.reshape(-1)
        routing = self.router(x_TD, valid_T=valid_T)
        path = resolve_path(self.config.compute, self.experts, x_TD)
        capacity = self.config.capacity(x_TD.shape[0])
        ep = self.expert_parallel
        run = COMPUTE_PATHS[path].run if ep is None else functools.partial(ep.run, path)
        y_TD, tokens_per_expert_E, kept_TK, num_dropped = run(
            x_TD, routing, self.experts, capacity, self.config.drop_priority, x.dtype
        )
        routing = routing.replace(tokens_per_expert_E=tokens_per_expert_E, kept_TK=kept_TK, num_dropped=num_dropped)
        if ep is not None:
            routing = ep.globalize(routing)  # losses and statistics over every rank's tokens
        return MoEOutput(y_TD.view(x.shape), self._aux_loss(routing, x_TD), routing)

    def _aux_loss(self, routing: Routing, x_TD: Tensor) -> Tensor:
        aux_loss = x_TD.new_zeros((), dtype=routing.weights_TK.dtype)
        for name, coef in self.config.loss_coefficients.items():
            if coef != 0 and name in routing.losses:
                aux_loss = aux_loss + coef * routing.losses[name]
        return aux_loss

    def extra_repr(self) -> str:
        c = self.config
        return f"router={c.router!r}, num_experts={c.num_experts}, top_k={c.top_k}, compute={c.compute!r}"
