"""core's attention and Gumbel-softmax Functions run the kernels of `kernels/`, with PyTorch's semantics.

Checks that the kernel path is the one taken (the kernels are wrapped to count their calls), that it keeps
O(L) state (never the L×S weights), that `pattern=` is the same as the pattern's dense mask through F, and
that Gumbel-softmax draws its noise inside the kernel from a seed of core's generators (reproducible under
core.manual_seed, with the right distribution).
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as TF
from scipy import stats

import core
import kernels.attention
import kernels.gumbel
from core import functional as F
from core.attention import Causal, Column, Conv, PrefixLM, Row, patterns
from core.gradcheck import gradcheck
from core.random import Generator


def rnd(*shape, seed=0, dtype=np.float64):
    return np.random.default_rng(seed).standard_normal(shape).astype(dtype)


def T(a, grad=False):
    return core.Tensor(a, requires_grad=grad)


@pytest.fixture
def calls(monkeypatch):
    """Counts of the kernel entry points called through core (each wrapper calls the real kernel)."""
    counts = {}

    def counting(module, name):
        real = getattr(module, name)

        def wrapper(*args, **kwargs):
            counts[name] = counts.get(name, 0) + 1
            counts[name + ".kwargs"] = kwargs
            return real(*args, **kwargs)

        monkeypatch.setattr(module, name, wrapper)

    for name in ("attention_forward", "attention_backward"):
        counting(kernels.attention, name)
    for name in ("gumbel_softmax_forward", "gumbel_softmax_backward"):
        counting(kernels.gumbel, name)
    return counts


def _fwd_bwd(q, k, v, up, **kw):
    """Output and gradients of core's F.scaled_dot_product_attention for upstream gradient `up`."""
    ts = [T(a, grad=True) for a in (q, k, v)]
    out = F.scaled_dot_product_attention(*ts, **kw)
    out.backward(up)
    return out.numpy(), *[t.grad for t in ts]


# --- scaled dot-product attention ----------------------------------------------------------------------------


@pytest.mark.parametrize("kw", [
    {},
    {"is_causal": True},
    {"attn_mask": T(np.random.default_rng(1).random((7, 9)) < 0.7)},
    {"attn_mask": T(rnd(2, 1, 7, 9, seed=1))},  # additive, constant (no gradient asked)
    {"pattern": Row(text_len=2, width=2), "scale": 0.3},
])
def test_the_kernels_do_the_work_and_keep_no_weights(calls, kw):
    q, k, v = rnd(2, 3, 7, 4, seed=1), rnd(2, 3, 9, 4, seed=2), rnd(2, 3, 9, 5, seed=3)
    ts = [T(a, grad=True) for a in (q, k, v)]
    out = F.scaled_dot_product_attention(*ts, **kw)
    assert calls.get("attention_forward") == 1 and "attention_backward" not in calls
    # what the Function keeps for the backward: inputs, output and the row log-sum-exp, no (L, S) array
    saved = out._ctx.saved_tensors
    assert all(a.shape[-2:] != (7, 9) for a in saved), [a.shape for a in saved]
    assert any(a.shape == (2, 3, 7) for a in saved)  # lse
    out.backward(rnd(2, 3, 7, 5, seed=4))
    assert calls.get("attention_backward") == 1
    theirs = [torch.from_numpy(a).requires_grad_() for a in (q, k, v)]
    tkw = {n: torch.from_numpy(a.numpy()) if isinstance(a, core.Tensor) else a for n, a in kw.items()}
    if "pattern" in tkw:
        tkw["attn_mask"] = torch.from_numpy(tkw.pop("pattern").mask(9)[:7])
    ref = TF.scaled_dot_product_attention(*theirs, **tkw)
    ref.backward(torch.from_numpy(rnd(2, 3, 7, 5, seed=4)))
    np.testing.assert_allclose(out.numpy(), ref.detach().numpy(), rtol=1e-7, atol=1e-9)
    for t, r in zip(ts, theirs):
        np.testing.assert_allclose(t.grad, r.grad.numpy(), rtol=1e-7, atol=1e-9)


def test_dropout_and_a_mask_with_gradient_take_the_dense_function(calls):
    """The kernels have no dropout, and a mask's gradient is the L×S matrix dS they never form."""
    q, k, v = rnd(3, 4, seed=1), rnd(5, 4, seed=2), rnd(5, 2, seed=3)
    F.scaled_dot_product_attention(T(q), T(k), T(v), dropout_p=0.5, generator=Generator(1))
    mask = T(rnd(3, 5, seed=4), grad=True)
    out = F.scaled_dot_product_attention(T(q), T(k), T(v), attn_mask=mask)
    assert "attention_forward" not in calls
    out.backward(rnd(3, 2, seed=5))
    tm = torch.from_numpy(rnd(3, 5, seed=4)).requires_grad_()
    ref = TF.scaled_dot_product_attention(*(torch.from_numpy(a) for a in (q, k, v)), attn_mask=tm)
    ref.backward(torch.from_numpy(rnd(3, 2, seed=5)))
    np.testing.assert_allclose(mask.grad, tm.grad.numpy(), rtol=1e-7, atol=1e-9)
    with core.no_grad():  # no gradient wanted: the kernels again
        F.scaled_dot_product_attention(T(q), T(k), T(v), attn_mask=mask)
    assert calls.get("attention_forward") == 1


@pytest.mark.parametrize("pattern", [
    Causal(), Row(text_len=3, width=4), Column(text_len=3, width=4), Conv(text_len=3, width=4, kernel=3),
    Conv(text_len=0, width=5, kernel=5), PrefixLM(prefix_len=5),
], ids=repr)
def test_pattern_equals_its_mask_through_F(pattern):
    n = 19  # 3 text tokens + a 4×4 grid; not a multiple of any tile
    q, k, v = rnd(2, 2, n, 8, seed=1), rnd(2, 2, n, 8, seed=2), rnd(2, 2, n, 3, seed=3)
    up = rnd(2, 2, n, 3, seed=4)
    ours = _fwd_bwd(q, k, v, up, pattern=pattern)
    dense = _fwd_bwd(q, k, v, up, attn_mask=T(pattern.mask(n)))
    for a, b in zip(ours, dense):  # the same arithmetic on the same kernel; only the tiles visited differ
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    # AND with a bool attn_mask, and with is_causal
    extra = np.random.default_rng(5).random((2, 1, n, n)) < 0.7
    both = _fwd_bwd(q, k, v, up, pattern=pattern, attn_mask=T(extra))
    dense = _fwd_bwd(q, k, v, up, attn_mask=T(pattern.mask(n) & extra))
    for a, b in zip(both, dense):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)
    causal = _fwd_bwd(q, k, v, up, pattern=pattern, is_causal=True)
    dense = _fwd_bwd(q, k, v, up, attn_mask=T(pattern.mask(n) & np.tri(n, dtype=bool)))
    for a, b in zip(causal, dense):
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-14)


def test_prefix_lm_with_is_causal_is_causal():
    """AND, not OR: PrefixLM's bidirectional prefix is cut back to causal by is_causal."""
    q = rnd(6, 4, seed=1)
    out = F.scaled_dot_product_attention(T(q), T(q), T(q), is_causal=True, pattern=PrefixLM(4)).numpy()
    ref = F.scaled_dot_product_attention(T(q), T(q), T(q), is_causal=True).numpy()
    np.testing.assert_allclose(out, ref, rtol=1e-12, atol=1e-14)
    assert not np.allclose(F.scaled_dot_product_attention(T(q), T(q), T(q), pattern=PrefixLM(4)).numpy(), ref)


def test_pattern_gradcheck():
    fn = lambda q, k, v: F.scaled_dot_product_attention(q, k, v, pattern=Conv(2, 3, kernel=3))  # noqa: E731
    ins = [T(rnd(2, 11, 3, seed=s), grad=True) for s in (1, 2)] + [T(rnd(2, 11, 2, seed=3), grad=True)]
    assert gradcheck(fn, ins)


@pytest.mark.parametrize("qs, ks, ms", [
    ((2, 3, 4, 5, 3), (3, 1, 6, 3), (1, 3, 1, 5, 6)),  # a mask broadcast over some of the dims merged into B
    ((2, 3, 4, 5, 3), (6, 3), (2, 1, 4, 1, 6)),
    ((5, 3), (6, 3), (6,)),  # unbatched, a 1-d mask
    ((3, 5, 3), (3, 6, 3), (3, 5, 6)),
])
def test_batch_dims_and_masks_broadcast_like_pytorch(qs, ks, ms):
    q, k = rnd(*qs, seed=1), rnd(*ks, seed=2)
    v = rnd(*ks[:-1], 2, seed=3)
    allowed = np.random.default_rng(4).random(ms) < 0.7
    batch = np.broadcast_shapes(qs[:-2], ks[:-2])
    up = rnd(*batch, qs[-2], 2, seed=5)
    ours = _fwd_bwd(q, k, v, up, attn_mask=T(allowed))
    theirs = [torch.from_numpy(a).requires_grad_() for a in (q, k, v)]
    ref = TF.scaled_dot_product_attention(*theirs, attn_mask=torch.from_numpy(np.broadcast_to(allowed, (*batch,
                                                                                   qs[-2], ks[-2])).copy()))
    ref.backward(torch.from_numpy(up))
    for a, b in zip(ours, (ref.detach(), *[t.grad for t in theirs])):
        np.testing.assert_allclose(a, b.numpy(), rtol=1e-7, atol=1e-9)


def test_float32_runs_the_float32_kernel(calls):
    q, k, v = (rnd(2, 4, 33, 16, seed=s, dtype=np.float32) for s in (1, 2, 3))
    ts = [T(a, grad=True) for a in (q, k, v)]
    out = F.scaled_dot_product_attention(*ts, pattern=Row(text_len=8, width=5))
    out.backward(np.ones(out.shape, np.float32))
    assert calls.get("attention_forward") == 1 and out.dtype == np.float32
    assert all(t.grad.dtype == np.float32 for t in ts)
    ref = _fwd_bwd(*(a.astype(np.float64) for a in (q, k, v)), np.ones(out.shape), pattern=Row(8, 5))
    for a, b in zip((out.numpy(), *[t.grad for t in ts]), ref):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_patterns_are_reexported():
    assert patterns is kernels.attention.patterns and Row is patterns.Row
    with pytest.raises(TypeError, match="scaled_dot_product_attention: pattern must be one of"):
        F.scaled_dot_product_attention(T(rnd(3, 4)), T(rnd(3, 4)), T(rnd(3, 4)), pattern=np.ones((3, 3), bool))


# --- Gumbel-softmax ----------------------------------------------------------------------------------------------


def test_gumbel_draws_in_the_kernel_from_a_seed_of_the_generator(calls):
    logits = T(rnd(5, 7, seed=1), grad=True)
    y = F.gumbel_softmax(logits, tau=0.7, dim=0, generator=Generator(3))
    kw = calls["gumbel_softmax_forward.kwargs"]
    assert calls["gumbel_softmax_forward"] == 1 and kw["noise"] is None and 0 <= kw["seed"] < 2**63
    ref, _ = kernels.gumbel.gumbel_softmax_forward(logits.numpy(), 0.7, seed=kw["seed"], dim=0, form="reference")
    np.testing.assert_allclose(y.numpy(), ref, rtol=1e-12, atol=1e-15)
    y.backward(rnd(5, 7, seed=2))
    assert calls["gumbel_softmax_backward"] == 1
    # injected noise goes to the kernel as it is, and no seed is drawn
    F.gumbel_softmax(logits, noise=rnd(5, 7, seed=3))
    kw = calls["gumbel_softmax_forward.kwargs"]
    assert kw["seed"] is None and np.array_equal(kw["noise"], rnd(5, 7, seed=3))


def test_gumbel_is_reproducible_under_manual_seed():
    x = T(rnd(4, 6, seed=1))
    core.manual_seed(11)
    a = F.gumbel_softmax(x).numpy()
    b = F.gumbel_softmax(x).numpy()
    core.manual_seed(11)
    assert np.array_equal(a, F.gumbel_softmax(x).numpy()) and np.array_equal(b, F.gumbel_softmax(x).numpy())
    assert not np.array_equal(a, b)  # the stream moves on between calls
    g1, g2 = Generator(5), Generator(5)
    assert np.array_equal(F.gumbel_softmax(x, hard=True, generator=g1).numpy(),
                          F.gumbel_softmax(x, hard=True, generator=g2).numpy())


def test_gumbel_soft_sample_has_the_logistic_law():
    """Two classes, τ = 1: logit(y₀) = l₀ − l₁ + (g₀ − g₁), and a difference of two Gumbels is Logistic(0, 1)."""
    draws = 20000
    logits = np.broadcast_to(np.array([0.8, -0.4]), (draws, 2))
    core.manual_seed(2)
    y = F.gumbel_softmax(T(logits)).numpy()
    diff = np.log(y[:, 0]) - np.log(y[:, 1]) - 1.2
    assert stats.kstest(diff, stats.logistic.cdf).pvalue > 1e-3


def test_gumbel_argmax_along_dim_0_follows_softmax():
    """The Gumbel-max trick along a non-last dim, whose noise the kernel draws in the original layout."""
    logits = np.array([1.0, -0.5, 0.3, 2.0, -2.0])
    draws = 20000
    core.manual_seed(4)
    y = F.gumbel_softmax(T(np.broadcast_to(logits[:, None], (5, draws))), tau=0.3, hard=True, dim=0).numpy()
    assert np.array_equal(y.sum(0), np.ones(draws))
    expected = draws * np.exp(logits) / np.exp(logits).sum()
    assert stats.chisquare(y.sum(1), expected).pvalue > 1e-3


def test_gumbel_hard_gradient_is_straight_through_and_float32_stays_float32():
    x = T(rnd(3, 8, seed=1, dtype=np.float32), grad=True)
    g = rnd(3, 8, seed=2, dtype=np.float32)
    y = F.gumbel_softmax(x, tau=0.5, hard=True, noise=g)
    y.backward(rnd(3, 8, seed=3, dtype=np.float32))
    assert y.dtype == np.float32 and x.grad.dtype == np.float32
    soft = torch.softmax((torch.from_numpy(rnd(3, 8, seed=1)) + torch.from_numpy(g.astype(np.float64))) / 0.5, -1)
    expected = (soft * (torch.from_numpy(rnd(3, 8, seed=3)) - (soft * torch.from_numpy(rnd(3, 8, seed=3))).sum(
        -1, keepdim=True)) / 0.5).numpy()
    np.testing.assert_allclose(x.grad, expected, rtol=1e-4, atol=1e-6)
    with pytest.raises(TypeError, match="gumbel_softmax: logits must be float32 or float64"):
        F.gumbel_softmax(T(np.zeros((2, 3), np.int64)))
