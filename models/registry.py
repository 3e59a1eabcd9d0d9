"""The image generators by name, and the contract each one keeps, so that one CLI and one training
loop serve them all.

    from models import registry
    m = registry.get("gan")                       # the module models.gan, imported on first use
    cfg = registry.config(m, "digits", steps=500)  # its Config, with the dataset's preset and overrides
    m.train(cfg, "gan.safetensors")
    model, cfg = m.load("gan.safetensors")
    images = m.sample(model, cfg, 64, seed=0)     # (64, C, H, W) in [-1, 1]
    result = m.evaluate(model, cfg)               # {"figures": [...], ...}: each figure beside its baselines

The contract (every module listed in MODELS implements it):

- `Config`: a dataclass. Fields it must have: `data` ("digits" or "shapes"), `resolution`, `steps`,
  `batch_size`, `lr`, `seed`; the rest are the model's sizes and knobs. Its defaults are the settings of
  the measured bar run on digits. Optional `PRESETS = {"shapes": {field: value}}` holds what changes
  for another dataset (applied by `config` below, before the user's overrides). Only JSON-able
  values (numbers, str, bool, None, tuples of those): the config travels in the checkpoint's metadata.
- `train(cfg, out, *, resume=True, progress=True) -> dict`: trains with `models.train.fit` (tqdm bar
  with the loss and it/s; an atomic checkpoint `out` every `cfg.checkpoint_every` steps, if the field
  exists, and at the end, holding the config; resumes from `out` when it exists, and a resumed run
  equals an uninterrupted one bitwise). Returns a summary (steps, seconds, last losses).
- `load(path) -> (model, cfg)`: the trained model (eval mode; EMA weights where the model keeps them)
  and its Config, read from a checkpoint written by `train` (`models.train.read_checkpoint`).
- `sample(model, cfg, n, *, label=None, guidance=None, steps=None, seed=0) -> ndarray` of shape
  (n, C, H, W), float32 in [-1, 1]. `label`: an int class for every sample, or an (n,) int array, or
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

MODELS = {"gan": "models.gan", "vae": "models.vae", "glow": "models.glow", "ddpm": "models.ddpm"}
DATASETS = ("digits", "shapes")


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


def config(module, data="digits", **overrides):
    """`module.Config` for dataset `data`: the defaults, then `module.PRESETS[data]`, then `overrides`.

    Unknown field names and unknown datasets raise ValueError naming them and the valid choices.
    """
    if data not in DATASETS:
        raise UsageError(f"unknown dataset {data!r}; known: {', '.join(DATASETS)}")
    fields = {f.name for f in dataclasses.fields(module.Config)}
    values = dict(getattr(module, "PRESETS", {}).get(data, {}), data=data)
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise UsageError(f"{module.__name__}.Config has no field(s) {', '.join(unknown)}; "
                         f"fields: {', '.join(sorted(fields))}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    return module.Config(**values)


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
