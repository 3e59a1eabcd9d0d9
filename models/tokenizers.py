"""What the three discrete image tokenizers (VQ-VAE, DALL·E's dVAE, VQ-GAN) share: the convolutional
encoder and decoder, the interface the text-to-image models use, and the reconstruction figures.

The interface (`ImageTokenizer`), which DALL·E, DALL·E 2 and ERNIE-ViLG rely on:

    tokens = model.encode(images)     # (B, C, H, W) float in [-1, 1]  ->  (B, h, w) int64 in [0, K)
    images = model.decode(tokens)     # (B, h, w) ints                  ->  (B, C, H, W) float32 in [-1, 1]
    model.codebook_size               # K, the number of distinct tokens
    model.grid                        # (h, w), the token grid of one image (8×8 for 32×32 shapes)

Both take NumPy arrays (or Tensors), run without a graph in eval mode (the module's mode is restored
afterwards), in batches, and return NumPy arrays. A tokenizer implements `_encode(x: Tensor) -> Tensor
of codes` and `_decode(codes: ndarray) -> Tensor of images`, and sets `codebook_size`, `grid`,
`channels` and `resolution`.

The networks (`Encoder`, `Decoder`) follow the VQ-VAE's (van den Oord et al. 2017, §4.1: strided
convolutions down, residual blocks of ReLU, 3×3 conv, ReLU, 1×1 conv) with the dVAE's stability details
(Ramesh et al. 2021, App. A.1): the encoder ends and the decoder begins with a 1×1 convolution (the
decoder's first 1×1 conv applied to a one-hot code is a lookup in a codebook, its weight), and each
residual branch may be scaled by a small constant (1/L² for L blocks) so that the stack starts near
the identity. Channels double at each halving of the resolution, `width` being those at the token grid.

Evaluation (`reconstruction_figures`), on the 1,024 shapes of the test split (never trained on):
MSE and PSNR of decode(encode(x)), the shipped shapes classifier's accuracy on reconstructions over
its accuracy on the originals (do the tokens keep what a caption talks about?), codebook usage
(perplexity and fraction of codes in use) and the FD-classifier between reconstructions and the test
images, each beside the same figure for a baseline measured in the same call.
"""

from __future__ import annotations

import math

import numpy as np

import core
from core import nn
from models import train as loop
from models.registry import UsageError

DATA = ("shapes",)
CHANNELS = {"digits": 1, "shapes": 3}


# --- the networks ---------------------------------------------------------------------------------


class ResBlock(nn.Module):
    """x + scale · conv1×1(ReLU(conv3×3(ReLU(x)))) (van den Oord et al. 2017, §4.1); `scale` = 1/L² in
    the dVAE (Ramesh et al. 2021, App. A.1), 1 otherwise. `hidden`: the branch's inner channels."""

    def __init__(self, channels, hidden=None, scale=1.0):
        super().__init__()
        hidden = hidden or channels
        self.conv1 = nn.Conv2d(channels, hidden, 3, 1, 1)
        self.conv2 = nn.Conv2d(hidden, channels, 1)
        self.scale = scale

    def forward(self, x):
        h = self.conv2(self.conv1(x.relu()).relu())
        return x + (h if self.scale == 1.0 else self.scale * h)


def _widths(width, levels):
    """Channels at each resolution from the image's (index 0) to the token grid's (= width), doubling per halving."""
    if width % 2 ** levels:
        raise ValueError(f"tokenizers: width must be divisible by 2**levels = {2 ** levels}, got width={width}")
    return [width // 2 ** (levels - i) for i in range(levels + 1)]


class Encoder(nn.Module):
    """image (N, in_ch, H, W) → (N, out_ch, H/2^downs, W/2^downs): a 3×3 conv stem, `downs` stride-2 4×4
    convolutions (doubling the channels), `blocks` residual blocks at the token grid, ReLU, then a 1×1
    conv to `out_ch` (the code vectors z_e of a VQ-VAE, or the logits over K codes of a dVAE)."""

    def __init__(self, in_ch, width, out_ch, downs, blocks=2, *, scale=1.0, hidden=None):
        super().__init__()
        w = _widths(width, downs)
        layers = [nn.Conv2d(in_ch, w[0], 3, 1, 1)]
        for i in range(downs):
            layers += [nn.ReLU(), nn.Conv2d(w[i], w[i + 1], 4, 2, 1)]
        layers += [ResBlock(width, hidden, scale) for _ in range(blocks)]
        layers += [nn.ReLU(), nn.Conv2d(width, out_ch, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class Decoder(nn.Module):
    """codes (N, in_ch, h, w) → image (N, out_ch, h·2^ups, w·2^ups): a 1×1 conv from `in_ch` (on a one-hot
    code: the codebook), `blocks` residual blocks, `ups` stride-2 4×4 transposed convolutions (halving
    the channels), ReLU, and a 3×3 conv to `out_ch`: `self.out`, the "last layer" of VQ-GAN's adaptive
    weight."""

    def __init__(self, in_ch, width, out_ch, ups, blocks=2, *, scale=1.0, hidden=None):
        super().__init__()
        w = _widths(width, ups)[::-1]
        layers = [nn.Conv2d(in_ch, width, 1)]
        layers += [ResBlock(width, hidden, scale) for _ in range(blocks)]
        for i in range(ups):
            layers += [nn.ReLU(), nn.ConvTranspose2d(w[i], w[i + 1], 4, 2, 1)]
        self.net = nn.Sequential(*layers, nn.ReLU())
        self.out = nn.Conv2d(w[-1], out_ch, 3, 1, 1)

    def forward(self, z):
        return self.out(self.net(z))


# --- the interface --------------------------------------------------------------------------------


class ImageTokenizer:
    """Mixin for an nn.Module that turns images into a grid of discrete tokens and back (see the module
    docstring). Subclasses set `codebook_size`, `grid`, `channels`, `resolution` and implement `_encode`
    and `_decode`."""

    codebook_size: int
    grid: tuple
    channels: int
    resolution: int

    def encode(self, images, batch_size=256):
        """(B, h, w) int64 tokens of images (B, C, H, W) in [-1, 1] (the nearest / most likely code per cell)."""
        x = images.numpy() if isinstance(images, core.Tensor) else np.asarray(images)
        want = (self.channels, self.resolution, self.resolution)
        if x.ndim != 4 or x.shape[1:] != want:
            raise ValueError(f"{type(self).__name__}.encode: images must be (B, {', '.join(map(str, want))}), "
                             f"got shape {x.shape}")
        was_training = self.training
        self.eval()
        out = [np.zeros((0, *self.grid), np.int64)]
        try:
            with core.no_grad():
                for i in range(0, len(x), batch_size):
                    codes = self._encode(core.tensor(x[i : i + batch_size].astype(np.float32)))
                    out.append(np.asarray(codes.numpy(), np.int64))
        finally:  # the caller's mode back, also after an error
            self.train(was_training)
        return np.concatenate(out)

    def decode(self, tokens, batch_size=256):
        """(B, C, H, W) float32 images in [-1, 1] of tokens (B, h, w), each in [0, codebook_size)."""
        t = tokens.numpy() if isinstance(tokens, core.Tensor) else np.asarray(tokens)
        if t.ndim != 3 or t.shape[1:] != tuple(self.grid) or (t.size and t.dtype.kind not in "iu"):
            raise ValueError(f"{type(self).__name__}.decode: tokens must be ints of shape (B, {self.grid[0]}, "
                             f"{self.grid[1]}), got {t.dtype} of shape {t.shape}")
        if t.size and (t.min() < 0 or t.max() >= self.codebook_size):
            raise ValueError(f"{type(self).__name__}.decode: tokens must lie in [0, {self.codebook_size}), "
                             f"got values in [{t.min()}, {t.max()}]")
        was_training = self.training
        self.eval()
        out = [np.zeros((0, self.channels, self.resolution, self.resolution), np.float32)]
        try:
            with core.no_grad():
                for i in range(0, len(t), batch_size):
                    out.append(np.clip(self._decode(t[i : i + batch_size].astype(np.int64)).numpy(), -1, 1))
        finally:  # the caller's mode back, also after an error
            self.train(was_training)
        return np.concatenate(out).astype(np.float32)

    def reconstruct(self, images):
        """decode(encode(images)): what survives the trip through the tokens."""
        return self.decode(self.encode(images))


# --- evaluation and sampling, shared by the three tokenizers --------------------------------------


def usage(tokens, codebook_size):
    """(perplexity, fraction of codes in use) of a set of tokens: exp of the entropy of the codes'
    empirical frequencies (K when all are used equally, 1 under collapse), and how many occur at all / K."""
    tokens = np.asarray(tokens).ravel()
    if tokens.size and not (0 <= tokens.min() and tokens.max() < codebook_size):
        raise ValueError(f"usage: tokens must lie in [0, {codebook_size}), got {tokens.min()}..{tokens.max()}")
    counts = np.bincount(tokens, minlength=codebook_size).astype(np.float64)
    p = counts / max(counts.sum(), 1)
    entropy = -(p[p > 0] * np.log(p[p > 0])).sum()
    return float(np.exp(entropy)), float((counts > 0).mean())


def psnr(mse, peak_to_peak=2.0):
    """Peak signal-to-noise ratio in dB of a mean squared error, for images spanning `peak_to_peak` ([-1, 1]: 2)."""
    return 10 * math.log10(peak_to_peak ** 2 / mse) if mse > 0 else math.inf


def pooled(images, grid):
    """The baseline of the same spatial budget without a codebook: each image averaged over grid × grid
    cells (continuous values), then upsampled back by repetition."""
    n, c, r, _ = images.shape
    f = r // grid
    cells = images.reshape(n, c, grid, f, grid, f).mean((3, 5), keepdims=True)
    return np.broadcast_to(cells, (n, c, grid, f, grid, f)).reshape(images.shape).astype(np.float32)


def held_out(cfg, n=None):
    """(images, classifier labels) of the first `n` (default: all 1,024) images of the test split of
    cfg.data (never trained on); for shapes, the canonical attribute labels of
    `models.classifier.shapes_labels`, else None."""
    from models import data
    from models.classifier import shapes_labels

    x, _ = loop.dataset(cfg.data, cfg.resolution, "test")
    n = len(x) if n is None else n
    if cfg.data != "shapes":
        return x[:n], None
    s = data.shapes(loop.SHAPES_N["test"], cfg.resolution, seed=0, split="test")
    if not np.array_equal(s.images, x):
        raise AssertionError("tokenizers.held_out: the shapes test split changed under the cached dataset")
    return x[:n], {k: v[:n] for k, v in shapes_labels(s).items()}


def _judge(net, images):
    """(Gaussian fit of the classifier's features, dict head -> predictions) of images, in one pass."""
    from models import metrics

    feats = metrics.features(net, images)
    with core.no_grad():
        f = core.tensor(feats.astype(np.float32))
        pred = {k: head(f).numpy().argmax(1) for k, head in net.heads.items()}
    return metrics.gaussian_fit(feats), pred


def reconstruction_figures(model, cfg, *, seed=0, n=None):
    """{"figures": [...], ...} of a trained tokenizer on the first `n` (default: all 1,024) held-out
    test images (see the module docstring).

    Baselines measured here: `pooled` (the image averaged over the token grid's cells, continuous: what
    the grid's resolution alone keeps), as many real training images (the FD floor) and the originals
    (the classifier's accuracy). `seed` is unused (the evaluation is deterministic); it is kept for the
    registry's signature.
    """
    from models import metrics
    from models.classifier import load_classifier

    x, labels = held_out(cfg, n)
    tokens = model.encode(x)
    rec = model.decode(tokens)
    base = pooled(x, model.grid[0])
    x_train = loop.dataset(cfg.data, cfg.resolution, "train")[0][: len(x)]
    net = load_classifier(cfg.data, cfg.resolution)
    fit, pred = {}, {}
    for k, v in (("test", x), ("model", rec), ("pooled_grid", base), ("real_train", x_train)):
        fit[k], pred[k] = _judge(net, v)
    fd = {k: metrics.frechet_distance(*fit[k], *fit["test"]) for k in ("model", "pooled_grid", "real_train")}
    mse, mse_base = float(((rec - x) ** 2).mean()), float(((base - x) ** 2).mean())
    perplexity, in_use = usage(tokens, model.codebook_size)
    figures = [
        loop.figure("reconstruction MSE", mse, better="lower", pooled_grid=mse_base),
        loop.figure("reconstruction PSNR", psnr(mse), better="higher", unit="dB", pooled_grid=psnr(mse_base)),
        loop.figure("codebook perplexity", perplexity, better="higher", codebook_size=model.codebook_size),
        loop.figure("codes in use", in_use, better="higher", unit="fraction", bar=0.25),
        loop.figure("FD-classifier (reconstructions vs test)", fd["model"], better="lower",
                    pooled_grid=fd["pooled_grid"], real_train=fd["real_train"]),
    ]
    result = {"figures": figures, "images": len(x), "grid": list(model.grid), "codebook_size": model.codebook_size}
    if labels is not None:  # accuracy over the heads that apply (label -1: the head says nothing of the image)
        acc = {k: {h: float((pred[k][h][y >= 0] == y[y >= 0]).mean()) for h, y in labels.items() if (y >= 0).any()}
               for k in ("test", "model", "pooled_grid")}
        mean = {k: float(np.mean(list(a.values()))) for k, a in acc.items()}  # averaged over the heads
        figures.append(loop.figure("classifier accuracy on reconstructions / on originals",
                                   mean["model"] / mean["test"], better="higher", bar=0.95,
                                   pooled_grid=mean["pooled_grid"] / mean["test"]))
        result["classifier_accuracy"] = {"originals": acc["test"], "reconstructions": acc["model"]}
    return result


def sample(model, cfg, n, *, seed=0, nrow=None, **options):
    """n held-out originals and their reconstructions as one (m, C, H, W) array: with k = nrow (default
    ceil(√n)) images per row, each row of k originals is followed by the row of their k reconstructions (the
    last row pair padded with gray). The originals are a random pick of the test split by `seed`."""
    if options:
        raise UsageError(f"{type(model).__name__.lower()}: a tokenizer's sample shows reconstructions of "
                         f"test images; {', '.join('--' + k.replace('_', '-') for k in options)} do(es) not apply")
    if n < 1:
        raise UsageError(f"sample: n must be >= 1, got {n}")
    x, _ = loop.dataset(cfg.data, cfg.resolution, "test")
    x = x[np.random.default_rng(seed).choice(len(x), size=n, replace=n > len(x))]
    rec = model.reconstruct(x)
    k = nrow or math.ceil(math.sqrt(n))
    pad = (-n) % k
    blank = np.zeros((pad, *x.shape[1:]), np.float32)
    x, rec = np.concatenate([x, blank]), np.concatenate([rec, blank])
    rows = [a[i : i + k] for i in range(0, n + pad, k) for a in (x, rec)]
    return np.concatenate(rows).astype(np.float32)
