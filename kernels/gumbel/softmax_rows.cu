// Gumbel-softmax forward over rows of float32 logits in CUDA C++ (kernels/gumbel/cuda_vec.py compiles and launches
// it): y_soft = softmax((l + g)/τ) along each row, g = −log(−log u) drawn from Philox at each element's flat index (or
// given), and y = the one-hot of the argmax when hard.
//
// One block of GS_THREADS threads per row (grid-stride over rows); thread t holds the row's float4 chunks t,
// t + GS_THREADS, … in registers — as the float64 z of its elements — so the row is read once and written once: pass
// 1 draws g (a chunk of four elements is one Philox block when the row starts at a multiple of 4), finds the max
// and first argmax of s = l + g in float64 (the hard index; the max of z = s·log₂e/τ is then max s·log₂e/τ, rounding
// being monotone) and keeps z (the registers logits and noise would take: pass 2 recomputing z from them issued 6
// more instructions an element, two of them float→double conversions); pass 2 forms e = 2^(z − max) and its sum;
// pass 3 writes e/Σ. The
// numba.cuda form (cuda.py), which cannot hold a row in registers through arrays it indexes at run time nor load a
// float4, keeps g in shared memory and reads the logits twice. Rows of n ≤ 4·GS_THREADS·GS_CHUNKS values, n a
// multiple of 4; cuda_vec.py checks.
//
// The arithmetic is cuda.py's for float32 rows: z and z − max in float64 (rounding z to float32 would move it by
// 2⁻²⁴|z|), e = 2^(float32(z − max)) in float32, the sum in float64, y_soft = e·float32(1/Σ). Ties in the argmax go
// to the first index, as a scan keeping the first strict improvement gives.

// the block size and the float4 chunks a thread holds (rows of up to 8192 values); cuda_vec.py may compile others
#ifndef GS_THREADS
#define GS_THREADS 256
#endif
#ifndef GS_CHUNKS
#define GS_CHUNKS 8
#endif
static_assert((GS_THREADS & (GS_THREADS - 1)) == 0, "the block reductions halve GS_THREADS: a power of 2");

// (max, first argmax) of the pairs (m, a) of the block's threads, a = n for a thread that saw no element: a tree in
// shared memory (every thread gets the result)
PHILOX_DEVICE void block_argmax(double* vbuf, int* ibuf, double& m, int& a, int n) {
    const int t = threadIdx.x;
    vbuf[t] = m;
    ibuf[t] = a;
    __syncthreads();
    for (int step = GS_THREADS / 2; step > 0; step >>= 1) {
        if (t < step) {
            double om = vbuf[t + step];
            int oa = ibuf[t + step];
            if (oa < n && (ibuf[t] == n || om > vbuf[t] || (om == vbuf[t] && oa < ibuf[t]))) {
                vbuf[t] = om;
                ibuf[t] = oa;
            }
        }
        __syncthreads();
    }
    m = vbuf[0];
    a = ibuf[0];
    __syncthreads();  // everyone has read the result before the buffers are reused
}

// Σ of value over the block's threads (every thread gets it)
PHILOX_DEVICE double block_sum(double* vbuf, double value) {
    const int t = threadIdx.x;
    vbuf[t] = value;
    __syncthreads();
    for (int step = GS_THREADS / 2; step > 0; step >>= 1) {
        if (t < step) vbuf[t] += vbuf[t + step];
        __syncthreads();
    }
    double total = vbuf[0];
    __syncthreads();
    return total;
}

// l2, g2, y2, ys2: (rows, n) C-contiguous, 16-byte aligned; g2 the noise when not SEEDED; y2 the one-hot when hard.
// scale = log₂e/τ.
template <bool SEEDED>
__global__ void __launch_bounds__(GS_THREADS)
gumbel_softmax_rows(const float* l2, const float* g2, long long rows, int n, double scale, int hard, unsigned k0,
                    unsigned k1, float* y2, float* ys2) {
    __shared__ double vbuf[GS_THREADS];
    __shared__ int ibuf[GS_THREADS];
    const int t = threadIdx.x;
    const int chunks = n >> 2;
    for (long long r = blockIdx.x; r < rows; r += gridDim.x) {
        const float4* l = reinterpret_cast<const float4*>(l2 + r * n);
        double zv[GS_CHUNKS][4];  // z, kept from pass 1 for pass 2 (as many registers as the logits and noise)
        float ev[GS_CHUNKS][4];
        // pass 1: the logits, the noise, z, and the thread's max and first argmax of s (its elements in index order)
        double m = 0.0;
        int a = n;
#pragma unroll
        for (int k = 0; k < GS_CHUNKS; ++k) {
            const int c = t + k * GS_THREADS;
            if (c < chunks) {
                float4 x = l[c];
                const float lv[4] = {x.x, x.y, x.z, x.w};
                float gv[4];
                if (SEEDED) {
                    unsigned w[4];
                    philox_block((unsigned long long)((r * n) >> 2) + c, k0, k1, w);
                    for (int i = 0; i < 4; ++i) gv[i] = gumbel32(w[i]);
                } else {
                    float4 g = reinterpret_cast<const float4*>(g2 + r * n)[c];
                    gv[0] = g.x, gv[1] = g.y, gv[2] = g.z, gv[3] = g.w;
                }
                for (int i = 0; i < 4; ++i) {
                    const double s = (double)lv[i] + (double)gv[i];
                    zv[k][i] = s * scale;
                    if (s > m || a == n) m = s, a = 4 * c + i;
                }
            }
        }
        block_argmax(vbuf, ibuf, m, a, n);
        m *= scale;  // the max of z
        // pass 2: e = 2^(z − max) and their sum
        double s = 0.0;
#pragma unroll
        for (int k = 0; k < GS_CHUNKS; ++k) {
            if (t + k * GS_THREADS < chunks) {
                for (int i = 0; i < 4; ++i) {
                    ev[k][i] = exp2f((float)(zv[k][i] - m));
                    s += (double)ev[k][i];
                }
            }
        }
        const float inv_total = (float)(1.0 / block_sum(vbuf, s));
        // pass 3: y_soft = e/Σ, and the one-hot of the argmax when hard
        float4* ys = reinterpret_cast<float4*>(ys2 + r * n);
        float4* y = reinterpret_cast<float4*>(y2 + r * n);
#pragma unroll
        for (int k = 0; k < GS_CHUNKS; ++k) {
            const int c = t + k * GS_THREADS;
            if (c < chunks) {
                ys[c] = make_float4(ev[k][0] * inv_total, ev[k][1] * inv_total, ev[k][2] * inv_total,
                                    ev[k][3] * inv_total);
                if (hard) {
                    const int j = 4 * c;
                    y[c] = make_float4(j == a ? 1.0f : 0.0f, j + 1 == a ? 1.0f : 0.0f, j + 2 == a ? 1.0f : 0.0f,
                                       j + 3 == a ? 1.0f : 0.0f);
                }
            }
        }
    }
}
