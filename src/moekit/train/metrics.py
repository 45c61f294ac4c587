"""Routing statistics gathered during training, and the metrics log.

Shapes: T tokens, E experts, K experts per token, L MoE layers.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..routing import Routing
from .checkpoint import atomic_write_text


def routing_entropy(probs_TE: torch.Tensor) -> float:
    """Mean over tokens of the router distribution's entropy, in nats (log E = uniform)."""
    p = probs_TE.detach().float()
    return float(-(p * p.clamp_min(1e-12).log()).sum(dim=-1).mean())


@dataclass
class IntervalStats:
    """Sums over the steps since the last log line; saved in checkpoints so that a
    resumed run logs the same averages as an uninterrupted one."""

    steps: int = 0
    loss: float = 0.0
    aux_loss: float = 0.0
    step_time: float = 0.0
    tokens: int = 0
    load_LE: list[list[int]] = field(default_factory=list)  # assignments per expert
    entropy_L: list[float] = field(default_factory=list)
    dropped_L: list[int] = field(default_factory=list)
    assignments_L: list[int] = field(default_factory=list)

    def add(self, loss: float, aux_loss: float, step_time: float, tokens: int, routings: list[Routing]) -> None:
        if not self.load_LE:
            self.load_LE = [[0] * r.num_experts for r in routings]
            self.entropy_L = [0.0] * len(routings)
            self.dropped_L = [0] * len(routings)
            self.assignments_L = [0] * len(routings)
        self.steps += 1
        self.loss += loss
        self.aux_loss += aux_loss
        self.step_time += step_time
        self.tokens += tokens
        for layer, r in enumerate(routings):
            # NOTE: .tolist() / float() sync with the device once per MoE layer and step.
            counts = r.tokens_per_expert_E.tolist()
            self.load_LE[layer] = [a + b for a, b in zip(self.load_LE[layer], counts, strict=True)]
            self.entropy_L[layer] += routing_entropy(r.probs_TE)
            dropped = int(r.num_dropped) if r.num_dropped is not None else 0
            self.dropped_L[layer] += dropped
            self.assignments_L[layer] += sum(counts) + dropped

    def summary(self) -> dict:
        """Averages for one metrics.jsonl line."""
        n = max(self.steps, 1)
        out = {
            "loss": self.loss / n,
            "aux_loss": self.aux_loss / n,
            "step_time": self.step_time / n,
            "tokens_per_s": self.tokens / self.step_time if self.step_time > 0 else 0.0,
        }
        if self.load_LE:
            load_LE = [[c / max(sum(row), 1) for c in row] for row in self.load_LE]
            out["load"] = load_LE
            out["entropy"] = [e / n for e in self.entropy_L]
            out["drop_rate"] = [d / max(a, 1) for d, a in zip(self.dropped_L, self.assignments_L, strict=True)]
            out["balance"] = load_balance(load_LE)
        return out

    def to_json(self) -> dict:
        return asdict(self)


def load_balance(load_LE: list[list[float]]) -> float:
    """Busiest expert's share over the mean share, averaged over layers (1.0 = perfect)."""
    ratios = [max(row) * len(row) / max(sum(row), 1e-12) for row in load_LE]
    return sum(ratios) / len(ratios)


class MetricsLog:
    """metrics.jsonl (one JSON object per logged step) and TensorBoard scalars."""

    def __init__(self, run_dir: Path, resume_step: int | None, tensorboard: bool = True):
        self.path = Path(run_dir) / "metrics.jsonl"
        if resume_step is not None and self.path.exists():
            # Drop lines written after the checkpoint we resume from, so the curve continues.
            kept = [line for line in self.path.read_text().splitlines() if line and json.loads(line)["step"] <= resume_step]
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=resume_step)

    def write(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            step = record["step"]
            for key in ("loss", "aux_loss", "lr", "grad_norm", "tokens_per_s", "val_loss", "balance"):
                if key in record and record[key] is not None and math.isfinite(record[key]):
                    group = "val" if key == "val_loss" else "train"
                    self.writer.add_scalar(f"{group}/{key}", record[key], step)
            for layer, entropy in enumerate(record.get("entropy", [])):
                self.writer.add_scalar(f"routing/entropy_moe{layer}", entropy, step)
            for layer, rate in enumerate(record.get("drop_rate", [])):
                self.writer.add_scalar(f"routing/drop_rate_moe{layer}", rate, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
