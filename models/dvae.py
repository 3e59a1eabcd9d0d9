"""dVAE: the discrete VAE that turns images into the tokens of DALL·E (Ramesh et al. 2021, "Zero-Shot
Text-to-Image Generation", §2.1 and Appendix A).

An encoder gives, at each cell of an h×w grid, logits over K codes: q(z|x) = softmax(logits), a
categorical per cell. The decoder reads the grid of codes (one-hot vectors; its first 1×1 convolution
is the codebook) and gives the likelihood of the image. Training maximizes the β-weighted ELBO

    ln p(x) ≥ E_{z ~ q(z|x)}[ln p(x|z)] − β KL(q(z|x) || U(K))                 (Ramesh et al. 2021, eq. 1)

with U(K) the uniform prior over the codes (stage 1: the transformer prior comes later); the KL uses the
encoder's categorical q even while the sample is relaxed (τ > 0), as the authors do. The expectation
over the discrete z is made differentiable by the Gumbel-softmax relaxation (Jang et al. 2017, eq. 2;
Maddison et al. 2017), used in the forward and the backward pass:

    y = softmax((logits + g)/τ),  g = −log(−log u),  u ~ U(0, 1)   (through the fused kernel, F.gumbel_softmax)

- τ is annealed 1 → 1/16 and β raised from 0, both on cosine schedules (App. A.2: over the first
  150,000 and 5,000 updates of the paper's run; linear annealing of τ "typically diverged"); here both
  are pure functions of the step, so a resumed run is bitwise the uninterrupted one.
- The likelihood is the logit-Laplace distribution (App. A.3) on pixels mapped into (ε, 1 − ε):
      f(y | μ, b) = 1/(2 b y (1 − y)) · exp(−|logit(y) − μ| / b),   y = φ(x) = (1 − 2ε) x + ε,  ε = 0.1,
  the decoder giving μ and ln b per pixel channel; the reconstruction is φ⁻¹(sigmoid(μ)).
- The loss is normalized per pixel channel (divided by C·H·W); the residual branches of encoder and
  decoder are scaled by 1/L² for L blocks (App. A.1); the encoder ends and the decoder begins with a
  1×1 convolution (models.tokenizers); every convolution starts from N(0, 1/fan_in) weights and zero
  biases, as in the released dVAE.
- At inference (and for the transformer's training data) each cell's code is the argmax of its logits.

Departures from the paper, each a Config field, measured on shapes (README, issue 6). The paper's recipe
(sigma=0, kl_weight=6.6, diversity=0, lr=1e-4 for 3M updates) reaches 56% of the classifier's accuracy in
3,200 updates here (color at chance); the default's three departures reach 97.5%:
- `sigma` > 0 replaces the learned per-pixel scale b by one fixed scale σ, a normal density on logit(y)
  (`logit_normal_log_prob`). With a learned b the decoder explains an object's pixels away with a large b
  (b ≈ 1 on objects, 0.03 on the black background), which also divides their gradient by b, so it never learns
  their color: a continuous autoencoder (no bottleneck at all) trained with the logit-Laplace kept color at
  chance after 400 updates, and reached 99.6% with σ = 0.3 (the pitfall of learned variances, Seitzer et al. 2022).
- `diversity` γ: γ times the KL of the batch-averaged q to uniform (wav2vec 2.0's diversity term, Baevski et al.
  2020 §3.2), with β lowered to 0.5: it keeps the codes in use without making each cell's q diffuse (at β = 6.6
  a cell carries ~0.6 nats; at small β without it the encoder collapses onto one code within 25 updates).
- `hard` (off): straight-through one-hot Gumbel-max codes in training; worse in every pilot.

Pixels: shapes are read as 8-bit (256 levels) and dequantized with uniform noise in training and for the
likelihood (Theis et al. 2016): on the exact levels a density could grow without bound (87% of the shapes'
pixels are the black background), and this makes the ELBO a bound on the discrete log-likelihood, reported
in bits/dim beside the independent per-pixel baseline.

    t2i train dvae --out /tmp/runs/dvae/ckpt.safetensors && t2i eval dvae --ckpt /tmp/runs/dvae/ckpt.safetensors
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

import core
from core import F, nn
from models import metrics
from models import tokenizers as tok
from models import train as loop

DATA = ("shapes",)
LEVELS = 256  # shapes read as 8-bit images


@dataclasses.dataclass
class Config:
    """Defaults: the measured bar run on 32×32 shapes → an 8×8 grid (see README)."""

    data: str = "shapes"
    resolution: int = 32
    steps: int = 3200
    batch_size: int = 32
    lr: float = 3e-3  # the paper's 1e-4 is for 3M updates; 1e-2 collapses onto one code here
    seed: int = 0
    codebook_size: int = 512  # K
    width: int = 64  # channels at the token grid (halved per doubling of the resolution)
    downs: int = 2  # halvings from the image to the grid: 32×32 → 8×8
    blocks: int = 2  # residual blocks in the encoder and in the decoder (L, branch scale 1/L²)
    tau_start: float = 1.0  # Gumbel-softmax temperature, annealed on a cosine (App. A.2)
    tau_end: float = 1 / 16
    tau_steps: int = 2800
    kl_weight: float = 0.5  # β, raised from 0 on a cosine (App. A.2; the paper's 6.6 keeps q diffuse here)
    kl_steps: int = 300
    diversity: float = 6.6  # γ on the KL of the batch-averaged q to uniform (a departure, see the docstring)
    hard: bool = False  # straight-through one-hot Gumbel-max codes in training (a departure, see the docstring)
    eps: float = 0.1  # logit-Laplace pixel margin ε (App. A.3)
    sigma: float = 0.3  # > 0: a logit-normal likelihood of fixed scale σ instead (a departure, see the docstring)
    warmup: int = 50  # linear lr warmup, then cosine decay to lr/10
    checkpoint_every: int = 500
    eval_images: int = 1024  # held-out test images in evaluate (all of the split)

    def __post_init__(self):
        if self.data not in DATA:
            raise ValueError(f"dvae.Config: data must be one of {DATA}, got {self.data!r}")
        if self.resolution % 2 ** self.downs:
            raise ValueError(f"dvae.Config: resolution {self.resolution} is not divisible by "
                             f"2**downs = {2 ** self.downs}")
        if self.codebook_size < 2:
            raise ValueError(f"dvae.Config: codebook_size must be >= 2, got {self.codebook_size}")
        if not 0 < self.tau_end <= self.tau_start:
            raise ValueError(f"dvae.Config: need 0 < tau_end <= tau_start, got {self.tau_end}, {self.tau_start}")
        if self.sigma < 0:
            raise ValueError(f"dvae.Config: sigma must be >= 0 (0: the logit-Laplace), got {self.sigma}")
        if not 0 < self.eps < 0.5:
            raise ValueError(f"dvae.Config: eps must lie in (0, 0.5), got {self.eps}")


# --- the schedules (App. A.2) ---------------------------------------------------------------------


def cosine(start, end, step, steps):
    """start → end over `steps` steps along a half cosine, then `end`: end + (start − end)·½(1 + cos(π t/T))."""
    progress = min(step / steps, 1.0) if steps > 0 else 1.0
    return end + (start - end) * 0.5 * (1 + math.cos(math.pi * progress))


def tau_at(cfg, step):
    """Relaxation temperature τ at `step`: cfg.tau_start → cfg.tau_end over cfg.tau_steps (App. A.2)."""
    return cosine(cfg.tau_start, cfg.tau_end, step, cfg.tau_steps)


def kl_weight_at(cfg, step):
    """KL weight β at `step`: 0 → cfg.kl_weight over cfg.kl_steps (App. A.2: a larger β keeps more codes in use)."""
    return cosine(0.0, cfg.kl_weight, step, cfg.kl_steps)


# --- the model ------------------------------------------------------------------------------------


class DVAE(nn.Module, tok.ImageTokenizer):
    """Encoder x → logits over K codes per grid cell; decoder codes → (μ, ln b) of the logit-Laplace per
    pixel channel."""

    def __init__(self, cfg):
        super().__init__()
        self.channels, self.resolution, self.eps = tok.CHANNELS[cfg.data], cfg.resolution, cfg.eps
        self.codebook_size, self.sigma = cfg.codebook_size, cfg.sigma
        self.grid = (cfg.resolution >> cfg.downs,) * 2
        scale = 1 / cfg.blocks ** 2  # residual branches scaled by 1/L² (App. A.1)
        self.encoder = tok.Encoder(self.channels, cfg.width, cfg.codebook_size, cfg.downs, cfg.blocks, scale=scale)
        self.decoder = tok.Decoder(cfg.codebook_size, cfg.width, 2 * self.channels, cfg.downs, cfg.blocks, scale=scale)

    def logits(self, x):
        """(N, K, h, w) logits of q(z|x) for images x (N, C, H, W) in [-1, 1]."""
        return self.encoder(x)

    def relaxed(self, logits, tau, *, noise=None, generator=None):
        """The Gumbel-softmax sample y = softmax((logits + g)/τ) over the K codes of each cell (Jang et al.
        2017, eq. 2), through the fused kernel; `noise` injects g (same shape), else it is drawn from `generator`."""
        return F.gumbel_softmax(logits, tau, dim=1, noise=noise, generator=generator)

    def likelihood(self, codes):
        """(μ, ln b), each (N, C, H, W), of the logit-Laplace p(x|z) for codes (N, K, h, w): one-hot or relaxed."""
        out = self.decoder(codes)
        return out[:, : self.channels], out[:, self.channels :]

    def image(self, mu):
        """The reconstruction φ⁻¹(sigmoid(μ)) (App. A.3), clipped to [0, 1] and mapped to [-1, 1]."""
        return (unmap_pixels(mu.sigmoid(), self.eps) * 2 - 1).clamp(-1, 1)

    def _encode(self, x):
        return self.logits(x).argmax(1)  # the most likely code per cell (§2.1: the transformer's tokens)

    def _decode(self, codes):
        onehot = F.one_hot(core.tensor(codes), self.codebook_size).permute(0, 3, 1, 2).float()
        return self.image(self.likelihood(onehot)[0])


def init_weights(model):
    """Every convolution's weight ~ N(0, 1/fan_in), its bias 0, as in the released dVAE (openai/DALL-E,
    dall_e/utils.py): logits about 3 times larger at the start than PyTorch's default init gives, so that
    the codes depend on the image sooner through the Gumbel noise. fan_in: the taps one output sums over
    (in_channels·k², divided by stride² for a transposed convolution). Draws from core's default generator."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d)):
            w = m.weight
            fan_in = math.prod(w.shape[1:]) if isinstance(m, nn.Conv2d) else (
                w.shape[0] * w.shape[2] * w.shape[3] / math.prod(m.stride))
            w.data[...] = core.randn(*w.shape, dtype=w.dtype).numpy() / math.sqrt(fan_in)
            m.bias.data[...] = 0
    return model


def build(cfg):
    """The (untrained) dVAE of a config, initialized as the released one (`init_weights`)."""
    return init_weights(DVAE(cfg))


# --- the terms of the ELBO ------------------------------------------------------------------------


def map_pixels(x, eps=0.1):
    """φ: images in [-1, 1] → (ε, 1 − ε), y = (1 − 2ε)·(x + 1)/2 + ε (App. A.3)."""
    return (1 - 2 * eps) * (x + 1) / 2 + eps


def unmap_pixels(y, eps=0.1):
    """φ⁻¹ onto [0, 1]: (y − ε)/(1 − 2ε), clipped (App. A.3)."""
    return ((y - eps) / (1 - 2 * eps)).clamp(0, 1)


def logit_laplace_log_prob(y, mu, log_b):
    """ln f(y | μ, b) per element for y in (0, 1) (Ramesh et al. 2021, App. A.3):
    ln f = −ln 2 − ln b − ln y − ln(1 − y) − |logit(y) − μ| / b.
    It is the Laplace density of logit(y), times the Jacobian d logit(y)/dy = 1/(y(1 − y))."""
    log_y, log_1my = y.log(), (1 - y).log()
    return -math.log(2) - log_b - log_y - log_1my - ((log_y - log_1my) - mu).abs() * (-log_b).exp()


def logit_normal_log_prob(y, mu, sigma):
    """ln N(logit(y); μ, σ²) − ln y(1 − y) per element for y in (0, 1): the normal density of logit(y) carried to y,
    with one fixed scale σ for every pixel (a departure from App. A.3, see the module docstring)."""
    log_y, log_1my = y.log(), (1 - y).log()
    z = ((log_y - log_1my) - mu) / sigma
    return -0.5 * math.log(2 * math.pi) - math.log(sigma) - log_y - log_1my - 0.5 * z * z


def kl_to_uniform(logits):
    """KL(q(z|x) || U(K)) per image, summed over the grid cells: Σ_cells Σ_k q_k ln q_k + ln K, q = softmax(logits)."""
    log_q = F.log_softmax(logits, dim=1)
    return (log_q.exp() * log_q).sum(1).flatten(1).sum(1) + math.log(logits.shape[1]) * math.prod(logits.shape[2:])


def on_levels(x):
    """Images snapped to the nearest of the LEVELS 8-bit values in [-1, 1]."""
    return (metrics.quantize(x, LEVELS) * metrics.bin_width(LEVELS) - 1).astype(np.float32)


def elbo_terms(model, x, tau, *, hard=False, noise=None, generator=None, logits=None):
    """(ln p(y|z), KL(q(z|x) || U(K))), each (N,) Tensors in nats, y = φ(x), with z the Gumbel-softmax sample at
    temperature τ (the relaxed sample; hard=True: the one-hot Gumbel-max sample, an exact draw from q).
    `logits`: the encoder's output for x, when the caller already has it."""
    logits = model.logits(x) if logits is None else logits
    z = F.gumbel_softmax(logits, tau, hard=hard, dim=1, noise=noise, generator=generator)
    mu, log_b = model.likelihood(z)
    y = map_pixels(x, model.eps)
    rec = (logit_normal_log_prob(y, mu, model.sigma) if model.sigma else logit_laplace_log_prob(y, mu, log_b))
    rec = rec.flatten(1).sum(1)
    return rec, kl_to_uniform(logits)


def marginal_kl(logits):
    """KL(q̄ || U(K)) of the batch-averaged q̄ = mean over images and cells of softmax(logits): small when the batch
    as a whole uses all K codes, whatever each cell's own q (the diversity term of Baevski et al. 2020, §3.2)."""
    qbar = F.softmax(logits, dim=1).mean((0, 2, 3))
    return (qbar * (qbar + 1e-12).log()).sum() + math.log(logits.shape[1])


def loss(model, x, cfg, step, *, noise=None, generator=None):
    """The training loss at `step`: −(ln p(y|z) − β KL) / (C·H·W), averaged over the batch (eq. 1, per pixel
    channel), with τ and β of the schedules, plus γ·cells·KL(q̄ || U)/(C·H·W) when cfg.diversity = γ > 0.
    Returns (loss Tensor, {term: float})."""
    logits = model.logits(x)
    rec, kl = elbo_terms(model, x, tau_at(cfg, step), hard=cfg.hard, noise=noise, generator=generator,
                         logits=logits)
    dims = math.prod(x.shape[1:])
    beta = kl_weight_at(cfg, step)
    out = ((beta * kl - rec) / dims).mean()
    terms = {"rec": -rec.mean().item() / dims, "kl": kl.mean().item() / dims}
    if cfg.diversity:
        div = marginal_kl(logits) * (math.prod(logits.shape[2:]) / dims)
        out = out + cfg.diversity * div
        terms["div"] = div.item()
    return out, dict(terms, loss=out.item())


# --- training -------------------------------------------------------------------------------------


def train(cfg, out, *, resume=True, progress=True):
    """Minimize the β-weighted negative ELBO per pixel channel with Adam (lr warmup, then cosine decay) on
    dequantized 8-bit images; τ and β follow their schedules by step."""
    x, y = loop.dataset(cfg.data, cfg.resolution, "train")
    x = on_levels(x)
    core.manual_seed(cfg.seed)
    model = build(cfg)
    opt = core.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = core.optim.WarmupCosine(opt, min(cfg.warmup, cfg.steps), cfg.steps, min_lr=cfg.lr * 0.1)

    def step(xb, yb):
        t = sched.last_epoch  # the training step (the scheduler's count, restored on resume)
        xb = metrics.dequantize(core.tensor(xb), LEVELS)
        value, terms = loss(model, xb, cfg, t)
        opt.zero_grad()
        value.backward()
        opt.step()
        sched.step()
        return dict(terms, tau=tau_at(cfg, t), beta=kl_weight_at(cfg, t))

    return loop.fit(cfg, out, model=model, optimizer=opt, scheduler=sched, step=step, data=(x, y), resume=resume,
                    progress=progress, name="dvae")


def load(path):
    """(model, cfg) from a checkpoint written by `train`, in eval mode."""
    return loop.load_model(path, Config, build)


# --- sampling and evaluation ----------------------------------------------------------------------


def sample(model, cfg, n, *, seed=0, nrow=None, **options):
    """n test images above their reconstructions from argmax codes (the tokenizers' shared layout)."""
    return tok.sample(model, cfg, n, seed=seed, nrow=nrow, **options)


def relaxed_reconstruction(model, x, tau, *, seed=0, batch_size=256):
    """Images (N, C, H, W) decoded from one Gumbel-softmax sample at temperature τ (what training decodes)."""
    gen = core.random.Generator(seed)
    out = []
    model.eval()
    with core.no_grad():
        for i in range(0, len(x), batch_size):
            z = model.relaxed(model.logits(core.tensor(x[i : i + batch_size])), tau, generator=gen)
            out.append(model.image(model.likelihood(z)[0]).numpy())
    return np.concatenate(out)


def negative_elbo(model, x, *, seed=0, batch_size=256):
    """Per-image −ELBO (β = 1) in nats of the discrete 8-bit images x, an upper bound on −ln P(x): one exact
    sample z ~ q(z|x) (Gumbel-max) on uniformly dequantized pixels, the density carried from y = φ(x) back to
    x (change of variables) and then to the levels (−D ln Δ; Theis et al. 2016)."""
    gen = core.random.Generator(seed)
    dims = math.prod(x.shape[1:])
    out = []
    model.eval()
    with core.no_grad():
        for i in range(0, len(x), batch_size):
            xb = metrics.dequantize(core.tensor(x[i : i + batch_size]), LEVELS, generator=gen)
            rec, kl = elbo_terms(model, xb, 1.0, hard=True, generator=gen)
            out.append((kl - rec).numpy().astype(np.float64))
    nll_y = np.concatenate(out)
    nll_x = metrics.rescale_nll(nll_y, dims, (1 - 2 * model.eps) / 2)
    return metrics.discrete_nll(nll_x, dims, LEVELS)


def evaluate(model, cfg, *, seed=0):
    """The tokenizers' reconstruction figures on the test split (MSE/PSNR, classifier accuracy on
    reconstructions over originals, codebook usage, FD-classifier), plus the dVAE's own: reconstruction from
    the relaxed sample at τ = 1 and at cfg.tau_end beside that from argmax codes, and the test −ELBO in
    bits/dim beside the independent per-pixel baseline."""
    result = tok.reconstruction_figures(model, cfg, seed=seed, n=cfg.eval_images)
    x, _ = tok.held_out(cfg, cfg.eval_images)
    argmax_mse = float(((model.reconstruct(x) - x) ** 2).mean())
    relaxed = {tau: float(((relaxed_reconstruction(model, x, tau, seed=seed) - x) ** 2).mean())
               for tau in (cfg.tau_start, cfg.tau_end)}
    x_train = on_levels(loop.dataset(cfg.data, cfg.resolution, "train")[0])
    x_test = on_levels(x)
    bpd = metrics.bits_per_dim(float(np.mean(negative_elbo(model, x_test, seed=seed))), math.prod(x.shape[1:]))
    result["figures"] += [
        loop.figure(f"reconstruction MSE, relaxed sample τ={cfg.tau_end:.4g}", relaxed[cfg.tau_end], better="lower",
                    argmax_codes=argmax_mse, relaxed_tau_start=relaxed[cfg.tau_start]),
        loop.figure("test -ELBO (β=1)", bpd, better="lower", unit="bits/dim",
                    independent_pixels=metrics.independent_pixel_baseline(x_train, x_test, LEVELS)),
    ]
    return result
