"""kernels.conv: the cpu form equals the reference on drawn configurations, and the reference equals PyTorch.

The cuda form is tested under the CUDA simulator and compiled to PTX in test_conv_cuda.py.
"""

from __future__ import annotations

import numba
import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels import conv
from kernels.conv import cpu
from kernels.conv import reference as ref

TOL = {np.float32: dict(rtol=1e-5, atol=1e-4), np.float64: dict(rtol=1e-12, atol=1e-12)}


@st.composite
def conv_case(draw, max_batch=3, max_channels=3, max_side=9, dtypes=(np.float32, np.float64)):
    """A conv2d configuration (x, w, gy and keyword args): odd and non-square sizes, every option, N = 1 included."""
    groups = draw(st.integers(1, 3))
    cg, kg = draw(st.integers(1, max_channels)), draw(st.integers(1, max_channels))
    kh, kw = draw(st.sampled_from([1, 2, 3, 5])), draw(st.sampled_from([1, 2, 3, 5]))
    stride = (draw(st.integers(1, 3)), draw(st.integers(1, 3)))
    dilation = (draw(st.integers(1, 2)), draw(st.integers(1, 2)))
    if draw(st.booleans()):
        pads = ((draw(st.integers(0, 2)),) * 2, (draw(st.integers(0, 2)),) * 2)
        padding = (pads[0][0], pads[1][0])  # PyTorch's symmetric (ph, pw)
    else:
        pads = padding = tuple((draw(st.integers(0, 2)), draw(st.integers(0, 2))) for _ in range(2))
    eff = (dilation[0] * (kh - 1) + 1, dilation[1] * (kw - 1) + 1)
    h = max(1, eff[0] - sum(pads[0]) + draw(st.integers(0, max_side - 1)))
    w = max(1, eff[1] - sum(pads[1]) + draw(st.integers(0, max_side - 1)))
    n = draw(st.integers(1, max_batch))
    dtype = draw(st.sampled_from(dtypes))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = rng.standard_normal((n, cg * groups, h, w)).astype(dtype)
    wt = rng.standard_normal((kg * groups, cg, kh, kw)).astype(dtype)
    kwargs = dict(stride=stride, padding=padding, dilation=dilation, groups=groups)
    ho, wo = (ref.out_size((h, w)[a], (kh, kw)[a], stride[a], pads[a], dilation[a]) for a in (0, 1))
    gy = rng.standard_normal((n, kg * groups, ho, wo)).astype(dtype)
    return x, wt, gy, kwargs


def assert_form_equals_reference(form, x, w, gy, kwargs):
    tol = TOL[x.dtype.type]
    y = conv.conv2d_forward(x, w, form=form, **kwargs)
    assert y.dtype == x.dtype and y.shape == gy.shape
    np.testing.assert_allclose(y, ref.conv2d_forward(x, w, **kwargs), **tol)
    dx = conv.conv2d_backward_input(gy, w, x.shape, form=form, **kwargs)
    assert dx.dtype == x.dtype and dx.shape == x.shape
    np.testing.assert_allclose(dx, ref.conv2d_backward_input(gy, w, x.shape, **kwargs), **tol)
    dw = conv.conv2d_backward_weight(x, gy, w.shape, form=form, **kwargs)
    assert dw.dtype == x.dtype and dw.shape == w.shape
    np.testing.assert_allclose(dw, ref.conv2d_backward_weight(x, gy, w.shape, **kwargs), **tol)


@settings(max_examples=60, deadline=None)
@given(conv_case())
def test_cpu_equals_reference(case):
    assert_form_equals_reference("cpu", *case)


@settings(max_examples=15, deadline=None)
@given(conv_case(max_side=12, dtypes=(np.float64,)), st.integers(1, 3))
def test_cpu_row_tiles_equal_reference(case, rows):
    """A small im2col budget forces tiles of a few output rows (the path large images take)."""
    x, w, gy, kwargs = case
    r, wo = w[0].size, gy.shape[3]
    budget = cpu.COLS_BUDGET
    try:
        cpu.COLS_BUDGET = rows * r * wo
        imgs, tile = cpu.plan(r, x.shape[0], gy.shape[2], wo, 2)
        assert (imgs, tile) == (1, rows) if rows < gy.shape[2] else tile == gy.shape[2]
        assert_form_equals_reference("cpu", *case)
    finally:
        cpu.COLS_BUDGET = budget


@pytest.mark.parametrize("rows", [1, 2, 64])
@pytest.mark.parametrize("k, d, pads", [(3, 1, ((1, 1), (1, 1))), (3, 2, ((2, 2), (2, 2))), (5, 1, ((2, 2), (2, 2))),
                                        (2, 1, ((0, 1), (1, 0))), (1, 1, ((0, 0), (0, 0))), (3, 1, ((0, 3), (1, 1)))])
def test_cpu_same_convolutions_equal_reference(k, d, pads, rows):
    """Unit strides with Wo = W take im2col's flat fast path (one shifted copy per tap, wrapped entries zeroed)."""
    rng = np.random.default_rng(k * 10 + d)
    x = rng.standard_normal((2, 4, 7, 6))
    w = rng.standard_normal((4, 2, k, k))
    kwargs = dict(stride=(1, 1), padding=pads, dilation=(d, d), groups=2)
    gy = rng.standard_normal(ref.conv2d_forward(x, w, **kwargs).shape)
    assert gy.shape[3] == x.shape[3]
    budget = cpu.COLS_BUDGET
    try:
        cpu.COLS_BUDGET = rows * w[0].size * gy.shape[3]
        assert_form_equals_reference("cpu", x, w, gy, kwargs)
    finally:
        cpu.COLS_BUDGET = budget


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cpu_threads_split_tasks_correctly_and_reproducibly(dtype):
    """At 1 and 2 threads (tasks split per thread, the weight gradient's partial sums added in a fixed order) the
    result equals the reference, and repeating a call at the same thread count gives the same bits."""
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, 4, 9, 7)).astype(dtype)
    w = rng.standard_normal((6, 2, 3, 3)).astype(dtype)
    gy = rng.standard_normal((5, 6, 6, 7)).astype(dtype)
    kwargs = dict(stride=(2, 1), padding=(2, 1), dilation=(1, 1), groups=2)
    before = numba.get_num_threads()
    try:
        for threads in sorted({1, min(2, numba.config.NUMBA_NUM_THREADS)}):
            numba.set_num_threads(threads)
            assert_form_equals_reference("cpu", x, w, gy, kwargs)
            first = cpu.conv2d_backward_weight(x, gy, w.shape, **kwargs)
            np.testing.assert_array_equal(cpu.conv2d_backward_weight(x, gy, w.shape, **kwargs), first)
    finally:
        numba.set_num_threads(before)


def test_cpu_takes_non_contiguous_inputs_and_bias():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((3, 9, 6, 2)).transpose(0, 3, 1, 2)  # (3, 2, 9, 6), not contiguous
    w = rng.standard_normal((3, 4, 2, 3))[:, ::2]  # (3, 2, 2, 3), not contiguous
    b = rng.standard_normal(3)
    kwargs = dict(stride=(1, 2), padding=((1, 0), (0, 2)), dilation=(2, 1), groups=1)
    np.testing.assert_allclose(conv.conv2d_forward(x, w, bias=b, **kwargs),
                               ref.conv2d_forward(x, w, bias=b, **kwargs), rtol=1e-12, atol=1e-12)


# --- Winograd F(2×2, 3×3): the cpu form's path for 3×3, stride-1 convolutions with enough channels -----------------
def test_winograd_matrices_compute_a_3x3_correlation():
    """Lavin & Gray eq. 8 with the module's Bᵀ, G, Aᵀ: Aᵀ[(G g Gᵀ) ⊙ (Bᵀ d B)]A is the 2×2 valid correlation of a
    4×4 tile d with a 3×3 filter g."""
    from kernels.conv import winograd as wg

    rng = np.random.default_rng(6)
    d, g = rng.standard_normal((4, 4)), rng.standard_normal((3, 3))
    y = wg.AT @ ((wg.G @ g @ wg.G.T) * (wg.BT @ d @ wg.BT.T)) @ wg.AT.T
    want = [[np.sum(d[i : i + 3, j : j + 3] * g) for j in range(2)] for i in range(2)]
    np.testing.assert_allclose(y, want, rtol=1e-13, atol=1e-13)
    w = rng.standard_normal((2, 3, 3, 3))
    np.testing.assert_allclose(wg.filters(w)[:, 1, 0].reshape(4, 4), wg.G @ w[0, 1] @ wg.G.T, rtol=1e-14)


@st.composite
def winograd_case(draw):
    """A 3×3 stride-1 conv2d of any size (a side of 1 or 2 included) and any asymmetric padding, bias or none."""
    n, c, k = draw(st.integers(1, 3)), draw(st.integers(1, 6)), draw(st.integers(1, 6))
    pads = tuple((draw(st.integers(0, 3)), draw(st.integers(0, 3))) for _ in range(2))
    h, w = (max(1, 3 - sum(pads[a]) + draw(st.integers(0, 10))) for a in (0, 1))
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = rng.standard_normal((n, c, h, w)).astype(dtype)
    wt = rng.standard_normal((k, c, 3, 3)).astype(dtype)
    bias = rng.standard_normal(k).astype(dtype) if draw(st.booleans()) else None
    return x, wt, bias, pads


@settings(max_examples=60, deadline=None)
@given(winograd_case())
def test_winograd_forward_and_input_gradient_equal_reference(case):
    """With the channel threshold lowered to 1, every drawn 3×3 stride-1 case takes the Winograd path: the forward
    (bias included), the input gradient (the flipped filters over gy, padded 2 − p, any x size) and the weight
    gradient (F(3×3, 2×2), tiles past gy's edge included) equal the reference within the float32/float64 tolerances
    of every other form."""
    x, w, bias, pads = case
    tol = TOL[x.dtype.type]
    saved = cpu.WINOGRAD_MIN_CHANNELS
    cpu.WINOGRAD_MIN_CHANNELS = 1
    try:
        assert cpu._winograd(w.shape, (1, 1), (1, 1), 1)
        y = cpu.conv2d_forward(x, w, padding=pads, bias=bias)
        want = ref.conv2d_forward(x, w, padding=pads, bias=bias)
        assert y.dtype == x.dtype and y.shape == want.shape
        np.testing.assert_allclose(y, want, **tol)
        gy = np.random.default_rng(0).standard_normal(want.shape).astype(x.dtype)
        dx = cpu.conv2d_backward_input(gy, w, x.shape, padding=pads)
        assert dx.dtype == x.dtype and dx.shape == x.shape
        np.testing.assert_allclose(dx, ref.conv2d_backward_input(gy, w, x.shape, padding=pads), **tol)
        dw = cpu.conv2d_backward_weight(x, gy, w.shape, padding=pads)
        assert dw.dtype == x.dtype and dw.shape == w.shape
        np.testing.assert_allclose(dw, ref.conv2d_backward_weight(x, gy, w.shape, padding=pads), **tol)
    finally:
        cpu.WINOGRAD_MIN_CHANNELS = saved


def test_winograd_is_taken_where_it_applies(monkeypatch):
    """At the bench's layer shape (64 channels, 16×16, pad 1) the forward and both gradients go through Winograd and
    equal the reference in float32; a stride, a dilation, groups, another kernel size or few channels do not."""
    from kernels.conv import winograd

    calls = []
    real, real_dw = winograd.conv3x3, winograd.weight_grad
    monkeypatch.setattr(winograd, "conv3x3", lambda *a: calls.append(a[0].shape) or real(*a))
    monkeypatch.setattr(winograd, "weight_grad", lambda *a: calls.append("dw") or real_dw(*a))
    rng = np.random.default_rng(5)
    x = rng.standard_normal((2, 64, 16, 16)).astype(np.float32)
    w = (rng.standard_normal((64, 64, 3, 3)) / 24).astype(np.float32)
    gy = rng.standard_normal((2, 64, 16, 16)).astype(np.float32)
    np.testing.assert_allclose(cpu.conv2d_forward(x, w, padding=1), ref.conv2d_forward(x, w, padding=1),
                               **TOL[np.float32])
    np.testing.assert_allclose(cpu.conv2d_backward_input(gy, w, x.shape, padding=1),
                               ref.conv2d_backward_input(gy, w, x.shape, padding=1), **TOL[np.float32])
    np.testing.assert_allclose(cpu.conv2d_backward_weight(x, gy, w.shape, padding=1),
                               ref.conv2d_backward_weight(x, gy, w.shape, padding=1), **TOL[np.float32])
    assert calls == [x.shape, gy.shape, "dw"]
    for w_shape, kwargs in (((64, 64, 3, 3), dict(stride=(2, 1))), ((64, 64, 3, 3), dict(dilation=(1, 2))),
                            ((64, 32, 3, 3), dict(groups=2)), ((64, 64, 5, 5), {}), ((64, 8, 3, 3), {})):
        assert not cpu._winograd(w_shape, kwargs.get("stride", (1, 1)), kwargs.get("dilation", (1, 1)),
                                 kwargs.get("groups", 1)), (w_shape, kwargs)


# --- the reference equals PyTorch ---------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(conv_case(dtypes=(np.float64,)))
def test_reference_equals_torch_conv2d_and_its_gradients(case):
    x, w, gy, kwargs = case
    (pt, pb), (pl, pr) = ref.pair_padding(kwargs["padding"])
    xt, wt = torch.tensor(x, requires_grad=True), torch.tensor(w, requires_grad=True)
    # PyTorch pads symmetrically; an asymmetric padding is an explicit F.pad first
    yt = TF.conv2d(TF.pad(xt, (pl, pr, pt, pb)), wt, stride=kwargs["stride"], dilation=kwargs["dilation"],
                   groups=kwargs["groups"])
    yt.backward(torch.tensor(gy))
    np.testing.assert_allclose(ref.conv2d_forward(x, w, **kwargs), yt.detach().numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ref.conv2d_backward_input(gy, w, x.shape, **kwargs), xt.grad.numpy(),
                               rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(ref.conv2d_backward_weight(x, gy, w.shape, **kwargs), wt.grad.numpy(),
                               rtol=1e-12, atol=1e-12)


@settings(max_examples=40, deadline=None)
@given(st.data())
def test_backward_input_is_torch_conv_transpose2d(data):
    """conv_transpose2d(x_t, w) = conv2d_backward_input(x_t, w, out_shape); output_padding is the extra in out_shape.

    Its gradients are conv2d's forward (cropped to x_t: with dilation > output_padding ≥ stride the conv2d of the
    gradient has more rows than x_t) and conv2d's weight gradient with the roles of input and gradient swapped.
    """
    draw = data.draw
    groups, cin_g, cout_g = draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 3))
    k = (draw(st.sampled_from([1, 2, 3, 5])), draw(st.sampled_from([1, 3])))
    s = (draw(st.integers(1, 3)), draw(st.integers(1, 2)))
    d = (draw(st.integers(1, 3)), draw(st.integers(1, 2)))
    p = (draw(st.integers(0, 2)), draw(st.integers(0, 1)))
    op = tuple(draw(st.integers(0, max(s[a], d[a]) - 1)) for a in (0, 1))
    n, h, w = draw(st.integers(1, 2)), draw(st.integers(1, 6)), draw(st.integers(1, 6))
    out_hw = tuple((((h, w)[a] - 1) * s[a] - 2 * p[a] + d[a] * (k[a] - 1) + op[a] + 1) for a in (0, 1))
    if min(out_hw) < 1:
        return
    rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))
    x = rng.standard_normal((n, cin_g * groups, h, w))
    wt = rng.standard_normal((cin_g * groups, cout_g, *k))
    g = rng.standard_normal((n, cout_g * groups, *out_hw))
    xt, wtt = torch.tensor(x, requires_grad=True), torch.tensor(wt, requires_grad=True)
    yt = TF.conv_transpose2d(xt, wtt, stride=s, padding=p, output_padding=op, groups=groups, dilation=d)
    yt.backward(torch.tensor(g))
    kwargs = dict(stride=s, padding=p, dilation=d, groups=groups)
    for form in ("reference", "cpu"):
        y = conv.conv2d_backward_input(x, wt, (n, cout_g * groups, *out_hw), form=form, **kwargs)
        np.testing.assert_allclose(y, yt.detach().numpy(), rtol=1e-12, atol=1e-12)
        dx = conv.conv2d_forward(g, wt, form=form, **kwargs)[:, :, :h, :w]
        np.testing.assert_allclose(dx, xt.grad.numpy(), rtol=1e-12, atol=1e-12)
        dw = conv.conv2d_backward_weight(g, x, wt.shape, form=form, **kwargs)
        np.testing.assert_allclose(dw, wtt.grad.numpy(), rtol=1e-12, atol=1e-12)


def test_output_size_is_convolution_arithmetic():
    # Dumoulin & Visin's examples: 5×5 input, 3×3 kernel: no padding -> 3, "half" padding 1 -> 5, stride 2 -> 2
    assert [ref.out_size(5, 3, s, (p, p), 1) for s, p in ((1, 0), (1, 1), (2, 0), (2, 1))] == [3, 5, 2, 3]
    assert ref.out_size(7, 3, 1, (0, 0), 2) == 3  # dilation 2: the kernel spans 5
    assert ref.pair_padding((1, 2)) == ((1, 1), (2, 2)) and ref.pair_padding(((0, 1), (2, 3))) == ((0, 1), (2, 3))


# --- dispatch and errors ------------------------------------------------------------------------------------------


def test_numpy_arrays_dispatch_to_cpu(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu, "conv2d_forward", lambda *a, **k: calls.append(k) or "cpu")
    assert conv.conv2d_forward(np.zeros((1, 1, 3, 3)), np.zeros((1, 1, 1, 1)), padding=1) == "cpu"
    assert calls == [dict(bias=None, stride=(1, 1), padding=((1, 1), (1, 1)), dilation=(1, 1), groups=1)]


def test_errors():
    x, w = np.zeros((1, 4, 5, 5)), np.zeros((3, 2, 3, 3))
    with pytest.raises(ValueError, match="form must be one of"):
        conv.conv2d_forward(x, np.zeros((2, 4, 3, 3)), form="gpu")
    with pytest.raises(ValueError, match="groups=2"):
        conv.conv2d_forward(x, w, groups=2)
    with pytest.raises(ValueError, match="4-D"):
        conv.conv2d_forward(x[0], w)
    with pytest.raises(TypeError, match="float32 or float64"):
        conv.conv2d_forward(x.astype(np.float32), np.zeros((2, 4, 3, 3)))
    with pytest.raises(TypeError, match="float32 or float64"):
        conv.conv2d_backward_weight(x.astype(np.int64), np.zeros((1, 2, 3, 3), np.int64), (2, 4, 3, 3))
