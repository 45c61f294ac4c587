"""Multi-task mixtures of experts for recommendation: MMoE and PLE, and their baselines.

- ``MMoE`` (Ma et al. 2018): E experts shared by every task, one gate per task, one
  tower per task: ŷ_t = tower_t(Σ_e g_t(x)_e · E_e(x)), g_t(x) = softmax(W_t·x).
  ``one_gate=True`` is the one-gate MoE baseline (OMoE): every task reads one gate.
- ``PLE`` (Tang et al. 2020): progressive layered extraction. Each layer holds shared
  experts and experts of each task; task t's gate mixes its own experts and the shared
  ones on task t's input, and (below the top layer) a shared gate mixes every expert on
  the shared input; the next layer reads these mixtures. One layer is CGC.
- ``SharedBottom``: one network under every task's tower (the multi-task baseline).

Experts and gates are moekit's: the experts of each group are an ``Experts`` module
(``StackedExperts`` by default, any list of modules through ``experts=``), run on every
row (a dense mixture), and each gate is a moekit router over them (``softmax``, the
papers' dense gate, by default; a sparse one such as ``topk`` zeroes the weights it
does not choose). Every model returns a ``MultiTaskOutput``: each task's prediction,
each gate's weights and the routers' weighted auxiliary losses.

Shapes: N rows, D input dim, E experts in a gate's mixture, O a task's output width.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor, nn

from ..config import MoEConfig
from ..experts import StackedExperts
from ..experts.modules import ModuleExperts
from ..routing import router_class


class MultiTaskOutput(NamedTuple):
    """outputs: one (N, O_t) prediction per task; gates: each gate's (N, E) combine weights
    by name (``task0``, …, ``shared``, with ``layerL/`` in front for PLE); aux_loss: the
    gates' weighted auxiliary losses (zero for dense softmax gates)."""

    outputs: list[Tensor]
    gates: dict[str, Tensor]
    aux_loss: Tensor


def _mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, d_out))


def _check_positive(**values) -> None:
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} ({value!r}) must be a positive integer")


def _task_widths(num_tasks: int, task_out: int | list[int]) -> list[int]:
    widths = [task_out] * num_tasks if isinstance(task_out, int) else list(task_out)
    if len(widths) != num_tasks:
        raise ValueError(f"task_out lists {len(widths)} widths for {num_tasks} tasks")
    for width in widths:
        _check_positive(task_out=width)
    return widths


class Gate(nn.Module):
    """A moekit router over E experts used as a dense gate: (N, D) → (N, E) weights
    (zero where a sparse router did not choose), and its weighted auxiliary loss."""

    def __init__(self, d_model: int, num_experts: int, router: str = "softmax", top_k: int | None = None,
                 **loss_coefs: float):
        super().__init__()
        # No balancing loss unless asked for: a dense gate over a few experts needs none.
        self.config = MoEConfig(d_model=d_model, d_ff=1, num_experts=num_experts, top_k=top_k, router=router,
                                **dict({"load_balance_coef": 0.0}, **loss_coefs))
        self.router = router_class(router).from_config(self.config)

    def forward(self, x_ND: Tensor) -> tuple[Tensor, Tensor]:
        routing = self.router(x_ND)
        weights_NE = torch.zeros(x_ND.shape[0], self.config.num_experts, dtype=routing.weights_TK.dtype,
                                 device=x_ND.device).scatter(1, routing.indices_TK, routing.weights_TK)
        aux = x_ND.new_zeros((), dtype=weights_NE.dtype)
        for name, loss in routing.losses.items():
            coef = getattr(self.config, f"{name}_coef", 0.0)
            if coef:
                aux = aux + coef * loss
        return weights_NE, aux


def _experts(num_experts: int, d_in: int, d_ff: int, experts: list[nn.Module] | None) -> nn.Module:
    if experts is not None:
        if len(experts) != num_experts:
            raise ValueError(f"got {len(experts)} expert modules for num_experts ({num_experts})")
        return ModuleExperts(experts)
    return StackedExperts(num_experts, d_in, d_ff, kind="ffn", activation="relu", bias=True)


def every_expert(experts: nn.Module, x_ND: Tensor) -> Tensor:
    """Every expert on every row: (N, E, D_out), through the experts contract."""
    E, N = experts.num_experts, x_ND.shape[0]
    counts_E = torch.full((E,), N, dtype=torch.long, device=x_ND.device)
    y_RD = experts(x_ND.repeat(E, 1), counts_E)  # rows grouped by expert: E blocks of the N rows
    return y_RD.view(E, N, -1).transpose(0, 1)


def mix(weights_NE: Tensor, outputs_NEO: Tensor) -> Tensor:
    """Σ_e weights[n, e] · outputs[n, e]."""
    return torch.einsum("ne,neo->no", weights_NE.to(outputs_NEO.dtype), outputs_NEO)


class MMoE(nn.Module):
    """Multi-gate mixture of experts; ``one_gate=True`` gives the one-gate baseline (OMoE).

    Args:
        d_in: D.
        num_tasks: tasks (one gate and one tower each).
        num_experts, d_ff: E experts, each an MLP D → d_ff → D (ReLU, biases).
        task_out: each task's output width (an int for all, or one per task).
        tower_hidden: hidden width of each task's tower MLP.
        router, top_k: each gate's moekit router (default: dense softmax).
        experts: E modules (D → any width) to use instead of the stacked MLPs.
        loss_coefs: weights of the gates' auxiliary losses (``z_loss_coef``, …).
    """

    def __init__(self, d_in: int, num_tasks: int = 2, num_experts: int = 8, d_ff: int = 64, *,
                 task_out: int | list[int] = 1, tower_hidden: int = 16, one_gate: bool = False,
                 router: str = "softmax", top_k: int | None = None, experts: list[nn.Module] | None = None,
                 **loss_coefs: float):
        super().__init__()
        _check_positive(d_in=d_in, num_tasks=num_tasks, num_experts=num_experts, d_ff=d_ff,
                        tower_hidden=tower_hidden)
        widths = _task_widths(num_tasks, task_out)
        self.num_tasks, self.one_gate = num_tasks, one_gate
        self.experts = _experts(num_experts, d_in, d_ff, experts)
        d_expert = self._expert_width(d_in)
        self.gates = nn.ModuleList(Gate(d_in, num_experts, router, top_k, **loss_coefs)
                                   for _ in range(1 if one_gate else num_tasks))
        self.towers = nn.ModuleList(_mlp(d_expert, tower_hidden, width) for width in widths)

    def _expert_width(self, d_in: int) -> int:
        with torch.no_grad():
            return every_expert(self.experts, torch.zeros(1, d_in)).shape[-1]

    def forward(self, x_ND: Tensor) -> MultiTaskOutput:
        outputs_NED = every_expert(self.experts, x_ND)
        gates, aux = {}, x_ND.new_zeros(())
        for t, gate in enumerate(self.gates):
            gates["shared" if self.one_gate else f"task{t}"], gate_aux = gate(x_ND)
            aux = aux + gate_aux
        weights = list(gates.values())
        predictions = [tower(mix(weights[0 if self.one_gate else t], outputs_NED))
                       for t, tower in enumerate(self.towers)]
        return MultiTaskOutput(predictions, gates, aux)


class _Extraction(nn.Module):
    """One PLE layer (CGC): shared experts and each task's experts, a gate per task, and a
    shared gate over every expert below the top layer."""

    def __init__(self, d_in: int, num_tasks: int, shared_experts: int, task_experts: int, d_ff: int,
                 with_shared_gate: bool, router: str, top_k: int | None, loss_coefs: dict):
        super().__init__()
        self.shared = _experts(shared_experts, d_in, d_ff, None)
        self.tasks = nn.ModuleList(_experts(task_experts, d_in, d_ff, None) for _ in range(num_tasks))
        k = top_k if top_k is None else min(top_k, task_experts + shared_experts)
        self.task_gates = nn.ModuleList(Gate(d_in, task_experts + shared_experts, router, k, **loss_coefs)
                                        for _ in range(num_tasks))
        total = task_experts * num_tasks + shared_experts
        self.shared_gate = Gate(d_in, total, router, top_k if top_k is None else min(top_k, total),
                                **loss_coefs) if with_shared_gate else None

    def forward(self, task_inputs: list[Tensor], shared_input: Tensor) -> tuple[list[Tensor], Tensor | None, dict,
                                                                             Tensor]:
        shared_NED = every_expert(self.shared, shared_input)
        own = [every_expert(experts, x) for experts, x in zip(self.tasks, task_inputs, strict=True)]
        gates, aux, mixed = {}, shared_input.new_zeros(()), []
        for t, (gate, x) in enumerate(zip(self.task_gates, task_inputs, strict=True)):
            weights, gate_aux = gate(x)
            gates[f"task{t}"], aux = weights, aux + gate_aux
            # Task t's own experts on its input, then the shared experts on the shared input.
            mixed.append(mix(weights, torch.cat([own[t], shared_NED], dim=1)))
        shared_out = None
        if self.shared_gate is not None:
            # Task experts run on their own tasks' inputs; the shared gate mixes them all.
            weights, gate_aux = self.shared_gate(shared_input)
            gates["shared"], aux = weights, aux + gate_aux
            shared_out = mix(weights, torch.cat([*own, shared_NED], dim=1))
        return mixed, shared_out, gates, aux


class PLE(nn.Module):
    """Progressive layered extraction; ``num_layers=1`` is CGC (customized gate control).

    Args:
        d_in: D (every expert maps D → d_ff → D, so the layers stack).
        num_tasks: tasks (a gate, experts and a tower each).
        num_layers: extraction layers.
        shared_experts, task_experts: experts per layer, shared and per task.
        d_ff, task_out, tower_hidden, router, top_k, loss_coefs: as ``MMoE``.
    """

    def __init__(self, d_in: int, num_tasks: int = 2, num_layers: int = 2, shared_experts: int = 2,
                 task_experts: int = 2, d_ff: int = 64, *, task_out: int | list[int] = 1, tower_hidden: int = 16,
                 router: str = "softmax", top_k: int | None = None, **loss_coefs: float):
        super().__init__()
        _check_positive(d_in=d_in, num_tasks=num_tasks, num_layers=num_layers, shared_experts=shared_experts,
                        task_experts=task_experts, d_ff=d_ff, tower_hidden=tower_hidden)
        widths = _task_widths(num_tasks, task_out)
        self.num_tasks = num_tasks
        self.layers = nn.ModuleList(
            _Extraction(d_in, num_tasks, shared_experts, task_experts, d_ff, layer < num_layers - 1, router, top_k,
                        loss_coefs) for layer in range(num_layers))
        self.towers = nn.ModuleList(_mlp(d_in, tower_hidden, width) for width in widths)

    def forward(self, x_ND: Tensor) -> MultiTaskOutput:
        task_inputs, shared_input = [x_ND] * self.num_tasks, x_ND
        gates, aux = {}, x_ND.new_zeros(())
        for i, layer in enumerate(self.layers):
            task_inputs, shared_input, layer_gates, layer_aux = layer(task_inputs, shared_input)
            gates.update({f"layer{i}/{name}": w for name, w in layer_gates.items()})
            aux = aux + layer_aux
        return MultiTaskOutput([tower(x) for tower, x in zip(self.towers, task_inputs, strict=True)], gates, aux)


class SharedBottom(nn.Module):
    """One MLP D → d_ff → d_ff under every task's tower: the classic multi-task baseline."""

    def __init__(self, d_in: int, num_tasks: int = 2, d_ff: int = 64, *, task_out: int | list[int] = 1,
                 tower_hidden: int = 16):
        super().__init__()
        _check_positive(d_in=d_in, num_tasks=num_tasks, d_ff=d_ff, tower_hidden=tower_hidden)
        widths = _task_widths(num_tasks, task_out)
        self.num_tasks = num_tasks
        self.bottom = nn.Sequential(nn.Linear(d_in, d_ff), nn.ReLU())
        self.towers = nn.ModuleList(_mlp(d_ff, tower_hidden, width) for width in widths)

    def forward(self, x_ND: Tensor) -> MultiTaskOutput:
        shared = self.bottom(x_ND)
        return MultiTaskOutput([tower(shared) for tower in self.towers], {}, x_ND.new_zeros(()))


def multitask_loss(output: MultiTaskOutput, targets: list[Tensor], losses: list[str] | str = "mse",
                   task_weights: list[float] | None = None) -> Tensor:
    """Σ_t w_t · loss_t(prediction_t, target_t) + the gates' auxiliary loss.

    ``losses``: ``mse`` (regression) or ``bce`` (a logit against a 0/1 label), one for all
    tasks or one per task."""
    n = len(output.outputs)
    if len(targets) != n:
        raise ValueError(f"got {len(targets)} target tensors for a model with {n} tasks: one per task, in order")
    kinds = [losses] * n if isinstance(losses, str) else list(losses)
    weights = [1.0] * n if task_weights is None else list(task_weights)
    if len(kinds) != n or len(weights) != n:
        raise ValueError(f"losses ({len(kinds)}) and task_weights ({len(weights)}) need one entry per task ({n})")
    total = output.aux_loss
    for t, (prediction, target, kind, weight) in enumerate(zip(output.outputs, targets, kinds, weights,
                                                               strict=True)):
        target = target.reshape(prediction.shape).to(prediction.dtype) if target.numel() == prediction.numel() \
            else None
        if target is None:
            raise ValueError(f"task {t}: {targets[t].numel()} target values for a prediction of shape "
                             f"{tuple(prediction.shape)}")
        if kind == "mse":
            term = nn.functional.mse_loss(prediction, target)
        elif kind == "bce":
            term = nn.functional.binary_cross_entropy_with_logits(prediction, target)
        else:
            raise ValueError(f"task {t}: loss {kind!r} must be 'mse' or 'bce'")
        total = total + weight * term
    return total
