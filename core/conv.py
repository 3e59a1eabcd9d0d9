"""Spatial ops of core.functional: convolution, transposed convolution, pooling, interpolation, padding.

Each op is ONE `Function` whose forward and backward call helpers on raw arrays
(`_conv2d_forward`, `_conv2d_backward_input`, `_conv2d_backward_weight`, ...). The three conv helpers
hand float32/float64 arrays to the kernels of `kernels.conv` (Numba on NumPy arrays, numba.cuda on
CuPy arrays); the NumPy code below them stays as the path for any other dtype.

Convolution is computed as im2col + matrix multiply: every receptive field of the padded input is
viewed (no copy) with `sliding_window_view`, laid out as the rows of a matrix, and multiplied by the
weights reshaped to a matrix (Chellapilla et al. 2006, "High Performance Convolutional Neural
Networks for Document Processing"). Its gradient with respect to the input is the transposed
convolution, which is why `conv_transpose2d`'s forward is `_conv2d_backward_input`.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view

# called as a module attribute (_conv_kernels.conv2d_forward), so tests can wrap the kernels
import kernels.conv as _conv_kernels

from .autograd import Function
from .tensor import Tensor

# --- argument checking ----------------------------------------------------------------------------


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def _pair(v, name: str, op: str) -> tuple:
    """An int, a one-int sequence or a pair of ints, as PyTorch takes them: 3 -> (3, 3), (3,) -> (3, 3)."""
    if _is_int(v):
        return (int(v), int(v))
    if isinstance(v, (tuple, list)) and len(v) in (1, 2) and all(_is_int(e) for e in v):
        return (int(v[0]), int(v[-1]))
    raise TypeError(f"{op}: {name} must be an int or a pair of ints, got {v!r}")


def _check_4d(op: str, x, weight=None):
    if x.ndim != 4:
        raise ValueError(f"{op}: expected a 3-D (C, H, W) or 4-D (N, C, H, W) input, got shape {tuple(x.shape)}")
    if weight is not None:
        if weight.ndim != 4:
            raise ValueError(f"{op}: expected a 4-D weight, got shape {tuple(weight.shape)}")
        if weight.dtype != x.dtype:
            raise TypeError(f"{op}: input dtype {x.dtype} and weight dtype {weight.dtype} must be the same")


def _batched(fn, input, *args, **kwargs):  # noqa: A002 - PyTorch's name
    """Run a 4-D op on an unbatched 3-D (C, H, W) input by adding and removing a batch dim, as PyTorch does."""
    if input.ndim == 3:
        if not isinstance(input, Tensor):  # a plain array, as the 4-D path also takes
            return fn(input[None], *args, **kwargs).squeeze(0)
        return fn(input.unsqueeze(0), *args, **kwargs).squeeze(0)
    return fn(input, *args, **kwargs)


# --- convolution: the NumPy helpers a kernel replaces ----------------------------------------------


def _out_size(n: int, k: int, stride: int, pad: tuple, dilation: int) -> int:
    """Output length of a convolution: floor((n + pads - dilation·(k-1) - 1) / stride) + 1."""
    return (n + pad[0] + pad[1] - dilation * (k - 1) - 1) // stride + 1


def _cols(x, kernel, stride, padding, dilation, out_hw):
    """im2col: the receptive fields of x as an (N, C·kh·kw, Ho·Wo) array (one copy, Caffe's layout).

    Row (c, i, j) holds, for every output position, the input pixel that tap (i, j) of channel c
    reads; in this layout both the forward and the gradients are batched matmuls with no transposes.
    """
    n, c = x.shape[:2]
    (kh, kw), (sh, sw), (dh, dw), (ho, wo) = kernel, stride, dilation, out_hw
    if any(padding[0]) or any(padding[1]):
        x = np.pad(x, ((0, 0), (0, 0), padding[0], padding[1]))
    win = sliding_window_view(x, (dh * (kh - 1) + 1, dw * (kw - 1) + 1), axis=(2, 3))
    win = win[:, :, : sh * (ho - 1) + 1 : sh, : sw * (wo - 1) + 1 : sw, ::dh, ::dw]  # (N, C, Ho, Wo, kh, kw)
    return np.ascontiguousarray(win.transpose(0, 1, 4, 5, 2, 3)).reshape(n, c * kh * kw, ho * wo)


def _use_kernels(*arrays) -> bool:
    """kernels.conv takes float32 and float64 arrays (NumPy: the Numba form; CuPy: the CUDA form)."""
    return all(a.dtype in (np.float32, np.float64) for a in arrays)


def _conv2d_forward(x, w, stride, padding, dilation, groups, out_hw=None):
    """y[n, k] = Σ_c,i,j w[k, c, i, j] · x_padded[n, c, h·s + i·d, w·s + j·d], a matmul per image and group.

    x: (N, C, H, W); w: (K, C/groups, kh, kw); padding: ((top, bottom), (left, right)).
    `out_hw` keeps only the first (Ho, Wo) outputs (conv_transpose2d's backward needs that).
    """
    if _use_kernels(x, w):
        y = _conv_kernels.conv2d_forward(x, w, stride=stride, padding=padding, dilation=dilation, groups=groups)
        if out_hw is not None and tuple(y.shape[2:]) != tuple(out_hw):
            y = y[:, :, : out_hw[0], : out_hw[1]].copy()
        return y
    n = x.shape[0]
    k, cg, kh, kw = w.shape
    if out_hw is None:
        out_hw = tuple(_out_size(x.shape[2 + a], w.shape[2 + a], stride[a], padding[a], dilation[a]) for a in (0, 1))
    if n == 0 or min(out_hw) == 0:  # an empty batch (conv_transpose2d's backward: also an empty image)
        return np.zeros((n, k, *out_hw), dtype=np.result_type(x, w))
    cols = _cols(x, (kh, kw), stride, padding, dilation, out_hw).reshape(n, groups, cg * kh * kw, -1)
    # einsum hands the contraction to BLAS; a stacked matmul broadcasting w over the images was 10-40x slower
    out = np.einsum("gkc,ngcp->ngkp", w.reshape(groups, k // groups, cg * kh * kw), cols, optimize=True)
    return out.reshape(n, k, *out_hw)


def _conv2d_backward_input(grad, w, x_shape, stride, padding, dilation, groups):
    """dL/dx of conv2d (col2im of Wᵀ · grad): also the forward of the transposed convolution.

    grad: (N, K, Ho, Wo); returns an array of x_shape (N, C, H, W). Each kernel tap (i, j) adds its
    share back to the strided positions of the padded input it read from: a loop over kh·kw taps,
    never over pixels.
    """
    if _use_kernels(grad, w):
        return _conv_kernels.conv2d_backward_input(grad, w, x_shape, stride=stride, padding=padding, dilation=dilation,
                                                   groups=groups)
    n, c, h, wd = x_shape
    k, cg, kh, kw = w.shape
    ho, wo = grad.shape[2:]
    if grad.size == 0:
        return np.zeros(x_shape, dtype=np.result_type(grad, w))
    (sh, sw), (dh, dw), (pt, pb), (pl, pr) = stride, dilation, padding[0], padding[1]
    wt = w.reshape(groups, k // groups, cg * kh * kw).transpose(0, 2, 1)
    dcols = np.einsum("gck,ngkp->ngcp", wt, grad.reshape(n, groups, k // groups, ho * wo), optimize=True)  # as above
    dcols = dcols.reshape(n, c, kh, kw, ho, wo)
    dxp = np.zeros((n, c, h + pt + pb, wd + pl + pr), dtype=dcols.dtype)
    for i in range(kh):
        for j in range(kw):
            rows = slice(i * dh, i * dh + sh * (ho - 1) + 1, sh)  # the rows tap i read, one per output row
            cols = slice(j * dw, j * dw + sw * (wo - 1) + 1, sw)
            dxp[:, :, rows, cols] += dcols[:, :, i, j]
    return dxp[:, :, pt : pt + h, pl : pl + wd]


def _conv2d_backward_weight(x, grad, w_shape, stride, padding, dilation, groups):
    """dL/dw of conv2d: Σ over images and positions of grad ⊗ receptive field (a matmul per image and group)."""
    if _use_kernels(x, grad):
        return _conv_kernels.conv2d_backward_weight(x, grad, w_shape, stride=stride, padding=padding,
                                                    dilation=dilation, groups=groups)
    k, cg, kh, kw = w_shape
    n, _, ho, wo = grad.shape
    if grad.size == 0:
        return np.zeros(w_shape, dtype=np.result_type(x, grad))
    cols = _cols(x, (kh, kw), stride, padding, dilation, (ho, wo)).reshape(n, groups, cg * kh * kw, ho * wo)
    g = grad.reshape(n, groups, k // groups, ho * wo)
    # one contraction over images and positions together (einsum hands it to BLAS): a matmul per image
    # followed by a sum over images was 30-100x slower (N small GEMMs and an (N, K, C·kh·kw) temporary)
    return np.einsum("ngkp,ngcp->gkc", g, cols, optimize=True).reshape(w_shape)


# --- convolution: the Functions ----------------------------------------------------------------


class Conv2d(Function):
    @staticmethod
    def forward(ctx, x, w, b, *, stride, padding, dilation, groups):
        ctx.save_for_backward(x, w)
        ctx.args = (stride, padding, dilation, groups)
        ctx.has_bias = b is not None
        out = _conv2d_forward(x, w, stride, padding, dilation, groups)
        if b is not None:
            out += b.reshape(1, -1, 1, 1)
        return out

    @staticmethod
    def backward(ctx, grad):
        x, w = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        dx = _conv2d_backward_input(grad, w, x.shape, *ctx.args) if need_x else None
        dw = _conv2d_backward_weight(x, grad, w.shape, *ctx.args) if need_w else None
        db = grad.sum(axis=(0, 2, 3)) if ctx.has_bias and need_b else None
        return dx, dw, db


class ConvTranspose2d(Function):
    @staticmethod
    def forward(ctx, x, w, b, *, stride, padding, dilation, groups, out_hw):
        ctx.save_for_backward(x, w)
        ctx.args = (stride, padding, dilation, groups)
        ctx.has_bias = b is not None
        out_shape = (x.shape[0], w.shape[1] * groups, *out_hw)
        out = _conv2d_backward_input(x, w, out_shape, *ctx.args)
        if b is not None:
            out += b.reshape(1, -1, 1, 1)
        return out

    @staticmethod
    def backward(ctx, grad):
        # The transposed convolution of x is conv2d's input-gradient, so its own input-gradient is
        # conv2d's forward, and its weight-gradient is conv2d's weight-gradient with roles swapped.
        x, w = ctx.saved_tensors
        need_x, need_w, need_b = ctx.needs_input_grad
        dx = _conv2d_forward(grad, w, *ctx.args, out_hw=x.shape[2:]) if need_x else None
        dw = _conv2d_backward_weight(grad, x, w.shape, *ctx.args) if need_w else None
        db = grad.sum(axis=(0, 2, 3)) if ctx.has_bias and need_b else None
        return dx, dw, db


def _check_bias(op, bias, channels, dtype):
    if bias is None:
        return
    if bias.shape != (channels,):
        raise ValueError(f"{op}: bias must have shape ({channels},) for {channels} output channels, got {bias.shape}")
    if bias.dtype != dtype:
        raise TypeError(f"{op}: bias dtype {bias.dtype} must match the input dtype {dtype}")


def _conv_padding(op, padding, kernel, stride, dilation):
    """PyTorch's padding argument as ((top, bottom), (left, right)): an int, a pair, 'valid' or 'same'."""
    if padding == "valid":
        return ((0, 0), (0, 0))
    if padding == "same":
        if stride != (1, 1):
            raise ValueError(f"{op}: padding='same' is not supported for strided convolutions (stride={stride})")
        # total padding d·(k-1); when odd, the extra row/column goes at the bottom/right, as PyTorch does
        total = [d * (k - 1) for d, k in zip(dilation, kernel)]
        return tuple((t // 2, t - t // 2) for t in total)
    if isinstance(padding, str):
        raise ValueError(f"{op}: padding must be 'valid', 'same', an int or a pair of ints, got {padding!r}")
    p = _pair(padding, "padding", op)
    if min(p) < 0:
        raise ValueError(f"{op}: negative padding is not supported, got padding={padding!r}")
    return ((p[0], p[0]), (p[1], p[1]))


def _check_sizes(op, x, w):
    """PyTorch's refusals of empty kernels, and of empty images in a non-empty batch (an empty batch is fine)."""
    if 0 in w.shape[2:]:
        raise ValueError(f"{op}: kernel size should be greater than zero, got weight of shape {w.shape}")
    if 0 in x.shape[2:] and x.shape[0] and x.shape[1]:
        raise ValueError(f"{op}: only zero batch or zero channel inputs are supported, got input of shape {x.shape}")


def _conv_args(op, stride, dilation, groups):
    stride, dilation = _pair(stride, "stride", op), _pair(dilation, "dilation", op)
    if min(stride) < 1:
        raise ValueError(f"{op}: stride must be positive, got {stride}")
    if min(dilation) < 1:
        raise ValueError(f"{op}: dilation must be positive, got {dilation}")
    if not _is_int(groups) or groups < 1:
        raise ValueError(f"{op}: groups must be a positive int, got {groups!r}")
    return stride, dilation, int(groups)


def conv2d(input, weight, bias=None, stride=1, padding=0, dilation=1, groups=1):  # noqa: A002 - PyTorch's name
    """2-D convolution (cross-correlation, as in every deep-learning library) over (N, C, H, W) images.

    weight: (out_channels, in_channels/groups, kH, kW); bias: (out_channels,) or None. stride,
    padding and dilation are ints or pairs; padding may also be 'valid' (none) or 'same' (output as
    large as the input; stride 1 only). With groups=g the channels are split into g independent
    convolutions. Output: (N, out_channels, Ho, Wo), Ho = ⌊(H + 2p - d·(kH-1) - 1) / s⌋ + 1.
    """
    return _batched(_conv2d, input, weight, bias, stride, padding, dilation, groups)


def _conv2d(x, w, b, stride, padding, dilation, groups):
    op = "conv2d"
    _check_4d(op, x, w)
    stride, dilation, groups = _conv_args(op, stride, dilation, groups)
    k, cg, kh, kw = w.shape
    _check_sizes(op, x, w)
    if k == 0:
        raise ValueError(f"{op}: weight of shape {w.shape} has no output channels (weight.shape[0] must be at least 1)")
    if k % groups:
        raise ValueError(f"{op}: out_channels {k} (weight.shape[0] of weight {w.shape}) is not divisible by "
                         f"groups={groups}")
    if x.shape[1] != cg * groups:
        raise ValueError(
            f"{op}: given groups={groups} and weight of shape {w.shape}, expected input of shape {x.shape} "
            f"to have {cg * groups} channels (weight.shape[1]·groups), but got {x.shape[1]}"
        )
    _check_bias(op, b, k, x.dtype)
    pad = _conv_padding(op, padding, (kh, kw), stride, dilation)
    padded = (x.shape[2] + sum(pad[0]), x.shape[3] + sum(pad[1]))
    eff = (dilation[0] * (kh - 1) + 1, dilation[1] * (kw - 1) + 1)
    if padded[0] < eff[0] or padded[1] < eff[1]:
        raise ValueError(
            f"{op}: padded input size per channel {padded} is smaller than the (dilated) kernel size {eff} "
            f"(input {x.shape}, weight {w.shape}); the kernel can't be larger than the padded input"
        )
    return Conv2d.apply(x, w, b, stride=stride, padding=pad, dilation=dilation, groups=groups)


def conv_transpose2d(input, weight, bias=None, stride=1, padding=0, output_padding=0, groups=1, dilation=1):  # noqa: A002
    """Transposed 2-D convolution (the gradient of conv2d with respect to its input), PyTorch's argument order.

    weight: (in_channels, out_channels/groups, kH, kW). Output side
    Ho = (H - 1)·s - 2p + d·(kH - 1) + output_padding + 1; output_padding (< stride or < dilation)
    picks among the input sizes that a strided conv2d maps to the same output size.
    """
    return _batched(_conv_transpose2d, input, weight, bias, stride, padding, output_padding, groups, dilation)


def _conv_transpose2d(x, w, b, stride, padding, output_padding, groups, dilation):
    op = "conv_transpose2d"
    _check_4d(op, x, w)
    stride, dilation, groups = _conv_args(op, stride, dilation, groups)
    if isinstance(padding, str):
        raise ValueError(f"{op}: padding must be an int or a pair of ints, got {padding!r}")
    p, op_pad = _pair(padding, "padding", op), _pair(output_padding, "output_padding", op)
    if min(p) < 0 or min(op_pad) < 0:
        raise ValueError(f"{op}: padding and output_padding must be non-negative, got {p} and {op_pad}")
    cin, cg_out, kh, kw = w.shape
    _check_sizes(op, x, w)
    if 0 in w.shape:
        raise ValueError(f"{op}: expected a non-empty weight, got shape {w.shape}")
    if cin % groups:
        raise ValueError(f"{op}: in_channels {cin} (weight.shape[0] of weight {w.shape}) is not divisible by "
                         f"groups={groups}")
    if x.shape[1] != cin:
        raise ValueError(
            f"{op}: weight of shape {w.shape} expects input with {cin} channels (weight.shape[0]), "
            f"but input of shape {x.shape} has {x.shape[1]}"
        )
    for a in (0, 1):
        if op_pad[a] >= stride[a] and op_pad[a] >= dilation[a]:
            raise ValueError(
                f"{op}: output padding must be smaller than either stride or dilation, got output_padding="
                f"{op_pad}, stride={stride}, dilation={dilation}"
            )
    _check_bias(op, b, cg_out * groups, x.dtype)
    out_hw = tuple(
        (x.shape[2 + a] - 1) * stride[a] - 2 * p[a] + dilation[a] * (w.shape[2 + a] - 1) + op_pad[a] + 1 for a in (0, 1)
    )
    if min(out_hw) < (0 if x.shape[0] == 0 else 1):  # an empty batch may have an empty output, as in PyTorch
        raise ValueError(f"{op}: input {x.shape} with weight {w.shape} and padding {p} gives an empty output {out_hw}")
    pad = ((p[0], p[0]), (p[1], p[1]))
    return ConvTranspose2d.apply(x, w, b, stride=stride, padding=pad, dilation=dilation, groups=groups, out_hw=out_hw)


# --- pooling ----------------------------------------------------------------------------------------


def _pool_out(n, k, s, p, d, ceil_mode):
    """Pooled length; in ceil mode the last window must start inside the input or its left padding."""
    span = n + 2 * p - d * (k - 1) - 1
    out = (-(-span // s) if ceil_mode else span // s) + 1
    if ceil_mode and (out - 1) * s >= n + p:
        out -= 1
    return out


def _pool_args(op, x, kernel_size, stride, padding, dilation, ceil_mode):
    """Kernel, stride, padding, dilation pairs and the output size, checked as PyTorch checks them."""
    if x.ndim not in (3, 4):
        raise ValueError(f"{op}: expected a 3-D (C, H, W) or 4-D (N, C, H, W) input, got shape {x.shape}")
    k = _pair(kernel_size, "kernel_size", op)
    s = k if stride is None or stride == () else _pair(stride, "stride", op)
    p, d = _pair(padding, "padding", op), _pair(dilation, "dilation", op)
    if min(k) < 1 or min(s) < 1 or min(d) < 1:
        raise ValueError(f"{op}: kernel_size, stride and dilation must be positive, got {k}, {s}, {d}")
    for a in (0, 1):
        if not 0 <= p[a] <= k[a] // 2:  # half the kernel, not the dilated one, as PyTorch checks
            raise ValueError(f"{op}: pad should be at most half of kernel size, got padding={p}, kernel_size={k}")
    out = tuple(_pool_out(x.shape[-2 + a], k[a], s[a], p[a], d[a], ceil_mode) for a in (0, 1))
    if min(out) < 1:
        raise ValueError(f"{op}: input of shape {x.shape} is too small for kernel_size={k}, padding={p}, "
                         f"dilation={d} (output size {out})")
    return k, s, p, d, out


def _pool_pad(x, k, s, p, d, out, value):
    """Pad the last two dims: p before, and after enough to hold every window (ceil mode may need more)."""
    after = [max(p[a], (out[a] - 1) * s[a] + d[a] * (k[a] - 1) + 1 - x.shape[-2 + a] - p[a]) for a in (0, 1)]
    widths = [(0, 0)] * (x.ndim - 2) + [(p[0], after[0]), (p[1], after[1])]
    return np.pad(x, widths, constant_values=value)


def _pool_windows(xp, k, s, d, out):
    """The (..., Ho, Wo, kh, kw) view of every pooling window of a padded array."""
    win = sliding_window_view(xp, (d[0] * (k[0] - 1) + 1, d[1] * (k[1] - 1) + 1), axis=(-2, -1))
    return win[..., : s[0] * (out[0] - 1) + 1 : s[0], : s[1] * (out[1] - 1) + 1 : s[1], :: d[0], :: d[1]]


def _avg_pool2d_divisor(shape, k, s, p, out, count_include_pad, dtype):
    """(Ho, Wo) divisors: window size clipped to the padded input, or count of real input elements."""
    sizes = []
    for a in (0, 1):
        start = np.arange(out[a]) * s[a] - p[a]
        end = np.minimum(start + k[a], shape[-2 + a] + p[a])
        if not count_include_pad:
            start, end = np.maximum(start, 0), np.minimum(end, shape[-2 + a])
        sizes.append(end - start)
    return np.multiply.outer(sizes[0], sizes[1]).astype(dtype)


def _avg_pool2d_forward(x, k, s, p, out, divisor):
    xp = _pool_pad(x, k, s, p, (1, 1), out, 0)
    return _pool_windows(xp, k, s, (1, 1), out).sum(axis=(-2, -1)) / divisor


def _avg_pool2d_backward(grad, x_shape, k, s, p, out, divisor):
    """Each output's gradient, divided by its divisor, is shared by every element of its window."""
    g = grad / divisor
    h, w = x_shape[-2:]
    after = [max(p[a], (out[a] - 1) * s[a] + k[a] - x_shape[-2 + a] - p[a]) for a in (0, 1)]
    dxp = np.zeros((*x_shape[:-2], h + p[0] + after[0], w + p[1] + after[1]), dtype=grad.dtype)
    for i in range(k[0]):
        for j in range(k[1]):
            dxp[..., i : i + s[0] * (out[0] - 1) + 1 : s[0], j : j + s[1] * (out[1] - 1) + 1 : s[1]] += g
    return dxp[..., p[0] : p[0] + h, p[1] : p[1] + w]


class AvgPool2d(Function):
    @staticmethod
    def forward(ctx, x, *, kernel, stride, padding, out, divisor):
        ctx.args = (x.shape, kernel, stride, padding, out, divisor)
        return _avg_pool2d_forward(x, kernel, stride, padding, out, divisor)

    @staticmethod
    def backward(ctx, grad):
        return _avg_pool2d_backward(grad, *ctx.args)


def avg_pool2d(input, kernel_size, stride=None, padding=0, ceil_mode=False, count_include_pad=True,  # noqa: A002
               divisor_override=None):
    """Mean over each kernel_size window (stride defaults to kernel_size), PyTorch's semantics.

    Zero padding of at most half the kernel; count_include_pad=True divides by the window size
    (clipped to the padded input), False by the number of real input elements in the window;
    ceil_mode rounds the output size up (the last window may hang over the edge).
    """
    op = "avg_pool2d"
    k, s, p, _, out = _pool_args(op, input, kernel_size, stride, padding, 1, ceil_mode)
    if divisor_override is not None:
        if not _is_int(divisor_override) or divisor_override == 0:
            raise ValueError(f"{op}: divisor_override must be a non-zero int, got {divisor_override!r}")
        divisor = np.asarray(divisor_override, dtype=input.dtype)
    else:
        divisor = _avg_pool2d_divisor(input.shape, k, s, p, out, count_include_pad, input.dtype)
    return AvgPool2d.apply(input, kernel=k, stride=s, padding=p, out=out, divisor=divisor)


def _max_pool2d_forward(x, k, s, p, d, out):
    """Max of each window and the argmax's tap index in the window, as PyTorch picks it: the first maximum
    among the taps inside the input (padding never wins, not even over -inf), or the last NaN."""
    floating = np.issubdtype(x.dtype, np.floating)
    fill = -np.inf if floating else np.iinfo(x.dtype).min
    xp = _pool_pad(x, k, s, p, d, out, fill)
    win = _pool_windows(xp, k, s, d, out)
    win = win.reshape(*win.shape[:-2], k[0] * k[1])
    arg = win.argmax(axis=-1)  # the first maximum
    # only a window whose maximum is the fill (its taps inside the input all -inf) can have picked a padding tap
    maybe = xp.shape != x.shape and np.any(np.take_along_axis(win, arg[..., None], axis=-1) == fill)
    rows, cols = _max_pool2d_rows_cols(arg, k, s, p, d, out) if maybe else (0, 0)
    picked_pad = (rows < 0) | (rows >= x.shape[-2]) | (cols < 0) | (cols >= x.shape[-1])
    if np.any(picked_pad):
        taps = [(np.arange(out[a])[:, None] * s[a] + np.arange(k[a]) * d[a] - p[a]) for a in (0, 1)]
        inside = [(t >= 0) & (t < x.shape[-2 + a]) for a, t in enumerate(taps)]  # (Ho, kh) and (Wo, kw)
        valid = (inside[0][:, None, :, None] & inside[1][None, :, None, :]).reshape(*out, -1)
        arg = np.where(picked_pad & valid.any(axis=-1), valid.argmax(axis=-1), arg)
    if floating and np.isnan(x).any():  # PyTorch's scan keeps the last NaN it meets
        nan = np.isnan(win)
        arg = np.where(nan.any(axis=-1), nan.shape[-1] - 1 - nan[..., ::-1].argmax(axis=-1), arg)
    return np.take_along_axis(win, arg[..., None], axis=-1)[..., 0], arg


def _max_pool2d_rows_cols(arg, k, s, p, d, out):
    """Input row and column (unpadded coordinates) of each window's argmax."""
    rows = np.arange(out[0])[:, None] * s[0] + (arg // k[1]) * d[0] - p[0]
    cols = np.arange(out[1])[None, :] * s[1] + (arg % k[1]) * d[1] - p[1]
    return rows, cols


def _max_pool2d_backward(grad, arg, x_shape, k, s, p, d, out):
    """The gradient flows only to each window's maximum (summed where windows share one).

    A dilated window can miss the input entirely (all its taps in the padding): its output is -inf
    and its gradient goes nowhere, as in PyTorch.
    """
    h, w = x_shape[-2:]
    rows, cols = _max_pool2d_rows_cols(arg, k, s, p, d, out)
    inside = ((rows >= 0) & (rows < h) & (cols >= 0) & (cols < w)).ravel()
    lead = int(np.prod(x_shape[:-2]))
    flat = (np.arange(lead).reshape(*x_shape[:-2], 1, 1) * (h * w) + rows * w + cols).ravel()
    dx = np.bincount(flat[inside], weights=grad.ravel()[inside], minlength=lead * h * w)
    return dx.reshape(x_shape).astype(grad.dtype, copy=False)


class MaxPool2d(Function):
    @staticmethod
    def forward(ctx, x, *, kernel, stride, padding, dilation, out):
        y, arg = _max_pool2d_forward(x, kernel, stride, padding, dilation, out)
        ctx.save_for_backward(arg)
        ctx.args = (x.shape, kernel, stride, padding, dilation, out)
        return y

    @staticmethod
    def backward(ctx, grad):
        (arg,) = ctx.saved_tensors
        return _max_pool2d_backward(grad, arg, *ctx.args)


def max_pool2d(input, kernel_size, stride=None, padding=0, dilation=1, ceil_mode=False,  # noqa: A002
               return_indices=False):
    """Max over each (dilated) kernel_size window; the gradient goes to the argmax (the first, on ties).

    Padding is -inf (at most half the effective kernel). With return_indices=True also returns the
    flat index (h·W + w) of each maximum in its input plane, as PyTorch does.
    """
    k, s, p, d, out = _pool_args("max_pool2d", input, kernel_size, stride, padding, dilation, ceil_mode)
    y = MaxPool2d.apply(input, kernel=k, stride=s, padding=p, dilation=d, out=out)
    if not return_indices:
        return y
    _, arg = _max_pool2d_forward(input.data, k, s, p, d, out)
    rows, cols = _max_pool2d_rows_cols(arg, k, s, p, d, out)
    return y, Tensor(rows * input.shape[-1] + cols)


# --- interpolation -----------------------------------------------------------------------------------


def _nearest_index(n_in: int, n_out: int, scale_factor, shortcut: bool = False):
    """PyTorch's nearest rule: src = min(⌊dst · scale⌋, n_in - 1) in float32, scale = n_in/n_out or 1/scale_factor.

    `shortcut`: PyTorch's 2-D kernels (forward and backward) take src = dst when n_out = n_in and
    src = dst // 2 when n_out = 2·n_in, whatever scale_factor gave that size (e.g. 3 · 2.3 -> 6).
    """
    dst = np.arange(n_out)
    if shortcut and n_out in (n_in, 2 * n_in):
        return dst // (n_out // n_in)
    scale = np.float32(1.0 / scale_factor) if scale_factor else np.float32(n_in) / np.float32(n_out)
    return np.minimum(np.floor(dst.astype(np.float32) * scale).astype(np.int64), n_in - 1)


def _interpolate_nearest_forward(x, indices):
    """Gather along each spatial axis (the last len(indices) axes)."""
    first = x.ndim - len(indices)
    for a, idx in enumerate(indices):
        x = np.take(x, idx, axis=first + a)
    return x


def _interpolate_nearest_backward(grad, x_shape, indices):
    """Scatter-add back along each axis; the indices are non-decreasing, so each source is one contiguous run."""
    first = len(x_shape) - len(indices)
    for a in reversed(range(len(indices))):
        idx, axis = indices[a], first + a
        src, starts = np.unique(idx, return_index=True)
        summed = np.add.reduceat(grad, starts, axis=axis)
        shape = list(grad.shape)
        shape[axis] = x_shape[axis]
        g = np.zeros(shape, dtype=grad.dtype)
        g[(slice(None),) * axis + (src,)] = summed
        grad = g
    return grad


class InterpolateNearest(Function):
    @staticmethod
    def forward(ctx, x, *, indices):
        ctx.args = (x.shape, indices)
        return _interpolate_nearest_forward(x, indices)

    @staticmethod
    def backward(ctx, grad):
        return _interpolate_nearest_backward(grad, *ctx.args)


def interpolate(input, size=None, scale_factor=None, mode="nearest", align_corners=None,  # noqa: A002
                recompute_scale_factor=None):
    """Resize the spatial dims of an (N, C, *spatial) input (1 to 3 spatial dims); mode 'nearest' only.

    Give exactly one of size (int or tuple) and scale_factor (float or tuple; output side
    ⌊n · scale_factor⌋). Source index ⌊dst · scale⌋ as PyTorch computes it (in float32), where
    scale = 1/scale_factor when scale_factor is given, else n_in/n_out.
    """
    op = "interpolate"
    if mode != "nearest":
        raise NotImplementedError(f"{op}: mode {mode!r} is not implemented; only mode='nearest' is")
    if align_corners is not None:
        raise ValueError(f"{op}: align_corners option can only be set with the interpolating modes "
                         f"linear | bilinear | bicubic | trilinear, not with mode {mode!r}")
    if input.ndim not in (3, 4, 5):
        raise ValueError(f"{op}: expected a 3-D, 4-D or 5-D (N, C, *spatial) input, got shape {input.shape}")
    dims = input.ndim - 2
    spatial = input.shape[2:]
    if (size is None) == (scale_factor is None):
        raise ValueError(f"{op}: give exactly one of size and scale_factor, got size={size!r}, "
                         f"scale_factor={scale_factor!r}")
    if size is not None:
        if recompute_scale_factor:
            raise ValueError(f"{op}: recompute_scale_factor is not meaningful with an explicit size")
        sizes = (size,) * dims if _is_int(size) else tuple(size)
        if len(sizes) != dims or not all(_is_int(n) and n > 0 for n in sizes):
            raise ValueError(f"{op}: size must be a positive int or {dims} positive ints for input {input.shape}, "
                             f"got {size!r}")
        scales = (None,) * dims
    else:
        scales = (scale_factor,) * dims if not isinstance(scale_factor, (tuple, list)) else tuple(scale_factor)
        if len(scales) != dims or not all(float(f) > 0 for f in scales):
            raise ValueError(f"{op}: scale_factor must be a positive float or {dims} of them for input "
                             f"{input.shape}, got {scale_factor!r}")
        sizes = tuple(int(math.floor(n * float(f))) for n, f in zip(spatial, scales))
        if min(sizes) < 1:
            raise ValueError(f"{op}: scale_factor {scale_factor!r} gives an empty output {sizes} for input "
                             f"{input.shape}")
        if recompute_scale_factor:
            scales = (None,) * dims
    # (PyTorch 2.13's 1-D and 3-D kernels take the shortcut in the backward only, so their gradient is not
    # that of their forward; this gives the forward's true gradient)
    indices = tuple(_nearest_index(n, m, f, dims == 2) for n, m, f in zip(spatial, sizes, scales))
    return InterpolateNearest.apply(input, indices=indices)


# --- padding ------------------------------------------------------------------------------------------


def _pad_source(n: int, before: int, after: int, mode: str):
    """For each position of a padded axis, the input index it copies (-1: the constant value)."""
    pos = np.arange(-before, n + after)
    if mode == "constant":
        return np.where((pos >= 0) & (pos < n), pos, -1)
    if mode == "reflect":  # mirror about the edge element, without repeating it
        pos = np.abs(pos)
        return np.where(pos > n - 1, 2 * (n - 1) - pos, pos)
    if mode == "replicate":
        return np.clip(pos, 0, n - 1)
    return pos % n  # circular


def _pad_forward(x, pads, mode, value):
    """pads: ((before, after), ...) for the last len(pads) axes; negative entries crop."""
    first = x.ndim - len(pads)
    crop = tuple(slice(max(-b, 0), n - max(-a, 0)) for (b, a), n in zip(pads, x.shape[first:]))
    x = x[(slice(None),) * first + crop]
    grow = [(max(b, 0), max(a, 0)) for b, a in pads]
    if mode == "constant":
        return np.pad(x, [(0, 0)] * first + grow, constant_values=value)
    for k, (b, a) in enumerate(grow):
        x = np.take(x, _pad_source(x.shape[first + k], b, a, mode), axis=first + k)
    return x


def _pad_backward(grad, x_shape, pads, mode):
    """Sum each output position's gradient back into the input element it copied; cropped elements get 0."""
    first = len(x_shape) - len(pads)
    cropped = [n - max(-b, 0) - max(-a, 0) for (b, a), n in zip(pads, x_shape[first:])]
    grow = [(max(b, 0), max(a, 0)) for b, a in pads]
    if mode == "constant":
        grad = grad[(slice(None),) * first + tuple(slice(b, b + n) for (b, _), n in zip(grow, cropped))]
    else:
        for k, (b, a) in enumerate(grow):
            src = _pad_source(cropped[k], b, a, mode)
            onehot = (src[:, None] == np.arange(cropped[k])[None, :]).astype(grad.dtype)  # (padded, input)
            grad = np.moveaxis(np.tensordot(grad, onehot, axes=([first + k], [0])), -1, first + k)
    widths = [(0, 0)] * first + [(max(-b, 0), max(-a, 0)) for b, a in pads]
    return np.pad(grad, widths)


class Pad(Function):
    @staticmethod
    def forward(ctx, x, *, pads, mode, value):
        ctx.args = (x.shape, pads, mode)
        return _pad_forward(x, pads, mode, value)

    @staticmethod
    def backward(ctx, grad):
        return _pad_backward(grad, *ctx.args)


def pad(input, pad, mode="constant", value=None):  # noqa: A002 - PyTorch's names
    """Pad (or, with negative entries, crop) the last dims; `pad` lists the LAST dim first, as PyTorch.

    pad=(left, right) pads the last dim, (left, right, top, bottom) the last two, and so on. Modes:
    'constant' (value, default 0; any number of dims), 'reflect' (mirror without repeating the edge),
    'replicate' (repeat the edge) and 'circular' (wrap around), the last three on the last 1-3 dims of a
    (batch,) channel, spatial input.
    """
    op = "pad"
    if not isinstance(pad, (tuple, list)) or len(pad) % 2 or not all(_is_int(p) for p in pad):
        raise ValueError(f"{op}: pad must be a tuple of ints of even length, got {pad!r}")
    dims = len(pad) // 2
    if dims > input.ndim:
        raise ValueError(f"{op}: pad {tuple(pad)} pads {dims} dims but the input of shape {input.shape} has "
                         f"{input.ndim}")
    pads = tuple((int(pad[2 * k]), int(pad[2 * k + 1])) for k in reversed(range(dims)))  # first padded dim first
    if mode not in ("constant", "reflect", "replicate", "circular"):
        raise NotImplementedError(f"{op}: mode {mode!r} is not implemented; use constant, reflect, replicate or "
                                  "circular")
    shape = input.shape[input.ndim - dims :]
    sizes = [n + b + a for n, (b, a) in zip(shape, pads)]
    if min(sizes, default=1) < 0:
        raise ValueError(f"{op}: pad {tuple(pad)} gives a negative output size {sizes} for input {input.shape}")
    if mode != "constant":
        if value not in (None, 0, 0.0):
            raise ValueError(f"{op}: value can only be given with mode='constant', got mode={mode!r}, value={value!r}")
        if dims not in (1, 2, 3) or input.ndim not in (dims + 1, dims + 2):
            raise ValueError(f"{op}: mode {mode!r} with padding size {len(pad)} needs a {dims + 1}-D or {dims + 2}-D "
                             f"input, got shape {input.shape}")
        for n, (b, a) in zip(shape, pads):
            cropped = n - max(-b, 0) - max(-a, 0)
            limit = {"reflect": cropped - 1, "circular": cropped}.get(mode, np.inf)  # replicate: any size
            if max(b, a) > limit or cropped < 1:
                raise ValueError(f"{op}: padding {tuple(pad)} in mode {mode!r} should be less than the corresponding "
                                 f"input dimension, input shape {input.shape}")
    return Pad.apply(input, pads=pads, mode=mode, value=0.0 if value is None else value)
