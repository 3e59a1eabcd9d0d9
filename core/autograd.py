"""The autograd engine: `Function`, its `Context`, the backward walk, and the grad modes.

A differentiable op is a `Function` subclass with `forward(ctx, *args)` over raw arrays and
`backward(ctx, grad)` returning one gradient (or None) per positional argument. `Function.apply`
unwraps Tensors, runs `forward`, and links the output to a `Context` that remembers the inputs.
`Tensor.backward` walks those contexts in reverse topological order (iteratively: a 100,000-op
chain needs no recursion) and sums each gradient back to its input's shape in ONE place,
`_unbroadcast`, so that no op has to think about broadcasting in its backward.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
import sys
import threading

import numpy as np

# --- grad modes ------------------------------------------------------------------------------


class _Mode(threading.local):
    def __init__(self):
        self.grad_enabled = True
        self.anomaly = False
        self.trace = None  # a file-like object while tracing


_mode = _Mode()
_inplace = [0]  # in-place changes of tensors so far (Tensor._version's sum): 0 in most programs, which skip the check


def note_inplace(tensor):
    """Count an in-place change of `tensor` (its _version, for the check before backward)."""
    tensor._version += 1
    _inplace[0] += 1


def is_grad_enabled() -> bool:
    """True when new ops record a graph for backward."""
    return _mode.grad_enabled


class _GradMode:
    """Context manager and decorator that sets whether ops record a graph (as torch.no_grad).

    Usable as `with no_grad():`, `@no_grad()` and `@no_grad` (no parentheses), like PyTorch's.
    """

    enabled = True

    def __new__(cls, fn=None):
        self = super().__new__(cls)
        return self if fn is None else self(fn)  # @no_grad without parentheses

    def __enter__(self):
        self._prev = _mode.grad_enabled
        _mode.grad_enabled = self.enabled
        return self

    def __exit__(self, *exc):
        _mode.grad_enabled = self._prev
        return False

    def __call__(self, fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with self.__class__():
                return fn(*args, **kwargs)

        return wrapper


class no_grad(_GradMode):  # noqa: N801 - PyTorch's name
    """Disable graph recording: for evaluation, sampling and optimizer updates."""

    enabled = False


class enable_grad(_GradMode):  # noqa: N801 - PyTorch's name
    """Re-enable graph recording inside a `no_grad` block."""

    enabled = True


class set_grad_enabled(_GradMode):  # noqa: N801 - PyTorch's name
    """Set graph recording on or off, like torch.set_grad_enabled(mode).

    As in PyTorch it takes effect when called (`core.set_grad_enabled(False)` alone switches recording
    off); used with `with`, the previous mode comes back at the end of the block; used as a decorator,
    it sets the mode only while the decorated function runs.
    """

    def __new__(cls, mode: bool):
        return object.__new__(cls)

    def __init__(self, mode: bool):
        self.enabled = bool(mode)
        self._prev = _mode.grad_enabled
        _mode.grad_enabled = self.enabled

    def __enter__(self):
        return self

    def __call__(self, fn):
        _mode.grad_enabled = self._prev  # decorating must not change the mode now
        mode = self.enabled

        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            with set_grad_enabled(mode):
                return fn(*args, **kwargs)

        return wrapper


@contextlib.contextmanager
def detect_anomaly():
    """Check every op's output and every gradient for NaN/inf and raise naming the first bad op.

    A RuntimeError (as in PyTorch) names the first op whose output is not finite although its inputs
    are, or the first backward that produced a non-finite gradient. Slow: for debugging only.
    """
    prev = _mode.anomaly
    _mode.anomaly = True
    try:
        yield
    finally:
        _mode.anomaly = prev


@contextlib.contextmanager
def trace(file=None):
    """Print each op as it runs, with its input and output shapes and the line that called it.

    The tool for studying what a model does line by line:
    >>> with core.trace():
    ...     y = model(x)
    """
    prev = _mode.trace
    _mode.trace = file if file is not None else sys.stdout
    try:
        yield
    finally:
        _mode.trace = prev


_CORE_DIR = os.path.dirname(os.path.abspath(__file__))


def _caller() -> str:
    """file:line of the first frame outside core/ (what the reader wrote)."""
    frame = inspect.currentframe()
    while frame is not None:
        fname = frame.f_code.co_filename
        if not os.path.abspath(fname).startswith(_CORE_DIR):
            return f"{os.path.basename(fname)}:{frame.f_lineno}"
        frame = frame.f_back
    return "?"


def _describe(x) -> str:
    if hasattr(x, "shape") and hasattr(x, "dtype"):
        return f"{tuple(x.shape)} {x.dtype}"
    return repr(x) if isinstance(x, (int, float, bool, str, type(None))) else type(x).__name__


# --- Function and Context --------------------------------------------------------------------


class Context:
    """What a Function's forward leaves for its backward: inputs, saved arrays, flags."""

    __slots__ = ("fn", "inputs", "needs_input_grad", "_saved", "_freed", "_stamp", "_versions", "__dict__")

    def __init__(self, fn, inputs):
        self.fn = fn
        self.inputs = inputs  # one entry per positional argument: a Tensor or None
        self.needs_input_grad = tuple(t is not None and t.requires_grad for t in inputs)
        self._saved = ()
        self._freed = False
        self._stamp = 0  # _inplace at the forward, and the inputs' versions then (None: all 0)
        self._versions = None

    def _check_versions(self, out):
        """Refuse a backward whose saved arrays were changed in place since the forward (PyTorch's check): an
        input, or the output `out` (made at version 0), changed (x += …, x[i] = … under no_grad) whose memory
        this op saved."""
        versions = self._versions or (0,) * len(self.inputs)
        changed = [t for t, v in zip(self.inputs, versions) if t is not None and t._version != v]
        if out is not None and out._version:
            changed.append(out)
        if not changed:
            return
        kept = [a for a in (*self._saved, *self.__dict__.values()) if isinstance(a, np.ndarray)]
        for t in changed:
            if isinstance(t.data, np.ndarray) and any(np.may_share_memory(a, t.data) for a in kept):
                raise RuntimeError(
                    f"{self.fn.__name__}: a tensor of shape {t.shape} whose values it saved for backward was changed "
                    "in place after the forward (x += …, x[i] = …); its gradient would be wrong. Change a copy, or "
                    "change it after backward."
                )

    def save_for_backward(self, *arrays):
        """Keep arrays for backward; they are freed after backward unless retain_graph=True."""
        self._saved = arrays

    @property
    def saved_tensors(self):
        if self._freed:
            raise RuntimeError(
                f"{self.fn.__name__}: trying to backward through the graph a second time; its saved "
                "arrays were freed after the first backward. Pass retain_graph=True to the first "
                "backward if you need to call it twice."
            )
        return self._saved

    def _free(self):
        """Drop the saved arrays (and array attributes); an op that saved none can run backward again, as in
        PyTorch (x.sum().backward() twice doubles x.grad)."""
        arrays = [k for k, v in self.__dict__.items() if _holds_array(v)]
        self._freed = self._freed or bool(self._saved) or bool(arrays)
        self._saved = ()
        for k in arrays:
            del self.__dict__[k]


def _holds_array(v) -> bool:
    if isinstance(v, (tuple, list)):
        return any(map(_holds_array, v))
    return isinstance(v, np.ndarray) or hasattr(v, "__cuda_array_interface__")


class Function:
    """Base class of every differentiable op.

    Subclasses define `forward(ctx, *args, **kwargs)` on raw arrays (Tensors arrive unwrapped)
    returning one array, and `backward(ctx, grad)` returning a gradient per positional argument.
    Gradients may have the broadcast shape: the engine sums them back to each input's shape.
    """

    @staticmethod
    def forward(ctx, *args, **kwargs):
        raise NotImplementedError

    @staticmethod
    def backward(ctx, grad):
        raise NotImplementedError

    @classmethod
    def apply(cls, *args, **kwargs):
        Tensor = _tensor_class()
        inputs, raw, wants_grad = [], [], False
        for a in args:  # one pass: this runs once per op, and decoding a token runs ~90 ops
            if isinstance(a, Tensor):
                inputs.append(a)
                raw.append(a.data)
                wants_grad = wants_grad or a.requires_grad
            else:
                inputs.append(None)
                raw.append(a)
        inputs = tuple(inputs)
        record = _mode.grad_enabled and wants_grad
        ctx = Context(cls, inputs)
        out = cls.forward(ctx, *raw, **kwargs)
        if _mode.anomaly and not _all_finite(out) and all(_all_finite(r) for r in raw):
            raise RuntimeError(
                f"anomaly: {cls.__name__} produced a non-finite output from finite inputs "
                f"({', '.join(_describe(r) for r in raw)} -> {_describe(out)})"
            )
        if _mode.trace is not None:
            ins = ", ".join(_describe(r) for r in raw)
            print(f"{_caller():>24}  {cls.__name__:<18} {ins} -> {_describe(out)}", file=_mode.trace)
        t = Tensor(out, requires_grad=record and _is_float(out))
        if t.requires_grad:
            t._ctx = ctx
            if _inplace[0]:
                ctx._stamp = _inplace[0]
                ctx._versions = tuple(0 if x is None else x._version for x in inputs)
        return t


@functools.cache
def _tensor_class():
    """core.tensor.Tensor, imported on first use (tensor.py imports this module)."""
    from .tensor import Tensor

    return Tensor


def _is_float(a) -> bool:
    return a.dtype.kind == "f"  # (np.issubdtype is ~20x slower, and this runs once per op)


def _all_finite(a) -> bool:
    if not hasattr(a, "dtype") or not np.issubdtype(a.dtype, np.inexact):
        return True
    return bool(np.isfinite(a).all())


# --- backward ----------------------------------------------------------------------------------


def _unbroadcast(grad, shape, op_name):
    """Sum a gradient of a broadcast result back down to an input's shape (the one place)."""
    if grad.shape == tuple(shape):
        return grad
    extra = grad.ndim - len(shape)
    if extra < 0:
        raise RuntimeError(f"{op_name}: gradient of shape {grad.shape} is smaller than input {shape}")
    if extra:
        grad = grad.sum(axis=tuple(range(extra)))
    axes = tuple(i for i, n in enumerate(shape) if n == 1 and grad.shape[i] != 1)
    if axes:
        grad = grad.sum(axis=axes, keepdims=True)
    if grad.shape != tuple(shape):
        raise RuntimeError(f"{op_name}: gradient of shape {grad.shape} does not fit input {tuple(shape)}")
    return grad


def _topological(root_ctx):
    """Contexts reachable from root_ctx, each after every context that consumes its output."""
    order, seen = [], {id(root_ctx)}
    stack = [(root_ctx, iter(root_ctx.inputs))]
    while stack:
        ctx, it = stack[-1]
        for t in it:
            if t is not None and t._ctx is not None and id(t._ctx) not in seen:
                seen.add(id(t._ctx))
                stack.append((t._ctx, iter(t._ctx.inputs)))
                break
        else:
            stack.pop()
            order.append(ctx)
    order.reverse()
    return order


def backward(tensor, gradient=None, retain_graph=False):
    """Accumulate d(tensor)/d(leaf) · gradient into every leaf's `.grad`."""
    if not tensor.requires_grad:
        raise RuntimeError("backward: tensor does not require grad and has no grad_fn")
    if gradient is None:
        if tensor.data.size != 1:
            raise RuntimeError(
                f"backward: grad can be implicitly created only for scalar outputs, got shape {tensor.shape}"
            )
        gradient = np.ones_like(tensor.data)
    else:
        gradient = gradient.data if hasattr(gradient, "_ctx") else np.asarray(gradient)
        if gradient.shape != tensor.shape:
            raise RuntimeError(f"backward: gradient shape {gradient.shape} != tensor shape {tensor.shape}")
        gradient = gradient.astype(tensor.dtype, copy=False)
    # One array may reach several .grad slots (Add passes its gradient to both inputs, and the caller
    # keeps `gradient`): every array handed out is remembered, and copied if handed out again, so that
    # an in-place update of one .grad (an optimizer, clip_grad_norm_) never changes another.
    handed = {id(gradient)}

    def give(t, g):
        if t.grad is None and id(g) in handed:
            g = g.copy()
        handed.add(id(g))
        t._accumulate(g)

    if tensor._ctx is None or tensor._retains_grad:
        give(tensor, gradient)
    if tensor._ctx is None:  # a leaf
        return
    grads = {id(tensor._ctx): gradient}
    track = _inplace[0] != 0  # something was changed in place: find each op's output, for _check_versions
    outs = {id(tensor._ctx): tensor} if track else None
    for ctx in _topological(tensor._ctx):
        g = grads.pop(id(ctx), None)
        if g is None:
            continue
        name = ctx.fn.__name__
        if ctx._freed:
            ctx.saved_tensors  # raises the clear "second time" error
        if ctx._stamp != _inplace[0]:  # something was changed in place since this op's forward
            ctx._check_versions(outs.get(id(ctx)))
        in_grads = ctx.fn.backward(ctx, g)
        if not isinstance(in_grads, tuple):
            in_grads = (in_grads,)
        if len(in_grads) != len(ctx.inputs):
            raise RuntimeError(f"{name}.backward returned {len(in_grads)} gradients for {len(ctx.inputs)} inputs")
        for inp, gi in zip(ctx.inputs, in_grads):
            if inp is None or gi is None or not inp.requires_grad:
                continue
            gi = _unbroadcast(gi, inp.shape, name)
            if gi.dtype != inp.dtype:
                gi = gi.astype(inp.dtype)
            if _mode.anomaly and not _all_finite(gi):
                raise RuntimeError(
                    f"anomaly: {name}.backward produced a non-finite gradient for an input of shape {inp.shape}"
                )
            if inp._ctx is None:
                give(inp, gi)
            else:
                key = id(inp._ctx)
                grads[key] = gi if key not in grads else grads[key] + gi
                if track:
                    outs[key] = inp
                if inp._retains_grad:
                    give(inp, gi)
        if not retain_graph:
            ctx._free()
