"""Checkpoints: safetensors for tensors, JSON for the rest, every file written atomically.

Layout inside a run folder:

    checkpoints/step-000300/model.safetensors      model weights (tied weights stored once)
    checkpoints/step-000300/optimizer.safetensors  AdamW moments and step counts
    checkpoints/step-000300/trainer_state.json     step, RNG state, optimizer hyperparameters, ...
    checkpoints/latest.json                        which step folder is the newest complete one

A step folder counts only once ``latest.json`` names it, and ``latest.json`` is
replaced last, so a crash at any point leaves the previous checkpoint usable.
"""

from __future__ import annotations

import base64
import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, load_model, save_file, save_model
from torch import nn


def atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Call write(temp_path), fsync it, then rename it onto path (and fsync the folder)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
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


def load_optimizer(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], param_groups: list[dict]) -> None:
    state: dict[int, dict] = {}
    for name, value in tensors.items():
        _, idx, key = name.split(".", 2)
        state.setdefault(int(idx), {})[key] = value
    optimizer.load_state_dict({"state": state, "param_groups": param_groups})


def save_checkpoint(
    run_dir: Path, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, trainer_state: dict, keep: int = 2
) -> Path:
    """Write checkpoints/step-XXXXXX atomically, point latest.json at it, prune older ones."""
    tensors, param_groups = optimizer_tensors(optimizer)
    return write_checkpoint(run_dir, step, lambda tmp: save_model(model, str(tmp)), tensors, param_groups,
                            trainer_state, keep=keep)


def write_checkpoint(
    run_dir: Path, step: int, write_model: Callable[[Path], None], optimizer_state: dict[str, torch.Tensor],
    optimizer_param_groups: list[dict], trainer_state: dict, keep: int = 2,
) -> Path:
    """The writing half of ``save_checkpoint``, for callers that gathered the state themselves
    (multi-process training gathers the experts of every rank first)."""
    root = Path(run_dir) / "checkpoints"
    folder = root / f"step-{step:06d}"
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / "model.safetensors", write_model)
    atomic_write(folder / "optimizer.safetensors", lambda tmp: save_file(optimizer_state, str(tmp)))
    state = dict(trainer_state, step=step, optimizer_param_groups=optimizer_param_groups, rng=rng_state_to_json())
    atomic_write_text(folder / "trainer_state.json", json.dumps(state, indent=1))
    atomic_write_text(root / "latest.json", json.dumps({"step": step, "folder": folder.name}))
    older = sorted(p for p in root.glob("step-*") if p.is_dir() and p != folder)
    for stale in older[: max(len(older) - (keep - 1), 0)]:
        shutil.rmtree(stale, ignore_errors=True)
    return folder


def latest_checkpoint(run_dir: Path) -> Path | None:
    latest = Path(run_dir) / "checkpoints" / "latest.json"
    if not latest.exists():
        return None
    return latest.parent / json.loads(latest.read_text())["folder"]


def load_checkpoint(folder: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Load weights (and optimizer state) from a step folder; return the trainer state."""
    missing, unexpected = load_model(model, str(folder / "model.safetensors"), strict=True)
    state = json.loads((folder / "trainer_state.json").read_text())
    if optimizer is not None:
        load_optimizer(optimizer, load_file(str(folder / "optimizer.safetensors")), state["optimizer_param_groups"])
    return state
