"""Structured attention patterns, evaluated inside the kernels instead of materialized as masks.

DALL·E (Ramesh et al. 2021, appendix B.1 and figure 11) attends over T text tokens followed by a W×W grid
of image tokens in raster order; besides plain causal attention it uses three sparse causal patterns
over the image part. ERNIE-ViLG (Zhang et al. 2021) uses a prefix-LM mask: a bidirectional prefix
followed by causal tokens. With q the flat index of the query and k that of the key:

- ``Causal()``: k ≤ q (top-left aligned, PyTorch's ``is_causal``: ``tril(ones(L, S))``).
- The image patterns: text queries (q < T) see the keys k ≤ q; image queries see every text key and,
  among image keys, only k ≤ q and
  - ``Row(T, W)``: q − k ≤ W (the current row so far and the previous row's tail);
  - ``Column(T, W)``: (q − k) mod W == 0 (the same column in every earlier row);
  - ``Conv(T, W, kernel=s)``, r = s // 2: row(q) − row(k) ≤ r and the cyclic column distance
    min(|Δc|, W − |Δc|) ≤ r (a causal s×s neighbourhood that wraps around the grid's sides).
- ``PrefixLM(P)``: keys k < P are visible to every query, keys k ≥ P only causally (k ≤ q).

Each pattern offers three views of the same rule:

- ``mask(n)``: the dense (n, n) boolean matrix (True = may attend), for tests and pictures;
- ``params``: the plain integers ``(kind, T, W, r, P)`` that the kernels take (Numba and CUDA kernels
  need scalars, not Python objects), and which the scalar rules below evaluate;
- ``tile_may_attend(q0, q1, k0, k1)``: False only when no query in [q0, q1) may see any key in [k0, k1),
  so that the kernels skip the whole tile.

``visible`` and ``tile_may_attend`` are written once, as plain scalar Python, and compiled three ways:
as they are (here), by ``numba.njit`` (``cpu.py``) and as ``numba.cuda`` device functions (``cuda.py``).
"""

import numpy as np

# Pattern kinds, the first of the integers passed to the kernels.
NONE, CAUSAL, ROW, COLUMN, CONV, PREFIX = 0, 1, 2, 3, 4, 5

NO_PATTERN = (NONE, 0, 1, 0, 0)  # (kind, T, W, r, P) when there is no pattern


def visible(kind, T, W, r, P, q, k):
    """Whether query position q may attend to key position k under the pattern (kind, T, W, r, P)."""
    if kind == NONE:
        return True
    if kind == CAUSAL:
        return k <= q
    if kind == PREFIX:
        return k < P or k <= q
    # The image patterns: causal everywhere; text keys visible to every image query; the rule on image keys.
    if k > q:
        return False
    if k < T:
        return True
    # here T <= k <= q: both are image tokens
    d = q - k
    if kind == ROW:
        return d <= W
    if kind == COLUMN:
        return d % W == 0
    # CONV: rows and columns of the grid
    dr = (q - T) // W - (k - T) // W
    dc = abs((q - T) % W - (k - T) % W)
    return dr <= r and min(dc, W - dc) <= r


def tile_may_attend(kind, T, W, r, P, q0, q1, k0, k1):
    """False only if no query in [q0, q1) may attend to any key in [k0, k1) (both ranges non-empty).

    Exact for every kind but Conv, whose column rule is ignored here (an upper bound: the tile is kept).
    """
    if kind == NONE:
        return True
    qmax = q1 - 1
    if kind == CAUSAL:
        return k0 <= qmax
    if kind == PREFIX:
        return k0 < P or k0 <= qmax
    if k0 > qmax:  # every pattern is causal
        return False
    if k0 < T:  # (qmax, k0) is visible: a text key seen by an image query, or a text pair with k0 ≤ qmax
        return True
    # Only image keys, k ≥ max(k0, T) = k0. The query must be an image token too (q ≥ k ≥ T).
    dmin = max(q0 - (k1 - 1), 0)  # the differences d = q − k ≥ 0 reachable in the tile: [dmin, dmax]
    dmax = qmax - k0
    if kind == ROW:
        return dmin <= W
    if kind == COLUMN:
        return (dmin + W - 1) // W * W <= dmax  # a multiple of W in [dmin, dmax]
    # CONV: the smallest row difference of a causal pair in the tile
    qlo = max(q0, k0)
    return (qlo - T) // W - (k1 - 1 - T) // W <= r


def tile_all_visible(kind, T, W, r, P, q0, q1, k0, k1):
    """True only if every query in [q0, q1) may attend to every key in [k0, k1): the kernels then skip the
    per-element test. Conservative (False is always allowed); exact for none, Causal and PrefixLM."""
    if kind == NONE:
        return True
    kmax = k1 - 1
    if kind == CAUSAL:
        return kmax <= q0
    if kind == PREFIX:
        return kmax < P or kmax <= q0
    # the image patterns: all-text keys below every query
    return kmax < T and kmax <= q0


class Pattern:
    """A structured mask. Subclasses set ``params = (kind, T, W, r, P)``."""

    params = NO_PATTERN

    def visible(self, q, k):
        """Whether query q may attend to key k (scalar rule, as evaluated inside the kernels)."""
        return visible(*self.params, q, k)

    def tile_may_attend(self, q0, q1, k0, k1):
        """False only when no query in [q0, q1) may see any key in [k0, k1): the kernels skip that tile."""
        return tile_may_attend(*self.params, q0, q1, k0, k1)

    def mask(self, n):
        """The (n, n) boolean mask, True where query q (row) may attend to key k (column)."""
        q, k = np.arange(n)[:, None], np.arange(n)[None, :]
        return np.broadcast_to(self._mask(q, k), (n, n)).copy()

    def _mask(self, q, k):
        raise NotImplementedError

    def __repr__(self):
        return f"{type(self).__name__}()"


class Causal(Pattern):
    """k ≤ q: each position sees itself and the past (PyTorch's ``is_causal``)."""

    params = (CAUSAL, 0, 1, 0, 0)

    def _mask(self, q, k):
        return k <= q


def _count(name, value, least):
    """`value` as an int ≥ least, or a ValueError naming it: a float or a bool is not rounded into a count (2.5
    would silently change which keys are visible)."""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < least:
        raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
    return int(value)


class _Image(Pattern):
    """Shared part of DALL·E's patterns: T text tokens, then a W×W image grid in raster order."""

    kind = NONE

    def __init__(self, text_len, width, r=0):
        self.text_len, self.width = _count("text_len", text_len, 0), _count("width", width, 1)
        self.params = (self.kind, self.text_len, self.width, int(r), 0)

    def __repr__(self):
        return f"{type(self).__name__}(text_len={self.text_len}, width={self.width})"

    def _mask(self, q, k):
        T = self.text_len
        image_rule = (k >= T) & (q >= T) & self._image_rule(q, k)
        return (k <= q) & ((k < T) | image_rule)

    def _image_rule(self, q, k):
        raise NotImplementedError


class Row(_Image):
    """Image queries see image keys with q − k ≤ W: the current row so far and the previous row's tail."""

    kind = ROW

    def _image_rule(self, q, k):
        return q - k <= self.width


class Column(_Image):
    """Image queries see image keys in the same column: (q − k) mod W == 0."""

    kind = COLUMN

    def _image_rule(self, q, k):
        return (q - k) % self.width == 0


class Conv(_Image):
    """Image queries see image keys at most r = kernel // 2 rows up and r columns away (cyclically)."""

    kind = CONV

    def __init__(self, text_len, width, kernel):
        if _count("kernel", kernel, 1) % 2 == 0:
            raise ValueError(f"kernel must be odd and positive, got {kernel}")
        self.kernel = int(kernel)
        super().__init__(text_len, width, r=kernel // 2)

    def _image_rule(self, q, k):
        T, W, r = self.text_len, self.width, self.kernel // 2
        dr = (q - T) // W - (k - T) // W
        dc = np.abs((q - T) % W - (k - T) % W)
        return (dr <= r) & (np.minimum(dc, W - dc) <= r)

    def __repr__(self):
        return f"Conv(text_len={self.text_len}, width={self.width}, kernel={self.kernel})"


class PrefixLM(Pattern):
    """ERNIE-ViLG's prefix LM: keys k < P are visible to every query, later keys only causally."""

    def __init__(self, prefix_len):
        self.prefix_len = _count("prefix_len", prefix_len, 0)
        self.params = (PREFIX, 0, 1, 0, self.prefix_len)

    def _mask(self, q, k):
        return (k < self.prefix_len) | (k <= q)

    def __repr__(self):
        return f"PrefixLM(prefix_len={self.prefix_len})"


def resolve(pattern, causal):
    """The integers (kind, T, W, r, P) for the kernels, and whether a separate causal test (k ≤ q) remains.

    ``causal=True`` with no pattern is the Causal pattern; with a pattern it is an extra condition.
    """
    if pattern is None:
        return (CAUSAL, 0, 1, 0, 0) if causal else NO_PATTERN, False
    if not isinstance(pattern, Pattern):
        raise TypeError(f"pattern must be a kernels.attention.patterns.Pattern, got {type(pattern).__name__}")
    return tuple(pattern.params), bool(causal) and pattern.params[0] != CAUSAL
