"""Denoising diffusion: DDPM (Ho, Jain & Abbeel 2020), the cosine schedule of improved DDPM (Nichol &
Dhariwal 2021), DDIM sampling (Song, Meng & Ermon 2021) and classifier-free guidance (Ho & Salimans 2022).

Forward process (Ho eqs. 2 and 4), fixed, with β_t from a linear or cosine schedule (kernels.schedule):

    q(x_t | x_{t−1}) = N(√(1 − β_t) x_{t−1}, β_t I),    q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I).

The network ε_θ(x_t, t, y) (models.unet) predicts the noise; training minimizes L_simple (Ho eq. 14),

    L_simple = E_{t, x_0, ε} ||ε − ε_θ(√ᾱ_t x_0 + √(1 − ᾱ_t) ε, t)||²,

and sampling runs the reverse process: ancestral (Ho Algorithm 2, eq. 11) over all T steps, or DDIM
(Song eq. 12, η = 0: deterministic) over a strided subsequence of them. Timesteps are 0-based here
(t = 0 … T−1 is the papers' 1 … T), as in kernels.schedule, whose fused kernels do the per-pixel updates.

Classifier-free guidance. The label is replaced by ∅ with probability p_uncond = 0.1 during training, so
one network learns ε(x, c) and ε(x) = ε(x, ∅). At sampling (Ho & Salimans eq. 6), with guidance weight w,

    ε̃ = (1 + w) ε(x, c) − w ε(x),

so w = 0 is the plain conditional model; MODELS.md's scale s = 1 + w (ε̂ = ε(x) + s(ε(x, c) − ε(x))).
The weights sampled from are the exponential moving average of the trained weights (Ho §4: decay 0.9999;
0.998 here, an averaging horizon of ~500 steps for a run of a few thousand).
"""

from __future__ import annotations

import dataclasses

import numpy as np

import core
from core import F
from kernels import schedule as ks
from models.unet import UNet


@dataclasses.dataclass
class Config:
    """DDPM's settings; the defaults are the measured bar run on 8×8 digits."""

    data: str = "digits"
    resolution: int = 8
    channels: int = 32  # U-Net base width
    mults: tuple = (1, 2)  # width multipliers per resolution level (8×8, 4×4; attention at 4×4)
    blocks: int = 1  # residual blocks per level
    dropout: float = 0.0
    schedule: str = "cosine"  # "linear" (Ho et al.) or "cosine" (Nichol & Dhariwal)
    T: int = 1000
    conditional: bool = True
    p_uncond: float = 0.1  # label dropped with this probability (Ho & Salimans §3.2)
    guidance: float = 0.25  # default w (Ho & Salimans eq. 6; 0 = conditional); bar run: w ≥ 1 over-sharpens
    sample_steps: int = 25  # DDIM steps by default; T means ancestral sampling
    clip_x0: float = 1.0  # clip the predicted x_0 to [−1, 1] while sampling (as the DDPM code does)
    ema_decay: float = 0.998  # horizon ~500 steps; the initial weights keep 0.998^steps < 1% of the average
    steps: int = 2400
    batch_size: int = 64
    lr: float = 2e-3
    warmup: int = 50
    grad_clip: float = 1.0
    checkpoint_every: int = 100
    seed: int = 0

    def __post_init__(self):
        if self.schedule not in ("linear", "cosine"):
            raise ValueError(f"ddpm: schedule must be 'linear' or 'cosine', got {self.schedule!r}")
        if not 0.0 <= self.p_uncond < 1.0:
            raise ValueError(f"ddpm: p_uncond must be in [0, 1), got {self.p_uncond}")


PRESETS = {"shapes": {"resolution": 16, "channels": 32, "mults": (1, 2, 2), "steps": 1200, "ema_decay": 0.995}}


def make_schedule(name, T):
    """The β schedule as a kernels.schedule.Schedule: linear 1e-4 → 0.02 (Ho §4) or cosine (Nichol eq. 17)."""
    return ks.Schedule.linear(T) if name == "linear" else ks.Schedule.cosine(T)


class DDPM(core.nn.Module):
    """ε_θ (a U-Net) with its noise schedule; `num_classes` > 0 makes it class-conditional (index K is ∅)."""

    def __init__(self, in_channels=1, channels=32, mults=(1, 2), blocks=1, num_classes=None, dropout=0.0,
                 schedule="cosine", T=1000):
        super().__init__()
        self.net = UNet(in_channels, channels, mults, blocks, num_classes, dropout)
        self.sched = make_schedule(schedule, T)
        self.num_classes = num_classes

    def forward(self, x_t, t, y=None):
        """ε_θ(x_t, t, y)."""
        return self.net(x_t, t, y)

    def loss(self, x0, y=None, *, p_uncond=0.0, generator=None):
        """L_simple (Ho eq. 14) on a batch x_0 (B, C, H, W): t ~ U{0..T−1}, ε ~ N(0, I), labels dropped to ∅
        with probability p_uncond."""
        gen = generator or core.random.default_generator
        x0 = np.asarray(x0.data if isinstance(x0, core.Tensor) else x0)
        t = gen.integers(0, self.sched.T, (len(x0),))
        eps = gen.normal(x0.shape).astype(x0.dtype)
        x_t, _ = ks.q_sample(x0, t, self.sched, noise=eps)  # √ᾱ_t x_0 + √(1 − ᾱ_t) ε (Ho eq. 4)
        if y is not None and self.num_classes:
            y = np.where(gen.bernoulli(p_uncond, (len(x0),)), self.num_classes, np.asarray(y))
        return F.mse_loss(self(core.tensor(x_t), t, y), core.tensor(eps))  # Ho eq. 14

    def guided_eps(self, x_t, t, y=None, w=0.0):
        """ε̃ = (1 + w) ε(x, c) − w ε(x) (Ho & Salimans eq. 6), both halves in one batch; w = 0 is ε(x, c)."""
        t = np.broadcast_to(np.asarray(t), (x_t.shape[0],))
        if y is None or w == 0:
            return self(x_t, t, y)
        null = np.full(len(y), self.num_classes)
        eps = self(core.cat([x_t, x_t], 0), np.concatenate([t, t]), np.concatenate([np.asarray(y), null]))
        cond, uncond = eps[: len(y)], eps[len(y) :]
        return cond * (1.0 + w) - uncond * w

    @core.no_grad()
    def sample(self, n, shape, *, y=None, w=0.0, steps=None, eta=0.0, clip_x0=1.0, generator=None):
        """n samples of `shape` (C, H, W) from x_T ~ N(0, I). steps=None or T: ancestral sampling (Ho
        Algorithm 2); fewer: DDIM (Song eq. 12, with σ from eq. 16 for η > 0) on evenly spaced timesteps."""
        gen = generator or core.random.default_generator
        T = self.sched.T
        steps = T if steps is None else steps
        if not 1 <= steps <= T:
            raise ValueError(f"ddpm.sample: steps must be in 1..{T}, got {steps}")
        dtype = self.net.inp.weight.dtype
        x = gen.normal((n, *shape)).astype(dtype)
        seed = lambda: int(gen.integers(0, 2**62, ()))  # noqa: E731 - the kernels draw z from Philox(seed)
        if steps == T:
            for t in range(T - 1, -1, -1):  # Algorithm 2: x_{t−1} = μ_θ(x_t, t) + σ_t z
                eps = self.guided_eps(core.tensor(x), t, y, w).data
                ks.ddpm_step(x, eps, t, self.sched, seed=seed(), clip_x0=clip_x0, out=x)  # x_t → x_{t−1} in place
        else:
            grid = np.linspace(0, T - 1, steps) if steps > 1 else [T - 1]  # starts at x_T (Song §4.2)
            ts = np.unique(np.round(grid).astype(np.int64))[::-1]
            for t, t_prev in zip(ts, list(ts[1:]) + [-1]):  # t_prev = −1: land on x_0
                eps = self.guided_eps(core.tensor(x), t, y, w).data
                ks.ddim_step(x, eps, int(t), int(t_prev), self.sched, eta, seed=seed(), clip_x0=clip_x0, out=x)
        return np.clip(x, -1.0, 1.0)


# ---------------------------------------------------------------------------------------------------------
# The registry contract (models/registry.py): train, load, sample, evaluate
# ---------------------------------------------------------------------------------------------------------
def build(cfg):
    """An untrained DDPM for the config's data."""
    from models.train import NUM_CLASSES

    return DDPM(1 if cfg.data == "digits" else 3, cfg.channels, tuple(cfg.mults), cfg.blocks,
                NUM_CLASSES[cfg.data] if cfg.conditional else None, cfg.dropout, cfg.schedule, cfg.T)


def train(cfg, out, *, resume=True, progress=True):
    """Minimize L_simple with Adam (warmup + cosine learning rate, gradient clipping), keeping an EMA of the
    weights for sampling; checkpoints to `out` (see models.train.fit)."""
    from models.train import dataset, fit

    x, y = dataset(cfg.data, cfg.resolution, "train")
    core.manual_seed(cfg.seed)
    model = build(cfg)
    opt = core.optim.Adam(model.parameters(), lr=cfg.lr)
    sched = core.optim.WarmupCosine(opt, min(cfg.warmup, cfg.steps), cfg.steps, min_lr=cfg.lr * 0.1)
    ema = core.optim.EMA(model, cfg.ema_decay)

    def step(xb, yb):
        loss = model.loss(xb, yb if cfg.conditional else None, p_uncond=cfg.p_uncond)
        opt.zero_grad()
        loss.backward()
        core.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()
        sched.step()
        return {"loss": loss.item()}

    return fit(cfg, out, model=model, optimizer=opt, scheduler=sched, ema=ema, step=step, data=(x, y),
               resume=resume, progress=progress)


def load(path):
    """(model with its EMA weights, in eval mode; Config) from a checkpoint of `train`; global RNG untouched."""
    from models.train import load_model

    return load_model(path, Config, build)


def sample(model, cfg, n, *, label=None, guidance=None, steps=None, seed=0, eta=0.0):
    """n images (n, C, H, W) in [-1, 1]. Conditional models take `label` (an int, an (n,) array, or None for
    0, 1, …, K−1 cycling) and `guidance` w (default cfg.guidance); `steps` DDIM steps (default
    cfg.sample_steps; cfg.T gives ancestral sampling). Depends only on `seed`."""
    from models.registry import UsageError
    from models.train import labels_for

    steps = cfg.sample_steps if steps is None else steps
    if not 1 <= steps <= cfg.T:
        raise UsageError(f"ddpm: steps must be in 1..{cfg.T}, got {steps}")
    if model.num_classes:
        y, w = labels_for(n, model.num_classes, label), cfg.guidance if guidance is None else guidance
    elif label is not None or guidance is not None:
        raise UsageError("ddpm: label and guidance need a class-conditional model (trained with conditional=True)")
    else:
        y, w = None, 0.0
    shape = (1 if cfg.data == "digits" else 3, cfg.resolution, cfg.resolution)
    out = []
    gen = core.random.Generator(seed)
    for i in range(0, n, 500):  # in chunks, to bound memory
        yi = None if y is None else y[i : i + 500]
        out.append(model.eval().sample(min(500, n - i), shape, y=yi, w=w, steps=steps, eta=eta,
                                       clip_x0=cfg.clip_x0, generator=gen))
    return np.concatenate(out).astype(np.float32)


def evaluate(model, cfg, *, seed=0, n=None, guidances=None):
    """Digits: FD-classifier to the test set of n DDIM samples (labels balanced), beside a Gaussian fitted to
    the training pixels and the real training set; the class agreement of the samples with their requested
    labels; and both at every guidance weight in `guidances` (default 0, 1, 2, 3, 4) for the guidance plot
    (`plot_guidance`). n defaults to the training set's size, the baselines' sample size (the Fréchet
    distance of finite sets is biased by their size, so only equal sizes compare). Shapes: the figures of
    `models.train.sampler_figures` on n = 2,000 samples (as GAN and VAE report them)."""
    from models import metrics
    from models.train import dataset, figure, sampler_figures

    if cfg.data != "digits":  # shapes: GAN's and VAE's figures on 2,000 samples, at w = cfg.guidance only (the
        n = 2000 if n is None else n  # sweep would cost 6 × 8,192 samples; no head reads the conditioning class)
        labels = np.arange(n) % model.num_classes if model.num_classes else None
        result = sampler_figures(sample(model, cfg, n, label=labels, seed=seed), cfg.data, cfg.resolution, seed=seed)
        return result | {"guidance": cfg.guidance if model.num_classes else None, "sample_steps": cfg.sample_steps}
    x_train, _ = dataset(cfg.data, cfg.resolution, "train")
    x_test, _ = dataset(cfg.data, cfg.resolution, "test")
    base = metrics.sampler_baselines(cfg.data, x_train, x_test, seed=seed)
    n = len(x_train) if n is None else n
    agree = model.num_classes and cfg.data == "digits"  # shapes' classifier heads name objects differently
    ws = sorted({cfg.guidance, *(guidances or (0, 1, 2, 3, 4))}) if model.num_classes else [None]
    sweep = []
    for w in ws:
        labels = np.arange(n) % model.num_classes if model.num_classes else None
        s = sample(model, cfg, n, label=labels, guidance=w, seed=seed)
        row = {"guidance": w, "fd_classifier": metrics.fd_classifier(s, x_test, cfg.data)}
        if agree:
            row["class_agreement"] = metrics.class_agreement(s, labels, cfg.data)
        sweep.append(row)
    main = next(r for r in sweep if r["guidance"] in (cfg.guidance, None))
    figures = [figure("FD-classifier", main["fd_classifier"], better="lower", gaussian=base["gaussian"],
                      real_train=base["train"])]
    if agree:
        figures.append(figure(f"class agreement (w={cfg.guidance:g})", main["class_agreement"], better="higher",
                              chance=1.0 / model.num_classes))
    return {"figures": figures, "guidance_sweep": sweep, "baselines": base, "samples": n,
            "sample_steps": cfg.sample_steps}


def plot_guidance(sweep, path, baselines=None):
    """Plot FD-classifier and class agreement against the guidance weight w (from `evaluate`'s sweep)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    w = [r["guidance"] for r in sweep]
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(w, [r["fd_classifier"] for r in sweep], "o-", color="C0", label="FD-classifier (samples)")
    for i, (name, v) in enumerate((baselines or {}).items()):
        ax.axhline(v, color=f"C{i + 2}", ls="--", lw=1, label=f"FD-classifier ({name.replace('_', ' ')})")
    ax.set_xlabel("guidance weight w  (ε̃ = (1+w)·ε(x,c) − w·ε(x))")
    ax.set_ylabel("FD-classifier (lower is better)")
    ax.set_yscale("log")
    ax2 = ax.twinx()
    ax2.plot(w, [100 * r["class_agreement"] for r in sweep], "s-", color="C1", label="class agreement")
    ax2.set_ylabel("class agreement (%)")
    ax2.set_ylim(0, 100)
    lines = ax.get_legend_handles_labels()[0] + ax2.get_legend_handles_labels()[0]
    ax.legend(lines, [ln.get_label() for ln in lines], fontsize=8, loc="center left")
    ax.set_title("DDPM on digits: classifier-free guidance")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
