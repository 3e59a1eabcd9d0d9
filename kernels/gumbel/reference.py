"""Gumbel-softmax, forward and backward — the NumPy specification.

Jang, Gu & Poole 2017 ("Categorical reparameterization with Gumbel-softmax") and Maddison, Mnih & Teh 2017
("The Concrete distribution"), as used by DALL·E's dVAE (Ramesh et al. 2021, §2.1):

    g_i = −log(−log u_i),  u_i ~ Uniform(0, 1)             Gumbel(0, 1) noise (inverse CDF)
    y_soft = softmax((logits + g)/τ)                        (Jang et al. eq. 2)
    y_hard = one_hot(argmax y_soft)                         (Gumbel-max: argmax(logits + g) ~ softmax(logits))
    y = y_hard − sg[y_soft] + y_soft  if hard  else  y_soft  (straight-through, PyTorch's F.gumbel_softmax)

Backward (through y_soft in both cases, since the straight-through y has y_soft's gradient):
    ∂L/∂logits = y_soft ∘ (g_y − ⟨g_y, y_soft⟩)/τ,   g_y = ∂L/∂y, ⟨·,·⟩ summed over `dim`.

Noise: from Philox at the flat (C-order) index i of each logit — whatever `dim` is — so every form draws the
same noise for the same seed. float64 logits get g = −log(−log u) with u = kernels.philox.uniform(seed, i), in
float64. float32 logits get float32 Gumbel noise, as PyTorch draws float32 noise for them: u =
philox.uniform32(seed, i) and g = −log32(−log32 u), all in float32 arithmetic with philox's float32 log (< 1 ulp,
evaluated the same way by every form; the float64 logs were most of the GPU kernel's time). Above 2⁻⁹ u32 is the
middle of a 2⁻²³-wide step (within 2⁻²⁴ of the float64 u), up to 1 − 2⁻²⁴: the largest g is 24 ln 2 ≈ 16.6 (33 ln 2
≈ 22.9 for float64's u), and near u → 1 the step moves g by up to ≈ 2⁻²⁴/(1 − u) (tests/kernels/test_gumbel.py
measures the distance between the two).
Or `noise=` gives g itself (PyTorch's `gumbels`), so tests compare exactly. The softmax is computed in float64
and rounded to the dtype; the hard index is the first maximum of logits + g in float64 — the Gumbel-max sample,
the same index as (logits + g)/τ's for τ > 0 but free of the division's rounding (which can make two different
values equal, or one form's multiplication by 1/τ order them otherwise), so that every form finds the same one. A
row holding a NaN has a NaN y_soft, and its hard index is not specified (the forms may differ).
"""

from __future__ import annotations

import math

import numpy as np

from kernels import philox
from kernels.dispatch import array_module


def gumbel_noise(seed, shape, dtype=np.float64) -> np.ndarray:
    """g = −log(−log u) for each flat index: for float32, u = philox.uniform32(seed, i) and the logs are philox.log32
    (float32 throughout); otherwise u = philox.uniform(seed, i) and g is float64, rounded to dtype."""
    n = int(np.prod(shape, dtype=np.int64))
    index = np.arange(n)
    if np.dtype(dtype) == np.float32:
        return philox.gumbel32(seed, index).reshape(shape)
    u = philox.uniform(seed, index)
    return (-np.log(-np.log(u))).reshape(shape).astype(dtype)


def as_rows(a, dim):
    """a (NumPy or CuPy) with axis `dim` moved last, as a C-contiguous (rows, n) array — the compiled forms' layout
    (a copy unless dim is already last and a contiguous)."""
    xp = array_module(a)
    if a.ndim == 0:
        return a.reshape(1, 1)
    a = xp.ascontiguousarray(xp.moveaxis(a, dim, -1))
    return a.reshape(math.prod(a.shape[:-1]), a.shape[-1])


def check_dim(dim, ndim):
    """`dim` as an axis in [0, ndim) of an ndim-dimensional array (a 0-d one takes −1 and 0, as in PyTorch); an
    IndexError naming the range otherwise, rather than a silent wrap-around."""
    n = max(ndim, 1)
    if not -n <= dim < n:
        raise IndexError(f"gumbel_softmax: dim {dim} is out of range for a {ndim}-d array (expected one in "
                         f"[{-n}, {n - 1}])")
    return dim % n


def check_forward(logits, tau, seed, noise, scalar_ok=False):
    """The argument checks of every form's forward: dtype, τ, exactly one of seed= and noise=, the noise's shape, and
    (unless scalar_ok: the NumPy forms take a 0-d logit as a row of one) at least one dimension."""
    if logits.dtype not in (np.float32, np.float64):
        raise TypeError(f"expected float32 or float64 logits, got {logits.dtype}")
    if not tau > 0 or math.isinf(1.0 / float(tau)):  # (NaN fails the first test; 1/τ must be a number)
        raise ValueError(f"tau must be positive, with 1/tau finite, got {tau}")
    if (seed is None) == (noise is None):
        raise ValueError("pass exactly one of seed= and noise=")
    if logits.ndim == 0 and not scalar_ok:
        raise ValueError("gumbel_softmax needs at least one dimension")
    if noise is not None and noise.shape != logits.shape:
        raise ValueError(f"noise shape {noise.shape} != logits shape {logits.shape}")


def check_backward(grad_y, y_soft, dim):
    """The argument checks of every form's backward: the gradient of y_soft's shape, `dim` an axis of it; returns
    dim in [0, ndim)."""
    if grad_y.shape != y_soft.shape:
        raise ValueError(f"grad shape {grad_y.shape} != y_soft shape {y_soft.shape}")
    return check_dim(dim, y_soft.ndim)


def gumbel_softmax_forward(logits, tau=1.0, hard=False, *, seed=None, noise=None, dim=-1):
    """Sample y ~ Gumbel-softmax(logits, τ) along `dim`; returns (y, y_soft) — y_soft is what backward needs.

    With hard=True, y is the one-hot of the sample (forward value of PyTorch's y_hard − sg[y_soft] + y_soft).
    """
    logits = np.asarray(logits)
    noise = None if noise is None else np.asarray(noise)
    check_forward(logits, tau, seed, noise, scalar_ok=True)
    dim = check_dim(dim, logits.ndim)
    if logits.ndim == 0:  # a row of one
        y, y_soft = gumbel_softmax_forward(logits.reshape(1), tau, hard, seed=seed,
                                           noise=None if noise is None else noise.reshape(1))
        return y.reshape(()), y_soft.reshape(())
    if logits.size == 0:
        return np.zeros_like(logits), np.zeros_like(logits)
    g = gumbel_noise(seed, logits.shape, logits.dtype) if noise is None else noise
    s = logits.astype(np.float64) + g  # logits + g: its first maximum is the hard index
    z = s / tau
    z_max = z.max(axis=dim, keepdims=True)
    e = np.exp(z - z_max)
    y_soft = (e / e.sum(axis=dim, keepdims=True)).astype(logits.dtype)
    if not hard:
        return y_soft, y_soft
    index = np.expand_dims(np.argmax(s, axis=dim), dim)
    y_hard = np.zeros_like(y_soft)
    np.put_along_axis(y_hard, index, 1, axis=dim)
    return y_hard, y_soft


def gumbel_softmax_backward(grad_y, y_soft, tau=1.0, *, dim=-1):
    """∂L/∂logits = y_soft ∘ (g_y − Σ_dim g_y y_soft)/τ — the softmax Jacobian-vector product, scaled by 1/τ."""
    grad_y, y_soft = np.asarray(grad_y), np.asarray(y_soft)
    check_backward(grad_y, y_soft, dim)
    g = grad_y.astype(np.float64)
    y = y_soft.astype(np.float64)
    dot = (g * y).sum(axis=dim, keepdims=True)
    return (y * (g - dot) / tau).astype(y_soft.dtype)
