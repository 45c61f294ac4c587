"""The report's plots, one PNG each (matplotlib's Agg backend: files only, no window).

Shapes: E experts, K experts per token.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only; never open a window
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.colors import TwoSlopeNorm  # noqa: E402

from .compare import final_val_loss, val_curve  # noqa: E402
from .routing import coactivation, specialisation  # noqa: E402
from .views import RunView  # noqa: E402

COLORS = {"MoE": "#d1495b", "dense": "#00798c"}
_FALLBACK_COLORS = ("#d1495b", "#00798c", "#edae49", "#30638e", "#66a182")


def _color(view: RunView, index: int) -> str:
    return COLORS.get(view.label, _FALLBACK_COLORS[index % len(_FALLBACK_COLORS)])


def style_plots() -> None:
    plt.rcParams.update({
        "figure.dpi": 110, "font.size": 9.5, "axes.spines.top": False, "axes.spines.right": False,
        "axes.grid": True, "grid.alpha": 0.25, "axes.titleweight": "bold", "axes.titlesize": 10.5,
        "legend.frameon": False,
    })


def _save(fig, path: Path) -> str:
    fig.savefig(path, bbox_inches="tight", facecolor="white")
    plt.close(fig)
    return path.name


def plot_loss_curves(views: list[RunView], out: Path) -> str:
    fig, (by_step, by_time) = plt.subplots(1, 2, figsize=(10.5, 3.6))
    for i, v in enumerate(views):
        color = _color(v, i)
        train = [(r["step"], r["loss"]) for r in v.metrics if "loss" in r]
        if train:
            by_step.plot(*zip(*train, strict=True), color=color, alpha=0.25, lw=1)
        curve = val_curve(v.metrics)
        if curve:
            steps, seconds, losses = zip(*curve, strict=True)
            by_step.plot(steps, losses, "o-", color=color, ms=3, lw=1.8, label=f"{v.label} (validation)")
            by_time.plot(np.array(seconds) / 60, losses, "o-", color=color, ms=3, lw=1.8, label=v.label)
    by_step.set(xlabel="step", ylabel="cross-entropy (nats/token)", title="Loss by step (faint: training)")
    by_time.set(xlabel="training time (minutes, evaluation excluded)", ylabel="validation loss", title="Validation loss by wall-clock")
    for ax in (by_step, by_time):
        ax.legend()
        _zoom_to_tail(ax, views)
    return _save(fig, out / "loss_curves.png")


def plot_training_curves(views: list[RunView], out: Path) -> str:
    """The auxiliary loss, the learning rate and the gradient norm of each run, by step."""
    fig, axes = plt.subplots(1, 3, figsize=(10.5, 3.0))
    panels = (("aux_loss", "auxiliary loss (weighted)"), ("lr", "learning rate"), ("grad_norm", "gradient norm (before clipping)"))
    for ax, (key, title) in zip(axes, panels, strict=True):
        for i, v in enumerate(views):
            points = [(r["step"], r[key]) for r in v.metrics if r.get(key) is not None]
            if points:
                ax.plot(*zip(*points, strict=True), color=_color(v, i), lw=1.2, label=v.label)
        ax.set(xlabel="step", title=title)
        ax.legend()
    return _save(fig, out / "training_curves.png")


def _zoom_to_tail(ax, views: list[RunView]) -> None:
    # The first evaluations sit far above the rest; cap the axis so differences at the end show.
    finals = [final_val_loss(v.metrics) for v in views if final_val_loss(v.metrics) is not None]
    curves = [c[2] for v in views for c in val_curve(v.metrics)]
    if finals and curves:
        low = min(min(curves), min(finals)) - 0.1
        ax.set_ylim(low, min(max(curves), low + 3.0))


def _merge_intervals(records: list[dict], max_columns: int = 40) -> list[dict]:
    """Average consecutive logging intervals so a heatmap has at most max_columns columns."""
    group = max(1, -(-len(records) // max_columns))
    merged = []
    for start in range(0, len(records), group):
        chunk = records[start : start + group]
        merged.append({"step": chunk[-1]["step"],
                       "load": np.mean([r["load"] for r in chunk], axis=0).tolist()})
    return merged


def plot_load(view: RunView, out: Path) -> str:
    records = _merge_intervals([r for r in view.metrics if "load" in r])
    layers = len(records[0]["load"])
    E = len(records[0]["load"][0])
    fig, axes = plt.subplots(1, layers, figsize=(2.9 * layers + 1, 2.8), squeeze=False, sharey=True)
    steps = [r["step"] for r in records]
    vmax = max(2.0, max(max(row) * E for r in records for row in r["load"]))
    for layer, ax in enumerate(axes[0]):
        load_ES = np.array([r["load"][layer] for r in records]).T * E  # 1.0 = a fair share
        image = ax.imshow(load_ES, aspect="auto", cmap="RdBu_r", norm=TwoSlopeNorm(1.0, 0.0, vmax),
                          extent=(steps[0], steps[-1], E - 0.5, -0.5), interpolation="nearest")
        ax.set(title=f"block {view.routing_layers[layer]}", xlabel="step")
        ax.set_yticks(range(E))
        ax.grid(False)
    axes[0][0].set_ylabel("expert")
    fig.colorbar(image, ax=axes[0].tolist(), label="load ÷ fair share", shrink=0.9)
    return _save(fig, out / f"load_{view.slug}.png")


def routing_entropy(record: dict, num_experts: int) -> list[float] | None:
    """A metrics line's routing entropy per MoE layer, normalised by log E (``routing.stats``'
    definition); runs logged before it was the one definition logged nats as ``entropy``."""
    if "routing_entropy" in record:
        return record["routing_entropy"]
    if "entropy" in record:
        return [e / math.log(num_experts) if num_experts > 1 else 0.0 for e in record["entropy"]]
    return None


def plot_entropy(view: RunView, out: Path) -> str:
    E, K = view.model_config.moe.num_experts, view.model_config.moe.top_k
    records = [(r["step"], routing_entropy(r, E)) for r in view.metrics if routing_entropy(r, E) is not None]
    fig, ax = plt.subplots(figsize=(5.6, 3.2))
    steps = [step for step, _ in records]
    for layer in range(len(records[0][1])):
        ax.plot(steps, [entropy[layer] for _, entropy in records], lw=1.6, label=f"block {view.routing_layers[layer]}")
    ax.axhline(1.0, color="grey", ls="--", lw=1)
    ax.text(steps[-1], 1.0, f"uniform over {E}", ha="right", va="bottom", color="grey", fontsize=8)
    uniform_k = math.log(K) / math.log(E) if E > 1 else 0.0
    ax.axhline(uniform_k, color="grey", ls=":", lw=1)
    ax.text(steps[-1], uniform_k, f"uniform over {K} (log K / log E)", ha="right", va="bottom", color="grey",
            fontsize=8)
    ax.set(xlabel="step", ylabel="entropy / log E", title="Router entropy per token (training batches)")
    ax.set_ylim(0, 1.08)
    ax.legend(ncol=2, fontsize=8)
    return _save(fig, out / f"entropy_{view.slug}.png")


def plot_drop_rate(view: RunView, out: Path) -> str:
    records = [r for r in view.metrics if "drop_rate" in r]
    fig, ax = plt.subplots(figsize=(5.6, 3.2))
    steps = [r["step"] for r in records]
    for layer in range(len(records[0]["drop_rate"])):
        ax.plot(steps, [100 * r["drop_rate"][layer] for r in records], lw=1.6, label=f"block {view.routing_layers[layer]}")
    ax.set(xlabel="step", ylabel="% of assignments dropped",
           title=f"Dropped for capacity (factor {view.model_config.moe.capacity_factor})")
    ax.set_ylim(bottom=0)
    ax.legend(ncol=2, fontsize=8)
    return _save(fig, out / f"drop_rate_{view.slug}.png")


def _matrix_grid(matrices: list[np.ndarray], titles: list[str], xlabels, ylabel: str, xlabel: str,
                 cbar_label: str, norm, cmap: str, out_path: Path, fmt: str, width_per: float) -> str:
    n = len(matrices)
    fig, axes = plt.subplots(1, n, figsize=(width_per * n + 1.2, 3.6), squeeze=False)
    for ax, m, title in zip(axes[0], matrices, titles, strict=True):
        image = ax.imshow(m, cmap=plt.get_cmap(cmap).with_extremes(bad="#eef0f3"), norm=norm, aspect="auto")
        ax.set_title(title)
        ax.set_xticks(range(m.shape[1]), xlabels, rotation=55, ha="right", fontsize=8)
        ax.set_yticks(range(m.shape[0]))
        ax.set_xlabel(xlabel)
        ax.grid(False)
        for (r, c), value in np.ndenumerate(m):
            if np.isnan(value):
                continue
            ax.text(c, r, format(value, fmt), ha="center", va="center", fontsize=6.5,
                    color="white" if abs(norm(value) - 0.5) > 0.33 else "#222")
    axes[0][0].set_ylabel(ylabel)
    fig.colorbar(image, ax=axes[0].tolist(), label=cbar_label, shrink=0.9)
    return _save(fig, out_path)


def plot_specialisation(view: RunView, out: Path) -> str:
    rec = view.routing
    C, E = len(rec.category_names), rec.num_experts
    lifts = []
    for indices_NK in rec.indices_LNK:
        share_EC = specialisation(indices_NK, rec.categories_N, E, C)
        overall_E = np.bincount(indices_NK.ravel(), minlength=E) / indices_NK.size
        lifts.append(share_EC / np.maximum(overall_E[:, None], 1e-9))
    present = np.bincount(rec.categories_N, minlength=C) > 0
    lifts = [m[:, present] for m in lifts]
    names = [n for n, keep in zip(rec.category_names, present, strict=True) if keep]
    vmax = max(2.0, max(float(m.max()) for m in lifts))
    return _matrix_grid(
        lifts, [f"block {b}" for b in rec.moe_layers], names, "expert", "token category",
        "preference (1 = none)", TwoSlopeNorm(1.0, 0.0, vmax), "RdBu_r",
        out / f"specialisation_{view.slug}.png", ".1f", 0.42 * len(names) + 0.8,
    )


def plot_coactivation(view: RunView, out: Path) -> str:
    rec = view.routing
    E = rec.num_experts
    mats = [coactivation(indices_NK, E) for indices_NK in rec.indices_LNK]
    for m in mats:
        np.fill_diagonal(m, np.nan)  # an expert with itself says nothing; shown blank
    fair = (view.model_config.moe.top_k - 1) / max(E - 1, 1)  # P(j | i) when routing ignores the token
    vmax = max(fair * 2, max(float(np.nanmax(m)) for m in mats), 1e-6)
    return _matrix_grid(
        mats, [f"block {b}" for b in rec.moe_layers], list(range(E)), "expert i", "expert j",
        f"P(j | i)  ({fair:.2f} if independent)",
        TwoSlopeNorm(fair, 0.0, vmax) if fair > 0 else plt.Normalize(0, vmax), "RdBu_r",
        out / f"coactivation_{view.slug}.png", ".2f", 0.36 * E + 0.8,
    )
