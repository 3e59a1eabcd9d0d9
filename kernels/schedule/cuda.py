"""Diffusion updates as one fused numba.cuda kernel (the GPU form of kernels.schedule).

The same per-element update as cpu.py (see there for how q_sample, the DDPM step and the DDIM step become
out = A·clip(p·x − q·e) + Bx·x + Be·e + S·z with per-sample coefficients). The noise of element i is normal i mod 4
of Philox block i // 4 — four normals from one Philox call and two Box–Muller transforms, as on the CPU; float32
arrays draw philox's float32 normals. A thread block takes tiles of 4·THREADS consecutive elements: thread t draws
the four normals of the tile's Philox block t into shared memory, then the block updates the tile in four coalesced
sweeps (element c·THREADS + t in sweep c), so a warp's loads and stores are contiguous — a thread updating its own
four neighbours would touch memory with a 16-byte stride. A thread issues its loads of x and ε̂ for the four sweeps
of its next tile before it draws this tile's normals (one tile ahead: on an H200, 2–9% faster than loading the tile
itself first), and converts them only where they are used, so that they are in flight during the Philox rounds and
Box–Muller. A tile that lies in one sample (all but a few) reads that sample's six coefficients once; the sample of
element i, i // per_sample, is a float64 multiply by 1/per_sample (exact below 2^50 elements; a 64-bit integer
division costs dozens of instructions per element on a GPU). Where no sample adds noise and none is returned (DDIM
with η = 0, DDPM's last step) the launch says so and nothing is drawn: the kernel is then a pass over memory.

Arithmetic in the arrays' dtype, as PyTorch computes float32 (the coefficients Bx, Be, S rounded to it once, on the
host), except x̂_0 = clip(p·x − q·e), whose terms reach 1/√ᾱ ≈ 160 and cancel: float64, as in the reference. The rest
is within a few float32 ulps of the reference's float64. Measured on an H200 (2026-11-26, 64×3×1024×1024, GPU time
of queued calls): all-float64 arithmetic on float32 arrays costs four float32 ↔ float64 conversions per element,
which a GPU runs at an eighth of its float32 rate, and half-rate float64 multiply-adds: the DDPM step took 1.24 ms
that way, 1.07 ms in float32.

Cost of the noise, read off the sm_90 SASS (static counts): a Philox block (four words) is about 80 instructions,
and the float32 Box–Muller transform of its four normals about 170 — some 60 per element, beside the update's and
the tile's bookkeeping. The float64 normals of float64 arrays take about 520 per Philox block.
Runs on CuPy arrays on a GPU (launched through kernels.dispatch.launch), and on NumPy arrays under the Numba CUDA
simulator (NUMBA_ENABLE_CUDASIM=1).
"""

from __future__ import annotations

import os

import numpy as np
from numba import cuda, float32, float64

from kernels import philox
from kernels.dispatch import array_module, launch, sm_count
from kernels.schedule.cpu import updates
from kernels.schedule.reference import check_update, given_noise

# Threads per block; 32 under the simulator, which runs one Python thread per CUDA thread.
_SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
THREADS = 32 if _SIM else 256
TILE = 4 * THREADS
WAVES = 2  # a grid of two waves of resident blocks at most; a grid-stride loop takes the tiles beyond
MAX_BLOCKS = 4096  # the grid's cap under the simulator (and where the device's size is not known)
# launch bounds: resident blocks of THREADS per SM the compiler must fit in registers. Measured on an H200
# (2026-11-26, 64×3×1024×1024): float32 at 6 blocks (40 registers, no spills) is within 1% of 5 and beats 8 blocks by
# 3–20%; float64 (64×3×512×512) at 4 blocks (64 registers, no spills) beat 3 by 3–7%.
BLOCKS_PER_SM = {np.dtype(np.float32): 6, np.dtype(np.float64): 4}
_philox = philox.cuda_device_functions()


@cuda.jit(device=True, inline=True)
def _sample(i, inv_per_sample):
    """i // per_sample, as floor((i + ½) · (1/per_sample)): the ½ keeps the rounding away from the integers."""
    return np.int64((i + 0.5) * inv_per_sample)


@cuda.jit(device=True, inline=True)
def _u(i):
    """A non-negative index as uint64: Numba then indexes without the wraparound code for negative indices."""
    return np.uint64(i)


@cuda.jit(device=True, inline=True)
def _load(a, i, n):
    """a[i], as stored; past the end a[n − 1] (loads need no branch; the value is not used). Converted only where
    used, so that the loads stay in flight while the normals are drawn."""
    return a[_u(min(i, n - 1))]


@cuda.jit(device=True, inline=True)
def _noisy(coef, first, last, write_z):
    """Whether a Philox block's elements, of samples first … last, need its normals: the noise is an output, or the
    first or last sample's S is not 0, or samples shorter than the block (last > first + 1) sit between them — then
    it draws without looking (a rare case, and the normals are multiplied by S anyway)."""
    return write_z or last > first + 1 or coef[first, 5] != 0.0 or coef[last, 5] != 0.0


@cuda.jit(device=True, inline=True)
def _coefs(coef, coefn, s):
    """The six coefficients of sample s: p, q, A in float64, Bx, Be, S in the arrays' dtype."""
    return coef[s, 0], coef[s, 1], coef[s, 2], coefn[s, 0], coefn[s, 1], coefn[s, 2]


def _make_element(cast):
    """The per-element update; `cast` rounds the float64 x̂_0 term to the arrays' dtype."""

    @cuda.jit(device=True, inline=True)
    def _element(i, n, j, x, e, zs, seeded, z, write_z, z_out, has_e, clip, p, q, A, Bx, Be, S, out):
        """out[i] = A·clip(p·x − q·e) + Bx·x + Be·e + S·z for element i (its x and ε̂ given, its drawn normal at
        zs[j]): in the arrays' dtype, but x̂_0 = clip(p·x − q·e) in float64, where p and q reach 1/√ᾱ_T ≈ 160 and
        cancel (in float32 that costs ~10⁻⁵ absolute)."""
        if i >= n:
            return
        if seeded:
            zi = zs[_u(j)]
            if write_z:
                z_out[_u(i)] = zi
        elif S != 0.0:
            zi = z[_u(i)]
        else:
            zi = S - S  # 0: S = 0, and the noise array is not read (a NaN there stays out)
        acc = Bx * x + S * zi
        if has_e:
            acc += Be * e
            if A != 0.0:
                acc += cast(A * min(max(p * np.float64(x) - q * np.float64(e), -clip), clip))
        out[_u(i)] = acc

    return _element


@cuda.jit(device=True, inline=True)
def _load4(a, i0, n):
    """The four elements i0 + c·THREADS (c = 0…3) of a thread in a tile, as stored (clamped: see _load)."""
    return _load(a, i0, n), _load(a, i0 + THREADS, n), _load(a, i0 + 2 * THREADS, n), _load(a, i0 + 3 * THREADS, n)


def make_kernel(normal4, noise_type, cast):
    """The kernel for one dtype: its normals from `normal4` (float32's or float64's), held as `noise_type`; `cast`
    converts a float64 to that dtype."""
    zero = cast(0.0)
    _element = _make_element(cast)

    def fused_update_kernel(x, e, has_e, coef, coefn, inv_per_sample, clip, seeded, k0, k1, z, write_z, z_out, out):
        """out = A·clip(p·x − q·e) + Bx·x + Be·e + S·z over flat arrays, tile by tile (see the module docstring)."""
        zs = cuda.shared.array(TILE, noise_type)
        t = cuda.threadIdx.x
        n = x.size
        stride = cuda.gridDim.x * TILE
        nx0, nx1, nx2, nx3 = _load4(x, cuda.blockIdx.x * TILE + t, n)
        ne0, ne1, ne2, ne3 = nx0, nx1, nx2, nx3  # (not used without ε̂)
        if has_e:
            ne0, ne1, ne2, ne3 = _load4(e, cuda.blockIdx.x * TILE + t, n)
        for base in range(cuda.blockIdx.x * TILE, n, stride):
            i0 = base + t  # this thread's element in each of the four sweeps
            i1, i2, i3 = i0 + THREADS, i0 + 2 * THREADS, i0 + 3 * THREADS
            # this tile's x and ε̂ were loaded during the last tile; the next tile's go out now, and are on their way
            # while this tile's normals are drawn (past the end the clamped loads reread the last element)
            x0, x1, x2, x3, e0, e1, e2, e3 = nx0, nx1, nx2, nx3, ne0, ne1, ne2, ne3
            nx0, nx1, nx2, nx3 = _load4(x, i0 + stride, n)
            if has_e:
                ne0, ne1, ne2, ne3 = _load4(e, i0 + stride, n)
            if seeded:
                i = base + 4 * t  # the first element of Philox block i // 4
                z0 = z1 = z2 = z3 = zero
                # no draw where the noise is unused: S = 0 for every sample its four elements touch (DDIM η = 0,
                # DDPM's last step), unless the noise itself is an output (q_sample)
                if i < n and _noisy(coef, _sample(i, inv_per_sample), _sample(min(i + 3, n - 1), inv_per_sample),
                                    write_z):
                    z0, z1, z2, z3 = normal4(k0, k1, np.uint64(i // 4))
                zs[4 * t] = z0
                zs[4 * t + 1] = z1
                zs[4 * t + 2] = z2
                zs[4 * t + 3] = z3
                cuda.syncthreads()
            first, last = _sample(base, inv_per_sample), _sample(min(base + TILE, n) - 1, inv_per_sample)
            if first == last:  # the whole tile is one sample's (all but a few tiles): its coefficients once
                p, q, A, Bx, Be, S = _coefs(coef, coefn, first)
                _element(i0, n, t, x0, e0, zs, seeded, z, write_z, z_out, has_e, clip, p, q, A, Bx, Be, S, out)
                _element(i1, n, t + THREADS, x1, e1, zs, seeded, z, write_z, z_out, has_e, clip, p, q, A, Bx,
                         Be, S, out)
                _element(i2, n, t + 2 * THREADS, x2, e2, zs, seeded, z, write_z, z_out, has_e, clip, p, q, A,
                         Bx, Be, S, out)
                _element(i3, n, t + 3 * THREADS, x3, e3, zs, seeded, z, write_z, z_out, has_e, clip, p, q, A,
                         Bx, Be, S, out)
            else:  # a tile across samples: each element's own (an index past the end reads the last sample's)
                for c, xi, ei in ((0, x0, e0), (1, x1, e1), (2, x2, e2), (3, x3, e3)):
                    i = i0 + c * THREADS
                    p, q, A, Bx, Be, S = _coefs(coef, coefn, _sample(min(i, n - 1), inv_per_sample))
                    _element(i, n, t + c * THREADS, xi, ei, zs, seeded, z, write_z, z_out, has_e, clip, p, q,
                             A, Bx, Be, S, out)
            if seeded:
                cuda.syncthreads()  # the tile's noise is read before the next tile's overwrites it

    return fused_update_kernel


# one compiled kernel per dtype, with its launch bounds (the simulator's jit has no such option)
_GENERATORS = {np.dtype(np.float32): (_philox.normal4_32, float32, np.float32),
               np.dtype(np.float64): (_philox.normal4, float64, np.float64)}
KERNELS = {dt: (cuda.jit if _SIM else cuda.jit(launch_bounds=(THREADS, blocks)))(make_kernel(*_GENERATORS[dt]))
           for dt, blocks in BLOCKS_PER_SM.items()}



def _blocks(n, dtype, xp):
    """Blocks to launch over n elements: one per tile, capped at WAVES waves of resident blocks."""
    cap = MAX_BLOCKS if xp is np else WAVES * sm_count() * BLOCKS_PER_SM[np.dtype(dtype)]
    return min(-(-n // TILE), cap)


def run(x, e, coef, clip, seed, noise, want_noise, out=None):
    """Launch fused_update_kernel; returns (result, noise or None). out: None, the result's buffer, or with
    want_noise the pair (result, noise) of buffers (see reference.check_out)."""
    xp = array_module(x)
    if x.dtype not in (np.float32, np.float64):
        raise TypeError(f"expected a float32 or float64 array, got {x.dtype}")
    e, noise, out, z_given = check_update(x, e, seed, noise, want_noise, out, xp.asarray)
    has_e = e is not None
    xc = xp.ascontiguousarray(x)
    flat = xc.reshape(-1)
    res = xp.empty_like(xc) if out is None else out
    n = x.size
    per_sample = max(n // max(coef.shape[0], 1), 1)
    e_flat = xp.ascontiguousarray(e).reshape(-1) if has_e else flat
    # no sample adds noise (DDIM with η = 0, DDPM's last step) and none is returned: nothing to draw, and no noise
    # array is read either (the kernel reads z only where S ≠ 0), so the kernel runs its pass without the draw
    seeded = seed is not None and (want_noise or bool(np.any(coef[:, 5] != 0.0)))
    coefn = xp.asarray(np.ascontiguousarray(coef[:, 3:], dtype=x.dtype))  # Bx, Be, S in the arrays' dtype
    coef = xp.asarray(coef)
    if seeded:
        k0, k1 = philox.seed_key(seed)
        z_flat = flat
        z_out = (xp.empty_like(xc) if z_given is None else z_given) if want_noise else xp.empty(1, dtype=x.dtype)
    else:
        k0 = k1 = np.uint64(0)
        z_flat = flat if noise is None else xp.ascontiguousarray(noise).reshape(-1)
        z_out = xp.empty(1, dtype=x.dtype)
    if n >= 2**50:
        raise ValueError(f"{n} elements: the kernel's float64 sample index is exact below 2**50")
    if n:
        launch(KERNELS[x.dtype], _blocks(n, x.dtype, xp), THREADS, flat, e_flat, has_e, coef, coefn,
               1.0 / per_sample, float(clip), seeded, k0, k1, z_flat, seeded and want_noise, z_out.reshape(-1),
               res.reshape(-1))
    if not seeded:
        return res, given_noise(noise, z_given)
    return res, (z_out if want_noise else None)


q_sample, ddpm_step, ddim_step = updates(run, array=lambda a: a, check=lambda a: None)


def _signature(f):
    a = f"{f}[::1]"
    return (f"void({a}, {a}, boolean, float64[:, ::1], {f}[:, ::1], float64, float64, boolean, uint64, uint64, {a}, "
            f"boolean, {a}, {a})")


# (kernel, signature) pairs that tests compile to PTX for sm_90 (float32 and float64 arrays).
SIGNATURES = {f"fused_update_f{b}": (KERNELS[np.dtype(f"float{b}")], _signature(f"float{b}")) for b in (32, 64)}
