"""core.functional (imported as F): the neural-network ops with PyTorch's names and semantics.

The ops on the hot path of training (linear, softmax, log_softmax, cross_entropy, the norms, gelu,
embedding, binary_cross_entropy_with_logits) are each ONE `Function` with a hand-written backward:
one graph node per call, and a backward that reads like the derivative on paper. The rest are
short compositions of the tensor ops in `core.ops`.

Numerical stability: every softmax-like op subtracts the maximum before exponentiating and every
log-sigmoid-like op is written with `log1p(exp(-|x|))`, so logits of ±1e4 give exact, finite results.
Scalars in formulas are Python floats, so float32 inputs stay float32 (NumPy promotes float32 arrays
only when mixed with NumPy float64 arrays or scalars).

Spatial ops (conv, pooling, interpolation, padding) live in `core.conv`; attention and Gumbel-softmax
in `core.attention`; both are re-exported here.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
from scipy.special import erf

from . import ops
from . import random as _random
from .attention import (  # noqa: F401  (the patterns are for sdpa's pattern=)
    Causal,
    Column,
    Conv,
    PrefixLM,
    Row,
    gumbel_softmax,
    patterns,
    scaled_dot_product_attention,
)
from .autograd import Function, is_grad_enabled
from .conv import avg_pool2d, conv2d, conv_transpose2d, interpolate, max_pool2d, pad  # noqa: F401
from .tensor import Tensor

# --- helpers ------------------------------------------------------------------------------------


_dim = ops._dim  # a PyTorch dim as an axis, or PyTorch's IndexError


def _reduce(op, loss, reduction):
    """Apply a loss reduction ('none' | 'mean' | 'sum') to the per-element losses (a Tensor)."""
    if reduction == "none":
        return loss
    if reduction == "mean":
        return loss.mean()
    if reduction == "sum":
        return loss.sum()
    raise ValueError(f"{op}: reduction={reduction!r} is not valid; use 'none', 'mean' or 'sum'")


def _check_reduction(op, reduction):
    if reduction not in ("none", "mean", "sum"):
        raise ValueError(f"{op}: reduction={reduction!r} is not valid; use 'none', 'mean' or 'sum'")


def _tensor(x):
    return x if isinstance(x, Tensor) else Tensor(np.asarray(x))


def _inplace(op, input, out):  # noqa: A002
    """Write `out` into `input` (inplace=True); only possible where no graph is being recorded."""
    if input.requires_grad and is_grad_enabled():
        raise RuntimeError(
            f"{op}: inplace=True on a tensor that requires grad is not supported (autograd needs the original "
            "values); use inplace=False, or run under core.no_grad()"
        )
    input.data[...] = out.data
    return input


def _sigmoid(x):
    """σ(x) = 1 / (1 + e^{-x}), computed from e^{-|x|} so it never overflows."""
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e)).astype(x.dtype, copy=False)


def _softplus(x):
    """log(1 + e^x) = max(x, 0) + log1p(e^{-|x|}), exact for any x (no overflow, no cancellation)."""
    return np.maximum(x, 0) + np.log1p(np.exp(-np.abs(x)))


def _log_softmax(x, axis):
    """x - logsumexp(x) along axis, with the maximum subtracted first so e^{x - max} ≤ 1."""
    m = np.max(x, axis=axis, keepdims=True, initial=-np.inf)  # (initial: a dim of size 0)
    m = np.where(np.isfinite(m), m, 0)  # a row of all -inf stays -inf (and +inf gives NaN, as in PyTorch)
    z = x - m
    with np.errstate(divide="ignore"):  # log 0 = −inf: over no elements, or all −inf
        return z - np.log(np.sum(np.exp(z), axis=axis, keepdims=True))


# --- linear -------------------------------------------------------------------------------------


class Linear(Function):
    """y = x Wᵀ + b over the last dimension of x."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        if weight.ndim != 2 or x.ndim == 0 or x.shape[-1] != weight.shape[-1]:
            raise ValueError(
                f"linear: input of shape {x.shape} and weight of shape {weight.shape} do not match "
                f"(input's last dimension must equal weight's in_features, weight being (out_features, in_features))"
            )
        out = x @ weight.T
        if bias is not None:
            if bias.shape not in ((weight.shape[0],), (1,), ()):
                raise ValueError(f"linear: bias of shape {bias.shape} does not fit weight of shape {weight.shape} "
                                 f"(expected ({weight.shape[0]},))")
            out = out + bias
        ctx.save_for_backward(x, weight)
        return out

    @staticmethod
    def backward(ctx, g):
        x, w = ctx.saved_tensors
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = g @ w
        if ctx.needs_input_grad[1]:
            gw = g.reshape(-1, g.shape[-1]).T @ x.reshape(-1, x.shape[-1])
        if ctx.needs_input_grad[2]:
            gb = g.reshape(-1, g.shape[-1]).sum(axis=0)  # the engine sums this down to a () or (1,) bias
        return gx, gw, gb


def linear(input, weight, bias=None):  # noqa: A002
    """y = x Wᵀ + b: the affine map of a fully connected layer (weight is (out_features, in_features))."""
    return Linear.apply(input, weight, bias)


# --- softmax family -----------------------------------------------------------------------------


class Softmax(Function):
    """softmax(x)_i = e^{x_i - max} / Σ_j e^{x_j - max}; backward: y ⊙ (g - Σ g ⊙ y)."""

    @staticmethod
    def forward(ctx, x, dim):
        axis = _dim("softmax", dim, x.ndim)
        if x.ndim == 0:
            out = np.ones_like(x)
        else:
            m = np.max(x, axis=axis, keepdims=True, initial=-np.inf)  # (initial: a dim of size 0)
            with np.errstate(invalid="ignore"):
                e = np.exp(x - np.where(np.isneginf(m), 0, m))  # all −inf: 0s; a +inf: NaN (PyTorch's)
                out = e / np.sum(e, axis=axis, keepdims=True)
        ctx.save_for_backward(out)
        ctx.axis = axis
        return out

    @staticmethod
    def backward(ctx, g):
        (y,) = ctx.saved_tensors
        if y.ndim == 0:
            return np.zeros_like(g), None
        return y * (g - np.sum(g * y, axis=ctx.axis, keepdims=True)), None


class LogSoftmax(Function):
    """log_softmax(x) = x - logsumexp(x); backward: g - softmax(x) Σ g."""

    @staticmethod
    def forward(ctx, x, dim):
        axis = _dim("log_softmax", dim, x.ndim)
        if x.ndim == 0:
            out = np.zeros_like(x)
        else:
            with np.errstate(invalid="ignore"):
                out = _log_softmax(x, axis)
        ctx.save_for_backward(out)
        ctx.axis = axis
        return out

    @staticmethod
    def backward(ctx, g):
        (out,) = ctx.saved_tensors
        if out.ndim == 0:
            return np.zeros_like(g), None
        return g - np.exp(out) * np.sum(g, axis=ctx.axis, keepdims=True), None


def _softmax_dim(op, dim):
    if dim is None:
        raise TypeError(f"{op}: dim must be given (PyTorch's implicit choice of dim is deprecated)")
    return dim


def softmax(input, dim=None, dtype=None):  # noqa: A002
    """Normalized exponentials along `dim`: non-negative, summing to 1 (a categorical distribution)."""
    x = input if dtype is None else input.to(dtype)
    return Softmax.apply(x, _softmax_dim("softmax", dim))


def log_softmax(input, dim=None, dtype=None):  # noqa: A002
    """log(softmax(x)) computed as x - logsumexp(x): exact where softmax would underflow to 0."""
    x = input if dtype is None else input.to(dtype)
    return LogSoftmax.apply(x, _softmax_dim("log_softmax", dim))


# --- classification losses ----------------------------------------------------------------------


def _classes_last(op, x, target):
    """Check a class-index loss's (input, target) pair; return input with the class axis moved last.

    Shapes as in PyTorch: input (C,) with target (); input (N, C) with target (N,); input
    (N, C, d1, d2, ...) with target (N, d1, d2, ...). The classes are axis 1 (axis 0 for 1-d input).
    """
    if not np.issubdtype(target.dtype, np.integer):
        raise TypeError(
            f"{op}: target must hold class indices (an integer tensor, e.g. int64), got dtype {target.dtype}; "
            "probability (soft) targets are not supported"
        )
    if x.ndim == 0:
        raise ValueError(f"{op}: input must have a class dimension, got a 0-d tensor")
    expected = () if x.ndim == 1 else (x.shape[0],) + x.shape[2:]
    if target.shape != expected:
        raise ValueError(
            f"{op}: target of shape {target.shape} does not match input of shape {x.shape} "
            f"(expected target of shape {expected}: input's shape without the class dimension)"
        )
    return np.moveaxis(x, 0 if x.ndim == 1 else 1, -1)


def _nll(op, logp, target, weight, ignore_index, reduction, label_smoothing):
    """The negative log-likelihood of class-index targets, from log-probabilities with classes last.

    Per element i with target t_i (skipped where t_i == ignore_index) and class weights w:
        loss_i = (1 - ε) · w[t_i] · (-logp[i, t_i]) + (ε / C) · Σ_c w_c · (-logp[i, c])
    the second term being label smoothing (Szegedy et al. 2016, §7) in PyTorch's weighted form.
    'mean' divides the sum by Σ_i w[t_i] over the kept elements (the count when w is all ones).
    Returns the reduced loss and what `_nll_backward` needs: (t, w[t], kept mask, w) and (ε, 'mean' denominator).
    """
    _check_reduction(op, reduction)
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"{op}: label_smoothing must be in [0, 1], got {label_smoothing}")
    C = logp.shape[-1]
    w = np.ones(C, dtype=logp.dtype) if weight is None else weight.astype(logp.dtype, copy=False)
    if w.shape != (C,):
        raise ValueError(f"{op}: weight of shape {w.shape} does not match the {C} classes of the input")
    keep = target != ignore_index
    bad = keep & ((target < 0) | (target >= C))
    if bad.any():
        v = int(target[bad].flat[0])
        raise IndexError(
            f"{op}: target value {v} is out of range for {C} classes (expected 0 <= target < {C}, "
            f"or ignore_index={ignore_index})"
        )
    t = np.where(keep, target, 0)
    wt = w[t] * keep  # each element's weight, 0 where ignored
    eps = float(label_smoothing)
    loss = -(1 - eps) * wt * np.take_along_axis(logp, t[..., None], axis=-1)[..., 0]
    if eps:
        with np.errstate(invalid="ignore"):
            loss = loss - np.sum(logp * w, axis=-1) * (eps / C) * keep  # (bool * float would be float64)
    saved, denom = (t, wt, keep, w), None
    if reduction == "sum":
        loss = np.asarray(loss.sum())
    elif reduction == "mean":
        denom = wt.sum()
        with np.errstate(invalid="ignore", divide="ignore"):  # every element ignored: NaN, as in PyTorch
            loss = np.asarray(loss.sum() / denom)
    return loss, saved, (eps, denom)


def _nll_backward(g, saved, consts):
    """dL/dlogp: -(1 - ε) · w[t_i] at each target class, and -(ε / C) · w_c at every class of a kept
    element, times the upstream gradient (divided by the 'mean' denominator; zero when every target
    is ignored, as in PyTorch)."""
    t, wt, keep, w = saved
    eps, denom = consts
    if denom is not None:
        g = g / denom if denom != 0 else np.zeros_like(g)
    G = np.zeros(t.shape + w.shape, dtype=w.dtype)
    np.put_along_axis(G, t[..., None], (-(1 - eps) * wt * g)[..., None], axis=-1)
    if eps:
        G -= w * (eps / w.shape[0]) * (keep * g)[..., None]
    return G


class CrossEntropy(Function):
    """Softmax cross-entropy of class-index targets, fused with its log_softmax.

    Backward: with G = dL/dlogp (from `_nll_backward`), dL/dx = G - softmax(x) · Σ_c G.
    """

    @staticmethod
    def forward(ctx, x, target, weight, ignore_index, reduction, label_smoothing):
        target = np.asarray(target)
        xl = _classes_last("cross_entropy", x, target)
        with np.errstate(invalid="ignore"):
            logp = _log_softmax(xl, -1)
        loss, saved, ctx.consts = _nll("cross_entropy", logp, target, weight, ignore_index, reduction,
                                       label_smoothing)
        ctx.save_for_backward(logp, *saved)
        ctx.axis = 0 if x.ndim == 1 else 1
        return loss

    @staticmethod
    def backward(ctx, g):
        logp, *saved = ctx.saved_tensors
        G = _nll_backward(g, saved, ctx.consts)
        gx = G - np.exp(logp) * np.sum(G, axis=-1, keepdims=True)
        return np.moveaxis(gx, -1, ctx.axis), None, None, None, None, None


class NllLoss(Function):
    """Negative log-likelihood of class-index targets given log-probabilities."""

    @staticmethod
    def forward(ctx, logp, target, weight, ignore_index, reduction):
        target = np.asarray(target)
        lp = _classes_last("nll_loss", logp, target)
        loss, saved, ctx.consts = _nll("nll_loss", lp, target, weight, ignore_index, reduction, 0.0)
        ctx.save_for_backward(*saved)
        ctx.axis = 0 if logp.ndim == 1 else 1
        return loss

    @staticmethod
    def backward(ctx, g):
        G = _nll_backward(g, ctx.saved_tensors, ctx.consts)
        return np.moveaxis(G, -1, ctx.axis), None, None, None, None


def _weight_array(weight):
    """Loss weights take no gradient (as in PyTorch): pass the raw array, outside the graph."""
    if weight is None:
        return None
    return np.asarray(weight.data if isinstance(weight, Tensor) else weight)


def cross_entropy(input, target, weight=None, *, ignore_index=-100, reduction="mean", label_smoothing=0.0):  # noqa: A002
    """Cross-entropy between softmax(input) over the class dimension and class-index targets.

    input (C,), (N, C) or (N, C, d1, ...) holds logits; target (), (N,) or (N, d1, ...) holds int
    class indices. Targets equal to `ignore_index` contribute nothing (not even to the 'mean'
    denominator); `weight` (C,) rescales each class; `label_smoothing` ε mixes the one-hot target
    with the uniform distribution: (1 - ε)·onehot + ε/C.
    """
    return CrossEntropy.apply(input, target, _weight_array(weight), ignore_index, reduction, float(label_smoothing))


def nll_loss(input, target, weight=None, *, ignore_index=-100, reduction="mean"):  # noqa: A002
    """Negative log-likelihood -input[target] of class-index targets; input holds log-probabilities."""
    return NllLoss.apply(input, target, _weight_array(weight), ignore_index, reduction)


class BCEWithLogits(Function):
    """Binary cross-entropy on logits x, targets y ∈ [0, 1], weight w and positive-class weight p:

        loss = w · [(1 - y) · x + (1 + (p - 1) y) · softplus(-x)]

    which equals -w · [p y log σ(x) + (1 - y) log(1 - σ(x))] without ever forming log σ(x).
    """

    @staticmethod
    def forward(ctx, x, y, w, pw):
        if x.shape != y.shape:
            raise ValueError(
                f"binary_cross_entropy_with_logits: target of shape {y.shape} must have the same shape as "
                f"input of shape {x.shape}"
            )
        for name, a in (("weight", w), ("pos_weight", pw)):
            if a is not None and np.broadcast_shapes(a.shape, x.shape) != x.shape:
                raise ValueError(
                    f"binary_cross_entropy_with_logits: {name} of shape {a.shape} does not broadcast to "
                    f"input of shape {x.shape}"
                )
        sp = _softplus(-x)  # -log σ(x)
        lw = 1.0 if pw is None else 1 + (pw - 1) * y
        loss = (1 - y) * x + lw * sp
        ctx.save_for_backward(x, y, w, pw, sp)
        return loss if w is None else loss * w

    @staticmethod
    def backward(ctx, g):  # weight and pos_weight are constants (no gradient, as in PyTorch)
        x, y, w, pw, sp = ctx.saved_tensors
        if w is not None:
            g = g * w
        lw = 1.0 if pw is None else 1 + (pw - 1) * y
        gx = g * ((1 - y) - lw * _sigmoid(-x)) if ctx.needs_input_grad[0] else None  # softplus(-x)' = -σ(-x)
        gy = g * (-x + (0.0 if pw is None else (pw - 1) * sp)) if ctx.needs_input_grad[1] else None
        return gx, gy, None, None


def binary_cross_entropy_with_logits(input, target, weight=None, *, reduction="mean", pos_weight=None):  # noqa: A002
    """Binary cross-entropy of sigmoid(input) against targets in [0, 1], stable for any logit.

    `weight` rescales each element's loss; `pos_weight` (broadcast over the last dimension, one per
    class) weighs the positive term, trading recall for precision.
    """
    _check_reduction("binary_cross_entropy_with_logits", reduction)
    loss = BCEWithLogits.apply(input, target, _weight_array(weight), _weight_array(pos_weight))
    return _reduce("binary_cross_entropy_with_logits", loss, reduction)


# --- regression losses --------------------------------------------------------------------------


def _pair_shapes(op, input, target):  # noqa: A002
    if tuple(input.shape) != tuple(target.shape):
        try:
            np.broadcast_shapes(tuple(input.shape), tuple(target.shape))
        except ValueError:
            raise ValueError(f"{op}: input of shape {input.shape} and target of shape {target.shape} "
                             "cannot be broadcast together") from None
        warnings.warn(
            f"{op}: using a target size ({tuple(target.shape)}) that is different to the input size "
            f"({tuple(input.shape)}); they are broadcast, which is often not what was meant",
            UserWarning,
            stacklevel=3,
        )


def mse_loss(input, target, *, reduction="mean"):  # noqa: A002
    """Mean squared error (x - y)², reduced by 'mean' (default), 'sum' or 'none'."""
    _check_reduction("mse_loss", reduction)
    _pair_shapes("mse_loss", input, target)
    d = input - target
    return _reduce("mse_loss", d * d, reduction)


def l1_loss(input, target, *, reduction="mean"):  # noqa: A002
    """Mean absolute error |x - y|, reduced by 'mean' (default), 'sum' or 'none'."""
    _check_reduction("l1_loss", reduction)
    _pair_shapes("l1_loss", input, target)
    return _reduce("l1_loss", (input - target).abs(), reduction)


# --- normalization ------------------------------------------------------------------------------


def _normalize_backward(gxhat, xhat, rstd, axes):
    """dL/dx of xhat = (x - mean) · rstd, given dL/dxhat, the statistics taken over `axes`:

    dx = rstd · (dxhat - mean(dxhat) - xhat · mean(dxhat · xhat))   (Ioffe & Szegedy 2015, §3)
    """
    return rstd * (
        gxhat - gxhat.mean(axis=axes, keepdims=True) - xhat * (gxhat * xhat).mean(axis=axes, keepdims=True)
    )


def _standardize(x, axes, eps):
    """(x - mean) / sqrt(var + eps) over axes with the biased variance, and 1/sqrt(var + eps)."""
    mean = x.mean(axis=axes, keepdims=True)
    xc = x - mean
    var = (xc * xc).mean(axis=axes, keepdims=True)
    rstd = 1 / np.sqrt(var + eps)
    return xc * rstd, rstd, mean, var


class LayerNorm(Function):
    """Layer normalization over the trailing dims (Ba et al. 2016, eq. 4), then x̂ · weight + bias."""

    @staticmethod
    def forward(ctx, x, weight, bias, normalized_shape, eps):
        k = len(normalized_shape)
        if k == 0 or k > x.ndim or x.shape[x.ndim - k :] != normalized_shape:
            raise ValueError(
                f"layer_norm: normalized_shape {normalized_shape} does not match the trailing dimensions "
                f"of input of shape {x.shape}"
            )
        for name, a in (("weight", weight), ("bias", bias)):
            if a is not None and a.shape != normalized_shape:
                raise ValueError(f"layer_norm: {name} of shape {a.shape} must have shape {normalized_shape}")
        axes = tuple(range(x.ndim - k, x.ndim))
        xhat, rstd, _, _ = _standardize(x, axes, eps)
        out = xhat if weight is None else xhat * weight
        out = out if bias is None else out + bias
        ctx.save_for_backward(xhat, rstd, weight)
        ctx.axes, ctx.lead = axes, tuple(range(x.ndim - k))
        return out

    @staticmethod
    def backward(ctx, g):
        xhat, rstd, w = ctx.saved_tensors
        need = ctx.needs_input_grad
        gx = _normalize_backward(g if w is None else g * w, xhat, rstd, ctx.axes) if need[0] else None
        gw = np.sum(g * xhat, axis=ctx.lead) if need[1] else None
        gb = np.sum(g, axis=ctx.lead) if need[2] else None
        return gx, gw, gb, None, None


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5):  # noqa: A002
    """Normalize each sample over its trailing `normalized_shape` dims to mean 0, variance 1."""
    if isinstance(normalized_shape, (int, np.integer)):
        normalized_shape = (int(normalized_shape),)
    return LayerNorm.apply(input, weight, bias, tuple(normalized_shape), float(eps))


def _channel_view(a, ndim):
    """A per-channel (C,) array shaped (1, C, 1, ..., 1) to broadcast against (N, C, *) input."""
    return a.reshape((1, -1) + (1,) * (ndim - 2))


def _check_channels(op, x, C, **arrays):
    if x.ndim < 2:
        raise ValueError(f"{op}: input must be (N, C, *), got shape {x.shape}")
    for name, a in arrays.items():
        if a is not None and a.shape != (C,):
            raise ValueError(f"{op}: {name} of shape {a.shape} must have shape ({C},) for input of shape {x.shape}")


class GroupNorm(Function):
    """Group normalization (Wu & He 2018, eq. 1-3): statistics over each group of C/G channels
    and all spatial positions of one sample, then a per-channel affine map."""

    @staticmethod
    def forward(ctx, x, num_groups, weight, bias, eps):
        _check_channels("group_norm", x, x.shape[1] if x.ndim >= 2 else 0, weight=weight, bias=bias)
        N, C = x.shape[:2]
        if num_groups <= 0 or C % num_groups:
            raise ValueError(f"group_norm: {C} channels cannot be split into num_groups={num_groups} equal groups")
        if N * (C // num_groups) * math.prod(x.shape[2:]) == 1:  # PyTorch's check, inherited from batch_norm
            raise ValueError(f"group_norm: expected more than 1 value per channel, got input of shape {x.shape} "
                             f"with num_groups={num_groups}")
        xg = x.reshape(N, num_groups, -1)
        xhat, rstd, _, _ = _standardize(xg, (2,), eps)
        xhat = xhat.reshape(x.shape)
        out = xhat if weight is None else xhat * _channel_view(weight, x.ndim)
        out = out if bias is None else out + _channel_view(bias, x.ndim)
        ctx.save_for_backward(xhat, rstd, weight)
        ctx.groups = num_groups
        return out

    @staticmethod
    def backward(ctx, g):
        xhat, rstd, w = ctx.saved_tensors
        need = ctx.needs_input_grad
        N = xhat.shape[0]
        other = (0,) + tuple(range(2, xhat.ndim))
        gx = gw = gb = None
        if need[0]:
            gxhat = g if w is None else g * _channel_view(w, g.ndim)
            gx = _normalize_backward(gxhat.reshape(N, ctx.groups, -1), xhat.reshape(N, ctx.groups, -1), rstd, (2,))
            gx = gx.reshape(xhat.shape)
        if need[2]:
            gw = np.sum(g * xhat, axis=other)
        if need[3]:
            gb = np.sum(g, axis=other)
        return gx, None, gw, gb, None


def group_norm(input, num_groups, weight=None, bias=None, eps=1e-5):  # noqa: A002
    """Normalize (N, C, *) input over groups of channels per sample; independent of the batch size."""
    return GroupNorm.apply(input, int(num_groups), weight, bias, float(eps))


class BatchNorm(Function):
    """Batch normalization (Ioffe & Szegedy 2015, Alg. 1): per channel, statistics over the batch and
    all spatial positions in training (running statistics updated in place), the running ones in eval."""

    @staticmethod
    def forward(ctx, x, running_mean, running_var, weight, bias, training, momentum, eps):
        C = x.shape[1] if x.ndim >= 2 else 0
        _check_channels("batch_norm", x, C, running_mean=running_mean, running_var=running_var,
                        weight=weight, bias=bias)
        axes = (0,) + tuple(range(2, x.ndim))
        if training:
            n = x.size // C
            if n <= 1:
                raise ValueError(f"batch_norm: expected more than 1 value per channel when training, got input "
                                 f"of shape {x.shape}")
            xhat, rstd, mean, var = _standardize(x, axes, eps)
            if running_mean is not None:  # exponential moving averages, updated in place as in PyTorch
                running_mean[...] = (1 - momentum) * running_mean + momentum * mean.reshape(C)
            if running_var is not None:  # the running variance is the unbiased one (n - 1)
                running_var[...] = (1 - momentum) * running_var + momentum * var.reshape(C) * (n / (n - 1))
        else:
            if running_mean is None or running_var is None:
                raise ValueError("batch_norm: running_mean and running_var are required when training=False")
            rstd = 1 / np.sqrt(_channel_view(running_var, x.ndim) + eps)
            xhat = (x - _channel_view(running_mean, x.ndim)) * rstd
            xhat = xhat.astype(x.dtype, copy=False)
        out = xhat if weight is None else xhat * _channel_view(weight, x.ndim)
        out = out if bias is None else out + _channel_view(bias, x.ndim)
        ctx.save_for_backward(xhat, rstd, weight)
        ctx.axes, ctx.training = axes, training
        return out

    @staticmethod
    def backward(ctx, g):
        xhat, rstd, w = ctx.saved_tensors
        need = ctx.needs_input_grad
        gx = gw = gb = None
        if need[0]:
            gxhat = g if w is None else g * _channel_view(w, g.ndim)
            # in eval the statistics are constants, so x̂ is just an affine function of x
            gx = _normalize_backward(gxhat, xhat, rstd, ctx.axes) if ctx.training else gxhat * rstd
        if need[3]:
            gw = np.sum(g * xhat, axis=ctx.axes)
        if need[4]:
            gb = np.sum(g, axis=ctx.axes)
        return gx, None, None, gw, gb, None, None, None


def batch_norm(input, running_mean, running_var, weight=None, bias=None, training=False, momentum=0.1, eps=1e-5):  # noqa: A002
    """Normalize (N, C, *) input per channel; in training, update running_mean/running_var in place:
    r ← (1 - momentum) · r + momentum · batch statistic (the unbiased variance for running_var)."""
    def raw(a):  # the running statistics are buffers, not graph inputs: updated in place, no gradient
        return a.data if isinstance(a, Tensor) else a

    return BatchNorm.apply(input, raw(running_mean), raw(running_var), weight, bias, bool(training),
                           float(momentum), float(eps))


# --- embedding, one_hot, dropout ----------------------------------------------------------------


def _check_indices(op, idx, n, what):
    if not np.issubdtype(idx.dtype, np.integer):
        raise TypeError(f"{op}: indices must be an integer tensor (e.g. int64), got dtype {idx.dtype}")
    bad = (idx < 0) | (idx >= n)
    if bad.any():
        raise IndexError(f"{op}: index {int(idx[bad].flat[0])} is out of range for {n} {what}")


class Embedding(Function):
    """Row lookup weight[input]; backward adds each upstream row into the row it came from."""

    @staticmethod
    def forward(ctx, idx, weight, padding_idx):
        idx = np.asarray(idx)
        if weight.ndim != 2:
            raise ValueError(f"embedding: weight must be 2-d (num_embeddings, embedding_dim), got {weight.shape}")
        _check_indices("embedding", idx, weight.shape[0], "embeddings")
        ctx.save_for_backward(idx)
        ctx.shape, ctx.padding_idx = weight.shape, padding_idx
        return weight[idx]

    @staticmethod
    def backward(ctx, g):
        (idx,) = ctx.saved_tensors
        gw = np.zeros(ctx.shape, dtype=g.dtype)
        np.add.at(gw, idx.reshape(-1), g.reshape(-1, ctx.shape[1]))  # repeated indices accumulate
        if ctx.padding_idx is not None:
            gw[ctx.padding_idx] = 0  # the padding row is never trained
        return None, gw, None


def embedding(input, weight, padding_idx=None):  # noqa: A002
    """Look up rows of `weight` (num_embeddings, dim) by integer indices of any shape.

    The row `padding_idx` (negative counts from the end) receives no gradient, as in PyTorch.
    """
    if padding_idx is not None:
        n = weight.shape[0]
        if not -n <= padding_idx < n:
            raise ValueError(f"embedding: padding_idx {padding_idx} must be within num_embeddings ({n})")
        padding_idx = int(padding_idx) % n
    return Embedding.apply(input, weight, padding_idx)


def one_hot(tensor, num_classes=-1):
    """Integer class indices of any shape → int64 one-hot vectors along a new last dimension (no grad)."""
    idx = np.asarray(tensor.data if isinstance(tensor, Tensor) else tensor)
    if not np.issubdtype(idx.dtype, np.integer):
        raise TypeError(f"one_hot: needs an integer tensor of class indices, got dtype {idx.dtype}")
    if num_classes == -1:
        if idx.size == 0:
            raise ValueError("one_hot: cannot infer num_classes from an empty tensor; pass num_classes")
        num_classes = int(idx.max()) + 1
    _check_indices("one_hot", idx, num_classes, "classes")
    out = np.zeros(idx.shape + (num_classes,), dtype=np.int64)
    np.put_along_axis(out, idx[..., None].astype(np.int64), 1, axis=-1)
    return Tensor(out)


class Dropout(Function):
    """Multiply by a fixed random mask already scaled by 1/(1 - p); backward uses the same mask."""

    @staticmethod
    def forward(ctx, x, scale):
        ctx.save_for_backward(scale)
        return x * scale

    @staticmethod
    def backward(ctx, g):
        (scale,) = ctx.saved_tensors
        return g * scale, None


def dropout(input, p=0.5, training=True, inplace=False, *, generator=None):  # noqa: A002
    """Zero each element with probability p and scale the survivors by 1/(1 - p), so the expected
    value is unchanged (Srivastava et al. 2014, inverted dropout). Identity when p = 0 or not training."""
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout: probability has to be between 0 and 1, but got {p}")
    if not training or p == 0.0:
        return input
    gen = generator or _random.default_generator
    keep = gen.bernoulli(1.0 - p, input.shape)
    scale = np.zeros(input.shape, input.dtype) if p == 1.0 else (keep * (1.0 / (1.0 - p))).astype(input.dtype)
    out = Dropout.apply(input, scale)
    return _inplace("dropout", input, out) if inplace else out


# --- activations --------------------------------------------------------------------------------

_SQRT_2 = math.sqrt(2.0)
_SQRT_2_OVER_PI = math.sqrt(2.0 / math.pi)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


class Gelu(Function):
    """GELU (Hendrycks & Gimpel 2016): x · Φ(x), exactly with erf or with the tanh approximation."""

    @staticmethod
    def forward(ctx, x, approximate):
        ctx.approximate = approximate
        if approximate == "none":
            cdf = (0.5 * (1 + erf(x / _SQRT_2))).astype(x.dtype, copy=False)  # scipy's erf has no float16 loop
            ctx.save_for_backward(x, cdf)
            return x * cdf
        if approximate == "tanh":  # Φ(x) ≈ ½ (1 + tanh(√(2/π) (x + 0.044715 x³)))
            t = np.tanh(_SQRT_2_OVER_PI * (x + 0.044715 * x * x * x))
            ctx.save_for_backward(x, t)
            return 0.5 * x * (1 + t)
        raise ValueError(f"gelu: approximate={approximate!r} is not valid; use 'none' or 'tanh'")

    @staticmethod
    def backward(ctx, g):
        x, c = ctx.saved_tensors
        if ctx.approximate == "none":  # d/dx x Φ(x) = Φ(x) + x φ(x)
            return g * (c + x * _INV_SQRT_2PI * np.exp(-0.5 * x * x)), None
        dt = (1 - c * c) * _SQRT_2_OVER_PI * (1 + 3 * 0.044715 * x * x)
        return g * (0.5 * (1 + c) + 0.5 * x * dt), None


def gelu(input, approximate="none"):  # noqa: A002
    """Gaussian error linear unit x · Φ(x); approximate='tanh' is GPT-2's approximation."""
    return Gelu.apply(input, approximate)


class Silu(Function):
    """SiLU / swish (Elfwing et al. 2018): x · σ(x); derivative σ(x) (1 + x (1 - σ(x)))."""

    @staticmethod
    def forward(ctx, x):
        s = _sigmoid(x)
        ctx.save_for_backward(x, s)
        return x * s

    @staticmethod
    def backward(ctx, g):
        x, s = ctx.saved_tensors
        return g * s * (1 + x * (1 - s))


def silu(input, inplace=False):  # noqa: A002
    """x · sigmoid(x), the smooth ReLU of diffusion U-Nets."""
    out = Silu.apply(input)
    return _inplace("silu", input, out) if inplace else out


def relu(input, inplace=False):  # noqa: A002
    """max(x, 0); the gradient at 0 is 0 (as in PyTorch)."""
    out = ops.Relu.apply(input)
    return _inplace("relu", input, out) if inplace else out


class LeakyRelu(Function):
    """x for x > 0, slope · x otherwise."""

    @staticmethod
    def forward(ctx, x, slope):
        pos = x > 0
        ctx.save_for_backward(pos)
        ctx.slope = slope
        return np.where(pos, x, x * slope)

    @staticmethod
    def backward(ctx, g):
        (pos,) = ctx.saved_tensors
        return np.where(pos, g, g * ctx.slope), None


def leaky_relu(input, negative_slope=0.01, inplace=False):  # noqa: A002
    """ReLU with a small slope for negative inputs, so no unit dies (the GAN discriminators' choice)."""
    out = LeakyRelu.apply(input, float(negative_slope))
    return _inplace("leaky_relu", input, out) if inplace else out


def sigmoid(input):  # noqa: A002
    """1 / (1 + e^{-x}), stable for any x."""
    return ops.Sigmoid.apply(input)


def tanh(input):  # noqa: A002
    """Hyperbolic tangent."""
    return ops.Tanh.apply(input)


class Softplus(Function):
    """log(1 + e^{βx}) / β, and x itself where βx > threshold (PyTorch's linear region)."""

    @staticmethod
    def forward(ctx, x, beta, threshold):
        bx = x * beta
        linear = bx > threshold
        ctx.save_for_backward(bx, linear)
        return np.where(linear, x, _softplus(bx) / beta)

    @staticmethod
    def backward(ctx, g):
        bx, linear = ctx.saved_tensors
        return np.where(linear, g, g * _sigmoid(bx)), None, None


def softplus(input, beta=1.0, threshold=20.0):  # noqa: A002
    """A smooth ReLU: log(1 + e^{βx}) / β (exactly x where βx > threshold)."""
    return Softplus.apply(input, float(beta), float(threshold))


class LogSigmoid(Function):
    """log σ(x) = -softplus(-x); derivative σ(-x)."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        return -_softplus(-x)

    @staticmethod
    def backward(ctx, g):
        (x,) = ctx.saved_tensors
        return g * _sigmoid(-x)


def logsigmoid(input):  # noqa: A002
    """log(sigmoid(x)), exact for large |x| (never log of an underflowed 0)."""
    return LogSigmoid.apply(input)


# --- normalize ----------------------------------------------------------------------------------


class PNorm(Function):
    """‖x‖_p along `dim` (kept), with PyTorch's gradient at a zero vector: 0, where the chain rule through
    (Σ|x|^p)^(1/p) gives 0·∞ = NaN (F.normalize of a zero row, or of one whose squares underflow)."""

    @staticmethod
    def forward(ctx, x, p, dim):
        norm = (np.abs(x) ** p).sum(axis=dim, keepdims=True) ** (1.0 / p)
        ctx.save_for_backward(x, norm)
        ctx.p = p
        return norm

    @staticmethod
    def backward(ctx, g):
        x, norm = ctx.saved_tensors
        p = ctx.p
        with np.errstate(divide="ignore", invalid="ignore"):  # ∂‖x‖/∂x = sign(x)·(|x|/‖x‖)^(p−1)
            d = np.sign(x) * (np.abs(x) / norm) ** (p - 1)
        return g * np.where((norm == 0) | (x == 0), 0.0, d), None, None


def normalize(input, p=2.0, dim=1, eps=1e-12):  # noqa: A002
    """x / max(‖x‖_p, eps) along `dim` (unit vectors, as CLIP does to its embeddings)."""
    x = _tensor(input)
    dim = _dim("normalize", dim, x.ndim)
    if p == math.inf:
        norm = x.abs().amax(dim, keepdim=True)
    elif p <= 0:
        raise ValueError(f"normalize: p must be positive, got {p}")
    else:
        norm = PNorm.apply(x, float(p), dim)
    return x / norm.clamp(min=eps)
