"""Estimator behaviour: experts, gates, methods, scikit-learn tooling and bad input."""

import pickle
import warnings

import numpy as np
import pytest
from sklearn.base import clone
from sklearn.linear_model import LinearRegression
from sklearn.model_selection import GridSearchCV
from sklearn.neighbors import KNeighborsRegressor
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler
from sklearn.tree import DecisionTreeClassifier, DecisionTreeRegressor

from moekit.classic import MixtureOfExpertsClassifier, MixtureOfExpertsRegressor


@pytest.fixture(autouse=True)
def _quiet_convergence():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*did not converge")
        yield


@pytest.fixture(scope="module")
def data(piecewise_linear):
    return piecewise_linear(200, seed=0)


def test_expert_outputs_are_each_experts_predictions(data):
    X, y, _ = data
    model = MixtureOfExpertsRegressor(n_experts=3, n_init=1, random_state=0).fit(X, y)
    prediction, outputs = model.predict(X, return_expert_outputs=True)
    for e, expert in enumerate(model.experts_):
        np.testing.assert_allclose(outputs[:, e], expert.predict(X))
    np.testing.assert_allclose(prediction, (model.gate_proba(X) * outputs).sum(axis=1))
    np.testing.assert_allclose(model.gate_proba(X).sum(axis=1), 1.0)


def test_one_estimator_per_expert_and_user_objects_left_unfitted(data):
    X, y, _ = data
    tree, linear = DecisionTreeRegressor(max_depth=3, random_state=0), LinearRegression()
    model = MixtureOfExpertsRegressor(
        n_experts=2, experts=[tree, linear], n_init=1, random_state=0
    ).fit(X, y)
    assert [type(e) for e in model.experts_] == [DecisionTreeRegressor, LinearRegression]
    assert not hasattr(tree, "tree_") and not hasattr(linear, "coef_")
    assert np.isfinite(model.log_likelihood_).all()


def test_tree_prototype_experts_fit_with_em(data):
    X, y, _ = data
    model = MixtureOfExpertsRegressor(
        n_experts=3, experts=DecisionTreeRegressor(max_depth=4), n_init=1, random_state=0
    ).fit(X, y)
    assert len({id(e) for e in model.experts_}) == 3
    assert model.score(X, y) > 0.9


def test_classifier_with_tree_experts_and_string_labels():
    rng = np.random.RandomState(1)
    X = rng.randn(120, 2)
    y = np.where(X[:, 0] > 0, np.where(X[:, 1] > 0, "a", "b"), "c")
    model = MixtureOfExpertsClassifier(
        n_experts=2, experts=DecisionTreeClassifier(max_depth=2), n_init=1, random_state=0
    ).fit(X, y)
    assert set(model.predict(X)) <= {"a", "b", "c"}
    assert model.score(X, y) > 0.95
    np.testing.assert_allclose(model.predict_proba(X).sum(axis=1), 1.0)


def test_two_stage_fits_each_expert_on_its_group(data):
    X, y, regime = data
    model = MixtureOfExpertsRegressor(
        n_experts=3, method="two_stage", n_init=1, random_state=0
    ).fit(X, y, groups=regime)
    for e in range(3):
        own = LinearRegression().fit(X[regime == e], y[regime == e])
        np.testing.assert_allclose(model.experts_[e].coef_, own.coef_)
        residual = y[regime == e] - own.predict(X[regime == e])
        assert model.noise_variance_[e] == pytest.approx(np.mean(residual**2))
    # The gate learns the true regions from the given grouping.
    assert np.mean(model.gate_proba(X).argmax(axis=1) == regime) > 0.9
    assert model.n_iter_ == 1


def test_two_stage_part_with_a_single_class_gets_a_constant_expert():
    X = np.array([[0.0], [0.1], [0.2], [1.0], [1.1], [1.2]])
    y = np.array([0, 0, 0, 0, 1, 1])
    model = MixtureOfExpertsClassifier(
        n_experts=2, method="two_stage", n_init=1, random_state=0
    ).fit(X, y, groups=[0, 0, 0, 1, 1, 1])
    proba = model.predict(X[:3], return_expert_outputs=True)[1]
    np.testing.assert_allclose(proba[:, 0], [[1.0, 0.0]] * 3)


def test_gate_features_restrict_what_the_gate_sees(data):
    X, y, _ = data
    X3 = np.hstack([X, np.random.RandomState(2).randn(len(X), 1)])
    model = MixtureOfExpertsRegressor(n_experts=3, gate_features=[0], n_init=1, random_state=0).fit(
        X3, y
    )
    changed = X3.copy()
    changed[:, 1:] = 0.0
    np.testing.assert_array_equal(model.gate_proba(changed), model.gate_proba(X3))
    assert not np.allclose(model.gate_proba(X3[::-1]), model.gate_proba(X3))


def test_mlp_gate_and_hierarchical_mixture_fit_the_regimes(data):
    X, y, _ = data
    single = LinearRegression().fit(X, y).score(X, y)
    for params in ({"gate": "mlp"}, {"n_experts": 4, "n_branches": 2}):
        model = MixtureOfExpertsRegressor(
            **{"n_experts": 3, "n_init": 1, "random_state": 0, **params}
        ).fit(X, y)
        assert model.score(X, y) > single + 0.2, params


def test_random_state_makes_fit_reproducible(data):
    X, y, _ = data
    a = MixtureOfExpertsRegressor(n_experts=3, init="random", random_state=5).fit(X, y)
    b = MixtureOfExpertsRegressor(n_experts=3, init="random", random_state=5).fit(X, y)
    np.testing.assert_array_equal(a.predict(X), b.predict(X))


def test_pickle_and_clone(data):
    X, y, _ = data
    model = MixtureOfExpertsRegressor(
        n_experts=3, method="gradient", gate="mlp", n_init=1, random_state=0
    ).fit(X, y)
    restored = pickle.loads(pickle.dumps(model))
    np.testing.assert_array_equal(restored.predict(X), model.predict(X))
    np.testing.assert_array_equal(restored.gate_proba(X), model.gate_proba(X))
    fresh = clone(model)
    assert fresh.get_params() == model.get_params() and not hasattr(fresh, "gate_")


def test_grid_search_over_a_pipeline_picks_three_experts(data):
    X, y, _ = data
    pipeline = make_pipeline(
        StandardScaler(), MixtureOfExpertsRegressor(n_init=1, max_iter=30, random_state=0)
    )
    search = GridSearchCV(pipeline, {"mixtureofexpertsregressor__n_experts": [1, 3]}, cv=3)
    search.fit(X, y)
    assert search.best_params_ == {"mixtureofexpertsregressor__n_experts": 3}


@pytest.mark.parametrize(
    ("model", "X", "y", "message"),
    [
        (MixtureOfExpertsRegressor(), [[np.nan, 1.0]] * 5, [1.0] * 5, "Input X contains NaN"),
        (
            MixtureOfExpertsRegressor(),
            [[0.0, 1.0]] * 5,
            [1, 2, 3, 4, np.inf],
            "Input y contains infinity",
        ),
        (
            MixtureOfExpertsRegressor(n_experts=4),
            [[0.0], [1.0], [2.0]],
            [1.0, 2.0, 3.0],
            r"n_samples=3 is fewer than n_experts=4",
        ),
        (
            MixtureOfExpertsRegressor(experts=KNeighborsRegressor()),
            [[0.0], [1], [2], [3]],
            [1.0, 2, 3, 4],
            "KNeighborsRegressor.fit does not accept sample_weight",
        ),
        (MixtureOfExpertsClassifier(), [[0.0], [1.0], [2.0]], ["a", "a", "a"], "y has one class"),
        (
            MixtureOfExpertsRegressor(method="gradient", experts=DecisionTreeRegressor()),
            [[0.0], [1], [2], [3]],
            [1.0, 2, 3, 4],
            "method='gradient' trains linear experts",
        ),
        (
            MixtureOfExpertsRegressor(n_experts=4, n_branches=3),
            [[0.0]] * 8,
            [1.0] * 8,
            "n_branches must be",
        ),
        (
            MixtureOfExpertsRegressor(gate_features=[5]),
            [[0.0, 1.0]] * 5,
            [1.0] * 5,
            "gate_features",
        ),
        (
            MixtureOfExpertsRegressor(n_experts=2, experts=[LinearRegression()]),
            [[0.0]] * 5,
            [1.0] * 5,
            "experts is a list of 1 estimators but n_experts=2",
        ),
        (
            MixtureOfExpertsRegressor(method="newton"),
            [[0.0]] * 5,
            [1.0] * 5,
            "method must be one of",
        ),
    ],
)
def test_bad_input_raises_a_clear_error(model, X, y, message):
    with pytest.raises(ValueError, match=message):
        model.fit(X, y)


def test_bad_groups_raise_a_clear_error(data):
    X, y, _ = data
    model = MixtureOfExpertsRegressor(n_experts=3, method="two_stage")
    with pytest.raises(ValueError, match="groups has 2 distinct values but n_experts=3"):
        model.fit(X, y, groups=np.arange(len(y)) % 2)
    with pytest.raises(ValueError, match="groups is only used by method='two_stage'"):
        model.set_params(method="em").fit(X, y, groups=np.arange(len(y)) % 3)


def test_responsibilities_reject_unseen_labels():
    X = np.random.RandomState(3).randn(20, 2)
    y = (X[:, 0] > 0).astype(int)
    model = MixtureOfExpertsClassifier(n_experts=2, n_init=1, random_state=0).fit(X, y)
    with pytest.raises(ValueError, match="labels not seen in fit"):
        model.responsibilities(X, np.full(20, 7))


def test_gradient_refuses_features_that_overflow_it_and_em_stays_finite():
    rng = np.random.RandomState(0)
    X = rng.randn(120, 3) * 1e200
    y = X[:, 0] / 1e200 + rng.randn(120) * 0.1
    with pytest.raises(ValueError, match=r"method='gradient' optimises in float64.*StandardScaler"):
        MixtureOfExpertsRegressor(n_experts=2, method="gradient", random_state=0).fit(X, y)
    model = MixtureOfExpertsRegressor(n_experts=2, method="em", max_iter=20, random_state=0).fit(X, y)
    assert np.isfinite(model.predict(X)).all()
