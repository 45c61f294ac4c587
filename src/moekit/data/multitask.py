"""Generated multi-task data: the MMoE paper's correlated regressions, and click/conversion-like
labels on user-item pairs. Nothing is downloaded; every draw comes from ``seed``.

``correlated_regressions`` (Ma et al. 2018, section 4.1): orthogonal unit vectors u1, u2
in R^d; w1 = c·u1, w2 = c·(p·u1 + √(1 − p²)·u2); x ~ N(0, I); for task i
y_i = w_iᵀx + Σ_{j=1}^{m} sin(α_j·w_iᵀx + β_j) + ε_i, ε_i ~ N(0, 0.01). The paper leaves
α and β as given constants; here they are drawn once from N(0, 1) (``shape_seed``). p sets how
related the tasks are (p = 1: the same function).

``clicks_and_conversions``: users and items with hidden taste vectors; a pair's features
are noisy views of both plus side features. A click follows the match between the user
and the item's appeal; a conversion follows another mix of the same taste vector and the
item's price sensitivity, so the tasks share part of their structure.

Shapes: N rows, d features, m sine terms.
"""

from __future__ import annotations

import numpy as np


def correlated_regressions(n_samples: int, correlation: float, *, d: int = 100, m: int = 10, c: float = 1.0,
                           noise_std: float = 0.1, seed: int = 0, shape_seed: int = 0
                           ) -> tuple[np.ndarray, list[np.ndarray]]:
    """X (N, d) float32 and the two tasks' targets (N,), with task correlation ``correlation``.
    ``shape_seed`` draws α and β (the paper's given constants: the same for every ``seed``);
    ``seed`` draws the task directions, the inputs and the noise."""
    if not -1.0 <= correlation <= 1.0:
        raise ValueError(f"correlation ({correlation}) must be in [-1, 1]")
    if d < 2:
        raise ValueError(f"d ({d}) must be >= 2: the two task directions are orthogonal")
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((d, 2)))
    u1, u2 = q[:, 0], q[:, 1]
    w1 = c * u1
    w2 = c * (correlation * u1 + np.sqrt(1.0 - correlation**2) * u2)
    shape = np.random.default_rng([shape_seed, 1])
    alpha, beta = shape.standard_normal(m), shape.standard_normal(m)
    x = rng.standard_normal((n_samples, d))
    targets = []
    for w in (w1, w2):
        z = x @ w
        y = z + np.sin(np.outer(z, alpha) + beta).sum(axis=1) + noise_std * rng.standard_normal(n_samples)
        targets.append(y.astype(np.float32))
    return x.astype(np.float32), targets


def clicks_and_conversions(n_samples: int, *, n_users: int = 2000, n_items: int = 400, taste_dim: int = 8,
                           side_features: int = 8, seed: int = 0) -> tuple[np.ndarray, list[np.ndarray]]:
    """Features of N user-item pairs (float32) and two 0/1 labels: click and conversion."""
    rng = np.random.default_rng(seed)
    user_taste = rng.standard_normal((n_users, taste_dim))
    item_appeal = rng.standard_normal((n_items, taste_dim))
    item_value = rng.standard_normal((n_items, taste_dim))  # what makes a purchase, partly shared with appeal
    item_value = 0.5 * item_appeal + np.sqrt(0.75) * item_value
    price = rng.standard_normal(n_items)
    users, items = rng.integers(0, n_users, n_samples), rng.integers(0, n_items, n_samples)
    u, a, v = user_taste[users], item_appeal[items], item_value[items]
    side = rng.standard_normal((n_samples, side_features))
    # What the model sees: noisy views of the hidden vectors, the price, and side features.
    features = np.concatenate([u + 0.3 * rng.standard_normal(u.shape), a + 0.3 * rng.standard_normal(a.shape),
                               v + 0.3 * rng.standard_normal(v.shape), price[items, None], side], axis=1)
    click_logit = (u * a).sum(1) / np.sqrt(taste_dim) * 2.0 - 1.0 + 0.5 * side[:, 0]
    conversion_logit = (u * v).sum(1) / np.sqrt(taste_dim) * 2.0 - 1.5 * price[items] - 2.0
    labels = [(rng.random(n_samples) < 1.0 / (1.0 + np.exp(-logit))).astype(np.float32)
              for logit in (click_logit, conversion_logit)]
    return features.astype(np.float32), labels
