"""EM and the mixture likelihood checked against the formulas, in float64 on tiny inputs.

p(y|x) = Σ_e g_e(x)·P_e(y|x)        h_e = g_e·P_e / Σ_j g_j·P_j
M-step: expert e by weighted least squares with weights h_e,
        σ_e² = Σ_n h_ne·r_ne² / Σ_n h_ne, gate on soft targets h.
"""

import math

import numpy as np
import pytest
from sklearn.linear_model import LinearRegression
from sklearn.metrics import adjusted_rand_score

from moekit.classic import MixtureOfExpertsClassifier, MixtureOfExpertsRegressor
from moekit.classic._gates import LogisticGate, MixtureGate


def gaussian_pdf(y, mean, variance):
    return math.exp(-((y - mean) ** 2) / (2 * variance)) / math.sqrt(2 * math.pi * variance)


@pytest.fixture(scope="module")
def tiny_regression(piecewise_linear):
    X, y, _ = piecewise_linear(12, seed=1)
    model = MixtureOfExpertsRegressor(n_experts=2, n_init=1, max_iter=5, random_state=0)
    with pytest.warns(UserWarning, match="did not converge"):
        return X, y, model.fit(X, y)


def test_e_step_posteriors_match_hand_computation(tiny_regression):
    X, y, model = tiny_regression
    gate = model.gate_proba(X)
    means = np.stack([expert.predict(X) for expert in model.experts_], axis=1)
    expected = np.empty_like(gate)
    for n in range(len(y)):
        joint = [
            gate[n, e] * gaussian_pdf(y[n], means[n, e], model.noise_variance_[e]) for e in range(2)
        ]
        expected[n] = [j / sum(joint) for j in joint]
    np.testing.assert_allclose(model.responsibilities(X, y), expected, rtol=1e-10, atol=1e-14)


def test_mixture_log_likelihood_matches_hand_computation(tiny_regression):
    X, y, model = tiny_regression
    gate = model.gate_proba(X)
    means = np.stack([expert.predict(X) for expert in model.experts_], axis=1)
    expected = [
        math.log(
            sum(
                gate[n, e] * gaussian_pdf(y[n], means[n, e], model.noise_variance_[e])
                for e in range(2)
            )
        )
        for n in range(len(y))
    ]
    np.testing.assert_allclose(model.sample_log_likelihood(X, y), expected, rtol=1e-10)
    # The recorded history ends at the returned parameters.
    assert model.log_likelihood_[-1] == pytest.approx(np.mean(expected), rel=1e-12)


def test_m_step_experts_are_weighted_least_squares_and_variance_formula(piecewise_linear):
    X, y, _ = piecewise_linear(10, seed=2)
    weights = np.random.RandomState(3).dirichlet([1.0, 1.0], size=10)
    model = MixtureOfExpertsRegressor(n_experts=2)
    model._encode_targets(y)
    experts = [LinearRegression(), LinearRegression()]
    variance = model._fit_experts(experts, X, y, weights)
    A = np.hstack([X, np.ones((10, 1))])
    for e in range(2):
        # Normal equations of Σ_n h_n (y_n − a·x_n − b)², solved directly.
        coef = np.linalg.solve(A.T @ (weights[:, e, None] * A), A.T @ (weights[:, e] * y))
        np.testing.assert_allclose(experts[e].coef_, coef[:2], rtol=1e-9)
        np.testing.assert_allclose(experts[e].intercept_, coef[2], rtol=1e-9, atol=1e-12)
        residual = y - A @ coef
        expected_variance = (weights[:, e] * residual**2).sum() / weights[:, e].sum()
        assert variance[e] == pytest.approx(expected_variance, rel=1e-9)


def test_m_step_gate_solves_the_soft_target_problem():
    rng = np.random.RandomState(4)
    X = rng.randn(15, 2)
    targets = rng.dirichlet([1.0, 1.0, 1.0], size=15)
    alpha = 0.1
    gate = LogisticGate(2, 3, alpha).fit(X, targets)
    g = np.exp(gate.log_proba(X))
    # Stationarity of -(1/N) Σ t·log g + α/2‖W‖²: Xᵀ(g − t)/N + αW = 0 and Σ_n (g − t) = 0.
    np.testing.assert_allclose(X.T @ (g - targets) / 15 + alpha * gate.weight_DE, 0, atol=1e-6)
    np.testing.assert_allclose((g - targets).sum(axis=0), 0, atol=1e-5)


def test_hierarchical_gate_is_product_of_root_and_branch():
    X = np.random.RandomState(5).randn(8, 2)
    gate = MixtureGate(
        X,
        n_experts=4,
        feature_indices=np.arange(2),
        kind="logistic",
        alpha=0.0,
        hidden=[],
        n_branches=2,
        seed=0,
    )
    gate.fit_soft_targets(X, np.random.RandomState(6).dirichlet(np.ones(4), size=8))
    Xg = gate.gate_inputs(X)
    root = np.exp(gate.root.log_proba(Xg))
    expected = np.hstack([root[:, [b]] * np.exp(gate.branches[b].log_proba(Xg)) for b in range(2)])
    np.testing.assert_allclose(gate.predict_proba(X), expected, rtol=1e-12)
    np.testing.assert_allclose(gate.predict_proba(X).sum(axis=1), 1.0, rtol=1e-12)


@pytest.mark.parametrize("n_branches", [None, 2])
def test_em_log_likelihood_never_decreases(n_branches, piecewise_linear):
    X, y, _ = piecewise_linear(150, seed=7)
    # gate_alpha=0 and linear experts: every M-step maximises its part of the expected
    # log-likelihood, so EM's guarantee is exact.
    model = MixtureOfExpertsRegressor(
        n_experts=4,
        n_branches=n_branches,
        gate_alpha=0.0,
        init="random",
        n_init=1,
        max_iter=30,
        tol=0.0,
        random_state=0,
    )
    with pytest.warns(UserWarning, match="did not converge"):
        model.fit(X, y)
    history = model.log_likelihood_
    assert len(history) == 30 == model.n_iter_
    assert np.all(np.diff(history) >= -1e-10), np.diff(history).min()
    assert history[-1] > history[0] + 0.5


def test_gradient_method_log_likelihood_never_decreases(piecewise_linear):
    X, y, _ = piecewise_linear(150, seed=8)
    model = MixtureOfExpertsRegressor(
        n_experts=3, method="gradient", gate_alpha=0.0, n_init=1, max_iter=40, random_state=0
    ).fit(X, y)
    assert np.all(np.diff(model.log_likelihood_) >= -1e-10)
    # The torch-trained experts are written back into the scikit-learn experts.
    gate = model.gate_proba(X)
    manual = sum(
        gate[:, e] * (X @ model.experts_[e].coef_ + model.experts_[e].intercept_) for e in range(3)
    )
    np.testing.assert_allclose(model.predict(X), manual, rtol=1e-10)


def test_classifier_posteriors_and_probabilities_match_hand_computation():
    rng = np.random.RandomState(9)
    X = rng.randn(30, 2)
    y = np.where(X[:, 0] * X[:, 1] > 0, "yes", "no")
    model = MixtureOfExpertsClassifier(n_experts=2, n_init=1, max_iter=10, random_state=0).fit(X, y)
    gate = model.gate_proba(X)
    proba = np.stack([expert.predict_proba(X) for expert in model.experts_], axis=1)
    np.testing.assert_allclose(
        model.predict_proba(X), np.einsum("ne,nek->nk", gate, proba), rtol=1e-12
    )
    observed = proba[np.arange(30), :, np.searchsorted(model.classes_, y)]
    np.testing.assert_allclose(
        model.responsibilities(X, y),
        gate * observed / (gate * observed).sum(axis=1, keepdims=True),
        rtol=1e-10,
    )
    np.testing.assert_array_equal(
        model.predict(X), model.classes_[model.predict_proba(X).argmax(axis=1)]
    )


def test_em_recovers_the_regimes_of_a_piecewise_linear_problem(piecewise_linear):
    X, y, regime = piecewise_linear(600, seed=10)
    X_test, y_test, regime_test = piecewise_linear(300, seed=11)
    model = MixtureOfExpertsRegressor(n_experts=3, random_state=0).fit(X, y)
    assert adjusted_rand_score(regime_test, model.gate_proba(X_test).argmax(axis=1)) >= 0.9
    single = LinearRegression().fit(X, y).score(X_test, y_test)
    assert model.score(X_test, y_test) > 0.95 > single + 0.2


def test_more_restarts_never_lower_the_kept_log_likelihood(piecewise_linear):
    X, y, _ = piecewise_linear(120, seed=12)
    one = MixtureOfExpertsRegressor(n_experts=3, init="random", n_init=1, random_state=3)
    three = MixtureOfExpertsRegressor(n_experts=3, init="random", n_init=3, random_state=3)
    assert three.fit(X, y).log_likelihood_[-1] >= one.fit(X, y).log_likelihood_[-1]
