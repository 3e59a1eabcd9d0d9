"""Attention benchmarks: softmax(Q Kᵀ · scale + mask) V, forward and forward+backward.

Three sweeps:

1. dense causal, B = 4, H = 8, D = 64, N ∈ {256, 512, 1024} (+ 2048, 4096 with --full): our kernel, the
   NumPy reference and the engine op (both capped: they hold the N×N matrix), PyTorch's SDPA (is_causal=True,
   its flash kernel on the CPU);
2. DALL·E's patterns at T = 64 text tokens + a W×W image grid (W = 16, 24, 32; + 48, 64 with --full), causal
   and Row / Column / Conv(11): our kernel evaluates the pattern inside the kernel and skips empty tiles;
   PyTorch is given the same pattern as a dense boolean mask;
3. peak memory of causal forward+backward at N up to 4096 (B = 1, H = 2): the tiled kernel's extra memory
   grows like N (inputs, outputs, per-row statistics), far under one N×N float32 matrix.

FLOPs count only the visible (query, key) pairs, the same count for every implementation: per pair
2·D for Q Kᵀ and 2·D for P V in the forward; 2·D each for recomputing Q Kᵀ, dV = Pᵀ dO, dP = dO Vᵀ,
dQ = dS K and dK = dSᵀ Q in the backward (FlashAttention's count: backward = 2.5 × forward).
"""

from __future__ import annotations

import numpy as np

from bench.harness import TORCH, Case, Impl, UnavailableError

FAMILY = "attention"


def visible_pairs(n, pattern=None):
    """Number of (query, key) pairs that may attend in an n-token sequence: n(n+1)/2 when causal."""
    if pattern is None:
        return n * (n + 1) // 2
    return int(pattern.mask(n).sum())


def flops(B, H, D, pairs, backward):
    """Useful FLOPs of one forward (4·D per visible pair) or forward+backward (4·D + 10·D) over B·H heads."""
    per_pair = (4 + 10) * D if backward else 4 * D
    return float(B * H * pairs * per_pair)


def _kernels():
    try:
        from kernels import attention
    except ImportError as e:
        raise UnavailableError(f"kernels.attention is not importable: {e}") from e
    return attention


def _inputs(B, H, N, D, seed=0):
    rng = np.random.default_rng(seed)
    return [rng.standard_normal((B, H, N, D), dtype=np.float32) for _ in range(4)]  # q, k, v, dout


def _ours(backend, B, H, N, D, pattern, backward, form):
    """Our kernel (form "cpu", "cuda" or "reference"): forward, then backward from the saved log-sum-exp."""

    def setup():
        att = _kernels()
        q, k, v, do = (backend.array(a) for a in _inputs(B, H, N, D))
        kw = dict(causal=pattern is None, pattern=pattern, form=form)

        def run():
            out, lse = att.attention_forward(q, k, v, **kw)
            if backward:
                att.attention_backward(q, k, v, out, lse, do, **kw)

        return run

    return setup


def _torch(backend, B, H, N, D, pattern, backward):
    """PyTorch's SDPA: is_causal for the dense causal case, the pattern's dense boolean mask otherwise."""

    def setup():
        torch = backend.torch()
        q, k, v, do = (backend.tensor(a, requires_grad=i < 3) for i, a in enumerate(_inputs(B, H, N, D)))
        mask = None if pattern is None else backend.tensor(pattern.mask(N))
        sdpa = torch.nn.functional.scaled_dot_product_attention

        def run():
            if not backward:
                with torch.no_grad():
                    return sdpa(q, k, v, attn_mask=mask, is_causal=pattern is None)
            q.grad = k.grad = v.grad = None
            sdpa(q, k, v, attn_mask=mask, is_causal=pattern is None).backward(do)

        return run

    return setup


def _tensor_cores(backend, B, H, N, D, backward=False):
    """Our FlashAttention-2 on tensor cores (CUDA C++, float16) against PyTorch's float16 SDPA."""

    def setup():
        from kernels.attention import cuda_tc

        q, k, v, do = (backend.array(a.astype(np.float16)) for a in _inputs(B, H, N, D))

        def run():
            out, lse = cuda_tc.attention_forward(q, k, v, causal=True)
            if backward:
                cuda_tc.attention_backward(q, k, v, out, lse, do, causal=True)

        return run

    return setup


def _torch_half(backend, B, H, N, D, backward=False):
    def setup():
        torch = backend.torch()
        q, k, v, do = (backend.tensor(a).half().requires_grad_(i < 3 and backward)
                       for i, a in enumerate(_inputs(B, H, N, D)))
        sdpa = torch.nn.functional.scaled_dot_product_attention

        def run():
            if not backward:
                with torch.no_grad():
                    return sdpa(q, k, v, is_causal=True)
            q.grad = k.grad = v.grad = None
            sdpa(q, k, v, is_causal=True).backward(do)

        return run

    return setup


def _core(B, H, N, D, pattern, backward):
    """The engine op core.functional.scaled_dot_product_attention (autograd over NumPy), CPU only."""

    def setup():
        try:
            import core
            from core import functional as F
        except ImportError as e:
            raise UnavailableError(f"core is not importable: {e}") from e
        q, k, v, do = _inputs(B, H, N, D)
        q, k, v = (core.tensor(a, requires_grad=True) for a in (q, k, v))
        do = core.tensor(do)
        mask = None if pattern is None else core.tensor(pattern.mask(N))

        def run():
            if not backward:
                with core.no_grad():
                    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=pattern is None)
            for t in (q, k, v):
                t.grad = None
            F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=pattern is None).backward(do)

        return run

    return setup


def _case(backend, name, B, H, N, D, pattern, backward, *, reference, core, plot, params=None):
    impls = [Impl(backend.ours, _ours(backend, B, H, N, D, pattern, backward, None))]
    if reference and backend.device == "cpu":
        impls.append(Impl("reference", _ours(backend, B, H, N, D, pattern, backward, "reference")))
    if core and backend.device == "cpu":
        impls.append(Impl("core", _core(B, H, N, D, pattern, backward)))
    impls.append(Impl(TORCH, _torch(backend, B, H, N, D, pattern, backward)))
    pairs = visible_pairs(N, pattern)
    p = dict(B=B, H=H, N=N, D=D, dtype="float32", pattern=repr(pattern) if pattern else "causal",
             direction="fwd+bwd" if backward else "fwd", visible_fraction=pairs / N**2)
    p.update(params or {})
    return Case(FAMILY, name, flops(B, H, D, pairs, backward), "GFLOP/s", impls, p, plot)


def cases(backend, *, quick=False, full=False) -> list[Case]:
    """The attention cases for this device and size setting (quick: tiny sizes for tests)."""
    _kernels()  # UnavailableError: the whole family is reported unavailable
    from kernels.attention.patterns import Column, Conv, Row  # patterns are plain Python: always importable

    B, H, D = (1, 2, 16) if quick else (4, 8, 64)
    out = []
    # 1. dense causal, N sweep
    ns = [32, 64] if quick else [256, 512, 1024] + ([2048, 4096] if full else [])
    ref_cap = 64 if quick else (1024 if full else 512)
    for backward in (True,) if quick else (False, True):
        direction = "fwd+bwd" if backward else "fwd"
        for n in ns:
            out.append(_case(backend, f"{direction} causal N={n}", B, H, n, D, None, backward,
                             reference=n <= ref_cap, core=n <= ref_cap,
                             plot=dict(panel=f"dense causal {direction}, B={B} H={H} D={D}", series="",
                                       x=n, xlabel="sequence length N")))
    if backend.device == "cuda":  # half precision on tensor cores, against PyTorch's fp16 SDPA
        for backward in (False, True):
            direction = "fwd+bwd" if backward else "fwd"
            for n in ns:
                impls = [Impl("cuda_tc", _tensor_cores(backend, B, H, n, D, backward)),
                         Impl(TORCH, _torch_half(backend, B, H, n, D, backward))]
                out.append(Case(FAMILY, f"{direction} causal fp16 N={n}", flops(B, H, D, visible_pairs(n), backward),
                                "GFLOP/s fp16", impls, dict(B=B, H=H, N=n, D=D, dtype="float16", pattern="causal",
                                                            direction=direction),
                                dict(panel=f"dense causal {direction} fp16 (tensor cores), B={B} H={H} D={D}",
                                     series="", x=n, xlabel="sequence length N")))
    # 2. DALL·E's patterns at T text tokens + a W×W grid (forward+backward), against PyTorch with a dense mask
    T = 8 if quick else 64
    widths = [4] if quick else [16, 24, 32] + ([48, 64] if full else [])
    for W in widths:
        n = T + W * W
        kernel = 3 if quick else 11
        patterns = [("causal", None), ("row", Row(T, W)), ("column", Column(T, W)),
                    (f"conv{kernel}", Conv(T, W, kernel=kernel))]
        for label, pattern in patterns:
            out.append(_case(backend, f"fwd+bwd {label} T={T} {W}x{W} (N={n})", B, H, n, D, pattern, True,
                             reference=n <= (64 if quick else 640), core=False,
                             plot=dict(panel=f"patterns fwd+bwd, T={T} + W×W grid", series=label, x=n,
                                       xlabel="sequence length N = T + W²"),
                             params=dict(T=T, W=W)))
    # 3. memory: causal forward+backward over growing N, two heads (one per thread)
    for n in [64, 128] if quick else [1024, 2048, 4096]:
        score = n * n * 4 / 2**20
        out.append(_case(backend, f"memory fwd+bwd causal N={n} (B=1 H=2)", 1, 2, n, D, None, True,
                         reference=False, core=False,
                         plot=dict(panel="peak memory, causal fwd+bwd, B=1 H=2", series="", x=n,
                                   xlabel="sequence length N", metric="peak_mib",
                                   guide=("one N×N fp32 score matrix", score)),
                         params=dict(score_matrix_mib_per_head=score, inputs_mib=4 * 2 * n * D * 4 / 2**20)))
    return out
