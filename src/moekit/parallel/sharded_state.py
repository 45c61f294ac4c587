"""The model and optimizer state as global tensors for ``torch.distributed.checkpoint`` (DCP).

DCP writes each rank's shards of a ``DTensor`` and records where they sit in
the global tensor, so that another mesh shape (or one process) reads back the
pieces it needs. FSDP2's parameters are already ``DTensor`` s; expert
parallelism is not, so ``sharded_state`` wraps each rank's experts in a
``DTensor`` of the canonical global shape (all E experts) on an ("ep", "dp")
view of the mesh: experts [p·L, (p+1)·L) on EP rank p, and within them the
FSDP shard of dp rank q (or the whole block, replicated over "dp", without
FSDP). The keys are the canonical names (``model.NAME``, ``optimizer.NAME.KEY``),
so a sharded checkpoint holds exactly the tensors of the single-file one.

The wrappers share storage with the parameters and optimizer tensors: DCP's
load writes into them in place.

Shapes: E experts, L local experts (E / EP size).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor, Replicate, Shard

from .fsdp import reshard
from .setup import sharded_layers

_EXPERT_MESHES: dict[int, DeviceMesh] = {}


def expert_mesh(mesh: DeviceMesh) -> DeviceMesh:
    """The ("ep", "dp") view of the trainer's mesh (a "dp"/"ep" 2-D mesh, or FSDP's 3-D one):
    the same ranks, EP outermost, so that Shard(0) twice is EP's blocks then FSDP's shards."""
    if id(mesh) not in _EXPERT_MESHES:
        ep = mesh["ep"].size()
        ranks = mesh.mesh.reshape(-1, ep).T.contiguous()  # (ep, dp): dp rank = row-major over the other dims
        _EXPERT_MESHES[id(mesh)] = DeviceMesh(mesh.device_type, ranks, mesh_dim_names=("ep", "dp"))
    return _EXPERT_MESHES[id(mesh)]


def _global_expert_view(local: Tensor, like: Tensor, num_experts: int, mesh: DeviceMesh) -> DTensor:
    """``local`` (this rank's part of an expert tensor shaped like parameter ``like``) as a DTensor
    of all ``num_experts`` experts."""
    placements = (Shard(0), Shard(0)) if isinstance(like, DTensor) else (Shard(0), Replicate())
    piece = local.to_local() if isinstance(local, DTensor) else local
    shape = torch.Size((num_experts, *like.shape[1:]))
    stride = torch.empty(shape, device="meta").stride()
    return DTensor.from_local(piece, expert_mesh(mesh), placements, run_check=False, shape=shape, stride=stride)


def sharded_state(model: nn.Module, optimizer: torch.optim.Optimizer | None,
                  mesh: DeviceMesh | None) -> dict[str, Tensor]:
    """``model.NAME`` for every parameter and persistent buffer, ``optimizer.NAME.KEY`` for every
    per-parameter optimizer tensor (create them first when loading: ``ensure_optimizer_state``),
    each a global view of what this rank holds."""
    reshard(model)
    experts = {id(p): moe.config.num_experts for _, moe in sharded_layers(model) for p in moe.experts.parameters()}
    names = {id(p): name for name, p in model.named_parameters()}
    state: dict[str, Tensor] = {}

    def view(tensor: Tensor, param: Tensor | None) -> Tensor:
        if param is not None and id(param) in experts and mesh is not None:
            return _global_expert_view(tensor, param, experts[id(param)], mesh)
        return tensor

    for name, tensor in model.state_dict(keep_vars=True).items():
        state[f"model.{name}"] = view(tensor.detach(), tensor if isinstance(tensor, nn.Parameter) else None)
    if optimizer is not None:
        for param, values in optimizer.state.items():
            for key, value in values.items():
                if isinstance(value, Tensor):
                    state[f"optimizer.{names[id(param)]}.{key}"] = view(value, param) if value.dim() else value
    return state


def ensure_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict) -> None:
    """Create the optimizer tensors a checkpoint holds (``saved``: key → (dtype, global shape)),
    zero, in each parameter's layout, for DCP to load into."""
    params = dict(model.named_parameters())
    for key, (dtype, shape) in saved.items():
        if not key.startswith("optimizer."):
            continue
        name, state_key = key[len("optimizer."):].rsplit(".", 1)
        if name not in params:
            raise KeyError(f"the checkpoint holds optimizer state for {name!r}, which this model does not have")
        param = params[name]
        slot = optimizer.state[param]
        if state_key not in slot:
            slot[state_key] = torch.zeros(shape, dtype=dtype, device=param.device) if len(shape) == 0 \
                else torch.zeros_like(param, dtype=dtype)
