"""Hash routing (Roller et al. 2021, "Hash Layers For Large Sparse Models").

Each token id is sent to one expert by a fixed random mapping drawn once from
``hash_seed``: a random permutation of the ids dealt round-robin to the
experts, so every expert owns ⌊V/E⌋ or ⌈V/E⌉ ids. Nothing is learned; the
combine weight is 1. ``MoE.forward(x, token_ids=...)`` supplies the ids.

Shapes: T tokens, D model dim, E experts, K = 1 expert per token, V vocabulary.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..config import MoEConfig
from .base import Router, Routing


def hash_table(vocab_size: int, num_experts: int, seed: int) -> Tensor:
    """Expert of every token id (V,), long: a seeded random, balanced mapping."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(vocab_size, generator=generator) % num_experts


class HashRouter(Router):
    def __init__(self, config: MoEConfig):
        super().__init__(config)
        # No learned gate: drop the base class's weight so no optimizer sees it.
        del self.weight
        self.vocab_size = config.hash_vocab_size
        self.register_buffer("expert_of_token_V", hash_table(config.hash_vocab_size, config.num_experts, config.hash_seed))

    def forward(
        self,
        x_TD: Tensor,
        *,
        valid_T: Tensor | None = None,
        token_ids_T: Tensor | None = None,
        **kwargs,
    ) -> Routing:
        T = x_TD.shape[0]
        if token_ids_T is None:
            raise ValueError(
                "router 'hash' routes by token id: call MoE.forward(x, token_ids=...) with a long "
                "tensor of shape x.shape[:-1]"
            )
        if token_ids_T.dtype not in (torch.int64, torch.int32) or token_ids_T.shape != (T,):
            raise TypeError(
                f"token ids must be an int64/int32 tensor of {T} ids; got {token_ids_T.dtype} "
                f"of shape {tuple(token_ids_T.shape)}"
            )
        ids_T = token_ids_T.long()
        if valid_T is not None:
            ids_T = torch.where(valid_T, ids_T, 0)  # padding may carry any id
        # NOTE: the range check syncs with the device.
        if bool(((ids_T < 0) | (ids_T >= self.vocab_size)).any()):
            bad = ids_T[(ids_T < 0) | (ids_T >= self.vocab_size)][0].item()
            raise ValueError(f"token id {bad} is outside the hash table's range [0, {self.vocab_size})")
        dtype = torch.float64 if x_TD.dtype == torch.float64 else torch.float32
        indices_TK = self.expert_of_token_V[ids_T][:, None]
        weights_TK = torch.ones(T, 1, dtype=dtype, device=x_TD.device)
        probs_TE = torch.zeros(T, self.num_experts, dtype=dtype, device=x_TD.device)
        probs_TE.scatter_(1, indices_TK, 1.0)
        return Routing(
            indices_TK=indices_TK,
            weights_TK=weights_TK,
            logits_TE=None,
            probs_TE=probs_TE,
            valid_T=valid_T,
        )

    def extra_repr(self) -> str:
        return f"vocab_size={self.vocab_size}, num_experts={self.num_experts}, seed={self.config.hash_seed}"
