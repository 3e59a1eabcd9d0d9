"""Shared fixtures for the kernel tests.

`ptx_sm90(kernel, signature)` compiles a numba.cuda kernel to PTX for sm_90 without a GPU. numba-cuda 0.30
compiles the *device functions* a kernel calls for the current device's compute capability, which fails when
there is no device; the fixture answers that query with (9, 0) for the duration of the compile, so kernel and
device functions are all compiled for sm_90 — the compile that a real GPU launch would do.
"""

from __future__ import annotations

from unittest import mock

import pytest


@pytest.fixture
def ptx_sm90():
    from numba import cuda
    from numba.cuda import dispatcher

    class _SM90:
        compute_capability = (9, 0)

    def compile_ptx(kernel, signature):
        pyfunc = getattr(kernel, "py_func", kernel)
        with mock.patch.object(dispatcher, "get_current_device", lambda: _SM90()):
            ptx, _ = cuda.compile_ptx(pyfunc, signature, cc=(9, 0))
        assert ".target sm_90" in ptx
        return ptx

    return compile_ptx
