"""2-D convolution benchmarks: forward, and forward + gradients w.r.t. input, weight and bias.

The headline case is a U-Net-sized layer: N = 64 images, C = K = 64 channels, 16×16, 3×3 kernel, padding 1.
Two small sweeps around it: the image side (8, 16, 32) and the channel count (32, 64, 128). PyTorch's CPU
convolution is oneDNN's; the engine op (`core.functional.conv2d`) is im2col + one BLAS matmul in NumPy.

FLOPs: 2·N·K·(C/groups)·kh·kw·Ho·Wo per convolution (one multiply-add per weight tap per output); the
gradient w.r.t. the input and w.r.t. the weight cost the same again each, so forward+backward is 3× that
(the bias gradient, a sum over N·Ho·Wo, is not counted).
"""

from __future__ import annotations

import importlib

import numpy as np

from bench.harness import TORCH, Case, Impl, UnavailableError

FAMILY = "conv"
KSIZE, PAD = 3, 1


def flops(N, C, K, H, W, k=KSIZE, pad=PAD, backward=False):
    """Useful FLOPs of one stride-1 convolution (×3 with both gradients)."""
    ho, wo = H + 2 * pad - k + 1, W + 2 * pad - k + 1
    one = 2.0 * N * K * C * k * k * ho * wo
    return 3 * one if backward else one


def _kernels(form):
    """(forward, backward_input, backward_weight) of the chosen form ("cpu", "cuda", "reference")."""
    try:
        conv = importlib.import_module("kernels.conv")
        if hasattr(conv, "conv2d_forward"):  # the family's dispatching front door, with form=
            names = ("conv2d_forward", "conv2d_backward_input", "conv2d_backward_weight")
            fns = [getattr(conv, n) for n in names]
            return [lambda *a, f=f, **kw: f(*a, form=form, **kw) for f in fns]
        mod = importlib.import_module(f"kernels.conv.{form}")  # until the front door lands
        return mod.conv2d_forward, mod.conv2d_backward_input, mod.conv2d_backward_weight
    except (ImportError, AttributeError) as e:
        raise UnavailableError(f"kernels.conv ({form}) is not importable: {e}") from e


def _inputs(N, C, K, H, W):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((N, C, H, W), dtype=np.float32)
    w = (rng.standard_normal((K, C, KSIZE, KSIZE), dtype=np.float32) / np.sqrt(C * KSIZE * KSIZE)).astype(np.float32)
    b = rng.standard_normal(K, dtype=np.float32)
    gy = rng.standard_normal((N, K, H + 2 * PAD - KSIZE + 1, W + 2 * PAD - KSIZE + 1), dtype=np.float32)
    return x, w, b, gy


def _ours(backend, shape, backward, form):
    def setup():
        fwd, bwd_in, bwd_w = _kernels(form)
        x, w, b, gy = (backend.array(a) for a in _inputs(*shape))
        kw = dict(stride=(1, 1), padding=(PAD, PAD), dilation=(1, 1), groups=1)

        def run():
            y = fwd(x, w, bias=b, **kw)
            if backward:
                bwd_in(gy, w, x.shape, **kw)
                bwd_w(x, gy, w.shape, **kw)
                gy.sum(axis=(0, 2, 3))  # the bias gradient
            return y

        return run

    return setup


def _torch(backend, shape, backward):
    def setup():
        torch = backend.torch()
        x, w, b, gy = _inputs(*shape)
        x, w, b = (backend.tensor(a, requires_grad=backward) for a in (x, w, b))
        gy = backend.tensor(gy)
        conv = torch.nn.functional.conv2d

        def run():
            if not backward:
                with torch.no_grad():
                    return conv(x, w, b, padding=PAD)
            x.grad = w.grad = b.grad = None
            conv(x, w, b, padding=PAD).backward(gy)

        return run

    return setup


def _core(shape, backward):
    def setup():
        try:
            import core
            from core import functional as F
        except ImportError as e:
            raise UnavailableError(f"core is not importable: {e}") from e
        x, w, b, gy = _inputs(*shape)
        x, w, b = (core.tensor(a, requires_grad=backward) for a in (x, w, b))
        gy = core.tensor(gy)

        def run():
            if not backward:
                with core.no_grad():
                    return F.conv2d(x, w, b, padding=PAD)
            x.grad = w.grad = b.grad = None
            F.conv2d(x, w, b, padding=PAD).backward(gy)

        return run

    return setup


def cases(backend, *, quick=False, full=False) -> list[Case]:
    """The headline layer and the side/channel sweeps around it (quick: tiny sizes for tests)."""
    _kernels(backend.ours)  # UnavailableError: the whole family is reported unavailable
    if quick:
        N, C0, side_sweep, chan_sweep, ref_cap = 2, 4, [6, 8], [], 10**9
    else:
        N, C0, side_sweep, chan_sweep, ref_cap = 64, 64, [8, 16, 32], [32, 128], 2 * 64 * 64 * 9 * 64 * 256
    base_side = side_sweep[1] if len(side_sweep) > 1 else side_sweep[0]
    shapes = [(N, C0, C0, s, s) for s in side_sweep] + [(N, c, c, base_side, base_side) for c in chan_sweep]
    out = []
    for backward in (True,) if quick else (False, True):
        direction = "fwd+bwd" if backward else "fwd"
        for shape in shapes:
            n, c, k, h, w = shape
            work = flops(n, c, k, h, w, backward=backward)
            impls = [Impl(backend.ours, _ours(backend, shape, backward, backend.ours))]
            if backend.device == "cpu" and flops(n, c, k, h, w) <= ref_cap:
                impls += [Impl("reference", _ours(backend, shape, backward, "reference")),
                          Impl("core", _core(shape, backward))]
            impls.append(Impl(TORCH, _torch(backend, shape, backward)))
            plot = []
            if c == C0:
                plot.append(dict(panel=f"conv2d 3×3 {direction}, N={n} C=K={C0}", series="", x=h, xlabel="image side"))
            if h == base_side:
                plot.append(dict(panel=f"conv2d 3×3 {direction}, N={n} {h}×{w}", series="", x=c,
                                 xlabel="channels C = K"))
            out.append(Case(FAMILY, f"{direction} N={n} C=K={c} {h}x{w} 3x3 pad1", work, "GFLOP/s", impls,
                            dict(N=n, C=c, K=k, H=h, W=w, kernel=KSIZE, padding=PAD, dtype="float32",
                                 direction=direction), plot))
    return out
