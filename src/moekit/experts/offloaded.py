"""Offloaded experts: weights in a slow tier, a fixed cache of experts in the fast one.

The slow tier (``ExpertStore``) holds every expert: ``MemoryStore`` keeps them in CPU
memory (pinned when CUDA is available, for a model on a GPU), ``DiskStore`` reads
them from a safetensors file with positioned reads into the cache's own buffers (a
memory map would count every page it touches as the process's memory). The fast tier
is an ``ExpertCache`` of ``capacity`` slots per layer, allocated once, with an LRU or
LFU policy; a miss loads the expert into the victim's slot. ``prefetch`` loads an
expert ahead of its use on a background thread; a use waits for its slot's load.

Outputs equal those of the resident experts: the cache holds the same values and
``forward_expert`` runs the same operations as ``StackedExperts.forward_expert``.

Shapes: R rows sorted by expert, N rows of one expert, D model dim, E experts.
"""

from __future__ import annotations

import json
import os
import struct
import threading
from collections import OrderedDict
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor

from ..compute.mlp import hidden_activation, linear
from .base import Experts

POLICIES = ("lru", "lfu")
WEIGHT_NAMES = ("w_in", "w_out", "b_in", "b_out")
_SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


class ExpertStore:
    """The slow tier: every expert's tensors (``shapes``: name → per-expert shape)."""

    num_experts: int
    shapes: dict[str, torch.Size]
    dtype: torch.dtype

    @property
    def expert_bytes(self) -> int:
        return sum(torch.Size(shape).numel() for shape in self.shapes.values()) * self.dtype.itemsize

    def load_into(self, e: int, slot: dict[str, Tensor]) -> None:
        """Copy expert e's tensors into the fast-tier tensors of ``slot``."""
        raise NotImplementedError

    def tensors(self, e: int) -> dict[str, Tensor] | None:
        """Expert e's tensors where they live, to compute a miss there; None: not possible."""
        return None


class MemoryStore(ExpertStore):
    """Experts in CPU memory: ``tensors`` maps each weight name to its (E, …) tensor."""

    def __init__(self, tensors: dict[str, Tensor], pin: bool | None = None):
        first = next(iter(tensors.values()))
        self.num_experts, self.dtype = first.shape[0], first.dtype
        pin = torch.cuda.is_available() if pin is None else pin
        self._tensors = {name: (t.detach().cpu().pin_memory() if pin else t.detach().cpu()).contiguous()
                         for name, t in tensors.items()}
        self.shapes = {name: t.shape[1:] for name, t in self._tensors.items()}

    def load_into(self, e: int, slot: dict[str, Tensor]) -> None:
        for name, dest in slot.items():
            dest.copy_(self._tensors[name][e], non_blocking=dest.device.type == "cuda")

    def tensors(self, e: int) -> dict[str, Tensor]:
        return {name: t[e] for name, t in self._tensors.items()}


def safetensors_header(path: str | Path) -> tuple[dict, int]:
    """The header of a safetensors file and the byte offset where its data starts."""
    with open(path, "rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ValueError(f"{str(path)!r} is not a safetensors file (shorter than its 8-byte header size)")
        (size,) = struct.unpack("<Q", raw)
        try:
            header = json.loads(f.read(size))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ValueError(f"{str(path)!r} is not a safetensors file (its header is not JSON)") from error
    return header, 8 + size


class DiskStore(ExpertStore):
    """Experts read from a safetensors file: ``keys`` maps each weight name to the key of
    its stacked (E, …) tensor in the file."""

    def __init__(self, path: str | Path, keys: dict[str, str]):
        self.path = str(path)
        header, data_start = safetensors_header(path)
        self._spans, self.shapes = {}, {}
        dtypes = set()
        for name, key in keys.items():
            if key not in header:
                raise KeyError(f"{self.path!r} has no tensor {key!r}")
            entry = header[key]
            dtypes.add(entry["dtype"])
            begin, end = entry["data_offsets"]
            self.num_experts = entry["shape"][0]
            self.shapes[name] = torch.Size(entry["shape"][1:])
            self._spans[name] = (data_start + begin, (end - begin) // self.num_experts)
        if len(dtypes) != 1 or next(iter(dtypes)) not in _SAFETENSORS_DTYPES:
            raise ValueError(f"{self.path!r}: expert tensors must share one float dtype; got {sorted(dtypes)}")
        self.dtype = _SAFETENSORS_DTYPES[dtypes.pop()]
        self._fd = os.open(self.path, os.O_RDONLY)

    def load_into(self, e: int, slot: dict[str, Tensor]) -> None:
        for name, dest in slot.items():
            start, per_expert = self._spans[name]
            staging = dest if dest.device.type == "cpu" else torch.empty_like(dest, device="cpu")
            view = memoryview(staging.view(torch.uint8).numpy()).cast("B")
            done = 0
            while done < per_expert:  # a positioned read may return fewer bytes than asked
                n = os.preadv(self._fd, [view[done:]], start + e * per_expert + done)
                if n <= 0:
                    raise OSError(f"{self.path!r} ended inside expert {e}'s {name!r}; the file is truncated")
                done += n
            if staging is not dest:
                dest.copy_(staging)

    def __del__(self):
        fd = getattr(self, "_fd", None)
        if fd is not None:
            os.close(fd)


class ExpertCache:
    """``capacity`` slots of one layer's experts in the fast tier, with an eviction policy.

    ``lru`` evicts the expert used longest ago; ``lfu`` the one used least often over
    the whole run (ties: longest ago). Counts ``hits`` and ``misses`` of uses, and
    ``prefetches`` (loads ahead of use). ``trace`` (when a list) receives every access
    as ``("use" | "prefetch", expert)``, in order."""

    def __init__(self, store: ExpertStore, capacity: int, policy: str = "lru", device: torch.device | str = "cpu",
                 loader: ThreadPoolExecutor | None = None):
        if policy not in POLICIES:
            raise ValueError(f"unknown cache policy {policy!r}; valid policies: {', '.join(POLICIES)}")
        if not 1 <= capacity:
            raise ValueError(f"an expert cache needs at least one slot; got capacity {capacity}")
        self.store, self.policy = store, policy
        self.capacity = min(capacity, store.num_experts)
        self.slots = [{name: torch.empty(shape, dtype=store.dtype, device=device) for name, shape in store.shapes.items()}
                      for _ in range(self.capacity)]
        self._slot_of: OrderedDict[int, int] = OrderedDict()  # expert → slot, least recently used first
        self._pending: dict[int, Future] = {}  # slot → its load in flight
        self._uses = [0] * store.num_experts
        self._clock, self._last_use = 0, [0] * store.num_experts
        self._loader = loader
        self._lock = threading.Lock()
        self.hits = self.misses = self.prefetches = 0
        self.trace: list[tuple[str, int]] | None = None

    @property
    def resident(self) -> list[int]:
        return list(self._slot_of)

    def _victim_slot(self) -> int:
        if len(self._slot_of) < self.capacity:
            return len(self._slot_of)
        if self.policy == "lru":
            expert = next(iter(self._slot_of))
        else:
            expert = min(self._slot_of, key=lambda e: (self._uses[e], self._last_use[e]))
        return self._slot_of.pop(expert)

    def _admit(self, e: int, wait: bool) -> int:
        slot = self._victim_slot()
        pending = self._pending.pop(slot, None)
        if pending is not None:
            pending.result()  # never overwrite a slot while its previous load is still writing it
        self._slot_of[e] = slot
        if wait or self._loader is None:
            self.store.load_into(e, self.slots[slot])
        else:
            self._pending[slot] = self._loader.submit(self.store.load_into, e, self.slots[slot])
        return slot

    def use(self, e: int) -> dict[str, Tensor]:
        """Expert e's tensors in the fast tier, loading them on a miss."""
        with self._lock:
            if self.trace is not None:
                self.trace.append(("use", e))
            self._clock += 1
            self._uses[e] += 1
            self._last_use[e] = self._clock
            slot = self._slot_of.get(e)
            if slot is None:
                self.misses += 1
                slot = self._admit(e, wait=True)
            else:
                self.hits += 1
                self._slot_of.move_to_end(e)
            pending = self._pending.pop(slot, None)
        if pending is not None:
            pending.result()
        return self.slots[slot]

    def prefetch(self, e: int) -> None:
        """Start loading expert e unless it is resident (the load runs on the loader thread)."""
        with self._lock:
            if self.trace is not None:
                self.trace.append(("prefetch", e))
            if e in self._slot_of:
                return
            self.prefetches += 1
            self._admit(e, wait=False)

    def is_resident(self, e: int) -> bool:
        return e in self._slot_of

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else float("nan")

    def reset_stats(self) -> None:
        self.hits = self.misses = self.prefetches = 0


class OffloadedExperts(Experts):
    """Stacked MLP experts whose weights live in an ``ExpertStore`` behind an ``ExpertCache``.

    ``compute_misses_in_place``: a miss whose weights the store can compute with (a
    ``MemoryStore``) runs there and only the rows move, instead of loading the expert
    into the cache (Fiddler's choice for a model on a GPU with experts in CPU memory).
    Inference only: the offloaded weights get no gradients."""

    stacked_mlp: ClassVar[bool] = False
    shardable: ClassVar[bool] = False

    def __init__(self, cache: ExpertCache, *, d_model: int, d_ff: int, activation: str, is_glu: bool,
                 compute_misses_in_place: bool = False):
        super().__init__()
        self.cache = cache
        self.num_experts, self.d_model, self.d_ff = cache.store.num_experts, d_model, d_ff
        self.activation, self.is_glu = activation, is_glu
        if compute_misses_in_place and cache.store.tensors(0) is None:
            raise ValueError(f"{type(cache.store).__name__} cannot compute where its experts live; "
                             "compute_misses_in_place needs a MemoryStore")
        self.compute_misses_in_place = compute_misses_in_place
        self.in_place_computes = 0

    def _weights(self, e: int) -> dict[str, Tensor]:
        if self.compute_misses_in_place and not self.cache.is_resident(e):
            self.in_place_computes += 1
            self.cache.misses += 1
            return self.cache.store.tensors(e)
        return self.cache.use(e)

    def forward_expert(self, e: int, x_ND: Tensor) -> Tensor:
        weights = self._weights(e)
        device = weights["w_in"].device
        x = x_ND.to(device)
        h = linear(x, weights["w_in"], weights.get("b_in"))
        y = linear(hidden_activation(h, self.activation, self.is_glu), weights["w_out"], weights.get("b_out"))
        return y.to(x_ND.device)

    def extra_repr(self) -> str:
        return (f"num_experts={self.num_experts}, capacity={self.cache.capacity}, policy={self.cache.policy!r}, "
                f"store={type(self.cache.store).__name__}")
