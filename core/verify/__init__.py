"""Every op checked against PyTorch: the case table shared by `t2i verify` and the test suite.

A `Case` is one lambda `fn(lib, F, *tensors, **kwargs)` that reads the same in both libraries
(lib = core | torch, F = core.functional | torch.nn.functional), and a `make(draw)` that draws its
inputs. The tests draw with Hypothesis (shapes and values shrink to a minimal failure); `t2i verify`
draws with a seeded NumPy generator. Float inputs get gradients; integer and bool inputs do not.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np


class Draw:
    """Draws shapes, arrays and choices from one integer source (Hypothesis or a NumPy generator)."""

    def __init__(self, pick: Callable[[int, int], int]):
        self._pick = pick

    def int(self, lo: int, hi: int) -> int:
        """An integer in [lo, hi], inclusive."""
        return int(self._pick(lo, hi))

    def bool(self) -> bool:
        return bool(self._pick(0, 1))

    def choice(self, options):
        options = list(options)
        return options[self._pick(0, len(options) - 1)]

    def shape(self, min_dims=1, max_dims=3, min_side=1, max_side=5) -> tuple:
        return tuple(self.int(min_side, max_side) for _ in range(self.int(min_dims, max_dims)))

    def broadcastable(self, shape) -> tuple:
        """A shape that broadcasts against `shape`: some leading dims dropped, some sides set to 1."""
        shape = tuple(shape)
        drop = self.int(0, len(shape))
        return tuple(1 if self.int(0, 3) == 0 else n for n in shape[drop:])

    def _rng(self):
        return np.random.default_rng(self._pick(0, 2**31 - 1))

    def array(self, shape, lo=-2.0, hi=2.0, dtype=np.float64):
        """Uniform values in [lo, hi] (an op's domain), optionally as a non-contiguous view."""
        a = self._rng().uniform(lo, hi, size=shape).astype(dtype)
        if a.ndim >= 2 and self.int(0, 2) == 0:  # same values, transposed strides
            a = np.ascontiguousarray(np.swapaxes(a, -1, -2)).swapaxes(-1, -2)
        return a

    def normal(self, shape, scale=1.0, dtype=np.float64):
        return np.asarray(self._rng().standard_normal(shape) * scale, dtype=dtype)  # 0-d stays an array

    def ints(self, shape, lo, hi):
        """int64 values in [lo, hi)."""
        return self._rng().integers(lo, hi, size=shape).astype(np.int64)

    def bools(self, shape, p=0.5):
        return np.asarray(self._rng().random(shape) < p)  # 0-d stays an array


def random_draw(seed: int) -> Draw:
    rng = np.random.default_rng(seed)
    return Draw(lambda lo, hi: int(rng.integers(lo, hi + 1)))


def hypothesis_draw(data) -> Draw:
    """A Draw over Hypothesis' `data` fixture (st.data())."""
    from hypothesis import strategies as st

    return Draw(lambda lo, hi: data.draw(st.integers(lo, hi)))


@dataclasses.dataclass
class Case:
    """One op as seen by both libraries."""

    name: str
    fn: Callable  # fn(lib, F, *tensors, **kwargs) -> tensor
    make: Callable  # make(draw) -> [arrays] or ([arrays], {kwargs})
    grad: bool = True  # compare gradients (and gradcheck)
    atol: float = 1e-9
    rtol: float = 1e-7
    gradcheck: bool = True  # False for ops whose finite differences are ill-posed (kinks hit often)
    torch: bool = True  # False for ops that PyTorch cannot reproduce (random)


def _inputs(case, draw):
    made = case.make(draw)
    arrays, kwargs = (made if isinstance(made, tuple) else (made, {}))
    return list(arrays), dict(kwargs)


def _is_float(a):
    return isinstance(a, np.ndarray) and np.issubdtype(a.dtype, np.floating)


def run_core(case, arrays, kwargs, upstream_seed=0):
    """Output and input gradients from core (float64)."""
    import core
    from core import functional as F

    ts = [core.Tensor(a, requires_grad=case.grad and _is_float(a)) if isinstance(a, np.ndarray) else a for a in arrays]
    out = case.fn(core, F, *ts, **kwargs)
    grads = []
    if case.grad and out.requires_grad:
        g = np.random.default_rng(upstream_seed).standard_normal(out.shape)
        out.backward(g)
        grads = [t.grad if isinstance(t, core.Tensor) and t.requires_grad else None for t in ts]
    return out.numpy(), grads


def run_torch(case, arrays, kwargs, upstream_seed=0):
    """Output and input gradients from PyTorch on the same inputs and upstream gradient."""
    import torch
    import torch.nn.functional as F

    def conv(a):
        if not isinstance(a, np.ndarray):
            return a
        t = torch.from_numpy(np.array(a))  # np.array: a copy that keeps the values, whatever the strides
        return t.requires_grad_(case.grad and _is_float(a))

    ts = [conv(a) for a in arrays]
    out = case.fn(torch, F, *ts, **kwargs)
    grads = []
    if case.grad and out.requires_grad:
        g = np.random.default_rng(upstream_seed).standard_normal(tuple(out.shape))
        out.backward(torch.from_numpy(g).to(out.dtype))
        def grad_of(t):
            if not (isinstance(t, torch.Tensor) and t.requires_grad):
                return None
            return t.grad.numpy() if t.grad is not None else np.zeros(tuple(t.shape))

        grads = [grad_of(t) for t in ts]
    return out.detach().numpy(), grads


@dataclasses.dataclass
class Result:
    name: str
    max_abs: float
    max_rel: float
    ok: bool
    message: str = ""


def _err(a, b, atol):
    a, b = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    if a.shape != b.shape:
        return np.inf, np.inf
    if a.size == 0:
        return 0.0, 0.0
    d = np.abs(a - b)
    d = np.where(np.isnan(a) & np.isnan(b), 0.0, d)
    d = np.where(np.isinf(a) & (a == b), 0.0, d)
    return float(np.max(d)), float(np.max(d / (np.abs(b) + atol)))


def compare(case, arrays, kwargs, upstream_seed=0) -> Result:
    """Forward and gradients of core vs PyTorch on one set of inputs."""
    ours, our_grads = run_core(case, arrays, kwargs, upstream_seed)
    ref, ref_grads = run_torch(case, arrays, kwargs, upstream_seed)
    pairs = [("output", ours, ref)] + [
        (f"grad[{i}]", g, r) for i, (g, r) in enumerate(zip(our_grads, ref_grads)) if r is not None
    ]
    if len(our_grads) != len(ref_grads):
        return Result(case.name, np.inf, np.inf, False, "one library produced gradients, the other did not")
    max_abs = max_rel = 0.0
    msg = ""
    ok = True
    for what, a, b in pairs:
        if a is None:
            a = np.zeros_like(b)
        e_abs, e_rel = _err(a, b, case.atol)
        max_abs, max_rel = max(max_abs, e_abs), max(max_rel, e_rel)
        if np.shape(a) != np.shape(b) or not np.allclose(a, b, rtol=case.rtol, atol=case.atol, equal_nan=True):
            ok = False
            msg = msg or f"{what}: shapes {np.shape(a)} vs {np.shape(b)}, max abs err {e_abs:.3g}"
    return Result(case.name, max_abs, max_rel, ok, msg)


def check_gradients(case, arrays, kwargs) -> None:
    """core.gradcheck of the case's lambda (raises GradcheckError on a mismatch)."""
    import core
    from core import functional as F
    from core.gradcheck import gradcheck

    ts = [core.Tensor(a, requires_grad=_is_float(a)) if isinstance(a, np.ndarray) else a for a in arrays]
    gradcheck(lambda *xs: case.fn(core, F, *xs, **kwargs), ts)


def all_cases():
    """Every registered case, from each area's table."""
    from . import cases_functional, cases_nn, cases_spatial, cases_tensor

    return [*cases_tensor.CASES, *cases_functional.CASES, *cases_spatial.CASES, *cases_nn.CASES]


def verify(trials=3, seed=0, names=None):
    """Run every case `trials` times on random inputs; one Result per case (worst trial)."""
    results = []
    for case in all_cases():
        if names and case.name not in names:
            continue
        if not case.torch:
            continue
        worst = Result(case.name, 0.0, 0.0, True)
        for k in range(trials):
            arrays, kwargs = _inputs(case, random_draw(seed * 1000 + k))
            try:
                r = compare(case, arrays, kwargs, upstream_seed=k)
            except Exception as e:  # a crash is a failure of that op, reported in the table
                r = Result(case.name, np.inf, np.inf, False, f"{type(e).__name__}: {e}")
            worst = Result(case.name, max(worst.max_abs, r.max_abs), max(worst.max_rel, r.max_rel),
                           worst.ok and r.ok, worst.message or r.message)
        results.append(worst)
    return results
