"""scikit-learn's own estimator checks, on small settings so that they stay fast."""

from sklearn.utils.estimator_checks import parametrize_with_checks

from moekit.classic import MixtureOfExpertsClassifier, MixtureOfExpertsRegressor

ESTIMATORS = [
    MixtureOfExpertsRegressor(n_experts=2, n_init=1, max_iter=20, random_state=0),
    MixtureOfExpertsClassifier(n_experts=2, n_init=1, max_iter=20, random_state=0),
    MixtureOfExpertsClassifier(n_experts=2, method="gradient", n_init=1, max_iter=20,
                               random_state=0),
]


@parametrize_with_checks(ESTIMATORS)
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)
