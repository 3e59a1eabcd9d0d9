"""The text corpus: real English that needs no download, and the tokenizer trained on it.

    from models import corpus
    tok = corpus.tokenizer()             # the shipped byte-level BPE (models/weights/bpe.json), loaded once
    ids = corpus.tokens("train")         # int32 array: every document encoded, joined by <|endoftext|>
    docs = corpus.documents("val")       # list of documents, each a list of sentences
    sents = corpus.sentence_ids("val")   # the same documents, each sentence as its token ids
    text = corpus.text("train")          # the documents' text joined by "<|endoftext|>"

What it holds:
- Docstrings (module, class and function docstrings, as `ast.get_docstring` cleans them, in source order) of
  the pure-Python standard-library modules in MODULES and of every .py file of the packages in PACKAGES (test
  folders left out), read from the installed sources (`sysconfig.get_paths()["stdlib"]`). Modules removed from
  later Pythons are not in the lists. Each docstring is one document.
- Captions of the shapes dataset (models/shapes.py): CAPTIONS["train"] captions of its "train" stream and
  CAPTIONS["val"] of its "test" stream, one document each (the captions only; the scenes do not depend on the
  resolution, so they are drawn at 4×4 to skip rendering). Captions come from a few templates, so many val
  captions also occur in train.

A document is a list of sentences whose concatenation is its text exactly (breaks after ".", "!" or "?" followed
by whitespace, and before blank lines; the whitespace between two sentences starts the second, so the sentences'
ids, encoded one by one, are the document's). BERT's next-sentence pairs are made of consecutive sentences.

Split: a docstring goes to "val" when the first 8 bytes of the sha256 of its name (e.g.
"json.decoder.JSONDecoder.decode#0"), read as a big-endian integer, are 0 mod 10, else to "train": fixed, by
document, about 90/10, and a document's split does not depend on any other.

Measured on Python 3.11.7 (PYTHON below; CI runs 3.11, whose docstrings may differ in another patch release, so
`test_corpus` checks SHA256 only on that exact version): train 1,379,380 bytes (4,794 docstrings + 4,500
captions), val 174,108 bytes (528 + 500); SIZES and SHA256 (of the UTF-8 of text(split)) below. The shipped
tokenizer (VOCAB_SIZE = 4096 ids: 256 bytes, 3,835 merges, 5 specials; trained in about 2 s) makes about 4.0
bytes per token: about 340k tokens of train text, 44k of val.
`python -m models.corpus` prints them; `python -m models.corpus --check` re-trains the tokenizer from
text("train") and checks it equals the shipped models/weights/bpe.json; `--write` regenerates that file.
"""

from __future__ import annotations

import argparse
import ast
import functools
import hashlib
import os
import re
import sys
import sysconfig

import numpy as np

from models.bpe import Tokenizer

MODULES = (
    "abc argparse ast base64 bdb bisect bz2 cProfile calendar cmd code codecs codeop colorsys compileall "
    "configparser contextlib contextvars copy copyreg csv dataclasses datetime decimal difflib dis doctest enum "
    "filecmp fileinput fnmatch fractions ftplib functools genericpath getopt getpass gettext glob graphlib gzip "
    "hashlib heapq hmac imaplib inspect io ipaddress keyword linecache locale lzma mailbox mimetypes modulefinder "
    "netrc ntpath nturl2path numbers opcode operator optparse os pathlib pdb pickle pickletools pkgutil platform "
    "plistlib poplib posixpath pprint profile pstats pty py_compile pyclbr pydoc queue quopri random reprlib "
    "rlcompleter runpy sched secrets selectors shelve shlex shutil signal site smtplib socket socketserver ssl stat "
    "statistics string stringprep struct subprocess symtable sysconfig tabnanny tarfile tempfile textwrap threading "
    "timeit token tokenize trace traceback tracemalloc tty turtle types typing uuid warnings wave weakref "
    "webbrowser zipapp zipfile zipimport").split()  # fmt: skip
PACKAGES = ("asyncio collections concurrent email http importlib json logging unittest urllib wsgiref xml "
            "xmlrpc").split()  # fmt: skip
CAPTIONS = {"train": 4500, "val": 500}
SPLITS = ("train", "val")
EOT = "<|endoftext|>"
VOCAB_SIZE = 4096
WEIGHTS = os.path.join(os.path.dirname(__file__), "weights", "bpe.json")

PYTHON = "3.11.7"  # the version SIZES and SHA256 were measured on
SIZES = {"train": 1379380, "val": 174108}  # bytes of text(split), UTF-8
SHA256 = {"train": "e7830e052e1f1e4fa6f37e089461a20966736f6d55f12f0dcc32b1257f7ed1ec",
          "val": "77850179382d168ac1f141af259da0fb096312c58b4362a0e7bdd221e5a1fe84"}
DOCUMENTS = {"train": 9294, "val": 1028}  # 4,794 + 4,500 captions; 528 + 500 captions


def _sources():
    """(module name, path) of every source file read, in a fixed order."""
    root = sysconfig.get_paths()["stdlib"]
    out = [(m, os.path.join(root, m + ".py")) for m in MODULES]
    for pkg in PACKAGES:
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, pkg)):
            dirnames[:] = sorted(d for d in dirnames if d not in ("test", "tests", "__pycache__"))
            for f in sorted(filenames):
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(dirpath, f[:-3]), root)
                    out.append((rel.replace(os.sep, ".").removesuffix(".__init__"), os.path.join(dirpath, f)))
    return out


def _docstrings(module, path):
    """(name, docstring) of the module, class and function docstrings of one source file, in source order."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), path)
    out = []

    def visit(node, prefix):
        doc = ast.get_docstring(node)
        if doc and doc.strip():
            out.append((prefix, doc))
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                visit(child, f"{prefix}.{child.name}")

    visit(tree, module)
    return out


def sentences(doc):
    """`doc` cut into sentences whose concatenation is `doc`: a break after ".", "!" or "?" followed by
    whitespace, and before a blank line. The whitespace between two sentences starts the second, where the
    tokenizer's pre-split puts it (" Next" is one word), so encoding the sentences one by one gives the ids of
    the whole document."""
    cuts = {m.start() + 1 for m in re.finditer(r"[.!?]\s", doc)} | {m.start() for m in re.finditer(r"\n\s*\n", doc)}
    bounds = [0] + sorted(c for c in cuts if 0 < c < len(doc)) + [len(doc)]
    return [doc[a:b] for a, b in zip(bounds, bounds[1:])] if doc else []


@functools.lru_cache(maxsize=1)
def _all_documents():
    """{split: [(name, document), ...]} for both splits (built once); a caption's name is "shapes.<stream>#<i>"."""
    from models.data import shapes

    docs = {s: [] for s in SPLITS}
    seen = {}
    for module, path in _sources():
        if not os.path.exists(path):
            raise FileNotFoundError(f"corpus: the standard-library source {path} is missing (MODULES/PACKAGES)")
        for name, doc in _docstrings(module, path):
            k = seen[name] = seen.get(name, -1) + 1  # a name defined twice (e.g. per platform) gets #0, #1
            docs[split_of(f"{name}#{k}")].append((f"{name}#{k}", sentences(doc)))
    for split, stream in (("train", "train"), ("val", "test")):
        captions = shapes(CAPTIONS[split], 4, seed=0, split=stream, supersample=1).captions
        docs[split] += [(f"shapes.{stream}#{i}", [c]) for i, c in enumerate(captions)]
    return docs


def split_of(name):
    """The split of the docstring named `name`: "val" when the first 8 bytes of sha256(name), as a big-endian
    integer, are 0 mod 10, else "train" (not the whole digest mod 10: that would move about 1 in 5 names)."""
    return "val" if int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "big") % 10 == 0 else "train"


def _check(split):
    if split not in SPLITS:
        raise ValueError(f"corpus: split must be one of {SPLITS}, got {split!r}")


def documents(split):
    """The documents of `split` ("train" or "val"): a list of documents, each a list of sentences (str)."""
    _check(split)
    return [list(d) for _, d in _all_documents()[split]]


def text(split):
    """The text of `split`: its documents joined by "<|endoftext|>"."""
    _check(split)
    return EOT.join("".join(d) for _, d in _all_documents()[split])


@functools.lru_cache(maxsize=1)
def tokenizer():
    """The shipped tokenizer (models/weights/bpe.json: VOCAB_SIZE ids trained on text("train")), loaded once."""
    return Tokenizer.load(WEIGHTS)


@functools.lru_cache(maxsize=2)
def _tokens(split):
    tok = tokenizer()
    eot = tok.special[EOT]
    ids = []
    for _, d in _all_documents()[split]:
        ids.extend(tok.encode("".join(d), allowed_special="none"))
        ids.append(eot)
    out = np.array(ids[:-1], dtype=np.int32)
    out.flags.writeable = False
    return out


def tokens(split):
    """The ids of `split` (int32, read-only, cached): each document encoded with no special tokens allowed (so
    text such as "[MASK]" inside a docstring stays text), documents joined by the <|endoftext|> id."""
    _check(split)
    return _tokens(split)


@functools.lru_cache(maxsize=2)
def sentence_ids(split):
    """The documents of `split` as sentences of token ids (tuples of lists, cached: do not change them), cut out
    of tokens(split) at the sentences' byte offsets (a sentence's ids are the ids of its text, see `sentences`);
    BERT's next-sentence pairs are drawn from them."""
    tok, docs = tokenizer(), documents(split)
    ids = tokens(split)
    ends = np.cumsum(np.array([len(v) for v in tok.vocab])[ids])  # byte offset where each token ends
    eot = len(EOT.encode())
    cuts, at = [], 0  # byte offsets where the sentences end, in text(split)
    for d in docs:
        for sentence in d:
            at += len(sentence.encode("utf-8", errors="surrogatepass"))
            cuts.append(at)
        at += eot
    cuts = np.array(cuts)
    index = np.searchsorted(ends, cuts, side="right")  # tokens ending at or before each cut
    if not np.array_equal(ends[index - 1], cuts) or at - eot != ends[-1]:
        raise AssertionError(f"corpus: tokens({split!r}) does not break at the sentences' ends")
    ids, out, k, prev = ids.tolist(), [], 0, 0
    for d in docs:
        sents = []
        for _ in d:
            sents.append(ids[prev : index[k]])
            prev = index[k]
            k += 1
        out.append(tuple(sents))
        prev += 1  # the <|endoftext|> between documents
    return tuple(out)


def train_tokenizer(vocab_size=VOCAB_SIZE):
    """Train the tokenizer from text("train") (what models/weights/bpe.json holds, for vocab_size=VOCAB_SIZE)."""
    return Tokenizer.train(text("train"), vocab_size)


def main(argv=None):
    """`python -m models.corpus [--check | --write]`: print the corpus' sizes and hashes; re-train the tokenizer."""
    p = argparse.ArgumentParser(prog="python -m models.corpus", description=main.__doc__)
    g = p.add_mutually_exclusive_group()
    g.add_argument("--check", action="store_true", help="re-train the tokenizer; exit 1 unless it equals bpe.json")
    g.add_argument("--write", action="store_true", help="re-train the tokenizer and write it to bpe.json")
    args = p.parse_args(argv)
    print(f"python {sys.version.split()[0]}")
    for split in SPLITS:
        data = text(split).encode("utf-8")
        sha = hashlib.sha256(data).hexdigest()
        print(f"{split}: {len(documents(split))} documents, {len(data)} bytes, sha256 {sha}")
    if args.check or args.write:
        import time

        t = time.perf_counter()
        tok = train_tokenizer()
        print(f"trained {tok} in {time.perf_counter() - t:.1f} s")
        if args.write:
            tok.save(WEIGHTS)
            print(f"wrote {WEIGHTS}")
        elif tok != Tokenizer.load(WEIGHTS):
            print(f"re-trained tokenizer differs from {WEIGHTS}")
            return 1
        else:
            print(f"re-trained tokenizer equals {WEIGHTS}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
