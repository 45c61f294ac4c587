"""Configuration dataclasses, validated when built, with errors that name the values.

Shape legend used across moekit: T tokens, D model dim, F expert hidden dim,
E experts, K experts per token, R routed rows (T·K when nothing is dropped).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

# Default number of experts per token for each router that has one; routers that
# fix K (the dense softmax gate uses every expert, Switch uses one) are listed too.
_DEFAULT_TOP_K = {"switch": 1, "hash": 1}
_FIXED_TOP_K_ROUTERS = {"softmax": "num_experts", "switch": 1, "hash": 1}
DROP_PRIORITIES = ("probability", "position")
SECOND_EXPERT_POLICIES = ("all", "random")
_DEFAULT_SWITCH_JITTER = 0.01


@dataclass(kw_only=True)
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
        expert: expert network by name (see ``moekit.EXPERTS``).
        activation: activation of ``ffn`` experts (``relu``, ``gelu``, ``gelu_tanh``, ``silu``).
        expert_bias: add biases to the expert projections.
        normalize_weights: renormalise the K combine weights to sum to one
            (Mixtral); ``False`` keeps the raw softmax probabilities (Qwen option).
        capacity_factor: ``None`` is dropless; a float gives each expert room for
            ``ceil(capacity_factor · T · K / E)`` assignments and drops the rest.
            For ``expert_choice`` it is the average number of experts per token
            (``None``: ``top_k``) and each expert takes ``ceil(capacity_factor · T / E)``
            tokens.
        expert_capacity: an absolute capacity per expert (per sequence with
            ``capacity_per_sequence``), instead of ``capacity_factor``.
        capacity_per_sequence: apply capacity within each sequence (the input's
            second-to-last dim) rather than over the whole batch, as Switch
            Transformers does; C then counts the sequence's tokens.
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
        second_expert_policy: ``all`` dispatches every one of the K choices;
            ``random`` (GShard, top_k = 2, ``topk``/``noisy_topk``) dispatches the
            second choice in training only with probability min(1, 2·g2), g2 its
            weight normalised over the two choices.
        num_expert_groups: ``sigmoid``: experts form this many equal groups
            (DeepSeek-V3 group-limited routing); 1 disables it.
        topk_groups: ``sigmoid``: groups kept per token (``None``: all groups).
        routed_scaling_factor: ``sigmoid``: multiplies the routed gates.
        bias_update_rate: ``sigmoid``: step γ of the auxiliary-loss-free bias
            update b_i += γ·sign(mean load − load_i).
        sequence_balance_coef: weight of DeepSeek-V3's sequence-wise balance loss
            (reported by ``sigmoid``; 1e-4 in the paper).
        slots_per_expert: ``soft``: slots P each expert processes per sequence.
        soft_normalize: ``soft``: l2-normalise tokens and slot parameters and
            multiply by a learned scale, as the Soft MoE paper does for stability.
        hash_vocab_size: ``hash``: number of token ids the fixed mapping covers.
        hash_seed: ``hash``: seed of the fixed random mapping.
        num_shared_experts: always-on experts (DeepSeekMoE), run as one dense
            FFN of hidden width ``num_shared_experts · shared_d_ff``.
        shared_d_ff: hidden width of each shared expert (``None``: ``d_ff``).
        shared_expert_gate: scale the shared output by sigmoid(x·w) (Qwen2-MoE).
        router_logit_bias: give the router a learned per-expert bias added to its
            logits (``logits = x·W_gᵀ + b``). ``moekit.interop.surgery.grow`` uses it
            to start new experts below every token's top-k choice.
        compute: compute path by name (see ``moekit.COMPUTE_PATHS``).
        check_finite: raise ``FloatingPointError`` when the input holds NaN/Inf
            (costs one host sync per call).
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
    expert: str = "swiglu"
    activation: str = "gelu"
    expert_bias: bool = False
    normalize_weights: bool = True
    capacity_factor: float | None = None
    expert_capacity: int | None = None
    capacity_per_sequence: bool = False
    drop_priority: str = "probability"
    router_jitter: float | None = None
    load_balance_coef: float = 0.01
    z_loss_coef: float = 0.0
    importance_coef: float = 0.0
    load_coef: float = 0.0
    second_expert_policy: str = "all"
    num_expert_groups: int = 1
    topk_groups: int | None = None
    routed_scaling_factor: float = 1.0
    bias_update_rate: float = 0.001
    sequence_balance_coef: float = 0.0
    slots_per_expert: int = 1
    soft_normalize: bool = True
    hash_vocab_size: int | None = None
    hash_seed: int = 0
    num_shared_experts: int = 0
    shared_d_ff: int | None = None
    shared_expert_gate: bool = False
    router_logit_bias: bool = False
    compute: str = "auto"
    check_finite: bool = False
    debug_balanced_routing: bool = False

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
        if self.router_jitter is None:
            self.router_jitter = _DEFAULT_SWITCH_JITTER if self.router == "switch" else 0.0
        if not 0.0 <= self.router_jitter < 1.0:
            raise ValueError(f"router_jitter ({self.router_jitter}) must be in [0, 1)")
        for name in (
            "load_balance_coef",
            "z_loss_coef",
            "importance_coef",
            "load_coef",
            "sequence_balance_coef",
            "bias_update_rate",
        ):
            value = getattr(self, name)
            if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} ({value!r}) must be a finite number >= 0")
        self._validate_router_options()
        self._validate_shared_experts()

    def _validate_router_options(self) -> None:
        if self.second_expert_policy not in SECOND_EXPERT_POLICIES:
            raise ValueError(
                f"second_expert_policy ({self.second_expert_policy!r}) must be one of "
                f"{', '.join(SECOND_EXPERT_POLICIES)}"
            )
        if self.second_expert_policy == "random":
            if self.router not in ("topk", "noisy_topk"):
                raise ValueError(
                    f"second_expert_policy 'random' applies to routers topk and noisy_topk, "
                    f"not {self.router!r}"
                )
            if self.top_k != 2:
                raise ValueError(f"second_expert_policy 'random' needs top_k = 2; got top_k ({self.top_k})")
        for name in ("num_expert_groups", "slots_per_expert"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} ({value!r}) must be a positive integer")
        groups = self.num_expert_groups
        if self.num_experts % groups != 0:
            raise ValueError(
                f"num_experts ({self.num_experts}) must be divisible by num_expert_groups ({groups})"
            )
        if self.topk_groups is None:
            self.topk_groups = groups
        if isinstance(self.topk_groups, bool) or not isinstance(self.topk_groups, int) or not (
            1 <= self.topk_groups <= groups
        ):
            raise ValueError(f"topk_groups ({self.topk_groups!r}) must be an int in [1, {groups}]")
        reachable = self.topk_groups * (self.num_experts // groups)
        if self.router == "sigmoid" and self.top_k > reachable:
            raise ValueError(
                f"top_k ({self.top_k}) must be <= topk_groups · experts per group ({reachable})"
            )
        scale = self.routed_scaling_factor
        if isinstance(scale, bool) or not isinstance(scale, int | float) or not math.isfinite(scale) or scale <= 0:
            raise ValueError(f"routed_scaling_factor ({scale!r}) must be a finite number > 0")
        if self.router == "hash" and (
            isinstance(self.hash_vocab_size, bool)
            or not isinstance(self.hash_vocab_size, int)
            or self.hash_vocab_size < 1
        ):
            raise ValueError(
                f"router 'hash' needs hash_vocab_size, a positive int (the number of token ids); "
                f"got {self.hash_vocab_size!r}"
            )

    def _validate_shared_experts(self) -> None:
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
        return {
            "load_balance": float(self.load_balance_coef),
            "z_loss": float(self.z_loss_coef),
            "importance": float(self.importance_coef),
            "load": float(self.load_coef),
            "sequence_balance": float(self.sequence_balance_coef),
        }

    def capacity(self, num_tokens: int) -> int | None:
        """Assignments each expert may take for ``num_tokens`` tokens (None: unlimited)."""
        if self.expert_capacity is not None:
            return self.expert_capacity
        if self.capacity_factor is None:
            return None
        return math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts)

    def expert_choice_capacity(self, num_tokens: int) -> int:
        """Tokens each expert takes under expert choice: ceil(capacity_factor · T / E), in [1, T]."""
        factor = self.top_k if self.capacity_factor is None else self.capacity_factor
        return max(1, min(num_tokens, math.ceil(factor * num_tokens / self.num_experts)))
