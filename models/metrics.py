"""How good is a generator? The measured figures of issue 4, each beside a baseline measured in the same run.

Samplers (GAN, DDPM, ...):
- `fd_classifier(a, b, dataset)`: the Fréchet distance between Gaussian fits of the penultimate
  features of a classifier trained here (models/classifier.py), Heusel et al. 2017, eq. (6) — FID's
  formula on our own feature network, so it is called FD-classifier, not FID, and its numbers are
  comparable only with each other.
- `class_agreement`: the fraction of class-conditioned samples that the classifier assigns to the
  requested class; `class_frequencies`: how often each class appears among samples (mode coverage).
- Baselines: `gaussian_baseline` (samples of a full-covariance Gaussian fitted to the training pixels:
  what a generator scores that knows only the first two moments) and the real training set itself
  (the floor a perfect sampler reaches with as many samples, since finite sets never score 0).

Likelihood models (VAE, Glow, ...):
- `bits_per_dim(nll_nats, n_dims)`: negative log-likelihood per image in nats -> bits per dimension.
- Discrete data, continuous densities: `dequantize` adds uniform noise within each level's bin and
  `discrete_nll` turns the continuous NLL of the noisy data into a bound on the discrete NLL
  (Theis et al. 2016, eq. (2)); `rescale_nll` adds the log-Jacobian of an affine rescaling of the data.
- Baseline: `independent_pixel_baseline`, a categorical over the levels for each pixel.

The digits are discrete: 17 levels 0..16 mapped to v / 8 - 1, so the levels are 1/8 apart in [-1, 1]
(`DIGITS_LEVELS`, `bin_width(17) == 0.125`). A density p on [-1, 1]^D assigns a level k the mass of its
bin, P(k) = ∫_bin p ≥ Δ^D · exp(E_u[log p(k + u)]) (Jensen, u uniform in the bin of width Δ), so

    -log P(k) ≤ E_u[-log p(x + u)] - D · log Δ        (the dequantized NLL is an upper bound)

and every likelihood figure here is in those discrete units: comparable across models and with the
independent-pixel baseline, which is a discrete model.
"""

from __future__ import annotations

import math

import numpy as np

import core
from models.classifier import load_classifier, logits_of, predict

DIGITS_LEVELS = 17  # pixel values 0..16 of sklearn's digits


# --- features and the Fréchet distance ------------------------------------------------------------


def _classifier_for(images, dataset):
    """The classifier of `dataset` at the images' resolution."""
    images = np.asarray(images)
    if images.ndim != 4:
        raise ValueError(f"metrics: expected images (N, C, H, W), got shape {images.shape}")
    return load_classifier(dataset, images.shape[-1])


def features(classifier, images, batch_size=256):
    """(N, D) float64 penultimate activations of `classifier` for a NumPy array of images in [-1, 1]."""
    classifier.eval()
    out = []
    with core.no_grad():
        for i in range(0, len(images), batch_size):
            out.append(classifier.features(core.tensor(np.asarray(images[i : i + batch_size], np.float32))).numpy())
    return np.concatenate(out).astype(np.float64)


def gaussian_fit(feats):
    """(mean (D,), covariance (D, D)) of a set of feature vectors (unbiased covariance, as FID uses)."""
    feats = np.asarray(feats, np.float64)
    if feats.ndim != 2 or len(feats) < 2:
        raise ValueError(f"gaussian_fit: expected (N >= 2, D) features, got shape {feats.shape}")
    if not np.isfinite(feats).all():  # e.g. a diverged generator's NaN images
        raise ValueError(f"gaussian_fit: features hold {(~np.isfinite(feats)).sum()} NaN or infinite values")
    return feats.mean(0), np.cov(feats, rowvar=False)


def sqrtm_psd(a):
    """The symmetric positive semi-definite square root of a symmetric PSD matrix, by eigendecomposition:
    a = V diag(λ) Vᵀ  ->  a^½ = V diag(√λ) Vᵀ. Eigenvalues that rounding made slightly negative count as 0."""
    a = np.asarray(a, np.float64)
    if a.ndim != 2 or a.shape[0] != a.shape[1]:
        raise ValueError(f"sqrtm_psd: expected a square matrix, got shape {a.shape}")
    lam, v = np.linalg.eigh((a + a.T) / 2)
    return (v * np.sqrt(np.clip(lam, 0, None))) @ v.T


def trace_sqrt_product(s1, s2):
    """tr((s1 s2)^½) for symmetric PSD s1, s2.

    s1 s2 is not symmetric, but it is similar to M = s1^½ s2 s1^½ (M = s1^½ (s1 s2) s1^-½), which is
    symmetric PSD: the eigenvalues of s1 s2 are those of M, real and ≥ 0, so tr((s1 s2)^½) = Σ √λ_i(M).
    One symmetric eigendecomposition, no complex arithmetic (scipy.linalg.sqrtm of s1 s2 agrees).
    """
    r = sqrtm_psd(s1)
    lam = np.linalg.eigvalsh(r @ np.asarray(s2, np.float64) @ r)
    return float(np.sqrt(np.clip(lam, 0, None)).sum())


def frechet_distance(mu1, s1, mu2, s2):
    """The Fréchet (2-Wasserstein) distance between N(mu1, s1) and N(mu2, s2), Dowson & Landau 1982:

        d² = ||mu1 - mu2||² + tr(s1 + s2 - 2 (s1 s2)^½)       (Heusel et al. 2017, eq. 6)
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.atleast_2d(s1).astype(np.float64), np.atleast_2d(s2).astype(np.float64)
    if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != (mu1.size, mu1.size):
        raise ValueError(f"frechet_distance: shapes do not match: mu1 {mu1.shape}, s1 {s1.shape}, "
                         f"mu2 {mu2.shape}, s2 {s2.shape}")  # fmt: skip
    for name, a in (("mu1", mu1), ("s1", s1), ("mu2", mu2), ("s2", s2)):
        if not np.isfinite(a).all():
            raise ValueError(f"frechet_distance: {name} holds NaN or infinite values")
    d = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * trace_sqrt_product(s1, s2))
    return max(d, 0.0)  # rounding can leave -1e-12 for identical inputs


def fd_classifier(images_a, images_b, dataset):
    """FD-classifier between two image sets (N, C, R, R) in [-1, 1] of `dataset` ("digits" or "shapes"),
    using the classifier trained at resolution R."""
    images_a, images_b = np.asarray(images_a), np.asarray(images_b)
    if images_a.shape[1:] != images_b.shape[1:]:
        raise ValueError(f"fd_classifier: image shapes differ: {images_a.shape[1:]} and {images_b.shape[1:]}")
    net = _classifier_for(images_a, dataset)
    return frechet_distance(*gaussian_fit(features(net, images_a)), *gaussian_fit(features(net, images_b)))


# --- what the classifier says about samples -------------------------------------------------------


def class_agreement(images, labels, dataset):
    """The fraction of images that the classifier assigns to the requested class.

    digits: labels (N,) ints -> one fraction. shapes: labels a dict head -> (N,) ints, -1 where an image
    requests nothing of that head (use `models.classifier.shapes_labels` on the prompts' attributes)
    -> dict head -> fraction over the images that request it, and "all": the fraction of images
    whose every requested head is right (prompt fidelity).
    """
    if len(images) == 0:
        raise ValueError("class_agreement: no images (the fraction of none is undefined)")
    pred = predict(_classifier_for(images, dataset), images)
    if dataset == "digits":
        labels = np.asarray(labels)
        if labels.shape != (len(images),):
            raise ValueError(f"class_agreement: expected {len(images)} labels, got shape {labels.shape}")
        return float((pred["label"] == labels).mean())
    if not isinstance(labels, dict):
        raise TypeError("class_agreement: shapes labels must be a dict head -> array (see shapes_labels)")
    unknown = set(labels) - set(pred)
    if unknown:
        raise ValueError(f"class_agreement: unknown heads {sorted(unknown)}; known: {sorted(pred)}")
    ok = np.ones(len(images), bool)
    out = {}
    for k, y in labels.items():
        y = np.asarray(y)
        if y.shape != (len(images),):
            raise ValueError(f"class_agreement: head {k!r} needs {len(images)} labels, got shape {y.shape}")
        asked = y >= 0
        if asked.any():
            out[k] = float((pred[k][asked] == y[asked]).mean())
        ok &= ~asked | (pred[k] == y)
    out["all"] = float(ok.mean())
    return out


def class_frequencies(images, dataset, head="label"):
    """(classes,) fraction of images assigned to each class of `head`: mode coverage at a glance (a
    collapsed generator puts most of its mass on few classes)."""
    net = _classifier_for(images, dataset)
    if head not in net.head_sizes:
        raise ValueError(f"class_frequencies: unknown head {head!r}; known: {sorted(net.head_sizes)}")
    pred = logits_of(net, images)[head].argmax(1)
    return np.bincount(pred, minlength=net.head_sizes[head]) / max(len(pred), 1)


def mode_coverage(images, dataset, reference, head="label"):
    """Per-class frequencies of the images against those of `reference` (e.g. the test set):
    dict(freq, reference, tv = total variation distance ½Σ|p - q|, covered = classes of the reference holding at
    least half their reference share)."""
    p, q = class_frequencies(images, dataset, head), class_frequencies(reference, dataset, head)
    covered = int(((p >= q / 2) & (q > 0)).sum())  # a class absent from the reference is not "covered"
    return dict(freq=p, reference=q, tv=float(np.abs(p - q).sum() / 2), covered=covered)


# --- baselines for samplers -----------------------------------------------------------------------


def gaussian_baseline(train_images, n, *, seed=0, clip=True):
    """n samples (N, C, H, W) of a Gaussian with the training pixels' mean and full covariance,
    clipped to [-1, 1] like a generator's tanh output (unless clip=False). Sampled as mean + V diag(√λ) ε from the
    eigendecomposition of the covariance (which is singular where pixels never vary)."""
    x = np.asarray(train_images, np.float64)
    flat = x.reshape(len(x), -1)
    mu, cov = flat.mean(0), np.cov(flat, rowvar=False)
    lam, v = np.linalg.eigh(cov)
    eps = np.random.default_rng(seed).standard_normal((n, len(mu)))
    samples = mu + (eps * np.sqrt(np.clip(lam, 0, None))) @ v.T
    if clip:
        samples = np.clip(samples, -1, 1)
    return samples.reshape(n, *x.shape[1:]).astype(np.float32)


def sampler_baselines(dataset, train_images, test_images, *, seed=0):
    """FD-classifier to the test set of the two reference samplers, measured now: dict(
    gaussian = as many samples as the training set has images of a full-covariance Gaussian fitted
    to its pixels, train = the real training set). The Fréchet distance of finite sets is biased
    upwards by fewer samples, so score a generator with as many samples as the training set has."""
    gauss = gaussian_baseline(train_images, len(train_images), seed=seed)
    return dict(gaussian=fd_classifier(gauss, test_images, dataset),
                train=fd_classifier(train_images, test_images, dataset))  # fmt: skip


# --- likelihoods: bits/dim, dequantization, ELBO ------------------------------------------------


def bits_per_dim(nll_nats, n_dims):
    """Negative log-likelihood in nats per image (a number, an array or a Tensor, e.g. a training loss)
    -> bits per dimension: nll / (D · ln 2)."""
    if not n_dims > 0:  # also NaN
        raise ValueError(f"bits_per_dim: n_dims must be positive, got {n_dims}")
    if isinstance(nll_nats, core.Tensor):
        return nll_nats * (1.0 / (n_dims * math.log(2)))
    return np.asarray(nll_nats, np.float64) / (n_dims * math.log(2)) if np.ndim(nll_nats) else (
        float(nll_nats) / (n_dims * math.log(2)))  # fmt: skip


def bin_width(levels, lo=-1.0, hi=1.0):
    """Distance Δ between neighbouring levels when `levels` values span [lo, hi] evenly: (hi - lo)/(levels - 1).
    Digits: 17 levels in [-1, 1] -> 1/8."""
    if levels < 2:
        raise ValueError(f"bin_width: need at least 2 levels, got {levels}")
    return (hi - lo) / (levels - 1)


def quantize(x, levels, lo=-1.0, hi=1.0):
    """The level index 0..levels-1 nearest each value of x (int64)."""
    return np.clip(np.rint((np.asarray(x, np.float64) - lo) / bin_width(levels, lo, hi)), 0, levels - 1).astype(
        np.int64)  # fmt: skip


def dequantize(x, levels, lo=-1.0, hi=1.0, *, generator=None):
    """Uniform dequantization: each value is snapped to its nearest level k (`quantize`; data such as the
    anti-aliased shapes lies between levels) and spread uniformly over that level's bin,
    lo + Δ·(k + u - ½), u ~ U[0, 1), so the bins of width Δ = bin_width(levels) tile [lo - Δ/2, hi + Δ/2]
    without overlap. NumPy arrays or Tensors in, the same out (noise from `generator` or core's default)."""
    if generator is not None and not isinstance(generator, core.random.Generator):
        raise TypeError(f"dequantize: generator must be a core.random.Generator, got {type(generator).__name__}")
    gen = generator or core.random.default_generator
    a = x.data if isinstance(x, core.Tensor) else np.asarray(x)
    u = gen.uniform(a.shape)
    dtype = a.dtype if a.dtype.kind == "f" else core.tensor(0.0).dtype  # integer levels: floats (the default)
    y = (lo + bin_width(levels, lo, hi) * (quantize(a, levels, lo, hi) + u - 0.5)).astype(dtype)
    return core.tensor(y) if isinstance(x, core.Tensor) else y


def discrete_nll(continuous_nll, n_dims, levels, lo=-1.0, hi=1.0):
    """Upper bound on the discrete NLL (nats) from the continuous NLL of dequantized data:
    -log P(x) ≤ E_u[-log p(x + u)] - D·log Δ (Theis et al. 2016, eq. 2; see the module docstring)."""
    return continuous_nll - n_dims * math.log(bin_width(levels, lo, hi))


def rescale_nll(nll_y, n_dims, scale):
    """NLL of x when a model's density is over y = scale·x + shift: p_x(x) = p_y(y)·|scale|^D, so
    -log p_x(x) = -log p_y(y) - D·log|scale| (change of variables; e.g. a model on [0, 1] of our
    [-1, 1] data has scale ½ and pays D·log 2 nats more)."""
    return nll_y - n_dims * math.log(abs(scale))


def elbo(log_px_given_z, kl):
    """ELBO = E_q[log p(x|z)] - KL(q(z|x) || p(z)), in nats per image (Kingma & Welling 2014, eq. 3);
    -ELBO bounds -log p(x) from above, so bits_per_dim(-elbo, D) is a bits/dim upper bound."""
    return np.asarray(log_px_given_z, np.float64) - np.asarray(kl, np.float64)


def nll_report(nll_nats, n_dims):
    """dict(nats = mean NLL per image, bits_per_dim) of an array of per-image NLLs."""
    m = float(np.mean(nll_nats))
    return dict(nats=m, bits_per_dim=bits_per_dim(m, n_dims))


# --- baseline for likelihoods ---------------------------------------------------------------------


def independent_pixel_baseline(train, test, levels=DIGITS_LEVELS, lo=-1.0, hi=1.0):
    """Test bits/dim of independent per-pixel categoricals over the levels, fitted on `train` with
    add-one (Laplace) smoothing: P(pixel d = k) = (count_dk + 1) / (N + levels). Images in [lo, hi]."""
    k_train = quantize(train, levels, lo, hi).reshape(len(train), -1)
    k_test = quantize(test, levels, lo, hi).reshape(len(test), -1)
    if k_train.shape[1] != k_test.shape[1]:
        raise ValueError(f"independent_pixel_baseline: train and test images differ in size: "
                         f"{np.shape(train)[1:]} vs {np.shape(test)[1:]}")  # fmt: skip
    d = k_train.shape[1]
    counts = np.zeros((d, levels))
    np.add.at(counts, (np.broadcast_to(np.arange(d), k_train.shape), k_train), 1)
    log_p = np.log(counts + 1) - np.log(len(k_train) + levels)  # (D, levels)
    nll = -log_p[np.arange(d), k_test].sum(1)  # nats per test image
    return bits_per_dim(float(nll.mean()), d)
