"""VQ-VAE: an autoencoder whose latent is a grid of discrete codes, each the nearest of K learned
vectors (van den Oord et al. 2017, "Neural Discrete Representation Learning").

The encoder maps an image x to a grid of vectors z_e(x) (h × w × D); each vector is replaced by its
nearest codebook entry e_k (k = one of K codes), and the decoder reconstructs x from that grid z_q(x):

    q(z = k | x) = 1 if k = argmin_j ||z_e(x) − e_j||₂, else 0                    (van den Oord et al. 2017, eq. 1)
    z_q(x) = e_k,  k = argmin_j ||z_e(x) − e_j||₂                                 (eq. 2)

The argmin has no gradient: the decoder's gradient at z_q is copied to z_e unchanged (the straight-
through estimator, §3.1), written z_q = z_e + sg[z_q − z_e]. The codebook learns from a term of its own
and the encoder is kept committed to its codes:

    L = −log p(x | z_q(x)) + ||sg[z_e(x)] − e||² + β ||z_e(x) − sg[e]||²,  β = 0.25     (eq. 3)

with a Gaussian decoder, so −log p(x|z_q) is the squared error (here its mean over pixels, and the two
codebook terms are means over the code vectors' entries).

- EMA codebook (App. A.1, eqs. 6–8): instead of the codebook loss, each code moves to the running
  mean of the encoder outputs assigned to it, N_i ← γN_i + (1−γ)n_i, m_i ← γm_i + (1−γ)Σ_j z_{i,j},
  e_i = m_i / N_i, with γ = 0.99 and the counts Laplace-smoothed (as in Sonnet's VectorQuantizerEMA)
  so that an unused code never divides by zero.
- Dead-code restarts (Dhariwal et al. 2020, Jukebox §3.4 "random restarts"): every `restart_every`
  steps the codes no encoder output chose since the last check are re-initialized to random encoder
  outputs of the current batch, so the codebook does not collapse onto a few codes.
- Codebook usage: the perplexity exp(H(code frequencies)) of each batch is tracked in training.

Shared with the dVAE and VQ-GAN: the networks, the tokenizer interface and the evaluation
(models/tokenizers.py).

    python -m models.cli train vqvae --data shapes --out vqvae.safetensors
"""

from __future__ import annotations

import dataclasses

import numpy as np

import core
from core import F, init, nn
from models import tokenizers as tok
from models import train as loop

DATA = tok.DATA


@dataclasses.dataclass
class Config:
    """Defaults: the measured bar run on 32×32 shapes → an 8×8 grid of codes (see README)."""

    data: str = "shapes"
    resolution: int = 32
    steps: int = 2000
    batch_size: int = 32
    lr: float = 1e-3
    seed: int = 0
    downs: int = 2  # stride-2 layers: 32×32 → 8×8 codes
    width: int = 64  # channels at the code grid (halving per doubling of the resolution)
    blocks: int = 2  # residual blocks in the encoder and in the decoder
    codebook_size: int = 512  # K
    code_dim: int = 64  # D
    beta: float = 0.25  # commitment weight (van den Oord et al. 2017, §3.2)
    ema: bool = True  # EMA codebook (App. A.1) instead of the codebook loss
    decay: float = 0.99  # γ of the EMA
    eps: float = 1e-5  # Laplace smoothing of the EMA counts
    restart_every: int = 100  # steps between dead-code restarts (0: never)
    checkpoint_every: int = 500
    eval_images: int = 1024  # held-out test images in evaluate (all of the split)

    def __post_init__(self):
        if self.resolution % 2 ** self.downs:
            raise ValueError(f"vqvae.Config: resolution {self.resolution} is not divisible by 2**downs = "
                             f"{2 ** self.downs}")
        if self.codebook_size < 2 or self.code_dim < 1:
            raise ValueError(f"vqvae.Config: codebook_size must be >= 2 and code_dim >= 1, got "
                             f"{self.codebook_size}, {self.code_dim}")
        if not 0 <= self.decay < 1:
            raise ValueError(f"vqvae.Config: decay must be in [0, 1), got {self.decay}")


# --- quantization ---------------------------------------------------------------------------------


class Quantizer(nn.Module):
    """The codebook e (K, D) and the nearest-code lookup, with the EMA update and the dead-code restarts."""

    def __init__(self, codebook_size, code_dim, *, ema=True, decay=0.99, eps=1e-5):
        super().__init__()
        self.embedding = nn.Embedding(codebook_size, code_dim)
        init.uniform_(self.embedding.weight, -1 / codebook_size, 1 / codebook_size)
        self.ema, self.decay, self.eps = ema, decay, eps
        if ema:  # the codebook moves by the running means below, not by gradients
            self.embedding.weight.requires_grad = False
            # N_i = 1, m_i = e_i: the state e_i = m_i / N_i of eq. 8 (as a restart sets it); with N_i = 0 the first
            # update would throw every unused code to γ e_i / ε ≈ 10⁵ e_i, out of reach of the encoder
            self.register_buffer("cluster_size", core.ones(codebook_size))  # N_i
            self.register_buffer("embed_sum", core.tensor(self.embedding.weight.numpy().copy()))  # m_i
        self.register_buffer("hits", core.zeros(codebook_size))  # uses since the last restart check
        self.codebook_size = codebook_size

    def nearest(self, flat):
        """k = argmin_j ||z − e_j||² for each row z of flat (M, D) (eq. 2), via ||z||² − 2 z·e_j + ||e_j||²."""
        z, e = flat.data, self.embedding.weight.data
        d = (z * z).sum(1, keepdims=True) - 2 * z @ e.T + (e * e).sum(1)
        return d.argmin(1).astype(np.int64)

    def forward(self, z_e):
        """z_e (N, D, h, w) → (z_q with the straight-through gradient, codes (N, h, w) int64 ndarray,
        codebook loss ||sg[z_e] − e||², commitment loss ||z_e − sg[e]||²) (eq. 3's terms)."""
        n, d, h, w = z_e.shape
        if d != self.embedding.embedding_dim:
            raise ValueError(f"Quantizer: z_e must have {self.embedding.embedding_dim} channels, got shape {z_e.shape}")
        flat = z_e.permute(0, 2, 3, 1).reshape(-1, d)
        idx = self.nearest(flat)
        e = self.embedding(core.tensor(idx))  # z_q = e_k (eq. 2), (M, D)
        codebook = F.mse_loss(e, flat.detach())  # ||sg[z_e] − e||² (eq. 3): moves the codes
        commitment = F.mse_loss(flat, e.detach())  # ||z_e − sg[e]||² (eq. 3): moves the encoder
        z_q = flat + (e - flat).detach()  # straight-through: z_q = z_e + sg[z_q − z_e] (§3.1)
        if self.training:
            self.update(flat.data, idx)
        return z_q.reshape(n, h, w, d).permute(0, 3, 1, 2), idx.reshape(n, h, w), codebook, commitment

    def update(self, z, idx):
        """The EMA codebook step (App. A.1, eqs. 6–8) and the usage count, for encoder outputs z (M, D)
        assigned to codes idx (M,)."""
        counts = np.bincount(idx, minlength=self.codebook_size).astype(np.float32)
        self.hits.data += counts
        if not self.ema:
            return
        g, K = self.decay, self.codebook_size
        sums = np.zeros_like(self.embed_sum.data)
        np.add.at(sums, idx, z)  # Σ_j z_{i,j}: the outputs assigned to code i
        self.cluster_size.data[...] = g * self.cluster_size.data + (1 - g) * counts  # eq. 6
        self.embed_sum.data[...] = g * self.embed_sum.data + (1 - g) * sums  # eq. 7
        total = self.cluster_size.data.sum()
        smoothed = (self.cluster_size.data + self.eps) / (total + K * self.eps) * total  # Laplace smoothing
        self.embedding.weight.data[...] = self.embed_sum.data / smoothed[:, None]  # eq. 8

    def restart(self, z, generator=None):
        """Re-initialize every code unused since the last call to a random row of z (M, D) (the current
        batch's encoder outputs; Jukebox §3.4); return how many were restarted."""
        dead = np.flatnonzero(self.hits.data == 0)
        if len(dead):
            pick = (generator or core.random.default_generator).integers(0, len(z), (len(dead),))
            self.embedding.weight.data[dead] = z[pick]
            if self.ema:
                self.embed_sum.data[dead] = z[pick]
                self.cluster_size.data[dead] = 1.0
        self.hits.data[...] = 0
        return len(dead)


# --- the model ------------------------------------------------------------------------------------


class VQVAE(nn.Module, tok.ImageTokenizer):
    """Encoder → z_e (N, D, h, w) → nearest codes → z_q → decoder."""

    def __init__(self, cfg, channels):
        super().__init__()
        self.encoder = tok.Encoder(channels, cfg.width, cfg.code_dim, cfg.downs, cfg.blocks)
        self.quantizer = Quantizer(cfg.codebook_size, cfg.code_dim, ema=cfg.ema, decay=cfg.decay, eps=cfg.eps)
        self.decoder = tok.Decoder(cfg.code_dim, cfg.width, channels, cfg.downs, cfg.blocks)
        self.codebook_size, self.channels, self.resolution = cfg.codebook_size, channels, cfg.resolution
        self.grid = (cfg.resolution // 2 ** cfg.downs,) * 2

    def forward(self, x):
        """(reconstruction, codes, codebook loss, commitment loss, z_e) of images x (N, C, H, W)."""
        z_e = self.encoder(x)
        z_q, codes, codebook, commitment = self.quantizer(z_e)
        return self.decoder(z_q), codes, codebook, commitment, z_e

    def _encode(self, x):
        z = self.encoder(x)
        return core.tensor(self.quantizer.nearest(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]))
                           .reshape(z.shape[0], *self.grid))

    def _decode(self, codes):
        e = self.quantizer.embedding(core.tensor(codes))  # (N, h, w, D)
        return self.decoder(e.permute(0, 3, 1, 2))


def build(cfg):
    """The (untrained) VQ-VAE of a config."""
    return VQVAE(cfg, tok.CHANNELS[cfg.data])


def loss(model, x, beta):
    """(L of eq. 3 — with the EMA codebook, the codebook term is left out —, its terms as floats, the
    reconstruction, the codes, z_e) on images x."""
    rec, codes, codebook, commitment, z_e = model(x)
    mse = F.mse_loss(rec, x)  # −log p(x|z_q) of a Gaussian decoder, up to constants
    total = mse + beta * commitment if model.quantizer.ema else mse + codebook + beta * commitment  # eq. 3
    return total, {"mse": mse.item(), "commit": commitment.item()}, rec, codes, z_e


def perplexity(codes, codebook_size):
    """exp(entropy of the codes' frequencies): K when every code is used equally, 1 under collapse."""
    return tok.usage(codes, codebook_size)[0]


def restart_dead_codes(model, z_e, step, every):
    """Every `every` steps (counting from 1), restart the codes unused since the last check to random
    rows of this batch's encoder outputs z_e (N, D, h, w); return how many were restarted."""
    if not every or step % every:
        return 0
    return model.quantizer.restart(z_e.data.transpose(0, 2, 3, 1).reshape(-1, z_e.shape[1]))


# --- training -------------------------------------------------------------------------------------


def train(cfg, out, *, resume=True, progress=True):
    """Minimize eq. 3 with Adam; EMA codebook updates and dead-code restarts inside the step."""
    x, y = loop.dataset(cfg.data, cfg.resolution, "train")
    core.manual_seed(cfg.seed)
    model = build(cfg)
    opt = core.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=cfg.lr)
    sched = core.optim.WarmupCosine(opt, warmup_steps=cfg.steps // 50, total_steps=cfg.steps)

    def step(xb, yb):
        total, terms, _, codes, z_e = loss(model, core.tensor(xb), cfg.beta)
        opt.zero_grad()
        total.backward()
        opt.step()
        sched.step()
        restarted = restart_dead_codes(model, z_e, sched.last_epoch, cfg.restart_every)
        return dict(terms, loss=total.item(), perplexity=perplexity(codes, cfg.codebook_size), restarted=restarted)

    return loop.fit(cfg, out, model=model, optimizer=opt, step=step, data=(x, y), scheduler=sched, resume=resume,
                    progress=progress, name="vqvae")


def load(path):
    """(model, cfg) from a checkpoint written by `train`, in eval mode."""
    return loop.load_model(path, Config, build)


# --- sampling and evaluation ----------------------------------------------------------------------


def sample(model, cfg, n, *, seed=0, nrow=None, **options):
    """n held-out test images and their reconstructions decode(encode(x)), a row of originals above each
    row of reconstructions (`models.tokenizers.sample`); a tokenizer takes no sampling options."""
    return tok.sample(model, cfg, n, seed=seed, nrow=nrow, **options)


def evaluate(model, cfg, *, seed=0):
    """Reconstruction MSE/PSNR, the classifier's accuracy on reconstructions over originals, codebook
    usage and FD-classifier on the held-out test split (`models.tokenizers.reconstruction_figures`)."""
    return tok.reconstruction_figures(model, cfg, seed=seed, n=cfg.eval_images)

