// FlashAttention-2 on tensor cores, forward and backward: fp16 / bf16 inputs, fp32 accumulation.
//
// out = softmax(Q Kᵀ · scale + mask) V and lse = the row log-sum-exp, for one (batch·head) and one tile of 64
// queries per thread block, following FlashAttention-2 (Dao 2023), Algorithm 1:
//
//   load Q_i into registers                                                     (line 4)
//   for each key tile j that the pattern does not rule out:                    (line 6)
//       load K_j, V_j into shared memory                                        (line 7)
//       S = Q_i K_jᵀ                        on tensor cores, fp32 accumulators  (line 8)
//       m_new = max(m, rowmax(S));  P = exp(S − m_new)                          (line 9)
//       l = exp(m − m_new) · l + rowsum(P)
//       O = exp(m − m_new) · O + P V_j      on tensor cores                     (line 10)
//   out = O / l,  lse = m + log(l)                                              (lines 12-13)
//
// so the L×S score matrix never exists: each warp keeps its 16 rows of S, P and O in registers.
//
// Tensor cores are reached through the PTX instruction mma.sync.aligned.m16n8k16 (PTX ISA, "mma"): one warp
// multiplies a 16×16 A by a 16×8 B and adds a 16×8 fp32 C. Its operands live in registers, spread over the 32
// lanes in a documented layout (PTX ISA, "Matrix Fragments for mma.m16n8k16 with floating point type"). With
// g = lane / 4 (the "groupID") and t = lane % 4 ("threadID_in_group"), each lane holds
//
//   A (16×16, row-major)  4 registers of 2 halves:  A[g][2t..2t+1]    A[g+8][2t..2t+1]
//                                                   A[g][2t+8..2t+9]  A[g+8][2t+8..2t+9]
//   B (16×8, "col")       2 registers of 2 halves:  B[2t..2t+1][g]    B[2t+8..2t+9][g]
//   C, D (16×8, fp32)     4 floats:                 C[g][2t], C[g][2t+1], C[g+8][2t], C[g+8][2t+1]
//
// Two facts make this layout convenient for attention:
// - B[k..k+1][n] is one 32-bit load from a matrix stored with n as its row: Kᵀ's column n is K's row n, and we
//   store V transposed in shared memory, so both products read their B operands as pairs along a shared row;
// - the C layout of two neighbouring 16×8 score tiles is exactly the A layout of the 16×16 block of P that
//   multiplies V (FlashAttention-2's register trick): P goes from the softmax to the next mma without touching
//   shared memory.
// Each lane therefore owns two query rows (g and g + 8 of its warp's 16), and the row statistics m and l are
// reduced over the 4 lanes of a group with two shuffles.
//
// Masks are evaluated per element: the dense additive mask (fp32, any broadcast through strides), causality
// (top-left aligned, PyTorch's is_causal) and the structured patterns of kernels/attention/patterns.py (kind code
// and T, W, r, P), whose tile rule lets a block skip every key tile that none of its queries may see.
// A row that may see no key gets out = 0 and lse = −inf, as in reference.py.
//
// The backward (Algorithm 2: dQ, dK, dV from the saved lse) is the second half of the file, in two kernels and
// the same building blocks.
//
// The host side is kernels/attention/cuda_tc.py (CuPy RawModule, NVRTC). Defining FLASH_TC_HOST_EMULATION
// replaces the CUDA headers and the one inline-PTX function by a CPU emulation (see the tests), so the same
// source can be checked for correctness on a machine without a GPU.

#ifndef FLASH_TC_HOST_EMULATION
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#endif

constexpr int BQ = 64;             // queries per block: the tile Q_i
constexpr int BK = 64;             // keys per tile K_j, V_j
constexpr int WARPS = BQ / 16;     // each warp owns 16 query rows
constexpr int THREADS = 32 * WARPS;
constexpr int PAD = 8;             // extra halves per shared row: the 32 lanes' fragment reads hit 32 banks
#define NEG_INF __int_as_float(0xff800000)  // −∞ as an IEEE-754 single (NVRTC has no <cmath> INFINITY)
#define POS_INF __int_as_float(0x7f800000)  // +∞

// ------------------------------------------------------------------------------------------------------------
// Element types: fp16 or bf16 storage, fp32 arithmetic (the mma reads the 16-bit values; we only round to them).

template <typename Elem>
struct Half;

template <>
struct Half<__half> {
    static __device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }
    static __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
    static __device__ __forceinline__ unsigned short bits(__half x) { return __half_as_ushort(x); }
};

template <>
struct Half<__nv_bfloat16> {
    static __device__ __forceinline__ __nv_bfloat16 from_float(float x) { return __float2bfloat16_rn(x); }
    static __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
    static __device__ __forceinline__ unsigned short bits(__nv_bfloat16 x) { return __bfloat16_as_ushort(x); }
};

// Two floats rounded to Elem and packed into one 32-bit register, the first in the low half (element a_i
// before a_{i+1} in the PTX fragment tables).
template <typename Elem>
__device__ __forceinline__ unsigned pack2(float lo, float hi) {
    return unsigned(Half<Elem>::bits(Half<Elem>::from_float(lo))) |
           (unsigned(Half<Elem>::bits(Half<Elem>::from_float(hi))) << 16);
}

// Two neighbouring elements (p[0], p[1]) as one 32-bit register; p is 4-byte aligned (even column, even stride).
template <typename Elem>
__device__ __forceinline__ unsigned load2(const Elem* p) {
    return *reinterpret_cast<const unsigned*>(p);
}

// ------------------------------------------------------------------------------------------------------------
// The tensor-core instruction: c += A B for one 16×16 A, one 16×8 B, in the register layout described above.

#ifndef FLASH_TC_HOST_EMULATION
template <typename Elem>
__device__ void mma_16x8x16(float (&c)[4], const unsigned (&a)[4], const unsigned (&b)[2]);

template <>
__device__ __forceinline__ void mma_16x8x16<__half>(float (&c)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

template <>
__device__ __forceinline__ void mma_16x8x16<__nv_bfloat16>(float (&c)[4], const unsigned (&a)[4],
                                                          const unsigned (&b)[2]) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 "
        "{%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, {%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}
#endif

// ------------------------------------------------------------------------------------------------------------
// Structured patterns: the same rules as kernels/attention/patterns.py (visible, tile_may_attend,
// tile_all_visible), in C++.

enum PatternKind { NONE = 0, CAUSAL = 1, ROW = 2, COLUMN = 3, CONV = 4, PREFIX = 5 };

struct Pattern {
    int kind, T, W, r, P;  // T text tokens then a W×W image grid; r = kernel // 2; P = prefix length
    bool causal;           // an extra k <= q test on top of the pattern
};

// Whether query position q may attend to key position k.
__device__ __forceinline__ bool visible(const Pattern& p, int q, int k) {
    if (p.causal && k > q) return false;
    switch (p.kind) {
        case NONE: return true;
        case CAUSAL: return k <= q;
        case PREFIX: return k < p.P || k <= q;
    }
    // The image patterns: causal; text keys are visible to everyone; a rule between image tokens.
    if (k > q) return false;
    if (k < p.T) return true;
    const int d = q - k;  // here T <= k <= q
    switch (p.kind) {
        case ROW: return d <= p.W;
        case COLUMN: return d % p.W == 0;
        default: {  // CONV: row distance at most r, cyclic column distance at most r
            const int dr = (q - p.T) / p.W - (k - p.T) / p.W;
            const int dc = abs((q - p.T) % p.W - (k - p.T) % p.W);
            return dr <= p.r && min(dc, p.W - dc) <= p.r;
        }
    }
}

// False only if no query in [q0, q1) may attend to any key in [k0, k1): the whole tile is then skipped.
__device__ __forceinline__ bool tile_may_attend(const Pattern& p, int q0, int q1, int k0, int k1) {
    const int qmax = q1 - 1;
    if (p.causal && k0 > qmax) return false;
    switch (p.kind) {
        case NONE: return true;
        case CAUSAL: return k0 <= qmax;
        case PREFIX: return k0 < p.P || k0 <= qmax;
    }
    if (k0 > qmax) return false;  // every image pattern is causal
    if (k0 < p.T) return true;    // (qmax, k0) is a visible pair
    const int dmin = max(q0 - (k1 - 1), 0);  // the differences d = q − k >= 0 in the tile: [dmin, dmax]
    const int dmax = qmax - k0;
    switch (p.kind) {
        case ROW: return dmin <= p.W;
        case COLUMN: return (dmin + p.W - 1) / p.W * p.W <= dmax;  // a multiple of W in [dmin, dmax]
        default: return (max(q0, k0) - p.T) / p.W - (k1 - 1 - p.T) / p.W <= p.r;  // CONV: the row rule only
    }
}

// True only if every query in [q0, q1) may attend to every key in [k0, k1): the backward then skips the per-element
// test. Conservative (false is always allowed); exact for no pattern, CAUSAL and PREFIX, as in patterns.py.
__device__ __forceinline__ bool tile_all_visible(const Pattern& p, int q0, int q1, int k0, int k1) {
    const int kmax = k1 - 1;
    if (p.causal && kmax > q0) return false;
    switch (p.kind) {
        case NONE: return true;
        case CAUSAL: return kmax <= q0;
        case PREFIX: return kmax < p.P || kmax <= q0;
    }
    return kmax < p.T && kmax <= q0;  // the image patterns: all-text keys below every query
}

// ------------------------------------------------------------------------------------------------------------
// Global → shared copies, by the whole block. Rows past `rows` are filled with zeros. For V this matters: a key
// past S has p = 0, and 0 times whatever shared memory held (NaN, say) must stay 0. The padding rows of Q and K
// only make scores that are never used (they are masked, or belong to rows that are not written).

// rows [row0, row0 + ROWS) of a (rows, D) matrix into dst (ROWS rows, stride ld), 16 bytes (8 elements) at a time.
template <typename Elem, int D, int ROWS = BK>
__device__ void load_tile(Elem* dst, int ld, const Elem* src, int row0, int rows) {
    constexpr int CHUNKS = D / 8;
    for (int idx = threadIdx.x; idx < ROWS * CHUNKS; idx += THREADS) {
        const int r = idx / CHUNKS, c = idx % CHUNKS * 8;
        uint4 chunk = make_uint4(0, 0, 0, 0);
        if (row0 + r < rows) chunk = *reinterpret_cast<const uint4*>(src + size_t(row0 + r) * D + c);
        *reinterpret_cast<uint4*>(dst + r * ld + c) = chunk;
    }
}

// The same tile transposed: dst[c][r] = src[row0 + r][c] (D rows of ROWS keys, stride ld). Each thread reads 16
// bytes (8 columns of one row) and scatters them down 8 rows of dst; the 32 lanes of a warp take 32 consecutive rows
// of one 8-column chunk, so that their 2-byte stores to a row of dst fill 16 consecutive words (no bank conflict).
template <typename Elem, int D, int ROWS = BK>
__device__ void load_tile_transposed(Elem* dst, int ld, const Elem* src, int row0, int rows) {
    constexpr int CHUNKS = D / 8;
    for (int idx = threadIdx.x; idx < ROWS * CHUNKS; idx += THREADS) {
        const int r = idx % ROWS, c = idx / ROWS * 8;
        uint4 chunk = make_uint4(0, 0, 0, 0);
        if (row0 + r < rows) chunk = *reinterpret_cast<const uint4*>(src + size_t(row0 + r) * D + c);
        const Elem* e = reinterpret_cast<const Elem*>(&chunk);
#pragma unroll
        for (int i = 0; i < 8; ++i) dst[(c + i) * ld + r] = e[i];
    }
}

// ------------------------------------------------------------------------------------------------------------
// The kernel. Grid (ceil(L / BQ), B·H), THREADS threads. q (B·H, L, D), k and v (B·H, S, D), out like q, all
// C-contiguous; lse (B·H, L) fp32. mask[b·msb + h·msh + i·msi + j·msj] is added to the scaled scores when
// has_mask (a stride is 0 along a broadcast axis).

template <typename Elem, int D>
__global__ void __launch_bounds__(THREADS)
flash_forward(const Elem* __restrict__ q, const Elem* __restrict__ k, const Elem* __restrict__ v,
              Elem* __restrict__ out, float* __restrict__ lse, int L, int S, int H, float scale,
              const float* __restrict__ mask, long long msb, long long msh, long long msi, long long msj,
              int has_mask, int kind, int text_len, int width, int radius, int prefix_len, int causal) {
    static_assert(D % 16 == 0, "the head dimension is a multiple of the mma's k = 16");
    constexpr int LDK = D + PAD;   // row stride of sK: K_j (and Q_i, staged) row by row
    constexpr int LDV = BK + PAD;  // row stride of sVt: V_j transposed, one row per output column
    __shared__ __align__(16) Elem sK[BK * LDK];
    __shared__ __align__(16) Elem sVt[D * LDV];

    const Pattern pat = {kind, text_len, width, radius, prefix_len, causal != 0};
    const int bh = blockIdx.y, b = bh / H, h = bh % H;
    const int i0 = blockIdx.x * BQ, i1 = min(i0 + BQ, L);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane / 4, t = lane % 4;                     // groupID, threadID_in_group
    const int row[2] = {i0 + 16 * warp + g, i0 + 16 * warp + g + 8};  // this lane's two query rows
    q += size_t(bh) * L * D;
    k += size_t(bh) * S * D;
    v += size_t(bh) * S * D;

    // Algorithm 1, line 4: Q_i into registers, as the A operand of S = Q Kᵀ (staged through sK; BQ == BK).
    load_tile<Elem, D>(sK, LDK, q, i0, L);
    __syncthreads();
    unsigned qa[D / 16][4];
#pragma unroll
    for (int kc = 0; kc < D / 16; ++kc) {
        const Elem* p = sK + (16 * warp + g) * LDK + 16 * kc + 2 * t;
        qa[kc][0] = load2(p);
        qa[kc][1] = load2(p + 8 * LDK);
        qa[kc][2] = load2(p + 8);
        qa[kc][3] = load2(p + 8 * LDK + 8);
    }

    // Line 5: O = 0, l = 0, m = −inf. o[n] is the 16×8 fp32 accumulator of output columns 8n..8n+7.
    float o[D / 8][4];
#pragma unroll
    for (int n = 0; n < D / 8; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.0f;
    float m[2] = {NEG_INF, NEG_INF};
    float l[2] = {0.0f, 0.0f};  // this lane's part of the row sums (its 2 columns of every 8): reduced at the end

    for (int j0 = 0; j0 < S; j0 += BK) {
        const int j1 = min(j0 + BK, S);
        if (!tile_may_attend(pat, i0, i1, j0, j1)) continue;  // the same decision in the whole block

        // Line 7: K_j and V_j into shared memory (after everyone is done with the previous tile, and with Q).
        __syncthreads();
        load_tile<Elem, D>(sK, LDK, k, j0, S);
        load_tile_transposed<Elem, D>(sVt, LDV, v, j0, S);
        __syncthreads();

        // Line 8: S = Q_i K_jᵀ, this warp's 16 rows as BK / 8 accumulators of 16×8.
        float s[BK / 8][4];
#pragma unroll
        for (int n = 0; n < BK / 8; ++n) {
            s[n][0] = s[n][1] = s[n][2] = s[n][3] = 0.0f;
#pragma unroll
            for (int kc = 0; kc < D / 16; ++kc) {
                const Elem* p = sK + (8 * n + g) * LDK + 16 * kc + 2 * t;  // Kᵀ[2t..2t+1][g] = K[g][2t..2t+1]
                const unsigned kb[2] = {load2(p), load2(p + 8)};
                mma_16x8x16<Elem>(s[n], qa[kc], kb);
            }
        }

        // Scale, mask, and the running row maximum (line 9): element e of s[n] is row[e / 2], column
        // j0 + 8n + 2t + e % 2.
        float mx[2] = {m[0], m[1]};
#pragma unroll
        for (int n = 0; n < BK / 8; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int qi = row[e / 2], kj = j0 + 8 * n + 2 * t + e % 2;
                float x = NEG_INF;
                if (qi < L && kj < S && visible(pat, qi, kj)) {
                    x = s[n][e] * scale;
                    if (has_mask) x += mask[b * msb + h * msh + qi * msi + kj * msj];
                }
                s[n][e] = x;
                mx[e / 2] = fmaxf(mx[e / 2], x);
            }
        }
        float alpha[2], shift[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            // the 4 lanes of a group share their rows: reduce over lanes 4g .. 4g + 3
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
            // While a row has seen only −inf, shift by 0 instead of −inf so that exp(−inf − shift) = 0.
            shift[r] = mx[r] == NEG_INF ? 0.0f : mx[r];
            alpha[r] = expf(m[r] - shift[r]);  // exp(m_old − m_new) rescales the old l and O; 0 while m_old = −inf
            m[r] = mx[r];
            l[r] *= alpha[r];
        }
#pragma unroll
        for (int n = 0; n < BK / 8; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                s[n][e] = expf(s[n][e] - shift[e / 2]);  // P = exp(S − m_new)
                l[e / 2] += s[n][e];
            }
        }
#pragma unroll
        for (int n = 0; n < D / 8; ++n) {
#pragma unroll
            for (int e = 0; e < 4; ++e) o[n][e] *= alpha[e / 2];
        }

        // Line 10: O += P V_j. P's 16×16 block kc is the pair of score tiles (2kc, 2kc + 1), already in the
        // A layout; it is rounded to Elem here, as the mma takes 16-bit inputs.
#pragma unroll
        for (int kc = 0; kc < BK / 16; ++kc) {
            const unsigned pa[4] = {pack2<Elem>(s[2 * kc][0], s[2 * kc][1]), pack2<Elem>(s[2 * kc][2], s[2 * kc][3]),
                                    pack2<Elem>(s[2 * kc + 1][0], s[2 * kc + 1][1]),
                                    pack2<Elem>(s[2 * kc + 1][2], s[2 * kc + 1][3])};
#pragma unroll
            for (int n = 0; n < D / 8; ++n) {
                const Elem* p = sVt + (8 * n + g) * LDV + 16 * kc + 2 * t;  // V[2t..2t+1][g] = Vᵀ[g][2t..2t+1]
                const unsigned vb[2] = {load2(p), load2(p + 8)};
                mma_16x8x16<Elem>(o[n], pa, vb);
            }
        }
    }

    // Lines 12-15: out = O / l and lse = m + log(l), with l summed over the 4 lanes of the group.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
        if (row[r] >= L) continue;
        // a row that saw no key: out = 0; a NaN l (a NaN or +inf score) makes the row NaN, as in PyTorch
        const float inv = !(l[r] <= 0.0f) ? 1.0f / l[r] : 0.0f;
        Elem* dst = out + (size_t(bh) * L + row[r]) * D + 2 * t;
#pragma unroll
        for (int n = 0; n < D / 8; ++n)
            *reinterpret_cast<unsigned*>(dst + 8 * n) = pack2<Elem>(o[n][2 * r] * inv, o[n][2 * r + 1] * inv);
        if (t == 0) lse[size_t(bh) * L + row[r]] = !(l[r] <= 0.0f) ? m[r] + logf(l[r]) : NEG_INF;
    }
}

// ============================================================================================================
// The backward: FlashAttention-2 (Dao 2023), Algorithm 2, with dQ by a second pass instead of atomics.
//
//   D = rowsum(dO ∘ O)                                                          (line 6)
//   for each key tile j, for each query tile i that the pattern does not rule out:
//       S = Q_i K_jᵀ,  P = exp(S · scale + mask − lse_i)                        (lines 12-13)
//       dV_j += Pᵀ dO_i                                                         (line 14)
//       dP = dO_i V_jᵀ,  dS = P ∘ (dP − D_i)                                    (lines 15-16)
//       dK_j += dSᵀ Q_i · scale                                                 (line 18)
//       dQ_i += dS K_j · scale                                                  (line 17)
//
// Algorithm 2 adds line 17 to dQ_i in global memory from every key block, i.e. with atomic adds whose order (and
// fp32 rounding) changes from run to run. Here two kernels share the work instead, as the numba form does, so that
// no two threads ever write the same output and the gradients are deterministic: flash_backward_dq (one block
// per query tile, the forward's layout: each warp owns 16 query rows) recomputes P and dS and accumulates dQ_i
// over the key tiles; it also computes D for its rows first and writes it. flash_backward_dkdv (one block per key
// tile, launched after it: each warp owns 16 key rows) recomputes them transposed, Sᵀ = K_j Q_iᵀ, so that Pᵀ and
// dSᵀ come out of the mma in the C layout that is the A layout of the next product: dV_j and dK_j stay in
// registers and never go through shared memory. The price is S and dP computed twice, 7 instead of 5 mma
// products per tile pair.
//
// Both walk their tile 16 columns at a time (one k = 16 step of the following product), so only 2 + 2 score
// accumulators live at once. The B operands of the products want their k index along a shared row: the kernels
// stage the tiles they multiply on both sides, row by row and transposed (Q_i and dO_i in dkdv, K_j in dq). For
// D = 128 the tiles that the loop walks are halved to 32 rows so that the static shared memory stays under
// 48 KiB. Every gradient is accumulated in fp32 and rounded once to Elem.

// Rows of the tile that the backward kernels walk: queries in flash_backward_dkdv, keys in flash_backward_dq.
__host__ __device__ constexpr int backward_tile(int D) { return D <= 64 ? 64 : 32; }

// The A fragments of 16 rows [row0, row0 + 16) × D of a (rows, D) matrix, straight from global memory (each
// block reads them once); rows past `rows` are zeros.
template <typename Elem, int D>
__device__ void load_a_fragments(unsigned (&a)[D / 16][4], const Elem* src, int row0, int rows) {
    const int g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
    const bool in0 = row0 + g < rows, in1 = row0 + g + 8 < rows;
    const Elem* p0 = src + size_t(in0 ? row0 + g : 0) * D + 2 * t;
    const Elem* p1 = src + size_t(in1 ? row0 + g + 8 : 0) * D + 2 * t;
#pragma unroll
    for (int kc = 0; kc < D / 16; ++kc) {
        a[kc][0] = in0 ? load2(p0 + 16 * kc) : 0u;
        a[kc][1] = in1 ? load2(p1 + 16 * kc) : 0u;
        a[kc][2] = in0 ? load2(p0 + 16 * kc + 8) : 0u;
        a[kc][3] = in1 ? load2(p1 + 16 * kc + 8) : 0u;
    }
}

// A 16×16 block of A fragments from the two 16×8 accumulators that hold it (the register trick of the forward).
template <typename Elem>
__device__ __forceinline__ void c_to_a(unsigned (&a)[4], const float (&c)[2][4]) {
    a[0] = pack2<Elem>(c[0][0], c[0][1]);
    a[1] = pack2<Elem>(c[0][2], c[0][3]);
    a[2] = pack2<Elem>(c[1][0], c[1][1]);
    a[3] = pack2<Elem>(c[1][2], c[1][3]);
}

// Lines 12 and 15 of algorithm 2 in one pass: s = A·Bᵀ and dp = A2·B2ᵀ for 16 columns (two 16×8 tiles each),
// columns 16c .. 16c + 15 of the row-major shared tiles B and B2 (row stride ld) read as the mma's B operand.
// The dQ kernel calls it with (Q, dO; K, V), the dK/dV kernel transposed with (K, V; Q, dO).
template <typename Elem, int D>
__device__ __forceinline__ void two_products(float (&s)[2][4], float (&dp)[2][4], const unsigned (&a)[D / 16][4],
                                             const unsigned (&a2)[D / 16][4], const Elem* sB, const Elem* sB2,
                                             int ld, int c) {
    const int g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
#pragma unroll
    for (int nn = 0; nn < 2; ++nn) {
        s[nn][0] = s[nn][1] = s[nn][2] = s[nn][3] = 0.0f;
        dp[nn][0] = dp[nn][1] = dp[nn][2] = dp[nn][3] = 0.0f;
#pragma unroll
        for (int kc = 0; kc < D / 16; ++kc) {
            const int off = (16 * c + 8 * nn + g) * ld + 16 * kc + 2 * t;  // Bᵀ[2t..2t+1][g] = B[g][2t..2t+1]
            const unsigned b[2] = {load2(sB + off), load2(sB + off + 8)};
            const unsigned b2[2] = {load2(sB2 + off), load2(sB2 + off + 8)};
            mma_16x8x16<Elem>(s[nn], a[kc], b);
            mma_16x8x16<Elem>(dp[nn], a2[kc], b2);
        }
    }
}

// P_ij = exp(S_ij · scale + mask_ij − lse_i), the forward's softmax recomputed (line 13), or 0 where the pattern,
// causality or the bounds block the pair. `lse` is +∞ for a row that sees no key, so that all its P are 0. `full`:
// the tile is inside both bounds, fully visible and without a dense mask, so no test is needed (FlashAttention-2
// masks only the tiles that need it, section 3.1.1).
__device__ __forceinline__ float recompute_p(float s, bool full, const Pattern& pat, int qi, int kj, int L, int S,
                                            float scale, const float* mask, long long mbh, long long msi,
                                            long long msj, int has_mask, float lse) {
    if (full) return expf(s * scale - lse);
    if (qi >= L || kj >= S || !visible(pat, qi, kj)) return 0.0f;
    float x = s * scale;
    if (has_mask) x += mask[mbh + qi * msi + kj * msj];
    return expf(x - lse);
}

// One kernel per query tile of BQ rows: D_i for its rows, then dQ_i = Σ_j dS K_j · scale. Grid (ceil(L / BQ),
// B·H), THREADS threads; the arguments as in flash_forward, with out, dout (B·H, L, D), lse (B·H, L) from the
// forward, and the outputs delta (B·H, L, fp32: D, read by flash_backward_dkdv) and dq (B·H, L, D). The launch
// bound's 2 blocks per SM (256 registers a thread would still fit) keeps ptxas from a 128-register budget that
// spills at D = 64.
template <typename Elem, int D>
__global__ void __launch_bounds__(THREADS, 2)
flash_backward_dq(const Elem* __restrict__ q, const Elem* __restrict__ k, const Elem* __restrict__ v,
                  const Elem* __restrict__ out, const Elem* __restrict__ dout, const float* __restrict__ lse,
                  float* __restrict__ delta, Elem* __restrict__ dq, int L, int S, int H, float scale,
                  const float* __restrict__ mask, long long msb, long long msh, long long msi, long long msj,
                  int has_mask, int kind, int text_len, int width, int radius, int prefix_len, int causal) {
    static_assert(D % 16 == 0, "the head dimension is a multiple of the mma's k = 16");
    constexpr int BT = backward_tile(D);  // keys per tile
    constexpr int LDK = D + PAD;          // K_j and V_j row by row
    constexpr int LDT = BT + PAD;         // K_j transposed: one row per column of K
    __shared__ __align__(16) Elem sK[BT * LDK];
    __shared__ __align__(16) Elem sKt[D * LDT];
    __shared__ __align__(16) Elem sV[BT * LDK];

    const Pattern pat = {kind, text_len, width, radius, prefix_len, causal != 0};
    const int bh = blockIdx.y, b = bh / H, h = bh % H;
    const int i0 = blockIdx.x * BQ, i1 = min(i0 + BQ, L);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane / 4, t = lane % 4;
    const int row[2] = {i0 + 16 * warp + g, i0 + 16 * warp + g + 8};
    const long long mbh = b * msb + h * msh;
    q += size_t(bh) * L * D;
    k += size_t(bh) * S * D;
    v += size_t(bh) * S * D;
    out += size_t(bh) * L * D;
    dout += size_t(bh) * L * D;

    // Q_i and dO_i as A operands: of S = Q_i K_jᵀ and dP = dO_i V_jᵀ.
    unsigned qa[D / 16][4], da[D / 16][4];
    load_a_fragments<Elem, D>(qa, q, i0 + 16 * warp, L);
    load_a_fragments<Elem, D>(da, dout, i0 + 16 * warp, L);

    // Line 6: D = rowsum(dO ∘ O) in fp32, each lane over the columns 8n + 2t, 8n + 2t + 1 of its rows (those of
    // its C fragments), then over the 4 lanes of its group.
    float dr[2], lr[2];
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float acc = 0.0f;
        if (row[r] < L) {
            const Elem* po = out + size_t(row[r]) * D + 2 * t;
            const Elem* pd = dout + size_t(row[r]) * D + 2 * t;
#pragma unroll
            for (int n = 0; n < D / 8; ++n)
                acc += Half<Elem>::to_float(po[8 * n]) * Half<Elem>::to_float(pd[8 * n]) +
                       Half<Elem>::to_float(po[8 * n + 1]) * Half<Elem>::to_float(pd[8 * n + 1]);
        }
        acc += __shfl_xor_sync(0xffffffffu, acc, 1);
        acc += __shfl_xor_sync(0xffffffffu, acc, 2);
        dr[r] = acc;
        if (row[r] < L && t == 0) delta[size_t(bh) * L + row[r]] = acc;
        const float x = row[r] < L ? lse[size_t(bh) * L + row[r]] : NEG_INF;
        lr[r] = x == NEG_INF ? POS_INF : x;
    }

    float acc[D / 8][4];  // dQ: 16×8 fp32 accumulators of columns 8n..8n+7
#pragma unroll
    for (int n = 0; n < D / 8; ++n) acc[n][0] = acc[n][1] = acc[n][2] = acc[n][3] = 0.0f;

    for (int j0 = 0; j0 < S; j0 += BT) {
        const int j1 = min(j0 + BT, S);
        if (!tile_may_attend(pat, i0, i1, j0, j1)) continue;  // the same decision in the whole block
        const bool full = !has_mask && i1 - i0 == BQ && j1 - j0 == BT && tile_all_visible(pat, i0, i1, j0, j1);
        __syncthreads();
        load_tile<Elem, D, BT>(sK, LDK, k, j0, S);
        load_tile_transposed<Elem, D, BT>(sKt, LDT, k, j0, S);
        load_tile<Elem, D, BT>(sV, LDK, v, j0, S);
        __syncthreads();

#pragma unroll 1
        for (int c = 0; c < BT / 16; ++c) {  // keys j0 + 16c .. j0 + 16c + 15
            // Lines 12 and 15: S = Q_i K_jᵀ and dP = dO_i V_jᵀ for 16 keys.
            float s[2][4], dp[2][4];
            two_products<Elem, D>(s, dp, qa, da, sK, sV, LDK, c);
            // Lines 13 and 16: P, then dS = P ∘ (dP − D) in place of S. Element e of s[nn] is row[e / 2], key
            // j0 + 16c + 8nn + 2t + e % 2.
#pragma unroll
            for (int nn = 0; nn < 2; ++nn) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int r = e / 2, kj = j0 + 16 * c + 8 * nn + 2 * t + e % 2;
                    const float p = recompute_p(s[nn][e], full, pat, row[r], kj, L, S, scale, mask, mbh, msi,
                                                msj, has_mask, lr[r]);
                    s[nn][e] = p * (dp[nn][e] - dr[r]);
                }
            }
            // Line 17: dQ_i += dS K_j, dS (16 queries × 16 keys) rounded to Elem as the A operand.
            unsigned dsa[4];
            c_to_a<Elem>(dsa, s);
#pragma unroll
            for (int n = 0; n < D / 8; ++n) {
                const Elem* p = sKt + (8 * n + g) * LDT + 16 * c + 2 * t;  // K[2t..2t+1][g] = Kᵀ[g][2t..2t+1]
                const unsigned kb[2] = {load2(p), load2(p + 8)};
                mma_16x8x16<Elem>(acc[n], dsa, kb);
            }
        }
    }

#pragma unroll
    for (int r = 0; r < 2; ++r) {
        if (row[r] >= L) continue;
        Elem* dst = dq + (size_t(bh) * L + row[r]) * D + 2 * t;
#pragma unroll
        for (int n = 0; n < D / 8; ++n)
            *reinterpret_cast<unsigned*>(dst + 8 * n) =
                pack2<Elem>(acc[n][2 * r] * scale, acc[n][2 * r + 1] * scale);
    }
}

// One kernel per key tile of BK rows: dV_j = Σ_i Pᵀ dO_i and dK_j = Σ_i dSᵀ Q_i · scale (Algorithm 2's outer loop,
// lines 7-21). Grid (ceil(S / BK), B·H), THREADS threads; launched after flash_backward_dq, whose delta it reads.
// dk and dv are (B·H, S, D).
template <typename Elem, int D>
__global__ void __launch_bounds__(THREADS)
flash_backward_dkdv(const Elem* __restrict__ q, const Elem* __restrict__ k, const Elem* __restrict__ v,
                    const Elem* __restrict__ dout, const float* __restrict__ lse, const float* __restrict__ delta,
                    Elem* __restrict__ dk, Elem* __restrict__ dv, int L, int S, int H, float scale,
                    const float* __restrict__ mask, long long msb, long long msh, long long msi, long long msj,
                    int has_mask, int kind, int text_len, int width, int radius, int prefix_len, int causal) {
    static_assert(D % 16 == 0, "the head dimension is a multiple of the mma's k = 16");
    constexpr int BT = backward_tile(D);  // queries per tile
    constexpr int LDQ = D + PAD;          // Q_i and dO_i row by row
    constexpr int LDT = BT + PAD;         // Q_i and dO_i transposed
    __shared__ __align__(16) Elem sQ[BT * LDQ];
    __shared__ __align__(16) Elem sQt[D * LDT];
    __shared__ __align__(16) Elem sdO[BT * LDQ];
    __shared__ __align__(16) Elem sdOt[D * LDT];
    __shared__ float sL[BT], sD[BT];  // lse (+∞ for a row that sees no key) and D of the tile's queries

    const Pattern pat = {kind, text_len, width, radius, prefix_len, causal != 0};
    const int bh = blockIdx.y, b = bh / H, h = bh % H;
    const int j0 = blockIdx.x * BK, j1 = min(j0 + BK, S);
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int g = lane / 4, t = lane % 4;
    const int key[2] = {j0 + 16 * warp + g, j0 + 16 * warp + g + 8};  // this lane's two key rows
    const long long mbh = b * msb + h * msh;
    q += size_t(bh) * L * D;
    k += size_t(bh) * S * D;
    v += size_t(bh) * S * D;
    dout += size_t(bh) * L * D;
    lse += size_t(bh) * L;
    delta += size_t(bh) * L;

    // Line 8: K_j and V_j, as A operands of Sᵀ = K_j Q_iᵀ and dPᵀ = V_j dO_iᵀ. Line 9: dK_j = dV_j = 0.
    unsigned ka[D / 16][4], va[D / 16][4];
    load_a_fragments<Elem, D>(ka, k, j0 + 16 * warp, S);
    load_a_fragments<Elem, D>(va, v, j0 + 16 * warp, S);
    float dka[D / 8][4], dva[D / 8][4];
#pragma unroll
    for (int n = 0; n < D / 8; ++n) {
        dka[n][0] = dka[n][1] = dka[n][2] = dka[n][3] = 0.0f;
        dva[n][0] = dva[n][1] = dva[n][2] = dva[n][3] = 0.0f;
    }

    for (int i0 = 0; i0 < L; i0 += BT) {  // line 10
        const int i1 = min(i0 + BT, L);
        if (!tile_may_attend(pat, i0, i1, j0, j1)) continue;  // the same decision in the whole block
        const bool full = !has_mask && i1 - i0 == BT && j1 - j0 == BK && tile_all_visible(pat, i0, i1, j0, j1);
        // Line 11: Q_i, dO_i (both ways), lse_i and D_i into shared memory.
        __syncthreads();
        load_tile<Elem, D, BT>(sQ, LDQ, q, i0, L);
        load_tile_transposed<Elem, D, BT>(sQt, LDT, q, i0, L);
        load_tile<Elem, D, BT>(sdO, LDQ, dout, i0, L);
        load_tile_transposed<Elem, D, BT>(sdOt, LDT, dout, i0, L);
        for (int idx = threadIdx.x; idx < BT; idx += THREADS) {
            const float x = i0 + idx < L ? lse[i0 + idx] : NEG_INF;
            sL[idx] = x == NEG_INF ? POS_INF : x;
            sD[idx] = i0 + idx < L ? delta[i0 + idx] : 0.0f;
        }
        __syncthreads();

#pragma unroll 1
        for (int c = 0; c < BT / 16; ++c) {  // queries i0 + 16c .. i0 + 16c + 15
            // Lines 12 and 15, transposed: Sᵀ = K_j Q_iᵀ and dPᵀ = V_j dO_iᵀ, this warp's 16 keys × 16 queries.
            float st[2][4], dpt[2][4];
            two_products<Elem, D>(st, dpt, ka, va, sQ, sdO, LDQ, c);
            // Lines 13 and 16: Pᵀ in place of Sᵀ, dSᵀ = Pᵀ ∘ (dPᵀ − D) in place of dPᵀ. Element e of st[nn] is key
            // key[e / 2], query i0 + ql with ql = 16c + 8nn + 2t + e % 2.
#pragma unroll
            for (int nn = 0; nn < 2; ++nn) {
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int ql = 16 * c + 8 * nn + 2 * t + e % 2;
                    const float p = recompute_p(st[nn][e], full, pat, i0 + ql, key[e / 2], L, S, scale, mask, mbh,
                                                msi, msj, has_mask, sL[ql]);
                    st[nn][e] = p;
                    dpt[nn][e] = p * (dpt[nn][e] - sD[ql]);
                }
            }
            // Lines 14 and 18: dV_j += Pᵀ dO_i and dK_j += dSᵀ Q_i over these 16 queries, Pᵀ and dSᵀ rounded to Elem.
            unsigned pa[4], dsa[4];
            c_to_a<Elem>(pa, st);
            c_to_a<Elem>(dsa, dpt);
#pragma unroll
            for (int n = 0; n < D / 8; ++n) {
                const int off = (8 * n + g) * LDT + 16 * c + 2 * t;  // dO[2t..2t+1][g] = dOᵀ[g][2t..2t+1]
                const unsigned db[2] = {load2(sdOt + off), load2(sdOt + off + 8)};
                const unsigned qb[2] = {load2(sQt + off), load2(sQt + off + 8)};
                mma_16x8x16<Elem>(dva[n], pa, db);
                mma_16x8x16<Elem>(dka[n], dsa, qb);
            }
        }
    }

    // Line 20: dK_j (times scale) and dV_j, rounded once to Elem.
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        if (key[r] >= S) continue;
        Elem* dst_k = dk + (size_t(bh) * S + key[r]) * D + 2 * t;
        Elem* dst_v = dv + (size_t(bh) * S + key[r]) * D + 2 * t;
#pragma unroll
        for (int n = 0; n < D / 8; ++n) {
            *reinterpret_cast<unsigned*>(dst_k + 8 * n) =
                pack2<Elem>(dka[n][2 * r] * scale, dka[n][2 * r + 1] * scale);
            *reinterpret_cast<unsigned*>(dst_v + 8 * n) = pack2<Elem>(dva[n][2 * r], dva[n][2 * r + 1]);
        }
    }
}

// Explicit instantiation, for compilers given the file alone (`nvcc -ptx -DFLASH_TC_INSTANTIATE_ALL`); NVRTC
// instantiates just the kernels that cuda_tc.py names (each costs seconds of compile time).
#define FLASH_TC_INSTANTIATE(Elem, D)                                                                          \
    template __global__ void flash_forward<Elem, D>(const Elem*, const Elem*, const Elem*, Elem*, float*, int, \
                                                    int, int, float, const float*, long long, long long,       \
                                                    long long, long long, int, int, int, int, int, int, int);  \
    template __global__ void flash_backward_dq<Elem, D>(                                                       \
        const Elem*, const Elem*, const Elem*, const Elem*, const Elem*, const float*, float*, Elem*, int, int, \
        int, float, const float*, long long, long long, long long, long long, int, int, int, int, int, int, int); \
    template __global__ void flash_backward_dkdv<Elem, D>(                                                     \
        const Elem*, const Elem*, const Elem*, const Elem*, const float*, const float*, Elem*, Elem*, int, int,  \
        int, float, const float*, long long, long long, long long, long long, int, int, int, int, int, int, int);
#ifdef FLASH_TC_INSTANTIATE_ALL
FLASH_TC_INSTANTIATE(__half, 32)
FLASH_TC_INSTANTIATE(__half, 64)
FLASH_TC_INSTANTIATE(__half, 128)
FLASH_TC_INSTANTIATE(__nv_bfloat16, 32)
FLASH_TC_INSTANTIATE(__nv_bfloat16, 64)
FLASH_TC_INSTANTIATE(__nv_bfloat16, 128)
#endif
