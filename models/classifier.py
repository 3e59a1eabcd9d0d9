"""The feature networks behind the metrics: a small convolutional classifier per dataset and resolution,
trained here on the project's own engine (nothing can be downloaded), with its weights shipped in
models/weights/ so that every metric built on it is the same number on every run.

    net = load_classifier("digits")          # 8×8 digits: one head, "label"
    net = load_classifier("shapes", 16)      # 16×16 shapes: one head per attribute
    logits = net(core.tensor(images))        # dict head -> (N, classes) logits
    feats = net.features(core.tensor(images))   # (N, D) penultimate activations

The network: a 3×3 convolution at full resolution (stride 2 from 32×32 up), stride-2 3×3
convolutions down to 4×4 and one more 3×3 convolution there, each followed by GroupNorm and ReLU (GroupNorm,
not BatchNorm, so that a sample's features never depend on the rest of its batch), then a global
average pool: the (N, D) "features" that the Fréchet distance compares. A linear head per label reads the features.

Shapes labels are made canonical first, because the captions are not: "A left of B" and "B right of
A" are the same picture, so the object the caption names first cannot be told from the image. The
classifier's object 0 is the left object of a horizontal pair and the upper object of a vertical one
(`shapes_labels`); its heads are n_objects, axis (horizontal/vertical pair), shape/color/size of
object 0 and of object 1, and the position region of a lone object. Heads that do not apply to an
image (object 1 of a one-object image, ...) hold the label -1 and are ignored by the loss.
"""

from __future__ import annotations

import functools
import json
import os
import time

import numpy as np

import core
from core import F, nn
from models.shapes import COLORS, POSITIONS, RELATIONS, SHAPES, SIZES

WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
DATASETS = ("digits", "shapes")
RESOLUTIONS = {"digits": (8, 16), "shapes": (16, 32)}
DEFAULT_RESOLUTION = {"digits": 8, "shapes": 32}  # the datasets' own defaults (models.data)
AXES = ("horizontal", "vertical")  # canonical relation of a pair: object 0 left of / above object 1
SHAPES_HEADS = {"n_objects": 2, "axis": len(AXES), "shape0": len(SHAPES), "color0": len(COLORS),
                "size0": len(SIZES), "shape1": len(SHAPES), "color1": len(COLORS), "size1": len(SIZES),
                "position": len(POSITIONS)}  # fmt: skip

# Training recipes per dataset and resolution (see `train_classifier`). Shapes need many more steps than
# digits: the shape heads (a small diamond and a small cross differ by a few pixels) learn last.
_DIGITS = dict(widths=(32, 64, 64), steps=600, batch_size=64, lr=3e-3)
_SHAPES = dict(widths=(32, 64, 96), steps=3000, batch_size=64, lr=3e-3, n_train=16384, n_test=2048)
RECIPES = {("digits", 8): _DIGITS, ("digits", 16): _DIGITS,
           ("shapes", 16): _SHAPES, ("shapes", 32): dict(_SHAPES, batch_size=32)}  # fmt: skip


class Classifier(nn.Module):
    """Conv → GroupNorm → ReLU blocks down to 4×4, global average pool, one linear head per label."""

    def __init__(self, in_channels, resolution, heads, widths=(32, 64, 64)):
        super().__init__()
        if resolution < 4 or resolution & (resolution - 1):
            raise ValueError(f"Classifier: resolution must be a power of two >= 4, got {resolution}")
        self.in_channels, self.resolution, self.head_sizes, self.widths = in_channels, resolution, dict(heads), widths
        # A stride-2 stem above 16×16 (full-resolution layers cost the most), then stride-2 convolutions
        # down to 4×4 and one more convolution there.
        stem = 2 if resolution >= 32 else 1
        n_down = int(np.log2(resolution // stem // 4))
        strides = [stem] + [2] * n_down + [1]
        layers, c_in = [], in_channels
        for i, stride in enumerate(strides):
            c = widths[min(i, len(widths) - 1)]
            layers += [nn.Conv2d(c_in, c, 3, stride=stride, padding=1), nn.GroupNorm(8, c), nn.ReLU()]
            c_in = c
        self.body = nn.Sequential(*layers)
        self.dim = c_in
        self.heads = nn.ModuleDict({name: nn.Linear(c_in, k) for name, k in self.head_sizes.items()})

    def config(self):
        """The constructor's arguments, as stored beside the weights."""
        return dict(in_channels=self.in_channels, resolution=self.resolution, heads=self.head_sizes,
                    widths=list(self.widths))  # fmt: skip

    def features(self, x):
        """(N, C, R, R) images in [-1, 1] -> (N, D) penultimate activations (globally pooled)."""
        if x.ndim != 4 or tuple(x.shape[1:]) != (self.in_channels, self.resolution, self.resolution):
            raise ValueError(f"Classifier: expected images (N, {self.in_channels}, {self.resolution}, "
                             f"{self.resolution}), got shape {tuple(x.shape)}")  # fmt: skip
        return self.body(x).mean((2, 3))

    def forward(self, x):
        """dict head -> (N, classes) logits."""
        f = self.features(x)
        return {name: head(f) for name, head in self.heads.items()}


# --- labels ---------------------------------------------------------------------------------------


def shapes_labels(data):
    """Canonical label arrays (dict head -> (N,) int64, -1 where a head does not apply) of a
    `models.shapes.Shapes` set or of a dict with its fields n_objects, shape, color, size, position and
    relation (arrays, or one image's lists as `parse_caption` returns them).

    A pair "A right of B" / "A below B" is swapped into "B left of A" / "B above A", so object 0 is
    always the left (or upper) object: a fact the image shows, unlike the caption's word order.
    """
    if isinstance(data, dict) and np.ndim(data["n_objects"]) == 0:  # one caption's labels
        data = _caption_arrays(data)
    get = (lambda k: data[k]) if isinstance(data, dict) else (lambda k: getattr(data, k))
    n_obj = np.asarray(get("n_objects"), np.int64)
    shape, color, size, position = (np.asarray(get(k), np.int64).copy() for k in ("shape", "color", "size", "position"))
    relation = np.asarray(get("relation"), np.int64)
    two = n_obj == 2
    swap = two & ((relation == RELATIONS.index("right of")) | (relation == RELATIONS.index("below")))
    for a in (shape, color, size):
        a[swap] = a[swap][:, ::-1]
    axis = np.where(two, np.where(relation >= RELATIONS.index("above"), 1, 0), -1)
    one = ~two
    return dict(n_objects=n_obj - 1, axis=axis,
                shape0=shape[:, 0], color0=color[:, 0], size0=size[:, 0],
                shape1=np.where(two, shape[:, 1], -1), color1=np.where(two, color[:, 1], -1),
                size1=np.where(two, size[:, 1], -1), position=np.where(one, position[:, 0], -1))  # fmt: skip


def _caption_arrays(c):
    """One `parse_caption` dict as the (1,)- and (1, 2)-shaped arrays of a Shapes set."""
    pad = lambda v: [list(v) + [-1] * (2 - len(v))]  # noqa: E731
    return dict(n_objects=[c["n_objects"]], shape=pad(c["shape"]), color=pad(c["color"]), size=pad(c["size"]),
                position=[[-1 if c["position"] is None else c["position"], -1]], relation=[c["relation"]])


def labelled_data(dataset, resolution, split, n=None):
    """(images, dict head -> labels) of a dataset split, as the classifier trains and is tested on.

    digits: the fixed split of models.data (16×16 = bilinear upscale). shapes: seed 0 of the
    generator's "train" or "test" stream, `n` images (two objects half the time, nothing held out).
    """
    from models import data

    if dataset == "digits":
        x, y = data.digits(split, resolution)
        return x, {"label": y}
    if dataset == "shapes":
        s = data.shapes(n, resolution, seed=0, split=split)
        return s.images, shapes_labels(s)
    raise ValueError(f"classifier: unknown dataset {dataset!r}; known: {DATASETS}")


# --- training, evaluation, loading ----------------------------------------------------------------


def predict(net, images, batch_size=256):
    """dict head -> (N,) int64 argmax predictions for a NumPy array of images."""
    logits = logits_of(net, images, batch_size)
    return {k: v.argmax(1) for k, v in logits.items()}


def logits_of(net, images, batch_size=256):
    """dict head -> (N, classes) float logits, computed in batches without a graph."""
    net.eval()
    out = {k: [] for k in net.head_sizes}
    with core.no_grad():
        for i in range(0, len(images), batch_size):
            for k, v in net(core.tensor(np.asarray(images[i : i + batch_size], np.float32))).items():
                out[k].append(v.numpy())
    return {k: np.concatenate(v) if v else np.zeros((0, net.head_sizes[k]), np.float32) for k, v in out.items()}


def accuracy(net, images, labels):
    """dict head -> fraction of images (where the label is not -1) whose prediction equals the label."""
    pred = predict(net, images)
    return {k: float((pred[k][y >= 0] == y[y >= 0]).mean()) for k, y in labels.items() if (y >= 0).any()}


def train_classifier(dataset, resolution=None, *, seed=0, steps=None, verbose=False):
    """Train the classifier of `dataset` at `resolution` from scratch; return (net, test accuracies).

    Adam with a linear warmup and cosine decay, cross-entropy summed over the heads (each head
    ignores its -1 labels). Deterministic for a seed: the weights come from
    `core.manual_seed(seed)` and the batches from `Batches(seed=seed)`.
    """
    from models.data import Batches

    resolution = _check(dataset, resolution)
    r = RECIPES[dataset, resolution]
    steps = r["steps"] if steps is None else steps
    x, y = labelled_data(dataset, resolution, "train", r.get("n_train"))
    x_test, y_test = labelled_data(dataset, resolution, "test", r.get("n_test"))
    heads = {"label": 10} if dataset == "digits" else SHAPES_HEADS
    core.manual_seed(seed)
    net = Classifier(x.shape[1], resolution, heads, r["widths"])
    opt = core.optim.Adam(net.parameters(), lr=r["lr"])
    sched = core.optim.WarmupCosine(opt, warmup_steps=steps // 20, total_steps=steps)
    names = list(y)
    loader = Batches(x, *[y[k] for k in names], batch_size=r["batch_size"], drop_last=True, seed=seed)
    step, t0, c0 = 0, time.time(), time.process_time()
    net.train()
    while step < steps:
        for xb, *yb in loader:
            logits = net(core.tensor(xb))
            loss = sum(F.cross_entropy(logits[k], core.tensor(t), ignore_index=-1) for k, t in zip(names, yb))
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            step += 1
            if verbose and (step % 100 == 0 or step == steps):
                print(f"{dataset}{resolution} step {step}/{steps} loss {loss.item():.4f} "
                      f"{time.time() - t0:.0f}s wall, {time.process_time() - c0:.0f}s cpu")
            if step == steps:
                break
    net.eval()
    return net, accuracy(net, x_test, y_test)


def _check(dataset, resolution):
    if dataset not in DATASETS:
        raise ValueError(f"classifier: unknown dataset {dataset!r}; known: {DATASETS}")
    resolution = DEFAULT_RESOLUTION[dataset] if resolution is None else resolution
    if resolution not in RESOLUTIONS[dataset]:
        raise ValueError(f"classifier: {dataset} has classifiers at resolutions {RESOLUTIONS[dataset]}, "
                         f"got {resolution!r}")  # fmt: skip
    return resolution


def weights_path(dataset, resolution=None):
    """models/weights/<dataset><resolution>.safetensors, e.g. digits8.safetensors."""
    return os.path.join(WEIGHTS, f"{dataset}{_check(dataset, resolution)}.safetensors")


def save_classifier(net, path, test_accuracy):
    """Write the weights with the architecture and the test accuracies in the file's metadata."""
    meta = {"config": json.dumps(net.config()), "test_accuracy": json.dumps(test_accuracy)}
    core.serialize.save(path, net.state_dict(), metadata=meta)


@functools.cache
def load_classifier(dataset, resolution=None):
    """The classifier of `dataset` at `resolution` (default: the dataset's default resolution), in eval
    mode, from models/weights/; trained (`train_classifier`, seed 0) and saved there first if absent.
    Cached per process: treat it as read-only.
    """
    path = weights_path(dataset, resolution)
    if not os.path.exists(path):
        net, acc = train_classifier(dataset, resolution, verbose=True)
        os.makedirs(WEIGHTS, exist_ok=True)
        save_classifier(net, path, acc)
    meta = core.serialize.load_metadata(path)
    cfg = json.loads(meta["config"])
    net = Classifier(cfg["in_channels"], cfg["resolution"], cfg["heads"], tuple(cfg["widths"]))
    net.load_state_dict(core.serialize.load(path))
    net.test_accuracy = json.loads(meta["test_accuracy"])
    return net.eval()


if __name__ == "__main__":  # python -m models.classifier [dataset resolution]: (re)train and save
    import sys

    todo = [(sys.argv[1], int(sys.argv[2]))] if len(sys.argv) > 2 else [(d, r) for d in DATASETS
                                                                         for r in RESOLUTIONS[d]]  # fmt: skip
    for d, res in todo:
        t = time.time()
        net, acc = train_classifier(d, res, verbose=True)
        os.makedirs(WEIGHTS, exist_ok=True)
        save_classifier(net, weights_path(d, res), acc)
        print(f"{d}{res}: {time.time() - t:.0f}s, test accuracy {acc}")
