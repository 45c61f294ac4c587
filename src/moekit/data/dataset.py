"""Token streams and batches.

Documents are encoded and joined into one stream per split, each followed by
the end-of-text token. Training batch ``step`` is a pure function of
(seed, step), so a resumed run reads exactly the batches it would have read.
Validation uses fixed windows spread evenly over the validation stream.

Shapes: B batch, S sequence length, N tokens in a stream.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from .categories import CHAR_CATEGORIES, PYTHON_CATEGORIES, categorize
from .corpus import Corpus, DataError


def encode_documents(tokenizer, texts: list[str]) -> Tensor:
    """One int64 stream (N,) of all documents, each ended by end-of-text."""
    pieces = []
    for ids in tokenizer.encode_batch(texts):
        pieces.append(np.asarray(ids, dtype=np.int64))
        pieces.append(np.asarray([tokenizer.eot_id], dtype=np.int64))
    return torch.from_numpy(np.concatenate(pieces)) if pieces else torch.zeros(0, dtype=torch.long)


@dataclass
class TokenData:
    train_N: Tensor
    val_N: Tensor

    def check_fits(self, context_length: int) -> None:
        for split, stream in (("training", self.train_N), ("validation", self.val_N)):
            if stream.numel() < context_length + 1:
                raise DataError(
                    f"the {split} split has {stream.numel()} tokens, fewer than context_length + 1 "
                    f"({context_length + 1}); give more text or a shorter --context-length"
                )


def tokenize_corpus(corpus: Corpus, tokenizer) -> TokenData:
    return TokenData(
        encode_documents(tokenizer, [d.text for d in corpus.train]),
        encode_documents(tokenizer, [d.text for d in corpus.val]),
    )


def training_batch(train_N: Tensor, batch_size: int, context_length: int, seed: int, step: int) -> tuple[Tensor, Tensor]:
    """Inputs and next-token targets (B, S) at random offsets drawn from (seed, step) alone."""
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    starts_B = torch.randint(0, train_N.numel() - context_length, (batch_size,), generator=generator)
    windows_BS = torch.stack([train_N[s : s + context_length + 1] for s in starts_B.tolist()])
    return windows_BS[:, :-1], windows_BS[:, 1:]


def validation_batches(
    val_N: Tensor, batch_size: int, context_length: int, max_batches: int
) -> list[tuple[Tensor, Tensor]]:
    """Up to max_batches fixed batches of non-overlapping windows spread over the stream."""
    num_windows = (val_N.numel() - 1) // context_length
    wanted = min(num_windows, batch_size * max_batches)
    if wanted == 0:
        raise DataError(f"the validation split ({val_N.numel()} tokens) is shorter than one context window")
    picks = torch.linspace(0, num_windows - 1, wanted).round().long().unique().tolist()
    windows = torch.stack([val_N[i * context_length : i * context_length + context_length + 1] for i in picks])
    return [(w[:, :-1], w[:, 1:]) for w in windows.split(batch_size)]


@dataclass
class CategorizedTokens:
    """Validation tokens with one category each, for routing analysis."""

    ids_N: Tensor
    categories_N: Tensor  # indices into `names`
    names: tuple[str, ...]


def categorized_validation(corpus: Corpus, tokenizer, max_tokens: int) -> CategorizedTokens:
    """The first max_tokens validation tokens (whole documents, eot between) with categories."""
    ids, cats = [], []
    names = PYTHON_CATEGORIES if corpus.is_python else CHAR_CATEGORIES
    other = names.index("other")
    for doc in corpus.val:
        doc_ids, offsets = tokenizer.encode_with_offsets(doc.text)
        ids.extend(doc_ids)
        cats.extend(categorize(doc.text, offsets, corpus.is_python).tolist())
        ids.append(tokenizer.eot_id)
        cats.append(other)
        if len(ids) >= max_tokens:
            break
    return CategorizedTokens(
        torch.tensor(ids[:max_tokens], dtype=torch.long), torch.tensor(cats[:max_tokens], dtype=torch.long), names
    )
