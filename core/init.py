"""core.nn.init: fill parameters in place with PyTorch's initialization schemes.

Every function writes into `tensor.data` (so the Parameter object, and any optimizer holding it,
stays the same), records nothing for autograd, and returns the tensor. Random values come from
`core.random.default_generator` unless a `generator=` is given, so `core.manual_seed` fixes them.
Values are drawn in float64 and cast to the tensor's dtype.
"""

from __future__ import annotations

import math

import numpy as np

from . import random

__all__ = [
    "calculate_gain", "constant_", "kaiming_normal_", "kaiming_uniform_", "normal_", "ones_", "trunc_normal_",
    "uniform_", "xavier_normal_", "xavier_uniform_", "zeros_",
]

_LINEAR = ("linear", "conv1d", "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d")


def _fill(tensor, values):
    """Write values into the tensor's array in place, in the tensor's dtype."""
    tensor.data[...] = np.asarray(values).astype(tensor.dtype, copy=False)
    return tensor


def _gen(generator):
    return generator if generator is not None else random.default_generator


def calculate_gain(nonlinearity, param=None):
    """The factor by which a nonlinearity shrinks the variance, to be undone by the init's scale.

    linear/conv/sigmoid: 1, tanh: 5/3, relu: √2, leaky_relu: √(2 / (1 + slope²)) (He et al. 2015,
    eq. 15 generalised), selu: 3/4.
    """
    if nonlinearity in _LINEAR or nonlinearity == "sigmoid":
        return 1
    if nonlinearity == "tanh":
        return 5.0 / 3
    if nonlinearity == "relu":
        return math.sqrt(2.0)
    if nonlinearity == "leaky_relu":
        if param is None:
            slope = 0.01
        elif isinstance(param, (int, float)) and not isinstance(param, bool):
            slope = param
        else:
            raise ValueError(f"calculate_gain: negative_slope {param} not a valid number")
        return math.sqrt(2.0 / (1 + slope**2))
    if nonlinearity == "selu":
        return 3.0 / 4
    raise ValueError(f"calculate_gain: unsupported nonlinearity {nonlinearity!r}")


def _calculate_fan_in_and_fan_out(tensor):
    """(fan_in, fan_out) of a weight: dim 1 and dim 0 times the receptive field (the product of dims 2...)."""
    if tensor.ndim < 2:
        raise ValueError(
            f"Fan in and fan out can not be computed for tensor with fewer than 2 dimensions (shape {tensor.shape})"
        )
    receptive = math.prod(tensor.shape[2:])
    return tensor.shape[1] * receptive, tensor.shape[0] * receptive


def _calculate_correct_fan(tensor, mode):
    mode = mode.lower()
    if mode not in ("fan_in", "fan_out"):
        raise ValueError(f"Mode {mode} not supported, please use one of ['fan_in', 'fan_out']")
    fan_in, fan_out = _calculate_fan_in_and_fan_out(tensor)
    return fan_in if mode == "fan_in" else fan_out


def uniform_(tensor, a=0.0, b=1.0, generator=None):
    """Fill with U(a, b)."""
    return _fill(tensor, _gen(generator).uniform(tensor.shape, a, b))


def normal_(tensor, mean=0.0, std=1.0, generator=None):
    """Fill with N(mean, std²)."""
    return _fill(tensor, mean + std * _gen(generator).normal(tensor.shape))


def constant_(tensor, val):
    """Fill with the value val."""
    return _fill(tensor, np.full(tensor.shape, val))


def zeros_(tensor):
    """Fill with 0."""
    return constant_(tensor, 0)


def ones_(tensor):
    """Fill with 1."""
    return constant_(tensor, 1)


def xavier_uniform_(tensor, gain=1.0, generator=None):
    """U(-a, a) with a = gain·√(6 / (fan_in + fan_out)) (Glorot & Bengio 2010, eq. 16)."""
    fan_in, fan_out = _calculate_fan_in_and_fan_out(tensor)
    std = gain * math.sqrt(2.0 / float(fan_in + fan_out))
    a = math.sqrt(3.0) * std  # a uniform on [-a, a] has standard deviation a/√3
    return uniform_(tensor, -a, a, generator)


def xavier_normal_(tensor, gain=1.0, generator=None):
    """N(0, std²) with std = gain·√(2 / (fan_in + fan_out)) (Glorot & Bengio 2010)."""
    fan_in, fan_out = _calculate_fan_in_and_fan_out(tensor)
    std = gain * math.sqrt(2.0 / float(fan_in + fan_out))
    return normal_(tensor, 0.0, std, generator)


def kaiming_uniform_(tensor, a=0, mode="fan_in", nonlinearity="leaky_relu", generator=None):
    """U(-bound, bound) with bound = gain·√(3 / fan) (He et al. 2015); `a` is the leaky_relu slope.

    With a=√5 (what Linear and Conv use) the bound is exactly 1/√fan_in.
    """
    if 0 in tensor.shape:
        return tensor
    fan = _calculate_correct_fan(tensor, mode)
    std = calculate_gain(nonlinearity, a) / math.sqrt(fan)
    bound = math.sqrt(3.0) * std
    return uniform_(tensor, -bound, bound, generator)


def kaiming_normal_(tensor, a=0, mode="fan_in", nonlinearity="leaky_relu", generator=None):
    """N(0, std²) with std = gain/√fan (He et al. 2015, eq. 10 for fan_in)."""
    if 0 in tensor.shape:
        return tensor
    fan = _calculate_correct_fan(tensor, mode)
    std = calculate_gain(nonlinearity, a) / math.sqrt(fan)
    return normal_(tensor, 0.0, std, generator)


def trunc_normal_(tensor, mean=0.0, std=1.0, a=-2.0, b=2.0, generator=None):
    """N(mean, std²) conditioned on [a, b] (a and b are absolute bounds, as in PyTorch), by rejection.

    When the interval holds most of the mass (p > 0.3), out-of-range normal draws are redrawn;
    otherwise candidates are drawn uniformly on [a, b] and kept with probability pdf(x)/pdf(mode).
    """
    if a >= b:
        raise ValueError(f"trunc_normal_: need a < b, got a={a}, b={b}")
    g = _gen(generator)
    cdf = lambda x: (1.0 + math.erf(x / math.sqrt(2.0))) / 2.0  # noqa: E731
    p = cdf((b - mean) / std) - cdf((a - mean) / std)
    shape = tensor.shape
    if p > 0.3:
        out = mean + std * g.normal(shape)
        bad = (out < a) | (out > b)
        while bad.any():
            out[bad] = mean + std * g.normal(int(bad.sum()))
            bad = (out < a) | (out > b)
    else:
        mode = max(a, min(mean, b))
        log_peak = -0.5 * ((mode - mean) / std) ** 2
        out = np.empty(shape)
        todo = np.ones(shape, dtype=bool)
        while todo.any():
            n = int(todo.sum())
            x = g.uniform(n, a, b)
            keep = np.log(g.uniform(n)) < -0.5 * ((x - mean) / std) ** 2 - log_peak
            idx = np.flatnonzero(todo)[keep]
            out.reshape(-1)[idx] = x[keep]
            todo.reshape(-1)[idx] = False
    return _fill(tensor, out)
