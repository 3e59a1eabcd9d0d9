"""Gumbel-softmax benchmarks: y = softmax((logits + g)/τ), g = −log(−log u), over rows of 8192 classes.

Our kernel draws the noise (Philox), adds it, and takes the softmax in one pass over each row; PyTorch's
`F.gumbel_softmax` draws exponentials, takes logs, adds, and calls softmax — several passes over memory.
Sizes: 256, 1024 and 4096 rows × 8192 (4096 × 8192 float32 is 128 MiB), τ = 1, soft samples.

Bytes count the op's unavoidable traffic, the same for every implementation: the forward reads the logits and
writes y (2 × the array); the backward reads ∂L/∂y and y_soft and writes ∂L/∂logits (3 × the array).

On a GPU our forward runs in two forms: `cuda`, the default for these float32 rows (CUDA C++ holding each row in
registers, kernels/gumbel/cuda_vec.py), and `cuda_numba` (numba.cuda, kernels/gumbel/cuda.py); the backward is
numba.cuda's in both. 16384 rows are added there.
"""

from __future__ import annotations

import numpy as np

from bench.harness import TORCH, Case, Impl, UnavailableError

FAMILY = "gumbel"
TAU = 1.0


def nbytes_moved(rows, cols, itemsize, backward):
    """Bytes of one forward (2 arrays) or forward+backward (2 + 3 arrays) of rows × cols elements."""
    return float(rows * cols * itemsize * (5 if backward else 2))


def _kernels():
    try:
        from kernels import gumbel
    except ImportError as e:
        raise UnavailableError(f"kernels.gumbel is not importable: {e}") from e
    return gumbel


def _inputs(rows, cols):
    rng = np.random.default_rng(0)
    return rng.standard_normal((rows, cols), dtype=np.float32), rng.standard_normal((rows, cols), dtype=np.float32)


def _ours(backend, rows, cols, backward, form):
    def setup():
        gumbel = _kernels()
        logits, grad = (backend.array(a) for a in _inputs(rows, cols))

        def run():
            _, y_soft = gumbel.gumbel_softmax_forward(logits, TAU, False, seed=1, form=form)
            if backward:
                gumbel.gumbel_softmax_backward(grad, y_soft, TAU, form=form)

        return run

    return setup


def _torch(backend, rows, cols, backward):
    def setup():
        torch = backend.torch()
        logits, grad = _inputs(rows, cols)
        logits, grad = backend.tensor(logits, requires_grad=backward), backend.tensor(grad)
        gs = torch.nn.functional.gumbel_softmax

        def run():
            if not backward:
                return gs(logits, tau=TAU, hard=False)
            logits.grad = None
            gs(logits, tau=TAU, hard=False).backward(grad)

        return run

    return setup


def _core(rows, cols, backward):
    def setup():
        try:
            import core
            from core import functional as F
        except ImportError as e:
            raise UnavailableError(f"core is not importable: {e}") from e
        logits, grad = _inputs(rows, cols)
        logits, grad = core.tensor(logits, requires_grad=backward), core.tensor(grad)

        def run():
            if not backward:
                return F.gumbel_softmax(logits, tau=TAU, hard=False)
            logits.grad = None
            F.gumbel_softmax(logits, tau=TAU, hard=False).backward(grad)

        return run

    return setup


def cases(backend, *, quick=False, full=False) -> list[Case]:
    """Forward and forward+backward over a sweep of row counts (quick: tiny sizes for tests)."""
    _kernels()  # UnavailableError: the whole family is reported unavailable
    cols = 64 if quick else 8192
    sweep = [8, 32] if quick else [256, 1024, 4096]
    if backend.device == "cuda" and not quick:  # a GPU needs 100s of MiB per call to amortize the launch
        sweep.append(16384)
    ref_cap = 32 if quick else 1024  # the NumPy reference runs Philox in NumPy: about 10× slower, capped
    out = []
    for backward in (True,) if quick else (False, True):
        direction = "fwd+bwd" if backward else "fwd"
        for rows in sweep:
            impls = [Impl(backend.ours, _ours(backend, rows, cols, backward, None))]
            if backend.device == "cuda":  # numba.cuda's forward, beside the default (C++ holding rows in registers)
                impls.append(Impl("cuda_numba", _ours(backend, rows, cols, backward, "cuda")))
            if backend.device == "cpu" and rows <= ref_cap:
                impls += [Impl("reference", _ours(backend, rows, cols, backward, "reference")),
                          Impl("core", _core(rows, cols, backward))]
            impls.append(Impl(TORCH, _torch(backend, rows, cols, backward)))
            out.append(Case(FAMILY, f"{direction} {rows}x{cols}", nbytes_moved(rows, cols, 4, backward), "GB/s",
                            impls, dict(rows=rows, cols=cols, dtype="float32", tau=TAU, hard=False,
                                        direction=direction),
                            dict(panel=f"Gumbel-softmax {direction}, {cols} classes", series="", x=rows * cols,
                                 xlabel="elements")))
    return out
