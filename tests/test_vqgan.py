"""VQ-GAN (models/vqgan.py): the adaptive weight λ (eq. 7) against a hand computation in PyTorch, the hinge
losses, the patch discriminator, the warm-up, training on a tiny batch, checkpoint round trip and resume,
the CLI; the measured bar (sharper than the VQ-VAE at the same code budget) under the `slow` marker."""

import json

import numpy as np
import pytest
import torch

import core
from core import F, nn
from models import cli, registry, vqgan, vqvae
from models import tokenizers as tok
from models import train as loop

TINY = dict(steps=4, batch_size=8, width=16, blocks=1, codebook_size=16, code_dim=4, checkpoint_every=2,
            restart_every=2, eval_images=64, disc_start=1, disc_width=4)
TINY_CLI = ["--steps", "3", "--batch-size", "8"] + [a for k, v in TINY.items() if k not in ("steps", "batch_size")
                                                    for a in ("--set", f"{k}={v}")]


def tiny(**kw):
    return registry.config(vqgan, **dict(TINY, **kw))


def test_adaptive_weight_equals_a_hand_computation():
    """λ = factor·||∇_W L_rec|| / (||∇_W L_GAN|| + δ) at the last layer's weight W, and every parameter's
    gradient = ∇(L_VQ + λ L_GAN) with λ constant, both as PyTorch computes them on the same weights."""
    rng = np.random.default_rng(0)
    h0, x, w = (rng.normal(size=(2, 3, 5, 5)), rng.normal(size=(2, 2, 5, 5)), rng.normal(size=(2, 2, 5, 5)))
    core.manual_seed(0)
    last = nn.Conv2d(3, 2, 3, 1, 1)
    last.weight.data = last.weight.data.astype(np.float64)
    last.bias.data = last.bias.data.astype(np.float64)
    h = nn.Parameter(core.tensor(h0))  # stands for everything upstream of the last layer
    out = last(h)
    l_vq = F.mse_loss(out, core.tensor(x)) + 0.1 * (h * h).mean()  # the second term never reaches W
    l_gan = -(out * core.tensor(w)).mean()
    lam = vqgan.adaptive_backward(l_vq, l_gan, last.weight, [h, last.weight, last.bias], delta=1e-6, factor=0.5)

    th = torch.tensor(h0, requires_grad=True)
    tW = torch.tensor(last.weight.numpy(), requires_grad=True)
    tb = torch.tensor(last.bias.numpy(), requires_grad=True)
    tout = torch.nn.functional.conv2d(th, tW, tb, padding=1)
    t_rec = torch.nn.functional.mse_loss(tout, torch.tensor(x))
    t_gan = -(tout * torch.tensor(w)).mean()
    g_rec, = torch.autograd.grad(t_rec, tW, retain_graph=True)
    g_gan, = torch.autograd.grad(t_gan, tW, retain_graph=True)
    want = 0.5 * (g_rec.norm() / (g_gan.norm() + 1e-6)).item()
    assert lam == pytest.approx(want, rel=1e-10)
    (t_rec + 0.1 * (th * th).mean() + want * t_gan).backward()
    for p, t in ((h, th), (last.weight, tW), (last.bias, tb)):
        np.testing.assert_allclose(p.grad, t.grad.numpy(), rtol=1e-10, atol=1e-13)
    with pytest.raises(ValueError, match="cleared first"):
        vqgan.adaptive_backward(l_vq, l_gan, last.weight, [h])


def test_hinge_losses():
    real, fake = core.tensor([[2.0, 0.5, -1.0]]), core.tensor([[-3.0, 0.0, 0.5]])
    # D: ½(mean(max(0, 1 − real)) + mean(max(0, 1 + fake))) = ½((0 + 0.5 + 2)/3 + (0 + 1 + 1.5)/3)
    assert vqgan.d_hinge(real, fake).item() == pytest.approx(0.5 * (2.5 / 3 + 2.5 / 3))
    assert vqgan.g_hinge(fake).item() == pytest.approx(2.5 / 3)
    assert vqgan.d_hinge(core.tensor([1.5]), core.tensor([-1.2])).item() == 0  # both beyond the margin


@pytest.mark.parametrize("layers,grid", [(1, 14), (2, 6)])
def test_patch_discriminator_gives_a_grid_of_logits(layers, grid):
    core.manual_seed(0)
    D = vqgan.Discriminator(3, 4, layers)
    assert D(core.randn(2, 3, 32, 32)).shape == (2, 1, grid, grid)


def test_warm_up_then_the_discriminator_and_the_loss_falls_on_a_tiny_batch(tmp_path, monkeypatch):
    """Before disc_start the discriminator is untouched; after it D trains and λ > 0; on one batch of 8
    images the reconstruction error falls."""
    out = str(tmp_path / "g.safetensors")
    x8 = tok.held_out(tiny(), 8)[0]
    monkeypatch.setattr(loop, "dataset", lambda data, resolution, split: (x8, np.zeros(8, np.int64)))
    cfg = tiny(steps=30, disc_start=20, checkpoint_every=20, lr=3e-3)
    core.manual_seed(cfg.seed)
    d0 = {k: v.numpy().copy() for k, v in vqgan.build(cfg).discriminator.state_dict().items()}
    batch = loop.Stream.batch

    def stop_at_20(self, step):  # stop the run after its checkpoint of step 20, the last warm-up step
        if step == 20:
            raise KeyboardInterrupt
        return batch(self, step)

    monkeypatch.setattr(loop.Stream, "batch", stop_at_20)
    with pytest.raises(KeyboardInterrupt):
        vqgan.train(cfg, out, progress=False)
    m, _ = vqgan.load(out)
    for k, v in m.discriminator.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), d0[k], err_msg=k)
    monkeypatch.setattr(loop.Stream, "batch", batch)
    vqgan.train(cfg, out, progress=False)
    m, _ = vqgan.load(out)
    assert any(not np.array_equal(v.numpy(), d0[k]) for k, v in m.discriminator.state_dict().items())
    h = loop.read_checkpoint(out)["history"]
    assert len(h["lam"]) == len(h["d"]) == 10 and min(h["lam"]) > 0  # steps 21..30
    assert np.mean(h["mse"][-5:]) < 0.7 * np.mean(h["mse"][:5])


def test_checkpoint_round_trip_and_resume_equals_uninterrupted(tmp_path, monkeypatch):
    a, b = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    r = vqgan.train(tiny(), a, progress=False)
    assert {"lam", "d", "g", "mse", "perplexity"} <= set(r["loss"])
    batch = loop.Stream.batch

    def interrupted(self, step):  # killed during its third step, after the checkpoint of step 2
        if step == 2:
            raise KeyboardInterrupt
        return batch(self, step)

    monkeypatch.setattr(loop.Stream, "batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        vqgan.train(tiny(), b, progress=False)
    monkeypatch.setattr(loop.Stream, "batch", batch)
    assert vqgan.train(tiny(), b, progress=False)["start"] == 2
    sa, sb = core.serialize.load(a), core.serialize.load(b)
    assert sorted(sa) == sorted(sb)
    for k in sa:  # autoencoder, discriminator (BatchNorm statistics too), both optimizers: bitwise
        np.testing.assert_array_equal(sa[k], sb[k], err_msg=k)
    (m, c) = vqgan.load(a)
    assert c == tiny() and isinstance(m, vqvae.VQVAE)
    x = tok.held_out(c, 3)[0]
    assert m.encode(x).shape == (3, 8, 8) and m.decode(m.encode(x)).shape == (3, 3, 32, 32)


def test_cli_train_sample_eval_in_process(tmp_path, capsys):
    ckpt, png = str(tmp_path / "g.safetensors"), str(tmp_path / "recon.png")
    assert cli.main(["train", "vqgan", "--data", "shapes", *TINY_CLI, "--out", ckpt, "--quiet"]) == 0
    assert cli.main(["sample", "vqgan", "--ckpt", ckpt, "--n", "4", "-o", png]) == 0
    capsys.readouterr()
    assert cli.main(["eval", "vqgan", "--ckpt", ckpt, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == 64 and "FD-classifier (reconstructions vs test)" in [f["name"] for f in
                                                                                   result["figures"]]
    with pytest.raises(SystemExit) as e:
        cli.main(["sample", "vqgan", "--ckpt", ckpt, "--label", "1", "-o", png])
    assert e.value.code == 2


@pytest.mark.slow
def test_bar_shapes_sharper_than_vqvae_at_the_same_code_budget(tmp_path):
    """The measured bar (default configs = the CLI runs): the VQ-GAN keeps ≥ 95% of the classifier's
    accuracy, uses > 25% of its codes, and its reconstructions have a lower FD-classifier than the
    VQ-VAE's with the same codebook and grid."""
    a, b = str(tmp_path / "vqvae.safetensors"), str(tmp_path / "vqgan.safetensors")
    vqvae.train(registry.config(vqvae), a, progress=False)
    vqgan.train(registry.config(vqgan), b, progress=False)
    figs = vqgan.versus(a, b, str(tmp_path / "versus.png"))
    g, v = figs["vqgan"], figs["vqvae"]
    assert g["classifier accuracy on reconstructions / on originals"]["value"] >= 0.95
    assert g["codes in use"]["value"] > 0.25
    fd = "FD-classifier (reconstructions vs test)"
    assert g[fd]["value"] < v[fd]["value"]
