"""Tokenizers: byte-level BPE trained with the `tokenizers` library, or raw bytes.

Both end every document with an end-of-text token, ``eot_id``, so that the
model learns where files end and generation can stop there. A trained BPE
tokenizer is saved as ``tokenizer.json`` in the run folder and read back from
there on resume, so a run never depends on re-training giving the same merges.
"""

from __future__ import annotations

import json
from pathlib import Path

EOT = "<|endoftext|>"


class ByteTokenizer:
    """Token = one UTF-8 byte (0-255); 256 is end-of-text."""

    kind = "bytes"

    def __init__(self) -> None:
        self.vocab_size = 257
        self.eot_id = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [self.encode(t) for t in texts]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        """Ids and, for each, the (start, end) character span it came from."""
        ids, offsets = [], []
        for i, ch in enumerate(text):
            b = ch.encode("utf-8")
            ids.extend(b)
            offsets.extend([(i, i + 1)] * len(b))
        return ids, offsets

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def token_text(self, token_id: int) -> str:
        return EOT if token_id == self.eot_id else repr(bytes([token_id]))[2:-1]

    def save(self, path: Path) -> None:
        path.write_text(json.dumps({"moekit_tokenizer": "bytes"}))


# End-of-sequence tokens of common Hugging Face tokenizers (Llama/Mistral, Qwen, Llama 3, Gemma).
_OTHER_EOS_TOKENS = ("</s>", "<|im_end|>", "<|end_of_text|>", "<eos>")


class BPETokenizer:
    """Byte-level BPE (GPT-2 style pre-tokenisation) from the `tokenizers` library."""

    kind = "bpe"

    def __init__(self, tokenizer) -> None:
        self._tok = tokenizer
        self.vocab_size = tokenizer.get_vocab_size()
        # moekit's own, else the end-of-sequence token of a Hugging Face model's tokenizer.
        self.eot_id = next((i for i in map(tokenizer.token_to_id, (EOT, *_OTHER_EOS_TOKENS)) if i is not None), None)
        if self.eot_id is None:
            raise ValueError(f"the tokenizer has no end-of-text token ({EOT} or one of "
                             f"{', '.join(_OTHER_EOS_TOKENS)}) to separate documents with")

    @classmethod
    def train(cls, texts: list[str], vocab_size: int) -> BPETokenizer:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

        if vocab_size < 257 + 1:
            raise ValueError(f"vocab_size ({vocab_size}) must be > 257 for byte-level BPE; use --tokenizer bytes for raw bytes")
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=[EOT],
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(texts, trainer=trainer, length=len(texts))
        return cls(tok)

    @classmethod
    def load(cls, path: Path) -> BPETokenizer:
        from tokenizers import Tokenizer

        return cls(Tokenizer.from_file(str(path)))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts)]

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        enc = self._tok.encode(text)
        return enc.ids, enc.offsets

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=False)

    def token_text(self, token_id: int) -> str:
        return self._tok.decode([token_id], skip_special_tokens=False)

    def save(self, path: Path) -> None:
        self._tok.save(str(path))


def load_tokenizer(path: Path) -> ByteTokenizer | BPETokenizer:
    """Read the tokenizer a run folder saved."""
    try:
        data = json.loads(Path(path).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ValueError(f"{str(path)!r} is not valid JSON ({error}); it may have been cut off") from None
    if data.get("moekit_tokenizer") == "bytes":
        return ByteTokenizer()
    return BPETokenizer.load(path)


def build_tokenizer(kind: str, train_texts: list[str], vocab_size: int, max_chars: int | None = None):
    """A new tokenizer: ``bytes``, or ``bpe`` trained on (the first max_chars of) the training texts."""
    if kind == "bytes":
        return ByteTokenizer()
    if kind != "bpe":
        raise ValueError(f"tokenizer ({kind!r}) must be 'bpe' or 'bytes'")
    if max_chars is not None:
        sample, total = [], 0
        for text in train_texts:
            if total >= max_chars:
                break
            sample.append(text[: max_chars - total])
            total += len(sample[-1])
        train_texts = sample
    return BPETokenizer.train(train_texts, vocab_size)
