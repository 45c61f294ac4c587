"""A regime-switching series, and the lagged features a forecaster reads.

``regime_switching_series(n)`` draws hidden regimes from a sticky Markov chain (each step
keeps its regime with probability ``stay``) and, within each regime, an AR(1) process
with its own drift, persistence and volatility, as markets alternate calm, volatile and
trending spells:

    r_t = μ_s + φ_s·(r_{t−1} − μ_s) + σ_s·ε_t,   ε_t ~ N(0, 1),   s = s_t the regime.

``lagged_features(series, lags, window)`` gives, for every step t with a full history,
the last ``lags`` values, and the mean and standard deviation of the last ``window``
values (what a gate can tell the regimes by), with the target r_t.

Shapes: N steps, L lags.
"""

from __future__ import annotations

import numpy as np

# name: (drift μ, persistence φ, volatility σ)
REGIMES = {"calm": (0.0, 0.8, 0.2), "volatile": (0.0, -0.4, 1.0), "rally": (0.6, 0.3, 0.3)}


def regime_switching_series(n_steps: int, *, stay: float = 0.98, seed: int = 0
                            ) -> tuple[np.ndarray, np.ndarray]:
    """The series (N,) float64 and its regime ids (N,), indices into ``REGIMES``."""
    if isinstance(n_steps, bool) or not isinstance(n_steps, int) or n_steps < 2:
        raise ValueError(f"n_steps ({n_steps!r}) must be an integer >= 2")
    if not 0.0 <= stay < 1.0:
        raise ValueError(f"stay ({stay}) must be in [0, 1): the chance a step keeps its regime")
    rng = np.random.default_rng(seed)
    params = np.array(list(REGIMES.values()))
    regimes = np.empty(n_steps, dtype=np.int64)
    regimes[0] = rng.integers(len(REGIMES))
    for t in range(1, n_steps):
        switch = rng.random() >= stay
        regimes[t] = rng.choice([s for s in range(len(REGIMES)) if s != regimes[t - 1]]) if switch else regimes[t - 1]
    series = np.empty(n_steps)
    series[0] = params[regimes[0], 0]
    noise = rng.standard_normal(n_steps)
    for t in range(1, n_steps):
        mu, phi, sigma = params[regimes[t]]
        series[t] = mu + phi * (series[t - 1] - mu) + sigma * noise[t]
    return series, regimes


def lagged_features(series: np.ndarray, lags: int = 5, window: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """X (N − h, lags + 2): the last ``lags`` values (most recent first), then the mean and
    standard deviation of the last ``window``; y (N − h,): the value to forecast. h = max(lags, window)."""
    series = np.asarray(series, dtype=np.float64)
    if lags < 1 or window < 2:
        raise ValueError(f"lags ({lags}) must be >= 1 and window ({window}) >= 2")
    history = max(lags, window)
    if series.ndim != 1 or series.shape[0] <= history:
        raise ValueError(f"the series needs more than {history} steps (lags {lags}, window {window}); "
                         f"got shape {series.shape}")
    steps = np.arange(history, series.shape[0])
    lagged = np.stack([series[steps - k] for k in range(1, lags + 1)], axis=1)
    recent = np.stack([series[steps - k] for k in range(1, window + 1)], axis=1)
    X = np.concatenate([lagged, recent.mean(1, keepdims=True), recent.std(1, keepdims=True)], axis=1)
    return X, series[steps]
