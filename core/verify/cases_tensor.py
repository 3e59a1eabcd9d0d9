"""Cases for the tensor ops of core.ops: arithmetic, elementwise math, reductions, shape, indexing."""

from __future__ import annotations

from . import Case


def _pair(d, lo=-2.0, hi=2.0):
    """Two arrays of broadcastable shapes (in either order)."""
    s = d.shape(0, 3)
    t = d.broadcastable(s)
    if d.bool():
        s, t = t, s
    return [d.array(s, lo, hi), d.array(t, lo, hi)]


def _one(d, lo=-2.0, hi=2.0, min_dims=0):
    return [d.array(d.shape(min_dims, 3), lo, hi)]


def _dim_case(d, min_dims=1):
    x = d.array(d.shape(min_dims, 3))
    return [x], {"dim": d.int(-x.ndim, x.ndim - 1), "keepdim": d.bool()}


CASES = [
    Case("add", lambda lib, F, a, b: a + b, _pair),
    Case("sub", lambda lib, F, a, b: a - b, _pair),
    Case("mul", lambda lib, F, a, b: a * b, _pair),
    Case("div", lambda lib, F, a, b: a / b, lambda d: _pair(d, 0.5, 2.0)),
    Case("pow", lambda lib, F, a, b: a**b, lambda d: _pair(d, 0.5, 2.0)),
    Case("rsub_scalar", lambda lib, F, a: 3.0 - a * 2.0 / (1.5 + a**2), _one),
    Case("neg", lambda lib, F, a: -a, _one),
]
