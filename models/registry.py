"""The models by name (image generators, text and vision transformers, image tokenizers), and the
contract each one keeps, so that one CLI and one training loop serve them all.

    from models import registry
    m = registry.get("gan")                       # the module models.gan, imported on first use
    cfg = registry.config(m, "digits", steps=500)  # its Config, with the dataset's preset and overrides
    m.train(cfg, "gan.safetensors")
    model, cfg = m.load("gan.safetensors")
    images = m.sample(model, cfg, 64, seed=0)     # (64, C, H, W) in [-1, 1]
    result = m.evaluate(model, cfg)               # {"figures": [...], ...}: each figure beside its baselines

The contract (every module listed in MODELS implements it):

- `Config`: a dataclass. Fields it must have: `data` (one of DATASETS), `steps`, `batch_size`, `lr`,
  `seed` (and `resolution` for a model of images); the rest are the model's sizes and knobs. Its
  defaults are the settings of the measured bar run on its default dataset. Optional
  `PRESETS = {"shapes": {field: value}}` holds what changes for another dataset (applied by
  `config` below, before the user's overrides). Only JSON-able values (numbers, str, bool, None,
  tuples of those): the config travels in the checkpoint's metadata.
- Optional `DATA = ("text",)`: the datasets the model trains on, the first being its default
  (without it: every image dataset, digits first).
- `train(cfg, out, *, resume=True, progress=True) -> dict`: trains with `models.train.fit` (tqdm bar
  with the loss and it/s; an atomic checkpoint `out` every `cfg.checkpoint_every` steps, if the field
  exists, and at the end, holding the config; resumes from `out` when it exists, and a resumed run
  equals an uninterrupted one bitwise). Returns a summary (steps, seconds, last losses).
- `load(path) -> (model, cfg)`: the trained model (eval mode; EMA weights where the model keeps them)
  and its Config, read from a checkpoint written by `train` (`models.train.read_checkpoint`).
- `sample(model, cfg, n, *, seed=0, **options) -> ndarray` of shape (m, C, H, W), float32 in [-1, 1],
  written as a grid of ceil(sqrt(n)) images per row (an image tokenizer returns its n originals and
  their n reconstructions, a row of originals above each row of reconstructions), or a list of n
  strings for a text model, printed. `options` holds only what the user gave (the CLI passes
  nothing it was not given): `label`, `guidance`, `steps`, `prompt`, `max_new_tokens`, `temperature`,
  `top_k`, `top_p`; a model raises UsageError for an option it does not take (the CLI also turns a
  TypeError about an unexpected keyword into one), and for `sample` itself when it samples nothing
  (a classifier). `label`: an int class for every sample, or an (n,) int array, or
  None (an unconditional model must then be sampled with None; a conditional one draws labels
  cycling 0, 1, ..., K-1). `guidance`, `steps`: for samplers that have them (diffusion); a model
  without them raises UsageError when they are given. The sample depends only on `seed` (a private
  generator: the global RNG is left untouched).
- `evaluate(model, cfg, *, seed=0) -> dict`: {"figures": [models.train.figure(...), ...], ...} where
  each figure carries the baselines measured in the same call (e.g. FD-classifier of samples beside
  that of a Gaussian fitted to the training pixels and of the real training set). Other keys (e.g.
  per-class frequencies) are free-form JSON-able values.

Errors a user can cause (an unknown model, a bad config value, an argument the model does not take,
resuming from a checkpoint of another config) raise `UsageError` (a ValueError) with a message naming
the argument; the CLI turns them into exit code 2. A Config's own `__post_init__` checks may raise
a plain ValueError, which the CLI also reports as a usage error.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import types
import typing

MODELS = {
    "gan": "models.gan", "vae": "models.vae", "glow": "models.glow", "ddpm": "models.ddpm",  # image generators
    "gpt": "models.gpt", "bert": "models.bert", "vit": "models.vit", "clip": "models.clip",  # transformers
    "vqvae": "models.vqvae", "dvae": "models.dvae", "vqgan": "models.vqgan",  # image tokenizers
}
DATASETS = ("digits", "shapes", "text")
IMAGE_DATASETS = ("digits", "shapes")


class UsageError(ValueError):
    """Something the user asked for that cannot be done (the CLI exits with code 2 and this message)."""


def get(name):
    """The module of model `name` (imported on first use, so `t2i --help` stays fast)."""
    if name not in MODELS:
        raise UsageError(f"unknown model {name!r}; known models: {', '.join(MODELS)}")
    try:
        return importlib.import_module(MODELS[name])
    except ModuleNotFoundError as e:
        if e.name != MODELS[name]:
            raise
        raise UsageError(f"model {name!r} is not implemented yet ({MODELS[name]} does not exist)") from None


def datasets(module):
    """The datasets `module` trains on, its default first."""
    return tuple(getattr(module, "DATA", IMAGE_DATASETS))


def config(module, data=None, **overrides):
    """`module.Config` for dataset `data` (None: the model's default): the defaults, then
    `module.PRESETS[data]`, then `overrides`.

    Unknown field names and datasets the model does not train on raise UsageError naming them and
    the valid choices; so do values of a type the field's annotation does not allow, and steps,
    batch_size, lr, seed out of range. An override of None means "not given", except for a field
    that takes None (`top_p: float | None`).
    """
    valid = datasets(module)
    data = valid[0] if data is None else data
    if data not in valid:
        name = module.__name__.rsplit(".", 1)[-1]
        raise UsageError(f"unknown dataset {data!r} for {name}; it trains on: {', '.join(valid)}")
    fields = {f.name for f in dataclasses.fields(module.Config)}
    values = dict(getattr(module, "PRESETS", {}).get(data, {}), data=data)
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise UsageError(f"{module.__name__}.Config has no field(s) {', '.join(unknown)}; "
                         f"fields: {', '.join(sorted(fields))}")
    hints = _hints(module.Config)
    for k, v in overrides.items():
        if v is not None or k in hints and type(None) in hints[k]:  # None: not given, unless the field takes None
            values[k] = _coerce(module, k, v, hints.get(k, ()))
    _check_contract(module, values)
    return module.Config(**values)


def _hints(cls):
    """{field: the types its annotation allows} (`int | None` -> (int, NoneType)); the default's type where the
    annotation cannot be read."""
    try:
        hints = typing.get_type_hints(cls)
    except (NameError, TypeError):
        hints = {}
    kinds = {}
    for f in dataclasses.fields(cls):
        h = hints.get(f.name)
        args = typing.get_args(h) if typing.get_origin(h) in (typing.Union, types.UnionType) else (h,)
        if not all(isinstance(a, type) for a in args):  # (tuple[int, ...], Literal[...]: not checked here)
            args = ()
        if args and f.default is not dataclasses.MISSING:
            args = tuple(dict.fromkeys((*args, type(f.default))))
        elif f.default is not None and f.default is not dataclasses.MISSING:
            args = (type(f.default),)
        kinds[f.name] = args  # () : anything goes
    return kinds


def _coerce(module, name, value, kinds):
    """An override in a type its field takes: "False"/"true" (text from --set) for a bool, an int for a float, a
    list for a tuple; anything else of another type is a UsageError (a "False" string would be a true flag)."""
    if not kinds or object in kinds or value is None and type(None) in kinds:
        return value
    if any(isinstance(value, k) and not (isinstance(value, bool) and k is not bool) for k in kinds):
        return value
    if bool in kinds and isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tuple in kinds and isinstance(value, list):
        return tuple(value)
    want = " or ".join("None" if k is type(None) else k.__name__ for k in kinds)
    default = {f.name: f.default for f in dataclasses.fields(module.Config)}[name]
    article = "an" if want[0] in "aeiou" else "a"
    raise UsageError(f"{module.__name__}.Config.{name} is {article} {want} (default {default!r}), got {value!r}")


def _check_contract(module, values):
    """The fields every Config has, checked as the CLI's --steps/--batch-size/--lr/--seed check them, so that
    `--set steps=-3` is refused too (it trained nothing and reported a checkpoint it never wrote)."""
    for k, ok, what in [("steps", lambda v: v >= 1, "a positive integer"),
                        ("batch_size", lambda v: v >= 1, "a positive integer"),
                        ("lr", lambda v: math.isfinite(v) and v > 0, "a positive number"),
                        ("seed", lambda v: v >= 0, "a non-negative integer")]:
        v = values.get(k)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and not ok(v):
            raise UsageError(f"{module.__name__}.Config.{k} must be {what}, got {v!r}")


def from_dict(cls, d, path=None):
    """Rebuild a Config dataclass from its JSON form (lists become tuples where the default is a tuple); a config
    that no longer fits cls (a field since removed, a value its checks now refuse) is a UsageError naming `path`."""
    where = f"{path}: " if path else ""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise UsageError(f"{where}{cls.__module__}.{cls.__qualname__}: the checkpoint's config has unknown field(s) "
                         f"{', '.join(unknown)} (written by another version of the model?)")
    values = {}
    for k, v in d.items():
        default = fields[k].default
        values[k] = tuple(v) if isinstance(v, list) and isinstance(default, tuple) else v
    try:
        return cls(**values)
    except (TypeError, ValueError) as e:  # (a Config's own checks raise a plain ValueError)
        raise UsageError(f"{where}its config does not fit {cls.__module__}.{cls.__qualname__}: {e}") from None
