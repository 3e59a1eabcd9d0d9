"""The pieces every image generator's training shares: its data, a resumable training loop with a
progress bar and atomic checkpoints, reading a checkpoint back, reporting figures beside their
baselines, and writing image grids. The contract a model module keeps is in models/registry.py.

A model's `train` reads like this:

    def train(cfg, out, *, resume=True, progress=True):
        x, y = dataset(cfg.data, cfg.resolution, "train")
        core.manual_seed(cfg.seed)                # weights and noise: restored from `out` on resume
        model = Model(cfg)
        opt = core.optim.Adam(model.parameters(), lr=cfg.lr)

        def step(xb, yb):                         # one update on one batch; returns the losses
            loss = model.loss(core.tensor(xb), core.tensor(yb))
            opt.zero_grad(); loss.backward(); opt.step()
            return {"loss": loss.item()}

        return fit(cfg, out, model=model, optimizer=opt, step=step, data=(x, y),
                   resume=resume, progress=progress)

Why a resumed run equals an uninterrupted one, bitwise: the checkpoint holds the weights (and
buffers such as BatchNorm's running statistics), the optimizer's moments, the EMA, the step and the
state of `core.random.default_generator`; and the batch of step t is a pure function of (seed, t)
(`Stream`), so nothing else carries state from one step to the next.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import time

import numpy as np

from core import serialize
from models.registry import UsageError

NUM_CLASSES = {"digits": 10, "shapes": 5}  # shapes: the shape of the caption's first object (SHAPES)
SHAPES_N = {"train": 8192, "test": 1024}  # generated shapes images per split


# --- data -----------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def dataset(data, resolution, split="train"):
    """(images (N, C, R, R) float32 in [-1, 1], labels (N,) int64) of a dataset split (read-only arrays).

    digits: the fixed train/test split of models.data (1,437 / 360 images, 1 channel; resolution 8,
    or 16 etc. by bilinear upscaling), labels the digit. shapes: SHAPES_N[split] images of the
    generator's `split` stream, seed 0 (3 channels), labels the shape of the caption's first object
    (0..4, models.shapes.SHAPES) - the class a conditional model is asked for.
    """
    from models import data as datasets

    if data == "digits":
        x, y = datasets.digits(split, resolution)
    elif data == "shapes":
        if split not in SHAPES_N:
            raise ValueError(f"dataset: split must be one of {tuple(SHAPES_N)}, got {split!r}")
        s = datasets.shapes(SHAPES_N[split], resolution, seed=0, split=split)
        x, y = s.images, s.shape[:, 0].copy()
    else:
        raise ValueError(f"dataset: unknown dataset {data!r}; known: {', '.join(NUM_CLASSES)}")
    x.flags.writeable = y.flags.writeable = False  # shared by the cache: nobody may change them
    return x, y


class Stream:
    """The training batches as a function of the step: batch t is the (t mod E)-th slice of the
    permutation of epoch t // E (E = full batches per epoch, the short last one dropped), the
    permutation being `models.data.Batches.order`. Stateless, so a resumed run sees the same batches."""

    def __init__(self, *arrays, batch_size, seed):
        from models.data import Batches

        self.batches = Batches(*arrays, batch_size=min(batch_size, len(arrays[0])), drop_last=True, seed=seed)
        self.arrays, self.batch_size = arrays, self.batches.batch_size
        self.per_epoch = len(self.batches)

    @functools.lru_cache(maxsize=2)  # noqa: B019 - a Stream lives as long as its training run
    def _order(self, epoch):
        return self.batches.order(epoch)

    def batch(self, step):
        """The arrays of step `step`, a tuple with one entry per array."""
        epoch, i = divmod(step, self.per_epoch)
        idx = self._order(epoch)[i * self.batch_size : (i + 1) * self.batch_size]
        return tuple(a[idx] for a in self.arrays)


# --- the training loop ----------------------------------------------------------------------------


class Group:
    """Several optimizers (a GAN's generator and discriminator) saved and restored as one:
    `Group(g=opt_g, d=opt_d)`, with `state_dict`/`load_state_dict` over all of them."""

    def __init__(self, **optimizers):
        self.optimizers = optimizers

    def __getitem__(self, name):
        return self.optimizers[name]

    def state_dict(self):
        """{name: that optimizer's state_dict()}."""
        return {k: o.state_dict() for k, o in self.optimizers.items()}

    def load_state_dict(self, state_dict):
        """Restore each optimizer from its entry (the names must match)."""
        if set(state_dict) != set(self.optimizers):
            raise ValueError(f"Group.load_state_dict: expected optimizers {sorted(self.optimizers)}, "
                             f"got {sorted(state_dict)}")
        for k, o in self.optimizers.items():
            o.load_state_dict(state_dict[k])


def config_dict(cfg):
    """The config as a JSON-able dict (tuples become lists)."""
    return json.loads(json.dumps(dataclasses.asdict(cfg)))


def fit(cfg, out, *, model, optimizer, step, data, ema=None, scheduler=None, resume=True, progress=True,
        every=None, name=None, threads=1):
    """Run `step(*batch) -> {loss name: float}` for steps [start, cfg.steps), where start is 0 or the
    step stored in `out` (when `resume` and `out` exists). After each step the EMA (if any) is updated;
    every `every` steps (default: `cfg.checkpoint_every` if the config has it, else 500) and at the end
    a checkpoint is written atomically to `out`, holding the weights, optimizer, scheduler, EMA, step,
    RNG state and, in its `extra`, the config (and the model's name) and the loss history.

    Resuming from a checkpoint whose config differs from `cfg` in anything but `steps` is refused
    (it would not be the same run). Returns {"steps", "start", "seconds", "it_per_s", "loss": {name:
    mean over the last 50 steps}, "out"}.

    `threads`: BLAS and Numba threads during training (None: the libraries' defaults). The matrix
    products and convolutions of these small models are too small to share: the threads then spend
    their time waiting for each other, and one thread per process used 6-7x less CPU per step on this
    2-core machine (measured under load, for OpenBLAS and for the Numba conv kernels alike).
    """
    with limit_threads(threads):
        return _fit(cfg, out, model=model, optimizer=optimizer, step=step, data=data, ema=ema,
                    scheduler=scheduler, resume=resume, progress=progress, every=every, name=name)


@contextlib.contextmanager
def limit_threads(threads=1):
    """BLAS and Numba use at most `threads` threads inside the block (None: leave them alone).

    Why: the products of these small models are too small to share between threads, and an idle
    OpenBLAS thread spins; training (and `t2i eval`/`t2i sample`) measured several times less CPU
    per step with one thread than with two on this 2-core machine.
    """
    import numba
    from threadpoolctl import threadpool_limits  # ships with scikit-learn, which the digits need anyway

    before = numba.get_num_threads()
    if threads is not None:
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        with threadpool_limits(limits=threads, user_api="blas"):
            yield
    finally:
        numba.set_num_threads(before)


def _fit(cfg, out, *, model, optimizer, step, data, ema, scheduler, resume, progress, every, name):
    """The loop of `fit`."""
    from tqdm import tqdm

    every = every or getattr(cfg, "checkpoint_every", 500)
    if every < 1:
        raise UsageError(f"checkpoint_every must be >= 1, got {every}")
    name = name or type(model).__module__.rsplit(".", 1)[-1]
    meta = {"model": name, "config": config_dict(cfg), "history": {"step": []}}
    start = 0
    if resume and os.path.exists(out):
        saved = json.loads(serialize.load_metadata(out).get("extra", "{}"))
        theirs = dict(saved.get("config", {}), steps=None)
        ours = dict(meta["config"], steps=None)
        if theirs != ours:
            diff = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
            raise UsageError(f"cannot resume from {out}: its config differs in {', '.join(diff)} "
                             f"({', '.join(f'{k}={theirs.get(k)!r} there, {ours.get(k)!r} here' for k in diff)}); "
                             "train to a new --out instead")
        # a schedule is a function of (config, step): keep this config's settings (total steps), take the step
        fresh = scheduler.state_dict() if scheduler is not None else None
        info = serialize.load_checkpoint(out, model, optimizer, scheduler=scheduler, ema=ema)
        start, meta["history"] = info["step"], info["extra"]["history"]
        if start > cfg.steps:
            raise UsageError(f"{out} has already trained {start} steps, more than the {cfg.steps} asked for; give "
                             "--steps of at least that, or a new --out")
        if scheduler is not None and saved["config"].get("steps") != cfg.steps:  # a longer (or shorter) run
            scheduler.load_state_dict({k: v for k, v in fresh.items() if k not in ("last_epoch", "_last_lr")})
            scheduler.last_epoch -= 1
            scheduler.step()  # the learning rate of the resumed step under the new schedule
    stream = Stream(*data, batch_size=cfg.batch_size, seed=cfg.seed)
    log_every = max(1, cfg.steps // 500)
    recent, t0 = {}, time.perf_counter()
    bar = tqdm(total=cfg.steps, initial=start, desc=f"train {name}", disable=not progress, dynamic_ncols=True,
               unit="step")
    model.train()
    for t in range(start, cfg.steps):
        losses = step(*stream.batch(t))
        if ema is not None:
            ema.update()
        for k, v in losses.items():
            recent.setdefault(k, []).append(float(v))
            del recent[k][:-50]
        if (t + 1) % log_every == 0:
            meta["history"]["step"].append(t + 1)
            for k, v in losses.items():
                meta["history"].setdefault(k, []).append(round(float(v), 6))
        bar.set_postfix({k: f"{v:.4f}" for k, v in losses.items()}, refresh=False)
        bar.update()
        if (t + 1) % every == 0 or t + 1 == cfg.steps:
            serialize.save_checkpoint(out, model, optimizer, t + 1, scheduler=scheduler, ema=ema, extra=meta)
    bar.close()
    model.eval()
    seconds = time.perf_counter() - t0
    done = cfg.steps - start
    return {"steps": cfg.steps, "start": start, "seconds": seconds,
            "it_per_s": done / seconds if done and seconds > 0 else None,
            "loss": {k: float(np.mean(v)) for k, v in recent.items()}, "out": out}


def read_checkpoint(path):
    """What `fit` saved in `path`, without touching any RNG: {"model": name, "config": dict, "step": int,
    "history": dict, "weights": {name: ndarray}, "ema": {param name: ndarray} or None}."""
    arrays, meta = serialize.load_with_metadata(path)  # one read: a run may replace the file between two
    if meta.get("format") != serialize.CHECKPOINT_FORMAT or "extra" not in meta:
        raise UsageError(f"{path}: not a checkpoint written by `t2i train` (no config in its metadata)")
    extra = json.loads(meta["extra"])
    ema = None
    if "ema" in meta:
        ema = {k: arrays[ref["$tensor"]] for k, ref in json.loads(meta["ema"])["shadow"].items()}
    weights = {k[len("model."):]: v for k, v in arrays.items() if k.startswith("model.")}
    return {"model": extra.get("model"), "config": extra["config"], "step": json.loads(meta["step"]),
            "history": extra.get("history", {}), "weights": weights, "ema": ema}


def decay_groups(model, weight_decay):
    """AdamW parameter groups: weight decay on the matrices (linear and embedding weights), none on biases and
    norm scales (the 1-d parameters) — the grouping of BERT's AdamWeightDecay and nanoGPT."""
    params = [p for _, p in model.named_parameters()]
    return [{"params": [p for p in params if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0}]


def load_model(path, config_cls, build):
    """(model, cfg): the Config a `fit` checkpoint holds, `build(cfg)`'s model with the checkpoint's weights
    (EMA ones where kept), in eval mode. The global RNG is left untouched, though building draws the
    initial weights (overwritten here) from it: loading must not change what a later seed gives."""
    import core
    from models.registry import from_dict

    ckpt = read_checkpoint(path)
    cfg = from_dict(config_cls, ckpt["config"], path)
    state = core.random.get_rng_state()
    try:
        return load_weights(build(cfg), ckpt), cfg
    finally:
        core.random.set_rng_state(state)


def load_weights(model, ckpt, *, ema=True):
    """Put a `read_checkpoint` result's weights into `model` (the EMA's averaged parameters instead of
    the raw ones when `ema` and the checkpoint has them); return the model in eval mode."""
    model.load_state_dict(ckpt["weights"])
    if ema and ckpt["ema"] is not None:
        params = dict(model.named_parameters())
        for k, v in ckpt["ema"].items():
            params[k].data[...] = v
    return model.eval()


# --- reporting ------------------------------------------------------------------------------------


def figure(name, value, *, better, unit="", **baselines):
    """One reported figure beside the baselines measured in the same run, e.g.
    figure("FD-classifier", 3.1, better="lower", gaussian=41.0, real_train=0.9)."""
    if better not in ("lower", "higher"):
        raise ValueError(f"figure: better must be 'lower' or 'higher', got {better!r}")
    return {"name": name, "value": float(value), "unit": unit, "better": better,
            "baselines": {k: float(v) for k, v in baselines.items()}}


def format_figures(result):
    """The figures of an `evaluate` result as an aligned table: figure | value | baselines."""
    rows = [("figure", "value", "better", "baselines (same run)")]
    for f in result.get("figures", []):
        base = ", ".join(f"{k.replace('_', ' ')} {_num(v)}" for k, v in f["baselines"].items())
        rows.append((f["name"] + (f" ({f['unit']})" if f["unit"] else ""), _num(f["value"]), f["better"], base))
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    lines = [f"{r[0].ljust(widths[0])} | {r[1].rjust(widths[1])} | {r[2].ljust(widths[2])} | {r[3]}" for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths) + "-+-" + "-" * 20)
    for k, v in result.items():
        if k != "figures":
            lines.append(f"{k}: {json.dumps(v)}")
    return "\n".join(lines)


def _num(v):
    return f"{v:.4g}" if math.isfinite(v) else str(v)


# --- images ---------------------------------------------------------------------------------------


def check_out_path(path, what="--out"):
    """A file path that is not a folder, its folder made if missing (as save_grid's is): checked before a run's
    work, not after it (a bad path lost a whole training run)."""
    if os.path.isdir(path):
        raise UsageError(f"{what} {path} is a directory; give a file path")
    folder = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(folder, exist_ok=True)
    except OSError as e:
        raise UsageError(f"{what} {path}: cannot make the directory {folder} ({e.strerror})") from None


def save_grid(images, path, nrow=8, *, scale=None, pad=1):
    """Write images (N, C, H, W) in [-1, 1] (C = 1 or 3) as one PNG grid with `nrow` images per row,
    `pad` pixels of mid-gray between them, each pixel enlarged `scale` times (default: to about 64 pixels
    per image, since 8×8 digits are too small to see)."""
    from PIL import Image

    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"save_grid: images must be (N, 1 or 3, H, W), got shape {images.shape}")
    n, c, h, w = images.shape
    scale = scale or max(1, 64 // max(h, w))
    ncol, nrows = min(nrow, n), -(-n // nrow)
    grid = np.full((nrows * (h + pad) + pad, ncol * (w + pad) + pad, 3), 0.0, np.float32)
    for i, im in enumerate(images):
        r, q = divmod(i, nrow)
        grid[pad + r * (h + pad) : pad + r * (h + pad) + h, pad + q * (w + pad) : pad + q * (w + pad) + w] = \
            np.repeat(im, 3 // c, axis=0).transpose(1, 2, 0)
    pixels = np.round((np.clip(grid, -1, 1) + 1) * 127.5).astype(np.uint8)
    pixels = pixels.repeat(scale, axis=0).repeat(scale, axis=1)
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    Image.fromarray(pixels, "RGB").save(path)
    return path


def labels_for(n, num_classes, label=None):
    """The class labels of `n` conditional samples: `label` for all (an int), the given (n,) array, or
    0, 1, ..., K-1 cycling when None (so that a grid with K per row shows one class per column)."""
    if label is None:
        return np.arange(n, dtype=np.int64) % num_classes
    y = np.broadcast_to(np.asarray(label, dtype=np.int64), (n,)).copy()
    if (y < 0).any() or (y >= num_classes).any():
        raise UsageError(f"label must be in 0..{num_classes - 1}, got {np.unique(y).tolist()}")
    return y


def sampler_figures(samples, data, resolution, *, labels=None, seed=0):
    """The figures of a sampler (GAN, DDPM, ...), each beside the same figure measured now for a Gaussian
    fitted to the training pixels (`metrics.gaussian_baseline`, as many samples) and for the real
    training set:

    - FD-classifier to the test set (lower is better);
    - mode coverage: total variation between the classifier's class frequencies of the samples and of
      the test set (digits: the digit; shapes: the shape of object 0), and the per-class frequencies;
    - class agreement, when `labels` (the class each sample was asked for) are given on digits, beside
      the classifier's accuracy on the real test set and chance.
    """
    from models import metrics

    samples = np.asarray(samples, np.float32)
    x_train, _ = dataset(data, resolution, "train")
    x_test, y_test = dataset(data, resolution, "test")
    gauss = metrics.gaussian_baseline(x_train, len(samples), seed=seed)
    fd = {k: metrics.fd_classifier(v, x_test, data) for k, v in (("model", samples), ("gaussian", gauss),
                                                                  ("real_train", x_train))}
    head = "label" if data == "digits" else "shape0"
    cov = {k: metrics.mode_coverage(v, data, x_test, head=head) for k, v in (("model", samples), ("gaussian", gauss),
                                                                              ("real_train", x_train))}
    figures = [
        figure("FD-classifier", fd["model"], better="lower", gaussian=fd["gaussian"], real_train=fd["real_train"]),
        figure(f"class-frequency TV ({head})", cov["model"]["tv"], better="lower", gaussian=cov["gaussian"]["tv"],
               real_train=cov["real_train"]["tv"]),
    ]
    if labels is not None and data == "digits":
        real = metrics.class_agreement(x_test, y_test, data)
        figures.append(figure("class agreement", metrics.class_agreement(samples, labels, data), better="higher",
                              real_test=real, chance=1 / NUM_CLASSES[data]))
    return {"figures": figures, "samples": len(samples),
            "class_frequency": {"model": cov["model"]["freq"].round(4).tolist(),
                                "test": cov["model"]["reference"].round(4).tolist()}}
