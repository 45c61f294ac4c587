"""Training: the loop, checkpoints, metrics and run folders."""

from .checkpoint import (
    CheckpointError,
    NonFiniteError,
    atomic_write,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from .metrics import read_metrics
from .run import DataConfig, PreparedData, fork_run, new_run, prepare_data, resume_run
from .trainer import TrainConfig, Trainer, evaluate, learning_rate, read_run_config

__all__ = [
    "CheckpointError",
    "NonFiniteError",
    "DataConfig",
    "PreparedData",
    "TrainConfig",
    "Trainer",
    "atomic_write",
    "evaluate",
    "fork_run",
    "latest_checkpoint",
    "learning_rate",
    "load_checkpoint",
    "new_run",
    "prepare_data",
    "read_metrics",
    "read_run_config",
    "resume_run",
    "save_checkpoint",
]
