"""Hash routing (Roller et al. 2021, "Hash Layers For Large Sparse Models").

Each token id is sent to one expert by a fixed random mapping drawn once from
``hash_seed``: a random permutation of the ids dealt round-robin to the
experts, so every expert owns ⌊V/E⌋ or ⌈V/E⌉ ids. Nothing is learned; the
combine weight is 1. ``MoE.forward(x, token_ids=...)`` supplies the ids.

Shapes: T tokens, D model dim, E experts, K = 1 expert per token, V vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from ..compute.precision import gate_dtype
from .base import Router, RouterOptions
from .records import Routing


@dataclass(kw_only=True)
class HashOptions(RouterOptions):
    """Args:
        vocab_size: number of token ids the fixed mapping covers (required).
        seed: seed of the fixed random mapping.
    """

    flat_names: ClassVar[dict[str, str]] = {"vocab_size": "hash_vocab_size", "seed": "hash_seed"}
    vocab_size: int | None = None
    seed: int = 0

    def validate(self, *, num_experts: int, top_k: int) -> None:
        if isinstance(self.vocab_size, bool) or not isinstance(self.vocab_size, int) or self.vocab_size < 1:
            raise ValueError(
                f"router 'hash' needs hash_vocab_size, a positive int (the number of token ids); "
                f"got {self.vocab_size!r}"
            )
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise ValueError(f"hash_seed ({self.seed!r}) must be an int")


def hash_table(vocab_size: int, num_experts: int, seed: int) -> Tensor:
    """Expert of every token id (V,), long: a seeded random, balanced mapping."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(vocab_size, generator=generator) % num_experts


class HashRouter(Router):
    Options = HashOptions
    needs_token_ids = True
    default_top_k = 1
    top_k_fixed = True

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.vocab_size = self.options.vocab_size
        self.register_buffer("expert_of_token_V", hash_table(self.vocab_size, self.num_experts, self.options.seed))

    def forward(self, x_TD: Tensor, *, valid_T: Tensor | None = None, sequence_length: int | None = None,
                token_ids_T: Tensor | None = None) -> Routing:
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
        dtype = gate_dtype(x_TD)
        indices_TK = self.expert_of_token_V[ids_T][:, None]
        weights_TK = torch.ones(T, 1, dtype=dtype, device=x_TD.device)
        probs_TE = torch.zeros(T, self.num_experts, dtype=dtype, device=x_TD.device)
        probs_TE.scatter_(1, indices_TK, 1.0)
        return Routing(indices_TK=indices_TK, weights_TK=weights_TK, logits_TE=None, probs_TE=probs_TE,
                       valid_T=valid_T)

    def extra_repr(self) -> str:
        return f"vocab_size={self.vocab_size}, num_experts={self.num_experts}, seed={self.options.seed}"
