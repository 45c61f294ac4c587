"""Classic mixtures of experts against single models, 5-fold cross-validated.

Question: on tabular data, does a mixture of linear/logistic experts recover the regimes
when the truth is a mixture, and how does it compare with a single linear model, an MLP,
gradient boosting and k-means + per-cluster models on the data sets that ship with
scikit-learn?

    .venv/bin/python benchmarks/classic.py            # table on stdout, JSON to bench-results/
    .venv/bin/python benchmarks/classic.py --plot docs/classic_gate_regions.png

Scores: R² for regression, accuracy for classification, mean ± std over the 5 folds.
ARI: adjusted Rand index between the true regime and the gate's argmax (the nearest
centre for k-means) on the held-out fold, for the synthetic problems.
"""

from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import numpy as np
from scipy.optimize import linear_sum_assignment
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin, clone, is_classifier
from sklearn.cluster import KMeans
from sklearn.datasets import load_breast_cancer, load_diabetes, load_digits, load_wine
from sklearn.dummy import DummyClassifier
from sklearn.ensemble import HistGradientBoostingClassifier, HistGradientBoostingRegressor
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.metrics import adjusted_rand_score
from sklearn.model_selection import KFold, StratifiedKFold
from sklearn.neural_network import MLPClassifier, MLPRegressor
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits

from moekit.classic import MixtureOfExpertsClassifier, MixtureOfExpertsRegressor
from moekit.classic.datasets import make_piecewise_linear

N_FOLDS = 5


# ---- data ----------------------------------------------------------------------------------
def piecewise_linear(n_samples=1000, seed=0, noise=0.3):
    """Three regimes, each a sector of the plane with its own linear function."""
    return make_piecewise_linear(n_samples, noise=noise, random_state=seed)


def mmoe_tasks(n_samples=1000, n_features=10, correlation=0.5, n_sines=10, seed=0):
    """The synthetic tasks of the MMoE paper (Ma et al. 2018), pooled into one regression:
    y_k = w_kᵀx + Σ_i sin(α_i·w_kᵀx + β_i) + noise, with cos(w_1, w_2) = correlation.
    Each row belongs to one of two tasks, told by a one-hot column pair appended to x."""
    rng = np.random.RandomState(seed)
    u1, u2 = np.linalg.qr(rng.randn(n_features, 2))[0].T
    weights = [u1, correlation * u1 + np.sqrt(1 - correlation**2) * u2]
    alpha, beta = rng.randn(n_sines), rng.randn(n_sines)
    x = rng.randn(n_samples, n_features)
    task = rng.randint(2, size=n_samples)
    z = np.einsum("nf,nf->n", x, np.stack(weights)[task])
    y = z + np.sin(alpha[None, :] * z[:, None] + beta[None, :]).sum(axis=1)
    y += 0.1 * rng.randn(n_samples)
    return np.hstack([x, np.eye(2)[task]]), y, task


def datasets():
    X, y, regime = piecewise_linear()
    yield "piecewise-3 (synthetic)", X, y, regime, 3
    X, y, task = mmoe_tasks()
    yield "mmoe-tasks (synthetic)", X, y, task, 2
    X, y = load_diabetes(return_X_y=True)
    yield "diabetes", X, y, None, 3
    X, y = load_breast_cancer(return_X_y=True)
    yield "breast_cancer", X, y, None, 3
    X, y = load_wine(return_X_y=True)
    yield "wine", X, y, None, 3
    X, y = load_digits(return_X_y=True)
    yield "digits", X, y, None, 3


# ---- baselines -----------------------------------------------------------------------------
class KMeansLocalModels(BaseEstimator):
    """Hard k-means partition of the inputs, one model per cluster, prediction by the
    nearest centre's model (the usual 'cluster then fit' recipe)."""

    def __init__(self, model, n_clusters=3, random_state=0):
        self.model = model
        self.n_clusters = n_clusters
        self.random_state = random_state

    def fit(self, X, y):
        self.kmeans_ = KMeans(self.n_clusters, n_init=10, random_state=self.random_state)
        labels = self.kmeans_.fit_predict(X)
        self.models_ = []
        for k in range(self.n_clusters):
            part = labels == k
            if is_classifier(self.model) and len(np.unique(y[part])) < 2:
                self.models_.append(DummyClassifier().fit(X[part], y[part]))
            else:
                self.models_.append(clone(self.model).fit(X[part], y[part]))
        if is_classifier(self.model):
            self.classes_ = np.unique(y)
        return self

    def assign(self, X):
        return self.kmeans_.predict(X)

    def predict(self, X):
        labels = self.assign(X)
        out = np.empty(len(X), dtype=np.asarray(self.models_[0].predict(X[:1])).dtype)
        for k, model in enumerate(self.models_):
            if np.any(labels == k):
                out[labels == k] = model.predict(X[labels == k])
        return out


class KMeansLocalRegressor(RegressorMixin, KMeansLocalModels):
    pass


class KMeansLocalClassifier(ClassifierMixin, KMeansLocalModels):
    pass


def models(classification, n_experts):
    moe = MixtureOfExpertsClassifier if classification else MixtureOfExpertsRegressor
    # Fewer EM iterations on the classification sets: each logistic refit costs far more
    # than a least-squares one, and the log-likelihood has flattened by then.
    moe_params = {
        "n_experts": n_experts,
        "random_state": 0,
        "n_init": 2,
        "max_iter": 50 if classification else 100,
    }
    if classification:
        linear = LogisticRegression(max_iter=2000)
        mlp = MLPClassifier(hidden_layer_sizes=(64,), max_iter=1000, random_state=0)
        boosting = HistGradientBoostingClassifier(random_state=0)
        local = KMeansLocalClassifier(linear, n_clusters=n_experts)
    else:
        linear = LinearRegression()
        mlp = MLPRegressor(hidden_layer_sizes=(64,), max_iter=3000, random_state=0)
        boosting = HistGradientBoostingRegressor(random_state=0)
        local = KMeansLocalRegressor(linear, n_clusters=n_experts)
    return {
        "linear / logistic": linear,
        "MLP (64)": mlp,
        "gradient boosting": boosting,
        "k-means + local": local,
        "MoE em": moe(method="em", **moe_params),
        "MoE two_stage": moe(method="two_stage", **moe_params),
        "MoE gradient": moe(method="gradient", **moe_params),
    }


def regime_assignment(estimator, X):
    if isinstance(estimator, MixtureOfExpertsClassifier | MixtureOfExpertsRegressor):
        return estimator.gate_proba(X).argmax(axis=1)
    if isinstance(estimator, KMeansLocalModels):
        return estimator.assign(X)
    return None


# ---- evaluation ----------------------------------------------------------------------------
def cross_validate(model, X, y, regime, classification):
    splitter = (StratifiedKFold if classification else KFold)(N_FOLDS, shuffle=True, random_state=0)
    scores, aris, seconds = [], [], []
    for train, test in splitter.split(X, y):
        pipeline = make_pipeline(StandardScaler(), clone(model))
        start = time.perf_counter()
        pipeline.fit(X[train], y[train])
        seconds.append(time.perf_counter() - start)
        scores.append(pipeline.score(X[test], y[test]))
        if regime is not None:
            assignment = regime_assignment(pipeline[-1], pipeline[0].transform(X[test]))
            if assignment is not None:
                aris.append(adjusted_rand_score(regime[test], assignment))
    return {
        "score_mean": float(np.mean(scores)),
        "score_std": float(np.std(scores)),
        "scores": [float(s) for s in scores],
        "aris": [float(a) for a in aris],
        "ari_mean": float(np.mean(aris)) if aris else None,
        "ari_std": float(np.std(aris)) if aris else None,
        "fit_seconds_median": float(np.median(seconds)),
    }


def format_table(results):
    names = list(next(iter(results.values())).keys())
    header = "| data set | metric | " + " | ".join(names) + " |"
    lines = [header, "|" + "---|" * (len(names) + 2)]
    for dataset, by_model in results.items():
        metric = by_model[names[0]]["metric"]
        cells = [f"{r['score_mean']:.3f} ± {r['score_std']:.3f}" for r in by_model.values()]
        best = max(by_model.values(), key=lambda r: r["score_mean"])["score_mean"]
        cells = [
            f"**{c}**" if r["score_mean"] == best else c
            for c, r in zip(cells, by_model.values(), strict=True)
        ]
        lines.append(f"| {dataset} | {metric} | " + " | ".join(cells) + " |")
        if any(r["ari_mean"] is not None for r in by_model.values()):
            aris = [
                f"{r['ari_mean']:.3f} ± {r['ari_std']:.3f}" if r["ari_mean"] is not None else "–"
                for r in by_model.values()
            ]
            lines.append(f"| {dataset} | ARI | " + " | ".join(aris) + " |")
    return "\n".join(lines)


def plot_gate_regions(path):
    """The gate's argmax over the plane for the piecewise-3 problem, with the true regime
    boundaries, and the per-expert gate weight along one line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    X, y, regime = piecewise_linear()
    model = MixtureOfExpertsRegressor(n_experts=3, random_state=0).fit(X, y)
    grid = np.linspace(-3, 3, 300)
    xx, yy = np.meshgrid(grid, grid)
    plane = np.column_stack([xx.ravel(), yy.ravel()])
    # Expert numbering is arbitrary: colour each expert like the regime it mostly handles.
    confusion = np.zeros((3, 3))
    np.add.at(confusion, (model.gate_proba(X).argmax(axis=1), regime), 1)
    experts, regimes = linear_sum_assignment(-confusion)
    expert_for_regime = experts[np.argsort(regimes)]
    gate = model.gate_proba(plane)[:, expert_for_regime]
    fig, ax = plt.subplots(figsize=(5, 4.4), dpi=90)
    colors = np.array([[0.35, 0.55, 0.85], [0.9, 0.55, 0.3], [0.45, 0.75, 0.45]])
    shade = (gate @ colors).reshape(300, 300, 3)
    ax.imshow(shade, extent=(-3, 3, -3, 3), origin="lower", alpha=0.85)
    for angle in (np.pi / 3, np.pi, -np.pi / 3):
        ax.plot([0, 4.5 * np.cos(angle)], [0, 4.5 * np.sin(angle)], "k--", lw=1)
    sample = np.random.RandomState(1).choice(len(X), 250, replace=False)
    ax.scatter(
        X[sample, 0], X[sample, 1], c=colors[regime[sample]], edgecolors="k", linewidths=0.4, s=14
    )
    ax.set(
        xlim=(-3, 3),
        ylim=(-3, 3),
        xlabel="x1",
        ylabel="x2",
        title="Gate regions (shade = gate weights)\ndots: true regime; dashed: true borders",
    )
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    print(f"wrote {path}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="bench-results/classic.json")
    parser.add_argument("--plot", default=None, help="also write the gate-regions PNG here")
    parser.add_argument("--only", default=None, help="run only data sets containing this")
    args = parser.parse_args()

    warnings.filterwarnings("ignore", category=UserWarning)  # ConvergenceWarning and kin
    results = {}
    with threadpool_limits(limits=1):  # the baselines too: a fair, shared-machine setting
        for name, X, y, regime, n_experts in datasets():
            if args.only and args.only not in name:
                continue
            classification = name in ("breast_cancer", "wine", "digits")
            results[name] = {}
            for model_name, model in models(classification, n_experts).items():
                result = cross_validate(model, X, y, regime, classification)
                result["metric"] = "accuracy" if classification else "R²"
                results[name][model_name] = result
                print(
                    f"{name:26s} {model_name:18s} {result['score_mean']:.3f} ± "
                    f"{result['score_std']:.3f}  ARI {result['ari_mean']}  "
                    f"fit {result['fit_seconds_median']:.2f}s",
                    flush=True,
                )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print()
    print(format_table(results))
    print(f"\nwrote {out}")
    if args.plot:
        plot_gate_regions(args.plot)


if __name__ == "__main__":
    main()
