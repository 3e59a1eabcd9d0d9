"""The tensor ops: elementwise math, reductions, shape changes, indexing, matmul and einsum.

Each op is a `Function`: `forward` on raw arrays, `backward` giving one gradient per input.
Gradients may keep the broadcast shape; the engine sums them back (autograd._unbroadcast).
"""

from __future__ import annotations

import numpy as np

from .autograd import Function
from .tensor import DEFAULT_DTYPE, Tensor


def _arr(x):
    return x.data if isinstance(x, Tensor) else x


def _axes(dim, ndim):
    """Normalize a PyTorch `dim` (None, int or tuple, negatives allowed) to a tuple of axes."""
    if dim is None or (isinstance(dim, (tuple, list)) and len(dim) == 0):  # dim=() means all, as in PyTorch
        return tuple(range(ndim))
    dims = dim if isinstance(dim, (tuple, list)) else (dim,)
    out = []
    for d in dims:
        if not -max(ndim, 1) <= d < max(ndim, 1):  # a 0-d tensor accepts dim 0 and -1
            raise IndexError(f"dimension {d} out of range for a tensor of {ndim} dimensions")
        if ndim:
            out.append(d % ndim)
    if len(set(out)) != len(out):
        raise ValueError(f"dim {dim} names a dimension more than once")
    return tuple(out)


def _keep(g, axes, shape):
    """Re-insert reduced axes so a reduction's gradient broadcasts against its input."""
    return g.reshape(tuple(1 if i in axes else n for i, n in enumerate(shape))) if axes else g


def _check_broadcast(name, a, b):
    try:
        return np.broadcast_shapes(np.shape(a), np.shape(b))
    except ValueError:
        raise ValueError(f"{name}: shapes {np.shape(a)} and {np.shape(b)} cannot be broadcast together") from None


def _floating(a):
    """Integer and bool inputs of float-valued math become the default float dtype (torch.exp(int) is float32)."""
    return a if a.dtype.kind in "fc" else a.astype(DEFAULT_DTYPE)


_CATEGORY = {"b": 0, "u": 1, "i": 1, "f": 2, "c": 3}


def _category(x):
    """PyTorch's dtype category of an operand: 0 bool, 1 integer, 2 float, 3 complex."""
    if isinstance(x, (np.ndarray, np.generic)):
        return _CATEGORY[x.dtype.kind]
    return 0 if isinstance(x, bool) else 1 if isinstance(x, int) else 2 if isinstance(x, float) else 3


def _promote(out, a, b):
    """Give a result PyTorch's dtype where NumPy's differs.

    PyTorch ranks operands: tensors with dimensions, then 0-d tensors, then Python numbers; the result
    takes the highest category (bool < int < float) of any operand, and within it the dtype of the
    highest-ranked operands of that category: the default float32 (or int64) when they are only Python
    numbers, float32 when a float comes only from dividing integers. NumPy would make float64 of
    `arange(n) * 0.1` or of `x32 * tensor(np.float64(2))`, and int64 of `int32 + tensor(2)`.
    """
    if out.dtype.kind not in "fiub" or (type(a) is np.ndarray and type(b) is np.ndarray and
                                         a.dtype == b.dtype == out.dtype):
        return out
    top = max(_category(a), _category(b))
    if out.dtype.kind == "f" and top < 2:  # true division of integers
        want = DEFAULT_DTYPE
    else:
        ranked = [x for x in (a, b) if isinstance(x, np.ndarray) and _category(x) == top]
        dims = [x.dtype for x in ranked if x.ndim]
        want = (np.result_type(*dims) if dims else np.result_type(*(x.dtype for x in ranked)) if ranked
                else (np.bool_, np.int64, DEFAULT_DTYPE)[top])
    return out if out.dtype == want else out.astype(want)


def _promote_all(out, arrays):
    """_promote for ops of many tensors (cat, stack): floats take the float operands' dtype, ints and bools with
    floats do not make float64 of them."""
    floats = [x.dtype for x in arrays if x.dtype.kind == "f"]
    want = np.result_type(*floats) if floats else out.dtype
    return out if out.dtype == want else out.astype(want)


def _dim(op, dim, ndim):
    """A PyTorch dim (negative allowed) as a non-negative axis; a 0-d tensor has the one axis 0. Out of range:
    PyTorch's IndexError, not a silent wrap-around."""
    n = max(ndim, 1)
    if not isinstance(dim, (int, np.integer)) or not -n <= dim < n:
        raise IndexError(f"{op}: dim {dim!r} is out of range for a tensor of {ndim} dimensions")
    return int(dim) % n


def _binary(name, f, a, b):
    """f(a, b) with broadcasting and PyTorch's type promotion (`_promote`); a shape mismatch is
    reported with the op's name and both shapes. (Trying first and explaining on failure keeps the
    common path free of a separate shape check.)"""
    try:
        out = f(a, b)
    except ValueError:
        _check_broadcast(name, a, b)
        raise
    return _promote(out, a, b)


# --- binary arithmetic --------------------------------------------------------------------------


class Add(Function):
    @staticmethod
    def forward(ctx, a, b):
        return _binary("add", np.add, a, b)

    @staticmethod
    def backward(ctx, g):
        return g, g


def _no_bool(op, *xs):
    """PyTorch refuses `-` on bool tensors (a mask is inverted with ~)."""
    if any(isinstance(x, (bool, np.bool_)) or getattr(x, "dtype", None) == np.bool_ for x in xs):
        raise RuntimeError(f"{op}: the `-` operator on a bool tensor is not supported; to invert a mask use ~ "
                           f"(got {', '.join(_describe_operand(x) for x in xs)})")


def _describe_operand(x):
    return f"{x.dtype} tensor of shape {x.shape}" if isinstance(x, np.ndarray) else repr(x)


class Sub(Function):
    @staticmethod
    def forward(ctx, a, b):
        _no_bool("sub", a, b)
        return _binary("sub", np.subtract, a, b)

    @staticmethod
    def backward(ctx, g):
        return g, -g


class Mul(Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        return _binary("mul", np.multiply, a, b)

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        return (g * b if ctx.needs_input_grad[0] else None), (g * a if ctx.needs_input_grad[1] else None)


class Div(Function):
    @staticmethod
    def forward(ctx, a, b):
        ctx.save_for_backward(a, b)
        with np.errstate(divide="ignore", invalid="ignore"):  # x / 0 is ±inf or nan, silently as in PyTorch
            return _binary("div", np.true_divide, a, b)

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        ga = g / b if ctx.needs_input_grad[0] else None
        gb = -g * a / (np.asarray(b) * b) if ctx.needs_input_grad[1] else None
        return ga, gb


class Pow(Function):
    @staticmethod
    def forward(ctx, a, b):
        with np.errstate(divide="ignore", invalid="ignore"):  # 0 ** -1 is inf, (-1) ** 0.5 nan, as in PyTorch
            out = _binary("pow", np.power, a, b)
        ctx.save_for_backward(a, b, out)
        return out

    @staticmethod
    def backward(ctx, g):
        a, b, out = ctx.saved_tensors
        ga = gb = None
        if ctx.needs_input_grad[0]:  # b·a^(b-1), taken as 0 where b == 0 (so 0^0 has gradient 0, as PyTorch)
            with np.errstate(divide="ignore", invalid="ignore"):
                ga = g * np.where(np.equal(b, 0), 0, b * np.power(a, np.subtract(b, 1)))
        if ctx.needs_input_grad[1]:  # d(a^b)/db = a^b log a, taken as 0 where a == 0 and b >= 0 (as PyTorch:
            with np.errstate(divide="ignore", invalid="ignore"):  # 0^b with b < 0 is inf, and inf·log 0 is -inf)
                gb = np.where((np.asarray(a) == 0) & (np.asarray(b) >= 0), 0, g * out * np.log(a))
        return ga, gb


class MatMul(Function):
    @staticmethod
    def forward(ctx, a, b):
        if np.ndim(a) == 0 or np.ndim(b) == 0:
            raise ValueError(f"matmul: both arguments need at least 1 dimension, got {np.shape(a)} and {np.shape(b)}")
        if a.dtype != b.dtype:  # PyTorch does not promote in matmul (NumPy would make float64 of float32 @ float64)
            raise TypeError(f"matmul: both arguments must have the same dtype, got {a.dtype} {a.shape} and "
                            f"{b.dtype} {b.shape}")
        ka = a.shape[-1]
        kb = b.shape[0] if b.ndim == 1 else b.shape[-2]
        if ka != kb:
            raise ValueError(f"matmul: shapes {a.shape} and {b.shape} do not align ({ka} != {kb})")
        if a.ndim > 2 and b.ndim > 2:
            try:
                np.broadcast_shapes(a.shape[:-2], b.shape[:-2])
            except ValueError:
                raise ValueError(f"matmul: the batch dims of {a.shape} and {b.shape} cannot be broadcast together") \
                    from None
        ctx.save_for_backward(a, b)
        return np.matmul(a, b)

    @staticmethod
    def backward(ctx, g):
        a, b = ctx.saved_tensors
        a2 = a[None, :] if a.ndim == 1 else a  # treat vectors as matrices, then drop the added axis
        b2 = b[:, None] if b.ndim == 1 else b
        g2 = g.reshape(np.broadcast_shapes(a2.shape[:-2], b2.shape[:-2]) + (a2.shape[-2], b2.shape[-1]))
        ga = gb = None
        if ctx.needs_input_grad[0]:
            ga = np.matmul(g2, np.swapaxes(b2, -1, -2))
            ga = ga[..., 0, :] if a.ndim == 1 else ga
        if ctx.needs_input_grad[1]:
            gb = np.matmul(np.swapaxes(a2, -1, -2), g2)
            gb = gb[..., 0] if b.ndim == 1 else gb
        return ga, gb


# --- unary elementwise --------------------------------------------------------------------------


class Neg(Function):
    @staticmethod
    def forward(ctx, a):
        _no_bool("neg", a)
        return np.negative(a)

    @staticmethod
    def backward(ctx, g):
        return -g


class Exp(Function):
    @staticmethod
    def forward(ctx, a):
        a = _floating(a)
        out = np.exp(a)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, g):
        (out,) = ctx.saved_tensors
        return g * out


class Log(Function):
    @staticmethod
    def forward(ctx, a):
        a = _floating(a)
        ctx.save_for_backward(a)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.log(a)

    @staticmethod
    def backward(ctx, g):
        (a,) = ctx.saved_tensors
        return g / a


class Log1p(Function):
    @staticmethod
    def forward(ctx, a):
        a = _floating(a)
        ctx.save_for_backward(a)
        return np.log1p(a)

    @staticmethod
    def backward(ctx, g):
        (a,) = ctx.saved_tensors
        return g / (1 + a)


class Sqrt(Function):
    @staticmethod
    def forward(ctx, a):
        a = _floating(a)
        out = np.sqrt(a)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, g):
        (out,) = ctx.saved_tensors
        return g / (2 * out)


class Sin(Function):
    @staticmethod
    def forward(ctx, a):
        a = _floating(a)
        ctx.save_for_backward(a)
        return np.sin(a)

    @staticmethod
    def backward(ctx, g):
        (a,) = ctx.saved_tensors
        return g * np.cos(a)


class Cos(Function):
    @staticmethod
    def forward(ctx, a):
        a = _floating(a)
        ctx.save_for_backward(a)
        return np.cos(a)

    @staticmethod
    def backward(ctx, g):
        (a,) = ctx.saved_tensors
        return -g * np.sin(a)


class Tanh(Function):
    @staticmethod
    def forward(ctx, a):
        a = _floating(a)
        out = np.tanh(a)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, g):
        (out,) = ctx.saved_tensors
        return g * (1 - out * out)


def _sigmoid(a):
    """σ(a) without overflow for large |a| (exp of a non-positive number only)."""
    e = np.exp(-np.abs(a))
    return np.where(a >= 0, 1 / (1 + e), e / (1 + e)).astype(a.dtype, copy=False)


class Sigmoid(Function):
    @staticmethod
    def forward(ctx, a):
        a = _floating(a)
        out = _sigmoid(a)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, g):
        (out,) = ctx.saved_tensors
        return g * out * (1 - out)


class Relu(Function):
    @staticmethod
    def forward(ctx, a):
        out = np.maximum(a, 0)
        ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx, g):
        (out,) = ctx.saved_tensors
        return g * ~(out <= 0)  # (a NaN input passes its gradient, as PyTorch's threshold_backward)


class Abs(Function):
    @staticmethod
    def forward(ctx, a):
        ctx.save_for_backward(a)
        return np.abs(a)

    @staticmethod
    def backward(ctx, g):
        (a,) = ctx.saved_tensors
        return g * np.sign(a)


class Clamp(Function):
    """min(max(a, lo), hi), each bound a number or a tensor (which then gets the gradient where it is the
    result, as in PyTorch); the dtype is PyTorch's promotion of a with the bounds (an int tensor clamped to 0.5
    gives floats)."""

    @staticmethod
    def forward(ctx, a, lo, hi):
        low = a if lo is None else _promote(np.asarray(np.maximum(a, lo)), a, lo)  # (0-d a: NumPy gives a scalar)
        out = low if hi is None else _promote(np.asarray(np.minimum(low, hi)), low, hi)
        ctx.save_for_backward(a, low, lo, hi)
        return out.copy() if out is a else out

    @staticmethod
    def backward(ctx, g):
        a, low, lo, hi = ctx.saved_tensors
        under = np.zeros(a.shape, dtype=bool) if lo is None else a < lo  # lo is the result (unless hi is)
        over = np.zeros(low.shape, dtype=bool) if hi is None else low > hi  # hi is the result
        ga = g * (~under & ~over)
        glo = g * (under & ~over) if ctx.needs_input_grad[1] else None
        ghi = g * over if ctx.needs_input_grad[2] else None
        return ga, glo, ghi


class MaskedFill(Function):
    @staticmethod
    def forward(ctx, a, mask, value):
        mask = np.asarray(mask) if isinstance(mask, (list, bool)) else mask
        if mask.dtype != np.bool_:
            raise TypeError(f"masked_fill: mask must be a bool tensor, got {mask.dtype}")
        if np.broadcast_shapes(a.shape, mask.shape) != a.shape:
            raise ValueError(f"masked_fill: mask of shape {mask.shape} does not broadcast to {a.shape}")
        if np.ndim(value):
            raise ValueError(f"masked_fill: value must be a number or a 0-d tensor, got shape {np.shape(value)}")
        ctx.save_for_backward(mask)
        return np.where(mask, np.asarray(value, dtype=a.dtype), a)

    @staticmethod
    def backward(ctx, g):
        (mask,) = ctx.saved_tensors
        gv = np.where(mask, g, 0) if ctx.needs_input_grad[2] else None  # a tensor value: the filled places'
        return np.where(mask, 0, g), None, gv


class Cast(Function):
    @staticmethod
    def forward(ctx, a, dtype):
        ctx.dtype = a.dtype
        return a.astype(dtype)

    @staticmethod
    def backward(ctx, g):
        return g.astype(ctx.dtype), None


class Clone(Function):
    @staticmethod
    def forward(ctx, a):
        return a.copy()

    @staticmethod
    def backward(ctx, g):
        return g


class ToDevice(Function):
    @staticmethod
    def forward(ctx, a, device):
        ctx.src = "cpu" if isinstance(a, np.ndarray) else "cuda"
        return _move(a, device)

    @staticmethod
    def backward(ctx, g):
        return _move(g, ctx.src), None


def _move(a, device):
    if device == "cpu":
        return a if isinstance(a, np.ndarray) else a.get()
    import cupy  # a GPU path: only reached when a CUDA device is asked for

    return cupy.asarray(a)


# --- reductions ---------------------------------------------------------------------------------


class Sum(Function):
    @staticmethod
    def forward(ctx, a, dim, keepdim):
        axes = _axes(dim, a.ndim)
        ctx.shape, ctx.axes, ctx.keepdim = a.shape, axes, keepdim
        return np.asarray(np.sum(a, axis=axes, keepdims=keepdim))

    @staticmethod
    def backward(ctx, g):
        g = g if ctx.keepdim else _keep(g, ctx.axes, ctx.shape)
        return np.broadcast_to(g, ctx.shape), None, None


class Mean(Function):
    @staticmethod
    def forward(ctx, a, dim, keepdim):
        if not np.issubdtype(a.dtype, np.floating):
            raise TypeError(f"mean: needs a floating point tensor, got {a.dtype}")
        axes = _axes(dim, a.ndim)
        ctx.shape, ctx.axes, ctx.keepdim = a.shape, axes, keepdim
        ctx.n = int(np.prod([a.shape[i] for i in axes])) if a.ndim else 1
        return np.asarray(np.mean(a, axis=axes, keepdims=keepdim))

    @staticmethod
    def backward(ctx, g):
        g = g if ctx.keepdim else _keep(g, ctx.axes, ctx.shape)
        return np.broadcast_to(g / ctx.n, ctx.shape), None, None


class _Extreme(Function):
    """amax/amin: the gradient is split evenly among tied extremes, as in PyTorch."""

    reduce = staticmethod(np.max)

    @classmethod
    def forward(cls, ctx, a, dim, keepdim):
        axes = _axes(dim, a.ndim)
        if any(a.shape[i] == 0 for i in axes):
            raise RuntimeError(f"{cls.__name__.lower()}: cannot reduce over an empty dimension of shape {a.shape}")
        out = np.asarray(cls.reduce(a, axis=axes, keepdims=True))
        ctx.save_for_backward(a, out)
        ctx.axes, ctx.keepdim, ctx.shape = axes, keepdim, a.shape
        return out if keepdim else out.reshape(tuple(n for i, n in enumerate(a.shape) if i not in axes))

    nan_hits = False  # whether a NaN result's gradient goes to the NaNs that made it (else: NaN, as amax's)

    @classmethod
    def backward(cls, ctx, g):
        a, out = ctx.saved_tensors
        g = g if ctx.keepdim else _keep(g, ctx.axes, ctx.shape)
        hit = a == out
        if cls.nan_hits:
            hit |= np.isnan(a) & np.isnan(out)
        return g * hit / hit.sum(axis=ctx.axes, keepdims=True), None, None


class Amax(_Extreme):
    reduce = staticmethod(np.max)


class Amin(_Extreme):
    reduce = staticmethod(np.min)


class MaxAll(Amax):
    """x.max() over all elements: as amax, but a NaN maximum passes its gradient to the NaN (PyTorch's max())."""

    nan_hits = True


class MinAll(Amin):
    nan_hits = True


class Var(Function):
    @staticmethod
    def forward(ctx, a, dim, correction, keepdim):
        if a.dtype.kind != "f":
            raise TypeError(f"var: needs a floating point tensor, got {a.dtype}")
        axes = _axes(dim, a.ndim)
        n = int(np.prod([a.shape[i] for i in axes])) if a.ndim else 1
        centered = a - a.mean(axis=axes, keepdims=True)
        ctx.save_for_backward(centered)
        ctx.axes, ctx.keepdim, ctx.shape, ctx.denom = axes, keepdim, a.shape, max(n - correction, 0)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.asarray(np.sum(centered * centered, axis=axes, keepdims=keepdim) / ctx.denom)

    @staticmethod
    def backward(ctx, g):
        (centered,) = ctx.saved_tensors
        g = g if ctx.keepdim else _keep(g, ctx.axes, ctx.shape)
        return g * 2 * centered / ctx.denom, None, None, None


class Std(Function):
    """sqrt(var); the gradient centered / (denom · std) is taken as 0 where std == 0, as in PyTorch."""

    @staticmethod
    def forward(ctx, a, dim, correction, keepdim):
        if a.dtype.kind != "f":
            raise TypeError(f"std: needs a floating point tensor, got {a.dtype}")
        axes = _axes(dim, a.ndim)
        n = int(np.prod([a.shape[i] for i in axes])) if a.ndim else 1
        centered = a - a.mean(axis=axes, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            out = np.sqrt(np.sum(centered * centered, axis=axes, keepdims=True) / max(n - correction, 0))
        ctx.save_for_backward(centered, out)
        ctx.axes, ctx.keepdim, ctx.shape, ctx.denom = axes, keepdim, a.shape, max(n - correction, 0)
        return out if keepdim else out.reshape(tuple(k for i, k in enumerate(a.shape) if i not in axes))

    @staticmethod
    def backward(ctx, g):
        centered, out = ctx.saved_tensors
        g = g if ctx.keepdim else _keep(g, ctx.axes, ctx.shape)
        with np.errstate(divide="ignore", invalid="ignore"):
            scale = np.where(out == 0, 0, g / (ctx.denom * np.where(out == 0, 1, out)))
        return scale * centered, None, None, None


class Gather(Function):
    """out[..., i, ...] = a[..., index[..., i, ...], ...] along dim (torch.gather); index may be smaller
    than a in the other dims. Repeated indices accumulate their gradients."""

    @staticmethod
    def forward(ctx, a, dim, index):
        if not np.issubdtype(index.dtype, np.integer):
            raise TypeError(f"gather: index must be an integer tensor, got {index.dtype}")
        if index.ndim != a.ndim:
            raise ValueError(f"gather: index of shape {index.shape} must have as many dims as input {a.shape}")
        d = _axes(dim, a.ndim)[0] if a.ndim else 0
        if any(i != d and m > n for i, (m, n) in enumerate(zip(index.shape, a.shape))):
            raise ValueError(f"gather: index of shape {index.shape} is larger than input {a.shape} outside dim {dim}")
        n = a.shape[d] if a.ndim else 1
        if index.size and (index.min() < 0 or index.max() >= n):  # no negative indices, as in PyTorch
            raise IndexError(f"gather: index out of range [0, {n}) for dim {dim}: min {index.min()}, max {index.max()}")
        ctx.shape, ctx.d = a.shape, d
        ctx.index = index  # integer arrays are not differentiated; plain attributes are freed too
        view = a[tuple(slice(None) if i == d else slice(0, m) for i, m in enumerate(index.shape))]
        return np.take_along_axis(view, index, axis=d) if a.ndim else a.copy()

    @staticmethod
    def backward(ctx, g):
        out = np.zeros(ctx.shape, dtype=g.dtype)
        if not ctx.shape:
            return g, None, None
        where = list(np.indices(ctx.index.shape, sparse=True))
        where[ctx.d] = ctx.index
        np.add.at(out, tuple(where), g)
        return out, None, None


class CumSum(Function):
    @staticmethod
    def forward(ctx, a, dim):
        ctx.d = _dim("cumsum", dim, a.ndim)
        return np.cumsum(a, axis=ctx.d) if a.ndim else a.copy()

    @staticmethod
    def backward(ctx, g):  # ∂(Σ_{j≤i} a_j)/∂a_k = [k ≤ i]: the sum of g over i ≥ k
        if g.ndim == 0:
            return g, None
        return np.flip(np.cumsum(np.flip(g, ctx.d), axis=ctx.d), ctx.d), None


class LogSumExp(Function):
    @staticmethod
    def forward(ctx, a, dim, keepdim):
        a = _floating(a)
        axes = _axes(dim, a.ndim)
        m = np.max(a, axis=axes, keepdims=True, initial=-np.inf)  # (initial: over no elements, −inf as PyTorch)
        m = np.where(np.isfinite(m), m, 0)
        with np.errstate(divide="ignore"):  # log 0 = −inf: over no elements, or all −inf
            out = np.log(np.sum(np.exp(a - m), axis=axes, keepdims=True)) + m
        ctx.save_for_backward(a, out)
        ctx.axes, ctx.keepdim, ctx.shape = axes, keepdim, a.shape
        return out if keepdim else out.reshape(tuple(n for i, n in enumerate(a.shape) if i not in axes))

    @staticmethod
    def backward(ctx, g):
        a, out = ctx.saved_tensors
        g = g if ctx.keepdim else _keep(g, ctx.axes, ctx.shape)
        return g * np.exp(a - out), None, None


# --- shape --------------------------------------------------------------------------------------


class Reshape(Function):
    @staticmethod
    def forward(ctx, a, shape):
        ctx.shape = a.shape
        try:
            return a.reshape(shape)
        except ValueError:
            raise ValueError(f"reshape: shape {tuple(shape)} is invalid for a tensor of shape {a.shape}") from None

    @staticmethod
    def backward(ctx, g):
        return g.reshape(ctx.shape), None


class Permute(Function):
    @staticmethod
    def forward(ctx, a, dims):
        if sorted(d % max(a.ndim, 1) for d in dims) != list(range(a.ndim)):
            raise ValueError(f"permute: dims {dims} are not a permutation of a {a.ndim}-d tensor's axes")
        dims = tuple(d % a.ndim for d in dims)
        ctx.inv = tuple(sorted(range(len(dims)), key=dims.__getitem__))  # (np.argsort costs ~10x on a tuple)
        return a.transpose(dims)

    @staticmethod
    def backward(ctx, g):
        return np.transpose(g, ctx.inv), None


class Expand(Function):
    @staticmethod
    def forward(ctx, a, shape):
        try:
            return np.broadcast_to(a, shape)
        except ValueError:
            raise ValueError(f"expand: tensor of shape {a.shape} cannot be expanded to {tuple(shape)}") from None

    @staticmethod
    def backward(ctx, g):
        return g, None  # the engine sums the broadcast dimensions back


class Repeat(Function):
    @staticmethod
    def forward(ctx, a, reps):
        if len(reps) < a.ndim:
            raise ValueError(f"repeat: {len(reps)} repeat counts for a {a.ndim}-d tensor")
        shape = (1,) * (len(reps) - a.ndim) + a.shape
        ctx.shape, ctx.reps, ctx.orig = shape, reps, a.shape
        return np.tile(a.reshape(shape), reps)

    @staticmethod
    def backward(ctx, g):
        split = []
        for r, n in zip(ctx.reps, ctx.shape):
            split += [r, n]
        g = g.reshape(split).sum(axis=tuple(range(0, len(split), 2)))
        return g.reshape(ctx.orig), None


def _index(index):
    """Unwrap Tensors inside an index expression; boolean arrays become their nonzero positions."""
    if isinstance(index, tuple):
        return tuple(_index(i) for i in index)
    if isinstance(index, Tensor):
        index = index.data
    if isinstance(index, list):
        index = np.asarray(index) if index else np.zeros(0, dtype=np.int64)  # x[[]]: no rows, as PyTorch
    if isinstance(index, slice) and index.step is not None and index.step <= 0:
        raise ValueError(f"index: a slice's step must be positive (PyTorch has no negative steps; use flip), "
                         f"got {index}")
    return index


def _is_basic(index):
    parts = index if isinstance(index, tuple) else (index,)
    return all(isinstance(p, (int, np.integer, slice, type(None), type(Ellipsis))) for p in parts)


def _no_repeats(index):
    """True when an index can select no element twice: basic parts plus one boolean mask."""
    parts = index if isinstance(index, tuple) else (index,)
    masks = [p for p in parts if isinstance(p, np.ndarray) and p.dtype == np.bool_]
    others = [p for p in parts if isinstance(p, np.ndarray) and p.dtype != np.bool_]
    return len(masks) == 1 and not others


def _is_int_key(p):
    return isinstance(p, (int, np.integer)) and not isinstance(p, (bool, np.bool_))


def _is_array_key(p):
    return isinstance(p, np.ndarray) and p.ndim > 0


def _key_width(p):
    """The dimensions a part of an index key consumes: a bool array its ndim, None none, anything else one."""
    return p.ndim if _is_array_key(p) and p.dtype == np.bool_ else (0 if p is None else 1)


def _ints_first(index, ndim):
    """For a key that mixes integers with index arrays: (the key with each array as full slices, the arrays' key
    into that result); None for any other key.

    PyTorch applies integers as basic indexing, before the arrays: for x of shape (4, 5, 3), x[0, :, [1, 2]] has
    shape (5, 2). NumPy counts the integer as one more advanced index, which the slice separates from the list,
    and puts the advanced dimension first: (2, 5). Indexing in these two steps gives PyTorch's result."""
    parts = index if isinstance(index, tuple) else (index,)
    if not (any(map(_is_int_key, parts)) and any(map(_is_array_key, parts))):
        return None
    if any(p is Ellipsis for p in parts):
        i = next(k for k, p in enumerate(parts) if p is Ellipsis)
        fill = max(ndim - sum(_key_width(p) for p in parts if p is not Ellipsis), 0)
        parts = parts[:i] + (slice(None),) * fill + parts[i + 1 :]
    basic, arrays = [], []
    for p in parts:
        if _is_int_key(p):
            basic.append(p)
        elif _is_array_key(p):  # its dims stay, for the second step
            basic += [slice(None)] * _key_width(p)
            arrays.append(p)
        else:  # a slice or None: one dimension of the first step's result
            basic.append(p)
            arrays.append(slice(None))
    return tuple(basic), tuple(arrays)


def _scatter(shape, index, g):
    """The gradient of a[index] for a of `shape`: g put back where it was read, repeated reads adding up."""
    out = np.zeros(shape, dtype=g.dtype)
    if _is_basic(index) or _no_repeats(index):
        out[index] = g
    else:  # integer arrays may repeat an index: those gradients must add up
        np.add.at(out, index, g)
    return out


class GetItem(Function):
    @staticmethod
    def forward(ctx, a, index):
        index = _index(index)
        ctx.shape, ctx.dtype, ctx.index = a.shape, a.dtype, index
        ctx.steps = _ints_first(index, a.ndim)
        try:
            if ctx.steps is None:
                return a[index]
            first = a[ctx.steps[0]]
            ctx.first_shape = first.shape
            return first[ctx.steps[1]]
        except IndexError as e:
            raise IndexError(f"getitem: {e} (tensor of shape {a.shape})") from None

    @staticmethod
    def backward(ctx, g):
        if ctx.steps is None:
            return _scatter(ctx.shape, ctx.index, g), None
        return _scatter(ctx.shape, ctx.steps[0], _scatter(ctx.first_shape, ctx.steps[1], g)), None


def cat(tensors, dim=0):
    """Concatenate along an existing dimension (torch.cat)."""
    return Cat.apply(dim, *tensors)


class Cat(Function):
    @staticmethod
    def forward(ctx, dim, *arrays):
        if not arrays:
            raise ValueError("cat: expected a non-empty list of tensors")
        nd = arrays[0].ndim
        if nd == 0:
            raise ValueError("cat: zero-dimensional tensors cannot be concatenated (use stack)")
        d = _dim("cat", dim, nd)
        for x in arrays:
            if x.ndim != nd or x.shape[:d] + x.shape[d + 1 :] != arrays[0].shape[:d] + arrays[0].shape[d + 1 :]:
                raise ValueError(f"cat: shapes {[y.shape for y in arrays]} do not match outside dim {dim}")
        ctx.d, ctx.sizes = d, [x.shape[d] for x in arrays]
        return _promote_all(np.concatenate(arrays, axis=d), arrays)

    @staticmethod
    def backward(ctx, g):
        bounds = np.cumsum(ctx.sizes)[:-1]
        return (None, *np.split(g, bounds, axis=ctx.d))


def stack(tensors, dim=0):
    """Stack along a new dimension (torch.stack)."""
    return Stack.apply(dim, *tensors)


class Stack(Function):
    @staticmethod
    def forward(ctx, dim, *arrays):
        if not arrays:
            raise ValueError("stack: expected a non-empty list of tensors")
        if len({x.shape for x in arrays}) != 1:
            raise ValueError(f"stack: all tensors must have the same shape, got {[x.shape for x in arrays]}")
        ctx.d = _dim("stack", dim, arrays[0].ndim + 1)
        return _promote_all(np.stack(arrays, axis=ctx.d), arrays)

    @staticmethod
    def backward(ctx, g):
        return (None, *np.moveaxis(g, ctx.d, 0))  # views, one per stacked input


def where(condition, input, other):  # noqa: A002 - PyTorch's name
    """Elementwise choice: input where condition is True, else other (torch.where)."""
    return Where.apply(condition, input, other)


class Where(Function):
    @staticmethod
    def forward(ctx, cond, a, b):
        cond = np.asarray(cond) if not hasattr(cond, "dtype") else cond
        if cond.dtype != np.bool_:
            raise TypeError(f"where: condition must be bool, got {cond.dtype}")
        ctx.save_for_backward(cond)
        return _promote(np.where(cond, a, b), a, b)

    @staticmethod
    def backward(ctx, g):
        (cond,) = ctx.saved_tensors
        zero = np.zeros((), dtype=g.dtype)
        ga = np.where(cond, g, zero) if ctx.needs_input_grad[1] else None
        gb = np.where(cond, zero, g) if ctx.needs_input_grad[2] else None
        return None, ga, gb


# --- einsum -------------------------------------------------------------------------------------

_LETTERS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _explicit(subscripts, shapes):
    """Rewrite an einsum spec without '...' and with an explicit output."""
    spec = subscripts.replace(" ", "")
    lhs, _, rhs = spec.partition("->")
    ins = lhs.split(",")
    if len(ins) != len(shapes):
        raise ValueError(f"einsum: '{subscripts}' names {len(ins)} operands but got {len(shapes)}")
    used = set(spec) - set(".,->")
    free = [c for c in _LETTERS if c not in used]
    n_ell = max((len(s) - len(i.replace("...", "")) for i, s in zip(ins, shapes) if "..." in i), default=0)
    ell = "".join(free[:n_ell])
    new_ins = []
    for i, s in zip(ins, shapes):
        if "..." in i:
            k = len(s) - len(i.replace("...", ""))
            i = i.replace("...", ell[n_ell - k :])
        if len(i) != len(s):
            raise ValueError(f"einsum: subscripts '{i}' do not match an operand of shape {tuple(s)}")
        new_ins.append(i)
    if "->" in spec:
        out = rhs.replace("...", ell)
    else:  # implicit output: ellipsis dims then letters used once, in order
        counts = {}
        for c in "".join(new_ins):
            counts[c] = counts.get(c, 0) + 1
        out = ell + "".join(sorted(c for c, n in counts.items() if n == 1 and c not in ell))
    return new_ins, out


def einsum(subscripts, *operands):
    """Einstein summation (torch.einsum); many model lines read best as one einsum."""
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = tuple(operands[0])
    return Einsum.apply(subscripts, *operands)


class Einsum(Function):
    @staticmethod
    def forward(ctx, subscripts, *arrays):
        ins, out = _explicit(subscripts, [a.shape for a in arrays])
        for i in ins:
            if len(set(i)) != len(i):
                raise NotImplementedError(f"einsum: repeated subscripts within one operand ('{i}') are not supported")
        sizes = {}
        for i, a in zip(ins, arrays):
            for c, n in zip(i, a.shape):
                if sizes.get(c, n) != n and n != 1 and sizes[c] != 1:
                    shapes = [x.shape for x in arrays]
                    raise ValueError(f"einsum: '{subscripts}' size mismatch for '{c}': {sizes[c]} vs {n} in {shapes}")
                sizes[c] = max(sizes.get(c, 1), n)
        ctx.save_for_backward(*arrays)
        ctx.ins, ctx.out, ctx.sizes = ins, out, sizes
        return np.einsum(",".join(ins) + "->" + out, *arrays, optimize=len(arrays) > 2)

    @staticmethod
    def backward(ctx, g):
        arrays = ctx.saved_tensors
        grads = [None]
        for k, i in enumerate(ctx.ins):
            if not ctx.needs_input_grad[k + 1]:
                grads.append(None)
                continue
            others = [(s, x) for j, (s, x) in enumerate(zip(ctx.ins, arrays)) if j != k]
            avail = set(ctx.out).union(*(set(s) for s, _ in others))
            # letters summed out of this operand alone come back by broadcasting
            target = "".join(c for c in i if c in avail)
            spec = ",".join([ctx.out] + [s for s, _ in others]) + "->" + target
            gk = np.einsum(spec, g, *(x for _, x in others), optimize=len(others) > 1)
            full = tuple(ctx.sizes[c] for c in i)
            gk = np.broadcast_to(gk.reshape(tuple(ctx.sizes[c] if c in avail else 1 for c in i)), full)
            grads.append(gk)  # the engine sums size-1 (broadcast) operand dims back
        return tuple(grads)
