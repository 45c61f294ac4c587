from moekit.data import CHAR_CATEGORIES, PYTHON_CATEGORIES, ByteTokenizer
from moekit.data.categories import categorize, python_char_categories, token_categories

SOURCE = 'if x1 >= 2.5:  # why\n    s = "hi"\n'


def test_python_characters_take_their_tokenize_category():
    cats = [PYTHON_CATEGORIES[c] for c in python_char_categories(SOURCE)]
    by_char = dict(zip(range(len(SOURCE)), cats, strict=True))
    assert by_char[0] == by_char[1] == "keyword"  # if
    assert by_char[3] == by_char[4] == "name"  # x1
    assert by_char[6] == by_char[7] == "operator"  # >=
    assert {by_char[i] for i in range(9, 12)} == {"number"}  # 2.5
    assert by_char[12] == "operator"  # :
    assert {by_char[i] for i in range(15, 20)} == {"comment"}  # # why
    assert by_char[2] == by_char[20] == "whitespace"  # a space, the newline
    assert {by_char[i] for i in range(29, 33)} == {"string"}  # "hi"


def test_each_token_gets_the_commonest_non_whitespace_category():
    tok = ByteTokenizer()
    ids, offsets = tok.encode_with_offsets(SOURCE)
    cats = [PYTHON_CATEGORIES[c] for c in categorize(SOURCE, offsets, is_python=True)]
    assert cats[:3] == ["keyword", "keyword", "whitespace"]
    # A merged token " x1" (offsets over space and name) is a name, not whitespace.
    from moekit.data.categories import python_char_categories as chars
    merged = token_categories(chars(SOURCE), [(2, 5), (5, 8), (20, 25)], PYTHON_CATEGORIES.index("whitespace"))
    assert [PYTHON_CATEGORIES[c] for c in merged] == ["name", "operator", "whitespace"]


def test_unfinished_python_keeps_labels_before_the_error():
    cats = [PYTHON_CATEGORIES[c] for c in python_char_categories('x = (1,\n"""open')]
    assert cats[0] == "name" and cats[4] == "operator"
    assert "other" in cats[8:] or "string" in cats[8:]


def test_other_text_falls_back_to_character_classes():
    text = "Hi 42!"
    _, offsets = ByteTokenizer().encode_with_offsets(text)
    cats = [CHAR_CATEGORIES[c] for c in categorize(text, offsets, is_python=False)]
    assert cats == ["letter", "letter", "whitespace", "digit", "digit", "punctuation"]
