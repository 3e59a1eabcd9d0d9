"""The numba.cuda attention kernels: equal to the NumPy reference under the CUDA simulator, and compiled to PTX for
sm_90 (the simulator accepts code that a real compile rejects), both float32 and float64.

``NUMBA_ENABLE_CUDASIM`` takes effect only if set before ``numba.cuda`` is first imported, and the simulator
cannot compile PTX: so each check runs in its own Python process (this file run as a script), whatever else
the test session has imported. The simulator runs one Python thread per CUDA thread: sizes stay tiny.
On a machine with a GPU, the ``gpu``-marked test runs the same comparison on the device with CuPy arrays.
"""

import re
import sys
from pathlib import Path

import numpy as np
import pytest


def test_cuda_kernels_equal_reference_under_simulator(run_script):
    out = run_script(__file__, "simulate", simulate=True)
    assert "simulator cases passed" in out


def test_cuda_kernels_compile_to_ptx_for_sm90(run_script):
    out = run_script(__file__, "ptx", simulate=False)
    assert out.count("ptx ok") == 8 + 2 * 3, out  # 4 kernels × {float32, float64}, 3 fast kernels × D in {32, 64}


@pytest.mark.gpu
def test_cuda_kernels_equal_reference_on_gpu(cupy):
    from kernels.attention import Conv, attention_backward, attention_forward
    from kernels.attention import cuda as attention_cuda

    rng = np.random.default_rng(0)
    assert attention_cuda.fast_dims_ok(np.float32, 64, 64) and not attention_cuda.fast_dims_ok(np.float32, 48, 48)
    cases = [({"causal": True}, 64), ({"pattern": Conv(text_len=16, width=16, kernel=5)}, 64)]
    cases += [({"mask": rng.random((272,)) < 0.7}, 64), ({"causal": True}, 48)]  # 64: the fast path, 48: general
    cases += [({"mask": np.where(rng.random((272,)) < 0.3, -1e9, 0.0), "causal": True}, 64)]  # huge finite scores
    for kw, D in cases:
        q, k, v, do = (rng.standard_normal((2, 4, 272, D)).astype(np.float32) for _ in range(4))
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
    check_fast_path(assert_same, attention_cuda)
    # NaN and +inf scores make their rows NaN, as in the reference: the general kernels, and the fast ones
    from test_attention import assert_nan_where_reference, nan_cases, nan_query_case

    general, fast = ([d for d in range(1, 9) if attention_cuda.fast_dims_ok(np.float32, d, d) == f] for f in (0, 1))
    for dtype, D in ((np.float64, 4), (np.float32, general[0]), (np.float32, fast[0])):
        for q, k, v, dout, kw in (*nan_cases(dtype, D), nan_query_case(dtype, D)):
            assert_nan_where_reference("cuda", q, k, v, dout, kw)
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


def fast_path_cases(dims):
    """Cases the register-blocked float32 kernels take (D = Dv in ``dims``): odd lengths around the simulator's
    tiles (16 × 8), L ≠ S, no mask, causal, every pattern (with or without the causal flag), boolean masks with a
    fully blocked row, additive masks with −inf entries broadcast over the batch, and a mask that blocks every row."""
    from kernels.attention import Column, Conv, PrefixLM, Row

    rng = np.random.default_rng(5)
    n_pat = 17
    pats = [Row(text_len=3, width=4), Column(text_len=2, width=3), Conv(text_len=1, width=4, kernel=3),
            PrefixLM(prefix_len=5)]
    cases = [((n_pat, n_pat), {"pattern": pt, "causal": n % 2 == 1}) for n, pt in enumerate(pats)]
    cases.append(((n_pat, n_pat), {"pattern": PrefixLM(prefix_len=5), "causal": False}))  # both flags matter here
    cases += [((9, 9), {}), ((7, 17), {}), ((17, 7), {"causal": True}), ((16, 16), {"causal": True}), ((1, 1), {})]
    bmask = rng.random((2, 1, 9, 13)) < 0.6
    bmask[1, 0, 4] = False  # a fully blocked row
    amask = np.where(rng.random((13,)) < 0.3, -np.inf, rng.standard_normal((13,)))
    cases += [((9, 13), {"mask": bmask}), ((9, 13), {"mask": amask, "causal": True})]
    cases += [((9, 9), {"mask": np.zeros((9, 9), bool)})]  # every row blocked
    for n, ((L, S), kw) in enumerate(cases):
        D = dims[n % len(dims)]
        # (the simulator's time: more than one batch and head only where a mask broadcasts over them)
        B, H = (2 if "mask" in kw and kw["mask"].ndim == 4 else 1), (2 if "mask" in kw else 1)
        q, k = (rng.standard_normal((B, H, n_, D)).astype(np.float32) for n_ in (L, S))
        v = rng.standard_normal((B, H, S, D)).astype(np.float32)
        dout = rng.standard_normal((B, H, L, D)).astype(np.float32)
        yield q, k, v, dout, {"scale": 0.6, **kw}


def check_fast_path(assert_same, attention_cuda):
    """The fast kernels equal the reference on the cases they take; float64 and D ≠ Dv go to the general ones."""
    from kernels.attention import Row

    dims = [d for d in range(1, 9) if attention_cuda.fast_dims_ok(np.float32, d, d)]
    assert dims, "no head dim takes the fast path under the simulator"
    assert not attention_cuda.fast_dims_ok(np.float64, dims[0], dims[0])
    assert not attention_cuda.fast_dims_ok(np.float32, dims[0], dims[0] + 1)
    for q, k, v, dout, kw in fast_path_cases(dims):
        assert attention_cuda.fast_dims_ok(q.dtype, q.shape[-1], v.shape[-1])
        assert_same("cuda", q, k, v, dout, kw)
    # Wider heads: a thread stages several batches of values per tile, and whole rows wider than the block
    rng = np.random.default_rng(6)
    for D, (L, S), kw in [(16, (19, 23), {"causal": True}), (24, (23, 11), {"pattern": Row(text_len=3, width=4)})]:
        assert attention_cuda.fast_dims_ok(np.float32, D, D) and D > attention_cuda.NT
        q, dout = (rng.standard_normal((1, 1, L, D)).astype(np.float32) for _ in range(2))
        k, v = (rng.standard_normal((1, 1, S, D)).astype(np.float32) for _ in range(2))
        assert_same("cuda", q, k, v, dout, {"scale": 0.4, **kw})


def check_ptx():
    """Compile every kernel, float32 and float64, to PTX for sm_90 with NVRTC/NVVM (no GPU needed)."""
    import types

    import numba.cuda.dispatcher
    from numba import cuda
    from numba.cuda import config

    sys.path.insert(0, str(Path(__file__).parent))
    from ptx_tools import ptxas_usage

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
    # The register-blocked kernels: their accumulators must stay in registers (no local memory at all: a local
    # array indexed where the compiler cannot resolve the index would go to slow local memory), their static
    # shared tiles within the default 48 KiB, their row reductions warp shuffles, their shared reads vectorized.
    # Their launch bounds (threads, blocks per SM) reach the PTX; where ptxas is installed, the registers it
    # allocates must let that many blocks share an SM (65536 registers per SM).
    for D in (32, 64):
        sigs = attention_cuda.signatures(np.float32)
        for name, kernel in attention_cuda.fast_kernels(D).items():
            blocks = attention_cuda.FAST_BLOCKS_PER_SM[name]
            assert kernel.targetoptions["launch_bounds"] == (attention_cuda.NT, blocks), name  # what a launch compiles
            ptx, _ = cuda.compile_ptx(kernel.py_func, sigs[name], cc=(9, 0), launch_bounds=(attention_cuda.NT, blocks))
            assert ".local" not in ptx and "ld.local" not in ptx and "st.local" not in ptx, (name, D)
            shared = sum(int(n) for n in re.findall(r"\.shared \.align \d+ \.b8 \w+\[(\d+)\]", ptx))
            assert 0 < shared <= attention_cuda.SMEM_LIMIT, (name, D, shared)
            assert "bar.sync" in ptx and ".f64" not in ptx, (name, D)
            assert ("shfl.sync.bfly" in ptx) == (name == "forward_fast"), (name, D)  # the online softmax's row max
            assert "ld.shared.v4.f32" in ptx, (name, D)  # the micro-tiles' operands load 4 floats at a time
            assert f".maxntid {attention_cuda.NT}, 1, 1" in ptx and f".minnctapersm {blocks}" in ptx, (name, D)
            regs = ptxas_usage(ptx)
            if regs:
                assert regs[0] * attention_cuda.NT * blocks <= 65536, (name, D, regs)
            regs = f", {regs[0]} registers, {regs[1]} bytes spilled" if regs else ""
            print(f"ptx ok {name} D={D} ({shared} bytes of shared memory{regs})")


if __name__ == "__main__":
    {"simulate": check_simulator, "ptx": check_ptx}[sys.argv[1]]()
