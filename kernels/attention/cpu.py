"""Tiled attention on the CPU with Numba: FlashAttention's online softmax over tiles, BLAS on the tiles.

Forward (Dao et al. 2022, algorithm 1; the FlashAttention-2 loop order, Dao 2023, algorithm 1): every task
owns one (batch·head, block of ``BQ`` queries) and walks the key blocks of ``BK`` keys, keeping per query row
the running maximum m, the running sum l = Σ exp(s − m) (``lsum``) and the unnormalized output O. For a new tile of
scores s (one GEMM, Q_i K_jᵀ):

    m' = max(m, rowmax(s)),  P = exp(s − m'),  l' = exp(m − m') l + rowsum(P),  O' = exp(m − m') O + P V_j

and at the end out = O / l and lse = m + log l. Only a BQ×BK score tile ever exists (extra memory O(N) per
head).

Backward (FlashAttention-2, algorithm 2): P is recomputed tile by tile from the saved lse,
P = exp(s − lse), with D = rowsum(dO ∘ O):

    dV_j += Pᵀ dO_i,  dP = dO_i V_jᵀ,  dS = P ∘ (dP − D_i),  dQ_i += dS K_j · scale,  dK_j += dSᵀ Q_i · scale

The backward's tasks are (batch·head, group of key blocks): a task owns dK_j and dV_j of its key blocks, and
walks them (outer) and the query blocks (inner). With B·H at least the thread count there is one group per
head, and the task accumulates dQ of its head in place, without races or atomics. With fewer heads than threads
(B·H = 1 when sampling, or at a long sequence) the key blocks of a head are dealt to G groups back and forth
(0, 1, …, G−1, G−1, …, 1, 0, 0, 1, …: under a causal mask early keys are seen by more queries, and this deal
evens the groups' work out), and each group sums its own partial dQ; a second parallel pass adds the G partials
in a fixed order. Extra memory G·L·D per head, and the result does not depend on which thread ran which task.

Masks: the structured patterns are evaluated per element from five integers (``patterns.visible``), and a
whole tile is skipped when ``patterns.tile_may_attend`` says nothing in it is visible; a dense mask is an
additive array, broadcast against (B, H, L, S) by its index arithmetic (never materialized), added to the
scores.
"""

import contextlib
import ctypes
import glob
import math
import os

import numba
import numpy as np
from numba import njit, prange
from numba.extending import overload

from . import patterns

BQ = 64  # queries per tile
BK = 64  # keys per tile

# fastmath without 'nnan'/'ninf': −inf is how a blocked score is written, and it must stay −inf.
# 'reassoc' lets LLVM vectorize the row sums and maxima; 'contract' allows fused multiply-adds.
FASTMATH = {"nsz", "arcp", "contract", "reassoc"}

# The tiles' np.dot calls go to the BLAS that SciPy ships (OpenBLAS). Above m·n·k = 262144 OpenBLAS would
# start its own threads inside ours (oversubscription, and a hang warning under the OpenMP layer: with
# D = 128 a 64×64 tile crosses that line and runs 20× slower), so the kernels run with BLAS on one thread.


def _openblas_thread_control():
    """(get, set) of the thread count of SciPy's bundled OpenBLAS (the BLAS Numba calls), or None."""
    import scipy

    libs = glob.glob(os.path.join(os.path.dirname(scipy.__file__), os.pardir, "scipy.libs", "*openblas*"))
    for path in libs:
        lib = ctypes.CDLL(path)  # already loaded by SciPy: the same handle
        for prefix in ("scipy_openblas", "openblas"):
            get = getattr(lib, prefix + "_get_num_threads", None)
            set_ = getattr(lib, prefix + "_set_num_threads", None)
            if get is not None and set_ is not None:
                get.restype, set_.argtypes = ctypes.c_int, [ctypes.c_int]
                return get, set_
    return None


_BLAS_THREADS = None


@contextlib.contextmanager
def _single_threaded_blas():
    """Run the block with SciPy's OpenBLAS on one thread (our own threads parallelize over tiles)."""
    global _BLAS_THREADS
    if _BLAS_THREADS is None:
        _BLAS_THREADS = _openblas_thread_control() or False
    if not _BLAS_THREADS:  # another BLAS (e.g. MKL runs sequentially inside a parallel region by itself)
        yield
        return
    get, set_ = _BLAS_THREADS
    before = get()
    set_(1)
    try:
        yield
    finally:
        set_(before)


_visible = njit(patterns.visible)
_tile_may_attend = njit(patterns.tile_may_attend)
_tile_all_visible = njit(patterns.tile_all_visible)


def exp_nonpositive(x):
    """exp(x) for x ≤ 0 (−inf gives 0). float32: a polynomial LLVM vectorizes; float64: math.exp."""
    return math.exp(x)


@overload(exp_nonpositive, jit_options={"fastmath": FASTMATH})
def _exp_nonpositive(x):
    if x != numba.types.float32:
        return lambda x: math.exp(x)

    def exp_f32(x):
        # Cephes' expf: x = n ln2 + f with |f| ≤ ln2/2 (ln2 split in two for exactness), exp(f) by a degree-7
        # polynomial, 2ⁿ written straight into the exponent bits. Relative error ≈ 2e-7, and no libm call,
        # so a whole row of exps is vectorized (Numba has no vector exp without Intel's SVML).
        big = not x < np.float32(-87.0)  # below, exp(x) < 1.7e-38: flush to 0 (−inf ↦ 0; NaN stays NaN)
        x = x if big else np.float32(0.0)
        n = np.floor(x * np.float32(1.44269504088896341) + np.float32(0.5))
        f = x - n * np.float32(0.693359375) + n * np.float32(2.12194440e-4)
        p = np.float32(1.9875691500e-4)
        p = p * f + np.float32(1.3981999507e-3)
        p = p * f + np.float32(8.3334519073e-3)
        p = p * f + np.float32(4.1665795894e-2)
        p = p * f + np.float32(1.6666665459e-1)
        p = p * f + np.float32(5.0000001201e-1)
        p = p * f * f + f + np.float32(1.0)
        two_n = np.int32((np.int32(n) + np.int32(127)) << np.int32(23)).view(np.float32)
        return p * two_n if big else np.float32(0.0)

    return exp_f32


@njit
def _masked_scores(s, scale, mask, has_mask, b, h, i0, j0, kind, T, W, r, P, causal, check):
    """Scale the score tile s in place, write −inf where blocked, add the dense mask (its rows: i0 + a).

    ``mask`` has each axis either full or 1 (broadcast): index i along an axis of length 1 reads 0.
    """
    nq, nk = s.shape
    ninf = -np.inf
    mb, mh = min(b, mask.shape[0] - 1), min(h, mask.shape[1] - 1)
    last_q, last_k = mask.shape[2] - 1, mask.shape[3] - 1
    for a in range(nq):
        qi = i0 + a
        if not check and not has_mask:
            for c in range(nk):
                s[a, c] = s[a, c] * scale
            continue
        mrow = mask[mb, mh, min(qi, last_q)]
        for c in range(nk):
            kj = j0 + c
            x = s[a, c] * scale
            if check and ((causal and kj > qi) or not _visible(kind, T, W, r, P, qi, kj)):
                x = ninf
            elif has_mask:
                x += mrow[min(kj, last_k)]
            s[a, c] = x


def forward(q, k, v, mask, has_mask, H, kind, T, W, r, P, causal, scale, out, lse):
    """out (BH, L, Dv) and lse (BH, L) of attention over q (BH, L, D), k (BH, S, D), v (BH, S, Dv).

    ``mask`` is additive, 4-d, each axis of length 1 or of (B, H, L, S) (read only if ``has_mask``), with
    b = bh // H and h = bh % H; (kind, T, W, r, P) is the pattern (``patterns.visible``), ``causal`` an extra
    k ≤ q condition. The kernel writes ``out`` and ``lse``.
    """
    with _single_threaded_blas():
        _forward(q, k, v, mask, has_mask, H, kind, T, W, r, P, causal, scale, out, lse)


def backward(q, k, v, out, lse, dout, mask, has_mask, H, kind, T, W, r, P, causal, scale, dq, dk, dv, *,
             groups=None):
    """dq, dk, dv of attention (arguments as in ``forward``), from the saved out and lse and dout = ∂loss/∂out.

    ``groups``: key-block groups per head (see the module docstring); None takes enough to give every thread
    a task, ⌈threads / (B·H)⌉, capped at the number of key blocks.
    """
    BH, S = q.shape[0], k.shape[1]
    if groups is None:
        groups = -(-numba.get_num_threads() // max(BH, 1))
    groups = max(1, min(int(groups), -(-S // BK)))
    dq_part = np.empty((BH * groups if groups > 1 else 0, q.shape[1], q.shape[2]), dtype=q.dtype)
    with _single_threaded_blas():
        _backward(q, k, v, out, lse, dout, mask, has_mask, H, kind, T, W, r, P, causal, scale, dq, dk, dv, groups,
                  dq_part)


@njit(parallel=True, cache=True)
def _forward(q, k, v, mask, has_mask, H, kind, T, W, r, P, causal, scale, out, lse):
    """The forward kernel: out (BH, L, Dv) and lse (BH, L) (arguments as in ``forward``).

    One task per (batch·head, query block).
    """
    BH, L = q.shape[0], q.shape[1]
    nqb = (L + BQ - 1) // BQ
    for task in prange(BH * nqb):
        _forward_block(q, k, v, mask, has_mask, H, kind, T, W, r, P, causal, scale, out, lse, task // nqb, task % nqb)


@njit(cache=True, fastmath=FASTMATH)
def _forward_block(q, k, v, mask, has_mask, H, kind, T, W, r, P, causal, scale, out, lse, bh, qb):
    """The forward of one block of BQ queries of one (batch·head) against all its keys."""
    L = q.shape[1]
    S, Dv = k.shape[1], v.shape[2]
    dt = q.dtype
    scale = dt.type(scale)
    ninf = dt.type(-np.inf)
    b, h = bh // H, bh % H
    i0 = qb * BQ
    i1 = min(i0 + BQ, L)
    nq = i1 - i0
    Qi = q[bh, i0:i1]
    acc = np.zeros((nq, Dv), dtype=dt)  # O, unnormalized
    m = np.full(nq, ninf, dtype=dt)  # running row maximum
    lsum = np.zeros(nq, dtype=dt)  # running row sum of exp(s − m)
    alpha = np.empty(nq, dtype=dt)
    sbuf = np.empty(BQ * BK, dtype=dt)
    pv = np.empty((nq, Dv), dtype=dt)
    for j0 in range(0, S, BK):
        j1 = min(j0 + BK, S)
        nk = j1 - j0
        if (causal and j0 > i1 - 1) or not _tile_may_attend(kind, T, W, r, P, i0, i1, j0, j1):
            continue
        check = (causal and j1 - 1 > i0) or not _tile_all_visible(kind, T, W, r, P, i0, i1, j0, j1)
        s = sbuf[: nq * nk].reshape(nq, nk)
        np.dot(Qi, k[bh, j0:j1].T, s)  # S = Q_i K_jᵀ
        _masked_scores(s, scale, mask, has_mask, b, h, i0, j0, kind, T, W, r, P, causal, check)
        for a in range(nq):
            mx = m[a]
            for c in range(nk):
                if s[a, c] > mx:
                    mx = s[a, c]
            if mx == ninf:  # nothing visible in this row yet: P = 0, O and l stay 0
                for c in range(nk):
                    if s[a, c] != s[a, c]:  # a NaN score (skipped by the max) still makes the row NaN
                        lsum[a] = np.nan
                    s[a, c] = 0.0
                alpha[a] = 1.0
                continue
            total = dt.type(0.0)
            for c in range(nk):
                p = exp_nonpositive(s[a, c] - mx)  # P = exp(S − m')
                s[a, c] = p
                total += p
            alpha[a] = exp_nonpositive(m[a] - mx)  # exp(m − m'); 0 on a row's first visible tile
            lsum[a] = alpha[a] * lsum[a] + total
            m[a] = mx
        np.dot(s, v[bh, j0:j1], pv)  # P V_j
        for a in range(nq):
            for d in range(Dv):
                acc[a, d] = alpha[a] * acc[a, d] + pv[a, d]
    for a in range(nq):
        if not lsum[a] <= 0.0:  # (NaN: a NaN or +inf score, which makes the row NaN, as in PyTorch)
            inv = 1.0 / lsum[a]
            for d in range(Dv):
                out[bh, i0 + a, d] = acc[a, d] * inv
            lse[bh, i0 + a] = m[a] + np.log(lsum[a])
        else:  # a fully blocked row
            for d in range(Dv):
                out[bh, i0 + a, d] = 0.0
            lse[bh, i0 + a] = ninf


@njit(parallel=True, cache=True)
def _backward(q, k, v, out, lse, dout, mask, has_mask, H, kind, T, W, r, P, causal, scale, dq, dk, dv, groups,
              dq_part):
    """The backward kernel: dq, dk, dv (arguments as in ``backward``). One task per (batch·head, key-block group);
    with groups > 1, dQ is summed per group into dq_part (B·H·groups, L, D) and then reduced into dq."""
    BH, L, D = q.shape[0], q.shape[1], q.shape[2]
    for task in prange(BH * groups):
        bh, g = task // groups, task % groups
        if groups == 1:
            _backward_head(q, k, v, out, lse, dout, mask, has_mask, H, kind, T, W, r, P, causal, scale, dq[bh], dk,
                           dv, bh, g, groups)
        else:
            _backward_head(q, k, v, out, lse, dout, mask, has_mask, H, kind, T, W, r, P, causal, scale,
                           dq_part[task], dk, dv, bh, g, groups)
    if groups > 1:
        for row in prange(BH * L):
            bh, i = row // L, row % L
            for d in range(D):
                t = dq_part[bh * groups, i, d]
                for g in range(1, groups):
                    t += dq_part[bh * groups + g, i, d]
                dq[bh, i, d] = t


@njit(cache=True, fastmath=FASTMATH)
def _add_into(dst, src):
    """dst += src for 2-d arrays of one shape (a loop: no temporary, nothing for the parfor pass to do)."""
    for a in range(src.shape[0]):
        for d in range(src.shape[1]):
            dst[a, d] += src[a, d]


@njit(cache=True, fastmath=FASTMATH)
def _backward_head(q, k, v, out, lse, dout, mask, has_mask, H, kind, T, W, r, P, causal, scale, dq_acc, dk, dv, bh,
                   g, groups):
    """The backward of group g's key blocks of one (batch·head): key blocks outer (dK_j, dV_j accumulate in dk, dv),
    query blocks inner; this task's share of dQ accumulates in dq_acc (L, D)."""
    L, D = q.shape[1], q.shape[2]
    S, Dv = k.shape[1], v.shape[2]
    dt = q.dtype
    scale = dt.type(scale)
    ninf = dt.type(-np.inf)
    b, h = bh // H, bh % H
    Drow = np.empty(L, dtype=dt)  # D_i = rowsum(dO ∘ O)
    for i in range(L):
        t = dt.type(0.0)
        for d in range(Dv):
            t += dout[bh, i, d] * out[bh, i, d]
        Drow[i] = t
    dq_acc[:] = 0.0
    pbuf = np.empty(BQ * BK, dtype=dt)
    dsbuf = np.empty(BQ * BK, dtype=dt)
    tk = np.empty((BK, D), dtype=dt)
    tv = np.empty((BK, Dv), dtype=dt)
    tq = np.empty((BQ, D), dtype=dt)
    for jb in range((S + BK - 1) // BK):
        turn = jb % (2 * groups)
        if min(turn, 2 * groups - 1 - turn) != g:  # key block jb belongs to another group
            continue
        j0 = jb * BK
        j1 = min(j0 + BK, S)
        nk = j1 - j0
        Kj, Vj = k[bh, j0:j1], v[bh, j0:j1]
        dk[bh, j0:j1] = 0.0
        dv[bh, j0:j1] = 0.0
        i_start = j0 // BQ * BQ if causal else 0  # causal: the query blocks before j0 see nothing here
        for i0 in range(i_start, L, BQ):
            i1 = min(i0 + BQ, L)
            nq = i1 - i0
            if not _tile_may_attend(kind, T, W, r, P, i0, i1, j0, j1):
                continue
            check = (causal and j1 - 1 > i0) or not _tile_all_visible(kind, T, W, r, P, i0, i1, j0, j1)
            Qi, dOi = q[bh, i0:i1], dout[bh, i0:i1]
            p = pbuf[: nq * nk].reshape(nq, nk)
            np.dot(Qi, Kj.T, p)  # S = Q_i K_jᵀ
            _masked_scores(p, scale, mask, has_mask, b, h, i0, j0, kind, T, W, r, P, causal, check)
            for a in range(nq):
                la = lse[bh, i0 + a]
                if la == ninf:  # a fully blocked row: P = 0
                    for c in range(nk):
                        p[a, c] = 0.0
                else:
                    for c in range(nk):
                        p[a, c] = exp_nonpositive(p[a, c] - la)  # P = exp(S − lse)
            np.dot(p.T, dOi, tv[:nk])  # dV_j += Pᵀ dO_i
            _add_into(dv[bh, j0:j1], tv[:nk])
            ds = dsbuf[: nq * nk].reshape(nq, nk)
            np.dot(dOi, Vj.T, ds)  # dP = dO_i V_jᵀ
            for a in range(nq):
                Da = Drow[i0 + a]
                for c in range(nk):
                    ds[a, c] = p[a, c] * (ds[a, c] - Da) * scale  # dS = P ∘ (dP − D), times scale
            np.dot(ds, Kj, tq[:nq])  # dQ_i += dS K_j
            _add_into(dq_acc[i0:i1], tq[:nq])
            np.dot(ds.T, Qi, tk[:nk])  # dK_j += dSᵀ Q_i
            _add_into(dk[bh, j0:j1], tk[:nk])


__all__ = ["forward", "backward", "BQ", "BK"]
