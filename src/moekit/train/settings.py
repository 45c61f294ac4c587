"""How a run trains: ``TrainConfig``, the learning-rate schedule, the optimizer, and the
run folder's config.json (written at the start, read by resume, eval and generate)."""

from __future__ import annotations

import dataclasses
import json
import math
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

from .. import __version__
from ..models.hf_spec import HFModelSpec
from ..models.lm import LMConfig
from .checkpoint import atomic_write_text

TRAINING_STAGES = ("full", "experts", "gate")


@dataclass(kw_only=True)
class TrainConfig:
    """How to train.

    Args:
        steps: optimizer steps in the whole run (the schedule's length).
        batch_size: sequences per step.
        lr: peak learning rate, reached after warmup_steps.
        min_lr: learning rate at the end of the cosine decay.
        warmup_steps: linear warmup from 0.
        weight_decay: AdamW decoupled decay on matrices and embeddings (not on norms).
        beta1, beta2: AdamW moment decays.
        grad_clip: clip the global gradient norm to this (0: no clipping).
        seed: seeds the initial weights, the batch order and the router noise.
        eval_every: steps between validation evaluations (and at the last step).
        eval_batches: validation batches per evaluation (fixed windows).
        log_every: steps per metrics.jsonl line (averaged over them).
        checkpoint_every: steps between checkpoints (and at the last step).
        bf16: autocast matrix multiplies to bfloat16.
        device: ``cpu`` or ``cuda``.
        stage: ``full`` trains everything. Two-stage training (see docs/surgery.md):
            ``experts`` routes every sequence to the expert of its data cluster
            (k-means of token histograms) with the routers frozen; ``gate`` then
            trains only the routers, every other weight frozen.
        freeze_old_experts: n > 0 trains only experts n, n+1, … of each MoE layer and
            their router rows; everything else keeps its weights (``moekit grow --freeze-old``).
        grad_accumulation: micro-batches per step (each rank's share of batch_size split in
            this many); the balancing losses stay those of the whole batch
            (``moekit.train.accumulation``).
    """

    steps: int = 300
    batch_size: int = 16
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 30
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    grad_clip: float = 1.0
    seed: int = 0
    eval_every: int = 50
    eval_batches: int = 8
    log_every: int = 10
    checkpoint_every: int = 100
    bf16: bool = False
    device: str = "cpu"
    stage: str = "full"
    freeze_old_experts: int = 0
    grad_accumulation: int = 1

    def __post_init__(self) -> None:
        if self.stage not in TRAINING_STAGES:
            raise ValueError(f"stage ({self.stage!r}) must be one of {', '.join(TRAINING_STAGES)}")
        if isinstance(self.freeze_old_experts, bool) or not isinstance(self.freeze_old_experts, int) \
                or self.freeze_old_experts < 0:
            raise ValueError(f"freeze_old_experts ({self.freeze_old_experts!r}) must be an integer >= 0")
        if self.stage != "full" and self.freeze_old_experts:
            raise ValueError(f"freeze_old_experts ({self.freeze_old_experts}) applies to stage 'full', "
                             f"not {self.stage!r}")
        for name in ("steps", "batch_size", "eval_every", "eval_batches", "log_every", "checkpoint_every",
                     "grad_accumulation"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} ({value!r}) must be a positive integer")
        if self.batch_size % self.grad_accumulation:
            raise ValueError(f"batch_size ({self.batch_size}) must be divisible by grad_accumulation "
                             f"({self.grad_accumulation}): every micro-batch holds the same number of sequences")
        if self.warmup_steps < 0 or self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must be in [0, steps ({self.steps})]")
        if not 0 < self.lr or not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"need 0 < lr and 0 <= min_lr <= lr; got lr ({self.lr}), min_lr ({self.min_lr})")
        if self.grad_clip < 0:
            raise ValueError(f"grad_clip ({self.grad_clip}) must be >= 0")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device ({self.device!r}) must be 'cpu' or 'cuda'")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError(f"device ({self.device!r}) asked for, but torch sees no CUDA device")


def learning_rate(step: int, config: TrainConfig) -> float:
    """Linear warmup to lr, then cosine decay to min_lr at the last step."""
    if step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(config.steps - config.warmup_steps, 1)
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * min(progress, 1.0)))


def build_optimizer(model: torch.nn.Module, config: TrainConfig) -> torch.optim.AdamW:
    # Stacked experts with frozen rows skip weight decay: it would shrink the frozen rows too.
    def decays(p):
        return p.dim() >= 2 and getattr(p, "frozen_rows_E", None) is None

    decay = [p for p in model.parameters() if decays(p)]
    no_decay = [p for p in model.parameters() if not decays(p)]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(config.beta1, config.beta2))


def write_run_config(run_dir: Path, model_config: LMConfig, train_config: TrainConfig, data_info: dict) -> None:
    config = {
        "model": model_config.to_dict(),
        "train": dataclasses.asdict(train_config),
        "data": data_info,
        "versions": {"moekit": __version__, "torch": torch.__version__, "python": platform.python_version()},
    }
    atomic_write_text(Path(run_dir) / "config.json", json.dumps(config, indent=2))


def read_run_config(run_dir: Path) -> tuple[LMConfig | HFModelSpec, TrainConfig, dict]:
    """The run's model config (``HFModelSpec`` for a run fine-tuning a Hugging Face folder),
    training config and data description."""
    path = Path(run_dir) / "config.json"
    if not path.exists():
        raise FileNotFoundError(f"{str(run_dir)!r} is not a moekit run folder: it has no config.json")
    try:
        config = json.loads(path.read_text())
        sections = config["model"], config["train"], config["data"]
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{str(path)!r} is not valid JSON ({error}); it may have been cut off") from None
    except (KeyError, TypeError) as error:
        raise ValueError(f"{str(path)!r} lacks its {error} section; it is not a config written by moekit") from None
    settings = []
    model_class = HFModelSpec if isinstance(sections[0], dict) and sections[0].get("kind") == "hf" else LMConfig
    for name, cls, section in (("model", model_class, sections[0]), ("train", TrainConfig, sections[1])):
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(section) - known)
        if unknown:
            raise ValueError(f"{str(path)!r}: unknown {name} setting(s) {', '.join(map(repr, unknown))}; this moekit "
                             f"knows {', '.join(sorted(known))}")
        try:
            settings.append(cls(**section))
        except (TypeError, ValueError) as error:
            raise ValueError(f"{str(path)!r}: its {name} settings are invalid: {error}") from None
    return settings[0], settings[1], sections[2]
