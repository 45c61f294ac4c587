"""Training on several processes: the process group and mesh, and the reductions a trainer needs.

``torchrun`` starts the processes and ``moekit.parallel`` carries the collectives:

- ``setup_parallel``: the process group (with its timeout) and the (dp, ep) mesh,
  as a ``ParallelContext`` (rank, share of a batch, means over ranks, agreement checks);
- ``parallelize``: shard a model's MoE layers over the EP group, wrap it in DDP for
  the replicated parameters;
- ``reduce_gradients``: expert gradients to those of the global mean loss;
- ``clip_grad_norm``: the global gradient norm when each rank holds different experts;
- ``reduce_routing_sums``: per-layer routing sums (loads, entropy, drops) over every
  rank's tokens, for the metrics log.

Shapes: B global batch (sequences), E experts, L local experts (E / EP size).
"""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor

from .collectives import backend_failure, named_collective
from .fsdp import MIXED_PRECISION, fsdp_mesh, fsdp_squared_norm, fully_shard_model, is_fully_sharded
from .replication import enable_replication
from .setup import (
    data_parallel,
    expert_parallel,
    expert_parallel_mesh,
    init_distributed,
    moe_layers,
)
from .state import expert_dispatchers, is_sharded


@dataclass
class ParallelContext:
    """Where this process stands: its rank, the mesh, the EP size, and the FSDP size
    (0: the non-expert parameters are replicated with DDP; N: sharded over N ranks with
    FSDP2, ``moekit.parallel.fsdp``) with its mixed-precision policy."""

    mesh: DeviceMesh
    ep_size: int
    fsdp_size: int = 0
    mixed_precision: str = "fp32"
    overlap_chunks: int = 1
    replicate_every: int = 0
    replica_slots: int = 1

    @property
    def rank(self) -> int:
        return dist.get_rank()

    @property
    def world_size(self) -> int:
        return dist.get_world_size()

    @property
    def is_main(self) -> bool:
        """Rank 0 writes the run folder; the others only compute."""
        return self.rank == 0

    def describe(self) -> str:
        """One line for the user: how the model is spread over the processes."""
        world, ep = self.world_size, self.ep_size
        experts = f"{world} processes: experts sharded over {ep} (expert parallel)"
        if not self.fsdp_size:
            return f"{experts}, {world // ep} data-parallel replica(s) of each expert"
        replicas = world // self.fsdp_size
        return (f"{experts}, each FSDP-sharded over its {world // ep} holder(s); the other parameters FSDP-sharded "
                f"over {self.fsdp_size}" + (f", {replicas} replicas (HSDP)" if replicas > 1 else "")
                + f"; {self.mixed_precision} weights in compute")

    def named_failure(self, err: BaseException) -> RuntimeError | None:
        """moekit's error for a collective that failed inside torch (FSDP, DDP), or None."""
        return backend_failure(err, "a collective of FSDP or DDP (all-gather, reduce-scatter or all-reduce)")

    def barrier(self) -> None:
        with named_collective("barrier"):
            dist.barrier()

    def share(self, rows_B: Tensor) -> Tensor:
        """This rank's contiguous share of a batch's rows (rank r gets the r-th of world_size slices)."""
        return rows_B.tensor_split(self.world_size)[self.rank]

    @property
    def device(self) -> torch.device:
        """Where collectives' tensors live: NCCL carries only CUDA tensors."""
        return torch.device(self.mesh.device_type)

    def mean(self, values: list[float]) -> list[float]:
        """The mean over ranks of each value (one all-reduce)."""
        total = torch.tensor(values, dtype=torch.float64, device=self.device)
        with named_collective("all-reduce of the losses"):
            dist.all_reduce(total)
        return (total / self.world_size).tolist()

    def any(self, flag: bool) -> bool:
        """True on every rank when it is True on one (stop requests must agree, or the ranks desynchronise)."""
        value = torch.tensor([int(flag)], device=self.device)
        with named_collective("all-reduce of the stop flag"):
            dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def check_same(self, what: str, value) -> None:
        """Raise the same ``ValueError`` on every rank when ``value`` differs from rank 0's."""
        values: list = [None] * self.world_size
        with named_collective(f"all-gather of {what}"):
            dist.all_gather_object(values, value)
        for rank, theirs in enumerate(values[1:], start=1):
            if theirs != values[0]:
                raise ValueError(f"{what} differs across ranks: rank 0 has {values[0]!r}, rank {rank} has {theirs!r}; "
                                 "every rank must read the same data with the same settings")

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def setup_parallel(ep_size: int, timeout_s: float, device: str = "cpu", *, fsdp_size: int = 0,
                   mixed_precision: str = "fp32", overlap_chunks: int = 1, replicate_every: int = 0,
                   replica_slots: int = 1) -> ParallelContext:
    """The process group from torchrun's environment (unless one exists) and the mesh: (dp, ep),
    or with ``fsdp_size`` the (replicate, shard, ep) mesh of ``fsdp_mesh``."""
    if isinstance(ep_size, bool) or not isinstance(ep_size, int) or ep_size < 1:
        raise ValueError(f"expert-parallel size ({ep_size!r}) must be a positive integer")
    if isinstance(fsdp_size, bool) or not isinstance(fsdp_size, int) or fsdp_size < 0:
        raise ValueError(f"FSDP size ({fsdp_size!r}) must be a positive integer (or 0: no FSDP)")
    if mixed_precision not in MIXED_PRECISION:
        raise ValueError(f"mixed precision ({mixed_precision!r}) must be one of {sorted(MIXED_PRECISION)}")
    if isinstance(overlap_chunks, bool) or not isinstance(overlap_chunks, int) or overlap_chunks < 1:
        raise ValueError(f"overlap chunks ({overlap_chunks!r}) must be a positive integer")
    for what, value, low in (("replicate-every", replicate_every, 0), ("replica slots", replica_slots, 1)):
        if isinstance(value, bool) or not isinstance(value, int) or value < low:
            raise ValueError(f"{what} ({value!r}) must be an integer >= {low}")
    if mixed_precision != "fp32" and not fsdp_size:
        raise ValueError(f"mixed precision {mixed_precision!r} is FSDP's policy: it needs an FSDP size")
    if not timeout_s > 0:
        raise ValueError(f"distributed timeout ({timeout_s!r} s) must be positive")
    if not dist.is_initialized():
        if "WORLD_SIZE" not in os.environ:
            if fsdp_size:
                raise ValueError(
                    f"FSDP size {fsdp_size} needs {fsdp_size} processes (or a multiple); start them with torchrun, "
                    f"e.g. `torchrun --nproc-per-node {fsdp_size} -m moekit train --fsdp {fsdp_size} "
                    f"--expert-parallel {ep_size} ...`")
            raise ValueError(
                f"expert-parallel size {ep_size} needs {ep_size} processes (or a multiple); start them with "
                f"torchrun, e.g. `torchrun --nproc-per-node {ep_size} -m moekit train --expert-parallel {ep_size} ...`"
            )
        init_distributed(backend="nccl" if torch.device(device).type == "cuda" else "gloo", timeout_s=timeout_s)
    world = dist.get_world_size()
    device_type = torch.device(device).type
    if fsdp_size:
        mesh = fsdp_mesh(fsdp_size, ep_size, device_type)
    elif world % ep_size != 0:
        raise ValueError(f"expert-parallel size ({ep_size}) must divide the number of processes ({world})")
    else:
        mesh = expert_parallel_mesh(ep_size, device_type)
    return ParallelContext(mesh, ep_size, fsdp_size, mixed_precision, overlap_chunks, replicate_every, replica_slots)


def parallelize(model: nn.Module, parallel: ParallelContext) -> nn.Module:
    """Shard ``model``'s MoE layers over the EP group (EP > 1) in place; return the module to
    call for training steps: DDP over all ranks for everything that is not a sharded expert,
    or (with an FSDP size) the model itself, sharded by ``fully_shard_model``."""
    if parallel.ep_size > 1:
        layers = moe_layers(model)
        if not layers:
            raise ValueError(f"expert-parallel size {parallel.ep_size} asked for, but the model has no MoE layer")
        num_experts = layers[0][1].config.num_experts
        if num_experts % parallel.ep_size:
            raise ValueError(f"experts per layer ({num_experts}) must be divisible by the expert-parallel size "
                             f"({parallel.ep_size})")
        # The balancing losses over every rank's tokens: those of the single-process global batch.
        loss_group = dist.group.WORLD if parallel.world_size > parallel.ep_size else None
        expert_parallel(model, parallel.mesh.get_group("ep"), loss_group=loss_group,
                        overlap_chunks=parallel.overlap_chunks)
        if parallel.replicate_every:  # replicas of the hot experts, placed every N steps (replan_replicas)
            if parallel.fsdp_size:
                raise ValueError("hot-expert replication copies whole experts: use it without --fsdp")
            enable_replication(model, parallel.replica_slots)
    if parallel.fsdp_size:
        model = fully_shard_model(model, parallel.mesh, mixed_precision=parallel.mixed_precision)
        if parallel.overlap_chunks > 1:
            # The overlapped exchange runs the experts once per chunk: keep their weights gathered
            # from the first chunk to the layer's backward instead of gathering them C times.
            for _, moe in moe_layers(model):
                if isinstance(moe.experts, FSDPModule):
                    moe.experts.set_reshard_after_forward(False)
        return model
    if parallel.world_size == 1:
        return model
    # The buffers are the rotary tables, equal on every rank: nothing to broadcast each step
    # (torch 2.13 renamed the option; older versions know only the first name).
    ddp_options = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    no_buffer_sync = "forward_sync_buffers" if "forward_sync_buffers" in ddp_options else "broadcast_buffers"
    return data_parallel(model, **{no_buffer_sync: False})


def reduce_gradients(model: nn.Module, parallel: ParallelContext) -> None:
    """After backward: DDP has averaged the replicated gradients; bring the sharded experts'
    gradients to those of the global mean loss too."""
    from .setup import reduce_expert_gradients

    # Under FSDP its reduce-scatter did it, unless every expert has a single holder (nothing reduced).
    if is_sharded(model) and (not is_fully_sharded(model) or parallel.mesh["dp"].size() == 1):
        reduce_expert_gradients(model, parallel.mesh)


def clip_grad_norm(model: nn.Module, max_norm: float, parallel: ParallelContext | None) -> Tensor:
    """``clip_grad_norm_`` over the whole model, whose experts may be spread over the EP group:
    the squared norm of the experts held here is summed over the EP group (after the gradient
    reduction the ranks of a dp group hold the same expert gradients), the replicated
    parameters' counted once. Returns the total norm before clipping."""
    params = [p for p in model.parameters() if p.grad is not None]
    if is_fully_sharded(model):
        total = fsdp_squared_norm(model, parallel.mesh).sqrt()
        # As clip_grads_with_norm_ scales, on each rank's shards (views of the DTensor gradients).
        coef = (max_norm / (total + 1e-6)).clamp(max=1.0)
        for param in params:
            grad = param.grad.to_local() if isinstance(param.grad, DTensor) else param.grad
            grad.mul_(coef.to(grad.dtype))
        return total
    if parallel is None or not is_sharded(model):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    experts = expert_dispatchers(model)
    replicated_norm = torch.nn.utils.get_total_norm([p.grad for p in params if id(p) not in experts])
    expert_sq = torch.nn.utils.get_total_norm([p.grad for p in params if id(p) in experts]).square()
    with named_collective("all-reduce of the gradient norm"):
        dist.all_reduce(expert_sq, group=parallel.mesh.get_group("ep"))
    total = (replicated_norm.square() + expert_sq).sqrt()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


def reduce_routing_sums(sums_L: list[Tensor], parallel: ParallelContext, sharded: bool) -> list[Tensor]:
    """Per-layer routing sums (``train.metrics.routing_sums``: E loads, then entropy, tokens and
    drops) over every rank's tokens. Loads are summed over the ranks that do not already share
    them: an expert-parallel layer reports the loads of its whole EP group."""
    if not sums_L:
        return sums_L
    packed_LS = torch.stack(sums_L).to(parallel.device)
    loads_LE, rest_LS = packed_LS[:, :-3].clone(), packed_LS[:, -3:].contiguous()
    dp_group = parallel.mesh.get_group("dp") if parallel.mesh["dp"].size() > 1 else None
    with named_collective("all-reduce of the routing statistics"):
        dist.all_reduce(rest_LS)
        if not sharded:
            dist.all_reduce(loads_LE)
        elif dp_group is not None:
            dist.all_reduce(loads_LE, group=dp_group)
    return list(torch.cat([loads_LE, rest_LS], dim=1).cpu().unbind(0))
