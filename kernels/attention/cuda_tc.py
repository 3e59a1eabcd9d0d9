"""FlashAttention-2 on tensor cores, forward and backward, for float16 and bfloat16 CuPy arrays.

numba.cuda cannot reach the tensor cores (nor compute in half precision), so this form is CUDA C++:
``flash_tc.cu`` (FlashAttention-2, Dao 2023: algorithm 1 forward, algorithm 2 backward, on ``mma.sync`` m16n8k16
instructions), compiled on first use by NVRTC through a CuPy ``RawModule`` and launched on CuPy arrays. Importing
this module needs neither CuPy nor a GPU; only calling ``attention_forward`` or ``attention_backward`` does.

The signatures are the family's (see ``kernels.attention``)::

    out, lse = attention_forward(q, k, v, scale=None, mask=None, causal=False, pattern=None)
    dq, dk, dv = attention_backward(q, k, v, out, lse, dout, scale=None, mask=None, causal=False, pattern=None)

with these differences, all checked:

- q, k, v (and out, dout) are float16 or bfloat16 (a dtype named ``bfloat16``, e.g. ml_dtypes'), computed with
  fp32 accumulation; ``out`` has the inputs' dtype and ``lse`` is float32 (the backward needs it more precisely
  than half precision holds it, as FlashAttention keeps it);
- dq, dk, dv have the inputs' dtype (as PyTorch's gradients have the parameters' dtype, and FlashAttention's):
  each is accumulated in fp32 in registers and rounded once, so it is within one rounding of the fp32 sum;
- the head dimension is one of ``HEAD_DIMS`` and v's equals q's.

The backward is two kernels and no atomics, so its result is deterministic: ``flash_backward_dq`` (per query
tile: D = rowsum(dO ∘ O), then dQ) and ``flash_backward_dkdv`` (per key tile: dK and dV, reading D).

``mask`` (boolean, True = may attend, or additive), ``causal`` and ``pattern`` mean what they mean in the other
forms; the additive mask is read in float32 through broadcast strides, never expanded to (B, H, L, S).
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path
from typing import NamedTuple

import numpy as np

from ..dispatch import data_ptr
from . import patterns

BQ = 64  # queries per thread block (flash_tc.cu's BQ): forward and flash_backward_dq
BK = 64  # keys per thread block of flash_backward_dkdv (flash_tc.cu's BK)
THREADS = 128  # threads per block: 4 warps of 16 query rows
HEAD_DIMS = (32, 64, 128)  # the instantiated head dimensions (multiples of the mma's k = 16)
ELEMENTS = {"float16": "__half", "bfloat16": "__nv_bfloat16"}  # dtype name -> CUDA type
SOURCE = Path(__file__).with_name("flash_tc.cu")


def source() -> str:
    """The CUDA C++ source of the kernel."""
    return SOURCE.read_text()


KERNELS = ("flash_forward", "flash_backward_dq", "flash_backward_dkdv")  # the kernel templates of flash_tc.cu


def kernel_name(element: str, head_dim: int, kernel: str = "flash_forward") -> str:
    """The C++ name of ``kernel`` (one of ``KERNELS``) for ``element`` ("float16" or "bfloat16") and a head
    dimension."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    return f"{kernel}<{ELEMENTS[element]}, {int(head_dim)}>"


def include_dirs() -> list[str]:
    """Where cuda_fp16.h and cuda_bf16.h are: the NVIDIA wheel's include folder (found by cuda.pathfinder, which
    comes with numba-cuda), else a toolkit's ``$CUDA_PATH/include``; NVRTC searches no folder by itself."""
    dirs = []
    try:
        from cuda import pathfinder

        found = pathfinder.find_nvidia_header_directory("cudart")
        if found:
            dirs.append(str(found))
    except Exception:  # no cuda.pathfinder, or no headers in the wheels: fall back to a toolkit
        pass
    for var in ("CUDA_PATH", "CUDA_HOME"):
        root = os.environ.get(var)
        if root and Path(root, "include", "cuda_fp16.h").exists():
            dirs.append(str(Path(root, "include")))
    if Path("/usr/local/cuda/include/cuda_fp16.h").exists():
        dirs.append("/usr/local/cuda/include")
    return list(dict.fromkeys(dirs))


def compile_options() -> tuple[str, ...]:
    """The NVRTC options (CuPy adds the target architecture of the current device)."""
    return ("-std=c++17", *(f"-I{d}" for d in include_dirs()))


@functools.cache
def _module(element: str, head_dim: int, kernels: tuple[str, ...]):
    """The compiled kernels (NVRTC, once per process and (element, head_dim, kernels); CuPy also caches on disk)."""
    import cupy

    names = tuple(kernel_name(element, head_dim, kern) for kern in kernels)
    module = cupy.RawModule(code=source(), options=compile_options(), name_expressions=names)
    return tuple(module.get_function(name) for name in names)


def _kernel(element: str, head_dim: int, kernel: str = "flash_forward"):
    """One compiled kernel; the two backward kernels are compiled together."""
    backward = KERNELS[1:]
    if kernel in backward:
        return _module(element, head_dim, backward)[backward.index(kernel)]
    return _module(element, head_dim, (kernel,))[0]


class Launch(NamedTuple):
    """Everything one launch needs: the kernel's identity, the grid, the arguments, and the outputs."""

    element: str
    head_dim: int
    grid: tuple[int, int]
    block: tuple[int]
    args: tuple
    out: object  # (B·H, L, D), the inputs' dtype
    lse: object  # (B·H, L), float32
    lead: tuple[int, ...]  # the caller's leading axes: (B, H) or (N,)

    def results(self):
        """(out, lse) in the caller's layout: (B, H, L, D) and (B, H, L), or without the head axis."""
        return self.out.reshape(self.lead + self.out.shape[1:]), self.lse.reshape(self.lead + self.lse.shape[1:])


class BackwardLaunch(NamedTuple):
    """The two launches of the backward: flash_backward_dq, then flash_backward_dkdv (which reads its delta)."""

    element: str
    head_dim: int
    dq_grid: tuple[int, int]  # (ceil(L / BQ), B·H)
    dkdv_grid: tuple[int, int]  # (ceil(S / BK), B·H)
    block: tuple[int]
    dq_args: tuple
    dkdv_args: tuple
    dq: object  # (B·H, L, D), the inputs' dtype
    dk: object  # (B·H, S, D)
    dv: object  # (B·H, S, D)
    delta: object  # (B·H, L) float32: D = rowsum(dO ∘ O), written by the first kernel
    lead: tuple[int, ...]

    def results(self):
        """(dq, dk, dv) in the caller's layout."""
        return tuple(a.reshape(self.lead + a.shape[1:]) for a in (self.dq, self.dk, self.dv))


def _element_of(dtype, element):
    name = np.dtype(dtype).name
    if element is None:
        if name not in ELEMENTS:
            raise TypeError(
                f"cuda_tc computes in float16 or bfloat16, got {name}; float32 and float64 go to form='cuda'"
            )
        return name
    if element not in ELEMENTS:
        raise ValueError(f"element must be one of {tuple(ELEMENTS)}, got {element!r}")
    if name != element and name != "uint16":
        raise TypeError(f"element {element} needs {element} arrays or uint16 arrays of its bits, got {name}")
    return element


def _kernel_array(xp, a):
    """a as a C-contiguous array whose data is 16-byte aligned (the kernel copies rows 16 bytes at a time)."""
    a = xp.ascontiguousarray(a)
    return a if data_ptr(a) % 16 == 0 else a.copy()


def _mask_arg(xp, mask, shape4, ndim):
    """The additive fp32 mask and its strides in elements over (B, H, L, S), 0 along broadcast axes."""
    if mask is None:
        return xp.zeros(1, dtype=np.float32), (0, 0, 0, 0), 0
    m = xp.asarray(mask)
    m = xp.where(m, 0.0, -np.inf).astype(np.float32) if m.dtype == np.bool_ else m.astype(np.float32)
    if ndim == 3:  # a mask broadcastable to (N, L, S) reads as (N, 1, L, S)
        m = m.reshape((1,) * (3 - m.ndim) + m.shape)[:, None]
    if m.ndim > 4:
        raise ValueError(f"mask of shape {mask.shape} does not broadcast to {shape4}")
    m = xp.ascontiguousarray(m.reshape((1,) * (4 - m.ndim) + m.shape))
    if any(n not in (1, full) for n, full in zip(m.shape, shape4)):
        raise ValueError(f"mask of shape {mask.shape} does not broadcast to {shape4}")
    strides = tuple(0 if n == 1 else st // m.itemsize for n, st in zip(m.shape, m.strides))
    return m, strides, 1


class _Layout(NamedTuple):
    xp: object
    element: str
    D: int
    L: int
    S: int
    BH: int
    flat: tuple  # q, k, v as C-contiguous, 16-byte aligned (B·H, rows, D) arrays
    tail: tuple  # the kernels' trailing arguments: L, S, H, scale, mask, its 4 strides, has_mask, pattern, causal


def _layout(q, k, v, scale, mask, causal, pattern, element) -> _Layout:
    """Check q, k, v and the masks, and lay out what every kernel of flash_tc.cu takes."""
    if isinstance(q, np.ndarray):
        xp = np
    else:
        import cupy as xp
    if q.ndim not in (3, 4) or k.ndim != q.ndim or v.ndim != q.ndim:
        raise ValueError(f"q, k, v must all be 3-d or 4-d, got {q.shape}, {k.shape}, {v.shape}")
    if k.dtype != q.dtype or v.dtype != q.dtype:
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    element = _element_of(q.dtype, element)
    if k.shape[:-2] != q.shape[:-2] or v.shape[:-1] != k.shape[:-1] or k.shape[-1] != q.shape[-1]:
        raise ValueError(f"incompatible shapes q {q.shape}, k {k.shape}, v {v.shape}")
    D = q.shape[-1]
    if D not in HEAD_DIMS or v.shape[-1] != D:
        raise ValueError(f"cuda_tc needs q, k, v with one head dimension in {HEAD_DIMS}, got {D} and {v.shape[-1]}")
    shape4 = q.shape if q.ndim == 4 else (q.shape[0], 1) + q.shape[1:]
    B, H, L, _ = shape4
    S = k.shape[-2]
    BH = math.prod(q.shape[:-2])
    flat = tuple(_kernel_array(xp, a.reshape((BH,) + a.shape[-2:])) for a in (q, k, v))
    if L == 0 or BH == 0:
        raise ValueError(f"cuda_tc needs at least one query, got q of shape {q.shape}")
    if BH > 65535:  # the grid's y dimension
        raise ValueError(f"cuda_tc launches one grid row per (batch, head): at most 65535, got {BH}")
    m, mask_strides, has_mask = _mask_arg(xp, mask, (B, H, L, S), q.ndim)
    (kind, T, W, r, P), extra_causal = patterns.resolve(pattern, causal)
    scale = 1.0 / math.sqrt(D) if scale is None else float(scale)
    i32 = np.int32
    tail = (
        i32(L), i32(S), i32(H), np.float32(scale),
        m, *(np.int64(s) for s in mask_strides), i32(has_mask),
        i32(kind), i32(T), i32(W), i32(r), i32(P), i32(extra_causal),
    )  # fmt: skip
    return _Layout(xp, element, D, L, S, BH, flat, tail)


def prepare(q, k, v, *, scale=None, mask=None, causal=False, pattern=None, element=None) -> Launch:
    """Check the arguments and lay out one launch of ``flash_forward``, for NumPy or CuPy arrays alike.

    ``element`` names the type when the arrays hold its bits as uint16 (for array libraries without a bfloat16
    dtype); by default it is the arrays' dtype. ``attention_forward`` launches the result on a GPU; the tests feed
    it to a CPU emulation of the kernel.
    """
    lay = _layout(q, k, v, scale, mask, causal, pattern, element)
    out = lay.xp.empty((lay.BH, lay.L, lay.D), dtype=q.dtype)
    lse = lay.xp.empty((lay.BH, lay.L), dtype=np.float32)
    grid = ((lay.L + BQ - 1) // BQ, lay.BH)
    return Launch(lay.element, lay.D, grid, (THREADS,), (*lay.flat, out, lse, *lay.tail), out, lse, q.shape[:-2])


def prepare_backward(
    q, k, v, out, lse, dout, *, scale=None, mask=None, causal=False, pattern=None, element=None
) -> BackwardLaunch:
    """Check the arguments and lay out the two launches of the backward (as ``prepare`` does the forward's).

    out and dout are shaped and typed like q; lse like q without its last axis (any float dtype, read as float32).
    """
    lay = _layout(q, k, v, scale, mask, causal, pattern, element)
    xp = lay.xp
    for name, a in (("out", out), ("dout", dout)):
        if a.shape != q.shape or a.dtype != q.dtype:
            raise ValueError(f"{name} must have q's shape {q.shape} and dtype {q.dtype}, got {a.shape} {a.dtype}")
    if lse.shape != q.shape[:-1]:
        raise ValueError(f"lse must have shape {q.shape[:-1]} (q's without the head dimension), got {lse.shape}")
    of, dof = (_kernel_array(xp, a.reshape((lay.BH,) + a.shape[-2:])) for a in (out, dout))
    lf = xp.ascontiguousarray(lse.reshape(lay.BH, lay.L), dtype=np.float32)
    qf, kf, vf = lay.flat
    delta = xp.empty((lay.BH, lay.L), dtype=np.float32)
    dq = xp.empty((lay.BH, lay.L, lay.D), dtype=q.dtype)
    dk, dv = (xp.empty((lay.BH, lay.S, lay.D), dtype=q.dtype) for _ in range(2))
    dq_args = (qf, kf, vf, of, dof, lf, delta, dq, *lay.tail)
    dkdv_args = (qf, kf, vf, dof, lf, delta, dk, dv, *lay.tail)
    dq_grid = ((lay.L + BQ - 1) // BQ, lay.BH)
    dkdv_grid = ((lay.S + BK - 1) // BK, lay.BH)
    return BackwardLaunch(lay.element, lay.D, dq_grid, dkdv_grid, (THREADS,), dq_args, dkdv_args, dq, dk, dv, delta,
                          q.shape[:-2])  # fmt: skip


def attention_forward(q, k, v, *, scale=None, mask=None, causal=False, pattern=None):
    """(out, lse): softmax(Q Kᵀ · scale + mask) V and its row log-sum-exp, on tensor cores.

    q (B, H, L, D) or (N, L, D), k and v with S keys; float16 or bfloat16 CuPy arrays on a GPU. out has the
    inputs' dtype, lse is float32 (B, H, L). A row that may attend to nothing gets out = 0 and lse = −inf.
    """
    if isinstance(q, np.ndarray):
        raise TypeError("cuda_tc runs on CuPy arrays on a GPU; NumPy arrays go to form='cpu'")
    launch = prepare(q, k, v, scale=scale, mask=mask, causal=causal, pattern=pattern)
    _kernel(launch.element, launch.head_dim)(launch.grid, launch.block, launch.args)
    return launch.results()


def attention_backward(q, k, v, out, lse, dout, *, scale=None, mask=None, causal=False, pattern=None):
    """(dq, dk, dv): the gradients through ``attention_forward`` given dout = ∂loss/∂out, on tensor cores.

    q, k, v, out, dout float16 or bfloat16 CuPy arrays as in the forward, lse its float32 output. The gradients
    have the inputs' dtype (accumulated in fp32, rounded once); a row that attends to nothing gets zero gradients.
    Deterministic: two kernels, no atomics.
    """
    if isinstance(q, np.ndarray):
        raise TypeError("cuda_tc runs on CuPy arrays on a GPU; NumPy arrays go to form='cpu'")
    launch = prepare_backward(q, k, v, out, lse, dout, scale=scale, mask=mask, causal=causal, pattern=pattern)
    run_backward(launch)
    return launch.results()


def run_backward(launch: BackwardLaunch) -> None:
    """Launch the two backward kernels of ``launch`` (CuPy arrays) on the current stream, dq's first."""
    _kernel(launch.element, launch.head_dim, "flash_backward_dq")(launch.dq_grid, launch.block, launch.dq_args)
    if launch.dkdv_grid[0] > 0:  # no keys: dk and dv are empty (and a grid of width 0 is a launch error)
        dkdv = _kernel(launch.element, launch.head_dim, "flash_backward_dkdv")
        dkdv(launch.dkdv_grid, launch.block, launch.dkdv_args)


__all__ = [
    "attention_forward",
    "attention_backward",
    "prepare",
    "prepare_backward",
    "source",
    "kernel_name",
    "compile_options",
    "HEAD_DIMS",
    "ELEMENTS",
    "KERNELS",
]
