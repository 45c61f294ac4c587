"""Checkpoints: safetensors for tensors, JSON for the rest, every file written atomically.

Layout inside a run folder:

    checkpoints/step-000300/model.safetensors      model weights (tied weights stored once)
    checkpoints/step-000300/optimizer.safetensors  AdamW moments and step counts
    checkpoints/step-000300/trainer_state.json     step, RNG state, optimizer hyperparameters, ...
    checkpoints/step-000300/checksums.json         SHA-256 of each file above, checked on load
    checkpoints/latest.json                        which step folder is the newest complete one

A step folder counts only once ``latest.json`` names it, and ``latest.json`` is
replaced last, so a crash at any point leaves the previous checkpoint usable.
Nothing non-finite is written (``NonFiniteError``), a file that changed since its
commit is refused on load (``CheckpointError`` naming it), the free space for one
more checkpoint is checked before writing, and temporary files that killed writers
left behind are removed.
Runs on several processes write the canonical (unsharded) layout from rank 0
(``save_parallel_checkpoint``), loadable at any expert-parallel size.
"""

from __future__ import annotations

import base64
import errno
import hashlib
import json
import os
import re
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn


class CheckpointError(ValueError):
    """A checkpoint that cannot be trusted or written: the message names the file and the remedy."""


class NonFiniteError(RuntimeError):
    """Training produced a non-finite loss, gradient or weight."""


CHECKSUMS_FILE = "checksums.json"
_STEP_FOLDER = re.compile(r"step-\d{6,}")
_TMP_FILE = re.compile(r"^\..+\.tmp-(\d+)$")


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call write(temp_path), fsync it, then rename it onto path (and fsync the folder).

    Running out of disk space is a ``CheckpointError`` naming the file; the temporary
    file is removed either way."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise CheckpointError(f"no space left on the disk of {str(path.parent)!r} while writing {path.name}; "
                                  "free some space and resume (the previous checkpoint is intact)") from None
        raise
    finally:
        if tmp.exists():
            tmp.unlink()
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def rng_state_to_json() -> dict:
    state = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
    return state


def restore_rng_state(state: dict) -> None:
    def tensor(b64: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(b64)), dtype=torch.uint8)

    torch.set_rng_state(tensor(state["torch"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([tensor(s) for s in state["cuda"]])


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """The optimizer's per-parameter state as flat named tensors, and its param groups."""
    sd = optimizer.state_dict()
    tensors = {
        f"state.{idx}.{key}": value.detach().cpu().contiguous()
        for idx, state in sd["state"].items()
        for key, value in state.items()
        if isinstance(value, torch.Tensor)
    }
    return tensors, sd["param_groups"]


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], param_groups: list[dict],
                   source: str = "the optimizer state") -> None:
    """Load flat optimizer tensors; a state written for other parameters is a ``CheckpointError``."""
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = value
    params = [p for group in optimizer.param_groups for p in group["params"]]
    expected = [len(group["params"]) for group in optimizer.param_groups]
    found = [len(group.get("params", [])) for group in param_groups]
    if expected != found:
        raise CheckpointError(f"{source} holds parameter groups of {found} parameters; this model's optimizer has "
                              f"{expected}: it was written for another configuration")
    for idx, values in state.items():
        if idx >= len(params):
            raise CheckpointError(f"{source} holds state for parameter {idx}; this model has {len(params)}")
        for key, value in values.items():
            if value.dim() > 0 and value.shape != params[idx].shape:
                raise CheckpointError(f"{source}: {key} of parameter {idx} has shape {tuple(value.shape)}, the "
                                      f"parameter {tuple(params[idx].shape)}: it was written for another configuration")
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})


def save_checkpoint(
    run_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, trainer_state: dict, keep: int = 2
) -> Path:
    """Write checkpoints/step-XXXXXX atomically, point latest.json at it, prune older ones."""
    tensors, param_groups = optimizer_tensors(optimizer)
    return write_checkpoint(run_dir, step, lambda tmp: save_model(model, str(tmp)), tensors, param_groups,
                            trainer_state, keep=keep)


def save_model_state(folder: Path, model: nn.Module, optimizer_state: dict[str, torch.Tensor]) -> None:
    """model.safetensors and optimizer.safetensors of a step folder, each written atomically."""
    atomic_write(Path(folder) / "model.safetensors", lambda tmp: save_model(model, str(tmp)))
    atomic_write(Path(folder) / "optimizer.safetensors", lambda tmp: save_file(optimizer_state, str(tmp)))


def write_checkpoint(
    run_dir: Path, step: int, write_model: Callable[[Path], None], optimizer_state: dict[str, torch.Tensor],
    optimizer_param_groups: list[dict], trainer_state: dict, keep: int = 2,
) -> Path:
    """The writing half of ``save_checkpoint``, for callers that gathered the state themselves
    (multi-process training gathers the experts of every rank first)."""
    root = Path(run_dir) / "checkpoints"
    root.mkdir(parents=True, exist_ok=True)
    remove_stale_temporary_files(root)
    _check_free_space(root, optimizer_state)
    folder = root / f"step-{step:06d}"
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / "model.safetensors", write_model)
    atomic_write(folder / "optimizer.safetensors", lambda tmp: save_file(optimizer_state, str(tmp)))
    state = dict(trainer_state, step=step, optimizer_param_groups=optimizer_param_groups, rng=rng_state_to_json())
    atomic_write_text(folder / "trainer_state.json", json.dumps(state, indent=1))
    write_checksums(folder, ("model.safetensors", "optimizer.safetensors", "trainer_state.json"))
    atomic_write_text(root / "latest.json", json.dumps({"step": step, "folder": folder.name}))
    older = sorted(p for p in root.glob("step-*") if p.is_dir() and p != folder)
    for stale in older[: max(len(older) - (keep - 1), 0)]:
        shutil.rmtree(stale, ignore_errors=True)
    return folder


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_checksums(folder: Path, names) -> None:
    """Record the SHA-256 of each named file of a step folder (checked by ``verify_checksums``)."""
    checksums = {name: file_sha256(Path(folder) / name) for name in names}
    atomic_write_text(Path(folder) / CHECKSUMS_FILE, json.dumps(checksums, indent=1))


def remove_stale_temporary_files(root: Path) -> list[Path]:
    """Delete the ``.NAME.tmp-PID`` files under ``root`` whose writer is no longer running."""
    removed = []
    for path in Path(root).rglob(".*.tmp-*"):
        match = _TMP_FILE.match(path.name)
        if match is None or _process_alive(int(match.group(1))):
            continue
        path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _check_free_space(root: Path, optimizer_state: dict[str, torch.Tensor]) -> None:
    """The next checkpoint is written before an old one is removed: it needs room for one more."""
    previous = latest_checkpoint(root.parent) if (root / "latest.json").exists() else None
    if previous is not None and previous.is_dir():
        needed = sum(f.stat().st_size for f in previous.iterdir() if f.is_file())
    else:  # the first checkpoint: the optimizer's moments are twice the weights
        needed = sum(t.numel() * t.element_size() for t in optimizer_state.values()) * 3 // 2
    free = shutil.disk_usage(root).free
    if free < needed:
        raise CheckpointError(f"not enough disk space for the next checkpoint in {str(root)!r}: it needs "
                              f"{needed / 2**20:.1f} MiB, {free / 2**20:.1f} MiB are free; free some space and "
                              "resume (the previous checkpoint is intact)")


def latest_checkpoint(run_dir: Path) -> Path | None:
    """The step folder ``checkpoints/latest.json`` names (None before the first checkpoint).

    A ``latest.json`` that is not JSON or names anything but a step folder of this run is a
    ``CheckpointError``."""
    latest = Path(run_dir) / "checkpoints" / "latest.json"
    if not latest.exists():
        return None
    try:
        name = json.loads(latest.read_text())["folder"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as error:
        raise CheckpointError(f"{str(latest)!r} is not a checkpoint pointer written by moekit ({error})") from None
    if not isinstance(name, str) or not _STEP_FOLDER.fullmatch(name):
        raise CheckpointError(f"{str(latest)!r} names {name!r}, which is not a step folder of this run "
                              "(step-NNNNNN inside its checkpoints folder)")
    return latest.parent / name


def verify_checksums(folder: Path) -> None:
    """Check each file of a step folder against the SHA-256 written at its commit (folders
    written before checksums existed have none to check)."""
    path = Path(folder) / CHECKSUMS_FILE
    if not path.exists():
        return
    try:
        expected = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{str(path)!r} is not valid JSON ({error})") from None
    for name, digest in expected.items():
        file = Path(folder) / name
        if not file.exists():
            raise CheckpointError(f"{str(file)!r} is missing from its checkpoint")
        if file_sha256(file) != digest:
            raise CheckpointError(f"{str(file)!r} has changed since its checkpoint was written (its SHA-256 does "
                                  "not match): the file is corrupt; resume from an earlier checkpoint")


def check_finite_state(named: dict[str, torch.Tensor] | list[tuple[str, torch.Tensor]], where: str) -> None:
    """``NonFiniteError`` naming the first tensor with a NaN or an infinity."""
    for name, tensor in (named.items() if isinstance(named, dict) else named):
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise NonFiniteError(f"{where}: {name} holds NaN or infinite values")


def load_checkpoint(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Load weights (and optimizer state) from a step folder; return the trainer state.

    Files that changed since the commit, non-finite weights and an optimizer state of
    another configuration are ``CheckpointError``s naming the file."""
    folder = Path(folder)
    if (folder / "shards" / ".metadata").exists():  # written by torch.distributed.checkpoint
        from .sharded import load_sharded_checkpoint

        return load_sharded_checkpoint(folder, model, optimizer)
    verify_checksums(folder)
    model_file = folder / "model.safetensors"
    try:
        load_model(model, str(model_file), strict=True)
    except (RuntimeError, OSError, SafetensorError) as error:
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        detail = next((line for line in lines if line.startswith(("size mismatch", "Missing", "Unexpected"))),
                      lines[0] if lines else type(error).__name__)
        raise CheckpointError(f"{str(model_file)!r} does not load into this model (its config.json and the "
                              f"checkpoint disagree?): {detail}") from None
    try:
        check_finite_state(list(model.state_dict().items()), str(model_file))
    except NonFiniteError as error:
        raise CheckpointError(f"{error}; resume from an earlier checkpoint") from None
    state_file = folder / "trainer_state.json"
    try:
        state = json.loads(state_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{str(state_file)!r} is not valid JSON ({error})") from None
    check_trainer_state(state, state_file, resuming=optimizer is not None)
    if optimizer is not None:
        optimizer_file = folder / "optimizer.safetensors"
        load_optimizer(optimizer, read_tensors(optimizer_file), state["optimizer_param_groups"], str(optimizer_file))
    return state


TRAINER_STATE_KEYS = ("step", "elapsed", "interval", "optimizer_param_groups")


def check_trainer_state(state: dict, path: Path, resuming: bool = True) -> None:
    """A step that can be one, and when ``resuming`` the keys a resume reads; else a
    ``CheckpointError`` naming the file (loading weights for inference needs only the step)."""
    if not isinstance(state, dict):
        raise CheckpointError(f"{str(path)!r} is not a trainer state written by moekit")
    missing = [key for key in TRAINER_STATE_KEYS if key not in state] if resuming else []
    if resuming and "rng" not in state and "rng_per_rank" not in state:
        missing.append("rng")
    if "step" not in state and "step" not in missing:
        missing.insert(0, "step")
    if missing:
        raise CheckpointError(f"{str(path)!r} lacks {', '.join(map(repr, missing))}: it is not a complete trainer "
                              "state; resume from an earlier checkpoint")
    step = state["step"]
    if not isinstance(step, int) or isinstance(step, bool) or step < 0:
        raise CheckpointError(f"{str(path)!r} records step {step!r}; expected a whole number >= 0")


def read_tensors(path: Path) -> dict[str, torch.Tensor]:
    """``safetensors.torch.load_file``, with a truncated or foreign file named."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{str(path)!r} cannot be read as safetensors ({error}); it may have been cut off; "
                              "resume from an earlier checkpoint") from None


# --- several processes: checkpoints in the canonical layout ---------------------------
# Rank 0 writes the canonical (unsharded) state gathered from every rank, so a run saved
# at one expert-parallel size resumes at any other (one process included).


def _tied_names(model: nn.Module) -> list[list[str]]:
    """Groups of state-dict names that are one parameter (the LM's tied embedding and head)."""
    groups: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        groups.setdefault(id(param), []).append(name)
    return [names for names in groups.values() if len(names) > 1]


def _model_file_writer(model: nn.Module, state: dict[str, torch.Tensor]):
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
    parallel, keep: int = 2,
) -> Path:
    """Gather the canonical model and optimizer state (collective), write them from rank 0 only
    (atomically, as ``save_checkpoint``), and wait until the checkpoint is complete."""
    import torch.distributed as dist

    from ..parallel import full_optimizer_tensors, full_state_dict

    module = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    model_state = {name: t.detach().cpu().contiguous() for name, t in full_state_dict(module).items()}
    tensors, param_groups = optimizer_tensors(optimizer)
    tensors = full_optimizer_tensors(module, optimizer, tensors)
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
    from ..parallel import load_full_state_dict, shard_optimizer_tensors

    module = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
    verify_checksums(folder)
    state = read_tensors(Path(folder) / "model.safetensors")
    for names in _tied_names(module):
        present = [name for name in names if name in state]
        if present:
            for name in names:
                state.setdefault(name, state[present[0]])
    load_full_state_dict(module, state, strict=True)
    state_file = Path(folder) / "trainer_state.json"
    try:
        trainer_state = json.loads(state_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise CheckpointError(f"{str(state_file)!r} is not valid JSON ({error})") from None
    check_trainer_state(trainer_state, state_file, resuming=optimizer is not None)
    if optimizer is not None:
        tensors = read_tensors(Path(folder) / "optimizer.safetensors")
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


def load_model_tensors(path: Path, skip: Callable[[str], bool] = lambda key: False) -> dict[str, torch.Tensor]:
    """The tensors of a model file written by ``save_model``, except those ``skip`` names,
    with each tied alias recorded in its metadata mapped to its tensor."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            tensors = {key: f.get_tensor(key) for key in f.keys() if not skip(key)}
            aliases = f.metadata() or {}
    except (SafetensorError, OSError) as error:
        raise CheckpointError(f"{str(path)!r} cannot be read as safetensors ({error}); it may have been cut off") from None
    for alias, original in aliases.items():
        if original in tensors:
            tensors[alias] = tensors[original]
    return tensors
