"""How a kernel family picks its form (by array type: NumPy → cpu, CuPy → cuda, unless `form=` names one), and how
a numba.cuda kernel is launched on CuPy arrays (`launch`)."""

from __future__ import annotations

import functools
import importlib
import struct
import threading

import numpy as np

FORMS = ("reference", "cpu", "cuda")


def _is_cupy(a):
    return type(a).__module__.startswith("cupy")


def array_module(a):
    """The array module of a: CuPy for a CuPy array (imported only then), NumPy for anything else (the CUDA
    simulator runs the numba.cuda kernels on NumPy arrays)."""
    if _is_cupy(a):
        import cupy

        return cupy
    return np


def data_ptr(a) -> int:
    """The address of an array's first byte, for NumPy and CuPy arrays alike."""
    return a.data.ptr if _is_cupy(a) else a.__array_interface__["data"][0]


@functools.cache
def sm_count() -> int:
    """Streaming multiprocessors of the current GPU."""
    import cupy

    return cupy.cuda.Device().attributes["MultiProcessorCount"]


def default_form(a) -> str:
    """The form an array goes to when none is named: cpu for NumPy arrays, cuda for CuPy arrays (a family may send
    some CuPy arrays on to a faster form of its own, as schedule and gumbel do float32 ones to cuda_vec)."""
    return "cuda" if _is_cupy(a) else "cpu"


def form_module(family: str, form, a):
    """The module `kernels.<family>.<form>`; form None means `default_form(a)`."""
    if form is None:
        form = default_form(a)
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    return importlib.import_module(f"kernels.{family}.{form}")


def cuda_array(a):
    """A CuPy array as a Numba device array, for a numba.cuda launch; anything else is returned as it is.

    Handed a foreign array, Numba synchronizes the stream the array names before every launch, one wait per
    argument: on a GPU that cost more than the elementwise kernels themselves. Skipped where it is safe: when CuPy
    works on the default stream, as Numba's launches do, the two stay in order without it.
    """
    if not _is_cupy(a):
        return a
    import cupy
    from numba import cuda

    on_default = cupy.cuda.get_current_stream().ptr == 0
    return cuda.from_cuda_array_interface(a.__cuda_array_interface__, owner=a, sync=not on_default)


_LAUNCHERS = {}  # (kernel, device, argument key) → _Launcher of the kernel compiled for those argument types
_SLOT = {"bool": "?7x", "int8": "b7x", "uint8": "B7x", "int16": "h6x", "uint16": "H6x", "int32": "i4x",
         "uint32": "I4x", "int64": "q", "uint64": "Q", "float32": "f4x", "float64": "d"}


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


def slots(argtypes):
    """The struct format of a Numba-compiled kernel's parameters, one 8-byte slot each, in the order its PTX
    declares them: an array becomes (meminfo, parent, nitems, itemsize, data, shape…, strides…) — Numba's array
    model —, a scalar its value at the width of its Numba type (a bool one byte)."""
    from numba import types

    fmt = []
    for t in argtypes:
        if isinstance(t, types.Array):
            fmt += ["Q", "Q", "q", "q", "Q"] + ["q"] * (2 * t.ndim)
        elif str(t) in _SLOT:
            fmt.append(_SLOT[str(t)])
        else:
            raise TypeError(f"launch: no kernel parameter for an argument of type {t}")
    return fmt


def values(args, pointer):
    """The parameter values for `slots`: no meminfo or parent on a device, then the array's size, item size, data
    pointer, shape and strides (in bytes); scalars as they are."""
    out = []
    for a in args:
        if _is_array(a):
            out += (0, 0, a.size, a.itemsize, pointer(a), *a.shape, *a.strides)
        else:
            out.append(a)
    return out


class _Launcher:
    """A kernel compiled by Numba for one signature, loaded through CuPy and launched with cuLaunchKernel: the
    parameters are packed into one buffer of 8-byte slots with a pointer to each (the driver reads each
    parameter's size from the image)."""

    def __init__(self, kernel, args):
        import cupy
        from numba.core import types

        argtypes = argument_types(args)
        compiled = kernel.compile(types.void(*argtypes))
        lib = compiled._codelibrary
        if lib._setup_functions or lib._teardown_functions:
            raise NotImplementedError(f"{kernel.py_func.__name__} needs module setup (NRT?): launch it through Numba")
        self.module = cupy.cuda.function.Module()
        self.module.load(_image(lib.get_cubin()))  # Numba's own link: libdevice and any files it linked are in it
        self._parameters(argtypes, self.module.get_function(compiled.entry_name))

    def _parameters(self, argtypes, function):
        """The parameter buffer of 8-byte slots, and the array of pointers to them that cuLaunchKernel takes."""
        from cuda.bindings import driver

        self.driver = driver
        self.handle = driver.CUfunction(function.ptr)
        self.fmt = struct.Struct("<" + "".join(slots(argtypes)))
        self.buffer = np.zeros(max(self.fmt.size, 8), dtype=np.uint8)
        self.pointers = self.buffer.ctypes.data + 8 * np.arange(self.fmt.size // 8, dtype=np.uint64)
        self.lock = threading.Lock()

    def __call__(self, grid, block, vals, shared, stream):
        """Launch with the parameter values `vals` (see `values`) on the CUDA stream handle `stream`."""
        driver = self.driver
        with self.lock:  # the buffer is reused: the driver has copied the parameters when cuLaunchKernel returns
            self.fmt.pack_into(self.buffer, 0, *vals)
            (err,) = driver.cuLaunchKernel(self.handle, *grid, *block, shared, driver.CUstream(stream),
                                           self.pointers.ctypes.data, 0)
        if err != driver.CUresult.CUDA_SUCCESS:
            raise RuntimeError(f"cuLaunchKernel: {err}")


def _image(code):
    """The bytes of a linked image (numba-cuda 0.30 hands a cuda.core ObjectCode, older versions bytes)."""
    return bytes(getattr(code, "code", code))


def _dim3(d):
    d = (d,) if isinstance(d, (int, np.integer)) else tuple(d)
    return tuple(int(x) for x in d) + (1,) * (3 - len(d))


def launch(kernel, grid, block, *args, shared=0):
    """kernel[grid, block, 0, shared](*args) for a `@cuda.jit` kernel, on CuPy arrays launched by the driver.

    Numba's own launch costs 40–60 µs of host time per call with a dozen arguments, and wrapping each CuPy array
    for it 14 µs more (measured on an H200 with bench/launch_overhead.py): a DDIM step took 0.4 ms however small.
    Here the kernel is compiled by Numba once per argument types and loaded by CuPy, and a call packs the
    parameters and calls cuLaunchKernel on CuPy's current stream. Without CuPy arrays (NumPy arrays under the
    CUDA simulator), or with Numba's own device arrays among them, this is Numba's launch."""
    if not any(map(_is_cupy, args)) or any(hasattr(a, "__cuda_array_interface__") and not _is_cupy(a) for a in args):
        return kernel[grid, block, 0, shared](*map(cuda_array, args))  # the simulator, or Numba's device arrays
    import cupy

    key = (kernel, cupy.cuda.runtime.getDevice(), tuple(map(_key, args)))  # a module is loaded on one device
    launcher = _LAUNCHERS.get(key) or _LAUNCHERS.setdefault(key, _Launcher(kernel, args))
    launcher(_dim3(grid), _dim3(block), values(args, lambda a: a.data.ptr), shared, cupy.cuda.get_current_stream().ptr)
