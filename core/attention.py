"""Attention and Gumbel-softmax ops of core.functional (the kernel issue swaps their insides).

Each op is ONE `Function` whose forward and backward call NumPy helpers on raw arrays
(`_sdpa_forward`, `_sdpa_backward`, `_gumbel_softmax_forward`, `_softmax_backward`), the
specification that the Numba/CUDA kernels of `kernels/` reproduce one for one.
"""

from __future__ import annotations

import math

import numpy as np

from . import random as _random
from .autograd import Function
from .tensor import Tensor

# --- scaled dot-product attention --------------------------------------------------------------------


def _softmax(s, axis=-1):
    """Stable softmax: subtract the max first. A row that is all -inf (fully masked) gives all zeros."""
    m = np.max(s, axis=axis, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)  # an all -inf row keeps its -inf scores, so exp gives 0, not NaN
    e = np.exp(s - m)
    z = np.sum(e, axis=axis, keepdims=True)
    return e / np.where(z > 0, z, 1.0)


def _softmax_backward(p, dp, axis=-1):
    """Jacobian-vector product of softmax: dS = P ∘ (dP − Σⱼ dPⱼ Pⱼ). Rows where P = 0 get 0."""
    return p * (dp - np.sum(dp * p, axis=axis, keepdims=True))


def _dropout(p, keep, dropout_p):
    """Inverted dropout with a given keep mask: kept entries scaled by 1/(1-p) (none kept when p = 1)."""
    if keep is None:
        return p
    return p * keep / (1.0 - dropout_p) if dropout_p < 1 else np.zeros_like(p)


def _sdpa_forward(q, k, v, mask, is_causal, scale, keep, dropout_p):
    """softmax(Q Kᵀ · scale + mask) V (Vaswani et al. 2017, eq. 1), with optional inverted dropout on P.

    q: (..., L, E), k: (..., S, E), v: (..., S, Ev); mask: None, bool (True = may attend) or additive
    float, broadcastable to (..., L, S); keep: None or the bool dropout mask on P. Returns the output
    and P (the attention weights before dropout), which the backward needs.
    """
    s = (q @ np.swapaxes(k, -1, -2)) * scale
    if is_causal:  # top-left aligned: query i sees keys j <= i, as torch.ones(L, S).tril()
        s = np.where(np.tri(s.shape[-2], s.shape[-1], dtype=bool), s, -np.inf)
    if mask is not None:
        s = np.where(mask, s, -np.inf) if mask.dtype == np.bool_ else s + mask
    p = _softmax(s)
    return _dropout(p, keep, dropout_p) @ v, p


def _sdpa_backward(grad, q, k, v, p, keep, dropout_p, scale):
    """Gradients of Q, K, V and of the scores S (= of an additive mask) from dO, given P."""
    dv = np.swapaxes(_dropout(p, keep, dropout_p), -1, -2) @ grad
    dp = _dropout(grad @ np.swapaxes(v, -1, -2), keep, dropout_p)  # dropout is linear: same mask, same scale
    ds = _softmax_backward(p, dp)
    dq = (ds @ k) * scale
    dk = (np.swapaxes(ds, -1, -2) @ q) * scale
    return dq, dk, dv, ds


class ScaledDotProductAttention(Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, *, is_causal, scale, keep, dropout_p):
        out, p = _sdpa_forward(q, k, v, mask, is_causal, scale, keep, dropout_p)
        ctx.save_for_backward(q, k, v, p, keep)
        ctx.args = (dropout_p, scale)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, p, keep = ctx.saved_tensors
        dq, dk, dv, ds = _sdpa_backward(grad, q, k, v, p, keep, *ctx.args)
        return dq, dk, dv, ds if ctx.needs_input_grad[3] else None


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, *,
                                 generator=None, pattern=None):
    """softmax(Q Kᵀ · scale + mask) V over the last two dims, with PyTorch's arguments and semantics.

    query (..., L, E), key (..., S, E), value (..., S, Ev) → (..., L, Ev); leading dims broadcast.
    attn_mask: bool (True = may attend) or additive float of the query's dtype, broadcastable to
    (..., L, S); is_causal: query i attends keys j <= i (top-left aligned, the tril of ones(L, S)),
    not together with attn_mask; scale defaults to 1/sqrt(E). dropout_p > 0 drops attention
    weights (kept ones scaled by 1/(1-p)) with `generator` — like PyTorch it applies whenever
    dropout_p > 0, so pass dropout_p only in training. A fully masked query row returns zeros and
    passes zero gradient (PyTorch 2.13 returns zeros too, for bool and -inf masks alike).
    `pattern` (keyword-only) is reserved for the structured sparse masks of the kernels issue.
    """
    op = "scaled_dot_product_attention"
    if pattern is not None:
        raise NotImplementedError(f"{op}: pattern={pattern!r} (structured attention masks) is not implemented yet")
    q, k, v = query, key, value
    if min(q.ndim, k.ndim, v.ndim) < 2:
        raise ValueError(f"{op}: query, key and value need at least 2 dims, got {q.shape}, {k.shape}, {v.shape}")
    if not (q.dtype == k.dtype == v.dtype) or not np.issubdtype(q.dtype, np.floating):
        raise TypeError(f"{op}: query, key and value must have the same floating dtype, got "
                        f"{q.dtype}, {k.dtype} and {v.dtype}")
    if q.shape[-1] != k.shape[-1]:
        raise ValueError(f"{op}: query {q.shape} and key {k.shape} must have the same embedding size (last dim)")
    if k.shape[-2] != v.shape[-2]:
        raise ValueError(f"{op}: key {k.shape} and value {v.shape} must have the same sequence length (dim -2)")
    try:
        batch = np.broadcast_shapes(q.shape[:-2], k.shape[:-2], v.shape[:-2])
    except ValueError:
        raise ValueError(f"{op}: batch dims of query {q.shape}, key {k.shape}, value {v.shape} "
                         "cannot be broadcast together") from None
    scores = (*batch, q.shape[-2], k.shape[-2])
    if attn_mask is not None:
        if is_causal:
            raise ValueError(f"{op}: explicit attn_mask should not be set when is_causal=True")
        if attn_mask.dtype != np.bool_ and attn_mask.dtype != q.dtype:
            raise TypeError(f"{op}: attn_mask must be bool or have the query's dtype {q.dtype}, got {attn_mask.dtype}")
        try:
            if np.broadcast_shapes(attn_mask.shape, scores) != scores:
                raise ValueError
        except ValueError:
            raise ValueError(f"{op}: attn_mask of shape {attn_mask.shape} does not broadcast to the scores' shape "
                             f"{scores} (query {q.shape}, key {k.shape})") from None
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"{op}: dropout_p must be in [0, 1], got {dropout_p}")
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else float(scale)
    keep = None
    if dropout_p > 0:
        gen = generator if generator is not None else _random.default_generator
        keep = gen.bernoulli(1.0 - dropout_p, scores)
    return ScaledDotProductAttention.apply(q, k, v, attn_mask, is_causal=bool(is_causal), scale=scale, keep=keep,
                                           dropout_p=float(dropout_p))


# --- Gumbel-softmax ------------------------------------------------------------------------------------


def _gumbel_noise(shape, eps, generator, dtype):
    """Standard Gumbel noise g = −log(−log u), u ~ U(0, 1); eps keeps both logs finite."""
    u = generator.uniform(shape)
    return (-np.log(-np.log(u + eps) + eps)).astype(dtype, copy=False)


def _gumbel_softmax_forward(logits, g, tau, hard, axis):
    """y_soft = softmax((logits + g) / τ) and the returned value: y_soft, or its one-hot argmax if hard."""
    y = _softmax((logits + g) / tau, axis=axis)
    if not hard:
        return y, y
    y_hard = np.zeros_like(y)
    np.put_along_axis(y_hard, np.expand_dims(np.argmax(y, axis=axis), axis), 1.0, axis=axis)  # first max on ties
    return y_hard, y


class GumbelSoftmax(Function):
    @staticmethod
    def forward(ctx, logits, g, *, tau, hard, axis):
        out, y_soft = _gumbel_softmax_forward(logits, g.astype(logits.dtype, copy=False), tau, hard, axis)
        ctx.save_for_backward(y_soft)
        ctx.args = (tau, axis)
        return out

    @staticmethod
    def backward(ctx, grad):
        # hard: the straight-through estimator y_hard − sg[y_soft] + y_soft passes y_soft's gradient
        (y,) = ctx.saved_tensors
        tau, axis = ctx.args
        d = _softmax_backward(y, grad, axis=axis) / tau
        return d, d  # logits and noise enter only through their sum


def gumbel_softmax(logits, tau=1.0, hard=False, eps=1e-10, dim=-1, *, generator=None, noise=None):
    """A differentiable sample from the categorical distribution softmax(logits) along `dim`.

    y = softmax((logits + g) / τ), g = −log(−log u) (Jang et al. 2017, eq. 2; Maddison et al. 2017).
    As τ → 0 it approaches the one-hot sample argmax(logits + g). hard=True returns that one-hot
    in the forward with y_soft's gradient in the backward (straight-through: y_hard − sg[y_soft] +
    y_soft, PyTorch's semantics; the value is exactly one-hot here). `noise` injects g (same shape
    as logits) instead of drawing it from `generator` (or the default generator), so a test can
    reproduce a draw exactly. eps guards the logs of u (PyTorch ignores it).
    """
    op = "gumbel_softmax"
    if not np.issubdtype(logits.dtype, np.floating):
        raise TypeError(f"{op}: logits must be floating point, got {logits.dtype}")
    if not -logits.ndim <= dim < logits.ndim:
        raise IndexError(f"{op}: dim {dim} out of range for logits of shape {logits.shape}")
    if not tau > 0:
        raise ValueError(f"{op}: tau must be positive, got {tau}")
    if noise is None:
        gen = generator if generator is not None else _random.default_generator
        noise = _gumbel_noise(logits.shape, eps, gen, logits.dtype)
    else:
        noise = noise if isinstance(noise, Tensor) else np.asarray(noise)
        if tuple(noise.shape) != tuple(logits.shape):
            raise ValueError(f"{op}: noise of shape {tuple(noise.shape)} must have the logits' shape {logits.shape}")
    axis = dim % logits.ndim
    return GumbelSoftmax.apply(logits, noise, tau=float(tau), hard=bool(hard), axis=axis)

