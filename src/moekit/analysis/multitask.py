"""The multi-task experiments and their report: MMoE and PLE against one-gate MoE and a shared
bottom, on the MMoE paper's correlated regressions and on click/conversion-like labels.

``correlation_sweep`` trains each model on two regression tasks whose relatedness p is set
(``moekit.data.multitask.correlated_regressions``) and measures the held-out mean squared
error, per p and seed. ``recommendation`` trains them on two binary tasks of user-item
pairs and measures each task's held-out AUC and each gate's use of the experts.
``write_multitask_report`` writes the page with the plots. Every model trains with the
same optimiser, steps and batches; one CPU thread.

Shapes: N rows, D features, E experts.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from tqdm.auto import tqdm  # noqa: E402

from ..data.multitask import clicks_and_conversions, correlated_regressions  # noqa: E402
from ..models.multitask import PLE, MMoE, SharedBottom, multitask_loss  # noqa: E402
from .plots import style_plots  # noqa: E402
from .report import html_table, write_page  # noqa: E402

CORRELATIONS = (1.0, 0.9, 0.5, 0.0)
TRAIN_ROWS, TEST_ROWS = 10_000, 2_000


def models(d_in: int) -> dict[str, Callable[[], nn.Module]]:
    """The compared models: 8 experts of 16 hidden units for the mixtures (as in the MMoE
    paper's synthetic study), PLE with 4 shared and 2 task experts of that size, and a shared
    bottom as wide as MMoE's parameter count allows."""
    mmoe_parameters = sum(p.numel() for p in MMoE(d_in, 2, num_experts=8, d_ff=16, tower_hidden=8).parameters())
    # The bottom's width that gives it MMoE's parameter count: (d_in + 1)·F + 2 towers of 8F + 8 + 9.
    bottom = round((mmoe_parameters - 2 * 17) / (d_in + 1 + 2 * 8))
    return {
        "shared-bottom": lambda: SharedBottom(d_in, 2, d_ff=bottom, tower_hidden=8),
        "OMoE": lambda: MMoE(d_in, 2, num_experts=8, d_ff=16, tower_hidden=8, one_gate=True),
        "MMoE": lambda: MMoE(d_in, 2, num_experts=8, d_ff=16, tower_hidden=8),
        "PLE": lambda: PLE(d_in, 2, num_layers=1, shared_experts=4, task_experts=2, d_ff=16, tower_hidden=8),
    }


def train(model: nn.Module, x_ND: torch.Tensor, targets: list[torch.Tensor], losses: list[str], *, steps: int,
          batch_size: int, lr: float, seed: int) -> nn.Module:
    """Adam on random batches of the rows; returns the model in eval mode."""
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(steps):
        rows = torch.randint(0, x_ND.shape[0], (batch_size,), generator=generator)
        loss = multitask_loss(model(x_ND[rows]), [t[rows] for t in targets], losses)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    return model.eval()


def _split(x: np.ndarray, ys: list[np.ndarray]):
    tensors = torch.from_numpy(x), [torch.from_numpy(y) for y in ys]
    return (tensors[0][:TRAIN_ROWS], [y[:TRAIN_ROWS] for y in tensors[1]],
            tensors[0][TRAIN_ROWS:], [y[TRAIN_ROWS:] for y in tensors[1]])


def correlation_sweep(seeds: list[int], steps: int, *, batch_size: int = 256, lr: float = 3e-3,
                      progress: bool = True) -> list[dict]:
    """Held-out MSE (mean of the two tasks) of every model, per task correlation and seed."""
    rows = []
    bar = tqdm(total=len(CORRELATIONS) * len(seeds) * 4, desc="correlation sweep", unit="run", disable=not progress)
    for p in CORRELATIONS:
        for seed in seeds:
            x, ys = correlated_regressions(TRAIN_ROWS + TEST_ROWS, p, seed=seed)
            x_train, y_train, x_test, y_test = _split(x, ys)
            for name, build in models(x.shape[1]).items():
                torch.manual_seed(seed)
                model = train(build(), x_train, y_train, ["mse", "mse"], steps=steps, batch_size=batch_size,
                              lr=lr, seed=seed)
                with torch.no_grad():
                    out = model(x_test)
                mse = [float(nn.functional.mse_loss(o[:, 0], y)) for o, y in zip(out.outputs, y_test, strict=True)]
                rows.append({"correlation": p, "seed": seed, "model": name, "mse": statistics.fmean(mse),
                             "mse_per_task": mse})
                bar.update(1)
    bar.close()
    return rows


def summarize_sweep(rows: list[dict]) -> list[dict]:
    """Median and spread of the held-out MSE per (correlation, model)."""
    summary = []
    for p in CORRELATIONS:
        for name in ("shared-bottom", "OMoE", "MMoE", "PLE"):
            values = [r["mse"] for r in rows if r["correlation"] == p and r["model"] == name]
            if values:
                summary.append({"correlation": p, "model": name, "median": statistics.median(values),
                                "min": min(values), "max": max(values), "seeds": len(values)})
    return summary


def auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve: the chance a random positive outranks a random negative."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(labels, scores))


def recommendation(seed: int, steps: int, *, batch_size: int = 256, lr: float = 3e-3) -> dict:
    """Click and conversion AUCs of every model, and each MMoE/PLE gate's mean expert weights."""
    x, ys = clicks_and_conversions(TRAIN_ROWS + TEST_ROWS, seed=seed)
    x_train, y_train, x_test, y_test = _split(x, ys)
    result = {"models": {}, "gates": {}, "positive_rate": [float(y.mean()) for y in ys]}
    for name, build in models(x.shape[1]).items():
        torch.manual_seed(seed)
        model = train(build(), x_train, y_train, ["bce", "bce"], steps=steps, batch_size=batch_size, lr=lr,
                      seed=seed)
        with torch.no_grad():
            out = model(x_test)
        result["models"][name] = {task: auc(o[:, 0].numpy(), y.numpy()) for task, o, y in
                                  zip(("click", "conversion"), out.outputs, y_test, strict=True)}
        if name in ("MMoE", "PLE"):
            result["gates"][name] = {gate: w.mean(0).tolist() for gate, w in out.gates.items()}
    return result


def plot_sweep(summary: list[dict], out: Path) -> str:
    fig, ax = plt.subplots(figsize=(6.2, 3.6))
    for name in ("shared-bottom", "OMoE", "MMoE", "PLE"):
        points = [s for s in summary if s["model"] == name]
        p = [s["correlation"] for s in points]
        median = np.array([s["median"] for s in points])
        spread = np.array([[s["median"] - s["min"] for s in points], [s["max"] - s["median"] for s in points]])
        ax.errorbar(p, median, yerr=spread, marker="o", capsize=3, label=name)
    ax.set_xlabel("task correlation p")
    ax.set_ylabel("held-out MSE (median, min–max over seeds)")
    ax.invert_xaxis()
    ax.set_title("Two regression tasks of set relatedness")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "correlation_sweep.png")
    plt.close(fig)
    return "correlation_sweep.png"


def plot_gates(gates: dict, out: Path) -> str:
    """Per model, each gate's mean weight on each expert, side by side; the dashed line is a
    uniform gate (1/E)."""
    fig, axes = plt.subplots(1, len(gates), figsize=(3.4 * len(gates), 3.0), squeeze=False)
    for ax, (model, by_gate) in zip(axes[0], gates.items(), strict=True):
        width = 0.8 / len(by_gate)
        for i, (gate, weights) in enumerate(by_gate.items()):
            experts = np.arange(len(weights))
            ax.bar(experts + (i - (len(by_gate) - 1) / 2) * width, weights, width, label=gate.split("/")[-1])
            ax.axhline(1 / len(weights), color="0.4", linestyle="--", linewidth=0.8)
        ax.set_title(model)
        ax.set_xlabel("expert")
        ax.set_ylabel("mean gate weight")
        ax.legend(fontsize=7.5)
    fig.tight_layout()
    fig.savefig(out / "gates.png")
    plt.close(fig)
    return "gates.png"


def sweep_table(summary: list[dict]) -> str:
    """The correlation sweep as Markdown: median held-out MSE (min–max) per model and p."""
    names = ("shared-bottom", "OMoE", "MMoE", "PLE")
    lines = ["| correlation p | " + " | ".join(names) + " |", "|---:|" + "---:|" * len(names)]
    for p in CORRELATIONS:
        cells = []
        for name in names:
            s = next(s for s in summary if s["correlation"] == p and s["model"] == name)
            cells.append(f"{s['median']:.4f} ({s['min']:.4f}–{s['max']:.4f})")
        lines.append(f"| {p:.1f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def recommendation_table(result: dict) -> str:
    lines = ["| model | click AUC | conversion AUC |", "|---|---:|---:|"]
    for name, aucs in result["models"].items():
        lines.append(f"| {name} | {aucs['click']:.4f} | {aucs['conversion']:.4f} |")
    return "\n".join(lines)


def write_multitask_report(results: dict, out: Path) -> Path:
    """out/index.html with the sweep and the recommendation demo; out/results.json."""
    out.mkdir(parents=True, exist_ok=True)
    style_plots()
    sweep_png, gates_png = plot_sweep(results["summary"], out), plot_gates(results["recommendation"]["gates"], out)
    settings = results["settings"]
    sections = [
        ("Task relatedness", f"Two regression tasks whose directions have cosine p (Ma et al. 2018's synthetic "
         f"data), {TRAIN_ROWS:,} training and {TEST_ROWS:,} held-out rows, {settings['steps']} Adam steps of "
         f"{settings['batch_size']} rows per model, {len(settings['seeds'])} seed(s). Lower is better.",
         html_table(sweep_table(results["summary"])) + f'<img src="{sweep_png}" alt="MSE against correlation">'),
        ("Click and conversion", "Two binary tasks on generated user-item pairs: held-out AUC per task "
         "(higher is better), and each gate's mean weight on each expert (PLE's task gates see their own "
         "experts first, then the shared ones).",
         html_table(recommendation_table(results["recommendation"])) + f'<img src="{gates_png}" alt="gates">'),
    ]
    return write_page(out, "moekit demo multitask: MMoE and PLE",
                      "Generated data; every figure from moekit demo multitask.", sections, results)
