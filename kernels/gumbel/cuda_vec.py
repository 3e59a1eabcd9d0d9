"""Gumbel-softmax forward for float32 CuPy arrays as a CUDA C++ kernel (softmax_rows.cu) holding each row in registers.

The numba.cuda form (cuda.py) keeps a row's noise in shared memory and reads its logits twice; in C++ each of a
block's threads holds its float4 chunks of the row — logits and noise — in registers, so the row is read once (128
bits at a time) and written once. Same signature and same noise as the other forms (kernels/philox.py's float32
Gumbel noise, within a couple of ulps: the GPU fuses multiply-adds), same arithmetic as cuda.py for float32 rows.
Rows along `dim` of at most MAX_ROW values, a multiple of 4, float32; anything else is refused with the reason (it
goes to form="cuda"). The backward is cuda.py's (`gumbel_softmax_backward`, re-exported). Compiled on first use by
NVRTC through a CuPy RawModule; importing this module needs neither CuPy nor a GPU. `launch_args` builds a launch
that the tests also run through a CPU build of the same source.

The default forward for the CuPy arrays it `takes` (kernels/gumbel/__init__.py): on an H200 it ran 16384×8192 in
0.72 ms where cuda.py took 1.05 (`t2i bench gumbel --device cuda` times both).
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import NamedTuple

import numpy as np

from kernels import philox
from kernels.dispatch import array_module, data_ptr
from kernels.gumbel.reference import as_rows, check_dim, check_forward

SOURCE = Path(__file__).with_name("softmax_rows.cu")
THREADS = 256  # softmax_rows.cu's GS_THREADS, by default (bench.sweep_cuda_vec times others)
MAX_ROW = 4 * THREADS * 8  # GS_CHUNKS float4 chunks per thread
GRID_MAX = 8192
LOG2_E = 1.0 / math.log(2.0)


def source() -> str:
    """softmax_rows.cu behind philox.py's constants and philox.cuh (kernels.philox.cuda_source)."""
    return philox.cuda_source(SOURCE.read_text())


def kernel_name(seeded: bool) -> str:
    """The C++ name of the kernel's instance that draws its noise (seeded) or reads it."""
    return f"gumbel_softmax_rows<{'true' if seeded else 'false'}>"


def options(threads: int = THREADS) -> tuple:
    """The compiler options for blocks of `threads` threads (a power of 2 from 32 to 1024), each holding the float4
    chunks that rows of MAX_ROW values need."""
    if threads & (threads - 1) or not 32 <= threads <= 1024:
        raise ValueError(f"threads must be a power of 2 from 32 to 1024, got {threads}")
    return ("-std=c++17", f"-DGS_THREADS={threads}", f"-DGS_CHUNKS={max(MAX_ROW // (4 * threads), 1)}")


@functools.cache
def _kernels(threads: int = THREADS):
    """{seeded: the kernel instance}, compiled by NVRTC for blocks of `threads` threads."""
    import cupy

    names = [kernel_name(s) for s in (True, False)]
    module = cupy.RawModule(code=source(), options=options(threads), name_expressions=names)
    return {s: module.get_function(kernel_name(s)) for s in (True, False)}


class Launch(NamedTuple):
    """One launch: the instance (seeded), grid and block sizes, the arguments in order, and what the call returns."""

    seeded: bool
    grid: int
    block: int
    args: tuple
    result: tuple


def takes(logits, dim=-1) -> bool:
    """Whether this form computes `logits` along `dim`: float32 rows of a multiple of 4 values, at most MAX_ROW (the
    dispatcher asks before it picks this form over cuda.py; anything else goes there)."""
    if logits.dtype != np.float32 or not isinstance(dim, (int, np.integer)) or not -logits.ndim <= dim < logits.ndim:
        return False
    n = logits.shape[dim]
    return n % 4 == 0 and n <= MAX_ROW


def launch_args(logits, tau=1.0, hard=False, *, seed=None, noise=None, dim=-1, grid=None, threads=THREADS) -> Launch:
    """Check the arguments and build the launch (args empty when there is nothing to compute) for the kernel compiled
    for blocks of `threads` threads (`_kernels(threads)`); grid: the number of blocks (default: a row each, at most
    GRID_MAX)."""
    xp = array_module(logits)
    check_forward(logits, tau, seed, noise)
    if logits.dtype != np.float32:
        raise TypeError(f"cuda_vec computes float32 logits, got {logits.dtype}; float64 ones go to form='cuda'")
    dim = check_dim(dim, logits.ndim)
    n = logits.shape[dim]
    if n % 4 or n > MAX_ROW:
        raise ValueError(f"cuda_vec takes rows of a multiple of 4 values up to {MAX_ROW}, got {n}; use form='cuda'")
    if seed is not None and dim != logits.ndim - 1:  # the noise of the original layout, then the axis moved
        if xp is np:  # (the tests' CPU build)
            from kernels.gumbel import reference

            noise = reference.gumbel_noise(seed, logits.shape, np.float32)
        else:
            from kernels.gumbel import cuda

            noise = cuda.gumbel_noise(seed, logits.shape, np.float32, xp)
        seed = None
    l2 = as_rows(logits, dim)
    g2 = as_rows(xp.asarray(noise, dtype=np.float32), dim) if noise is not None else l2
    ys2 = xp.empty_like(l2)
    y2 = xp.empty_like(l2) if hard else ys2
    shape = xp.moveaxis(logits, dim, -1).shape
    y_soft = xp.moveaxis(ys2.reshape(shape), -1, dim)
    result = ((xp.moveaxis(y2.reshape(shape), -1, dim) if hard else y_soft), y_soft)
    seeded = seed is not None
    if l2.size == 0:
        return Launch(seeded, 0, threads, (), result)
    l2, g2 = (a if data_ptr(a) % 16 == 0 else a.copy() for a in (l2, g2))  # float4 loads (copies are aligned)
    k0, k1 = philox.seed_key(seed) if seeded else (0, 0)
    rows = l2.shape[0]
    args = (l2, g2, np.int64(rows), np.int32(n), np.float64(LOG2_E / tau), np.int32(bool(hard)), np.uint32(k0),
            np.uint32(k1), y2, ys2)
    return Launch(seeded, grid or min(rows, GRID_MAX), threads, args, result)


def gumbel_softmax_forward(logits, tau=1.0, hard=False, *, seed=None, noise=None, dim=-1):
    """Sample y ~ Gumbel-softmax(logits, τ) along `dim`, one block per row holding it in registers; returns
    (y, y_soft)."""
    launch = launch_args(logits, tau, hard, seed=seed, noise=noise, dim=dim)
    if launch.args:
        _kernels()[launch.seeded]((launch.grid,), (launch.block,), launch.args)
    return launch.result


def gumbel_softmax_backward(grad_y, y_soft, tau=1.0, *, dim=-1):
    """cuda.py's backward (a read of two arrays and a write of one: no noise, nothing to hold in registers)."""
    from kernels.gumbel import cuda

    return cuda.gumbel_softmax_backward(grad_y, y_soft, tau, dim=dim)


def gumbel_noise(seed, shape, dtype=np.float64):
    """cuda.py's noise kernel."""
    from kernels.gumbel import cuda

    return cuda.gumbel_noise(seed, shape, dtype)
