"""Corpora, tokenizers, token categories and batches for language-model training."""

from .categories import CHAR_CATEGORIES, PYTHON_CATEGORIES
from .corpus import Corpus, DataError, Document, load_corpus
from .dataset import (
    CategorizedTokens,
    TokenData,
    categorized_validation,
    tokenize_corpus,
    training_batch,
    validation_batches,
)
from .tokenizer import BPETokenizer, ByteTokenizer, build_tokenizer, load_tokenizer

__all__ = [
    "CHAR_CATEGORIES",
    "PYTHON_CATEGORIES",
    "BPETokenizer",
    "ByteTokenizer",
    "CategorizedTokens",
    "Corpus",
    "DataError",
    "Document",
    "TokenData",
    "build_tokenizer",
    "categorized_validation",
    "load_corpus",
    "load_tokenizer",
    "tokenize_corpus",
    "training_batch",
    "validation_batches",
]
