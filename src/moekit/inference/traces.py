"""Routing traces and an expert-cache simulator.

A trace is, per MoE layer, the sequence of expert accesses a forward pass makes:
``("use", e)`` when expert e computes, ``("prefetch", e)`` when a look-ahead asks for
it. ``record_routing(model)`` records uses from the routing of any MoE model (resident
or offloaded): per layer call, the experts that received rows, in ascending order,
which is the order offloaded experts are computed in. ``Offloaded.caches`` record
their own accesses, prefetches included (``record_cache_accesses``).

``simulate(trace, policy, capacity)`` replays a trace on an expert cache per layer and
counts hits and misses: ``lru``, ``lfu`` (as ``moekit.experts.offloaded.ExpertCache``
evicts) and ``optimal`` (Belady: evict the expert whose next use is furthest away, a
bound no policy beats). The tests hold the simulator to the hit counts the real cache
measures on the same trace.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from torch import nn

from ..layer import moe_layers

SIMULATED_POLICIES = ("lru", "lfu", "optimal")


@dataclass
class RoutingTrace:
    """Expert accesses per MoE layer (``accesses[layer]``: list of (kind, expert)) and
    each layer's number of experts."""

    num_experts: dict[str, int]
    accesses: dict[str, list[tuple[str, int]]] = field(default_factory=dict)

    def uses(self, layer: str) -> list[int]:
        return [e for kind, e in self.accesses[layer] if kind == "use"]

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps({"num_experts": self.num_experts, "accesses": self.accesses}))

    @classmethod
    def load(cls, path: str | Path) -> RoutingTrace:
        try:
            raw = json.loads(Path(path).read_text())
            return cls(raw["num_experts"], {layer: [(kind, int(e)) for kind, e in events]
                                            for layer, events in raw["accesses"].items()})
        except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as error:
            raise ValueError(f"{str(path)!r} is not a routing trace written by moekit ({error})") from None


@contextmanager
def record_routing(model: nn.Module) -> Iterator[RoutingTrace]:
    """Record the experts each MoE layer of ``model`` computes, per call, while the block runs."""
    layers = moe_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no MoE layer to trace")
    trace = RoutingTrace({name: layer.config.num_experts for name, layer in layers},
                         {name: [] for name, _ in layers})

    def recorder(name):
        def hook(module, args, output):
            counts_E = output.routing.tokens_per_expert_E
            trace.accesses[name].extend(("use", e) for e in (counts_E > 0).nonzero().flatten().tolist())
        return hook

    handles = [layer.register_forward_hook(recorder(name)) for name, layer in layers]
    try:
        yield trace
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def record_cache_accesses(offloaded) -> Iterator[RoutingTrace]:
    """Record every access the caches of an ``Offloaded`` model see, prefetches included."""
    trace = RoutingTrace({name: layer.config.num_experts for name, layer in offloaded.layers})
    for name, layer in offloaded.layers:
        layer.experts.cache.trace = trace.accesses.setdefault(name, [])
    try:
        yield trace
    finally:
        for _, layer in offloaded.layers:
            layer.experts.cache.trace = None


@dataclass(frozen=True)
class SimulatedHits:
    policy: str
    capacity: int
    hits: int
    misses: int

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else float("nan")


def _simulate_layer(accesses: list[tuple[str, int]], num_experts: int, policy: str, capacity: int) -> tuple[int, int]:
    capacity = min(capacity, num_experts)
    resident: OrderedDict[int, None] = OrderedDict()  # least recently used first
    uses, last_use = [0] * num_experts, [0] * num_experts
    clock = hits = misses = 0
    if policy == "optimal":
        # Belady's MIN knows the future, so it needs no prefetch: replay the uses only, and
        # for each, the index of its expert's next use.
        accesses = [access for access in accesses if access[0] == "use"]
        next_use, upcoming = [0] * len(accesses), {}
        for i in range(len(accesses) - 1, -1, -1):
            e = accesses[i][1]
            next_use[i] = upcoming.get(e, len(accesses))
            upcoming[e] = i
        due: dict[int, int] = {}

    def admit(e: int) -> None:
        if len(resident) == capacity:
            if policy == "lru":
                victim = next(iter(resident))
            elif policy == "lfu":
                victim = min(resident, key=lambda r: (uses[r], last_use[r]))
            else:
                victim = max(resident, key=lambda r: due[r])
            del resident[victim]
        resident[e] = None

    for i, (kind, e) in enumerate(accesses):
        if policy == "optimal":
            due[e] = next_use[i]
        if kind == "use":
            clock += 1
            uses[e] += 1
            last_use[e] = clock
            if e in resident:
                hits += 1
                resident.move_to_end(e)
            else:
                misses += 1
                admit(e)
        elif e not in resident:
            admit(e)
    return hits, misses


def simulate(trace: RoutingTrace, policy: str, capacity: int) -> SimulatedHits:
    """Hits and misses of ``capacity`` cached experts per layer under ``policy``, summed over layers."""
    if policy not in SIMULATED_POLICIES:
        raise ValueError(f"unknown cache policy {policy!r}; valid policies: {', '.join(SIMULATED_POLICIES)}")
    if capacity < 1:
        raise ValueError(f"a cache needs at least one expert; got capacity {capacity}")
    hits = misses = 0
    for layer, accesses in trace.accesses.items():
        h, m = _simulate_layer(accesses, trace.num_experts[layer], policy, capacity)
        hits, misses = hits + h, misses + m
    return SimulatedHits(policy, capacity, hits, misses)


def hit_rate_table(trace: RoutingTrace, capacities: list[int], policies=SIMULATED_POLICIES) -> list[dict]:
    """Simulated hit rate for each policy and cache size (experts per layer)."""
    return [{"capacity": c, **{p: simulate(trace, p, c).hit_rate for p in policies}} for c in capacities]
