"""Regime-switching forecasts: a classic mixture of linear experts against one linear model,
and the gate's regimes against the true ones (``moekit demo timeseries``).

For each seed a series is drawn (``moekit.data.timeseries``), its first ``TRAIN_STEPS``
steps fit the models and the rest is forecast one step ahead from lagged features. The
mixture is ``moekit.classic.MixtureOfExpertsRegressor`` (EM, a logistic gate, one linear
expert per regime); the baseline ``LinearRegression`` on the same features; the oracle
knows the true regime of the step it forecasts (the floor no forecaster reaches). The
gate's regimes are compared with the true ones by the adjusted Rand index and a
confusion matrix. The report plots a stretch of the test series with both.

Shapes: N steps, E experts, S regimes.
"""

from __future__ import annotations

import html
import statistics
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from ..classic import MixtureOfExpertsRegressor  # noqa: E402
from ..data.timeseries import REGIMES, lagged_features, regime_switching_series  # noqa: E402
from .plots import style_plots  # noqa: E402
from .report import html_table, write_page  # noqa: E402

STEPS, TRAIN_STEPS, LAGS, WINDOW = 6000, 4000, 5, 10


def _oracle_forecast(series: np.ndarray, regimes: np.ndarray, steps: np.ndarray) -> np.ndarray:
    params = np.array(list(REGIMES.values()))
    mu, phi = params[regimes[steps], 0], params[regimes[steps], 1]
    return mu + phi * (series[steps - 1] - mu)


def forecast(seed: int) -> dict:
    """Test MSE of the mixture, the linear model and the oracle, and the gate's regimes."""
    from sklearn.linear_model import LinearRegression
    from sklearn.metrics import adjusted_rand_score

    series, regimes = regime_switching_series(STEPS, seed=seed)
    X, y = lagged_features(series, LAGS, WINDOW)
    steps = np.arange(max(LAGS, WINDOW), STEPS)
    n = TRAIN_STEPS
    mixture = MixtureOfExpertsRegressor(n_experts=len(REGIMES), method="em", max_iter=200,
                                        random_state=seed).fit(X[:n], y[:n])
    linear = LinearRegression().fit(X[:n], y[:n])
    gate_NE = mixture.gate_proba(X[n:])
    true = regimes[steps[n:]]
    chosen = gate_NE.argmax(1)
    confusion = np.zeros((len(REGIMES), len(REGIMES)))
    np.add.at(confusion, (chosen, true), 1.0)
    mse = {name: float(np.mean((y[n:] - prediction) ** 2)) for name, prediction in (
        ("mixture", mixture.predict(X[n:])), ("linear", linear.predict(X[n:])),
        ("oracle", _oracle_forecast(series, regimes, steps[n:])))}
    return {"seed": seed, "mse": mse, "adjusted_rand_index": float(adjusted_rand_score(true, chosen)),
            "confusion": (confusion / confusion.sum(0, keepdims=True)).tolist(),
            "plot": {"series": series[steps[n:]][:600].tolist(), "regimes": true[:600].tolist(),
                     "gate": gate_NE[:600].tolist()}}


def summary_table(runs: list[dict]) -> str:
    """Markdown: test MSE per model and seed, the mixture's gain, and the gate's ARI."""
    lines = ["| seed | mixture MSE | linear MSE | oracle MSE | mixture / linear | gate ARI |",
             "|---:|---:|---:|---:|---:|---:|"]
    for r in runs:
        m = r["mse"]
        lines.append(f"| {r['seed']} | {m['mixture']:.4f} | {m['linear']:.4f} | {m['oracle']:.4f} | "
                     f"{m['mixture'] / m['linear']:.3f} | {r['adjusted_rand_index']:.3f} |")
    ratio = statistics.median(r["mse"]["mixture"] / r["mse"]["linear"] for r in runs)
    ari = statistics.median(r["adjusted_rand_index"] for r in runs)
    lines.append(f"| median | | | | {ratio:.3f} | {ari:.3f} |")
    return "\n".join(lines)


def _plot(run: dict, out: Path) -> str:
    data = run["plot"]
    series, regimes, gate = np.array(data["series"]), np.array(data["regimes"]), np.array(data["gate"])
    names = list(REGIMES)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7.5, 4.4), sharex=True)
    colors = ["#00798c", "#d1495b", "#edae49"]
    for s, name in enumerate(names):
        top.fill_between(np.arange(len(series)), series.min(), series.max(), where=regimes == s, color=colors[s],
                         alpha=0.15, step="mid", label=f"true: {name}")
    top.plot(series, color="0.2", linewidth=0.7)
    top.set_title(f"Test series (seed {run['seed']}) and its true regimes")
    top.legend(fontsize=7, ncol=3, loc="upper left")
    bottom.stackplot(np.arange(len(series)), gate.T, labels=[f"expert {e}" for e in range(gate.shape[1])],
                     alpha=0.8)
    bottom.set_ylim(0, 1)
    bottom.set_title("The gate's weights from the lagged features (before the value is seen)")
    bottom.set_xlabel("test step")
    bottom.legend(fontsize=7, ncol=3, loc="upper left")
    fig.tight_layout()
    fig.savefig(out / "regimes.png")
    plt.close(fig)
    return "regimes.png"


def write_timeseries_report(runs: list[dict], out: Path) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    style_plots()
    png = _plot(runs[0], out)
    table = html_table(summary_table(runs))
    confusion = np.array(runs[0]["confusion"])
    header = "".join(f"<th>{html.escape(name)}</th>" for name in REGIMES)
    body = "".join(f"<tr><th>expert {e}</th>" + "".join(f"<td class=num>{v:.2f}</td>" for v in row) + "</tr>"
                   for e, row in enumerate(confusion))
    lead = (f"{STEPS:,} steps per seed: the first {TRAIN_STEPS:,} fit the models, the rest are forecast one step "
            f"ahead from the last {LAGS} values and the mean and spread of the last {WINDOW}. Lower MSE is better; "
            "the oracle knows each step's true regime.")
    sections = [
        ("Forecast error", lead, table),
        ("Recovered regimes", f"Share of each true regime's test steps (columns) that the gate gives most weight "
         f"to each expert (rows), seed {runs[0]['seed']}.",
         f'<table><tr><th></th>{header}</tr>{body}</table><img src="{png}" alt="series, regimes and gate">'),
    ]
    results = {"runs": [{k: v for k, v in r.items() if k != "plot"} for r in runs]}
    return write_page(out, "moekit demo timeseries: regimes",
                      "A generated regime-switching series; every figure from moekit demo timeseries.", sections,
                      results)
