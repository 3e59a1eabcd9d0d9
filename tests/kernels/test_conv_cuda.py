"""The numba.cuda conv kernels: equal to the NumPy reference under the CUDA simulator, and compiled to PTX for sm_90
(the simulator accepts code that a real compile rejects), float32 and float64.

``NUMBA_ENABLE_CUDASIM`` takes effect only if set before ``numba.cuda`` is first imported, and the simulator cannot
compile PTX: so each check runs in its own Python process (this file run as a script), whatever else the test
session has imported. The simulator runs one Python thread per CUDA thread (TILE = 4 there): sizes stay tiny.
On a machine with a GPU, the ``gpu``-marked test runs the same comparison on the device with CuPy arrays.
"""

import sys
from pathlib import Path

import numpy as np
import pytest


def test_cuda_kernels_equal_reference_under_simulator(run_script):
    out = run_script(__file__, "simulate", simulate=True)
    assert "simulator cases passed" in out


def test_cuda_kernels_compile_to_ptx_for_sm90(run_script):
    out = run_script(__file__, "ptx", simulate=False)
    assert out.count("ptx ok") == 6, out  # 3 kernels × {float32, float64}


@pytest.mark.gpu
def test_cuda_kernels_equal_reference_on_gpu(cupy):
    from kernels import conv
    from kernels.conv import reference as ref

    rng = np.random.default_rng(0)
    cases = [((8, 64, 33, 31), (96, 64, 3, 3), dict(stride=(1, 1), padding=(1, 1), dilation=(1, 1), groups=1)),
             ((4, 32, 20, 17), (32, 8, 5, 3), dict(stride=(2, 1), padding=(2, 0), dilation=(1, 2), groups=4))]
    for x_shape, w_shape, kw in cases:
        for dtype, tol in ((np.float32, dict(rtol=1e-4, atol=1e-3)), (np.float64, dict(rtol=1e-10, atol=1e-10))):
            x, w = rng.standard_normal(x_shape).astype(dtype), rng.standard_normal(w_shape).astype(dtype)
            y_r = ref.conv2d_forward(x, w, **kw)
            gy = rng.standard_normal(y_r.shape).astype(dtype)
            xd, wd, gd = cupy.asarray(x), cupy.asarray(w), cupy.asarray(gy)
            np.testing.assert_allclose(cupy.asnumpy(conv.conv2d_forward(xd, wd, **kw)), y_r, **tol)
            np.testing.assert_allclose(cupy.asnumpy(conv.conv2d_backward_input(gd, wd, x.shape, **kw)),
                                       ref.conv2d_backward_input(gy, w, x.shape, **kw), **tol)
            np.testing.assert_allclose(cupy.asnumpy(conv.conv2d_backward_weight(xd, gd, w.shape, **kw)),
                                       ref.conv2d_backward_weight(x, gy, w.shape, **kw), **tol)


# ---------------------------------------------------------------------------------------------------------------
# The checks themselves, run in a subprocess: `python test_conv_cuda.py simulate|ptx`.


def check_simulator():
    """Hypothesis-drawn tiny cases (and the tile edges): the cuda form, on NumPy arrays, equals the reference."""
    from hypothesis import HealthCheck, given, settings
    from numba.cuda import config

    assert config.ENABLE_CUDASIM, "the simulator must be on before numba.cuda is imported"
    sys.path.insert(0, str(Path(__file__).parent))
    from test_conv import assert_form_equals_reference, conv_case

    from kernels.conv import cuda as conv_cuda
    from kernels.conv import reference as ref

    assert conv_cuda.TILE == 4
    rng = np.random.default_rng(0)
    # every contracted length (C/G·kh·kw, K/G·kh·kw, N·Ho·Wo) a partial tile; a 1×1 and a 5×5 kernel
    one = (1, 1)
    for x_shape, w_shape, kw in (((2, 3, 3, 2), (5, 3, 1, 1), dict(stride=one, padding=(0, 0), dilation=one, groups=1)),
                                 ((1, 2, 6, 5), (4, 1, 5, 5), dict(stride=(2, 1), padding=(2, 1), dilation=one,
                                                                  groups=2))):
        for dtype in (np.float32, np.float64):
            x, w = rng.standard_normal(x_shape).astype(dtype), rng.standard_normal(w_shape).astype(dtype)
            gy = rng.standard_normal(ref.conv2d_forward(x, w, **kw).shape).astype(dtype)
            assert_form_equals_reference("cuda", x, w, gy, kw)

    @settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(conv_case(max_batch=2, max_channels=2, max_side=3))
    def check(case):
        assert_form_equals_reference("cuda", *case)

    check()
    print("simulator cases passed")


def check_ptx():
    """Compile every kernel, float32 and float64, to PTX for sm_90 with NVRTC/NVVM (no GPU needed)."""
    from numba import cuda
    from numba.cuda import config

    from kernels.conv import cuda as conv_cuda

    assert not config.ENABLE_CUDASIM
    for dtype in (np.float32, np.float64):
        sigs = conv_cuda.signatures(dtype)
        for name, kernel in conv_cuda.KERNELS[np.dtype(dtype)].items():
            ptx, _ = cuda.compile_ptx(kernel.py_func, sigs[name], cc=(9, 0))
            assert ".target sm_90" in ptx and ".entry" in ptx, name
            assert ".shared" in ptx and "bar.sync" in ptx, name  # tiles staged in shared memory behind barriers
            assert ".local" not in ptx, name  # the micro-tile accumulators stay in registers
            if name == "backward_weight":  # partial sums over the batch chunks meet through atomics
                assert "atom.global.add" in ptx or "red.global.add" in ptx, name
            if dtype == np.float32:  # no silent promotion to double precision arithmetic
                assert ".f64" not in ptx, name
            print(f"ptx ok {name} {np.dtype(dtype).name} ({len(ptx)} chars)")


if __name__ == "__main__":
    {"simulate": check_simulator, "ptx": check_ptx}[sys.argv[1]]()
