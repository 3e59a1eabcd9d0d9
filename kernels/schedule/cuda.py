"""Diffusion updates as one fused numba.cuda kernel (the GPU form of kernels.schedule).

The same per-element update as cpu.py (see there for how q_sample, the DDPM step and the DDIM step become
out = A·clip(p·x − q·e) + Bx·x + Be·e + S·z with per-sample coefficients). Each CUDA thread takes one Philox
block — four consecutive elements, whose four normals one Philox call and two Box–Muller transforms give — in a
grid-stride loop; an elementwise kernel needs no shared memory: it is bound by memory bandwidth, and the
Philox rounds are cheap integer work hidden behind the loads.

Runs on CuPy arrays on a GPU, and on NumPy arrays under the Numba CUDA simulator (NUMBA_ENABLE_CUDASIM=1).
"""

from __future__ import annotations

import numpy as np
from numba import cuda

from kernels import philox
from kernels.dispatch import cuda_array
from kernels.schedule.cpu import (
    NO_CLIP,
    clip_value,
    ddim_coefficients,
    ddpm_coefficients,
    q_sample_coefficients,
)
from kernels.schedule.reference import Schedule, per_sample_t

THREADS = 128
_normal4 = philox.cuda_device_functions().normal4


@cuda.jit(device=True)
def _update_one(i, zs, x, e, has_e, coef, per_sample, clip, seeded, z, write_z, z_out, round32, out):
    """The update of element i (zs: its Philox normal when seeded)."""
    s = i // per_sample
    if seeded:
        zi = zs
        if round32:
            zi = np.float64(np.float32(zi))
        if write_z:
            z_out[i] = zi
    elif coef[s, 5] != 0.0:
        zi = np.float64(z[i])
    else:
        zi = 0.0  # S = 0: the noise array is not read
    xi = np.float64(x[i])
    acc = coef[s, 3] * xi + coef[s, 5] * zi
    if has_e:
        ei = np.float64(e[i])
        acc += coef[s, 4] * ei
        A = coef[s, 2]
        if A != 0.0:
            x0 = coef[s, 0] * xi - coef[s, 1] * ei
            acc += A * min(max(x0, -clip), clip)
    out[i] = acc


@cuda.jit
def fused_update_kernel(x, e, has_e, coef, per_sample, clip, seeded, k0, k1, z, write_z, z_out, round32, out):
    """out = A·clip(p·x − q·e) + Bx·x + Be·e + S·z over flat arrays; thread ↔ Philox block of 4 elements."""
    n = x.size
    for b in range(cuda.grid(1), (n + 3) // 4, cuda.gridsize(1)):
        i = 4 * b
        z0 = z1 = z2 = z3 = 0.0
        # no draw where the noise is not used: S = 0 for both samples the four elements may touch (DDIM η = 0,
        # DDPM's last step), unless the noise itself is an output (q_sample)
        if seeded and (write_z or coef[i // per_sample, 5] != 0.0 or coef[min(i + 3, n - 1) // per_sample, 5] != 0.0):
            z0, z1, z2, z3 = _normal4(k0, k1, np.uint64(b))
        _update_one(i, z0, x, e, has_e, coef, per_sample, clip, seeded, z, write_z, z_out, round32, out)
        if i + 1 < n:
            _update_one(i + 1, z1, x, e, has_e, coef, per_sample, clip, seeded, z, write_z, z_out, round32, out)
        if i + 2 < n:
            _update_one(i + 2, z2, x, e, has_e, coef, per_sample, clip, seeded, z, write_z, z_out, round32, out)
        if i + 3 < n:
            _update_one(i + 3, z3, x, e, has_e, coef, per_sample, clip, seeded, z, write_z, z_out, round32, out)


def _xp(a):
    """The array module of a: CuPy for CuPy arrays, NumPy otherwise (the simulator runs on NumPy arrays)."""
    if type(a).__module__.startswith("cupy"):
        import cupy

        return cupy
    return np


def _host(a):
    return a.get() if hasattr(a, "get") and not isinstance(a, np.ndarray) else np.asarray(a)


def launch_config(n_items: int):
    """(blocks, threads) covering n_items work items; a grid-stride loop takes any excess."""
    threads = min(THREADS, max(32, -(-n_items // 32) * 32))
    return max(1, min(-(-n_items // threads), 4096)), threads


def run(x, e, coef, clip, seed, noise, want_noise):
    """Launch fused_update_kernel; returns (out, noise or None)."""
    xp = _xp(x)
    if x.dtype not in (np.float32, np.float64):
        raise TypeError(f"expected a float32 or float64 array, got {x.dtype}")
    if (seed is None) == (noise is None):
        raise ValueError("pass exactly one of seed= and noise=")
    x = xp.ascontiguousarray(x)
    flat = x.reshape(-1)
    out = xp.empty_like(x)
    n = x.size
    per_sample = max(n // max(coef.shape[0], 1), 1)
    has_e = e is not None
    e_flat = xp.ascontiguousarray(e).reshape(-1) if has_e else flat
    if has_e and e_flat.size != n:
        raise ValueError(f"eps_hat shape {e.shape} != x shape {x.shape}")
    coef = xp.asarray(coef)
    seeded = seed is not None
    if seeded:
        k0, k1 = philox.seed_key(seed)
        z_flat = flat
        z_out = xp.empty_like(x) if want_noise else xp.empty(1, dtype=x.dtype)
    else:
        if noise.shape != x.shape:
            raise ValueError(f"noise shape {noise.shape} != x shape {x.shape}")
        k0 = k1 = np.uint64(0)
        z_flat = xp.ascontiguousarray(noise).reshape(-1)
        z_out = xp.empty(1, dtype=x.dtype)
    if n:
        blocks, threads = launch_config((n + 3) // 4)
        dev = cuda_array
        fused_update_kernel[blocks, threads](dev(flat), dev(e_flat), has_e, dev(coef), per_sample, clip, seeded, k0,
                                             k1, dev(z_flat), seeded and want_noise, dev(z_out.reshape(-1)),
                                             x.dtype == np.float32, dev(out.reshape(-1)))
    if not seeded:
        return out, noise
    return out, (z_out if want_noise else None)


def q_sample(x0, t, sched: Schedule, *, seed=None, noise=None):
    """x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε in one pass (eq. 4); returns (x_t, ε)."""
    t = per_sample_t(_host(t), x0, sched.T)
    return run(x0, None, q_sample_coefficients(sched, t), NO_CLIP, seed, noise, want_noise=True)


def ddpm_step(x_t, eps_hat, t, sched: Schedule, *, seed=None, noise=None, clip_x0=None, variance="posterior"):
    """One ancestral DDPM step x_t → x_{t−1} (Algorithm 2; eq. 11, or eqs. 15 + 7 with clip_x0)."""
    t = per_sample_t(_host(t), x_t, sched.T)
    coef = ddpm_coefficients(sched, t, clip_x0, variance)
    return run(x_t, eps_hat, coef, clip_value(clip_x0), seed, noise, want_noise=False)[0]


def ddim_step(x_t, eps_hat, t, t_prev, sched: Schedule, eta: float = 0.0, *, seed=None, noise=None, clip_x0=None):
    """One DDIM step x_t → x_{t_prev} (eq. 12, σ from eq. 16)."""
    t = per_sample_t(_host(t), x_t, sched.T)
    t_prev = per_sample_t(_host(t_prev), x_t, sched.T, lowest=-1)
    coef = ddim_coefficients(sched, t, t_prev, eta)
    return run(x_t, eps_hat, coef, clip_value(clip_x0), seed, noise, want_noise=False)[0]


SIGNATURES = {
    # (kernel, signature) pairs that tests compile to PTX for sm_90 (float32 and float64 arrays).
    "fused_update_f32": (fused_update_kernel, "void(float32[::1], float32[::1], boolean, float64[:, ::1], int64, "
                         "float64, boolean, uint64, uint64, float32[::1], boolean, float32[::1], boolean, "
                         "float32[::1])"),
    "fused_update_f64": (fused_update_kernel, "void(float64[::1], float64[::1], boolean, float64[:, ::1], int64, "
                         "float64, boolean, uint64, uint64, float64[::1], boolean, float64[::1], boolean, "
                         "float64[::1])"),
}
