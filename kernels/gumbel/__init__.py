"""Fused Gumbel-softmax: noise, temperature, softmax and the optional hard one-hot in one pass, and its backward.

Three forms with one signature — `reference` (NumPy, the spec), `cpu` (Numba, parallel over rows), `cuda`
(numba.cuda, one block per row) — picked by array type (NumPy → cpu, CuPy → cuda) or by
`form="reference" | "cpu" | "cuda"` (the cuda form also runs on NumPy arrays under the CUDA simulator).
`form="cuda_vec"` is a fourth forward, for float32 CuPy rows of up to 8192 values (a multiple of 4): CUDA C++ holding
each row in registers (cuda_vec.py), not yet measured on a GPU against cuda.py.
"""

from __future__ import annotations

import numpy as np

from .. import dispatch

FORMS = (*dispatch.FORMS, "cuda_vec")


def _form(form, x):
    if form == "cuda_vec":
        from . import cuda_vec

        return cuda_vec
    return dispatch.form_module("gumbel", form, x)


def gumbel_softmax_forward(logits, tau=1.0, hard=False, *, seed=None, noise=None, dim=-1, form=None):
    """y ~ Gumbel-softmax(logits, τ) along dim, noise from Philox(seed) or given; returns (y, y_soft)."""
    return _form(form, logits).gumbel_softmax_forward(logits, tau, hard, seed=seed, noise=noise, dim=dim)


def gumbel_softmax_backward(grad_y, y_soft, tau=1.0, *, dim=-1, form=None):
    """∂L/∂logits = y_soft ∘ (g_y − Σ g_y y_soft)/τ (the straight-through gradient when hard)."""
    return _form(form, y_soft).gumbel_softmax_backward(grad_y, y_soft, tau, dim=dim)


def gumbel_noise(seed, shape, dtype=np.float64, *, form="reference"):
    """The Gumbel noise −log(−log u) the kernels draw for `seed`, one value per flat index of `shape`."""
    return _form(form, None).gumbel_noise(seed, shape, dtype)


__all__ = ["gumbel_softmax_forward", "gumbel_softmax_backward", "gumbel_noise", "FORMS"]
