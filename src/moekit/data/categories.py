"""Token categories for the specialisation analysis.

Python source is labelled by Python's own `tokenize` module; each character
takes the category of the Python token that covers it (characters between
tokens are whitespace), and a model token takes the most common category
among its non-whitespace characters. Other text falls back to character
classes.
"""

from __future__ import annotations

import io
import keyword
import token as token_types
import tokenize
import unicodedata

import numpy as np

PYTHON_CATEGORIES = ("keyword", "name", "operator", "number", "string", "comment", "whitespace", "other")
CHAR_CATEGORIES = ("letter", "digit", "punctuation", "whitespace", "other")

_PY = {name: i for i, name in enumerate(PYTHON_CATEGORIES)}
_STRING_TYPES = {token_types.STRING} | {
    getattr(token_types, n) for n in ("FSTRING_START", "FSTRING_MIDDLE", "FSTRING_END") if hasattr(token_types, n)
}
_WHITESPACE_TYPES = {token_types.NEWLINE, token_types.NL, token_types.INDENT, token_types.DEDENT}


def _python_token_category(tok: tokenize.TokenInfo) -> int:
    if tok.type == token_types.NAME:
        return _PY["keyword"] if keyword.iskeyword(tok.string) or keyword.issoftkeyword(tok.string) else _PY["name"]
    if tok.type == token_types.OP:
        return _PY["operator"]
    if tok.type == token_types.NUMBER:
        return _PY["number"]
    if tok.type in _STRING_TYPES:
        return _PY["string"]
    if tok.type == token_types.COMMENT:
        return _PY["comment"]
    if tok.type in _WHITESPACE_TYPES:
        return _PY["whitespace"]
    return _PY["other"]


def python_char_categories(text: str) -> np.ndarray:
    """Category index of every character of Python source (whitespace between tokens)."""
    cats = np.full(len(text), _PY["whitespace"], dtype=np.uint8)
    line_starts = [0]
    for line in text.splitlines(keepends=True):
        line_starts.append(line_starts[-1] + len(line))

    def offset(row: int, col: int) -> int:
        return line_starts[row - 1] + col if row - 1 < len(line_starts) else len(text)

    try:
        for tok in tokenize.generate_tokens(io.StringIO(text).readline):
            if tok.type in (token_types.ENDMARKER, token_types.INDENT, token_types.DEDENT):
                continue
            start, end = offset(*tok.start), offset(*tok.end)
            cats[start:end] = _python_token_category(tok)
    except (tokenize.TokenError, SyntaxError):
        pass  # the part before the error keeps its labels; the rest stays whitespace-or-other
    # Non-space characters no token covered (after a tokenize error) are "other".
    uncovered = (cats == _PY["whitespace"]) & ~np.array([c.isspace() for c in text], dtype=bool)
    cats[uncovered] = _PY["other"]
    return cats


def char_class_categories(text: str) -> np.ndarray:
    """Character-class category of every character, for text that is not Python."""
    out = np.empty(len(text), dtype=np.uint8)
    for i, ch in enumerate(text):
        if ch.isspace():
            out[i] = 3
        elif ch.isalpha():
            out[i] = 0
        elif ch.isdigit():
            out[i] = 1
        elif unicodedata.category(ch).startswith(("P", "S")):
            out[i] = 2
        else:
            out[i] = 4
    return out


def token_categories(
    char_cats: np.ndarray, offsets: list[tuple[int, int]], whitespace: int
) -> np.ndarray:
    """One category per model token: the commonest among its non-whitespace characters."""
    out = np.full(len(offsets), whitespace, dtype=np.uint8)
    for i, (start, end) in enumerate(offsets):
        span = char_cats[start:end]
        span = span[span != whitespace]
        if span.size:
            out[i] = np.bincount(span).argmax()
    return out


def categorize(text: str, offsets: list[tuple[int, int]], is_python: bool) -> np.ndarray:
    """Categories (indices into PYTHON_CATEGORIES or CHAR_CATEGORIES) of a text's tokens."""
    if is_python:
        return token_categories(python_char_categories(text), offsets, _PY["whitespace"])
    return token_categories(char_class_categories(text), offsets, CHAR_CATEGORIES.index("whitespace"))
