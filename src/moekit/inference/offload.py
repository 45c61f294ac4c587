"""Run a model whose experts exceed the memory it is given: offloaded experts, an expert
cache per MoE layer, and prefetch from a look-ahead of the next layer's router.

``offload_model(model, ...)`` moves the stacked experts of every MoE layer of a moekit
language model or a converted Hugging Face model to a slow tier (CPU memory, or a
safetensors file on disk) behind a fixed cache per layer; ``load_offloaded_run(run_dir,
max_memory=...)`` builds a moekit run that way without ever holding all its experts.
With ``prefetch``, each MoE layer, before computing, applies the next MoE layer's
router weights to its own input and starts loading the experts that router would
pick; a wrong guess costs a load, never a wrong output.

``cache_plan(resident_bytes, expert_size, layers, num_experts, max_memory)`` splits a
budget: the non-expert weights (and, for a whole process, its own memory) stay
resident, the rest is divided equally among the layers' caches.
"""

from __future__ import annotations

import json
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..experts.offloaded import DiskStore, ExpertCache, ExpertStore, MemoryStore, OffloadedExperts
from ..layer import MoE, moe_layers

_UNITS = {"": 1, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "kib": 2**10, "mib": 2**20, "gib": 2**30}
# Offloaded experts compute one expert at a time on rows sorted by expert, in ascending
# expert order: the access order a routing trace replays (``moekit.inference.traces``).
OFFLOADED_COMPUTE = "segment"


# Room left for activations when a budget covers the whole process (measured peaks at
# batch 1 of the default model stay well under it).
ACTIVATION_RESERVE_BYTES = 64 << 20


def process_rss_bytes() -> int:
    """This process's resident memory now (Linux; 0 where /proc is missing)."""
    try:
        pages = int(Path("/proc/self/statm").read_text().split()[1])
    except (OSError, IndexError, ValueError):
        return 0
    return pages * os.sysconf("SC_PAGE_SIZE")


def parse_size(text: str | int) -> int:
    """Bytes in ``"300MB"``, ``"1.5GiB"``, ``"4096"``; raises ``ValueError`` naming the text."""
    if isinstance(text, int):
        return text
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    if match is None or match.group(2).lower() not in _UNITS:
        raise ValueError(f"memory size {text!r} is not a number with an optional unit "
                         f"(B, KB, MB, GB, KiB, MiB, GiB), e.g. 300MB")
    return int(float(match.group(1)) * _UNITS[match.group(2).lower()])


def _experts_of(layer: MoE, name: str):
    experts = layer.experts
    if not getattr(experts, "stacked_mlp", False):
        raise ValueError(f"the experts of {name!r} are {type(experts).__name__}; only stacked MLP experts "
                         "(swiglu, geglu, ffn) can be offloaded")
    return experts


def expert_bytes(layer: MoE) -> int:
    """Bytes of one expert of ``layer`` (its weights and biases)."""
    experts = layer.experts
    return sum(t[0].numel() * t.element_size() for t in (experts.w_in, experts.w_out, experts.b_in, experts.b_out)
               if t is not None)


@dataclass(frozen=True)
class CachePlan:
    """How a memory budget is spent: ``resident_bytes`` of non-expert weights, then
    ``experts_per_layer`` cached experts of ``expert_bytes`` each in every MoE layer."""

    max_memory: int
    resident_bytes: int
    expert_bytes: int
    layers: int
    experts_per_layer: int
    num_experts: int

    def describe(self) -> str:
        cache = self.layers * self.experts_per_layer * self.expert_bytes
        return (f"offloading: {self.experts_per_layer} of {self.num_experts} experts cached per layer × {self.layers} "
                f"layers ({cache / 2**20:.1f} MiB) + {self.resident_bytes / 2**20:.1f} MiB of other weights and "
                f"process memory, "
                f"within {self.max_memory / 2**20:.1f} MiB")


def cache_plan(resident_bytes: int, expert_size: int, layers: int, num_experts: int, max_memory: int | str,
               overhead_bytes: int = 0) -> CachePlan:
    """Split ``max_memory`` between the resident weights and the layers' expert caches.

    ``overhead_bytes``: memory the process needs besides the weights (its runtime and
    activations), counted as resident. Raises ``ValueError`` when the budget is below the
    resident weights or leaves less than one expert per layer."""
    budget = parse_size(max_memory)
    resident_bytes += overhead_bytes
    if budget <= resident_bytes:
        raise ValueError(f"--max-memory {budget / 2**20:.1f} MiB is below the non-expert weights "
                         f"and the process's own memory ({resident_bytes / 2**20:.1f} MiB), which stay in memory")
    per_layer = (budget - resident_bytes) // (layers * expert_size)
    if per_layer < 1:
        need = resident_bytes + layers * expert_size
        raise ValueError(f"--max-memory {budget / 2**20:.1f} MiB leaves a cache smaller than one expert per MoE "
                         f"layer; it needs at least {need / 2**20:.1f} MiB ({layers} layers × "
                         f"{expert_size / 2**20:.2f} MiB per expert + {resident_bytes / 2**20:.1f} MiB of other weights "
                         "and process memory)")
    return CachePlan(budget, resident_bytes, expert_size, layers, min(per_layer, num_experts), num_experts)


class Offloaded:
    """What ``offload_model`` set up: the layers' caches and the prefetch hooks."""

    def __init__(self, layers: list[tuple[str, MoE]], loader: ThreadPoolExecutor | None, handles: list):
        self.layers, self.loader, self._handles = layers, loader, handles

    @property
    def caches(self) -> list[ExpertCache]:
        return [layer.experts.cache for _, layer in self.layers]

    def stats(self) -> dict:
        hits = sum(c.hits for c in self.caches)
        misses = sum(c.misses for c in self.caches)
        return {"hits": hits, "misses": misses, "hit_rate": hits / (hits + misses) if hits + misses else float("nan"),
                "prefetches": sum(c.prefetches for c in self.caches)}

    def reset_stats(self) -> None:
        for cache in self.caches:
            cache.reset_stats()

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        if self.loader is not None:
            self.loader.shutdown(wait=True)


def _predict_next(router_weight: Tensor, x: Tensor, top_k: int) -> list[int]:
    """The experts the next layer's router would pick for ``x``: its top-k for one token, the
    k with most votes for several."""
    x_TD = x.reshape(-1, x.shape[-1])
    logits_TE = F.linear(x_TD.to(router_weight.dtype), router_weight)
    if x_TD.shape[0] == 1:
        return logits_TE[0].topk(top_k).indices.tolist()
    votes_E = torch.bincount(logits_TE.topk(top_k, dim=-1).indices.reshape(-1), minlength=router_weight.shape[0])
    return votes_E.topk(top_k).indices.tolist()


def _prefetch_hook(next_layer: MoE):
    cache = next_layer.experts.cache
    weight = next_layer.router.weight
    # Never more than half the cache: a wrong guess must not evict everything the layer holds.
    count = min(next_layer.config.top_k, max(cache.capacity // 2, 1))

    @torch.no_grad()
    def hook(module, args, kwargs):
        for e in _predict_next(weight, args[0], count):
            cache.prefetch(e)

    return hook


@torch.no_grad()
def offload_model(model: nn.Module, *, experts_per_layer: int | None = None, max_memory: int | str | None = None,
                  policy: str = "lru", prefetch: bool | None = None, store: str | Path = "memory",
                  compute_misses_in_place: bool = False, device: torch.device | str | None = None) -> Offloaded:
    """Offload the stacked experts of every MoE layer of ``model`` (in place).

    Give the cache size either as ``experts_per_layer`` or as a ``max_memory`` budget
    for all weights (``cache_plan``). ``store``: ``"memory"`` (CPU memory) or the path of
    a safetensors file holding the layers' stacked tensors under their state-dict names.
    ``device``: the fast tier (default: where the experts are). ``prefetch`` (default: on
    for a CUDA fast tier only; on CPU a miss is one memory copy on the cores that compute,
    and wrong guesses evict useful experts: BENCHMARKS.md). Returns an ``Offloaded`` with
    the caches' statistics; ``close()`` removes the prefetch hooks."""
    layers = moe_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no MoE layer to offload")
    stacked = {name: _experts_of(layer, name) for name, layer in layers}
    if (experts_per_layer is None) == (max_memory is None):
        raise ValueError("give exactly one of experts_per_layer and max_memory")
    if max_memory is not None:
        expert_ids = {id(t) for experts in stacked.values() for t in experts.parameters()}
        resident = sum(t.numel() * t.element_size() for t in {id(t): t for t in
                       list(model.parameters()) + list(model.buffers())}.values() if id(t) not in expert_ids)
        plan = cache_plan(resident, max(expert_bytes(layer) for _, layer in layers), len(layers),
                          max(layer.config.num_experts for _, layer in layers), max_memory)
        experts_per_layer = plan.experts_per_layer
    if experts_per_layer < 1:
        raise ValueError(f"experts_per_layer must be at least 1 (a cache smaller than one expert); "
                         f"got {experts_per_layer}")
    if prefetch is None:
        fast = torch.device(device) if device is not None else next(iter(stacked.values())).w_in.device
        prefetch = fast.type == "cuda"

    def make_store(name: str, experts) -> ExpertStore:
        if str(store) == "memory":
            return MemoryStore({w: getattr(experts, w) for w in _weight_names(experts)})
        return DiskStore(store, {w: f"{name}.experts.{w}" for w in _weight_names(experts)})

    return _offload_layers(layers, make_store, experts_per_layer, policy, prefetch, device, compute_misses_in_place)


def _weight_names(experts) -> list[str]:
    return [w for w in ("w_in", "w_out", "b_in", "b_out") if getattr(experts, w) is not None]


def _offload_layers(layers: list[tuple[str, MoE]], make_store, experts_per_layer: int, policy: str, prefetch: bool,
                    device, compute_misses_in_place: bool = False) -> Offloaded:
    """Put every layer's experts behind a cache of ``experts_per_layer`` slots and hook the
    prefetch look-ahead of each layer's successor onto it."""
    loader = ThreadPoolExecutor(max_workers=1, thread_name_prefix="moekit-prefetch") if prefetch else None
    for name, layer in layers:
        experts = layer.experts
        slow = make_store(name, experts)
        fast = torch.device(device) if device is not None else getattr(experts.w_in, "device", "cpu")
        if fast.type == "meta":
            fast = torch.device("cpu")
        cache = ExpertCache(slow, experts_per_layer, policy, device=fast, loader=loader)
        layer.experts = OffloadedExperts(cache, d_model=experts.d_model, d_ff=experts.d_ff,
                                         activation=experts.activation, is_glu=experts.is_glu,
                                         compute_misses_in_place=compute_misses_in_place)
        layer.config.compute = OFFLOADED_COMPUTE
    handles = []
    if prefetch:
        for (_, layer), (_, next_layer) in zip(layers, layers[1:], strict=False):
            if getattr(next_layer.router, "weight", None) is not None and next_layer.router.token_choice:
                handles.append(layer.register_forward_pre_hook(_prefetch_hook(next_layer), with_kwargs=True))
    return Offloaded(layers, loader, handles)


def load_offloaded_run(run_dir: str | Path, max_memory: int | str | None = None, *, experts_per_layer: int | None = None,
                       policy: str = "lru", prefetch: bool = False):
    """A moekit run's language model with its experts read from its checkpoint file on
    demand: the experts are never all in memory. The cache size comes from ``max_memory``
    (the whole process's budget: ``cache_plan`` counts its memory so far and room for
    activations) or is ``experts_per_layer``. Returns (model, tokenizer, trainer state,
    ``Offloaded``, ``CachePlan`` or None)."""
    from ..data import load_tokenizer
    from ..models.lm import LanguageModel, rotary_tables
    from ..train import latest_checkpoint, read_run_config
    from ..train.checkpoint import check_trainer_state, load_model_tensors, verify_checksums

    model_config, _, _ = read_run_config(Path(run_dir))
    folder = latest_checkpoint(Path(run_dir))
    if folder is None:
        raise ValueError(f"{str(run_dir)!r} has no checkpoint yet; train it first")
    if model_config.moe is None:
        raise ValueError(f"{str(run_dir)!r} is a dense model: it has no experts to offload")
    if (folder / "shards").is_dir():
        raise ValueError(f"{str(folder)!r} holds sharded checkpoint files; offloading reads experts from one file: "
                         f"run moekit convert-checkpoint {run_dir} --to canonical first")
    verify_checksums(folder)  # the experts are read from this file for as long as the model runs
    file = folder / "model.safetensors"
    with torch.device("meta"):
        model = LanguageModel(model_config)
    layers = moe_layers(model)
    names = {name for name, _ in layers}
    resident_tensors = load_model_tensors(file, skip=lambda key: key.rsplit(".experts.", 1)[0] in names)
    resident = sum(t.numel() * t.element_size() for t in {id(t): t for t in resident_tensors.values()}.values())
    # The process's own memory so far (torch, the tensors just read) plus room for activations and the KV cache.
    kv_cache = 2 * model_config.n_layer * model_config.context_length * model_config.d_model * 4
    overhead = process_rss_bytes() + ACTIVATION_RESERVE_BYTES + kv_cache
    if (experts_per_layer is None) == (max_memory is None):
        raise ValueError("give exactly one of max_memory and experts_per_layer")
    plan = None
    if max_memory is not None:
        plan = cache_plan(resident, expert_bytes(layers[0][1]), len(layers), model_config.moe.num_experts, max_memory,
                          overhead_bytes=overhead)
        experts_per_layer = plan.experts_per_layer
    offloaded = _offload_layers(
        layers, lambda name, experts: DiskStore(file, {w: f"{name}.experts.{w}" for w in _weight_names(experts)}),
        experts_per_layer, policy, prefetch, "cpu")
    model.to_empty(device="cpu")
    model.load_state_dict(resident_tensors, strict=False, assign=False)
    missing = [k for k in model.state_dict() if k not in resident_tensors and ".experts." not in k]
    if missing:
        raise ValueError(f"{str(file)!r} has no tensor for {', '.join(missing[:5])}")
    cos, sin = rotary_tables(model_config.context_length, model_config.d_model // model_config.n_head)
    model.rotary_cos.copy_(cos)
    model.rotary_sin.copy_(sin)
    model.eval()
    state_file = folder / "trainer_state.json"
    try:
        state = json.loads(state_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{str(state_file)!r} is not valid JSON ({error})") from None
    check_trainer_state(state, state_file, resuming=False)
    return model, load_tokenizer(Path(run_dir) / "tokenizer.json"), state, offloaded, plan
