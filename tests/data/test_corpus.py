import sysconfig

import pytest

from moekit.data import DataError, load_corpus


def test_stdlib_corpus_is_split_by_file_deterministically_and_records_its_origin():
    a, b = load_corpus(), load_corpus()
    train_names, val_names = {d.name for d in a.train}, {d.name for d in a.val}
    assert train_names.isdisjoint(val_names)
    assert [d.name for d in a.val] == [d.name for d in b.val]
    assert a.info["file_list_sha256"] == b.info["file_list_sha256"]
    assert a.info["python_version"] == sysconfig.get_python_version() + "." + a.info["python_version"].split(".")[2]
    assert a.is_python and "os.py" in train_names | val_names
    assert not any("site-packages" in n or n.startswith("test/") for n in train_names | val_names)
    assert 0.01 < len(a.val) / (len(a.train) + len(a.val)) < 0.15


def test_a_file_keeps_its_split_when_other_files_come_and_go(corpus_dir, tmp_path):
    full = load_corpus(str(corpus_dir), val_fraction=0.3)
    for doc in full.train[:3]:
        (tmp_path / doc.name).write_text(doc.text)
    for doc in full.val:
        (tmp_path / doc.name).write_text(doc.text)
    part = load_corpus(str(tmp_path), val_fraction=0.3)
    assert {d.name for d in part.val} == {d.name for d in full.val}


def test_folder_glob_and_single_file_sources(corpus_dir):
    folder = load_corpus(str(corpus_dir), val_fraction=0.2)
    glob = load_corpus(str(corpus_dir / "*.py"), val_fraction=0.2)
    assert [d.name for d in folder.train] == [d.name for d in glob.train]
    single = load_corpus(str(corpus_dir / "textwrap.py"), val_fraction=0.1)
    text = (corpus_dir / "textwrap.py").read_text()
    assert single.train[0].text + single.val[0].text == text
    assert single.train[0].text.endswith("\n") and 0.05 < single.val_chars / len(text) < 0.15


def test_missing_path_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match=r"--data path '.*nope' does not exist; expected a text file, a folder or a glob"):
        load_corpus(str(tmp_path / "nope"))


def test_empty_folder_is_a_clear_error(tmp_path):
    with pytest.raises(DataError, match="holds no text files"):
        load_corpus(str(tmp_path))


def test_binary_file_is_a_clear_error(tmp_path):
    (tmp_path / "weights.txt").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    with pytest.raises(DataError, match=r"weights.txt' looks binary .*expected UTF-8 text"):
        load_corpus(str(tmp_path / "weights.txt"))


def test_non_utf8_file_is_a_clear_error(tmp_path):
    (tmp_path / "latin1.txt").write_bytes("café au lait\n".encode("latin-1") * 10)
    with pytest.raises(DataError, match="is not UTF-8 text"):
        load_corpus(str(tmp_path))


def test_glob_matching_nothing_and_files_with_only_whitespace(tmp_path):
    with pytest.raises(DataError, match="matches no files"):
        load_corpus(str(tmp_path / "*.txt"))
    (tmp_path / "blank.txt").write_text("  \n\n")
    with pytest.raises(DataError, match="only empty files"):
        load_corpus(str(tmp_path))
