"""`Tensor`: one array (NumPy on the CPU, CuPy on a GPU) plus what autograd needs.

Every method has PyTorch's name and semantics and is one `Function` from `core.ops`, so that
`core.trace()` shows exactly the ops a line of model code runs.
"""

from __future__ import annotations

from collections import namedtuple

import numpy as np

from . import autograd

DEFAULT_DTYPE = np.float32

values_indices = namedtuple("values_indices", ["values", "indices"])


def _dims(args):
    """Accept both t.reshape(2, 3) and t.reshape((2, 3))."""
    if len(args) == 1 and isinstance(args[0], (tuple, list)):
        return tuple(args[0])
    return tuple(args)


def _device_of(a) -> str:
    return "cpu" if isinstance(a, np.ndarray) else "cuda"


class Tensor:
    """An n-dimensional array that records the ops made from it, for reverse-mode autograd."""

    __slots__ = ("data", "grad", "requires_grad", "_ctx", "_retains_grad", "_version", "__weakref__")
    __array_priority__ = 1000  # ndarray (op) Tensor defers to Tensor's reflected operator
    __hash__ = object.__hash__  # == is elementwise, as in PyTorch; hash by identity

    def __init__(self, data, requires_grad=False):
        if isinstance(data, Tensor):
            data = data.data
        if not (isinstance(data, np.ndarray) or hasattr(data, "__cuda_array_interface__")):
            data = np.asarray(data)  # also turns NumPy scalars from 0-d reductions into 0-d arrays
        if requires_grad and data.dtype.kind != "f":
            raise RuntimeError(f"only floating point tensors can require gradients, got dtype {data.dtype}")
        self.data = data
        self.grad = None
        self.requires_grad = bool(requires_grad)
        self._ctx = None
        self._retains_grad = False
        self._version = 0  # in-place changes so far (autograd checks that saved values were not changed)

    # --- properties ---------------------------------------------------------------------------
    shape = property(lambda self: tuple(self.data.shape))
    dtype = property(lambda self: self.data.dtype)
    ndim = property(lambda self: self.data.ndim)
    device = property(lambda self: _device_of(self.data))
    is_leaf = property(lambda self: self._ctx is None)
    grad_fn = property(lambda self: None if self._ctx is None else self._ctx.fn.__name__)
    T = property(lambda self: self.permute(*reversed(range(self.ndim))))
    mT = property(lambda self: self.transpose(-2, -1))

    def size(self, dim=None):
        """The shape, or one dimension of it."""
        return self.shape if dim is None else self.shape[dim]

    def numel(self) -> int:
        return int(self.data.size)

    def dim(self) -> int:
        return self.ndim

    def __len__(self):
        if self.ndim == 0:
            raise TypeError("len() of a 0-d tensor")
        return self.shape[0]

    def __repr__(self):
        body = np.array2string(np.asarray(self.numpy()), separator=", ", prefix="tensor(")
        extra = "" if self.dtype in (DEFAULT_DTYPE, np.int64, np.bool_) else f", dtype={self.dtype}"
        if self._ctx is not None:
            extra += f", grad_fn=<{self.grad_fn}>"
        elif self.requires_grad:
            extra += ", requires_grad=True"
        return f"tensor({body}{extra})"

    # --- autograd -----------------------------------------------------------------------------
    def backward(self, gradient=None, retain_graph=False):
        """Accumulate the gradient of this tensor into every leaf that requires grad."""
        autograd.backward(self, gradient, retain_graph)

    def _accumulate(self, g):
        if self.grad is None:
            self.grad = g.copy() if g.base is not None or g is getattr(self, "data", None) else g
        else:
            self.grad = self.grad + g

    def retain_grad(self):
        """Keep .grad on this non-leaf tensor after backward."""
        self._retains_grad = True
        return self

    def requires_grad_(self, flag=True):
        if flag and not np.issubdtype(self.dtype, np.floating):
            raise RuntimeError(f"only floating point tensors can require gradients, got dtype {self.dtype}")
        if not flag and self._ctx is not None:
            raise RuntimeError(f"requires_grad_(False): only a leaf's flag can be changed, not that of this output of "
                               f"{self.grad_fn} (shape {self.shape}); use .detach()")
        self.requires_grad = bool(flag)
        return self

    def detach(self):
        """The same data, cut from the graph."""
        return Tensor(self.data)

    def zero_grad(self):
        self.grad = None

    def __array__(self, dtype=None, copy=None):
        """np.asarray(t) gives the data (as for PyTorch tensors); no graph is recorded."""
        a = self.numpy()
        return a if dtype is None else a.astype(dtype, copy=False)

    def numpy(self):
        """The data as a NumPy array (copied from the GPU if needed)."""
        return self.data if isinstance(self.data, np.ndarray) else self.data.get()

    def item(self):
        if self.data.size != 1:
            raise ValueError(f"item(): tensor with {self.data.size} elements cannot be converted to a scalar")
        return self.numpy().reshape(()).item()

    def tolist(self):
        return self.numpy().tolist()

    # --- dtype and device -----------------------------------------------------------------------
    def to(self, target):
        """A copy on another device ('cpu' | 'cuda') or with another dtype; grads flow through."""
        if isinstance(target, str) and target in ("cpu", "cuda"):
            if target == self.device:
                return self
            return ops.ToDevice.apply(self, target)
        if np.dtype(target) == self.dtype:  # as in PyTorch, no copy when nothing changes
            return self
        return ops.Cast.apply(self, np.dtype(target))

    def type(self, dtype):
        return self.to(dtype)

    float = lambda self: self.to(np.float32)  # noqa: E731
    double = lambda self: self.to(np.float64)  # noqa: E731
    long = lambda self: self.to(np.int64)  # noqa: E731
    int = lambda self: self.to(np.int32)  # noqa: E731
    bool = lambda self: self.to(np.bool_)  # noqa: E731
    cpu = lambda self: self.to("cpu")  # noqa: E731
    cuda = lambda self: self.to("cuda")  # noqa: E731

    def clone(self):
        return ops.Clone.apply(self)

    def contiguous(self):
        return self

    def __setitem__(self, index, value):
        if self.requires_grad and autograd.is_grad_enabled():
            raise RuntimeError(
                "in-place assignment to a tensor that requires grad is not supported; "
                "use core.where / masked_fill, or assign inside core.no_grad()"
            )
        if getattr(value, "requires_grad", False) and autograd.is_grad_enabled():  # PyTorch would record the copy
            raise RuntimeError(
                f"x[...] = value: value of shape {value.shape} requires grad, and its gradient would be lost (in-place "
                "assignment is not recorded); build the tensor with core.where / core.cat / core.stack instead"
            )
        index, value = ops._index(index), value.data if isinstance(value, Tensor) else value
        steps = ops._ints_first(index, self.ndim)  # x[0, :, [1, 2]] = v: PyTorch's order, as in __getitem__
        if steps is None:
            self.data[index] = value
        else:
            self.data[steps[0]][steps[1]] = value  # (the first step is basic indexing: a view)
        autograd.note_inplace(self)

    # --- arithmetic -----------------------------------------------------------------------------
    def __add__(self, o):
        return ops.Add.apply(self, o)

    def __radd__(self, o):
        return ops.Add.apply(o, self)

    def __sub__(self, o):
        return ops.Sub.apply(self, o)

    def __rsub__(self, o):
        return ops.Sub.apply(o, self)

    def __mul__(self, o):
        return ops.Mul.apply(self, o)

    def __rmul__(self, o):
        return ops.Mul.apply(o, self)

    def __truediv__(self, o):
        return ops.Div.apply(self, o)

    def __rtruediv__(self, o):
        return ops.Div.apply(o, self)

    def __pow__(self, o):
        return ops.Pow.apply(self, o)

    def __rpow__(self, o):
        return ops.Pow.apply(o, self)

    def __matmul__(self, o):
        return ops.MatMul.apply(self, o)

    def __rmatmul__(self, o):
        return ops.MatMul.apply(o, self)

    def __neg__(self):
        return ops.Neg.apply(self)

    def __pos__(self):
        return self

    # x += y and the like change x itself, as in PyTorch (another name for x sees it; an optimizer step written
    # `with no_grad(): p -= lr * p.grad` updates the model's p) — where no gradient is recorded, as for __setitem__
    def _inplace(self, o, op, name):
        recorded = autograd.is_grad_enabled() and (self.requires_grad or getattr(o, "requires_grad", False))
        if recorded:
            raise RuntimeError(f"x {name} y on a tensor that is part of a graph (x or y requires grad) is not "
                               f"supported: write x = x {name[0]} y, or do it inside core.no_grad()")
        result = op(self, o).data
        if result.shape != self.shape:
            raise RuntimeError(f"x {name} y: the result's shape {result.shape} is not x's {self.shape}")
        if not np.can_cast(result.dtype, self.dtype, casting="same_kind"):
            raise TypeError(f"x {name} y: the result's dtype {result.dtype} cannot be stored in x's {self.dtype}")
        self.data[...] = result
        autograd.note_inplace(self)
        return self

    __iadd__ = lambda self, o: self._inplace(o, ops.Add.apply, "+=")  # noqa: E731
    __isub__ = lambda self, o: self._inplace(o, ops.Sub.apply, "-=")  # noqa: E731
    __imul__ = lambda self, o: self._inplace(o, ops.Mul.apply, "*=")  # noqa: E731
    __itruediv__ = lambda self, o: self._inplace(o, ops.Div.apply, "/=")  # noqa: E731

    add = __add__
    sub = __sub__
    mul = __mul__
    div = __truediv__
    pow = __pow__
    matmul = __matmul__
    neg = __neg__

    # --- comparisons (no grad) ------------------------------------------------------------------
    def _cmp(self, o, f):
        b = o.data if isinstance(o, Tensor) else o
        try:
            return Tensor(f(self.data, b))
        except ValueError:
            ops._check_broadcast(f.__name__, self.data, b)
            raise

    def _bitwise(self, o, f, reflected=False):
        """&, |, ^ as in PyTorch: bitwise on integer and bool tensors (logical on bools), with type promotion."""
        a, b = self.data, o.data if isinstance(o, Tensor) else o
        a, b = (b, a) if reflected else (a, b)
        if max(ops._category(a), ops._category(b)) > 1:
            raise TypeError(f"{f.__name__}: only integer and bool tensors are supported, got "
                            f"{ops._describe_operand(a)} and {ops._describe_operand(b)}")
        return Tensor(ops._binary(f.__name__, f, a, b))

    def __invert__(self):
        """~: logical not of a bool tensor, bitwise not of an integer one."""
        if self.dtype.kind not in "biu":
            raise TypeError(f"~ (bitwise_not) is only implemented on integer and bool tensors, got {self.dtype}")
        return Tensor(np.invert(self.data))

    __eq__ = lambda self, o: self._cmp(o, np.equal)  # noqa: E731
    __ne__ = lambda self, o: self._cmp(o, np.not_equal)  # noqa: E731
    __lt__ = lambda self, o: self._cmp(o, np.less)  # noqa: E731
    __le__ = lambda self, o: self._cmp(o, np.less_equal)  # noqa: E731
    __gt__ = lambda self, o: self._cmp(o, np.greater)  # noqa: E731
    __ge__ = lambda self, o: self._cmp(o, np.greater_equal)  # noqa: E731
    __and__ = lambda self, o: self._bitwise(o, np.bitwise_and)  # noqa: E731
    __or__ = lambda self, o: self._bitwise(o, np.bitwise_or)  # noqa: E731
    __xor__ = lambda self, o: self._bitwise(o, np.bitwise_xor)  # noqa: E731
    __rand__ = lambda self, o: self._bitwise(o, np.bitwise_and, True)  # noqa: E731
    __ror__ = lambda self, o: self._bitwise(o, np.bitwise_or, True)  # noqa: E731
    __rxor__ = lambda self, o: self._bitwise(o, np.bitwise_xor, True)  # noqa: E731
    eq, ne, lt, le, gt, ge = __eq__, __ne__, __lt__, __le__, __gt__, __ge__

    def __bool__(self):
        if self.data.size != 1:
            raise RuntimeError(f"boolean value of a tensor with {self.data.size} elements is ambiguous")
        return bool(self.data)

    def __float__(self):
        return float(self.item())

    def __int__(self):
        return int(self.item())

    def __index__(self):
        if not np.issubdtype(self.dtype, np.integer):
            raise TypeError(f"only integer tensors can be used as an index, got {self.dtype}")
        return int(self.item())

    # --- elementwise ----------------------------------------------------------------------------
    exp = lambda self: ops.Exp.apply(self)  # noqa: E731
    log = lambda self: ops.Log.apply(self)  # noqa: E731
    sqrt = lambda self: ops.Sqrt.apply(self)  # noqa: E731
    rsqrt = lambda self: ops.Pow.apply(self, -0.5)  # noqa: E731
    square = lambda self: ops.Mul.apply(self, self)  # noqa: E731
    tanh = lambda self: ops.Tanh.apply(self)  # noqa: E731
    sigmoid = lambda self: ops.Sigmoid.apply(self)  # noqa: E731
    relu = lambda self: ops.Relu.apply(self)  # noqa: E731
    abs = lambda self: ops.Abs.apply(self)  # noqa: E731
    sin = lambda self: ops.Sin.apply(self)  # noqa: E731
    cos = lambda self: ops.Cos.apply(self)  # noqa: E731
    log1p = lambda self: ops.Log1p.apply(self)  # noqa: E731
    sign = lambda self: Tensor(np.sign(self.data))  # noqa: E731

    def clamp(self, min=None, max=None):  # noqa: A002 - PyTorch's names
        """Limit values to [min, max]; the gradient is zero where a bound is active."""
        if min is None and max is None:
            raise ValueError("clamp: at least one of min and max must be given")
        return ops.Clamp.apply(self, min, max)

    clip = clamp

    def masked_fill(self, mask, value):
        """Where mask is True, take value (no gradient there); mask broadcasts to self."""
        return ops.MaskedFill.apply(self, mask, value)

    # --- reductions -----------------------------------------------------------------------------
    def sum(self, dim=None, keepdim=False):
        return ops.Sum.apply(self, dim, keepdim)

    def mean(self, dim=None, keepdim=False):
        return ops.Mean.apply(self, dim, keepdim)

    def amax(self, dim=None, keepdim=False):
        """Maximum over dim; the gradient is split evenly among ties (as PyTorch)."""
        return ops.Amax.apply(self, dim, keepdim)

    def amin(self, dim=None, keepdim=False):
        return ops.Amin.apply(self, dim, keepdim)

    def max(self, dim=None, keepdim=False):
        """Without dim: the max element (gradient split among ties). With dim: (values, indices) as in
        PyTorch, the gradient going to the returned index only."""
        if dim is None:
            return ops.MaxAll.apply(self, None, False)
        return self._select(Tensor(_arg(np.argmax, self.data, dim, True)), dim, keepdim)

    def min(self, dim=None, keepdim=False):
        """Like max: the min element, or (values, indices) over dim."""
        if dim is None:
            return ops.MinAll.apply(self, None, False)
        return self._select(Tensor(_arg(np.argmin, self.data, dim, True)), dim, keepdim)

    def _select(self, index, dim, keepdim):
        values = self.gather(dim, index)
        if not keepdim and self.ndim:
            values, index = values.squeeze(dim), index.squeeze(dim)
        return values_indices(values, index)

    def gather(self, dim, index):
        """Values picked along dim by an integer index tensor (torch.gather)."""
        return ops.Gather.apply(self, dim, index)

    def sort(self, dim=-1, descending=False):
        """(values, indices) sorted along dim, stably (equal values keep their order); the values' gradient goes
        back to the places they came from (torch.sort)."""
        a = self.data
        if a.ndim == 0:  # one element: itself, at index 0
            ops._dim("sort", dim, 0)
            index = Tensor(np.zeros((), np.int64))
            return values_indices(self.gather(0, index), index)
        order = np.argsort(a, axis=dim, kind="stable")
        if descending:  # stable and descending: sort the reversed array, then map back and reverse
            n = a.shape[dim]
            order = np.flip(n - 1 - np.argsort(np.flip(a, dim), axis=dim, kind="stable"), dim)
        index = Tensor(order.astype(np.int64))
        return values_indices(self.gather(dim, index), index)

    def topk(self, k, dim=-1, largest=True, sorted=True):  # noqa: A002 - PyTorch's name
        """(values, indices) of the k largest (or smallest) along dim, in order (torch.topk); ties keep the lower
        index first."""
        if not 0 <= k <= self.shape[dim]:
            raise ValueError(f"topk: k = {k} is not in [0, {self.shape[dim]}] for dim {dim} of shape {self.shape}")
        values, index = self.sort(dim, descending=largest)
        keep = (slice(None),) * (dim % self.ndim) + (slice(0, k),)
        index = Tensor(index.data[keep])
        return values_indices(self.gather(dim, index), index)

    def cumsum(self, dim):
        """Running sums along dim (torch.cumsum); the gradient is the reversed running sum of the incoming one."""
        return ops.CumSum.apply(self, dim)

    def argmax(self, dim=None, keepdim=False):
        return Tensor(_arg(np.argmax, self.data, dim, keepdim, True))

    def argmin(self, dim=None, keepdim=False):
        return Tensor(_arg(np.argmin, self.data, dim, keepdim, True))

    def var(self, dim=None, unbiased=None, keepdim=False, *, correction=None):
        """Variance with Bessel's correction by default (torch.var: correction=1, or unbiased=False for 0)."""
        return ops.Var.apply(self, dim, _correction("var", unbiased, correction), keepdim)

    def std(self, dim=None, unbiased=None, keepdim=False, *, correction=None):
        """Standard deviation, sqrt(var(dim, correction)); its gradient is 0 where it is 0, as in PyTorch."""
        return ops.Std.apply(self, dim, _correction("std", unbiased, correction), keepdim)

    def logsumexp(self, dim, keepdim=False):
        return ops.LogSumExp.apply(self, dim, keepdim)

    def softmax(self, dim):
        from . import functional

        return functional.softmax(self, dim)

    def log_softmax(self, dim):
        from . import functional

        return functional.log_softmax(self, dim)

    # --- shape ----------------------------------------------------------------------------------
    def reshape(self, *shape):
        return ops.Reshape.apply(self, _dims(shape))

    view = reshape

    def view_as(self, other):
        return self.reshape(other.shape)

    def permute(self, *dims):
        return ops.Permute.apply(self, _dims(dims))

    def transpose(self, dim0, dim1):
        dim0, dim1 = ops._dim("transpose", dim0, self.ndim), ops._dim("transpose", dim1, self.ndim)
        if self.ndim == 0:
            return ops.Permute.apply(self, ())
        order = list(range(self.ndim))
        order[dim0], order[dim1] = order[dim1], order[dim0]
        return ops.Permute.apply(self, tuple(order))

    def unsqueeze(self, dim):
        """A new size-1 dimension at dim (in [-ndim-1, ndim])."""
        if not -self.ndim - 1 <= dim <= self.ndim:
            raise IndexError(f"unsqueeze: dim {dim} out of range for a tensor of {self.ndim} dimensions")
        dim = dim + self.ndim + 1 if dim < 0 else dim
        return self.reshape(self.shape[:dim] + (1,) + self.shape[dim:])

    def squeeze(self, dim=None):
        if dim is None:
            shape = tuple(n for n in self.shape if n != 1)
        else:
            dims = set(ops._axes(dim, self.ndim)) if dim != () else set()
            shape = tuple(n for i, n in enumerate(self.shape) if not (i in dims and n == 1))
        return self.reshape(shape)

    def flatten(self, start_dim=0, end_dim=-1):
        if self.ndim == 0:
            return self.reshape(1)
        s, e = ops._dim("flatten", start_dim, self.ndim), ops._dim("flatten", end_dim, self.ndim)
        if s > e:
            raise RuntimeError(f"flatten: start_dim {start_dim} cannot come after end_dim {end_dim}")
        return self.reshape(self.shape[:s] + (-1,) + self.shape[e + 1 :])

    def unflatten(self, dim, sizes):
        dim = dim % self.ndim
        return self.reshape(self.shape[:dim] + tuple(sizes) + self.shape[dim + 1 :])

    def expand(self, *sizes):
        """Broadcast to a larger shape (-1 keeps a dimension); gradient sums back."""
        sizes = _dims(sizes)
        lead = len(sizes) - self.ndim
        if lead < 0:
            raise RuntimeError(f"expand: target {sizes} has fewer dimensions than tensor {self.shape}")
        if any(n == -1 for n in sizes[:lead]):
            raise ValueError(f"expand: -1 is not allowed for a new leading dimension, got {sizes} for {self.shape}")
        shape = tuple(self.shape[i - lead] if n == -1 else n for i, n in enumerate(sizes))
        return ops.Expand.apply(self, shape)

    def expand_as(self, other):
        return self.expand(other.shape)

    def repeat(self, *sizes):
        return ops.Repeat.apply(self, _dims(sizes))

    def chunk(self, chunks, dim=0):
        """At most `chunks` pieces of equal size ceil(n / chunks) along dim, the last maybe smaller."""
        if chunks < 1:
            raise ValueError(f"chunk: chunks must be at least 1, got {chunks}")
        n = self.shape[dim]
        if n == 0:  # PyTorch: `chunks` empty pieces
            return tuple(self for _ in range(chunks))
        return self.split(-(-n // chunks), dim)

    def split(self, size, dim=0):
        """Pieces along dim: of `size` each (the last maybe smaller), or of the sizes in a list."""
        n = self.shape[dim]
        bounds = []
        if isinstance(size, int):
            if size < 1:
                raise ValueError(f"split: split_size must be positive, got {size}")
            bounds = [(s, min(s + size, n)) for s in range(0, n, size)] or [(0, 0)]  # (n = 0: one empty piece)
        else:
            if sum(size) != n or any(s < 0 for s in size):
                raise ValueError(f"split: sizes {list(size)} must be non-negative and sum to {n} (dim {dim})")
            start = 0
            for s in size:
                bounds.append((start, start + s))
                start += s
        dim = dim % self.ndim
        pre = (slice(None),) * dim
        return tuple(self[pre + (slice(a, b),)] for a, b in bounds)

    def __getitem__(self, index):
        return ops.GetItem.apply(self, index)


def _correction(name, unbiased, correction):
    """torch.var's two spellings of Bessel's correction: unbiased (True: 1, False: 0) or correction; 1 by default."""
    if unbiased is not None and correction is not None:
        raise ValueError(f"{name}: pass unbiased or correction, not both")
    if correction is not None:
        return correction
    return 0 if unbiased is False else 1


def _arg(f, a, dim, keepdim, public=False):
    if public and a.dtype == np.bool_:  # (max/min over a dim take bools, as PyTorch's)
        raise TypeError(f"{f.__name__}: a bool tensor is not supported (as in PyTorch), got shape {a.shape}")
    if a.ndim == 0:  # a 0-d tensor accepts dim 0 / -1; its one element is at index 0
        return np.zeros((), dtype=np.int64)
    if dim is None:  # over all elements: the flat index (with keepdim, in an array of a's rank, as PyTorch)
        r = np.asarray(f(a.reshape(-1)))
        return r.reshape((1,) * a.ndim) if keepdim else r
    r = f(a, axis=dim)
    return np.expand_dims(r, dim) if keepdim else r


# --- factories ------------------------------------------------------------------------------------


def _default_dtype(data):
    """PyTorch's inference: Python floats -> float32, ints -> int64, bools -> bool; arrays keep theirs."""
    if isinstance(data, (np.ndarray, np.generic)) or hasattr(data, "__cuda_array_interface__"):
        return None
    a = np.asarray(data)
    if np.issubdtype(a.dtype, np.floating):
        return DEFAULT_DTYPE
    if np.issubdtype(a.dtype, np.integer):
        return np.int64
    return None


def tensor(data, requires_grad=False, dtype=None):
    """A new leaf tensor holding a copy of data (a list, scalar, ndarray or Tensor)."""
    if isinstance(data, Tensor):
        data = data.data
    dtype = dtype if dtype is not None else _default_dtype(data)
    if hasattr(data, "__cuda_array_interface__"):  # CuPy
        arr = data.astype(dtype or data.dtype, copy=True)
    else:
        arr = np.array(data, dtype=dtype)
    return Tensor(arr, requires_grad=requires_grad)


def _shape(size):
    return _dims(size)


def zeros(*size, dtype=None, requires_grad=False):
    return Tensor(np.zeros(_shape(size), dtype=dtype or DEFAULT_DTYPE), requires_grad)


def ones(*size, dtype=None, requires_grad=False):
    return Tensor(np.ones(_shape(size), dtype=dtype or DEFAULT_DTYPE), requires_grad)


def full(size, fill_value, dtype=None, requires_grad=False):
    if dtype is None:
        dtype = DEFAULT_DTYPE if isinstance(fill_value, float) else np.asarray(fill_value).dtype
    return Tensor(np.full(_shape((size,)), fill_value, dtype=dtype), requires_grad)


def zeros_like(t, dtype=None, requires_grad=False):
    return Tensor(np.zeros(t.shape, dtype=dtype or t.dtype), requires_grad)


def ones_like(t, dtype=None, requires_grad=False):
    return Tensor(np.ones(t.shape, dtype=dtype or t.dtype), requires_grad)


def arange(start, end=None, step=1, dtype=None, requires_grad=False):
    """Like torch.arange: integer arguments give int64, any float gives float32."""
    if end is None:
        start, end = 0, start
    if dtype is None:
        dtype = np.int64 if all(isinstance(v, int) for v in (start, end, step)) else DEFAULT_DTYPE
    return Tensor(np.arange(start, end, step, dtype=dtype), requires_grad)


def randn(*size, dtype=None, requires_grad=False, generator=None):
    """Standard normal samples from the default (or given) generator."""
    from . import random

    g = generator or random.default_generator
    return Tensor(g.normal(_shape(size)).astype(dtype or DEFAULT_DTYPE), requires_grad)


def rand(*size, dtype=None, requires_grad=False, generator=None):
    """Uniform [0, 1) samples from the default (or given) generator."""
    from . import random

    g = generator or random.default_generator
    return Tensor(g.uniform(_shape(size)).astype(dtype or DEFAULT_DTYPE), requires_grad)


def randint(low, high=None, size=None, *, generator=None, dtype=None):
    """Uniform integers in [low, high); like torch.randint, also callable as randint(high, size)."""
    from . import random

    if size is None:
        if high is None:
            raise TypeError("randint: expected (high, size) or (low, high, size)")
        low, high, size = 0, low, high
    g = generator or random.default_generator
    return Tensor(g.integers(low, high, _shape((size,))).astype(dtype or np.int64))


from . import ops  # noqa: E402  (ops needs Tensor defined)
