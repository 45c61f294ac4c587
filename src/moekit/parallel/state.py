"""Checkpoint state in the canonical layout, whatever the expert-parallel size.

The canonical (unsharded) state holds all E experts of every layer, as a
single-process model has them. ``full_state_dict`` gathers it from the EP
groups, ``shard_state_dict`` / ``load_full_state_dict`` cut it down to this
rank's experts; ``full_optimizer_tensors`` and ``shard_optimizer_tensors`` do
the same for the optimizer's per-parameter state (AdamW's moments), so a run
saved at one EP size resumes at any other. Every tensor of a shardable experts
module is stacked on dim 0 (``Experts.shardable``), which is what makes
gathering a concatenation.

Shapes: E experts, L local experts (E / EP size).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .collectives import named_collective
from .fsdp import distribute_like, full_tensor
from .setup import moe_layers, sharded_layers


def _unwrap(model: nn.Module) -> nn.Module:
    return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model


def full_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The model's state dict in the canonical unsharded layout, on every rank.
    Collective: every rank of each EP group must call it."""
    model = _unwrap(model)
    state = {name: full_tensor(tensor.detach()) for name, tensor in model.state_dict().items()}
    for name, moe in sharded_layers(model):
        ep = moe.dispatcher
        prefix = f"{name}.experts." if name else "experts."
        for key in moe.experts.state_dict():
            tensor = state[prefix + key]
            pieces = [torch.empty_like(tensor) for _ in range(ep.ep_size)]
            with named_collective("all-gather of expert weights", ep.group):
                dist.all_gather(pieces, tensor.detach().contiguous(), group=ep.group)
            state[prefix + key] = torch.cat(pieces)
    return state


def shard_state_dict(model: nn.Module, state: dict[str, Tensor]) -> dict[str, Tensor]:
    """A canonical (unsharded) state dict cut down to this rank's experts of ``model``."""
    sharded = dict(state)
    for name, moe in sharded_layers(_unwrap(model)):
        ep = moe.dispatcher
        prefix = f"{name}.experts." if name else "experts."
        for key in moe.experts.state_dict():
            full = state[prefix + key]
            if full.shape[0] != ep.num_experts:
                raise ValueError(
                    f"{prefix + key} has {full.shape[0]} experts in the checkpoint; "
                    f"layer {name!r} expects {ep.num_experts}"
                )
            sharded[prefix + key] = full[ep.first_expert:ep.first_expert + ep.num_local]
    return sharded


def load_full_state_dict(model: nn.Module, state: dict[str, Tensor], strict: bool = True):
    """Load a canonical (unsharded) state dict into a model at any EP size (EP = 1 included),
    sharded by FSDP or not."""
    target = _unwrap(model)
    sharded = shard_state_dict(target, state)
    own = target.state_dict()
    sharded = {key: distribute_like(value, own[key]) if key in own else value for key, value in sharded.items()}
    return target.load_state_dict(sharded, strict=strict)


def expert_dispatchers(model: nn.Module) -> dict[int, object]:
    """id(parameter) → the EP dispatcher of its layer, for every sharded expert parameter."""
    return {id(param): moe.dispatcher for _, moe in sharded_layers(model) for param in moe.experts.parameters()}


def is_sharded(model: nn.Module) -> bool:
    return bool(sharded_layers(model))


def _optimizer_params(optimizer: torch.optim.Optimizer) -> list[nn.Parameter]:
    # The optimizer's state dict numbers parameters in the order of its groups.
    return [param for group in optimizer.param_groups for param in group["params"]]


def full_optimizer_tensors(model: nn.Module, optimizer: torch.optim.Optimizer,
                           tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """The optimizer's flat per-parameter state tensors (``state.IDX.KEY``) in the canonical
    layout: every one shaped like a sharded expert parameter (AdamW's exp_avg and exp_avg_sq)
    is all-gathered over its EP group to all E experts. Collective: every rank calls it."""
    tensors = dict(tensors)
    dispatchers = expert_dispatchers(_unwrap(model))
    for idx, param in enumerate(_optimizer_params(optimizer)):
        ep = dispatchers.get(id(param))
        for key in sorted(optimizer.state.get(param, {})):
            value = optimizer.state[param][key]
            if not isinstance(value, Tensor) or value.dim() == 0:
                continue  # AdamW's step count: a scalar, the same for every expert
            value = full_tensor(value.detach())  # FSDP's shards, collective in every rank's order
            if ep is not None:
                pieces = [torch.empty_like(value) for _ in range(ep.ep_size)]
                with named_collective("all-gather of expert optimizer state", ep.group):
                    dist.all_gather(pieces, value.contiguous(), group=ep.group)
                value = torch.cat(pieces)
            tensors[f"state.{idx}.{key}"] = value.cpu().contiguous()
    return tensors


def shard_optimizer_tensors(model: nn.Module, optimizer: torch.optim.Optimizer,
                            tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Canonical optimizer tensors cut down to this rank's experts (the inverse of the gather),
    and to this rank's FSDP shards of every parameter FSDP shards."""
    dispatchers = expert_dispatchers(_unwrap(model))
    sharded = dict(tensors)
    for idx, param in enumerate(_optimizer_params(optimizer)):
        _shard_by_expert(sharded, tensors, idx, param, dispatchers.get(id(param)))
        prefix = f"state.{idx}."
        for name in [name for name in sharded if name.startswith(prefix) and sharded[name].dim() > 0]:
            sharded[name] = distribute_like(sharded[name], param)
    return sharded


def _shard_by_expert(sharded: dict, tensors: dict, idx: int, param: Tensor, ep) -> None:
    if ep is not None:
        prefix = f"state.{idx}."
        for name, full in tensors.items():
            if not name.startswith(prefix) or full.dim() == 0:
                continue
            if full.shape[0] != ep.num_experts or full.shape[1:] != param.shape[1:]:
                raise ValueError(f"optimizer state {name} has shape {tuple(full.shape)} in the checkpoint; "
                                 f"expected {(ep.num_experts, *param.shape[1:])} (all experts of that parameter)")
            sharded[name] = full[ep.first_expert:ep.first_expert + ep.num_local].clone()


__all__ = ["expert_dispatchers", "full_optimizer_tensors", "full_state_dict", "is_sharded", "load_full_state_dict",
           "moe_layers", "shard_optimizer_tensors", "shard_state_dict"]
