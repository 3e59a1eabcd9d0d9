"""Finite-difference gradient checking, the tool every op's test uses.

Central differences in float64: the full Jacobian column by column for small inputs, and for large
inputs random projections vᵀJu (one pair of forward passes per probe) against the analytic
vᵀ(J u) computed by backward.
"""

from __future__ import annotations

import numpy as np

from .autograd import no_grad
from .tensor import Tensor


class GradcheckError(AssertionError):
    """Raised when analytic and numerical gradients disagree."""


def _as_tuple(x):
    return tuple(x) if isinstance(x, (tuple, list)) else (x,)


def gradcheck(fn, inputs, eps=1e-6, atol=1e-5, rtol=1e-3, max_full=256, n_probes=8, seed=0, raise_exception=True):
    """Check fn's backward against central differences; True when they agree.

    fn maps Tensors to a Tensor. Inputs that require grad must be float64. For an input with at
    most `max_full` elements the whole Jacobian is compared; for larger ones, `n_probes` random
    directions u give the directional derivative (f(x+εu) - f(x-εu)) / 2ε, compared with ⟨∇, u⟩
    for a random output weighting v.
    """
    inputs = _as_tuple(inputs)
    for i, t in enumerate(inputs):
        if isinstance(t, Tensor) and t.requires_grad and t.dtype != np.float64:
            raise TypeError(f"gradcheck: input {i} requires grad but is {t.dtype}; use float64")
    wrt = [i for i, t in enumerate(inputs) if isinstance(t, Tensor) and t.requires_grad]
    if not wrt:
        raise ValueError("gradcheck: no input requires grad")
    rng = np.random.default_rng(seed)

    out = fn(*inputs)
    v = rng.standard_normal(out.shape)  # random output weighting: checks vᵀJ rather than Σ J

    def f(*xs) -> float:
        with no_grad():
            return float(np.sum(fn(*xs).data * v))

    for t in inputs:
        if isinstance(t, Tensor):
            t.grad = None
    out.backward(v)

    for i in wrt:
        x = inputs[i]
        analytic = np.zeros(x.shape) if x.grad is None else np.asarray(x.grad, dtype=np.float64)
        base = x.data.copy()

        def at(delta, base=base, i=i):
            xs = list(inputs)
            xs[i] = Tensor(base + delta)
            return f(*xs)

        if x.data.size <= max_full:
            numeric = np.zeros(x.data.size)
            for k in range(x.data.size):
                d = np.zeros(x.data.size)
                d[k] = eps
                d = d.reshape(x.shape)
                numeric[k] = (at(d) - at(-d)) / (2 * eps)
            numeric = numeric.reshape(x.shape)
            bad = ~np.isclose(analytic, numeric, atol=atol, rtol=rtol)
            if bad.any():
                k = np.argmax(np.abs(analytic - numeric) * bad)
                msg = (f"gradcheck: input {i} of shape {x.shape}: analytic {analytic.flat[k]:.6g} vs numeric "
                       f"{numeric.flat[k]:.6g} at flat index {k} ({int(bad.sum())} of {bad.size} mismatched)")
                if raise_exception:
                    raise GradcheckError(msg)
                return False
        else:
            for p in range(n_probes):
                u = rng.standard_normal(x.shape)
                numeric = (at(eps * u) - at(-eps * u)) / (2 * eps)
                exact = float(np.sum(analytic * u))
                if not np.isclose(exact, numeric, atol=atol * np.sqrt(u.size), rtol=rtol):
                    msg = (f"gradcheck: input {i} of shape {x.shape}: directional derivative probe {p}: "
                           f"analytic {exact:.6g} vs numeric {numeric:.6g}")
                    if raise_exception:
                        raise GradcheckError(msg)
                    return False
    return True
