"""Gates of the classic mixtures: g(x) = softmax over experts, a function of the inputs.

- `LogisticGate`: multinomial logistic regression, fit by L-BFGS on soft targets
  (the EM M-step of Jordan & Jacobs 1994). Convex, warm-started between EM iterations.
- `MLPGate`: a one-hidden-layer torch network with the same soft-target loss.
- `MixtureGate`: what estimators expose as `gate_`. It selects the gate's columns,
  standardises them, and holds either one gate over all experts or a two-level tree
  (a root gate over branches, one gate per branch over that branch's experts), the
  hierarchical mixture of experts.

Shape letters: N samples, D gate features, E experts (leaves), B branches.
All computation is float64: EM's monotonicity is checked to 1e-10 in the tests.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.optimize import minimize
from scipy.special import logsumexp


def _log_softmax(logits_NE: np.ndarray) -> np.ndarray:
    return logits_NE - logsumexp(logits_NE, axis=1, keepdims=True)


def soft_target_loss(log_gate_NE, targets_NE):
    """-(1/N) Σ_n Σ_e t_ne log g_e(x_n). Targets need not sum to 1 per row: a row's sum
    acts as that sample's weight (a hierarchical gate's branch posterior)."""
    return -(targets_NE * log_gate_NE).sum() / log_gate_NE.shape[0]


class LogisticGate:
    """g(x) = softmax(x·W + b), fit to minimise the soft-target loss + alpha/2·‖W‖²."""

    def __init__(self, n_features: int, n_outputs: int, alpha: float):
        self.alpha = alpha
        # Zeros: the loss is convex, so the start only matters for speed, and zeros
        # give the uniform gate, which favours no expert.
        self.weight_DE = np.zeros((n_features, n_outputs))
        self.bias_E = np.zeros(n_outputs)

    def logits(self, X_ND: np.ndarray) -> np.ndarray:
        return X_ND @ self.weight_DE + self.bias_E

    def log_proba(self, X_ND: np.ndarray) -> np.ndarray:
        return _log_softmax(self.logits(X_ND))

    def fit(self, X_ND: np.ndarray, targets_NE: np.ndarray) -> LogisticGate:
        N, D = X_ND.shape
        E = targets_NE.shape[1]
        row_mass_N = targets_NE.sum(axis=1)

        def loss_and_grad(theta):
            weight_DE = theta[: D * E].reshape(D, E)
            bias_E = theta[D * E :]
            log_gate_NE = _log_softmax(X_ND @ weight_DE + bias_E)
            loss = soft_target_loss(log_gate_NE, targets_NE)
            loss += 0.5 * self.alpha * np.sum(weight_DE**2)
            # d loss / d logits = (g · Σ_e t_e − t) / N
            dlogits_NE = (np.exp(log_gate_NE) * row_mass_N[:, None] - targets_NE) / N
            grad_W = X_ND.T @ dlogits_NE + self.alpha * weight_DE
            return loss, np.concatenate([grad_W.ravel(), dlogits_NE.sum(axis=0)])

        # Warm start from the previous M-step: L-BFGS only accepts steps that lower the
        # loss, so each gate M-step cannot decrease the EM objective.
        theta0 = np.concatenate([self.weight_DE.ravel(), self.bias_E])
        result = minimize(
            loss_and_grad,
            theta0,
            jac=True,
            method="L-BFGS-B",
            options={"maxiter": 100, "gtol": 1e-7},
        )
        if result.fun <= loss_and_grad(theta0)[0]:
            self.weight_DE = result.x[: D * E].reshape(D, E).copy()
            self.bias_E = result.x[D * E :].copy()
        return self

    def penalty_torch(self, module: torch.nn.Linear) -> torch.Tensor:
        return 0.5 * self.alpha * module.weight.pow(2).sum()

    def to_torch(self) -> torch.nn.Linear:
        D, E = self.weight_DE.shape
        module = torch.nn.Linear(D, E, dtype=torch.float64)
        with torch.no_grad():
            module.weight.copy_(torch.from_numpy(self.weight_DE.T.copy()))
            module.bias.copy_(torch.from_numpy(self.bias_E.copy()))
        return module

    def load_torch(self, module: torch.nn.Linear) -> None:
        self.weight_DE = module.weight.detach().numpy().T.copy()
        self.bias_E = module.bias.detach().numpy().copy()


class MLPGate:
    """g(x) = softmax(MLP(x)) with tanh hidden layers; same loss as `LogisticGate`,
    the L2 penalty on the weight matrices only. Fit by L-BFGS, warm-started."""

    def __init__(
        self, n_features: int, n_outputs: int, alpha: float, hidden: tuple[int, ...], seed: int
    ):
        self.alpha = alpha
        generator = torch.Generator().manual_seed(seed)
        layers: list[torch.nn.Module] = []
        width = n_features
        for units in hidden:
            layers += [torch.nn.Linear(width, units, dtype=torch.float64), torch.nn.Tanh()]
            width = units
        layers.append(torch.nn.Linear(width, n_outputs, dtype=torch.float64))
        self.module = torch.nn.Sequential(*layers)
        with torch.no_grad():
            for layer in self.module:
                if isinstance(layer, torch.nn.Linear):
                    bound = 1.0 / np.sqrt(layer.in_features)
                    layer.weight.uniform_(-bound, bound, generator=generator)
                    layer.bias.zero_()

    def log_proba(self, X_ND: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            logits = self.module(torch.tensor(X_ND, dtype=torch.float64))
        return torch.log_softmax(logits, dim=1).numpy()

    def penalty_torch(self, module: torch.nn.Module) -> torch.Tensor:
        return (
            0.5
            * self.alpha
            * sum(
                layer.weight.pow(2).sum() for layer in module if isinstance(layer, torch.nn.Linear)
            )
        )

    def fit(self, X_ND: np.ndarray, targets_NE: np.ndarray) -> MLPGate:
        X = torch.tensor(X_ND, dtype=torch.float64)
        targets = torch.tensor(targets_NE, dtype=torch.float64)

        def objective():
            log_gate = torch.log_softmax(self.module(X), dim=1)
            return soft_target_loss(log_gate, targets) + self.penalty_torch(self.module)

        minimize_torch(list(self.module.parameters()), objective, max_iter=100)
        return self

    def to_torch(self) -> torch.nn.Module:
        return self.module

    def load_torch(self, module: torch.nn.Module) -> None:
        self.module = module


def minimize_torch(params, objective, max_iter: int) -> float:
    """Full-batch L-BFGS with a strong-Wolfe line search; returns the final objective."""
    optimizer = torch.optim.LBFGS(
        params,
        lr=1.0,
        max_iter=max_iter,
        tolerance_grad=1e-9,
        tolerance_change=1e-12,
        history_size=20,
        line_search_fn="strong_wolfe",
    )

    def closure():
        optimizer.zero_grad()
        loss = objective()
        loss.backward()
        return loss

    optimizer.step(closure)
    with torch.no_grad():
        return float(objective())


class MixtureGate:
    """The fitted gate of a mixture: `predict_proba(X)` gives g(x), shape (N, E).

    With `n_branches=B` it is a two-level tree: g_e(x) = g_b(x)·g_{e|b}(x) for expert e
    in branch b, each branch holding E/B consecutive experts.
    """

    def __init__(
        self, X_full, *, n_experts, feature_indices, kind, alpha, hidden, n_branches, seed
    ):
        self.n_experts = n_experts
        self.feature_indices = feature_indices
        self.n_branches = n_branches
        X_gate = X_full[:, feature_indices]
        # The L2 penalty and L-BFGS behave the same whatever the columns' units.
        self.mean_D = X_gate.mean(axis=0)
        scale_D = X_gate.std(axis=0)
        self.scale_D = np.where(scale_D > 0, scale_D, 1.0)
        D = X_gate.shape[1]

        def make(n_outputs, offset):
            if kind == "mlp":
                return MLPGate(D, n_outputs, alpha, tuple(hidden), seed + offset)
            return LogisticGate(D, n_outputs, alpha)

        if n_branches is None:
            self.root = make(n_experts, 0)
            self.branches = []
        else:
            self.root = make(n_branches, 0)
            per_branch = n_experts // n_branches
            self.branches = [make(per_branch, b + 1) for b in range(n_branches)]

    def gate_inputs(self, X_full: np.ndarray) -> np.ndarray:
        return (X_full[:, self.feature_indices] - self.mean_D) / self.scale_D

    def _blocks(self):
        per_branch = self.n_experts // self.n_branches
        return [slice(b * per_branch, (b + 1) * per_branch) for b in range(self.n_branches)]

    def log_proba(self, X_full: np.ndarray) -> np.ndarray:
        Xg = self.gate_inputs(X_full)
        log_root = self.root.log_proba(Xg)
        if not self.branches:
            return log_root
        return np.concatenate(
            [log_root[:, [b]] + branch.log_proba(Xg) for b, branch in enumerate(self.branches)],
            axis=1,
        )

    def predict_proba(self, X_full: np.ndarray) -> np.ndarray:
        return np.exp(self.log_proba(np.asarray(X_full, dtype=np.float64)))

    def fit_soft_targets(self, X_full: np.ndarray, targets_NE: np.ndarray) -> MixtureGate:
        """EM M-step: root on branch posteriors h_b = Σ_{e∈b} h_e, each branch on its h_e
        (unnormalised, i.e. targets h_e/h_b with sample weights h_b)."""
        Xg = self.gate_inputs(X_full)
        if not self.branches:
            self.root.fit(Xg, targets_NE)
            return self
        blocks = self._blocks()
        self.root.fit(Xg, np.stack([targets_NE[:, s].sum(axis=1) for s in blocks], axis=1))
        for branch, block in zip(self.branches, blocks, strict=True):
            branch.fit(Xg, targets_NE[:, block])
        return self

    # --- torch view, for end-to-end training -------------------------------------------
    def torch_modules(self) -> list[torch.nn.Module]:
        return [self.root.to_torch()] + [branch.to_torch() for branch in self.branches]

    def torch_log_proba(self, modules, X_full_t: torch.Tensor) -> torch.Tensor:
        idx = torch.as_tensor(self.feature_indices)
        mean = torch.from_numpy(self.mean_D)
        scale = torch.from_numpy(self.scale_D)
        Xg = (X_full_t[:, idx] - mean) / scale
        log_root = torch.log_softmax(modules[0](Xg), dim=1)
        if not self.branches:
            return log_root
        return torch.cat(
            [
                log_root[:, b : b + 1] + torch.log_softmax(module(Xg), dim=1)
                for b, module in enumerate(modules[1:])
            ],
            dim=1,
        )

    def torch_penalty(self, modules) -> torch.Tensor:
        gates = [self.root] + self.branches
        return sum(g.penalty_torch(m) for g, m in zip(gates, modules, strict=True))

    def load_torch(self, modules) -> None:
        for gate, module in zip([self.root] + self.branches, modules, strict=True):
            gate.load_torch(module)
