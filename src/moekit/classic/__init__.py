"""Classic mixtures of experts for tabular data, as scikit-learn estimators.

from moekit.classic import MixtureOfExpertsRegressor
model = MixtureOfExpertsRegressor(n_experts=3, method="em", random_state=0).fit(X, y)
model.gate_proba(X)  # which expert handles which input
"""

from ._gates import MixtureGate
from ._mixture import MixtureOfExpertsClassifier, MixtureOfExpertsRegressor

__all__ = ["MixtureGate", "MixtureOfExpertsClassifier", "MixtureOfExpertsRegressor"]
