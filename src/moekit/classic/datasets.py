"""Synthetic problems whose truth is a mixture of experts, for examples and tests."""

from __future__ import annotations

import numpy as np


def make_piecewise_linear(n_samples: int = 1000, *, noise: float = 0.3, random_state: int | None = 0):
    """Three regimes, each a sector of the plane with its own linear function.

    Returns X (n_samples, 2) uniform on [-3, 3]², y (n_samples,) and the true
    regime of each sample (n_samples,), so a fitted mixture's gate can be scored
    against it (e.g. with the adjusted Rand index).
    """
    rng = np.random.RandomState(random_state)
    X = rng.uniform(-3, 3, size=(n_samples, 2))
    directions = np.array([[1.0, 0.0], [-0.5, 0.87], [-0.5, -0.87]])
    regime = np.argmax(X @ directions.T, axis=1)
    slopes = np.array([[2.0, -1.0], [-1.5, 2.5], [0.5, 1.5]])
    intercepts = np.array([3.0, -2.0, 0.0])
    y = (X * slopes[regime]).sum(axis=1) + intercepts[regime] + noise * rng.randn(n_samples)
    return X, y, regime
