"""Gradient accumulation whose balancing losses are those of the whole batch.

Every auxiliary loss is a formula of sums over the batch's tokens
(``routing.losses.LOSS_SUMS``): the load-balancing loss E·Σ_i f_i·P_i, for one, needs
the fraction f_i of all the batch's tokens each expert received. Computed per
micro-batch, it is a different loss (its gradient pushes each micro-batch toward
balance on its own). To get the gradient of the global loss L(S), S = Σ_j S_j, a
micro-batch j's forward evaluates L(S_j + Σ_{m≠j} S_m) with the other micro-batches'
sums held constant: its gradient is ∂L/∂S at the global S times ∂S_j/∂θ, and the
micro-batches' gradients add up to ∇L(S) exactly. The other micro-batches' sums come
from a forward pass without gradients before the step (``micro_batch_sums``), an
extra forward per micro-batch; the layers then add them to their own
(``MoE.loss_sums_offset``) in ``other_micro_batches``. Under expert parallelism each
rank adds its own micro-batches' sums and the layers' all-reduce adds the ranks'.

The routing of the pre-pass must be the routing of the step: exact for deterministic
routers (noise and jitter draw again).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from ..layer import moe_layers
from ..routing.losses import LOSS_SUMS

Sums = dict[str, dict[str, Tensor]]  # layer name → sum name → value


def weighted_sum_names(layer) -> list[str]:
    """The sums behind the losses this layer weighs (coefficient ≠ 0)."""
    names = [loss for loss in layer.router.global_losses if getattr(layer.config, f"{loss}_coef", 0)]
    return list(dict.fromkeys(s for loss in names for s in LOSS_SUMS[loss]))


def needs_global_sums(model: nn.Module) -> bool:
    return any(weighted_sum_names(layer) for _, layer in moe_layers(model))


@torch.no_grad()
def micro_batch_sums(model: nn.Module, run: Callable[[int], object], count: int) -> list[Sums]:
    """Each micro-batch's loss sums per MoE layer, from ``run(j)`` (a forward of micro-batch j)."""
    layers = moe_layers(model)
    found: list[Sums] = []

    def hook(name, layer):
        def record(module, args, output):
            found[-1][name] = {s: torch.as_tensor(output.routing.decision.sums[s]).detach()
                               for s in weighted_sum_names(layer)}
        return record

    handles = [layer.register_forward_hook(hook(name, layer)) for name, layer in layers]
    try:
        for j in range(count):
            found.append({})
            run(j)
    finally:
        for handle in handles:
            handle.remove()
    return found


@contextmanager
def other_micro_batches(model: nn.Module, sums: list[Sums], j: int) -> Iterator[None]:
    """Micro-batch j's forward adds the other micro-batches' sums to its own in every MoE layer."""
    layers = moe_layers(model)
    for name, layer in layers:
        others = [s[name] for m, s in enumerate(sums) if m != j and name in s]
        layer.loss_sums_offset = ({key: sum(o[key] for o in others) for key in others[0]} if others else None)
    try:
        yield
    finally:
        for _, layer in layers:
            layer.loss_sums_offset = None
