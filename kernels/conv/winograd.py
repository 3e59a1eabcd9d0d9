"""Winograd's minimal filtering F(2×2, 3×3): the CPU forward and input gradient of 3×3, stride-1 convolutions.

Lavin & Gray 2016 ("Fast Algorithms for Convolutional Neural Networks", eq. 8): a 2×2 tile Y of the output of a 3×3
filter g over the 4×4 input tile d under it is

    Y = Aᵀ [ (G g Gᵀ) ⊙ (Bᵀ d B) ] A

16 multiplications where direct convolution takes 36. Summed over the input channels, the ⊙ becomes one GEMM for
each of the 16 entries ξ of the transformed tile (eq. 12):

    M[ξ] = V[ξ] · Uᵀ[ξ]       (P × C) · (C × K),   V = Bᵀ d B for every input tile and channel (P the tiles of a
                                                    task), U = G g Gᵀ for every filter pair (k, c)

then Y = Aᵀ M A per tile and output channel. The GEMMs do 16/36 of im2col's multiply-adds; the transforms are
additions (and halvings in G), done once per tile and channel. Tiles are rows and channels columns (channels last),
so every transform is a loop over contiguous channels, which the compiler vectorizes; the input is transposed to that
layout a band of rows at a time, and the output back. For a task — a few images, or a band of tile rows of one — V
and M stay in the L2 cache, as cpu.py's im2col buffer does, and the GEMMs are BLAS calls.

The weight gradient dw[k, c] = Σ gy[n, k, i, j] · x[n, c, i + a − pt, j + b − pl] is the same trilinear form read
for the filter: F(3×3, 2×2) with the same matrices transposed (the transposition principle) — for each 2×2 tile t of
gy and the 4×4 window d of x under it, dw += Gᵀ [ (A t Aᵀ) ⊙ (Bᵀ d B) ] G. Summed over tiles first, that is again 16
GEMMs, M[ξ] += T[ξ]ᵀ · V[ξ] ((K × P) · (P × C), V the forward's input transform), then one Gᵀ M G per filter pair.

The transforms' arithmetic differs from direct convolution's (adding and subtracting inputs before the multiply), so
results differ by rounding: a few float32 ulps of the largest term, as the tests bound.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

# F(2×2, 3×3), Lavin & Gray eq. 8 (interpolation points 0, 1, −1, ∞); the kernels below spell out their products
BT = np.array([[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]], dtype=np.float64)
G = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]], dtype=np.float64)
AT = np.array([[1, 1, 1, 0], [0, 1, -1, -1]], dtype=np.float64)
BUDGET = 1 << 19  # elements of V and M together per task (2 MiB in float32): 5% faster than 1 MiB at 64×64×16×16


def filters(w):
    """Uᵀ (16, C, K): U = G g Gᵀ for every 3×3 filter g = w[k, c], its entry ξ = 4a + b first, then transposed
    for the GEMMs M[ξ] = V[ξ] · Uᵀ[ξ] over tiles in rows."""
    k, c = w.shape[:2]
    return np.ascontiguousarray(np.einsum("ai,kcij,bj->abck", G, w, G).reshape(16, c, k).astype(w.dtype))


def plan(c, k, n_img, th, tw, threads):
    """(images, tile rows) per task, so that V (16·P·C) and M (16·P·K) fit BUDGET and every thread has work."""
    per_image = 16 * (c + k) * th * tw
    if per_image <= BUDGET:
        return max(1, min(BUDGET // per_image, -(-n_img // threads))), th
    return 1, max(1, min(th, BUDGET // (16 * (c + k) * tw)))


@njit(cache=True, inline="always")
def _task(task, n_img, th, imgs, rows):
    """Task → (first image, images, first tile row, end tile row): tasks run over (image group, tile-row band)."""
    batch, b = divmod(task, (th + rows - 1) // rows)
    n0, i0 = batch * imgs, b * rows
    return n0, min(imgs, n_img - n0), i0, min(th, i0 + rows)


@njit(cache=True, inline="always")
def _n_tasks(n_img, th, imgs, rows):
    return ((n_img + imgs - 1) // imgs) * ((th + rows - 1) // rows)


@njit(cache=True)
def _input_tiles(x, n, i0, i1, tw, pt, pl, v, q0, band):
    """v[ξ, q0 + q, :] = (Bᵀ d B)[ξ] over the channels, for the tiles of image n in tile rows [i0, i1),
    q = (i − i0)·tw + j, d the 4×4 window of the zero-padded input at (2i − pt, 2j − pl). band: scratch
    (rows, cols, C) for the padded input rows, channels last, so every step below is a loop over C."""
    c_in, h, w = x.shape[1], x.shape[2], x.shape[3]
    lo, hi = max(0, pl), min(2 * tw + 2, w + pl)  # the band's columns that hold input, not padding
    nr = 2 * (i1 - i0) + 2
    band[:nr] = 0
    for r in range(nr):
        src = 2 * i0 - pt + r
        if 0 <= src < h:
            for col in range(lo, hi):  # a transpose to channels last: read a column of x, write a row of band
                dst = band[r, col]
                for c in range(c_in):
                    dst[c] = x[n, c, src, col - pl]
    t = np.empty((4, 4, c_in), dtype=v.dtype)
    for i in range(i1 - i0):
        for j in range(tw):
            d0, d1 = band[2 * i, 2 * j : 2 * j + 4], band[2 * i + 1, 2 * j : 2 * j + 4]
            d2, d3 = band[2 * i + 2, 2 * j : 2 * j + 4], band[2 * i + 3, 2 * j : 2 * j + 4]
            for s in range(4):  # Bᵀ d, column by column
                for c in range(c_in):
                    t[0, s, c] = d0[s, c] - d2[s, c]
                    t[1, s, c] = d1[s, c] + d2[s, c]
                    t[2, s, c] = d2[s, c] - d1[s, c]
                    t[3, s, c] = d1[s, c] - d3[s, c]
            q = q0 + i * tw + j
            for a in range(4):  # (Bᵀ d) B, row by row
                ta = t[a]
                v0, v1, v2, v3 = v[4 * a, q], v[4 * a + 1, q], v[4 * a + 2, q], v[4 * a + 3, q]
                for c in range(c_in):
                    v0[c] = ta[0, c] - ta[2, c]
                    v1[c] = ta[1, c] + ta[2, c]
                    v2[c] = ta[2, c] - ta[1, c]
                    v3[c] = ta[1, c] - ta[3, c]


@njit(cache=True)
def _output_tiles(m, y, n, i0, i1, tw, q0, stage):
    """y[n, k, 2i + a, 2j + b] = (Aᵀ M A)[a, b] from m (16, P, K), for the tiles of image n in tile rows [i0, i1)
    (what lies inside y). stage: scratch (2, 2·tw, K), one tile row's output rows, channels last."""
    ho, wo, k_out = y.shape[2], y.shape[3], y.shape[1]
    t = np.empty((2, 4, k_out), dtype=m.dtype)
    for i in range(i1 - i0):
        for j in range(tw):
            q = q0 + i * tw + j
            for b in range(4):  # Aᵀ M, column by column
                m0, m1, m2, m3 = m[b, q], m[4 + b, q], m[8 + b, q], m[12 + b, q]
                for k in range(k_out):
                    t[0, b, k] = m0[k] + m1[k] + m2[k]
                    t[1, b, k] = m1[k] - m2[k] - m3[k]
            for a in range(2):  # (Aᵀ M) A
                ta, y0, y1 = t[a], stage[a, 2 * j], stage[a, 2 * j + 1]
                for k in range(k_out):
                    y0[k] = ta[0, k] + ta[1, k] + ta[2, k]
                    y1[k] = ta[1, k] - ta[2, k] - ta[3, k]
        for a in range(2):  # the tile row's two output rows, back to channels first
            row = 2 * (i0 + i) + a
            if row < ho:
                for k in range(k_out):
                    out = y[n, k, row]
                    for col in range(wo):
                        out[col] = stage[a, col, k]


@njit(cache=True)
def _tasks(x, ut, y, pt, pl, imgs, rows, task0, task1):
    """Tasks [task0, task1) over (image group, tile-row band): transform the inputs, 16 GEMMs, transform back."""
    n_img, c = x.shape[0], x.shape[1]
    k = ut.shape[2]
    th, tw = (y.shape[2] + 1) // 2, (y.shape[3] + 1) // 2
    p_max = imgs * rows * tw
    vbuf = np.empty(16 * p_max * c, dtype=x.dtype)
    mbuf = np.empty(16 * p_max * k, dtype=x.dtype)
    band = np.empty((2 * rows + 2, 2 * tw + 2, c), dtype=x.dtype)
    stage = np.empty((2, 2 * tw, k), dtype=x.dtype)
    for task in range(task0, task1):
        n0, nb, i0, i1 = _task(task, n_img, th, imgs, rows)
        per = (i1 - i0) * tw
        p = nb * per
        v = vbuf[: 16 * p * c].reshape(16, p, c)
        m = mbuf[: 16 * p * k].reshape(16, p, k)
        for n in range(nb):
            _input_tiles(x, n0 + n, i0, i1, tw, pt, pl, v, n * per, band)
        for xi in range(16):
            np.dot(v[xi], ut[xi], m[xi])
        for n in range(nb):
            _output_tiles(m, y, n0 + n, i0, i1, tw, n * per, stage)


@njit(cache=True)
def _grad_tiles(gy, n, i0, i1, tw, g, q0, band):
    """g[ξ, q0 + q, :] = (A t Aᵀ)[ξ] over the output channels, for the 2×2 tiles t of gy[n] in tile rows [i0, i1)
    (zero past gy's edge), q as in _input_tiles. band: scratch (rows, cols, K) for gy's rows, channels last."""
    k_out, ho, wo = gy.shape[1], gy.shape[2], gy.shape[3]
    nr = 2 * (i1 - i0)
    band[:nr] = 0
    for r in range(nr):
        src = 2 * i0 + r
        if src < ho:
            for col in range(wo):
                dst = band[r, col]
                for k in range(k_out):
                    dst[k] = gy[n, k, src, col]
    for i in range(i1 - i0):
        for j in range(tw):
            t00, t01 = band[2 * i, 2 * j], band[2 * i, 2 * j + 1]
            t10, t11 = band[2 * i + 1, 2 * j], band[2 * i + 1, 2 * j + 1]
            q = q0 + i * tw + j
            for a in range(4):  # row a of A t (A = Aᵀ's transpose: rows t0, t0 + t1, t0 − t1, −t1), then · Aᵀ
                g0, g1, g2, g3 = g[4 * a, q], g[4 * a + 1, q], g[4 * a + 2, q], g[4 * a + 3, q]
                for k in range(k_out):
                    if a == 0:
                        u, w = t00[k], t01[k]
                    elif a == 1:
                        u, w = t00[k] + t10[k], t01[k] + t11[k]
                    elif a == 2:
                        u, w = t00[k] - t10[k], t01[k] - t11[k]
                    else:
                        u, w = -t10[k], -t11[k]
                    g0[k], g1[k], g2[k], g3[k] = u, u + w, u - w, -w


@njit(cache=True)
def _weight_tasks(x, gy, acc, pt, pl, imgs, rows, task0, task1):
    """acc (16, K, C) += Σ over tasks [task0, task1) of T[ξ]ᵀ · V[ξ]: the transformed gy tiles against the
    transformed x windows under them."""
    n_img, c = x.shape[0], x.shape[1]
    k = gy.shape[1]
    th, tw = (gy.shape[2] + 1) // 2, (gy.shape[3] + 1) // 2
    p_max = imgs * rows * tw
    vbuf = np.empty(16 * p_max * c, dtype=x.dtype)
    gbuf = np.empty(16 * p_max * k, dtype=x.dtype)
    band = np.empty((2 * rows + 2, 2 * tw + 2, c), dtype=x.dtype)
    gband = np.empty((2 * rows, 2 * tw, k), dtype=x.dtype)
    prod = np.empty((k, c), dtype=x.dtype)
    for task in range(task0, task1):
        n0, nb, i0, i1 = _task(task, n_img, th, imgs, rows)
        per = (i1 - i0) * tw
        p = nb * per
        v = vbuf[: 16 * p * c].reshape(16, p, c)
        g = gbuf[: 16 * p * k].reshape(16, p, k)
        for n in range(nb):
            _input_tiles(x, n0 + n, i0, i1, tw, pt, pl, v, n * per, band)
            _grad_tiles(gy, n0 + n, i0, i1, tw, g, n * per, gband)
        for xi in range(16):
            np.dot(g[xi].T, v[xi], prod)
            acc[xi] += prod


@njit(parallel=True, cache=True)
def _run_weight(x, gy, acc, pt, pl, imgs, rows, threads):
    """acc (threads, 16, K, C): one partial sum per thread (added in thread order by the caller: same bits each
    call)."""
    tasks = _n_tasks(x.shape[0], (gy.shape[2] + 1) // 2, imgs, rows)
    for t in prange(threads):
        _weight_tasks(x, gy, acc[t], pt, pl, imgs, rows, t * tasks // threads, (t + 1) * tasks // threads)


@njit(parallel=True, cache=True)
def _run(x, ut, y, pt, pl, imgs, rows, threads):
    tasks = _n_tasks(x.shape[0], (y.shape[2] + 1) // 2, imgs, rows)
    threads = max(1, min(threads, tasks))
    for t in prange(threads):
        _tasks(x, ut, y, pt, pl, imgs, rows, t * tasks // threads, (t + 1) * tasks // threads)


def conv3x3(x, ut, pt, pl, ho, wo, threads):
    """y (N, K, Ho, Wo)[n, k, i, j] = Σ_{c, a, b} w[k, c, a, b] · x[n, c, i + a − pt, j + b − pl] (x zero outside,
    pt and pl any integers), from Uᵀ = filters(w); x C-contiguous."""
    n, c = x.shape[:2]
    y = np.empty((n, ut.shape[2], ho, wo), dtype=x.dtype)
    if y.size:
        th, tw = (ho + 1) // 2, (wo + 1) // 2
        _run(x, ut, y, pt, pl, *plan(c, ut.shape[2], n, th, tw, threads), threads)
    return y


def weight_grad(x, gy, pt, pl, threads):
    """dw (K, C, 3, 3)[k, c, a, b] = Σ_{n, i, j} gy[n, k, i, j] · x[n, c, i + a − pt, j + b − pl] (x zero outside):
    the weight gradient of conv3x3; x and gy C-contiguous."""
    n, c = x.shape[:2]
    k, ho, wo = gy.shape[1:]
    th, tw = (ho + 1) // 2, (wo + 1) // 2
    imgs, rows = plan(c, k, n, th, tw, threads)
    threads = max(1, min(threads, _n_tasks(n, th, imgs, rows)))
    acc = np.zeros((threads, 16, k, c), dtype=x.dtype)
    if x.size and gy.size:
        _run_weight(x, gy, acc, pt, pl, imgs, rows, threads)
    m = acc[0]
    for t in range(1, threads):
        m += acc[t]
    return np.einsum("ai,abkc,bj->kcij", G, m.reshape(4, 4, k, c), G).astype(x.dtype)  # Gᵀ M G per filter pair
