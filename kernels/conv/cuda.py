"""2-D convolution as numba.cuda kernels (the GPU form of kernels.conv): implicit GEMM with shared-memory tiles.

Each of the three products of reference.py is a matrix product whose operands are never stored: a block computes
a TILE × TILE tile of the result, and walks the contracted dimension TILE at a time, each step staging one tile of
each operand in shared memory — gathered straight from x, w or gy by index arithmetic (an "implicit" im2col) —
then every thread accumulates its dot product from the shared tiles (Kirk & Hwu, "Programming Massively Parallel
Processors", ch. 4 tiled matrix multiplication; cuDNN's implicit GEMM, Chetlur et al. 2014):

    forward (1):          y[n, k, oh, ow]  rows k,           columns (n, oh, ow),  contracted over (c, i, j)
    input gradient (3):   dx[n, c, h, w]   rows c,           columns (n, h, w),    contracted over (k, i, j)
    weight gradient (4):  dw[k, c, i, j]   rows k,           columns (c, i, j),    contracted over (n, oh, ow)

The input gradient is written as a gather — each dx pixel sums the (k, i, j) taps whose output oh = (h + p − i·d)/s
is a whole number inside gy — so no two threads write the same pixel and no atomics are needed. The weight
gradient's contraction runs over every image and position, so it is split into `splits` chunks of the batch
(grid z) whose partial sums meet in dw through atomic adds.

Threads: (TILE, TILE) per block; threadIdx.x runs along the result's columns, so neighbouring threads read
neighbouring pixels (coalesced). Accumulation is in the arrays' dtype. Group g is blockIdx.z (weight gradient:
blockIdx.z // splits). Runs on CuPy arrays on a GPU, and on NumPy arrays under the Numba CUDA simulator
(NUMBA_ENABLE_CUDASIM=1), where TILE is 4: the simulator runs one Python thread per CUDA thread.
"""

from __future__ import annotations

import os

import numpy as np
from numba import cuda, types

TILE = 4 if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1" else 16


def _make_kernels(dtype):
    """The three kernels for one dtype (a shared array's dtype is fixed when the kernel is compiled)."""
    nbtype = types.float32 if dtype == np.float32 else types.float64

    @cuda.jit
    def forward_kernel(x, w, y, sh, sw, pt, pl, dh, dw, groups):
        """y[n, g·Kg + m, oh, ow] = Σ_r W_g[m, r] · cols[r, (n, oh, ow)], r = (c, i, j); one result per thread."""
        a = cuda.shared.array((TILE, TILE), nbtype)  # W_g[m, r0 : r0 + TILE]
        b = cuda.shared.array((TILE, TILE), nbtype)  # cols[r0 : r0 + TILE, q]
        tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
        n_img, c_in, h_in, w_in = x.shape
        k_out, cg, kh, kw = w.shape
        ho, wo = y.shape[2], y.shape[3]
        kg = k_out // groups
        g = cuda.blockIdx.z
        r_total = cg * kh * kw
        m = cuda.blockIdx.y * TILE + ty  # this thread's output channel (row)
        m_a = m  # the row of W this thread stages in a
        q = cuda.blockIdx.x * TILE + tx  # this thread's output position (column) = (n, oh, ow)
        q_ok = q < n_img * ho * wo
        n = q // (ho * wo)
        oh = (q // wo) % ho
        ow = q % wo
        acc = nbtype(0)
        for r0 in range(0, r_total, TILE):
            r = r0 + tx
            v = nbtype(0)
            if m_a < kg and r < r_total:
                v = w[g * kg + m_a, r // (kh * kw), (r // kw) % kh, r % kw]
            a[ty, tx] = v
            r = r0 + ty  # b[ty, tx] = cols[r0 + ty, q]: the input pixel that tap r reads for position q
            v = nbtype(0)
            if q_ok and r < r_total:
                h = oh * sh - pt + ((r // kw) % kh) * dh
                col = ow * sw - pl + (r % kw) * dw
                if 0 <= h < h_in and 0 <= col < w_in:
                    v = x[n, g * cg + r // (kh * kw), h, col]
            b[ty, tx] = v
            cuda.syncthreads()
            for t in range(TILE):
                acc += a[ty, t] * b[t, tx]
            cuda.syncthreads()
        if m < kg and q_ok:
            y[n, g * kg + m, oh, ow] = acc

    @cuda.jit
    def backward_input_kernel(gy, w, dx, sh, sw, pt, pl, dh, dw, groups):
        """dx[n, g·Cg + m, h, col] = Σ_r W_gᵀ[m, r] · B[r, (n, h, col)], r = (k, i, j), B gathered from gy."""
        a = cuda.shared.array((TILE, TILE), nbtype)
        b = cuda.shared.array((TILE, TILE), nbtype)
        tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
        n_img, c_in, h_in, w_in = dx.shape
        k_out, cg, kh, kw = w.shape
        ho, wo = gy.shape[2], gy.shape[3]
        kg = k_out // groups
        g = cuda.blockIdx.z
        r_total = kg * kh * kw
        m = cuda.blockIdx.y * TILE + ty  # this thread's input channel within the group
        q = cuda.blockIdx.x * TILE + tx  # this thread's input pixel (n, h, col)
        q_ok = q < n_img * h_in * w_in
        n = q // (h_in * w_in)
        h = (q // w_in) % h_in
        col = q % w_in
        acc = nbtype(0)
        for r0 in range(0, r_total, TILE):
            r = r0 + tx
            v = nbtype(0)
            if m < cg and r < r_total:
                v = w[g * kg + r // (kh * kw), m, (r // kw) % kh, r % kw]
            a[ty, tx] = v
            r = r0 + ty  # b[ty, tx] = gy at the output that tap r = (k, i, j) reads pixel (h, col) from, if any
            v = nbtype(0)
            if q_ok and r < r_total:
                th = h + pt - ((r // kw) % kh) * dh  # = oh·sh when tap i of output row oh reads row h
                tw = col + pl - (r % kw) * dw
                if th >= 0 and tw >= 0 and th % sh == 0 and tw % sw == 0 and th // sh < ho and tw // sw < wo:
                    v = gy[n, g * kg + r // (kh * kw), th // sh, tw // sw]
            b[ty, tx] = v
            cuda.syncthreads()
            for t in range(TILE):
                acc += a[ty, t] * b[t, tx]
            cuda.syncthreads()
        if m < cg and q_ok:
            dx[n, g * cg + m, h, col] = acc

    @cuda.jit
    def backward_weight_kernel(x, gy, dwt, sh, sw, pt, pl, dh, dw, groups, splits):
        """dwt[g·Kg + m, c, i, j] += Σ_q gy[(n, oh, ow), m] · cols[q, (c, i, j)] over this block's chunk of q."""
        a = cuda.shared.array((TILE, TILE), nbtype)  # gy rows m, positions q0 : q0 + TILE
        b = cuda.shared.array((TILE, TILE), nbtype)  # cols positions q0 : q0 + TILE, taps r
        tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
        n_img, c_in, h_in, w_in = x.shape
        k_out, cg, kh, kw = dwt.shape
        ho, wo = gy.shape[2], gy.shape[3]
        kg = k_out // groups
        g = cuda.blockIdx.z // splits
        s = cuda.blockIdx.z % splits
        r_total = cg * kh * kw
        q_total = n_img * ho * wo
        chunk = ((q_total + splits - 1) // splits + TILE - 1) // TILE * TILE
        m = cuda.blockIdx.y * TILE + ty  # this thread's output channel (row of dw)
        r = cuda.blockIdx.x * TILE + tx  # this thread's tap (c, i, j) (column of dw)
        acc = nbtype(0)
        for q0 in range(s * chunk, min(q_total, (s + 1) * chunk), TILE):
            q = q0 + tx  # a[ty, tx] = gy[q, m]
            v = nbtype(0)
            if m < kg and q < q_total:
                v = gy[q // (ho * wo), g * kg + m, (q // wo) % ho, q % wo]
            a[ty, tx] = v
            q = q0 + ty  # b[ty, tx] = cols[q, r]
            v = nbtype(0)
            if q < q_total and r < r_total:
                hh = ((q // wo) % ho) * sh - pt + ((r // kw) % kh) * dh
                cc = (q % wo) * sw - pl + (r % kw) * dw
                if 0 <= hh < h_in and 0 <= cc < w_in:
                    v = x[q // (ho * wo), g * cg + r // (kh * kw), hh, cc]
            b[ty, tx] = v
            cuda.syncthreads()
            for t in range(TILE):
                acc += a[ty, t] * b[t, tx]
            cuda.syncthreads()
        if m < kg and r < r_total:
            cuda.atomic.add(dwt, (g * kg + m, r // (kh * kw), (r // kw) % kh, r % kw), acc)

    return {"forward": forward_kernel, "backward_input": backward_input_kernel,
            "backward_weight": backward_weight_kernel}


KERNELS = {np.dtype(d): _make_kernels(d) for d in (np.float32, np.float64)}


def signatures(dtype):
    """Each kernel's argument types for one dtype (C-contiguous 4-D arrays, int64 scalars): for compile_ptx."""
    arr = types.Array(types.float32 if dtype == np.float32 else types.float64, 4, "C")
    i = types.int64
    return {"forward": (arr, arr, arr) + (i,) * 7, "backward_input": (arr, arr, arr) + (i,) * 7,
            "backward_weight": (arr, arr, arr) + (i,) * 8}


# --- the public signature (CuPy arrays on a GPU, NumPy arrays under the simulator) ----------------------------


def _xp(a):
    if type(a).__module__.startswith("cupy"):
        import cupy

        return cupy
    return np


def _prepare(*arrays):
    dtype = arrays[0].dtype
    if dtype not in (np.float32, np.float64) or any(a.dtype != dtype for a in arrays):
        raise TypeError(f"conv kernels take float32 or float64 arrays of one dtype, got {[a.dtype for a in arrays]}")
    xp = _xp(arrays[0])
    return xp, KERNELS[np.dtype(dtype)], [xp.ascontiguousarray(a) for a in arrays]


def _geometry(stride, padding, dilation):
    from .reference import pair_padding

    (pt, _), (pl, _) = pair_padding(padding)
    return (int(stride[0]), int(stride[1]), pt, pl, int(dilation[0]), int(dilation[1]))


def _blocks(columns, rows, z):
    return (-(-columns // TILE), -(-rows // TILE), z)


def conv2d_forward(x, w, *, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1, bias=None):
    """y = conv2d(x, w) (+ bias): x (N, C, H, W), w (K, C/groups, kh, kw) -> (N, K, Ho, Wo), as reference."""
    from .reference import out_size, pair_padding

    xp, kern, (x, w) = _prepare(x, w)
    pads = pair_padding(padding)
    k, cg, kh, kw = w.shape
    ho, wo = (out_size(x.shape[2 + a], (kh, kw)[a], stride[a], pads[a], dilation[a]) for a in (0, 1))
    y = xp.empty((x.shape[0], k, ho, wo), dtype=x.dtype)
    if y.size:
        grid = _blocks(x.shape[0] * ho * wo, k // groups, groups)
        kern["forward"][grid, (TILE, TILE)](x, w, y, *_geometry(stride, padding, dilation), groups)
    if bias is not None:
        y += bias.reshape(1, k, 1, 1)
    return y


def conv2d_backward_input(gy, w, x_shape, *, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1):
    """dL/dx of conv2d (also conv_transpose2d's forward): gy (N, K, Ho, Wo) -> an array of x_shape, as reference."""
    xp, kern, (gy, w) = _prepare(gy, w)
    n, c, h, wd = x_shape
    dx = xp.zeros(x_shape, dtype=gy.dtype)
    if dx.size and gy.size:
        grid = _blocks(n * h * wd, c // groups, groups)
        kern["backward_input"][grid, (TILE, TILE)](gy, w, dx, *_geometry(stride, padding, dilation), groups)
    return dx


def conv2d_backward_weight(x, gy, w_shape, *, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1):
    """dL/dw of conv2d, summed over the images and gy's positions: an array of w_shape, as reference."""
    xp, kern, (x, gy) = _prepare(x, gy)
    k, cg, kh, kw = w_shape
    dw = xp.zeros(w_shape, dtype=x.dtype)
    if x.size and gy.size:
        tiles = _blocks(cg * kh * kw, k // groups, 1)
        # enough blocks to fill a GPU (~ a few thousand), each contracting at least a few tiles of positions
        q_tiles = -(-gy.shape[0] * gy.shape[2] * gy.shape[3] // TILE)
        splits = max(1, min(q_tiles // 4, 4096 // (tiles[0] * tiles[1] * groups)))
        grid = (tiles[0], tiles[1], groups * splits)
        kern["backward_weight"][grid, (TILE, TILE)](x, gy, dw, *_geometry(stride, padding, dilation), groups, splits)
    return dw
