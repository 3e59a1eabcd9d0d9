"""Glow: a normalizing flow with invertible 1×1 convolutions (Kingma & Dhariwal 2018), on the affine
coupling and multi-scale architecture of RealNVP (Dinh, Sohl-Dickstein & Bengio 2017).

A flow is an invertible map z = f(x) with a tractable Jacobian, so the change of variables gives the
exact density (Glow eqs. 1–3; RealNVP eq. 3):

    log p(x) = log p(z) + Σ_i log |det ∂h_i/∂h_{i−1}|,      h_0 = x, h_K = z.

One step of flow (Glow §3, Table 1) is actnorm → invertible 1×1 conv → affine coupling. The multi-scale
architecture (Glow Fig. 2; RealNVP §3.6) stacks L levels of `squeeze` (2×2 space → 4× channels), K steps,
and `split` (half of the channels leave as latents, with a Gaussian prior predicted from the other half).

Discrete data: the flow models images in [-1, 1] dequantized by uniform noise within each pixel level's bin
(`metrics.dequantize`), and reports bits/dim of the discrete pixels through `metrics.discrete_nll`, an
upper bound by Jensen's inequality (Theis et al. 2016, eq. 2). Coupling scale: sigmoid(s + 2), as in the
official Glow code (not exp(s)): bounded, so early training is stable, and a zero-initialized network
starts near the identity (sigmoid(2) ≈ 0.88).
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import numpy as np

import core
from core import F, nn
from core.autograd import Function
from models import metrics

LOG_2PI = math.log(2 * math.pi)


@dataclasses.dataclass
class Config:
    """Glow's settings; the defaults are the measured bar run on 8×8 digits (17 pixel levels)."""

    data: str = "digits"
    resolution: int = 8
    levels: int = 2  # L: squeeze / K steps / split, L times (the last level does not split)
    steps_per_level: int = 8  # K
    hidden: int = 96  # channels of the coupling networks
    lu: bool = True  # LU-parameterized 1×1 convolutions (Glow §3.2)
    n_bins: int = 17  # pixel levels of the data (digits: 0..16)
    temperature: float = 0.7  # sampling temperature (Glow §5, Fig. 8)
    steps: int = 1400
    batch_size: int = 64
    lr: float = 1e-3
    warmup: int = 100
    grad_clip: float = 50.0
    checkpoint_every: int = 200
    seed: int = 0


# shapes: 87% of the pixels are black background; a 400-step pilot reached 2.88 / 2.15 / 1.81 train bits/dim
# at lr 1e-3 / 3e-3 / 6e-3, so the preset trains longer at a higher rate (warmup 200 for it)
PRESETS = {"shapes": {"resolution": 16, "n_bins": 256, "hidden": 64, "steps_per_level": 6, "steps": 4400, "lr": 5e-3,
                      "warmup": 200}}


def squeeze(x):
    """(B, C, H, W) → (B, 4C, H/2, W/2): each 2×2 block of pixels becomes 4 channels (RealNVP §3.6)."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 1, 3, 5, 2, 4).reshape(b, c * 4, h // 2, w // 2)


def unsqueeze(x):
    """The inverse of `squeeze`: (B, 4C, H, W) → (B, C, 2H, 2W)."""
    b, c, h, w = x.shape
    return x.reshape(b, c // 4, 2, 2, h, w).permute(0, 1, 4, 2, 5, 3).reshape(b, c // 4, h * 2, w * 2)


def gaussian_log_p(x, mean, logs):
    """Elementwise log N(x; mean, exp(logs)²) = −½(log 2π + 2 logs + (x − mean)² e^{−2 logs})."""
    return -0.5 * (LOG_2PI + 2.0 * logs + (x - mean) ** 2 * (-2.0 * logs).exp())


class LogAbsDet(Function):
    """log |det W| of a square matrix (torch.linalg.slogdet(W).logabsdet); its gradient is W^{−T} (Jacobi's
    formula). `LogAbsDet.apply(w)`."""

    @staticmethod
    def forward(ctx, w):
        ctx.save_for_backward(w)
        return np.asarray(np.linalg.slogdet(w)[1], dtype=w.dtype)

    @staticmethod
    def backward(ctx, grad):
        (w,) = ctx.saved_tensors
        return grad * np.linalg.inv(w).T


def zero_conv(cin, cout):
    """A 3×3 convolution starting at zero (Glow §3.3): the coupling it ends starts as the identity, the split
    prior it computes as a standard normal."""
    conv = nn.Conv2d(cin, cout, 3, padding=1)
    conv.weight.data[...] = conv.bias.data[...] = 0
    return conv


# The three layers of a step of flow (Glow Table 1): each maps (x, logdet) → (y, logdet + log|det ∂y/∂x|)
# and has `reverse(y) → x`.
class ActNorm(nn.Module):
    """y = (x + b) ⊙ exp(logs) per channel; log-det = H·W·Σ logs (Glow §3.1, Table 1 row 1). Data-dependent
    init: the first training batch sets b = −mean and exp(logs) = 1/std per channel."""

    def __init__(self, channels):
        super().__init__()
        self.bias = nn.Parameter(np.zeros((1, channels, 1, 1), np.float32))
        self.logs = nn.Parameter(np.zeros((1, channels, 1, 1), np.float32))
        self.register_buffer("initialized", core.zeros(1))

    def forward(self, x, logdet):
        if self.training and not self.initialized.data.item():
            a = x.data
            self.bias.data[...] = -a.mean(axis=(0, 2, 3), keepdims=True)
            self.logs.data[...] = -np.log(a.std(axis=(0, 2, 3), keepdims=True) + 1e-6)
            self.initialized.data[...] = 1
        h, w = x.shape[2:]
        return (x + self.bias) * self.logs.exp(), logdet + h * w * self.logs.sum()

    def reverse(self, y):
        return y * (-self.logs).exp() - self.bias


class InvConv1x1(nn.Module):
    """y = W x at every pixel, a 1×1 convolution with an invertible C×C matrix W initialized as a random
    rotation; log-det = H·W·log|det W| (Glow §3.2, Table 1 row 2). With lu=True, W = P L (U + diag(s))
    (Glow eq. 10): P a fixed permutation, L unit lower- and U strictly upper-triangular, so
    log|det W| = Σ log|s| costs O(C) instead of O(C³)."""

    def __init__(self, channels, lu=True, generator=None):
        super().__init__()
        gen = generator if generator is not None else core.random.default_generator
        q = np.linalg.qr(gen.normal((channels, channels)))[0].astype(np.float64)
        self.lu = lu
        if not lu:
            self.weight = nn.Parameter(q.astype(np.float32))
            return
        import scipy.linalg

        p, lower, upper = scipy.linalg.lu(q)
        s = np.diag(upper)
        for name, a in (("p", p), ("sign_s", np.sign(s)), ("lower_mask", np.tril(np.ones_like(q), -1)),
                        ("eye", np.eye(channels))):
            self.register_buffer(name, core.tensor(a.astype(np.float32)))
        self.lower = nn.Parameter(lower.astype(np.float32))
        self.upper = nn.Parameter(np.triu(upper, 1).astype(np.float32))
        self.log_s = nn.Parameter(np.log(np.abs(s)).astype(np.float32))

    def matrix(self):
        """(W, log|det W|)."""
        if not self.lu:
            return self.weight, LogAbsDet.apply(self.weight)
        lower = self.lower * self.lower_mask + self.eye
        diag = (self.sign_s * self.log_s.exp()).reshape(-1, 1) * self.eye
        upper = self.upper * self.lower_mask.transpose(0, 1) + diag
        return self.p @ lower @ upper, self.log_s.sum()  # Glow eq. 10

    def forward(self, x, logdet):
        w, log_det_w = self.matrix()
        c, (h, wd) = x.shape[1], x.shape[2:]
        return F.conv2d(x, w.reshape(c, c, 1, 1)), logdet + h * wd * log_det_w

    def reverse(self, y):
        w = self.matrix()[0].data
        c = y.shape[1]
        return F.conv2d(y, core.tensor(np.linalg.inv(w.astype(np.float64)).astype(w.dtype).reshape(c, c, 1, 1)))


class AffineCoupling(nn.Module):
    """RealNVP's affine coupling (Dinh et al. 2017, eqs. 7–8; Glow Table 1 row 3): x = (x_a, x_b),
    (log s, t) = NN(x_a), y_a = x_a, y_b = (x_b + t) ⊙ s with s = sigmoid(log s + 2); log-det = Σ log s.
    The inverse multiplies by 1/s = 1 + e^{−(log s + 2)}, which no float holds once log s < −90: a latent far
    from the data's image can overflow it (`sample` counts and clips such images).
    NN is conv3×3 → ReLU → conv1×1 → ReLU → zero-initialized conv3×3."""

    def __init__(self, channels, hidden):
        super().__init__()
        self.nn = nn.Sequential(nn.Conv2d(channels // 2, hidden, 3, padding=1), nn.ReLU(),
                                nn.Conv2d(hidden, hidden, 1), nn.ReLU(), zero_conv(hidden, channels))

    def _shift_scale(self, xa):
        h = self.nn(xa)
        return h[:, 0::2], h[:, 1::2] + 2.0  # t and the logit of s (Glow's code: "cross" channel split)

    def forward(self, x, logdet):
        c = x.shape[1] // 2
        xa, xb = x[:, :c], x[:, c:]
        shift, raw = self._shift_scale(xa)
        return core.cat([xa, (xb + shift) * raw.sigmoid()], 1), logdet + F.logsigmoid(raw).sum((1, 2, 3))

    def reverse(self, y):
        c = y.shape[1] // 2
        ya, yb = y[:, :c], y[:, c:]
        shift, raw = self._shift_scale(ya)
        # x_b = y_b / s − t with 1/sigmoid(r) = 1 + e^{−r}: no division by a sigmoid that underflowed to 0
        return core.cat([ya, yb * (1.0 + (-raw).exp()) - shift], 1)


class Split(nn.Module):
    """Multi-scale split (RealNVP §3.6; Glow Fig. 2b): half of the channels, z_2, leave the flow; their prior
    is N(μ, σ²) with (μ, log σ) = ZeroConv(z_1) predicted from the half that stays (Glow's "split2d")."""

    def __init__(self, channels):
        super().__init__()
        self.prior = zero_conv(channels // 2, channels)

    def _prior(self, z1):
        h = self.prior(z1)
        return h[:, 0::2], h[:, 1::2]

    def forward(self, x):
        """x → (z_1, z_2, log p(z_2 | z_1) per sample)."""
        c = x.shape[1] // 2
        z1, z2 = x[:, :c], x[:, c:]
        return z1, z2, gaussian_log_p(z2, *self._prior(z1)).sum((1, 2, 3))

    def reverse(self, z1, z2=None, temperature=1.0, generator=None):
        """(z_1, z_2) → x; z_2=None draws it from the prior with its σ scaled by `temperature`."""
        if z2 is None:
            mean, logs = self._prior(z1)
            eps = (generator or core.random.default_generator).normal(mean.shape).astype(mean.dtype)
            z2 = mean + logs.exp() * (temperature * eps)
        return core.cat([z1, z2], 1)


class Glow(nn.Module):
    """L levels of squeeze → K steps of flow → split (no split after the last level), a learned Gaussian
    prior on the top latent ("learntop" in Glow's code: a zero-initialized mean and log σ per element)."""

    def __init__(self, in_channels=1, resolution=8, levels=2, steps_per_level=8, hidden=96, lu=True, generator=None):
        super().__init__()
        if resolution % (2**levels):
            raise ValueError(f"Glow: resolution {resolution} must be divisible by 2**levels = {2**levels}")
        self.levels, self.splits = nn.ModuleList(), nn.ModuleList()  # a level: K steps of flow, 3 layers each
        c, r = in_channels, resolution
        for i in range(levels):
            c, r = c * 4, r // 2
            self.levels.append(nn.ModuleList([layer for _ in range(steps_per_level) for layer in  # Glow Fig. 2a
                                              (ActNorm(c), InvConv1x1(c, lu, generator), AffineCoupling(c, hidden))]))
            if i < levels - 1:
                self.splits.append(Split(c))
                c //= 2
        self.prior_mean = nn.Parameter(np.zeros((1, c, r, r), np.float32))
        self.prior_logs = nn.Parameter(np.zeros((1, c, r, r), np.float32))

    def forward(self, x):
        """x (B, C, H, W) → (latents [z_2 of each split, top z], log p(x) per sample) (Glow eqs. 1–3)."""
        log_p = logdet = core.zeros(x.shape[0], dtype=x.dtype)
        zs = []
        for i, layers in enumerate(self.levels):
            x = squeeze(x)
            for layer in layers:
                x, logdet = layer(x, logdet)
            if i < len(self.splits):
                x, z2, lp = self.splits[i](x)
                zs.append(z2)
                log_p = log_p + lp
        zs.append(x)
        log_p = log_p + gaussian_log_p(x, self.prior_mean, self.prior_logs).sum((1, 2, 3))
        return zs, log_p + logdet  # change of variables (Glow eq. 2)

    def log_prob(self, x):
        """log p(x) per sample, exactly (a density over the continuous, dequantized data)."""
        return self.forward(x)[1]

    def reverse(self, zs=None, n=None, temperature=1.0, generator=None):
        """Latents → x. With zs=None draw every latent from its prior at `temperature` (Glow §5): n samples."""
        gen = generator or core.random.default_generator
        if zs is None:
            eps = gen.normal((n,) + self.prior_mean.shape[1:]).astype(self.prior_mean.dtype)
            x = self.prior_mean + self.prior_logs.exp() * (temperature * eps)
        else:
            x = zs[-1]
        for i in reversed(range(len(self.levels))):
            if i < len(self.splits):
                x = self.splits[i].reverse(x, None if zs is None else zs[i], temperature, gen)
            for layer in reversed(self.levels[i]):
                x = layer.reverse(x)
            x = unsqueeze(x)
        return x


def bits_per_dim(log_p, dims, n_bins):
    """Bits/dim of the discrete pixels from log p of their dequantized values (per sample; array or Tensor):
    an upper bound on the discrete NLL (metrics.discrete_nll), in bits per dimension."""
    return metrics.bits_per_dim(metrics.discrete_nll(-log_p, dims, n_bins), dims)


# The registry contract (models/registry.py): train, load, sample, evaluate.
def build(cfg, generator=None):
    """An untrained Glow for the config's data (1 channel for digits, 3 for shapes)."""
    channels = 1 if cfg.data == "digits" else 3
    return Glow(channels, cfg.resolution, cfg.levels, cfg.steps_per_level, cfg.hidden, cfg.lu, generator)


def train(cfg, out, *, resume=True, progress=True):
    """Maximize the likelihood of the dequantized training images (minimize their bits/dim) with Adam,
    warmup + cosine learning rate and gradient clipping; checkpoints to `out` (see models.train.fit)."""
    from models.train import dataset, fit

    x, y = dataset(cfg.data, cfg.resolution, "train")
    core.manual_seed(cfg.seed)
    model = build(cfg)
    with core.no_grad():  # actnorm's data-dependent initialization, on 512 images (Glow §3.1)
        model(core.tensor(metrics.dequantize(x[:512], cfg.n_bins)))
    opt = core.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = core.optim.WarmupCosine(opt, min(cfg.warmup, cfg.steps), cfg.steps)
    dims = int(np.prod(x.shape[1:]))

    def step(xb, yb):
        loss = bits_per_dim(model.log_prob(core.tensor(metrics.dequantize(xb, cfg.n_bins))), dims, cfg.n_bins).mean()
        opt.zero_grad()
        loss.backward()
        nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        return {"bpd": loss.item()}

    return fit(cfg, out, model=model, optimizer=opt, scheduler=sched, step=step, data=(x, y),
               resume=resume, progress=progress)


def load(path):
    """(model in eval mode, Config) from a checkpoint written by `train`; the global RNG is left untouched."""
    from models.train import load_model

    return load_model(path, Config, lambda cfg: build(cfg, core.random.Generator(0)))


def sample(model, cfg, n, *, label=None, guidance=None, steps=None, seed=0, temperature=None):
    """n images (n, C, H, W) in [-1, 1]: latents from the prior at `temperature` (default cfg.temperature),
    run through the inverse flow, each pixel set to the level whose bin it falls in. Glow here is unconditional."""
    from models.registry import UsageError

    for name, value in (("label", label), ("guidance", guidance), ("steps", steps)):
        if value is not None:
            raise UsageError(f"glow: {name} is not an option of this (unconditional) model")
    gen, temperature = core.random.Generator(seed), cfg.temperature if temperature is None else temperature
    with core.no_grad(), np.errstate(over="ignore", invalid="ignore"):  # counted below instead
        x = model.eval().reverse(n=n, temperature=temperature, generator=gen).data
    diverged = ~np.isfinite(x).all(axis=(1, 2, 3))
    if diverged.any():  # the inverse overflowed (1/s grows as e^{−r}): such latents are far outside the data's image
        warnings.warn(f"glow.sample: the inverse flow overflowed for {diverged.sum()} of {n} latents at temperature "
                      f"{temperature:g}; their non-finite pixels are set to the nearest end of [-1, 1] (NaN: -1)",
                      stacklevel=2)
        x = np.nan_to_num(x, nan=-1.0, posinf=1.0, neginf=-1.0)
    return (metrics.quantize(x, cfg.n_bins) * metrics.bin_width(cfg.n_bins) - 1).astype(np.float32)


def evaluate(model, cfg, *, seed=0):
    """Test bits/dim beside the independent per-pixel baseline (a categorical per pixel over the n_bins
    levels, fitted to the training set) measured in the same call; train bits/dim shows overfitting."""
    from models.train import dataset, figure

    def mean_bpd(x, draws):  # each image's bits/dim, averaged over `draws` dequantization draws
        gen, dims, out = core.random.Generator(seed), int(np.prod(x.shape[1:])), []
        with core.no_grad():
            for _ in range(draws):
                for i in range(0, len(x), 256):
                    y = core.tensor(metrics.dequantize(x[i : i + 256], cfg.n_bins, generator=gen))
                    out.append(bits_per_dim(model.eval().log_prob(y).data.astype(np.float64), dims, cfg.n_bins))
        return float(np.concatenate(out).mean())

    x_train, _ = dataset(cfg.data, cfg.resolution, "train")
    x_test, _ = dataset(cfg.data, cfg.resolution, "test")
    baseline = metrics.independent_pixel_baseline(x_train, x_test, cfg.n_bins)
    return {"figures": [figure("test bits/dim", mean_bpd(x_test, 4), better="lower", unit="bits/dim",
                               independent_pixels=baseline)], "train_bits_per_dim": mean_bpd(x_train, 1)}
