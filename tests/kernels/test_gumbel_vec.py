"""The CUDA C++ Gumbel-softmax forward (kernels/gumbel/softmax_rows.cu and its CuPy wrapper cuda_vec.py).

CI has no GPU, so the kernel is checked three ways:

1. NVRTC compiles it for sm_90: 128-bit loads and stores, and no local memory (the rows held in registers are not
   spilled to the stack);
2. the same source, built for the CPU by g++ — each CUDA thread of a block an OS thread, __syncthreads a barrier —
   run on NumPy arrays through the launch that cuda_vec.py would hand CuPy: equal to the reference on Hypothesis
   rows (seeded and given noise, hard and soft, τ, ties in the argmax, several rows per block, another `dim`), its
   noise philox's float32 Gumbel noise;
3. on a GPU (marker ``gpu``), the real kernel on CuPy arrays equals the reference.
"""

from __future__ import annotations

import ctypes

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ptx_tools import host_build, nvrtc_build, ptxas_usage

from kernels.gumbel import cuda_vec
from kernels.gumbel import reference as ref

TOL = dict(rtol=1e-5, atol=1e-7)  # exp2 in float32 (a few ulps), the float64 sum in another order


@pytest.mark.parametrize("threads", [256, 512, 1024])
def test_compiles_for_sm90_with_nvrtc(threads):
    """The default block of 256 threads and the larger ones bench.sweep_cuda_vec times (fewer chunks per thread)."""
    names = [cuda_vec.kernel_name(s) for s in (True, False)]
    ptx, _, _, lowered = nvrtc_build(cuda_vec.source(), "softmax_rows.cu", names, cuda_vec.options(threads))
    assert all(lowered[name].startswith(b"_Z19gumbel_softmax_rows") for name in names)
    assert ptx.count(".entry") == 2 and "ld.global.v4.f32" in ptx and "st.global.v4.f32" in ptx
    assert ".local" not in ptx  # the row's registers are not arrays in local memory
    usage = ptxas_usage(ptx)
    if usage is not None:
        assert usage[1] == 0, usage  # no spills


def test_block_sizes():
    """A block is a power of 2 from 32 to 1024 threads (the reductions halve it), each holding the chunks of a row of
    MAX_ROW values; the sweep's sizes are among them."""
    from bench.sweep_cuda_vec import GUMBEL_THREADS

    for threads in GUMBEL_THREADS:
        chunks = int(cuda_vec.options(threads)[2].split("=")[1])
        assert 4 * threads * chunks == cuda_vec.MAX_ROW
    for bad in (16, 300, 2048):
        with pytest.raises(ValueError, match="power of 2 from 32 to 1024"):
            cuda_vec.options(bad)


EMULATION = r"""
#include <barrier>
#include <cmath>
#include <cstring>
#include <thread>
#include <vector>
#define CUDA_HOST_EMULATION
#define __global__
#define __launch_bounds__(n)
#define __shared__ static
struct float4 { float x, y, z, w; };
static inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
struct Dim { unsigned x = 1; };
static thread_local Dim threadIdx;
static Dim blockIdx, blockDim, gridDim;
static std::barrier<>* block_barrier;
static inline void __syncthreads() { block_barrier->arrive_and_wait(); }
#include "softmax_rows_defined.cu"

// the blocks one after another; a block's threads as OS threads, __syncthreads their barrier
template <bool SEEDED>
static void run(int grid, const float* l2, const float* g2, long long rows, int n, double scale, int hard,
                unsigned k0, unsigned k1, float* y2, float* ys2) {
    gridDim.x = grid;
    blockDim.x = GS_THREADS;
    for (int b = 0; b < grid; ++b) {
        blockIdx.x = b;
        std::barrier<> barrier(GS_THREADS);
        block_barrier = &barrier;
        std::vector<std::thread> threads;
        for (int t = 0; t < GS_THREADS; ++t)
            threads.emplace_back([=] {
                threadIdx.x = t;
                gumbel_softmax_rows<SEEDED>(l2, g2, rows, n, scale, hard, k0, k1, y2, ys2);
            });
        for (auto& th : threads) th.join();
    }
}

extern "C" void emulate(int seeded, int grid, const float* l2, const float* g2, long long rows, int n, double scale,
                        int hard, unsigned k0, unsigned k1, float* y2, float* ys2) {
    if (seeded) run<true>(grid, l2, g2, rows, n, scale, hard, k0, k1, y2, ys2);
    else run<false>(grid, l2, g2, rows, n, scale, hard, k0, k1, y2, ys2);
}
"""


@pytest.fixture(scope="module", params=[256, 512])
def emulated(tmp_path_factory, request):
    """gumbel_softmax_forward through softmax_rows.cu built for the CPU with blocks of 256 threads (the default) and
    of 512 (one the sweep times); grid: the blocks of each launch."""
    threads = request.param
    d = tmp_path_factory.mktemp(f"softmax_rows_emulation_{threads}")
    defines = [o for o in cuda_vec.options(threads) if o.startswith("-D")]
    lib = host_build(d, {"softmax_rows_defined.cu": cuda_vec.source(), "emulate.cpp": EMULATION}, std="c++20",
                     extra=("-pthread", *defines))
    fn = lib.emulate
    vp, i32, i64, f64, u32 = ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong, ctypes.c_double, ctypes.c_uint
    fn.argtypes = [i32, i32, vp, vp, i64, i32, f64, i32, u32, u32, vp, vp]
    fn.restype = None

    def forward(logits, tau=1.0, hard=False, *, seed=None, noise=None, dim=-1, grid=2):
        launch = cuda_vec.launch_args(logits, tau, hard, seed=seed, noise=noise, dim=dim, grid=grid, threads=threads)
        assert launch.block == threads
        if launch.args:
            a = launch.args
            fn(int(launch.seeded), launch.grid, a[0].ctypes.data, a[1].ctypes.data, int(a[2]), int(a[3]), float(a[4]),
               int(a[5]), int(a[6]), int(a[7]), a[8].ctypes.data, a[9].ctypes.data)
        return launch.result

    forward.threads = threads
    return forward


def test_noise_is_philox_float32_gumbel_noise(emulated):
    """With zero logits and τ = 1 the argmax and y_soft are those of the noise itself: y_soft ∝ exp(g)."""
    n = 4 * emulated.threads + 8  # some threads hold two chunks
    g = ref.gumbel_noise(7, (3, n), np.float32)
    y, y_soft = emulated(np.zeros((3, n), np.float32), seed=7, hard=True)
    np.testing.assert_allclose(y_soft, ref.gumbel_softmax_forward(np.zeros((3, n), np.float32), noise=g)[1], **TOL)
    np.testing.assert_array_equal(y.argmax(-1), g.argmax(-1))


@settings(max_examples=20, deadline=None)
@given(data=st.data(), rows=st.integers(1, 5), n=st.sampled_from([4, 8, 36, 1028]), seeded=st.booleans(),
       hard=st.booleans(), tau=st.sampled_from([0.3, 1.0, 2.5]), grid=st.integers(1, 3))
def test_emulated_kernel_equals_reference(emulated, data, rows, n, seeded, hard, tau, grid):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    logits = (rng.standard_normal((rows, n)) * 3).astype(np.float32)
    if data.draw(st.booleans()):  # ties: the first index wins
        logits = np.round(logits).astype(np.float32)
    kw = dict(seed=int(rng.integers(0, 2**63))) if seeded else dict(noise=np.zeros_like(logits))
    got = emulated(logits, tau, hard, grid=grid, **kw)
    want = ref.gumbel_softmax_forward(logits, tau, hard, **kw)
    for g, w in zip(got, want):
        assert g.dtype == np.float32 and g.shape == logits.shape
        np.testing.assert_allclose(g, w, **TOL)


def test_another_dim_draws_in_the_original_layout(emulated):
    logits = np.random.default_rng(2).standard_normal((8, 3, 5)).astype(np.float32)
    for got, want in zip(emulated(logits, 0.7, True, seed=11, dim=0), ref.gumbel_softmax_forward(logits, 0.7, True,
                                                                                                  seed=11, dim=0)):
        np.testing.assert_allclose(got, want, **TOL)


def test_hard_index_is_the_first_max_of_logits_plus_noise(emulated):
    """Logits one float32 ulp apart, in either order: the larger l + g is the sample whatever τ (as in every form)."""
    a = np.float32(1.7237803)
    b = np.nextafter(a, np.float32(2))
    logits = np.array([[a, b, 0, 0], [b, a, 0, 0]], np.float32)
    for tau in (3.0, 7.0, 0.1):
        y, _ = emulated(logits, tau, True, noise=np.zeros_like(logits))
        np.testing.assert_array_equal(y.argmax(-1), [1, 0])


def test_unsupported_rows_are_refused():
    with pytest.raises(ValueError, match="multiple of 4"):
        cuda_vec.launch_args(np.zeros((2, 6), np.float32), seed=1)
    with pytest.raises(ValueError, match="up to 8192"):
        cuda_vec.launch_args(np.zeros((1, 8196), np.float32), seed=1)
    with pytest.raises(TypeError, match="float32"):
        cuda_vec.launch_args(np.zeros((2, 8)), seed=1)
    with pytest.raises(IndexError, match="out of range"):
        cuda_vec.launch_args(np.zeros((2, 8), np.float32), seed=1, dim=2)


@pytest.mark.gpu
def test_cuda_vec_equals_reference_on_gpu(cupy):
    """On a real GPU with CuPy arrays: seeded and given noise, hard and soft, a row of 8192 (8 chunks a thread)."""
    from kernels import gumbel

    rng = np.random.default_rng(3)
    for shape in ((7, 8192), (33, 100)):
        logits = (rng.standard_normal(shape) * 2).astype(np.float32)
        noise = ref.gumbel_noise(5, shape, np.float32)
        for hard in (False, True):
            for kw, dkw in ((dict(seed=5), dict(seed=5)), (dict(noise=noise), dict(noise=cupy.asarray(noise)))):
                got = gumbel.gumbel_softmax_forward(cupy.asarray(logits), 0.5, hard, form="cuda_vec", **dkw)
                for g, w in zip(got, ref.gumbel_softmax_forward(logits, 0.5, hard, **kw)):
                    np.testing.assert_allclose(cupy.asnumpy(g), w, rtol=1e-5, atol=1e-6)
