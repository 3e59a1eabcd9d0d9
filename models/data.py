"""The datasets and a batching iterator. Nothing is downloaded: the data ships with an installed package
(scikit-learn's digits) or is generated here (shapes, see models/shapes.py).

- `digits(split, resolution)`: scikit-learn's bundled handwritten digits, 1,797 real 8×8 scans of the
  digits 0-9, as (N, 1, H, W) float32 in [-1, 1] and int64 labels.
- `shapes(n, resolution, ...)`: captioned images of colored shapes (re-exported from models.shapes).
- `Batches(*arrays, batch_size, ...)`: minibatches of NumPy arrays, a fresh permutation each epoch.

The digits split, exactly: the images of each digit are taken in the order `load_digits` returns them
and permuted by `np.random.default_rng(DIGITS_SPLIT_SEED + digit)`; the first DIGITS_TEST_PER_CLASS = 36
of each permutation form the test set (10 × 36 = 360 images, exactly balanced), the other 1,437 the
training set (174 to 183 per digit). Both sets keep the dataset's order.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from models.shapes import COLORS, POSITIONS, RELATIONS, SHAPES, SIZES, Shapes, parse_caption, render, shapes

__all__ = ["digits", "digits_split", "resize_bilinear", "Batches", "shapes", "Shapes", "parse_caption", "render",
           "SHAPES", "COLORS", "SIZES", "POSITIONS", "RELATIONS"]  # fmt: skip

DIGITS_TEST_PER_CLASS = 36
DIGITS_SPLIT_SEED = 0


@functools.lru_cache(maxsize=1)
def _load_digits():
    """(1797, 8, 8) float64 pixel values 0..16 and (1797,) int64 labels; read once per process."""
    from sklearn.datasets import load_digits  # imported here: it takes a second, and only digits needs it

    d = load_digits()
    return d.images, d.target.astype(np.int64)


def digits_split():
    """(train_indices, test_indices) into `load_digits()`: the fixed split described in the module docstring."""
    _, labels = _load_digits()
    test = []
    for digit in range(10):
        members = np.flatnonzero(labels == digit)
        order = np.random.default_rng(DIGITS_SPLIT_SEED + digit).permutation(len(members))
        test.append(members[order[:DIGITS_TEST_PER_CLASS]])
    test = np.sort(np.concatenate(test))
    train = np.setdiff1d(np.arange(len(labels)), test)
    return train, test


def digits(split="train", resolution=8, upscale="bilinear"):
    """The digits as (images (N, 1, R, R) float32 in [-1, 1], labels (N,) int64).

    split: "train" (1,437 images) or "test" (360) or "all" (1,797). Pixels v in 0..16 become v / 8 - 1.
    resolution: 8 (the scans as they are) or larger, e.g. 16, resized by `upscale`: "bilinear"
    (`resize_bilinear`, PyTorch's F.interpolate(mode="bilinear", align_corners=False)) or "nearest"
    (each pixel repeated; the resolution must then be a multiple of 8).
    """
    if split not in ("train", "test", "all"):
        raise ValueError(f"digits: split must be 'train', 'test' or 'all', got {split!r}")
    if not isinstance(resolution, (int, np.integer)) or resolution < 8:
        raise ValueError(f"digits: resolution must be an int >= 8, got {resolution!r}")
    if upscale not in ("bilinear", "nearest"):
        raise ValueError(f"digits: upscale must be 'bilinear' or 'nearest', got {upscale!r}")
    pixels, labels = _load_digits()
    if split != "all":
        keep = digits_split()[split == "test"]
        pixels, labels = pixels[keep], labels[keep]
    x = (pixels / 8 - 1).astype(np.float32)[:, None]  # 0..16 -> [-1, 1]
    if resolution != 8:
        if upscale == "nearest":
            if resolution % 8:
                raise ValueError(f"digits: upscale='nearest' needs a multiple of 8, got resolution={resolution}")
            k = resolution // 8
            x = x.repeat(k, axis=2).repeat(k, axis=3)
        else:
            x = resize_bilinear(x, resolution)
    return x, labels.copy()


def resize_bilinear(x, size):
    """Resize the last two axes of x to size × size by bilinear interpolation, half-pixel centres
    (PyTorch's F.interpolate(mode="bilinear", align_corners=False)).

    Output pixel j sits at input coordinate (j + 0.5) · in/out - 0.5, clamped to [0, in - 1]; its value
    mixes the two nearest input pixels by distance. Separable: one (out, in) weight matrix per axis.
    """

    def weights(n_in, n_out):
        pos = np.clip((np.arange(n_out) + 0.5) * n_in / n_out - 0.5, 0, n_in - 1)
        lo = np.floor(pos).astype(np.int64)
        hi = np.minimum(lo + 1, n_in - 1)
        frac = pos - lo
        w = np.zeros((n_out, n_in))
        np.add.at(w, (np.arange(n_out), lo), 1 - frac)
        np.add.at(w, (np.arange(n_out), hi), frac)
        return w

    wh, ww = weights(x.shape[-2], size), weights(x.shape[-1], size)
    return np.einsum("oh,...hw,pw->...op", wh, x.astype(np.float64), ww).astype(x.dtype)


class Batches:
    """Minibatches over arrays that share their first axis (NumPy arrays, or lists such as captions).

        loader = Batches(images, labels, batch_size=64, seed=0)
        for epoch in range(10):
            for x, y in loader:   # each pass is one epoch, in a new order
                ...

    Each `iter(loader)` is one epoch and yields tuples (one entry per array, NumPy arrays or lists as
    given; wrap them with core.tensor in the training loop). With shuffle, the order of epoch e is
    `np.random.default_rng([seed, e]).permutation(N)`: the same seed gives the same batches, every
    index appears exactly once per epoch (the last batch may be short unless drop_last), and a resumed
    run only has to restore `epoch` (like PyTorch's `DistributedSampler.set_epoch`). seed=None takes one
    from core.random's default generator, so `core.manual_seed` fixes it too.
    """

    def __init__(self, *arrays, batch_size, shuffle=True, drop_last=False, seed=None):
        if not arrays:
            raise ValueError("Batches: needs at least one array")
        n = len(arrays[0])
        if any(len(a) != n for a in arrays):
            raise ValueError(f"Batches: arrays must have the same length, got {[len(a) for a in arrays]}")
        if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
            raise ValueError(f"Batches: batch_size must be a positive int, got {batch_size!r}")
        if seed is not None and (not isinstance(seed, (int, np.integer)) or seed < 0):
            raise ValueError(f"Batches: seed must be a non-negative int or None, got {seed!r}")
        if seed is None:
            from core.random import default_generator

            seed = int(default_generator.integers(0, 2**63 - 1, ()))
        self.arrays, self.n, self.batch_size = arrays, n, int(batch_size)
        self.shuffle, self.drop_last, self.seed = shuffle, drop_last, seed
        self.epoch = 0

    def __len__(self):
        """Batches per epoch."""
        return self.n // self.batch_size if self.drop_last else math.ceil(self.n / self.batch_size)

    def order(self, epoch):
        """The order in which epoch `epoch` visits the indices."""
        return np.random.default_rng([self.seed, epoch]).permutation(self.n) if self.shuffle else np.arange(self.n)

    def __iter__(self):
        order = self.order(self.epoch)  # drawn now, not at the first next(): one iter() = one epoch
        self.epoch += 1
        return self._epoch(order)

    def _epoch(self, order):
        for b in range(len(self)):
            idx = order[b * self.batch_size : (b + 1) * self.batch_size]
            yield tuple([a[i] for i in idx] if isinstance(a, (list, tuple)) else a[idx] for a in self.arrays)
