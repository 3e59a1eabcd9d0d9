"""Metrics: the matrix square root and Fréchet distance against closed forms and scipy, the shipped
classifiers' accuracy, the sampler baselines' ordering, and the bits/dim bookkeeping."""

import math

import numpy as np
import pytest
import scipy.linalg

import core
from models import metrics
from models.classifier import SHAPES_HEADS, Classifier, accuracy, labelled_data, load_classifier, shapes_labels
from models.data import digits, parse_caption


def _spd(rng, d, rank=None):
    a = rng.standard_normal((d, rank or d))
    return a @ a.T / d


# --- square root and Fréchet distance --------------------------------------------------------------


@pytest.mark.parametrize("d, rank", [(1, None), (5, None), (40, None), (40, 10)])
def test_sqrtm_matches_scipy(d, rank):
    rng = np.random.default_rng(d)
    a, b = _spd(rng, d, rank), _spd(rng, d)
    r = metrics.sqrtm_psd(a)
    np.testing.assert_allclose(r @ r, a, atol=1e-10)
    np.testing.assert_allclose(r, np.real(scipy.linalg.sqrtm(a)), atol=1e-6 if rank else 1e-10)
    # tr((a b)^½) of the non-symmetric product, against scipy's general (Schur) square root
    np.testing.assert_allclose(metrics.trace_sqrt_product(a, b), np.trace(np.real(scipy.linalg.sqrtm(a @ b))),
                               rtol=1e-8, atol=1e-6 if rank else 1e-10)  # fmt: skip


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    mu, s = rng.standard_normal(8), _spd(rng, 8)
    assert metrics.frechet_distance(mu, s, mu, s) == pytest.approx(0, abs=1e-9)
    shift = rng.standard_normal(8)
    assert metrics.frechet_distance(mu, s, mu + shift, s) == pytest.approx((shift**2).sum(), rel=1e-9)
    # commuting covariances (both diagonal): d² = Σ (√a_i - √b_i)²
    a, b = rng.uniform(0.1, 2, 8), rng.uniform(0.1, 2, 8)
    want = ((np.sqrt(a) - np.sqrt(b)) ** 2).sum()
    assert metrics.frechet_distance(mu, np.diag(a), mu, np.diag(b)) == pytest.approx(want, rel=1e-9)
    # isotropic: N(0, σ²I) vs N(0, τ²I) in d dims -> d (σ - τ)²
    assert metrics.frechet_distance(np.zeros(3), 4 * np.eye(3), np.zeros(3), np.eye(3)) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="frechet_distance"):
        metrics.frechet_distance(mu, s, mu[:3], s)


def test_frechet_distance_of_samples():
    """Estimated from samples: a set with itself is 0; shifted Gaussians approach ||shift||²."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((20000, 4)) @ np.diag([1.0, 0.5, 2.0, 1.0])
    fit = metrics.gaussian_fit(x)
    assert metrics.frechet_distance(*fit, *fit) == pytest.approx(0, abs=1e-9)
    shift = np.array([1.0, -2.0, 0.5, 0.0])
    assert metrics.frechet_distance(*fit, *metrics.gaussian_fit(x + shift)) == pytest.approx(5.25, rel=1e-9)
    y = rng.standard_normal((20000, 4)) @ np.diag([1.0, 0.5, 2.0, 1.0]) + shift
    assert metrics.frechet_distance(*fit, *metrics.gaussian_fit(y)) == pytest.approx(5.25, abs=0.1)


def test_frechet_distance_rejects_non_finite_input():
    """NaN features (a diverged generator's images) raised LinAlgError or returned nan; now a clear error."""
    f = np.random.default_rng(0).standard_normal((10, 3))
    f[2, 1] = np.nan
    with pytest.raises(ValueError, match="gaussian_fit: features hold 1 NaN"):
        metrics.gaussian_fit(f)
    mu, s = np.zeros(2), np.eye(2)
    with pytest.raises(ValueError, match="mu1 holds NaN"):
        metrics.frechet_distance(np.array([np.nan, 0.0]), s, mu, s)
    with pytest.raises(ValueError, match="s2 holds NaN"):
        metrics.frechet_distance(mu, s, mu, np.diag([np.inf, 1.0]))


# --- the classifiers and the sampler figures ----------------------------------------------------------


@pytest.fixture(scope="module")
def digit_sets():
    return digits("train")[0], digits("test")


def test_digits_classifier_accuracy(digit_sets):
    _, (x, y) = digit_sets
    net = load_classifier("digits")
    acc = accuracy(net, x, {"label": y})["label"]
    print(f"digits 8×8 classifier: test accuracy {acc:.4f}")
    assert acc >= 0.97
    assert metrics.class_agreement(x, y, "digits") == pytest.approx(acc)
    assert metrics.class_agreement(x, (y + 1) % 10, "digits") < 0.05
    freq = metrics.class_frequencies(x, "digits")
    assert freq.sum() == pytest.approx(1) and np.all(np.abs(freq - 0.1) < 0.02)  # the test set is balanced


def test_fd_baselines(digit_sets):
    """The real training set is close to the test set; a Gaussian fitted to the pixels is far from it."""
    train, (test, _) = digit_sets
    assert metrics.fd_classifier(test, test, "digits") == pytest.approx(0, abs=1e-6)
    b = metrics.sampler_baselines("digits", train, test)
    print(f"digits 8×8 FD-classifier to test: real train {b['train']:.3f}, Gaussian baseline {b['gaussian']:.3f}")
    assert b["gaussian"] > 5 * b["train"]
    g = metrics.gaussian_baseline(train, 500, seed=0)
    assert g.shape == (500, 1, 8, 8) and g.min() >= -1 and g.max() <= 1
    assert np.array_equal(g, metrics.gaussian_baseline(train, 500, seed=0))
    # before clipping, the Gaussian has the training pixels' mean and covariance
    flat = metrics.gaussian_baseline(train, 40000, clip=False).reshape(40000, -1)
    assert np.abs(flat.mean(0) - train.reshape(len(train), -1).mean(0)).max() < 0.02
    assert np.abs(np.cov(flat, rowvar=False) - np.cov(train.reshape(len(train), -1), rowvar=False)).max() < 0.03


def test_mode_coverage_sees_a_collapse(digit_sets):
    _, (x, y) = digit_sets
    full = metrics.mode_coverage(x, "digits", x)
    assert full["tv"] == 0 and full["covered"] == 10
    collapsed = metrics.mode_coverage(x[y < 3], "digits", x)
    assert collapsed["covered"] == 3 and collapsed["tv"] > 0.6


@pytest.mark.parametrize("resolution", [16, 32])
def test_shapes_classifier_heads(resolution):
    """Shipped shapes classifiers: every head beats chance by far, the shape heads reach 80% (accuracies printed)."""
    x, y = labelled_data("shapes", resolution, "test", 512)
    net = load_classifier("shapes", resolution)
    acc = accuracy(net, x, y)
    print(f"shapes {resolution}×{resolution} classifier:", {k: round(v, 3) for k, v in acc.items()})
    for head, k in SHAPES_HEADS.items():
        assert acc[head] > 1 / k + 0.3, head
    assert acc["shape0"] > 0.8 and acc["shape1"] > 0.8
    for head in ("n_objects", "axis", "color0", "size0", "position"):
        assert acc[head] > 0.95, head
    agree = metrics.class_agreement(x, y, "shapes")
    assert set(agree) == set(SHAPES_HEADS) | {"all"} and agree["color0"] == pytest.approx(acc["color0"])


def test_shapes_labels_are_canonical():
    """'A right of B' and 'B left of A' describe the same picture and get the same labels."""
    a = shapes_labels(parse_caption("a small red circle to the right of a large blue square"))
    b = shapes_labels(parse_caption("a large blue square to the left of a small red circle"))
    assert a == b and a["shape0"][0] == 1 and a["axis"][0] == 0 and a["position"][0] == -1
    c = shapes_labels(parse_caption("a large green triangle in the top left"))
    assert c["n_objects"][0] == 0 and c["shape1"][0] == -1 and c["position"][0] == 0 and c["axis"][0] == -1


def test_classifier_shape_errors():
    net = Classifier(1, 8, {"label": 10})
    with pytest.raises(ValueError, match="expected images"):
        net.features(core.zeros(2, 1, 16, 16))
    with pytest.raises(ValueError, match="resolutions"):
        load_classifier("digits", 12)
    with pytest.raises(ValueError, match="unknown dataset"):
        load_classifier("cifar")


# --- likelihood bookkeeping --------------------------------------------------------------------------


def test_bits_per_dim_of_a_uniform_distribution():
    """A density uniform over the dequantization cube [-1 - Δ/2, 1 + Δ/2]^D of 17-level data is the
    uniform distribution over the levels: exactly log2(17) bits/dim once the bin width is accounted for."""
    d, levels = 64, metrics.DIGITS_LEVELS
    delta = metrics.bin_width(levels)
    assert delta == 0.125
    nll_continuous = d * math.log(levels * delta)  # -log of density (1 / (17 Δ))^D
    nll = metrics.discrete_nll(nll_continuous, d, levels)
    assert nll == pytest.approx(d * math.log(levels))
    assert metrics.bits_per_dim(nll, d) == pytest.approx(math.log2(levels))
    assert metrics.bits_per_dim(d * math.log(2), d) == pytest.approx(1.0)
    # the same model stated on [0, 1] (y = x/2 + 1/2) pays D·log 2 nats back when measured on x
    nll_y = d * math.log(levels * delta / 2)
    assert metrics.rescale_nll(nll_y, d, 0.5) == pytest.approx(nll_continuous)
    np.testing.assert_allclose(metrics.bits_per_dim(np.array([d * math.log(2)] * 3), d), 1.0)


def test_dequantize_fills_each_bin_exactly(digit_sets):
    train, _ = digit_sets
    x = train[:200]
    z = metrics.dequantize(x, 17, generator=core.random.Generator(0))
    assert z.dtype == x.dtype and np.abs(z - x).max() <= 0.0625 and np.abs(z - x).max() > 0.06
    assert np.array_equal(metrics.quantize(z, 17), metrics.quantize(x, 17))  # each level stays in its bin
    assert np.array_equal(metrics.quantize(x, 17), np.rint((x + 1) * 8).astype(np.int64))
    t = metrics.dequantize(core.tensor(x), 17)
    assert isinstance(t, core.Tensor) and np.abs(t.numpy() - x).max() <= 0.0625
    assert np.allclose(metrics.elbo([-10.0, -20.0], [1.0, 2.0]), [-11.0, -22.0])


def test_independent_pixel_baseline(digit_sets):
    train, (test, _) = digit_sets
    bpd = metrics.independent_pixel_baseline(train, test)
    print(f"digits 8×8 independent-pixel baseline: {bpd:.4f} bits/dim (uniform: {math.log2(17):.4f})")
    assert bpd < math.log2(17) - 1  # far better than uniform over the 17 levels
    # with one training image, add-one smoothing: a seen level has p = 2/18, any other 1/18
    one = train[:1]
    want = -np.log2(np.where(metrics.quantize(test[:1], 17) == metrics.quantize(one, 17), 2 / 18, 1 / 18)).mean()
    assert metrics.independent_pixel_baseline(one, test[:1]) == pytest.approx(want)


def test_dequantize_of_integer_levels_gives_floats_in_their_bins():
    """Integer input is dequantized to floats (it was cast back to ints, moving values to other levels)."""
    x = np.array([-1, 0, 1, 1, -1, 0])
    y = metrics.dequantize(x, 3, generator=core.random.Generator(0))
    assert y.dtype.kind == "f"
    np.testing.assert_array_equal(metrics.quantize(y, 3), metrics.quantize(x.astype(np.float64), 3))
    assert not np.array_equal(y, np.round(y))


def test_likelihood_bad_arguments():
    """n_dims NaN gave nan bits/dim; a NumPy generator was read as dequantize's `low` (wrong noise or an
    obscure error); class_agreement of no images gave nan."""
    with pytest.raises(ValueError, match="n_dims"):
        metrics.bits_per_dim(1.0, float("nan"))
    with pytest.raises(TypeError, match="core.random.Generator"):
        metrics.dequantize(np.zeros((1, 1, 1, 1)), 17, generator=np.random.default_rng(0))
    with pytest.raises(ValueError, match="no images"):
        metrics.class_agreement(np.zeros((0, 1, 8, 8), np.float32), np.zeros(0, np.int64), "digits")
