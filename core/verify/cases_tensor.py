"""Cases for the tensor ops of core.ops: arithmetic, elementwise math, reductions, shape, indexing.

Every case is one lambda run unchanged by core and by PyTorch. Shapes are drawn broadly (0-d where
the op allows it, size-1 dims, broadcastable pairs, non-contiguous views) and values inside each
op's domain (log and sqrt on positives, division away from zero, ...).
"""

from __future__ import annotations

import numpy as np

from . import Case

# --- drawing helpers ------------------------------------------------------------------------------


def _pair(d, lo=-2.0, hi=2.0):
    """Two arrays of broadcastable shapes (in either order)."""
    s = d.shape(0, 3)
    t = d.broadcastable(s)
    if d.bool():
        s, t = t, s
    return [d.array(s, lo, hi), d.array(t, lo, hi)]


def _one(d, lo=-2.0, hi=2.0, min_dims=0):
    return [d.array(d.shape(min_dims, 3), lo, hi)]


def _ties(d, shape):
    """Small integers as floats: many exact ties (for max/min/argmax and comparisons)."""
    return d.ints(shape, 0, 3).astype(np.float64)


def _dim(d, ndim, allow_tuple=True):
    """A PyTorch `dim` argument: None, an int (possibly negative), or a tuple of distinct dims."""
    kind = d.int(0, 2 if allow_tuple and ndim else 1 if ndim else 0)
    if kind == 0:
        return None
    if kind == 1:
        return d.int(-ndim, ndim - 1)
    dims = [i for i in range(ndim) if d.bool()] or [d.int(0, ndim - 1)]
    return tuple(i - ndim if d.bool() else i for i in dims)


def _reduced(shape, dim):
    """How many elements a reduction over dim combines."""
    if dim is None:
        return int(np.prod(shape))
    dims = dim if isinstance(dim, tuple) else (dim,)
    return int(np.prod([shape[i] for i in dims]))


def _reduce(d, min_dims=0, ties=False, allow_none=True, allow_tuple=True):
    x = _ties(d, d.shape(min_dims, 3)) if ties else d.array(d.shape(min_dims, 3))
    dim = _dim(d, x.ndim, allow_tuple)
    if dim is None and not allow_none:
        dim = d.int(-x.ndim, x.ndim - 1) if x.ndim else 0
    return [x], {"dim": dim, "keepdim": d.bool()}


def _var(d):
    x = d.array(d.shape(0, 3, max_side=4))
    dim = _dim(d, x.ndim)
    n = _reduced(x.shape, dim)
    return [x], {"dim": dim, "correction": d.int(0, min(2, n - 1)), "keepdim": d.bool()}


def _along(d, min_dims=1):
    """An array and one of its dims (negative or not): for ops along a dim (cumsum, sort, topk)."""
    x = d.array(d.shape(min_dims, 3))
    return x, d.int(-x.ndim, x.ndim - 1)


def _sort(d):
    x, dim = _along(d)
    return [x], {"dim": dim, "descending": d.bool()}


def _topk(d):
    x, dim = _along(d)
    return [x], {"k": d.int(0, x.shape[dim]), "dim": dim, "largest": d.bool()}


def _regroup(d, shape):
    """A new shape with the same number of elements: adjacent dims merged, 1s inserted, one -1."""
    out = []
    for n in shape:
        if out and d.int(0, 2) == 0:
            out[-1] *= n
        else:
            out.append(n)
        if d.int(0, 4) == 0:
            out.append(1)
    if out and d.bool():
        out[d.int(0, len(out) - 1)] = -1
    return tuple(out)


def _permutation(d, ndim):
    rest, order = list(range(ndim)), []
    while rest:
        order.append(rest.pop(d.int(0, len(rest) - 1)))
    return tuple(i - ndim if d.bool() else i for i in order)


def _slice(d, n):
    """A slice with a positive step (PyTorch has no negative steps), bounds possibly negative."""
    start = d.choice([None, d.int(-n, n)])
    stop = d.choice([None, d.int(-n, n)])
    return slice(start, stop, d.choice([None, 1, 2, 3]))


def _basic_index(d, shape):
    """A tuple of ints (negative too), stepped slices, None and at most one Ellipsis."""
    parts, dims, ellipsis = [], list(shape), False
    while dims:
        k = d.int(0, 4)
        if k == 0:
            parts.append(d.int(-dims[0], dims[0] - 1))
            dims.pop(0)
        elif k == 1:
            parts.append(None)
        elif k == 2 and not ellipsis:
            parts.append(Ellipsis)
            ellipsis = True
            dims = dims[len(dims) - d.int(0, len(dims)) :]  # the Ellipsis covers some leading dims
        else:
            parts.append(_slice(d, dims.pop(0)))
    return tuple(parts)


def _getitem_basic(d):
    x = d.array(d.shape(1, 3))
    return [x], {"index": _basic_index(d, x.shape)}


def _getitem_ints(d):
    """An integer array index with repeated (and negative) entries: gradients must accumulate."""
    x = d.array(d.shape(1, 3))
    n = x.shape[0]
    return [x, d.ints(d.shape(0, 2, max_side=6), -n, n)]


def _getitem_two_ints(d):
    x = d.array(d.shape(2, 3))
    s = d.shape(0, 2, max_side=4)
    return [x, d.ints(s, -x.shape[0], x.shape[0]), d.ints(d.broadcastable(s), -x.shape[1], x.shape[1])]


def _getitem_mask(d):
    x = d.array(d.shape(1, 3))
    k = d.int(1, x.ndim)
    return [x, d.bools(x.shape[:k])]


def _getitem_mixed(d):
    """An integer array next to slices: x[:, idx, 1:] and x[idx, ..., ::2]."""
    x = d.array(d.shape(3, 3, min_side=2))
    n = min(x.shape[:2])
    return [x, d.ints(d.shape(1, 2, max_side=4), -n, n)], {"form": d.int(0, 2)}


def _mixed_index(x, idx, form):
    if form == 0:
        return x[:, idx, 1:]
    if form == 1:
        return x[idx, ..., ::2]
    return x[1:, idx]


def _matmul(d):
    """Every form of @: vector·vector, vector·matrix, matrix·vector, and batches that broadcast."""
    n, k, m = d.int(1, 4), d.int(1, 4), d.int(1, 4)
    form = d.int(0, 4)
    if form == 0:
        return [d.array((k,)), d.array((k,))]
    if form == 1:
        return [d.array((k,)), d.array(d.shape(0, 2, max_side=3) + (k, m))]
    if form == 2:
        return [d.array(d.shape(0, 2, max_side=3) + (n, k)), d.array((k,))]
    batch = d.shape(0, 2, max_side=3)
    other = d.broadcastable(batch)
    if d.bool():
        batch, other = other, batch
    return [d.array(batch + (n, k)), d.array(other + (k, m))]


def _cat(d):
    base = d.shape(1, 3)
    dim = d.int(-len(base), len(base) - 1)
    arrays = []
    for _ in range(d.int(1, 3)):
        s = list(base)
        s[dim] = d.int(1, 3)
        arrays.append(d.array(tuple(s)))
    return arrays, {"dim": dim}


def _stack(d):
    s = d.shape(0, 3)
    return [d.array(s) for _ in range(d.int(1, 3))], {"dim": d.int(-len(s) - 1, len(s))}


def _where(d):
    s = d.shape(0, 3)
    return [d.bools(d.broadcastable(s)), d.array(d.broadcastable(s)), d.array(s)]


def _where_scalar(d):
    s = d.shape(0, 3)
    return [d.bools(s), d.array(d.broadcastable(s))]


def _dim_ties(d):
    """Tied values and one int dim (for max/min over a dim)."""
    x = _ties(d, d.shape(1, 3))
    return [x], {"dim": d.int(-x.ndim, x.ndim - 1)}


def _expand(d):
    s = d.shape(0, 3, max_side=3)
    target = tuple(d.int(1, 3) if n == 1 and d.bool() else -1 if d.bool() else n for n in s)
    lead = d.shape(0 if s else 1, 2, max_side=3)  # PyTorch's expand() needs at least one size
    return [d.array(s)], {"sizes": lead + target}


def _squeeze(d):
    x = d.array(tuple(1 if d.bool() else n for n in d.shape(1, 4, max_side=3)))
    dim = d.choice([None, d.int(-x.ndim, x.ndim - 1), tuple(range(0, x.ndim, 2))])
    return [x], {"dim": dim}


def _flatten(d):
    x = d.array(d.shape(1, 4, max_side=3))
    start = d.int(0, x.ndim - 1)
    end = d.int(start, x.ndim - 1)
    return [x], {"start_dim": start - x.ndim if d.bool() else start, "end_dim": end - x.ndim if d.bool() else end}


def _split(d):
    x = d.array(d.shape(1, 3))
    dim = d.int(-x.ndim, x.ndim - 1)
    n = x.shape[dim]
    if d.bool():
        size = d.int(1, n)
    else:  # a list of sizes that adds up to n
        size, left = [], n
        while left:
            size.append(d.int(1, left))
            left -= size[-1]
    return [x], {"size": size, "dim": dim}


def _weighted(lib, parts, dim):
    """Join pieces back, each scaled differently, so each piece's gradient is told apart."""
    return lib.cat([p * (i + 1) for i, p in enumerate(parts)], dim)


def _einsum(d):
    """Common einsum specs with operands of matching sizes."""
    i, j, k, b, lo = d.int(1, 4), d.int(1, 4), d.int(1, 4), d.int(1, 3), d.int(1, 3)
    spec = d.choice(["ij,jk->ik", "bij,bjk->bik", "i,j->ij", "ij->i", "ij->j", "ij->", "...ij,...jk->...ik",
                     "ij,jk", "ij,jk,kl->il", "bhid,bhjd->bhij", "ij->ji", "i,i->"])
    sizes = {"i": i, "j": j, "k": k, "b": b, "l": lo, "h": d.int(1, 2), "d": d.int(1, 3)}
    ell = d.shape(0, 2, max_side=3)
    shapes = []
    for part in spec.split("->")[0].split(","):
        shapes.append((ell if "..." in part else ()) + tuple(sizes[c] for c in part.replace("...", "")))
    return [d.array(s) for s in shapes], {"spec": spec}


def _operands(d, *subscripts):
    """Arrays for einsum operands: each letter gets one size across all of them."""
    sizes = {c: d.int(1, 3) for c in sorted(set("".join(subscripts)))}
    return [d.array(tuple(sizes[c] for c in s)) for s in subscripts]


def _argreduce(d):
    x = _ties(d, d.shape(1, 3)) if d.bool() else d.array(d.shape(1, 3))
    if d.bool():
        return [x], {}
    return [x], {"dim": d.int(-x.ndim, x.ndim - 1), "keepdim": d.bool()}


def _compare(d):
    a, b = _pair(d)
    if d.bool():  # exact ties
        a, b = np.asarray(np.round(a)), np.asarray(np.round(b))
    return [a, b]


def _clamp(d):
    lo, hi = sorted(d.choice([-1.5, -0.5, 0.0, 0.3, 1.0]) for _ in range(2))
    bounds = d.choice([{"min": lo}, {"max": hi}, {"min": lo, "max": hi}])
    return _one(d), bounds


def _pow_scalar(d):
    """x ** p: integer powers on any sign, fractional and negative powers on positives."""
    p = d.choice([2, 3, -1, 0.5, -1.5, 2.5, 0])
    lo = 0.3 if p != int(p) or p < 0 else -2.0
    return _one(d, lo, 2.0), {"p": p}


def _zero_base(d):
    """Exact zeros raised to 0, 1, 2, 3: the gradient of 0^0 is 0 and of 0^1 is 1, as in PyTorch."""
    s = d.shape(0, 2)
    return [np.where(d.bools(s), 0.0, d.array(s))], {"p": d.choice([0, 1, 2, 3])}


def _gather(d):
    """An index tensor as large as the input or smaller outside dim, with repeats along dim."""
    x = d.array(d.shape(1, 3))
    dim = d.int(-x.ndim, x.ndim - 1)
    shape = tuple(d.int(1, 4) if i == dim % x.ndim else d.int(1, n) for i, n in enumerate(x.shape))
    return [x, d.ints(shape, 0, x.shape[dim])], {"dim": dim}


def _masked_fill(d):
    x = d.array(d.shape(0, 3))
    return [x, d.bools(d.broadcastable(x.shape))], {"value": d.choice([0.0, -1e4, 2.5])}


def _permute(d):
    x = d.array(d.shape(1, 4, max_side=3))
    return [x], {"dims": _permutation(d, x.ndim)}


def _transpose(d):
    x = d.array(d.shape(1, 4, max_side=3))
    return [x], {"dim0": d.int(-x.ndim, x.ndim - 1), "dim1": d.int(-x.ndim, x.ndim - 1)}


def _reshape(d):
    x = d.array(d.shape(0, 3))
    return [x], {"shape": _regroup(d, x.shape)}


def _unsqueeze(d):
    x = d.array(d.shape(0, 3))
    return [x], {"dim": d.int(-x.ndim - 1, x.ndim)}


def _repeat(d):
    x = d.array(d.shape(0, 3, max_side=3))
    return [x], {"sizes": tuple(d.int(1, 3) for _ in range(max(x.ndim + d.int(0, 1), 1)))}


def _chunk(d):
    x = d.array(d.shape(1, 3))
    return [x], {"chunks": d.int(1, 4), "dim": d.int(-x.ndim, x.ndim - 1)}


# --- the table ------------------------------------------------------------------------------------

_ARITH = [
    Case("add", lambda lib, F, a, b: a + b, _pair),
    Case("sub", lambda lib, F, a, b: a - b, _pair),
    Case("mul", lambda lib, F, a, b: a * b, _pair),
    Case("div", lambda lib, F, a, b: a / b, lambda d: _pair(d, 0.5, 2.0)),
    Case("div_negative", lambda lib, F, a, b: a / (-b), lambda d: _pair(d, 0.5, 2.0)),
    Case("pow", lambda lib, F, a, b: a**b, lambda d: _pair(d, 0.5, 2.0)),
    Case("pow_scalar", lambda lib, F, a, p: a**p, _pow_scalar),
    Case("pow_zero_base", lambda lib, F, a, p: a**p, _zero_base),
    Case("rpow_scalar", lambda lib, F, a, base: base**a, lambda d: (_one(d), {"base": d.choice([2.0, 0.5, 3])})),
    Case("add_scalar", lambda lib, F, a: (a + 1.5) + (2 + a), _one),
    Case("sub_scalar", lambda lib, F, a: (a - 0.5) * (3 - a), _one),
    Case("mul_scalar", lambda lib, F, a: a * 2.0 + 3 * a, _one),
    Case("div_scalar", lambda lib, F, a: a / 4.0 + 2.0 / a, lambda d: _one(d, 0.5, 2.0)),
    Case("rsub_scalar", lambda lib, F, a: 3.0 - a * 2.0 / (1.5 + a**2), _one),
    Case("neg", lambda lib, F, a: -a, _one),
    Case("matmul", lambda lib, F, a, b: a @ b, _matmul),
    Case("matmul_fn", lambda lib, F, a, b: lib.matmul(a, b), _matmul),
]

_UNARY = [
    Case("exp", lambda lib, F, a: a.exp(), lambda d: _one(d, -3.0, 3.0)),
    Case("log", lambda lib, F, a: a.log(), lambda d: _one(d, 0.1, 3.0)),
    Case("sqrt", lambda lib, F, a: a.sqrt(), lambda d: _one(d, 0.1, 3.0)),
    Case("tanh", lambda lib, F, a: a.tanh(), lambda d: _one(d, -3.0, 3.0)),
    Case("sigmoid", lambda lib, F, a: a.sigmoid(), lambda d: _one(d, -6.0, 6.0)),
    Case("sigmoid_large", lambda lib, F, a: a.sigmoid(), lambda d: _one(d, -800.0, 800.0)),
    Case("relu", lambda lib, F, a: a.relu(), _one),
    Case("abs", lambda lib, F, a: a.abs(), _one),
    Case("sin", lambda lib, F, a: a.sin(), lambda d: _one(d, -4.0, 4.0)),
    Case("cos", lambda lib, F, a: a.cos(), lambda d: _one(d, -4.0, 4.0)),
    Case("log1p", lambda lib, F, a: a.log1p(), lambda d: _one(d, -0.9, 3.0)),
    Case("lib_unary", lambda lib, F, a: lib.exp(lib.tanh(a)) + lib.sigmoid(lib.sin(a)) * lib.cos(lib.relu(a))
         + lib.sqrt(lib.abs(a) + 1) * lib.log(lib.log1p(lib.abs(a)) + 1), _one),
    Case("clamp", lambda lib, F, a, **kw: a.clamp(**kw), _clamp),
    Case("clamp_fn", lambda lib, F, a, **kw: lib.clamp(a, **kw), _clamp),
    Case("masked_fill", lambda lib, F, a, m, value: a.masked_fill(m, value), _masked_fill),
]

_REDUCE = [
    Case("sum", lambda lib, F, a, dim, keepdim: a.sum(dim=dim, keepdim=keepdim), _reduce),
    Case("sum_all", lambda lib, F, a: a.sum(), _one),
    Case("mean", lambda lib, F, a, dim, keepdim: a.mean(dim=dim, keepdim=keepdim), _reduce),
    Case("amax", lambda lib, F, a, dim, keepdim: a.amax(dim=dim, keepdim=keepdim), _reduce),
    Case("amin", lambda lib, F, a, dim, keepdim: a.amin(dim=dim, keepdim=keepdim), _reduce),
    # With ties the function has a kink exactly at the input, so finite differences are ill-posed;
    # the comparison with PyTorch checks that the gradient is split evenly among tied elements.
    Case("amax_ties", lambda lib, F, a, dim, keepdim: a.amax(dim=dim, keepdim=keepdim),
         lambda d: _reduce(d, ties=True), gradcheck=False),
    Case("amin_ties", lambda lib, F, a, dim, keepdim: a.amin(dim=dim, keepdim=keepdim),
         lambda d: _reduce(d, ties=True), gradcheck=False),
    Case("max_all_ties", lambda lib, F, a: a.max() + a.min(), lambda d: [_ties(d, d.shape(0, 3))], gradcheck=False),
    Case("max_dim", lambda lib, F, a, dim, keepdim: a.max(dim, keepdim=keepdim).values,
         lambda d: _reduce(d, 1, allow_none=False, allow_tuple=False)),
    Case("min_dim", lambda lib, F, a, dim, keepdim: a.min(dim, keepdim=keepdim).values,
         lambda d: _reduce(d, 1, allow_none=False, allow_tuple=False)),
    # max/min over a dim send the gradient to the index they return, not split among ties.
    Case("max_dim_ties", lambda lib, F, a, dim: a.max(dim).values * 2 + a.min(dim=dim, keepdim=True).values.sum(dim),
         _dim_ties, gradcheck=False),
    Case("max_dim_indices", lambda lib, F, a, dim: a.max(dim).indices + a.min(dim).indices * 10,
         _dim_ties, grad=False),
    Case("var", lambda lib, F, a, dim, correction, keepdim: a.var(dim, correction=correction, keepdim=keepdim), _var),
    Case("var_default", lambda lib, F, a: a.var() + a.var(0), lambda d: [d.array(d.shape(1, 3, min_side=2))]),
    Case("std", lambda lib, F, a, dim, correction, keepdim: a.std(dim, correction=correction, keepdim=keepdim), _var),
    Case("var_unbiased", lambda lib, F, a, dim, correction, keepdim: a.var(dim, correction == 1, keepdim), _var),
    Case("cumsum", lambda lib, F, a, dim: a.cumsum(dim), lambda d: (lambda x, dim: ([x], {"dim": dim}))(*_along(d))),
    # random floats have no ties, where PyTorch's sort and topk leave the order of equals unspecified
    Case("sort", lambda lib, F, a, dim, descending: a.sort(dim=dim, descending=descending).values, _sort),
    Case("sort_indices", lambda lib, F, a, dim, descending: a.sort(dim=dim, descending=descending).indices, _sort,
         grad=False),
    Case("topk", lambda lib, F, a, k, dim, largest: a.topk(k, dim=dim, largest=largest).values, _topk),
    Case("topk_indices", lambda lib, F, a, k, dim, largest: a.topk(k, dim=dim, largest=largest).indices, _topk,
         grad=False),
    # dim=() means every dim in PyTorch's reductions (not "no dim"). var/std are left out: PyTorch
    # 2.13 computes their value over all dims but returns an infinite gradient for dim=().
    Case("reduce_empty_dim", lambda lib, F, a: a.sum(dim=()) + a.mean(dim=()) + a.amax(dim=()) * a.amin(dim=()),
         lambda d: [d.array(d.shape(1, 3, min_side=2))]),
    Case("logsumexp", lambda lib, F, a, dim, keepdim: a.logsumexp(dim, keepdim=keepdim),
         lambda d: _reduce(d, allow_none=False)),
    Case("logsumexp_large", lambda lib, F, a: (a * 1e4).logsumexp(-1), lambda d: _one(d, min_dims=1)),
    Case("argmax", lambda lib, F, a, **kw: a.argmax(**kw), _argreduce, grad=False),
    Case("argmin", lambda lib, F, a, **kw: a.argmin(**kw), _argreduce, grad=False),
]

_COMPARE = [
    Case("lt", lambda lib, F, a, b: a < b, _compare, grad=False),
    Case("le", lambda lib, F, a, b: a <= b, _compare, grad=False),
    Case("gt", lambda lib, F, a, b: a > b, _compare, grad=False),
    Case("ge", lambda lib, F, a, b: a >= b, _compare, grad=False),
    Case("eq", lambda lib, F, a, b: a == b, _compare, grad=False),
    Case("ne", lambda lib, F, a, b: a != b, _compare, grad=False),
    Case("compare_scalar", lambda lib, F, a: (a > 0.5) & (a <= 1.0) | ~(a != 0.0), _one, grad=False),
]

_SHAPE = [
    Case("reshape", lambda lib, F, a, shape: a.reshape(shape), _reshape),
    Case("reshape_args", lambda lib, F, a: a.reshape(-1, 1).reshape(*a.shape), lambda d: _one(d, min_dims=1)),
    Case("view", lambda lib, F, a, shape: a.contiguous().view(shape), _reshape),
    Case("permute", lambda lib, F, a, dims: a.permute(*dims), _permute),
    Case("transpose", lambda lib, F, a, dim0, dim1: a.transpose(dim0, dim1), _transpose),
    Case("T", lambda lib, F, a: a.T, lambda d: [d.array(d.shape(2, 2))]),
    Case("mT", lambda lib, F, a: a.mT, lambda d: [d.array(d.shape(2, 4, max_side=3))]),
    Case("unsqueeze", lambda lib, F, a, dim: a.unsqueeze(dim), _unsqueeze),
    Case("squeeze", lambda lib, F, a, dim: a.squeeze() if dim is None else a.squeeze(dim), _squeeze),
    Case("expand", lambda lib, F, a, sizes: a.expand(*sizes), _expand),
    Case("flatten", lambda lib, F, a, **kw: a.flatten(**kw), _flatten),
    Case("flatten_default", lambda lib, F, a: a.flatten(), _one),
    Case("repeat", lambda lib, F, a, sizes: a.repeat(*sizes), _repeat),
    Case("chunk", lambda lib, F, a, chunks, dim: _weighted(lib, a.chunk(chunks, dim), dim), _chunk),
    Case("split", lambda lib, F, a, size, dim: _weighted(lib, a.split(size, dim), dim), _split),
    Case("cat", lambda lib, F, *xs, dim: lib.cat(list(xs), dim), _cat),
    Case("stack", lambda lib, F, *xs, dim: lib.stack(list(xs), dim), _stack),
    Case("where", lambda lib, F, c, a, b: lib.where(c, a, b), _where),
    Case("where_scalar", lambda lib, F, c, a: lib.where(c, a, 0.0) + lib.where(c, -1.0, a), _where_scalar),
]

_INDEX = [
    Case("getitem_basic", lambda lib, F, a, index: a[index], _getitem_basic),
    Case("getitem_int_array", lambda lib, F, a, i: a[i], _getitem_ints),
    Case("getitem_two_int_arrays", lambda lib, F, a, i, j: a[i, j], _getitem_two_ints),
    Case("getitem_bool_mask", lambda lib, F, a, m: a[m], _getitem_mask),
    Case("gather", lambda lib, F, a, i, dim: a.gather(dim, i), _gather),
    Case("getitem_mixed", lambda lib, F, a, i, form: _mixed_index(a, i, form), _getitem_mixed),
]

_EINSUM = [
    Case("einsum", lambda lib, F, *xs, spec: lib.einsum(spec, *xs), _einsum),
    Case("einsum_spaces", lambda lib, F, a, b: lib.einsum("b i j , b j k -> b k i", a, b),
         lambda d: _operands(d, "bij", "bjk")),
    Case("einsum_list", lambda lib, F, a, b: lib.einsum("ij,kj->ik", [a, b]),
         lambda d: _operands(d, "ij", "kj")),
]

CASES = _ARITH + _UNARY + _REDUCE + _COMPARE + _SHAPE + _INDEX + _EINSUM
