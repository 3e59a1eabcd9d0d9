"""Gumbel-softmax as fused Numba kernels (the CPU form of kernels.gumbel): one parallel task per group of rows.

Rows lie along the last axis (another `dim` is first moved there; the noise is still drawn in the original
layout, so each element keeps its flat index — its Philox counter). For each row, from two scratch rows:

  1. the noise's Philox blocks covering the row, four elements per call (a branch-free loop LLVM vectorizes): for
     float64 logits their uniforms, for float32 logits their float32 Gumbel noise itself;
  2. s_j = l_j + g_j with g_j = −log(−log u_j); then its max and (first) argmax — the hard index;
  3. e_j = exp(z_j − max z) with z_j = s_j/τ (max z = (max s)/τ), and their sum;
  4. y_soft_j = e_j / sum, and the one-hot of the argmax when hard.

The noise is the reference's (kernels/gumbel/reference.py). float64 logits: u = philox's float64 uniform and g in
float64, with philox.fast_log (within an ulp or so of NumPy's log). float32 logits: float32 Gumbel noise, u =
philox's float32 uniform and g = −log32(−log32 u) (philox.cpu.gumbel4_32) with philox's float32 log, all in
float32 arithmetic — the very operations the reference evaluates, and the CPU contracts no multiply-adds, so it is
the reference's noise bit for bit (and its float32 logs cost less than float64 ones). z and everything after it
are float64 for both dtypes. fast_log, fast_exp and log32 are fdlibm's algorithms or float32 polynomials in plain
arithmetic (< 1 ulp), so steps 1–4 are SIMD loops. A row of 8192 float64 scratch values is 64 KiB, so the passes
after the first run from L2: the memory traffic is one read of the logits and one write of each output (PyTorch's
eager gumbel_softmax makes about six passes over memory, and draws its exponentials one at a time).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from kernels import philox
from kernels.gumbel.reference import as_rows, check_backward, check_dim, check_forward

ROWS_PER_TASK = 4
fast_log, fast_exp = philox.fast_log, philox.fast_exp
# error_model="numpy": no ZeroDivisionError checks on float division, which would stop LLVM vectorizing.
_jit = dict(parallel=True, error_model="numpy")


# float64 uniforms into a float64 buffer; float32 noise itself into a float32 one (drawn in the loop over blocks:
# measured 25% faster than a second loop taking the logs of stored float32 uniforms)
_fill_uniforms, _fill_gumbel32 = philox.block_filler(philox.cpu.uniform4), philox.block_filler(philox.cpu.gumbel4_32)


@philox.cached_njit(**_jit)
def gumbel_noise_kernel(k0, k1, noise32, out):
    """out[i] = −log(−log u_i) for the flat index i (float32 noise when noise32), 4096 elements a task."""
    n = out.size
    chunk = 4096
    for c in prange((n + chunk - 1) // chunk):
        lo = c * chunk
        m = min(chunk, n - lo)
        if noise32:
            gbuf = np.empty(chunk + 8, np.float32)
            _fill_gumbel32(k0, k1, lo, m, gbuf)
            for j in range(m):
                out[lo + j] = gbuf[j]
        else:
            ubuf = np.empty(chunk + 8)
            _fill_uniforms(k0, k1, lo, m, ubuf)
            for j in range(m):
                out[lo + j] = -fast_log(-fast_log(ubuf[j]))


@njit(inline="always")
def _max_argmax(z, n):
    """(max, first index of the max) of z[:n], n ≥ 1, NaNs skipped unless z[0] is one (then (NaN, 0)), as a plain
    scan keeping the first strict improvement would give: the max by eight running maxima (their selects vectorize;
    one running max is a chain of dependent compare-and-branch steps), then the first index holding it."""
    m0 = m1 = m2 = m3 = m4 = m5 = m6 = m7 = z[0]
    j = 0
    while j + 8 <= n:
        m0 = z[j] if z[j] > m0 else m0
        m1 = z[j + 1] if z[j + 1] > m1 else m1
        m2 = z[j + 2] if z[j + 2] > m2 else m2
        m3 = z[j + 3] if z[j + 3] > m3 else m3
        m4 = z[j + 4] if z[j + 4] > m4 else m4
        m5 = z[j + 5] if z[j + 5] > m5 else m5
        m6 = z[j + 6] if z[j + 6] > m6 else m6
        m7 = z[j + 7] if z[j + 7] > m7 else m7
        j += 8
    while j < n:
        m0 = z[j] if z[j] > m0 else m0
        j += 1
    best = m0
    for m in (m1, m2, m3, m4, m5, m6, m7):
        best = m if m > best else best
    if best != best:  # z[0] is NaN
        return best, 0
    arg = 0
    while z[arg] != best:
        arg += 1
    return best, arg


@philox.cached_njit(**_jit)
def forward_rows(l2, tau, hard, seeded, k0, k1, g2, noise32, y2, ys2):
    """Fused Gumbel-softmax over the rows of C-contiguous (rows, n) arrays (row r starts at flat index r·n); the
    seeded noise is float32 when noise32 (float32 logits), float64 otherwise."""
    rows, n = l2.shape
    for task in prange((rows + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        ubuf = np.empty(0 if noise32 else n + 8)  # float64 uniforms, or
        gbuf = np.empty(n + 8 if noise32 else 0, np.float32)  # float32 noise
        zbuf = np.empty(n)
        for r in range(task * ROWS_PER_TASK, min(rows, (task + 1) * ROWS_PER_TASK)):
            lrow, ys = l2[r], ys2[r]
            inv_tau = 1.0 / tau  # multiplications instead of divisions in the loops (within an ulp of them)
            # 1–2. s_j = l_j + g_j, g_j = −log(−log u_j)
            if seeded:
                base = r * n
                off = base & 3
                if noise32:
                    _fill_gumbel32(k0, k1, base, n, gbuf)
                    gs = gbuf[off:off + n]  # indexed from 0, so Numba emits no negative-index wraparound
                    for j in range(n):
                        zbuf[j] = np.float64(lrow[j]) + np.float64(gs[j])
                else:
                    _fill_uniforms(k0, k1, base, n, ubuf)
                    us = ubuf[off:off + n]
                    for j in range(n):
                        zbuf[j] = np.float64(lrow[j]) - fast_log(-fast_log(us[j]))
            else:
                grow = g2[r]
                for j in range(n):
                    zbuf[j] = np.float64(lrow[j]) + np.float64(grow[j])
            s_max, arg = _max_argmax(zbuf, n)
            z_max = s_max * inv_tau  # = max_j s_j·(1/τ): rounding is monotone
            # 3. e_j = exp(z_j − max) and their sum (eight running sums, so the adds do not wait on each other)
            for j in range(n):
                zbuf[j] = fast_exp(zbuf[j] * inv_tau - z_max)
            s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = 0.0
            j = 0
            while j + 8 <= n:
                s0 += zbuf[j]
                s1 += zbuf[j + 1]
                s2 += zbuf[j + 2]
                s3 += zbuf[j + 3]
                s4 += zbuf[j + 4]
                s5 += zbuf[j + 5]
                s6 += zbuf[j + 6]
                s7 += zbuf[j + 7]
                j += 8
            while j < n:
                s0 += zbuf[j]
                j += 1
            total = ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))
            # 4. normalize; one-hot of the argmax when hard
            inv_total = 1.0 / total
            for j in range(n):
                ys[j] = zbuf[j] * inv_total
            if hard:
                y = y2[r]
                for j in range(n):
                    y[j] = 0.0
                y[arg] = 1.0


@philox.cached_njit(**_jit)
def backward_rows(gy2, ys2, tau, out2):
    """out = y_soft ∘ (g_y − Σ g_y y_soft)/τ over the rows of C-contiguous (rows, n) arrays."""
    rows, n = ys2.shape
    for r in prange(rows):
        gy, ys, out = gy2[r], ys2[r], out2[r]
        dot = 0.0
        for j in range(n):
            dot += np.float64(gy[j]) * np.float64(ys[j])
        for j in range(n):
            out[j] = np.float64(ys[j]) * (np.float64(gy[j]) - dot) / tau


def gumbel_noise(seed, shape, dtype=np.float64):
    """g = −log(−log u) for every flat index of an array of `shape` (the same noise as reference.gumbel_noise: float32
    noise for float32, bit for bit)."""
    out = np.empty(shape, dtype=dtype)
    k0, k1 = philox.seed_key(seed)
    if out.size:
        gumbel_noise_kernel(k0, k1, out.dtype == np.float32, out.reshape(-1))
    return out


def gumbel_softmax_forward(logits, tau=1.0, hard=False, *, seed=None, noise=None, dim=-1):
    """Sample y ~ Gumbel-softmax(logits, τ) along `dim` in one fused pass per row; returns (y, y_soft).

    Rows along the last axis are done in place; for another `dim` the noise is drawn in the original layout
    (so it is the same noise) and the rows are made contiguous first.
    """
    logits = np.asarray(logits)
    noise = None if noise is None else np.asarray(noise)
    check_forward(logits, tau, seed, noise, scalar_ok=True)
    dim = check_dim(dim, logits.ndim)
    last = logits.ndim == 0 or dim == logits.ndim - 1
    if seed is not None and not last:
        noise, seed = gumbel_noise(seed, logits.shape, logits.dtype), None
    l2 = as_rows(logits, dim)
    g2 = as_rows(noise, dim) if noise is not None else l2
    k0, k1 = philox.seed_key(seed) if seed is not None else (np.uint64(0), np.uint64(0))
    ys2 = np.empty_like(l2)
    y2 = np.empty_like(l2) if hard else ys2
    if l2.size:
        forward_rows(l2, float(tau), hard, seed is not None, k0, k1, g2, logits.dtype == np.float32, y2, ys2)
    back = lambda a2: np.moveaxis(a2.reshape(np.moveaxis(logits, dim, -1).shape), -1, dim) if logits.ndim else \
        a2.reshape(())
    y_soft = back(ys2)
    return (back(y2) if hard else y_soft), y_soft


def gumbel_softmax_backward(grad_y, y_soft, tau=1.0, *, dim=-1):
    """∂L/∂logits = y_soft ∘ (g_y − Σ g_y y_soft)/τ (straight-through for hard: the gradient of y_soft)."""
    y_soft, grad_y = np.asarray(y_soft), np.asarray(grad_y)
    dim = check_backward(grad_y, y_soft, dim)
    if y_soft.ndim == 0:
        return np.zeros_like(y_soft)
    ys2, gy2 = as_rows(y_soft, dim), as_rows(grad_y, dim)
    out2 = np.empty_like(ys2)
    if ys2.size:
        backward_rows(gy2, ys2, float(tau), out2)
    return np.moveaxis(out2.reshape(np.moveaxis(y_soft, dim, -1).shape), -1, dim)


def benchmark_gumbel_softmax(shape=(4096, 8192), dtype=np.float32, tau=1.0, hard=False, repeats=5, threads=2):
    """Median time of this kernel (seeded) against torch.nn.functional.gumbel_softmax, threads pinned for both."""
    import time

    import numba
    import torch

    numba.set_num_threads(threads)
    torch.set_num_threads(threads)
    logits = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    logits_t = torch.from_numpy(logits)

    def median_time(fn):
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return float(np.median(times))

    ours = median_time(lambda: gumbel_softmax_forward(logits, tau, hard, seed=1))
    theirs = median_time(lambda: torch.nn.functional.gumbel_softmax(logits_t, tau=tau, hard=hard))
    return {"shape": shape, "dtype": np.dtype(dtype).name, "hard": hard, "threads": threads, "ours_s": ours,
            "torch_s": theirs, "speedup": theirs / ours}
