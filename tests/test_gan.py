"""GAN (models/gan.py): shapes, the losses against their formulas, each player's loss falls, sampling,
checkpoints (round trip, resume == uninterrupted bitwise); the measured bar under the `slow` marker."""

import numpy as np
import pytest

import core
from models import gan, registry
from models import train as loop
from models.registry import UsageError

TINY = dict(steps=4, batch_size=16, nz=8, ngf=8, ndf=8, embed_dim=4, checkpoint_every=2, eval_samples=64)


def tiny(data="digits", **kw):
    return registry.config(gan, data, **dict(TINY, **kw))


@pytest.mark.parametrize("data,res,channels", [("digits", 8, 1), ("digits", 16, 1), ("shapes", 16, 3)])
@pytest.mark.parametrize("conditional", [True, False])
def test_shapes(data, res, channels, conditional):
    cfg = tiny(data, resolution=res, conditional=conditional)
    core.manual_seed(0)
    m = gan.build(cfg)
    y = core.tensor(np.arange(5) % 5) if conditional else None
    x = m.G(core.randn(5, cfg.nz), y)
    assert x.shape == (5, channels, res, res)
    assert np.abs(x.numpy()).max() <= 1  # tanh output
    assert m.D(x, y).shape == (5,)


def test_losses_are_eq1_and_the_nonsaturating_loss():
    rng = np.random.default_rng(0)
    lr, lf = rng.normal(size=7), rng.normal(size=7)
    sig = lambda v: 1 / (1 + np.exp(-v))  # noqa: E731
    d = gan.d_loss(core.tensor(lr), core.tensor(lf)).item()
    g = gan.g_loss(core.tensor(lf)).item()
    # D minimizes −[log D(x) + log(1 − D(G(z)))] (Goodfellow et al. 2014, eq. 1); G minimizes −log D(G(z))
    assert d == pytest.approx(-np.mean(np.log(sig(lr))) - np.mean(np.log(1 - sig(lf))), rel=1e-12)
    assert g == pytest.approx(-np.mean(np.log(sig(lf))), rel=1e-12)


def test_projection_discriminator_uses_the_label():
    core.manual_seed(0)
    m = gan.build(tiny())
    init_normal = core.init.normal_
    init_normal(m.D.embed.weight, 0, 1.0)  # make the projection term visible at initialization
    x = core.randn(4, 1, 8, 8)
    a = m.D(x, core.tensor(np.zeros(4, np.int64))).numpy()
    b = m.D(x, core.tensor(np.ones(4, np.int64))).numpy()
    assert not np.allclose(a, b)
    assert gan.build(tiny(conditional=False)).D.embed is None


def test_each_player_improves_on_a_tiny_batch():
    core.manual_seed(0)
    cfg = tiny()
    m = gan.build(cfg)
    x, y = loop.dataset("digits", 8)
    real, lab = core.tensor(x[:16]), core.tensor(y[:16])
    z = core.randn(16, cfg.nz)
    opt_d = core.optim.Adam(m.D.parameters(), lr=2e-3, betas=(0.5, 0.999))
    opt_g = core.optim.Adam(m.G.parameters(), lr=2e-3, betas=(0.5, 0.999))
    with core.no_grad():
        fake = m.G(z, lab)
    losses = []
    for _ in range(6):  # D alone: learns to tell these real images from these fakes
        ld = gan.d_loss(m.D(real, lab), m.D(fake, lab))
        opt_d.zero_grad()
        ld.backward()
        opt_d.step()
        losses.append(ld.item())
    assert losses[-1] < 0.7 * losses[0]
    losses = []
    for _ in range(6):  # G alone, against the trained D: learns to fool it
        lg = gan.g_loss(m.D(m.G(z, lab), lab))
        opt_g.zero_grad()
        lg.backward()
        opt_g.step()
        losses.append(lg.item())
    assert losses[-1] < 0.8 * losses[0]


def test_sample_is_seeded_labelled_and_checks_its_arguments(tmp_path):
    cfg = tiny()
    out = tmp_path / "g.safetensors"
    gan.train(cfg, str(out), progress=False)
    m, c = gan.load(str(out))
    state = core.random.default_generator.get_state()
    a = gan.sample(m, c, 12, seed=3)
    assert core.random.default_generator.get_state() == state  # a private generator
    assert a.shape == (12, 1, 8, 8) and a.dtype == np.float32 and np.abs(a).max() <= 1
    np.testing.assert_array_equal(a, gan.sample(m, c, 12, seed=3))
    assert not np.array_equal(a, gan.sample(m, c, 12, seed=4))
    # label 3 everywhere differs from the default labels 0..9 cycling (same noise)
    assert not np.array_equal(a, gan.sample(m, c, 12, label=3, seed=3))
    with pytest.raises(UsageError, match="guidance"):
        gan.sample(m, c, 4, guidance=2.0)
    with pytest.raises(UsageError, match="label"):
        gan.sample(m, c, 4, label=10)


def test_unconditional_model_refuses_a_label(tmp_path):
    cfg = tiny(conditional=False, steps=1)
    gan.train(cfg, str(tmp_path / "u.safetensors"), progress=False)
    m, c = gan.load(str(tmp_path / "u.safetensors"))
    assert not c.conditional and gan.sample(m, c, 3).shape == (3, 1, 8, 8)
    with pytest.raises(UsageError, match="unconditional"):
        gan.sample(m, c, 3, label=1)


def test_checkpoint_round_trip_and_resume_equals_uninterrupted(tmp_path):
    whole, part = str(tmp_path / "whole.safetensors"), str(tmp_path / "part.safetensors")
    gan.train(tiny(steps=4), whole, progress=False)
    gan.train(tiny(steps=2), part, progress=False)
    summary = gan.train(tiny(steps=4), part, progress=False)  # resumes at step 2
    assert summary["start"] == 2 and summary["steps"] == 4
    a, b = core.serialize.load(whole), core.serialize.load(part)
    assert sorted(a) == sorted(b)
    for k in a:  # weights, BatchNorm statistics, both optimizers' moments: bitwise
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    ma, ca = gan.load(whole)
    mb, _ = gan.load(part)
    assert ca == tiny(steps=4)
    np.testing.assert_array_equal(gan.sample(ma, ca, 8), gan.sample(mb, ca, 8))
    assert loop.read_checkpoint(whole)["history"]["step"] == [1, 2, 3, 4]


@pytest.mark.slow
def test_bar_digits(tmp_path):
    """The measured bar: GAN on digits with the default config, FD-classifier far below the Gaussian
    baseline and class agreement >= 90%."""
    cfg = registry.config(gan, "digits")
    gan.train(cfg, str(tmp_path / "gan.safetensors"), progress=False)
    m, c = gan.load(str(tmp_path / "gan.safetensors"))
    figs = {f["name"]: f for f in gan.evaluate(m, c)["figures"]}
    fd = figs["FD-classifier"]
    assert fd["value"] < fd["baselines"]["gaussian"] / 3
    assert figs["class agreement"]["value"] >= 0.90
