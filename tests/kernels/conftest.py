"""Shared fixtures for the kernel tests.

`ptx_sm90(kernel, signature)` compiles a numba.cuda kernel to PTX for sm_90 without a GPU. numba-cuda 0.30
compiles the *device functions* a kernel calls for the current device's compute capability, which fails when
there is no device; the fixture answers that query with (9, 0) for the duration of the compile, so kernel and
device functions are all compiled for sm_90 — the compile that a real GPU launch would do.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from unittest import mock

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def run_script():
    """Run a test file as a script in a fresh Python (`python FILE MODE`), with the CUDA simulator on or off.

    NUMBA_ENABLE_CUDASIM takes effect only before numba.cuda is first imported, and the simulator cannot compile
    PTX, so each CUDA check gets its own process whatever this session has imported. Returns its stdout.
    """

    def run(path, mode, simulate, timeout=300):
        env = dict(os.environ, NUMBA_ENABLE_CUDASIM="1" if simulate else "0")
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
        proc = subprocess.run([sys.executable, str(path), mode], env=env, cwd=ROOT, capture_output=True, text=True,
                              timeout=timeout)
        assert proc.returncode == 0, f"{mode} failed:\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}"
        return proc.stdout

    return run


@pytest.fixture
def ptx_sm90():
    from numba import cuda
    from numba.cuda import dispatcher

    class _SM90:
        compute_capability = (9, 0)

    def compile_ptx(kernel, signature):
        pyfunc = getattr(kernel, "py_func", kernel)
        bounds = getattr(kernel, "targetoptions", {}).get("launch_bounds")  # as a launch compiles it
        with mock.patch.object(dispatcher, "get_current_device", lambda: _SM90()):
            ptx, _ = cuda.compile_ptx(pyfunc, signature, cc=(9, 0), launch_bounds=bounds)
        assert ".target sm_90" in ptx
        return ptx

    return compile_ptx


@pytest.fixture
def cupy():
    """CuPy on a usable CUDA GPU, or the test is skipped (the `gpu`-marked tests; CI has no GPU)."""
    cupy = pytest.importorskip("cupy")
    if not cupy.is_available():
        pytest.skip("no CUDA GPU")
    return cupy
