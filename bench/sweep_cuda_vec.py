"""Launch shapes of the CUDA C++ kernels on a GPU: `python -m bench.sweep_cuda_vec` (needs a GPU and CuPy).

kernels/schedule/cuda_vec.py launches fused_update.cu with 256 threads a block and at most WAVES blocks per SM (32,
set from this sweep on an H200), each thread taking Philox block after Philox block (a grid-stride loop). Whether a
thread's one float4 load per array in flight during its draw keeps HBM busy depends on how many threads there are:
this times every update at 64×3×1024×1024 float32 for grids of 1 … 32 blocks per SM and blocks of 128 and 256 threads
(GPU time per call: 20 calls queued between two CUDA events, as the bench's stream time), beside the numba.cuda form
(printed by its form name, `cuda`) and a copy of the same bytes, each shape with the kernel compiled for one Philox
block a thread per trip (the default) and for two (FU_UNROLL = 2: both blocks' loads in flight before the first draw),
and checks that every shape gives the default launch's result bit for bit. It prints one line per shape: ms, GB/s and
the fraction of the copy's GB/s — what to set cuda_vec.WAVES, UNROLL and the block size to.

Then the Gumbel-softmax forward (kernels/gumbel/softmax_rows.cu) at 16384×8192 float32, seeded, soft, as the bench
times it: one block a row, compiled for blocks of 256 (the default: 8 float4 chunks of the row a thread), 512 (4)
and 1024 (2) threads — fewer registers a thread, more threads an SM — and grids of one block per row or GRID_MAX;
each result is checked against the default launch's (within float32 rounding: the block sums in another order).
"""

from __future__ import annotations

import numpy as np

from bench import schedule as schedule_bench
from bench.harness import Backend, measure_stream

SHAPE = (64, 3, 1024, 1024)
WAVES = (1, 2, 4, 8, 16, 32)  # blocks of the grid per SM
BLOCKS = (128, 256)  # threads per block (fused_update.cu's __launch_bounds__ is 256)
UNROLLS = (1, 2)  # Philox blocks a thread per trip (cuda_vec.UNROLL, fused_update.cu's FU_UNROLL)
GUMBEL_SHAPE = (16384, 8192)
GUMBEL_THREADS = (256, 512, 1024)


def configs(sm: int, waves=WAVES, blocks=BLOCKS) -> list[tuple[int, int]]:
    """The (grid, block) shapes to time on a GPU with `sm` multiprocessors."""
    return [(w * sm, b) for b in blocks for w in waves]


def main():
    """Print the sweep (see the module docstring)."""
    import cupy

    from kernels.dispatch import sm_count
    from kernels.schedule import cuda_vec
    from kernels.schedule.cpu import ddim_coefficients, ddpm_coefficients, q_sample_coefficients
    from kernels.schedule.reference import Schedule

    sched = Schedule.linear(schedule_bench.T_STEPS)
    backend = Backend("cuda")
    x, eps, t = schedule_bench._inputs(SHAPE)  # the bench's inputs
    x, eps = cupy.asarray(x), cupy.asarray(eps)
    copy_dst = cupy.empty_like(x)
    copy_s = measure_stream(lambda: cupy.copyto(copy_dst, x))
    copy_gbs = 2 * x.nbytes / copy_s / 1e9
    nbytes = 3 * x.nbytes
    print(f"{cupy.cuda.runtime.getDeviceProperties(0)['name'].decode()}, {sm_count()} SMs; shape {SHAPE} float32; "
          f"copy {copy_s * 1e3:.3f} ms = {copy_gbs:.0f} GB/s")
    # the launches of cuda_vec.run, built once per update and then launched with other shapes
    coefs = {"q_sample": (None, q_sample_coefficients(sched, t), True),
             "ddpm_step": (eps, ddpm_coefficients(sched, t, None, "posterior"), False),
             "ddim_step": (eps, ddim_coefficients(sched, t, t - 1, 0.0), False)}
    for name in coefs:
        for form in ("cuda", "cuda_vec"):  # as the bench times them (its inputs: the same shape, seed and t's)
            s = measure_stream(schedule_bench._ours(backend, name, SHAPE, form)())
            print(f"{name:10s} {form:9s} default launch  {s * 1e3:7.3f} ms {nbytes / s / 1e9:6.0f} GB/s "
                  f"{nbytes / s / 1e9 / copy_gbs:6.1%} of copy")
        e, coef, want_noise = coefs[name]
        base = cuda_vec.launch_args(x, e, coef, np.inf, 1, None, want_noise)
        cuda_vec._kernels()[base.instance]((base.grid,), (base.block,), base.args)
        want = base.out.copy()
        for unroll in UNROLLS:
            kernel = cuda_vec._kernels(unroll)[base.instance]
            for grid, block in configs(sm_count()):
                launch = cuda_vec.launch_args(x, e, coef, np.inf, 1, None, want_noise, grid=grid, unroll=unroll)
                s = measure_stream(lambda: kernel((grid,), (block,), launch.args))  # noqa: B023 (timed here, now)
                same = bool(cupy.array_equal(launch.out, want))
                print(f"{name:10s} cuda_vec  unroll {unroll} grid {grid:5d} × {block:3d}  {s * 1e3:7.3f} ms "
                      f"{nbytes / s / 1e9:6.0f} GB/s {nbytes / s / 1e9 / copy_gbs:6.1%} of copy"
                      f"{'' if same else '  RESULT DIFFERS FROM THE DEFAULT'}")
    gumbel(copy_gbs)


def gumbel(copy_gbs):
    """The Gumbel-softmax forward's block sizes and grids (see the module docstring)."""
    import cupy

    from bench.gumbel import nbytes_moved
    from kernels.gumbel import cuda_vec

    logits = cupy.asarray(np.random.default_rng(0).standard_normal(GUMBEL_SHAPE, dtype=np.float32))
    nbytes = nbytes_moved(*GUMBEL_SHAPE, 4, backward=False)
    want = None
    for threads in GUMBEL_THREADS:
        kernel = cuda_vec._kernels(threads)[True]
        for grid in (GUMBEL_SHAPE[0], cuda_vec.GRID_MAX):
            launch = cuda_vec.launch_args(logits, 1.0, False, seed=1, grid=grid, threads=threads)
            s = measure_stream(lambda: kernel((launch.grid,), (launch.block,), launch.args))  # noqa: B023
            y_soft = launch.result[1]
            if want is None:
                want = y_soft.copy()
            same = bool(cupy.allclose(y_soft, want, rtol=1e-5, atol=1e-7))
            print(f"gumbel     cuda_vec  grid {launch.grid:5d} × {threads:4d}  {s * 1e3:7.3f} ms "
                  f"{nbytes / s / 1e9:6.0f} GB/s {nbytes / s / 1e9 / copy_gbs:6.1%} of copy"
                  f"{'' if same else '  RESULT DIFFERS FROM THE DEFAULT'}")


if __name__ == "__main__":
    main()
