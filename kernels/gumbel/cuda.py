"""Gumbel-softmax as numba.cuda kernels (the GPU form of kernels.gumbel): one thread block per row.

The forward kernel makes three passes over its row, its THREADS threads each taking 4 elements per step:
  pass 1: g_j = −log(−log u_j) from Philox at the element's flat index, one Philox call per 4 elements (a thread's
          step is a whole Philox block); z_j = (l_j + g_j)·(log₂e/τ), in base-2 units; per-thread (max, first
          argmax), then a tree reduction of the pairs in shared memory;
  pass 2: e_j = 2^(z_j − max) = exp((l_j + g_j)/τ − max_k (l_k + g_k)/τ) and Σ e_j, the same tree reduction;
  pass 3: y_soft_j = e_j·(1/Σ) (and the one-hot of the argmax when hard).
The noise is the reference's (kernels/gumbel/reference.py). float64 rows: g = −log(−log u) in float64 from philox's
float64 uniform. float32 rows: float32 Gumbel noise, g = −log32(−log32 u) from philox's float32 uniform and float32
log, in float32 arithmetic — the float64 logs were most of this kernel's time (a GPU has few float64 units); the GPU
contracts the log's multiply-adds into FMAs, so this g is within a couple of float32 ulps of the reference's, not
bitwise. One kernel is compiled per dtype (make_forward_kernel, make_noise_kernel), so that each holds one
generator's code and registers. The noise costs most (ten Philox rounds and two logs per element), so it is drawn
once: pass 1 leaves g for pass 2, which leaves e for pass 3, each in the place of the one before — for float32 rows
of up to CACHE_MAX values in shared memory, for other rows in y_soft's own array (g is of the row's dtype, so either
copy is exact). Pass 2 reads the logits again (just read: from L2).
z and z − max are float64, as the reference's are (rounding z to float32 would move it by up to 2⁻²⁴|z|, too much
for large |z|/τ); for float32 rows only 2^(z − max) (one ex2.approx.f32, ≤ 2 ulp) and the normalization are
float32 (z − max ≤ 0 rounded to float32 is exact to 2⁻²⁴|z − max|, which moves y by at most 2⁻²⁴/e ≈ 2·10⁻⁸), with
the sum in float64. The backward kernel reduces ⟨g_y, y_soft⟩ the same way and writes
y_soft ∘ (g_y − ⟨g_y, y_soft⟩)·(1/τ).

Loads run ahead of the arithmetic that needs them: pass 1 loads a Philox block's four logits before its Philox
rounds, and passes 2 and 3 and the backward read elements j, j + THREADS, j + 2·THREADS, j + 3·THREADS in one step,
four independent loads (a warp's coalesced, its shared-memory reads on 32 distinct banks). Indices past the row's
end are clamped into it, so that no branch separates the loads; only the stores are guarded.

Runs on CuPy arrays on a GPU (launched through kernels.dispatch.launch), and on NumPy arrays under the Numba CUDA
simulator (NUMBA_ENABLE_CUDASIM=1).
"""

from __future__ import annotations

import math
import os

import numpy as np
from numba import cuda, float32, float64, int64

from kernels import philox
from kernels.dispatch import array_module, launch
from kernels.gumbel.reference import as_rows, check_backward, check_dim, check_forward

# Threads per block (a power of two, for the tree reductions), the longest row whose float32 noise (40 KiB) a block
# keeps in shared memory, and the most blocks a launch has (each then takes rows, or Philox blocks, a grid apart).
# The simulator runs one Python thread per CUDA thread, so there all three are small: the same code, a narrower
# tree, and tests reach rows longer than the cache and blocks that take several rows.
_SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
THREADS = 32 if _SIM else 256
CACHE_MAX = 48 if _SIM else 10240
GRID_MAX = 2 if _SIM else 8192
LOG2_E = 1.0 / math.log(2.0)
_philox = philox.cuda_device_functions()
_block, _uniform = _philox.block, _philox.uniform


@cuda.jit(device=True)
def _gumbel64(w):
    """g = −log(−log u) of a Philox word, u = its float64 uniform, in float64 (the float64 rows' noise)."""
    return -math.log(-math.log(_uniform(w)))


_gumbel32 = _philox.f32.gumbel32  # g = −log32(−log32 u) of a Philox word, u its float32 uniform (float32 rows')


@cuda.jit(device=True)
def _pick(v0, v1, v2, v3, k):
    """v_k, for k in 0…3 (a word of a Philox block, or one of its four logits)."""
    return v0 if k == 0 else (v1 if k == 1 else (v2 if k == 2 else v3))


@cuda.jit(device=True)
def _clamp(j, n):
    """j clamped into 0 … n − 1, so that a load needs no branch (its value is left out when j is outside), as an
    unsigned index: Numba then leaves out the wraparound of negative indices (Python's a[−1])."""
    return np.uint64(min(max(j, 0), n - 1))


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


@cuda.jit(device=True)
def _block_argmax(vbuf, ibuf, m, a, n):
    """(max, first argmax) over the block's threads' pairs (m, a), a = n for a thread that saw no element: a tree
    reduction in the shared arrays vbuf, ibuf (all threads get it)."""
    tid = cuda.threadIdx.x
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
    m, a = vbuf[0], ibuf[0]
    cuda.syncthreads()
    return m, a


def make_forward_kernel(gumbel):
    """The forward kernel for one dtype's noise, g = gumbel(word) (_gumbel32 or _gumbel64).

    `single` (float32 rows: 2^(z − max) and the normalization in float32, see the module docstring) stays a kernel
    parameter rather than a constant of this closure: made a constant, it let ptxas (13.0, sm_90) schedule the float64
    kernel's pass 2 into 96 registers instead of 64 — a change of occupancy no GPU has measured."""

    @cuda.jit(device=True)
    def pass1(m, a, j, x, w, seeded, cache, scale, grow, gs):
        """Pass 1 at element j of a row (logit x, Philox word w): g (drawn, and kept for pass 2 in gs or grow — y_soft's
        row then —, or read from grow, the noise), and the running (max, first argmax) (m, a) of s = x + g (the max of
        z = s·scale is then m·scale: rounding is monotone)."""
        c = np.uint64(j)
        if seeded:
            drawn = gumbel(w)  # of the row's dtype: kept exactly
            if cache:
                gs[c] = drawn
            else:
                grow[c] = drawn  # pass 2 reads each g before it writes e in its place
            g = np.float64(drawn)
        else:
            g = np.float64(grow[c])
        s = np.float64(x) + g
        if s > m or a == grow.shape[0]:
            return s, j
        return m, a

    def forward_rows_kernel(l2, tau, hard, seeded, k0, k1, g2, single, cache, y2, ys2):
        """Fused Gumbel-softmax over the rows of (rows, n) arrays; block b takes rows b, b + gridDim, …

        g2 is the noise, or when `seeded` the scratch where pass 1 leaves the g it draws for pass 2 (y_soft's own
        array: the same dtype, so the copy is exact), or with `cache` (float32 rows that fit) shared memory does; the
        reduction after pass 1 is the barrier between those writes and their reads by other threads. Pass 2 keeps each
        e in shared memory (cache) or y_soft's array, where the thread that wrote it reads it in pass 3."""
        vbuf = cuda.shared.array(THREADS, float64)
        ibuf = cuda.shared.array(THREADS, int64)
        gs = cuda.shared.array(0, float32)  # the row's g, then its e (dynamic: n values when cache, else none)
        tid = cuda.threadIdx.x
        rows, n = l2.shape
        scale = LOG2_E * (1.0 / tau)  # z in base-2 units: 2^(z − max) = exp((l + g − max(l + g))/τ)
        zero = np.uint64(0)
        for r in range(cuda.blockIdx.x, rows, cuda.gridDim.x):
            # pass 1: max and first argmax of s = l + g, a thread's step being the 4 elements of Philox block b
            first = r * n  # the flat index of the row's first element
            lrow, grow, yrow, hrow = l2[r], g2[r], ys2[r], y2[r]
            m = -math.inf
            a = n
            for b in range((first >> 2) + tid, (first + n + 3) >> 2, THREADS):
                j4 = 4 * b - first  # the row index of the block's first element
                # its four logits, loaded first: their latency hides behind the Philox rounds and the logs
                x0, x1 = lrow[_clamp(j4, n)], lrow[_clamp(j4 + 1, n)]
                x2, x3 = lrow[_clamp(j4 + 2, n)], lrow[_clamp(j4 + 3, n)]
                w0, w1, w2, w3 = _block(k0, k1, np.uint64(b)) if seeded else (zero, zero, zero, zero)
                if 0 <= j4 and j4 + 4 <= n:  # the whole block in the row: four steps with no index checks
                    m, a = pass1(m, a, j4, x0, w0, seeded, cache, scale, grow, gs)
                    m, a = pass1(m, a, j4 + 1, x1, w1, seeded, cache, scale, grow, gs)
                    m, a = pass1(m, a, j4 + 2, x2, w2, seeded, cache, scale, grow, gs)
                    m, a = pass1(m, a, j4 + 3, x3, w3, seeded, cache, scale, grow, gs)
                else:  # a row whose start or end is not a multiple of 4 shares its end blocks
                    for k in range(4):
                        if 0 <= j4 + k < n:
                            m, a = pass1(m, a, j4 + k, _pick(x0, x1, x2, x3, k), _pick(w0, w1, w2, w3, k), seeded,
                                         cache, scale, grow, gs)
            s_max, arg = _block_argmax(vbuf, ibuf, m, a, n)
            z_max = s_max * scale  # the largest z = s·scale
            # pass 2: e = 2^(z − max) and the softmax denominator; e is kept where g was, or in y_soft's array
            s = 0.0
            for j0 in range(tid, n, 4 * THREADS):
                for k in range(4):
                    j = j0 + k * THREADS
                    c = _clamp(j, n)
                    g = np.float64(gs[c]) if cache else np.float64(grow[c])
                    d = (np.float64(lrow[c]) + g) * scale - z_max
                    if single:
                        e = math.exp2(np.float32(d))  # one instruction, ex2.approx.f32 (≤ 2 ulp)
                        if j < n:
                            s += np.float64(e)
                            if cache:
                                gs[c] = e
                            else:
                                yrow[c] = e
                    else:
                        e64 = math.exp2(d)
                        if j < n:
                            s += e64
                            yrow[c] = e64
            inv_total = 1.0 / _block_sum(vbuf, s)
            inv_total32 = np.float32(inv_total)
            # pass 3: normalize (and the one-hot); each thread reads the e it kept in pass 2
            for j0 in range(tid, n, 4 * THREADS):
                for k in range(4):
                    j = j0 + k * THREADS
                    c = _clamp(j, n)
                    if single:  # (two variables: one would be typed float64, and cost two conversions)
                        y32 = (gs[c] if cache else np.float32(yrow[c])) * inv_total32
                        if j < n:
                            yrow[c] = y32
                    else:
                        y64 = yrow[c] * inv_total
                        if j < n:
                            yrow[c] = y64
                    if hard and j < n:
                        hrow[c] = 1.0 if j == arg else 0.0
            cuda.syncthreads()  # the next row's pass 1 writes gs entries that other threads still read in this pass 3

    return forward_rows_kernel


@cuda.jit
def backward_rows_kernel(gy2, ys2, tau, out2):
    """out = y_soft ∘ (g_y − Σ g_y y_soft)/τ over the rows of (rows, n) arrays, one block per row."""
    vbuf = cuda.shared.array(THREADS, float64)
    tid = cuda.threadIdx.x
    rows, n = ys2.shape
    inv_tau = 1.0 / tau
    for r in range(cuda.blockIdx.x, rows, cuda.gridDim.x):
        gyrow, yrow, orow = gy2[r], ys2[r], out2[r]
        d = 0.0
        for j0 in range(tid, n, 4 * THREADS):
            for k in range(4):
                j = j0 + k * THREADS
                c = _clamp(j, n)
                v = np.float64(gyrow[c]) * np.float64(yrow[c])
                if j < n:
                    d += v
        dot = _block_sum(vbuf, d)
        for j0 in range(tid, n, 4 * THREADS):
            for k in range(4):
                j = j0 + k * THREADS
                c = _clamp(j, n)
                v = np.float64(yrow[c]) * (np.float64(gyrow[c]) - dot) * inv_tau
                if j < n:
                    orow[c] = v


def make_noise_kernel(gumbel):
    """The noise kernel for one dtype: out[i] = gumbel(word of flat index i) for every i, a Philox block a step."""

    def gumbel_noise_kernel(k0, k1, out):
        for b in range(cuda.grid(1), (out.size + 3) >> 2, cuda.gridsize(1)):
            w0, w1, w2, w3 = _block(k0, k1, np.uint64(b))
            for k in range(4):
                i = 4 * b + k
                if i < out.size:
                    out[i] = gumbel(_pick(w0, w1, w2, w3, k))

    return gumbel_noise_kernel


# one compiled kernel of each kind per dtype, each with its dtype's noise
_NOISE = {np.dtype(np.float32): _gumbel32, np.dtype(np.float64): _gumbel64}
KERNELS = {dt: {"forward": cuda.jit(make_forward_kernel(gumbel)), "backward": backward_rows_kernel,
                "noise": cuda.jit(make_noise_kernel(gumbel))} for dt, gumbel in _NOISE.items()}


def _kernels(dtype):
    """The kernels for arrays of `dtype`: float32's for float32, float64's (float64 noise) otherwise."""
    return KERNELS[np.dtype(np.float32) if dtype == np.float32 else np.dtype(np.float64)]



def _blocks(rows):
    return max(1, min(rows, GRID_MAX))


def gumbel_noise(seed, shape, dtype=np.float64, xp=np):
    """g = −log(−log u) for every flat index of an array of `shape`: reference.gumbel_noise's (float32 noise for
    float32, within a couple of float32 ulps on a GPU, which fuses multiply-adds; bit for bit under the simulator)."""
    out = xp.empty(shape, dtype=dtype)
    k0, k1 = philox.seed_key(seed)
    if out.size:
        launch(_kernels(out.dtype)["noise"], _blocks(-(-out.size // (4 * THREADS))), THREADS, k0, k1, out.reshape(-1))
    return out


def gumbel_softmax_forward(logits, tau=1.0, hard=False, *, seed=None, noise=None, dim=-1):
    """Sample y ~ Gumbel-softmax(logits, τ) along `dim`, one block per row; returns (y, y_soft)."""
    xp = array_module(logits)
    check_forward(logits, tau, seed, noise)
    dim = check_dim(dim, logits.ndim)
    if seed is not None and dim != logits.ndim - 1:  # draw in the original layout, then move the axis
        noise, seed = gumbel_noise(seed, logits.shape, logits.dtype, xp), None
    l2 = as_rows(logits, dim)
    k0, k1 = philox.seed_key(seed) if seed is not None else (np.uint64(0), np.uint64(0))
    ys2 = xp.empty_like(l2)
    g2 = as_rows(noise, dim) if noise is not None else ys2  # seeded: the kernel's scratch for g (see there)
    y2 = xp.empty_like(l2) if hard else ys2
    if l2.size:
        single = logits.dtype == np.float32
        cache = seed is not None and single and l2.shape[1] <= CACHE_MAX
        smem = l2.shape[1] * 4 if cache else 0
        launch(_kernels(logits.dtype)["forward"], _blocks(l2.shape[0]), THREADS, l2, float(tau), bool(hard),
               seed is not None, k0, k1, g2, single, cache, y2, ys2, shared=smem)
    shape = xp.moveaxis(logits, dim, -1).shape
    y_soft = xp.moveaxis(ys2.reshape(shape), -1, dim)
    return (xp.moveaxis(y2.reshape(shape), -1, dim) if hard else y_soft), y_soft


def gumbel_softmax_backward(grad_y, y_soft, tau=1.0, *, dim=-1):
    """∂L/∂logits = y_soft ∘ (g_y − Σ g_y y_soft)/τ (straight-through for hard: the gradient of y_soft)."""
    xp = array_module(y_soft)
    dim = check_backward(grad_y, y_soft, dim)
    ys2, gy2 = as_rows(y_soft, dim), as_rows(grad_y, dim)
    out2 = xp.empty_like(ys2)
    if ys2.size:
        launch(backward_rows_kernel, _blocks(ys2.shape[0]), THREADS, gy2, ys2, float(tau), out2)
    return xp.moveaxis(out2.reshape(xp.moveaxis(y_soft, dim, -1).shape), -1, dim)


def _sig(dt):
    return {
        "forward": f"void({dt}[:, ::1], float64, boolean, boolean, uint64, uint64, {dt}[:, ::1], boolean, "
                   f"boolean, {dt}[:, ::1], {dt}[:, ::1])",
        "backward": f"void({dt}[:, ::1], {dt}[:, ::1], float64, {dt}[:, ::1])",
        "noise": f"void(uint64, uint64, {dt}[::1])",
    }


# (kernel, signature) pairs that tests compile to PTX for sm_90, for float32 and float64 arrays.
SIGNATURES = {f"{name}_{dt}": (KERNELS[np.dtype(dt)][name], sig) for dt in ("float32", "float64")
              for name, sig in _sig(dt).items()}
