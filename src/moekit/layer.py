"""The MoE layer: router → plan → dispatch → experts → combine (+ shared experts).

``MoE(config)(x)`` takes (..., D) and returns ``MoEOutput(y, aux_loss, routing)``
whatever the flags. Each stage is a part with its own contract, swapped
independently: the router (``moekit.routing``), the dispatcher
(``moekit.dispatch``: local, or expert-parallel after
``moekit.parallel.expert_parallel``), the experts (``moekit.experts``) and the
compute path that runs them (``moekit.compute.paths``: ``loop`` is the readable
reference, every other path is parity-tested against it). ``forward`` reads
as the pipeline; see docs/architecture.md.

Shapes: T tokens, D model dim, E experts, K experts per token, R routed rows.
"""

from __future__ import annotations

import itertools
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from functools import partial
from typing import NamedTuple

import torch
from torch import Tensor, nn

from .compute.paths import ComputePath, resolve_path
from .config import MoEConfig
from .dispatch import DROPLESS, Capacity, Dispatched, LocalDispatcher
from .experts import ModuleExperts, SharedExperts, build_experts
from .routing import AnyRouting, BalancedRouting, LazyMapping, forced, router_class, routing_stats
from .routing.forcing import RoutingChoice
from .routing.losses import losses_from_sums
from .routing.records import with_added_sums


@dataclass(frozen=True)
class MoERouting:
    """What one call routed and dispatched, made once by the layer.

    Attributes:
        decision: the router's record (``Routing``, ``ExpertChoiceRouting`` or
            ``SoftRouting``), as the router (or a forced routing) made it.
        dispatch: dispatch's own record (``Dispatched``: rows per expert, kept, dropped).
        losses: the auxiliary losses the layer weighed, by name: the router's, or under
            expert parallelism those of the global batch.
        stats: routing statistics by name (``routing.stats``), each computed when read.

    The fields of both records read through it: ``routing.indices_TK``,
    ``routing.probs_TE``, ``routing.tokens_per_expert_E``, ``routing.num_dropped``, ….
    """

    decision: AnyRouting
    dispatch: Dispatched
    losses: Mapping[str, Tensor]

    @property
    def stats(self) -> LazyMapping:
        # Kept in the instance dict by hand: functools.cached_property takes a lock that
        # torch.compile cannot trace.
        stats = self.__dict__.get("_stats")
        if stats is None:
            d = self.dispatch
            stats = self.__dict__["_stats"] = routing_stats(self.decision, d.tokens_per_expert_E, d.kept_TK,
                                                            d.num_dropped)
        return stats

    @property
    def tokens_per_expert_E(self) -> Tensor:
        return self.dispatch.tokens_per_expert_E

    @property
    def kept_TK(self) -> Tensor | None:
        return self.dispatch.kept_TK

    @property
    def num_dropped(self) -> Tensor | None:
        return self.dispatch.num_dropped

    def __getattr__(self, name: str):
        decision = self.__dict__.get("decision")
        if decision is None or name.startswith("__"):
            raise AttributeError(name)
        return getattr(decision, name)


def _is_dtensor(tensor: Tensor) -> bool:
    # Without torch.distributed.tensor imported (a heavy import moekit avoids) there is no DTensor.
    module = sys.modules.get("torch.distributed.tensor")
    return module is not None and isinstance(tensor, module.DTensor)


class MoEOutput(NamedTuple):
    """y: same shape as the input; aux_loss: weighted sum of the losses (a scalar, zero
    when every coefficient is zero; None from a call with ``aux_loss=False``); routing:
    what the call routed and dispatched (``MoERouting``), with statistics."""

    y: Tensor
    aux_loss: Tensor | None
    routing: MoERouting

    @property
    def dispatch(self) -> Dispatched:
        return self.routing.dispatch


class MoE(nn.Module):
    """A Mixture-of-Experts layer: y = Σ_{i ∈ chosen} G(x)_i · E_i(x).

    Args:
        config: the layer's ``MoEConfig``; or pass its fields as keyword arguments.
        experts: optional list of arbitrary modules (N, D) → (N, D), one per
            expert, instead of the experts the config describes.
        name: how errors name this layer.

    Example:
        >>> moe = MoE(MoEConfig(d_model=16, d_ff=32, num_experts=4, top_k=2))
        >>> out = moe(torch.randn(2, 5, 16))
        >>> out.y.shape, out.aux_loss.shape
        (torch.Size([2, 5, 16]), torch.Size([]))
    """

    def __init__(self, config: MoEConfig | None = None, *, experts: list[nn.Module] | None = None,
                 name: str | None = None, **kwargs):
        super().__init__()
        if config is None:
            if experts is not None and "num_experts" not in kwargs:
                kwargs["num_experts"] = len(experts)
            config = MoEConfig(**kwargs)
        elif kwargs:
            raise TypeError(f"pass either a config or keyword fields, not both (got {sorted(kwargs)})")
        self.config = config
        self.name = name or "MoE"
        self.router = router_class(config.router).from_config(config)
        if experts is not None:
            if len(experts) != config.num_experts:
                raise ValueError(f"got {len(experts)} expert modules but num_experts ({config.num_experts})")
            self.experts = ModuleExperts(experts)
        else:
            self.experts = build_experts(config)
        self.shared_experts = None
        if config.num_shared_experts > 0:
            self.shared_experts = SharedExperts(
                config.d_model, config.shared_d_ff, num_experts=config.num_shared_experts, kind=config.expert,
                activation=config.activation, bias=config.expert_bias, gate=config.shared_expert_gate,
            )
        # Replaced by moekit.parallel.expert_parallel, which also shards the experts.
        self.dispatcher = LocalDispatcher()
        self.forced_routing: RoutingChoice | None = None
        self.loss_sums_offset: Mapping[str, Tensor] | None = None
        if config.debug_balanced_routing:
            self.force_routing(BalancedRouting())
        self.compute_path(torch.empty(0, config.d_model, device="meta"))  # a name error now, not at the first call

    def forward(self, x: Tensor, *, mask: Tensor | None = None, token_ids: Tensor | None = None,
                aux_loss: bool = True) -> MoEOutput:
        """x: (..., D); mask: optional bool (...) marking real tokens (False = padding);
        token_ids: optional long (...) token ids, needed by routers that route by id (``hash``);
        aux_loss False skips the auxiliary loss (the output's is None), for inference.

        The second-to-last dim of x is the sequence (a 2-D x is one sequence): Soft MoE
        mixes tokens within a sequence, the sequence-wise balance loss averages over
        sequences, and ``capacity_per_sequence`` applies capacity to each.
        """
        x_TD, valid_T, context = self._tokens(x, mask, token_ids)
        routing = self.router(x_TD, valid_T=valid_T, **context)
        if self.forced_routing is not None:
            routing = forced(routing, *self.forced_routing(routing))
        if self.loss_sums_offset is not None:  # the other micro-batches' sums (moekit.train.accumulation)
            routing = with_added_sums(routing, self.loss_sums_offset, self.router.global_losses, losses_from_sums)
        path = self.compute_path(x_TD)
        plan = self.dispatcher.plan(routing, self._capacity(x), path, x_TD)
        shared = None if self.shared_experts is None else partial(self.shared_experts, x_TD, valid_T)
        if self.dispatcher.fuses(path, plan):  # dispatch, experts and combine in one pass, no (R, D) rows
            y_TD, shared_TD = self.experts.run(path.routed, x_TD, plan, x.dtype), shared and shared()
        else:  # dispatch → experts on rows → combine (the shared experts where they hide communication)
            y_TD, shared_TD = self.dispatcher.exchange(x_TD, plan, partial(self.experts.run, path.rows), x.dtype, shared)
        if shared_TD is not None:
            y_TD = y_TD + shared_TD.to(y_TD.dtype)
        if self.config.check_finite and not bool(torch.isfinite(y_TD).all()):
            raise FloatingPointError(f"{self.name}: output contains NaN or Inf for a finite input (an expert overflowed)")
        dispatched, losses = self.dispatcher.report(routing, plan)
        aux = self._aux_loss(losses, x_TD) if aux_loss else None
        return MoEOutput(y_TD.view(x.shape), aux, MoERouting(routing, dispatched, losses))

    def compute_path(self, x_TD: Tensor) -> ComputePath:
        """The compute path this layer runs for input ``x_TD`` (``config.compute``, or ``auto``'s pick)."""
        fuses = self.dispatcher.routed_forms
        path = resolve_path(self.config.compute, self.experts, x_TD, self.config.top_k, fuses=fuses)
        if path.rows is None and not (fuses and self.router.token_choice):
            where = "under expert parallelism" if not fuses else f"for router {self.router.name!r}"
            raise ValueError(f"compute path {path.name!r} has no rows form, which it needs {where}")
        return path

    def force_routing(self, choice: RoutingChoice | None) -> None:
        """Route every call by ``choice(routing) -> (indices_TK, weights_TK)`` instead of the
        router's choice (``moekit.routing.forcing``); None restores the router's."""
        if choice is not None and not self.router.token_choice:
            raise ValueError(f"routing can be forced for token-choice routers; {self.router.name!r} is not one")
        self.forced_routing = choice

    def _tokens(self, x: Tensor, mask: Tensor | None, token_ids: Tensor | None):
        """x as (T, D), the real-token mask as (T,), and what the router reads besides."""
        self._check_input(x, mask)
        context = {"sequence_length": x.shape[-2] if x.dim() >= 3 else None}
        if token_ids is not None:
            if not isinstance(token_ids, Tensor) or token_ids.shape != x.shape[:-1]:
                raise ValueError(
                    f"{self.name}: token_ids shape {tuple(getattr(token_ids, 'shape', ()))} must equal "
                    f"the input's leading shape {tuple(x.shape[:-1])}"
                )
            context["token_ids_T"] = token_ids.reshape(-1)
        return x.reshape(-1, self.config.d_model), None if mask is None else mask.reshape(-1), context

    def _capacity(self, x: Tensor) -> Capacity:
        c = self.config
        if c.capacity_factor is None and c.expert_capacity is None and c.drop_priority == DROPLESS.drop_priority:
            return DROPLESS
        group_size = x.shape[-2] if self.config.capacity_per_sequence and x.dim() >= 3 else None
        num_tokens = group_size or x.numel() // self.config.d_model
        return Capacity(self.config.capacity(num_tokens), group_size, self.config.drop_priority)

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
        expected = self._parameter_dtype()
        if expected is not None and x.dtype != expected and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"{self.name}: input dtype {x.dtype} differs from the layer's parameters ({expected}); "
                            f"cast the input (x.to({expected})) or the layer (layer.to({x.dtype})), or run under "
                            "torch.autocast")

    def _parameter_dtype(self) -> torch.dtype | None:
        for module in (self.experts, self.router):
            # A module's own parameters come first in parameters(): reading them directly spares
            # the recursive walk on every call when they hold the answer (stacked experts do).
            for p in itertools.chain(module._parameters.values(), module.parameters()):
                # A DTensor is FSDP's stored shard; the weights compute in its policy's dtype when gathered.
                if p is not None and p.is_floating_point() and not _is_dtensor(p):
                    return p.dtype
        return None

    def _aux_loss(self, losses: Mapping[str, Tensor], x_TD: Tensor) -> Tensor:
        aux_loss = None
        for name in losses:
            coef = getattr(self.config, f"{name}_coef", 0)
            if coef != 0:
                term = coef * losses[name]
                aux_loss = term if aux_loss is None else aux_loss + term
        if aux_loss is None:
            return x_TD.new_zeros((), dtype=torch.float64 if x_TD.dtype == torch.float64 else torch.float32)
        return aux_loss

    @property
    def causal(self) -> bool:
        """False when a token's output depends on later tokens (expert choice, Soft MoE)."""
        return self.router.causal

    def extra_repr(self) -> str:
        c = self.config
        return f"router={c.router!r}, num_experts={c.num_experts}, top_k={c.top_k}, compute={c.compute!r}"


def moe_layers(model: nn.Module) -> list[tuple[str, MoE]]:
    """Every MoE layer of ``model`` with its qualified name ('' for the model itself), in
    module order; a ``DistributedDataParallel`` wrapper is looked through."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    return [(name, module) for name, module in model.named_modules() if isinstance(module, MoE)]
