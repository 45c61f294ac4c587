from moekit.data import ByteTokenizer, build_tokenizer, load_tokenizer

TEXT = 'def f(x):\n    """Doc — ünïcode."""\n    return x + 1  # done\n'


def test_bpe_round_trips_text_and_learns_merges(corpus_dir, tmp_path):
    texts = [p.read_text() for p in sorted(corpus_dir.glob("*.py"))]
    tok = build_tokenizer("bpe", texts, vocab_size=400)
    assert tok.vocab_size == 400
    ids = tok.encode(TEXT)
    assert tok.decode(ids) == TEXT
    assert len(ids) < len(TEXT.encode()) * 0.8  # merges make it shorter than bytes
    tok.save(tmp_path / "tokenizer.json")
    again = load_tokenizer(tmp_path / "tokenizer.json")
    assert again.encode(TEXT) == ids and again.eot_id == tok.eot_id


def test_bytes_tokenizer_is_utf8_bytes_plus_end_of_text(tmp_path):
    tok = ByteTokenizer()
    assert tok.encode("é") == [0xC3, 0xA9]
    assert tok.decode(tok.encode(TEXT) + [tok.eot_id]) == TEXT
    ids, offsets = tok.encode_with_offsets("aé")
    assert ids == [97, 0xC3, 0xA9] and offsets == [(0, 1), (1, 2), (1, 2)]
    tok.save(tmp_path / "t.json")
    assert isinstance(load_tokenizer(tmp_path / "t.json"), ByteTokenizer)
