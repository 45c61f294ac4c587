"""Freeze some experts of a layer while the others train.

The experts of a layer are one stacked (E, …) parameter each, so
``requires_grad`` cannot freeze a subset: gradient hooks zero the frozen rows
instead. Used by expert surgery (growing a trained layer) and by two-stage
training.
"""

from __future__ import annotations

import torch
from torch import Tensor

from .experts import Experts
from .layer import MoE


def _freeze_rows(params, num_rows: int, frozen: Tensor) -> list:
    """Gradient hooks that zero rows ``frozen`` of each (num_rows, …) parameter; marks them ``frozen_rows_E``."""
    handles = []
    for param in params:
        if param is None:
            continue
        keep_E = torch.ones(num_rows, dtype=param.dtype, device=param.device)
        keep_E[frozen.to(param.device)] = 0
        mask = keep_E.view(num_rows, *([1] * (param.dim() - 1)))
        param.frozen_rows_E = keep_E == 0
        handles.append(param.register_hook(lambda grad, mask=mask: grad * mask.to(grad.dtype)))
    return handles


def _expert_ids(frozen, num_experts: int) -> Tensor:
    frozen = torch.as_tensor(frozen, dtype=torch.long)
    if frozen.numel() and (frozen.min() < 0 or frozen.max() >= num_experts):
        raise ValueError(f"frozen ({frozen.tolist()}) must list expert ids in [0, {num_experts})")
    return frozen


def freeze_experts(experts: Experts | MoE, frozen: list[int] | Tensor) -> list:
    """Zero the gradient of the ``frozen`` experts' rows of every stacked weight.

    The experts are one (E, …) parameter each, so ``requires_grad`` cannot freeze
    some of them; a gradient hook masks their rows instead. With zero gradients
    from the start, Adam's moments for those rows stay zero and its update is
    exactly zero, but decoupled weight decay would still shrink them: put these
    parameters in a group without weight decay (``Parameter.frozen_rows_E``
    marks them). Returns the hook handles (``handle.remove()`` undoes it).
    """
    if isinstance(experts, MoE):
        experts = experts.experts
    if not experts.shardable:
        raise TypeError(f"freezing some experts needs every weight stacked by expert (Experts.shardable); "
                        f"{type(experts).__name__} does not declare it")
    frozen = _expert_ids(frozen, experts.num_experts)
    return _freeze_rows(experts.parameters(), experts.num_experts, frozen)


def freeze_router_rows(moe: MoE, frozen: list[int] | Tensor) -> list:
    """Like ``freeze_experts`` for the router: the ``frozen`` experts' rows (and logit biases) keep their values."""
    frozen = _expert_ids(frozen, moe.config.num_experts)
    return _freeze_rows((moe.router.weight, moe.router.logit_bias), moe.config.num_experts, frozen)
