"""Fused Gumbel-softmax: noise, temperature, softmax and the optional hard one-hot in one pass, and its backward.

Three forms with one signature — `reference` (NumPy, the spec), `cpu` (Numba, parallel over rows), `cuda`
(numba.cuda, one block per row) — picked by array type (NumPy → cpu, CuPy → cuda or cuda_vec below) or by
`form="reference" | "cpu" | "cuda"` (the cuda form also runs on NumPy arrays under the CUDA simulator).
`form="cuda_vec"` is a fourth forward, for float32 CuPy rows of up to 8192 values (a multiple of 4): CUDA C++ holding
each row in registers (cuda_vec.py) — the default for the rows it takes, because a GPU measured it faster: 16384×8192
on an H200, calls queued back to back, 0.72 ms against numba.cuda's 1.05 ms and PyTorch's 1.91 ms
(bench/results/cuda-2026-11-26-1506-gumbel-schedule.json).
"""

from __future__ import annotations

import numpy as np

from .. import dispatch

FORMS = (*dispatch.FORMS, "cuda_vec")


def _form(form, x, dim=-1):
    if form == "cuda_vec" or (form is None and dispatch.default_form(x) == "cuda"):
        from . import cuda_vec

        if form == "cuda_vec" or cuda_vec.takes(x, dim):
            return cuda_vec
    return dispatch.form_module("gumbel", form, x)


def gumbel_softmax_forward(logits, tau=1.0, hard=False, *, seed=None, noise=None, dim=-1, form=None):
    """y ~ Gumbel-softmax(logits, τ) along dim, noise from Philox(seed) or given; returns (y, y_soft)."""
    return _form(form, logits, dim).gumbel_softmax_forward(logits, tau, hard, seed=seed, noise=noise, dim=dim)


def gumbel_softmax_backward(grad_y, y_soft, tau=1.0, *, dim=-1, form=None):
    """∂L/∂logits = y_soft ∘ (g_y − Σ g_y y_soft)/τ (the straight-through gradient when hard)."""
    return _form(form, y_soft).gumbel_softmax_backward(grad_y, y_soft, tau, dim=dim)


def gumbel_noise(seed, shape, dtype=np.float64, *, form="reference"):
    """The Gumbel noise −log(−log u) the kernels draw for `seed`, one value per flat index of `shape`."""
    return _form(form, None).gumbel_noise(seed, shape, dtype)


__all__ = ["gumbel_softmax_forward", "gumbel_softmax_backward", "gumbel_noise", "FORMS"]
