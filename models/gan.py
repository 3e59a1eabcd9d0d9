"""GAN: a generator G learns to turn noise z into images by fooling a discriminator D that learns to
tell them from real ones (Goodfellow et al. 2014), with the convolutional architecture of DCGAN
(Radford et al. 2016) and, optionally, class conditioning (Mirza & Osindero 2014; the discriminator's
projection of Miyato & Koyama 2018).

The game (Goodfellow et al. 2014, eq. 1):

    min_G max_D  V(D, G) = E_x[log D(x)] + E_z[log(1 − D(G(z)))]

D ascends V, a binary classification of real (1) against generated (0) images. G would descend V,
but early in training D rejects G's samples easily, log(1 − D(G(z))) saturates and G gets no
gradient; so G instead maximizes log D(G(z)) (the "−log D trick", Goodfellow et al. 2014 §3), the
non-saturating loss used here. One D step and one G step alternate (Algorithm 1 with k = 1), both
with Adam at lr 2e-4 and β1 = 0.5 (Radford et al. 2016 §4).

DCGAN's rules (Radford et al. 2016 §3): no pooling or fully connected hidden layers (strided
convolutions in D, transposed convolutions in G), BatchNorm in both except G's output and D's input
layer, ReLU in G with tanh at the output, LeakyReLU(0.2) in D, weights drawn from N(0, 0.02).

Conditional variant: G sees [z, e_G(y)] (a learned class embedding concatenated to the noise) and
D scores  D(x, y) = ψ(φ(x)) + e_D(y)·φ(x)  (projection discriminator, Miyato & Koyama 2018, eq. 3),
where φ(x) are D's last features and ψ a linear layer.

    python -m models.cli train gan --data digits --out gan.safetensors
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np

import core
from core import F, init, nn
from models import train as loop
from models.registry import UsageError


@dataclasses.dataclass
class Config:
    """Defaults: the measured bar run on 8×8 digits (see README)."""

    data: str = "digits"
    resolution: int = 8
    steps: int = 3000
    batch_size: int = 64
    lr: float = 2e-4  # Radford et al. 2016 §4
    beta1: float = 0.5  # Radford et al. 2016 §4: 0.9 oscillated
    seed: int = 0
    nz: int = 64  # noise dimensions
    ngf: int = 64  # generator width at the output resolution (doubling per halving)
    ndf: int = 64  # discriminator width at its first layer (doubling per halving)
    conditional: bool = True
    embed_dim: int = 32  # size of G's class embedding
    checkpoint_every: int = 500
    eval_samples: int = 2000  # samples per figure in evaluate

    def __post_init__(self):
        r = self.resolution
        if r < 8 or r & (r - 1):
            raise ValueError(f"gan.Config: resolution must be a power of two >= 8, got {r}")


PRESETS = {"shapes": {"resolution": 16, "steps": 2000}}


def _blocks(resolution):
    """How many stride-2 layers between 4×4 and the image: log2(resolution) − 2."""
    return int(math.log2(resolution)) - 2


class Generator(nn.Module):
    """z (N, nz) [+ class] → 1×1 → 4×4 → … → resolution², transposed convolutions only."""

    def __init__(self, cfg, channels, num_classes):
        super().__init__()
        k = _blocks(cfg.resolution)
        width = cfg.ngf * 2 ** (k - 1)  # channels at 4×4
        self.embed = nn.Embedding(num_classes, cfg.embed_dim) if num_classes else None
        zin = cfg.nz + (cfg.embed_dim if num_classes else 0)
        layers = [nn.ConvTranspose2d(zin, width, 4, 1, 0, bias=False), nn.BatchNorm2d(width), nn.ReLU(),  # 1 → 4
                  nn.ConvTranspose2d(width, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.ReLU()]
        for _ in range(k - 1):  # 4 → 8 → … → resolution/2, halving the width
            layers += [nn.ConvTranspose2d(width, width // 2, 4, 2, 1, bias=False), nn.BatchNorm2d(width // 2),
                       nn.ReLU()]
            width //= 2
        layers += [nn.ConvTranspose2d(width, channels, 4, 2, 1), nn.Tanh()]  # → resolution, in [-1, 1]
        self.net = nn.Sequential(*layers)

    def forward(self, z, y=None):
        if self.embed is not None:
            z = core.cat([z, self.embed(y)], dim=1)  # Mirza & Osindero 2014: condition by concatenation
        return self.net(z.reshape(z.shape[0], z.shape[1], 1, 1))


class Discriminator(nn.Module):
    """image → strided convolutions down to 4×4 → features φ(x) → one logit (+ the class projection)."""

    def __init__(self, cfg, channels, num_classes):
        super().__init__()
        k = _blocks(cfg.resolution)
        width = cfg.ndf
        layers = [nn.Conv2d(channels, width, 4, 2, 1), nn.LeakyReLU(0.2)]  # no BatchNorm on the input layer
        for _ in range(k - 1):
            layers += [nn.Conv2d(width, 2 * width, 4, 2, 1, bias=False), nn.BatchNorm2d(2 * width), nn.LeakyReLU(0.2)]
            width *= 2
        layers += [nn.Conv2d(width, width, 3, 1, 1, bias=False), nn.BatchNorm2d(width), nn.LeakyReLU(0.2)]
        self.net = nn.Sequential(*layers)
        self.psi = nn.Linear(width * 16, 1)  # ψ: equivalent to DCGAN's final 4×4 convolution
        self.embed = nn.Embedding(num_classes, width * 16) if num_classes else None

    def forward(self, x, y=None):
        phi = self.net(x).flatten(1)  # φ(x): (N, width·4·4)
        logit = self.psi(phi).reshape(-1)
        if self.embed is not None:
            logit = logit + (self.embed(y) * phi).sum(1)  # Miyato & Koyama 2018, eq. 3: + e(y)ᵀφ(x)
        return logit


class GAN(nn.Module):
    """The pair (G, D) as one module, so one checkpoint holds both."""

    def __init__(self, cfg, channels, num_classes):
        super().__init__()
        k = num_classes if cfg.conditional else 0
        self.G, self.D = Generator(cfg, channels, k), Discriminator(cfg, channels, k)
        self.num_classes, self.nz = k, cfg.nz
        for m in self.modules():  # Radford et al. 2016 §4: all weights from N(0, 0.02)
            if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear, nn.Embedding)):
                init.normal_(m.weight, 0.0, 0.02)
            elif isinstance(m, nn.BatchNorm2d):
                init.normal_(m.weight, 1.0, 0.02)


def build(cfg):
    """The (untrained) GAN of a config, for its dataset's channels and classes."""
    channels = 1 if cfg.data == "digits" else 3
    return GAN(cfg, channels, loop.NUM_CLASSES[cfg.data])


# --- losses ---------------------------------------------------------------------------------------


def d_loss(real_logits, fake_logits):
    """−V(D, G) of Goodfellow et al. 2014, eq. 1, as D minimizes it:
    −log D(x) − log(1 − D(G(z))), with D = sigmoid(logit), i.e. binary cross-entropy real→1, fake→0."""
    ones, zeros = core.ones(*real_logits.shape), core.zeros(*fake_logits.shape)
    return (F.binary_cross_entropy_with_logits(real_logits, ones)
            + F.binary_cross_entropy_with_logits(fake_logits, zeros))


def g_loss(fake_logits):
    """The non-saturating generator loss −log D(G(z)) (Goodfellow et al. 2014 §3), i.e. fake→1."""
    return F.binary_cross_entropy_with_logits(fake_logits, core.ones(*fake_logits.shape))


# --- training -------------------------------------------------------------------------------------


def train(cfg, out, *, resume=True, progress=True):
    """Alternate one D step and one G step per batch (Goodfellow et al. 2014, Algorithm 1, k = 1)."""
    x, y = loop.dataset(cfg.data, cfg.resolution, "train")
    core.manual_seed(cfg.seed)
    model = build(cfg)
    G, D = model.G, model.D
    opt = loop.Group(g=core.optim.Adam(G.parameters(), lr=cfg.lr, betas=(cfg.beta1, 0.999)),
                     d=core.optim.Adam(D.parameters(), lr=cfg.lr, betas=(cfg.beta1, 0.999)))

    def step(xb, yb):
        cond = core.tensor(yb) if model.num_classes else None  # fakes get the batch's labels: balanced classes
        real = core.tensor(xb)
        fake = G(core.randn(len(xb), cfg.nz), cond)
        # D ascends eq. 1 on real and (detached) generated images
        ld = d_loss(D(real, cond), D(fake.detach(), cond))
        opt["d"].zero_grad()
        ld.backward()
        opt["d"].step()
        # G descends −log D(G(z)) through the updated D
        lg = g_loss(D(fake, cond))
        opt["g"].zero_grad()
        lg.backward()
        opt["g"].step()
        return {"d": ld.item(), "g": lg.item()}

    return loop.fit(cfg, out, model=model, optimizer=opt, step=step, data=(x, y), resume=resume,
                    progress=progress, name="gan")


def load(path):
    """(model, cfg) from a checkpoint written by `train`, in eval mode."""
    return loop.load_model(path, Config, build)


# --- sampling and evaluation ----------------------------------------------------------------------


def sample(model, cfg, n, *, label=None, guidance=None, steps=None, seed=0):
    """n images G(z), z ~ N(0, I) from a generator seeded by `seed`; (n, C, H, W) float32 in [-1, 1]."""
    if guidance is not None or steps is not None:
        raise UsageError("gan: sampling is one forward pass of G; --guidance and --steps do not apply")
    if label is not None and not model.num_classes:
        raise UsageError("gan: this model is unconditional (trained with conditional=false); omit --label")
    gen = core.random.Generator(seed)
    y = loop.labels_for(n, model.num_classes, label) if model.num_classes else None
    model.eval()
    out = []
    with core.no_grad():
        for i in range(0, n, 500):
            z = core.randn(min(500, n - i), cfg.nz, generator=gen)
            out.append(model.G(z, None if y is None else core.tensor(y[i : i + 500])).numpy())
    return np.concatenate(out).astype(np.float32)


def evaluate(model, cfg, *, seed=0):
    """FD-classifier of samples against the test set, beside the same figure for a Gaussian fitted to the
    training pixels and for the real training set; mode coverage (the classifier's per-class frequency
    of samples) and, for a conditional model, class agreement (`models.train.sampler_figures`)."""
    n = cfg.eval_samples
    labels = loop.labels_for(n, model.num_classes) if model.num_classes else None
    return loop.sampler_figures(sample(model, cfg, n, seed=seed), cfg.data, cfg.resolution, labels=labels, seed=seed)
