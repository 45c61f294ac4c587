"""Routing record and replay: run a later forward through the experts an earlier one chose.

In RL post-training the trainer recomputes the log-probabilities of tokens that an
inference engine sampled; if a token's router picks other experts in the trainer
(another batch, another precision, another kernel), the policy gradient is taken
through a different network than the one that produced the sample (Rollout Routing
Replay, Ma et al. 2025). Replaying the engine's choice removes that mismatch while
the router keeps learning: each gate weight is recomputed from the live scores at the
replayed experts, by the router's own formula, so it carries the router's gradient.

- ``record_choices(model)``: a context that records, per MoE layer and call, the
  (T, K) experts the router chose (``ChoiceRecord``).
- ``replay_choices(model, record)``: a context in which each MoE layer's calls take
  the recorded choices, in order.
- ``ChoiceRecord.to_array()`` / ``ChoiceRecord.from_array(a, layers)``: the
  [tokens, layers, top_k] integer arrays inference engines (vLLM, SGLang) return
  for a sequence; calls concatenate along tokens (prefill, then decode steps).
- ``flip_rate(a, b)``: the share of (token, layer) choices whose expert sets differ.

Token-choice routers replay (top-k, noisy top-k, Switch, sigmoid). Expert choice
and Soft MoE have no per-token choice to replay; dense softmax and hash routing
choose the same experts every time, so they need none.

Shapes: T tokens, K experts per token, L MoE layers.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor, nn

from ..layer import MoE, moe_layers
from ..routing import ROUTERS


@dataclass
class ChoiceRecord:
    """The experts each MoE layer chose, per call: ``calls[layer]`` is a list of (T, K) long tensors."""

    calls: dict[str, list[Tensor]] = field(default_factory=dict)

    @property
    def layers(self) -> list[str]:
        return list(self.calls)

    def to_array(self) -> np.ndarray:
        """[tokens, layers, top_k] int32, calls concatenated along tokens (every layer's K must agree)."""
        per_layer = [torch.cat(calls).cpu() for calls in self.calls.values()]
        shapes = {tuple(t.shape) for t in per_layer}
        if len(shapes) != 1:
            raise ValueError(f"the layers recorded different numbers of tokens or experts per token: {sorted(shapes)}")
        return torch.stack(per_layer, dim=1).numpy().astype(np.int32)

    @classmethod
    def from_array(cls, array, layers: list[str]) -> ChoiceRecord:
        """One call per layer from a [tokens, layers, top_k] array (an engine's routed experts)."""
        a = np.asarray(array)
        if a.ndim != 3 or a.shape[1] != len(layers):
            raise ValueError(f"routed experts must be a [tokens, layers, top_k] array with {len(layers)} layers; "
                             f"got shape {a.shape}")
        if not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"routed experts must be integers; got {a.dtype}")
        t = torch.from_numpy(a.astype(np.int64))
        return cls({layer: [t[:, i].contiguous()] for i, layer in enumerate(layers)})


def _layers(model: nn.Module) -> list[tuple[str, MoE]]:
    layers = moe_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no MoE layer to record or replay")
    return layers


@contextmanager
def record_choices(model: nn.Module) -> Iterator[ChoiceRecord]:
    """Record the router's choice of every MoE layer of ``model``, per call, while the block runs."""
    layers = _layers(model)
    record = ChoiceRecord({name: [] for name, _ in layers})

    def recorder(name):
        def hook(module, args, output):
            indices_TK = getattr(output.routing.decision, "indices_TK", None)
            if indices_TK is None:
                raise ValueError(f"{name}: router {module.config.router!r} makes no per-token choice to record")
            record.calls[name].append(indices_TK.detach().to("cpu", copy=True))
        return hook

    handles = [layer.register_forward_hook(recorder(name)) for name, layer in layers]
    try:
        yield record
    finally:
        for handle in handles:
            handle.remove()


@contextmanager
def replay_choices(model: nn.Module, record: ChoiceRecord) -> Iterator[None]:
    """Route every MoE layer's calls by the recorded choices, in order; the gate weights are the
    router's own, from its live scores at the replayed experts."""
    layers = _layers(model)
    missing = [name for name, _ in layers if name not in record.calls]
    if missing:
        raise ValueError(f"the record has no choices for layer(s) {', '.join(missing)}; it holds "
                         f"{', '.join(record.layers) or 'none'}")
    for name, layer in layers:
        if not layer.router.replayable:
            replayable = ", ".join(n for n, cls in ROUTERS.items() if cls.replayable)
            raise ValueError(f"{name}: router {layer.config.router!r} cannot replay a choice; routers that can: "
                             f"{replayable}")
    position = {name: 0 for name, _ in layers}

    def before(name):
        def hook(module, args, kwargs):
            calls = record.calls[name]
            if position[name] >= len(calls):
                raise ValueError(f"{name}: call {position[name] + 1} has no recorded choice (the record holds "
                                 f"{len(calls)} call(s))")
            choice_TK = calls[position[name]]
            position[name] += 1
            x = args[0] if args else kwargs["x"]
            T, E = x.numel() // module.config.d_model, module.config.num_experts
            if choice_TK.shape != (T, module.router.top_k):
                raise ValueError(f"{name}: the recorded choice has shape {tuple(choice_TK.shape)}; this call has "
                                 f"{T} tokens and top_k {module.router.top_k}")
            if choice_TK.numel() and (int(choice_TK.min()) < 0 or int(choice_TK.max()) >= E):
                raise ValueError(f"{name}: recorded experts must lie in [0, {E}); got "
                                 f"[{int(choice_TK.min())}, {int(choice_TK.max())}]")
            module.router.replayed_TK = choice_TK.to(x.device)
        return hook

    def after(module, args, output):
        module.router.replayed_TK = None

    handles = []
    for name, layer in layers:
        handles.append(layer.register_forward_pre_hook(before(name), with_kwargs=True))
        handles.append(layer.register_forward_hook(after))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for _, layer in layers:
            layer.router.replayed_TK = None


def flip_rate(a: ChoiceRecord, b: ChoiceRecord) -> dict[str, float]:
    """Share of (token, layer) choices whose set of experts differs between two records, per
    layer and ``"all"``; the records must cover the same layers and tokens."""
    if a.layers != b.layers:
        raise ValueError(f"the records cover different layers: {a.layers} and {b.layers}")
    rates, flipped, total = {}, 0, 0
    for layer in a.layers:
        x, y = torch.cat(a.calls[layer]), torch.cat(b.calls[layer])
        if x.shape != y.shape:
            raise ValueError(f"{layer}: the records hold {tuple(x.shape)} and {tuple(y.shape)} choices")
        differ = (x.sort(dim=1).values != y.sort(dim=1).values).any(dim=1)
        rates[layer] = int(differ.sum()) / differ.numel() if differ.numel() else 0.0
        flipped, total = flipped + int(differ.sum()), total + differ.numel()
    rates["all"] = flipped / total if total else 0.0
    return rates
