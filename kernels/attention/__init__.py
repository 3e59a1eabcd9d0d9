"""Attention kernels: forward and backward of softmax(Q Kᵀ · scale + mask) V, in three forms.

``reference`` (NumPy, dense: the specification), ``cpu`` (Numba, tiled with an online softmax and BLAS on the
tiles) and ``cuda`` (numba.cuda, shared-memory tiles) share one signature over raw arrays:

    out, lse = attention_forward(q, k, v, scale=..., mask=None, causal=False, pattern=None)
    dq, dk, dv = attention_backward(q, k, v, out, lse, dout, scale=..., mask=None, causal=False, pattern=None)

q (B, H, L, D), k (B, H, S, D), v (B, H, S, Dv), or the same without the head axis (N, L, D); float32 or
float64. ``mask`` is boolean (True = may attend, PyTorch's convention) or additive, broadcastable to
(B, H, L, S); ``causal`` is top-left aligned (PyTorch's ``is_causal``); ``pattern`` is one of
``kernels.attention.patterns`` (Causal, Row, Column, Conv, PrefixLM), evaluated inside the kernels. ``scale``
None means 1/√D. lse (B, H, L) is the row log-sum-exp, saved for the backward. A row that may attend to
nothing gets out = 0, lse = −inf and zero gradients; a row with a NaN or +inf score gets NaN, as in PyTorch.

The form follows the array type (NumPy → cpu, CuPy → cuda); ``form="reference" | "cpu" | "cuda"`` overrides
it (``cuda`` on NumPy arrays needs the Numba CUDA simulator).
"""

import math

import numpy as np

from ..dispatch import array_module
from . import patterns, reference
from .patterns import Causal, Column, Conv, PrefixLM, Row


def _form(q, form):
    if form is None:
        if isinstance(q, np.ndarray):
            return "cpu"
        # half precision on a GPU goes to the tensor-core kernel (CUDA C++: numba.cuda cannot reach mma.sync)
        return "cuda_tc" if str(q.dtype) in ("float16", "bfloat16") else "cuda"
    if form not in ("reference", "cpu", "cuda", "cuda_tc"):
        raise ValueError(f"form must be 'reference', 'cpu', 'cuda' or 'cuda_tc', got {form!r}")
    return form


def _check(q, k, v):
    if q.ndim not in (3, 4) or k.ndim != q.ndim or v.ndim != q.ndim:
        raise ValueError(f"q, k, v must all be 3-d or 4-d, got {q.shape}, {k.shape}, {v.shape}")
    if q.dtype not in (np.float32, np.float64) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share dtype float32 or float64, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape[:-2] != q.shape[:-2] or v.shape[:-1] != k.shape[:-1] or k.shape[-1] != q.shape[-1]:
        raise ValueError(f"incompatible shapes q {q.shape}, k {k.shape}, v {v.shape}")
    if 0 in (*q.shape, *k.shape, *v.shape):
        raise ValueError(f"the attention kernels take non-empty q, k, v, got {q.shape}, {k.shape}, {v.shape} "
                         "(core's F.scaled_dot_product_attention computes empty ones)")


class _Prepared:
    """The kernels' view of the arguments: (BH, ·, ·) contiguous arrays and plain scalars."""

    def __init__(self, q, k, v, scale, mask, causal, pattern):
        _check(q, k, v)
        xp = self.xp = array_module(q)
        self.shape4 = q.shape if q.ndim == 4 else (q.shape[0], 1) + q.shape[1:]
        B, H, L, D = self.shape4
        S = k.shape[-2]
        self.B, self.H, self.L, self.S, self.dtype = B, H, L, S, q.dtype
        self.scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
        self.pattern, self.causal = patterns.resolve(pattern, causal)
        self.has_mask = mask is not None
        if mask is None:
            m = xp.zeros((1, 1, 1, 1), dtype=q.dtype)
        else:
            m = xp.asarray(mask)
            m = xp.where(m, 0.0, -xp.inf).astype(q.dtype) if m.dtype == bool else m.astype(q.dtype, copy=False)
            if q.ndim == 3:  # a mask broadcastable to (N, L, S) reads as (N, 1, L, S)
                m = m.reshape((1,) * (3 - m.ndim) + m.shape)[:, None]
            m = m.reshape((1,) * (4 - m.ndim) + m.shape)
            if m.ndim != 4 or any(n not in (1, full) for n, full in zip(m.shape, (B, H, L, S))):
                raise ValueError(f"mask of shape {mask.shape} does not broadcast to {(B, H, L, S)}")
        # Compact, never materialized at (B, H, L, S): the kernels read mask[min(b, m.shape[0] - 1), ...].
        self.mask = xp.ascontiguousarray(m)

    def flat(self, a):
        """a as a C-contiguous (B·H, rows, cols) array of the inputs' dtype (a copy only where needed)."""
        return self.xp.ascontiguousarray(a.reshape((-1,) + a.shape[-2:]), dtype=self.dtype)

    def shaped(self, a, ndim):
        """A (B·H, ...) result back in the caller's layout (4-d, or 3-d without the head axis)."""
        lead = self.shape4[:2] if ndim == 4 else self.shape4[:1]
        return a.reshape(lead + a.shape[1:])

    def args(self):
        """The trailing scalar arguments every kernel takes: mask, has_mask, H, kind, T, W, r, P, causal, scale."""
        return (self.mask, self.has_mask, self.H, *self.pattern, self.causal, self.scale)


def attention_forward(q, k, v, *, scale=None, mask=None, causal=False, pattern=None, form=None):
    """(out, lse): softmax(Q Kᵀ · scale + mask) V and the row log-sum-exp, through the chosen form."""
    form = _form(q, form)
    if form == "cuda_tc":
        from . import cuda_tc

        return cuda_tc.attention_forward(q, k, v, scale=scale, mask=mask, causal=causal, pattern=pattern)
    if form == "reference":
        _check(q, k, v)
        sc = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        return reference.attention_forward(q, k, v, scale=sc, mask=mask, causal=causal, pattern=pattern)
    p = _Prepared(q, k, v, scale, mask, causal, pattern)
    xp = p.xp
    qf, kf, vf = p.flat(q), p.flat(k), p.flat(v)
    out = xp.empty((qf.shape[0], p.L, vf.shape[2]), dtype=p.dtype)
    lse = xp.empty((qf.shape[0], p.L), dtype=p.dtype)
    if form == "cpu":
        from . import cpu as kernels
    else:
        from . import cuda as kernels
    kernels.forward(qf, kf, vf, *p.args(), out, lse)
    return p.shaped(out, q.ndim), p.shaped(lse, q.ndim)


def attention_backward(q, k, v, out, lse, dout, *, scale=None, mask=None, causal=False, pattern=None, form=None):
    """(dq, dk, dv) given dout = ∂loss/∂out and the forward's out and lse, through the chosen form."""
    form = _form(q, form)
    if form == "cuda_tc":
        from . import cuda_tc

        return cuda_tc.attention_backward(q, k, v, out, lse, dout, scale=scale, mask=mask, causal=causal,
                                          pattern=pattern)
    if form == "reference":
        _check(q, k, v)
        sc = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        return reference.attention_backward(
            q, k, v, out, lse, dout, scale=sc, mask=mask, causal=causal, pattern=pattern
        )
    p = _Prepared(q, k, v, scale, mask, causal, pattern)
    xp = p.xp
    qf, kf, vf = p.flat(q), p.flat(k), p.flat(v)
    of, dof = p.flat(out), p.flat(dout)
    lf = xp.ascontiguousarray(lse.reshape(-1, p.L), dtype=p.dtype)
    dq, dk, dv = xp.empty_like(qf), xp.empty_like(kf), xp.empty_like(vf)
    m = p.args()
    if form == "cpu":
        from . import cpu

        cpu.backward(qf, kf, vf, of, lf, dof, *m, dq, dk, dv)
    else:
        from . import cuda

        cuda.backward(qf, kf, vf, of, lf, dof, *m, dq, dk, dv, xp.empty_like(lf))
    return p.shaped(dq, q.ndim), p.shaped(dk, q.ndim), p.shaped(dv, q.ndim)


__all__ = [
    "attention_forward",
    "attention_backward",
    "patterns",
    "Causal",
    "Row",
    "Column",
    "Conv",
    "PrefixLM",
]
