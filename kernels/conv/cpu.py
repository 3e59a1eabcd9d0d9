"""2-D convolution on the CPU with Numba: im2col into a per-thread buffer, then one BLAS GEMM per tile.

For a task — a few images, one group g, a tile of output rows — im2col copies the receptive fields into a matrix
cols (R = C/G·kh·kw rows, one per tap (c, i, j); one column per output position of the task's images, side by side;
Chellapilla et al. 2006), and the three products of convolution are GEMMs with the weights W_g (K/G, R) (equations
of reference.py):

    forward (1):          Y[·, g]   = W_g · cols                       (K/G × R) · (R × P)
    input gradient (3):   dcols     = W_gᵀ · dY[·, g],  then col2im    (R × K/G) · (K/G × P)
    weight gradient (4):  dW_g     += dY[·, g] · colsᵀ                 (K/G × P) · (P × R)

col2im is the adjoint of im2col: it adds every entry of dcols back onto the input pixel it was copied from.
The buffer is sized to stay in the L2 cache (`plan`: several small images to a task, so the GEMMs are not thin; a
tile of output rows when one image would not fit), so im2col writes it and the GEMM reads it back from cache.

Parallelism: the tasks are split into one contiguous range per thread (prange over the threads, so each thread
allocates its buffers once), and each thread calls a single-threaded BLAS. The input gradient's tasks hold whole
images, since neighbouring row tiles add into the same input rows; the weight gradient keeps one partial sum per
thread and adds them in thread order at the end (no atomics: the same call gives the same bits every time).

3×3 stride-1 convolutions with enough channels (`_winograd`) take Winograd's minimal filtering instead (winograd.py:
F(2×2, 3×3) for the forward and the input gradient, F(3×3, 2×2) for the weight gradient — 16 multiplies per tile
where im2col's GEMMs do 36).
"""

from __future__ import annotations

import contextlib

import numba
import numpy as np
from numba import njit, prange

from . import winograd

# Elements of the im2col buffer (per thread): 1 MiB in float32, inside a 2 MiB L2 with room for the GEMM's panels.
COLS_BUDGET = 1 << 18
# 3×3, stride 1, no dilation or groups, at least this many input and output channels: Winograd F(2×2, 3×3)
# (winograd.py) for the forward and both gradients. Below it the GEMMs are too thin to pay for the transforms
# (2 threads, N = 64, 16×16, forward / input gradient / weight gradient against im2col: 1.45× / 1.22× / 1.51×
# faster at 64 channels, 1.34× / 0.99× / 1.69× at 32, 0.94× / 0.63× / – at 16).
WINOGRAD_MIN_CHANNELS = 32


@njit(cache=True, inline="always")
def _valid_range(n_out, start, step, size):
    """The outputs o in [lo, hi) whose input coordinate start + o·step lies in [0, size)."""
    lo = 0
    if start < 0:
        lo = (-start + step - 1) // step
    hi = 0
    if size - 1 - start >= 0:
        hi = (size - 1 - start) // step + 1
    lo = min(lo, n_out)
    hi = min(hi, n_out)
    return lo, max(lo, hi)


# The copy loops below run over 0-based views. A loop "for q in range(lo, hi): dst[q] = src[q + shift]" is not
# vectorized (Numba must allow for negative indices wrapping around) and runs ~10x slower.


@njit(cache=True, inline="always")
def _copy(dst, src):
    for t in range(dst.shape[0]):
        dst[t] = src[t]


@njit(cache=True, inline="always")
def _add(dst, src):
    for t in range(src.shape[0]):
        dst[t] += src[t]


@njit(cache=True, inline="always")
def _zero(dst):
    for t in range(dst.shape[0]):
        dst[t] = 0


@njit(cache=True)
def _im2col(x, n, c0, cg, kh, kw, sh, sw, pt, pl, dh, dw, oh0, oh1, wo, cols, q0):
    """cols[(c·kh + i)·kw + j, q0 + (oh − oh0)·Wo + ow] = x[n, c0 + c, oh·sh − pt + i·dh, ow·sw − pl + j·dw] (or 0).

    With unit strides and Wo = W (a "same" convolution, the common case), output row oh reads the whole input row
    oh − pt + i·dh shifted by the same number of columns, so a row of cols is the flat input plane shifted by one
    offset: one long copy, then the few entries that wrapped across a row edge are zeroed (short copies, one per
    output row, cost as much as the GEMM). The geometry of tap (i, j) is worked out once for all channels.
    """
    h_in, w_in = x.shape[2], x.shape[3]
    flat = sh == 1 and sw == 1 and wo == w_in
    m = oh1 - oh0
    for i in range(kh):
        top = oh0 * sh - pt + i * dh  # input row read at oh = oh0
        a, b = _valid_range(m, top, sh, h_in)  # the oh − oh0 that read inside the image
        for j in range(kw):
            col0 = j * dw - pl  # input column read at ow = 0
            lo, hi = _valid_range(wo, col0, sw, w_in)  # the ow that read inside a row
            first, last = a * wo + lo, (b - 1) * wo + hi  # flat path: positions q in [first, last) read q + shift
            shift = top * w_in + col0
            for c in range(cg):
                crow = cols[(c * kh + i) * kw + j, q0 : q0 + m * wo]  # a 1-D view: this image's part of the row
                _zero(crow[: a * wo])
                _zero(crow[b * wo :])
                if a == b:
                    continue
                if flat and lo < hi:
                    _copy(crow[first:last], x[n, c0 + c].reshape(h_in * w_in)[first + shift :])
                for r in range(a, b):
                    p = r * wo
                    for ow in range(lo):
                        crow[p + ow] = 0
                    for ow in range(hi, wo):
                        crow[p + ow] = 0
                    if not flat:
                        _copy(crow[p + lo : p + hi], x[n, c0 + c, top + r * sh, col0 + lo * sw :: sw])


@njit(cache=True)
def _col2im(dcols, dx, n, c0, cg, kh, kw, sh, sw, pt, pl, dh, dw, oh0, oh1, wo, q0):
    """The adjoint of _im2col: dx[n, c0 + c, h, w] += dcols[row, q0 + p] for every tap that read (h, w).

    Same fast path: the entries of dcols that would wrap across a row edge are zeroed (dcols is scratch), then one
    long add into the flat plane.
    """
    h_in, w_in = dx.shape[2], dx.shape[3]
    flat = sh == 1 and sw == 1 and wo == w_in
    m = oh1 - oh0
    for i in range(kh):
        top = oh0 * sh - pt + i * dh
        a, b = _valid_range(m, top, sh, h_in)
        for j in range(kw):
            col0 = j * dw - pl
            lo, hi = _valid_range(wo, col0, sw, w_in)
            if a == b or lo == hi:
                continue
            first, last = a * wo + lo, (b - 1) * wo + hi
            shift = top * w_in + col0
            for c in range(cg):
                drow = dcols[(c * kh + i) * kw + j, q0 : q0 + m * wo]
                if flat:
                    for r in range(a, b):
                        p = r * wo
                        for ow in range(lo):
                            drow[p + ow] = 0
                        for ow in range(hi, wo):
                            drow[p + ow] = 0
                    _add(dx[n, c0 + c].reshape(h_in * w_in)[first + shift :], drow[first:last])
                else:
                    for r in range(a, b):
                        p = r * wo
                        _add(dx[n, c0 + c, top + r * sh, col0 + lo * sw :: sw], drow[p + lo : p + hi])


def plan(r, n_img, ho, wo, threads):
    """(images, rows) per task: the im2col matrix of one task, R × (images · rows · Wo), fits COLS_BUDGET.

    Small images go several to a task (one wider GEMM instead of many thin ones), but no more than keeps every
    thread busy; an image too large for the budget is cut into tiles of a few output rows.
    """
    per_image = r * ho * wo
    if per_image <= COLS_BUDGET:
        return max(1, min(COLS_BUDGET // max(1, per_image), -(-n_img // threads))), ho
    return 1, max(1, min(ho, COLS_BUDGET // max(1, r * wo)))


@njit(cache=True, inline="always")
def _task(task, n_img, groups, ho, imgs, rows):
    """Task → (first image, images, group, first output row, end row); tasks run over (images, group, row tile)."""
    tiles = (ho + rows - 1) // rows
    batch, rest = divmod(task, groups * tiles)
    g, tile = divmod(rest, tiles)
    n0 = batch * imgs
    return n0, min(imgs, n_img - n0), g, tile * rows, min(ho, (tile + 1) * rows)


@njit(cache=True, inline="always")
def _n_tasks(n_img, groups, ho, imgs, rows):
    return ((n_img + imgs - 1) // imgs) * groups * ((ho + rows - 1) // rows)


@njit(cache=True)
def _gather(a, n0, nb, k0, kg, p0, p, out):
    """out[:, b·p : (b + 1)·p] = a[n0 + b, k0 : k0 + kg, p0 : p0 + p]: one task's slab of a (N, K, Ho·Wo) array."""
    for b in range(nb):
        for k in range(kg):
            _copy(out[k, b * p : (b + 1) * p], a[n0 + b, k0 + k, p0:])


@njit(cache=True)
def _scatter(o, a, n0, nb, k0, kg, p0, p):
    """The inverse of _gather: a[n0 + b, k0 : k0 + kg, p0 : p0 + p] = o[:, b·p : (b + 1)·p]."""
    for b in range(nb):
        for k in range(kg):
            _copy(a[n0 + b, k0 + k, p0 : p0 + p], o[k, b * p :])


@njit(cache=True)
def _forward_tasks(x, w3, y, kh, kw, sh, sw, pt, pl, dh, dw, ho, wo, imgs, rows, task0, task1):
    """Tasks [task0, task1) of the forward (y as (N, K, Ho·Wo)): im2col of the task's images and rows, one GEMM."""
    n_img, c = x.shape[0], x.shape[1]
    groups, kg, r = w3.shape
    cg = c // groups
    buf = np.empty(r * imgs * rows * wo, dtype=x.dtype)
    out = np.empty(kg * imgs * rows * wo, dtype=x.dtype)
    for task in range(task0, task1):
        n0, nb, g, oh0, oh1 = _task(task, n_img, groups, ho, imgs, rows)
        p = (oh1 - oh0) * wo
        cols = buf[: r * nb * p].reshape(r, nb * p)
        for b in range(nb):
            _im2col(x, n0 + b, g * cg, cg, kh, kw, sh, sw, pt, pl, dh, dw, oh0, oh1, wo, cols, b * p)
        if nb == 1 and p == ho * wo:  # one whole image: the GEMM writes straight into y
            np.dot(w3[g], cols, y[n0, g * kg : (g + 1) * kg])
        else:
            o = out[: kg * nb * p].reshape(kg, nb * p)
            np.dot(w3[g], cols, o)
            _scatter(o, y, n0, nb, g * kg, kg, oh0 * wo, p)


@njit(parallel=True, cache=True)
def _forward(x, w3, y, kh, kw, sh, sw, pt, pl, dh, dw, ho, wo, imgs, rows, threads):
    """y (N, K, Ho·Wo) = conv2d(x, w) with w3 = w as (G, K/G, R): one contiguous range of tasks per thread."""
    tasks = _n_tasks(x.shape[0], w3.shape[0], ho, imgs, rows)
    threads = max(1, min(threads, tasks))
    for t in prange(threads):
        _forward_tasks(x, w3, y, kh, kw, sh, sw, pt, pl, dh, dw, ho, wo, imgs, rows,
                       t * tasks // threads, (t + 1) * tasks // threads)


@njit(cache=True)
def _backward_input_tasks(gy, w3t, dx, kh, kw, sh, sw, pt, pl, dh, dw, ho, wo, imgs, rows, task0, task1):
    """Tasks [task0, task1) of the input gradient (gy as (N, K, Ho·Wo)): per row tile, one GEMM, then col2im.

    A task takes whole images and walks their row tiles itself: neighbouring row tiles add into the same input
    rows, so they must not run on different threads.
    """
    n_img, c = dx.shape[0], dx.shape[1]
    groups, r, kg = w3t.shape
    cg = c // groups
    buf = np.empty(r * imgs * rows * wo, dtype=dx.dtype)
    gbuf = np.empty(kg * imgs * rows * wo, dtype=dx.dtype)
    for task in range(task0, task1):
        n0, nb, g, _, _ = _task(task, n_img, groups, ho, imgs, ho)
        for oh0 in range(0, ho, rows):
            oh1 = min(ho, oh0 + rows)
            p = (oh1 - oh0) * wo
            dcols = buf[: r * nb * p].reshape(r, nb * p)
            if nb == 1 and p == ho * wo:
                np.dot(w3t[g], gy[n0, g * kg : (g + 1) * kg], dcols)
            else:
                gt = gbuf[: kg * nb * p].reshape(kg, nb * p)
                _gather(gy, n0, nb, g * kg, kg, oh0 * wo, p, gt)
                np.dot(w3t[g], gt, dcols)
            for b in range(nb):
                _col2im(dcols, dx, n0 + b, g * cg, cg, kh, kw, sh, sw, pt, pl, dh, dw, oh0, oh1, wo, b * p)


@njit(parallel=True, cache=True)
def _backward_input(gy, w3t, dx, kh, kw, sh, sw, pt, pl, dh, dw, ho, wo, imgs, rows, threads):
    """dx (N, C, H, W, zeroed) += col2im(W_gᵀ · gy) with w3t = w as (G, R, K/G); tasks are (images, group)."""
    tasks = _n_tasks(dx.shape[0], w3t.shape[0], ho, imgs, ho)
    threads = max(1, min(threads, tasks))
    for t in prange(threads):
        _backward_input_tasks(gy, w3t, dx, kh, kw, sh, sw, pt, pl, dh, dw, ho, wo, imgs, rows,
                              t * tasks // threads, (t + 1) * tasks // threads)


@njit(cache=True)
def _backward_weight_tasks(x, gy, dw3, kh, kw, sh, sw, pt, pl, dh, dw, ho, wo, imgs, rows, task0, task1):
    """dw3 (G, K/G, R) += Σ over tasks [task0, task1) of gy-slab · colsᵀ (gy as (N, K, Ho·Wo))."""
    n_img, c = x.shape[0], x.shape[1]
    groups, kg, r = dw3.shape
    cg = c // groups
    buf = np.empty(r * imgs * rows * wo, dtype=x.dtype)
    gbuf = np.empty(kg * imgs * rows * wo, dtype=x.dtype)
    prod = np.empty((kg, r), dtype=x.dtype)
    for task in range(task0, task1):
        n0, nb, g, oh0, oh1 = _task(task, n_img, groups, ho, imgs, rows)
        p = (oh1 - oh0) * wo
        cols = buf[: r * nb * p].reshape(r, nb * p)
        for b in range(nb):
            _im2col(x, n0 + b, g * cg, cg, kh, kw, sh, sw, pt, pl, dh, dw, oh0, oh1, wo, cols, b * p)
        if nb == 1 and p == ho * wo:
            np.dot(gy[n0, g * kg : (g + 1) * kg], cols.T, prod)
        else:
            gt = gbuf[: kg * nb * p].reshape(kg, nb * p)
            _gather(gy, n0, nb, g * kg, kg, oh0 * wo, p, gt)
            np.dot(gt, cols.T, prod)
        dw3[g] += prod


@njit(parallel=True, cache=True)
def _backward_weight(x, gy, dw3, kh, kw, sh, sw, pt, pl, dh, dw, ho, wo, imgs, rows, threads):
    """dw3 (G, K/G, R) = Σ_n gy[n, g] · colsᵀ; one partial sum per thread, added in thread order at the end."""
    tasks = _n_tasks(x.shape[0], dw3.shape[0], ho, imgs, rows)
    threads = max(1, min(threads, tasks))
    partial = np.zeros((threads,) + dw3.shape, dtype=dw3.dtype)
    for t in prange(threads):
        _backward_weight_tasks(x, gy, partial[t], kh, kw, sh, sw, pt, pl, dh, dw, ho, wo, imgs, rows,
                               t * tasks // threads, (t + 1) * tasks // threads)
    dw3[:] = partial[0]
    for t in range(1, threads):
        dw3 += partial[t]


# --- the public signature (raw NumPy arrays, NCHW) ------------------------------------------------------------

_blas = None


def _one_blas_thread():
    """A context in which BLAS runs single-threaded, since our own threads each call it on their own tile.

    A multithreaded BLAS called from several threads at once oversubscribes the cores (and OpenBLAS built for
    pthreads, called inside Numba's OpenMP loop, serializes the calls and warns that it "may hang"). The limit
    is set through threadpoolctl (a dependency of scikit-learn) for the call and restored after it.
    """
    global _blas
    if _blas is None:
        try:
            import scipy.linalg.cython_blas  # noqa: F401 - the BLAS Numba's np.dot calls, loaded so it is found
            from threadpoolctl import ThreadpoolController

            _blas = ThreadpoolController().select(user_api="blas")
        except ImportError:
            _blas = False
    return _blas.limit(limits=1) if _blas else contextlib.nullcontext()



def _pads(padding):
    from .reference import pair_padding

    return pair_padding(padding)


def _out_hw(x_hw, w_hw, stride, pads, dilation):
    return tuple((x_hw[a] + pads[a][0] + pads[a][1] - dilation[a] * (w_hw[a] - 1) - 1) // stride[a] + 1
                 for a in (0, 1))


def _winograd(w_shape, stride, dilation, groups):
    """Whether the forward and input gradient go through winograd.py (see WINOGRAD_MIN_CHANNELS)."""
    k, cg, kh, kw = w_shape
    return ((kh, kw) == (3, 3) and tuple(stride) == (1, 1) and tuple(dilation) == (1, 1) and groups == 1
            and min(k, cg) >= WINOGRAD_MIN_CHANNELS)


def _check_dtype(*arrays):
    dtype = arrays[0].dtype
    if dtype not in (np.float32, np.float64) or any(a.dtype != dtype for a in arrays):
        raise TypeError(f"conv kernels take float32 or float64 arrays of one dtype, got {[a.dtype for a in arrays]}")


def conv2d_forward(x, w, *, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1, bias=None):
    """y = conv2d(x, w) (+ bias): x (N, C, H, W), w (K, C/groups, kh, kw) -> (N, K, Ho, Wo), as reference."""
    _check_dtype(x, w)
    x = np.ascontiguousarray(x)
    (pt, pb), (pl, pr) = pads = _pads(padding)
    k, cg, kh, kw = w.shape
    ho, wo = _out_hw(x.shape[2:], (kh, kw), stride, pads, dilation)
    r = cg * kh * kw
    threads = numba.get_num_threads()
    if _winograd(w.shape, stride, dilation, groups):
        with _one_blas_thread():
            y = winograd.conv3x3(x, winograd.filters(w), pt, pl, ho, wo, threads)
    else:
        y = np.empty((x.shape[0], k, ho * wo), dtype=x.dtype)
        if y.size:
            w3 = np.ascontiguousarray(w).reshape(groups, k // groups, r)
            with _one_blas_thread():
                _forward(x, w3, y, kh, kw, stride[0], stride[1], pt, pl, dilation[0], dilation[1], ho, wo,
                         *plan(r, x.shape[0], ho, wo, threads), threads)
        y = y.reshape(x.shape[0], k, ho, wo)
    if bias is not None:
        y += bias.reshape(1, k, 1, 1)
    return y


def conv2d_backward_input(gy, w, x_shape, *, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1):
    """dL/dx of conv2d (also conv_transpose2d's forward): gy (N, K, Ho, Wo) -> an array of x_shape, as reference."""
    _check_dtype(gy, w)
    n, k, ho, wo = gy.shape
    gy = np.ascontiguousarray(gy).reshape(n, k, ho * wo)
    (pt, _), (pl, _) = _pads(padding)
    k, cg, kh, kw = w.shape
    r = cg * kh * kw
    if _winograd(w.shape, stride, dilation, groups):  # dx = gy ⋆ (w flipped, channels swapped), padded 2 − p
        flipped = np.ascontiguousarray(w.transpose(1, 0, 2, 3)[:, :, ::-1, ::-1])
        with _one_blas_thread():
            return winograd.conv3x3(gy.reshape(n, k, ho, wo), winograd.filters(flipped), 2 - pt, 2 - pl,
                                    x_shape[2], x_shape[3], numba.get_num_threads())
    dx = np.zeros(x_shape, dtype=gy.dtype)
    if dx.size and gy.size:
        threads = numba.get_num_threads()
        w3t = np.ascontiguousarray(np.ascontiguousarray(w).reshape(groups, k // groups, r).transpose(0, 2, 1))
        with _one_blas_thread():
            _backward_input(gy, w3t, dx, kh, kw, stride[0], stride[1], pt, pl, dilation[0], dilation[1], ho, wo,
                            *plan(r, n, ho, wo, threads), threads)
    return dx


def conv2d_backward_weight(x, gy, w_shape, *, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1):
    """dL/dw of conv2d, summed over the images and gy's positions: an array of w_shape, as reference."""
    _check_dtype(x, gy)
    n, k_out, ho, wo = gy.shape
    x, gy = np.ascontiguousarray(x), np.ascontiguousarray(gy).reshape(n, k_out, ho * wo)
    (pt, _), (pl, _) = _pads(padding)
    k, cg, kh, kw = w_shape
    r = cg * kh * kw
    if _winograd(w_shape, stride, dilation, groups):
        with _one_blas_thread():
            return winograd.weight_grad(x, gy.reshape(n, k_out, ho, wo), pt, pl, numba.get_num_threads())
    dw3 = np.zeros((groups, k // groups, r), dtype=x.dtype)
    if x.size and gy.size:
        threads = numba.get_num_threads()
        with _one_blas_thread():
            _backward_weight(x, gy, dw3, kh, kw, stride[0], stride[1], pt, pl, dilation[0], dilation[1], ho, wo,
                             *plan(r, n, ho, wo, threads), threads)
    return dw3.reshape(w_shape)
