// The fused diffusion update for float32 arrays in CUDA C++ (kernels/schedule/cuda_vec.py compiles and launches it):
//
//     out = A·clip(p·x − q·e, ±clip) + Bx·x + Be·e + S·z          (kernels/schedule/cpu.py's one formula)
//
// for q_sample (DDPM eq. 4), the DDPM step (eqs. 11, 15 + 7) and the DDIM step (eq. 12), z drawn in the same pass.
// One thread takes one Philox block at a time: the four consecutive elements 4b … 4b + 3 whose four normals that
// block gives, read and written as one 128-bit float4 each — a warp's loads cover 512 contiguous bytes, with no
// shared memory, no barrier and no per-element index arithmetic (the numba.cuda form, which cannot load vectors,
// spreads each block over four threads through shared memory). Grid-stride over blocks.
//
// The noise is kernels/philox.py's float32 noise, operation for operation: Philox4x32-10 keyed by the seed and
// counted by the block index, `uniform32`, `log32`, `cos_sin_2pi32` and Box–Muller `box_muller32`, written with the
// same float32 operations in the same order (a compiler for the CPU that does not contract multiply-adds gives the
// NumPy spec's bits; NVRTC contracts them into FMAs, as numba.cuda does: within an ulp or two). Those functions are
// kernels/philox.cuh, which kernels.philox.cuda_source puts in front of this file with philox.py's constants.
//
// Arithmetic as the numba.cuda form's: float32 for Bx·x + S·z + Be·e, float64 for x̂_0 = clip(p·x − q·e), where p and
// q reach 1/√ᾱ ≈ 160 and cancel. Samples whose S is 0 (DDIM with η = 0, DDPM's last step) draw no noise and, when
// it is given, do not read it (a NaN there stays out) — unless the noise is an output (q_sample).

// i div per_sample as floor((i + ½)·(1/per_sample)), exact below 2⁵⁰ elements (the numba.cuda form's _sample)
PHILOX_DEVICE long long sample_of(long long i, double inv_per_sample) { return (long long)(((double)i + 0.5) * inv_per_sample); }

PHILOX_DEVICE void load4(const float* a, long long i, long long n, int vec, float v[4]) {
    if (vec && i + 4 <= n) {
        float4 t = *reinterpret_cast<const float4*>(a + i);
        v[0] = t.x, v[1] = t.y, v[2] = t.z, v[3] = t.w;
    } else {
        for (int j = 0; j < 4; ++j) v[j] = a[i + j < n ? i + j : n - 1];  // past the end: not used
    }
}

PHILOX_DEVICE void store4(float* a, long long i, long long n, int vec, const float v[4]) {
    if (vec && i + 4 <= n) {
        *reinterpret_cast<float4*>(a + i) = make_float4(v[0], v[1], v[2], v[3]);
    } else {
        for (int j = 0; j < 4 && i + j < n; ++j) a[i + j] = v[j];
    }
}

// One element: A·clip(p·x − q·e) + Bx·x + Be·e + S·z, with the coefficients of sample s. Inlined into both loops
// below: with s the same for the block's four elements, its loads are the loop's invariants.
template <bool HAS_E>
PHILOX_DEVICE float update_one(float x, float e, float zi, const double* coef, const float* coefn, long long s,
                               double clip) {
    float Bx = coefn[s * 3], Be = coefn[s * 3 + 1], S = coefn[s * 3 + 2];
    float acc = Bx * x + S * zi;
    if (HAS_E) {
        acc += Be * e;
        const double* c = coef + s * 6;
        if (c[2] != 0.0) {
            double x0 = c[0] * (double)x - c[1] * (double)e;
            x0 = x0 < -clip ? -clip : (x0 > clip ? clip : x0);
            acc += (float)(c[2] * x0);
        }
    }
    return acc;
}

// One Philox block of four elements 4b … 4b + 3 (x, e already loaded into xv, ev): draw or read the noise, update,
// store.
template <bool HAS_E, bool SEEDED, bool WRITE_Z>
PHILOX_DEVICE void update_block(long long b, const float xv[4], const float ev[4], const double* coef,
                                const float* coefn, double inv_per_sample, double clip, unsigned k0, unsigned k1,
                                const float* z, float* z_out, float* out, long long n, int vec) {
    long long i0 = b << 2;
    float zv[4] = {0.0f, 0.0f, 0.0f, 0.0f}, ov[4];
    long long first = sample_of(i0, inv_per_sample);
    long long last = sample_of(i0 + 3 < n ? i0 + 3 : n - 1, inv_per_sample);
    if (SEEDED) {
        // the noise is an output, or some sample of the four elements adds noise (samples shorter than the block
        // between first and last: drawn without looking, as cuda.py's _noisy does)
        if (WRITE_Z || last > first + 1 || coef[first * 6 + 5] != 0.0 || coef[last * 6 + 5] != 0.0)
            normal4_32(b, k0, k1, zv);
        if (WRITE_Z) store4(z_out, i0, n, vec, zv);
    }
    if (first == last) {  // the four elements in one sample (all but the blocks that straddle two): one s
        // given noise: read (one float4) only where the sample adds noise, so a NaN there stays out
        if (!SEEDED && coefn[first * 3 + 2] != 0.0f) load4(z, i0, n, vec, zv);
        for (int j = 0; j < 4; ++j) ov[j] = update_one<HAS_E>(xv[j], ev[j], zv[j], coef, coefn, first, clip);
    } else {
        for (int j = 0; j < 4; ++j) {
            long long i = i0 + j < n ? i0 + j : n - 1, s = sample_of(i, inv_per_sample);
            if (!SEEDED) zv[j] = coefn[s * 3 + 2] != 0.0f ? z[i] : 0.0f;
            ov[j] = update_one<HAS_E>(xv[j], ev[j], zv[j], coef, coefn, s, clip);
        }
    }
    store4(out, i0, n, vec, ov);
}

// Philox blocks a thread takes per trip of its loop: b, b + stride, …, all their loads issued before the first draw
// (more bytes in flight per thread; cuda_vec.py compiles others for bench.sweep_cuda_vec to time)
#ifndef FU_UNROLL
#define FU_UNROLL 1
#endif

// The kernel, one instance per kind of update (HAS_E: ε̂ is read — the DDPM and DDIM steps; SEEDED: the noise is
// drawn, else given or unused; WRITE_Z: the drawn noise is an output — q_sample), so that none of these choices is a
// branch in the loop. x, e, z, out may be one array (an update in place): each element is read before it is written,
// by one thread. coef: (samples, 6) float64 rows p, q, A, Bx, Be, S; coefn: (samples, 3) float32 Bx, Be, S. vec:
// every array's data is 16-byte aligned (float4 loads and stores).
template <bool HAS_E, bool SEEDED, bool WRITE_Z>
__global__ void __launch_bounds__(256)
fused_update(const float* x, const float* e, const double* coef, const float* coefn, double inv_per_sample,
             double clip, unsigned k0, unsigned k1, const float* z, float* z_out, float* out, long long n, int vec) {
    const long long blocks = (n + 3) >> 2;
    const long long stride = (long long)gridDim.x * blockDim.x;
    long long b = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    // FU_UNROLL blocks a trip while the last of them exists, with no test between (the common path)
    for (; b + (FU_UNROLL - 1) * stride < blocks; b += FU_UNROLL * stride) {
        float xv[FU_UNROLL][4], ev[FU_UNROLL][4] = {};
#pragma unroll
        for (int u = 0; u < FU_UNROLL; ++u) {  // the loads are in flight while the blocks' normals are drawn
            load4(x, (b + u * stride) << 2, n, vec, xv[u]);
            if (HAS_E) load4(e, (b + u * stride) << 2, n, vec, ev[u]);
        }
#pragma unroll
        for (int u = 0; u < FU_UNROLL; ++u)
            update_block<HAS_E, SEEDED, WRITE_Z>(b + u * stride, xv[u], ev[u], coef, coefn, inv_per_sample, clip, k0,
                                                 k1, z, z_out, out, n, vec);
    }
    if (FU_UNROLL > 1) {  // the thread's last few blocks, one a trip
        for (; b < blocks; b += stride) {
            float xv[4], ev[4] = {0.0f, 0.0f, 0.0f, 0.0f};
            load4(x, b << 2, n, vec, xv);
            if (HAS_E) load4(e, b << 2, n, vec, ev);
            update_block<HAS_E, SEEDED, WRITE_Z>(b, xv, ev, coef, coefn, inv_per_sample, clip, k0, k1, z, z_out, out,
                                                 n, vec);
        }
    }
}
