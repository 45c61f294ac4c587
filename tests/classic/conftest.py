import pytest

from moekit.classic.datasets import make_piecewise_linear


def _piecewise_linear(n_samples, seed, noise=0.2):
    return make_piecewise_linear(n_samples, noise=noise, random_state=seed)


@pytest.fixture(scope="session")
def piecewise_linear():
    return _piecewise_linear


def pytest_collection_modifyitems(config, items):
    """Leave out scikit-learn's array-API input checks: the estimators compute with
    NumPy and torch and do not claim array-API support, so those checks do not apply
    (scikit-learn would only skip them)."""
    not_applicable = [item for item in items if "array_api" in item.nodeid]
    if not_applicable:
        config.hook.pytest_deselected(items=not_applicable)
        items[:] = [item for item in items if "array_api" not in item.nodeid]
