"""kernels.dispatch.launch hands a Numba-compiled kernel to the driver itself: its parameters must be what the
kernel's PTX declares, in that order, or the kernel reads garbage. Checked here against the sm_90 PTX of kernels of
every family (CI has no GPU; the `gpu` tests run the launches themselves)."""

import re
import struct

import numpy as np
import pytest
from numba import types
from numba.core import sigutils

from kernels import dispatch
from kernels.attention import cuda as attention_cuda
from kernels.conv import cuda as conv_cuda
from kernels.gumbel import cuda as gumbel_cuda
from kernels.schedule import cuda as schedule_cuda


def _example(ty):
    """An argument a launch site would pass for Numba type ty: a C-contiguous array, or a scalar."""
    if isinstance(ty, types.Array):
        return np.zeros((2,) * ty.ndim, dtype=ty.dtype.name)
    return {types.boolean: True, types.int64: 3, types.float64: 0.5}.get(ty) or np.dtype(ty.name).type(3)


def _cases():
    f32 = "float32"
    return {
        "schedule fused_update_f32": schedule_cuda.SIGNATURES["fused_update_f32"],
        "gumbel forward_float32": gumbel_cuda.SIGNATURES["forward_float32"],
        "gumbel noise_float64": gumbel_cuda.SIGNATURES["noise_float64"],
        "conv forward": (conv_cuda.KERNELS[np.dtype(np.float32)]["forward"],
                         types.void(*conv_cuda.signatures(np.float32)["forward"])),
        "attention rowdot": (attention_cuda.KERNELS[np.dtype(f32)]["rowdot"], attention_cuda.signatures(f32)["rowdot"]),
        "attention forward": (attention_cuda.KERNELS[np.dtype(f32)]["forward"],
                              attention_cuda.signatures(f32)["forward"]),
    }


CASES = _cases()


PTX_FORMAT = {"u8": "B", "b8": "B", "s8": "b", "u16": "H", "u32": "I", "s32": "i", "f32": "f", "b32": "I", "u64": "Q",
              "s64": "q", "f64": "d", "b64": "Q"}


@pytest.mark.parametrize("name", sorted(CASES))
def test_packed_parameters_are_what_the_ptx_reads(name, ptx_sm90):
    """Pack an example call's arguments as launch does, then read each kernel parameter back the way the driver
    does (the PTX declares its type; launch gives each its own 8-byte slot): every value arrives intact."""
    kernel, signature = CASES[name]
    argtypes, _ = sigutils.normalize_signature(signature)
    args = [_example(t) for t in argtypes]
    assert dispatch.argument_types(args) == tuple(argtypes)  # the launch compiles the signature the tests check
    ptx = ptx_sm90(kernel, signature)
    params = re.search(r"\.entry\s+\S+\((.*?)\)", ptx, re.S).group(1)
    ptx_types = [t for t, _ in re.findall(r"\.param\s+\.(\w+)\s+\S*?_param_(\d+)", params)]
    fmt = dispatch.slots(argtypes)
    vals = dispatch.values(args, lambda a: a.ctypes.data)
    assert len(fmt) == len(vals) == len(ptx_types)
    packed = struct.pack("<" + "".join(fmt), *vals)
    read = [struct.unpack_from("<" + PTX_FORMAT[t], packed, 8 * k)[0] for k, t in enumerate(ptx_types)]
    assert read == [float(v) if isinstance(v, float) else int(v) for v in vals]
    # and the values are Numba's array model: meminfo, parent, nitems, itemsize, data, shape, strides
    i = next(i for i, a in enumerate(args) if isinstance(a, np.ndarray))  # scalars before it: one parameter each
    a = args[i]
    assert read[i:i + 5 + 2 * a.ndim] == [0, 0, a.size, a.itemsize, a.ctypes.data, *a.shape, *a.strides]


def test_key_tells_layouts_dtypes_and_scalars_apart():
    a = np.zeros((3, 4), np.float32)
    keys = {dispatch._key(x) for x in (a, a.T, a[:, ::2], a.astype(np.float64), np.zeros(3, np.float32), 1, 1.0,
                                          True, np.uint64(1))}
    assert len(keys) == 9


def test_without_cupy_arrays_launch_is_numbas(monkeypatch):
    calls = []

    class Kernel:
        def __getitem__(self, config):
            return lambda *args: calls.append((config, args))

    dispatch.launch(Kernel(), (2, 3), 64, np.zeros(3), 1.0, shared=128)
    assert calls[0][0] == ((2, 3), 64, 0, 128) and calls[0][1][1] == 1.0


def test_the_driver_gets_pointers_to_each_value(monkeypatch):
    """What cuLaunchKernel receives (faked here: CI has no driver): an array of pointers, the k-th pointing at
    parameter k's value; grid, block, shared memory and stream as given."""
    import ctypes

    from cuda.bindings import driver

    args = [np.zeros((3, 5), np.float32), True, 7, 0.25, np.uint64(2**40 + 1), np.zeros(4)]
    argtypes = dispatch.argument_types(args)
    seen = {}

    def fake_launch(f, gx, gy, gz, bx, by, bz, shared, stream, params, extra):
        pointers = (ctypes.c_uint64 * len(dispatch.slots(argtypes))).from_address(params)
        seen.update(f=int(f), dims=(gx, gy, gz, bx, by, bz, shared), stream=int(stream), extra=extra,
                    slots=[ctypes.string_at(p, 8) for p in pointers])
        return (driver.CUresult.CUDA_SUCCESS,)

    class Function:
        ptr = 1234

    monkeypatch.setattr(driver, "cuLaunchKernel", fake_launch)
    launcher = object.__new__(dispatch._Launcher)
    launcher._parameters(argtypes, Function())
    arrays = {id(a): 1000 * (k + 1) for k, a in enumerate(args)}  # stand-in device pointers
    launcher((2, 1, 1), (64, 1, 1), dispatch.values(args, lambda a: arrays[id(a)]), 96, 77)
    assert seen["f"] == 1234 and seen["dims"] == (2, 1, 1, 64, 1, 1, 96) and seen["stream"] == 77
    assert seen["extra"] == 0
    want = [0, 0, 15, 4, 1000, 3, 5, 20, 4,  # the float32 (3, 5) array
            True, 7, 0.25, 2**40 + 1,
            0, 0, 4, 8, 6000, 4, 8]  # the float64 (4,) array
    fmts = dispatch.slots(argtypes)
    got = [struct.unpack("<" + f, b)[0] for f, b in zip(fmts, seen["slots"])]
    assert got == want


class _CupyLike(np.ndarray):
    """A NumPy array whose type says it is CuPy's: all the dispatcher reads to pick a GPU form."""


_CupyLike.__module__ = "cupy._like"


def _gpu_array(shape, dtype=np.float32):
    return np.zeros(shape, dtype).view(_CupyLike)


def test_float32_cupy_arrays_default_to_the_cuda_cxx_schedule_kernel():
    """cuda_vec is the measured-faster default for float32 CuPy arrays; other dtypes and NumPy arrays keep theirs."""
    from kernels import schedule
    from kernels.schedule import cpu, cuda_vec

    assert dispatch.default_form(_gpu_array(3)) == "cuda" and dispatch.default_form(np.zeros(3)) == "cpu"
    assert schedule._form(None, _gpu_array((2, 3))) is cuda_vec
    assert schedule._form(None, _gpu_array((2, 3), np.float64)) is schedule_cuda
    assert schedule._form("cuda", _gpu_array((2, 3))) is schedule_cuda  # a named form is kept
    assert schedule._form(None, np.zeros((2, 3), np.float32)) is cpu


def test_gumbel_rows_cuda_vec_takes_default_to_it():
    """The C++ forward is the default for the float32 rows it takes (a multiple of 4, at most MAX_ROW); the rest
    go to numba.cuda, which reports a bad dim itself."""
    from kernels import gumbel
    from kernels.gumbel import cpu, cuda_vec

    assert gumbel._form(None, _gpu_array((2, 8))) is cuda_vec
    assert gumbel._form(None, _gpu_array((2, cuda_vec.MAX_ROW))) is cuda_vec
    assert gumbel._form(None, _gpu_array((8, 2)), 0) is cuda_vec
    too_long = (1, cuda_vec.MAX_ROW + 4)
    for shape, dim in (((2, 8), 0), ((2, 6), -1), (too_long, -1), ((2, 8), 2), ((2, 8), 1.0), ((), -1)):
        assert gumbel._form(None, _gpu_array(shape), dim) is gumbel_cuda, (shape, dim)
    assert gumbel._form(None, _gpu_array((2, 8), np.float64)) is gumbel_cuda
    assert gumbel._form(None, np.zeros((2, 8), np.float32)) is cpu
    assert gumbel._form("cuda", _gpu_array((2, 8))) is gumbel_cuda


@pytest.mark.gpu
def test_default_forms_on_gpu_are_cuda_vec_for_float32(cupy):
    """On a GPU, the default call on float32 CuPy arrays gives what form="cuda_vec" gives, bit for bit."""
    from kernels import gumbel, schedule
    from kernels.schedule.reference import Schedule

    x = cupy.asarray(np.random.default_rng(0).standard_normal((4, 3, 8, 8), dtype=np.float32))
    t, sched = np.array([1, 10, 100, 999]), Schedule.linear(1000)
    default, vec = (schedule.q_sample(x, t, sched, seed=3, form=form) for form in (None, "cuda_vec"))
    for got, want in zip(default, vec):
        assert bool((got == want).all())
    logits = x.reshape(12, 64)
    for got, want in zip(gumbel.gumbel_softmax_forward(logits, 0.7, True, seed=3),
                         gumbel.gumbel_softmax_forward(logits, 0.7, True, seed=3, form="cuda_vec")):
        assert bool((got == want).all())
