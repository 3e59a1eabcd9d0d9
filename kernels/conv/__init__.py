"""2-D convolution kernels: forward, gradient w.r.t. the input (= transposed convolution), gradient w.r.t. the weight.

Three forms with one signature over raw NCHW arrays (float32 or float64):

    y  = conv2d_forward(x, w, *, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1, bias=None)
    dx = conv2d_backward_input(gy, w, x_shape, *, stride, padding, dilation, groups)
    dw = conv2d_backward_weight(x, gy, w_shape, *, stride, padding, dilation, groups)

x (N, C, H, W), w (K, C/groups, kh, kw), y and gy (N, K, Ho, Wo). ``padding`` is p or (ph, pw) — the same on
both sides, as PyTorch's ints — or ((top, bottom), (left, right)); stride and dilation are ints or pairs.
``conv2d_backward_input`` is also ``conv_transpose2d``'s forward (x_shape names its output size, which is how
output_padding is expressed), and the backward functions sum over gy's positions, so a gy smaller than the forward's
output (a transposed convolution's gradient) is fine.

``reference`` (NumPy, the specification), ``cpu`` (Numba: im2col in the cache + BLAS per tile, threads over images;
Winograd's minimal filtering for 3×3 stride-1 layers with 32 or more channels)
and ``cuda`` (numba.cuda: shared-memory tiled implicit GEMM). The form follows the array type (NumPy → cpu,
CuPy → cuda); ``form="reference" | "cpu" | "cuda"`` overrides it (``cuda`` on NumPy arrays needs the Numba CUDA
simulator).
"""

from __future__ import annotations

import numpy as np

from .. import dispatch
from .reference import out_size, pair_padding

FORMS = dispatch.FORMS


def _module(form, a):
    return dispatch.form_module("conv", form, a)


def _pair(v):
    return (int(v), int(v)) if isinstance(v, (int, np.integer)) else (int(v[0]), int(v[1]))


def _args(stride, padding, dilation, groups):
    return dict(stride=_pair(stride), padding=pair_padding(padding), dilation=_pair(dilation), groups=int(groups))


def _check(x_shape, w_shape, groups):
    if len(x_shape) != 4 or len(w_shape) != 4:
        raise ValueError(f"conv kernels take 4-D NCHW arrays, got {tuple(x_shape)} and weight {tuple(w_shape)}")
    k, cg = w_shape[:2]
    if k % groups or x_shape[1] != cg * groups:
        raise ValueError(f"input {tuple(x_shape)} and weight {tuple(w_shape)} do not fit groups={groups}")


def conv2d_forward(x, w, *, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1, bias=None, form=None):
    """y[n, k] = Σ_{c,i,j} w[k, c, i, j] · x_pad[n, c, oh·s + i·d, ow·s + j·d] (+ bias[k]): (N, K, Ho, Wo)."""
    _check(x.shape, w.shape, groups)
    return _module(form, x).conv2d_forward(x, w, bias=bias, **_args(stride, padding, dilation, groups))


def conv2d_backward_input(gy, w, x_shape, *, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1, form=None):
    """dL/dx of conv2d given gy = dL/dy: an array of x_shape (also the transposed convolution of gy)."""
    _check(x_shape, w.shape, groups)
    return _module(form, gy).conv2d_backward_input(gy, w, tuple(x_shape), **_args(stride, padding, dilation, groups))


def conv2d_backward_weight(x, gy, w_shape, *, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1, form=None):
    """dL/dw of conv2d given gy = dL/dy: an array of w_shape, summed over images and gy's positions."""
    _check(x.shape, w_shape, groups)
    return _module(form, x).conv2d_backward_weight(x, gy, tuple(w_shape), **_args(stride, padding, dilation, groups))


__all__ = ["conv2d_forward", "conv2d_backward_input", "conv2d_backward_weight", "out_size", "pair_padding", "FORMS"]
