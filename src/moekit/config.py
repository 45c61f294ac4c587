"""Configuration dataclasses, validated when built, with errors that name the values.

Shape legend used across moekit: T tokens, D model dim, F expert hidden dim,
E experts, K experts per token, R routed rows (T·K when nothing is dropped).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Default number of experts per token for each router that has one; routers that
# fix K (the dense softmax gate uses every expert, Switch uses one) are listed too.
_DEFAULT_TOP_K = {"switch": 1}
_FIXED_TOP_K_ROUTERS = {"softmax": "num_experts", "switch": 1}
DROP_PRIORITIES = ("probability", "position")
_DEFAULT_SWITCH_JITTER = 0.01


@dataclass(kw_only=True)
class MoEConfig:
    """Everything that defines one MoE layer.

    Args:
        d_model: width of the tokens the layer reads and writes (D).
        d_ff: hidden width of each expert (F).
        num_experts: number of routed experts (E).
        top_k: experts per token (K). ``None`` picks the router's default: every
            expert for ``softmax``, 1 for ``switch``, 2 otherwise.
        router: routing rule by name (see ``moekit.ROUTERS``).
        expert: expert network by name (see ``moekit.EXPERTS``).
        activation: activation of ``ffn`` experts (``relu``, ``gelu``, ``gelu_tanh``, ``silu``).
        expert_bias: add biases to the expert projections.
        normalize_weights: renormalise the K combine weights to sum to one
            (Mixtral); ``False`` keeps the raw softmax probabilities (Qwen option).
        capacity_factor: ``None`` is dropless; a float gives each expert room for
            ``ceil(capacity_factor · T · K / E)`` assignments and drops the rest.
        drop_priority: which assignments an expert keeps when over capacity:
            ``probability`` (highest router probability first) or ``position``
            (first choices before second choices, earlier tokens first).
        router_jitter: multiplicative input jitter ε of the Switch router in
            training (x·U(1−ε, 1+ε)); ``None`` gives 0.01 for ``switch``, else 0.
        load_balance_coef: weight of the Switch/GShard load-balancing loss.
        z_loss_coef: weight of the router z-loss (ST-MoE).
        importance_coef: weight of Shazeer's importance loss, CV(importance)².
        load_coef: weight of Shazeer's load loss, CV(load)² (smooth estimator
            for ``noisy_topk``, counts otherwise).
        compute: compute path by name (see ``moekit.COMPUTE_PATHS``).
        check_finite: raise ``FloatingPointError`` when the input holds NaN/Inf
            (costs one host sync per call).
    """

    d_model: int
    d_ff: int
    num_experts: int
    top_k: int | None = None
    router: str = "topk"
    expert: str = "swiglu"
    activation: str = "gelu"
    expert_bias: bool = False
    normalize_weights: bool = True
    capacity_factor: float | None = None
    drop_priority: str = "probability"
    router_jitter: float | None = None
    load_balance_coef: float = 0.01
    z_loss_coef: float = 0.0
    importance_coef: float = 0.0
    load_coef: float = 0.0
    compute: str = "auto"
    check_finite: bool = False

    def __post_init__(self) -> None:
        for name in ("d_model", "d_ff", "num_experts"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} ({value!r}) must be a positive integer")
        if self.top_k is None:
            self.top_k = (
                self.num_experts if self.router == "softmax" else _DEFAULT_TOP_K.get(self.router, 2)
            )
            self.top_k = min(self.top_k, self.num_experts)
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int):
            raise TypeError(f"top_k ({self.top_k!r}) must be an int")
        if self.top_k < 1:
            raise ValueError(f"top_k ({self.top_k}) must be >= 1")
        if self.top_k > self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) must be <= num_experts ({self.num_experts})")
        fixed = _FIXED_TOP_K_ROUTERS.get(self.router)
        if fixed is not None:
            expected = self.num_experts if fixed == "num_experts" else fixed
            if self.top_k != expected:
                raise ValueError(
                    f"router {self.router!r} uses top_k = {fixed}; got top_k ({self.top_k})"
                )
        if self.capacity_factor is not None:
            cf = self.capacity_factor
            if isinstance(cf, bool) or not isinstance(cf, int | float) or not math.isfinite(cf) or cf <= 0:
                raise ValueError(f"capacity_factor ({cf!r}) must be None (dropless) or a float > 0")
        if self.drop_priority not in DROP_PRIORITIES:
            raise ValueError(
                f"drop_priority ({self.drop_priority!r}) must be one of {', '.join(DROP_PRIORITIES)}"
            )
        if self.router_jitter is None:
            self.router_jitter = _DEFAULT_SWITCH_JITTER if self.router == "switch" else 0.0
        if not 0.0 <= self.router_jitter < 1.0:
            raise ValueError(f"router_jitter ({self.router_jitter}) must be in [0, 1)")
        for name in ("load_balance_coef", "z_loss_coef", "importance_coef", "load_coef"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} ({value!r}) must be a finite number >= 0")

    @property
    def loss_coefficients(self) -> dict[str, float]:
        """Weight of each named auxiliary loss in ``MoEOutput.aux_loss``."""
        return {
            "load_balance": float(self.load_balance_coef),
            "z_loss": float(self.z_loss_coef),
            "importance": float(self.importance_coef),
            "load": float(self.load_coef),
        }

    def capacity(self, num_tokens: int) -> int | None:
        """Assignments each expert may take for ``num_tokens`` tokens (None: unlimited)."""
        if self.capacity_factor is None:
            return None
        return math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts)
