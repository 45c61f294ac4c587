"""The regime-switching series and its lagged features: regimes persist as ``stay`` says,
each regime follows its AR(1) formula, the features are the values they name, and the errors."""

from __future__ import annotations

import numpy as np
import pytest

from moekit.data.timeseries import REGIMES, lagged_features, regime_switching_series


def test_regimes_persist_and_each_follows_its_own_ar1_formula():
    series, regimes = regime_switching_series(30_000, stay=0.98, seed=0)
    switches = np.mean(regimes[1:] != regimes[:-1])
    assert 0.015 < switches < 0.025
    assert set(np.unique(regimes)) == set(range(len(REGIMES)))
    params = np.array(list(REGIMES.values()))
    for s, (mu, phi, sigma) in enumerate(params):
        t = np.flatnonzero((regimes[1:] == s) & (regimes[:-1] == s)) + 1
        residual = series[t] - (mu + phi * (series[t - 1] - mu))
        assert abs(residual.std() - sigma) < 0.05 * sigma and abs(residual.mean()) < 0.05


def test_lagged_features_are_the_values_they_name():
    series = np.arange(20.0)
    X, y = lagged_features(series, lags=3, window=4)
    assert X.shape == (16, 5) and y.tolist() == list(range(4, 20))
    assert X[0].tolist() == [3.0, 2.0, 1.0, np.mean([3, 2, 1, 0]), np.std([3, 2, 1, 0])]


def test_bad_settings_are_named():
    with pytest.raises(ValueError, match=r"stay \(1.0\) must be in \[0, 1\)"):
        regime_switching_series(10, stay=1.0)
    with pytest.raises(ValueError, match="needs more than 10 steps"):
        lagged_features(np.zeros(10), lags=5, window=10)
