"""Attention and Gumbel-softmax ops of core.functional, as Functions that call the kernels of `kernels/`.

- `scaled_dot_product_attention` runs ONE Function, `Attention`, whose forward is
  `kernels.attention.attention_forward` (tiled, online softmax: it saves the output and the row
  log-sum-exp, never the L×S probabilities) and whose backward is `kernels.attention.attention_backward`
  (which recomputes the probabilities tile by tile). The dense NumPy Function `ScaledDotProductAttention`
  (`_sdpa_forward`, `_sdpa_backward`) remains for dropout on the attention weights and for an additive
  mask that requires a gradient (and for inputs the kernels do not take; see `_needs_dense`).
- `gumbel_softmax` runs `GumbelSoftmax`, whose forward and backward are the fused kernels of
  `kernels.gumbel` (noise, softmax and one-hot in one pass per row).

The kernels pick their form by array type (NumPy → the Numba CPU kernels). The structured attention
patterns (`Causal`, `Row`, `Column`, `Conv`, `PrefixLM`) are re-exported here as `core.attention.patterns`.
"""

from __future__ import annotations

import math

import numpy as np

# the kernels are called as module attributes (_attention_kernels.attention_forward), so tests can wrap them
import kernels.attention as _attention_kernels
import kernels.gumbel as _gumbel_kernels
from kernels.attention import patterns
from kernels.attention.patterns import Causal, Column, Conv, Pattern, PrefixLM, Row

from . import random as _random
from .autograd import Function, is_grad_enabled
from .tensor import Tensor

__all__ = ["scaled_dot_product_attention", "gumbel_softmax", "patterns", "Causal", "Row", "Column", "Conv",
           "PrefixLM"]

# --- scaled dot-product attention --------------------------------------------------------------------


def _softmax(s, axis=-1):
    """Stable softmax: subtract the max first. A row that is all -inf (fully masked) gives all zeros."""
    m = np.max(s, axis=axis, keepdims=True, initial=-np.inf)  # (initial: a row of no keys, S = 0)
    m = np.where(np.isneginf(m), 0.0, m)  # an all -inf row keeps its -inf scores, so exp gives 0, not NaN
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


def _sdpa_forward(q, k, v, mask, is_causal, pattern, scale, keep, dropout_p):
    """softmax(Q Kᵀ · scale + mask) V (Vaswani et al. 2017, eq. 1), with optional inverted dropout on P.

    q: (..., L, E), k: (..., S, E), v: (..., S, Ev); mask: None, bool (True = may attend) or additive
    float, broadcastable to (..., L, S); is_causal and pattern block more pairs (the same rules as the
    kernels: kernels.attention.reference.pattern_mask); keep: None or the bool dropout mask on P.
    Returns the output and P (the attention weights before dropout), which the backward needs.
    """
    s = (q @ np.swapaxes(k, -1, -2)) * scale
    allowed = _attention_kernels.reference.pattern_mask(s.shape[-2], s.shape[-1], is_causal, pattern)  # top-left causal
    if allowed is not None:
        s = np.where(allowed, s, -np.inf)
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
    """The dense form: saves the L×S weights P. Used only for dropout and for a mask that needs a gradient."""

    @staticmethod
    def forward(ctx, q, k, v, mask, *, is_causal, pattern, scale, keep, dropout_p):
        out, p = _sdpa_forward(q, k, v, mask, is_causal, pattern, scale, keep, dropout_p)
        ctx.save_for_backward(q, k, v, p, keep)
        ctx.args = (dropout_p, scale)
        return out

    @staticmethod
    def backward(ctx, grad):
        q, k, v, p, keep = ctx.saved_tensors
        dq, dk, dv, ds = _sdpa_backward(grad, q, k, v, p, keep, *ctx.args)
        return dq, dk, dv, ds if ctx.needs_input_grad[3] else None


def _heads(a, batch):
    """a (..., n, d) broadcast to the batch dims and viewed as the kernels' 4-d (B, H, n, d).

    The batch dims (b₁, …, bₘ) become B = b₁⋯bₘ₋₁ and H = bₘ (1 and 1 when there are none).
    """
    a = np.broadcast_to(a, (*batch, *a.shape[-2:]))
    return a.reshape(math.prod(batch[:-1]), batch[-1] if batch else 1, *a.shape[-2:])


def _mask_heads(mask, batch):
    """The mask as the kernels' 4-d (B or 1, H or 1, L or 1, S or 1), its batch dims grouped like `_heads`'.

    The kernels broadcast a size-1 dim by index arithmetic, so the mask is not expanded to the scores'
    shape; only when the dims merged into B are partly broadcast (a (1, b₂, ·, ·, ·) mask against batch
    (b₁, b₂, ·)) are they expanded, since a merged dim can only be whole or 1.
    """
    mask = mask.reshape((1,) * (len(batch) + 2 - mask.ndim) + mask.shape)  # one dim per batch dim, then L, S
    if not batch:
        return mask.reshape(1, 1, *mask.shape)
    if all(n == 1 for n in mask.shape[:-3]):  # the same for every b: B = 1
        return mask.reshape(1, *mask.shape[-3:])
    mask = np.broadcast_to(mask, (*batch[:-1], *mask.shape[-3:]))  # a view unless partly broadcast
    return mask.reshape(-1, *mask.shape[-3:])


class Attention(Function):
    """softmax(Q Kᵀ · scale + mask) V through the tiled kernels of kernels.attention (FlashAttention-2).

    The forward saves the output O and the row log-sum-exp (O(L) extra memory per head, never the L×S
    weights); the backward recomputes the weights tile by tile from them (Dao 2023, algorithm 2).
    Inputs are broadcast over their batch dims here; the engine sums the gradients back.
    """

    @staticmethod
    def forward(ctx, q, k, v, *, batch, mask, causal, pattern, scale):
        q4, k4, v4 = (_heads(a, batch) for a in (q, k, v))
        mask4 = None if mask is None else _mask_heads(mask, batch)
        ctx.args = dict(scale=scale, mask=mask4, causal=causal, pattern=pattern)
        out, lse = _attention_kernels.attention_forward(q4, k4, v4, **ctx.args)
        ctx.save_for_backward(q4, k4, v4, out, lse)
        ctx.batch = batch
        return out.reshape(*batch, *out.shape[-2:])

    @staticmethod
    def backward(ctx, grad):
        q4, k4, v4, out, lse = ctx.saved_tensors
        grads = _attention_kernels.attention_backward(q4, k4, v4, out, lse, grad.reshape(out.shape), **ctx.args)
        return tuple(d.reshape(*ctx.batch, *d.shape[-2:]) for d in grads)


def scaled_dot_product_attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, *,
                                 pattern=None, generator=None):
    """softmax(Q Kᵀ · scale + mask) V over the last two dims, with PyTorch's arguments and semantics.

    query (..., L, E), key (..., S, E), value (..., S, Ev) → (..., L, Ev); leading dims broadcast.
    attn_mask: bool (True = may attend) or additive float of the query's dtype, broadcastable to
    (..., L, S); is_causal: query i attends keys j <= i (top-left aligned, the tril of ones(L, S)),
    not together with attn_mask; scale defaults to 1/sqrt(E). dropout_p > 0 drops attention
    weights (kept ones scaled by 1/(1-p)) with `generator` — like PyTorch it applies whenever
    dropout_p > 0, so pass dropout_p only in training. A fully masked query row returns zeros and
    passes zero gradient (PyTorch 2.13 returns zeros too, for bool and -inf masks alike);
    a NaN or +inf score (a NaN in q or k, a NaN or +inf in an additive mask) makes its rows NaN, as in
    PyTorch, rather than dropping the key.

    pattern (keyword-only, not in PyTorch): one of `core.attention.patterns` — Causal(), Row(T, W),
    Column(T, W), Conv(T, W, kernel), PrefixLM(P) — a structured mask evaluated inside the kernels
    (never materialized; tiles it blocks entirely are skipped). It combines with attn_mask and with
    is_causal as AND: a pair is attended only if every one of them allows it. Query q and key k are
    the flat positions 0…L−1 and 0…S−1, so for L = S = n it equals attn_mask=pattern.mask(n).
    """
    op = "scaled_dot_product_attention"
    if pattern is not None and not isinstance(pattern, Pattern):
        raise TypeError(f"{op}: pattern must be one of core.attention.patterns (Causal, Row, Column, Conv, "
                        f"PrefixLM), got {pattern!r}")
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
    if scale is None:  # with E = 0 every score is 0 whatever the scale (PyTorch: the mean of the values)
        scale = 1.0 / math.sqrt(q.shape[-1]) if q.shape[-1] else 1.0
    scale = float(scale)
    if _needs_dense(q, k, v, attn_mask, dropout_p):
        keep = None
        if dropout_p > 0:
            gen = generator if generator is not None else _random.default_generator
            keep = gen.bernoulli(1.0 - dropout_p, scores)
        return ScaledDotProductAttention.apply(q, k, v, attn_mask, is_causal=bool(is_causal), pattern=pattern,
                                               scale=scale, keep=keep, dropout_p=float(dropout_p))
    mask = attn_mask.data if isinstance(attn_mask, Tensor) else attn_mask  # a constant: no gradient flows to it
    return Attention.apply(q, k, v, batch=tuple(batch), mask=mask, causal=bool(is_causal), pattern=pattern,
                           scale=scale)


def _needs_dense(q, k, v, attn_mask, dropout_p):
    """Whether attention must take the dense NumPy Function instead of the tiled kernels.

    - dropout_p > 0: the kernels have no dropout (its keep mask is an L×S array anyway);
    - an additive attn_mask that requires a gradient: that gradient is dS, the full L×S matrix of score
      gradients, which the tiled backward never forms;
    - dtypes other than float32/float64, and empty inputs, which the kernels do not take.
    """
    mask_grad = isinstance(attn_mask, Tensor) and attn_mask.requires_grad and is_grad_enabled()
    kernel_dtype = q.dtype in (np.float32, np.float64)
    empty = 0 in (*q.shape, *k.shape, *v.shape)
    return dropout_p > 0 or mask_grad or not kernel_dtype or empty


# --- Gumbel-softmax ------------------------------------------------------------------------------------


def _seed(generator):
    """A 63-bit seed for the kernels' counter-based (Philox) noise, drawn from `generator` or the default one."""
    gen = generator if generator is not None else _random.default_generator
    return int(gen.integers(0, 2**63, ()))


def _gumbel_noise(shape, eps, generator, dtype):
    """The standard Gumbel noise g = −log(−log u) that gumbel_softmax draws with `generator`, as an array.

    It is kernels.gumbel's noise for the seed drawn from the generator (the fused kernel draws the same
    values inside its pass). eps is unused, as in PyTorch: the kernels' uniforms lie strictly inside
    (0, 1) (k + ½ over 2³²), so both logs are finite.
    """
    return _gumbel_kernels.gumbel_noise(_seed(generator), shape, dtype)


class GumbelSoftmax(Function):
    """The fused Gumbel-softmax kernel (noise, softmax and the one-hot in one pass per row) and its backward."""

    @staticmethod
    def forward(ctx, logits, noise, *, tau, hard, axis, seed):
        y, y_soft = _gumbel_kernels.gumbel_softmax_forward(logits, tau, hard, seed=seed, noise=noise, dim=axis)
        ctx.save_for_backward(y_soft)
        ctx.args = (tau, axis)
        return y

    @staticmethod
    def backward(ctx, grad):
        # hard: the straight-through estimator y_hard − sg[y_soft] + y_soft passes y_soft's gradient
        (y_soft,) = ctx.saved_tensors
        tau, axis = ctx.args
        d = _gumbel_kernels.gumbel_softmax_backward(grad, y_soft, tau, dim=axis)
        return d, d if ctx.needs_input_grad[1] else None  # logits and noise enter only through their sum


def gumbel_softmax(logits, tau=1.0, hard=False, eps=1e-10, dim=-1, *, generator=None, noise=None):
    """A differentiable sample from the categorical distribution softmax(logits) along `dim`.

    y = softmax((logits + g) / τ), g = −log(−log u) (Jang et al. 2017, eq. 2; Maddison et al. 2017).
    As τ → 0 it approaches the one-hot sample argmax(logits + g). hard=True returns that one-hot
    in the forward with y_soft's gradient in the backward (straight-through: y_hard − sg[y_soft] +
    y_soft, PyTorch's semantics; the value is exactly one-hot here).

    The noise comes from the fused kernel's counter-based generator, keyed by a seed drawn from
    `generator` (or the default generator), so core.manual_seed makes a draw reproducible. `noise`
    injects g itself (same shape as logits, rounded to their dtype) instead, so a test can reproduce a
    draw exactly. eps is unused, as in PyTorch (where it is deprecated). logits: float32 or float64.
    """
    op = "gumbel_softmax"
    if logits.dtype not in (np.float32, np.float64):
        raise TypeError(f"{op}: logits must be float32 or float64, got {logits.dtype}")
    ndim = max(logits.ndim, 1)  # a 0-d logit is a row of one (dim −1 or 0), as in PyTorch
    if not -ndim <= dim < ndim:
        raise IndexError(f"{op}: dim {dim} out of range for logits of shape {logits.shape}")
    if not tau > 0:
        raise ValueError(f"{op}: tau must be positive, got {tau}")
    seed = None
    if noise is None:
        seed = _seed(generator)
    else:
        noise = noise if isinstance(noise, Tensor) else np.asarray(noise)
        if tuple(noise.shape) != tuple(logits.shape):
            raise ValueError(f"{op}: noise of shape {tuple(noise.shape)} must have the logits' shape {logits.shape}")
        if noise.dtype != logits.dtype:
            noise = noise.to(logits.dtype) if isinstance(noise, Tensor) else noise.astype(logits.dtype)
    return GumbelSoftmax.apply(logits, noise, tau=float(tau), hard=bool(hard), axis=dim % ndim, seed=seed)
