"""The CUDA C++ schedule kernel (kernels/schedule/fused_update.cu and its CuPy wrapper cuda_vec.py).

CI has no GPU, so the kernel is checked three ways:

1. NVRTC compiles it for sm_90, and the PTX loads and stores 128 bits at a time and uses no shared memory;
2. the same source, built for the CPU by g++ (the CUDA built-ins it uses replaced by plain C++, the grid walked block
   by block and thread by thread; contraction of multiply-adds off), run on NumPy arrays through the launch that
   cuda_vec.py would hand CuPy: its noise is kernels/philox.py's float32 noise bit for bit (the same operations in
   the same order), its updates equal the reference on Hypothesis-drawn shapes — samples straddling Philox blocks,
   sizes off the float4, unaligned arrays (scalar loads), noise given with NaN where S = 0 — and the `out=` contract
   holds, in place too;
3. on a GPU (marker ``gpu``), the real kernel on CuPy arrays equals the reference.
"""

from __future__ import annotations

import ctypes
from types import SimpleNamespace

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ptx_tools import host_build, nvrtc_build, ptxas_usage
from schedule_out import check_bad_out_is_refused, check_out_equals_fresh

from kernels import philox
from kernels.schedule import cpu, cuda_vec
from kernels.schedule import reference as ref

LINEAR = ref.Schedule.linear(1000)
COSINE = ref.Schedule.cosine(1000)
TOL = dict(rtol=2e-6, atol=2e-6)


# ---------------------------------------------------------------------------------------------------------------
# 1. Compilation for sm_90
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("unroll", [1, 2])
def test_compiles_for_sm90_with_nvrtc_to_vector_loads(unroll):
    names = [cuda_vec.kernel_name(*k) for k in cuda_vec.INSTANCES]
    ptx, _, _, lowered = nvrtc_build(cuda_vec.source(), "fused_update.cu", names, cuda_vec.options(unroll))
    assert all(lowered[name].startswith(b"_Z12fused_update") for name in names)  # CuPy finds them by these names
    assert ".target sm_90" in ptx and ptx.count(".entry") == len(names)
    assert "ld.global.v4.f32" in ptx and "st.global.v4.f32" in ptx  # 128-bit loads and stores
    assert ".shared" not in ptx and "bar.sync" not in ptx
    assert "mul.hi.u32" in ptx  # Philox's 32×32 → 64-bit products as one high-half multiply each
    usage = ptxas_usage(ptx)
    if usage is not None:  # with a ptxas: no register spills under the launch bounds (256 threads)
        assert usage[1] == 0, usage


# ---------------------------------------------------------------------------------------------------------------
# 2. The same source on the CPU
# ---------------------------------------------------------------------------------------------------------------
EMULATION = r"""
#include <cmath>
#include <cstring>
#define CUDA_HOST_EMULATION
#define __global__
#define __launch_bounds__(n)
struct float4 { float x, y, z, w; };
static inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
struct Dim { unsigned x = 1; };
static Dim threadIdx, blockIdx, blockDim, gridDim;
#include "fused_update_defined.cu"

template <bool E, bool S, bool W>
static void run(int grid, int block, const float* x, const float* e, const double* coef, const float* coefn,
                double inv_per_sample, double clip, unsigned k0, unsigned k1, const float* z, float* z_out, float* out,
                long long n, int vec) {
    gridDim.x = grid;
    blockDim.x = block;
    for (int b = 0; b < grid; ++b)
        for (int t = 0; t < block; ++t) {
            blockIdx.x = b;
            threadIdx.x = t;
            fused_update<E, S, W>(x, e, coef, coefn, inv_per_sample, clip, k0, k1, z, z_out, out, n, vec);
        }
}

extern "C" int emulate(int has_e, int seeded, int write_z, int grid, int block, const float* x, const float* e,
                       const double* coef, const float* coefn, double inv_per_sample, double clip, unsigned k0,
                       unsigned k1, const float* z, float* z_out, float* out, long long n, int vec) {
#define ARGS grid, block, x, e, coef, coefn, inv_per_sample, clip, k0, k1, z, z_out, out, n, vec
    if (!has_e && seeded && write_z) return run<false, true, true>(ARGS), 0;
    if (!has_e && !seeded && !write_z) return run<false, false, false>(ARGS), 0;
    if (has_e && seeded && !write_z) return run<true, true, false>(ARGS), 0;
    if (has_e && !seeded && !write_z) return run<true, false, false>(ARGS), 0;
    return 1;
}
"""


@pytest.fixture(scope="module", params=[1, 2], ids=["unroll1", "unroll2"])
def emulated(request, tmp_path_factory):
    """A form (q_sample, ddpm_step, ddim_step) whose per-element pass is fused_update.cu built for the CPU, taking 1
    Philox block a trip of its loop (the default) or 2 (FU_UNROLL, which bench.sweep_cuda_vec times); grid: the
    blocks of each launch (small, so that the grid-stride loop turns, and with 2 a trip leaves a remainder)."""
    d = tmp_path_factory.mktemp("fused_update_emulation")
    unroll = f"#define FU_UNROLL {request.param}\n"
    lib = host_build(d, {"fused_update_defined.cu": unroll + cuda_vec.source(), "emulate.cpp": EMULATION})
    fn = lib.emulate
    vp, i32, i64, f64, u32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong, ctypes.c_double, ctypes.c_uint
    fn.argtypes = [i32, i32, i32, i32, i32, vp, vp, vp, vp, f64, f64, u32, u32, vp, vp, vp, i64, i32]
    fn.restype = ctypes.c_int
    grid = {"blocks": 2}

    def run(x, e, coef, clip, seed, noise, want_noise, out=None):
        launch = cuda_vec.launch_args(x, e, coef, clip, seed, noise, want_noise, out, grid=grid["blocks"])
        if launch.args:
            a = launch.args
            ptrs = [v.ctypes.data if isinstance(v, np.ndarray) else v for v in a]
            assert launch.instance in cuda_vec.INSTANCES
            assert fn(*launch.instance, launch.grid, launch.block,
                      *(int(v) if isinstance(v, np.integer) else v for v in ptrs)) == 0
        return launch.out, launch.noise

    q_sample, ddpm_step, ddim_step = cpu.updates(run)
    return SimpleNamespace(q_sample=q_sample, ddpm_step=ddpm_step, ddim_step=ddim_step, grid=grid)


def test_noise_is_philox_float32_noise_bit_for_bit(emulated):
    for n in (1, 7, 4 * cuda_vec.THREADS * 3 + 5):  # a partial float4; several grid strides (2 blocks of 256)
        x = np.zeros((1, n), np.float32)
        _, eps = emulated.q_sample(x, [3], LINEAR, seed=2**40 + 9)
        np.testing.assert_array_equal(eps[0].view(np.int32), philox.normal32(2**40 + 9, np.arange(n)).view(np.int32))


def test_unaligned_arrays_take_scalar_loads(emulated):
    buf = np.random.default_rng(1).standard_normal(2 * 4 * 37 + 1).astype(np.float32)
    x = buf[1:].reshape(2, 4 * 37)  # 4 bytes past a 16-byte boundary: no float4
    assert cuda_vec.launch_args(x, None, np.zeros((2, 6)), np.inf, 1, None, True).args[-1] == 0
    for got, want in zip(emulated.q_sample(x, [10, 900], LINEAR, seed=5), ref.q_sample(x, [10, 900], LINEAR, seed=5)):
        np.testing.assert_allclose(got, want, **TOL)


@settings(max_examples=25, deadline=None)
@given(data=st.data(), shape=st.lists(st.integers(1, 9), min_size=1, max_size=4).map(tuple),
       seeded=st.booleans(), sched=st.sampled_from([LINEAR, COSINE]), blocks=st.integers(1, 3))
def test_emulated_kernel_equals_reference(emulated, data, shape, seeded, sched, blocks):
    emulated.grid["blocks"] = blocks
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    x, e, z = ((rng.standard_normal(shape) * 1.5).astype(np.float32) for _ in range(3))
    t = rng.integers(0, 1000, shape[0])
    t[rng.random(shape[0]) < 0.3] = 0  # DDPM's last step, S = 0: no draw, and the given noise is not read
    if not seeded:
        z[t == 0] = np.nan
    kw = dict(seed=int(rng.integers(0, 2**63))) if seeded else dict(noise=z)
    for got, want in zip(emulated.q_sample(x, t, sched, **kw), ref.q_sample(x, t, sched, **kw)):
        assert got.dtype == np.float32 and got.shape == shape
        np.testing.assert_allclose(got, want, **TOL)
    clip = data.draw(st.sampled_from([None, 1.0]))
    var = data.draw(st.sampled_from(["posterior", "beta"]))
    want = ref.ddpm_step(x, e, t, sched, clip_x0=clip, variance=var, **(kw if seeded else dict(noise=np.nan_to_num(z))))
    np.testing.assert_allclose(emulated.ddpm_step(x, e, t, sched, clip_x0=clip, variance=var, **kw), want, **TOL)
    t_prev = np.maximum(t - rng.integers(1, 50, shape[0]), -1)
    eta = data.draw(st.sampled_from([0.0, 0.5, 1.0]))
    kw_ddim = kw if seeded else dict(noise=np.nan_to_num(z))  # DDIM with η > 0 adds noise at t = 0 too
    np.testing.assert_allclose(emulated.ddim_step(x, e, t, t_prev, sched, eta, clip_x0=clip, **kw_ddim),
                               ref.ddim_step(x, e, t, t_prev, sched, eta, clip_x0=clip, **kw_ddim), **TOL)


def test_draws_for_a_noisy_sample_inside_a_philox_block(emulated):
    """Samples of one element: a Philox block spans four, and the noisy one may sit between two that add none."""
    rng = np.random.default_rng(3)
    x, e = (rng.standard_normal(8).astype(np.float32) for _ in range(2))
    t = np.array([0, 7, 0, 0, 0, 0, 9, 0])
    np.testing.assert_allclose(emulated.ddpm_step(x, e, t, LINEAR, seed=4), ref.ddpm_step(x, e, t, LINEAR, seed=4),
                               **TOL)


def test_emulated_out_buffers_and_in_place(emulated):
    emulated.grid["blocks"] = 2
    check_out_equals_fresh(emulated, (3, 4 * cuda_vec.THREADS + 9), np.float32)
    check_bad_out_is_refused(emulated, np.float32)


def test_float64_is_refused():
    with pytest.raises(TypeError, match="float32"):
        cuda_vec.launch_args(np.zeros((2, 3)), None, np.zeros((2, 6)), np.inf, 1, None, True)


# ---------------------------------------------------------------------------------------------------------------
# 3. On a GPU
# ---------------------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("sched", [LINEAR, COSINE], ids=["linear", "cosine"])
def test_cuda_vec_equals_reference_on_gpu(cupy, sched):
    """On a real GPU with CuPy arrays: every update, drawn and given noise, clipping, both variances; out= in place."""
    from kernels import schedule

    rng = np.random.default_rng(2)
    shape = (16, 3, 33, 31)
    x, e, z = ((rng.standard_normal(shape) * 1.5).astype(np.float32) for _ in range(3))
    t = rng.integers(0, 1000, shape[0])
    t_prev = np.maximum(t - rng.integers(1, 50, shape[0]), -1)
    xd, ed = cupy.asarray(x), cupy.asarray(e)
    for kw, dkw in ((dict(seed=7), dict(seed=7)), (dict(noise=z), dict(noise=cupy.asarray(z)))):
        for got, want in zip(schedule.q_sample(xd, t, sched, form="cuda_vec", **dkw), ref.q_sample(x, t, sched, **kw)):
            assert isinstance(got, cupy.ndarray) and got.dtype == np.float32
            np.testing.assert_allclose(cupy.asnumpy(got), want, **TOL)
        for clip in (None, 1.0):
            for var in ("posterior", "beta"):
                np.testing.assert_allclose(
                    cupy.asnumpy(schedule.ddpm_step(xd, ed, t, sched, clip_x0=clip, variance=var, form="cuda_vec",
                                                    **dkw)),
                    ref.ddpm_step(x, e, t, sched, clip_x0=clip, variance=var, **kw), **TOL)
            for eta in (0.0, 1.0):
                want = ref.ddim_step(x, e, t, t_prev, sched, eta, clip_x0=clip, **kw)
                x_in = xd.copy()
                schedule.ddim_step(x_in, ed, t, t_prev, sched, eta, clip_x0=clip, form="cuda_vec", out=x_in, **dkw)
                np.testing.assert_allclose(cupy.asnumpy(x_in), want, **TOL)
