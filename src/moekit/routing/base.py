"""What every router is: its own options, its traits, and the learned linear gate most share.

A router class declares, as class attributes, what the rest of moekit needs to
know about it (nothing compares router names):

- ``Options``: the dataclass of its own options, which validates them;
- ``causal``: a token's experts depend on that token alone (False for expert
  choice and Soft MoE, which look at the whole batch or sequence);
- ``needs_token_ids``: it routes by token id (``MoE.forward(x, token_ids=...)``);
- ``default_top_k`` (None: every expert) and ``top_k_fixed`` (K cannot be changed);
- ``token_choice``: it returns ``Routing`` (each token picks K experts), so
  capacity, drops and the token-choice dispatch plan apply;
- ``growable``: its choice is the top K of the logits and its weights do not
  depend on the logits left out, so ``interop.surgery.grow`` can add experts
  without changing its output;
- ``replayable``: it chooses through ``choose``, so a recorded choice can be replayed
  (``moekit.finetune.replay``) while its weights follow its own formula;
- ``losses``: the auxiliary losses it reports; ``global_losses``: those that are
  formulas of sums over tokens (``routing.losses``), which expert parallelism
  computes over the global batch.

Shapes: T tokens, D model dim, E experts, K experts per token.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..compute.precision import gate_dtype, without_autocast
from .records import AnyRouting


def check_bool(name: str, value) -> None:
    if not isinstance(value, bool):
        raise ValueError(f"{name} ({value!r}) must be True or False")


def check_positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} ({value!r}) must be a positive integer")


def check_number(name: str, value, *, low: float = 0.0, low_inclusive: bool = True, high: float = math.inf) -> None:
    ok = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
    ok = ok and (value >= low if low_inclusive else value > low) and value < high
    if not ok:
        bound = f"{'>=' if low_inclusive else '>'} {low:g}" + (f" and < {high:g}" if math.isfinite(high) else "")
        raise ValueError(f"{name} ({value!r}) must be a finite number {bound}")


@dataclass(kw_only=True)
class RouterOptions:
    """A router's own options; subclasses add fields and check them in ``validate``.

    ``flat_names`` maps a field to the keyword the flat ``MoEConfig(...)`` form
    accepts for it (by default the field's own name)."""

    flat_names: ClassVar[dict[str, str]] = {}

    def validate(self, *, num_experts: int, top_k: int) -> None:
        """Raise ``ValueError`` naming any value that does not fit a layer of E experts, K per token."""

    @classmethod
    def flat_fields(cls) -> dict[str, str]:
        """Flat keyword name → field name, for every field."""
        renamed: dict[str, str] = {}
        for klass in reversed(cls.__mro__):
            renamed.update(getattr(klass, "flat_names", {}))
        return {renamed.get(f.name, f.name): f.name for f in dataclasses.fields(cls)}


@dataclass(kw_only=True)
class GateOptions(RouterOptions):
    """Options of routers with a learned linear gate.

    Args:
        logit_bias: a learned per-expert bias added to the logits (``logits = x·W_gᵀ + b``);
            ``moekit.interop.surgery.grow`` uses it to start new experts below every
            token's top-k choice.
        jitter: multiplicative input jitter ε in training, x·U(1−ε, 1+ε) (Switch Transformer).
    """

    flat_names: ClassVar[dict[str, str]] = {"logit_bias": "router_logit_bias", "jitter": "router_jitter"}
    logit_bias: bool = False
    jitter: float = 0.0

    def validate(self, *, num_experts: int, top_k: int) -> None:
        check_bool("router_logit_bias", self.logit_bias)
        check_number("router_jitter", self.jitter, high=1.0)


class Router(nn.Module):
    """Base class of routers: the options and traits described in the module docstring.

    Subclasses implement ``forward(x_TD, *, valid_T, sequence_length, token_ids_T)``
    returning a routing record, in float32 (float64 for float64 input) whatever the
    input dtype or autocast.
    """

    name: ClassVar[str] = ""  # set by ``register_router``
    Options: ClassVar[type[RouterOptions]] = RouterOptions
    causal: ClassVar[bool] = True
    needs_token_ids: ClassVar[bool] = False
    default_top_k: ClassVar[int | None] = 2
    top_k_fixed: ClassVar[bool] = False
    token_choice: ClassVar[bool] = True
    growable: ClassVar[bool] = False
    replayable: ClassVar[bool] = False
    losses: ClassVar[tuple[str, ...]] = ()
    global_losses: ClassVar[frozenset[str]] = frozenset()

    def __init__(self, *, d_model: int, num_experts: int, top_k: int, options: RouterOptions | None = None):
        super().__init__()
        options = self.Options() if options is None else options
        if type(options) is not self.Options:
            raise TypeError(f"router {self.name!r} takes {self.Options.__name__}, got {type(options).__name__}")
        options.validate(num_experts=num_experts, top_k=top_k)
        self.d_model, self.num_experts, self.top_k, self.options = d_model, num_experts, top_k, options

    @classmethod
    def from_config(cls, config) -> Router:
        """The router an ``MoEConfig`` describes."""
        return cls(d_model=config.d_model, num_experts=config.num_experts, top_k=config.top_k,
                   options=config.router_options)

    @classmethod
    def resolve_top_k(cls, top_k: int | None, num_experts: int) -> int:
        """K for a layer of E experts: the router's default when None; checked against a fixed K."""
        default = num_experts if cls.default_top_k is None else min(cls.default_top_k, num_experts)
        if top_k is None:
            return default
        if isinstance(top_k, bool) or not isinstance(top_k, int):
            raise TypeError(f"top_k ({top_k!r}) must be an int")
        if top_k < 1:
            raise ValueError(f"top_k ({top_k}) must be >= 1")
        if top_k > num_experts:
            raise ValueError(f"top_k ({top_k}) must be <= num_experts ({num_experts})")
        if cls.top_k_fixed and top_k != default:
            uses = "num_experts" if cls.default_top_k is None else cls.default_top_k
            raise ValueError(f"router {cls.name!r} uses top_k = {uses}; got top_k ({top_k})")
        return top_k

    def forward(self, x_TD: Tensor, *, valid_T: Tensor | None = None, sequence_length: int | None = None,
                token_ids_T: Tensor | None = None) -> AnyRouting:
        raise NotImplementedError

    # Routing replay (``moekit.finetune.replay``): the experts to choose at the next call,
    # (T, K) long; the router still computes its weights from its live scores at them.
    replayed_TK: Tensor | None = None

    def choose(self, scores_TE: Tensor, k: int) -> Tensor:
        """The K experts of each token: the top K of ``scores_TE``, or the replayed choice."""
        if self.replayed_TK is None:
            return scores_TE.topk(k, dim=-1).indices
        if self.replayed_TK.shape != (scores_TE.shape[0], k):
            raise ValueError(f"router {self.name!r}: the replayed choice has shape {tuple(self.replayed_TK.shape)}; "
                             f"this call routes {scores_TE.shape[0]} tokens to {k} experts each")
        return self.replayed_TK.to(scores_TE.device)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, num_experts={self.num_experts}, top_k={self.top_k}"


class GateRouter(Router):
    """A router with a learned linear gate ``logits = x·W_gᵀ (+ b)``, computed in float32.

    Subclasses implement ``route(logits_TE, x_TD, valid_T, sequence_length)``; this
    class applies the precision rules (float32 whatever the input dtype or autocast,
    float64 stays float64) and the input jitter of ``GateOptions``.
    """

    Options = GateOptions

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.weight = nn.Parameter(torch.empty(self.num_experts, self.d_model))
        nn.init.normal_(self.weight, std=0.02)
        self.logit_bias = nn.Parameter(torch.zeros(self.num_experts)) if self.options.logit_bias else None

    def forward(self, x_TD: Tensor, *, valid_T: Tensor | None = None, sequence_length: int | None = None,
                token_ids_T: Tensor | None = None) -> AnyRouting:
        # Selective precision (Switch): gate math in float32, never under autocast.
        with without_autocast(x_TD.device.type):
            xr_TD = x_TD.to(gate_dtype(x_TD))
            eps = self.options.jitter
            if self.training and eps > 0:
                xr_TD = xr_TD * torch.empty_like(xr_TD).uniform_(1.0 - eps, 1.0 + eps)
            logits_TE = F.linear(xr_TD, self.weight.to(xr_TD.dtype))
            if self.logit_bias is not None:
                logits_TE = logits_TE + self.logit_bias.to(xr_TD.dtype)
            return self.route(logits_TE, xr_TD, valid_T, sequence_length)

    def route(self, logits_TE: Tensor, x_TD: Tensor, valid_T: Tensor | None,
              sequence_length: int | None) -> AnyRouting:
        raise NotImplementedError


def check_causal(module: nn.Module, where: str = "a causal model") -> None:
    """Raise ValueError if any router inside ``module`` looks at other tokens of the batch.

    Expert choice and Soft MoE route each token using the whole batch (or
    sequence), so a token's output depends on later tokens: they cannot be used
    for autoregressive training or generation. Call this where causality is
    declared (e.g. a decoder LM's constructor and ``generate``).
    """
    for name, sub in module.named_modules():
        if isinstance(sub, Router) and not sub.causal:
            raise ValueError(
                f"router {sub.name!r} at {name or type(module).__name__!r} is not causal "
                f"(it routes each token using the whole batch), so it cannot be used in {where}; "
                f"use a token-choice router such as 'topk' or 'sigmoid'"
            )
