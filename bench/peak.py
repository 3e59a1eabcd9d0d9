"""This machine's measured limits, the yardsticks of "fraction of peak".

- Compute: float32 matrix multiply (sgemm), 2n³ FLOPs, through NumPy's BLAS and through PyTorch; the faster
  of the two. A kernel doing useful FLOPs at this rate runs as fast as this machine's tuned BLAS.
- Memory: a large copy, counted as read + write (2 × bytes, the STREAM convention), through np.copyto (one
  thread), a parallel Numba loop and PyTorch's copy_ (both with the pinned thread count); the fastest. The
  array is far larger than the caches, so this is the DRAM bandwidth the elementwise kernels are bound by.

`t2i bench` probes at the start of a run and again at its end, and takes the better of the two (`best_of`). On a
CPU, an elementwise case (GB/s) also gets a copy of its own bytes timed just before and just after it (`copy_rate`,
the better of the two): its `fraction_of_copy`, the yardstick of the same minute.

On a GPU the same two numbers come from PyTorch CUDA (torch.mm with TF32 off, copy_) and CuPy, plus the
float16 GEMM rate on tensor cores ("GFLOP/s fp16"), the yardstick of the half-precision attention kernel.
"""

from __future__ import annotations

import numba
import numpy as np

from bench.harness import measure, rate


@numba.njit(parallel=True, cache=True)
def parallel_copy(src, dst):
    """dst[:] = src[:] split over Numba's threads (np.copyto runs on one thread)."""
    for i in numba.prange(src.size):
        dst[i] = src[i]


def measure_peak(device="cpu", *, quick=False, repeats=None) -> dict:
    """{"GFLOP/s": best sgemm rate, "GB/s": best copy rate, "details": every probe's rate}."""
    repeats = repeats or (2 if quick else 5)
    n = 512 if quick else 2048  # sgemm size: 2048³ is 17 GFLOP, long enough to reach the BLAS's plateau
    elems = (4 if quick else 64) * 2**20  # copy size: 256 MiB of float32 by default, far beyond any cache
    if device == "cuda":
        return _peak_cuda(n * 2, elems * 4, repeats)
    details = {}
    rng = np.random.default_rng(0)
    a, b = rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)
    details["sgemm_numpy"] = rate(2 * n**3, measure(lambda: np.dot(a, b), repeats=repeats).median)
    details.update(_copies(np.ones(elems, dtype=np.float32), numpy=True, repeats=repeats))
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        at, bt = torch.from_numpy(a), torch.from_numpy(b)
        details["sgemm_torch"] = rate(2 * n**3, measure(lambda: torch.mm(at, bt), repeats=repeats).median)
    return _best(details, {"sgemm_n": n, "copy_mib": elems * 4 / 2**20})


def _copies(src, numpy=False, **timing) -> dict:
    """GB/s (read + write) of copying src into a buffer made once: a parallel Numba loop, PyTorch's copy_ (where
    PyTorch is installed) and, with numpy, np.copyto (one thread); keyed copy_numba, copy_torch, copy_numpy."""
    dst = np.empty_like(src)
    copies = {"copy_numba": lambda: parallel_copy(src, dst)}
    if numpy:
        copies["copy_numpy"] = lambda: np.copyto(dst, src)
    try:
        import torch

        st, dt = torch.from_numpy(src), torch.from_numpy(dst)
        copies["copy_torch"] = lambda: dt.copy_(st)
    except ImportError:
        pass
    return {name: rate(2 * src.nbytes, measure(fn, **timing).median) for name, fn in copies.items()}


def copy_rate(nbytes: float, **timing) -> float:
    """GB/s of the best CPU copy (a parallel Numba loop, PyTorch's copy_) moving `nbytes` in all (read + write, as a
    case counts its bytes), timed with `measure`'s keywords: the yardstick measured beside an elementwise case, so
    that its fraction is of the bandwidth of the same minute on a machine whose bandwidth drifts (bench/README.md)."""
    return max(_copies(np.ones(max(int(nbytes) // 8, 1), dtype=np.float32), **timing).values())


def _peak_cuda(n, elems, repeats):
    import cupy
    import torch

    details = {}
    sync = torch.cuda.synchronize
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 peak, as our kernels compute in fp32
    a = torch.randn(n, n, device="cuda")
    b = torch.randn(n, n, device="cuda")
    details["sgemm_torch"] = rate(2 * n**3, measure(lambda: torch.mm(a, b), repeats=repeats, sync=sync).median)
    ah, bh = a.half(), b.half()
    hgemm = rate(2 * n**3, measure(lambda: torch.mm(ah, bh), repeats=repeats, sync=sync).median)
    src = torch.ones(elems, device="cuda")
    dst = torch.empty_like(src)
    copy_bytes = 2 * src.numel() * 4
    details["copy_torch"] = rate(copy_bytes, measure(lambda: dst.copy_(src), repeats=repeats, sync=sync).median)
    cs, cd = cupy.ones(elems, dtype=cupy.float32), cupy.empty(elems, dtype=cupy.float32)
    details["copy_cupy"] = rate(copy_bytes, measure(lambda: cupy.copyto(cd, cs), repeats=repeats,
                                                    sync=cupy.cuda.Device().synchronize).median)
    return _best(details, {"sgemm_n": n, "copy_mib": elems * 4 / 2**20, "GFLOP/s fp16": hgemm})


def best_of(**probes) -> dict:
    """The peak of several probes of one machine (measure_peak results, named: start=…, end=…): each figure's best,
    and every probe's details under its name. A shared machine's bandwidth moves over minutes; the best probe is
    the strictest yardstick."""
    first = next(iter(probes.values()))
    out = {k: max(p[k] for p in probes.values()) if isinstance(v, float) else v for k, v in first.items()}
    out["details"] = {f"{k} ({name})": v for name, p in probes.items() for k, v in p.get("details", {}).items()}
    return out


def _best(details, sizes):
    gflops = max(v for k, v in details.items() if k.startswith("sgemm"))
    gbps = max(v for k, v in details.items() if k.startswith("copy"))
    return {"GFLOP/s": gflops, "GB/s": gbps, "details": details, **sizes}
