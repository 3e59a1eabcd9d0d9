"""The text corpus (models/corpus.py): sizes and hashes, a fixed split by document, determinism, token ids."""

import hashlib
import sys

import numpy as np
import pytest

from models import corpus
from models.bpe import Tokenizer

EXACT = sys.version.split()[0] == corpus.PYTHON  # sizes and hashes were measured on this exact version


def test_sizes_and_hashes():
    for split in corpus.SPLITS:
        data = corpus.text(split).encode("utf-8")
        if EXACT:
            assert len(data) == corpus.SIZES[split] and hashlib.sha256(data).hexdigest() == corpus.SHA256[split]
            assert len(corpus.documents(split)) == corpus.DOCUMENTS[split]
        assert 0.5 * corpus.SIZES[split] < len(data) < 2 * corpus.SIZES[split]
    train, val = len(corpus.text("train")), len(corpus.text("val"))
    assert 1_000_000 < train + val < 3_000_000 and 0.05 < val / (train + val) < 0.2


def test_split_is_by_document_and_fixed():
    docs = corpus._all_documents()
    names = {s: [n for n, _ in docs[s]] for s in corpus.SPLITS}
    assert not set(names["train"]) & set(names["val"]) and all(len(set(v)) == len(v) for v in names.values())
    for split, ns in names.items():
        assert all(corpus.split_of(n) == split for n in ns if not n.startswith("shapes."))
    doc = [n for n in names["train"] if not n.startswith("shapes.")]
    assert 0.85 < len(doc) / (len(doc) + sum(not n.startswith("shapes.") for n in names["val"])) < 0.95
    assert len(names["train"]) - len(doc) == corpus.CAPTIONS["train"]


def test_split_of_is_the_documented_rule():
    """The first 8 bytes of sha256(name), big-endian, mod 10 (the docstring once said the whole digest)."""
    for name in ("json.dumps#0", "abc.ABCMeta#0", "email.message.Message.get#0"):
        head = int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big")
        assert corpus.split_of(name) == ("val" if head % 10 == 0 else "train")
    names = [n for s in corpus.SPLITS for n, _ in corpus._all_documents()[s] if not n.startswith("shapes.")]
    val = {n for n in names if int.from_bytes(hashlib.sha256(n.encode()).digest()[:8], "big") % 10 == 0}
    assert [corpus.split_of(n) == "val" for n in names] == [n in val for n in names]


def test_documents_are_sentences():
    docs = corpus.documents("train")
    text = corpus.text("train")
    assert corpus.EOT.join("".join(d) for d in docs) == text
    assert sum(len(d) > 1 for d in docs) > 2000  # many documents hold consecutive sentence pairs (for NSP)
    assert corpus.sentences("One. Two?  Three\n\nFour.\n\nFive") == ["One.", " Two?", "  Three", "\n\nFour.",
                                                                       "\n\nFive"]
    assert corpus.sentences("") == [] and corpus.sentences("e.g.x") == ["e.g.x"]
    tok = corpus.tokenizer()  # sentence by sentence, the ids of the whole document
    for d in docs[:300] + corpus.documents("val")[:300]:
        assert [i for s in d for i in tok.encode(s, allowed_special="none")] == tok.encode("".join(d),
                                                                                      allowed_special="none")
    docs[0].append("mutated")  # callers get copies
    assert corpus.documents("train")[0] != docs[0]


def test_deterministic():
    """Same sources, same order, same split on every build (the whole text is pinned by SHA256 above)."""
    assert corpus._sources() == corpus._sources() and len(corpus._sources()) > len(corpus.MODULES)
    assert [corpus.split_of(f"json.dumps#{k}") for k in range(3)] == [corpus.split_of(f"json.dumps#{k}")
                                                                     for k in range(3)]
    assert corpus._docstrings("abc", corpus._sources()[0][1]) == corpus._docstrings("abc", corpus._sources()[0][1])


def test_tokens():
    tok = corpus.tokenizer()
    assert corpus.tokenizer() is tok  # loaded once
    for split in corpus.SPLITS:
        ids = corpus.tokens(split)
        assert ids.dtype == np.int32 and ids.ndim == 1 and not ids.flags.writeable
        assert ids.min() >= 0 and ids.max() < tok.vocab_size
        assert (ids == tok.special[corpus.EOT]).sum() == len(corpus.documents(split)) - 1
        assert not np.isin(ids, [tok.special[s] for s in ("[PAD]", "[CLS]", "[SEP]", "[MASK]")]).any()
        assert corpus.tokens(split) is ids
    val = corpus.tokens("val")
    assert tok.decode(val) == corpus.text("val")
    assert 3.0 < len(corpus.text("val").encode()) / len(val) < 6.0  # bytes per token of the shipped BPE


def test_bad_split():
    for f in (corpus.text, corpus.documents, corpus.tokens):
        with pytest.raises(ValueError, match="split must be one of"):
            f("test")


@pytest.mark.slow
def test_shipped_tokenizer_equals_retrain():
    assert corpus.train_tokenizer() == Tokenizer.load(corpus.WEIGHTS)


def test_sentence_ids_are_the_sentences_ids():
    tok, docs = corpus.tokenizer(), corpus.documents("val")
    enc = corpus.sentence_ids("val")
    assert len(enc) == len(docs)
    for d, e in list(zip(docs, enc))[::5]:
        assert [tok.encode(s, allowed_special="none") for s in d] == list(e)
