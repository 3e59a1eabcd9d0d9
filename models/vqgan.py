"""VQ-GAN: the VQ-VAE trained with an adversarial loss as well, so that the decoder draws sharp images
from the same codes instead of the blurred mean that a squared error alone rewards (Esser et al. 2021,
"Taming Transformers for High-Resolution Image Synthesis", §3.1).

The autoencoder, its quantizer and its loss are the VQ-VAE's (models/vqvae.py, imported, not copied):

    L_VQ = ||x − x̂||² + ||sg[E(x)] − z_q||² + β ||sg[z_q] − E(x)||²            (Esser et al. 2021, eq. 4)

(β = 0.25 on the commitment term, as in the VQ-VAE and the authors' code; with the EMA codebook the
middle term is replaced by the running-mean update.)

A patch discriminator D (the PatchGAN of Isola et al. 2017: a small convolutional net whose output is
a grid of logits, one per overlapping image patch) plays against it:

    L_GAN = log D(x) + log(1 − D(x̂))                                            (eq. 5)
    Q* = argmin_{E,G,Z} max_D E_x[L_VQ + λ L_GAN]                               (eq. 6)

in its hinge form (as the authors' code; Lim & Ye 2017): D minimizes E[max(0, 1 − D(x))] +
E[max(0, 1 + D(x̂))] (averaged over the patches, halved), the decoder minimizes −E[D(x̂)].
λ balances the two gradients where they meet, at the decoder's last layer G_L:

    λ = ||∇_{G_L} L_rec|| / (||∇_{G_L} L_GAN|| + δ),  δ = 1e-6                   (eq. 7)

computed here with the engine from both losses' gradients w.r.t. that layer's weight (λ held constant
in the update, and clipped at 1e4, as in the authors' code). The discriminator is switched on after
`disc_start` warm-up steps, once the reconstructions are good enough to be worth sharpening. A
perceptual loss is not used: its feature network would have to be trained here, and the only one
(the shapes classifier) is the judge of the figures.

    python -m models.cli train vqgan --data shapes --out vqgan.safetensors
"""

from __future__ import annotations

import dataclasses

import numpy as np

import core
from core import nn
from models import tokenizers as tok
from models import train as loop
from models import vqvae

DATA = tok.DATA


@dataclasses.dataclass
class Config(vqvae.Config):
    """The VQ-VAE's fields and defaults (the same code budget: K codes on an 8×8 grid) and the
    discriminator's. Defaults: the measured bar run on 32×32 shapes (see README)."""

    disc_start: int = 1250  # warm-up steps before the discriminator and L_GAN are switched on
    disc_width: int = 16  # channels of D's first layer (doubling per layer)
    disc_layers: int = 1  # stride-2 layers of D: 1 gives 14×14 logits, each seeing a 16×16 patch of a 32×32 image
    disc_weight: float = 0.5  # a constant factor on λ (the authors' code's disc_weight)
    disc_lr: float = 2e-4
    delta: float = 1e-6  # δ of eq. 7


class Discriminator(nn.Module):
    """PatchGAN (Isola et al. 2017; the authors' NLayerDiscriminator): 4×4 convolutions, the first
    `layers` with stride 2, BatchNorm and LeakyReLU(0.2) between them, one logit per patch."""

    def __init__(self, channels, width=32, layers=1):
        super().__init__()
        net, w = [nn.Conv2d(channels, width, 4, 2, 1), nn.LeakyReLU(0.2)], width
        for i in range(1, layers + 1):
            stride = 2 if i < layers else 1
            net += [nn.Conv2d(w, 2 * w, 4, stride, 1, bias=False), nn.BatchNorm2d(2 * w), nn.LeakyReLU(0.2)]
            w *= 2
        self.net = nn.Sequential(*net, nn.Conv2d(w, 1, 4, 1, 1))

    def forward(self, x):
        return self.net(x)


class VQGAN(vqvae.VQVAE):
    """The VQ-VAE (encoder, quantizer, decoder: the tokenizer interface) plus its discriminator."""

    def __init__(self, cfg, channels):
        super().__init__(cfg, channels)
        self.discriminator = Discriminator(channels, cfg.disc_width, cfg.disc_layers)


def build(cfg):
    """The (untrained) VQ-GAN of a config."""
    return VQGAN(cfg, tok.CHANNELS[cfg.data])


# --- losses ---------------------------------------------------------------------------------------


def d_hinge(real_logits, fake_logits):
    """The discriminator's hinge loss ½(E[max(0, 1 − D(x))] + E[max(0, 1 + D(x̂))]) over the patches."""
    return 0.5 * ((1 - real_logits).relu().mean() + (1 + fake_logits).relu().mean())


def g_hinge(fake_logits):
    """The generator's (decoder's) adversarial loss −E[D(x̂)] over the patches."""
    return -fake_logits.mean()


def adaptive_backward(l_vq, l_gan, last, params, *, delta=1e-6, factor=1.0, max_weight=1e4):
    """Accumulate into the .grad of `params` (which must start empty) the gradient of L_VQ + λ·L_GAN, with

        λ = factor · ||∇_{G_L} L_rec|| / (||∇_{G_L} L_GAN|| + δ)               (Esser et al. 2021, eq. 7)

    where G_L is `last` (the decoder's last layer's weight) and λ is held constant (no gradient flows
    through it). Two backward passes over one graph: L_VQ's, whose gradient at G_L is L_rec's (the
    codebook terms never reach the decoder), then L_GAN's. Returns λ.
    """
    if any(p.grad is not None for p in params):
        raise ValueError("adaptive_backward: the parameters' gradients must be cleared first (zero_grad)")
    l_vq.backward(retain_graph=True)
    g_rec = last.grad.copy()
    kept = [p.grad for p in params]
    for p in params:
        p.grad = None
    l_gan.backward()
    g_gan = last.grad
    lam = factor * min(float(np.linalg.norm(g_rec) / (np.linalg.norm(g_gan) + delta)), max_weight)  # eq. 7
    for p, g in zip(params, kept):
        if p.grad is not None:
            p.grad = lam * p.grad if g is None else g + lam * p.grad  # ∇(L_VQ + λ L_GAN), eq. 6
        else:
            p.grad = g
    return lam


# --- training -------------------------------------------------------------------------------------


def train(cfg, out, *, resume=True, progress=True):
    """The VQ-VAE's steps (eq. 4) alone for `disc_start` steps; after that, each step updates the
    autoencoder on L_VQ + λ L_GAN (eqs. 6-7), then D on the hinge loss (eq. 5's hinge form)."""
    x, y = loop.dataset(cfg.data, cfg.resolution, "train")
    core.manual_seed(cfg.seed)
    model = build(cfg)
    D = model.discriminator
    ae = [p for n, p in model.named_parameters() if p.requires_grad and not n.startswith("discriminator.")]
    opt = loop.Group(g=core.optim.Adam(ae, lr=cfg.lr),
                     d=core.optim.Adam(D.parameters(), lr=cfg.disc_lr, betas=(0.5, 0.9)))
    sched = core.optim.WarmupCosine(opt["g"], warmup_steps=cfg.steps // 50, total_steps=cfg.steps)
    last = model.decoder.out.weight  # G_L of eq. 7

    def step(xb, yb):
        real = core.tensor(xb)
        l_vq, terms, rec, codes, z_e = vqvae.loss(model, real, cfg.beta)  # eq. 4
        opt["g"].zero_grad()
        gan_on = sched.last_epoch >= cfg.disc_start
        if gan_on:
            l_g = g_hinge(D(rec))
            lam = adaptive_backward(l_vq, l_g, last, ae, delta=cfg.delta, factor=cfg.disc_weight)
            terms.update(g=l_g.item(), lam=lam)
        else:
            l_vq.backward()
        opt["g"].step()
        sched.step()
        restarted = vqvae.restart_dead_codes(model, z_e, sched.last_epoch, cfg.restart_every)
        if gan_on:  # D learns to tell x from x̂ (hinge form of eq. 5)
            l_d = d_hinge(D(real), D(rec.detach()))
            opt["d"].zero_grad()
            l_d.backward()
            opt["d"].step()
            terms["d"] = l_d.item()
        return dict(terms, loss=l_vq.item(), perplexity=vqvae.perplexity(codes, cfg.codebook_size),
                    restarted=restarted)

    return loop.fit(cfg, out, model=model, optimizer=opt, step=step, data=(x, y), scheduler=sched, resume=resume,
                    progress=progress, name="vqgan")


def load(path):
    """(model, cfg) from a checkpoint written by `train`, in eval mode."""
    return loop.load_model(path, Config, build)


# --- sampling and evaluation ----------------------------------------------------------------------


def sample(model, cfg, n, *, seed=0, nrow=None, **options):
    """n held-out test images and their reconstructions, a row of originals above each row of
    reconstructions (`models.tokenizers.sample`); a tokenizer takes no sampling options."""
    return tok.sample(model, cfg, n, seed=seed, nrow=nrow, **options)


def evaluate(model, cfg, *, seed=0):
    """The VQ-VAE's figures (`models.tokenizers.reconstruction_figures`) on the held-out test split."""
    return tok.reconstruction_figures(model, cfg, seed=seed, n=cfg.eval_images)


def versus(vqvae_path, vqgan_path, png, n=8, seed=0, scale=4):
    """Write `png`: rows of n held-out originals, their VQ-VAE and their VQ-GAN reconstructions, each
    pixel enlarged `scale` times (the picture of "sharper at the same code budget"); return the two
    evaluations' figures by name."""
    a, ca = vqvae.load(vqvae_path)
    b, cb = load(vqgan_path)
    if (ca.codebook_size, a.grid) != (cb.codebook_size, b.grid):
        raise ValueError(f"versus: the code budgets differ: {ca.codebook_size} codes on {a.grid} vs "
                         f"{cb.codebook_size} on {b.grid}")
    x, _ = loop.dataset(ca.data, ca.resolution, "test")
    x = x[np.random.default_rng(seed).choice(len(x), n, replace=False)]
    loop.save_grid(np.concatenate([x, a.reconstruct(x), b.reconstruct(x)]), png, nrow=n, scale=scale)
    by_name = lambda r: {f["name"]: f for f in r["figures"]}  # noqa: E731
    return {"vqvae": by_name(vqvae.evaluate(a, ca)), "vqgan": by_name(evaluate(b, cb))}

