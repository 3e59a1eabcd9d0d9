"""core: a small autograd engine over NumPy (and CuPy), with PyTorch's names and semantics.

    import core
    from core import nn, optim, functional as F
"""

from . import random  # noqa: I001 - random first: tensor factories draw from it
from .autograd import Context, Function, detect_anomaly, enable_grad, is_grad_enabled, no_grad, set_grad_enabled, trace
from .ops import cat, einsum, stack, where
from .random import manual_seed
from .tensor import (
    Tensor,
    arange,
    full,
    ones,
    ones_like,
    rand,
    randint,
    randn,
    tensor,
    zeros,
    zeros_like,
)

from . import functional, init, nn, optim, serialize  # noqa: E402
from .gradcheck import gradcheck  # noqa: E402

F = functional
float32, float64, int64, int32, bool_ = "float32", "float64", "int64", "int32", "bool"


def _unary(name):
    def f(x):
        return getattr(x, name)()

    f.__name__ = name
    f.__doc__ = f"Elementwise {name} (torch.{name})."
    return f


exp, log, sqrt, tanh, sigmoid, relu, abs, sin, cos, log1p = (  # noqa: A001
    _unary(n) for n in ("exp", "log", "sqrt", "tanh", "sigmoid", "relu", "abs", "sin", "cos", "log1p")
)


def matmul(a, b):
    return a @ b


def clamp(x, min=None, max=None):  # noqa: A002
    return x.clamp(min, max)


__all__ = [
    "F", "functional", "gradcheck", "init", "nn", "optim", "serialize",
    "Context", "Function", "Tensor", "arange", "cat", "detect_anomaly", "einsum", "enable_grad", "full",
    "is_grad_enabled", "manual_seed", "no_grad", "ones", "ones_like", "rand", "randint", "randn", "random",
    "set_grad_enabled", "stack", "tensor", "trace", "where", "zeros", "zeros_like",
]
