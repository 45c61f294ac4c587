"""Expert parallelism and data parallelism over ``torch.distributed``.

One model across processes and machines: ``torchrun`` starts the processes,
``torch.distributed`` (gloo on CPU, NCCL on GPU) carries the collectives.

- ``init_distributed``: the process group from torchrun's environment, with a
  configurable timeout (a dead rank makes the others fail within it).
- ``expert_parallel_mesh``: a (dp, ep) ``DeviceMesh`` over all ranks.
- ``expert_parallel(model, group)``: shard every MoE layer's experts by expert id
  over the EP group, after checking on every rank that all ranks built the same
  layer (a ``ValueError`` naming the field, before any all-to-all).
- ``data_parallel(model, mesh)``: DDP for the non-expert parameters only;
  ``reduce_expert_gradients`` then reduces the expert gradients over the ranks
  that hold the same experts. ``average_gradients`` does both without DDP.
- ``full_state_dict`` / ``load_full_state_dict``: checkpoints in the canonical
  unsharded layout, loadable at any EP size.

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

import os
from datetime import timedelta

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh

from .dispatch.expert_parallel import ExpertParallel
from .experts import StackedExperts
from .layer import MoE

DEFAULT_TIMEOUT_S = 300.0
# The fields that must agree on every rank of an EP group for the layers to fit together.
FINGERPRINT_FIELDS = (
    "num_experts", "top_k", "d_model", "d_ff", "router", "capacity_factor", "expert_capacity",
    "capacity_per_sequence", "drop_priority", "second_expert_policy", "expert", "activation",
    "expert_bias", "normalize_weights", "num_shared_experts",
    "load_balance_coef", "z_loss_coef", "importance_coef", "load_coef",
)


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


def moe_layers(model: nn.Module) -> list[tuple[str, MoE]]:
    """Every MoE layer of ``model`` with its qualified name ('' for the model itself)."""
    return [(name, module) for name, module in model.named_modules() if isinstance(module, MoE)]


def config_fingerprint(moe: MoE) -> dict:
    """The fields of the layer's config that every rank must agree on."""
    return {field: getattr(moe.config, field) for field in FINGERPRINT_FIELDS}


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
            for field in FINGERPRINT_FIELDS:
                if theirs[field] != ours[field]:
                    where = f"layer {name!r}" if name else "the MoE layer"
                    raise ValueError(
                        f"expert parallel: {field} of {where} differs across ranks: rank 0 has "
                        f"{ours[field]!r}, rank {rank} has {theirs[field]!r}; every rank must build the same model"
                    )


def _shard_experts(experts: nn.Module, first: int, count: int) -> StackedExperts:
    shard = StackedExperts(
        count, experts.d_model, experts.d_ff, kind=experts.kind, activation=experts.activation,
        bias=experts.b_in is not None,
    ).to(device=experts.w_in.device, dtype=experts.w_in.dtype)
    with torch.no_grad():
        for name, param in shard.named_parameters():
            param.copy_(getattr(experts, name)[first:first + count])
    return shard


def expert_parallel(model: nn.Module, group=None) -> nn.Module:
    """Shard the experts of every MoE layer in ``model`` over the EP process ``group``
    (default: all ranks), in place; returns ``model``.

    Every rank must call this with a model built the same way (same config and
    seed): rank p keeps experts [p·E/P, (p+1)·E/P) of each layer. The layers'
    configs are all-gathered and compared first, so a mismatch raises the same
    ``ValueError`` on every rank before any all-to-all.
    """
    if group is None:
        group = dist.group.WORLD
    layers = moe_layers(model)
    fingerprints: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(fingerprints, [(name, config_fingerprint(moe)) for name, moe in layers], group=group)
    check_fingerprints(fingerprints)
    for name, moe in layers:
        if moe.expert_parallel is not None:
            raise ValueError(f"MoE layer {name!r} is already expert-parallel")
        if not isinstance(moe.experts, StackedExperts):
            raise TypeError(
                f"expert parallelism shards stacked experts; layer {name!r} has {type(moe.experts).__name__}"
            )
        dispatcher = ExpertParallel(group, moe.config)
        moe.experts = _shard_experts(moe.experts, dispatcher.first_expert, dispatcher.num_local)
        moe.expert_parallel = dispatcher
    return model


def _sharded_layers(model: nn.Module) -> list[tuple[str, MoE]]:
    return [(name, moe) for name, moe in moe_layers(model) if moe.expert_parallel is not None]


def expert_parameter_names(model: nn.Module) -> list[str]:
    """Qualified names of the sharded expert parameters (each rank holds different ones)."""
    prefix = lambda name: f"{name}.experts." if name else "experts."  # noqa: E731
    return [
        prefix(name) + param_name
        for name, moe in _sharded_layers(model)
        for param_name, _ in moe.experts.named_parameters()
    ]


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
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    world = dist.get_world_size() if mesh is None else mesh.size()
    dp_group = None if mesh is None or mesh["dp"].size() == 1 else mesh.get_group("dp")
    for _, moe in _sharded_layers(model):
        for param in moe.experts.parameters():
            if param.grad is None:
                # Keep the collectives the same on every rank.
                param.grad = torch.zeros_like(param)
            if dp_group is not None:
                dist.all_reduce(param.grad, group=dp_group)
            param.grad.div_(world)


def average_gradients(model: nn.Module, mesh: DeviceMesh | None = None) -> None:
    """DDP's gradient average for the replicated parameters, without DDP, plus
    ``reduce_expert_gradients``: one all-reduce per parameter, for tests and small runs."""
    expert_names = set(expert_parameter_names(model))
    world = dist.get_world_size()
    for name, param in model.named_parameters():
        if name in expert_names:
            continue
        if param.grad is None:
            param.grad = torch.zeros_like(param)
        dist.all_reduce(param.grad)
        param.grad.div_(world)
    reduce_expert_gradients(model, mesh)


def full_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The model's state dict in the canonical unsharded layout (all E experts per
    layer, as a single-process model has them), on every rank. Collective: every
    rank of each EP group must call it."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    state = {name: tensor.detach() for name, tensor in model.state_dict().items()}
    for name, moe in _sharded_layers(model):
        ep = moe.expert_parallel
        prefix = f"{name}.experts." if name else "experts."
        for param_name, param in moe.experts.named_parameters():
            pieces = [torch.empty_like(param) for _ in range(ep.ep_size)]
            dist.all_gather(pieces, param.detach().contiguous(), group=ep.group)
            state[prefix + param_name] = torch.cat(pieces)
    return state


def shard_state_dict(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A canonical (unsharded) state dict cut down to this rank's experts of ``model``."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        model = model.module
    sharded = dict(state)
    for name, moe in _sharded_layers(model):
        ep = moe.expert_parallel
        prefix = f"{name}.experts." if name else "experts."
        for param_name, _ in moe.experts.named_parameters():
            full = state[prefix + param_name]
            if full.shape[0] != ep.num_experts:
                raise ValueError(
                    f"{prefix + param_name} has {full.shape[0]} experts in the checkpoint; "
                    f"layer {name!r} expects {ep.num_experts}"
                )
            sharded[prefix + param_name] = full[ep.first_expert:ep.first_expert + ep.num_local]
    return sharded


def load_full_state_dict(model: nn.Module, state: dict[str, torch.Tensor], strict: bool = True):
    """Load a canonical (unsharded) state dict into a model at any EP size (EP = 1 included)."""
    target = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    return target.load_state_dict(shard_state_dict(target, state), strict=strict)
