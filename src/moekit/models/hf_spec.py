"""The model section of a run that fine-tunes a Hugging Face MoE model read from a local folder.

A moekit run's config.json describes its language model with ``LMConfig``; a run that
``moekit finetune`` started from a transformers ``save_pretrained`` folder describes it
with ``HFModelSpec``: the folder (read again on resume), the context length it trains
at, the vocabulary, and the adapters added (``AdapterConfig``). The model itself is
the converted transformers model (``moekit.interop.hf_lm``), built by the command.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .adapters import AdapterConfig


@dataclass(kw_only=True)
class HFModelSpec:
    """A converted transformers causal LM from ``folder``, trained at ``context_length``.

    Args:
        folder: the local ``save_pretrained`` folder (absolute path).
        context_length: tokens per training window.
        vocab_size: the model's vocabulary (at least the tokenizer's).
        adapter: the adapters fine-tuning added, or None (full fine-tuning).
    """

    folder: str
    vocab_size: int
    context_length: int = 128
    adapter: AdapterConfig | None = None
    kind: str = "hf"

    def __post_init__(self) -> None:
        if isinstance(self.adapter, dict):
            self.adapter = AdapterConfig(**self.adapter)
        if self.kind != "hf":
            raise ValueError(f"kind ({self.kind!r}) must be 'hf'")
        for name in ("vocab_size", "context_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} ({value!r}) must be a positive integer")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)
