"""FSDP2 with expert parallelism, on one ``DeviceMesh``.

Expert parallelism alone replicates every non-expert parameter (DDP). With
``fully_shard_model`` nothing is replicated whole:

- the non-expert parameters (attention, norms, routers, shared experts, the
  embedding) are sharded by ``torch.distributed.fsdp.fully_shard`` over the
  mesh dimension "fsdp" (N ranks), and replicated over "replicate" (world / N
  ranks: HSDP) when N is less than the world size;
- each MoE layer's experts are sharded by expert id over "ep" (M ranks,
  ``expert_parallel``) and then FSDP-sharded over "dp", the world / M ranks
  that hold the same experts.

The mesh (``fsdp_mesh``) is one 3-D ``DeviceMesh`` ("replicate", "shard", "ep")
of sizes (world / N, N / M, M), with two flattened views: "fsdp" = (shard, ep)
and "dp" = (replicate, shard). So M must divide N and N the world size.

Gradients follow the single-process convention of ``moekit.parallel.setup``:
FSDP averages the non-expert gradients over the world; an expert's gradient,
already summed over its EP group by the backward all-to-all, is summed over
"dp" and divided by the world size (``set_gradient_divide_factor``).

Every sharded parameter is a ``DTensor``; ``full_tensor`` and ``distribute_like``
move state between that layout and the canonical unsharded one (checkpoints).

Shapes: E experts, L local experts (E / M).
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import (
    FSDPModule,
    MixedPrecisionPolicy,
    fully_shard,
    register_fsdp_forward_method,
)
from torch.distributed.tensor import DTensor, distribute_tensor

from ..layer import moe_layers
from .collectives import named_collective

# The mesh's flattened dims ("dp", "fsdp") are read by name from the root mesh, as moekit.parallel
# reads "dp" and "ep" from the 2-D mesh of plain expert parallelism; torch asks to keep the flattened
# meshes instead, and says so on every slice.
warnings.filterwarnings("ignore", message="Slicing a flattened dim from root mesh")
# FSDP warns that the experts' rows form returns a view; the layer never writes into it in place.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module \(FSDP\w*Experts\) returned a view")

MIXED_PRECISION = {
    "bf16": MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32),
    "fp32": None,
}


def check_fsdp_sizes(world: int, fsdp_size: int, ep_size: int) -> None:
    """Refuse, naming the values, sizes that do not make a (replicate, shard, ep) mesh."""
    for what, value in (("FSDP size", fsdp_size), ("expert-parallel size", ep_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{what} ({value!r}) must be a positive integer")
    if world % fsdp_size:
        raise ValueError(f"FSDP size ({fsdp_size}) must divide the number of processes ({world})")
    if fsdp_size % ep_size:
        raise ValueError(f"expert-parallel size ({ep_size}) must divide the FSDP size ({fsdp_size}): each group of "
                         f"{fsdp_size} ranks sharding the non-expert parameters holds whole expert-parallel groups")


def fsdp_mesh(fsdp_size: int, ep_size: int, device_type: str = "cpu") -> DeviceMesh:
    """The mesh of ``fully_shard_model``: ("replicate", "shard", "ep") with flattened "fsdp" and "dp"."""
    world = dist.get_world_size()
    check_fsdp_sizes(world, fsdp_size, ep_size)
    mesh = init_device_mesh(device_type, (world // fsdp_size, fsdp_size // ep_size, ep_size),
                            mesh_dim_names=("replicate", "shard", "ep"))
    # _flatten is the mesh's way (torchtitan's too) to name a group spanning several dims.
    mesh["shard", "ep"]._flatten("fsdp")
    mesh["replicate", "shard"]._flatten("dp")
    return mesh


def dense_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """Where the non-expert parameters live: "fsdp", or ("replicate", "fsdp") for HSDP."""
    return mesh["fsdp"] if mesh["replicate"].size() == 1 else mesh["replicate", "fsdp"]


def fully_shard_model(model: nn.Module, mesh: DeviceMesh, *, mixed_precision: str = "fp32",
                      reshard_after_forward: bool = True) -> nn.Module:
    """Shard ``model`` with FSDP2 in place (its experts already sharded by ``expert_parallel``
    over ``mesh["ep"]``, or not at all when the "ep" size is 1); returns ``model``.

    Bottom up, as FSDP2 groups parameters: each MoE layer's experts over "dp", each
    block (every child of a ``blocks`` list, or each MoE layer when there is none)
    over the dense mesh, then the root. ``mixed_precision``: "fp32", or "bf16" (weights
    gathered and computed in bfloat16, gradients reduced in float32, kept in float32).
    """
    if mixed_precision not in MIXED_PRECISION:
        raise ValueError(f"mixed_precision ({mixed_precision!r}) must be one of {sorted(MIXED_PRECISION)}")
    policy = MIXED_PRECISION[mixed_precision] or MixedPrecisionPolicy()
    check_same_parameters(model)
    world = mesh.size()
    for _, moe in moe_layers(model):
        # Its own group on its own mesh: the experts differ across "ep", the blocks' weights do not.
        fully_shard(moe.experts, mesh=mesh["dp"], mp_policy=policy, reshard_after_forward=reshard_after_forward)
        register_fsdp_forward_method(moe.experts, "run")
        if mesh["dp"].size() > 1:
            # The backward all-to-all already summed over the EP group: sum over "dp", divide by all ranks.
            # (One holder per expert: FSDP would divide twice; reduce_expert_gradients divides instead.)
            moe.experts.set_gradient_divide_factor(float(world))
    dense = dense_mesh(mesh)
    blocks = getattr(model, "blocks", None)
    units = list(blocks) if isinstance(blocks, nn.ModuleList) else [moe for _, moe in moe_layers(model)]
    for unit in units:
        fully_shard(unit, mesh=dense, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=dense, mp_policy=policy, reshard_after_forward=False)
    if dist.get_backend(mesh.get_group("fsdp")) == "gloo":
        # gloo reduces by sum only (no AVG, no PREMUL_SUM): FSDP then scales before and after.
        for module in model.modules():
            if isinstance(module, FSDPModule):
                module.set_force_sum_reduction_for_comms(True)
    return model


def check_same_parameters(model: nn.Module) -> None:
    """Raise the same ``ValueError`` on every rank when the ranks' parameters differ in name, shape
    or dtype (FSDP's collectives would garble or abort). Expert parameters may differ in their
    first dim only: each rank holds its own experts."""
    experts = {id(p) for _, moe in moe_layers(model) for p in moe.experts.parameters()}
    ours = [(name, tuple(p.shape[1:]) if id(p) in experts else tuple(p.shape), str(p.dtype))
            for name, p in model.named_parameters()]
    every: list = [None] * dist.get_world_size()
    with named_collective("all-gather of the parameters' shapes"):
        dist.all_gather_object(every, ours)
    for rank, theirs in enumerate(every[1:], start=1):
        if theirs != every[0]:
            first = next((a, b) for a, b in zip([*every[0], None], [*theirs, None], strict=False) if a != b)
            raise ValueError(f"FSDP: the ranks built different models: rank 0 has parameter {first[0]} "
                             f"(name, shape, dtype), rank {rank} has {first[1]}; every rank must build the same model")


def reshard(model: nn.Module) -> None:
    """Register every FSDP module's sharded parameters again (the root keeps its gathered ones
    after a forward without backward, e.g. an evaluation), so that the model's parameters are
    the shards the optimizer holds."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def is_fully_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


def full_tensor(tensor: Tensor) -> Tensor:
    """The unsharded value of a ``DTensor`` (collective over its mesh); other tensors as they are."""
    if isinstance(tensor, DTensor):
        with named_collective("all-gather of FSDP shards"):
            return tensor.full_tensor()
    return tensor


def distribute_like(full: Tensor, like: Tensor) -> Tensor:
    """``full`` cut to this rank's shard of ``like``'s layout when ``like`` is a ``DTensor``
    (every rank holds ``full``: no communication); otherwise ``full``."""
    if not isinstance(like, DTensor):
        return full
    return distribute_tensor(full.to(like.dtype), like.device_mesh, like.placements, src_data_rank=None)


def fsdp_squared_norm(model: nn.Module, mesh: DeviceMesh) -> Tensor:
    """The squared gradient norm of the whole model from each rank's shards (one all-reduce).

    Every rank holds a disjoint piece of the experts ("ep" × "dp") and of the non-expert
    parameters within its "fsdp" group; the latter pieces repeat over "replicate"."""
    experts = {id(p) for _, moe in moe_layers(model) for p in moe.experts.parameters()}
    device = torch.device(mesh.device_type)
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # non-expert, expert
    for param in model.parameters():
        if param.grad is not None:
            grad = param.grad.to_local() if isinstance(param.grad, DTensor) else param.grad
            sums[int(id(param) in experts)] += torch.linalg.vector_norm(grad.detach(), dtype=torch.float64).square().to(device)
    with named_collective("all-reduce of the gradient norm"):
        dist.all_reduce(sums)
    return sums[0] / mesh["replicate"].size() + sums[1]
