"""The experts contract: rows grouped by expert in, their outputs out.

Every experts class computes ``forward(x_RD, counts_E) -> y_RD``: the R rows arrive
sorted by expert, ``counts_E[e]`` of them for expert e, and each output row is
its expert's output for that row. ``forward_expert(e, x_ND)`` runs one expert
(the readable reference the ``loop`` path uses). A class implements at least one
of the two; the base class derives the other.

What a class supports it declares as class attributes, which compute paths and
expert parallelism read instead of asking for its type:

- ``stacked_mlp``: the experts are MLPs held as stacked weights in the layout of
  ``moekit.compute.mlp``, so the MLP kernels (``grouped_mm``, ``fused``,
  ``triton``) can run them;
- ``shardable``: ``shard(first, count)`` returns experts [first, first + count) as a
  module of the same class, and every tensor of its state dict is stacked on dim 0
  (E, …), so expert parallelism can split and gather checkpoints by expert id;
- ``shared_base``: every expert is one base MLP plus its own adapters (a mixture of
  LoRA experts), so the ``shared_base`` path runs the base once per token.

Shapes: R rows, N rows of one expert, D model dim, E experts.
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import Tensor, nn

from ..compute.paths import rows_one_expert_at_a_time


class Experts(nn.Module):
    """Base class of every experts kind; see the module docstring for the contract."""

    stacked_mlp: ClassVar[bool] = False
    shardable: ClassVar[bool] = False
    shared_base: ClassVar[bool] = False
    num_experts: int

    def forward(self, x_RD: Tensor, counts_E: Tensor) -> Tensor:
        """Rows sorted by expert → their experts' outputs (default: one expert at a time)."""
        if type(self).forward_expert is Experts.forward_expert:
            raise NotImplementedError(f"{type(self).__name__} must implement forward or forward_expert")
        return rows_one_expert_at_a_time(self, x_RD, counts_E)

    def forward_expert(self, e: int, x_ND: Tensor) -> Tensor:
        """Expert e on its rows (default: the rows form with every row sent to e)."""
        if type(self).forward is Experts.forward:
            raise NotImplementedError(f"{type(self).__name__} must implement forward or forward_expert")
        counts_E = torch.zeros(self.num_experts, dtype=torch.long, device=x_ND.device)
        counts_E[e] = x_ND.shape[0]
        return self(x_ND, counts_E)

    def run(self, compute, *args):
        """``compute(self, *args)``: the MoE layer calls its compute path through this method, so
        that a wrapper preparing the weights before each use (FSDP's all-gather,
        ``moekit.parallel.fully_shard_model``) sees every use."""
        return compute(self, *args)

    def shard(self, first: int, count: int) -> Experts:
        """Experts [first, first + count) as a new module, for expert parallelism."""
        raise TypeError(
            f"{type(self).__name__} cannot be sharded over expert-parallel ranks: its class does not "
            "declare shardable = True with a shard(first, count) method"
        )
