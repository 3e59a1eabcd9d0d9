"""2-D convolution as numba.cuda kernels (the GPU form of kernels.conv): implicit GEMM, register-blocked.

Each of the three products of reference.py is a matrix product whose operands are never stored: a block computes
a BM × BN tile of the result, and walks the contracted dimension BK at a time, each step staging a BM × BK slice
of the left operand and a BK × BN slice of the right one in shared memory — gathered straight from x, w or gy by
index arithmetic (an "implicit" im2col; Chetlur et al. 2014, cuDNN) — then every thread accumulates its share of
the tile from the shared slices (Kirk & Hwu, "Programming Massively Parallel Processors", ch. 4):

    forward (1):          y[n, k, oh, ow]  rows k,           columns (n, oh, ow),  contracted over (c, i, j)
    input gradient (3):   dx[n, c, h, w]   rows c,           columns (n, h, w),    contracted over (k, i, j)
    weight gradient (4):  dw[k, c, i, j]   rows k,           columns (c, i, j),    contracted over (n, oh, ow)

Register blocking (Volkov & Demmel, "Benchmarking GPUs to tune dense linear algebra", SC 2008; the "2-D block
tiling" step of S. Boehm, "How to optimize a CUDA matmul kernel for cuBLAS-like performance", 2022): a thread owns
not one result but a TM × TN micro-tile — rows ty + T·i, columns tx + T·j of the block's tile, T × T threads —
held in a local array of constant size that the compiler keeps in registers (its loops have constant trip
counts and are unrolled). Each step of the contraction loads TM + TN values from shared memory into registers
and does TM·TN multiply-adds with them, instead of 2 loads per multiply-add with one result per thread: shared
memory stops being the bottleneck. The strided micro-tile (stride T, not TM consecutive columns) keeps a warp's
shared reads on consecutive words — no bank conflicts — and its stores of y and dx on consecutive pixels.

Staging: each of the T·T threads loads BM·BK / (T·T) elements of each slice (the weight gradient's slices are
BK_W = BK / 2 deep: fewer registers, so two blocks fit on a multiprocessor), neighbouring threads on neighbouring
addresses of the operand's contiguous index (coalesced): the result's column index (n, oh, ow) for the gathered
operands of the forward and input-gradient products, the contracted index for the others. A thread stages the same
columns at every step, so their (n, oh, ow) — or (c, i, j) — is decoded once, before the loop. The input gradient
is written as a gather — each dx pixel sums the (k, i, j) taps whose output oh = (h + p − i·d)/s is a whole number
inside gy — so no two threads write the same pixel and no atomics are needed. The weight gradient's contraction
runs over every image and position, so it is split into `splits` chunks of the batch (grid z) whose partial sums
meet in dw through atomic adds.

Accumulation is in the arrays' dtype. Group g is blockIdx.z (weight gradient: blockIdx.z // splits). Runs on CuPy
arrays on a GPU, and on NumPy arrays under the Numba CUDA simulator (NUMBA_ENABLE_CUDASIM=1), where the tiles are
tiny (TILE = 4, 2 × 2 threads): the simulator runs one Python thread per CUDA thread.
"""

from __future__ import annotations

import os

import numpy as np
from numba import cuda, types

from kernels.dispatch import array_module, launch

_SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"
T = 2 if _SIM else 16  # threads per block side: T × T threads
TM = TN = 2 if _SIM else 4  # results per thread: a TM × TN micro-tile
BM, BN = T * TM, T * TN  # the block's tile of the result
TILE = BM  # the block's tile side (4 under the simulator)
BK = 4 if _SIM else 16  # contracted depth of one shared-memory stage
SPAN = T * T // BK  # threads that stage one contracted index of a slice
A_LOADS, B_LOADS = BM // SPAN, BN // SPAN  # elements of each slice that one thread stages
# shared slices a[m, t] (+1 column: the 2 rows a warp reads lie in distinct banks, float64 too) and b[t, q]
# (+SPAN columns: so do the 2 rows a warp stores)
A_SHAPE, B_SHAPE = (BM, BK + 1), (BK, BN + SPAN)
# The weight gradient stages half as deep: 2 elements of each slice per thread instead of 4 leave it at 120
# registers, so 2 blocks fit on a multiprocessor (168 at depth 16; on an H200 depth 8 ran 10-35% faster).
BK_W = 4 if _SIM else 8
SPAN_W = T * T // BK_W
A_LOADS_W, B_LOADS_W = BM // SPAN_W, BN // SPAN_W
# its b[t, r] is stored down columns, BK_W per column: 32 / BK_W columns of padding spread a warp's stores over
# distinct banks
A_SHAPE_W, B_SHAPE_W = (BM, BK_W + 1), (BK_W, BN + 32 // BK_W)
assert all(T * T % d == 0 and BM % (T * T // d) == 0 and BN % (T * T // d) == 0 for d in (BK, BK_W))
MIN_CHUNK = 2 if _SIM else 32  # fewest slices of positions that one weight-gradient block contracts


@cuda.jit(device=True, inline=True)
def _unflatten(i, total, rows, cols, row_step, col_step, pt, pl):
    """Flat index i over (·, rows, cols) as (its leading index, or −1 at or past total; its row·row_step − pt; its
    column·col_step − pl): an output position's image and the top-left of its receptive field, or a weight
    column's input channel and the offsets of its tap."""
    lead = i // (rows * cols) if i < total else -1
    return lead, (i // cols) % rows * row_step - pt, i % cols * col_step - pl


def _make_kernels(dtype):
    """The three kernels for one dtype (a shared or local array's dtype is fixed when the kernel is compiled)."""
    nbtype = types.float32 if dtype == np.float32 else types.float64
    zero = nbtype(0)

    @cuda.jit(device=True, inline=True)
    def store_tile(out, acc, g, rows, m0, q0):
        """out[n, g·rows + m, y, x] = acc[i, j] for this thread's results: rows m = m0 + ty + T·i (< rows), columns
        q = q0 + tx + T·j, a column being the pixel (n, y, x) of out (the forward's y, the input gradient's dx)."""
        n_img, hh, ww = out.shape[0], out.shape[2], out.shape[3]
        for j in range(TN):
            q = q0 + cuda.threadIdx.x + T * j
            if q < n_img * hh * ww:
                n, yy, xx = q // (hh * ww), (q // ww) % hh, q % ww
                for i in range(TM):
                    m = m0 + cuda.threadIdx.y + T * i
                    if m < rows:
                        out[n, g * rows + m, yy, xx] = acc[i, j]

    @cuda.jit(device=True, inline=True)
    def multiply_slices(a, b, acc, depth):
        """acc[i, j] += Σ_{t < depth} a[ty + T·i, t] · b[t, tx + T·j]: this thread's micro-tile of the product."""
        tx, ty = cuda.threadIdx.x, cuda.threadIdx.y
        ar = cuda.local.array(TM, nbtype)
        br = cuda.local.array(TN, nbtype)
        t = 0
        while t < depth:  # (a while loop: LLVM sees t ≥ 0 and drops the negative-index checks)
            for i in range(TM):
                ar[i] = a[ty + T * i, t]  # a warp reads 2 words (broadcast)
            for j in range(TN):
                br[j] = b[t, tx + T * j]  # ... and T consecutive words: no bank conflicts
            for i in range(TM):
                for j in range(TN):
                    acc[i, j] += ar[i] * br[j]
            t += 1

    @cuda.jit
    def forward_kernel(x, w, y, kh, kw, sh, sw, pt, pl, dh, dw, groups):
        """y[n, g·Kg + m, oh, ow] = Σ_r W_g[m, r] · cols[r, (n, oh, ow)], r = (c, i, j); w is (K, Cg·kh·kw)."""
        a = cuda.shared.array(A_SHAPE, nbtype)  # W_g[m0 + m, r0 + t]; +1: a warp's 2 rows in distinct banks
        b = cuda.shared.array(B_SHAPE, nbtype)  # cols[r0 + t, q0 + q]; +SPAN: likewise for the stores
        acc = cuda.local.array((TM, TN), nbtype)
        img = cuda.local.array(B_LOADS, types.int64)  # for each column this thread stages: its image (-1: none),
        top = cuda.local.array(B_LOADS, types.int64)  # the top row
        left = cuda.local.array(B_LOADS, types.int64)  # and the left column of its receptive field
        tid = cuda.threadIdx.y * T + cuda.threadIdx.x
        n_img, c_in, h_in, w_in = x.shape
        ho, wo = y.shape[2], y.shape[3]
        kg, r_total, cg = w.shape[0] // groups, w.shape[1], c_in // groups
        g = cuda.blockIdx.z
        m0, q0 = cuda.blockIdx.y * BM, cuda.blockIdx.x * BN
        q_total = n_img * ho * wo
        for e in range(B_LOADS):  # this thread stages b[tid // SPAN, tid % SPAN + SPAN·e]
            img[e], top[e], left[e] = _unflatten(q0 + tid % SPAN + SPAN * e, q_total, ho, wo, sh, sw, pt, pl)
        for i in range(TM):
            for j in range(TN):
                acc[i, j] = zero
        for r0 in range(0, r_total, BK):
            r = r0 + tid % BK  # a[tid // BK + SPAN·e, tid % BK] = W_g[m, r]
            for e in range(A_LOADS):
                m = m0 + tid // BK + SPAN * e
                v = zero
                if m < kg and r < r_total:
                    v = w[g * kg + m, r]
                a[tid // BK + SPAN * e, tid % BK] = v
            r = r0 + tid // SPAN  # b[tid // SPAN, q] = cols[r, q]: the input pixel that tap r = (c, i, j) reads for q
            c, i, j = r // (kh * kw), (r // kw) % kh, r % kw
            for e in range(B_LOADS):
                h, col = top[e] + i * dh, left[e] + j * dw
                v = zero
                if img[e] >= 0 and r < r_total and 0 <= h < h_in and 0 <= col < w_in:
                    v = x[img[e], g * cg + c, h, col]
                b[tid // SPAN, tid % SPAN + SPAN * e] = v
            cuda.syncthreads()
            multiply_slices(a, b, acc, BK)
            cuda.syncthreads()
        store_tile(y, acc, g, kg, m0, q0)

    @cuda.jit
    def backward_input_kernel(gy, w, dx, kh, kw, sh, sw, pt, pl, dh, dw, groups):
        """dx[n, g·Cg + m, h, col] = Σ_r W_gᵀ[m, r] · B[r, (n, h, col)], r = (k, i, j), B gathered from gy;
        w is (K, Cg, kh·kw)."""
        a = cuda.shared.array(A_SHAPE, nbtype)  # W_gᵀ[m0 + m, r0 + t]
        b = cuda.shared.array(B_SHAPE, nbtype)  # B[r0 + t, q0 + q]
        acc = cuda.local.array((TM, TN), nbtype)
        img = cuda.local.array(B_LOADS, types.int64)  # for each column this thread stages: its image (-1: none),
        top = cuda.local.array(B_LOADS, types.int64)  # its row h + pt
        left = cuda.local.array(B_LOADS, types.int64)  # and its column + pl
        tid = cuda.threadIdx.y * T + cuda.threadIdx.x
        n_img, c_in, h_in, w_in = dx.shape
        ho, wo = gy.shape[2], gy.shape[3]
        kg, cg = w.shape[0] // groups, w.shape[1]
        r_total = kg * kh * kw
        g = cuda.blockIdx.z
        m0, q0 = cuda.blockIdx.y * BM, cuda.blockIdx.x * BN
        q_total = n_img * h_in * w_in
        for e in range(B_LOADS):
            q = q0 + tid % SPAN + SPAN * e
            img[e] = q // (h_in * w_in) if q < q_total else -1
            top[e] = (q // w_in) % h_in + pt
            left[e] = q % w_in + pl
        for i in range(TM):
            for j in range(TN):
                acc[i, j] = zero
        for r0 in range(0, r_total, BK):
            r = r0 + tid % BK  # a[m, t] = W_gᵀ[m, r] = w[g·Kg + k, m, (i, j)]
            k = r // (kh * kw)
            for e in range(A_LOADS):
                m = m0 + tid // BK + SPAN * e
                v = zero
                if m < cg and r < r_total:
                    v = w[g * kg + k, m, r - k * kh * kw]
                a[tid // BK + SPAN * e, tid % BK] = v
            r = r0 + tid // SPAN  # b[t, q] = gy at the output that tap r = (k, i, j) reads pixel q from, if any
            k, i, j = r // (kh * kw), (r // kw) % kh, r % kw
            for e in range(B_LOADS):
                th, tw = top[e] - i * dh, left[e] - j * dw  # = oh·sh, ow·sw if tap (i, j) of (oh, ow) reads q
                oh = th if sh == 1 else th // sh  # (stride 1 skips an integer division)
                ow = tw if sw == 1 else tw // sw
                v = zero
                if (img[e] >= 0 and r < r_total and th >= 0 and tw >= 0 and oh * sh == th and ow * sw == tw
                        and oh < ho and ow < wo):
                    v = gy[img[e], g * kg + k, oh, ow]
                b[tid // SPAN, tid % SPAN + SPAN * e] = v
            cuda.syncthreads()
            multiply_slices(a, b, acc, BK)
            cuda.syncthreads()
        store_tile(dx, acc, g, cg, m0, q0)

    @cuda.jit
    def backward_weight_kernel(x, gy, dwt, kh, kw, sh, sw, pt, pl, dh, dw, groups, splits):
        """dwt[g·Kg + m, r] += Σ_q gy[q, m] · cols[q, r], r = (c, i, j), q = (n, oh, ow) over this block's chunk;
        dwt is (K, Cg·kh·kw)."""
        a = cuda.shared.array(A_SHAPE_W, nbtype)  # gy[q0 + t, m0 + m], stored as rows m
        b = cuda.shared.array(B_SHAPE_W, nbtype)  # cols[q0 + t, r0 + r]
        acc = cuda.local.array((TM, TN), nbtype)
        chan = cuda.local.array(B_LOADS_W, types.int64)  # for each column this thread stages: its channel c
        top = cuda.local.array(B_LOADS_W, types.int64)  # (-1: none), its row offset i·dh − pt
        left = cuda.local.array(B_LOADS_W, types.int64)  # and column offset j·dw − pl
        tid = cuda.threadIdx.y * T + cuda.threadIdx.x
        n_img, c_in, h_in, w_in = x.shape
        ho, wo = gy.shape[2], gy.shape[3]
        kg, r_total, cg = dwt.shape[0] // groups, dwt.shape[1], c_in // groups
        g, s = cuda.blockIdx.z // splits, cuda.blockIdx.z % splits
        m0, r0 = cuda.blockIdx.y * BM, cuda.blockIdx.x * BN
        q_total = n_img * ho * wo
        chunk = ((q_total + splits - 1) // splits + BK_W - 1) // BK_W * BK_W
        for e in range(B_LOADS_W):  # this thread stages b[tid % BK_W, tid // BK_W + SPAN_W·e]
            chan[e], top[e], left[e] = _unflatten(r0 + tid // BK_W + SPAN_W * e, r_total, kh, kw, dh, dw, pt, pl)
        for i in range(TM):
            for j in range(TN):
                acc[i, j] = zero
        for q0 in range(s * chunk, min(q_total, (s + 1) * chunk), BK_W):
            q = q0 + tid % BK_W  # this thread stages position q = (n, oh, ow) of both slices
            n, oh, ow = q // (ho * wo), (q // wo) % ho, q % wo
            for e in range(A_LOADS_W):
                m = m0 + tid // BK_W + SPAN_W * e
                v = zero
                if q < q_total and m < kg:
                    v = gy[n, g * kg + m, oh, ow]
                a[tid // BK_W + SPAN_W * e, tid % BK_W] = v
            for e in range(B_LOADS_W):
                h, col = oh * sh + top[e], ow * sw + left[e]
                v = zero
                if q < q_total and chan[e] >= 0 and 0 <= h < h_in and 0 <= col < w_in:
                    v = x[n, g * cg + chan[e], h, col]
                b[tid % BK_W, tid // BK_W + SPAN_W * e] = v
            cuda.syncthreads()
            multiply_slices(a, b, acc, BK_W)
            cuda.syncthreads()
        for i in range(TM):
            m = m0 + cuda.threadIdx.y + T * i
            for j in range(TN):
                r = r0 + cuda.threadIdx.x + T * j
                if m < kg and r < r_total:
                    cuda.atomic.add(dwt, (g * kg + m, r), acc[i, j])

    return {"forward": forward_kernel, "backward_input": backward_input_kernel,
            "backward_weight": backward_weight_kernel}


KERNELS = {np.dtype(d): _make_kernels(d) for d in (np.float32, np.float64)}


def signatures(dtype):
    """Each kernel's argument types for one dtype (C-contiguous arrays, int64 scalars): for compile_ptx."""
    nb = types.float32 if dtype == np.float32 else types.float64
    a2, a3, a4 = (types.Array(nb, d, "C") for d in (2, 3, 4))
    i = types.int64
    return {"forward": (a4, a2, a4) + (i,) * 9, "backward_input": (a4, a3, a4) + (i,) * 9,
            "backward_weight": (a4, a4, a2) + (i,) * 10}


# --- the public signature (CuPy arrays on a GPU, NumPy arrays under the simulator) ----------------------------
# CuPy arrays are launched through kernels.dispatch.launch (a few µs of host time where Numba's launch takes 100s).



def _prepare(*arrays):
    dtype = arrays[0].dtype
    if dtype not in (np.float32, np.float64) or any(a.dtype != dtype for a in arrays):
        raise TypeError(f"conv kernels take float32 or float64 arrays of one dtype, got {[a.dtype for a in arrays]}")
    xp = array_module(arrays[0])
    return xp, KERNELS[np.dtype(dtype)], [xp.ascontiguousarray(a) for a in arrays]


def _geometry(stride, padding, dilation):
    from .reference import pair_padding

    (pt, _), (pl, _) = pair_padding(padding)
    return (int(stride[0]), int(stride[1]), pt, pl, int(dilation[0]), int(dilation[1]))


def _blocks(columns, rows, z):
    return (-(-columns // BN), -(-rows // BM), z)


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
        launch(kern["forward"], grid, (T, T), x, w.reshape(k, -1), y, kh, kw, *_geometry(stride, padding, dilation),
               groups)
    if bias is not None:
        y += bias.reshape(1, k, 1, 1)
    return y


def conv2d_backward_input(gy, w, x_shape, *, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1):
    """dL/dx of conv2d (also conv_transpose2d's forward): gy (N, K, Ho, Wo) -> an array of x_shape, as reference."""
    xp, kern, (gy, w) = _prepare(gy, w)
    n, c, h, wd = x_shape
    k, cg, kh, kw = w.shape
    dx = xp.zeros(x_shape, dtype=gy.dtype)
    if dx.size and gy.size:
        grid = _blocks(n * h * wd, cg, groups)
        launch(kern["backward_input"], grid, (T, T), gy, w.reshape(k, cg, kh * kw), dx, kh, kw,
               *_geometry(stride, padding, dilation), groups)
    return dx


def conv2d_backward_weight(x, gy, w_shape, *, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1):
    """dL/dw of conv2d, summed over the images and gy's positions: an array of w_shape, as reference."""
    xp, kern, (x, gy) = _prepare(x, gy)
    k, cg, kh, kw = w_shape
    dw = xp.zeros(w_shape, dtype=x.dtype)
    if x.size and gy.size:
        tiles = _blocks(cg * kh * kw, k // groups, 1)
        # enough blocks to fill a GPU (a few hundred of T·T threads), each contracting MIN_CHUNK slices or more
        q_slices = -(-gy.shape[0] * gy.shape[2] * gy.shape[3] // BK_W)
        splits = max(1, min(q_slices // MIN_CHUNK, 512 // (tiles[0] * tiles[1] * groups)))
        grid = (tiles[0], tiles[1], groups * splits)
        launch(kern["backward_weight"], grid, (T, T), x, gy, dw.reshape(k, cg * kh * kw), kh, kw,
               *_geometry(stride, padding, dilation), groups, splits)
    return dw
