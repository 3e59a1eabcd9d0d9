"""The tensor-core attention kernel (kernels/attention/flash_tc.cu and its CuPy wrapper cuda_tc.py).

CI has no GPU, so the kernel is checked three ways:

1. it compiles for sm_90 with NVRTC from the ``nvidia-cuda-nvrtc`` wheel (installed by the project's test extra
   through ``numba-cuda[cu13]``), and the PTX multiplies on tensor cores (``mma.sync`` m16n8k16, f16 and bf16) and
   stages tiles in ``.shared`` memory. This test fails, never skips, when the source does not compile; nvcc, when
   a toolkit is installed, is a second compiler;
2. it computes attention: the same source, built for the CPU by g++ with the CUDA built-ins it uses replaced by
   an emulation (one fiber per CUDA thread, barriers for ``__syncthreads`` and the warps, the warp shuffle, and
   ``mma.sync`` reassembling its operands from the 32 lanes' registers by the PTX ISA's fragment tables), equals
   the NumPy reference in fp16 and bf16 — every pattern, masks, causal, sizes off the tile — and the kernel's C++
   pattern rules equal ``patterns.py`` on every pair and tile of small grids;
3. on a GPU (marker ``gpu``), the real kernel launched through CuPy equals the reference.

The backward's two kernels (``flash_backward_dq``, ``flash_backward_dkdv``) are checked the same three ways: NVRTC
compiles them for sm_90, each multiplies on tensor cores and none uses an atomic instruction; the emulation equals
``reference.attention_backward`` in fp16 and bf16 over every pattern, masks, causal, sizes off both kernels'
tiles, head dimensions 32 and 128 (whose loops walk 32-row tiles), and fed the emulated forward's own out and lse,
and equals PyTorch's float64 autograd through ``F.scaled_dot_product_attention``; on a GPU, fed the GPU forward's
out and lse, within the same bounds and bit-identical when run twice.

Tolerances follow from half-precision rounding (unit roundoff u = 2⁻¹¹ for fp16, 2⁻⁸ for bf16), with the inputs
already rounded to the half type so that the reference (float64) sees exactly what the kernel sees. The kernel
rounds P = exp(S − m) to the half type before P V (the mma takes 16-bit inputs) while l sums the unrounded P, and
rounds the output: |out − ref| ≤ u · max|V| + u · |out| + O(fp32) ≤ 2u · max|V| + 1e-6. The lse is computed in
fp32 throughout: |Δlse| ≤ 1e-4 at these sizes.

The backward's bounds are elementwise, first order in the roundings, each term from a step of the kernel, and
computed from the reference's own |·| (``backward_tolerances``). The reference and the kernel get the same rounded
q, k, v, dO, the same out (Elem) and the same lse (fp32). A rounding to Elem is x(1 + δ) + η with |δ| ≤ u and
|η| ≤ η₀ (subnormals: 2⁻²⁵ for fp16; for bf16 a flushed fp32 subnormal, 2⁻¹²⁶). An fp32 sum of n terms is off by
at most n · 2⁻²³ · Σ|terms| (twice fp32's unit roundoff: a tensor core's additions may truncate). Then

- P = exp(S · scale + M − lse) in fp32 is off by a relative θ ≤ 2⁻²³ (D · scale · |Q||K|ᵀ + 4(|S| + |lse|) + 4):
  the D-term score, the scale, the mask, the subtraction and expf;
- dP − D (two D-term fp32 sums) is off by ε ≤ 2⁻²³ D (|dO||V|ᵀ + rowsum(|dO| ∘ |O|));
- so dS, rounded to Elem for the mma, is off by E = (u + θ + 2⁻²³)|dS| + P ε + η₀, and P by (u + θ) P + η₀
  (η₀ only where P > 0: a blocked pair is an exact 0 in both);
- each gradient is an fp32 sum of those, rounded once to Elem:
  |ΔdV| ≤ u |dV| + η₀ + c (((u + θ) P + η₀)ᵀ |dO| + L 2⁻²³ Pᵀ|dO|)
  |ΔdQ| ≤ u |dQ| + η₀ + c · scale (E |K| + S 2⁻²³ |dS||K|),  |ΔdK| ≤ u |dK| + η₀ + c · scale (Eᵀ |Q| + L 2⁻²³ |dS|ᵀ|Q|)
  with c = (1 + u)² for the products of first-order terms.
The dominant term is u |dS||K| · scale (dS's rounding to Elem): |dS||K| exceeds |dS K| by about √S where the
terms cancel, so the bound is not u |dQ|. The checks also require the median bound to stay under 5% of the
gradient's rms (a wrong term would show), and the emulated errors reach 30-85% of their bounds.
"""

from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from ptx_tools import nvrtc_build

from kernels.attention import cuda_tc, reference
from kernels.attention.patterns import Causal, Column, Conv, PrefixLM, Row

ROUNDOFF = {"float16": 2.0**-11, "bfloat16": 2.0**-8}


# ---------------------------------------------------------------------------------------------------------------
# 1. Compilation for sm_90


def nvrtc_compile(names, arch="compute_90", extra=()):
    """Compile flash_tc.cu with NVRTC (the pip wheel) for the kernels ``names``: (ptx, cubin or None, log)."""
    ptx, cubin, log, lowered = nvrtc_build(cuda_tc.source(), "flash_tc.cu", names, cuda_tc.compile_options(), arch,
                                           extra)
    for name in names:
        base = name.split("<")[0].encode()
        assert lowered[name].startswith(b"_Z%d%s" % (len(base), base)), lowered[name]
    return ptx, cubin, log


def assert_tensor_core_ptx(ptx, elements):
    assert ".target sm_90" in ptx
    for element in elements:
        ptx_type = {"float16": "f16", "bfloat16": "bf16"}[element]
        assert f"mma.sync.aligned.m16n8k16.row.col.f32.{ptx_type}.{ptx_type}.f32" in ptx, element
    assert ".shared" in ptx and "ld.shared" in ptx and "st.shared" in ptx
    assert "bar.sync" in ptx  # __syncthreads between the shared tiles' writes and reads
    assert "shfl.sync.bfly" in ptx  # the row max and sum over the 4 lanes of a group


def test_compiles_to_tensor_core_ptx_for_sm90_with_nvrtc():
    names = [cuda_tc.kernel_name(e, 64) for e in cuda_tc.ELEMENTS]
    ptx, _, _ = nvrtc_compile(names)
    assert_tensor_core_ptx(ptx, cuda_tc.ELEMENTS)
    assert ptx.count(".entry") == len(names)


def test_backward_compiles_to_tensor_core_ptx_for_sm90_with_nvrtc():
    """flash_backward_dq and flash_backward_dkdv: tensor cores, shared tiles, and no atomics (deterministic)."""
    names = [cuda_tc.kernel_name(e, 64, kern) for e in cuda_tc.ELEMENTS for kern in cuda_tc.KERNELS[1:]]
    ptx, _, _ = nvrtc_compile(names)
    assert_tensor_core_ptx(ptx, cuda_tc.ELEMENTS)  # shfl.sync.bfly: D = rowsum(dO ∘ O) over a group's 4 lanes
    assert ptx.count(".entry") == len(names)
    # no atomic instruction: every output element is written by one thread, once
    assert not re.search(r"^\s*(@!?%p\d+\s+)?(atom|red)\.", ptx, re.MULTILINE)
    entries = ptx.split(".entry")[1:]  # each kernel's body (the device functions are inlined into it)
    assert len(entries) == len(names)
    for body in entries:  # every kernel multiplies on tensor cores, not just one of them
        ptx_type = "bf16" if "bfloat16" in body.split("(")[0] else "f16"
        assert f"mma.sync.aligned.m16n8k16.row.col.f32.{ptx_type}.{ptx_type}.f32" in body, body.split("(")[0]


@pytest.mark.slow
def test_every_instantiation_assembles_for_sm90_without_spills():
    """All (kernel, element, head dim) through ptxas for sm_90 (a minute on 2 cores): no register spills."""
    names = [cuda_tc.kernel_name(e, d, kern) for e in cuda_tc.ELEMENTS for d in cuda_tc.HEAD_DIMS
             for kern in cuda_tc.KERNELS]  # fmt: skip
    ptx, cubin, log = nvrtc_compile(names, arch="sm_90", extra=("-Xptxas=-v",))
    assert_tensor_core_ptx(ptx, cuda_tc.ELEMENTS)
    assert cubin and cubin[:4] == b"\x7fELF"
    assert log.count("0 bytes spill stores, 0 bytes spill loads") == len(names), log


@pytest.mark.slow
def test_compiles_with_nvcc(tmp_path):
    """The second compiler, where a CUDA toolkit is installed (the NVRTC test above is the one CI requires)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("no CUDA toolkit (nvcc)")
    unit = tmp_path / "one.cu"
    unit.write_text(f'#include "{cuda_tc.SOURCE}"\nFLASH_TC_INSTANTIATE(__half, 64)\n')
    proc = subprocess.run(
        [nvcc, "-std=c++17", "-arch=sm_90", "-ptx", str(unit), "-o", str(tmp_path / "one.ptx")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    ptx = (tmp_path / "one.ptx").read_text()
    assert "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32" in ptx and ".shared" in ptx


def test_prepare_checks_its_arguments():
    f16 = np.zeros((1, 2, 8, 64), np.float16)
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        cuda_tc.prepare(f16.astype(np.float32), f16.astype(np.float32), f16.astype(np.float32))
    with pytest.raises(ValueError, match="head dimension"):
        cuda_tc.prepare(f16[..., :48], f16[..., :48], f16[..., :48])
    with pytest.raises(ValueError, match="head dimension"):
        cuda_tc.prepare(f16, f16, f16[..., :32])
    with pytest.raises(ValueError, match="broadcast"):
        cuda_tc.prepare(f16, f16, f16, mask=np.ones((3, 8), bool))
    with pytest.raises(TypeError, match="CuPy"):
        cuda_tc.attention_forward(f16, f16, f16)


def test_prepare_backward_checks_its_arguments():
    f16 = np.zeros((1, 2, 8, 64), np.float16)
    lse = np.zeros((1, 2, 8), np.float32)
    with pytest.raises(ValueError, match="dout must have q's shape"):
        cuda_tc.prepare_backward(f16, f16, f16, f16, lse, f16[:, :1])
    with pytest.raises(ValueError, match="out must have q's shape"):
        cuda_tc.prepare_backward(f16, f16, f16, f16.astype(np.float32), lse, f16)
    with pytest.raises(ValueError, match="lse must have shape"):
        cuda_tc.prepare_backward(f16, f16, f16, f16, lse[..., :4], f16)
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        f32 = f16.astype(np.float32)
        cuda_tc.prepare_backward(f32, f32, f32, f32, lse, f32)
    with pytest.raises(TypeError, match="CuPy"):
        cuda_tc.attention_backward(f16, f16, f16, f16, lse, f16)
    launch = cuda_tc.prepare_backward(f16, f16[:, :, :5], f16[:, :, :5], f16, lse, f16, causal=True)
    assert launch.dq.shape == (2, 8, 64) and launch.dk.shape == launch.dv.shape == (2, 5, 64)
    assert launch.dq_grid == (1, 2) and launch.dkdv_grid == (1, 2) and launch.delta.dtype == np.float32


# ---------------------------------------------------------------------------------------------------------------
# 2. The kernel's arithmetic, emulated on the CPU

EMULATION = r"""
// CPU stand-ins for the CUDA built-ins flash_tc.cu uses. Blocks run one after another, so __shared__ arrays can be
// plain statics. The threads of a block are fibers (ucontext) on one OS thread: a fiber runs until it reaches a
// barrier, and the scheduler resumes it once every thread of the barrier (the block, or its warp) has arrived.
// The schedule is deterministic and lets one warp run far ahead of the others, so a missing __syncthreads shows as
// a wrong result, and a barrier that not every thread reaches shows as a deadlock (reported, not hung).
#include <ucontext.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <type_traits>
#include <vector>

#define FLASH_TC_HOST_EMULATION
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict
#define __shared__ static
#define __align__(n) __attribute__((aligned(n)))
using std::max;
using std::min;

struct Dim3 { unsigned x = 0, y = 0, z = 0; };
static Dim3 threadIdx, blockIdx;  // threadIdx.x is set by the scheduler before it resumes a fiber

struct uint4 { unsigned x, y, z, w; };
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return {x, y, z, w}; }
inline float __int_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }

// fp16 through the compiler's _Float16 (IEEE binary16, round to nearest even); bf16 by rounding the fp32 bits.
struct __half { unsigned short x; };
struct __nv_bfloat16 { unsigned short x; };
inline float __half2float(__half h) { _Float16 f; std::memcpy(&f, &h.x, 2); return float(f); }
inline __half __float2half_rn(float x) { _Float16 f = (_Float16)x; __half h; std::memcpy(&h.x, &f, 2); return h; }
inline unsigned short __half_as_ushort(__half h) { return h.x; }
inline float __bfloat162float(__nv_bfloat16 b) {
    unsigned u = unsigned(b.x) << 16;
    float f;
    std::memcpy(&f, &u, 4);
    return f;
}
inline __nv_bfloat16 __float2bfloat16_rn(float x) {
    unsigned u; std::memcpy(&u, &x, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return {(unsigned short)((u >> 16) | 0x40)};  // NaN stays NaN
    u += 0x7fffu + ((u >> 16) & 1u);
    return {(unsigned short)(u >> 16)};
}
inline unsigned short __bfloat16_as_ushort(__nv_bfloat16 b) { return b.x; }

constexpr int EMU_WARPS = 4;
enum Wait { RUNNING, BLOCK_BARRIER, WARP_BARRIER, DONE };
struct Fiber {
    ucontext_t context;
    std::vector<char> stack = std::vector<char>(1 << 17);
    Wait wait = RUNNING;
    unsigned generation = 0;  // the barrier generation it waits for
    int parity = 0;           // which of the double-buffered exchange slots it uses next (see below)
};
static std::vector<Fiber> fibers(32 * EMU_WARPS);
static ucontext_t scheduler;
static unsigned block_arrived, block_generation, warp_arrived[EMU_WARPS], warp_generation[EMU_WARPS];
static std::function<void()> block_body;

static void arrive(unsigned& arrived, unsigned& generation, unsigned count, Wait wait) {
    Fiber& self = fibers[threadIdx.x];
    self.wait = wait;
    self.generation = generation + 1;
    if (++arrived == count) arrived = 0, ++generation;
    swapcontext(&self.context, &scheduler);
}
inline void __syncthreads() { arrive(block_arrived, block_generation, 32 * EMU_WARPS, BLOCK_BARRIER); }
inline void __syncwarp() {
    const int w = threadIdx.x / 32;
    arrive(warp_arrived[w], warp_generation[w], 32, WARP_BARRIER);
}

static void fiber_main() {
    block_body();
    fibers[threadIdx.x].wait = DONE;  // returns to the scheduler through uc_link
}

// Runs block_body in every thread of one block; false on a deadlock (a barrier some threads never reach).
static bool run_block() {
    block_arrived = block_generation = 0;
    std::fill(warp_arrived, warp_arrived + EMU_WARPS, 0u);
    std::fill(warp_generation, warp_generation + EMU_WARPS, 0u);
    for (auto& f : fibers) {
        getcontext(&f.context);
        f.context.uc_stack.ss_sp = f.stack.data();
        f.context.uc_stack.ss_size = f.stack.size();
        f.context.uc_link = &scheduler;
        makecontext(&f.context, fiber_main, 0);
        f.wait = RUNNING;
        f.parity = 0;
    }
    for (;;) {
        bool progress = false, all_done = true;
        for (unsigned t = 0; t < fibers.size(); ++t) {
            Fiber& f = fibers[t];
            if (f.wait == DONE) continue;
            all_done = false;
            if (f.wait == BLOCK_BARRIER && block_generation < f.generation) continue;
            if (f.wait == WARP_BARRIER && warp_generation[t / 32] < f.generation) continue;
            f.wait = RUNNING;
            threadIdx.x = t;
            swapcontext(&scheduler, &f.context);
            progress = true;
        }
        if (all_done) return true;
        if (!progress) return false;
    }
}

// Warp exchanges go through per-warp slots, double-buffered: a lane writes the other buffer next time, and cannot
// come back to this one before every lane has passed the next barrier, i.e. has finished reading this one.
static float shfl_slot[2][EMU_WARPS][32];
inline float __shfl_xor_sync(unsigned, float value, int lane_mask) {
    const int w = threadIdx.x / 32, lane = threadIdx.x % 32, p = fibers[threadIdx.x].parity ^= 1;
    shfl_slot[p][w][lane] = value;
    __syncwarp();
    return shfl_slot[p][w][lane ^ lane_mask];
}

// mma.sync.aligned.m16n8k16.row.col.f32.{f16,bf16}: every lane posts its registers, then rebuilds A (16×16) and
// B (16×8) with the PTX ISA's tables (section "Matrix Fragments for mma.m16n8k16 with floating point type"):
//   groupID = lane >> 2, threadID_in_group = lane % 4;
//   A: a_i row = groupID for i in {0,1,4,5}, else groupID + 8; col = threadID_in_group * 2 + (i & 1) (+ 8 if i >= 4)
//   B: b_i row = threadID_in_group * 2 + (i & 1) (+ 8 if i >= 2); col = groupID
//   C: c_i row = groupID for i < 2, else groupID + 8; col = threadID_in_group * 2 + (i & 1)
// element i of a register pair list sits in register i / 2, low half first.
static unsigned a_slot[2][EMU_WARPS][32][4], b_slot[2][EMU_WARPS][32][2];

template <typename Elem> inline float half_bits_to_float(unsigned short bits);
template <> inline float half_bits_to_float<__half>(unsigned short bits) { return __half2float({bits}); }
template <> inline float half_bits_to_float<__nv_bfloat16>(unsigned short bits) { return __bfloat162float({bits}); }

template <typename Elem>
inline float element(const unsigned* regs, int i) {
    return half_bits_to_float<Elem>((unsigned short)(regs[i / 2] >> (16 * (i % 2))));
}

template <typename Elem>
void mma_16x8x16(float (&c)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
    const int w = threadIdx.x / 32, lane = threadIdx.x % 32, p = fibers[threadIdx.x].parity ^= 1;
    std::memcpy(a_slot[p][w][lane], a, sizeof a);
    std::memcpy(b_slot[p][w][lane], b, sizeof b);
    __syncwarp();
    float A[16][16], B[16][8];
    for (int l = 0; l < 32; ++l) {
        const int group = l >> 2, tig = l % 4;
        for (int i = 0; i < 8; ++i) {
            const int row = (i < 2 || (i >= 4 && i < 6)) ? group : group + 8;
            const int col = tig * 2 + (i & 1) + (i >= 4 ? 8 : 0);
            A[row][col] = element<Elem>(a_slot[p][w][l], i);
        }
        for (int i = 0; i < 4; ++i) B[tig * 2 + (i & 1) + (i >= 2 ? 8 : 0)][group] = element<Elem>(b_slot[p][w][l], i);
    }
    const int group = lane >> 2, tig = lane % 4;
    for (int i = 0; i < 4; ++i) {
        const int row = i < 2 ? group : group + 8, col = tig * 2 + (i & 1);
        float acc = 0.0f;
        for (int kk = 0; kk < 16; ++kk) acc += A[row][kk] * B[kk][col];
        c[i] += acc;
    }
}

#include "flash_tc.cu"

// block_body over a grid_x × grid_y grid, one block after the other (false: a block deadlocked).
static bool run_grid(int grid_x, int grid_y) {
    for (int by = 0; by < grid_y; ++by)
        for (int bx = 0; bx < grid_x; ++bx) {
            blockIdx.x = bx;
            blockIdx.y = by;
            if (!run_block()) return false;
        }
    return true;
}

template <typename Elem, int D>
bool run_blocks(int grid_x, int grid_y, const void* q, const void* k, const void* v, void* out, float* lse, int L,
                int S, int H, float scale, const float* mask, long long msb, long long msh, long long msi,
                long long msj, int has_mask, int kind, int T, int W, int r, int P, int causal) {
    block_body = [=] {
        flash_forward<Elem, D>((const Elem*)q, (const Elem*)k, (const Elem*)v, (Elem*)out, lse, L, S, H, scale, mask,
                               msb, msh, msi, msj, has_mask, kind, T, W, r, P, causal);
    };
    return run_grid(grid_x, grid_y);
}

template <typename Elem, int D>
int launch(int grid_x, int grid_y, const void* q, const void* k, const void* v, void* out, float* lse, int L,
           int S, int H, float scale, const float* mask, long long msb, long long msh, long long msi, long long msj,
           int has_mask, int kind, int T, int W, int r, int P, int causal) {
    // First one block on a full tile of NaN inputs: it leaves NaN in every shared-memory entry (as uninitialized
    // shared memory on a GPU may hold), so a kernel that read tile entries it did not write would return NaN.
    const unsigned short nan_bits = std::is_same<Elem, __half>::value ? 0x7e00 : 0x7fc0;
    std::vector<Elem> nan(BK * D, Elem{nan_bits}), nan_out(BK * D);
    std::vector<float> nan_lse(BK);
    const bool ok = run_blocks<Elem, D>(1, 1, nan.data(), nan.data(), nan.data(), nan_out.data(), nan_lse.data(), BK,
                                        BK, 1, 1.0f, mask, 0, 0, 0, 0, 0, NONE, 0, 1, 0, 0, 0) &&
                    run_blocks<Elem, D>(grid_x, grid_y, q, k, v, out, lse, L, S, H, scale, mask, msb, msh, msi, msj,
                                        has_mask, kind, T, W, r, P, causal);
    return ok ? 0 : 2;  // 2: deadlock
}

// The pattern rules of the kernel, over a whole grid, for comparison with kernels/attention/patterns.py.
extern "C" void pattern_grid(int kind, int T, int W, int r, int P, int causal, int n, int bq, int bk,
                             unsigned char* visible_out, unsigned char* tile_out, unsigned char* all_out) {
    const Pattern pat = {kind, T, W, r, P, causal != 0};
    for (int q = 0; q < n; ++q)
        for (int k = 0; k < n; ++k) visible_out[q * n + k] = visible(pat, q, k);
    const int nq = (n + bq - 1) / bq, nk = (n + bk - 1) / bk;
    for (int i = 0; i < nq; ++i)
        for (int j = 0; j < nk; ++j) {
            const int q0 = i * bq, q1 = min(q0 + bq, n), k0 = j * bk, k1 = min(k0 + bk, n);
            tile_out[i * nk + j] = tile_may_attend(pat, q0, q1, k0, k1);
            all_out[i * nk + j] = tile_all_visible(pat, q0, q1, k0, k1);
        }
}

#define EMU_CASE(E, ELEM, DIM) \
    if (element == E && D == DIM) return launch<ELEM, DIM>(gx, gy, q, k, v, out, lse, L, S, H, scale, mask, msb, \
                                                          msh, msi, msj, has_mask, kind, T, W, r, P, causal);

extern "C" int emulate(int element, int D, int gx, int gy, const void* q, const void* k, const void* v, void* out,
                       float* lse, int L, int S, int H, float scale, const float* mask, long long msb,
                       long long msh, long long msi, long long msj, int has_mask, int kind, int T, int W, int r,
                       int P, int causal) {
    static_assert(THREADS == 32 * EMU_WARPS, "one fiber per thread");
    EMU_CASE(0, __half, 32) EMU_CASE(0, __half, 64) EMU_CASE(0, __half, 128)
    EMU_CASE(1, __nv_bfloat16, 32) EMU_CASE(1, __nv_bfloat16, 64) EMU_CASE(1, __nv_bfloat16, 128)
    return 1;
}

// The backward: flash_backward_dq over its grid, then flash_backward_dkdv over its own (it reads dq's delta).

template <typename Elem, int D>
bool run_backward(int gq, int gk, int gy, const Elem* q, const Elem* k, const Elem* v, const Elem* out,
                  const Elem* dout, const float* lse, float* delta, Elem* dq, Elem* dk, Elem* dv, int L, int S, int H,
                  float scale, const float* mask, long long msb, long long msh, long long msi, long long msj,
                  int has_mask, int kind, int T, int W, int r, int P, int causal) {
    block_body = [=] {
        flash_backward_dq<Elem, D>(q, k, v, out, dout, lse, delta, dq, L, S, H, scale, mask, msb, msh, msi, msj,
                                   has_mask, kind, T, W, r, P, causal);
    };
    if (!run_grid(gq, gy)) return false;
    block_body = [=] {
        flash_backward_dkdv<Elem, D>(q, k, v, dout, lse, delta, dk, dv, L, S, H, scale, mask, msb, msh, msi, msj,
                                     has_mask, kind, T, W, r, P, causal);
    };
    return run_grid(gk, gy);
}

template <typename Elem, int D>
int launch_backward(int gq, int gk, int gy, const void* q, const void* k, const void* v, const void* out,
                    const void* dout, const float* lse, float* delta, void* dq, void* dk, void* dv, int L, int S,
                    int H, float scale, const float* mask, long long msb, long long msh, long long msi,
                    long long msj, int has_mask, int kind, int T, int W, int r, int P, int causal) {
    // As in the forward: first one block of each kernel on NaN inputs, leaving NaN in all their shared memory.
    const unsigned short nan_bits = std::is_same<Elem, __half>::value ? 0x7e00 : 0x7fc0;
    std::vector<Elem> nan(BK * D, Elem{nan_bits}), nan_grad(3 * BK * D);
    std::vector<float> nan_f(BK, std::nanf("")), nan_delta(BK);
    Elem* g = nan_grad.data();
    const bool ok =
        run_backward<Elem, D>(1, 1, 1, nan.data(), nan.data(), nan.data(), nan.data(), nan.data(), nan_f.data(),
                              nan_delta.data(), g, g + BK * D, g + 2 * BK * D, BK, BK, 1, 1.0f, mask, 0, 0, 0, 0, 0,
                              NONE, 0, 1, 0, 0, 0) &&
        run_backward<Elem, D>(gq, gk, gy, (const Elem*)q, (const Elem*)k, (const Elem*)v, (const Elem*)out,
                              (const Elem*)dout, lse, delta, (Elem*)dq, (Elem*)dk, (Elem*)dv, L, S, H, scale, mask,
                              msb, msh, msi, msj, has_mask, kind, T, W, r, P, causal);
    return ok ? 0 : 2;
}

#define EMU_BACKWARD_CASE(E, ELEM, DIM) \
    if (element == E && D == DIM) return launch_backward<ELEM, DIM>(gq, gk, gy, q, k, v, out, dout, lse, delta, dq, \
                                                                   dk, dv, L, S, H, scale, mask, msb, msh, msi, msj, \
                                                                   has_mask, kind, T, W, r, P, causal);

extern "C" int emulate_backward(int element, int D, int gq, int gk, int gy, const void* q, const void* k,
                                const void* v, const void* out, const void* dout, const float* lse, float* delta,
                                void* dq, void* dk, void* dv, int L, int S, int H, float scale, const float* mask,
                                long long msb, long long msh, long long msi, long long msj, int has_mask, int kind,
                                int T, int W, int r, int P, int causal) {
    EMU_BACKWARD_CASE(0, __half, 32) EMU_BACKWARD_CASE(0, __half, 64) EMU_BACKWARD_CASE(0, __half, 128)
    EMU_BACKWARD_CASE(1, __nv_bfloat16, 32) EMU_BACKWARD_CASE(1, __nv_bfloat16, 64)
    EMU_BACKWARD_CASE(1, __nv_bfloat16, 128)
    return 1;
}
"""


@pytest.fixture(scope="module")
def emulator(tmp_path_factory):
    """flash_tc.cu built for the CPU with the emulation above, as a ctypes function taking a ``Launch``."""
    cxx = shutil.which(os.environ.get("CXX", "g++")) or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler to build the CPU emulation of the kernel")
    d = tmp_path_factory.mktemp("flash_tc_emulation")
    (d / "emulate.cpp").write_text(EMULATION)
    lib = d / "libflash_tc_emulation.so"
    cmd = [cxx, "-std=c++20", "-O1", "-fPIC", "-shared", "-fno-strict-aliasing",
           f"-I{cuda_tc.SOURCE.parent}", str(d / "emulate.cpp"), "-o", str(lib)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"the CPU emulation of flash_tc.cu does not build:\n{proc.stderr}"
    fn = ctypes.CDLL(str(lib)).emulate
    fn.restype = ctypes.c_int
    vp, i32, i64 = ctypes.c_void_p, ctypes.c_int, ctypes.c_longlong
    fn.argtypes = [i32, i32, i32, i32, vp, vp, vp, vp, vp, i32, i32, i32, ctypes.c_float, vp, i64, i64, i64, i64,
                   i32, i32, i32, i32, i32, i32, i32]  # fmt: skip

    def run(launch):
        a = launch.args
        ptr = [x.ctypes.data for x in a[:5]]
        status = fn(list(cuda_tc.ELEMENTS).index(launch.element), launch.head_dim, *launch.grid, *ptr,
                    *(int(x) for x in a[5:8]), float(a[8]), a[9].ctypes.data, *(int(x) for x in a[10:]))  # fmt: skip
        assert status != 2, "deadlock: a barrier that not every thread of the block reaches"
        assert status == 0, "no such instantiation"
        return launch.results()

    run.pattern_grid = ctypes.CDLL(str(lib)).pattern_grid
    bwd = ctypes.CDLL(str(lib)).emulate_backward
    bwd.restype = ctypes.c_int
    bwd.argtypes = [i32] * 5 + [vp] * 10 + [i32, i32, i32, ctypes.c_float, vp, i64, i64, i64, i64] + [i32] * 7

    def run_backward(launch):
        a = launch.dq_args  # q, k, v, out, dout, lse, delta, dq, L, S, H, scale, mask, strides, flags
        ptr = [x.ctypes.data for x in (*a[:7], launch.dq, launch.dk, launch.dv)]
        status = bwd(list(cuda_tc.ELEMENTS).index(launch.element), launch.head_dim, launch.dq_grid[0],
                     launch.dkdv_grid[0], launch.dq_grid[1], *ptr, *(int(x) for x in a[8:11]), float(a[11]),
                     a[12].ctypes.data, *(int(x) for x in a[13:]))  # fmt: skip
        assert status != 2, "deadlock: a barrier that not every thread of the block reaches"
        assert status == 0, "no such instantiation"
        return launch.results()

    run.backward = run_backward
    return run


def to_half(x, element):
    """x rounded to the half type: (the values as float64, the array the kernel takes)."""
    if element == "float16":
        h = x.astype(np.float16)
        return h.astype(np.float64), h
    bits = x.astype(np.float32).view(np.uint32)
    bits = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16).astype(np.uint16)  # round to nearest even
    return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64), bits


def from_half(a, element):
    if element == "float16":
        return a.astype(np.float64)
    return (a.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def check_against_reference(run, shape_q, S, element="float16", D=64, seed=0, **kw):
    rng = np.random.default_rng(seed)
    lead, L = shape_q[:-1], shape_q[-1]
    q64, qh = to_half(rng.standard_normal(lead + (L, D)), element)
    k64, kh = to_half(rng.standard_normal(lead + (S, D)), element)
    v64, vh = to_half(rng.standard_normal(lead + (S, D)), element)
    scale = kw.pop("scale", 1.0 / np.sqrt(D))
    out, lse = run(cuda_tc.prepare(qh, kh, vh, scale=scale, element=element, **kw))
    out_r, lse_r = reference.attention_forward(q64, k64, v64, scale=scale, **kw)
    u = ROUNDOFF[element]
    np.testing.assert_allclose(from_half(out, element), out_r, rtol=0, atol=2 * u * np.abs(v64).max() + 1e-6)
    assert lse.dtype == np.float32
    np.testing.assert_array_equal(np.isneginf(lse), np.isneginf(lse_r))  # fully masked rows, exactly
    finite = np.isfinite(lse_r)
    np.testing.assert_allclose(lse[finite], lse_r[finite], rtol=0, atol=1e-4)
    return out, lse


PATTERNS = [
    Causal(),
    Row(text_len=5, width=7),
    Column(text_len=5, width=7),
    Conv(text_len=5, width=7, kernel=3),
    Conv(text_len=0, width=9, kernel=5),
    PrefixLM(prefix_len=40),
    PrefixLM(prefix_len=100),  # a bidirectional prefix longer than a tile: key tiles above the diagonal
]


@pytest.mark.parametrize("pattern", [None, *PATTERNS, Row(0, 1), Column(3, 1), Conv(2, 4, 3), Conv(7, 5, 5)], ids=repr)
@pytest.mark.parametrize("causal", [False, True])
def test_kernel_pattern_rules_equal_patterns_module(emulator, pattern, causal):
    """flash_tc.cu's visible / tile_may_attend / tile_all_visible (C++) are patterns.py's, on every pair and every
    tile of a grid."""
    from kernels.attention import patterns

    params, extra = patterns.resolve(pattern, causal)
    n = 41
    q, k = np.arange(n)[:, None], np.arange(n)[None, :]
    expected = np.ones((n, n), bool) if pattern is None else pattern.mask(n)
    expected &= (k <= q) | (not causal)
    for bq, bk in [(1, 1), (4, 6), (7, 3), (16, 16)]:
        nq, nk = -(-n // bq), -(-n // bk)
        vis, tiles, full = np.zeros((n, n), np.uint8), np.zeros((nq, nk), np.uint8), np.zeros((nq, nk), np.uint8)
        emulator.pattern_grid(*(ctypes.c_int(x) for x in (*params, extra, n, bq, bk)),
                              *(a.ctypes.data_as(ctypes.c_void_p) for a in (vis, tiles, full)))  # fmt: skip
        np.testing.assert_array_equal(vis.astype(bool), expected)
        for i in range(nq):
            for j in range(nk):
                q0, q1, k0, k1 = i * bq, min(i * bq + bq, n), j * bk, min(j * bk + bk, n)
                want = patterns.tile_may_attend(*params, q0, q1, k0, k1) and not (extra and k0 > q1 - 1)
                assert bool(tiles[i, j]) == want, (q0, q1, k0, k1)
                if not want:  # a skipped tile really has no visible pair
                    assert not expected[q0:q1, k0:k1].any()
                want_all = patterns.tile_all_visible(*params, q0, q1, k0, k1) and not (extra and k1 - 1 > q0)
                assert bool(full[i, j]) == want_all, (q0, q1, k0, k1)
                if want_all:  # a tile computed without the per-element test really is all visible
                    assert expected[q0:q1, k0:k1].all()


@pytest.mark.parametrize("element", ["float16", "bfloat16"])
def test_emulated_kernel_equals_reference_dense(emulator, element):
    check_against_reference(emulator, (2, 1, 70), 100, element=element)


@pytest.mark.parametrize("pattern", PATTERNS, ids=repr)
def test_emulated_kernel_equals_reference_patterns(emulator, pattern):
    # L = S = 135 = 2 full tiles and a partial one: skipped, partial and full tiles for every pattern
    check_against_reference(emulator, (1, 135), 135, pattern=pattern)


def test_emulated_kernel_causal_rectangular_and_masks(emulator):
    rng = np.random.default_rng(1)
    check_against_reference(emulator, (1, 2, 80), 150, causal=True)  # top-left aligned, L < S
    check_against_reference(emulator, (1, 1, 150), 20, causal=True)  # L > S
    # Row's tile rule at its edge: queries [128, 140) against keys [64, 122) reach q − k = 7 = W exactly
    check_against_reference(emulator, (1, 140), 122, pattern=Row(text_len=5, width=7))
    mask = rng.random((80, 90)) < 0.5
    mask[3] = False  # a fully masked row: out 0, lse −inf
    check_against_reference(emulator, (2, 2, 80), 90, mask=mask)
    additive = rng.standard_normal((2, 1, 1, 90)) * 3  # broadcast over heads and queries
    check_against_reference(emulator, (2, 2, 80), 90, mask=additive, pattern=Row(text_len=10, width=8))
    out, lse = check_against_reference(emulator, (1, 1, 20), 20, mask=np.zeros((20, 20), bool))
    assert not out.any() and np.isneginf(lse).all()


@pytest.mark.parametrize("D", [32, 128])
def test_emulated_kernel_other_head_dims(emulator, D):
    check_against_reference(emulator, (1, 1, 70), 70, D=D, causal=True, element="bfloat16")


# Shapes, patterns and elements the emulated forward and backward are checked on.
DRAWN = dict(L=st.integers(1, 140), S=st.integers(1, 140), heads=st.integers(1, 2),
             pattern=st.sampled_from([None, *PATTERNS]), causal=st.booleans(),
             element=st.sampled_from(["float16", "bfloat16"]), seed=st.integers(0, 2**16))


@settings(max_examples=8, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(**DRAWN)
def test_emulated_kernel_equals_reference_drawn_shapes(emulator, L, S, heads, pattern, causal, element, seed):
    check_against_reference(emulator, (1, heads, L), S, element=element, seed=seed, pattern=pattern, causal=causal)


# The backward, emulated. The gradients' bounds are derived in the module docstring.

FP32_ADD = 2.0**-23  # twice fp32's unit roundoff per addition: the tensor cores' fp32 additions may truncate
# the absolute part η of a rounding: half the spacing of fp16's subnormals; bf16 has fp32's exponent range, and a
# GPU may flush fp32 subnormals to zero (-ftz), an error below 2⁻¹²⁶
SUBNORMAL = {"float16": 2.0**-25, "bfloat16": 2.0**-126}


def backward_tolerances(q, k, v, out, lse, dout, *, element, scale, out_rounded=False, **kw):
    """Elementwise bounds on |kernel − reference| for (dq, dk, dv), from the reference's own magnitudes.

    ``out_rounded``: the reference's D uses the exact out while the kernel's uses out rounded to Elem (PyTorch's
    autograd), which moves D by up to u · rowsum(|dO| ∘ |O|).
    """
    u, eta = ROUNDOFF[element], SUBNORMAL[element]  # rounding to Elem: x (1 + δ) + η, |δ| ≤ u, |η| ≤ eta
    D, L, S = q.shape[-1], q.shape[-2], k.shape[-2]
    tr = lambda a: np.swapaxes(a, -1, -2)  # noqa: E731
    s = reference.scores(q, k, scale=scale, **kw)
    with np.errstate(invalid="ignore"):
        p = np.where(np.isneginf(lse[..., None]), 0.0, np.exp(s - lse[..., None]))
    dp = dout @ tr(v)
    ds = p * (dp - np.sum(dout * out, axis=-1, keepdims=True))
    # relative error of the kernel's fp32 P: the D-term score, then x = s · scale + mask, x − lse and expf
    finite = np.where(np.isfinite(s), np.abs(s), 0.0) + np.where(np.isfinite(lse), np.abs(lse), 0.0)[..., None]
    theta = FP32_ADD * (D * scale * (np.abs(q) @ tr(np.abs(k))) + 4 * finite + 4)
    # absolute error of the fp32 dP − D: two D-term sums
    eps = FP32_ADD * D * (np.abs(dout) @ tr(np.abs(v)) + np.sum(np.abs(dout * out), axis=-1, keepdims=True))
    if out_rounded:
        eps = eps + u * np.sum(np.abs(dout * out), axis=-1, keepdims=True)
    seen = eta * (p > 0)  # a blocked pair has P = dS = 0 exactly
    e_ds = (u + theta + FP32_ADD) * np.abs(ds) + p * eps + seen  # dS as the mma reads it: fp32, rounded to Elem
    e_p = (u + theta) * p + seen  # P as the mma reads it
    second = (1 + u) ** 2  # the products of first-order terms
    dq = scale * (e_ds @ np.abs(k) + FP32_ADD * S * (np.abs(ds) @ np.abs(k)))
    dk = scale * (tr(e_ds) @ np.abs(q) + FP32_ADD * L * (tr(np.abs(ds)) @ np.abs(q)))
    dv = tr(e_p) @ np.abs(dout) + FP32_ADD * L * (tr(p) @ np.abs(dout))
    rounded = (np.abs(ds @ k) * scale, np.abs(tr(ds) @ q) * scale, np.abs(tr(p) @ dout))  # the output's rounding
    return tuple(u * r + eta + second * t for r, t in zip(rounded, (dq, dk, dv)))


def check_backward(run, shape_q, S, element="float16", D=64, seed=0, forward=False, sharp=True, **kw):
    """The emulated backward against reference.attention_backward on the same (rounded) q, k, v, out, lse, dout.

    out and lse are the reference forward's, rounded to Elem and float32, or (``forward``) the emulated kernel's.
    ``sharp``: also check that the bounds are small next to the gradients (not so where a drawn case has one key
    per query, and its gradients are only rounding errors).
    """
    rng = np.random.default_rng(seed)
    lead, L = shape_q[:-1], shape_q[-1]
    q64, qh = to_half(rng.standard_normal(lead + (L, D)), element)
    k64, kh = to_half(rng.standard_normal(lead + (S, D)), element)
    v64, vh = to_half(rng.standard_normal(lead + (S, D)), element)
    do64, doh = to_half(rng.standard_normal(lead + (L, D)), element)
    scale = kw.pop("scale", 1.0 / np.sqrt(D))
    if forward:
        oh, lse32 = run(cuda_tc.prepare(qh, kh, vh, scale=scale, element=element, **kw))
        o64 = from_half(oh, element)
    else:
        out_r, lse_r = reference.attention_forward(q64, k64, v64, scale=scale, **kw)
        o64, oh = to_half(out_r, element)
        lse32 = lse_r.astype(np.float32)
    got = run.backward(cuda_tc.prepare_backward(qh, kh, vh, oh, lse32, doh, scale=scale, element=element, **kw))
    lse64 = lse32.astype(np.float64)
    want = reference.attention_backward(q64, k64, v64, o64, lse64, do64, scale=scale, **kw)
    tols = backward_tolerances(q64, k64, v64, o64, lse64, do64, element=element, scale=scale, **kw)
    for name, g, w, tol in zip(("dq", "dk", "dv"), got, want, tols):
        assert g.shape == w.shape, name
        err = np.abs(from_half(g, element) - w)
        worst = np.unravel_index(np.argmax(err - tol), err.shape)
        assert (err <= tol).all(), f"{name}: |error| {err[worst]:.3g} > bound {tol[worst]:.3g} at {worst}"
        # the bound is small next to the gradient, so that a wrong term would show
        assert not sharp or np.median(tol) <= 0.05 * np.sqrt(np.mean(w**2)), name
        if os.environ.get("FLASH_TC_STATS"):  # how close the errors come to their bounds
            print(f"{element} {name}: max |error| / bound {np.max(err / np.maximum(tol, 1e-300)):.3f}")
    return got, want


@pytest.mark.parametrize("element", ["float16", "bfloat16"])
def test_emulated_backward_equals_reference_dense(emulator, element):
    check_backward(emulator, (2, 1, 70), 100, element=element)


@pytest.mark.parametrize("pattern", PATTERNS, ids=repr)
@pytest.mark.parametrize("element", ["float16", "bfloat16"])
def test_emulated_backward_equals_reference_patterns(emulator, pattern, element):
    # L = S = 135: skipped, partial and full tiles of both kernels' loops (dq walks keys, dkdv walks queries)
    check_backward(emulator, (1, 135), 135, element=element, pattern=pattern)


def test_emulated_backward_causal_rectangular_and_masks(emulator):
    rng = np.random.default_rng(1)
    check_backward(emulator, (1, 2, 80), 150, causal=True)  # L < S: key tiles no query sees get dk = dv = 0
    check_backward(emulator, (1, 1, 150), 20, causal=True, element="bfloat16")  # L > S
    # tile rules at their edges: key 128 is seen by query 128 alone, the last of a one-row query tile; and Row's
    # queries [128, 140) reach keys [64, 122) at q − k = 7 = W exactly
    check_backward(emulator, (1, 1, 129), 130, causal=True)
    check_backward(emulator, (1, 140), 122, pattern=Row(text_len=5, width=7))
    mask = rng.random((80, 90)) < 0.5
    mask[3] = False  # a fully masked row: lse −inf, zero gradients
    _, (dq_r, _, _) = check_backward(emulator, (2, 2, 80), 90, mask=mask)
    assert not dq_r[:, :, 3].any()
    additive = rng.standard_normal((2, 1, 1, 90)) * 3  # broadcast over heads and queries
    check_backward(emulator, (2, 2, 80), 90, mask=additive, pattern=Row(text_len=10, width=8), element="bfloat16")
    (dq, dk, dv), _ = check_backward(emulator, (1, 1, 20), 20, mask=np.zeros((20, 20), bool), sharp=False)
    assert not dq.any() and not dk.any() and not dv.any()  # nothing attends: every gradient is exactly 0
    h = np.ones((1, 20, 64), np.float16)
    launch = cuda_tc.prepare_backward(h, h[:, :0], h[:, :0], h, np.full((1, 20), -np.inf, np.float32), h)
    dq, dk, dv = emulator.backward(launch)  # no keys at all: dq = 0, empty dk and dv
    assert not dq.any() and dk.shape == dv.shape == (1, 0, 64) and launch.dkdv_grid == (0, 1)


@pytest.mark.parametrize("D", [32, 128])
def test_emulated_backward_other_head_dims(emulator, D):
    # D = 128 walks 32-row tiles: 100 rows are 3 full tiles and a partial one
    check_backward(emulator, (1, 1, 100), 70, D=D, causal=True, element="float16" if D == 32 else "bfloat16")


@pytest.mark.parametrize("element", ["float16", "bfloat16"])
def test_emulated_forward_then_backward(emulator, element):
    """The backward fed the emulated forward's own out and lse, as in training."""
    check_backward(emulator, (1, 2, 90), 90, element=element, forward=True, pattern=PrefixLM(prefix_len=40))


@pytest.mark.parametrize("element", ["float16", "bfloat16"])
def test_emulated_backward_equals_torch_autograd(emulator, element):
    """Against PyTorch: float64 autograd through F.scaled_dot_product_attention on the same rounded inputs (the
    kernel gets PyTorch's out rounded to Elem, so its D moves by a rounding: ``out_rounded``)."""
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(4)
    (q64, qh), (k64, kh), (v64, vh), (do64, doh) = (to_half(rng.standard_normal((2, 2, 75, 64)), element)
                                                    for _ in range(4))  # fmt: skip
    pattern = Conv(text_len=5, width=7, kernel=3)
    allowed = reference.pattern_mask(75, 75, pattern=pattern)
    q, k, v = (torch.tensor(x, requires_grad=True) for x in (q64, k64, v64))
    out = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=torch.tensor(allowed), scale=0.125)
    out.backward(torch.tensor(do64))
    out = out.detach().numpy()
    o64, oh = to_half(out, element)
    _, lse = reference.attention_forward(q64, k64, v64, scale=0.125, pattern=pattern)
    lse32 = lse.astype(np.float32)
    got = emulator.backward(cuda_tc.prepare_backward(qh, kh, vh, oh, lse32, doh, scale=0.125, pattern=pattern,
                                                     element=element))  # fmt: skip
    tols = backward_tolerances(q64, k64, v64, out, lse32.astype(np.float64), do64, element=element, scale=0.125,
                               pattern=pattern, out_rounded=True)  # fmt: skip
    for name, g, want, tol in zip(("dq", "dk", "dv"), got, (q.grad, k.grad, v.grad), tols):
        err = np.abs(from_half(g, element) - want.numpy())
        assert (err <= tol).all(), f"{name}: {np.max(err / tol):.3g} × the bound"
        assert np.median(tol) <= 0.05 * np.sqrt(np.mean(want.numpy() ** 2)), name


@settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(**DRAWN)
def test_emulated_backward_equals_reference_drawn_shapes(emulator, L, S, heads, pattern, causal, element, seed):
    check_backward(emulator, (1, heads, L), S, element=element, seed=seed, pattern=pattern, causal=causal, sharp=False)


# ---------------------------------------------------------------------------------------------------------------
# 3. On a GPU


@pytest.mark.gpu
@pytest.mark.parametrize("kw", [{}, {"causal": True}, {"pattern": Conv(text_len=16, width=16, kernel=5)}], ids=str)
def test_gpu_kernel_equals_reference(cupy, kw):
    rng = np.random.default_rng(0)
    q64, q = to_half(rng.standard_normal((2, 4, 272, 64)), "float16")
    k64, k = to_half(rng.standard_normal((2, 4, 272, 64)), "float16")
    v64, v = to_half(rng.standard_normal((2, 4, 272, 64)), "float16")
    out, lse = cuda_tc.attention_forward(cupy.asarray(q), cupy.asarray(k), cupy.asarray(v), scale=0.125, **kw)
    out_r, lse_r = reference.attention_forward(q64, k64, v64, scale=0.125, **kw)
    assert out.dtype == cupy.float16 and lse.dtype == cupy.float32
    tol = 2 * ROUNDOFF["float16"] * np.abs(v64).max() + 1e-6
    np.testing.assert_allclose(cupy.asnumpy(out).astype(np.float64), out_r, rtol=0, atol=tol)
    np.testing.assert_allclose(cupy.asnumpy(lse), lse_r, rtol=0, atol=1e-4)
    # bf16 through its bits (CuPy has no bfloat16 dtype without ml_dtypes): the same launch path
    kb = {"element": "bfloat16"}
    arrays = [to_half(x, "bfloat16") for x in (q64, k64, v64)]
    launch = cuda_tc.prepare(*(cupy.asarray(h) for _, h in arrays), scale=0.125, **kb, **kw)
    cuda_tc._kernel(launch.element, launch.head_dim)(launch.grid, launch.block, launch.args)
    out_r, _ = reference.attention_forward(*(x for x, _ in arrays), scale=0.125, **kw)
    out = from_half(cupy.asnumpy(launch.out).reshape(out_r.shape), "bfloat16")
    np.testing.assert_allclose(out, out_r, rtol=0, atol=2 * ROUNDOFF["bfloat16"] * np.abs(arrays[2][0]).max() + 1e-6)


def gpu_backward_case(cupy, element, shape, kw, D=64, seed=0):
    """Forward then backward on the GPU, the backward against the reference fed the kernel's own out and lse."""
    rng = np.random.default_rng(seed)
    arrays = [to_half(rng.standard_normal(shape + (D,)), element) for _ in range(4)]
    (q64, q), (k64, k), (v64, v), (do64, do) = arrays
    gpu = {"element": element, "scale": 0.125, **{a: (cupy.asarray(b) if a == "mask" else b) for a, b in kw.items()}}
    fwd = cuda_tc.prepare(*(cupy.asarray(x) for x in (q, k, v)), **gpu)
    cuda_tc._kernel(fwd.element, fwd.head_dim)(fwd.grid, fwd.block, fwd.args)
    out, lse = fwd.results()
    runs = []
    for _ in range(2):
        launch = cuda_tc.prepare_backward(*(cupy.asarray(x) for x in (q, k, v)), out, lse, cupy.asarray(do), **gpu)
        cuda_tc.run_backward(launch)
        runs.append([cupy.asnumpy(g) for g in launch.results()])
    for a, b in zip(*runs):  # no atomics: the same bits every time
        np.testing.assert_array_equal(a, b)
    o64, lse64 = from_half(cupy.asnumpy(out), element), cupy.asnumpy(lse).astype(np.float64)
    want = reference.attention_backward(q64, k64, v64, o64, lse64, do64, scale=0.125, **kw)
    tols = backward_tolerances(q64, k64, v64, o64, lse64, do64, element=element, scale=0.125, **kw)
    for name, g, w, tol in zip(("dq", "dk", "dv"), runs[0], want, tols):
        err = np.abs(from_half(g, element) - w)
        print(f"{element} D={D} {sorted(kw)}: {name} max |error| / bound {np.max(err / np.maximum(tol, 1e-300)):.3f}")
        assert (err <= tol).all(), f"{name}: {np.max(err / np.maximum(tol, 1e-300)):.3g} × the bound"


@pytest.mark.gpu
@pytest.mark.parametrize(
    "kw",
    [{}, {"causal": True}, {"pattern": Conv(text_len=16, width=16, kernel=5)}, {"pattern": PrefixLM(prefix_len=100)},
     {"mask": np.random.default_rng(2).random((272, 272)) < 0.7}],
    ids=["dense", "causal", "conv", "prefix", "mask"],
)  # fmt: skip
def test_gpu_backward_equals_reference(cupy, kw):
    """The backward kernels on a GPU (fp16, and bf16 through its bits), deterministic and within the bounds."""
    for element in ("float16", "bfloat16"):
        gpu_backward_case(cupy, element, (2, 4, 272), kw)


@pytest.mark.gpu
@pytest.mark.parametrize("D", [32, 128])
def test_gpu_backward_other_head_dims(cupy, D):
    gpu_backward_case(cupy, "float16" if D == 32 else "bfloat16", (1, 2, 200), {"causal": True}, D=D)


@pytest.mark.gpu
def test_gpu_backward_through_attention_backward(cupy):
    """The public entry point on float16 CuPy arrays, against the reference; prints its time next to the forward's."""
    rng = np.random.default_rng(3)
    arrays = [to_half(rng.standard_normal((2, 2, 130, 64)), "float16") for _ in range(4)]
    (q64, q), (k64, k), (v64, v), (do64, do) = arrays
    q, k, v, do = (cupy.asarray(x) for x in (q, k, v, do))
    out, lse = cuda_tc.attention_forward(q, k, v, causal=True)
    dq, dk, dv = cuda_tc.attention_backward(q, k, v, out, lse, do, causal=True)
    assert dq.dtype == dk.dtype == dv.dtype == cupy.float16 and dq.shape == q.shape and dk.shape == k.shape
    o64, lse64 = cupy.asnumpy(out).astype(np.float64), cupy.asnumpy(lse).astype(np.float64)
    scale = 1 / 8
    want = reference.attention_backward(q64, k64, v64, o64, lse64, do64, scale=scale, causal=True)
    tols = backward_tolerances(q64, k64, v64, o64, lse64, do64, element="float16", scale=scale, causal=True)
    for g, w, tol in zip((dq, dk, dv), want, tols):
        assert (np.abs(cupy.asnumpy(g).astype(np.float64) - w) <= tol).all()
    # time at a training size (printed, not asserted): B=4, H=8, N=1024, D=64, causal
    big = [cupy.asarray(rng.standard_normal((4, 8, 1024, 64)).astype(np.float16)) for _ in range(4)]
    out, lse = cuda_tc.attention_forward(*big[:3], causal=True)
    start, stop = cupy.cuda.Event(), cupy.cuda.Event()
    calls = {
        "forward": lambda: cuda_tc.attention_forward(*big[:3], causal=True),
        "backward": lambda: cuda_tc.attention_backward(*big[:3], out, lse, big[3], causal=True),
    }
    for what, call in calls.items():
        call()
        start.record()
        for _ in range(10):
            call()
        stop.record()
        stop.synchronize()
        print(f"cuda_tc {what} fp16 causal B=4 H=8 N=1024 D=64: {cupy.cuda.get_elapsed_time(start, stop) / 10:.3f} ms")
