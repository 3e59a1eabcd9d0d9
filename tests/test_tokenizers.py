"""The shared pieces of the image tokenizers (models/tokenizers.py): the encoder/decoder shapes and their
1×1 ends, the interface's checks, the usage/PSNR/pooling helpers, the sample layout and the figures."""

import math

import numpy as np
import pytest

import core
from core import F, nn
from models import tokenizers as tk
from models.registry import UsageError


class Gray(nn.Module, tk.ImageTokenizer):
    """A fixed tokenizer for the tests: the token of a 4×4 cell is its mean brightness in K levels."""

    codebook_size, grid, channels, resolution = 16, (8, 8), 3, 32

    def _encode(self, x):
        cells = tk.pooled(x.numpy(), 8)[:, :, ::4, ::4].mean(1)
        return core.tensor(np.clip(np.rint((cells + 1) / 2 * 15), 0, 15).astype(np.int64))

    def _decode(self, codes):
        v = codes.astype(np.float32) / 15 * 2 - 1
        return core.tensor(np.repeat(np.repeat(v, 4, 1), 4, 2)[:, None].repeat(3, 1))


def test_encoder_decoder_shapes_and_one_by_one_ends():
    core.manual_seed(0)
    enc, dec = tk.Encoder(3, 32, 10, 2, blocks=1), tk.Decoder(10, 32, 3, 2, blocks=1)
    z = enc(core.randn(2, 3, 32, 32))
    assert z.shape == (2, 10, 8, 8)
    assert dec(z).shape == (2, 3, 32, 32)
    last, first = enc.net[-1], dec.net[0]
    assert last.kernel_size == (1, 1) and last.out_channels == 10  # the encoder ENDS with a 1×1 conv
    assert first.kernel_size == (1, 1) and first.in_channels == 10  # the decoder STARTS with one
    # the decoder's first 1×1 conv on a one-hot code is a lookup of column k of its weight (+ bias)
    onehot = F.one_hot(core.tensor(np.array([[[3]]])), 10).permute(0, 3, 1, 2).float()
    got = first(onehot).numpy()[0, :, 0, 0]
    np.testing.assert_allclose(got, first.weight.numpy()[:, 3, 0, 0] + first.bias.numpy(), rtol=1e-6)
    # channels double per halving: 8 at 32×32, 16 at 16×16, 32 at the grid
    assert enc.net[0].out_channels == 8 and dec.out.in_channels == 8
    with pytest.raises(ValueError, match="width must be divisible"):
        tk.Encoder(3, 30, 10, 2)


def test_resblock_scale_scales_the_branch():
    core.manual_seed(0)
    a, b = tk.ResBlock(4), tk.ResBlock(4, scale=1 / 16)
    b.load_state_dict(a.state_dict())
    x = core.randn(2, 4, 5, 5)
    np.testing.assert_allclose((b(x) - x).numpy(), (a(x) - x).numpy() / 16, rtol=1e-5, atol=1e-7)


def test_interface_checks_and_round_trip():
    m = Gray()
    x = np.random.default_rng(0).uniform(-1, 1, (3, 3, 32, 32)).astype(np.float32)
    t = m.encode(x)
    assert t.shape == (3, 8, 8) and t.dtype == np.int64
    assert m.decode(t).shape == (3, 3, 32, 32) and m.decode(t).dtype == np.float32
    np.testing.assert_array_equal(m.encode(m.decode(t)), t)  # a decoded image re-encodes to its tokens
    with pytest.raises(ValueError, match=r"encode: images must be \(B, 3, 32, 32\), got shape \(3, 1, 32, 32\)"):
        m.encode(x[:, :1])
    with pytest.raises(ValueError, match=r"decode: tokens must be ints of shape \(B, 8, 8\)"):
        m.decode(t[:, :4])
    with pytest.raises(ValueError, match=r"must lie in \[0, 16\), got values in \[16, 16\]"):
        m.decode(np.full((1, 8, 8), 16))
    assert m.encode(x[:0]).shape == (0, 8, 8) and m.decode(t[:0]).shape == (0, 3, 32, 32)
    assert m.train().encode(x).shape == (3, 8, 8) and m.training  # run in eval mode, the module's mode restored
    assert not m.eval().decode(t).min() < -1 and not m.training


def test_usage_psnr_pooled():
    assert tk.usage(np.arange(8), 8) == pytest.approx((8.0, 1.0))
    assert tk.usage(np.zeros(10, np.int64), 4) == pytest.approx((1.0, 0.25))
    p, f = tk.usage(np.array([0, 0, 1, 1]), 4)
    assert p == pytest.approx(2.0) and f == 0.5
    assert tk.psnr(0.04) == pytest.approx(10 * math.log10(4 / 0.04))
    x = np.random.default_rng(1).normal(size=(2, 3, 8, 8)).astype(np.float32)
    b = tk.pooled(x, 2)
    np.testing.assert_allclose(b[0, 1, :4, 4:], x[0, 1, :4, 4:].mean(), rtol=1e-5)


def test_sample_layout_rows_of_originals_above_reconstructions():
    m = Gray()
    out = tk.sample(m, _Cfg(), 5, seed=3)  # k = 3 per row: [o0 o1 o2][r0 r1 r2][o3 o4 -][r3 r4 -]
    assert out.shape == (12, 3, 32, 32)
    x = out[[0, 1, 2, 6, 7]]
    np.testing.assert_array_equal(out[[3, 4, 5, 9, 10]], m.reconstruct(x))
    assert not out[8].any() and not out[11].any()
    np.testing.assert_array_equal(tk.sample(m, _Cfg(), 5, seed=3), out)  # depends only on the seed
    for bad in ({"label": 1}, {"guidance": 2.0}, {"steps": 3}, {"temperature": 1.0}):
        with pytest.raises(UsageError, match="do\\(es\\) not apply"):
            tk.sample(m, _Cfg(), 4, **bad)
    wide = tk.sample(m, _Cfg(), 4, seed=3, nrow=3)  # t2i sample --nrow 3: [o0 o1 o2][r0 r1 r2][o3 - -][r3 - -]
    assert wide.shape == (12, 3, 32, 32)
    np.testing.assert_array_equal(wide[[3, 4, 5, 9]], m.reconstruct(wide[[0, 1, 2, 6]]))


class _Cfg:
    data, resolution = "shapes", 32


def test_reconstruction_figures_of_a_fixed_tokenizer():
    r = tk.reconstruction_figures(Gray(), _Cfg(), n=256)
    fig = {f["name"]: f for f in r["figures"]}
    mse = fig["reconstruction MSE"]
    assert 0 < mse["value"] and mse["value"] >= mse["baselines"]["pooled_grid"]  # gray levels lose colour
    assert fig["codes in use"]["value"] <= 1.0 and fig["codebook perplexity"]["value"] >= 1.0
    ratio = fig["classifier accuracy on reconstructions / on originals"]
    assert 0 < ratio["value"] < 0.95  # colour is gone: the colour heads fail
    assert r["images"] == 256 and r["grid"] == [8, 8]
    # the one-pass accuracies equal the classifier module's own
    from models.classifier import accuracy, load_classifier

    x, labels = tk.held_out(_Cfg(), 256)
    assert r["classifier_accuracy"]["originals"] == pytest.approx(accuracy(load_classifier("shapes", 32), x, labels))


def test_usage_counts_the_codebook_and_refuses_codes_outside_it():
    assert tk.usage(np.array([0, 1, 1, 3]), 4)[1] == 0.75
    with pytest.raises(ValueError, match=r"tokens must lie in \[0, 4\), got 0..20"):
        tk.usage(np.array([0, 20]), 4)
