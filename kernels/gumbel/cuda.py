"""Gumbel-softmax as numba.cuda kernels (the GPU form of kernels.gumbel): one thread block per row.

Each block walks its row with THREADS threads in a strided loop and reduces through shared memory:
  pass 1: z_j = (l_j + g_j)/τ (g_j = −log(−log u_j) from Philox at the element's flat index), per-thread
          (max, first argmax), then a tree reduction of the pairs in shared memory;
  pass 2: Σ exp(z_j − max), the same tree reduction for the sum;
  pass 3: y_soft_j = exp(z_j − max)/sum (and the one-hot of the argmax when hard).
z is recomputed in each pass rather than stored in global memory, and the result is rounded once, like the
reference's. The Philox rounds and two float64 logs are not free on a GPU, though (an H200 measured this kernel at
3× PyTorch's time): for float32 rows of up to CACHE_MAX values, pass 1 keeps the noise — float32 there, exactly
as _g rounds it — in shared memory for passes 2 and 3. The backward kernel reduces
⟨g_y, y_soft⟩ the same way and writes y_soft ∘ (g_y − ⟨g_y, y_soft⟩)/τ.

Runs on CuPy arrays on a GPU, and on NumPy arrays under the Numba CUDA simulator (NUMBA_ENABLE_CUDASIM=1).
"""

from __future__ import annotations

import math
import os

import numpy as np
from numba import cuda, float32, float64, int64

from kernels import philox
from kernels.dispatch import cuda_array

# Threads per block (a power of two, for the tree reductions); 32 under the simulator, which runs one Python
# thread per CUDA thread — the same code, a narrower tree.
THREADS = 32 if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1" else 128
_uniform_at = philox.cuda_device_functions().uniform_at
CACHE_MAX = 10240  # the longest row whose float32 noise (40 KiB) a block keeps in shared memory


@cuda.jit(device=True)
def _g(r, j, n, seeded, k0, k1, g2, round32):
    """The noise g of element j of row r: from Philox at the flat index r·n + j (rounded to float32 when round32,
    as the reference rounds it), or from the noise array."""
    if seeded:
        g = -math.log(-math.log(_uniform_at(k0, k1, r * n + j)))
        if round32:
            g = np.float64(np.float32(g))
        return g
    return np.float64(g2[r, j])


@cuda.jit(device=True)
def _z(r, j, n, l2, tau, seeded, k0, k1, g2, round32, gs, cache, first):
    """z = (l + g)/τ for element j of row r; with `cache`, g is kept in shared memory (gs) by the first pass and
    read back by the next two (cache implies float32 rows, where g is already a float32: the copy is exact)."""
    if not cache:
        return (np.float64(l2[r, j]) + _g(r, j, n, seeded, k0, k1, g2, round32)) / tau
    if first:
        gs[j] = np.float32(_g(r, j, n, seeded, k0, k1, g2, round32))
    return (np.float64(l2[r, j]) + np.float64(gs[j])) / tau


@cuda.jit(device=True)
def _block_sum(buf, value):
    """Sum of `value` over the block's threads, by a tree reduction in the shared array buf (all threads get it)."""
    tid = cuda.threadIdx.x
    buf[tid] = value
    cuda.syncthreads()
    step = THREADS // 2
    while step > 0:
        if tid < step:
            buf[tid] += buf[tid + step]
        cuda.syncthreads()
        step //= 2
    total = buf[0]
    cuda.syncthreads()  # everyone has read buf[0] before buf is reused
    return total


@cuda.jit
def forward_rows_kernel(l2, tau, hard, seeded, k0, k1, g2, round32, cache, y2, ys2):
    """Fused Gumbel-softmax over the rows of (rows, n) arrays; block b takes rows b, b + gridDim, …

    With `cache` (seeded float32 rows that fit), pass 1 keeps each g in shared memory: each thread reads back only
    the entries it wrote, so no barrier is needed, and passes 2 and 3 skip the Philox rounds and two logs."""
    vbuf = cuda.shared.array(THREADS, float64)
    ibuf = cuda.shared.array(THREADS, int64)
    gs = cuda.shared.array(0, float32)  # the row's noise (dynamic: n values when cache, else none)
    tid = cuda.threadIdx.x
    rows, n = l2.shape
    for r in range(cuda.blockIdx.x, rows, cuda.gridDim.x):
        # pass 1: max and first argmax of z
        m = -math.inf
        a = n
        for j in range(tid, n, THREADS):
            z = _z(r, j, n, l2, tau, seeded, k0, k1, g2, round32, gs, cache, True)
            if z > m or a == n:
                m = z
                a = j
        vbuf[tid] = m
        ibuf[tid] = a
        cuda.syncthreads()
        step = THREADS // 2
        while step > 0:
            if tid < step:
                om, oa = vbuf[tid + step], ibuf[tid + step]
                if oa < n and (ibuf[tid] == n or om > vbuf[tid] or (om == vbuf[tid] and oa < ibuf[tid])):
                    vbuf[tid] = om
                    ibuf[tid] = oa
            cuda.syncthreads()
            step //= 2
        z_max = vbuf[0]
        arg = ibuf[0]
        cuda.syncthreads()
        # pass 2: the softmax denominator
        s = 0.0
        for j in range(tid, n, THREADS):
            s += math.exp(_z(r, j, n, l2, tau, seeded, k0, k1, g2, round32, gs, cache, False) - z_max)
        total = _block_sum(vbuf, s)
        # pass 3: normalize (and the one-hot)
        for j in range(tid, n, THREADS):
            ys2[r, j] = math.exp(_z(r, j, n, l2, tau, seeded, k0, k1, g2, round32, gs, cache, False)
                                 - z_max) / total
            if hard:
                y2[r, j] = 1.0 if j == arg else 0.0


@cuda.jit
def backward_rows_kernel(gy2, ys2, tau, out2):
    """out = y_soft ∘ (g_y − Σ g_y y_soft)/τ over the rows of (rows, n) arrays, one block per row."""
    vbuf = cuda.shared.array(THREADS, float64)
    tid = cuda.threadIdx.x
    rows, n = ys2.shape
    for r in range(cuda.blockIdx.x, rows, cuda.gridDim.x):
        d = 0.0
        for j in range(tid, n, THREADS):
            d += np.float64(gy2[r, j]) * np.float64(ys2[r, j])
        dot = _block_sum(vbuf, d)
        for j in range(tid, n, THREADS):
            out2[r, j] = np.float64(ys2[r, j]) * (np.float64(gy2[r, j]) - dot) / tau


@cuda.jit
def gumbel_noise_kernel(k0, k1, round32, out):
    """out[i] = −log(−log u_i) for every flat index i (rounded to float32 when round32)."""
    for i in range(cuda.grid(1), out.size, cuda.gridsize(1)):
        g = -math.log(-math.log(_uniform_at(k0, k1, i)))
        out[i] = np.float32(g) if round32 else g


def _xp(a):
    if type(a).__module__.startswith("cupy"):
        import cupy

        return cupy
    return np


def _blocks(rows):
    return max(1, min(rows, 8192))


def gumbel_noise(seed, shape, dtype=np.float64, xp=np):
    """g = −log(−log u) for every flat index of an array of `shape` (the same noise as reference.gumbel_noise)."""
    out = xp.empty(shape, dtype=dtype)
    k0, k1 = philox.seed_key(seed)
    if out.size:
        gumbel_noise_kernel[_blocks(-(-out.size // THREADS)), THREADS](k0, k1, out.dtype == np.float32,
                                                                        cuda_array(out.reshape(-1)))
    return out


def _rows(xp, a, dim):
    a = xp.ascontiguousarray(xp.moveaxis(a, dim, -1))
    return a.reshape(-1, a.shape[-1])


def gumbel_softmax_forward(logits, tau=1.0, hard=False, *, seed=None, noise=None, dim=-1):
    """Sample y ~ Gumbel-softmax(logits, τ) along `dim`, one block per row; returns (y, y_soft)."""
    xp = _xp(logits)
    if logits.dtype not in (np.float32, np.float64):
        raise TypeError(f"expected float32 or float64 logits, got {logits.dtype}")
    if tau <= 0:
        raise ValueError(f"tau must be positive, got {tau}")
    if (seed is None) == (noise is None):
        raise ValueError("pass exactly one of seed= and noise=")
    if logits.ndim == 0:
        raise ValueError("gumbel_softmax needs at least one dimension")
    if noise is not None and noise.shape != logits.shape:
        raise ValueError(f"noise shape {noise.shape} != logits shape {logits.shape}")
    dim = dim % logits.ndim
    if seed is not None and dim != logits.ndim - 1:  # draw in the original layout, then move the axis
        noise, seed = gumbel_noise(seed, logits.shape, logits.dtype, xp), None
    l2 = _rows(xp, logits, dim)
    g2 = _rows(xp, noise, dim) if noise is not None else l2
    k0, k1 = philox.seed_key(seed) if seed is not None else (np.uint64(0), np.uint64(0))
    ys2 = xp.empty_like(l2)
    y2 = xp.empty_like(l2) if hard else ys2
    if l2.size:
        dev = cuda_array
        round32 = logits.dtype == np.float32
        cache = seed is not None and round32 and l2.shape[1] <= CACHE_MAX
        smem = l2.shape[1] * 4 if cache else 0
        forward_rows_kernel[_blocks(l2.shape[0]), THREADS, 0, smem](dev(l2), float(tau), hard, seed is not None,
                                                                      k0, k1, dev(g2), round32, cache, dev(y2),
                                                                      dev(ys2))
    shape = xp.moveaxis(logits, dim, -1).shape
    y_soft = xp.moveaxis(ys2.reshape(shape), -1, dim)
    return (xp.moveaxis(y2.reshape(shape), -1, dim) if hard else y_soft), y_soft


def gumbel_softmax_backward(grad_y, y_soft, tau=1.0, *, dim=-1):
    """∂L/∂logits = y_soft ∘ (g_y − Σ g_y y_soft)/τ (straight-through for hard: the gradient of y_soft)."""
    xp = _xp(y_soft)
    if grad_y.shape != y_soft.shape:
        raise ValueError(f"grad shape {grad_y.shape} != y_soft shape {y_soft.shape}")
    dim = dim % y_soft.ndim
    ys2, gy2 = _rows(xp, y_soft, dim), _rows(xp, grad_y, dim)
    out2 = xp.empty_like(ys2)
    if ys2.size:
        backward_rows_kernel[_blocks(ys2.shape[0]), THREADS](cuda_array(gy2), cuda_array(ys2), float(tau),
                                                             cuda_array(out2))
    return xp.moveaxis(out2.reshape(xp.moveaxis(y_soft, dim, -1).shape), -1, dim)


def _sig(dt):
    return {
        "forward": f"void({dt}[:, ::1], float64, boolean, boolean, uint64, uint64, {dt}[:, ::1], boolean, "
                   f"boolean, {dt}[:, ::1], {dt}[:, ::1])",
        "backward": f"void({dt}[:, ::1], {dt}[:, ::1], float64, {dt}[:, ::1])",
        "noise": f"void(uint64, uint64, boolean, {dt}[::1])",
    }


KERNELS = {"forward": forward_rows_kernel, "backward": backward_rows_kernel, "noise": gumbel_noise_kernel}
# (kernel, signature) pairs that tests compile to PTX for sm_90, for float32 and float64 arrays.
SIGNATURES = {f"{name}_{dt}": (KERNELS[name], sig) for dt in ("float32", "float64") for name, sig in _sig(dt).items()}
