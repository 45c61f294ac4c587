"""Numbers that compare an MoE run with a dense run trained on the same tokens."""

from __future__ import annotations

import statistics


def val_curve(metrics: list[dict]) -> list[tuple[int, float, float]]:
    """(step, training seconds so far, validation loss) at every evaluation."""
    return [(r["step"], r["elapsed"], r["val_loss"]) for r in metrics if "val_loss" in r]


def final_val_loss(metrics: list[dict]) -> float | None:
    curve = val_curve(metrics)
    return curve[-1][2] if curve else None


def median_step_time(metrics: list[dict]) -> float | None:
    """Median over log lines of the mean training-step time (evaluation excluded)."""
    times = [r["step_time"] for r in metrics if "step_time" in r]
    return statistics.median(times) if times else None


def steps_to_reach(metrics: list[dict], target: float) -> int | None:
    """First evaluated step whose validation loss is at or below target (None: never)."""
    for step, _, loss in val_curve(metrics):
        if loss <= target:
            return step
    return None


def seconds_to_reach(metrics: list[dict], target: float) -> float | None:
    """Training seconds (evaluation excluded) at the first evaluation at or below target."""
    for _, seconds, loss in val_curve(metrics):
        if loss <= target:
            return seconds
    return None


def compare(moe_metrics: list[dict], dense_metrics: list[dict]) -> dict:
    """Final losses, the steps and training seconds the MoE needed to reach the dense final
    loss, step-time ratio."""
    dense_final = final_val_loss(dense_metrics)
    moe_final = final_val_loss(moe_metrics)
    moe_step, dense_step = median_step_time(moe_metrics), median_step_time(dense_metrics)
    total_steps = dense_metrics[-1]["step"] if dense_metrics else None
    return {
        "moe_seconds_to_dense_loss": None if dense_final is None else seconds_to_reach(moe_metrics, dense_final),
        "dense_seconds": dense_metrics[-1]["elapsed"] if dense_metrics else None,
        "moe_val_loss": moe_final,
        "dense_val_loss": dense_final,
        "moe_steps_to_dense_loss": None if dense_final is None else steps_to_reach(moe_metrics, dense_final),
        "dense_steps": total_steps,
        "moe_step_time": moe_step,
        "dense_step_time": dense_step,
        "step_time_ratio": moe_step / dense_step if moe_step and dense_step else None,
    }


def seed_summary(comparisons: list[dict]) -> dict:
    """Mean and spread (standard deviation, min, max) over seeds of each number."""
    out = {"seeds": len(comparisons)}
    for key in ("moe_val_loss", "dense_val_loss", "moe_steps_to_dense_loss", "step_time_ratio"):
        values = [c[key] for c in comparisons if c.get(key) is not None]
        if values:
            out[key] = {
                "mean": statistics.fmean(values),
                "std": statistics.stdev(values) if len(values) > 1 else 0.0,
                "min": min(values),
                "max": max(values),
                "n": len(values),
            }
    deltas = [c["dense_val_loss"] - c["moe_val_loss"] for c in comparisons
              if c.get("dense_val_loss") is not None and c.get("moe_val_loss") is not None]
    if deltas:
        out["dense_minus_moe"] = {
            "mean": statistics.fmean(deltas),
            "std": statistics.stdev(deltas) if len(deltas) > 1 else 0.0,
            "min": min(deltas),
            "max": max(deltas),
            "moe_better_in": sum(d > 0 for d in deltas),
            "n": len(deltas),
        }
    return out
