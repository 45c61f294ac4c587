"""Training on several processes: expert parallelism for the MoE layers, DDP for the rest.

``torchrun`` starts the processes and ``moekit.distributed`` carries the
collectives; this module fits them into the trainer:

- ``setup_parallel``: the process group (with its timeout) and the (dp, ep) mesh.
- ``parallelize``: shard the LM's MoE layers over the EP group, wrap the model
  in DDP for the replicated parameters.
- each rank trains on its share of every global batch (``ParallelContext.share``),
  so the global batch, and with a deterministic router the loss curve, are those
  of the single-process run;
- ``clip_grad_norm``: the global gradient norm when each rank holds different experts;
- ``save_parallel_checkpoint`` / ``load_parallel_checkpoint``: checkpoints in the
  canonical unsharded layout, AdamW moments included (gathered to all E experts
  on save, cut to this rank's experts on load), written by rank 0 only, so a run
  saved at one EP size resumes at any other (EP = 1 and single-process included).

Shapes: B global batch (sequences), E experts, L local experts (E / EP size).
"""

from __future__ import annotations

import inspect
import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.distributed.device_mesh import DeviceMesh

from ..distributed import (
    data_parallel,
    expert_parallel,
    expert_parallel_mesh,
    full_state_dict,
    init_distributed,
    load_full_state_dict,
    moe_layers,
)
from .checkpoint import load_optimizer, optimizer_tensors, rng_state_to_json, write_checkpoint


@dataclass
class ParallelContext:
    """Where this process stands: its rank, the (dp, ep) mesh, and the EP size."""

    mesh: DeviceMesh
    ep_size: int

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

    def barrier(self) -> None:
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
        dist.all_reduce(total)
        return (total / self.world_size).tolist()

    def any(self, flag: bool) -> bool:
        """True on every rank when it is True on one (stop requests must agree, or the ranks desynchronise)."""
        value = torch.tensor([int(flag)], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MAX)
        return bool(value.item())

    def check_same(self, what: str, value) -> None:
        """Raise the same ``ValueError`` on every rank when ``value`` differs from rank 0's."""
        values: list = [None] * self.world_size
        dist.all_gather_object(values, value)
        for rank, theirs in enumerate(values[1:], start=1):
            if theirs != values[0]:
                raise ValueError(f"{what} differs across ranks: rank 0 has {values[0]!r}, rank {rank} has {theirs!r}; "
                                 "every rank must read the same data with the same settings")

    def close(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


def setup_parallel(ep_size: int, timeout_s: float, device: str = "cpu") -> ParallelContext:
    """The process group from torchrun's environment (unless one exists) and the (dp, ep) mesh."""
    if isinstance(ep_size, bool) or not isinstance(ep_size, int) or ep_size < 1:
        raise ValueError(f"expert-parallel size ({ep_size!r}) must be a positive integer")
    if not timeout_s > 0:
        raise ValueError(f"distributed timeout ({timeout_s!r} s) must be positive")
    if not dist.is_initialized():
        if "WORLD_SIZE" not in os.environ:
            raise ValueError(
                f"expert-parallel size {ep_size} needs {ep_size} processes (or a multiple); start them with "
                f"torchrun, e.g. `torchrun --nproc-per-node {ep_size} -m moekit train --expert-parallel {ep_size} ...`"
            )
        init_distributed(backend="nccl" if torch.device(device).type == "cuda" else "gloo", timeout_s=timeout_s)
    world = dist.get_world_size()
    if world % ep_size != 0:
        raise ValueError(f"expert-parallel size ({ep_size}) must divide the number of processes ({world})")
    return ParallelContext(expert_parallel_mesh(ep_size, torch.device(device).type), ep_size)


def parallelize(model: nn.Module, parallel: ParallelContext) -> nn.Module:
    """Shard ``model``'s MoE layers over the EP group (EP > 1) in place; return the module to
    call for training steps (DDP over all ranks for everything that is not a sharded expert)."""
    if parallel.ep_size > 1:
        if not moe_layers(model):
            raise ValueError(f"expert-parallel size {parallel.ep_size} asked for, but the model has no MoE layer")
        num_experts = moe_layers(model)[0][1].config.num_experts
        if num_experts % parallel.ep_size:
            raise ValueError(f"experts per layer ({num_experts}) must be divisible by the expert-parallel size "
                             f"({parallel.ep_size})")
        expert_parallel(model, parallel.mesh.get_group("ep"))
    if parallel.world_size == 1:
        return model
    # The buffers are the rotary tables, equal on every rank: nothing to broadcast each step
    # (torch 2.13 renamed the option; older versions know only the first name).
    ddp_options = inspect.signature(nn.parallel.DistributedDataParallel.__init__).parameters
    no_buffer_sync = "forward_sync_buffers" if "forward_sync_buffers" in ddp_options else "broadcast_buffers"
    return data_parallel(model, **{no_buffer_sync: False})


def is_sharded(model: nn.Module) -> bool:
    return any(moe.expert_parallel is not None for _, moe in moe_layers(model))


def _expert_dispatchers(model: nn.Module) -> dict[int, object]:
    """id(parameter) → the ExpertParallel dispatcher of its layer, for every sharded expert parameter."""
    return {
        id(param): moe.expert_parallel
        for _, moe in moe_layers(model)
        if moe.expert_parallel is not None
        for param in moe.experts.parameters()
    }


def reduce_gradients(model: nn.Module, parallel: ParallelContext) -> None:
    """After backward: DDP has averaged the replicated gradients; bring the sharded experts'
    gradients to those of the global mean loss too."""
    from ..distributed import reduce_expert_gradients

    if is_sharded(model):
        reduce_expert_gradients(model, parallel.mesh)


def clip_grad_norm(model: nn.Module, max_norm: float, parallel: ParallelContext | None) -> Tensor:
    """``clip_grad_norm_`` over the whole model, whose experts may be spread over the EP group:
    the squared norm of the experts held here is summed over the EP group (after the gradient
    reduction the ranks of a dp group hold the same expert gradients), the replicated
    parameters' counted once. Returns the total norm before clipping."""
    params = [p for p in model.parameters() if p.grad is not None]
    if parallel is None or not is_sharded(model):
        return torch.nn.utils.clip_grad_norm_(params, max_norm)
    experts = _expert_dispatchers(model)
    replicated_norm = torch.nn.utils.get_total_norm([p.grad for p in params if id(p) not in experts])
    expert_sq = torch.nn.utils.get_total_norm([p.grad for p in params if id(p) in experts]).square()
    dist.all_reduce(expert_sq, group=parallel.mesh.get_group("ep"))
    total = (replicated_norm.square() + expert_sq).sqrt()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total)
    return total


def global_routings(routings: list, parallel: ParallelContext, sharded: bool) -> list:
    """Routing records whose statistics cover the global batch, for the metrics log: router
    probabilities of every rank's tokens (all-gathered; the shares are equal), expert loads
    summed over the ranks that do not already share them, drops summed over all ranks."""
    world, out = parallel.world_size, []
    dp_group = parallel.mesh.get_group("dp") if parallel.mesh["dp"].size() > 1 else None
    for r in routings:
        probs = [torch.empty_like(r.probs_TE) for _ in range(world)]
        dist.all_gather(probs, r.probs_TE.detach().contiguous())
        load_E = r.tokens_per_expert_E.clone()
        if not sharded:
            dist.all_reduce(load_E)
        elif dp_group is not None:
            # The expert-parallel layer already reports the loads of its whole EP group (ExpertParallel.globalize).
            dist.all_reduce(load_E, group=dp_group)
        dropped = torch.zeros((), dtype=torch.long, device=load_E.device) if r.num_dropped is None else \
            r.num_dropped.detach().clone()
        dist.all_reduce(dropped)
        out.append(r.replace(probs_TE=torch.cat(probs), tokens_per_expert_E=load_E, num_dropped=dropped))
    return out


# --- checkpoints in the canonical layout ----------------------------------------------


def _tied_names(model: nn.Module) -> list[list[str]]:
    """Groups of state-dict names that are one parameter (the LM's tied embedding and head)."""
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def full_model_state(model: nn.Module) -> dict[str, Tensor]:
    """All E experts of every layer (collective over each EP group), on every rank."""
    state = full_state_dict(model)
    return {name: tensor.detach().cpu().contiguous() for name, tensor in state.items()}


def _optimizer_params(optimizer: torch.optim.Optimizer) -> list[nn.Parameter]:
    # The optimizer's state dict numbers parameters in the order of its groups.
    return [param for group in optimizer.param_groups for param in group["params"]]


def full_optimizer_tensors(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, Tensor], list[dict]]:
    """``optimizer_tensors`` in the canonical layout: every per-parameter state tensor shaped like
    a sharded expert parameter (AdamW's exp_avg and exp_avg_sq) is all-gathered over its EP group
    to all E experts. Collective: every rank must call it."""
    tensors, param_groups = optimizer_tensors(optimizer)
    dispatchers = _expert_dispatchers(model)
    for idx, param in enumerate(_optimizer_params(optimizer)):
        ep = dispatchers.get(id(param))
        if ep is None:
            continue
        for key in sorted(optimizer.state.get(param, {})):
            name = f"state.{idx}.{key}"
            local = tensors.get(name)
            if local is None or local.shape != param.shape:
                continue  # AdamW's step count: a scalar, the same for every expert
            pieces = [torch.empty_like(param) for _ in range(ep.ep_size)]
            dist.all_gather(pieces, optimizer.state[param][key].detach().contiguous(), group=ep.group)
            tensors[name] = torch.cat(pieces).cpu().contiguous()
    return tensors, param_groups


def shard_optimizer_tensors(model: nn.Module, optimizer: torch.optim.Optimizer, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Canonical optimizer tensors cut down to this rank's experts (the inverse of the gather)."""
    dispatchers = _expert_dispatchers(model)
    sharded = dict(tensors)
    for idx, param in enumerate(_optimizer_params(optimizer)):
        ep = dispatchers.get(id(param))
        if ep is None:
            continue
        prefix = f"state.{idx}."
        for name, full in tensors.items():
            if not name.startswith(prefix) or full.dim() == 0:
                continue
            if full.shape[0] != ep.num_experts or full.shape[1:] != param.shape[1:]:
                raise ValueError(f"optimizer state {name} has shape {tuple(full.shape)} in the checkpoint; "
                                 f"expected {(ep.num_experts, *param.shape[1:])} (all experts of that parameter)")
            sharded[name] = full[ep.first_expert:ep.first_expert + ep.num_local].clone()
    return sharded


def _model_file_writer(model: nn.Module, state: dict[str, Tensor]):
    """Write the state as ``safetensors.torch.save_model`` does: a tied parameter is stored once,
    the other names recorded in the metadata."""
    state, metadata = dict(state), {}
    for names in _tied_names(model):
        for alias in names[1:]:
            state.pop(alias, None)
            metadata[alias] = names[0]
    return lambda tmp: save_file(state, str(tmp), metadata=metadata or None)


def save_parallel_checkpoint(
    run_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, trainer_state: dict,
    parallel: ParallelContext, keep: int = 2,
) -> Path:
    """Gather the canonical model and optimizer state (collective), write them from rank 0 only
    (atomically, as ``save_checkpoint``), and wait until the checkpoint is complete."""
    module = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    model_state = full_model_state(module)
    tensors, param_groups = full_optimizer_tensors(module, optimizer)
    rng_per_rank: list = [None] * parallel.world_size
    dist.all_gather_object(rng_per_rank, rng_state_to_json())
    folder = Path(run_dir) / "checkpoints" / f"step-{step:06d}"
    if parallel.is_main:
        state = dict(trainer_state, rng_per_rank=rng_per_rank)
        folder = write_checkpoint(run_dir, step, _model_file_writer(module, model_state), tensors, param_groups,
                                  state, keep=keep)
    parallel.barrier()  # nobody reads or resumes from a checkpoint that is still being written
    return folder


def load_parallel_checkpoint(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Load a checkpoint saved at any EP size (or by a single process) into this rank's shard."""
    module = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    state = load_file(str(Path(folder) / "model.safetensors"))
    for names in _tied_names(module):
        present = [name for name in names if name in state]
        if present:
            for name in names:
                state.setdefault(name, state[present[0]])
    load_full_state_dict(module, state, strict=True)
    trainer_state = json.loads((Path(folder) / "trainer_state.json").read_text())
    if optimizer is not None:
        tensors = load_file(str(Path(folder) / "optimizer.safetensors"))
        load_optimizer(optimizer, shard_optimizer_tensors(module, optimizer, tensors),
                       trainer_state["optimizer_param_groups"])
    return trainer_state


def rank_rng_state(trainer_state: dict, rank: int, world_size: int) -> dict | None:
    """The RNG state this rank saved, when the run resumes on as many ranks; else None (reseed)."""
    per_rank = trainer_state.get("rng_per_rank")
    if per_rank is not None and len(per_rank) == world_size:
        return per_rank[rank]
    return trainer_state["rng"] if rank == 0 else None


def rank_seed(seed: int, step: int, rank: int) -> int:
    """A seed for rank > 0's RNG (router noise) that differs across ranks and steps of resumption."""
    return (seed * 1_000_003 + step) * 1_009 + rank
