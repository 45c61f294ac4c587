"""Routing statistics gathered during training, and the metrics log.

Shapes: T tokens, E experts, K experts per token, L MoE layers.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..routing.stats import entropy_sum
from .checkpoint import atomic_write_text


def routing_sums(routing) -> torch.Tensor:
    """One MoE layer's routing in a step as sums that add over ranks and steps (float64):
    rows each expert processed (E), then the routing entropy summed over real tokens
    (``routing.stats``' definition, normalised by log E), the real tokens, and the drops."""
    decision, dispatch = routing.decision, routing.dispatch
    load_E, valid_T = dispatch.tokens_per_expert_E.detach(), decision.valid_T
    tokens = float(decision.num_tokens) if valid_T is None else valid_T.sum()
    dropped = 0 if dispatch.num_dropped is None else dispatch.num_dropped
    scalars = [torch.as_tensor(v, dtype=torch.float64, device=load_E.device)
               for v in (entropy_sum(decision.probs_TE, valid_T), tokens, dropped)]
    return torch.cat([load_E.to(torch.float64), torch.stack(scalars)]).cpu()


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
    entropy_L: list[float] = field(default_factory=list)  # per-step mean routing entropy, summed
    dropped_L: list[int] = field(default_factory=list)
    assignments_L: list[int] = field(default_factory=list)

    def add(self, loss: float, aux_loss: float, step_time: float, tokens: int, sums_L: list[torch.Tensor]) -> None:
        """One step; ``sums_L`` holds each MoE layer's ``routing_sums`` (over every rank's tokens)."""
        if not self.load_LE:
            self.load_LE = [[0] * (len(s) - 3) for s in sums_L]
            self.entropy_L = [0.0] * len(sums_L)
            self.dropped_L = [0] * len(sums_L)
            self.assignments_L = [0] * len(sums_L)
        self.steps += 1
        self.loss += loss
        self.aux_loss += aux_loss
        self.step_time += step_time
        self.tokens += tokens
        for layer, sums in enumerate(sums_L):
            *counts, entropy, real_tokens, dropped = sums.tolist()
            counts, dropped = [round(c) for c in counts], round(dropped)
            self.load_LE[layer] = [a + b for a, b in zip(self.load_LE[layer], counts, strict=True)]
            self.entropy_L[layer] += entropy / max(real_tokens, 1.0)
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
            out["routing_entropy"] = [e / n for e in self.entropy_L]
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
            kept = [json.dumps(r) for r in _parse_lines(self.path) if r["step"] <= resume_step]
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        elif resume_step is None and self.path.exists():
            self.path.unlink()
        self.writer = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(Path(run_dir) / "tensorboard"), purge_step=resume_step)

    def write(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps(_finite_or_null(record), allow_nan=False) + "\n")
        if self.writer is not None:
            step = record["step"]
            for key in ("loss", "aux_loss", "lr", "grad_norm", "tokens_per_s", "val_loss", "balance"):
                if key in record and record[key] is not None and math.isfinite(record[key]):
                    group = "val" if key == "val_loss" else "train"
                    self.writer.add_scalar(f"{group}/{key}", record[key], step)
            for layer, entropy in enumerate(record.get("routing_entropy", [])):
                self.writer.add_scalar(f"routing/entropy_moe{layer}", entropy, step)
            for layer, rate in enumerate(record.get("drop_rate", [])):
                self.writer.add_scalar(f"routing/drop_rate_moe{layer}", rate, step)

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def _finite_or_null(value):
    """The record with every NaN or infinity as null: standard JSON that any reader parses."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite_or_null(v) for v in value]
    return value


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        return []
    return _parse_lines(path)


def _parse_lines(path: Path) -> list[dict]:
    """The records of a metrics file; a torn last line (a writer killed mid-line) is dropped,
    a broken line before it is a ``ValueError`` naming the file and the line."""
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    records = []
    for number, line in enumerate(lines, start=1):
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or "step" not in record:
                raise ValueError("not a record with a step")
        except ValueError as error:
            if number == len(lines):
                break
            raise ValueError(f"{str(path)!r} line {number} is not a metrics record ({error})") from None
        records.append(record)
    return records
