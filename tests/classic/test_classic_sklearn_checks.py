"""scikit-learn's own estimator checks, on small settings so that they stay fast."""

import pytest
from sklearn.utils.estimator_checks import parametrize_with_checks

from moekit.classic import MixtureOfExpertsClassifier, MixtureOfExpertsRegressor

ESTIMATORS = [
    MixtureOfExpertsRegressor(n_experts=2, n_init=1, max_iter=20, random_state=0),
    MixtureOfExpertsClassifier(n_experts=2, n_init=1, max_iter=20, random_state=0),
    MixtureOfExpertsClassifier(
        n_experts=2, method="gradient", n_init=1, max_iter=20, random_state=0
    ),
]


# max_iter=20 keeps the checks fast; not converging on their toy data is expected.
@pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")
@parametrize_with_checks(ESTIMATORS)
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)
