"""Seedable random generators.

Every random op in the project draws from a `Generator` (the process-wide `default_generator`
unless one is passed), so `core.manual_seed(s)` makes a whole run reproducible. The bit generator
is NumPy's Philox, a counter-based generator like the one the kernels use, and its full state can
be saved in a checkpoint and restored exactly.
"""

from __future__ import annotations

import json

import numpy as np


class Generator:
    """A seedable source of random arrays (normal, uniform, integers, bernoulli, permutation)."""

    def __init__(self, seed: int = 0):
        self.manual_seed(seed)

    def manual_seed(self, seed: int):
        """Reset to the stream of `seed`."""
        if not isinstance(seed, (int, np.integer)) or seed < 0:
            raise ValueError(f"manual_seed: seed must be a non-negative int, got {seed!r}")
        self.seed = int(seed)
        self._rng = np.random.Generator(np.random.Philox(self.seed))
        return self

    def normal(self, shape, dtype=np.float64):
        return self._rng.standard_normal(shape, dtype=np.float64).astype(dtype, copy=False)

    def uniform(self, shape, low=0.0, high=1.0, dtype=np.float64):
        return self._rng.uniform(low, high, shape).astype(dtype, copy=False)

    def integers(self, low, high, shape):
        return self._rng.integers(low, high, shape, dtype=np.int64)

    def bernoulli(self, p, shape):
        """Boolean array, True with probability p."""
        return self._rng.random(shape) < p

    def permutation(self, n):
        return self._rng.permutation(n)

    def get_state(self) -> str:
        """The full generator state as a JSON string (what a checkpoint stores)."""
        st = self._rng.bit_generator.state
        plain = lambda v: {k: plain(x) for k, x in v.items()} if isinstance(v, dict) else np.asarray(v).tolist()  # noqa: E731
        st = {k: plain(v) for k, v in st.items()}
        return json.dumps({"seed": self.seed, "bit_generator": st})

    def set_state(self, state: str):
        """Restore a state from get_state(); the stream continues exactly where it was."""
        st = json.loads(state)
        bg = st["bit_generator"]
        if bg.get("bit_generator") != "Philox":
            raise ValueError(f"set_state: expected a Philox state, got {bg.get('bit_generator')!r}")
        bg["state"] = {k: np.asarray(v, dtype=np.uint64) for k, v in bg["state"].items()}
        bg["buffer"] = np.asarray(bg["buffer"], dtype=np.uint64)
        self.seed = int(st["seed"])
        rng = np.random.Generator(np.random.Philox(0))
        rng.bit_generator.state = bg
        self._rng = rng
        return self


default_generator = Generator(0)


def manual_seed(seed: int) -> Generator:
    """Seed the default generator: every random op after this is reproducible."""
    return default_generator.manual_seed(seed)


def get_rng_state() -> str:
    return default_generator.get_state()


def set_rng_state(state: str):
    default_generator.set_state(state)
