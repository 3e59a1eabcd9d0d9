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
    the valid choices.
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
    defaults = {f.name: f.default for f in dataclasses.fields(module.Config)}
    values.update({k: _coerce(module, k, v, defaults[k]) for k, v in overrides.items() if v is not None})
    return module.Config(**values)


def _coerce(module, name, value, default):
    """An override in the type of the field's default: "False"/"true" (text from --set) for a bool, an int for
    a float, a list for a tuple; anything else of another type is a UsageError (a "False" string would be a true
    flag)."""
    kind = type(default)
    if default is None or default is dataclasses.MISSING or isinstance(value, kind) and not (
            isinstance(value, bool) and kind is not bool):
        return value
    if kind is bool and isinstance(value, str) and value.lower() in ("true", "false"):
        return value.lower() == "true"
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if kind is tuple and isinstance(value, list):
        return tuple(value)
    raise UsageError(f"{module.__name__}.Config.{name} is a {kind.__name__} (default {default!r}), got {value!r}")


def from_dict(cls, d):
    """Rebuild a Config dataclass from its JSON form (lists become tuples where the default is a tuple)."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - set(fields))
    if unknown:
        raise ValueError(f"{cls.__qualname__}: the checkpoint's config has unknown field(s) {', '.join(unknown)}")
    values = {}
    for k, v in d.items():
        default = fields[k].default
        values[k] = tuple(v) if isinstance(v, list) and isinstance(default, tuple) else v
    return cls(**values)
