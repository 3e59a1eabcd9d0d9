"""Where a numba.cuda launch spends its time on the host: `python -m bench.launch_overhead` (needs a GPU).

On a GPU our elementwise kernels measured a floor of ~0.5 ms per call at any size (PyTorch: ~0.05 ms), so the
time is spent before the kernel runs. This times, per call (median of 200 calls, synchronized once at the end):
an empty kernel with one argument, the same with fourteen (the schedule kernel's count), arguments passed as
CuPy arrays, as the Numba device arrays they wrap, through the dispatcher or a kernel compiled for its signature,
and through kernels.dispatch.launch (Numba's compiled kernel launched by CuPy); then the GPU time of the schedule,
Gumbel and attention kernels (CUPTI, through PyTorch's profiler) and cProfile of DDIM steps.
"""

from __future__ import annotations

import cProfile
import pstats
import statistics
import time

import numpy as np

from bench.harness import measure, measure_stream


def _per_call(fn, sync, n=200):
    fn()
    sync()
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n // 5):
            fn()
        sync()
        times.append((time.perf_counter() - t0) / (n // 5))
    return statistics.median(times) * 1e6


def main():
    """Print the per-call times (µs) and the profile."""
    import cupy
    from numba import cuda

    from kernels import schedule
    from kernels.dispatch import cuda_array, launch

    sync = cupy.cuda.Device().synchronize

    @cuda.jit
    def one(a):
        pass

    @cuda.jit
    def many(a, b, c, d, e, f, g, h, i, j, k, m, n, o):
        pass

    x = cupy.zeros(1024, dtype=cupy.float32)
    coef_host = np.zeros((64, 6))
    xd = cuda_array(x)
    nd = cuda.device_array(1024, dtype=np.float32)
    args = (1, 2.0, True, np.uint64(3), np.uint64(4), False, 1.0, True)
    rows = {
        "empty kernel, 1 CuPy array": lambda: one[1, 32](x),
        "empty kernel, 1 wrapped CuPy array (cuda_array)": lambda: one[1, 32](cuda_array(x)),
        "empty kernel, 1 Numba device array": lambda: one[1, 32](nd),
        "cuda_array(x) alone": lambda: cuda_array(x),
        "empty kernel, 6 Numba arrays + 8 scalars": lambda: many[1, 32](nd, nd, nd, nd, nd, nd, *args),
        "empty kernel, 6 wrapped CuPy arrays + 8 scalars": lambda: many[1, 32](xd, xd, xd, xd, xd, xd, *args),
        "cupy elementwise x * 2 (for scale)": lambda: x * 2,
        "cupy.asarray of a (64, 6) float64 host array": lambda: cupy.asarray(coef_host),
    }
    configured = one[1, 32]  # the launch configuration built once
    rows["empty kernel, configuration reused, 1 Numba array"] = lambda: configured(nd)
    stream = cuda.default_stream()
    rows["empty kernel on cuda.default_stream(), 1 Numba array"] = lambda: one[1, 32, stream](nd)
    try:  # numba-cuda 0.30 turns the stream argument into a cuda.core Stream at every launch configuration
        from numba.cuda.cudadrv import driver

        core_stream = driver._to_core_stream(0)
        rows["empty kernel on a cuda.core Stream made once, 1 Numba array"] = lambda: one[1, 32, core_stream](nd)
        rows["driver._to_core_stream(0) alone"] = lambda: driver._to_core_stream(0)
    except Exception as e:  # a private helper of one numba-cuda version: report and go on
        print("cuda.core stream variant unavailable:", type(e).__name__, e)
    raw = cupy.RawKernel(r'extern "C" __global__ void one(float* a) {}', "one")
    rows["empty CuPy RawKernel, 1 CuPy array"] = lambda: raw((1,), (32,), (x,))
    try:
        sig_kernel = cuda.jit("void(float32[::1])")(one.py_func)
        rows["empty kernel compiled for its signature, 1 Numba array"] = lambda: sig_kernel[1, 32](nd)
    except Exception as e:  # report and go on
        print("signature compile failed:", type(e).__name__, e)
    rows["empty kernel through kernels.dispatch.launch, 1 CuPy array"] = lambda: launch(one, 1, 32, x)
    rows["empty kernel through kernels.dispatch.launch, 6 CuPy arrays + 8 scalars"] = lambda: launch(
        many, 1, 32, x, x, x, x, x, x, *args)
    sched = schedule.Schedule.linear(1000)
    xs = cupy.zeros((64, 3, 64, 64), dtype=cupy.float32)
    t = np.arange(1, 65) * 10
    rows["schedule.ddim_step (64,3,64,64)"] = lambda: schedule.ddim_step(xs, xs, t, t - 1, sched, 0.0, seed=1)
    for name, fn in rows.items():
        try:
            print(f"{_per_call(fn, sync):9.1f} µs  {name}", flush=True)
        except Exception as e:  # report and go on
            print(f"{'error':>9}     {name}: {type(e).__name__}: {e}", flush=True)
    big = cupy.zeros((64, 3, 512, 512), dtype=cupy.float32)
    big_rows = {"q_sample (64,3,512,512)": lambda: schedule.q_sample(big, t, sched, seed=1),
                "ddim_step (64,3,512,512)": lambda: schedule.ddim_step(big, big, t, t - 1, sched, 0.0, seed=1)}
    for name, fn in big_rows.items():
        gpu = measure_stream(fn, sync=sync)  # 20 calls queued back to back, between CUDA events
        wall = measure(fn, repeats=10, sync=sync).median  # one call, synchronized
        print(f"{name}: {gpu * 1e3:.3f} ms GPU (stream of calls), {wall * 1e3:.3f} ms wall (one call, synchronized)")
    try:  # kernel durations on the GPU itself (CUPTI through PyTorch's profiler sees every kernel in the process)
        import torch
        from torch.profiler import ProfilerActivity, profile

        from kernels import attention, gumbel

        logits = cupy.zeros((16384, 8192), dtype=cupy.float32)
        q = cupy.asarray(np.random.default_rng(0).standard_normal((4, 8, 1024, 64), dtype=np.float32))
        o, lse = attention.attention_forward(q, q, q, causal=True)
        with profile(activities=[ProfilerActivity.CUDA]) as kp:
            for _ in range(5):
                schedule.q_sample(big, t, sched, seed=1)
                schedule.ddim_step(big, big, t, t - 1, sched, 0.0, seed=1)
                schedule.ddim_step(big, big, t, t - 1, sched, 1.0, seed=1)
                # the CUDA C++ form beside it (kernels fused_update<…>)
                schedule.q_sample(big, t, sched, seed=1, form="cuda_vec")
                schedule.ddim_step(big, big, t, t - 1, sched, 0.0, seed=1, form="cuda_vec")
                schedule.ddim_step(big, big, t, t - 1, sched, 1.0, seed=1, form="cuda_vec")
                gumbel.gumbel_softmax_forward(logits, seed=1)
                gumbel.gumbel_softmax_forward(logits, seed=1, form="cuda_vec")  # kernel gumbel_softmax_rows<true>
                attention.attention_forward(q, q, q, causal=True)
                attention.attention_backward(q, q, q, o, lse, o, causal=True)
            torch.cuda.synchronize()
        print(kp.key_averages().table(sort_by="cuda_time_total", row_limit=20, max_name_column_width=60))
    except Exception as e:  # report and go on
        print("kernel profile unavailable:", type(e).__name__, e)
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(50):
        schedule.ddim_step(xs, xs, t, t - 1, sched, 0.0, seed=1)
    sync()
    prof.disable()
    pstats.Stats(prof).sort_stats("cumulative").print_stats(30)


if __name__ == "__main__":
    main()
