"""Process groups, the (dp, ep) mesh, sharding a model's experts, and data parallelism for the rest.

One model across processes and machines: ``torchrun`` starts the processes,
``torch.distributed`` (gloo on CPU, NCCL on GPU) carries the collectives.

- ``init_distributed``: the process group from torchrun's environment, with a
  configurable timeout (a dead rank makes the others fail within it).
- ``expert_parallel_mesh``: a (dp, ep) ``DeviceMesh`` over all ranks.
- ``expert_parallel(model, group)``: shard every MoE layer's experts by expert id
  over the EP group and give it an ``ExpertParallelDispatcher``, after checking on
  every rank that all ranks built the same layers (a ``ValueError`` naming the
  field, before any all-to-all).
- ``data_parallel(model)``: DDP for the non-expert parameters only;
  ``reduce_expert_gradients`` then reduces the expert gradients over the ranks
  that hold the same experts. ``average_gradients`` does both without DDP.

Gradient convention (that of DDP): each rank's loss is a mean over its own
share of the global batch plus the layer's aux loss, and the gradient of the
model is the mean over ranks of the ranks' gradients. Replicated parameters get
it from DDP's average; expert parameters receive, through the backward
all-to-all, the sum over the EP group of every rank's gradient, so
``reduce_expert_gradients`` sums over the expert-data-parallel group and
divides by the number of ranks in the mesh.

Shapes: E experts, L local experts (E / EP size).
"""

from __future__ import annotations

import dataclasses
import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from ..layer import MoE, moe_layers
from .collectives import named_collective
from .dispatcher import ExpertParallelDispatcher

DEFAULT_TIMEOUT_S = 300.0


def init_distributed(backend: str | None = None, timeout_s: float = DEFAULT_TIMEOUT_S, **kwargs) -> None:
    """``torch.distributed.init_process_group`` from torchrun's environment variables.

    ``backend`` defaults to NCCL when CUDA is available, gloo otherwise. A
    collective that waits longer than ``timeout_s`` seconds (a rank died or hangs)
    raises instead of blocking forever. Extra keyword arguments go to
    ``init_process_group``.
    """
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl" and "LOCAL_RANK" in os.environ:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s), **kwargs)


def expert_parallel_mesh(ep_size: int, device_type: str = "cpu") -> DeviceMesh:
    """A 2-D mesh ("dp", "ep") over all ranks: EP groups of ``ep_size`` consecutive
    ranks, each replicated ``world_size / ep_size`` times for data parallelism."""
    world = dist.get_world_size()
    if isinstance(ep_size, bool) or not isinstance(ep_size, int) or ep_size < 1 or world % ep_size != 0:
        raise ValueError(f"ep_size ({ep_size!r}) must be a positive integer dividing the world size ({world})")
    return init_device_mesh(device_type, (world // ep_size, ep_size), mesh_dim_names=("dp", "ep"))


def sharded_layers(model: nn.Module) -> list[tuple[str, MoE]]:
    """The MoE layers whose experts are sharded over an EP group."""
    return [(name, moe) for name, moe in moe_layers(model) if isinstance(moe.dispatcher, ExpertParallelDispatcher)]


def config_fingerprint(moe: MoE) -> dict:
    """What every rank of an EP group must agree on: every field of the layer's config
    (router options as ``router_options.NAME``) and the experts' parameter dtype."""
    fields = {}
    for name, value in dataclasses.asdict(moe.config).items():
        if isinstance(value, dict):
            fields.update({f"{name}.{key}": inner for key, inner in value.items()})
        else:
            fields[name] = value
    fields["experts dtype"] = str(next(moe.experts.parameters()).dtype)
    return fields


def check_fingerprints(fingerprints: list[list[tuple[str, dict]]]) -> None:
    """Raise a ``ValueError`` naming the first field on which a rank differs from rank 0.

    ``fingerprints[rank]`` lists (layer name, ``config_fingerprint``) for every MoE layer of that rank.
    """
    reference = fingerprints[0]
    reference_names = [name for name, _ in reference]
    for rank, layers in enumerate(fingerprints[1:], start=1):
        names = [name for name, _ in layers]
        if names != reference_names:
            raise ValueError(
                f"expert parallel: the MoE layers differ across ranks: rank 0 has {reference_names}, "
                f"rank {rank} has {names}; every rank must build the same model"
            )
        for (name, theirs), (_, ours) in zip(layers, reference, strict=True):
            for field in [*ours, *(key for key in theirs if key not in ours)]:
                if theirs.get(field) != ours.get(field):
                    where = f"layer {name!r}" if name else "the MoE layer"
                    raise ValueError(
                        f"expert parallel: {field} of {where} differs across ranks: rank 0 has "
                        f"{ours.get(field)!r}, rank {rank} has {theirs.get(field)!r}; every rank must build the "
                        "same model"
                    )


def check_shardable(name: str, moe: MoE) -> None:
    """Refuse, by name, a layer expert parallelism cannot run exactly."""
    if isinstance(moe.dispatcher, ExpertParallelDispatcher):
        raise ValueError(f"MoE layer {name!r} is already expert-parallel")
    if getattr(moe.experts, "shared_base", False):
        raise TypeError(f"expert parallelism shards experts by id; layer {name!r} is a mixture of LoRA experts "
                        "whose experts share one base weight, which every rank would need whole")
    if not moe.experts.shardable:
        raise TypeError(f"expert parallelism shards experts by id; layer {name!r} has "
                        f"{type(moe.experts).__name__}, which does not declare shardable = True")
    router = moe.router
    local_only = [loss for loss, coef in moe.config.loss_coefficients.items()
                  if coef != 0 and loss in router.losses and loss not in router.global_losses]
    if local_only:
        raise NotImplementedError(
            f"expert parallelism computes losses over the global batch from sums over tokens; router "
            f"{router.name!r} of layer {name!r} reports {', '.join(local_only)} as a per-rank loss only "
            "(not in its global_losses): set its coefficient to 0")


def expert_parallel(model: nn.Module, group=None, loss_group=None, overlap_chunks: int = 1) -> nn.Module:
    """Shard the experts of every MoE layer in ``model`` over the EP process ``group``
    (default: all ranks), in place; returns ``model``.

    Every rank must call this with a model built the same way (same config and
    seed): rank p keeps experts [p·E/P, (p+1)·E/P) of each layer. The layers'
    configs are all-gathered and compared first, so a mismatch raises the same
    ``ValueError`` on every rank before any all-to-all. ``loss_group``: the ranks over
    whose tokens the balancing losses are computed (default: ``group``; all ranks when
    several EP groups train data-parallel, as ``parallelize`` does). ``overlap_chunks`` > 1
    pipelines each layer's exchange in that many chunks (``moekit.parallel.overlap``).
    """
    if group is None:
        group = dist.group.WORLD
    layers = moe_layers(model)
    fingerprints: list = [None] * dist.get_world_size(group)
    with named_collective("all-gather of the layers' configurations", group):
        dist.all_gather_object(fingerprints, [(name, config_fingerprint(moe)) for name, moe in layers], group=group)
    check_fingerprints(fingerprints)
    for name, moe in layers:
        check_shardable(name, moe)
        dispatcher = ExpertParallelDispatcher(group, moe.config.num_experts, moe.router.global_losses, loss_group,
                                              overlap_chunks)
        moe.experts = moe.experts.shard(dispatcher.first_expert, dispatcher.num_local)
        moe.dispatcher = dispatcher
    return model


def expert_parameter_names(model: nn.Module) -> list[str]:
    """Qualified names of the sharded expert parameters (each rank holds different ones)."""
    prefix = lambda name: f"{name}.experts." if name else "experts."  # noqa: E731
    return [prefix(name) + param_name for name, moe in sharded_layers(model)
            for param_name, _ in moe.experts.named_parameters()]


def data_parallel(model: nn.Module, **ddp_kwargs) -> nn.parallel.DistributedDataParallel:
    """DDP over all ranks for the replicated (non-expert) parameters; the sharded
    expert parameters are left out (call ``reduce_expert_gradients`` after backward)."""
    # DDP's documented hook for parameters it must not synchronise (used by torchrec
    # for sharded embeddings): it would otherwise average different experts together.
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        model, expert_parameter_names(model)
    )
    return nn.parallel.DistributedDataParallel(model, **ddp_kwargs)


def reduce_expert_gradients(model: nn.Module, mesh: DeviceMesh | None = None) -> None:
    """Turn the expert gradients the backward all-to-all left into those of the
    global mean loss: sum over the ranks holding the same experts (mesh dim "dp"),
    divide by all ranks of the mesh. Call on every rank after backward."""
    world = dist.get_world_size() if mesh is None else mesh.size()
    dp_group = None if mesh is None or mesh["dp"].size() == 1 else mesh.get_group("dp")
    for _, moe in sharded_layers(model):
        for param in moe.experts.parameters():
            if not param.requires_grad:  # frozen base experts under LoRA: nothing to reduce
                continue
            if param.grad is None:
                # Keep the collectives the same on every rank.
                param.grad = torch.zeros_like(param)
            if dp_group is not None:
                with named_collective("all-reduce of expert gradients", dp_group):
                    dist.all_reduce(param.grad, group=dp_group)
            param.grad.div_(world)


def average_gradients(model: nn.Module, mesh: DeviceMesh | None = None) -> None:
    """DDP's gradient average for the replicated parameters, without DDP, plus
    ``reduce_expert_gradients``: one all-reduce per parameter, for tests and small runs."""
    expert_names = set(expert_parameter_names(model))
    world = dist.get_world_size()
    for name, param in model.named_parameters():
        if name in expert_names or not param.requires_grad:  # frozen (fine-tuning): no gradient to average
            continue
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        with named_collective("all-reduce of gradients"):
            dist.all_reduce(param.grad)
        param.grad.div_(world)
    reduce_expert_gradients(model, mesh)
