"""How a kernel family picks its form (by array type: NumPy → cpu, CuPy → cuda, unless `form=` names one), and how
a numba.cuda kernel is launched on CuPy arrays (`launch`)."""

from __future__ import annotations

import importlib

import numpy as np

FORMS = ("reference", "cpu", "cuda")


def form_module(family: str, form, a):
    """The module `kernels.<family>.<form>`; form None means cpu for NumPy arrays and cuda for CuPy arrays."""
    if form is None:
        form = "cuda" if type(a).__module__.startswith("cupy") else "cpu"
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    return importlib.import_module(f"kernels.{family}.{form}")


def cuda_array(a):
    """A CuPy array as a Numba device array, for a numba.cuda launch; anything else is returned as it is.

    Handed a foreign array, Numba synchronizes the stream the array names before every launch, one wait per
    argument: on a GPU that cost more than the elementwise kernels themselves. Skipped where it is safe: when CuPy
    works on the default stream, as Numba's launches do, the two stay in order without it.
    """
    if not type(a).__module__.startswith("cupy"):
        return a
    import cupy
    from numba import cuda

    on_default = cupy.cuda.get_current_stream().ptr == 0
    return cuda.from_cuda_array_interface(a.__cuda_array_interface__, owner=a, sync=not on_default)


_FUNCTIONS = {}  # (kernel, argument key) → CuPy Function of the kernel compiled for those argument types
_ZERO = np.uint64(0)


def _is_cupy(a):
    return type(a).__module__.startswith("cupy")


def _layout(a):
    return "C" if a.flags.c_contiguous else "F" if a.flags.f_contiguous else "A"


def _is_array(a):
    return isinstance(a, np.ndarray) or _is_cupy(a)


def _key(a):
    """What decides the compiled kernel: an array's dtype, rank and layout, a scalar's type."""
    return (a.dtype.char, a.ndim, _layout(a)) if _is_array(a) else type(a)


def argument_types(args):
    """The Numba types a numba.cuda dispatcher would give these arguments (CuPy or NumPy arrays, scalars)."""
    import numba
    from numba import types

    return tuple(types.Array(numba.from_dtype(a.dtype), a.ndim, _layout(a)) if _is_array(a) else numba.typeof(a)
                 for a in args)


def flatten(args, pointer):
    """The kernel parameters of a Numba-compiled kernel, in the order its PTX declares them: an array becomes
    (meminfo, parent, nitems, itemsize, data, shape…, strides…) — Numba's array model, with no meminfo or parent on
    a device —, a scalar its value at the width Numba types it (Python bool: 1 byte, int: int64, float: float64)."""
    out = []
    for a in args:
        if _is_array(a):
            out += (_ZERO, _ZERO, np.int64(a.size), np.int64(a.itemsize), np.uint64(pointer(a)))
            out += [np.int64(n) for n in a.shape] + [np.int64(n) for n in a.strides]
        elif isinstance(a, bool):
            out.append(np.bool_(a))
        elif isinstance(a, int):
            out.append(np.int64(a))
        elif isinstance(a, float):
            out.append(np.float64(a))
        else:  # a NumPy scalar: its own type
            out.append(a)
    return out


def _image(code):
    """The bytes of a linked image (numba-cuda ≥ 0.2x hands a cuda.core ObjectCode, older ones bytes)."""
    code = getattr(code, "code", code)
    if isinstance(code, str) and not code.lstrip().startswith("//"):  # a path
        with open(code, "rb") as f:
            return f.read()
    return code.encode() if isinstance(code, str) else bytes(code)


def _function(kernel, args):
    """The CuPy Function of `kernel` compiled by Numba for these arguments' types (compiled and loaded once)."""
    import cupy

    key = (kernel, tuple(map(_key, args)))
    fn = _FUNCTIONS.get(key)
    if fn is None:
        from numba.core import types

        compiled = kernel.compile(types.void(*argument_types(args)))
        lib = compiled._codelibrary
        if lib._setup_functions or lib._teardown_functions:
            raise NotImplementedError(f"{kernel.__name__} needs module setup (NRT?): launch it through Numba")
        module = cupy.cuda.function.Module()
        module.load(_image(lib.get_cubin()))  # Numba's own link: libdevice and any helper files it linked are in it
        fn = _FUNCTIONS[key] = (module, module.get_function(compiled.entry_name))
    return fn[1]


def _dim3(d):
    d = (d,) if isinstance(d, (int, np.integer)) else tuple(d)
    return tuple(int(x) for x in d) + (1,) * (3 - len(d))


def launch(kernel, grid, block, *args, shared=0):
    """kernel[grid, block, 0, shared](*args) for a `@cuda.jit` kernel, on CuPy arrays launched through CuPy.

    Numba's own launch costs 0.1–0.4 ms of host time per call on a GPU (typing the arguments, wrapping each CuPy
    array, marshalling through cuda.core: measured on an H200 with bench/launch_overhead.py), longer than an
    elementwise kernel over 50 M values runs; the same kernel, compiled by Numba once per argument types and
    launched by CuPy on its current stream, costs a few µs. Without CuPy arrays (NumPy arrays under the CUDA
    simulator) this is Numba's launch."""
    if not any(map(_is_cupy, args)):
        return kernel[grid, block, 0, shared](*args)
    _function(kernel, args)(_dim3(grid), _dim3(block), flatten(args, lambda a: a.data.ptr), shared_mem=shared)
