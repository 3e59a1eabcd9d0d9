"""Byte-level byte-pair encoding (BPE), trained here: the tokenizer of GPT-2 (Radford et al. 2019, section 2.2),
which applies Sennrich et al. (2016)'s merges to UTF-8 bytes instead of characters.

    tok = Tokenizer.train(text, vocab_size=4096)     # learns vocab_size - 256 - len(specials) merges
    ids = tok.encode("a small red circle")           # list of ints
    tok.decode(ids) == "a small red circle"          # for every str (see "Lossless" below)
    tok.special["<|endoftext|>"]                     # the id of a special token

How it works:
- Pre-split: the text is cut into "words" by PATTERN (GPT-2's, written for the standard `re` module: letters
  are `[^\\W\\d_]`, numbers `\\d`, and everything else that is not a space is "other"; a word keeps its leading
  space). Merges never cross a word boundary, so " the" is learned once, not once per neighbour.
- Vocabulary: ids 0..255 are the 256 byte values, so any text can be encoded with no unknown token; id 256 + r
  is the token made by merge r (the concatenation of the bytes of its two parts); the special tokens come last.
- Training (Sennrich et al. 2016, Algorithm 1): count every adjacent pair of ids inside every word (weighted by
  the word's count), merge the most frequent pair everywhere into a new id, repeat. Ties go to the smallest pair
  (lexicographic on the two ids), so training is deterministic. Counting is incremental: only the words that hold
  the merged pair are rewritten, and only their pairs' counts change (a heap with lazy deletion finds the max).
- Encoding a word: merge the adjacent pair of lowest merge rank, repeat until no pair is a merge. This equals
  applying every merge in rank order (a merge only creates pairs of higher rank), the slow reference the tests
  check against. Words are cached, so encoding costs about one dict lookup per word.
- Special tokens ("<|endoftext|>", "[PAD]", "[CLS]", "[SEP]", "[MASK]") have their own ids; their text in the
  input becomes that id only when `allowed_special` allows it, else it is encoded as ordinary text.

Lossless: a Python str may hold lone surrogates ("\\ud800"), which strict UTF-8 cannot encode. Text is encoded
with errors="surrogatepass" (a surrogate becomes its 3-byte form ED A0..BF 80..BF), and decoding turns those
bytes back into the surrogate, so decode(encode(s)) == s for every str. Any other invalid byte sequence (a model
may emit ids that split a character) decodes to U+FFFD, as errors="replace" would.
"""

from __future__ import annotations

import codecs
import heapq
import json
import os
import re
import tempfile
from collections import Counter, defaultdict

# GPT-2's pre-split (Radford et al. 2019; \p{L} -> [^\W\d_], \p{N} -> \d, [^\s\p{L}\p{N}] -> [^\s\w]|_).
PATTERN = r"""'(?:s|t|re|ve|m|ll|d)| ?[^\W\d_]+| ?\d+| ?(?:[^\s\w]|_)+|\s+(?!\S)|\s+"""
SPECIALS = ("<|endoftext|>", "[PAD]", "[CLS]", "[SEP]", "[MASK]")
FORMAT = "bpe-v1"  # the "format" field of a saved tokenizer


def _surrogate_or_replace(e):
    """Decoding error handler: an encoded surrogate (ED A0..BF 80..BF) becomes the surrogate itself (as with
    "surrogatepass"); any other invalid byte becomes U+FFFD (as with "replace")."""
    if not isinstance(e, UnicodeDecodeError):
        raise e
    b = e.object[e.start:e.start + 3]
    if len(b) == 3 and b[0] == 0xED and 0xA0 <= b[1] <= 0xBF and 0x80 <= b[2] <= 0xBF:
        return chr(0xD000 | (b[1] & 0x3F) << 6 | (b[2] & 0x3F)), e.start + 3
    return "\ufffd", e.end


codecs.register_error("bpe.surrogate_or_replace", _surrogate_or_replace)


def _to_bytes(s):
    """UTF-8 bytes of `s`, lone surrogates included (see "Lossless" in the module docstring)."""
    return s.encode("utf-8", errors="surrogatepass")


def _merge(ids, pair, new):
    """`ids` with every non-overlapping occurrence of `pair` (left to right) replaced by `new`."""
    out, i, n = [], 0, len(ids)
    while i < n:
        if i < n - 1 and ids[i] == pair[0] and ids[i + 1] == pair[1]:
            out.append(new)
            i += 2
        else:
            out.append(ids[i])
            i += 1
    return out


def _words(text, specials):
    """The pre-split words of `text`, with the text of every special token removed first (never merged)."""
    parts = re.split("|".join(map(re.escape, sorted(specials, key=len, reverse=True))), text) if specials else [text]
    return [w for part in parts for w in re.findall(PATTERN, part)]


class Tokenizer:
    """A byte-level BPE tokenizer: `merges` (list of id pairs, in rank order) and `special` (name -> id).

    Build one with `Tokenizer.train` or `Tokenizer.load`; the constructor checks the merges are consistent.
    """

    def __init__(self, merges, special=SPECIALS):
        merges = [tuple(int(i) for i in m) for m in merges]
        if isinstance(special, str):
            raise TypeError(f"Tokenizer: special tokens must be a sequence of str, got the str {special!r}")
        vocab = [bytes([i]) for i in range(256)]
        for r, m in enumerate(merges):
            if len(m) != 2 or not (0 <= m[0] < 256 + r and 0 <= m[1] < 256 + r):
                raise ValueError(f"Tokenizer: merge {r} = {m} must join two ids below {256 + r}")
            vocab.append(vocab[m[0]] + vocab[m[1]])
        if isinstance(special, dict):  # from a saved file: the ids must be the ones this class would give
            names = sorted(special, key=special.get)
            if [special[n] for n in names] != list(range(len(vocab), len(vocab) + len(names))):
                raise ValueError(f"Tokenizer: special ids must follow the {len(vocab)} ids of bytes and merges, "
                                 f"got {special}")
            special = names
        if len(set(special)) != len(special) or not all(isinstance(s, str) and s for s in special):
            raise ValueError(f"Tokenizer: special tokens must be distinct non-empty str, got {special!r}")
        self.merges = merges
        self.ranks = {m: r for r, m in enumerate(merges)}
        self.special = {s: len(vocab) + i for i, s in enumerate(special)}
        self.vocab = vocab + [_to_bytes(s) for s in special]  # id -> bytes (a special's bytes are its text)
        self._cache = {}  # pre-split word -> its ids
        self._split = {}  # frozenset of allowed specials -> compiled regex that isolates them

    @property
    def vocab_size(self):
        """Number of ids: 256 bytes + merges + special tokens."""
        return len(self.vocab)

    # --- training -----------------------------------------------------------------------------------------

    @classmethod
    def train(cls, text, vocab_size, special_tokens=SPECIALS):
        """Learn vocab_size - 256 - len(special_tokens) merges from `text` (see the module docstring).

        Stops early (fewer merges, a smaller vocab_size) when every word has become a single token; raises
        ValueError when vocab_size leaves no room for the 256 bytes and the specials.
        """
        if not isinstance(text, str):
            raise TypeError(f"Tokenizer.train: text must be a str, got {type(text).__name__}")
        if isinstance(special_tokens, str):  # (tuple() would split it into characters)
            raise TypeError(f"Tokenizer.train: special_tokens must be a sequence of str, got the str "
                            f"{special_tokens!r}")
        special_tokens = tuple(special_tokens)
        if not _is_int(vocab_size) or vocab_size - 256 - len(special_tokens) < 0:
            raise ValueError(f"Tokenizer.train: vocab_size must be an int >= 256 + {len(special_tokens)} specials, "
                             f"got {vocab_size!r}")
        n_merges = int(vocab_size) - 256 - len(special_tokens)
        counts = Counter(_words(text, special_tokens))
        words = [list(_to_bytes(w)) for w in counts]
        freq = list(counts.values())
        pairs = defaultdict(int)  # pair -> weighted count over all words
        where = defaultdict(set)  # pair -> indices of the words that hold it (may be stale: checked on use)
        for i, w in enumerate(words):
            for p in zip(w, w[1:]):
                pairs[p] += freq[i]
                where[p].add(i)
        heap = [(-c, p) for p, c in pairs.items()]
        heapq.heapify(heap)
        merges = []
        while len(merges) < n_merges and heap:
            c, pair = heapq.heappop(heap)
            if pairs.get(pair, 0) != -c:  # a stale entry: the count changed since it was pushed
                continue
            new = 256 + len(merges)
            merges.append(pair)
            changed = set()
            for i in where.pop(pair):
                w = words[i]
                merged = _merge(w, pair, new)
                if len(merged) == len(w):
                    continue
                for p in zip(w, w[1:]):
                    pairs[p] -= freq[i]
                    changed.add(p)
                for p in zip(merged, merged[1:]):
                    pairs[p] += freq[i]
                    changed.add(p)
                    where[p].add(i)
                words[i] = merged
            del pairs[pair]
            changed.discard(pair)
            for p in changed:
                if pairs[p] > 0:
                    heapq.heappush(heap, (-pairs[p], p))
                else:
                    del pairs[p]
                    where.pop(p, None)
        return cls(merges, special_tokens)

    # --- encoding and decoding ----------------------------------------------------------------------------

    def _encode_word(self, word):
        """Ids of one pre-split word: merge the lowest-rank adjacent pair until none is a merge (cached)."""
        ids = self._cache.get(word)
        if ids is not None:
            return ids
        ids = list(_to_bytes(word))
        ranks = self.ranks
        while len(ids) > 1:
            pair = min(zip(ids, ids[1:]), key=lambda p: ranks.get(p, 1 << 62))
            if pair not in ranks:
                break
            ids = _merge(ids, pair, 256 + ranks[pair])
        if len(self._cache) < 1 << 20:
            self._cache[word] = ids
        return ids

    def _allowed(self, allowed_special):
        """The set of special tokens that `allowed_special` ("all", "none" or a set of names) lets through."""
        if allowed_special == "all":
            return frozenset(self.special)
        if allowed_special == "none":
            return frozenset()
        if not isinstance(allowed_special, (set, frozenset, list, tuple)):
            raise ValueError(f"encode: allowed_special must be 'all', 'none' or a set of special tokens, "
                             f"got {allowed_special!r}")
        unknown = set(allowed_special) - set(self.special)
        if unknown:
            raise ValueError(f"encode: allowed_special has unknown token(s) {sorted(unknown)}; "
                             f"special tokens: {list(self.special)}")
        return frozenset(allowed_special)

    def encode(self, text, *, allowed_special="all"):
        """The ids of `text` (a str). The text of a special token in `allowed_special` ("all", the default;
        "none"; or a set of names) becomes that token's id; any other text is encoded byte-level."""
        if not isinstance(text, str):
            raise TypeError(f"encode: text must be a str, got {type(text).__name__}")
        allowed = self._allowed(allowed_special)
        parts = [text]
        if allowed:
            split = self._split.get(allowed)
            if split is None:
                names = sorted(allowed, key=len, reverse=True)  # longest first: one special may contain another
                split = self._split[allowed] = re.compile("(" + "|".join(map(re.escape, names)) + ")")
            parts = split.split(text)  # odd positions hold the specials
        ids = []
        for k, part in enumerate(parts):
            if k % 2:
                ids.append(self.special[part])
            else:
                for word in re.findall(PATTERN, part):
                    ids.extend(self._encode_word(word))
        return ids

    def encode_batch(self, texts, *, allowed_special="all"):
        """`encode` of each text in `texts` (a list of lists of ids)."""
        if isinstance(texts, str):
            raise TypeError("encode_batch: texts must be a list of str, got a single str (use encode)")
        return [self.encode(t, allowed_special=allowed_special) for t in texts]

    def decode(self, ids):
        """The text of `ids`: their bytes joined, then decoded from UTF-8 (encoded surrogates come back as
        surrogates, other invalid bytes as U+FFFD; see "Lossless" in the module docstring)."""
        vocab = self.vocab
        ids = list(ids)
        if not all(map(_is_int, ids)) or (ids and not 0 <= min(ids) <= max(ids) < len(vocab)):
            bad = [i for i in ids if not _is_int(i) or not 0 <= i < len(vocab)]
            raise ValueError(f"decode: ids must be ints in [0, {len(vocab)}), got {bad[:5]}")
        data = b"".join([vocab[i] for i in ids])
        return data.decode("utf-8", errors="bpe.surrogate_or_replace")

    def id_to_token(self, i):
        """The bytes of token `i` (a special token's bytes are its UTF-8 text)."""
        if not _is_int(i) or not 0 <= int(i) < len(self.vocab):
            raise ValueError(f"id_to_token: id must be an int in [0, {len(self.vocab)}), got {i!r}")
        return self.vocab[int(i)]

    def token_to_id(self, token):
        """The id of `token`: a special token's name, or the exact bytes (or str) of one vocabulary entry."""
        if isinstance(token, str) and token in self.special:
            return self.special[token]
        b = _to_bytes(token) if isinstance(token, str) else bytes(token)
        if not hasattr(self, "_ids"):
            self._ids = {v: i for i, v in enumerate(self.vocab[:256 + len(self.merges)])}
        if b not in self._ids:
            raise KeyError(f"token_to_id: {token!r} is not one token of this vocabulary")
        return self._ids[b]

    # --- saving and loading -------------------------------------------------------------------------------

    def to_dict(self):
        """The JSON-able form: format, pattern, merges (rank order) and specials (name -> id)."""
        return {"format": FORMAT, "pattern": PATTERN, "merges": [list(m) for m in self.merges],
                "special": dict(self.special)}

    def save(self, path):
        """Write the tokenizer as JSON to `path` atomically (a temporary file renamed over it)."""
        path = os.fspath(path)
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(os.path.abspath(path)), suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self.to_dict(), f, separators=(",", ":"))
                f.write("\n")
            umask = os.umask(0)
            os.umask(umask)
            os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes it private; give it a normal file's mode
            os.replace(tmp, path)
        except BaseException:
            os.unlink(tmp)
            raise

    @classmethod
    def load(cls, path):
        """Read a tokenizer written by `save`."""
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
        if not isinstance(d, dict) or d.get("format") != FORMAT or not {"pattern", "merges", "special"} <= set(d):
            raise ValueError(f"Tokenizer.load: {path} is not a {FORMAT} tokenizer file (format, pattern, merges, "
                             "special)")
        if d["pattern"] != PATTERN:
            raise ValueError(f"Tokenizer.load: {path} was trained with another pre-split pattern")
        return cls(d["merges"], d["special"])

    def __eq__(self, other):
        return isinstance(other, Tokenizer) and self.merges == other.merges and self.special == other.special

    def __repr__(self):
        return f"Tokenizer(vocab_size={self.vocab_size}, merges={len(self.merges)}, special={list(self.special)})"


def _is_int(i):
    """True for Python and NumPy integers (not bool, not float)."""
    return hasattr(i, "__index__") and not isinstance(i, bool)
