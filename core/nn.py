"""core.nn: `Module`, `Parameter` and the layers, with PyTorch's names, defaults and initializations.

A `Module` is a tree: its attributes that are `Parameter`s, buffers (tensors that are state but not
trained, such as BatchNorm's running mean) and sub-`Module`s are registered by assignment, so
`named_parameters()`, `state_dict()` and `train()/eval()` can walk the tree. The layers only hold
weights and options; their `forward` is one call into `core.functional` (F), where the math lives.

    model = nn.Sequential(nn.Linear(2, 16), nn.ReLU(), nn.Linear(16, 1))
    loss = F.mse_loss(model(x), y); loss.backward()
"""

from __future__ import annotations

import itertools
import math
import types
from collections import OrderedDict, namedtuple
from collections.abc import Mapping

import numpy as np

from . import functional as F
from . import init, ops
from .tensor import DEFAULT_DTYPE, Tensor, _default_dtype

__all__ = [
    "BatchNorm2d", "Conv2d", "ConvTranspose2d", "Dropout", "Embedding", "Flatten", "GELU", "GroupNorm", "Identity",
    "LayerNorm", "LeakyReLU", "Linear", "Module", "ModuleDict", "ModuleList", "MultiheadAttention", "Parameter",
    "ReLU", "Sequential", "SiLU", "Sigmoid", "Tanh", "init", "utils",
]


# --- Parameter ------------------------------------------------------------------------------------


class Parameter(Tensor):
    """A Tensor that a Module registers as trainable: requires_grad=True, float32 unless data has a dtype.

    `Parameter(t)` shares t's array, as in PyTorch.
    """

    __slots__ = ()

    def __init__(self, data=None, requires_grad=True):
        if data is None:
            data = np.empty(0, dtype=DEFAULT_DTYPE)
        elif isinstance(data, Tensor):
            data = data.data
        elif not (isinstance(data, np.ndarray) or hasattr(data, "__cuda_array_interface__")):
            data = np.asarray(data, dtype=_default_dtype(data))
        super().__init__(data, requires_grad=requires_grad)

    def __repr__(self):
        return "Parameter containing:\n" + super().__repr__()


def _empty(shape, dtype):
    """An uninitialized Parameter of the module's dtype (float32 unless dtype= is given)."""
    return Parameter(np.empty(shape, dtype=np.dtype(dtype) if dtype is not None else DEFAULT_DTYPE))


def _norm_affine(module, shape, affine, bias, dtype):
    """A normalization layer's optional scale γ and shift β (registered as None when absent, as in PyTorch)."""
    if affine:
        module.weight = _empty(shape, dtype)
    else:
        module.register_parameter("weight", None)
    if affine and bias:
        module.bias = _empty(shape, dtype)
    else:
        module.register_parameter("bias", None)


def _reset_affine(module):
    """γ ← 1, β ← 0: a normalization layer starts as the plain normalization."""
    if module.weight is not None:
        init.ones_(module.weight)
    if module.bias is not None:
        init.zeros_(module.bias)


def _as_array(value):
    """The ndarray behind a state_dict value: a core Tensor, an ndarray, or anything with .detach().numpy()."""
    if isinstance(value, Tensor):
        return value.numpy()
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # a torch.Tensor, e.g. from a reference model
        return value.detach().cpu().numpy()
    return np.asarray(value)


def _addindent(s, spaces):
    """Indent every line of s but the first (how PyTorch nests a child's repr)."""
    lines = s.split("\n")
    if len(lines) == 1:
        return s
    return lines[0] + "\n" + "\n".join(" " * spaces + line for line in lines[1:])


_IncompatibleKeys = namedtuple("IncompatibleKeys", ["missing_keys", "unexpected_keys"])


# --- Module ---------------------------------------------------------------------------------------


class Module:
    """Base class of every layer and model: a tree of parameters, buffers and submodules.

    Subclasses call `super().__init__()` first, then assign Parameters / Modules as attributes and
    register buffers with `register_buffer`; `forward` says what the module computes.
    """

    def __init__(self):
        # object.__setattr__: our own __setattr__ needs these dicts to exist first
        object.__setattr__(self, "training", True)
        object.__setattr__(self, "_parameters", {})
        object.__setattr__(self, "_buffers", {})
        object.__setattr__(self, "_non_persistent_buffers_set", set())
        object.__setattr__(self, "_modules", {})

    def forward(self, *args, **kwargs):
        """What the module computes; every subclass defines it. Call the module, not forward."""
        raise NotImplementedError(f'Module [{type(self).__name__}] is missing the required "forward" function')

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    # --- attribute registration ---------------------------------------------------------------
    def __getattr__(self, name):
        # only called when normal lookup fails: look in the registries
        d = self.__dict__
        for store in ("_parameters", "_buffers", "_modules"):
            if store in d and name in d[store]:
                return d[store][name]
        raise AttributeError(f"'{type(self).__name__}' object has no attribute '{name}'")

    def _forget(self, name):
        """Remove name from every registry and from the plain attributes."""
        for store in (self.__dict__, self._parameters, self._buffers, self._modules):
            store.pop(name, None)
        self._non_persistent_buffers_set.discard(name)

    def __setattr__(self, name, value):
        params = self.__dict__.get("_parameters")
        if isinstance(value, Parameter):
            if params is None:
                raise AttributeError("cannot assign parameters before Module.__init__() call")
            self._forget(name)
            self.register_parameter(name, value)
        elif params is not None and name in params:
            if value is not None:
                raise TypeError(
                    f"cannot assign '{type(value).__name__}' as parameter '{name}' (core.nn.Parameter or None expected)"
                )
            params[name] = None
        elif isinstance(value, Module):
            if params is None:
                raise AttributeError("cannot assign module before Module.__init__() call")
            self._forget(name)
            self._modules[name] = value
        elif params is not None and name in self._modules:
            if value is not None:
                raise TypeError(
                    f"cannot assign '{type(value).__name__}' as child module '{name}' (Module or None expected)"
                )
            self._modules[name] = None
        elif params is not None and name in self._buffers:
            if value is not None and not isinstance(value, Tensor):
                raise TypeError(f"cannot assign '{type(value).__name__}' as buffer '{name}' (Tensor or None expected)")
            self._buffers[name] = value
        else:
            object.__setattr__(self, name, value)

    def __delattr__(self, name):
        for store in (self._parameters, self._buffers, self._modules):
            if name in store:
                del store[name]
                self._non_persistent_buffers_set.discard(name)
                return
        object.__delattr__(self, name)

    def _check_name(self, kind, name, registry):
        if "_parameters" not in self.__dict__:
            raise AttributeError(f"cannot assign {kind} before Module.__init__() call")
        if not isinstance(name, str):
            raise TypeError(f"{kind} name should be a string, got {type(name).__name__}")
        if name == "" or "." in name:
            raise KeyError(f"{kind} name can't be empty or contain '.', got {name!r}")
        if hasattr(self, name) and name not in registry:
            raise KeyError(f"attribute '{name}' already exists")

    def register_parameter(self, name, param):
        """Register a Parameter (or None, a declared-but-absent parameter such as a disabled bias)."""
        self._check_name("parameter", name, self._parameters)
        if param is not None and not isinstance(param, Parameter):
            raise TypeError(f"cannot assign '{type(param).__name__}' object to parameter '{name}' "
                            "(core.nn.Parameter or None required)")
        if param is not None and not param.is_leaf:
            raise ValueError(f"cannot assign non-leaf Tensor to parameter '{name}'")
        self._parameters[name] = param

    def register_buffer(self, name, tensor, persistent=True):
        """Register a tensor that is state but not trained; persistent buffers go into state_dict."""
        self._check_name("buffer", name, self._buffers)
        if tensor is not None and not isinstance(tensor, Tensor):
            raise TypeError(
                f"cannot assign '{type(tensor).__name__}' object to buffer '{name}' (Tensor or None required)"
            )
        self._buffers[name] = tensor
        if persistent:
            self._non_persistent_buffers_set.discard(name)
        else:
            self._non_persistent_buffers_set.add(name)

    def add_module(self, name, module):
        """Register a child module under name (what attribute assignment does)."""
        self._check_name("module", name, self._modules)
        if module is not None and not isinstance(module, Module):
            raise TypeError(f"{type(module).__name__} is not a Module subclass")
        self._modules[name] = module

    register_module = add_module

    def get_submodule(self, target):
        """The module at a dotted path such as 'encoder.layers.0'."""
        mod = self
        for part in target.split(".") if target else []:
            if part not in mod._modules:
                raise AttributeError(f"{type(mod).__name__} has no submodule `{part}` (looking up {target!r})")
            mod = mod._modules[part]
        return mod

    # --- walking the tree ---------------------------------------------------------------------
    def named_modules(self, memo=None, prefix="", remove_duplicate=True):
        """(dotted name, module) for this module and every descendant, depth first, each once."""
        memo = set() if memo is None else memo
        if remove_duplicate and id(self) in memo:
            return
        memo.add(id(self))
        yield prefix, self
        for name, mod in self._modules.items():
            if mod is not None:
                yield from mod.named_modules(memo, prefix + ("." if prefix else "") + name, remove_duplicate)

    def modules(self):
        """This module and every descendant, each once."""
        for _, m in self.named_modules():
            yield m

    def named_children(self):
        """(name, module) for the direct children, each module once."""
        seen = set()
        for name, mod in self._modules.items():
            if mod is not None and id(mod) not in seen:
                seen.add(id(mod))
                yield name, mod

    def children(self):
        """The direct child modules, each once."""
        for _, m in self.named_children():
            yield m

    def _named_members(self, store, prefix, recurse, remove_duplicate=True):
        seen = set()
        mods = self.named_modules(prefix=prefix, remove_duplicate=remove_duplicate) if recurse else [(prefix, self)]
        for mod_prefix, mod in mods:
            for name, t in getattr(mod, store).items():
                if t is None or (remove_duplicate and id(t) in seen):
                    continue
                seen.add(id(t))
                yield mod_prefix + ("." if mod_prefix else "") + name, t

    def named_parameters(self, prefix="", recurse=True, remove_duplicate=True):
        """(dotted name, Parameter), own parameters first, then each child's; shared ones once."""
        yield from self._named_members("_parameters", prefix, recurse, remove_duplicate)

    def parameters(self, recurse=True):
        """Every Parameter (of the descendants too, unless recurse=False), each once: what optimizers take."""
        for _, p in self.named_parameters(recurse=recurse):
            yield p

    def named_buffers(self, prefix="", recurse=True, remove_duplicate=True):
        """(dotted name, buffer) for every registered buffer, persistent or not."""
        yield from self._named_members("_buffers", prefix, recurse, remove_duplicate)

    def buffers(self, recurse=True):
        """Every registered buffer, each once."""
        for _, b in self.named_buffers(recurse=recurse):
            yield b

    # --- state ----------------------------------------------------------------------------------
    def _state_items(self):
        """(key, tensor) in state_dict order: per module, parameters then persistent buffers."""
        for prefix, mod in self.named_modules(remove_duplicate=False):
            dot = prefix + "." if prefix else ""
            for name, p in mod._parameters.items():
                if p is not None:
                    yield dot + name, p
            for name, b in mod._buffers.items():
                if b is not None and name not in mod._non_persistent_buffers_set:
                    yield dot + name, b

    def state_dict(self, destination=None, prefix="", keep_vars=False):
        """Ordered name → Tensor of every parameter and persistent buffer.

        The tensors share memory with the module (as in PyTorch): copy them to keep a snapshot.
        """
        out = OrderedDict() if destination is None else destination
        for key, t in self._state_items():
            out[prefix + key] = t if keep_vars else t.detach()
        return out

    def _unexpected_keys(self, state_dict):
        """The keys no module claims, listed module by module in load order, as PyTorch lists them."""
        out = []
        for prefix, mod in self.named_modules(remove_duplicate=False):
            dot = prefix + "." if prefix else ""
            own = {k for k, t in itertools.chain(mod._parameters.items(), mod._buffers.items())
                   if t is not None and k not in mod._non_persistent_buffers_set}
            for key in state_dict:
                if key.startswith(dot):
                    head, *rest = key[len(dot):].split(".", 1)
                    if head not in (mod._modules if rest else own):
                        out.append(key)
        return out

    def _optional_keys(self, state_dict):
        """Keys that may be absent: a BatchNorm's num_batches_tracked, unless the state_dict's metadata says it
        was saved after PyTorch added it (version 2); its current value is then kept, as in PyTorch."""
        meta = getattr(state_dict, "_metadata", None) or {}
        return {prefix + ("." if prefix else "") + "num_batches_tracked"
                for prefix, mod in self.named_modules(remove_duplicate=False)
                if isinstance(mod, BatchNorm2d) and mod.track_running_stats
                and (meta.get(prefix, {}).get("version") or 0) < 2}

    def load_state_dict(self, state_dict, strict=True):
        """Copy values (Tensors or ndarrays) into the parameters and buffers, keeping the module's dtypes.

        Shape mismatches are always an error; missing and unexpected keys are an error when strict.
        Nothing is copied unless everything checks out. Returns (missing_keys, unexpected_keys).
        """
        if not isinstance(state_dict, Mapping):
            raise TypeError(f"Expected state_dict to be dict-like, got {type(state_dict)}.")
        own = OrderedDict(self._state_items())
        optional = self._optional_keys(state_dict)
        missing = [k for k in own if k not in state_dict and k not in optional]
        unexpected = self._unexpected_keys(state_dict)
        values, errors = {}, []
        for key, t in own.items():
            if key not in state_dict:
                continue
            value = _as_array(state_dict[key])
            if tuple(value.shape) != t.shape:
                errors.append(
                    f"size mismatch for {key}: copying a param with shape {tuple(value.shape)} from checkpoint, "
                    f"the shape in current model is {t.shape}."
                )
            values[key] = value
        if strict and unexpected:
            errors.insert(0, "Unexpected key(s) in state_dict: {}. ".format(", ".join(f'"{k}"' for k in unexpected)))
        if strict and missing:
            errors.insert(0, "Missing key(s) in state_dict: {}. ".format(", ".join(f'"{k}"' for k in missing)))
        if errors:
            raise RuntimeError(f"Error(s) in loading state_dict for {type(self).__name__}:\n\t" + "\n\t".join(errors))
        for key, value in values.items():
            t = own[key]
            if isinstance(t.data, np.ndarray):
                t.data[...] = value.astype(t.dtype, copy=False)
            else:  # a GPU array: move the value over
                t.data[...] = ops._move(value.astype(t.dtype), "cuda")
        return _IncompatibleKeys(missing, unexpected)

    # --- modes, gradients, conversion -----------------------------------------------------------
    def train(self, mode=True):
        """Set training mode (Dropout drops, BatchNorm uses batch statistics) here and in every child."""
        if not isinstance(mode, bool):
            raise ValueError("training mode is expected to be boolean")
        self.training = mode
        for m in self.children():
            m.train(mode)
        return self

    def eval(self):
        """Evaluation mode: train(False)."""
        return self.train(False)

    def requires_grad_(self, requires_grad=True):
        """Switch gradient tracking of every parameter (freezing a part of a model)."""
        for p in self.parameters():
            p.requires_grad_(requires_grad)
        return self

    def zero_grad(self, set_to_none=True):
        """Clear every parameter's .grad (to None, or to zeros)."""
        for p in self.parameters():
            if p.grad is not None:
                p.grad = None if set_to_none else np.zeros_like(p.grad)

    def apply(self, fn):
        """Call fn on every child (recursively), then on self; e.g. a custom init."""
        for m in self.children():
            m.apply(fn)
        fn(self)
        return self

    def _apply(self, fn):
        """Replace the array of every parameter, gradient and buffer by fn(array), keeping the objects."""
        for m in self.modules():
            for t in itertools.chain(m._parameters.values(), m._buffers.values()):
                if t is None:
                    continue
                t.data = fn(t.data)
                if t.grad is not None:
                    t.grad = fn(t.grad)
        return self

    def to(self, *args, device=None, dtype=None):
        """Move to a device ('cpu' | 'cuda') and/or cast floating parameters and buffers to a dtype, in place.

        Accepts to(dtype), to(device), to(device, dtype) and to(tensor), as PyTorch does.
        """
        for a in args:
            if isinstance(a, Tensor):
                device, dtype = a.device, a.dtype
            elif isinstance(a, str) and (a in ("cpu", "cuda") or a.startswith("cuda:")):
                device = a
            else:
                dtype = a
        if dtype is not None:
            dtype = np.dtype(dtype)
            if not np.issubdtype(dtype, np.floating):
                raise TypeError(f"nn.Module.to only accepts floating point dtypes, but got desired dtype={dtype}")

        def convert(a):
            if dtype is not None and np.issubdtype(a.dtype, np.floating):
                a = a.astype(dtype, copy=False)
            if device is not None:
                a = ops._move(a, "cpu" if device == "cpu" else "cuda")
            return a

        return self._apply(convert)

    def float(self):
        """Cast floating parameters and buffers to float32."""
        return self.to(np.float32)

    def double(self):
        """Cast floating parameters and buffers to float64 (what the reference tests use)."""
        return self.to(np.float64)

    def cpu(self):
        """Move parameters and buffers to the CPU (NumPy arrays)."""
        return self.to("cpu")

    def cuda(self):
        """Move parameters and buffers to the GPU (CuPy arrays)."""
        return self.to("cuda")

    # --- printing -------------------------------------------------------------------------------
    def extra_repr(self):
        """The options shown inside the parentheses of this module's repr (subclasses override)."""
        return ""

    def _get_name(self):
        return type(self).__name__

    def __repr__(self):
        extra = self.extra_repr()
        extra_lines = extra.split("\n") if extra else []
        child_lines = [f"({k}): " + _addindent(repr(m), 2) for k, m in self._modules.items()]
        lines = extra_lines + child_lines
        s = self._get_name() + "("
        if lines:
            if len(extra_lines) == 1 and not child_lines:
                s += extra_lines[0]
            else:
                s += "\n  " + "\n  ".join(lines) + "\n"
        return s + ")"


# --- containers -----------------------------------------------------------------------------------


class Sequential(Module):
    """Modules applied one after another: Sequential(a, b, c)(x) = c(b(a(x))). Also from an OrderedDict."""

    def __init__(self, *args):
        super().__init__()
        if len(args) == 1 and isinstance(args[0], OrderedDict):
            for name, m in args[0].items():
                self.add_module(name, m)
        else:
            for i, m in enumerate(args):
                self.add_module(str(i), m)

    def _key(self, idx):
        n = len(self)
        if not -n <= idx < n:
            raise IndexError(f"index {idx} is out of range for {type(self).__name__} of length {n}")
        return list(self._modules)[idx % n]

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            return type(self)(OrderedDict(list(self._modules.items())[idx]))
        return self._modules[self._key(idx)]

    def __setitem__(self, idx, module):
        setattr(self, self._key(idx), module)

    def __delitem__(self, idx):
        keys = list(self._modules)[idx] if isinstance(idx, slice) else [self._key(idx)]
        for k in keys:
            del self._modules[k]
        mods = list(self._modules.values())
        self._modules.clear()
        for i, m in enumerate(mods):  # keep the keys 0..n-1 (named ones too), as PyTorch does
            self._modules[str(i)] = m

    def __len__(self):
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())

    def append(self, module):
        """Add a module at the end, under the next index."""
        self.add_module(str(len(self)), module)
        return self

    def extend(self, modules):
        """Append each module in turn."""
        for m in modules:
            self.append(m)
        return self

    def insert(self, index, module):
        """Insert a module before index (-len ≤ index ≤ len); the keys are renumbered 0..n."""
        if not isinstance(module, Module):
            raise TypeError(f"Sequential.insert: module should be a Module, got {type(module).__name__}")
        n = len(self)
        if not -n <= index <= n:
            raise IndexError(f"Sequential.insert: index {index} is out of range for length {n}")
        mods = list(self._modules.values())
        mods.insert(index, module)
        self._modules.clear()
        for i, m in enumerate(mods):
            self._modules[str(i)] = m
        return self

    def pop(self, key):
        """Remove the module at index key and return it (the rest are renumbered)."""
        m = self[key]
        del self[key]
        return m

    def __add__(self, other):
        if not isinstance(other, Sequential):
            raise ValueError(f"add operator supports only objects of Sequential class, but {type(other)} is given.")
        return Sequential(*self, *other)

    def forward(self, input):  # noqa: A002 - PyTorch's name
        x = input
        for m in self:
            x = m(x)
        return x


class ModuleList(Module):
    """A list of modules whose parameters are registered (a plain Python list would hide them)."""

    def __init__(self, modules=None):
        super().__init__()
        if modules is not None:
            self.extend(modules)

    def _index(self, idx):
        n = len(self)
        if not -n <= idx < n:
            raise IndexError(f"index {idx} is out of range for ModuleList of length {n}")
        return str(idx % n)

    def __getitem__(self, idx):
        if isinstance(idx, slice):
            return type(self)(list(self._modules.values())[idx])
        return self._modules[self._index(idx)]

    def __setitem__(self, idx, module):
        setattr(self, self._index(idx), module)

    def __delitem__(self, idx):
        mods = list(self._modules.values())
        del mods[idx]
        self._modules.clear()
        for i, m in enumerate(mods):  # keep the keys 0..n-1, as PyTorch does
            self._modules[str(i)] = m

    def __len__(self):
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules.values())

    def __iadd__(self, modules):
        return self.extend(modules)

    def __add__(self, other):
        return ModuleList(list(self) + list(other))

    def pop(self, key):
        """Remove the module at index key and return it (the rest are renumbered)."""
        m = self[key]
        del self[key]
        return m

    def append(self, module):
        """Add a module at the end, under the next index."""
        self.add_module(str(len(self)), module)
        return self

    def extend(self, modules):
        """Append each module in turn."""
        for m in modules:
            self.append(m)
        return self

    def insert(self, index, module):
        """Insert a module before index; the keys are renumbered 0..n-1."""
        mods = list(self._modules.values())
        mods.insert(index, module)
        self._modules.clear()
        for i, m in enumerate(mods):
            self.add_module(str(i), m)

    def __repr__(self):
        # PyTorch compresses runs of identical reprs: "(0-2): 3 x Linear(...)"
        reprs = [repr(m) for m in self]
        if not reprs:
            return "ModuleList()"
        lines, start = [], 0
        for i in range(1, len(reprs) + 1):
            if i == len(reprs) or reprs[i] != reprs[start]:
                head = f"({start})" if i - 1 == start else f"({start}-{i - 1}): {i - start} x"
                sep = ": " if i - 1 == start else " "
                lines.append(_addindent(head + sep + reprs[start], 2))
                start = i
        return "ModuleList(\n  " + "\n  ".join(lines) + "\n)"


class ModuleDict(Module):
    """A dict of modules whose parameters are registered, in insertion order."""

    def __init__(self, modules=None):
        super().__init__()
        if modules is not None:
            self.update(modules)

    def __getitem__(self, key):
        return self._modules[key]

    def __setitem__(self, key, module):
        self.add_module(key, module)

    def __delitem__(self, key):
        del self._modules[key]

    def __len__(self):
        return len(self._modules)

    def __iter__(self):
        return iter(self._modules)

    def __contains__(self, key):
        return key in self._modules

    def keys(self):
        return self._modules.keys()

    def items(self):
        return self._modules.items()

    def values(self):
        return self._modules.values()

    def pop(self, key):
        """Remove the module under key and return it."""
        m = self[key]
        del self[key]
        return m

    def clear(self):
        """Remove every module."""
        self._modules.clear()

    def update(self, modules):
        """Add (name, module) pairs from a dict or an iterable of pairs."""
        items = modules.items() if hasattr(modules, "items") else modules
        for k, m in items:
            self[k] = m


# --- simple layers --------------------------------------------------------------------------------


class Identity(Module):
    """Returns its input (a placeholder that keeps a model's structure)."""

    def __init__(self, *args, **kwargs):
        super().__init__()

    def forward(self, input):  # noqa: A002
        return input


class Linear(Module):
    """y = x Wᵀ + b, with W of shape (out_features, in_features).

    Init (PyTorch's): W ~ kaiming_uniform_(a=√5), i.e. U(-1/√in, 1/√in), and b ~ U(-1/√in, 1/√in).
    """

    def __init__(self, in_features, out_features, bias=True, device=None, dtype=None):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = _empty((out_features, in_features), dtype)
        if bias:
            self.bias = _empty((out_features,), dtype)
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()
        if device is not None:
            self.to(device)

    def reset_parameters(self):
        init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in, _ = init._calculate_fan_in_and_fan_out(self.weight)
            bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0
            init.uniform_(self.bias, -bound, bound)

    def forward(self, input):  # noqa: A002
        return F.linear(input, self.weight, self.bias)

    def extra_repr(self):
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


class Embedding(Module):
    """A lookup table: row i of `weight` (num_embeddings, embedding_dim) for each index i; init N(0, 1).

    The row at padding_idx starts at zero and gets no gradient. With max_norm, each row looked up
    whose norm_type-norm exceeds max_norm is first rescaled in place to norm max_norm (as PyTorch's
    embedding_renorm_). _weight gives the initial table (shared, not copied; what from_pretrained uses).
    """

    def __init__(self, num_embeddings, embedding_dim, padding_idx=None, max_norm=None, norm_type=2.0,
                 scale_grad_by_freq=False, sparse=False, _weight=None, _freeze=False, device=None, dtype=None):
        super().__init__()
        if padding_idx is not None:
            if not -num_embeddings <= padding_idx < num_embeddings:
                raise ValueError(f"Embedding: padding_idx {padding_idx} must be within num_embeddings {num_embeddings}")
            padding_idx = padding_idx % num_embeddings
        if scale_grad_by_freq or sparse:
            raise NotImplementedError(f"Embedding: scale_grad_by_freq={scale_grad_by_freq} and sparse={sparse} are "
                                      "not supported (only False)")
        self.num_embeddings, self.embedding_dim, self.padding_idx = num_embeddings, embedding_dim, padding_idx
        self.max_norm, self.norm_type = max_norm, norm_type
        self.scale_grad_by_freq, self.sparse = scale_grad_by_freq, sparse
        if _weight is None:
            self.weight = _empty((num_embeddings, embedding_dim), dtype)
            self.reset_parameters()
        else:
            if tuple(_weight.shape) != (num_embeddings, embedding_dim):
                raise ValueError(f"Embedding: _weight of shape {tuple(_weight.shape)} does not match num_embeddings "
                                 f"and embedding_dim {(num_embeddings, embedding_dim)}")
            self.weight = Parameter(_weight, requires_grad=not _freeze)
        if device is not None:
            self.to(device)

    @classmethod
    def from_pretrained(cls, embeddings, freeze=True, padding_idx=None, max_norm=None, norm_type=2.0,
                        scale_grad_by_freq=False, sparse=False):
        """An Embedding whose table is embeddings (2-d, shared); frozen (no gradient) unless freeze=False."""
        if len(embeddings.shape) != 2:
            raise ValueError(f"Embedding.from_pretrained: embeddings must be 2-d, got shape {tuple(embeddings.shape)}")
        rows, cols = embeddings.shape
        return cls(rows, cols, padding_idx, max_norm, norm_type, scale_grad_by_freq, sparse, _weight=embeddings,
                   _freeze=freeze)

    def reset_parameters(self):
        init.normal_(self.weight)
        if self.padding_idx is not None:
            self.weight.data[self.padding_idx] = 0

    def _renorm(self, input):  # noqa: A002
        """Rescale (in place, no gradient) each looked-up row whose norm exceeds max_norm to max_norm."""
        w = self.weight.data
        idx = np.unique(input.data if isinstance(input, Tensor) else input)
        if idx.size == 0 or not np.issubdtype(idx.dtype, np.integer) or idx[0] < 0 or idx[-1] >= w.shape[0]:
            return  # F.embedding reports the bad indices
        rows = w[idx]
        # PyTorch takes each norm as a double (.item()) to form the scale
        norm = np.linalg.norm(rows, ord=float(self.norm_type), axis=1).astype(np.float64)
        big = norm > self.max_norm
        scale = self.max_norm / (norm[big] + 1e-7)
        w[idx[big]] = rows[big] * scale[:, None].astype(w.dtype)

    def forward(self, input):  # noqa: A002
        if self.max_norm is not None:
            self._renorm(input)
        return F.embedding(input, self.weight, self.padding_idx)

    def extra_repr(self):
        s = f"{self.num_embeddings}, {self.embedding_dim}"
        if self.padding_idx is not None:
            s += f", padding_idx={self.padding_idx}"
        if self.max_norm is not None:
            s += f", max_norm={self.max_norm}"
        if self.norm_type != 2:
            s += f", norm_type={self.norm_type}"
        if self.scale_grad_by_freq:
            s += ", scale_grad_by_freq=True"
        if self.sparse:
            s += ", sparse=True"
        return s


def _pair(v):
    """(v, v) for one value or a one-element sequence, as PyTorch's modules expand them; a pair as it is."""
    if isinstance(v, (tuple, list)):
        return tuple(v) * 2 if len(v) == 1 else tuple(v)
    return (v, v)


class _ConvNd(Module):
    """What Conv2d and ConvTranspose2d share: options, weight, bias, init, repr."""

    def __init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation, transposed, output_padding,
                 groups, bias, padding_mode, device, dtype):
        super().__init__()
        name = type(self).__name__
        if groups <= 0:
            raise ValueError(f"{name}: groups must be a positive integer, got {groups}")
        if in_channels % groups != 0:
            raise ValueError(f"{name}: in_channels ({in_channels}) must be divisible by groups ({groups})")
        if out_channels % groups != 0:
            raise ValueError(f"{name}: out_channels ({out_channels}) must be divisible by groups ({groups})")
        if padding_mode not in ("zeros", "reflect", "replicate", "circular"):
            raise ValueError(f"padding_mode must be one of 'zeros', 'reflect', 'replicate', 'circular', "
                             f"but got padding_mode='{padding_mode}'")
        kernel_size, stride, dilation = _pair(kernel_size), _pair(stride), _pair(dilation)
        if isinstance(padding, str):
            if padding not in ("same", "valid"):
                raise ValueError(f"Invalid padding string {padding!r}, should be one of ['valid', 'same']")
            if padding == "same" and any(s != 1 for s in stride):
                raise ValueError("padding='same' is not supported for strided convolutions")
        else:
            padding = _pair(padding)
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.stride, self.padding, self.dilation = stride, padding, dilation
        self.transposed, self.output_padding, self.groups = transposed, _pair(output_padding), groups
        self.padding_mode = padding_mode
        # the padding for F.pad (last dim first, each side) when padding_mode is not 'zeros'
        if padding == "valid":
            self._reversed_padding_repeated_twice = [0, 0, 0, 0]
        elif padding == "same":  # total d·(k-1) per dim, the odd one extra on the right
            self._reversed_padding_repeated_twice = []
            for d, k in zip(reversed(dilation), reversed(kernel_size)):
                total = d * (k - 1)
                self._reversed_padding_repeated_twice += [total // 2, total - total // 2]
        else:
            self._reversed_padding_repeated_twice = [padding[1], padding[1], padding[0], padding[0]]
        shape = (in_channels, out_channels // groups) if transposed else (out_channels, in_channels // groups)
        self.weight = _empty(shape + kernel_size, dtype)
        if bias:
            self.bias = _empty((out_channels,), dtype)
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()
        if device is not None:
            self.to(device)

    def reset_parameters(self):
        """kaiming_uniform_(a=√5) on the weight, U(-1/√fan_in, 1/√fan_in) on the bias (PyTorch's default)."""
        init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in, _ = init._calculate_fan_in_and_fan_out(self.weight)
            if fan_in != 0:
                bound = 1 / math.sqrt(fan_in)
                init.uniform_(self.bias, -bound, bound)

    def extra_repr(self):
        s = f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}"
        if self.padding != (0,) * len(self.padding):
            s += f", padding={self.padding}"
        if self.dilation != (1,) * len(self.dilation):
            s += f", dilation={self.dilation}"
        if self.output_padding != (0,) * len(self.output_padding):
            s += f", output_padding={self.output_padding}"
        if self.groups != 1:
            s += f", groups={self.groups}"
        if self.bias is None:
            s += ", bias=False"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode}"
        return s


class Conv2d(_ConvNd):
    """2-D cross-correlation over (N, C_in, H, W) with weight (C_out, C_in/groups, kH, kW).

    padding may be an int, a pair, 'valid' or 'same'; padding_mode 'reflect' | 'replicate' | 'circular'
    pads with F.pad first.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, dilation=1, groups=1, bias=True,
                 padding_mode="zeros", device=None, dtype=None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, False, 0, groups, bias,
                         padding_mode, device, dtype)

    def forward(self, input):  # noqa: A002
        if self.padding_mode != "zeros":
            padded = F.pad(input, self._reversed_padding_repeated_twice, mode=self.padding_mode)
            return F.conv2d(padded, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)
        return F.conv2d(input, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class ConvTranspose2d(_ConvNd):
    """The transposed 2-D convolution (the gradient of Conv2d w.r.t. its input); weight (C_in, C_out/groups, kH, kW).

    forward(input, output_size=None): output_size picks the output_padding that gives that size.
    """

    def __init__(self, in_channels, out_channels, kernel_size, stride=1, padding=0, output_padding=0, groups=1,
                 bias=True, dilation=1, padding_mode="zeros", device=None, dtype=None):
        if padding_mode != "zeros":
            raise ValueError(f'Only "zeros" padding mode is supported for ConvTranspose2d, got {padding_mode!r}')
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, True, output_padding,
                         groups, bias, padding_mode, device, dtype)

    def _output_padding(self, input, output_size):  # noqa: A002
        """output_padding that makes the output output_size (H, W) (or (N, C, H, W)), checked in range."""
        if output_size is None:
            return self.output_padding
        output_size = list(output_size)[-2:] if len(output_size) in (3, 4) else list(output_size)
        if len(output_size) != 2:
            raise ValueError(f"ConvTranspose2d: output_size must have 2 or 4 elements (got {len(output_size)})")
        lo = [(input.shape[-2 + d] - 1) * self.stride[d] - 2 * self.padding[d]
              + self.dilation[d] * (self.kernel_size[d] - 1) + 1 for d in range(2)]
        hi = [lo[d] + self.stride[d] - 1 for d in range(2)]
        if any(not lo[d] <= output_size[d] <= hi[d] for d in range(2)):
            raise ValueError(f"requested an output size of {output_size}, but valid sizes range from {lo} to {hi} "
                             f"(for an input of {input.shape[-2:]})")
        return tuple(output_size[d] - lo[d] for d in range(2))

    def forward(self, input, output_size=None):  # noqa: A002
        return F.conv_transpose2d(input, self.weight, self.bias, self.stride, self.padding,
                                  self._output_padding(input, output_size), self.groups, self.dilation)


# --- normalization --------------------------------------------------------------------------------


class LayerNorm(Module):
    """Normalize over the last len(normalized_shape) dims, then scale and shift (Ba et al. 2016, eq. 4)."""

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True, bias=True, device=None, dtype=None):
        super().__init__()
        self.normalized_shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
        self.eps, self.elementwise_affine = eps, elementwise_affine
        _norm_affine(self, self.normalized_shape, elementwise_affine, bias, dtype)
        self.reset_parameters()
        if device is not None:
            self.to(device)

    def reset_parameters(self):
        _reset_affine(self)

    def forward(self, input):  # noqa: A002
        return F.layer_norm(input, self.normalized_shape, self.weight, self.bias, self.eps)

    def extra_repr(self):
        return (f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.elementwise_affine}, "
                f"bias={self.bias is not None}")


class GroupNorm(Module):
    """Normalize each group of num_channels/num_groups channels per sample (Wu & He 2018, eq. 1), then scale/shift."""

    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True, device=None, dtype=None, *, bias=True):
        super().__init__()
        if num_groups <= 0:
            raise ValueError(f"GroupNorm: num_groups must be a positive integer, got {num_groups!r}")
        if num_channels % num_groups != 0:
            raise ValueError(f"GroupNorm: num_channels ({num_channels}) must be divisible by num_groups ({num_groups})")
        self.num_groups, self.num_channels, self.eps, self.affine = num_groups, num_channels, eps, affine
        _norm_affine(self, (num_channels,), affine, bias, dtype)
        self.reset_parameters()
        if device is not None:
            self.to(device)

    def reset_parameters(self):
        _reset_affine(self)

    def forward(self, input):  # noqa: A002
        return F.group_norm(input, self.num_groups, self.weight, self.bias, self.eps)

    def extra_repr(self):
        return (f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}, "
                f"bias={self.bias is not None}")


class BatchNorm2d(Module):
    """Normalize each channel over (N, H, W) (Ioffe & Szegedy 2015, Alg. 1), then scale and shift.

    In training the batch statistics are used and running_mean/running_var are updated,
    running ← (1 − momentum)·running + momentum·batch (unbiased variance); momentum=None gives a
    cumulative average. In eval the running statistics are used.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True, device=None,
                 dtype=None, *, bias=True):
        super().__init__()
        self.num_features, self.eps, self.momentum = num_features, eps, momentum
        self.affine, self.track_running_stats = affine, track_running_stats
        _norm_affine(self, (num_features,), affine, bias, dtype)
        if track_running_stats:
            float_dtype = np.dtype(dtype) if dtype is not None else DEFAULT_DTYPE
            self.register_buffer("running_mean", Tensor(np.zeros(num_features, dtype=float_dtype)))
            self.register_buffer("running_var", Tensor(np.ones(num_features, dtype=float_dtype)))
            self.register_buffer("num_batches_tracked", Tensor(np.array(0, dtype=np.int64)))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()
        if device is not None:
            self.to(device)

    def reset_running_stats(self):
        """running_mean ← 0, running_var ← 1, num_batches_tracked ← 0."""
        if self.track_running_stats:
            self.running_mean.data[...] = 0
            self.running_var.data[...] = 1
            self.num_batches_tracked.data[...] = 0

    def reset_parameters(self):
        self.reset_running_stats()
        _reset_affine(self)

    def forward(self, input):  # noqa: A002
        if input.ndim != 4:
            raise ValueError(f"BatchNorm2d: expected 4D input (got {input.ndim}D input)")
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats:
            self.num_batches_tracked.data += 1
            if self.momentum is None:  # cumulative moving average
                factor = 1.0 / float(self.num_batches_tracked.item())
        use_batch_stats = self.training or (self.running_mean is None and self.running_var is None)
        # running stats are passed (to be updated) when training with tracking, or read in eval
        track = not self.training or self.track_running_stats
        return F.batch_norm(input, self.running_mean if track else None, self.running_var if track else None,
                            self.weight, self.bias, use_batch_stats, factor, self.eps)

    def extra_repr(self):
        return (f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
                f"bias={self.bias is not None}, track_running_stats={self.track_running_stats}")


# --- dropout and activations ----------------------------------------------------------------------


class Dropout(Module):
    """In training, zero each element with probability p and scale the rest by 1/(1-p); identity in eval."""

    def __init__(self, p=0.5, inplace=False):
        super().__init__()
        if not 0 <= p <= 1:
            raise ValueError(f"dropout probability has to be between 0 and 1, but got {p}")
        self.p, self.inplace = p, inplace

    def forward(self, input):  # noqa: A002
        return F.dropout(input, self.p, self.training)

    def extra_repr(self):
        return f"p={self.p}, inplace={self.inplace}"


class _Elementwise(Module):
    """A module around one elementwise F op; `inplace` is kept for PyTorch's signature and repr."""

    fn = None

    def __init__(self, inplace=False):
        super().__init__()
        self.inplace = inplace

    def forward(self, input):  # noqa: A002
        return type(self).fn(input)

    def extra_repr(self):
        return "inplace=True" if self.inplace else ""


class ReLU(_Elementwise):
    """max(0, x)."""

    fn = staticmethod(F.relu)


class GELU(Module):
    """x·Φ(x) (Hendrycks & Gimpel 2016); approximate='tanh' uses the tanh approximation."""

    def __init__(self, approximate="none"):
        super().__init__()
        self.approximate = approximate

    def forward(self, input):  # noqa: A002
        return F.gelu(input, approximate=self.approximate)

    def extra_repr(self):
        return f"approximate={self.approximate!r}"


class SiLU(_Elementwise):
    """x·σ(x) (Elfwing et al. 2017; "swish")."""

    fn = staticmethod(F.silu)


class Tanh(Module):
    """tanh(x)."""

    def forward(self, input):  # noqa: A002
        return input.tanh()


class Sigmoid(Module):
    """1 / (1 + e^(−x))."""

    def forward(self, input):  # noqa: A002
        return input.sigmoid()


class LeakyReLU(Module):
    """x for x ≥ 0, negative_slope·x otherwise."""

    def __init__(self, negative_slope=0.01, inplace=False):
        super().__init__()
        self.negative_slope, self.inplace = negative_slope, inplace

    def forward(self, input):  # noqa: A002
        return F.leaky_relu(input, self.negative_slope)

    def extra_repr(self):
        return f"negative_slope={self.negative_slope}" + (", inplace=True" if self.inplace else "")


class Flatten(Module):
    """Flatten dims start_dim..end_dim into one (by default all but the batch dim)."""

    def __init__(self, start_dim=1, end_dim=-1):
        super().__init__()
        self.start_dim, self.end_dim = start_dim, end_dim

    def forward(self, input):  # noqa: A002
        return input.flatten(self.start_dim, self.end_dim)

    def extra_repr(self):
        return f"start_dim={self.start_dim}, end_dim={self.end_dim}"


# --- attention ------------------------------------------------------------------------------------


class NonDynamicallyQuantizableLinear(Linear):
    """A plain Linear: PyTorch's class name for MultiheadAttention.out_proj, kept so that reprs match."""


def _additive(mask, name, dtype):
    """A bool mask (True = not allowed) as 0 / −inf, or a float mask as is (PyTorch's _canonical_mask)."""
    if mask is None:
        return None
    if mask.dtype == np.bool_:
        return Tensor(np.where(mask.data, -np.inf, 0.0).astype(dtype))
    if not np.issubdtype(mask.dtype, np.floating):
        raise TypeError(f"MultiheadAttention: only bool and floating types of {name} are supported, got {mask.dtype}")
    return mask


class MultiheadAttention(Module):
    """Multi-head attention (Vaswani et al. 2017, §3.2.2): MultiHead(Q,K,V) = Concat(head_1..h) W^O,
    head_i = softmax(Q W_i^Q (K W_i^K)ᵀ / √d) V W_i^V.

    The three input projections are stacked in `in_proj_weight` (3·embed_dim, embed_dim) in the order
    q, k, v (xavier_uniform_ init, zero biases), the output projection is `out_proj`; inputs are
    (L, N, E), or (N, L, E) with batch_first=True, or unbatched (L, E). forward returns (output,
    attention weights averaged over heads (N, L, S), or per head (N, H, L, S), or None).
    """

    def __init__(self, embed_dim, num_heads, dropout=0.0, bias=True, add_bias_kv=False, add_zero_attn=False,
                 kdim=None, vdim=None, batch_first=False, device=None, dtype=None):
        super().__init__()
        if embed_dim <= 0 or num_heads <= 0:
            raise ValueError(f"embed_dim and num_heads must be greater than 0, got embed_dim={embed_dim} "
                             f"and num_heads={num_heads} instead")
        if embed_dim % num_heads != 0:
            raise ValueError(
                f"MultiheadAttention: embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})"
            )
        if add_bias_kv or add_zero_attn or kdim not in (None, embed_dim) or vdim not in (None, embed_dim):
            raise NotImplementedError("MultiheadAttention: add_bias_kv, add_zero_attn and kdim/vdim != embed_dim "
                                      "are not supported")
        self.embed_dim, self.kdim, self.vdim = embed_dim, embed_dim, embed_dim
        self._qkv_same_embed_dim = True
        self.num_heads, self.dropout, self.batch_first = num_heads, dropout, batch_first
        self.head_dim = embed_dim // num_heads
        self.in_proj_weight = _empty((3 * embed_dim, embed_dim), dtype)
        self.register_parameter("q_proj_weight", None)
        self.register_parameter("k_proj_weight", None)
        self.register_parameter("v_proj_weight", None)
        if bias:
            self.in_proj_bias = _empty((3 * embed_dim,), dtype)
        else:
            self.register_parameter("in_proj_bias", None)
        self.out_proj = NonDynamicallyQuantizableLinear(embed_dim, embed_dim, bias=bias, dtype=dtype)
        self.bias_k = self.bias_v = None
        self.add_zero_attn = False
        self._reset_parameters()
        if device is not None:
            self.to(device)

    def _reset_parameters(self):
        init.xavier_uniform_(self.in_proj_weight)
        if self.in_proj_bias is not None:
            init.constant_(self.in_proj_bias, 0.0)
            init.constant_(self.out_proj.bias, 0.0)

    def forward(self, query, key, value, key_padding_mask=None, need_weights=True, attn_mask=None,
                average_attn_weights=True, is_causal=False):
        """Attend from query (L, N, E) to key/value (S, N, E) (or batch first, or unbatched).

        key_padding_mask (N, S): True (or −inf) marks keys to ignore; attn_mask (L, S) or (N·H, L, S):
        True (or −inf) forbids a query-key pair, a float mask is added to the scores; is_causal is a
        hint that attn_mask is the causal mask (it must still be given, as in PyTorch). With
        need_weights the scores are formed explicitly so that the weights can be returned;
        otherwise F.scaled_dot_product_attention does the work.
        """
        batched = query.ndim == 3
        if batched and self.batch_first:  # work in (L, N, E) like PyTorch
            query, key, value = (x.transpose(0, 1) for x in (query, key, value))
        if not batched:
            query, key, value = (x.unsqueeze(1) for x in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        L, N, E = query.shape
        S = key.shape[0]
        H, D = self.num_heads, self.head_dim
        if E != self.embed_dim:
            raise ValueError(f"MultiheadAttention: was expecting embedding dimension of {self.embed_dim}, but got {E}")
        if key.shape != value.shape or key.shape[1:] != (N, E):
            raise ValueError(f"MultiheadAttention: key {key.shape} and value {value.shape} must both be (S, N, E) "
                             f"with N={N}, E={E} (query {query.shape}, in (L, N, E) order)")
        if is_causal and attn_mask is None:
            raise RuntimeError("MultiheadAttention: need attn_mask if specifying the is_causal hint")

        # the three projections: rows [0, E), [E, 2E), [2E, 3E) of in_proj_weight are W^Q, W^K, W^V
        w, b = self.in_proj_weight, self.in_proj_bias
        q = F.linear(query, w[:E], None if b is None else b[:E])
        k = F.linear(key, w[E:2 * E], None if b is None else b[E:2 * E])
        v = F.linear(value, w[2 * E:], None if b is None else b[2 * E:])
        q = q.reshape(L, N, H, D).permute(1, 2, 0, 3)  # (N, H, L, D)
        k = k.reshape(S, N, H, D).permute(1, 2, 0, 3)
        v = v.reshape(S, N, H, D).permute(1, 2, 0, 3)

        mask = self._merge_masks(attn_mask, key_padding_mask, N, L, S, q.dtype)
        p = self.dropout if self.training else 0.0
        if need_weights:
            scores = (q * math.sqrt(1.0 / D)) @ k.transpose(-2, -1)  # (N, H, L, S)
            if mask is not None:
                scores = scores + mask
            weights = F.softmax(scores, dim=-1)
            if p > 0.0:
                weights = F.dropout(weights, p=p)
            out = weights @ v
        else:
            causal_only = is_causal and key_padding_mask is None  # the mask is then just the causal one
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if causal_only else mask, dropout_p=p,
                                                 is_causal=causal_only)
            weights = None
        out = self.out_proj(out.permute(2, 0, 1, 3).reshape(L, N, E))  # (L, N, E)

        if weights is not None and average_attn_weights:
            weights = weights.mean(dim=1)
        if not batched:
            out = out.squeeze(1)
            weights = None if weights is None else weights.squeeze(0)
        elif self.batch_first:
            out = out.transpose(0, 1)
        return out, weights

    def _merge_masks(self, attn_mask, key_padding_mask, N, L, S, dtype):
        """One additive mask broadcastable to (N, H, L, S) from attn_mask and key_padding_mask."""
        H = self.num_heads
        attn_mask = _additive(attn_mask, "attn_mask", dtype)
        key_padding_mask = _additive(key_padding_mask, "key_padding_mask", dtype)
        mask = None
        if attn_mask is not None:
            if attn_mask.shape == (L, S):
                mask = attn_mask.reshape(1, 1, L, S)
            elif attn_mask.shape == (N * H, L, S):
                mask = attn_mask.reshape(N, H, L, S)
            else:
                raise RuntimeError(f"MultiheadAttention: attn_mask of shape {attn_mask.shape} should be "
                                   f"{(L, S)} or {(N * H, L, S)}")
        if key_padding_mask is not None:
            if key_padding_mask.shape != (N, S):
                raise RuntimeError(f"MultiheadAttention: expected key_padding_mask of shape {(N, S)}, "
                                   f"got {key_padding_mask.shape}")
            kpm = key_padding_mask.reshape(N, 1, 1, S)
            mask = kpm if mask is None else mask + kpm
        return mask


# --- utils ----------------------------------------------------------------------------------------


def _clip_grad_norm_(parameters, max_norm, norm_type=2.0, error_if_nonfinite=False, foreach=None):
    """See core.optim.clip_grad_norm_ (imported late: optim does not depend on nn)."""
    from .optim import clip_grad_norm_

    return clip_grad_norm_(parameters, max_norm, norm_type, error_if_nonfinite, foreach)


def _clip_grad_value_(parameters, clip_value, foreach=None):
    """See core.optim.clip_grad_value_."""
    from .optim import clip_grad_value_

    return clip_grad_value_(parameters, clip_value, foreach)


# core.nn.utils.clip_grad_norm_ / clip_grad_value_, where PyTorch users look for them
utils = types.SimpleNamespace(clip_grad_norm_=_clip_grad_norm_, clip_grad_value_=_clip_grad_value_)
