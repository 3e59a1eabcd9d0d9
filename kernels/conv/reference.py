"""2-D convolution in plain NumPy, written to be read: the specification the cpu and cuda forms are tested against.

Arrays are NCHW: x (N, C, H, W), w (K, C/groups, kh, kw), y (N, K, Ho, Wo). With stride s, zero padding
(p_top, p_bottom) × (p_left, p_right) and dilation d, convolution (cross-correlation, as in every deep-learning
library) is

    y[n, k, oh, ow] = Σ_{c, i, j} w[k, c, i, j] · x_pad[n, g·C/G + c, oh·s_h + i·d_h, ow·s_w + j·d_w]     (1)

where g = k // (K/G) is the group of output channel k and c runs over that group's C/G input channels.
The output size is the convolution-arithmetic relation (Dumoulin & Visin 2016, "A guide to convolution
arithmetic for deep learning", §2.4 and §5.1 for dilation):

    Ho = ⌊(H + p_top + p_bottom − d_h·(kh − 1) − 1) / s_h⌋ + 1.                                        (2)

(1) is linear in x, so its gradient with respect to x is the adjoint of the same sums — every output's gradient
flows back to the input pixels it read — and that adjoint is, by definition, the transposed convolution
(Dumoulin & Visin §4: "transposed convolution ... swaps the forward and backward passes of a convolution"):

    dx_pad[n, g·C/G + c, oh·s_h + i·d_h, ow·s_w + j·d_w] += Σ_k w[k, c, i, j] · gy[n, k, oh, ow].        (3)

One output size of a transposed convolution maps back to several input sizes when s > 1 (Dumoulin & Visin
§4.6, the extra a = output_padding); the caller names the one it means by `x_shape`. (1) is linear in w too:

    dw[k, c, i, j] = Σ_{n, oh, ow} gy[n, k, oh, ow] · x_pad[n, g·C/G + c, oh·s_h + i·d_h, ow·s_w + j·d_w].  (4)

Each function gathers the receptive fields — the window of (kh, kw) taps over every output position — with one
fancy index and contracts them with einsum, so each line is one of the equations above.
"""

from __future__ import annotations

import numpy as np


def pair_padding(padding):
    """Padding as ((top, bottom), (left, right)) from p, (ph, pw) or that form itself."""
    if np.ndim(padding) == 0:
        padding = (padding, padding)
    (a, b) = padding
    if np.ndim(a) == 0:
        return ((int(a), int(a)), (int(b), int(b)))
    return ((int(a[0]), int(a[1])), (int(b[0]), int(b[1])))


def out_size(n, k, stride, pad, dilation):
    """Output length along one axis, equation (2): ⌊(n + pads − d·(k − 1) − 1) / s⌋ + 1."""
    return (n + pad[0] + pad[1] - dilation * (k - 1) - 1) // stride + 1


def _taps(out, k, stride, dilation):
    """(out, k) padded-input coordinates oh·s + i·d read by tap i at output oh."""
    return np.arange(out)[:, None] * stride + np.arange(k)[None, :] * dilation


def _windows(xp, kernel, stride, dilation, out_hw):
    """Receptive fields of the padded input: (N, C, Ho, Wo, kh, kw), [..., oh, ow, i, j] = xp[..., oh·s + i·d, ...]."""
    rows = _taps(out_hw[0], kernel[0], stride[0], dilation[0])  # (Ho, kh)
    cols = _taps(out_hw[1], kernel[1], stride[1], dilation[1])  # (Wo, kw)
    return xp[:, :, rows[:, None, :, None], cols[None, :, None, :]]


def _pad_to(x, padding, size_hw):
    """x zero-padded by `padding` (top, left) and then at the bottom/right up to at least size_hw."""
    (pt, pb), (pl, pr) = padding
    h, w = x.shape[2:]
    pb = max(pb, size_hw[0] - pt - h)
    pr = max(pr, size_hw[1] - pl - w)
    return np.pad(x, ((0, 0), (0, 0), (pt, pb), (pl, pr)))


def conv2d_forward(x, w, *, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1, bias=None):
    """y = conv2d(x, w) (+ bias), equation (1); x (N, C, H, W), w (K, C/groups, kh, kw) -> (N, K, Ho, Wo)."""
    n, c, h, wd = x.shape
    k, cg, kh, kw = w.shape
    padding = pair_padding(padding)
    out_hw = tuple(out_size((h, wd)[a], (kh, kw)[a], stride[a], padding[a], dilation[a]) for a in (0, 1))
    xp = _pad_to(x, padding, (0, 0))
    win = _windows(xp, (kh, kw), stride, dilation, out_hw).reshape(n, groups, cg, *out_hw, kh, kw)
    y = np.einsum("ngchwij,gkcij->ngkhw", win, w.reshape(groups, k // groups, cg, kh, kw))
    y = y.reshape(n, k, *out_hw)
    return y if bias is None else y + bias.reshape(1, k, 1, 1)


def conv2d_backward_input(gy, w, x_shape, *, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1):
    """dL/dx of conv2d for output gradient gy (N, K, Ho, Wo), equation (3); an array of x_shape.

    This is also the transposed convolution of gy (conv_transpose2d's forward, weight (C_in=K, C_out/groups,
    kh, kw) read as conv2d's (K, C/groups, kh, kw)); x_shape picks its output size.
    """
    n, c, h, wd = x_shape
    k, cg, kh, kw = w.shape
    padding = pair_padding(padding)
    out_hw = gy.shape[2:]
    wg = w.reshape(groups, k // groups, cg, kh, kw)
    dwin = np.einsum("ngkhw,gkcij->ngchwij", gy.reshape(n, groups, k // groups, *out_hw), wg)
    reach = tuple((out_hw[a] - 1) * stride[a] + ((kh, kw)[a] - 1) * dilation[a] + 1 for a in (0, 1))
    dxp = _pad_to(np.zeros(x_shape, dtype=np.result_type(gy, w)), padding, reach)
    rows = _taps(out_hw[0], kh, stride[0], dilation[0])
    cols = _taps(out_hw[1], kw, stride[1], dilation[1])
    # np.add.at accumulates where windows overlap (a plain += would keep only one of the repeated indices)
    np.add.at(dxp, (slice(None), slice(None), rows[:, None, :, None], cols[None, :, None, :]),
              dwin.reshape(n, c, *out_hw, kh, kw))
    (pt, _), (pl, _) = padding
    return dxp[:, :, pt : pt + h, pl : pl + wd]


def conv2d_backward_weight(x, gy, w_shape, *, stride=(1, 1), padding=(0, 0), dilation=(1, 1), groups=1):
    """dL/dw of conv2d, equation (4): the receptive fields weighted by gy, summed over images and positions.

    The sums run over gy's positions (N, K, Ho, Wo); input pixels outside x count as zero padding.
    """
    n = x.shape[0]
    k, cg, kh, kw = w_shape
    padding = pair_padding(padding)
    out_hw = gy.shape[2:]
    reach = tuple((out_hw[a] - 1) * stride[a] + ((kh, kw)[a] - 1) * dilation[a] + 1 for a in (0, 1))
    win = _windows(_pad_to(x, padding, reach), (kh, kw), stride, dilation, out_hw)
    win = win.reshape(n, groups, cg, *out_hw, kh, kw)
    dw = np.einsum("ngkhw,ngchwij->gkcij", gy.reshape(n, groups, k // groups, *out_hw), win)
    return dw.reshape(w_shape)
