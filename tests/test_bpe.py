"""Byte-level BPE (models/bpe.py): lossless round trip, merges computed by hand, the fast encoder against the
slow reference (every merge applied in rank order), special tokens, save/load, errors."""

import json
import os
import re

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models import corpus
from models.bpe import PATTERN, SPECIALS, Tokenizer, _merge, _to_bytes

TINY = "the cat sat on the mat. the hat is on the cat; that cat has a hat!\n\n" * 3 + "über café 日本語 \ud800 123 4567"


@pytest.fixture(scope="module")
def tiny():
    return Tokenizer.train(TINY, 256 + 60 + len(SPECIALS))


@pytest.fixture(scope="module")
def shipped():
    return corpus.tokenizer()


def reference_encode(tok, text):
    """The slow reference: pre-split, then every merge applied in rank order to each word's bytes."""
    ids = []
    for word in re.findall(PATTERN, text):
        w = list(_to_bytes(word))
        for r, pair in enumerate(tok.merges):
            w = _merge(w, pair, 256 + r)
        ids += w
    return ids


def test_merges_by_hand():
    # "aaabdaaabac" (one word): aa:4 -> 256; then Za:2 and ab:2 tie, the smaller pair (97, 98) -> 257; then
    # (256, 257):2 -> 258 ("XdXac"); then every pair occurs once, the smallest is (97, 99) "ac" -> 259.
    tok = Tokenizer.train("aaabdaaabac", 256 + 4 + len(SPECIALS))
    assert tok.merges == [(97, 97), (97, 98), (256, 257), (97, 99)]
    assert tok.encode("aaabdaaabac") == [258, 100, 258, 259]
    assert tok.vocab[258] == b"aaab"
    assert tok.special == {s: 260 + i for i, s in enumerate(SPECIALS)} and tok.vocab_size == 265


def test_merges_stay_inside_words():
    # words "ab", " ab", " ab", " ab": (a, b) occurs 4 times, (" ", a) 3 times; after both, " ab" is one token
    tok = Tokenizer.train("ab ab ab ab", 256 + 3 + len(SPECIALS))
    assert tok.merges == [(97, 98), (32, 256)]  # stopped early: every word is a single token
    assert tok.encode("ab ab") == [256, 257] and tok.vocab_size == 258 + len(SPECIALS)
    assert Tokenizer.train("a<|endoftext|>a", 256 + 1 + 5).merges == []  # specials are cut out before counting


def test_training_matches_naive_recount():
    """The incremental pair counts give the same merges as recounting every pair from scratch each step."""
    from collections import Counter

    rng = np.random.default_rng(0)
    for _ in range(30):
        text = "".join(rng.choice(list("aab cd\n."), size=int(rng.integers(0, 80))))
        n = int(rng.integers(0, 25))
        words = [list(_to_bytes(w)) for w in re.findall(PATTERN, text)]
        merges = []
        for r in range(n):
            c = Counter(p for w in words for p in zip(w, w[1:]))
            if not c:
                break
            pair = min(p for p in c if c[p] == max(c.values()))
            merges.append(pair)
            words = [_merge(w, pair, 256 + r) for w in words]
        assert Tokenizer.train(text, 256 + n + len(SPECIALS)).merges == merges, text


@settings(max_examples=300, deadline=None)
@given(st.text())
def test_round_trip_any_text(shipped, s):
    assert "".join(re.findall(PATTERN, s)) == s  # the pre-split drops nothing
    assert shipped.decode(shipped.encode(s)) == s
    assert shipped.decode(shipped.encode(s, allowed_special="none")) == s


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=st.characters(), min_size=0, max_size=200) | st.sampled_from([TINY, corpus.EOT + "x"]))
def test_encode_equals_reference(shipped, tiny, s):
    for tok in (shipped, tiny):
        assert tok.encode(s, allowed_special="none") == reference_encode(tok, s)


def test_encode_equals_reference_on_corpus(shipped):
    text = corpus.text("val")[:5000]
    assert shipped.encode(text, allowed_special="none") == reference_encode(shipped, text)
    ids = shipped.encode(text)
    assert len(ids) < len(text.encode()) / 3.3  # the merges compress real text (about 4 bytes a token)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=40))
def test_decode_invalid_bytes_like_replace(shipped, b):
    """Any byte string decodes: as surrogatepass would where that succeeds, else as errors="replace" would
    where it holds no encoded surrogate."""
    out = shipped.decode(list(b))
    try:
        assert out == b.decode("utf-8", errors="surrogatepass")
    except UnicodeDecodeError:
        if not re.search(rb"\xed[\xa0-\xbf]", b):
            assert out == b.decode("utf-8", errors="replace")


def test_surrogates(shipped):
    s = "a\ud800b\udfff \ud83d\ude00😀"  # lone surrogates and a surrogate pair that is not "😀"
    ids = shipped.encode(s)
    assert shipped.decode(ids) == s and shipped.decode(list(b"\xed\xa0\x80")) == "\ud800"
    assert shipped.decode(list(b"\xff")) == "\ufffd"


def test_special_tokens(shipped):
    sp = shipped.special
    assert list(sp) == list(SPECIALS) and sorted(sp.values()) == list(range(shipped.vocab_size - 5, shipped.vocab_size))
    s = "a [MASK] circle<|endoftext|>[CLS]"
    ids = shipped.encode(s)
    assert ids.count(sp["[MASK]"]) == 1 and ids[-2:] == [sp["<|endoftext|>"], sp["[CLS]"]]
    none = shipped.encode(s, allowed_special="none")
    assert not set(none) & set(sp.values()) and shipped.decode(none) == s
    only = shipped.encode(s, allowed_special={"[MASK]"})
    assert set(only) & set(sp.values()) == {sp["[MASK]"]} and shipped.decode(only) == s
    assert shipped.encode("[MASK][MASK]") == [sp["[MASK]"]] * 2
    assert shipped.token_to_id("[SEP]") == sp["[SEP]"] and shipped.id_to_token(sp["[SEP]"]) == b"[SEP]"
    assert shipped.token_to_id(" the") == shipped.encode(" the")[0]
    assert shipped.encode_batch(["a b", "[PAD]"]) == [shipped.encode("a b"), [sp["[PAD]"]]]
    assert shipped.decode(np.array(ids, dtype=np.int32)) == s  # NumPy ids decode too


def test_save_load(tiny, tmp_path):
    path = tmp_path / "tok.json"
    tiny.save(path)
    assert os.listdir(tmp_path) == ["tok.json"]  # written atomically: no temporary file left behind
    back = Tokenizer.load(path)
    assert back == tiny and back.vocab == tiny.vocab and back.special == tiny.special
    assert back.encode(TINY) == tiny.encode(TINY)
    d = json.loads(path.read_text())
    d["format"] = "other"
    path.write_text(json.dumps(d))
    with pytest.raises(ValueError, match="not a bpe-v1"):
        Tokenizer.load(path)


def test_shipped_file(shipped):
    assert shipped.vocab_size == corpus.VOCAB_SIZE == 4096 and len(shipped.merges) == 4096 - 256 - 5
    assert shipped == Tokenizer.load(corpus.WEIGHTS)


def test_errors(shipped, tiny):
    n = shipped.vocab_size
    for bad in ([n], [-1], [1.0], ["a"]):
        with pytest.raises(ValueError, match=r"decode: ids must be ints in \[0, 4096\)"):
            shipped.decode(bad)
    with pytest.raises(TypeError, match="encode: text must be a str"):
        shipped.encode(b"bytes")
    with pytest.raises(ValueError, match="unknown token"):
        shipped.encode("x", allowed_special={"[NOPE]"})
    with pytest.raises(ValueError, match="allowed_special must be"):
        shipped.encode("x", allowed_special="some")
    with pytest.raises(TypeError, match="encode_batch"):
        shipped.encode_batch("abc")
    with pytest.raises(ValueError, match="vocab_size must be an int >= 256"):
        Tokenizer.train("abc", 260)
    with pytest.raises(ValueError, match="merge 0"):
        Tokenizer([(256, 1)])
    with pytest.raises(ValueError, match="special tokens must be distinct"):
        Tokenizer([], ["[A]", "[A]"])
    with pytest.raises(ValueError, match="id_to_token"):
        tiny.id_to_token(tiny.vocab_size)
    with pytest.raises(KeyError, match="not one token"):
        shipped.token_to_id("not a single token at all")


def test_bad_arguments_name_themselves():
    """A str as special tokens would be split into characters (every "P" of later text a special id); a NumPy int
    vocab size is an int; a bad merge or file says what is wrong."""
    with pytest.raises(TypeError, match="special_tokens must be a sequence of str"):
        Tokenizer.train("abab", 262, special_tokens="[PAD]")
    with pytest.raises(TypeError, match="special tokens must be a sequence of str"):
        Tokenizer([], "[PAD]")
    assert Tokenizer.train("abab" * 5, np.int64(258), special_tokens=()).vocab_size == 258
    with pytest.raises(ValueError, match=r"merge 0 = \(97, 98, 99\) must join two ids"):
        Tokenizer([(97, 98, 99)])
