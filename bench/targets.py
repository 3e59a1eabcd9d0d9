"""The kernels issue's performance targets, checked against a benchmark report (met, missed, or not measured).

Targets on the CPU (ratio = our time / PyTorch's in the same run):
- attention fwd+bwd, dense causal, B=4 H=8 N=1024 D=64: ratio ≤ 2 (parity is the aim);
- attention fwd+bwd with Row / Conv patterns at T = 64 + a 32×32 grid: faster than PyTorch with the dense mask;
- attention extra memory at N = 4096: far under one N×N float32 matrix (here: under a quarter of it);
- conv2d fwd+bwd, N=64 C=K=64 16×16 3×3 pad 1: ratio ≤ 2;
- gumbel_softmax 4096×8192: at least 5× faster than PyTorch (ratio ≤ 0.2);
- q_sample / DDPM / DDIM steps (largest size): ≥ 70% of the measured copy bandwidth (read from `cpu-out`, the kernel
  writing into buffers made once, as the copy does, against a copy of the same bytes timed just before and after the
  case: `fraction_of_copy`) and ≥ 3× faster than PyTorch eager (read from `cpu`, which returns fresh arrays as
  PyTorch does).
On a GPU: attention ratio ≤ 2 (≥ 0.5× PyTorch's fp32 SDPA speed) and elementwise kernels ≥ 70% of the measured
copy bandwidth.
"""

from __future__ import annotations

from bench.schedule import OUT_BUFFERS

SCHEDULE_CASES = [f"{op} 64x3x256x256" for op in ("q_sample", "ddpm_step", "ddim_step")]


def _cpu_targets(ours):
    t = [
        ("attention", "fwd+bwd causal N=1024", ours, "ratio_to_torch", "<=", 2.0,
         "attention fwd+bwd dense causal B=4 H=8 N=1024 D=64: ≤ 2× PyTorch's time"),
        ("attention", "fwd+bwd row T=64 32x32 (N=1088)", ours, "ratio_to_torch", "<", 1.0,
         "attention fwd+bwd Row pattern, T=64 + 32×32: faster than PyTorch with the dense bool mask"),
        ("attention", "fwd+bwd conv11 T=64 32x32 (N=1088)", ours, "ratio_to_torch", "<", 1.0,
         "attention fwd+bwd Conv(11) pattern, T=64 + 32×32: faster than PyTorch with the dense bool mask"),
        ("attention", "memory fwd+bwd causal N=4096 (B=1 H=2)", ours, "peak_mib", "<", 16.0,
         "attention fwd+bwd N=4096, B=1 H=2: peak memory < 16 MiB (a quarter of one 64 MiB N×N fp32 matrix)"),
        ("conv", "fwd+bwd N=64 C=K=64 16x16 3x3 pad1", ours, "ratio_to_torch", "<=", 2.0,
         "conv2d fwd+bwd N=64 C=K=64 16×16 3×3 pad 1: ≤ 2× PyTorch's time"),
        ("gumbel", "fwd 4096x8192", ours, "ratio_to_torch", "<=", 0.2,
         "gumbel_softmax 4096×8192: ≥ 5× faster than PyTorch"),
    ]
    for case in SCHEDULE_CASES:
        op = case.split()[0]
        t.append(("schedule", case, OUT_BUFFERS, "fraction_of_copy", ">=", 0.7,
                  f"{op} (64,3,256,256), into buffers made once (out=): ≥ 70% of the GB/s of a copy timed beside it"))
        t.append(("schedule", case, ours, "ratio_to_torch", "<=", 1 / 3, f"{op} (64,3,256,256): ≥ 3× faster than "
                  "PyTorch eager"))
    return t


def _cuda_targets(ours):
    """On a GPU the elementwise targets are read at the largest sizes (bench/schedule.py, bench/gumbel.py add them
    on cuda): at the CPU's sizes a call moves ~100 MiB, ~40 µs of HBM time, and the launch costs as much. Each is
    read twice: from the stream time (calls queued back to back: the GPU's time, the kernel's own bandwidth) and
    from one synchronized call (the host's launch work included)."""
    t = [("attention", "fwd+bwd causal N=1024", ours, "ratio_to_torch", "<=", 2.0,
          "attention fwd+bwd dense causal N=1024: ≥ 0.5× PyTorch fp32 SDPA speed")]
    elementwise = [("schedule", f"{op} 64x3x1024x1024", f"{op} (64,3,1024,1024)")
                   for op in ("q_sample", "ddpm_step", "ddim_step")]
    elementwise.append(("gumbel", "fwd 16384x8192", "gumbel_softmax 16384×8192"))
    for family, case, text in elementwise:
        t.append((family, case, ours, "stream_fraction_of_peak", ">=", 0.7,
                  f"{text}: ≥ 70% of copy bandwidth (GPU time, calls queued back to back)"))
        t.append((family, case, ours, "fraction_of_peak", ">=", 0.7,
                  f"{text}: ≥ 70% of copy bandwidth (one synchronized call, host included)"))
    return t


OPS = {"<=": lambda a, b: a <= b, "<": lambda a, b: a < b, ">=": lambda a, b: a >= b}


def check(report) -> list[dict]:
    """One entry per target: its description, the measured value, and "met", "missed" or "not measured"."""
    device = report["settings"]["device"]
    ours = "cpu" if device == "cpu" else "cuda"
    index = {(r["family"], r["case"], r["impl"]): r for r in report["results"]}
    out = []
    for family, case, impl, field, op, bound, text in (_cpu_targets if device == "cpu" else _cuda_targets)(ours):
        row = index.get((family, case, impl))
        value = row.get(field) if row and row.get("status") == "ok" else None
        verdict = "not measured" if value is None else ("met" if OPS[op](value, bound) else "missed")
        out.append({"target": text, "family": family, "case": case, "field": field, "bound": f"{op} {bound:.3g}",
                    "value": value, "verdict": verdict})
    return out


def format_targets(checks) -> str:
    """Targets as text lines: verdict, measured value, description."""
    lines = []
    for c in checks:
        value = "-" if c["value"] is None else f"{c['value']:.3g}"
        lines.append(f"{c['verdict']:>12} | {c['field']} = {value} (target {c['bound']}) | {c['target']}")
    return "\n".join(lines)
