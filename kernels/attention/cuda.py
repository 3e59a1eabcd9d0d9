"""Tiled attention as numba.cuda kernels: shared-memory tiles, FlashAttention's online softmax, patterns in-kernel.

The same algorithm as ``cpu.py``, in the shape of a GPU kernel (plain features only: shared memory,
``syncthreads`` and, in the fast path, warp shuffles):

- ``forward``: one block per (query tile, batch·head), one thread per query row. The block loads its queries
  into shared memory once, then for each key tile that the pattern does not rule out (a block-uniform test, so
  every thread reaches every barrier) loads K_j and V_j into shared memory; each thread computes its row of
  scores, updates its running max m and sum l and rescales its output row (Dao et al. 2022, algorithm 1).
- the backward (Dao 2023, algorithm 2) in three kernels, so that no two threads ever write the same output:
  ``backward_rowdot`` computes D = rowsum(dO ∘ O); ``backward_dq``, one thread per query row, walks the key
  tiles and accumulates dQ_i = Σ_j dS K_j · scale; ``backward_dkdv``, one thread per key row, walks the query
  tiles and accumulates dK_j = Σ_i dSᵀ Q_i · scale and dV_j = Σ_i Pᵀ dO_i. P and dS are recomputed in each
  (FlashAttention-2 uses atomic adds on dQ instead; two passes keep the result deterministic).

The general kernels exist for float32 and float64 (``KERNELS[dtype]``). Their memory layout: a tile's rows that
each thread walks alone (its query and output rows in the forward and dQ kernels, its key and value rows in
dK/dV) are stored with a padded stride D + 1, so that the 32 threads of a warp, reading element d of 32 different
rows, hit 32 different shared-memory banks (an unpadded stride of 64 puts them all in one bank: a 32-way
conflict). Tiles that every thread reads at the same index are broadcasts and stay unpadded. Tiles are loaded
cooperatively, neighbouring threads reading neighbouring values (coalesced). Gradient rows are accumulated over a
whole tile before one read-modify-write of global memory. The shared memory is dynamic: 32·(D + Dv + 2) +
32·(D + Dv [+ 2]) values, 33 KiB at D = Dv = 64 in float32.

The fast path (``fast_kernels(D)``, built per head dim D on first use, the sizes being compile-time constants):
float32 with D = Dv, D a multiple of 32 and at most 64 (``fast_dims_ok``) takes register-blocked kernels in the
shape of FlashAttention-2 (Dao 2023), because one thread per row, reading both operands of every multiply-add
from shared memory, is bound by shared-memory loads and leaves the GPU nearly empty (H200, B·H = 32, N = 1024,
D = 64, forward and backward: 0.4 TFLOP/s, 48× PyTorch's time). Register blocking as in a GEMM (Volkov & Demmel
2008): a block of 128 threads owns a 64 × 32 tile of the scores, thread (tx, ty) = (t mod 8, t // 8) a 4 × 4
micro-tile of it (rows 4·ty + i, columns 4·tx + j) and 4 rows × D/8 columns of each output, all in constant-size
local arrays that the compiler keeps in registers (every index a constant once the short loops are unrolled;
the tests check that the PTX has no local memory). A product over d reads, per step, the thread's 4 rows and 4
columns from transposed shared tiles — consecutive floats on 16-byte boundaries, one ``ld.shared.v4`` each —
for 16 multiply-adds; a product over the 32 columns reads 4 values of the (transposed) probability tile and
D/8 of the row-major value tile (groups of 4 consecutive columns, 32 apart: a warp reads consecutive words)
for 4·D/8. Every tile stays within the default 48 KiB of static shared memory. Tiles come from global memory
in batches of SB values per thread at offsets that are compile-time constants — no index division, no branch
(rows past the end are clamped reads whose results the masks discard), indices known non-negative (no
wraparound code) — so a batch's loads are in flight together (in the first version, ~45 instructions an
element and four loads at a time cost more than the products). The grid is (batch·head, row blocks) with the
longest row blocks first, and launch bounds ask ptxas for registers that let 4 forward (3 backward) blocks
share an SM. exp is exp2 of (x − m)·log2 e (one ``ex2.approx`` in place of libdevice's expf).

- ``forward_fast`` (algorithm 1): a block takes BM = 64 queries and walks tiles of BN = 32 keys (skipped as
  above). The 8 threads of a query row are neighbouring lanes of one warp, so the row max of the online softmax
  is three ``shfl_xor`` steps; each thread keeps its own part of the row sum l, and the parts meet once at the
  end. P goes through shared memory (Pᵀ) to the threads that own its rows' output columns.
- ``dq_fast`` and ``dkdv_fast`` (algorithm 2, split in two as above, with ``rowdot`` first): a block takes 64
  queries (64 keys) and walks tiles of 32 keys (32 queries); S and dP are recomputed 32 (16) head dims at a
  time (the whole Q and dO tiles beside the rest would not fit in 48 KiB), then P = exp(S − lse) and
  dS = P ∘ (dP − D) go through shared memory for dQ += dS K (dV += Pᵀ dO, dK += dSᵀ Q). The row-major K (Q and
  dO) these need are stored from the same loads as the slices. No atomics: every output is written by one
  thread, so the results do not depend on the order in which blocks run (deterministic).

Tiles that every pair of the pattern may see and no mask touches skip the pattern test. The Numba CUDA simulator
runs one Python thread per CUDA thread, so there the tiles shrink (8 threads, tiles of 16 × 8, 4 head dims at a
time) and the shuffles become shared-memory exchanges. Everything else — float64, other head dims — takes the
general kernels. The launch wrappers take NumPy arrays (under the simulator, ``NUMBA_ENABLE_CUDASIM=1``) or CuPy
arrays (on a GPU, launched through kernels.dispatch.launch).
"""

import math
import os

import numpy as np
from numba import cuda, float32, float64

from kernels.dispatch import launch

from . import patterns

BQ = 32  # queries per tile = threads per block of forward and backward_dq
BK = 32  # keys per tile = threads per block of backward_dkdv

_visible = cuda.jit(device=True)(patterns.visible)
_tile_may_attend = cuda.jit(device=True)(patterns.tile_may_attend)
_tile_all_visible = cuda.jit(device=True)(patterns.tile_all_visible)


@cuda.jit(device=True)
def _load_padded(dst, src, bh, row0, rows, tid, nthreads):
    """dst[r·(C + 1) + col] = src[bh, row0 + r, col] for `rows` rows of C = src.shape[2] values (the padded stride
    of the general kernels), by nthreads threads: neighbouring threads read neighbouring values (coalesced)."""
    C = src.shape[2]
    for idx in range(tid, rows * C, nthreads):
        dst[(idx // C) * (C + 1) + idx % C] = src[bh, row0 + idx // C, idx % C]


def _make_score(ftype):
    """The masked score device function for one floating type (shared by the general and the fast kernels)."""
    ninf = ftype(-math.inf)

    @cuda.jit(device=True)
    def _score(s, scale, mask, has_mask, b, h, qi, kj, kind, T, W, r, P, causal):
        """The masked score: s · scale, plus the dense mask, or −inf where the pattern (or causality) blocks."""
        if (causal and kj > qi) or not _visible(kind, T, W, r, P, qi, kj):
            return ninf
        x = s * scale
        if has_mask:  # each mask axis is full or of length 1 (broadcast)
            x += mask[
                min(b, mask.shape[0] - 1),
                min(h, mask.shape[1] - 1),
                min(qi, mask.shape[2] - 1),
                min(kj, mask.shape[3] - 1),
            ]
        return x

    return _score


_SCORE = {np.dtype(np.float32): _make_score(float32), np.dtype(np.float64): _make_score(float64)}
_SCORE32 = _SCORE[np.dtype(np.float32)]


def _build(ftype):
    """The four kernels for one floating type (the local and shared arrays need the type at compile time)."""
    ninf = ftype(-math.inf)
    _score = _SCORE[np.dtype(np.float32 if ftype == float32 else np.float64)]

    @cuda.jit
    def forward_kernel(q, k, v, mask, has_mask, H, kind, T, W, r, P, causal, scale, out, lse):
        L, D = q.shape[1], q.shape[2]
        S, Dv = k.shape[1], v.shape[2]
        a = cuda.threadIdx.x
        i0 = cuda.blockIdx.x * BQ
        bh = cuda.blockIdx.y
        b, h = bh // H, bh % H
        qi = i0 + a
        active = qi < L
        i1 = min(i0 + BQ, L)
        PD, PV = D + 1, Dv + 1  # padded row strides: thread a's row a·(D+1) + d hits bank (a + d) mod 32
        smem = cuda.shared.array(0, dtype=ftype)
        sQ = smem[: BQ * PD]  # the query tile
        sO = smem[BQ * PD : BQ * (PD + PV)]  # the unnormalized output rows
        sK = smem[BQ * (PD + PV) : BQ * (PD + PV) + BK * D]  # read by all threads at once: a broadcast, no padding
        sV = smem[BQ * (PD + PV) + BK * D : BQ * (PD + PV) + BK * (D + Dv)]
        p = cuda.local.array(BK, dtype=ftype)  # this row's scores, then probabilities, for one key tile
        _load_padded(sQ, q, bh, i0, i1 - i0, a, BQ)
        for d in range(Dv):
            sO[a * PV + d] = 0.0
        m = ninf
        lsum = ftype(0.0)
        for j0 in range(0, S, BK):
            j1 = min(j0 + BK, S)
            nk = j1 - j0
            if (causal and j0 > i1 - 1) or not _tile_may_attend(kind, T, W, r, P, i0, i1, j0, j1):
                continue  # the same decision in every thread of the block
            cuda.syncthreads()  # the previous tile's K, V are no longer read
            for idx in range(a, nk * D, BQ):
                sK[idx] = k[bh, j0 + idx // D, idx % D]
            for idx in range(a, nk * Dv, BQ):
                sV[idx] = v[bh, j0 + idx // Dv, idx % Dv]
            cuda.syncthreads()
            if active:
                mx = m
                for c in range(nk):
                    s = ftype(0.0)
                    for d in range(D):
                        s += sQ[a * PD + d] * sK[c * D + d]
                    x = _score(s, scale, mask, has_mask, b, h, qi, j0 + c, kind, T, W, r, P, causal)
                    p[c] = x
                    mx = max(mx, x)
                if mx != ninf:
                    alpha = math.exp(m - mx)  # exp(m − m'), 0 while m = −inf
                    total = ftype(0.0)
                    for c in range(nk):
                        e = math.exp(p[c] - mx)
                        p[c] = e
                        total += e
                    lsum = alpha * lsum + total
                    m = mx
                    for d in range(Dv):
                        o = alpha * sO[a * PV + d]
                        for c in range(nk):
                            o += p[c] * sV[c * Dv + d]
                        sO[a * PV + d] = o
                else:  # nothing visible in this row yet, but a NaN score (which max skips) still makes it NaN
                    for c in range(nk):
                        if p[c] != p[c]:
                            lsum = ftype(math.nan)
        if active:
            if not lsum <= 0.0:  # (NaN: a NaN or +inf score, which makes the row NaN, as in PyTorch)
                for d in range(Dv):
                    out[bh, qi, d] = sO[a * PV + d] / lsum
                lse[bh, qi] = m + math.log(lsum)
            else:  # a fully blocked row
                for d in range(Dv):
                    out[bh, qi, d] = 0.0
                lse[bh, qi] = ninf

    @cuda.jit
    def rowdot_kernel(out, dout, Drow):
        """D = rowsum(dO ∘ O), one thread per (batch·head, row)."""
        t = cuda.grid(1)
        L, Dv = out.shape[1], out.shape[2]
        if t < out.shape[0] * L:
            bh, i = t // L, t % L
            acc = ftype(0.0)
            for d in range(Dv):
                acc += dout[bh, i, d] * out[bh, i, d]
            Drow[bh, i] = acc

    @cuda.jit
    def dq_kernel(q, k, v, lse, dout, Drow, mask, has_mask, H, kind, T, W, r, P, causal, scale, dq):
        L, D = q.shape[1], q.shape[2]
        S, Dv = k.shape[1], v.shape[2]
        a = cuda.threadIdx.x
        i0 = cuda.blockIdx.x * BQ
        bh = cuda.blockIdx.y
        b, h = bh // H, bh % H
        qi = i0 + a
        active = qi < L
        i1 = min(i0 + BQ, L)
        PD, PV = D + 1, Dv + 1  # padded rows, as in the forward
        smem = cuda.shared.array(0, dtype=ftype)
        sQ = smem[: BQ * PD]
        sdO = smem[BQ * PD : BQ * (PD + PV)]
        sK = smem[BQ * (PD + PV) : BQ * (PD + PV) + BK * D]
        sV = smem[BQ * (PD + PV) + BK * D : BQ * (PD + PV) + BK * (D + Dv)]
        ds = cuda.local.array(BK, dtype=ftype)  # this row's dS for one key tile
        _load_padded(sQ, q, bh, i0, i1 - i0, a, BQ)
        _load_padded(sdO, dout, bh, i0, i1 - i0, a, BQ)
        la = ninf
        Da = ftype(0.0)
        if active:
            for d in range(D):
                dq[bh, qi, d] = 0.0
            la = lse[bh, qi]
            Da = Drow[bh, qi]
        for j0 in range(0, S, BK):
            j1 = min(j0 + BK, S)
            nk = j1 - j0
            if (causal and j0 > i1 - 1) or not _tile_may_attend(kind, T, W, r, P, i0, i1, j0, j1):
                continue
            cuda.syncthreads()
            for idx in range(a, nk * D, BQ):
                sK[idx] = k[bh, j0 + idx // D, idx % D]
            for idx in range(a, nk * Dv, BQ):
                sV[idx] = v[bh, j0 + idx // Dv, idx % Dv]
            cuda.syncthreads()
            if active and la != ninf:
                for c in range(nk):
                    s = ftype(0.0)
                    for d in range(D):
                        s += sQ[a * PD + d] * sK[c * D + d]
                    x = _score(s, scale, mask, has_mask, b, h, qi, j0 + c, kind, T, W, r, P, causal)
                    pc = math.exp(x - la)  # P = exp(s − lse)
                    dp = ftype(0.0)
                    for d in range(Dv):
                        dp += sdO[a * PV + d] * sV[c * Dv + d]
                    ds[c] = pc * (dp - Da) * scale  # dS = P ∘ (dP − D), times scale
                for d in range(D):  # dQ_i += dS K_j: one read-modify-write of the row per key tile
                    acc = ftype(0.0)
                    for c in range(nk):
                        acc += ds[c] * sK[c * D + d]
                    dq[bh, qi, d] += acc

    @cuda.jit
    def dkdv_kernel(q, k, v, lse, dout, Drow, mask, has_mask, H, kind, T, W, r, P, causal, scale, dk, dv):
        L, D = q.shape[1], q.shape[2]
        S, Dv = k.shape[1], v.shape[2]
        c = cuda.threadIdx.x
        j0 = cuda.blockIdx.x * BK
        bh = cuda.blockIdx.y
        b, h = bh // H, bh % H
        kj = j0 + c
        active = kj < S
        j1 = min(j0 + BK, S)
        PD, PV = D + 1, Dv + 1  # padded rows of the block's own keys and values (one row per thread)
        smem = cuda.shared.array(0, dtype=ftype)
        sQ = smem[: BQ * D]  # the query tile: every thread reads the same entry at once (a broadcast)
        sdO = smem[BQ * D : BQ * (D + Dv)]
        sL = smem[BQ * (D + Dv) : BQ * (D + Dv) + BQ]  # lse of the tile's rows
        sD = smem[BQ * (D + Dv) + BQ : BQ * (D + Dv) + 2 * BQ]  # D of the tile's rows
        o = BQ * (D + Dv + 2)
        sKr = smem[o : o + BK * PD]
        sVr = smem[o + BK * PD : o + BK * (PD + PV)]
        pr = cuda.local.array(BQ, dtype=ftype)  # P of this key against the tile's queries
        dsr = cuda.local.array(BQ, dtype=ftype)  # dS likewise
        _load_padded(sKr, k, bh, j0, j1 - j0, c, BK)
        _load_padded(sVr, v, bh, j0, j1 - j0, c, BK)
        if active:
            for d in range(D):
                dk[bh, kj, d] = 0.0
            for d in range(Dv):
                dv[bh, kj, d] = 0.0
        i_start = j0 // BQ * BQ if causal else 0
        for i0 in range(i_start, L, BQ):
            i1 = min(i0 + BQ, L)
            nq = i1 - i0
            if not _tile_may_attend(kind, T, W, r, P, i0, i1, j0, j1):
                continue
            cuda.syncthreads()
            for idx in range(c, nq * D, BK):
                sQ[idx] = q[bh, i0 + idx // D, idx % D]
            for idx in range(c, nq * Dv, BK):
                sdO[idx] = dout[bh, i0 + idx // Dv, idx % Dv]
            for idx in range(c, nq, BK):
                sL[idx] = lse[bh, i0 + idx]
                sD[idx] = Drow[bh, i0 + idx]
            cuda.syncthreads()
            if active:
                for a in range(nq):
                    pr[a] = 0.0
                    dsr[a] = 0.0
                    if sL[a] == ninf:
                        continue  # a fully blocked row contributes nothing
                    s = ftype(0.0)
                    for d in range(D):
                        s += sQ[a * D + d] * sKr[c * PD + d]
                    x = _score(s, scale, mask, has_mask, b, h, i0 + a, kj, kind, T, W, r, P, causal)
                    pc = math.exp(x - sL[a])
                    dp = ftype(0.0)
                    for d in range(Dv):
                        dp += sdO[a * Dv + d] * sVr[c * PV + d]
                    pr[a] = pc
                    dsr[a] = pc * (dp - sD[a]) * scale
                for d in range(Dv):  # dV_j += Pᵀ dO_i: one read-modify-write of the row per query tile
                    acc = ftype(0.0)
                    for a in range(nq):
                        acc += pr[a] * sdO[a * Dv + d]
                    dv[bh, kj, d] += acc
                for d in range(D):  # dK_j += dSᵀ Q_i
                    acc = ftype(0.0)
                    for a in range(nq):
                        acc += dsr[a] * sQ[a * D + d]
                    dk[bh, kj, d] += acc

    return {"forward": forward_kernel, "rowdot": rowdot_kernel, "dq": dq_kernel, "dkdv": dkdv_kernel}


KERNELS = {np.dtype(np.float32): _build(float32), np.dtype(np.float64): _build(float64)}


# ---------------------------------------------------------------------------------------------------------------
# The fast path: register-blocked float32 kernels in the FlashAttention-2 shape (Dao 2023), one build per head dim.

_SIM = os.environ.get("NUMBA_ENABLE_CUDASIM") == "1"  # the simulator runs a Python thread per CUDA thread
TX = 2 if _SIM else 8  # threads that share a query row: neighbouring lanes of one warp
TY = 4 if _SIM else 16  # row groups: TX · TY threads per block
TM = 4  # query rows per thread: TM·ty + i (consecutive: one 16-byte shared load reads them)
TN = 4  # keys per thread in a score tile: TN·tx + j
NT = TX * TY  # threads per block (128 on a GPU)
BM = TY * TM  # queries per block (64)
BN = TX * TN  # keys per tile (32)
assert 32 % TX == 0 and NT % 32 == 0 or _SIM  # a row's TX owners lie within one warp
assert NT >= BN  # (dkdv_fast: every query of a tile has threads that stage its lse and D)
DS = 4 if _SIM else 16  # head dims staged at a time in the backward's products over D: dK/dV kernel ...
DSQ = 4 if _SIM else 32  # ... and dQ kernel (fewer operands beside the slices: wider ones fit)
# Blocks per SM that each kernel's launch bounds ask ptxas to fit: at most 65536 / (NT · that) registers per thread.
FAST_BLOCKS_PER_SM = {"forward_fast": 4, "dq_fast": 3, "dkdv_fast": 3}
ALIGN = None if _SIM else 16  # shared tiles on 16 bytes: 4 consecutive floats load as one ld.shared.v4


def _fast_smem(D):
    """Bytes of static shared memory of the largest fast kernel: the forward (Qᵀ, Kᵀ, V, Pᵀ), dQ (DSQ-slices
    of Qᵀ, dOᵀ, Kᵀ, Vᵀ; K; dSᵀ) or dK/dV (DS-slices of the same; Q, dO; Pᵀ, dSᵀ; lse and D of the query tile)."""
    forward = D * (BM + 4) + D * (BN + 4) + BN * D + BN * (BM + 4)
    dq = 2 * DSQ * (BM + 4) + 2 * DSQ * (BN + 4) + BN * D + BN * (BM + 4)
    dkdv = 2 * DS * (BM + 4) + 2 * DS * (BN + 4) + 2 * BN * D + 2 * BN * (BM + 4) + 2 * BN
    return 4 * max(forward, dq, dkdv)


def fast_dims_ok(dtype, D, Dv):
    """Whether the register-blocked kernels take these arrays: float32, D == Dv, D a multiple of 4·TX (a thread
    owns D / TX output columns, 4 consecutive ones at a time) and of the backward's slices, at most 64 (the
    registers), and every kernel's shared memory within the default 48 KiB."""
    if np.dtype(dtype) != np.float32 or D != Dv or not 0 < D <= 64:
        return False
    return D % (4 * TX) == 0 and D % DS == 0 and D % DSQ == 0 and _fast_smem(D) <= SMEM_LIMIT


if _SIM:  # the simulator has no warp shuffles: exchange through shared memory (every thread calls this)

    @cuda.jit(device=True)
    def _shfl_xor(x, o):
        """x of thread t ^ o (what ``shfl_xor_sync`` returns on a GPU)."""
        buf = cuda.shared.array(NT, float32)
        t = cuda.threadIdx.x
        cuda.syncthreads()
        buf[t] = x
        cuda.syncthreads()
        return buf[t ^ o]

else:

    @cuda.jit(device=True, inline=True)
    def _shfl_xor(x, o):
        """x of lane (this lane) ^ o."""
        return cuda.shfl_xor_sync(0xFFFFFFFF, x, o)  # full warp: every lane reaches every call


@cuda.jit(device=True, inline=True)
def _row_max(x):
    """The maximum of x over the TX threads that share a query row (a butterfly of warp shuffles)."""
    o = TX // 2
    while o > 0:
        x = max(x, _shfl_xor(x, o))
        o //= 2
    return x


@cuda.jit(device=True, inline=True)
def _row_sum(x):
    """The sum of x over the TX threads that share a query row."""
    o = TX // 2
    while o > 0:
        x += _shfl_xor(x, o)
        o //= 2
    return x


SG = 2 if _SIM else 8  # columns of a staging cell: a cell is 4 rows × SG columns, one warp's 32 elements on a GPU
NG = NT // (4 * SG)  # staging cells a block fills at once (4 on a GPU: one per warp)
SB = 8  # values a thread loads before it stores them: its loads in flight at once
WS = min(32, NT)  # values of a row that a warp copies at once in ``_stage``
NN = 0x7FFFFFFF  # i & NN = i for the indices here, and tells the compiler i ≥ 0: no negative-index wraparound code


@cuda.jit(device=True, inline=True)
def _stage_transposed(dst, src, bh, row0, col0, R, C, n, rows=None):
    """dst[col, row] = src[bh, row0 + row, col0 + col] for an R × C block (R a multiple of 4·NG, C of SG), by the
    block's NT threads, and rows[row, col0 + col] too if given (the backward needs some tiles both ways: one
    load, two stores); rows row0 + row ≥ n repeat row n − 1 (see ``_stage``). dst's row stride is 4 modulo 32
    words, and a warp's 32 elements form a cell of 4 rows × SG = 8 consecutive columns: its global reads are 4
    runs of 32 bytes and its shared stores, at banks 4·col + row (mod 32), hit 32 distinct banks (32 consecutive
    columns of one row would hit 8 banks, 4 times each).

    A thread's place in its cell is fixed and the cells it visits are constant steps apart: in a batch's
    unrolled loops every offset is a constant (no division per element) and nothing branches (the row index
    is clamped), so the batch's SB loads are in flight together before its stores."""
    t = cuda.threadIdx.x & (NT - 1)
    rt = 4 * (t // (4 * SG)) + t % 4  # the thread's row and column in the first cell it fills
    ct = (t // 4) % SG
    RQ = R // (4 * NG)  # cells down a column of cells, per thread
    CB = min(SB // RQ, C // SG)  # columns of cells per batch
    g, rg, cg, last = bh & NN, (row0 + rt) & NN, (col0 + ct) & NN, (n - 1) & NN
    buf = cuda.local.array(SB, float32)
    c = 0
    while c < C // SG:
        for w in range(RQ * CB):
            buf[w] = src[g, min(rg + 4 * NG * (w % RQ), last), cg + SG * (c + w // RQ)]
        for w in range(RQ * CB):
            row, col = rt + 4 * NG * (w % RQ), ct + SG * (c + w // RQ)
            dst[col, row] = buf[w]
            if rows is not None:  # (decided at compile time)
                rows[row, cg - ct + col] = buf[w]
        c += CB


@cuda.jit(device=True, inline=True)
def _stage(dst, src, bh, row0, R, C, n):
    """dst[row, col] = src[bh, row0 + row, col] for R whole rows of C values, by the block's NT threads: a warp
    copies WS = 32 consecutive values of one row (one 128-byte run, 32 banks), a thread the same columns of
    R·WS/NT rows (few row addresses to compute); batches of SB loads with constant offsets and no branch, as
    in ``_stage_transposed``. C is a multiple of WS.

    Rows row0 + row ≥ n repeat row n − 1 (clamped reads, not zeros): finite values that no result sees, since
    the kernels mask the scores of keys past S (P = 0, dS = 0 against their K and V rows), give queries past L
    lse = −inf (P = dS = 0 against their Q and dO rows) and never write rows past L or S."""
    t = cuda.threadIdx.x & (NT - 1)
    NR, CW = NT // WS, C // WS  # rows the block copies at once, runs per row
    lane, rt = t % WS, t // WS
    W = min(SB, R * C // NT)  # values per batch
    g, rg, last = bh & NN, (row0 + rt) & NN, (n - 1) & NN
    buf = cuda.local.array(SB, float32)
    u = 0
    while u < R * C // NT:  # value u of the thread: row rt + NR·(u // CW), column lane + WS·(u % CW)
        for w in range(W):
            buf[w] = src[g, min(rg + NR * ((u + w) // CW), last), lane + WS * ((u + w) % CW)]
        for w in range(W):
            dst[rt + NR * ((u + w) // CW), lane + WS * ((u + w) % CW)] = buf[w]
        u += W


@cuda.jit(device=True, inline=True)
def _masked_scores(s, buf, r0, c0, row0, col0, qrows, L, S, scale, mask, has_mask, b, h, kind, T, W, r, P, causal):
    """s ← the masked scores of the thread's micro-tile: rows row0 + r0 + i, columns col0 + c0 + j of a tile
    (rows are queries and columns keys when ``qrows``, the reverse in the dK/dV kernel); −inf outside L × S.

    A register array stays in registers only if every access has a constant index, i.e. sits in a loop that
    the compiler unrolls; the pattern/mask test is too big for that, so a tile that needs it passes the scores
    through the thread's own slots buf[c0 + j, r0 + i] of a shared tile. A tile where every pair is visible and
    no mask applies (a block-uniform test) only scales them."""
    q0, nq, k0, nk = (row0, BM, col0, BN) if qrows else (col0, BN, row0, BM)  # the tile's queries and keys
    if (
        not has_mask
        and k0 + nk <= S
        and not (causal and k0 + nk - 1 > q0)
        and _tile_all_visible(kind, T, W, r, P, q0, q0 + nq, k0, k0 + nk)
    ):
        for i in range(TM):
            for j in range(TN):
                s[i, j] *= scale
    else:
        for i in range(TM):
            for j in range(TN):
                buf[c0 + j, r0 + i] = s[i, j]
        for n in range(TM * TN):
            c, row = c0 + n % TN, r0 + n // TN
            qi, kj = (row0 + row, col0 + c) if qrows else (col0 + c, row0 + row)
            x = float32(-math.inf)
            if qi < L and kj < S:
                x = _SCORE32(buf[c, row], scale, mask, has_mask, b, h, qi, kj, kind, T, W, r, P, causal)
            buf[c, row] = x
        for i in range(TM):
            for j in range(TN):
                s[i, j] = buf[c0 + j, r0 + i]


@cuda.jit(device=True, inline=True)
def _two_products(s, dp, A, A2, B, B2, r0, c0, n, a, a2, kb, vb):
    """s += A_sliceᵀ B_slice and dp += A2_sliceᵀ B2_slice over the n staged head dims of transposed shared tiles,
    for the thread's rows r0 + i and columns c0 + j (a, a2, kb, vb: its operand registers). Algorithm 2's S and dP
    in one pass: the dQ kernel calls it with (Q, dO; K, V), the dK/dV kernel transposed with (K, V; Q, dO)."""
    d = 0
    while d < n:
        for i in range(TM):
            a[i] = A[d, r0 + i]
            a2[i] = A2[d, r0 + i]
        for j in range(TN):
            kb[j] = B[d, c0 + j]
            vb[j] = B2[d, c0 + j]
        for i in range(TM):
            for j in range(TN):
                s[i, j] += a[i] * kb[j]
                dp[i, j] += a2[i] * vb[j]
        d += 1


@cuda.jit(device=True, inline=True)
def _place(H):
    """Where this thread works in a fast kernel: (t, tx, r0, c0, row block, row blocks, batch·head, b, h). Thread
    t = (tx, ty) owns rows r0 + i = TM·ty + i and columns c0 + j = TN·tx + j of each tile. The grid is (BH, row
    blocks): its first axis runs fastest, so the blocks start a row block of every batch·head at a time, longest
    first (the longest-processing-time order: no long block is left to start late and run alone at the end)."""
    t = cuda.threadIdx.x & (NT - 1)  # (= threadIdx.x; the mask shows the compiler t ≥ 0: no negative-index wrap)
    tx, ty = t % TX, t // TX
    bh = cuda.blockIdx.x
    return t, tx, TM * ty, TN * tx, cuda.blockIdx.y, cuda.gridDim.y, bh, bh // H, bh % H


def _fast_grid(blocks, BH):
    """The fast kernels' grid for `blocks` row blocks per batch·head (see ``_place``)."""
    return (BH, blocks)


def _build_fast(D):
    """The register-blocked float32 kernels for head dim D = Dv (a compile-time constant: it sizes the register
    arrays and the static shared tiles)."""

    def kernel(name):
        """cuda.jit with the kernel's launch bounds (not in the simulator, whose jit has no such option)."""
        if _SIM:
            return cuda.jit
        return cuda.jit(launch_bounds=(NT, FAST_BLOCKS_PER_SM[name]))

    DT = D // TX  # output columns per thread: 4·tx + 4·TX·(e // 4) + e % 4, four consecutive at a time
    # (shapes of shared and local arrays must be compile-time constants: tuples built here, frozen into the kernel)
    Q_SHAPE, K_SHAPE, V_SHAPE, P_SHAPE = (D, BM + 4), (D, BN + 4), (BN, D), (BN, BM + 4)
    ACC_SHAPE, S_SHAPE = (TM, DT), (TM, TN)
    ninf = float32(-math.inf)
    zero = float32(0.0)
    log2e = float32(math.log2(math.e))  # exp(x) = exp2(x · log2 e): exp2 is one hardware instruction (ex2.approx)
    inf = float32(math.inf)

    @kernel("forward_fast")
    def forward_fast(q, k, v, mask, has_mask, H, kind, T, W, r, P, causal, scale, out, lse):
        """One block of NT threads per (BM queries, batch·head). Thread (tx, ty) owns rows TM·ty + i of the block
        and, in each BM × BN score tile, keys TN·tx + j; its TM × TN scores, its TM × DT output accumulators and
        its rows' running max m and partial sums l live in registers (constant-size local arrays)."""
        L, S = q.shape[1], k.shape[1]
        t, tx, r0, c0, blk, nblk, bh, b, h = _place(H)  # r0, c0: the thread's first row and first key of a tile
        i0 = (nblk - 1 - blk) * BM  # the last (under causality the longest) first
        i1 = min(i0 + BM, L)
        # Transposed tiles: a thread reads its TM rows (TN keys) at one d, 16 consecutive bytes. The +4 pads keep
        # every row on a 16-byte boundary and make the row stride 4 mod 32 words (conflict-free staging).
        sQ = cuda.shared.array(Q_SHAPE, float32, alignment=ALIGN)
        sK = cuda.shared.array(K_SHAPE, float32, alignment=ALIGN)
        sV = cuda.shared.array(V_SHAPE, float32, alignment=ALIGN)
        sP = cuda.shared.array(P_SHAPE, float32, alignment=ALIGN)
        acc = cuda.local.array(ACC_SHAPE, float32)  # the unnormalized output rows
        s = cuda.local.array(S_SHAPE, float32)  # scores, then probabilities
        m = cuda.local.array(TM, float32)  # running row max (the same in the row's TX threads)
        lp = cuda.local.array(TM, float32)  # this thread's part of the running row sum
        a = cuda.local.array(TM, float32)  # operands staged in registers: a column of Q or Pᵀ ...
        kb = cuda.local.array(TN, float32)  # ... and a row of Kᵀ ...
        vb = cuda.local.array(DT, float32)  # ... or of V
        _stage_transposed(sQ, q, bh, i0, 0, BM, D, L)  # rows past L are zeros
        for i in range(TM):
            m[i] = ninf
            lp[i] = zero
            for e in range(DT):
                acc[i, e] = zero
        for j0 in range(0, S, BN):
            if (causal and j0 > i1 - 1) or not _tile_may_attend(kind, T, W, r, P, i0, i1, j0, min(j0 + BN, S)):
                continue  # the same decision in every thread of the block: every barrier is reached by all
            cuda.syncthreads()  # the previous tile is no longer read (and sQ is written, the first time)
            _stage_transposed(sK, k, bh, j0, 0, BN, D, S)  # keys past S are zeros
            _stage(sV, v, bh, j0, BN, D, S)
            cuda.syncthreads()
            for i in range(TM):  # S = Q Kᵀ: TM + TN shared loads for TM · TN multiply-adds per d
                for j in range(TN):
                    s[i, j] = zero
            d = 0
            while d < D:  # (a while loop: Numba's range loop index defeats the 16-byte alignment proof, no v4 loads)
                for i in range(TM):
                    a[i] = sQ[d, r0 + i]
                for j in range(TN):
                    kb[j] = sK[d, c0 + j]
                for i in range(TM):
                    for j in range(TN):
                        s[i, j] += a[i] * kb[j]
                d += 1
            _masked_scores(s, sP, r0, c0, i0, j0, True, L, S, scale, mask, has_mask, b, h, kind, T, W, r, P, causal)
            for i in range(TM):  # the online softmax (Dao 2023, algorithm 1, lines 8-10)
                mx = m[i]
                for j in range(TN):
                    mx = max(mx, s[i, j])
                mx = _row_max(mx)  # m' = max(m, rowmax(S)), outside any branch: all 32 lanes shuffle
                ms = mx if mx != ninf else zero  # a row that has seen no key yet: S = m = −inf, P = 0
                alpha = math.exp2((m[i] - ms) * log2e)  # exp(m − m'), 0 while m = −inf
                m[i] = mx
                total = zero
                for j in range(TN):  # (s − m')·log2 e: s·log2 e − m'·log2 e would round m'·log2 e (a −1e9 mask: ±64)
                    p = math.exp2((s[i, j] - ms) * log2e)  # exp(s − m')
                    s[i, j] = p
                    total += p
                lp[i] = alpha * lp[i] + total  # each thread sums its own keys; the row's parts meet at the end
                for e in range(DT):
                    acc[i, e] *= alpha
            for j in range(TN):  # a key's 4 rows are consecutive in Pᵀ: one 16-byte store
                for i in range(TM):
                    sP[c0 + j, r0 + i] = s[i, j]
            cuda.syncthreads()  # P is complete
            c = 0
            while c < BN:  # O += P V: TM + DT shared loads for TM · DT multiply-adds per key
                for i in range(TM):
                    a[i] = sP[c, r0 + i]
                for e in range(DT):
                    vb[e] = sV[c, 4 * tx + 4 * TX * (e // 4) + e % 4]
                for i in range(TM):
                    for e in range(DT):
                        acc[i, e] += a[i] * vb[e]
                c += 1
        for i in range(TM):  # O = acc / l, lse = m + log l (lines 12-13); a fully blocked row: 0 and −inf
            lsum = _row_sum(lp[i])
            inv = zero
            if not lsum <= zero:  # (NaN: a NaN or +inf score makes the row NaN, as in PyTorch)
                inv = float32(1.0) / lsum
                m[i] += math.log(lsum)
            else:
                m[i] = ninf
            for e in range(DT):
                acc[i, e] *= inv
        for i in range(TM):
            qi = i0 + r0 + i
            if qi < L:
                for e in range(DT):
                    out[bh, qi, 4 * tx + 4 * TX * (e // 4) + e % 4] = acc[i, e]
                if tx == 0:
                    lse[bh, qi] = m[i]

    SL_Q, SL_K = (DS, BM + 4), (DS, BN + 4)  # d-slices of the transposed row-block and column-tile operands
    SQ_Q, SQ_K = (DSQ, BM + 4), (DSQ, BN + 4)  # the same in the dQ kernel
    R_SHAPE, ROW_SHAPE = (BN, D), (BN,)

    @kernel("dq_fast")
    def dq_fast(q, k, v, lse, dout, Drow, mask, has_mask, H, kind, T, W, r, P, causal, scale, dq):
        """dQ for one block of BM queries (Dao 2023, algorithm 2, its dQ half, without atomics): for each key
        tile, S = Q Kᵀ and dP = dO Vᵀ are recomputed, DSQ head dims staged at a time (all of Q and dO would not
        fit beside the rest in 48 KiB); P = exp(S − lse), dS = P ∘ (dP − D) · scale; dQ += dS K. Thread (tx, ty)
        owns query rows r0 + i, keys c0 + j of a tile and D/TX columns of dQ, all in registers."""
        L, S = q.shape[1], k.shape[1]
        t, tx, r0, c0, blk, nblk, bh, b, h = _place(H)
        i0 = (nblk - 1 - blk) * BM  # the last (under causality the longest) first
        i1 = min(i0 + BM, L)
        sQ = cuda.shared.array(SQ_Q, float32, alignment=ALIGN)
        sdO = cuda.shared.array(SQ_Q, float32, alignment=ALIGN)
        sK = cuda.shared.array(SQ_K, float32, alignment=ALIGN)
        sV = cuda.shared.array(SQ_K, float32, alignment=ALIGN)
        sKr = cuda.shared.array(R_SHAPE, float32, alignment=ALIGN)  # the key tile, row-major, for dQ += dS K
        sdS = cuda.shared.array(P_SHAPE, float32, alignment=ALIGN)  # dSᵀ
        acc = cuda.local.array(ACC_SHAPE, float32)
        s = cuda.local.array(S_SHAPE, float32)
        dp = cuda.local.array(S_SHAPE, float32)
        ll = cuda.local.array(TM, float32)  # lse of the thread's rows (+inf: P = 0) and D
        dr = cuda.local.array(TM, float32)
        a = cuda.local.array(TM, float32)
        a2 = cuda.local.array(TM, float32)
        kb = cuda.local.array(TN, float32)
        vb = cuda.local.array(TN, float32)
        cb = cuda.local.array(DT, float32)
        for i in range(TM):
            ll[i] = inf  # rows past L, and rows that may attend to no key (lse = −inf): P = exp2(−inf) = 0
            dr[i] = zero
            if i0 + r0 + i < L:
                x = lse[bh, i0 + r0 + i]
                ll[i] = x if x != ninf else inf
                dr[i] = Drow[bh, i0 + r0 + i]
            for e in range(DT):
                acc[i, e] = zero
        for j0 in range(0, S, BN):
            if (causal and j0 > i1 - 1) or not _tile_may_attend(kind, T, W, r, P, i0, i1, j0, min(j0 + BN, S)):
                continue  # block-uniform
            for i in range(TM):
                for j in range(TN):
                    s[i, j] = zero
                    dp[i, j] = zero
            for d0 in range(0, D, DSQ):
                cuda.syncthreads()  # the previous slice (and the previous tile's dS, K) are no longer read
                _stage_transposed(sQ, q, bh, i0, d0, BM, DSQ, L)
                _stage_transposed(sdO, dout, bh, i0, d0, BM, DSQ, L)
                _stage_transposed(sK, k, bh, j0, d0, BN, DSQ, S, sKr)  # K's slice both ways
                _stage_transposed(sV, v, bh, j0, d0, BN, DSQ, S)
                cuda.syncthreads()
                _two_products(s, dp, sQ, sdO, sK, sV, r0, c0, DSQ, a, a2, kb, vb)  # S += Q Kᵀ, dP += dO Vᵀ
            _masked_scores(s, sdS, r0, c0, i0, j0, True, L, S, scale, mask, has_mask, b, h, kind, T, W, r, P, causal)
            for i in range(TM):
                for j in range(TN):
                    p = math.exp2((s[i, j] - ll[i]) * log2e)  # P = exp(S − lse)
                    s[i, j] = p * (dp[i, j] - dr[i]) * scale  # dS = P ∘ (dP − D), times scale
            for j in range(TN):
                for i in range(TM):
                    sdS[c0 + j, r0 + i] = s[i, j]
            cuda.syncthreads()
            c = 0
            while c < BN:  # dQ += dS K
                for i in range(TM):
                    a[i] = sdS[c, r0 + i]
                for e in range(DT):
                    cb[e] = sKr[c, 4 * tx + 4 * TX * (e // 4) + e % 4]
                for i in range(TM):
                    for e in range(DT):
                        acc[i, e] += a[i] * cb[e]
                c += 1
        for i in range(TM):
            if i0 + r0 + i < L:
                for e in range(DT):
                    dq[bh, i0 + r0 + i, 4 * tx + 4 * TX * (e // 4) + e % 4] = acc[i, e]

    @kernel("dkdv_fast")
    def dkdv_fast(q, k, v, lse, dout, Drow, mask, has_mask, H, kind, T, W, r, P, causal, scale, dk, dv):
        """dK and dV for one block of BM keys (Dao 2023, algorithm 2): for each query tile of BN queries,
        Sᵀ = K Qᵀ and dPᵀ = V dOᵀ (DS head dims at a time), Pᵀ and dSᵀ as in dq_fast, then dV += Pᵀ dO and
        dK += dSᵀ Q. Thread (tx, ty) owns keys r0 + i, queries c0 + j of a tile and D/TX columns of dK and dV."""
        L, S = q.shape[1], k.shape[1]
        t, tx, r0, c0, blk, nblk, bh, b, h = _place(H)
        j0 = blk * BM  # (under causality the first key blocks are the longest)
        j1 = min(j0 + BM, S)
        sK = cuda.shared.array(SL_Q, float32, alignment=ALIGN)
        sV = cuda.shared.array(SL_Q, float32, alignment=ALIGN)
        sQ = cuda.shared.array(SL_K, float32, alignment=ALIGN)
        sdO = cuda.shared.array(SL_K, float32, alignment=ALIGN)
        sQr = cuda.shared.array(R_SHAPE, float32, alignment=ALIGN)  # the query tile, row-major, for dK += dSᵀ Q
        sdOr = cuda.shared.array(R_SHAPE, float32, alignment=ALIGN)  # and dO, for dV += Pᵀ dO
        sP = cuda.shared.array(P_SHAPE, float32, alignment=ALIGN)  # P[query, key]
        sdS = cuda.shared.array(P_SHAPE, float32, alignment=ALIGN)
        sL = cuda.shared.array(ROW_SHAPE, float32)  # lse (+inf: P = 0) and D of the tile's queries
        sDr = cuda.shared.array(ROW_SHAPE, float32)
        gv = cuda.local.array(ACC_SHAPE, float32)  # dV rows
        gk = cuda.local.array(ACC_SHAPE, float32)  # dK rows
        s = cuda.local.array(S_SHAPE, float32)
        dp = cuda.local.array(S_SHAPE, float32)
        a = cuda.local.array(TM, float32)
        a2 = cuda.local.array(TM, float32)
        kb = cuda.local.array(TN, float32)
        vb = cuda.local.array(TN, float32)
        ob = cuda.local.array(DT, float32)
        qb = cuda.local.array(DT, float32)
        for i in range(TM):
            for e in range(DT):
                gv[i, e] = zero
                gk[i, e] = zero
        i_start = j0 // BN * BN if causal else 0  # causal: earlier query tiles see none of these keys
        for i0 in range(i_start, L, BN):
            if not _tile_may_attend(kind, T, W, r, P, i0, min(i0 + BN, L), j0, j1):
                continue  # block-uniform
            for i in range(TM):
                for j in range(TN):
                    s[i, j] = zero
                    dp[i, j] = zero
            for d0 in range(0, D, DS):
                cuda.syncthreads()  # the previous slice (and the previous tile's P, dS, Q, dO) are no longer read
                _stage_transposed(sK, k, bh, j0, d0, BM, DS, S)
                _stage_transposed(sV, v, bh, j0, d0, BM, DS, S)
                _stage_transposed(sQ, q, bh, i0, d0, BN, DS, L, sQr)  # Q's and dO's slices both ways
                _stage_transposed(sdO, dout, bh, i0, d0, BN, DS, L, sdOr)
                qt = t % BN  # lse and D of the tile's queries, at every slice and by every thread (the same value to
                x = lse[bh, min(i0 + qt, L - 1)]  # the same place): no branch between the slices' loads
                sL[qt] = x if i0 + qt < L and x != ninf else inf  # +inf: P = 0 (no key, or past L)
                sDr[qt] = Drow[bh, min(i0 + qt, L - 1)]
                cuda.syncthreads()
                _two_products(s, dp, sK, sV, sQ, sdO, r0, c0, DS, a, a2, kb, vb)  # Sᵀ += K Qᵀ, dPᵀ += V dOᵀ
            _masked_scores(s, sP, r0, c0, j0, i0, False, L, S, scale, mask, has_mask, b, h, kind, T, W, r, P, causal)
            for j in range(TN):
                ll = sL[c0 + j]
                dq_ = sDr[c0 + j]
                for i in range(TM):
                    p = math.exp2((s[i, j] - ll) * log2e)
                    s[i, j] = p
                    dp[i, j] = p * (dp[i, j] - dq_) * scale
            for j in range(TN):
                for i in range(TM):
                    sP[c0 + j, r0 + i] = s[i, j]
                    sdS[c0 + j, r0 + i] = dp[i, j]
            cuda.syncthreads()
            c = 0
            while c < BN:  # dV += Pᵀ dO, dK += dSᵀ Q
                for i in range(TM):
                    a[i] = sP[c, r0 + i]
                    a2[i] = sdS[c, r0 + i]
                for e in range(DT):
                    ob[e] = sdOr[c, 4 * tx + 4 * TX * (e // 4) + e % 4]
                    qb[e] = sQr[c, 4 * tx + 4 * TX * (e // 4) + e % 4]
                for i in range(TM):
                    for e in range(DT):
                        gv[i, e] += a[i] * ob[e]
                        gk[i, e] += a2[i] * qb[e]
                c += 1
        for i in range(TM):
            if j0 + r0 + i < S:
                for e in range(DT):
                    dv[bh, j0 + r0 + i, 4 * tx + 4 * TX * (e // 4) + e % 4] = gv[i, e]
                    dk[bh, j0 + r0 + i, 4 * tx + 4 * TX * (e // 4) + e % 4] = gk[i, e]

    return {"forward_fast": forward_fast, "dq_fast": dq_fast, "dkdv_fast": dkdv_fast}


_FAST = {}


def fast_kernels(D):
    """The fast kernels for head dim D, compiled on first use (and cached: one build per head dim)."""
    if D not in _FAST:
        _FAST[D] = _build_fast(D)
    return _FAST[D]


def signatures(dtype):
    """Explicit Numba signatures of every kernel for one dtype (for ``numba.cuda.compile_ptx`` checks)."""
    f = "float32" if np.dtype(dtype) == np.float32 else "float64"
    a3, a2, a4 = f"{f}[:, :, ::1]", f"{f}[:, ::1]", f"{f}[:, :, :, ::1]"
    pat = "boolean, int64, int64, int64, int64, int64, int64, boolean"  # has_mask, H, kind, T, W, r, P, causal
    return {
        "forward": f"void({a3}, {a3}, {a3}, {a4}, {pat}, {f}, {a3}, {a2})",
        "rowdot": f"void({a3}, {a3}, {a2})",
        "dq": f"void({a3}, {a3}, {a3}, {a2}, {a3}, {a2}, {a4}, {pat}, {f}, {a3})",
        "dkdv": f"void({a3}, {a3}, {a3}, {a2}, {a3}, {a2}, {a4}, {pat}, {f}, {a3}, {a3})",
        "forward_fast": f"void({a3}, {a3}, {a3}, {a4}, {pat}, {f}, {a3}, {a2})",  # the fast ones: float32 only
        "dq_fast": f"void({a3}, {a3}, {a3}, {a2}, {a3}, {a2}, {a4}, {pat}, {f}, {a3})",
        "dkdv_fast": f"void({a3}, {a3}, {a3}, {a2}, {a3}, {a2}, {a4}, {pat}, {f}, {a3}, {a3})",
    }


SMEM_LIMIT = 48 * 1024  # dynamic shared memory a block gets without an opt-in attribute


def _smem(dtype, D, Dv, values):
    """Bytes of dynamic shared memory for `values` values of dtype, checked against the default limit."""
    nbytes = values * np.dtype(dtype).itemsize
    if nbytes > SMEM_LIMIT:
        raise ValueError(
            f"head dims D={D}, Dv={Dv} in {np.dtype(dtype).name} need {nbytes} bytes of shared memory per block, "
            f"over the {SMEM_LIMIT} a launch gets by default (float32 fits D + Dv <= 190, float64 D + Dv <= 94)"
        )
    return nbytes


def _on_device(host, *arrays):
    """The arrays as device arrays: CuPy arrays pass as they are (kernels.dispatch.launch takes them); NumPy arrays
    (the simulator, or a GPU fed from the host) are copied over, and ``host`` collects the (device, numpy) output
    pairs to copy back."""
    result = []
    for a in arrays:
        if isinstance(a, np.ndarray):
            d = cuda.to_device(a)
            host.append((d, a))
            result.append(d)
        else:
            result.append(a)
    return result


def _copy_back(host, outputs):
    for d, a in host:
        if any(a is o for o in outputs):
            d.copy_to_host(a)


def forward(q, k, v, mask, has_mask, H, kind, T, W, r, P, causal, scale, out, lse):
    """Launch the forward kernel (arguments as in ``cpu.forward``; CuPy arrays, or NumPy arrays copied over)."""
    BH, L, D = q.shape
    Dv = v.shape[2]
    sc = np.dtype(q.dtype).type(scale)
    host = []
    dq, dk, dv, dm, do, dl = _on_device(host, q, k, v, mask, out, lse)
    args = (dq, dk, dv, dm, has_mask, H, kind, T, W, r, P, causal, sc, do, dl)
    if fast_dims_ok(q.dtype, D, Dv):
        launch(fast_kernels(D)["forward_fast"], _fast_grid((L + BM - 1) // BM, BH), NT, *args)
    else:
        smem = _smem(q.dtype, D, Dv, BQ * (D + Dv + 2) + BK * (D + Dv))
        launch(KERNELS[np.dtype(q.dtype)]["forward"], ((L + BQ - 1) // BQ, BH), BQ, *args, shared=smem)
    _copy_back(host, (out, lse))


def backward(q, k, v, out, lse, dout, mask, has_mask, H, kind, T, W, r, P, causal, scale, dq, dk, dv, Drow):
    """Launch the three backward kernels; ``Drow`` is (BH, L) scratch for D = rowsum(dO ∘ O)."""
    BH, L, D = q.shape
    S, Dv = k.shape[1], v.shape[2]
    ks = KERNELS[np.dtype(q.dtype)]
    sc = np.dtype(q.dtype).type(scale)
    host = []
    q_, k_, v_, o_, l_, do_, m_, dq_, dk_, dv_, D_ = _on_device(host, q, k, v, out, lse, dout, mask, dq, dk, dv, Drow)
    pat = (m_, has_mask, H, kind, T, W, r, P, causal, sc)
    launch(ks["rowdot"], (BH * L + 127) // 128, 128, o_, do_, D_)
    if fast_dims_ok(q.dtype, D, Dv):
        fk = fast_kernels(D)
        launch(fk["dq_fast"], _fast_grid((L + BM - 1) // BM, BH), NT, q_, k_, v_, l_, do_, D_, *pat, dq_)
        launch(fk["dkdv_fast"], _fast_grid((S + BM - 1) // BM, BH), NT, q_, k_, v_, l_, do_, D_, *pat, dk_,
               dv_)
        _copy_back(host, (dq, dk, dv))
        return
    smem = _smem(q.dtype, D, Dv, BQ * (D + Dv + 2) + BK * (D + Dv))
    launch(ks["dq"], ((L + BQ - 1) // BQ, BH), BQ, q_, k_, v_, l_, do_, D_, *pat, dq_, shared=smem)
    smem = _smem(q.dtype, D, Dv, BQ * (D + Dv + 2) + BK * (D + Dv + 2))
    launch(ks["dkdv"], ((S + BK - 1) // BK, BH), BK, q_, k_, v_, l_, do_, D_, *pat, dk_, dv_, shared=smem)
    _copy_back(host, (dq, dk, dv))


__all__ = ["forward", "backward", "KERNELS", "signatures", "fast_kernels", "fast_dims_ok", "BQ", "BK", "BM", "BN"]
