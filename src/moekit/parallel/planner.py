"""A cost model of MoE training at scale, and a planner over (data, expert, replication) layouts.

``predict`` estimates one optimizer step of a decoder-only MoE language model on a
given layout, from the model's shapes, the hardware's measured rates and the
routing skew:

- compute: 6 FLOPs per active parameter per token (forward and backward) plus the
  attention scores (6·S_eff·H·d_h per layer and token, S_eff the mean causal
  context), at the measured GEMM rate; the expert part is scaled by the busiest
  rank's share of the rows (max/mean rank load, after replication);
- the MoE all-to-alls: 4 per MoE layer and micro-batch (dispatch and combine, in
  forward and backward), each moving T·K·D activations·(EP − 1)/EP per rank, at
  the all-to-all bandwidth and latency of the link the EP group spans (NVLink
  inside a node, InfiniBand across), the busiest rank receiving max/mean times
  the mean;
- replicas: their weights fetched every forward and their gradients reduced in
  backward (``moekit.parallel.replication``);
- gradients: a ring all-reduce of the non-expert gradients over all ranks (DDP)
  or, with FSDP, two all-gathers of the weights and a reduce-scatter per
  micro-batch; the experts' over the ranks that hold them;
- the optimizer: reading and writing the parameters and AdamW's moments at the
  memory bandwidth.

Memory per rank: weights, gradients and AdamW state of what the rank holds, plus the
activations a micro-batch keeps for backward (an estimate per token and layer).

``plan`` searches, for each number of devices, the EP sizes that divide E and the
device count, DDP or FSDP for the rest, and 0–2 replica slots, keeps the layouts
that fit the device memory and ranks them by tokens per second. It is a first-order
model: no overlap between computation and communication, no pipeline or tensor
parallelism. ``benchmarks/planner_check.py`` states its error against measured steps.

Shapes: T tokens per micro-batch and rank, D model dim, E experts, K experts per
token, S sequence length, W devices.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch

from .replication import Placement, max_over_mean, plan_placement


@dataclass(frozen=True)
class ModelShape:
    """A decoder-only MoE language model's shapes (every ``moe_every``-th block is MoE)."""

    name: str
    n_layer: int
    d_model: int
    n_head: int
    head_dim: int
    vocab: int
    seq: int
    num_experts: int
    top_k: int
    expert_d_ff: int
    n_kv_head: int | None = None
    glu: bool = True
    moe_every: int = 1
    dense_d_ff: int = 0
    shared_experts: int = 0
    shared_d_ff: int = 0
    tied_embeddings: bool = False
    sliding_window: int | None = None  # on every other layer (GPT-OSS), None: full attention everywhere

    @property
    def moe_layers(self) -> int:
        return sum(1 for layer in range(self.n_layer) if layer % self.moe_every == self.moe_every - 1)

    def _mlp(self, d_ff: int) -> int:
        return (3 if self.glu else 2) * self.d_model * d_ff

    @property
    def expert_params(self) -> int:
        return self._mlp(self.expert_d_ff)

    def counts(self) -> dict[str, int]:
        """Parameter counts: ``dense`` (everything but the routed experts), ``experts`` (all of them),
        ``active`` (what one token uses, the embedding lookup excluded, the output head included)."""
        D, kv = self.d_model, self.n_kv_head or self.n_head
        attention = D * self.n_head * self.head_dim * 2 + 2 * D * kv * self.head_dim + 2 * D  # q, o, k, v, norms
        moe_block = attention + D * self.num_experts + self.shared_experts * self._mlp(self.shared_d_ff)
        dense_block = attention + self._mlp(self.dense_d_ff)
        embedding = self.vocab * D * (1 if self.tied_embeddings else 2)
        dense = self.moe_layers * moe_block + (self.n_layer - self.moe_layers) * dense_block + embedding + D
        experts = self.moe_layers * self.num_experts * self.expert_params
        active = dense - self.vocab * D + self.moe_layers * self.top_k * self.expert_params
        return {"dense": dense, "experts": experts, "active": active}

    def flops_per_token(self) -> dict[str, float]:
        """Training FLOPs per token: the expert part and the rest (attention scores included)."""
        counts = self.counts()
        expert = 6.0 * self.moe_layers * self.top_k * self.expert_params
        context = [min(self.sliding_window, self.seq / 2) if self.sliding_window and layer % 2 == 0 else self.seq / 2
                   for layer in range(self.n_layer)]
        scores = 12.0 * self.n_head * self.head_dim * sum(context)
        return {"experts": expert, "rest": 6.0 * counts["active"] - expert + scores}

    def activation_elements_per_token(self) -> float:
        """Elements one token keeps for backward (an estimate: block inputs, projections' inputs
        and outputs, the routed rows and the experts' hidden activations, the logits)."""
        D, kv = self.d_model, self.n_kv_head or self.n_head
        attention = 4 * D + (2 * self.n_head + 2 * kv) * self.head_dim
        hidden = (3 if self.glu else 2)
        moe = 3 * D + self.num_experts + 2 * self.top_k * D + self.top_k * hidden * self.expert_d_ff \
            + self.shared_experts * hidden * self.shared_d_ff
        dense = 3 * D + hidden * self.dense_d_ff
        return self.n_layer * attention + self.moe_layers * moe + (self.n_layer - self.moe_layers) * dense \
            + 2 * self.vocab


@dataclass(frozen=True)
class Hardware:
    """Rates of one device and its links. Bandwidths are per device and direction, as an
    all-to-all of that pattern achieves them."""

    name: str
    gemm_flops: float
    memory_bytes: float
    memory_bandwidth: float
    devices_per_node: int
    intra_bandwidth: float
    intra_latency: float
    inter_bandwidth: float
    inter_latency: float
    source: str = ""


@dataclass(frozen=True)
class Precision:
    """Bytes per parameter of weights, gradients and optimizer state, and per activation element."""

    name: str
    weights: int
    grads: int
    optimizer: int
    activations: int


PRECISIONS = {
    "fp32": Precision("fp32", 4, 4, 8, 4),  # moekit's default: fp32 weights, AdamW's two fp32 moments
    "bf16": Precision("bf16", 2, 4, 12, 2),  # bf16 weights, fp32 gradients, fp32 master weights and moments
}


@dataclass(frozen=True)
class Layout:
    devices: int
    ep: int
    fsdp: bool = False
    slots: int = 0

    def describe(self) -> str:
        rest = f"FSDP {self.devices}" if self.fsdp else f"DDP {self.devices}"
        return f"EP {self.ep} × {self.devices // self.ep} data, {rest}, {self.slots} replica slot(s)"


@dataclass
class Prediction:
    layout: Layout
    step_s: float
    tokens_per_s: float
    memory_bytes: float
    fits: bool
    max_over_mean: float
    seconds: dict = field(default_factory=dict)
    memory: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {**asdict(self), "layout": asdict(self.layout), "describe": self.layout.describe()}


def zipf_loads(num_experts: int, s: float, seed: int = 0) -> torch.Tensor:
    """Expected rows per expert under a Zipf law of exponent ``s`` (0: uniform), the experts in a
    fixed random order (hot experts land on any rank)."""
    loads = 1.0 / torch.arange(1, num_experts + 1, dtype=torch.float64) ** s
    return loads[torch.randperm(num_experts, generator=torch.Generator().manual_seed(seed))]


def _ring(bytes_: float, ranks: int, bandwidth: float, latency: float, passes: float) -> float:
    """Time of ``passes`` ring traversals (all-reduce: 2, all-gather or reduce-scatter: 1)."""
    if ranks <= 1:
        return 0.0
    return passes * ((ranks - 1) / ranks * bytes_ / bandwidth + (ranks - 1) * latency)


def predict(model: ModelShape, hardware: Hardware, layout: Layout, tokens: int, *, grad_accumulation: int = 1,
            loads_E: torch.Tensor | None = None, precision: Precision = PRECISIONS["bf16"]) -> Prediction:
    """One optimizer step on ``layout``: ``tokens`` per micro-batch and device, ``grad_accumulation``
    micro-batches; ``loads_E`` the expected rows per expert (default uniform)."""
    W, ep = layout.devices, layout.ep
    if model.num_experts % ep or W % ep:
        raise ValueError(f"EP size {ep} must divide the experts ({model.num_experts}) and the devices ({W})")
    loads = torch.ones(model.num_experts, dtype=torch.float64) if loads_E is None else loads_E.double()
    placement = plan_placement(loads, ep, layout.slots) if layout.slots and ep > 1 else \
        Placement(model.num_experts, ep, max(layout.slots, 0))
    skew = max_over_mean(placement.rank_loads(loads)) if ep > 1 else 1.0
    counts, flops = model.counts(), model.flops_per_token()
    D, K, act = model.d_model, model.top_k, precision.activations
    intra = lambda group: group <= hardware.devices_per_node  # noqa: E731
    link = lambda group: (hardware.intra_bandwidth, hardware.intra_latency) if intra(group) \
        else (hardware.inter_bandwidth, hardware.inter_latency)  # noqa: E731
    seconds = {
        "compute": grad_accumulation * tokens * (flops["rest"] + flops["experts"] * skew) / hardware.gemm_flops,
    }
    a2a_bw, a2a_lat = link(ep)
    a2a_bytes = tokens * K * D * act * (ep - 1) / ep * skew
    seconds["all_to_all"] = grad_accumulation * model.moe_layers * 4 * (a2a_bytes / a2a_bw + a2a_lat) if ep > 1 else 0.0
    replica_bytes = layout.slots * model.expert_params * precision.weights
    seconds["replicas"] = grad_accumulation * model.moe_layers * 2 * (
        replica_bytes / a2a_bw + a2a_lat * layout.slots * ep) if layout.slots and ep > 1 else 0.0
    dense_bw, dense_lat = link(W)
    dense_grad_bytes = counts["dense"] * precision.grads
    if layout.fsdp:
        weights_bytes = counts["dense"] * precision.weights
        seconds["gradients"] = grad_accumulation * (_ring(weights_bytes, W, dense_bw, dense_lat, 2)
                                                    + _ring(dense_grad_bytes, W, dense_bw, dense_lat, 1))
    else:
        seconds["gradients"] = _ring(dense_grad_bytes, W, dense_bw, dense_lat, 2)
    expert_holders = W // ep
    local_expert_params = counts["experts"] / ep / (expert_holders if layout.fsdp else 1)  # FSDP over the holders
    seconds["gradients"] += _ring(counts["experts"] / ep * precision.grads, expert_holders, *link(W),
                                  3 * grad_accumulation if layout.fsdp else 2)
    state_bytes = precision.weights + precision.grads + precision.optimizer
    seconds["optimizer"] = 2 * (counts["dense"] / (W if layout.fsdp else 1) + local_expert_params) * state_bytes \
        / hardware.memory_bandwidth
    memory = {"states": (counts["dense"] / (W if layout.fsdp else 1) + local_expert_params) * state_bytes,
              "replicas": model.moe_layers * layout.slots * model.expert_params * (precision.weights + precision.grads),
              "activations": tokens * model.activation_elements_per_token() * act * (1 + 0.5 * (skew - 1)),
              "gathered": (counts["dense"] / max(model.n_layer, 1)) * precision.weights * 2 if layout.fsdp else 0.0}
    step = sum(seconds.values())
    total_memory = sum(memory.values())
    return Prediction(layout, step, W * tokens * grad_accumulation / step, total_memory,
                      total_memory <= hardware.memory_bytes, skew, seconds, memory)


def layouts(num_experts: int, devices: int, slots: tuple[int, ...] = (0, 1, 2)) -> list[Layout]:
    """Every layout ``plan`` considers on ``devices`` devices."""
    eps = [ep for ep in range(1, min(num_experts, devices) + 1) if num_experts % ep == 0 and devices % ep == 0]
    return [Layout(devices, ep, fsdp, s) for ep in eps for fsdp in (False, True) for s in slots
            if not (s and (ep == 1 or fsdp))]  # replicas copy whole experts: EP without FSDP (moekit's rule)


def plan(model: ModelShape, hardware: Hardware, devices: list[int], tokens: int, *, grad_accumulation: int = 1,
         zipf: float = 0.0, precision: Precision = PRECISIONS["bf16"]) -> dict[int, list[Prediction]]:
    """For each device count, every layout's prediction, the fastest that fits first."""
    loads = zipf_loads(model.num_experts, zipf)
    result = {}
    for count in devices:
        predictions = [predict(model, hardware, layout, tokens, grad_accumulation=grad_accumulation, loads_E=loads,
                               precision=precision) for layout in layouts(model.num_experts, count)]
        result[count] = sorted(predictions, key=lambda p: (not p.fits, -p.tokens_per_s))
    return result


GiB = 2.0 ** 30

# Published rates (docs/distributed.md cites each): NVIDIA's datasheets for the dense BF16 peak and
# memory; DeepEP's README for the dispatch/combine bandwidth an all-to-all reaches on NVLink (EP 8 in one
# node) and on CX7 InfiniBand (EP 8 × 2); GEMM at 70 % of peak, the share large bf16 GEMMs reach.
HARDWARE = {
    "h100": Hardware("H100 SXM (DGX H100)", 0.7 * 989e12, 80 * GiB, 3.35e12, 8, 300e9, 10e-6, 45e9, 20e-6,
                     "989 TFLOP/s dense BF16, 80 GB HBM3 at 3.35 TB/s (NVIDIA H100 datasheet); all-to-all 300 GB/s "
                     "on NVLink 4 (an estimate: DeepEP measures 153 GB/s on the H800's halved NVLink) and 45 GB/s "
                     "on 400 Gb/s CX7 InfiniBand (DeepEP V1, EP 16: 43–58 GB/s)"),
    "b200": Hardware("B200 (DGX B200)", 0.7 * 2.25e15, 180 * GiB, 8e12, 8, 726e9, 10e-6, 90e9, 20e-6,
                     "2.25 PFLOP/s dense BF16, 180 GB HBM3e at 8 TB/s (NVIDIA DGX B200 datasheet); all-to-all "
                     "726 GB/s on NVLink 5 (DeepEP V2, SM100 EP 8 dispatch) and 90 GB/s on CX7 InfiniBand (DeepEP "
                     "V2, EP 8 × 2)"),
}

MODELS = {
    # GPT-OSS-120B: transformers' GptOssConfig defaults; alternating 128-token sliding window.
    "gpt-oss-120b": ModelShape("gpt-oss-120b", n_layer=36, d_model=2880, n_head=64, head_dim=64, n_kv_head=8,
                               vocab=201088, seq=4096, num_experts=128, top_k=4, expert_d_ff=2880,
                               sliding_window=128),
    # Mixtral-8x7B: transformers' MixtralConfig defaults.
    "mixtral-8x7b": ModelShape("mixtral-8x7b", n_layer=32, d_model=4096, n_head=32, head_dim=128, n_kv_head=8,
                               vocab=32000, seq=4096, num_experts=8, top_k=2, expert_d_ff=14336),
    # moekit's demo language model (moekit demo).
    "demo": ModelShape("demo", n_layer=4, d_model=64, n_head=4, head_dim=16, vocab=1024, seq=128, num_experts=8,
                       top_k=2, expert_d_ff=256, tied_embeddings=True),
}


def format_plan(result: dict[int, list[Prediction]], top: int = 3) -> str:
    lines = [f"{'devices':>8}  {'layout':<44}{'tokens/s/device':>16}{'step s':>9}{'GiB/device':>11}"
             f"{'max/mean':>9}  fits"]
    for count, predictions in result.items():
        for prediction in predictions[:top]:
            lines.append(f"{count:>8}  {prediction.layout.describe():<44}{prediction.tokens_per_s / count:>16.0f}"
                         f"{prediction.step_s:>9.3f}{prediction.memory_bytes / GiB:>11.1f}"
                         f"{prediction.max_over_mean:>9.2f}  {'yes' if prediction.fits else 'no'}")
    return "\n".join(lines)


def powers_of_two(low: int, high: int) -> list[int]:
    return [2 ** e for e in range(int(math.log2(low)), int(math.log2(high)) + 1)]
