"""The numba.cuda attention kernels: equal to the NumPy reference under the CUDA simulator, and compiled to PTX for
sm_90 (the simulator accepts code that a real compile rejects), both float32 and float64.

``NUMBA_ENABLE_CUDASIM`` takes effect only if set before ``numba.cuda`` is first imported, and the simulator
cannot compile PTX: so each check runs in its own Python process (this file run as a script), whatever else
the test session has imported. The simulator runs one Python thread per CUDA thread: sizes stay tiny.
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
    assert out.count("ptx ok") == 8, out  # 4 kernels × {float32, float64}


@pytest.mark.gpu
def test_cuda_kernels_equal_reference_on_gpu():
    cupy = pytest.importorskip("cupy")
    if not cupy.is_available():
        pytest.skip("no CUDA GPU")
    from kernels.attention import Conv, attention_backward, attention_forward

    rng = np.random.default_rng(0)
    cases = ({"causal": True}, {"pattern": Conv(text_len=16, width=16, kernel=5)}, {"mask": rng.random((272,)) < 0.7})
    for kw in cases:
        q, k, v, do = (rng.standard_normal((2, 4, 272, 64)).astype(np.float32) for _ in range(4))
        out_r, lse_r = attention_forward(q, k, v, scale=0.125, form="reference", **kw)
        g_r = attention_backward(q, k, v, out_r, lse_r, do, scale=0.125, form="reference", **kw)
        dev = [cupy.asarray(x) for x in (q, k, v, do)]
        kw_d = {**kw, "mask": cupy.asarray(kw["mask"])} if "mask" in kw else kw
        out, lse = attention_forward(*dev[:3], scale=0.125, **kw_d)
        grads = attention_backward(*dev[:3], out, lse, dev[3], scale=0.125, **kw_d)
        np.testing.assert_allclose(cupy.asnumpy(out), out_r, rtol=1e-4, atol=1e-5)
        for g, gr in zip(grads, g_r):
            np.testing.assert_allclose(cupy.asnumpy(g), gr, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------------------------------------------
# The checks themselves, run in a subprocess: `python test_attention_cuda.py simulate|ptx`.


def check_simulator():
    """Hypothesis-drawn tiny cases: the cuda form (on NumPy arrays, simulated) equals the reference."""
    from hypothesis import HealthCheck, given, settings
    from numba.cuda import config

    assert config.ENABLE_CUDASIM, "the simulator must be on before numba.cuda is imported"
    sys.path.insert(0, str(Path(__file__).parent))
    from test_attention import assert_same, attention_case, tile_edge_cases

    from kernels.attention import cuda as attention_cuda

    # Tiles of BQ = BK = 32: lengths up to 40 give partial and skipped tiles while staying cheap to simulate.
    assert attention_cuda.BQ == 32 and attention_cuda.BK == 32

    @settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(attention_case(max_len=40, max_dim=5, tile=32))
    def check(case):
        q, k, v, dout, kw = case
        q, k, v, dout = q[:1, :2], k[:1, :2], v[:1, :2], dout[:1, :2]  # at most one batch, two heads
        mask = kw.get("mask")
        if mask is not None and mask.ndim == 4:
            kw = {**kw, "mask": mask[:1, :2]}
        assert_same("cuda", q, k, v, dout, kw)

    check()
    for n, (q, k, v, dout, kw) in enumerate(tile_edge_cases(attention_cuda.BQ)):
        if n % 2 == 0 or q.shape[2] <= attention_cuda.BQ + 1:  # keep the simulator's time down
            assert_same("cuda", q, k, v, dout, kw)
    # Head dims beyond the default 48 KiB of shared memory are refused up front (a GPU launch would fail).
    from kernels.attention import attention_forward

    big = np.zeros((1, 1, 2, 128), dtype=np.float32)
    try:
        attention_forward(big, big, big, form="cuda")
    except ValueError as e:
        assert "shared memory" in str(e)
    else:
        raise AssertionError("D = Dv = 128 in float32 should not fit")
    print("simulator cases passed")


def check_ptx():
    """Compile every kernel, float32 and float64, to PTX for sm_90 with NVRTC/NVVM (no GPU needed)."""
    import types

    import numba.cuda.dispatcher
    from numba import cuda
    from numba.cuda import config

    from kernels.attention import cuda as attention_cuda

    assert not config.ENABLE_CUDASIM
    # Kernels calling device functions compile those for "the current device", which needs a GPU to ask;
    # with none, name the target we compile for (the device functions are compiled for real, for sm_90).
    numba.cuda.dispatcher.get_current_device = lambda: types.SimpleNamespace(compute_capability=(9, 0))
    for dtype in (np.float32, np.float64):
        sigs = attention_cuda.signatures(dtype)
        for name, kernel in attention_cuda.KERNELS[np.dtype(dtype)].items():
            ptx, _ = cuda.compile_ptx(kernel.py_func, sigs[name], cc=(9, 0))
            assert ".target sm_90" in ptx and ".entry" in ptx, name
            if name != "rowdot":  # the tiled kernels stage tiles in shared memory behind barriers
                assert ".shared" in ptx and "bar.sync" in ptx, name
            if dtype == np.float32:  # no silent promotion to double precision arithmetic
                assert ".f64" not in ptx, name
            print(f"ptx ok {name} {np.dtype(dtype).name} ({len(ptx)} chars)")


if __name__ == "__main__":
    {"simulate": check_simulator, "ptx": check_ptx}[sys.argv[1]]()
