"""The diffusion updates for float32 CuPy arrays as a CUDA C++ kernel (fused_update.cu) with 128-bit loads and stores.

numba.cuda cannot load or store a float4, so its form (cuda.py) gives each Philox block's four normals to four
threads through shared memory, to keep a warp's accesses contiguous. In C++ one thread takes a whole block: its four
consecutive elements are one 16-byte load per array and one store, a warp's covering 512 contiguous bytes, with no
shared memory and no barrier. Same signatures as the other forms, same noise (kernels/philox.py's float32 noise,
within an ulp or two: the GPU fuses multiply-adds), same arithmetic as cuda.py; float32 arrays only (float64 ones go
to form="cuda"). Compiled on first use by NVRTC through a CuPy RawModule; importing this module needs neither CuPy
nor a GPU. `launch_args` builds a launch that the tests also run through a CPU build of the same source.

The default form for float32 CuPy arrays (kernels/schedule/__init__.py): a GPU measured it faster than cuda.py
(`t2i bench schedule --device cuda` times both).
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import NamedTuple

import numpy as np

from kernels import philox
from kernels.dispatch import array_module, data_ptr, sm_count
from kernels.schedule.cpu import updates
from kernels.schedule.reference import check_update, given_noise

SOURCE = Path(__file__).with_name("fused_update.cu")
# the kernel's instances (has_e, seeded, write_z): q_sample drawing or given its noise, a step drawing or not
INSTANCES = ((False, True, True), (False, False, False), (True, True, False), (True, False, False))
THREADS = 256  # fused_update.cu's __launch_bounds__
# Blocks of the grid per SM, at most; the grid-stride loop takes the rest. From `python -m bench.sweep_cuda_vec` on an
# H200 (bench/results/cuda-2026-11-26-1456-all.log): 32 was the best or within noise of it for all three updates
# (q_sample / DDPM / DDIM 89.5% / 90.9% / 98.3% of copy, against 88.0% / 81.3% / 95.2% at 4).
WAVES = 32
UNROLL = 1  # Philox blocks a thread per trip (fused_update.cu's FU_UNROLL): 2 measured no faster on the H200


def source() -> str:
    """fused_update.cu behind philox.py's constants and philox.cuh (kernels.philox.cuda_source)."""
    return philox.cuda_source(SOURCE.read_text())


def kernel_name(has_e: bool, seeded: bool, write_z: bool) -> str:
    """The C++ name of the kernel's instance for one kind of update."""
    flags = ", ".join("true" if f else "false" for f in (has_e, seeded, write_z))
    return f"fused_update<{flags}>"


def options(unroll: int = UNROLL) -> tuple:
    """The compiler options for `unroll` Philox blocks a thread per trip of the loop (1, 2 or 4)."""
    if unroll not in (1, 2, 4):
        raise ValueError(f"unroll must be 1, 2 or 4, got {unroll}")
    return ("-std=c++17", f"-DFU_UNROLL={unroll}")


@functools.cache
def _kernels(unroll: int = UNROLL):
    """Every instance, compiled once per process by NVRTC (CuPy also caches on disk) for `unroll` Philox blocks a
    trip: {(has_e, seeded, write_z): f}."""
    import cupy

    names = [kernel_name(*k) for k in INSTANCES]
    module = cupy.RawModule(code=source(), options=options(unroll), name_expressions=names)
    return {k: module.get_function(name) for k, name in zip(INSTANCES, names)}


class Launch(NamedTuple):
    """One launch: the instance (has_e, seeded, write_z), grid and block sizes, the kernel's arguments in order, and
    what the call returns."""

    instance: tuple
    grid: int
    block: int
    args: tuple
    out: object
    noise: object


def launch_args(x, e, coef, clip, seed, noise, want_noise, out=None, *, grid=None, unroll=UNROLL) -> Launch:
    """Check the arguments and build the launch (with no arguments when there is nothing to launch: an empty array)
    of the kernel compiled for `unroll` Philox blocks a trip (`_kernels(unroll)`). `out` as in the other forms; grid:
    the number of blocks (default: one per THREADS·unroll Philox blocks, at most WAVES per SM)."""
    xp = array_module(x)
    if x.dtype != np.float32:
        raise TypeError(f"cuda_vec computes float32 arrays, got {x.dtype}; float64 arrays go to form='cuda'")
    e, noise, out, z_given = check_update(x, e, seed, noise, want_noise, out, xp.asarray)
    xc = xp.ascontiguousarray(x)
    n = x.size
    res = xp.empty_like(xc) if out is None else out
    per_sample = max(n // max(coef.shape[0], 1), 1)
    has_e = e is not None
    e_c = xp.ascontiguousarray(e) if has_e else xc
    # no sample adds noise and none is returned (DDIM with η = 0, DDPM's last step): nothing to draw, as in cuda.py
    seeded = seed is not None and (want_noise or bool(np.any(coef[:, 5] != 0.0)))
    k0, k1 = philox.seed_key(seed) if seeded else (0, 0)
    z_c = xc if noise is None else xp.ascontiguousarray(noise, dtype=np.float32)
    z_out = (xp.empty_like(xc) if z_given is None else z_given) if seeded and want_noise else xc
    if n >= 2**50:
        raise ValueError(f"{n} elements: the kernel's float64 sample index is exact below 2**50")
    noise_back = (z_out if want_noise else None) if seeded else given_noise(noise, z_given)
    instance = (has_e, seeded, seeded and want_noise)
    if n == 0:
        return Launch(instance, 0, THREADS, (), res, noise_back)
    vec = all(data_ptr(a) % 16 == 0 for a in (xc, e_c, z_c, z_out, res))
    if grid is None:
        grid = min(math.ceil(math.ceil(n / 4) / (THREADS * unroll)), WAVES * (sm_count() if xp is not np else 1))
    coefn = xp.asarray(np.ascontiguousarray(coef[:, 3:], dtype=np.float32))
    args = (xc, e_c, xp.asarray(np.ascontiguousarray(coef, dtype=np.float64)), coefn, np.float64(1.0 / per_sample),
            np.float64(clip), np.uint32(k0), np.uint32(k1), z_c, z_out, res, np.int64(n), np.int32(vec))
    return Launch(instance, grid, THREADS, args, res, noise_back)


def run(x, e, coef, clip, seed, noise, want_noise, out=None):
    """Launch fused_update on CuPy arrays; returns (result, noise or None)."""
    launch = launch_args(x, e, coef, clip, seed, noise, want_noise, out)
    if launch.args:
        _kernels()[launch.instance]((launch.grid,), (launch.block,), launch.args)
    return launch.out, launch.noise


q_sample, ddpm_step, ddim_step = updates(run, array=lambda a: a, check=lambda a: None)
