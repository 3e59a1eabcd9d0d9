"""The spatial, attention and Gumbel-softmax ops beyond the case table: errors, edge cases, statistics.

The case table (core/verify/cases_spatial.py, run by tests/test_cases.py) already checks every op's
forward and gradients against PyTorch and with gradcheck on drawn inputs; this file checks what a
drawn case cannot: clear errors, fully masked rows, huge scores, sampling statistics, output
shapes, dtypes, and PyTorch's own gumbel_softmax with the same noise.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from scipy import stats

import core
from core import functional as F
from core.gradcheck import gradcheck
from core.random import Generator


def T(a, grad=False):
    return core.Tensor(np.asarray(a), requires_grad=grad)


def rnd(*shape, seed=0, dtype=np.float64):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


# --- errors name the op and the shapes --------------------------------------------------------------


@pytest.mark.parametrize(
    "call, match",
    [
        (lambda: F.conv2d(T(rnd(1, 3, 5, 5)), T(rnd(4, 2, 3, 3))),
         r"conv2d.*\(4, 2, 3, 3\).*\(1, 3, 5, 5\).*2 channels"),
        (lambda: F.conv2d(T(rnd(1, 4, 5, 5)), T(rnd(3, 2, 3, 3)), groups=2), r"conv2d: out_channels 3.*groups=2"),
        (lambda: F.conv2d(T(rnd(1, 3, 2, 2)), T(rnd(4, 3, 3, 3))), r"conv2d: padded input size.*\(2, 2\).*\(3, 3\)"),
        (lambda: F.conv2d(T(rnd(1, 3, 2, 2)), T(rnd(4, 3, 3, 3)), dilation=2, padding=1),
         r"conv2d: padded input size per channel \(4, 4\).*\(5, 5\)"),
        (lambda: F.conv2d(T(rnd(1, 3, 5, 5)), T(rnd(4, 3, 3, 3)), padding="same", stride=2),
         r"conv2d.*'same'.*strided"),
        (lambda: F.conv2d(T(rnd(3, 5)), T(rnd(4, 3, 3, 3))), r"conv2d: expected a 3-D .* or 4-D .*\(3, 5\)"),
        (lambda: F.conv2d(T(rnd(1, 3, 5, 5)), T(rnd(4, 3, 3, 3)), T(rnd(3))), r"conv2d: bias must have shape \(4,\)"),
        (lambda: F.conv2d(T(rnd(1, 3, 5, 5)), T(rnd(4, 3, 3, 3)), stride=(1, 2, 3)), r"conv2d: stride must be an int"),
        (lambda: F.conv_transpose2d(T(rnd(1, 3, 2, 2)), T(rnd(3, 3, 3, 3)), stride=2, output_padding=2),
         r"conv_transpose2d: output padding must be smaller than either stride or dilation"),
        (lambda: F.conv_transpose2d(T(rnd(1, 4, 2, 2)), T(rnd(3, 3, 3, 3))),
         r"conv_transpose2d.*\(3, 3, 3, 3\).*3 channels"),
        (lambda: F.conv2d(T(rnd(1, 2, 0, 3)), T(rnd(3, 2, 1, 1)), padding=1),
         r"conv2d: only zero batch or zero channel inputs are supported.*\(1, 2, 0, 3\)"),
        (lambda: F.conv_transpose2d(T(rnd(1, 2, 0, 3)), T(rnd(2, 3, 3, 3))),
         r"conv_transpose2d: only zero batch or zero channel inputs are supported.*\(1, 2, 0, 3\)"),
        (lambda: F.conv2d(T(rnd(1, 2, 5, 5)), T(rnd(3, 2, 0, 3))), r"conv2d: kernel size should be greater than zero"),
        (lambda: F.conv_transpose2d(T(rnd(1, 2, 5, 5)), T(rnd(2, 3, 3, 0))),
         r"conv_transpose2d: kernel size should be greater than zero"),
        (lambda: F.conv2d(T(rnd(1, 2, 5, 5)), T(rnd(0, 2, 3, 3))),
         r"conv2d: weight of shape \(0, 2, 3, 3\) has no output"),
        (lambda: F.conv_transpose2d(T(rnd(1, 2, 5, 5)), T(rnd(2, 0, 3, 3))),
         r"conv_transpose2d: expected a non-empty weight, got shape \(2, 0, 3, 3\)"),
        (lambda: F.conv_transpose2d(T(rnd(1, 2, 2, 3)), T(rnd(2, 3, 1, 1)), padding=(1, 0)),
         r"conv_transpose2d: .* gives an empty output \(0, 3\)"),
        (lambda: F.avg_pool2d(T(rnd(1, 1, 5, 5)), 3, padding=2), r"avg_pool2d: pad should be at most half"),
        (lambda: F.max_pool2d(T(rnd(5, 5)), 2), r"max_pool2d: expected a 3-D .*\(5, 5\)"),
        (lambda: F.interpolate(T(rnd(1, 1, 4, 4)), size=(2, 2, 2)), r"interpolate: size must be"),
        (lambda: F.interpolate(T(rnd(1, 1, 4, 4))), r"interpolate: give exactly one of size and scale_factor"),
        (lambda: F.interpolate(T(rnd(1, 1, 4, 4)), size=3, recompute_scale_factor=True),
         r"interpolate: recompute_scale_factor is not meaningful with an explicit size"),
        (lambda: F.pad(T(rnd(1, 1, 5)), (5, 0), mode="reflect"), r"pad: padding \(5, 0\) in mode 'reflect'"),
        (lambda: F.pad(T(rnd(5)), (1, 1), mode="reflect"),
         r"pad: mode 'reflect' with padding size 2 needs a 2-D or 3-D"),
        (lambda: F.pad(T(rnd(2, 3)), (1, 2, 3)), r"pad: pad must be a tuple of ints of even length"),
        (lambda: F.scaled_dot_product_attention(T(rnd(2, 3, 4)), T(rnd(2, 5, 3)), T(rnd(2, 5, 2))),
         r"scaled_dot_product_attention: query \(2, 3, 4\) and key \(2, 5, 3\)"),
        (lambda: F.scaled_dot_product_attention(T(rnd(2, 3, 4)), T(rnd(2, 5, 4)), T(rnd(2, 4, 2))),
         r"scaled_dot_product_attention: key \(2, 5, 4\) and value \(2, 4, 2\)"),
        (lambda: F.scaled_dot_product_attention(T(rnd(2, 3, 4)), T(rnd(2, 5, 4)), T(rnd(2, 5, 2)),
                                                attn_mask=T(np.ones((3, 4), bool))),
         r"attn_mask of shape \(3, 4\) does not broadcast to the scores' shape \(2, 3, 5\)"),
        (lambda: F.scaled_dot_product_attention(T(rnd(3, 4)), T(rnd(3, 4)), T(rnd(3, 4)),
                                                attn_mask=T(np.ones((3, 3), bool)), is_causal=True),
         r"attn_mask should not be set when is_causal=True"),
        (lambda: F.gumbel_softmax(T(rnd(2, 3)), noise=rnd(3, 2)), r"gumbel_softmax: noise of shape \(3, 2\).*\(2, 3\)"),
        (lambda: F.gumbel_softmax(T(rnd(2, 3)), dim=2), r"gumbel_softmax: dim 2 out of range"),
    ],
)
def test_bad_input_raises_a_clear_error(call, match):
    with pytest.raises((ValueError, TypeError, IndexError), match=match):
        call()


def test_dtype_mismatches_are_refused():
    with pytest.raises(TypeError, match=r"conv2d: input dtype float32 and weight dtype float64"):
        F.conv2d(T(rnd(1, 3, 5, 5, dtype=np.float32)), T(rnd(4, 3, 3, 3)))
    q = T(rnd(3, 4, dtype=np.float32))
    with pytest.raises(TypeError, match=r"attn_mask must be bool or have the query's dtype float32, got float64"):
        F.scaled_dot_product_attention(q, q, q, attn_mask=T(np.zeros((3, 3))))


def test_unimplemented_options_say_so():
    with pytest.raises(NotImplementedError, match="interpolate: mode 'bilinear'"):
        F.interpolate(T(rnd(1, 1, 4, 4)), scale_factor=2, mode="bilinear")
    q = T(rnd(3, 4))
    with pytest.raises(TypeError, match="pattern must be one of core.attention.patterns"):  # patterns are objects
        F.scaled_dot_product_attention(q, q, q, pattern="row")


# --- attention: fully masked rows, huge scores, dropout -----------------------------------------------------


def _sdpa_both(q, k, v, mask, **kw):
    """Output and input gradients of core and of PyTorch for one upstream gradient."""
    g = rnd(*q.shape[:-1], v.shape[-1], seed=9)
    ours = [T(a, grad=True) for a in (q, k, v)]
    out = F.scaled_dot_product_attention(*ours, attn_mask=T(mask), **kw)
    out.backward(g)
    theirs = [torch.from_numpy(a).requires_grad_() for a in (q, k, v)]
    ref = TF.scaled_dot_product_attention(*theirs, attn_mask=torch.from_numpy(mask), **kw)
    ref.backward(torch.from_numpy(g))
    return (out.numpy(), *[t.grad for t in ours]), (ref.detach().numpy(), *[t.grad.numpy() for t in theirs])


@pytest.mark.parametrize("kind", ["bool", "additive -inf"])
def test_fully_masked_row_gives_zeros_and_zero_gradient(kind):
    q, k, v = rnd(2, 4, 3, seed=1), rnd(2, 5, 3, seed=2), rnd(2, 5, 2, seed=3)
    allowed = np.random.default_rng(4).random((2, 4, 5)) < 0.6
    allowed[:, 1] = False  # query 1 may attend nothing
    allowed[0, 2] = False
    allowed[:, 0, 0] = True
    mask = allowed if kind == "bool" else np.where(allowed, 0.0, -np.inf)
    (out, dq, dk, dv), (ref, *ref_grads) = _sdpa_both(q, k, v, mask)
    assert np.all(np.isfinite(out)) and all(np.all(np.isfinite(g)) for g in (dq, dk, dv))
    assert np.array_equal(out[:, 1], np.zeros((2, 2))) and np.array_equal(out[0, 2], np.zeros(2))
    assert np.array_equal(dq[:, 1], np.zeros((2, 3))) and np.array_equal(dq[0, 2], np.zeros(3))
    # PyTorch 2.13's F.scaled_dot_product_attention (CPU, float64) also returns zeros for such rows,
    # with a bool mask and with an all -inf additive mask alike, so everything matches it exactly.
    # (Its private math kernel, aten._scaled_dot_product_attention_math, returns NaN-free but nonzero
    # rows, and the textbook softmax(QKᵀ + mask)V returns NaN: core follows the public function.)
    for a, b in zip((out, dq, dk, dv), (ref, *ref_grads)):
        np.testing.assert_allclose(a, b, rtol=1e-7, atol=1e-9)
    naive = (torch.from_numpy(q) @ torch.from_numpy(k).mT / np.sqrt(3)).masked_fill(
        torch.from_numpy(~allowed), float("-inf")).softmax(-1) @ torch.from_numpy(v)
    assert torch.isnan(naive[:, 1]).all()  # what the max-shifted, zero-guarded softmax avoids


def test_fully_masked_row_gradient_passes_gradcheck():
    mask = T(np.array([[True, False, True], [False, False, False]]))
    fn = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # noqa: E731
    q, k, v = rnd(2, 4, seed=0), rnd(3, 4, seed=1), rnd(3, 2, seed=2)
    out = fn(T(q), T(k), T(v)).numpy()
    assert np.array_equal(out[1], np.zeros(2)) and np.all(out[0] != 0)
    assert gradcheck(fn, [T(a, grad=True) for a in (q, k, v)])


@pytest.mark.parametrize("shapes", [((2, 3, 4), (2, 0, 4), (2, 0, 5)), ((2, 3, 0), (2, 4, 0), (2, 4, 5))],
                         ids=["no keys", "no features"])
def test_attention_with_no_keys_or_no_features_matches_pytorch(shapes):
    """S = 0: zeros (nothing to attend); E = 0: every score 0, so the mean of the values — PyTorch's results, and
    its gradients, where the engine's dense path once raised on an empty reduction or a 1/√0."""
    rng = np.random.default_rng(0)
    arrays = [rng.standard_normal(s) for s in shapes]
    ours = [core.Tensor(a, requires_grad=True) for a in arrays]
    theirs = [torch.tensor(a, requires_grad=True) for a in arrays]
    out = F.scaled_dot_product_attention(*ours)
    want = TF.scaled_dot_product_attention(*theirs)
    np.testing.assert_allclose(out.data, want.detach().numpy(), rtol=1e-12, atol=1e-12)
    grad = rng.standard_normal(out.shape)
    out.backward(core.Tensor(grad))
    want.backward(torch.tensor(grad))
    for o, t in zip(ours, theirs):
        np.testing.assert_allclose(o.grad.data, t.grad.numpy(), rtol=1e-12, atol=1e-12)


def test_conv_takes_an_unbatched_numpy_array_as_pytorch_takes_a_tensor():
    rng = np.random.default_rng(1)
    x, w = rng.standard_normal((3, 6, 6)), rng.standard_normal((4, 3, 3, 3))
    np.testing.assert_allclose(F.conv2d(x, core.Tensor(w), padding=1).data,
                               TF.conv2d(torch.tensor(x), torch.tensor(w), padding=1).numpy(), rtol=1e-12)
    wt = rng.standard_normal((3, 2, 3, 3))
    np.testing.assert_allclose(F.conv_transpose2d(x, core.Tensor(wt), stride=2).data,
                               TF.conv_transpose2d(torch.tensor(x), torch.tensor(wt), stride=2).numpy(), rtol=1e-12)


def test_attention_is_stable_for_scores_of_1e4():
    q, k, v = rnd(2, 3, 4, seed=1) * 100, rnd(2, 6, 4, seed=2) * 100, rnd(2, 6, 5, seed=3)
    k[0, 1] = k[0, 2]  # two tied huge scores: the weight splits between them
    mask = np.ones((3, 6), bool)
    (out, *grads), (ref, *ref_grads) = _sdpa_both(q, k, v, mask, scale=1.0)
    assert np.abs(q @ k.swapaxes(-1, -2)).max() > 1e4
    for a, b in zip((out, *grads), (ref, *ref_grads)):
        assert np.all(np.isfinite(a))
        np.testing.assert_allclose(a, b, rtol=1e-7, atol=1e-9)
    # float32 too: exp never sees a positive argument
    out32 = F.scaled_dot_product_attention(*(T(a.astype(np.float32)) for a in (q, k, v)), scale=1.0)
    assert out32.dtype == np.float32 and np.all(np.isfinite(out32.numpy()))


def test_causal_is_top_left_aligned_when_lengths_differ():
    for length, source in [(5, 3), (3, 5)]:
        q, k, v = rnd(length, 4, seed=1), rnd(source, 4, seed=2), rnd(source, 2, seed=3)
        (out, *grads), (ref, *ref_grads) = _sdpa_both(q, k, v, np.tril(np.ones((length, source), bool)))
        causal = F.scaled_dot_product_attention(T(q), T(k), T(v), is_causal=True).numpy()
        torch_causal = TF.scaled_dot_product_attention(*(torch.from_numpy(a) for a in (q, k, v)), is_causal=True)
        np.testing.assert_allclose(causal, out, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(causal, torch_causal.numpy(), rtol=1e-7, atol=1e-9)


def test_attention_dropout_statistics_and_gradient():
    p, length, source, copies = 0.3, 3, 8, 4000
    q, k = rnd(length, 4, seed=1), rnd(source, 4, seed=2)
    eye = np.eye(source)  # value = identity: the output is the dropped-out attention matrix itself
    clean = F.scaled_dot_product_attention(T(q), T(k), T(eye)).numpy()
    qs = T(np.broadcast_to(q, (copies, length, 4)))
    out = F.scaled_dot_product_attention(qs, T(k), T(eye), dropout_p=p, generator=Generator(7)).numpy()
    kept = out != 0
    assert np.allclose(out[kept], np.broadcast_to(clean / (1 - p), out.shape)[kept])  # kept weights scaled by 1/(1-p)
    assert stats.binomtest(int(kept.sum()), kept.size, 1 - p).pvalue > 1e-3  # each weight kept with prob. 1-p
    spread = (clean / (1 - p)) * np.sqrt(p * (1 - p) / copies)  # std of the mean of `copies` draws
    assert np.all(np.abs(out.mean(0) - clean) <= 5 * spread + 1e-12)  # unbiased: E[output] = no-dropout output
    # same seed, same draw: the default generator through core.manual_seed, or an explicit one
    core.manual_seed(3)
    a = F.scaled_dot_product_attention(T(q), T(k), T(eye), dropout_p=p).numpy()
    core.manual_seed(3)
    assert np.array_equal(a, F.scaled_dot_product_attention(T(q), T(k), T(eye), dropout_p=p).numpy())
    # with the generator re-seeded on every call the op is a deterministic function: gradcheck it
    fn = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, dropout_p=0.5, generator=Generator(11))  # noqa: E731
    assert gradcheck(fn, [T(rnd(2, 3, 4, seed=s), grad=True) for s in (1, 2)] + [T(rnd(2, 3, 2, seed=3), grad=True)])


# --- Gumbel-softmax --------------------------------------------------------------------------------------


def test_gumbel_argmax_follows_softmax_chi_square():
    """argmax(logits + g) with g ~ Gumbel(0, 1) is a sample from softmax(logits) (the Gumbel-max trick)."""
    logits = np.array([1.0, -0.5, 0.3, 2.0, -2.0, 0.0])
    draws = 20000
    y = F.gumbel_softmax(T(np.broadcast_to(logits, (draws, 6))), tau=0.5, hard=True, generator=Generator(1234))
    assert np.array_equal(y.numpy().sum(-1), np.ones(draws))  # hard: exactly one-hot
    counts = y.numpy().sum(0)
    expected = draws * np.exp(logits) / np.exp(logits).sum()
    assert stats.chisquare(counts, expected).pvalue > 1e-3


def test_gumbel_noise_is_standard_gumbel():
    logits = T(np.zeros((50000, 1)))
    logits.requires_grad = False
    # with one class, logits + g / τ is not observable through softmax; draw the noise itself instead
    from core.attention import _gumbel_noise

    g = _gumbel_noise((50000,), 1e-10, Generator(5), np.float64)
    assert stats.kstest(g, stats.gumbel_r.cdf).pvalue > 1e-3


def test_gumbel_softmax_equals_pytorch_with_the_same_noise():
    """PyTorch's gumbel_softmax draws g = -log(Exponential(1)); seeding lets us draw the same g first."""
    logits = rnd(4, 7, seed=1) * 3
    for tau, hard, dim in [(1.0, False, -1), (0.5, True, -1), (2.0, False, 0), (0.7, True, 0)]:
        torch.manual_seed(42)
        g = -torch.empty(4, 7, dtype=torch.float64).exponential_().log()
        torch.manual_seed(42)
        lt = torch.from_numpy(logits).requires_grad_()
        ref = TF.gumbel_softmax(lt, tau=tau, hard=hard, dim=dim)
        up = rnd(4, 7, seed=2)
        ref.backward(torch.from_numpy(up))
        ours_in = T(logits, grad=True)
        ours = F.gumbel_softmax(ours_in, tau=tau, hard=hard, dim=dim, noise=g.numpy())
        ours.backward(up)
        np.testing.assert_allclose(ours.numpy(), ref.detach().numpy(), rtol=1e-7, atol=1e-9)
        np.testing.assert_allclose(ours_in.grad, lt.grad.numpy(), rtol=1e-7, atol=1e-9)


def test_gumbel_hard_is_one_hot_with_the_soft_gradient():
    logits, g, up = rnd(3, 5, seed=1), rnd(3, 5, seed=2), rnd(3, 5, seed=3)
    soft_in, hard_in = T(logits, grad=True), T(logits, grad=True)
    soft = F.gumbel_softmax(soft_in, tau=0.8, noise=g)
    hard = F.gumbel_softmax(hard_in, tau=0.8, hard=True, noise=g)
    soft.backward(up)
    hard.backward(up)
    assert np.array_equal(hard.numpy(), np.eye(5)[np.argmax(logits + g, -1)])
    np.testing.assert_allclose(hard_in.grad, soft_in.grad, rtol=0, atol=0)


def test_gumbel_is_stable_for_logits_of_1e4():
    logits = np.array([[1e4, -1e4, 0.0, 1e4 - 1.0], [-1e4, -1e4, -1e4, -1e4 + 2.0]])
    g = rnd(2, 4, seed=4)
    x = T(logits, grad=True)
    y = F.gumbel_softmax(x, noise=g)
    y.backward(np.ones((2, 4)) * np.arange(4))
    ref = torch.softmax(torch.from_numpy(logits + g), -1).numpy()
    assert np.all(np.isfinite(y.numpy())) and np.all(np.isfinite(x.grad))
    np.testing.assert_allclose(y.numpy(), ref, rtol=1e-7, atol=1e-12)


# --- convolution, pooling, resizing ----------------------------------------------------------------------


@pytest.mark.parametrize("h, stride, padding, output_padding, dilation", [
    (4, 2, 1, 1, 1), (4, 2, 1, 0, 1), (5, 3, 0, 2, 1), (3, 1, 0, 1, 2), (3, 2, 2, 1, 3), (1, 1, 0, 0, 1),
])
def test_conv_transpose2d_output_padding_shapes(h, stride, padding, output_padding, dilation):
    x, w = rnd(1, 2, h, h + 1), rnd(2, 3, 3, 3)
    kw = dict(stride=stride, padding=padding, output_padding=output_padding, dilation=dilation)
    out = F.conv_transpose2d(T(x), T(w), **kw)
    ref = TF.conv_transpose2d(torch.from_numpy(x), torch.from_numpy(w), **kw)
    expected = [(n - 1) * stride - 2 * padding + dilation * 2 + output_padding + 1 for n in (h, h + 1)]
    assert out.shape == tuple(ref.shape) == (1, 3, *expected)
    np.testing.assert_allclose(out.numpy(), ref.numpy(), rtol=1e-7, atol=1e-9)
    # a conv2d with the same geometry maps the output back to the input's size (output_padding < stride
    # picks one of the sizes it maps to the input's; a larger one, allowed by dilation, overshoots)
    back = F.conv2d(out, T(w), stride=stride, padding=padding, dilation=dilation).shape
    assert back == x.shape if output_padding < stride else back[2] > x.shape[2]


def test_conv_transpose2d_is_the_gradient_of_conv2d():
    x, w = rnd(2, 4, 7, 7, seed=1), rnd(6, 2, 3, 2, seed=2)
    xt = T(x, grad=True)
    y = F.conv2d(xt, T(w), stride=2, padding=1, groups=2)
    g = rnd(*y.shape, seed=3)
    y.backward(g)
    out = F.conv_transpose2d(T(g), T(w), stride=2, padding=1, output_padding=(0, 1), groups=2)
    np.testing.assert_allclose(out.numpy(), xt.grad, rtol=1e-12, atol=1e-12)


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")  # PyTorch's own note
def test_conv2d_same_padding_with_even_kernel_matches_pytorch():
    x, w = rnd(1, 2, 6, 5), rnd(3, 2, 2, 4)
    out = F.conv2d(T(x), T(w), padding="same", dilation=(1, 2))
    assert out.shape == (1, 3, 6, 5)
    ref = TF.conv2d(torch.from_numpy(x), torch.from_numpy(w), padding="same", dilation=(1, 2))
    np.testing.assert_allclose(out.numpy(), ref.numpy(), rtol=1e-7, atol=1e-9)


def test_max_pool2d_window_wholly_in_padding_matches_pytorch():
    x = np.arange(2.0).reshape(1, 1, 2, 1)
    kw = dict(kernel_size=2, padding=1, dilation=2, ceil_mode=True)
    xt = T(x, grad=True)
    y = F.max_pool2d(xt, **kw)
    y.backward(np.ones(y.shape))
    ref = TF.max_pool2d(torch.from_numpy(x), **kw)
    assert y.shape == tuple(ref.shape) and np.array_equal(y.numpy(), ref.numpy())  # -inf, as PyTorch
    assert np.array_equal(xt.grad, np.zeros_like(x))


def test_conv_transpose2d_of_an_empty_batch_may_have_an_empty_output():
    x, w, b = rnd(0, 2, 2, 3), rnd(2, 3, 1, 1), rnd(3)
    ours = [T(a, grad=True) for a in (x, w, b)]
    y = F.conv_transpose2d(*ours, padding=(1, 0))
    theirs = [torch.from_numpy(a).requires_grad_() for a in (x, w, b)]
    ref = TF.conv_transpose2d(*theirs, padding=(1, 0))
    assert y.shape == tuple(ref.shape) == (0, 3, 0, 3)
    y.sum().backward()
    ref.sum().backward()
    for o, t in zip(ours, theirs):
        np.testing.assert_array_equal(o.grad, t.grad.numpy())


@pytest.mark.parametrize("dtype", [np.float64, np.float16])  # the kernels, and the NumPy path they replace
def test_conv_of_an_empty_batch_has_zero_weight_gradients(dtype):
    x = T(rnd(0, 2, 3, 3, dtype=dtype), grad=True)
    w = T(rnd(2, 3, 2, 2, dtype=dtype), grad=True)
    y = F.conv_transpose2d(x, w, stride=2)
    assert y.shape == (0, 3, 6, 6)
    F.conv2d(y, T(rnd(4, 3, 2, 2, dtype=dtype))).sum().backward()
    assert x.grad.shape == x.shape and w.grad.dtype == dtype
    np.testing.assert_array_equal(w.grad, np.zeros(w.shape))


def test_one_int_sequences_expand_like_pytorch():
    x, w, wt = rnd(1, 2, 5, 6), rnd(3, 2, 3, 2), rnd(2, 3, 3, 3)
    X = torch.from_numpy(x)
    pairs = [
        (F.conv2d(T(x), T(w), stride=(2,), padding=[1], dilation=(1,)),
         TF.conv2d(X, torch.from_numpy(w), stride=(2,), padding=[1], dilation=(1,))),
        (F.conv_transpose2d(T(x), T(wt), stride=(2,), padding=(1,), output_padding=(1,)),
         TF.conv_transpose2d(X, torch.from_numpy(wt), stride=(2,), padding=(1,), output_padding=(1,))),
        (F.max_pool2d(T(x), (2,), stride=(1,), padding=(1,)), TF.max_pool2d(X, (2,), stride=(1,), padding=(1,))),
        (F.avg_pool2d(T(x), [3], stride=(2,)), TF.avg_pool2d(X, [3], stride=(2,))),
    ]
    for ours, ref in pairs:
        assert ours.shape == tuple(ref.shape)
        np.testing.assert_allclose(ours.numpy(), ref.numpy(), rtol=1e-12, atol=1e-12)


def test_max_pool2d_padding_never_wins_and_the_last_nan_does():
    x = np.full((1, 2, 3, 4), -np.inf)
    x[0, 1] = [[1, np.nan, 5, np.nan], [np.nan, 2, 3, -np.inf], [0, np.nan, -np.inf, -np.inf]]
    kw = dict(kernel_size=2, stride=2, padding=1, ceil_mode=True)
    xt = T(x, grad=True)
    y, idx = F.max_pool2d(xt, return_indices=True, **kw)
    g = rnd(*y.shape, seed=1)
    y.backward(g)
    rt = torch.from_numpy(x).requires_grad_()
    ref, ref_idx = TF.max_pool2d(rt, return_indices=True, **kw)
    ref.backward(torch.from_numpy(g))
    np.testing.assert_array_equal(y.numpy(), ref.detach().numpy())
    np.testing.assert_array_equal(idx.numpy(), ref_idx.numpy())
    np.testing.assert_array_equal(xt.grad, rt.grad.numpy())


def test_max_pool2d_return_indices_and_ties_match_pytorch():
    x = np.round(rnd(2, 3, 7, 6, seed=5))  # many ties: the first maximum in the window wins
    kw = dict(kernel_size=3, stride=2, padding=1, ceil_mode=True)
    y, idx = F.max_pool2d(T(x), return_indices=True, **kw)
    ref, ref_idx = TF.max_pool2d(torch.from_numpy(x), return_indices=True, **kw)
    assert np.array_equal(y.numpy(), ref.numpy()) and np.array_equal(idx.numpy(), ref_idx.numpy())


def test_nearest_index_rule_matches_pytorch_for_many_sizes():
    x = np.arange(13.0)[None, None]
    for n in range(1, 14):
        for m in range(1, 30):
            out = F.interpolate(T(x[..., :n]), size=m).numpy()
            assert np.array_equal(out, TF.interpolate(torch.from_numpy(x[..., :n]), size=m).numpy()), (n, m)
        for f in (0.3, 1 / 3, 0.75, 1.25, 4 / 3, 2.2, 3.0):
            if n * f < 1:  # an empty output: both refuse
                with pytest.raises(ValueError, match="interpolate: scale_factor"):
                    F.interpolate(T(x[..., :n]), scale_factor=f)
                with pytest.raises(RuntimeError):
                    TF.interpolate(torch.from_numpy(x[..., :n]), scale_factor=f)
                continue
            out = F.interpolate(T(x[..., :n]), scale_factor=f).numpy()
            assert np.array_equal(out, TF.interpolate(torch.from_numpy(x[..., :n]), scale_factor=f).numpy()), (n, f)


def test_nearest_2d_copies_or_halves_when_the_size_stays_or_doubles_like_pytorch():
    # PyTorch's 2-D kernels take src = dst when the size stays and dst // 2 when it doubles, whatever
    # scale_factor gave that size: 3 · 2.3 -> 6 rows (not ⌊dst / 2.3⌋), 4 · 1.2 -> 4 columns (not ⌊dst / 1.2⌋)
    x = rnd(2, 3, 3, 4)
    xt = T(x, grad=True)
    y = F.interpolate(xt, scale_factor=(2.3, 1.2))
    g = rnd(*y.shape, seed=1)
    y.backward(g)
    rt = torch.from_numpy(x).requires_grad_()
    ref = TF.interpolate(rt, scale_factor=(2.3, 1.2))
    ref.backward(torch.from_numpy(g))
    assert y.shape == tuple(ref.shape) == (2, 3, 6, 4)
    np.testing.assert_array_equal(y.numpy(), ref.detach().numpy())
    np.testing.assert_allclose(xt.grad, rt.grad.numpy(), rtol=1e-12, atol=1e-12)
    # the 1-D kernel takes no such shortcut
    x1 = np.arange(3.0)[None, None]
    out = F.interpolate(T(x1), scale_factor=2.3).numpy()
    np.testing.assert_array_equal(out, TF.interpolate(torch.from_numpy(x1), scale_factor=2.3).numpy())
    np.testing.assert_array_equal(out[0, 0], [0, 0, 0, 1, 1, 2])


def test_negative_pad_crops_before_padding_in_every_mode():
    x = rnd(1, 2, 5, 6)
    for mode in ("constant", "reflect", "replicate", "circular"):
        for p in [(-1, 2, 1, -2), (2, -3, 0, 0), (-2, -1, -1, 3)]:
            xt = T(x, grad=True)
            y = F.pad(xt, p, mode=mode)
            y.backward(np.arange(y.numpy().size).reshape(y.shape))
            rt = torch.from_numpy(x).requires_grad_()
            ref = TF.pad(rt, p, mode=mode)
            ref.backward(torch.arange(ref.numel(), dtype=torch.float64).reshape(ref.shape))
            np.testing.assert_array_equal(y.numpy(), ref.detach().numpy())
            np.testing.assert_array_equal(xt.grad, rt.grad.numpy())


# --- dtypes ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name, call", [
    ("conv2d", lambda x: F.conv2d(x, T(rnd(3, 2, 3, 3, dtype=np.float32)), T(rnd(3, dtype=np.float32)), padding=1)),
    ("conv_transpose2d", lambda x: F.conv_transpose2d(x, T(rnd(2, 3, 3, 3, dtype=np.float32)), stride=2,
                                                      output_padding=1)),
    ("avg_pool2d", lambda x: F.avg_pool2d(x, 2, ceil_mode=True, count_include_pad=False)),
    ("max_pool2d", lambda x: F.max_pool2d(x, 3, 2, 1)),
    ("interpolate", lambda x: F.interpolate(x, scale_factor=1.5)),
    ("pad", lambda x: F.pad(x, (1, 2, 2, 1), mode="reflect")),
    ("sdpa", lambda x: F.scaled_dot_product_attention(x, x, x, is_causal=True)),
    ("sdpa_dropout", lambda x: F.scaled_dot_product_attention(x, x, x, attn_mask=T(np.zeros((5, 5), np.float32)),
                                                              dropout_p=0.2)),
    ("gumbel_softmax", lambda x: F.gumbel_softmax(x, tau=0.5)),
    ("gumbel_softmax_hard", lambda x: F.gumbel_softmax(x, hard=True, dim=1)),
])
def test_float32_stays_float32(name, call):
    x = T(rnd(1, 2, 5, 5, dtype=np.float32), grad=True)
    y = call(x)
    assert y.dtype == np.float32, name
    y.backward(np.ones(y.shape, np.float32))
    assert x.grad.dtype == np.float32 and np.all(np.isfinite(x.grad)), name


def test_unbatched_inputs_work_like_pytorch():
    x, w = rnd(2, 5, 5), rnd(3, 2, 3, 3)
    ours = F.conv2d(T(x), T(w), stride=2).numpy()
    np.testing.assert_allclose(ours, TF.conv2d(torch.from_numpy(x), torch.from_numpy(w), stride=2).numpy(), atol=1e-12)
    assert F.max_pool2d(T(x), 2).shape == (2, 2, 2)
    assert F.conv_transpose2d(T(x), T(rnd(2, 3, 2, 2)), stride=2).shape == (3, 10, 10)
