"""kernels.dispatch.launch hands a Numba-compiled kernel to CuPy: its parameters must be laid out exactly as the
kernel's PTX declares them, or the kernel reads garbage. Checked here against the sm_90 PTX of kernels of every
family (CI has no GPU; the `gpu` tests run the launches themselves)."""

import re

import numpy as np
import pytest
from numba import types
from numba.core import sigutils

from kernels import dispatch
from kernels.attention import cuda as attention_cuda
from kernels.conv import cuda as conv_cuda
from kernels.gumbel import cuda as gumbel_cuda
from kernels.schedule import cuda as schedule_cuda

WIDTH = {"u8": 1, "b8": 1, "s8": 1, "u16": 2, "u32": 4, "s32": 4, "f32": 4, "b32": 4, "u64": 8, "s64": 8, "f64": 8,
         "b64": 8}


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


@pytest.mark.parametrize("name", sorted(CASES))
def test_flattened_arguments_match_the_ptx_parameters(name, ptx_sm90):
    kernel, signature = CASES[name]
    argtypes, _ = sigutils.normalize_signature(signature)
    args = [_example(t) for t in argtypes]
    assert dispatch.argument_types(args) == tuple(argtypes)  # the launch compiles the signature the tests check
    ptx = ptx_sm90(kernel, signature)
    params = re.search(r"\.entry\s+\S+\((.*?)\)", ptx, re.S).group(1)
    widths = [WIDTH[w] for w, _ in re.findall(r"\.param\s+\.(\w+)\s+\S*?_param_(\d+)", params)]
    flat = dispatch.flatten(args, lambda a: a.ctypes.data)
    assert [np.asarray(p).itemsize for p in flat] == widths
    # an array's data pointer lands where its kernel parameter is (meminfo, parent, nitems, itemsize, data, ...)
    i = next(i for i, a in enumerate(args) if isinstance(a, np.ndarray))  # scalars before it: one parameter each
    a = args[i]
    assert flat[i + 2] == a.size and flat[i + 3] == a.itemsize and flat[i + 4] == a.ctypes.data
    assert list(flat[i + 5:i + 5 + 2 * a.ndim]) == list(a.shape) + list(a.strides)


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
