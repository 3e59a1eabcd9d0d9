"""Diffusion updates as one fused numba.cuda kernel (the GPU form of kernels.schedule).

The same per-element update as cpu.py (see there for how q_sample, the DDPM step and the DDIM step become
out = A·clip(p·x − q·e) + Bx·x + Be·e + S·z with per-sample coefficients). The noise of element i is normal i mod 4
of Philox block i // 4 — four normals from one Philox call and two Box–Muller transforms, as on the CPU. A thread
block takes tiles of 4·THREADS consecutive elements: thread t draws the four normals of the tile's Philox block t
into shared memory, then the block updates the tile in four coalesced sweeps (element c·THREADS + t in sweep c), so
a warp's loads and stores are contiguous — a thread updating its own four neighbours would touch memory with a
16-byte stride. The loads are software-pipelined: a thread loads its x and ε̂ of the next tile (eight loads, indices
clamped into the array so that no branch separates them) before it draws and updates the current one, so that
memory is busy while the Philox rounds and Box–Muller run. The sample of element i, i // per_sample, is a float64
multiply by 1/per_sample (exact below 2^50 elements; a 64-bit integer division costs dozens of instructions per
element on a GPU).

Runs on CuPy arrays on a GPU (launched through kernels.dispatch.launch), and on NumPy arrays under the Numba CUDA
simulator (NUMBA_ENABLE_CUDASIM=1).
"""

from __future__ import annotations

import os

import numpy as np
from numba import cuda, float64

from kernels import philox
from kernels.dispatch import launch
from kernels.schedule.cpu import (
    NO_CLIP,
    clip_value,
    ddim_coefficients,
    ddpm_coefficients,
    q_sample_coefficients,
)
from kernels.schedule.reference import Schedule, per_sample_t

# Threads per block; 32 under the simulator, which runs one Python thread per CUDA thread.
_SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
THREADS = 32 if _SIM else 256
TILE = 4 * THREADS
MAX_BLOCKS = 4096  # a grid-stride loop takes the tiles beyond MAX_BLOCKS · TILE
# launch bounds: blocks of THREADS per SM whose registers the compiler must fit — float32 in 48 registers for 5
# blocks (ptxas 13.0: no spills), float64 (whose values take two registers each) in 64 for 4
BLOCKS_PER_SM = {np.dtype(np.float32): 5, np.dtype(np.float64): 4}
_normal4 = philox.cuda_device_functions().normal4


@cuda.jit(device=True, inline=True)
def _sample(i, inv_per_sample):
    """i // per_sample, as floor((i + ½) · (1/per_sample)): the ½ keeps the rounding away from the integers."""
    return np.int64((i + 0.5) * inv_per_sample)


@cuda.jit(device=True, inline=True)
def _load4(a, i, n):
    """a at i, i + THREADS, i + 2·THREADS, i + 3·THREADS (clamped into the array: no branch between the loads; the
    values past the end are never used)."""
    return (a[min(i, n - 1)], a[min(i + THREADS, n - 1)], a[min(i + 2 * THREADS, n - 1)],
            a[min(i + 3 * THREADS, n - 1)])


@cuda.jit(device=True, inline=True)
def _update_one(i, n, zi, xi, ei, has_e, coef, inv_per_sample, clip, seeded, z, write_z, z_out, round32, out):
    """The update of element i from its values xi, ei (and zi, its Philox normal when seeded)."""
    if i >= n:
        return
    s = _sample(i, inv_per_sample)
    if seeded:
        if round32:
            zi = np.float64(np.float32(zi))
        if write_z:
            z_out[i] = zi
    elif coef[s, 5] != 0.0:
        zi = np.float64(z[i])
    else:
        zi = 0.0  # S = 0: the noise array is not read
    xi = np.float64(xi)
    acc = coef[s, 3] * xi + coef[s, 5] * zi
    if has_e:
        ei = np.float64(ei)
        acc += coef[s, 4] * ei
        A = coef[s, 2]
        if A != 0.0:
            x0 = coef[s, 0] * xi - coef[s, 1] * ei
            acc += A * min(max(x0, -clip), clip)
    out[i] = acc


def fused_update_kernel(x, e, has_e, coef, inv_per_sample, clip, seeded, k0, k1, z, write_z, z_out, round32, out):
    """out = A·clip(p·x − q·e) + Bx·x + Be·e + S·z over flat arrays, tile by tile (see the module docstring)."""
    zs = cuda.shared.array(TILE, float64)
    t = cuda.threadIdx.x
    n = x.size
    step = cuda.gridDim.x * TILE
    base = cuda.blockIdx.x * TILE
    # software pipelining: a tile's x and ε̂ are loaded while the tile before it is drawn and updated
    x0, x1, x2, x3 = _load4(x, base + t, n)
    e0, e1, e2, e3 = _load4(e, base + t, n)  # (e is x when there is no ε̂: the same addresses, from L1)
    while base < n:
        nx0, nx1, nx2, nx3 = _load4(x, base + step + t, n)
        ne0, ne1, ne2, ne3 = _load4(e, base + step + t, n)
        if seeded:
            i = base + 4 * t  # the first element of Philox block i // 4
            z0 = z1 = z2 = z3 = 0.0
            # no draw where the noise is unused: S = 0 for both samples its four elements may touch (DDIM η = 0,
            # DDPM's last step), unless the noise itself is an output (q_sample)
            if i < n and (write_z or coef[_sample(i, inv_per_sample), 5] != 0.0
                          or coef[_sample(min(i + 3, n - 1), inv_per_sample), 5] != 0.0):
                z0, z1, z2, z3 = _normal4(k0, k1, np.uint64(i // 4))
            zs[4 * t] = z0
            zs[4 * t + 1] = z1
            zs[4 * t + 2] = z2
            zs[4 * t + 3] = z3
            cuda.syncthreads()
        i0 = base + t  # this thread's element in each of the four sweeps
        for i, zi, xi, ei in ((i0, zs[t], x0, e0), (i0 + THREADS, zs[t + THREADS], x1, e1),
                              (i0 + 2 * THREADS, zs[t + 2 * THREADS], x2, e2),
                              (i0 + 3 * THREADS, zs[t + 3 * THREADS], x3, e3)):
            _update_one(i, n, zi, xi, ei, has_e, coef, inv_per_sample, clip, seeded, z, write_z, z_out, round32, out)
        if seeded:
            cuda.syncthreads()  # the tile's noise is read before the next tile's overwrites it
        x0, x1, x2, x3, e0, e1, e2, e3 = nx0, nx1, nx2, nx3, ne0, ne1, ne2, ne3
        base += step


# one compiled kernel per dtype, with its launch bounds (the simulator's jit has no such option)
KERNELS = {dt: (cuda.jit if _SIM else cuda.jit(launch_bounds=(THREADS, blocks)))(fused_update_kernel)
           for dt, blocks in BLOCKS_PER_SM.items()}


def _xp(a):
    """The array module of a: CuPy for CuPy arrays, NumPy otherwise (the simulator runs on NumPy arrays)."""
    if type(a).__module__.startswith("cupy"):
        import cupy

        return cupy
    return np


def _host(a):
    return a.get() if hasattr(a, "get") and not isinstance(a, np.ndarray) else np.asarray(a)


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
    if n >= 2**50:
        raise ValueError(f"{n} elements: the kernel's float64 sample index is exact below 2**50")
    if n:
        launch(KERNELS[x.dtype], min(-(-n // TILE), MAX_BLOCKS), THREADS, flat, e_flat, has_e, coef,
               1.0 / per_sample, float(clip), seeded, k0, k1, z_flat, seeded and want_noise, z_out.reshape(-1),
               x.dtype == np.float32, out.reshape(-1))
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


def _signature(f):
    a = f"{f}[::1]"
    return (f"void({a}, {a}, boolean, float64[:, ::1], float64, float64, boolean, uint64, uint64, {a}, boolean, {a}, "
            f"boolean, {a})")


# (kernel, signature) pairs that tests compile to PTX for sm_90 (float32 and float64 arrays).
SIGNATURES = {f"fused_update_f{b}": (KERNELS[np.dtype(f"float{b}")], _signature(f"float{b}")) for b in (32, 64)}
