"""Diffusion update benchmarks: q_sample, one DDPM step, one DDIM step (η = 0), over image batches.

Each update is one pass over memory in our kernel, the Gaussian noise drawn (Philox) in the same pass; PyTorch
eager runs the same formula as separate elementwise ops (randn_like, multiplies, adds), each a pass over
memory. The yardstick is the measured copy bandwidth. The DDIM step here has η = 0 and adds no noise, so our
kernel draws none and is a pure pass over memory; q_sample and the DDPM step (t ≥ 1) draw a normal per element,
which on a CPU costs more than moving the element's bytes (Box–Muller: a log, a square root, a sine and a cosine
per pair) — those two are compute-bound.

On a CPU our kernel runs twice: `cpu` returns fresh arrays, like PyTorch's eager code (the ratio to PyTorch compares
these two), and `cpu-out` writes into buffers made once (`out=`), as a sampling loop does and as the copy that measures
the peak does. Every call to the first takes new memory — arrays this large are mapped afresh, and the operating
system faults in and zeroes each page (4 KiB) on first touch, a write pass the kernel does not make —; the second
is the kernel's own bandwidth, which the fraction-of-copy target reads.

On a GPU our kernel runs in two forms: `cuda`, the default for float32 CuPy arrays (CUDA C++ with 128-bit loads and
stores, kernels/schedule/cuda_vec.py), and `cuda_numba` (numba.cuda, kernels/schedule/cuda.py, the form for other
dtypes), so that one run measures the one against the other.

On a CPU one more case, `normal draw`, times the noise alone: our kernel's Philox normals written into a buffer made
once (`kernels.schedule.cpu.draw`, the ε that q_sample returns, drawn chunk by chunk as the updates draw it) against
`torch.randn(..., out=)` — the floor under q_sample and the DDPM step, and what their fraction of copy bandwidth is
bounded by (bytes: the one array written).

Bytes count each update's unavoidable traffic, the same for every implementation (3 arrays of x's size):
q_sample reads x_0 and writes x_t and ε (ε is returned: it is the training target); a DDPM or DDIM step reads
x_t and ε̂ and writes x_{t−1}. Shapes (64, 3, S, S) float32, S = 64, 128, 256 (3, 12 and 48 MiB per array),
and on a GPU also 512 and 1024 (192 and 768 MiB).
"""

from __future__ import annotations

import numpy as np

from bench.harness import TORCH, Case, Impl, UnavailableError

FAMILY = "schedule"
OPS = ("q_sample", "ddpm_step", "ddim_step")
T_STEPS = 1000
OUT_BUFFERS = "cpu-out"  # our CPU kernel writing into buffers made once (out=)
CUDA_NUMBA = "cuda_numba"  # on a GPU, the numba.cuda form (form="cuda") beside the default, cuda_vec


def nbytes_moved(shape, itemsize=4):
    """Bytes of one update: three arrays of x's size (see the module docstring)."""
    return float(3 * np.prod(shape) * itemsize)


def _kernels():
    try:
        from kernels import schedule
    except ImportError as e:
        raise UnavailableError(f"kernels.schedule is not importable: {e}") from e
    return schedule


def _inputs(shape):
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape, dtype=np.float32)
    eps = rng.standard_normal(shape, dtype=np.float32)
    t = rng.integers(1, T_STEPS, shape[0])  # per-sample timesteps, as in training; ≥ 1 so every step adds noise
    return x, eps, t


def _ours(backend, op, shape, form, into_buffers=False):
    """Our update; into_buffers: into output arrays made (and touched) once, in setup."""

    def setup():
        sch = _kernels()
        sched = sch.Schedule.linear(T_STEPS)
        x, eps, t = _inputs(shape)
        x, eps = backend.array(x), backend.array(eps)
        out = tuple(backend.array(np.zeros(shape, np.float32)) for _ in range(2)) if into_buffers else (None, None)
        if op == "q_sample":
            return lambda: sch.q_sample(x, t, sched, seed=1, form=form, out=out if into_buffers else None)
        if op == "ddpm_step":
            return lambda: sch.ddpm_step(x, eps, t, sched, seed=1, form=form, out=out[0])
        return lambda: sch.ddim_step(x, eps, t, t - 1, sched, 0.0, seed=1, form=form, out=out[0])

    return setup


def _torch(backend, op, shape):
    """The same update written as PyTorch eager code, with per-sample coefficients precomputed (O(batch))."""

    def setup():
        torch = backend.torch()
        from kernels.schedule.reference import Schedule  # plain NumPy tables, shared by every form

        sched = Schedule.linear(T_STEPS)
        x, eps, t = _inputs(shape)
        x, eps = backend.tensor(x), backend.tensor(eps)

        def coef(values):  # (B,) float64 → (B, 1, 1, 1) float32 on the device
            return backend.tensor(np.asarray(values, dtype=np.float32).reshape((-1,) + (1,) * (len(shape) - 1)))

        if op == "q_sample":
            a, s = coef(sched.sqrt_alphas_cumprod[t]), coef(sched.sqrt_one_minus_alphas_cumprod[t])

            def run():
                e = torch.randn_like(x)
                return a * x + s * e, e

            return run
        if op == "ddpm_step":  # DDPM eq. 11 + σ z, σ² = β̃_t
            c_eps = coef(sched.betas[t] / np.sqrt(1.0 - sched.alphas_cumprod[t]))
            c_x = coef(1.0 / np.sqrt(sched.alphas[t]))
            sigma = coef(np.sqrt(sched.posterior_variance[t]))
            return lambda: (x - c_eps * eps) * c_x + sigma * torch.randn_like(x)
        # DDIM eq. 12 with η = 0: x_prev = √ᾱ_prev x̂_0 + √(1 − ᾱ_prev) ε̂
        ab, ab_prev = sched.alphas_cumprod[t], sched.alphas_cumprod[t - 1]
        c_x0, c_e = coef(1.0 / np.sqrt(ab)), coef(np.sqrt(1.0 - ab))
        c_prev, c_dir = coef(np.sqrt(ab_prev)), coef(np.sqrt(1.0 - ab_prev))
        return lambda: c_prev * ((x - c_e * eps) * c_x0) + c_dir * eps

    return setup


def _draw_ours(shape):
    def setup():
        from kernels.schedule import cpu

        buf = np.zeros(shape, np.float32)
        return lambda: cpu.draw(buf, 1)

    return setup


def _draw_torch(backend, shape):
    def setup():
        torch = backend.torch()
        buf = torch.zeros(shape)
        return lambda: torch.randn(shape, out=buf)

    return setup


def cases(backend, *, quick=False, full=False) -> list[Case]:
    """Each update over a sweep of batch shapes (quick: tiny sizes for tests)."""
    _kernels()  # UnavailableError: the whole family is reported unavailable
    sides = [8] if quick else [64, 128, 256]
    if backend.device == "cuda" and not quick:  # a GPU needs 100s of MiB per call to amortize the launch
        sides += [512, 1024]
    batch = 4 if quick else 64
    ref_cap = 16 if quick else 64  # the NumPy reference draws Philox normals in NumPy: capped
    out = []
    for op in OPS:
        for side in sides:
            shape = (batch, 3, side, side)
            impls = [Impl(backend.ours, _ours(backend, op, shape, None))]
            if backend.device == "cpu":  # (on a GPU CuPy's memory pool hands the same memory back: no difference)
                impls.append(Impl(OUT_BUFFERS, _ours(backend, op, shape, None, into_buffers=True)))
            else:  # numba.cuda's form, against the default (the CUDA C++ one with 128-bit loads)
                impls.append(Impl(CUDA_NUMBA, _ours(backend, op, shape, "cuda")))
            if backend.device == "cpu" and side <= ref_cap:
                impls.append(Impl("reference", _ours(backend, op, shape, "reference")))
            impls.append(Impl(TORCH, _torch(backend, op, shape)))
            out.append(Case(FAMILY, f"{op} {batch}x3x{side}x{side}", nbytes_moved(shape), "GB/s", impls,
                            dict(op=op, shape=list(shape), dtype="float32", T=T_STEPS),
                            dict(panel=op, series="", x=int(np.prod(shape)), xlabel="elements")))
    if backend.device == "cpu":
        for side in sides:
            shape = (batch, 3, side, side)
            out.append(Case(FAMILY, f"normal draw {batch}x3x{side}x{side}", float(np.prod(shape) * 4), "GB/s",
                            [Impl(OUT_BUFFERS, _draw_ours(shape)), Impl(TORCH, _draw_torch(backend, shape))],
                            dict(op="draw", shape=list(shape), dtype="float32"),
                            dict(panel="normal draw", series="", x=int(np.prod(shape)), xlabel="elements")))
    return out
