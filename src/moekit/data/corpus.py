"""Text corpora: the embedded default (Python's standard library) or the user's files.

A corpus is a sorted list of text files split into training and validation by
file, deterministically: a file goes to validation when a hash of its relative
path falls under the validation fraction, so the split does not depend on the
order files are found or on which other files exist. A single file is split by
position instead (its last part is the validation text).
"""

from __future__ import annotations

import glob
import hashlib
import platform
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

# Folders of the standard library that are not its own source, or that are mostly
# tables (codec maps, the pydoc topic dump) and would teach the model little.
_STDLIB_SKIP = {
    "site-packages",
    "dist-packages",
    "__pycache__",
    "test",
    "tests",
    "idle_test",
    "encodings",
    "pydoc_data",
}
# The embedded held-out domain: the standard library's own test suites, which the default
# corpus leaves out (``_STDLIB_SKIP``). A fixed share of them keeps fine-tuning quick.
STDLIB_TESTS = "stdlib-tests"
_STDLIB_TEST_DIRS = {"test", "tests", "idle_test"}
STDLIB_TESTS_MAX_BYTES = 1_500_000
_TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".text", ".csv", ".json", ".html", ".xml", ".tex"}
_BINARY_SNIFF_BYTES = 8192


class DataError(ValueError):
    """A --data path that cannot be used, with the reason and what was expected."""


@dataclass
class Document:
    name: str  # path relative to the corpus root, or the file name
    text: str


@dataclass
class Corpus:
    """Training and validation documents, and what identifies them."""

    source: str  # "stdlib" or the --data argument
    train: list[Document]
    val: list[Document]
    is_python: bool  # every document is Python source (token categories from `tokenize`)
    info: dict = field(default_factory=dict)

    @property
    def train_chars(self) -> int:
        return sum(len(d.text) for d in self.train)

    @property
    def val_chars(self) -> int:
        return sum(len(d.text) for d in self.val)


def _in_validation(name: str, val_fraction: float) -> bool:
    digest = hashlib.sha256(name.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2**64 < val_fraction


def _file_list_hash(names_and_sizes: list[tuple[str, int]]) -> str:
    h = hashlib.sha256()
    for name, size in names_and_sizes:
        h.update(f"{name}\0{size}\n".encode())
    return h.hexdigest()[:16]


def stdlib_files() -> tuple[Path, list[Path]]:
    """The running interpreter's standard-library .py files, sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [
        p
        for p in root.rglob("*.py")
        if not (_STDLIB_SKIP & set(p.relative_to(root).parts[:-1])) and p.is_file()
    ]
    return root, sorted(files, key=lambda p: p.relative_to(root).as_posix())


def stdlib_test_files(max_bytes: int = STDLIB_TESTS_MAX_BYTES) -> tuple[Path, list[Path]]:
    """Test-suite .py files of the standard library, about ``max_bytes`` of them, sorted.

    Files are taken in the order of a hash of their path until ``max_bytes``, so the
    choice is a fixed spread over all suites, whatever the interpreter's layout."""
    root = Path(sysconfig.get_paths()["stdlib"])
    found = [p for p in root.rglob("*.py") if p.is_file() and "site-packages" not in p.parts
             and _STDLIB_TEST_DIRS & set(p.relative_to(root).parts[:-1])]
    if not found:
        raise DataError(f"--data {STDLIB_TESTS}: this Python ({root}) was installed without the standard "
                        "library's test suites; pass --data with text of your own")
    chosen, total = [], 0
    # Salted: the validation split hashes the bare path, and must not see only the first files.
    for path in sorted(found, key=lambda p: hashlib.sha256(b"held-out:" + p.relative_to(root).as_posix().encode()).digest()):
        if total >= max_bytes:
            break
        chosen.append(path)
        total += path.stat().st_size
    return root, sorted(chosen, key=lambda p: p.relative_to(root).as_posix())


def _read_text(path: Path) -> str:
    """The file's text, or a DataError when it is not UTF-8 text."""
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"cannot read --data file {str(path)!r}: {err.strerror}") from None
    if b"\0" in raw[:_BINARY_SNIFF_BYTES]:
        raise DataError(
            f"--data file {str(path)!r} looks binary (it contains NUL bytes); expected UTF-8 text"
        )
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(
            f"--data file {str(path)!r} is not UTF-8 text (invalid byte at offset {err.start}); "
            "expected UTF-8 text"
        ) from None


def resolve_data_files(data: str) -> tuple[Path, list[Path]]:
    """The files a --data argument names: a file, a folder (searched recursively) or a glob."""
    path = Path(data).expanduser()
    if any(ch in data for ch in "*?["):
        files = sorted(Path(p) for p in glob.glob(str(path), recursive=True) if Path(p).is_file())
        if not files:
            raise DataError(f"--data glob {data!r} matches no files; expected a pattern matching text files")
        depth = _glob_fixed_depth(data)
        return (Path(*Path(data).parts[:depth]) if depth else Path(".")), files
    if not path.exists():
        raise DataError(f"--data path {data!r} does not exist; expected a text file, a folder or a glob")
    if path.is_file():
        return path.parent, [path]
    if path.is_dir():
        files = sorted(
            p for p in path.rglob("*") if p.is_file() and (p.suffix.lower() in _TEXT_SUFFIXES or not p.suffix)
            and not any(part.startswith(".") for part in p.relative_to(path).parts)
        )
        if not files:
            raise DataError(
                f"--data folder {data!r} holds no text files (looked for {', '.join(sorted(_TEXT_SUFFIXES))} "
                "or files without a suffix)"
            )
        return path, files
    raise DataError(f"--data path {data!r} is neither a file nor a folder")


def _glob_fixed_depth(pattern: str) -> int:
    """How many leading path parts of a glob hold no wildcard."""
    depth = 0
    for part in Path(pattern).parts:
        if any(ch in part for ch in "*?["):
            break
        depth += 1
    return depth


def load_corpus(data: str | None = None, val_fraction: float = 0.05) -> Corpus:
    """Read the corpus that --data names (None: the standard library) and split it."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction ({val_fraction}) must be in (0, 1)")
    if data is None:
        root, files = stdlib_files()
        source = "stdlib"
    elif data == STDLIB_TESTS and not Path(data).exists():
        root, files = stdlib_test_files()
        source = data
    else:
        root, files = resolve_data_files(data)
        source = data
    documents = []
    for path in files:
        embedded = data is None or source == STDLIB_TESTS
        text = path.read_text(encoding="utf-8", errors="replace") if embedded else _read_text(path)
        name = path.relative_to(root).as_posix() if path.is_relative_to(root) else path.name
        if text.strip():
            documents.append(Document(name, text))
    if not documents:
        raise DataError(f"--data {source!r} holds only empty files; expected some text")
    if len(documents) == 1:
        # One file: split by position, at a line break near the split point.
        doc = documents[0]
        cut = doc.text.rfind("\n", 0, int(len(doc.text) * (1 - val_fraction))) + 1 or int(
            len(doc.text) * (1 - val_fraction)
        )
        train, val = [Document(doc.name, doc.text[:cut])], [Document(doc.name + "#val", doc.text[cut:])]
    else:
        train = [d for d in documents if not _in_validation(d.name, val_fraction)]
        val = [d for d in documents if _in_validation(d.name, val_fraction)]
        if not val:  # few files: take the last one rather than have no validation
            val = [train.pop()]
        if not train:
            train = [val.pop(0)]
    info = {
        "source": source,
        "python_version": platform.python_version(),
        "num_files": len(documents),
        "file_list_sha256": _file_list_hash([(d.name, len(d.text)) for d in documents]),
        "train_files": len(train),
        "val_files": len(val),
        "val_fraction": val_fraction,
    }
    is_python = all(d.name.split("#")[0].endswith(".py") for d in documents)
    corpus = Corpus(source, train, val, is_python, info)
    info["train_chars"], info["val_chars"] = corpus.train_chars, corpus.val_chars
    if corpus.val_chars == 0 or corpus.train_chars == 0:
        raise DataError(f"--data {source!r} is too small to split into training and validation text")
    return corpus
