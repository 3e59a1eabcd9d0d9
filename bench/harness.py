"""The measuring machinery every benchmark family shares: timing, peak memory, thread pinning, machine info.

A benchmark is a list of `Case`s. A case is one workload (say, causal attention forward+backward at N = 1024)
with an explicit amount of work — floating-point operations or bytes moved, counted once from the problem
size, the same count for every implementation — and one `Impl` per implementation of it: our CPU kernel, the
NumPy reference, the engine op, PyTorch (or, on a GPU, our CUDA kernel and PyTorch CUDA). An `Impl` is a
*setup* function returning the zero-argument callable to time, so that inputs are built outside the timed
region and only while that implementation is measured.

For each implementation the harness records:

- time: the median of `repeats` calls (more for a fast call, up to `max_repeats`, until the calls have taken
  `min_time_s`) after `warmup` untimed calls (the warm-up also triggers Numba's
  compilation), read with `time.perf_counter`; the median, not the mean, because a loaded machine adds
  one-sided outliers;
- rate: work / time, as GFLOP/s or GB/s, and its fraction of this machine's peak measured at the run's start and
  end (`bench.peak`: float32 GEMM for FLOPs, a large copy for bytes; the better of the two probes);
- on a CPU, for an elementwise case (GB/s), its fraction of a copy of the same bytes timed just before and just
  after it (`fraction_of_copy`, of the better copy): this project's VM moved its copy bandwidth between 35 and
  57 GB/s within minutes, so a fraction of the run's peak alone can read 70% or 139% for the same kernel;
- ratio: our time / PyTorch's time in the same run (below 1: faster than PyTorch);
- on a GPU, also the stream time: the time per call of 20 calls queued back to back, read by CUDA events
  around them. A synchronized call's time is the host's launch work plus the GPU's; queued calls overlap the
  two, as a sampling or training loop does, so where the host is the faster this is the GPU's time per call and
  its rate the kernel's own (where the host is the slower, it is the host's time: an upper bound). Both are
  reported (`median_ms`, `stream_ms`), with rates, fractions of peak and ratios to PyTorch for each;
- peak memory: bytes allocated during one extra call at their peak, outputs included. Two probes, the
  larger reported: `tracemalloc` sees NumPy's allocations and Numba's (its runtime reports to tracemalloc
  too), not PyTorch's; the resident-set high-water mark (`VmHWM`, reset through /proc/self/clear_refs)
  sees everything the process touches, PyTorch included, but misses memory reused from the allocator's free
  lists — so PyTorch's CPU figure is a lower bound, and unknown (None) when the resident set did not grow.
  On a GPU: the CuPy pool's and PyTorch's allocator's peaks.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
import tracemalloc
from collections.abc import Callable
from typing import Any

MiB = 2**20

TORCH = "torch"  # the name of the implementation every other one is compared with


class UnavailableError(Exception):
    """Raised by a setup function when its implementation cannot run here (kernel missing, no GPU, ...)."""


@dataclasses.dataclass
class Impl:
    """One implementation of a case: `setup()` builds the inputs and returns the callable to time."""

    name: str
    setup: Callable[[], Callable[[], Any]]


@dataclasses.dataclass
class Case:
    """One workload measured in several implementations.

    work: FLOPs (unit "GFLOP/s") or bytes (unit "GB/s") of one call, counted from the problem size.
    plot: where the case goes in its family's figure, or None: a dict (or a list of them) with "panel" (the
    subplot's title), "series" (line label; the implementation's name is appended), "x" and "xlabel", and
    optionally "metric" (the result's field on the y axis: "median_ms", the default, or "peak_mib").
    """

    family: str
    name: str
    work: float
    unit: str
    impls: list[Impl]
    params: dict = dataclasses.field(default_factory=dict)
    plot: dict | list | None = None


@dataclasses.dataclass
class Timing:
    """The repeat times of one implementation (seconds) and their median."""

    times: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.times)


def measure(fn, *, repeats=5, warmup=1, budget_s=float("inf"), min_repeats=3, min_time_s=0.0, max_repeats=None,
            clock=time.perf_counter, sync=None) -> Timing:
    """Time `fn()`: `warmup` untimed calls, then `repeats` timed ones — and more, up to `max_repeats`, until the timed
    calls have taken `min_time_s` in all, so that a fast call's median rests on enough calls that a few stalls of a
    shared machine cannot move it.

    Stops early once the timed calls have taken `budget_s` in all and at least `min_repeats` were made (a
    slow reference need not run five times to be known slow). `sync` (e.g. a CUDA synchronize) runs after
    every call, inside the timed region, so asynchronous work is counted.
    """
    sync = sync or (lambda: None)
    for _ in range(warmup):
        fn()
        sync()
    times = []
    while len(times) < max(repeats, max_repeats or 0):
        start = clock()
        fn()
        sync()
        times.append(clock() - start)
        if sum(times) >= budget_s and len(times) >= min_repeats:
            break
        if len(times) >= repeats and sum(times) >= min_time_s:
            break
    return Timing(times)


def measure_stream(fn, *, calls=20, sync=None) -> float:
    """Seconds per call of `calls` calls of fn queued back to back on the GPU, after one synchronized warm-up.

    CUDA events (CuPy's) on the null stream, which our kernels and PyTorch's both run on, bracket the calls; none
    is synchronized until the last, so the host prepares call k + 1 while the GPU runs call k.
    """
    import cupy

    sync = sync or cupy.cuda.Device().synchronize
    fn()
    sync()
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    start.record()
    for _ in range(calls):
        fn()
    end.record()
    end.synchronize()
    sync()
    return cupy.cuda.get_elapsed_time(start, end) / 1e3 / calls


def rate(work: float, seconds: float) -> float:
    """Work per second in units of 10⁹ (GFLOP/s or GB/s)."""
    return work / seconds / 1e9


def summarize(case: Case, timings: dict, peak: dict, memory: dict | None = None,
              stream: dict | None = None) -> list[dict]:
    """One result row per implementation of `case`: time, rate, fraction of peak, ratio to PyTorch, memory.

    timings maps an implementation's name to its `Timing`, or to a string saying why it did not run.
    peak holds the machine's measured "GFLOP/s" and "GB/s". memory maps names to `memory_peak` results, stream
    names to `measure_stream` seconds (on a GPU).
    """
    memory, stream = memory or {}, stream or {}
    torch_stream = stream.get(TORCH)
    torch_t = timings.get(TORCH)
    torch_s = torch_t.median if isinstance(torch_t, Timing) else None
    rows = []
    for impl in case.impls:
        t = timings.get(impl.name, "not run")
        row = {"family": case.family, "case": case.name, "impl": impl.name, "params": case.params,
               "work": case.work, "unit": case.unit, "plot": case.plot}
        if not isinstance(t, Timing):
            row.update(status="unavailable", reason=str(t))
            rows.append(row)
            continue

        def figures(prefix, seconds, torch_seconds):  # rate and ratio to PyTorch of one time
            return {f"{prefix}rate": rate(case.work, seconds),
                    f"{prefix}ratio_to_torch": seconds / torch_seconds if torch_seconds and impl.name != TORCH
                    else None}

        row.update(status="ok", median_ms=t.median * 1e3, times_ms=[x * 1e3 for x in t.times],
                   torch_ms=torch_s * 1e3 if torch_s is not None else None, **figures("", t.median, torch_s))
        if impl.name in stream:
            row.update(stream_ms=stream[impl.name] * 1e3, **figures("stream_", stream[impl.name], torch_stream))
        row.update(memory.get(impl.name, {}))
        rows.append(row)
    return set_fractions(rows, peak)


def set_fractions(rows: list[dict], peak: dict) -> list[dict]:
    """Each measured row's rates as fractions of the machine's peak in the row's unit (None where unknown)."""
    for row in rows:
        machine = peak.get(row.get("unit"))
        for prefix in ("", "stream_"):
            if row.get(f"{prefix}rate") is not None:
                row[f"{prefix}fraction_of_peak"] = row[f"{prefix}rate"] / machine if machine else None
    return rows


def set_copy_fractions(rows: list[dict], copy_gbs: float) -> list[dict]:
    """Each measured row's rate as a fraction of a copy of the case's bytes timed beside it (copy_gbs GB/s)."""
    for row in rows:
        if row.get("rate") is not None:
            row.update(copy_gbs=copy_gbs, fraction_of_copy=row["rate"] / copy_gbs)
    return rows


# --- memory -------------------------------------------------------------------------------------


def _proc_status_mib(key):
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    return None


def _reset_rss_peak() -> bool:
    """Reset the resident-set high-water mark (Linux ≥ 4.0: write 5 to /proc/self/clear_refs)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def memory_peak(fn, device="cpu", *, traced=True) -> dict:
    """Peak memory (MiB) allocated during one call of fn, by every probe available; "peak_mib" is the largest.

    traced=False says that tracemalloc cannot see this implementation's allocations (PyTorch's CPU allocator):
    "peak_mib" is then the resident-set growth alone, a lower bound, and None when that is zero (the memory was
    reused, so nothing was learned), rather than a misleading 0.
    """
    if device == "cuda":
        return _cuda_memory_peak(fn)
    out = {}
    rss_ok = _reset_rss_peak()
    rss0 = _proc_status_mib("VmRSS") if rss_ok else None
    was_tracing = tracemalloc.is_tracing()
    if not was_tracing:
        tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    tracemalloc.reset_peak()
    fn()
    out["traced_mib"] = (tracemalloc.get_traced_memory()[1] - before) / MiB
    if not was_tracing:
        tracemalloc.stop()
    hwm = _proc_status_mib("VmHWM") if rss_ok else None
    if rss0 is not None and hwm is not None:
        out["rss_mib"] = max(hwm - rss0, 0.0)
    if traced:
        out["peak_mib"] = max(out.values())
    else:
        out["peak_mib"] = out["rss_mib"] if out.get("rss_mib") else None
        out["peak_note"] = "resident-set growth only (a lower bound): tracemalloc does not see this allocator"
    return out


def _cuda_memory_peak(fn) -> dict:
    """Peak device memory of one call: CuPy's default pool (tracked through a counting allocator) and PyTorch's."""
    out = {}
    import cupy

    pool = cupy.get_default_memory_pool()
    base = pool.used_bytes()
    top = [base]

    def malloc(size):
        mem = pool.malloc(size)
        top[0] = max(top[0], pool.used_bytes())
        return mem

    cupy.cuda.set_allocator(malloc)
    torch = _try_import("torch")
    if torch is not None:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        torch_base = torch.cuda.memory_allocated()
    try:
        fn()
        cupy.cuda.Device().synchronize()
    finally:
        cupy.cuda.set_allocator(pool.malloc)
    out["cupy_mib"] = (top[0] - base) / MiB
    if torch is not None:
        torch.cuda.synchronize()
        out["torch_cuda_mib"] = (torch.cuda.max_memory_allocated() - torch_base) / MiB
    out["peak_mib"] = max(out.values())
    return out


# --- threads and the machine ---------------------------------------------------------------------


def _try_import(name):
    try:
        return __import__(name)
    except ImportError:
        return None


_BLAS_LIMITS = []  # the latest threadpoolctl limiter (kept for its restore_original_limits)


def pin_threads(n: int) -> dict:
    """Set every thread pool the kernels touch to n threads: Numba's, PyTorch's, and BLAS (via threadpoolctl).

    Numba and PyTorch may share an OpenMP runtime and each sets its thread count at will, so this is called
    before every measurement, not once.
    """
    import numba

    numba.set_num_threads(min(n, numba.config.NUMBA_NUM_THREADS))
    torch = _try_import("torch")
    if torch is not None:
        torch.set_num_threads(n)
    tpc = _try_import("threadpoolctl")
    if tpc is not None:  # every call: a BLAS loaded since (SciPy's, when Numba first compiles np.dot) is pinned too
        _BLAS_LIMITS[:] = [tpc.threadpool_limits(limits=n)]
    return {"numba": numba.get_num_threads(), "torch": torch.get_num_threads() if torch else None}


ENV_FLAGS = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS",
             "OPENBLAS_CORETYPE", "NUMBA_NUM_THREADS", "NUMBA_THREADING_LAYER", "NUMBA_OPT", "NUMBA_DISABLE_JIT",
             "NUMBA_ENABLE_CUDASIM", "KMP_AFFINITY", "OMP_PROC_BIND", "CUDA_VISIBLE_DEVICES")


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _git_commit():
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine_info(device="cpu") -> dict:
    """What a reader needs to reproduce or discount the numbers: CPU, cores, load, library versions, env flags."""
    import numba
    import numpy

    info = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device": device,
        "cpu_model": _cpu_model(),
        "logical_cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "platform": platform.platform(),
        "python": sys.version.split()[0],
        "numpy": numpy.__version__,
        "numba": numba.__version__,
        "numba_threading_layer": _numba_layer(),
        "git_commit": _git_commit(),
        "env": {k: os.environ[k] for k in ENV_FLAGS if k in os.environ},
    }
    torch = _try_import("torch")
    info["torch"] = torch.__version__ if torch else None
    if torch is not None:
        info["torch_threads"] = torch.get_num_threads()
        info["torch_mkldnn"] = bool(torch.backends.mkldnn.is_available())
    tpc = _try_import("threadpoolctl")
    if tpc is not None:
        info["threadpoolctl"] = [
            {**{k: p.get(k) for k in ("user_api", "internal_api", "prefix", "version", "num_threads", "architecture")},
             "file": os.path.basename(p.get("filepath") or "")}
            for p in tpc.threadpool_info()
        ]
    if device == "cuda":
        info.update(_cuda_info(torch))
    return info


def _numba_layer():
    """The threading layer Numba chose (known only after a parallel function has run once)."""
    import numba
    import numpy as np

    @numba.njit(parallel=True)
    def touch(a):
        for i in numba.prange(a.size):
            a[i] += 1.0

    touch(np.zeros(4))
    try:
        return numba.threading_layer()
    except ValueError:
        return None


def _cuda_info(torch):
    info = {}
    cupy = _try_import("cupy")
    if cupy is not None:
        info["cupy"] = cupy.__version__
        try:
            props = cupy.cuda.runtime.getDeviceProperties(0)
            info["gpu"] = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
            info["cuda_runtime"] = cupy.cuda.runtime.runtimeGetVersion()
        except Exception as e:  # report, do not crash, on a machine without a usable GPU
            info["gpu_error"] = repr(e)
    if torch is not None and torch.cuda.is_available():
        info["torch_gpu"] = torch.cuda.get_device_name(0)
    return info


# --- devices -------------------------------------------------------------------------------------


class Backend:
    """Where a benchmark runs: the array module for our kernels, PyTorch's device, and the synchronize to time with.

    `device` is "cpu" (NumPy arrays, our Numba kernels, PyTorch CPU) or "cuda" (CuPy arrays, our numba.cuda
    kernels, PyTorch CUDA). Inputs are drawn once in NumPy and copied, so every implementation sees the same
    numbers.
    """

    def __init__(self, device="cpu"):
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
        self.device = device
        self.ours = "cpu" if device == "cpu" else "cuda"  # the name of our kernels' form on this device
        if device == "cuda":
            try:
                import cupy
            except ImportError:
                raise UnavailableError("no CUDA device: CuPy is not installed (pip install -e '.[gpu]')") from None
            if not cupy.is_available():
                raise UnavailableError("no CUDA device (cupy.is_available() is False)")
            self.xp = cupy
        else:
            import numpy

            self.xp = numpy

    def array(self, a):
        """A NumPy array on this device (a CuPy copy on cuda)."""
        return a if self.device == "cpu" else self.xp.asarray(a)

    def torch(self):
        """The torch module, or UnavailableError; on cuda, UnavailableError unless PyTorch sees the GPU."""
        torch = _try_import("torch")
        if torch is None:
            raise UnavailableError("PyTorch is not installed (pip install -e '.[test]')")
        if self.device == "cuda":
            if not torch.cuda.is_available():
                raise UnavailableError("this PyTorch build has no CUDA device")
            # float32 against float32: PyTorch's defaults let cuDNN convolutions run in TF32 on tensor cores
            # (10-bit mantissa), which an H200 showed 2-8x faster than its float32 convolutions
            torch.backends.cudnn.allow_tf32 = False
            torch.backends.cuda.matmul.allow_tf32 = False
        return torch

    def tensor(self, a, requires_grad=False):
        """A PyTorch tensor holding a copy of the NumPy array a, on this device."""
        torch = self.torch()
        t = torch.from_numpy(a.copy()).to(self.device)
        return t.requires_grad_(requires_grad)

    def sync(self):
        """Wait for queued GPU work (a no-op on the CPU), so it is counted in the time."""
        if self.device == "cuda":
            self.xp.cuda.Device().synchronize()
            torch = _try_import("torch")
            if torch is not None and torch.cuda.is_available():
                torch.cuda.synchronize()
