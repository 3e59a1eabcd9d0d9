"""dVAE (models/dvae.py): the Gumbel path's gradients (finite differences in float64, and PyTorch on the same
noise), the KL to the uniform prior, the logit-Laplace density (a density on (0, 1), the paper's formula), the
τ/β schedules, the loss falls on a tiny batch, encode = argmax codes, checkpoints (round trip, resume ==
uninterrupted bitwise) and `t2i train/sample/eval` in process; the measured bar under the `slow` marker."""

import json
import math

import numpy as np
import pytest
import scipy.integrate
import torch

import core
from core import F
from core.gradcheck import gradcheck
from models import cli, dvae, metrics, registry
from models import train as loop

TINY = dict(resolution=16, steps=4, batch_size=8, codebook_size=16, width=8, downs=2, blocks=1, tau_steps=3,
            kl_steps=2, warmup=1, checkpoint_every=2, eval_images=64)


def tiny(**kw):
    return registry.config(dvae, **dict(TINY, **kw))


def test_shapes_and_interface():
    cfg = tiny()
    m = dvae.build(cfg)
    x = loop.dataset("shapes", 16, "test")[0][:3]
    logits = m.logits(core.tensor(x))
    assert logits.shape == (3, 16, 4, 4) and m.grid == (4, 4) and m.codebook_size == 16
    mu, log_b = m.likelihood(m.relaxed(logits, 0.5))
    assert mu.shape == log_b.shape == (3, 3, 16, 16)
    tokens = m.encode(x)
    assert tokens.shape == (3, 4, 4) and tokens.dtype == np.int64
    rec = m.decode(tokens)
    assert rec.shape == x.shape and rec.dtype == np.float32 and np.abs(rec).max() <= 1
    with pytest.raises(ValueError, match="encode: images must be"):
        m.encode(x[:, :1])
    with pytest.raises(ValueError, match="resolution 18 is not divisible"):
        tiny(resolution=18)


def test_encode_is_the_argmax_code_and_decode_reads_the_one_hot_codebook():
    core.manual_seed(1)
    m = dvae.build(tiny())
    x = loop.dataset("shapes", 16, "test")[0][:5]
    with core.no_grad():
        logits = m.logits(core.tensor(x)).numpy()
    tokens = m.encode(x)
    np.testing.assert_array_equal(tokens, logits.argmax(1))
    onehot = np.eye(16, dtype=np.float32)[tokens].transpose(0, 3, 1, 2)
    with core.no_grad():
        mu = m.likelihood(core.tensor(onehot))[0].numpy()
    y = 1 / (1 + np.exp(-mu.astype(np.float64)))
    direct = np.clip((y - 0.1) / 0.8, 0, 1) * 2 - 1  # φ⁻¹(sigmoid(μ)) (App. A.3), back to [-1, 1]
    np.testing.assert_allclose(m.decode(tokens), direct, atol=1e-6)
    w = m.decoder.net[0].weight.numpy()[:, :, 0, 0]  # the decoder's first 1×1 conv: column k is code k's vector
    with core.no_grad():
        first = m.decoder.net[0](core.tensor(onehot)).numpy()
    np.testing.assert_allclose(first[0, :, 0, 0], w[:, tokens[0, 0, 0]] + m.decoder.net[0].bias.numpy(), rtol=1e-6)


def _tiny64():
    core.manual_seed(2)
    return dvae.build(tiny(resolution=8, codebook_size=5)).double()


def test_gumbel_path_gradients_match_finite_differences():
    """The relaxed forward (kernel Gumbel-softmax with injected noise → decoder → logit-Laplace) in float64."""
    m = _tiny64()
    rng = np.random.default_rng(0)
    logits = core.tensor(rng.normal(size=(2, 5, 2, 2)), requires_grad=True)
    g = -np.log(-np.log(rng.uniform(size=(2, 5, 2, 2))))
    y = core.tensor(dvae.map_pixels(rng.uniform(-1, 1, size=(2, 3, 8, 8))))
    for tau in (1.0, 0.3):
        def f(lg, tau=tau):
            return dvae.logit_laplace_log_prob(y, *m.likelihood(m.relaxed(lg, tau, noise=g)))
        assert gradcheck(f, (logits,), atol=1e-6, rtol=1e-5)
    assert gradcheck(lambda lg: dvae.kl_to_uniform(lg), (logits,), atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("hard", [False, True])
def test_gumbel_path_gradients_equal_pytorch_on_the_same_noise(hard):
    """softmax((logits + g)/τ) over the codes (hard: y_hard − sg[y_soft] + y_soft), then the codebook (the
    decoder's first 1×1 conv): the gradient w.r.t. the logits equals PyTorch's, float64."""
    m = _tiny64()
    rng = np.random.default_rng(3)
    lg, g, v = rng.normal(size=(2, 5, 2, 2)), rng.gumbel(size=(2, 5, 2, 2)), rng.normal(size=(2, 8, 2, 2))
    conv = m.decoder.net[0]
    logits = core.tensor(lg, requires_grad=True)
    out = conv(m.relaxed(logits, 0.25, noise=g) if not hard else F.gumbel_softmax(logits, 0.25, hard=True, dim=1,
                                                                                    noise=g))
    (out * core.tensor(v)).sum().backward()
    t = torch.tensor(lg, requires_grad=True)
    soft = torch.softmax((t + torch.tensor(g)) / 0.25, dim=1)
    if hard:
        soft = torch.nn.functional.one_hot(soft.argmax(1), 5).permute(0, 3, 1, 2).double() - soft.detach() + soft
    ref = torch.nn.functional.conv2d(soft, torch.tensor(conv.weight.numpy()), torch.tensor(conv.bias.numpy()))
    (ref * torch.tensor(v)).sum().backward()
    np.testing.assert_allclose(out.numpy(), ref.detach().numpy(), rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(logits.grad, t.grad.numpy(), rtol=1e-10, atol=1e-12)


def test_kl_to_uniform_equals_the_direct_formula():
    rng = np.random.default_rng(4)
    lg = rng.normal(0, 2, size=(3, 7, 2, 3))
    ours = dvae.kl_to_uniform(core.tensor(lg)).numpy()
    q = np.exp(lg - lg.max(1, keepdims=True))
    q /= q.sum(1, keepdims=True)
    direct = (q * np.log(q * 7)).sum((1, 2, 3))  # Σ_cells Σ_k q_k ln(q_k / (1/K))
    np.testing.assert_allclose(ours, direct, rtol=1e-12)
    t = torch.tensor(lg).permute(0, 2, 3, 1)
    kl = torch.distributions.kl_divergence(torch.distributions.Categorical(logits=t),
                                           torch.distributions.Categorical(probs=torch.full_like(t, 1 / 7)))
    np.testing.assert_allclose(ours, kl.sum((1, 2)).numpy(), rtol=1e-10)
    assert dvae.kl_to_uniform(core.zeros(2, 7, 2, 3, dtype=np.float64)).numpy() == pytest.approx([0, 0], abs=1e-12)


def test_marginal_kl_is_the_kl_of_the_batch_averaged_q():
    """KL(q̄ || U(K)), q̄ the mean of softmax(logits) over images and cells: 0 when the batch uses the codes equally
    even if every cell is sure of its code, ln K when every cell is sure of the same code; gradient by finite
    differences (float64)."""
    rng = np.random.default_rng(5)
    lg = rng.normal(0, 2, size=(3, 7, 2, 3))
    q = torch.softmax(torch.tensor(lg), dim=1).mean((0, 2, 3))
    uniform = torch.distributions.Categorical(probs=torch.full((7,), 1 / 7.0, dtype=torch.float64))
    ref = torch.distributions.kl_divergence(torch.distributions.Categorical(probs=q), uniform)
    assert dvae.marginal_kl(core.tensor(lg)).item() == pytest.approx(ref.item(), rel=1e-9)
    sure = np.where(np.eye(7)[np.arange(7 * 2 * 3).reshape(7, 2, 3) % 7].transpose(0, 3, 1, 2) > 0, 30.0, -30.0)
    assert dvae.marginal_kl(core.tensor(sure)).item() == pytest.approx(0, abs=1e-9)  # each code in 6 of 42 cells
    same = np.full((2, 7, 2, 2), -30.0)
    same[:, 3] = 30.0
    assert dvae.marginal_kl(core.tensor(same)).item() == pytest.approx(math.log(7), abs=1e-9)
    assert gradcheck(lambda g: dvae.marginal_kl(g), (core.tensor(lg, requires_grad=True),), atol=1e-7, rtol=1e-6)


@pytest.mark.parametrize("mu,b", [(0.0, 1.0), (-2.0, 0.3), (1.5, 0.05), (0.7, 3.0)])
def test_logit_laplace_is_a_density_on_the_unit_interval(mu, b):
    """∫_0^1 f(y | μ, b) dy = 1 (scipy quadrature; the peak at sigmoid(μ) split out), and f is the paper's formula
    1/(2 b y(1 − y)) · exp(−|logit y − μ|/b) (App. A.3), i.e. PyTorch's Laplace density of logit(y) times 1/(y(1−y))."""
    def f(y):
        return float(np.exp(dvae.logit_laplace_log_prob(core.tensor(np.array([y])), core.tensor(np.array([mu])),
                                                        core.tensor(np.array([math.log(b)]))).numpy()[0]))
    peak = 1 / (1 + math.exp(-mu))
    total = sum(scipy.integrate.quad(f, lo, hi, limit=200, epsabs=1e-11)[0] for lo, hi in ((0, peak), (peak, 1)))
    assert total == pytest.approx(1, abs=1e-7)
    y = np.linspace(0.01, 0.99, 41)
    ours = dvae.logit_laplace_log_prob(core.tensor(y), core.tensor(np.full(41, mu)),
                                       core.tensor(np.full(41, math.log(b)))).numpy()
    brute = np.log(1 / (2 * b * y * (1 - y)) * np.exp(-np.abs(np.log(y / (1 - y)) - mu) / b))
    np.testing.assert_allclose(ours, brute, rtol=1e-12, atol=1e-12)
    laplace = torch.distributions.Laplace(torch.tensor(mu, dtype=torch.float64), b)
    lap = laplace.log_prob(torch.logit(torch.tensor(y))) - torch.log(torch.tensor(y * (1 - y)))
    np.testing.assert_allclose(ours, lap.numpy(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mu, sigma", [(0.0, 0.3), (1.5, 0.3), (-2.2, 0.1), (0.7, 1.0)])
def test_logit_normal_is_a_density_on_the_unit_interval(mu, sigma):
    """The fixed-scale alternative (Config.sigma > 0): ∫_0^1 = 1, and it is PyTorch's Normal density of logit(y)
    times 1/(y(1−y)), so the ELBO stays a bound on the same data."""
    def f(y):
        return float(np.exp(dvae.logit_normal_log_prob(core.tensor(np.array([y])), core.tensor(np.array([mu])),
                                                       sigma).numpy()[0]))
    peak = 1 / (1 + math.exp(-mu))
    total = sum(scipy.integrate.quad(f, lo, hi, limit=200, epsabs=1e-11)[0] for lo, hi in ((0, peak), (peak, 1)))
    assert total == pytest.approx(1, abs=1e-7)
    y = np.linspace(0.01, 0.99, 41)
    ours = dvae.logit_normal_log_prob(core.tensor(y), core.tensor(np.full(41, mu)), sigma).numpy()
    normal = torch.distributions.Normal(torch.tensor(mu, dtype=torch.float64), sigma)
    ref = normal.log_prob(torch.logit(torch.tensor(y))) - torch.log(torch.tensor(y * (1 - y)))
    np.testing.assert_allclose(ours, ref.numpy(), rtol=1e-12, atol=1e-12)


def test_sigma_switches_the_likelihood():
    """With Config.sigma = σ > 0 the reconstruction term is the logit-normal of the decoder's μ (its ln b unused)."""
    cfg = dvae.Config(resolution=8, downs=1, width=8, codebook_size=16, blocks=1, sigma=0.3)
    core.manual_seed(0)
    model = dvae.build(cfg)
    x = core.tensor(np.random.default_rng(0).uniform(-1, 1, (2, 3, 8, 8)).astype(np.float32))
    noise = core.tensor(np.random.default_rng(1).gumbel(size=(2, 16, 4, 4)).astype(np.float32))
    rec, _ = dvae.elbo_terms(model, x, 0.5, noise=noise)
    mu, _ = model.likelihood(F.gumbel_softmax(model.logits(x), 0.5, dim=1, noise=noise))
    want = dvae.logit_normal_log_prob(dvae.map_pixels(x), mu, 0.3).flatten(1).sum(1)
    np.testing.assert_allclose(rec.numpy(), want.numpy(), rtol=1e-6)
    with pytest.raises(ValueError, match="sigma"):
        dvae.Config(sigma=-1.0)


def test_pixel_map_and_its_inverse():
    x = np.array([-1.0, 0.0, 1.0])
    np.testing.assert_allclose(dvae.map_pixels(x), [0.1, 0.5, 0.9])  # (1 − 2ε)x + ε on [0, 1], ε = 0.1
    np.testing.assert_allclose(dvae.unmap_pixels(core.tensor([0.05, 0.1, 0.5, 0.9, 0.95])).numpy(),
                               [0, 0, 0.5, 1, 1])


def test_schedules_at_key_steps():
    cfg = dvae.Config()
    assert dvae.tau_at(cfg, 0) == 1.0
    assert dvae.tau_at(cfg, cfg.tau_steps // 2) == pytest.approx((1 + 1 / 16) / 2)  # a cosine's midpoint
    assert dvae.tau_at(cfg, cfg.tau_steps // 4) == pytest.approx(1 / 16 + (15 / 16) * (1 + math.cos(math.pi / 4)) / 2)
    assert dvae.tau_at(cfg, cfg.tau_steps) == dvae.tau_at(cfg, 10 * cfg.tau_steps) == pytest.approx(1 / 16)
    assert dvae.kl_weight_at(cfg, 0) == 0.0
    assert dvae.kl_weight_at(cfg, cfg.kl_steps // 2) == pytest.approx(cfg.kl_weight / 2)
    assert dvae.kl_weight_at(cfg, cfg.kl_steps) == dvae.kl_weight_at(cfg, cfg.steps) == pytest.approx(cfg.kl_weight)
    taus = [dvae.tau_at(cfg, t) for t in range(0, cfg.tau_steps + 1, 10)]
    assert all(a > b for a, b in zip(taus, taus[1:]))  # strictly annealed


def test_loss_falls_on_a_tiny_batch():
    cfg = tiny(kl_steps=0, kl_weight=1.0)
    core.manual_seed(0)
    m = dvae.build(cfg)
    x = core.tensor(dvae.on_levels(loop.dataset("shapes", 16)[0][:16]))
    opt = core.optim.Adam(m.parameters(), lr=3e-3)
    losses = []
    for step in range(35):
        value, terms = dvae.loss(m, x, cfg, step)
        opt.zero_grad()
        value.backward()
        opt.step()
        losses.append(terms["loss"])
        want = terms["rec"] + terms["kl"] + cfg.diversity * terms["div"]  # β = 1 here
        assert terms["loss"] == pytest.approx(want, rel=1e-5)
    assert losses[-1] < losses[0] - 0.5  # nats per pixel channel


def test_loss_adds_the_diversity_term_and_hard_decodes_one_hot_codes():
    """cfg.diversity = γ adds γ·cells·KL(q̄ || U)/(C·H·W) to the same −ELBO (same Gumbel noise); cfg.hard = True
    decodes the one-hot Gumbel-max code of the same noise (the forward of F.gumbel_softmax(hard=True))."""
    core.manual_seed(0)
    m = dvae.build(tiny())
    x = core.tensor(dvae.on_levels(loop.dataset("shapes", 16)[0][:4]))
    g = np.random.default_rng(6).gumbel(size=(4, 16, 4, 4)).astype(np.float32)
    base, t0 = dvae.loss(m, x, tiny(diversity=0.0), 3, noise=g)
    both, t1 = dvae.loss(m, x, tiny(diversity=2.0), 3, noise=g)
    div = dvae.marginal_kl(m.logits(x)).item() * 16 / (3 * 16 * 16)
    assert t1["div"] == pytest.approx(div, rel=1e-5) and div > 0
    assert both.item() == pytest.approx(base.item() + 2.0 * div, rel=1e-5, abs=1e-6)
    m.sigma = 0.0  # the paper's logit-Laplace
    _, th = dvae.loss(m, x, tiny(hard=True, sigma=0.0), 3, noise=g)
    onehot = np.eye(16, dtype=np.float32)[(m.logits(x).numpy() + g).argmax(1)].transpose(0, 3, 1, 2)
    mu, log_b = m.likelihood(core.tensor(onehot))
    rec = dvae.logit_laplace_log_prob(core.tensor(dvae.map_pixels(x.numpy())), mu, log_b).numpy().sum((1, 2, 3))
    assert th["rec"] == pytest.approx(-rec.mean() / (3 * 16 * 16), rel=1e-4)


def test_negative_elbo_is_a_bound_in_the_units_of_the_pixel_baseline():
    """Exact bookkeeping: the −ELBO of the discrete images = the −ELBO of y = φ(x) (nats) − D ln(0.4) − D ln Δ."""
    m = dvae.build(tiny())
    x = dvae.on_levels(loop.dataset("shapes", 16, "test")[0][:4])
    nll = dvae.negative_elbo(m, x, seed=3)
    gen = core.random.Generator(3)
    with core.no_grad():
        xb = metrics.dequantize(core.tensor(x), 256, generator=gen)
        rec, kl = dvae.elbo_terms(m.eval(), xb, 1.0, hard=True, generator=gen)
    d = 3 * 16 * 16
    expect = (kl - rec).numpy() - d * math.log(0.4) - d * math.log(2 / 255)
    np.testing.assert_allclose(nll, expect, rtol=1e-6)


def test_checkpoint_round_trip_and_resume_equals_uninterrupted(tmp_path, monkeypatch):
    """τ and β are functions of the step: a run killed after its checkpoint at step 2 and resumed is bitwise the
    uninterrupted one."""
    whole, part = str(tmp_path / "whole.safetensors"), str(tmp_path / "part.safetensors")
    summary = dvae.train(tiny(steps=4), whole, progress=False)
    assert summary["loss"]["tau"] < 1 and summary["loss"]["beta"] > 0
    calls, loss = [], dvae.loss

    def interrupted(*args, **kw):  # killed during its third step, after the checkpoint of step 2
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return loss(*args, **kw)

    monkeypatch.setattr(dvae, "loss", interrupted)
    with pytest.raises(KeyboardInterrupt):
        dvae.train(tiny(steps=4), part, progress=False)
    monkeypatch.setattr(dvae, "loss", loss)
    assert dvae.train(tiny(steps=4), part, progress=False)["start"] == 2
    a, b = core.serialize.load(whole), core.serialize.load(part)
    assert sorted(a) == sorted(b)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    m, c = dvae.load(whole)
    assert c == tiny(steps=4) and not m.training
    x = loop.dataset("shapes", 16, "test")[0][:4]
    ref = dvae.build(c)
    ref.load_state_dict(loop.read_checkpoint(whole)["weights"])
    np.testing.assert_array_equal(m.encode(x), ref.encode(x))
    np.testing.assert_array_equal(m.decode(m.encode(x)), ref.decode(ref.encode(x)))


def test_cli_train_sample_eval_in_process(tmp_path, capsys):
    ckpt, png = str(tmp_path / "d.safetensors"), str(tmp_path / "recon.png")
    tiny_args = [f"--set={k}={v}" for k, v in TINY.items() if k not in ("steps", "batch_size")]
    assert cli.main(["train", "dvae", "--steps", "2", "--batch-size", "8", *tiny_args, "--out", ckpt, "--quiet"]) == 0
    assert "dvae on shapes: steps 0->2" in capsys.readouterr().out
    assert cli.main(["sample", "dvae", "--ckpt", ckpt, "--n", "6", "-o", png]) == 0
    assert "6 originals above their reconstructions" in capsys.readouterr().out
    m, c = dvae.load(ckpt)
    grid = dvae.sample(m, c, 6, seed=0)  # rows of 3: originals, theirs, originals, theirs
    rec = m.reconstruct(np.concatenate([grid[0:3], grid[6:9]]))  # one batch of the 6, as sample makes them
    np.testing.assert_array_equal(np.concatenate([grid[3:6], grid[9:12]]), rec)
    assert cli.main(["eval", "dvae", "--ckpt", ckpt, "--json"]) == 0
    figures = {f["name"]: f for f in json.loads(capsys.readouterr().out)["figures"]}
    assert {"reconstruction MSE", "codes in use", "test -ELBO (β=1)"} <= set(figures)
    relaxed = figures["reconstruction MSE, relaxed sample τ=0.0625"]
    assert set(relaxed["baselines"]) == {"argmax_codes", "relaxed_tau_start"}
    assert figures["test -ELBO (β=1)"]["baselines"]["independent_pixels"] > 0
    with pytest.raises(SystemExit, match="2"):
        cli.main(["sample", "dvae", "--ckpt", ckpt, "--label", "1", "-o", png])
    assert "--label do(es) not apply" in capsys.readouterr().err


@pytest.mark.slow
def test_bar_shapes(tmp_path):
    """The measured bar (the CLI's default config): reconstructions keep what the classifier reads (≥ 95% of
    its accuracy on the originals), > 25% of the codes in use, and a lower MSE than the pooled 8×8 grid."""
    cfg = registry.config(dvae)
    dvae.train(cfg, str(tmp_path / "dvae.safetensors"), progress=False)
    m, c = dvae.load(str(tmp_path / "dvae.safetensors"))
    figs = {f["name"]: f for f in dvae.evaluate(m, c)["figures"]}
    assert figs["classifier accuracy on reconstructions / on originals"]["value"] >= 0.95
    assert figs["codes in use"]["value"] > 0.25
    assert figs["reconstruction MSE"]["value"] < figs["reconstruction MSE"]["baselines"]["pooled_grid"]
