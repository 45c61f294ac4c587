"""The MoE layer's configuration, validated when built, with errors that name the values.

``MoEConfig`` holds what every layer has (widths, E, K, the experts' kind,
capacity, loss weights, shared experts, the compute path) and, in
``router_options``, the chosen router's own options: each router class owns an
options dataclass that validates them (``moekit.routing``). The flat form
``MoEConfig(router="sigmoid", num_expert_groups=4, ...)`` is a thin adapter that
files each router option under ``router_options``; ``MoEConfig.from_dict`` also
reads the flat records that run folders written before router options kept.

Shape legend used across moekit: T tokens, D model dim, F expert hidden dim,
E experts, K experts per token, R routed rows (T·K when nothing is dropped).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .experts import EXPERTS
from .routing import ROUTERS, RouterOptions, router_class

DROP_PRIORITIES = ("probability", "position", "batch_priority")
LOSS_NAMES = ("load_balance", "z_loss", "importance", "load", "sequence_balance")


@dataclass(kw_only=True, init=False)
class MoEConfig:
    """Everything that defines one MoE layer.

    Args:
        d_model: width of the tokens the layer reads and writes (D).
        d_ff: hidden width of each expert (F).
        num_experts: number of routed experts (E).
        top_k: experts per token (K). ``None`` picks the router's default: every
            expert for ``softmax``, 1 for ``switch`` and ``hash``, 2 otherwise.
            ``expert_choice`` reads it as the default capacity factor; ``soft``
            ignores it (its cost is set by ``slots_per_expert``).
        router: routing rule by name (see ``moekit.ROUTERS``).
        router_options: the router's own options (``TopKOptions``, ``SigmoidOptions``,
            …; None: its defaults). Flat keywords fill it too: ``normalize_weights``,
            ``second_expert_policy``, ``router_jitter``, ``router_logit_bias``,
            ``num_expert_groups``, ``topk_groups``, ``routed_scaling_factor``,
            ``bias_update_rate``, ``slots_per_expert``, ``soft_normalize``,
            ``hash_vocab_size``, ``hash_seed`` and, for ``expert_choice``,
            ``capacity_factor`` (the average number of experts per token). A flat
            option the router does not have is an error unless it is left at its default.
        expert: experts kind by name (see ``moekit.EXPERTS``).
        activation: activation of ``ffn`` experts (``relu``, ``gelu``, ``gelu_tanh``, ``silu``).
        expert_bias: add biases to the expert projections.
        capacity_factor: ``None`` is dropless; a float gives each expert room for
            ``ceil(capacity_factor · T · K / E)`` assignments and drops the rest.
        expert_capacity: an absolute capacity per expert (per sequence with
            ``capacity_per_sequence``), instead of ``capacity_factor``.
        capacity_per_sequence: apply capacity within each sequence (the input's
            second-to-last dim) rather than over the whole batch, as Switch
            Transformers does; C then counts the sequence's tokens.
        drop_priority: which assignments an expert keeps when over capacity:
            ``probability`` (highest router probability first), ``position``
            (first choices before second choices, earlier tokens first) or
            ``batch_priority`` (V-MoE: first choices before second choices, and
            within a choice the tokens with the most confident top choice first).
        load_balance_coef: weight of the Switch/GShard load-balancing loss.
        z_loss_coef: weight of the router z-loss (ST-MoE).
        importance_coef: weight of Shazeer's importance loss, CV(importance)².
        load_coef: weight of Shazeer's load loss, CV(load)² (smooth estimator
            for ``noisy_topk``, counts otherwise).
        sequence_balance_coef: weight of DeepSeek-V3's sequence-wise balance loss
            (reported by ``sigmoid``; 1e-4 in the paper).
        num_shared_experts: always-on experts (DeepSeekMoE), run as one dense
            FFN of hidden width ``num_shared_experts · shared_d_ff``.
        shared_d_ff: hidden width of each shared expert (``None``: ``d_ff``).
        shared_expert_gate: scale the shared output by sigmoid(x·w) (Qwen2-MoE).
        compute: compute path by name (see ``moekit.COMPUTE_PATHS``).
        check_finite: raise ``FloatingPointError`` when the input holds NaN/Inf, or
            when a finite input gives a non-finite output (an expert overflowed);
            costs two host syncs per call. Without it, a NaN token reaches the
            other tokens of its batch under ``soft`` (slots mix every token of a
            sequence), ``expert_choice`` (experts rank tokens by score) and
            capacity (tokens compete for slots); under dropless token choice it
            stays in its own row.
        debug_balanced_routing: replace the router's choice by a perfectly
            balanced one (token t's k-th expert is (t·K + k) mod E, weights
            1/K), so throughput can be measured whatever the router learned.
            For benchmarks only; token-choice routers only.
    """

    d_model: int
    d_ff: int
    num_experts: int
    top_k: int | None = None
    router: str = "topk"
    router_options: RouterOptions | None = None
    expert: str = "swiglu"
    activation: str = "gelu"
    expert_bias: bool = False
    capacity_factor: float | None = None
    expert_capacity: int | None = None
    capacity_per_sequence: bool = False
    drop_priority: str = "probability"
    load_balance_coef: float = 0.01
    z_loss_coef: float = 0.0
    importance_coef: float = 0.0
    load_coef: float = 0.0
    sequence_balance_coef: float = 0.0
    num_shared_experts: int = 0
    shared_d_ff: int | None = None
    shared_expert_gate: bool = False
    compute: str = "auto"
    check_finite: bool = False
    debug_balanced_routing: bool = False

    def __init__(self, **kwargs):
        router = kwargs.get("router", "topk")
        if not isinstance(router, str):
            raise ValueError(f"router ({router!r}) must be a router name; valid routers: {', '.join(ROUTERS)}")
        options_type = router_class(router).Options
        claimed = options_type.flat_fields()  # flat keyword → option field
        options = kwargs.pop("router_options", None)
        if options is None:
            options = options_type(**{claimed[name]: kwargs.pop(name) for name in list(kwargs) if name in claimed})
        else:
            # With router_options given, a keyword that is also a layer field (expert choice's
            # capacity_factor) is the layer's.
            stray = [name for name in kwargs if name in claimed and name not in _LAYER_FIELDS]
            if stray:
                raise TypeError(f"pass router {router!r}'s options in router_options or as keywords "
                                f"({', '.join(stray)}), not both")
            if isinstance(options, dict):  # a nested record read back from JSON
                options = options_type(**options)
        unknown = kwargs.keys() - _LAYER_FIELDS
        for name in sorted(unknown):
            _check_foreign_option(name, kwargs.pop(name), router)
        for field in dataclasses.fields(self):
            if field.name == "router_options":
                continue
            default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
            if field.name in kwargs:
                setattr(self, field.name, kwargs.pop(field.name))
            elif default is dataclasses.MISSING:
                raise TypeError(f"MoEConfig needs {field.name}")
            else:
                setattr(self, field.name, default)
        self.router_options = options
        self._validate()

    @classmethod
    def from_dict(cls, fields: dict) -> MoEConfig:
        """A config from its JSON record: nested (``router_options``) or the flat record of
        run folders written before router options, whose other routers' options it drops."""
        fields = dict(fields)
        if "router_options" not in fields:
            claimed = router_class(fields.get("router", "topk")).Options.flat_fields()
            for name in list(fields):
                if name not in _LAYER_FIELDS and name not in claimed and name in _all_flat_options():
                    del fields[name]  # another router's option, which never had an effect here
        return cls(**fields)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def _validate(self) -> None:
        for name in ("d_model", "d_ff", "num_experts"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} ({value!r}) must be a positive integer")
        cls = router_class(self.router)
        if type(self.router_options) is not cls.Options:
            raise TypeError(f"router {self.router!r} takes router_options of type {cls.Options.__name__}, "
                            f"got {type(self.router_options).__name__}")
        self.top_k = cls.resolve_top_k(self.top_k, self.num_experts)
        self.router_options.validate(num_experts=self.num_experts, top_k=self.top_k)
        if self.expert not in EXPERTS:
            raise ValueError(f"unknown expert {self.expert!r}; valid experts: {', '.join(EXPERTS)}")
        if self.capacity_factor is not None:
            cf = self.capacity_factor
            if isinstance(cf, bool) or not isinstance(cf, int | float) or not math.isfinite(cf) or cf <= 0:
                raise ValueError(f"capacity_factor ({cf!r}) must be None (dropless) or a float > 0")
        if self.expert_capacity is not None:
            c = self.expert_capacity
            if isinstance(c, bool) or not isinstance(c, int) or c < 1:
                raise ValueError(f"expert_capacity ({c!r}) must be None or a positive integer")
            if self.capacity_factor is not None:
                raise ValueError(
                    f"set capacity_factor ({self.capacity_factor}) or expert_capacity ({c}), not both"
                )
        if self.drop_priority not in DROP_PRIORITIES:
            raise ValueError(
                f"drop_priority ({self.drop_priority!r}) must be one of {', '.join(DROP_PRIORITIES)}"
            )
        if not cls.token_choice:
            for name in ("capacity_factor", "expert_capacity", "capacity_per_sequence", "debug_balanced_routing"):
                if getattr(self, name):
                    raise ValueError(f"{name} ({getattr(self, name)!r}) applies to token-choice routers; "
                                     f"router {self.router!r} is not one")
        for name in LOSS_NAMES:
            value = getattr(self, f"{name}_coef")
            if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name}_coef ({value!r}) must be a finite number >= 0")
        n = self.num_shared_experts
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"num_shared_experts ({n!r}) must be an int >= 0")
        if self.shared_d_ff is None:
            self.shared_d_ff = self.d_ff
        if isinstance(self.shared_d_ff, bool) or not isinstance(self.shared_d_ff, int) or self.shared_d_ff < 1:
            raise ValueError(f"shared_d_ff ({self.shared_d_ff!r}) must be a positive integer")
        if self.shared_expert_gate and n == 0:
            raise ValueError("shared_expert_gate=True needs num_shared_experts >= 1; got 0")

    @property
    def loss_coefficients(self) -> dict[str, float]:
        """Weight of each named auxiliary loss in ``MoEOutput.aux_loss``."""
        return {name: float(getattr(self, f"{name}_coef")) for name in LOSS_NAMES}

    def capacity(self, num_tokens: int) -> int | None:
        """Assignments each expert may take for ``num_tokens`` tokens (None: unlimited)."""
        if self.expert_capacity is not None:
            return self.expert_capacity
        if self.capacity_factor is None:
            return None
        return math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts)


_LAYER_FIELDS = frozenset(f.name for f in dataclasses.fields(MoEConfig))


def _all_flat_options() -> dict[str, list[str]]:
    """Flat option keyword → the routers that have it."""
    owners: dict[str, list[str]] = {}
    for name, cls in ROUTERS.items():
        for flat in cls.Options.flat_fields():
            owners.setdefault(flat, []).append(name)
    return owners


def _check_foreign_option(name: str, value, router: str) -> None:
    """A flat keyword that is not a layer field nor an option of ``router``: allowed only at
    the default of the routers that have it (it would change nothing), else an error."""
    owners = _all_flat_options().get(name)
    if owners is None:
        raise TypeError(f"MoEConfig got an unexpected keyword argument {name!r}")
    for owner in owners:
        options_type = ROUTERS[owner].Options
        field = options_type.flat_fields()[name]
        if getattr(options_type(), field, object()) == value:
            return
    raise ValueError(f"{name} ({value!r}) is an option of router {' / '.join(repr(o) for o in owners)}, "
                     f"not of {router!r}")
