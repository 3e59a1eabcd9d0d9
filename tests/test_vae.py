"""VAE (models/vae.py): the closed-form KL against PyTorch, the discretized logistic is a probability
over the levels, the ELBO falls on a tiny batch, IWAE ≥ ELBO, sampling and interpolation, checkpoints
(round trip, resume == uninterrupted bitwise); the measured bar under the `slow` marker."""

import math

import numpy as np
import pytest
import torch

import core
from models import registry, vae
from models import train as loop
from models.registry import UsageError

TINY = dict(steps=4, batch_size=16, latent=4, width=8, hidden=32, checkpoint_every=2, iw_samples=8,
            eval_samples=64)


def tiny(data="digits", **kw):
    return registry.config(vae, data, **dict(TINY, **kw))


@pytest.mark.parametrize("data,res,channels", [("digits", 8, 1), ("digits", 16, 1), ("shapes", 16, 3)])
def test_shapes(data, res, channels):
    cfg = tiny(data, resolution=res)
    m = vae.build(cfg)
    mu, logvar = m.encode(core.randn(3, channels, res, res))
    assert mu.shape == logvar.shape == (3, cfg.latent)
    mean, log_scale = m.decode(mu)
    assert mean.shape == log_scale.shape == (3, channels, res, res)


def test_kl_is_the_closed_form_of_appendix_b():
    rng = np.random.default_rng(0)
    mu, logvar = rng.normal(size=(5, 3)), rng.normal(size=(5, 3))
    ours = vae.kl_to_prior(core.tensor(mu), core.tensor(logvar)).numpy()
    q = torch.distributions.Normal(torch.tensor(mu), torch.tensor(np.exp(0.5 * logvar)))
    p = torch.distributions.Normal(torch.zeros(5, 3, dtype=torch.float64), torch.ones(5, 3, dtype=torch.float64))
    np.testing.assert_allclose(ours, torch.distributions.kl_divergence(q, p).sum(1).numpy(), rtol=1e-12)


@pytest.mark.parametrize("levels", [17, 256])
def test_discretized_logistic_is_a_distribution_over_the_levels(levels):
    """Σ_k P(k) = 1 for any mean and scale, and an inner bin's mass is σ(upper edge) − σ(lower edge)."""
    values = np.linspace(-1, 1, levels)
    rng = np.random.default_rng(1)
    mean, log_scale = rng.normal(0, 0.8, 6), rng.normal(-2, 1.5, 6)  # 6 "pixels", narrow to wide
    x = np.repeat(values[:, None], 6, axis=1)[:, None, :]  # (levels, 1, 6): every level of every pixel
    lp = vae.discretized_logistic_log_prob(core.tensor(x), core.tensor(np.broadcast_to(mean, x.shape).copy()),
                                           core.tensor(np.broadcast_to(log_scale, x.shape).copy()), levels)
    assert lp.shape == (levels,)
    per_pixel = np.stack([vae.discretized_logistic_log_prob(
        core.tensor(x[:, :, j : j + 1]), core.tensor(np.full((levels, 1, 1), mean[j])),
        core.tensor(np.full((levels, 1, 1), log_scale[j])), levels).numpy() for j in range(6)], 1)
    np.testing.assert_allclose(np.exp(per_pixel).sum(0), 1, atol=1e-6)
    np.testing.assert_allclose(lp.numpy(), per_pixel.sum(1), rtol=1e-12)
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    k, half, s = levels // 2, 1 / (levels - 1), np.exp(log_scale[0])
    direct = sig((values[k] + half - mean[0]) / s) - sig((values[k] - half - mean[0]) / s)
    if direct > 1e-5:
        assert per_pixel[k, 0] == pytest.approx(math.log(direct), rel=1e-9)


def test_on_levels_snaps_to_the_grid():
    x = np.array([-1.0, -0.97, 0.06, 0.99, 1.3], np.float32)
    np.testing.assert_allclose(vae.on_levels(x, 17), [-1, -1, 0.0, 1, 1])
    digits = loop.dataset("digits", 8)[0]
    np.testing.assert_array_equal(vae.on_levels(digits, 17), digits)  # digits already lie on 17 levels


def test_negative_elbo_falls_on_a_tiny_batch():
    core.manual_seed(0)
    m = vae.build(tiny())
    x = core.tensor(loop.dataset("digits", 8)[0][:16])
    opt = core.optim.Adam(m.parameters(), lr=1e-2)
    losses = []
    for _ in range(20):
        rec, kl = vae.elbo_terms(m, x, 17)
        loss = (kl - rec).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.85 * losses[0]  # from 144 nats (unit-scale logistics) to about 117


def test_iwae_bound_is_tighter_than_the_elbo(tmp_path):
    cfg = tiny(steps=6)
    vae.train(cfg, str(tmp_path / "v.safetensors"), progress=False)
    m, c = vae.load(str(tmp_path / "v.safetensors"))
    x = loop.dataset("digits", 8, "test")[0][:32]
    elbo, iwae = vae.bounds(m, x, 17, k=50)
    assert elbo.shape == iwae.shape == (32,)
    assert np.all(np.isfinite(iwae)) and iwae.mean() > elbo.mean()  # Burda et al. 2016, Theorem 1
    _, iwae1 = vae.bounds(m, x, 17, k=1, seed=5)
    assert iwae1.mean() < iwae.mean()


def test_sample_interpolate_and_argument_checks(tmp_path):
    cfg = tiny()
    vae.train(cfg, str(tmp_path / "v.safetensors"), progress=False)
    m, c = vae.load(str(tmp_path / "v.safetensors"))
    s = vae.sample(m, c, 10, seed=1)
    assert s.shape == (10, 1, 8, 8) and s.dtype == np.float32 and np.abs(s).max() <= 1
    np.testing.assert_array_equal(s, vae.sample(m, c, 10, seed=1))
    with pytest.raises(UsageError, match="label"):
        vae.sample(m, c, 2, label=1)
    x = loop.dataset("digits", 8, "test")[0]
    path = vae.interpolation_grid(m, c, str(tmp_path / "i.png"), rows=2, steps=5)
    assert (tmp_path / "i.png").exists() and path.endswith("i.png")
    line = vae.interpolate(m, x[0], x[1], steps=5)
    with core.no_grad():  # the ends decode the posterior means of the two images
        mu, _ = m.encode(core.tensor(x[:2]))
        ends = np.clip(m.decode(mu)[0].numpy(), -1, 1)
    np.testing.assert_allclose(line[[0, -1]], ends, atol=1e-6)


def test_checkpoint_round_trip_and_resume_equals_uninterrupted(tmp_path):
    whole, part = str(tmp_path / "whole.safetensors"), str(tmp_path / "part.safetensors")
    vae.train(tiny(steps=4), whole, progress=False)
    vae.train(tiny(steps=2), part, progress=False)
    assert vae.train(tiny(steps=4), part, progress=False)["start"] == 2
    a, b = core.serialize.load(whole), core.serialize.load(part)
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    m, c = vae.load(whole)
    assert c == tiny(steps=4)


@pytest.mark.slow
def test_bar_digits(tmp_path):
    """The measured bar: test ELBO and IWAE (k = 100) both beat the independent per-pixel baseline."""
    cfg = registry.config(vae, "digits")
    vae.train(cfg, str(tmp_path / "vae.safetensors"), progress=False)
    m, c = vae.load(str(tmp_path / "vae.safetensors"))
    figs = {f["name"]: f for f in vae.evaluate(m, c)["figures"]}
    for name in ("test -ELBO", "test -IWAE (k=100)"):
        assert figs[name]["value"] < figs[name]["baselines"]["independent_pixels"]
    assert figs["test -IWAE (k=100)"]["value"] <= figs["test -ELBO"]["value"]
