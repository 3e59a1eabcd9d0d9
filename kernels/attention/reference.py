"""Scaled dot-product attention in plain NumPy: the specification the Numba and CUDA kernels are tested against.

Forward (Vaswani et al. 2017, eq. 1), for one (batch, head) with queries Q (L, D), keys K (S, D), values V (S, Dv):

    S = Q Kᵀ · scale + M                   scores; M is the additive mask (0 = attend, −inf = blocked)
    P = softmax(S) row-wise                P_ij = exp(S_ij − lse_i)
    lse_i = log Σ_j exp(S_ij)              the row log-sum-exp, saved for the backward
    O = P V

Backward (the chain rule through the softmax; FlashAttention-2, Dao 2023, section 2.3 and algorithm 2):

    dV = Pᵀ dO
    dP = dO Vᵀ
    dS_ij = P_ij (dP_ij − D_i),  D_i = Σ_j P_ij dP_ij = Σ_d dO_id O_id   (= rowsum(dO ∘ O))
    dQ = dS K · scale,  dK = dSᵀ Q · scale

A row with every key blocked has no softmax: we define its output as 0, its lse as −inf and its gradients as 0
(PyTorch may return NaN there).

Everything is dense here (the full L×S score matrix): readable, and only for tests and small sizes.
"""

import numpy as np

from . import patterns


def additive_mask(mask, dtype):
    """A boolean mask (True = may attend, PyTorch's convention) as 0 / −inf; a float mask cast to dtype."""
    mask = np.asarray(mask)
    if mask.dtype == np.bool_:
        return np.where(mask, 0.0, -np.inf).astype(dtype)
    return mask.astype(dtype, copy=False)


def pattern_mask(L, S, causal=False, pattern=None):
    """The boolean (L, S) mask of ``causal`` and ``pattern`` together (True = may attend), or None."""
    allowed = None
    if pattern is not None:
        allowed = pattern.mask(max(L, S))[:L, :S]
    if causal:
        tril = np.tril(np.ones((L, S), dtype=bool))  # top-left aligned, as torch's is_causal
        allowed = tril if allowed is None else allowed & tril
    return allowed


def scores(q, k, *, scale, mask=None, causal=False, pattern=None):
    """S = Q Kᵀ · scale + M over the leading (batch, head) axes, with −inf where the masks block."""
    s = np.matmul(q, np.swapaxes(k, -1, -2)) * scale
    if mask is not None:
        s = s + additive_mask(mask, s.dtype)
    allowed = pattern_mask(q.shape[-2], k.shape[-2], causal, pattern)
    if allowed is not None:
        s = np.where(allowed, s, -np.inf)
    return s


def attention_forward(q, k, v, *, scale, mask=None, causal=False, pattern=None):
    """Return (out, lse): softmax(Q Kᵀ · scale + mask) V and the row log-sum-exp of the scores.

    q (..., L, D), k (..., S, D), v (..., S, Dv); ``mask`` is boolean (True = may attend) or additive,
    broadcastable to (..., L, S); ``causal`` is top-left aligned; ``pattern`` is one of ``patterns``.
    """
    s = scores(q, k, scale=scale, mask=mask, causal=causal, pattern=pattern)
    m = s.max(axis=-1, keepdims=True)
    m = np.where(np.isneginf(m), 0.0, m)  # a fully blocked row: any finite shift, its exps are all 0
    with np.errstate(divide="ignore", invalid="ignore"):  # (a NaN or +inf score: NaN, as in PyTorch)
        e = np.exp(s - m)  # the stable softmax: every exponent ≤ 0
        lsum = e.sum(axis=-1, keepdims=True)
        blocked = lsum == 0  # a NaN lsum is not "blocked": its row stays NaN
        p = np.where(blocked, 0.0, e / lsum)
        lse = np.where(blocked, -np.inf, m + np.log(lsum))[..., 0]
    out = np.matmul(p, v)
    return out.astype(q.dtype, copy=False), lse.astype(q.dtype, copy=False)


def attention_backward(q, k, v, out, lse, dout, *, scale, mask=None, causal=False, pattern=None):
    """Return (dq, dk, dv), the gradients of the loss through ``attention_forward`` given dout = ∂loss/∂out.

    P is recomputed from the saved lse (P_ij = exp(S_ij − lse_i)), as the tiled kernels do.
    """
    s = scores(q, k, scale=scale, mask=mask, causal=causal, pattern=pattern)
    lse = lse[..., None]
    with np.errstate(invalid="ignore"):
        p = np.where(np.isneginf(lse), 0.0, np.exp(s - lse))  # a fully blocked row has P = 0
    dv = np.matmul(np.swapaxes(p, -1, -2), dout)
    dp = np.matmul(dout, np.swapaxes(v, -1, -2))
    D = np.sum(dout * out, axis=-1, keepdims=True)  # rowsum(dO ∘ O) = rowsum(P ∘ dP)
    ds = p * (dp - D)
    dq = np.matmul(ds, k) * scale
    dk = np.matmul(np.swapaxes(ds, -1, -2), q) * scale
    dt = q.dtype
    return dq.astype(dt, copy=False), dk.astype(dt, copy=False), dv.astype(dt, copy=False)


__all__ = ["attention_forward", "attention_backward", "additive_mask", "pattern_mask", "scores", "patterns"]
