"""Classic mixtures of experts as scikit-learn estimators (Jacobs, Jordan, Nowlan & Hinton
1991; Jordan & Jacobs 1994).

    p(y | x) = Σ_e g_e(x) · P_e(y | x)

g is a softmax gate on the inputs (`_gates.py`); P_e is expert e's likelihood: a Gaussian
N(y; f_e(x), σ_e²) with its own noise variance for regression, the expert's class
probability for classification. Any scikit-learn estimator can be an expert.

Training methods:
- "em": E-step posteriors h_e = g_e·P_e / Σ_j g_j·P_j; M-step refits each expert with
  sample_weight h_e, σ_e² = Σ h_e·r² / Σ h_e, and the gate on the soft targets h.
  The log-likelihood never decreases (exactly so for linear experts and gate_alpha=0;
  with gate_alpha > 0 the penalised log-likelihood is the monotone quantity).
- "two_stage": partition the inputs (k-means, or the `groups` passed to fit), fit each
  expert on its part, then fit the gate on the loss of the combined output with the
  experts frozen.
- "gradient": gate and linear/logistic experts trained together in torch by L-BFGS on
  the mixture negative log-likelihood.

Shape letters: N samples, F input features, E experts, K classes.
"""

from __future__ import annotations

import contextlib
import numbers
import warnings

import numpy as np
import torch
from scipy.special import logsumexp
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin, clone
from sklearn.cluster import KMeans
from sklearn.dummy import DummyClassifier
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LinearRegression, LogisticRegression
from sklearn.utils import check_random_state
from sklearn.utils.multiclass import check_classification_targets
from sklearn.utils.validation import check_is_fitted, has_fit_parameter, validate_data
from threadpoolctl import threadpool_limits
from tqdm.auto import tqdm

from ._gates import MixtureGate, minimize_torch

_METHODS = ("em", "two_stage", "gradient")
# Beyond this, squares and products of features overflow float64 in the gradient method's
# likelihood and penalties (1e150 trains, 1e200 gave NaN predictions).
_GRADIENT_MAX_ABS_FEATURE = 1e150
_GATES = ("logistic", "mlp")
_INITS = ("kmeans", "random")
# Experts that put probability 0 on the observed class (trees) would make log P = -inf and
# every posterior undefined; the floor keeps such an expert merely very unlikely.
_PROBA_FLOOR = 1e-12
# Keeps each expert's total sample weight positive, which some estimators require.
_WEIGHT_FLOOR = 1e-12
_GRADIENT_TOL_WINDOW = 10


@contextlib.contextmanager
def _one_thread():
    """Run BLAS, OpenMP and torch on one thread, restoring the settings afterwards.

    EM makes thousands of small calls (a gate fit, an expert fit, a few matrix products
    per iteration); on a busy machine, worker threads that spin waiting for cores made
    those calls 20-40x slower than one thread, and tabular problems gain nothing from them.
    """
    torch_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with threadpool_limits(limits=1):
            yield
    finally:
        torch.set_num_threads(torch_threads)


class _MixtureOfExpertsBase(BaseEstimator):
    """Shared fitting machinery; the subclasses supply the expert likelihood."""

    # ---- the parts that differ between regression and classification -------------------
    def _default_expert(self):
        raise NotImplementedError

    def _encode_targets(self, y):
        raise NotImplementedError

    def _expert_outputs(self, experts, X):
        raise NotImplementedError

    def _log_expert_likelihood(self, outputs, y_enc, noise_var_E):
        raise NotImplementedError

    def _fit_experts(self, experts, X, y_enc, weights_NE):
        """Fit expert e with sample weights weights_NE[:, e]; return the noise variances
        (regression) or None."""
        raise NotImplementedError

    # ---- validation ----------------------------------------------------------------------
    def _check_params(self, n_samples, n_features):
        E = self.n_experts
        if not isinstance(E, numbers.Integral) or isinstance(E, bool) or E < 1:
            raise ValueError(f"n_experts must be a positive integer, got {E!r}")
        if n_samples < E:
            raise ValueError(
                f"n_samples={n_samples} is fewer than n_experts={E}; "
                "each expert needs at least one sample"
            )
        if self.method not in _METHODS:
            raise ValueError(f"method must be one of {_METHODS}, got {self.method!r}")
        if self.gate not in _GATES:
            raise ValueError(f"gate must be one of {_GATES}, got {self.gate!r}")
        if self.init not in _INITS:
            raise ValueError(f"init must be one of {_INITS}, got {self.init!r}")
        for name in ("n_init", "max_iter"):
            value = getattr(self, name)
            if not isinstance(value, numbers.Integral) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not (isinstance(self.tol, numbers.Real) and self.tol >= 0):
            raise ValueError(f"tol must be a non-negative number, got {self.tol!r}")
        if not (isinstance(self.gate_alpha, numbers.Real) and self.gate_alpha >= 0):
            raise ValueError(f"gate_alpha must be a non-negative number, got {self.gate_alpha!r}")
        B = self.n_branches
        if B is not None:
            if not isinstance(B, numbers.Integral) or B < 2 or E % B != 0 or E // B < 2:
                raise ValueError(
                    f"n_branches must be None or an integer >= 2 that divides n_experts ({E}) "
                    f"into branches of at least 2 experts, got {B!r}"
                )
        hidden = self.gate_hidden_layer_sizes
        if self.gate == "mlp" and (
            not all(isinstance(h, numbers.Integral) and h > 0 for h in np.atleast_1d(hidden))
        ):
            raise ValueError(f"gate_hidden_layer_sizes must be positive integers, got {hidden!r}")
        return self._gate_feature_indices(n_features)

    def _gate_feature_indices(self, n_features):
        if self.gate_features is None:
            return np.arange(n_features)
        features = np.asarray(self.gate_features)
        if features.dtype == bool:
            if features.shape != (n_features,):
                raise ValueError(
                    f"gate_features as a boolean mask must have length n_features "
                    f"({n_features}), got shape {features.shape}"
                )
            features = np.flatnonzero(features)
        if features.ndim != 1 or features.size == 0 or features.dtype.kind not in "iu":
            raise ValueError(
                f"gate_features must be a non-empty list of column indices or a boolean "
                f"mask, got {self.gate_features!r}"
            )
        if features.min() < -n_features or features.max() >= n_features:
            raise ValueError(
                f"gate_features {self.gate_features!r} index columns outside the "
                f"{n_features} input features"
            )
        return np.unique(features % n_features)

    def _expert_prototypes(self):
        E = self.n_experts
        if self.experts is None:
            prototypes = [self._default_expert() for _ in range(E)]
        elif isinstance(self.experts, list | tuple):
            if len(self.experts) != E:
                raise ValueError(
                    f"experts is a list of {len(self.experts)} estimators but "
                    f"n_experts={E}; give one estimator per expert or a single prototype"
                )
            prototypes = [clone(expert) for expert in self.experts]
        else:
            prototypes = [clone(self.experts) for _ in range(E)]
        for e, expert in enumerate(prototypes):
            if not hasattr(expert, "fit"):
                raise ValueError(f"experts[{e}] ({expert!r}) is not an estimator: it has no fit")
            if self.method == "em" and not has_fit_parameter(expert, "sample_weight"):
                raise ValueError(
                    f"method='em' fits experts with sample_weight=responsibilities, but "
                    f"{type(expert).__name__}.fit does not accept sample_weight; use an "
                    "expert that does, or method='two_stage'"
                )
        if self.method == "gradient":
            self._check_differentiable(prototypes)
        return prototypes

    def _check_differentiable(self, prototypes):
        raise NotImplementedError

    # ---- fit -----------------------------------------------------------------------------
    def fit(self, X, y, groups=None):
        """Fit the mixture.

        groups : array of shape (n_samples,), optional
            Only for method="two_stage": the part each sample belongs to (n_experts
            distinct values), used instead of k-means.
        """
        X, y = validate_data(self, X, y, y_numeric=isinstance(self, RegressorMixin))
        X = np.asarray(X, dtype=np.float64)
        if self.method == "gradient" and X.size and np.abs(X).max() > _GRADIENT_MAX_ABS_FEATURE:
            raise ValueError(
                f"method='gradient' optimises in float64, where features as large as {np.abs(X).max():.3g} "
                f"overflow its products (|x| must stay below {_GRADIENT_MAX_ABS_FEATURE:.0e}); scale X "
                "(sklearn.preprocessing.StandardScaler) or use method='em' or 'two_stage'"
            )
        y_enc = self._encode_targets(y)
        feature_indices = self._check_params(*X.shape)
        prototypes = self._expert_prototypes()
        parts = self._check_groups(groups, X.shape[0])
        rng = check_random_state(self.random_state)

        run = {
            "em": self._run_em,
            "two_stage": self._run_two_stage,
            "gradient": self._run_gradient,
        }[self.method]
        best = None
        with (
            _one_thread(),
            tqdm(
                total=self.n_init * self.max_iter,
                disable=not self.verbose,
                desc=f"{type(self).__name__} ({self.method})",
            ) as progress,
        ):
            for _ in range(self.n_init):
                seed = int(rng.randint(np.iinfo(np.int32).max))
                gate = MixtureGate(
                    X,
                    n_experts=self.n_experts,
                    feature_indices=feature_indices,
                    kind=self.gate,
                    alpha=float(self.gate_alpha),
                    hidden=np.atleast_1d(self.gate_hidden_layer_sizes).tolist(),
                    n_branches=self.n_branches,
                    seed=seed,
                )
                result = run(X, y_enc, prototypes, gate, parts, seed, progress)
                if best is None or result["log_likelihood"][-1] > best["log_likelihood"][-1]:
                    best = result

        self.experts_ = best["experts"]
        self.gate_ = best["gate"]
        self.log_likelihood_ = np.asarray(best["log_likelihood"])
        self.n_iter_ = len(best["log_likelihood"])
        self.converged_ = best["converged"]
        if best["noise_var"] is not None:
            self.noise_variance_ = best["noise_var"]
        if self.method != "two_stage" and not self.converged_:
            warnings.warn(
                f"{self.method} did not converge in max_iter={self.max_iter} iterations "
                f"(tol={self.tol}); increase max_iter or tol",
                ConvergenceWarning,
                stacklevel=2,
            )
        return self

    def _check_groups(self, groups, n_samples):
        if groups is None:
            return None
        if self.method != "two_stage":
            raise ValueError(f"groups is only used by method='two_stage', not {self.method!r}")
        groups = np.asarray(groups)
        if groups.shape != (n_samples,):
            raise ValueError(f"groups must have shape ({n_samples},) like y, got {groups.shape}")
        values, parts = np.unique(groups, return_inverse=True)
        if len(values) != self.n_experts:
            raise ValueError(
                f"groups has {len(values)} distinct values but n_experts={self.n_experts}; "
                "two_stage fits one expert per group"
            )
        return parts

    def _log_joint(self, gate, experts, noise_var, X, y_enc):
        """log g_e(x_n) + log P_e(y_n | x_n), shape (N, E)."""
        outputs = self._expert_outputs(experts, X)
        return gate.log_proba(X) + self._log_expert_likelihood(outputs, y_enc, noise_var)

    def _initial_responsibilities(self, X, y_enc, rng):
        N, E = X.shape[0], self.n_experts
        if self.init == "random":
            return rng.dirichlet(np.ones(E), size=N)
        # k-means on the standardised inputs and (for regression) the target: regimes
        # differ in where they live and in what they predict.
        features = [X]
        if isinstance(self, RegressorMixin):
            features.append(y_enc[:, None])
        Z = np.hstack(features)
        scale = Z.std(axis=0)
        Z = (Z - Z.mean(axis=0)) / np.where(scale > 0, scale, 1.0)
        labels = self._kmeans(Z, rng)
        # Soft rather than one-hot, so that the first gate fit stays finite.
        return 0.8 * np.eye(E)[labels] + 0.2 / E

    def _kmeans(self, Z, rng):
        n_distinct = len(np.unique(Z, axis=0))
        if n_distinct < self.n_experts:
            # k-means cannot make more clusters than distinct points.
            return rng.permutation(np.arange(Z.shape[0]) % self.n_experts)
        kmeans = KMeans(self.n_experts, n_init=1, random_state=rng.randint(2**31 - 1))
        return kmeans.fit_predict(Z)

    def _run_em(self, X, y_enc, prototypes, gate, parts, seed, progress):
        rng = np.random.RandomState(seed)
        responsibilities_NE = self._initial_responsibilities(X, y_enc, rng)
        experts = [clone(p) for p in prototypes]
        history, converged = [], False
        for _ in range(self.max_iter):
            # M-step: experts on weighted data, gate on soft targets.
            noise_var = self._fit_experts(experts, X, y_enc, responsibilities_NE)
            gate.fit_soft_targets(X, responsibilities_NE)
            log_joint_NE = self._log_joint(gate, experts, noise_var, X, y_enc)
            log_lik_N = logsumexp(log_joint_NE, axis=1)
            history.append(float(log_lik_N.mean()))
            progress.update(1)
            if len(history) > 1 and abs(history[-1] - history[-2]) <= self.tol:
                converged = True
                break
            # E-step: h_e = g_e·P_e / Σ_j g_j·P_j.
            responsibilities_NE = np.exp(log_joint_NE - log_lik_N[:, None])
        return {
            "experts": experts,
            "gate": gate,
            "noise_var": noise_var,
            "log_likelihood": history,
            "converged": converged,
        }

    def _run_two_stage(self, X, y_enc, prototypes, gate, parts, seed, progress):
        rng = np.random.RandomState(seed)
        if parts is None:
            # The gate will see only the inputs, so the partition is of the inputs too.
            scale = X.std(axis=0)
            parts = self._kmeans((X - X.mean(axis=0)) / np.where(scale > 0, scale, 1.0), rng)
        E = self.n_experts
        experts = [clone(p) for p in prototypes]
        one_hot_NE = np.eye(E)[parts]
        for e in range(E):
            in_part = parts == e
            experts[e] = self._fit_on_part(experts[e], X[in_part], y_enc[in_part])
        noise_var = self._part_noise_variance(experts, X, y_enc, one_hot_NE)
        # Gate: start from the partition, then minimise the combined output's loss with
        # the experts' outputs frozen.
        gate.fit_soft_targets(X, 0.8 * one_hot_NE + 0.2 / E)
        outputs = torch.tensor(self._expert_outputs(experts, X))
        target = torch.tensor(y_enc)
        X_t = torch.tensor(X)
        modules = gate.torch_modules()

        def objective():
            gate_NE = torch.exp(gate.torch_log_proba(modules, X_t))
            return self._combined_output_loss(gate_NE, outputs, target) + gate.torch_penalty(
                modules
            )

        minimize_torch([p for m in modules for p in m.parameters()], objective, self.max_iter)
        gate.load_torch(modules)
        log_lik = logsumexp(self._log_joint(gate, experts, noise_var, X, y_enc), axis=1).mean()
        progress.update(self.max_iter)
        return {
            "experts": experts,
            "gate": gate,
            "noise_var": noise_var,
            "log_likelihood": [float(log_lik)],
            "converged": True,
        }

    def _run_gradient(self, X, y_enc, prototypes, gate, parts, seed, progress):
        rng = np.random.RandomState(seed)
        # Start from one EM M-step on the initial partition: far better than random.
        responsibilities_NE = self._initial_responsibilities(X, y_enc, rng)
        experts = [clone(p) for p in prototypes]
        noise_var = self._fit_experts(experts, X, y_enc, responsibilities_NE)
        gate.fit_soft_targets(X, responsibilities_NE)

        X_t, y_t = torch.tensor(X), torch.tensor(y_enc)
        gate_modules = gate.torch_modules()
        expert_params = self._experts_to_torch(experts, noise_var)
        params = [p for m in gate_modules for p in m.parameters()] + list(expert_params.values())
        optimizer = torch.optim.LBFGS(
            params, lr=1.0, max_iter=1, history_size=20, line_search_fn="strong_wolfe"
        )

        def mean_log_likelihood():
            log_joint = gate.torch_log_proba(gate_modules, X_t) + self._torch_log_expert_likelihood(
                expert_params, X_t, y_t
            )
            return torch.logsumexp(log_joint, dim=1).mean()

        def closure():
            optimizer.zero_grad()
            loss = (
                -mean_log_likelihood()
                + gate.torch_penalty(gate_modules)
                + self._torch_expert_penalty(expert_params, X.shape[0])
            )
            loss.backward()
            return loss

        history, converged = [], False
        for _ in range(self.max_iter):
            optimizer.step(closure)
            with torch.no_grad():
                history.append(float(mean_log_likelihood()))
            progress.update(1)
            # One L-BFGS step can change little while far from the optimum, so the
            # change is measured over a window of steps.
            window = _GRADIENT_TOL_WINDOW
            if len(history) > window and abs(history[-1] - history[-1 - window]) <= self.tol:
                converged = True
                break
        gate.load_torch(gate_modules)
        noise_var = self._experts_from_torch(experts, expert_params)
        return {
            "experts": experts,
            "gate": gate,
            "noise_var": noise_var,
            "log_likelihood": history,
            "converged": converged,
        }

    # ---- inspection ----------------------------------------------------------------------
    def _validated(self, X):
        check_is_fitted(self)
        return np.asarray(validate_data(self, X, reset=False), dtype=np.float64)

    def gate_proba(self, X):
        """The gate's weights g(x), shape (n_samples, n_experts); rows sum to 1."""
        return self.gate_.predict_proba(self._validated(X))

    def responsibilities(self, X, y):
        """Posterior h_e = g_e·P_e(y|x) / Σ_j g_j·P_j(y|x), shape (n_samples, n_experts)."""
        X = self._validated(X)
        y_enc = self._encode_known_targets(y)
        if y_enc.shape[0] != X.shape[0]:
            raise ValueError(f"X has {X.shape[0]} samples but y has {y_enc.shape[0]}")
        log_joint = self._log_joint(self.gate_, self.experts_, self._noise(), X, y_enc)
        return np.exp(log_joint - logsumexp(log_joint, axis=1, keepdims=True))

    def sample_log_likelihood(self, X, y):
        """log p(y | x) under the mixture, per sample, shape (n_samples,)."""
        X = self._validated(X)
        y_enc = self._encode_known_targets(y)
        return logsumexp(
            self._log_joint(self.gate_, self.experts_, self._noise(), X, y_enc), axis=1
        )

    def _noise(self):
        return getattr(self, "noise_variance_", None)


class MixtureOfExpertsRegressor(RegressorMixin, _MixtureOfExpertsBase):
    """Mixture of experts for regression: p(y|x) = Σ_e g_e(x)·N(y; f_e(x), σ_e²).

    Parameters
    ----------
    n_experts : int, default=3
    experts : estimator, list of n_experts estimators, or None (default: LinearRegression)
        A single estimator is cloned for every expert. method="em" needs estimators whose
        fit accepts sample_weight; method="gradient" accepts only LinearRegression.
    method : {"em", "two_stage", "gradient"}, default="em"
    gate : {"logistic", "mlp"}, default="logistic"
        Multinomial logistic regression or a small tanh MLP on the (standardised) inputs.
    gate_features : list of column indices or boolean mask, default=None (all columns)
    gate_alpha : float, default=1e-4
        L2 penalty on the gate's weights (per-sample loss scale).
    gate_hidden_layer_sizes : tuple of int, default=(16,)
        Only for gate="mlp".
    n_branches : int or None, default=None
        If set, a hierarchical mixture: a root gate over n_branches branches, each a gate
        over n_experts / n_branches experts.
    init : {"kmeans", "random"}, default="kmeans"
        Starting responsibilities for "em" and "gradient".
    n_init : int, default=3
        Restarts; the one with the highest log-likelihood is kept.
    max_iter : int, default=100
        EM iterations, L-BFGS iterations ("gradient"), or gate L-BFGS iterations
        ("two_stage").
    tol : float, default=1e-4
        Stop when the mean log-likelihood changes by at most tol in one EM iteration
        (in 10 L-BFGS iterations for "gradient").
    variance_floor : float, default=1e-6
        Lower bound on each σ_e², as a fraction of var(y): without it the likelihood is
        unbounded when an expert fits a few points exactly.
    random_state : int, RandomState or None
    verbose : bool, default=False
        Show a progress bar.

    Attributes
    ----------
    experts_ : list of fitted estimators
    gate_ : MixtureGate, with predict_proba(X)
    noise_variance_ : ndarray of shape (n_experts,)
    log_likelihood_ : ndarray, mean log-likelihood per iteration of the kept restart
    n_iter_ : int
    converged_ : bool
    """

    def __init__(
        self,
        n_experts=3,
        *,
        experts=None,
        method="em",
        gate="logistic",
        gate_features=None,
        gate_alpha=1e-4,
        gate_hidden_layer_sizes=(16,),
        n_branches=None,
        init="kmeans",
        n_init=3,
        max_iter=100,
        tol=1e-4,
        variance_floor=1e-6,
        random_state=None,
        verbose=False,
    ):
        self.n_experts = n_experts
        self.experts = experts
        self.method = method
        self.gate = gate
        self.gate_features = gate_features
        self.gate_alpha = gate_alpha
        self.gate_hidden_layer_sizes = gate_hidden_layer_sizes
        self.n_branches = n_branches
        self.init = init
        self.n_init = n_init
        self.max_iter = max_iter
        self.tol = tol
        self.variance_floor = variance_floor
        self.random_state = random_state
        self.verbose = verbose

    def _default_expert(self):
        return LinearRegression()

    def _encode_targets(self, y):
        y = np.asarray(y, dtype=np.float64)
        if not (isinstance(self.variance_floor, numbers.Real) and self.variance_floor > 0):
            raise ValueError(
                f"variance_floor must be a positive number, got {self.variance_floor!r}"
            )
        # An absolute floor too, so that a constant y still gives a finite likelihood.
        self._min_variance = self.variance_floor * max(float(np.var(y)), 1e-12)
        return y

    def _encode_known_targets(self, y):
        y = np.asarray(y, dtype=np.float64).ravel()
        if not np.all(np.isfinite(y)):
            raise ValueError("y contains NaN or infinity; expected finite targets")
        return y

    def _expert_outputs(self, experts, X):
        return np.stack(
            [np.asarray(e.predict(X), dtype=np.float64).ravel() for e in experts], axis=1
        )

    def _log_expert_likelihood(self, means_NE, y, noise_var_E):
        return -0.5 * (np.log(2 * np.pi * noise_var_E) + (y[:, None] - means_NE) ** 2 / noise_var_E)

    def _fit_experts(self, experts, X, y, weights_NE):
        for e, expert in enumerate(experts):
            expert.fit(X, y, sample_weight=np.maximum(weights_NE[:, e], _WEIGHT_FLOOR))
        residual2_NE = (y[:, None] - self._expert_outputs(experts, X)) ** 2
        # σ_e² = Σ_n h_ne·r_ne² / Σ_n h_ne, the maximiser of the expected log-likelihood,
        # clipped at the floor (the constrained maximiser, so EM stays monotone).
        variance_E = (weights_NE * residual2_NE).sum(axis=0) / np.maximum(
            weights_NE.sum(axis=0), 1e-300
        )
        return np.maximum(variance_E, self._min_variance)

    def _fit_on_part(self, expert, X, y):
        return expert.fit(X, y)

    def _part_noise_variance(self, experts, X, y, one_hot_NE):
        residual2_NE = (y[:, None] - self._expert_outputs(experts, X)) ** 2
        variance_E = (one_hot_NE * residual2_NE).sum(axis=0) / one_hot_NE.sum(axis=0)
        return np.maximum(variance_E, self._min_variance)

    def _combined_output_loss(self, gate_NE, means_NE, y):
        return ((gate_NE * means_NE).sum(dim=1) - y).pow(2).mean()

    def _check_differentiable(self, prototypes):
        for expert in prototypes:
            if type(expert) is not LinearRegression:
                raise ValueError(
                    "method='gradient' trains linear experts in torch; experts must be None "
                    f"or LinearRegression, got {type(expert).__name__}"
                )

    def _experts_to_torch(self, experts, noise_var):
        return {
            "weight_EF": torch.tensor(
                np.ascontiguousarray(np.stack([e.coef_.ravel() for e in experts])),
                requires_grad=True,
            ),
            "bias_E": torch.tensor(
                [
                    float(np.ravel(e.intercept_)[0])
                    if np.ndim(e.intercept_)
                    else float(e.intercept_)
                    for e in experts
                ],
                dtype=torch.float64,
                requires_grad=True,
            ),
            # Variance = floor + exp(log_excess): positive and never under the floor.
            "log_excess_variance_E": torch.tensor(
                np.log(np.maximum(noise_var - self._min_variance, 1e-300) + 1e-30),
                requires_grad=True,
            ),
        }

    def _torch_log_expert_likelihood(self, params, X_t, y_t):
        means_NE = X_t @ params["weight_EF"].T + params["bias_E"]
        variance_E = self._min_variance + params["log_excess_variance_E"].exp()
        return -0.5 * (
            torch.log(2 * torch.pi * variance_E) + (y_t[:, None] - means_NE) ** 2 / variance_E
        )

    def _torch_expert_penalty(self, params, n_samples):
        return torch.zeros((), dtype=torch.float64)

    def _experts_from_torch(self, experts, params):
        for e, expert in enumerate(experts):
            expert.coef_ = params["weight_EF"][e].detach().numpy().copy()
            expert.intercept_ = float(params["bias_E"][e].detach())
        return self._min_variance + params["log_excess_variance_E"].detach().exp().numpy()

    def predict(self, X, return_expert_outputs=False):
        """Mixture mean Σ_e g_e(x)·f_e(x). With return_expert_outputs=True, also each
        expert's prediction, shape (n_samples, n_experts)."""
        X = self._validated(X)
        means_NE = self._expert_outputs(self.experts_, X)
        prediction = (self.gate_.predict_proba(X) * means_NE).sum(axis=1)
        return (prediction, means_NE) if return_expert_outputs else prediction


class MixtureOfExpertsClassifier(ClassifierMixin, _MixtureOfExpertsBase):
    """Mixture of experts for classification: P(y|x) = Σ_e g_e(x)·P_e(y|x).

    Parameters are those of `MixtureOfExpertsRegressor` without variance_floor; the default
    expert is LogisticRegression(max_iter=1000, warm_start=True), and method="gradient" accepts only
    LogisticRegression experts (its L2 penalty, 1/(2C) on the summed loss, is kept).

    Attributes
    ----------
    classes_ : ndarray of shape (n_classes,)
    experts_, gate_, log_likelihood_, n_iter_, converged_ : as for the regressor.
    """

    def __init__(
        self,
        n_experts=3,
        *,
        experts=None,
        method="em",
        gate="logistic",
        gate_features=None,
        gate_alpha=1e-4,
        gate_hidden_layer_sizes=(16,),
        n_branches=None,
        init="kmeans",
        n_init=3,
        max_iter=100,
        tol=1e-4,
        random_state=None,
        verbose=False,
    ):
        self.n_experts = n_experts
        self.experts = experts
        self.method = method
        self.gate = gate
        self.gate_features = gate_features
        self.gate_alpha = gate_alpha
        self.gate_hidden_layer_sizes = gate_hidden_layer_sizes
        self.n_branches = n_branches
        self.init = init
        self.n_init = n_init
        self.max_iter = max_iter
        self.tol = tol
        self.random_state = random_state
        self.verbose = verbose

    def _default_expert(self):
        # warm_start: each EM M-step starts from the previous coefficients, which makes
        # the refits several times faster (the same object is refit in every iteration).
        return LogisticRegression(max_iter=1000, warm_start=True)

    def _encode_targets(self, y):
        check_classification_targets(y)
        self.classes_, y_enc = np.unique(y, return_inverse=True)
        if len(self.classes_) < 2:
            raise ValueError(
                f"y has one class ({self.classes_[0]!r}); a classifier needs at least 2 classes"
            )
        return y_enc

    def _encode_known_targets(self, y):
        y = np.asarray(y).ravel()
        y_enc = np.searchsorted(self.classes_, y)
        y_enc = np.minimum(y_enc, len(self.classes_) - 1)
        unknown = self.classes_[y_enc] != y
        if np.any(unknown):
            raise ValueError(
                f"y contains labels not seen in fit: {np.unique(y[unknown])[:5]!r}; "
                f"expected values among classes_ {self.classes_!r}"
            )
        return y_enc

    def _expert_outputs(self, experts, X):
        """Each expert's probabilities over all classes_, shape (N, E, K); an expert that
        never saw a class gives it probability 0."""
        N, K = X.shape[0], len(self.classes_)
        proba_NEK = np.zeros((N, len(experts), K))
        for e, expert in enumerate(experts):
            proba_NEK[:, e, np.asarray(expert.classes_, dtype=int)] = expert.predict_proba(X)
        return proba_NEK

    def _log_expert_likelihood(self, proba_NEK, y_enc, noise_var_E):
        observed_NE = proba_NEK[np.arange(len(y_enc)), :, y_enc]
        return np.log(np.maximum(observed_NE, _PROBA_FLOOR))

    def _fit_experts(self, experts, X, y_enc, weights_NE):
        for e, expert in enumerate(experts):
            expert.fit(X, y_enc, sample_weight=np.maximum(weights_NE[:, e], _WEIGHT_FLOOR))
        return None

    def _fit_on_part(self, expert, X, y_enc):
        if len(np.unique(y_enc)) < 2:
            # A part with one class: most classifiers refuse it, and the answer is known.
            return DummyClassifier(strategy="prior").fit(X, y_enc)
        return expert.fit(X, y_enc)

    def _part_noise_variance(self, experts, X, y, one_hot_NE):
        return None

    def _combined_output_loss(self, gate_NE, proba_NEK, y_enc):
        observed_NE = proba_NEK[torch.arange(len(y_enc)), :, y_enc]
        mixture_N = (gate_NE * observed_NE).sum(dim=1)
        return -torch.log(mixture_N.clamp_min(_PROBA_FLOOR)).mean()

    def _check_differentiable(self, prototypes):
        for expert in prototypes:
            if (
                type(expert) is not LogisticRegression
                or expert.penalty not in ("deprecated", "l2", None)
                or (expert.l1_ratio or 0) != 0
            ):
                raise ValueError(
                    "method='gradient' trains logistic experts in torch; experts must be None "
                    f"or LogisticRegression with an L2 or no penalty, got {expert!r}"
                )
        self._expert_C = [
            np.inf if expert.penalty is None else float(expert.C) for expert in prototypes
        ]

    def _experts_to_torch(self, experts, noise_var):
        return {
            "weight_EKF": torch.tensor(
                np.ascontiguousarray(np.stack([e.coef_ for e in experts])), requires_grad=True
            ),
            "bias_EK": torch.tensor(
                np.ascontiguousarray(np.stack([e.intercept_ for e in experts])), requires_grad=True
            ),
        }

    def _torch_expert_log_proba(self, params, X_t):
        logits_NEK = torch.einsum("nf,ekf->nek", X_t, params["weight_EKF"]) + params["bias_EK"]
        if logits_NEK.shape[2] == 1:
            # Binary LogisticRegression keeps one logit, for the second class.
            logits_NEK = torch.cat([torch.zeros_like(logits_NEK), logits_NEK], dim=2)
        return torch.log_softmax(logits_NEK, dim=2)

    def _torch_log_expert_likelihood(self, params, X_t, y_t):
        log_proba_NEK = self._torch_expert_log_proba(params, X_t)
        return log_proba_NEK[torch.arange(len(y_t)), :, y_t]

    def _torch_expert_penalty(self, params, n_samples):
        # LogisticRegression minimises C·Σ loss + ½‖w‖²; per sample that is ‖w‖² / (2·C·N).
        inverse_C = torch.tensor([1.0 / c for c in self._expert_C], dtype=torch.float64)
        return (inverse_C * params["weight_EKF"].pow(2).sum(dim=(1, 2))).sum() / (2 * n_samples)

    def _experts_from_torch(self, experts, params):
        for e, expert in enumerate(experts):
            expert.coef_ = params["weight_EKF"][e].detach().numpy().copy()
            expert.intercept_ = params["bias_EK"][e].detach().numpy().copy()
        return None

    def predict_proba(self, X):
        """P(y|x) = Σ_e g_e(x)·P_e(y|x), shape (n_samples, n_classes)."""
        X = self._validated(X)
        return np.einsum(
            "ne,nek->nk", self.gate_.predict_proba(X), self._expert_outputs(self.experts_, X)
        )

    def predict(self, X, return_expert_outputs=False):
        """The most probable class. With return_expert_outputs=True, also each expert's
        class probabilities, shape (n_samples, n_experts, n_classes)."""
        X = self._validated(X)
        proba_NEK = self._expert_outputs(self.experts_, X)
        proba_NK = np.einsum("ne,nek->nk", self.gate_.predict_proba(X), proba_NEK)
        labels = self.classes_[np.argmax(proba_NK, axis=1)]
        return (labels, proba_NEK) if return_expert_outputs else labels
