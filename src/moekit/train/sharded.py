"""Sharded checkpoints with ``torch.distributed.checkpoint``: each rank writes its own shards.

A sharded step folder holds ``shards/`` (DCP's ``.metadata`` and one
``.distcp`` file per rank) next to the usual ``trainer_state.json`` and
``checksums.json``. The tensors are the canonical ones (``model.NAME``,
``optimizer.NAME.KEY``, all E experts; ``moekit.parallel.sharded_state``), so
the folder loads at any mesh shape, FSDP or DDP, any EP size, or in one
process, each reading only the pieces it holds.

Commit: every rank writes into ``checkpoints/incomplete-step-N``; after a
barrier rank 0 writes the trainer state and the checksums of every file,
renames the folder to ``step-N`` and points ``latest.json`` at it. A crash
before the rename leaves ``latest.json`` on the previous checkpoint.

``convert_checkpoint`` turns a step folder into the single-file safetensors
layout or back, in one process.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from ..parallel.sharded_state import ensure_optimizer_state, sharded_state
from .checkpoint import (
    CheckpointError,
    atomic_write_text,
    check_trainer_state,
    rng_state_to_json,
    verify_checksums,
    write_checksums,
)

SHARDS_DIR = "shards"


def _dcp(call, state: dict, path: Path, one_process: bool) -> None:
    """``dcp.save`` or ``dcp.load``; in one process without the warning DCP gives for it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled, unavailable or uninitialized")
        call(state, checkpoint_id=path, no_dist=one_process)


def is_sharded_checkpoint(folder: Path) -> bool:
    return (Path(folder) / SHARDS_DIR / ".metadata").exists()


def _mesh(parallel):
    return None if parallel is None else parallel.mesh


def save_sharded_checkpoint(run_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer,
                            trainer_state: dict, parallel=None, keep: int = 2) -> Path:
    """Write a sharded step folder (collective under ``parallel``: every rank calls it)."""
    import torch.distributed as dist

    root = Path(run_dir) / "checkpoints"
    folder = root / f"step-{step:06d}"
    staging = root / f"incomplete-step-{step:06d}"
    is_main = parallel is None or parallel.is_main
    if is_main:
        shutil.rmtree(staging, ignore_errors=True)  # a save that crashed before its commit
        staging.mkdir(parents=True)
    rng = [rng_state_to_json()]
    if parallel is not None:
        rng = [None] * parallel.world_size
        dist.all_gather_object(rng, rng_state_to_json())
        parallel.barrier()
    state = sharded_state(model, optimizer, _mesh(parallel))
    _dcp(dcp.save, state, staging / SHARDS_DIR, parallel is None)
    if parallel is not None:
        parallel.barrier()  # every rank's shards are on disk
    if is_main:
        groups = optimizer.state_dict()["param_groups"]
        trainer = dict(trainer_state, step=step, optimizer_param_groups=groups, rng=rng[0], rng_per_rank=rng)
        atomic_write_text(staging / "trainer_state.json", json.dumps(trainer, indent=1))
        files = sorted(str(p.relative_to(staging)) for p in staging.rglob("*") if p.is_file())
        write_checksums(staging, [name for name in files if name != "checksums.json"])
        _commit(root, staging, folder, step, keep)
    if parallel is not None:
        parallel.barrier()  # nobody reads or resumes from a checkpoint that is still being committed
    return folder


def _commit(root: Path, staging: Path, folder: Path, step: int, keep: int) -> None:
    replaced = root / f"replaced-step-{step:06d}"
    if folder.exists():  # saved again at the same step (a resume saves first)
        shutil.rmtree(replaced, ignore_errors=True)
        folder.rename(replaced)
    staging.rename(folder)
    atomic_write_text(root / "latest.json", json.dumps({"step": step, "folder": folder.name}))
    shutil.rmtree(replaced, ignore_errors=True)
    older = sorted(p for p in root.glob("step-*") if p.is_dir() and p != folder)
    for stale in older[: max(len(older) - (keep - 1), 0)]:
        shutil.rmtree(stale, ignore_errors=True)


def saved_tensors(folder: Path) -> dict[str, tuple[torch.dtype, torch.Size]]:
    """Key → (dtype, global shape) of every tensor a sharded step folder holds."""
    metadata = dcp.FileSystemReader(str(Path(folder) / SHARDS_DIR)).read_metadata()
    return {key: (meta.properties.dtype, meta.size) for key, meta in metadata.state_dict_metadata.items()
            if hasattr(meta, "size")}


def load_sharded_checkpoint(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None,
                            parallel=None) -> dict:
    """Load a sharded step folder into this rank's part of ``model`` (and ``optimizer``), at any
    mesh shape or in one process; returns the trainer state."""
    folder = Path(folder)
    if parallel is None or parallel.is_main:
        verify_checksums(folder)
    saved = saved_tensors(folder)
    if optimizer is not None:
        ensure_optimizer_state(model, optimizer, saved)
    state = sharded_state(model, optimizer, _mesh(parallel))
    missing = sorted(key for key in state if key not in saved)
    if missing:
        raise CheckpointError(f"{str(folder)!r} holds no {missing[0]} ({len(missing)} tensors missing): it was "
                              "written for another model")
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(saved[key][1]):
            raise CheckpointError(f"{str(folder)!r}: {key} has shape {tuple(saved[key][1])} in the checkpoint, "
                                  f"{tuple(tensor.shape)} in this model: it was written for another configuration")
    _dcp(dcp.load, state, folder / SHARDS_DIR, parallel is None)
    trainer_state = json.loads((folder / "trainer_state.json").read_text())
    check_trainer_state(trainer_state, folder / "trainer_state.json", resuming=optimizer is not None)
    if optimizer is not None:
        _load_param_groups(optimizer, trainer_state["optimizer_param_groups"])
    return trainer_state


def _load_param_groups(optimizer: torch.optim.Optimizer, groups: list[dict]) -> None:
    if [len(g["params"]) for g in groups] != [len(g["params"]) for g in optimizer.param_groups]:
        raise CheckpointError("the checkpoint's optimizer has other parameter groups than this model's")
    for group, saved in zip(optimizer.param_groups, groups, strict=True):
        group.update({key: value for key, value in saved.items() if key != "params"})


def convert_checkpoint(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer, to: str) -> None:
    """Rewrite a step folder, in one process, as ``"canonical"`` (model.safetensors and
    optimizer.safetensors) or ``"sharded"`` (DCP shards, one writer); the other layout's
    files are removed once the new ones and their checksums are written."""
    from .checkpoint import load_checkpoint, optimizer_tensors, save_model_state

    folder = Path(folder)
    if to not in ("canonical", "sharded"):
        raise ValueError(f"to ({to!r}) must be 'canonical' or 'sharded'")
    if is_sharded_checkpoint(folder) == (to == "sharded"):
        return
    state = (load_sharded_checkpoint if to == "canonical" else load_checkpoint)(folder, model, optimizer)
    trainer_state = json.loads((folder / "trainer_state.json").read_text())
    if to == "canonical":
        tensors, _ = optimizer_tensors(optimizer)
        save_model_state(folder, model, tensors)
        shutil.rmtree(folder / SHARDS_DIR)
        names = ["model.safetensors", "optimizer.safetensors", "trainer_state.json"]
    else:
        staging = folder / f"incomplete-{SHARDS_DIR}"
        shutil.rmtree(staging, ignore_errors=True)
        _dcp(dcp.save, sharded_state(model, optimizer, None), staging, True)
        staging.rename(folder / SHARDS_DIR)
        for name in ("model.safetensors", "optimizer.safetensors"):
            (folder / name).unlink(missing_ok=True)
        names = sorted(str(p.relative_to(folder)) for p in (folder / SHARDS_DIR).rglob("*") if p.is_file())
        names.append("trainer_state.json")
    atomic_write_text(folder / "trainer_state.json", json.dumps(dict(trainer_state, step=state["step"]), indent=1))
    write_checksums(folder, names)
