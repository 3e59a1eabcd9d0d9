"""models/transformer.py: the pre-LN block equals the same block written in PyTorch (outputs and every
gradient, float64), and cached incremental decoding equals one full forward, for causal attention and for
the structured patterns."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import core
from core.attention import Conv, PrefixLM, Row
from models.transformer import KVCache, Transformer


def _torch_transformer(model, x, attn_mask=None, is_causal=False):
    """The same stack in PyTorch from model's weights (float64): returns (output, {name: weight tensor})."""
    w = {k: torch.tensor(np.asarray(v.data), dtype=torch.float64, requires_grad=True)
         for k, v in model.named_parameters()}
    tf = torch.nn.functional
    h = x
    B, L, D = h.shape
    for i in range(model.depth):
        p = lambda n: w[f"blocks.{i}.{n}"]  # noqa: E731
        a = tf.layer_norm(h, (D,), p("ln_1.weight"), p("ln_1.bias"))
        q, k, v = tf.linear(a, p("attn.c_attn.weight"), p("attn.c_attn.bias")).split(D, dim=2)
        q, k, v = (t.view(B, L, model.heads, D // model.heads).transpose(1, 2) for t in (q, k, v))
        y = tf.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
        h = h + tf.linear(y.transpose(1, 2).reshape(B, L, D), p("attn.c_proj.weight"), p("attn.c_proj.bias"))
        m = tf.layer_norm(h, (D,), p("ln_2.weight"), p("ln_2.bias"))
        m = tf.linear(tf.gelu(tf.linear(m, p("mlp.c_fc.weight"), p("mlp.c_fc.bias"))), p("mlp.c_proj.weight"),
                      p("mlp.c_proj.bias"))
        h = h + m
    return tf.layer_norm(h, (D,), w["ln_f.weight"], w["ln_f.bias"]), w


@pytest.mark.parametrize("masking", ["none", "causal", "padding"])
def test_equals_pytorch_forward_and_gradients(masking):
    core.manual_seed(0)
    model = Transformer(depth=2, dim=16, heads=4).double()
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 7, 16))
    mask, kw, tkw = None, {}, {}
    if masking == "causal":
        kw, tkw = {"is_causal": True}, {"is_causal": True}
    if masking == "padding":  # sequences of lengths 7, 4, 2: keys past the end are hidden
        mask = (np.arange(7)[None, :] < np.array([7, 4, 2])[:, None])[:, None, None, :]
        kw, tkw = {"attn_mask": core.tensor(mask)}, {"attn_mask": torch.tensor(mask)}
    xc = core.tensor(x, requires_grad=True)
    out = model(xc, **kw)
    xt = torch.tensor(x, requires_grad=True)
    ref, w = _torch_transformer(model, xt, **tkw)
    np.testing.assert_allclose(out.numpy(), ref.detach().numpy(), rtol=1e-10, atol=1e-10)
    g = rng.standard_normal(out.shape)
    (out * core.tensor(g)).sum().backward()
    (ref * torch.tensor(g)).sum().backward()
    np.testing.assert_allclose(xc.grad, xt.grad.numpy(), rtol=1e-9, atol=1e-10)
    for name, p in model.named_parameters():
        np.testing.assert_allclose(p.grad, w[name].grad.numpy(), rtol=1e-9, atol=1e-10, err_msg=name)


PATTERNS = {"causal": None, "row": Row(text_len=3, width=3), "conv": Conv(text_len=3, width=3, kernel=3),
            "prefix": PrefixLM(prefix_len=4)}


@settings(max_examples=12, deadline=None)
@given(which=st.sampled_from(sorted(PATTERNS)), cuts=st.lists(st.integers(1, 5), min_size=1, max_size=6),
       seed=st.integers(0, 2**16))
def test_cached_incremental_forward_equals_full_forward(which, cuts, seed):
    n = 12  # text 3 + a 3×3 image grid for Row/Conv
    core.manual_seed(seed)
    model = Transformer(depth=2, dim=8, heads=2).double()
    x = core.tensor(np.random.default_rng(seed).standard_normal((2, n, 8)))
    kw = {"is_causal": True} if PATTERNS[which] is None else {"pattern": PATTERNS[which]}
    with core.no_grad():
        full = model(x, **kw).numpy()
        cache, pieces, start = model.new_cache(), [], 0
        if which == "prefix":  # prefix queries see later prefix keys: the whole prefix must come first
            cuts = [max(cuts[0], 4), *cuts[1:]]
        for c in [*cuts, n]:  # chunks of the given sizes, then the rest
            stop = min(start + c, n)
            if stop > start:
                pieces.append(model(x[:, start:stop], cache=cache, **kw).numpy())
            start = stop
    assert cache.length == n
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, rtol=1e-10, atol=1e-10)


def test_cache_is_for_inference_and_checks_shapes():
    model = Transformer(depth=1, dim=8, heads=2)
    x = core.randn(1, 3, 8)
    with pytest.raises(RuntimeError, match="no_grad"):
        model(x, cache=model.new_cache())
    with pytest.raises(ValueError, match="depth"):
        with core.no_grad():
            model(x, cache=KVCache(2))
    with pytest.raises(ValueError, match=r"expected input \(B, L, 8\)"):
        model(core.randn(1, 3, 4))
    with pytest.raises(ValueError, match="divisible"):
        Transformer(depth=1, dim=10, heads=4)
    cache = KVCache(1)
    cache.update(0, np.zeros((1, 2, 3, 4)), np.zeros((1, 2, 3, 4)))
    with pytest.raises(ValueError, match="cannot append"):
        cache.update(0, np.zeros((2, 2, 1, 4)), np.zeros((2, 2, 1, 4)))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_cached_forward_with_an_additive_padding_mask_and_a_pattern_equals_full_forward(dtype):
    """An additive mask broadcast as (B, 1, 1, S) combines with the pattern's rows for a chunk of L > 1 new
    queries, as the bool mask does."""
    core.manual_seed(0)
    model = Transformer(depth=2, dim=8, heads=2).double() if dtype == np.float64 else Transformer(2, 8, 2)
    x = np.random.default_rng(0).standard_normal((2, 7, 8)).astype(dtype)
    keep = np.arange(7)[None, :] != np.array([6, 3])[:, None]  # one hidden key per row
    additive = np.where(keep, 0.0, -np.inf).astype(dtype)[:, None, None, :]
    pattern = PrefixLM(prefix_len=2)
    with core.no_grad():
        full = model(core.tensor(x), attn_mask=core.tensor(additive), pattern=pattern).numpy()
        cache, pieces = model.new_cache(), []
        for lo, hi in ((0, 2), (2, 5), (5, 7)):
            mask = core.tensor(additive[..., :hi])
            pieces.append(model(core.tensor(x[:, lo:hi]), attn_mask=mask, pattern=pattern, cache=cache).numpy())
    tol = 1e-10 if dtype == np.float64 else 1e-5
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), full, rtol=tol, atol=tol)
