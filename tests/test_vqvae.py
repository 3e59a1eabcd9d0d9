"""VQ-VAE (models/vqvae.py): nearest-code quantization, the straight-through gradient, where the codebook
and commitment losses send their gradients (and equality with PyTorch), the EMA update and dead-code
restarts, loss falls on a tiny batch, encode/decode, checkpoint round trip and resume, the CLI; the
measured bar under the `slow` marker."""

import json

import numpy as np
import pytest
import torch

import core
from models import cli, registry, vqvae
from models import tokenizers as tok
from models import train as loop
from models.registry import UsageError

TINY = dict(steps=4, batch_size=8, width=16, blocks=1, codebook_size=16, code_dim=4, checkpoint_every=2,
            restart_every=2, eval_images=64)
TINY_CLI = ["--steps", "3", "--batch-size", "8"] + [a for k, v in TINY.items() if k not in ("steps", "batch_size")
                                                    for a in ("--set", f"{k}={v}")]


def tiny(**kw):
    return registry.config(vqvae, **dict(TINY, **kw))


def quantizer(ema=False, K=6, D=3, seed=0):
    core.manual_seed(seed)
    q = vqvae.Quantizer(K, D, ema=ema)
    q.embedding.weight.data[...] = np.random.default_rng(seed).normal(size=(K, D)).astype(np.float32)
    if ema:
        q.embed_sum.data[...] = q.embedding.weight.data
    return q


def test_nearest_code_is_the_brute_force_argmin():
    q = quantizer(K=37, D=5)
    z = np.random.default_rng(1).normal(size=(200, 5)).astype(np.float32)
    brute = np.linalg.norm(z[:, None, :] - q.embedding.weight.numpy()[None], axis=2).argmin(1)  # eq. 2
    np.testing.assert_array_equal(q.nearest(core.tensor(z)), brute)


def test_straight_through_gradient_is_the_identity_and_z_q_is_the_code():
    q = quantizer()
    z_e = core.tensor(np.random.default_rng(2).normal(size=(2, 3, 4, 5)).astype(np.float32), requires_grad=True)
    z_q, codes, _, _ = q(z_e)
    e = q.embedding.weight.numpy()
    np.testing.assert_array_equal(codes, q.nearest(z_e.permute(0, 2, 3, 1).reshape(-1, 3)).reshape(2, 4, 5))
    np.testing.assert_allclose(z_q.numpy(), e[codes].transpose(0, 3, 1, 2), rtol=1e-6, atol=1e-6)
    g = np.random.default_rng(3).normal(size=z_q.shape).astype(np.float32)
    z_q.backward(core.tensor(g))
    np.testing.assert_array_equal(z_e.grad, g)  # the gradient reaching z_e is the gradient at z_q, unchanged
    assert q.embedding.weight.grad is None  # the straight-through path does not train the codebook


def test_codebook_loss_moves_only_the_codes_and_commitment_only_the_encoder():
    q = quantizer()
    z = np.random.default_rng(4).normal(size=(2, 3, 2, 2)).astype(np.float32)
    flat = z.transpose(0, 2, 3, 1).reshape(-1, 3)
    k = q.nearest(core.tensor(flat))
    e = q.embedding.weight.numpy().copy()
    z_e = core.tensor(z, requires_grad=True)
    _, _, codebook, commitment = q(z_e)
    codebook.backward()
    assert z_e.grad is None  # sg[z_e]: nothing reaches the encoder
    want = np.zeros_like(e)
    np.add.at(want, k, 2 * (e[k] - flat) / flat.size)  # d/de_k of mean ||sg[z_e] − e_k||²
    np.testing.assert_allclose(q.embedding.weight.grad, want, rtol=1e-5, atol=1e-7)
    q.embedding.weight.grad = None
    z_e = core.tensor(z, requires_grad=True)
    _, _, codebook, commitment = q(z_e)
    commitment.backward()
    assert q.embedding.weight.grad is None  # sg[e]: nothing reaches the codebook
    np.testing.assert_allclose(z_e.grad.transpose(0, 2, 3, 1).reshape(-1, 3), 2 * (flat - e[k]) / flat.size,
                               rtol=1e-5, atol=1e-7)


def test_quantizer_equals_pytorch_on_the_same_codebook():
    """Forward and gradients of z_q·g + ||sg[z_e] − e||² + β||z_e − sg[e]||² against PyTorch, float64."""
    q = quantizer(K=9, D=4)
    q.embedding.weight.data = q.embedding.weight.data.astype(np.float64)
    rng = np.random.default_rng(5)
    z, g = rng.normal(size=(3, 4, 3, 3)), rng.normal(size=(3, 4, 3, 3))
    z_e = core.tensor(z, requires_grad=True)
    z_q, _, cb, cm = q(z_e)
    ((z_q * core.tensor(g)).sum() + cb + 0.25 * cm).backward()

    tz = torch.tensor(z, requires_grad=True)
    te = torch.tensor(q.embedding.weight.numpy(), requires_grad=True)
    tf = tz.permute(0, 2, 3, 1).reshape(-1, 4)
    ek = te[torch.cdist(tf, te).argmin(1)]
    tq = (tf + (ek - tf).detach()).reshape(3, 3, 3, 4).permute(0, 3, 1, 2)
    tl = (tq * torch.tensor(g)).sum() + torch.nn.functional.mse_loss(ek, tf.detach()) \
        + 0.25 * torch.nn.functional.mse_loss(tf, ek.detach())
    tl.backward()
    np.testing.assert_allclose(z_q.numpy(), tq.detach().numpy(), rtol=1e-12)
    np.testing.assert_allclose(z_e.grad, tz.grad.numpy(), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(q.embedding.weight.grad, te.grad.numpy(), rtol=1e-10, atol=1e-12)


def test_ema_update_is_eqs_6_to_8_with_laplace_smoothing():
    q = quantizer(ema=True, K=4, D=2)
    q.decay, q.eps = 0.9, 0.01
    N0 = np.array([1.0, 0.5, 0.0, 2.0], np.float32)
    q.cluster_size.data[...] = N0
    m0 = q.embed_sum.numpy().copy()
    z = np.array([[1, 2], [3, 4], [5, 6], [7, 8], [9, 10]], np.float32)
    idx = np.array([0, 0, 3, 1, 0])
    q.update(z, idx)
    n = np.array([3, 1, 0, 1], np.float32)
    sums = np.array([[13, 16], [7, 8], [0, 0], [5, 6]], np.float32)
    N = 0.9 * N0 + 0.1 * n  # eq. 6
    m = 0.9 * m0 + 0.1 * sums  # eq. 7
    Ns = (N + 0.01) / (N.sum() + 4 * 0.01) * N.sum()
    np.testing.assert_allclose(q.cluster_size.numpy(), N, rtol=1e-6)
    np.testing.assert_allclose(q.embed_sum.numpy(), m, rtol=1e-6)
    np.testing.assert_allclose(q.embedding.weight.numpy(), m / Ns[:, None], rtol=1e-5)  # eq. 8
    np.testing.assert_array_equal(q.hits.numpy(), n)
    assert not q.embedding.weight.requires_grad


def test_ema_update_leaves_an_unused_code_where_it_is():
    """With n_i = 0, eqs. 6–7 scale N_i and m_i by the same γ, so e_i = m_i / N_i (eq. 8) stays put: a fresh EMA
    quantizer's state must agree with its codebook, and its first update must not move the codes nothing chose."""
    core.manual_seed(0)
    q = vqvae.Quantizer(8, 2, ema=True)
    e0 = q.embedding.weight.numpy().copy()
    np.testing.assert_allclose(q.embed_sum.numpy() / q.cluster_size.numpy()[:, None], e0, rtol=1e-6)  # eq. 8
    z = np.random.default_rng(0).normal(size=(32, 2)).astype(np.float32)
    idx = np.zeros(32, np.int64)  # every output chose code 0
    q.update(z, idx)
    np.testing.assert_allclose(q.embedding.weight.numpy()[1:], e0[1:], rtol=1e-4)  # up to Laplace smoothing's shift


def test_dead_code_restart_fires_on_schedule_and_revives_unused_codes():
    q = quantizer(ema=True, K=5, D=3)
    z = np.random.default_rng(6).normal(size=(2, 3, 2, 2)).astype(np.float32)
    flat = z.transpose(0, 2, 3, 1).reshape(-1, 3)
    q.hits.data[...] = [4, 0, 1, 0, 0]
    before = q.embedding.weight.numpy().copy()
    model = type("M", (), {"quantizer": q})()
    assert vqvae.restart_dead_codes(model, core.tensor(z), step=3, every=2) == 0  # not a restart step
    assert vqvae.restart_dead_codes(model, core.tensor(z), step=4, every=2) == 3
    w = q.embedding.weight.numpy()
    np.testing.assert_array_equal(w[[0, 2]], before[[0, 2]])  # used codes stay
    for i in (1, 3, 4):  # dead codes are now encoder outputs of the batch
        assert np.abs(flat - w[i]).sum(1).min() == 0
        np.testing.assert_array_equal(q.embed_sum.numpy()[i], w[i])
    np.testing.assert_array_equal(q.hits.numpy(), 0)
    assert vqvae.restart_dead_codes(model, core.tensor(z), step=4, every=0) == 0  # 0: never


@pytest.mark.parametrize("ema", [True, False])
def test_loss_falls_on_a_tiny_batch(ema):
    cfg = tiny(ema=ema)
    core.manual_seed(0)
    m = vqvae.build(cfg)
    x = core.tensor(tok.held_out(cfg, 8)[0])
    opt = core.optim.Adam([p for p in m.parameters() if p.requires_grad], lr=3e-3)
    losses = []
    for _ in range(25):
        total, *_ = vqvae.loss(m, x, 0.25)
        opt.zero_grad()
        total.backward()
        opt.step()
        losses.append(total.item())
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:5])


def test_encode_decode_shapes_round_trip_and_checks():
    cfg = tiny()
    m = vqvae.build(cfg).eval()
    x = tok.held_out(cfg, 5)[0]
    t = m.encode(x)
    assert t.shape == (5, 8, 8) and t.dtype == np.int64 and t.max() < 16 and m.grid == (8, 8)
    rec = m.decode(t)
    assert rec.shape == (5, 3, 32, 32) and rec.min() >= -1 and rec.max() <= 1
    with core.no_grad():  # the tokens' path equals the training forward pass (z_q) in eval mode
        np.testing.assert_allclose(rec, np.clip(m(core.tensor(x))[0].numpy(), -1, 1), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="resolution 30 is not divisible"):
        tiny(resolution=30)


def test_checkpoint_round_trip_and_resume_equals_uninterrupted(tmp_path, monkeypatch):
    a, b = str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")
    r = vqvae.train(tiny(), a, progress=False)
    assert set(r["loss"]) >= {"mse", "commit", "perplexity", "restarted"}
    batch = loop.Stream.batch

    def interrupted(self, step):  # the run is killed during its third step, after the checkpoint of step 2
        if step == 2:
            raise KeyboardInterrupt
        return batch(self, step)

    monkeypatch.setattr(loop.Stream, "batch", interrupted)
    with pytest.raises(KeyboardInterrupt):
        vqvae.train(tiny(), b, progress=False)
    monkeypatch.setattr(loop.Stream, "batch", batch)
    assert vqvae.train(tiny(), b, progress=False)["start"] == 2  # after the restart of step 2
    (ma, ca), (mb, cb) = vqvae.load(a), vqvae.load(b)
    assert ca == cb == tiny()
    sa, sb = core.serialize.load(a), core.serialize.load(b)
    assert sorted(sa) == sorted(sb)
    for k in sa:  # weights, codebook buffers, optimizer and schedule: bitwise
        np.testing.assert_array_equal(sa[k], sb[k], err_msg=k)
    x = tok.held_out(ca, 4)[0]
    np.testing.assert_array_equal(ma.encode(x), mb.encode(x))


def test_cli_train_sample_eval_in_process(tmp_path, capsys):
    ckpt, png = str(tmp_path / "v.safetensors"), str(tmp_path / "recon.png")
    assert cli.main(["train", "vqvae", "--data", "shapes", *TINY_CLI, "--out", ckpt, "--quiet"]) == 0
    assert cli.main(["sample", "vqvae", "--ckpt", ckpt, "--n", "6", "-o", png]) == 0
    capsys.readouterr()
    assert cli.main(["eval", "vqvae", "--ckpt", ckpt, "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    names = [f["name"] for f in result["figures"]]
    assert names[:2] == ["reconstruction MSE", "reconstruction PSNR"] and "codes in use" in names
    assert "classifier accuracy on reconstructions / on originals" in names and result["images"] == 64
    m, cfg = vqvae.load(ckpt)
    with pytest.raises(UsageError, match="--label"):
        vqvae.sample(m, cfg, 4, label=1)
    with pytest.raises(SystemExit) as e:
        cli.main(["sample", "vqvae", "--ckpt", ckpt, "--guidance", "2", "-o", png])
    assert e.value.code == 2


@pytest.mark.slow
def test_bar_shapes(tmp_path):
    """The measured bar (default config = the CLI run): classifier accuracy on reconstructions ≥ 95% of
    that on the originals, > 25% of the codes in use, and better than the pooled-grid baseline."""
    out = str(tmp_path / "vqvae.safetensors")
    vqvae.train(registry.config(vqvae), out, progress=False)
    m, cfg = vqvae.load(out)
    figs = {f["name"]: f for f in vqvae.evaluate(m, cfg)["figures"]}
    assert figs["classifier accuracy on reconstructions / on originals"]["value"] >= 0.95
    assert figs["codes in use"]["value"] > 0.25
    mse = figs["reconstruction MSE"]
    assert mse["value"] < mse["baselines"]["pooled_grid"]
