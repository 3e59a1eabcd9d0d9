"""A/B of the float32 CUDA attention fast path: its first version against the current one, and PyTorch's SDPA.

    python bench/ab_attention.py          (on a GPU; about 30-60 s, most of it compiling the six kernels)

B = 4, H = 8, N = 1024, D = 64, float32, causal and dense, scale 1/8. For each: the forward (``forward_fast``)
and forward+backward (+ ``rowdot``, ``dq_fast``, ``dkdv_fast``) of ``kernels.attention.cuda`` built as its
first version (``fast_kernels(D, v1=True)``: per-element staging, grid (row blocks, B·H), no launch bounds) and
as now, launched directly through ``kernels.dispatch.launch`` (kernel time: a few µs of host time per launch,
far under the kernels', so the GPU never waits on the host; not the wrappers' reshapes and copies), and
PyTorch's ``scaled_dot_product_attention`` in float32 with TF32 off, on the same inputs. Times: CUDA events
around ``REPS`` back-to-back calls, divided by REPS, median of ``SAMPLES`` such samples after a warm-up call.
Then the largest |difference| of out, lse, dq, dk, dv between the two versions (expected around 1e-6: the
same products in the same order, but exp2 (ex2.approx) in place of expf), and of out, dq, dk, dv against
PyTorch.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import cupy as cp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from kernels.attention import cuda as ac  # noqa: E402
from kernels.attention import patterns  # noqa: E402
from kernels.dispatch import launch  # noqa: E402

B, H, N, D = 4, 8, 1024, 64
SCALE = 1.0 / math.sqrt(D)
REPS, SAMPLES = 5, 20


def median_ms(fn, record, elapsed):
    """Median over SAMPLES of the GPU time of REPS calls of fn, per call, after one warm-up call."""
    fn()
    times = []
    for _ in range(SAMPLES):
        a = record()
        for _ in range(REPS):
            fn()
        b = record()
        times.append(elapsed(a, b) / REPS)
    return statistics.median(times)


def cupy_record():
    e = cp.cuda.Event()
    e.record()
    return e


def cupy_elapsed(a, b):
    b.synchronize()
    return cp.cuda.get_elapsed_time(a, b)


def torch_record():
    e = torch.cuda.Event(enable_timing=True)
    e.record()
    return e


def torch_elapsed(a, b):
    b.synchronize()
    return a.elapsed_time(b)


class Ours:
    """One version's kernels and its own outputs."""

    def __init__(self, v1, causal, q, k, v, do):
        self.fk = ac.fast_kernels(D, v1)
        self.rowdot = ac.KERNELS[np.dtype(np.float32)]["rowdot"]
        self.grid = ac._fast_grid(N // ac.BM, B * H, v1)
        kind = patterns.CAUSAL if causal else patterns.NONE
        mask = cp.zeros((1, 1, 1, 1), cp.float32)
        self.pat = (mask, False, H, kind, 0, 1, 0, 0, False, np.float32(SCALE))
        self.q, self.k, self.v, self.do = q, k, v, do
        self.out, self.dq, self.dk, self.dv = (cp.empty_like(q) for _ in range(4))
        self.lse, self.Drow = cp.empty((B * H, N), cp.float32), cp.empty((B * H, N), cp.float32)

    def forward(self):
        launch(self.fk["forward_fast"], self.grid, ac.NT, self.q, self.k, self.v, *self.pat, self.out, self.lse)

    def backward(self):
        launch(self.rowdot, (B * H * N + 127) // 128, 128, self.out, self.do, self.Drow)
        args = (self.q, self.k, self.v, self.lse, self.do, self.Drow, *self.pat)
        launch(self.fk["dq_fast"], self.grid, ac.NT, *args, self.dq)
        launch(self.fk["dkdv_fast"], self.grid, ac.NT, *args, self.dk, self.dv)

    def both(self):
        self.forward()
        self.backward()

    def results(self):
        return {"out": self.out, "lse": self.lse, "dq": self.dq, "dk": self.dk, "dv": self.dv}


def main():
    t_start = time.perf_counter()
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    g = torch.Generator(device="cuda").manual_seed(0)
    qt, kt, vt, dot = (torch.randn(B * H, N, D, device="cuda", generator=g) for _ in range(4))
    q, k, v, do = (cp.from_dlpack(x) for x in (qt, kt, vt, dot))  # the same memory
    name = cp.cuda.runtime.getDeviceProperties(0)["name"]
    print(f"B={B} H={H} N={N} D={D} float32, {name.decode() if isinstance(name, bytes) else name}")
    for causal in (True, False):
        old, new = Ours(True, causal, q, k, v, do), Ours(False, causal, q, k, v, do)
        row = {}
        for name, ours in (("old", old), ("new", new)):
            row[name] = (median_ms(ours.forward, cupy_record, cupy_elapsed),
                         median_ms(ours.both, cupy_record, cupy_elapsed))
        q4, k4, v4 = (x.view(B, H, N, D).clone().requires_grad_() for x in (qt, kt, vt))
        do4 = dot.view(B, H, N, D)

        def t_forward():
            with torch.no_grad():
                torch.nn.functional.scaled_dot_product_attention(q4, k4, v4, is_causal=causal, scale=SCALE)

        def t_both():
            for x in (q4, k4, v4):
                x.grad = None
            o = torch.nn.functional.scaled_dot_product_attention(q4, k4, v4, is_causal=causal, scale=SCALE)
            o.backward(do4)

        row["torch"] = tuple(median_ms(fn, torch_record, torch_elapsed) for fn in (t_forward, t_both))
        label = "causal" if causal else "dense"
        for name in ("old", "new", "torch"):
            f, fb = row[name]
            print(f"{label:6s} {name:5s} fwd {f:7.3f} ms  fwd+bwd {fb:7.3f} ms  (x{fb / row['torch'][1]:.2f} torch)")
        old.both(), new.both(), t_both()
        cp.cuda.Device().synchronize()
        a, b = old.results(), new.results()
        print(f"{label:6s} max|old - new|: " + ", ".join(f"{n} {float(cp.abs(a[n] - b[n]).max()):.3g}" for n in a))
        with torch.no_grad():
            o_t = torch.nn.functional.scaled_dot_product_attention(q4, k4, v4, is_causal=causal, scale=SCALE)
        ref = {"out": o_t, "dq": q4.grad, "dk": k4.grad, "dv": v4.grad}
        print(f"{label:6s} max|new - torch|: " + ", ".join(
            f"{n} {float(cp.abs(b[n] - cp.from_dlpack(r.reshape(B * H, N, D).contiguous())).max()):.3g}"
            for n, r in ref.items()))
    print(f"total {time.perf_counter() - t_start:.1f} s")


if __name__ == "__main__":
    main()
