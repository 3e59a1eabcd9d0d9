"""Cases for the non-spatial ops of core.functional: linear, softmax family, losses, norms, activations.

Arguments that take no gradient in PyTorch (class weights, running statistics) travel as NumPy arrays
in kwargs and become tensors inside the lambda (`lib.tensor`), so both libraries see fresh copies on
every call. Ops with kinks (relu, leaky_relu, l1_loss, normalize's |x|) draw values away from the kink
so that finite differences stay well-posed.
"""

from __future__ import annotations

import math

import numpy as np

from . import Case

# --- helpers ------------------------------------------------------------------------------------


def _opt(lib, a):
    """A NumPy array as a tensor of `lib`, or None."""
    return None if a is None else lib.tensor(a)


def _away(d, shape, hi=2.0, gap=1e-2):
    """Values in [-hi, -gap] ∪ [gap, hi]: away from a kink at 0."""
    sign = np.where(d.bools(shape), 1.0, -1.0)
    return np.asarray(d.array(shape, gap, hi) * sign)  # asarray: 0-d arithmetic gives NumPy scalars


def _one(d, lo=-2.0, hi=2.0, min_dims=0):
    return [d.array(d.shape(min_dims, 3), lo, hi)]


def _dim_case(d, lo=-3.0, hi=3.0):
    x = d.array(d.shape(0, 3), lo, hi)
    n = max(x.ndim, 1)
    return [x], {"dim": d.int(-n, n - 1)}


# --- linear -------------------------------------------------------------------------------------


def _linear(d, bias=True):
    fin, fout = d.int(1, 5), d.int(1, 5)
    arrays = [d.array(d.shape(0, 2) + (fin,)), d.array((fout, fin))]
    return arrays + [d.array((fout,))] if bias else arrays


# --- classification losses ----------------------------------------------------------------------


def _classification(d, rank=None, weight=False, ignore=False, smoothing=False, reduction=False, scale=3.0):
    """Logits of rank 1-4 (classes on axis 1, axis 0 when unbatched) and int class targets."""
    C = d.int(1, 5)
    rank = d.int(1, 4) if rank is None else rank
    if rank == 1:
        xs, ts = (C,), ()
    else:
        extra = tuple(d.int(1, 3) for _ in range(rank - 2))
        N = d.int(1, 3)
        xs, ts = (N, C) + extra, (N,) + extra
    x = d.array(xs, -scale, scale)
    t = d.ints(ts, 0, C)
    kw = {}
    if weight:
        kw["w"] = d.array((C,), 0.2, 2.0)
    if ignore:
        ii = d.choice([-100, -1] + ([d.int(0, C - 1)] if C > 1 else []))
        t = np.where(d.bools(ts, 0.3), ii, t)
        t.reshape(-1)[0] = (ii + 1) % C if ii >= 0 else 0  # at least one kept target: the 'mean' is defined
        kw["ignore_index"] = ii
    if smoothing:
        kw["label_smoothing"] = d.choice([0.05, 0.3, 1.0])
    if reduction:
        kw["reduction"] = d.choice(["none", "mean", "sum"])
    return [x, t], kw


def _ce(lib, F, x, t, w=None, **kw):
    return F.cross_entropy(x, t, _opt(lib, w), **kw)


def _nll(lib, F, x, t, w=None, **kw):
    # contiguous(): PyTorch 2.13's nll_loss2d backward raises "grad_input must be contiguous" on a
    # non-contiguous 4-d input with reduction='none' (a PyTorch limitation, not a semantic difference)
    return F.nll_loss(x.contiguous(), t, _opt(lib, w), **kw)


def _bce(d, weight=False, pos_weight=False):
    s = d.shape(1, 3)
    arrays = [d.array(s, -4.0, 4.0), d.array(s, 0.0, 1.0)]
    kw = {"reduction": d.choice(["none", "mean", "sum"])}
    if weight:  # no gradient in PyTorch: a kwarg, made a tensor in the lambda
        kw["w"] = d.array(d.broadcastable(s), 0.2, 2.0)
    if pos_weight:
        kw["pos"] = d.array(d.choice([(s[-1],), d.broadcastable(s)]), 0.2, 3.0)
    return arrays, kw


def _bce_fn(lib, F, x, y, w=None, pos=None, **kw):
    return F.binary_cross_entropy_with_logits(x, y, _opt(lib, w), pos_weight=_opt(lib, pos), **kw)


# --- regression losses --------------------------------------------------------------------------


def _regression(d, kink=False):
    s = d.shape(0, 3)
    x = d.array(s)
    y = np.asarray(x + _away(d, s, 1.0, 1e-2)) if kink else d.array(s)  # l1: |x - y| ≥ 0.01
    return [x, y], {"reduction": d.choice(["none", "mean", "sum"])}


# --- normalization ------------------------------------------------------------------------------


def _layer_norm(d, affine=True):
    x = d.array(d.shape(1, 3))
    ns = x.shape[x.ndim - d.int(1, x.ndim) :]
    arrays = [x] + ([d.array(ns, 0.5, 1.5), d.array(ns)] if affine else [])
    return arrays, {"ns": ns}


def _group_norm(d, affine=True):
    G, k = d.int(1, 3), d.int(1, 3)
    shape = (d.int(1, 3), G * k) + d.shape(0, 2, max_side=3)
    if shape[0] * k * math.prod(shape[2:]) == 1:  # PyTorch refuses this (one value per "channel")
        shape = (2,) + shape[1:]
    x = d.array(shape)
    arrays = [x] + ([d.array((G * k,), 0.5, 1.5), d.array((G * k,))] if affine else [])
    return arrays, {"G": G}


def _batch_norm(d, training, affine=True, running=True):
    C = d.int(1, 3)
    x = d.array((d.int(2, 4), C) + d.shape(0, 2, max_side=3))
    arrays = [x] + ([d.array((C,), 0.5, 1.5), d.array((C,))] if affine else [])
    kw = {"training": training, "momentum": d.choice([0.1, 0.5])}
    if running:
        kw["rm"], kw["rv"] = d.array((C,), -1.0, 1.0), d.array((C,), 0.5, 2.0)
    return arrays, kw


def _bn(lib, F, x, w=None, b=None, rm=None, rv=None, **kw):
    return F.batch_norm(x, _opt(lib, rm), _opt(lib, rv), w, b, **kw)


# --- embedding, one_hot -------------------------------------------------------------------------


def _embedding(d, padding=False):
    V, D = d.int(1, 6), d.int(1, 4)
    idx = d.ints(d.shape(0, 3), 0, V)  # small V: repeated indices are common
    kw = {"padding_idx": d.int(-V, V - 1)} if padding else {}
    return [idx, d.array((V, D))], kw


def _one_hot(d):
    t = d.ints(d.shape(0, 3), 0, 5)
    return [t], {"num_classes": d.choice([-1, 5, 7])}


# --- activations --------------------------------------------------------------------------------


def _softplus(d):
    beta, threshold = d.choice([1.0, 2.0, 0.5]), d.choice([20.0, 1.5])
    x = d.array(d.shape(0, 3), -4.0, 4.0)
    x = np.asarray(np.where(np.abs(beta * x - threshold) < 0.05, x + 0.2, x))  # away from the switch to the linear region
    return [x], {"beta": beta, "threshold": threshold}


def _normalize(d):
    x = _away(d, d.shape(1, 3), 2.0, 0.05)
    n = x.ndim
    return [x], {"p": d.choice([1.0, 2.0, 3.0, math.inf]), "dim": d.int(-n, n - 1)}


def _dropout_seeded(lib, F, x, p):
    lib.manual_seed(0)  # the same mask on every call, so finite differences see one fixed function
    return F.dropout(x, p)


CASES = [
    Case("linear", lambda lib, F, x, w, b: F.linear(x, w, b), _linear),
    Case("linear_nobias", lambda lib, F, x, w: F.linear(x, w), lambda d: _linear(d, bias=False)),
    Case("softmax", lambda lib, F, x, dim: F.softmax(x, dim), _dim_case),
    Case("softmax_wide", lambda lib, F, x, dim: F.softmax(x, dim), lambda d: _dim_case(d, -40.0, 40.0)),
    Case("log_softmax", lambda lib, F, x, dim: F.log_softmax(x, dim), _dim_case),
    Case("log_softmax_wide", lambda lib, F, x, dim: F.log_softmax(x, dim), lambda d: _dim_case(d, -40.0, 40.0)),
    Case("cross_entropy", _ce, lambda d: _classification(d, rank=2)),
    Case("cross_entropy_unbatched", _ce, lambda d: _classification(d, rank=1)),
    Case("cross_entropy_rank3", _ce, lambda d: _classification(d, rank=3)),
    Case("cross_entropy_rank4", _ce, lambda d: _classification(d, rank=4)),
    Case("cross_entropy_weight", _ce, lambda d: _classification(d, weight=True)),
    Case("cross_entropy_ignore_index", _ce, lambda d: _classification(d, ignore=True)),
    Case("cross_entropy_label_smoothing", _ce, lambda d: _classification(d, smoothing=True)),
    Case("cross_entropy_reduction", _ce, lambda d: _classification(d, reduction=True)),
    Case("cross_entropy_all_options", _ce,
         lambda d: _classification(d, weight=True, ignore=True, smoothing=True, reduction=True)),
    Case("nll_loss", _nll, lambda d: _classification(d, reduction=True)),
    Case("nll_loss_weight_ignore", _nll, lambda d: _classification(d, weight=True, ignore=True, reduction=True)),
    Case("bce_with_logits", _bce_fn, _bce),
    Case("bce_with_logits_weight", _bce_fn, lambda d: _bce(d, weight=True)),
    Case("bce_with_logits_pos_weight", _bce_fn, lambda d: _bce(d, weight=d.bool(), pos_weight=True)),
    Case("mse_loss", lambda lib, F, x, y, **kw: F.mse_loss(x, y, **kw), _regression),
    Case("l1_loss", lambda lib, F, x, y, **kw: F.l1_loss(x, y, **kw), lambda d: _regression(d, kink=True)),
    Case("layer_norm", lambda lib, F, x, w, b, ns: F.layer_norm(x, ns, w, b), _layer_norm),
    Case("layer_norm_noaffine", lambda lib, F, x, ns: F.layer_norm(x, ns), lambda d: _layer_norm(d, affine=False)),
    Case("group_norm", lambda lib, F, x, w, b, G: F.group_norm(x, G, w, b), _group_norm),
    Case("group_norm_noaffine", lambda lib, F, x, G: F.group_norm(x, G), lambda d: _group_norm(d, affine=False)),
    Case("batch_norm_train", _bn, lambda d: _batch_norm(d, training=True)),
    Case("batch_norm_train_nostats", _bn, lambda d: _batch_norm(d, training=True, affine=d.bool(), running=False)),
    Case("batch_norm_eval", _bn, lambda d: _batch_norm(d, training=False)),
    Case("batch_norm_eval_noaffine", _bn, lambda d: _batch_norm(d, training=False, affine=False)),
    Case("embedding", lambda lib, F, i, w: F.embedding(i, w), _embedding),
    # the padding row's gradient is zero by definition, not the derivative: compared with PyTorch, not gradchecked
    # (the other rows' gradients are gradchecked by "embedding")
    Case("embedding_padding_idx", lambda lib, F, i, w, **kw: F.embedding(i, w, **kw), lambda d: _embedding(d, True),
         gradcheck=False),
    Case("one_hot", lambda lib, F, t, **kw: F.one_hot(t, **kw), _one_hot, grad=False),
    Case("dropout_eval", lambda lib, F, x, p: F.dropout(x, p, training=False),
         lambda d: (_one(d), {"p": d.choice([0.0, 0.3, 1.0])})),
    Case("dropout_p0", lambda lib, F, x: F.dropout(x, 0.0), _one),
    # a random mask PyTorch cannot reproduce: gradcheck only (statistics in tests/test_functional.py)
    Case("dropout", _dropout_seeded, lambda d: (_one(d), {"p": d.choice([0.1, 0.5, 0.9])}), torch=False),
    Case("gelu", lambda lib, F, x: F.gelu(x), lambda d: _one(d, -4.0, 4.0)),
    Case("gelu_tanh", lambda lib, F, x: F.gelu(x, approximate="tanh"), lambda d: _one(d, -4.0, 4.0)),
    Case("silu", lambda lib, F, x: F.silu(x), lambda d: _one(d, -4.0, 4.0)),
    Case("F.relu", lambda lib, F, x: F.relu(x), lambda d: [_away(d, d.shape(0, 3))]),
    Case("leaky_relu", lambda lib, F, x, s: F.leaky_relu(x, s),
         lambda d: ([_away(d, d.shape(0, 3))], {"s": d.choice([0.01, 0.2, 1.5])})),
    Case("F.sigmoid", lambda lib, F, x: F.sigmoid(x), lambda d: _one(d, -6.0, 6.0)),
    Case("F.tanh", lambda lib, F, x: F.tanh(x), lambda d: _one(d, -3.0, 3.0)),
    Case("softplus", lambda lib, F, x, **kw: F.softplus(x, **kw), _softplus),
    Case("logsigmoid", lambda lib, F, x: F.logsigmoid(x), lambda d: _one(d, -6.0, 6.0)),
    Case("normalize", lambda lib, F, x, **kw: F.normalize(x, **kw), _normalize),
]
