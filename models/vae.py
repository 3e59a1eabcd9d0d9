"""VAE: a latent-variable model p(x) = ∫ p(x|z) p(z) dz trained by maximizing a lower bound on log p(x)
with an inference network q(z|x) (Kingma & Welling 2014, "Auto-Encoding Variational Bayes").

    log p(x) = ELBO(x) + KL(q(z|x) || p(z|x))                                  (K&W 2014, eq. 1)
    ELBO(x)  = E_q(z|x)[log p(x|z)] − KL(q(z|x) || p(z))  ≤  log p(x)          (K&W 2014, eqs. 2-3)

- Prior p(z) = N(0, I); encoder q(z|x) = N(μ(x), diag σ²(x)), outputting μ and log σ².
- Reparameterization z = μ + σ ⊙ ε, ε ~ N(0, I) (K&W 2014, §2.4 and eq. 10), so that the sampled
  ELBO is differentiable in the encoder's weights.
- The KL to the prior in closed form (K&W 2014, Appendix B):
      −KL = ½ Σ_j (1 + log σ_j² − μ_j² − σ_j²).
- Decoder likelihood: the data are discrete (digits: 17 levels 1/8 apart in [-1, 1]; shapes: read as
  8-bit, 256 levels), so p(x|z) is a discretized logistic (Salimans et al. 2017, PixelCNN++, eq. 2;
  as in Kingma et al. 2016's IAF VAE): each pixel's level k gets the logistic mass of its bin,
      P(k | μ, s) = σ((x_k + Δ/2 − μ)/s) − σ((x_k − Δ/2 − μ)/s),
  with the bins of the lowest and highest levels extended to −∞ and +∞. This is a proper probability
  over the levels, so the ELBO is a bound on the discrete log-likelihood, in the same units as the
  independent per-pixel baseline (models.metrics) with no dequantization needed.
- Evaluation: the test ELBO (nats per image and bits/dim), and the tighter importance-weighted bound
  with k = 100 samples (Burda et al. 2016, eq. 8)
      log p(x) ≥ L_k = E[log (1/k) Σ_i p(x, z_i) / q(z_i|x)],  z_i ~ q(z|x),
  both beside the independent per-pixel baseline; prior samples and a latent interpolation grid.

    python -m models.cli train vae --data digits --out vae.safetensors
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

import core
from core import F, nn
from models import train as loop
from models.registry import UsageError

LEVELS = {"digits": 17, "shapes": 256}  # discrete values per pixel channel, evenly spaced in [-1, 1]


@dataclasses.dataclass
class Config:
    """Defaults: the measured bar run on 8×8 digits (see README)."""

    data: str = "digits"
    resolution: int = 8
    steps: int = 4000
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0
    latent: int = 16  # dimensions of z
    width: int = 32  # channels of the first conv layer (doubling per halving)
    hidden: int = 256  # units of the fully connected layer on each side of z
    checkpoint_every: int = 500
    iw_samples: int = 100  # k of the importance-weighted bound (Burda et al. 2016)
    eval_samples: int = 2000  # prior samples for the FD-classifier figure

    def __post_init__(self):
        r = self.resolution
        if r < 8 or r & (r - 1):
            raise ValueError(f"vae.Config: resolution must be a power of two >= 8, got {r}")


PRESETS = {"shapes": {"resolution": 16, "steps": 2000, "latent": 32}}


class VAE(nn.Module):
    """Conv encoder → (μ, log σ²) of q(z|x); decoder z → per-pixel logistic (mean, log scale)."""

    def __init__(self, cfg, channels):
        super().__init__()
        halvings = int(math.log2(cfg.resolution)) - 2  # down to 4×4
        enc, w = [nn.Conv2d(channels, cfg.width, 3, 1, 1), nn.ReLU()], cfg.width
        for _ in range(halvings):
            enc += [nn.Conv2d(w, 2 * w, 4, 2, 1), nn.ReLU()]
            w *= 2
        self.encoder = nn.Sequential(*enc, nn.Flatten(), nn.Linear(w * 16, cfg.hidden), nn.ReLU(),
                                     nn.Linear(cfg.hidden, 2 * cfg.latent))
        self.inflate = nn.Sequential(nn.Linear(cfg.latent, cfg.hidden), nn.ReLU(), nn.Linear(cfg.hidden, w * 16),
                                     nn.ReLU())
        dec = []
        for _ in range(halvings):
            dec += [nn.ConvTranspose2d(w, w // 2, 4, 2, 1), nn.ReLU()]
            w //= 2
        self.decoder = nn.Sequential(*dec, nn.Conv2d(w, 2 * channels, 3, 1, 1))
        self.latent, self.channels, self.top = cfg.latent, channels, w * (2 ** halvings)

    def encode(self, x):
        """(μ, log σ²) of q(z|x), each (N, latent)."""
        h = self.encoder(x)
        return h[:, : self.latent], h[:, self.latent :]

    def decode(self, z):
        """(mean, log scale) of p(x|z), each (N, C, H, W)."""
        h = self.inflate(z).reshape(z.shape[0], self.top, 4, 4)
        out = self.decoder(h)
        return out[:, : self.channels], out[:, self.channels :]


def build(cfg):
    """The (untrained) VAE of a config."""
    return VAE(cfg, 1 if cfg.data == "digits" else 3)


# --- the terms of the ELBO ------------------------------------------------------------------------


def kl_to_prior(mu, logvar):
    """KL(N(μ, σ²) || N(0, I)) per image, closed form (Kingma & Welling 2014, Appendix B)."""
    return -0.5 * (1 + logvar - mu * mu - logvar.exp()).sum(1)


def discretized_logistic_log_prob(x, mean, log_scale, levels):
    """log P(x | mean, scale) per image, summed over pixels: the logistic mass of each level's bin of width
    Δ = 2/(levels − 1), the end bins open (Salimans et al. 2017, eq. 2). x must lie on the levels.

    Stable evaluation as in PixelCNN++: log σ(a) = a − softplus(a) for the lowest level, log(1 − σ(b))
    = −softplus(b) for the highest, and for a bin whose mass underflows, the density at the bin's centre
    times Δ. Above the mean the mass is taken as σ(−lower) − σ(−upper) (the same number), so that a bin
    in the upper tail is a difference of two small numbers, not of two numbers close to 1.
    """
    half = 1.0 / (levels - 1)  # Δ/2
    inv_s = (-log_scale.clamp(min=-7.0)).exp()
    c = x - mean
    plus, minus = inv_s * (c + half), inv_s * (c - half)  # standardized bin edges
    log_cdf_plus = plus - F.softplus(plus)  # log σ(plus): the whole mass below the top edge
    log_one_minus_cdf_minus = -F.softplus(minus)  # log(1 − σ(minus)): the whole mass above the bottom edge
    mid = inv_s * c
    mass = core.where(mid > 0, (-minus).sigmoid() - (-plus).sigmoid(), plus.sigmoid() - minus.sigmoid())
    log_pdf_mid = mid - log_scale.clamp(min=-7.0) - 2 * F.softplus(mid)  # log of the logistic density at x
    inner = core.where(mass > 1e-12, mass.clamp(min=1e-12).log(), log_pdf_mid + math.log(2 * half))
    lp = core.where(x < -1 + half, log_cdf_plus, core.where(x > 1 - half, log_one_minus_cdf_minus, inner))
    return lp.flatten(1).sum(1)


def on_levels(x, levels):
    """x snapped to the nearest of `levels` evenly spaced values in [-1, 1] (digits already are)."""
    step = 2.0 / (levels - 1)
    return (np.clip(np.rint((np.asarray(x) + 1) / step), 0, levels - 1) * step - 1).astype(np.float32)


def elbo_terms(model, x, levels, generator=None):
    """(log p(x|z) with one z ~ q(z|x), KL(q(z|x) || p(z))), each (N,) Tensors in nats."""
    mu, logvar = model.encode(x)
    eps = core.randn(*mu.shape, generator=generator)
    z = mu + (0.5 * logvar).exp() * eps  # reparameterization (Kingma & Welling 2014, eq. 10)
    mean, log_scale = model.decode(z)
    return discretized_logistic_log_prob(x, mean, log_scale, levels), kl_to_prior(mu, logvar)


# --- training -------------------------------------------------------------------------------------


def train(cfg, out, *, resume=True, progress=True):
    """Maximize the ELBO (minimize −ELBO per image, averaged over the batch) with Adam."""
    x, y = loop.dataset(cfg.data, cfg.resolution, "train")
    x = on_levels(x, LEVELS[cfg.data])
    core.manual_seed(cfg.seed)
    model = build(cfg)
    opt = core.optim.Adam(model.parameters(), lr=cfg.lr)

    def step(xb, yb):
        rec, kl = elbo_terms(model, core.tensor(xb), LEVELS[cfg.data])
        loss = (kl - rec).mean()  # −ELBO (Kingma & Welling 2014, eq. 3)
        opt.zero_grad()
        loss.backward()
        opt.step()
        return {"-elbo": loss.item(), "kl": kl.mean().item()}

    return loop.fit(cfg, out, model=model, optimizer=opt, step=step, data=(x, y), resume=resume,
                    progress=progress, name="vae")


def load(path):
    """(model, cfg) from a checkpoint written by `train`, in eval mode."""
    return loop.load_model(path, Config, build)


# --- sampling, interpolation, evaluation ----------------------------------------------------------


def sample(model, cfg, n, *, label=None, guidance=None, steps=None, seed=0):
    """n images from the prior: z ~ N(0, I), shown as the decoder's mean (the logistic's mode), clipped
    to [-1, 1]; (n, C, H, W) float32."""
    if label is not None or guidance is not None or steps is not None:
        raise UsageError("vae: the VAE is unconditional and samples in one pass; --label, --guidance and --steps "
                         "do not apply")
    gen = core.random.Generator(seed)
    with core.no_grad():
        mean, _ = model.eval().decode(core.randn(n, cfg.latent, generator=gen))
    return np.clip(mean.numpy(), -1, 1).astype(np.float32)


def interpolate(model, a, b, steps=10):
    """Decoder means along the straight line between the posterior means of images a and b (C, H, W):
    (steps, C, H, W)."""
    with core.no_grad():
        mu, _ = model.eval().encode(core.tensor(np.stack([a, b]).astype(np.float32)))
        t = np.linspace(0, 1, steps, dtype=np.float32)[:, None]
        z = (1 - t) * mu.numpy()[0] + t * mu.numpy()[1]
        mean, _ = model.decode(core.tensor(z))
    return np.clip(mean.numpy(), -1, 1)


def interpolation_grid(model, cfg, path, rows=8, steps=10, seed=0):
    """Save a grid whose rows interpolate between pairs of test images (the ends are reconstructions)."""
    x, _ = loop.dataset(cfg.data, cfg.resolution, "test")
    pick = np.random.default_rng(seed).permutation(len(x))[: 2 * rows]
    grid = [interpolate(model, x[pick[2 * r]], x[pick[2 * r + 1]], steps) for r in range(rows)]
    return loop.save_grid(np.concatenate(grid), path, nrow=steps)


def bounds(model, x, levels, k=100, seed=0, batch_size=64):
    """Per-image (ELBO, importance-weighted bound L_k) in nats, float64 (N,) each, for images x on the levels.

    L_k = log (1/k) Σ_i exp(log p(x|z_i) + log p(z_i) − log q(z_i|x)), z_i ~ q(z|x) (Burda et al. 2016,
    eq. 8), computed with a log-sum-exp; L_1's expectation is the ELBO and L_k rises toward log p(x).
    """
    gen = core.random.Generator(seed)
    elbos, iwae = [], []
    log2pi = math.log(2 * math.pi)
    model.eval()
    with core.no_grad():
        for i in range(0, len(x), batch_size):
            xb = core.tensor(x[i : i + batch_size])
            rec, kl = elbo_terms(model, xb, levels, gen)
            elbos.append((rec - kl).numpy().astype(np.float64))
            mu, logvar = (t.numpy().astype(np.float64) for t in model.encode(xb))
            n, d = mu.shape
            eps = gen.normal((k, n, d))
            z = mu + np.exp(0.5 * logvar) * eps  # (k, n, d)
            log_q = -0.5 * (eps ** 2 + logvar + log2pi).sum(-1)  # log N(z; μ, σ²)
            log_prior = -0.5 * (z ** 2 + log2pi).sum(-1)  # log N(z; 0, I)
            mean, log_scale = model.decode(core.tensor(z.reshape(k * n, d).astype(np.float32)))
            xk = core.tensor(np.broadcast_to(x[i : i + batch_size], (k, *xb.shape)).reshape(k * n, *xb.shape[1:]))
            log_px = discretized_logistic_log_prob(xk, mean, log_scale, levels).numpy().astype(np.float64)
            log_w = log_px.reshape(k, n) + log_prior - log_q
            m = log_w.max(0)
            iwae.append(m + np.log(np.exp(log_w - m).mean(0)))  # log-mean-exp over the k samples
    return np.concatenate(elbos), np.concatenate(iwae)


def evaluate(model, cfg, *, seed=0):
    """Test ELBO and IWAE bound (k = cfg.iw_samples) as bits/dim beside the independent per-pixel
    baseline, and the FD-classifier of prior samples beside a Gaussian's and the real training set's."""
    from models import metrics

    levels = LEVELS[cfg.data]
    x_train = on_levels(loop.dataset(cfg.data, cfg.resolution, "train")[0], levels)
    x_test = on_levels(loop.dataset(cfg.data, cfg.resolution, "test")[0], levels)
    dims = int(np.prod(x_test.shape[1:]))
    elbo, iwae = bounds(model, x_test, levels, k=cfg.iw_samples, seed=seed)
    base = metrics.independent_pixel_baseline(x_train, x_test, levels)
    bpd = lambda nats: metrics.bits_per_dim(-float(np.mean(nats)), dims)  # noqa: E731
    result = loop.sampler_figures(sample(model, cfg, cfg.eval_samples, seed=seed), cfg.data, cfg.resolution,
                                  seed=seed)
    result["figures"][:0] = [
        loop.figure("test -ELBO", bpd(elbo), better="lower", unit="bits/dim", independent_pixels=base),
        loop.figure(f"test -IWAE (k={cfg.iw_samples})", bpd(iwae), better="lower", unit="bits/dim",
                    independent_pixels=base),
        loop.figure("test ELBO", float(np.mean(elbo)), better="higher", unit="nats/image",
                    independent_pixels=-base * dims * math.log(2)),
        loop.figure(f"test IWAE (k={cfg.iw_samples})", float(np.mean(iwae)), better="higher", unit="nats/image",
                    independent_pixels=-base * dims * math.log(2)),
    ]
    return result
