// Philox4x32-10 and the float32 noise transforms of kernels/philox.py, for the CUDA C++ kernels (kernels/*/*.cu):
// philox.py's `cuda_source()` puts its constants (#defines PHILOX_*, LOG32_C0 …) and then this file in front of a
// kernel's source. Written with the same float32 operations in the same order as philox.py's `float32_functions`,
// so a compiler for the CPU that does not contract multiply-adds (the tests' builds, with CUDA_HOST_EMULATION) gives
// the NumPy spec's bits; NVRTC contracts them into FMAs, as numba.cuda does: within an ulp or two.

#ifndef CUDA_HOST_EMULATION
#define PHILOX_DEVICE __device__ __forceinline__
#else
#define PHILOX_DEVICE static inline
#endif

PHILOX_DEVICE unsigned mulhi32(unsigned a, unsigned b) {
#ifndef CUDA_HOST_EMULATION
    return __umulhi(a, b);
#else
    return (unsigned)(((unsigned long long)a * b) >> 32);
#endif
}

// Philox4x32-10 (Salmon et al. 2011): counter (c0, c1, 0, 0), key (k0, k1) → four words
PHILOX_DEVICE void philox_block(unsigned long long block, unsigned k0, unsigned k1, unsigned w[4]) {
    unsigned c0 = (unsigned)block, c1 = (unsigned)(block >> 32), c2 = 0u, c3 = 0u;
#pragma unroll
    for (int r = 0; r < 10; ++r) {
        unsigned hi0 = mulhi32(PHILOX_M0, c0), lo0 = PHILOX_M0 * c0;
        unsigned hi1 = mulhi32(PHILOX_M1, c2), lo1 = PHILOX_M1 * c2;
        c0 = hi1 ^ c1 ^ k0;
        c1 = lo1;
        c2 = hi0 ^ c3 ^ k1;
        c3 = lo0;
        k0 += PHILOX_W0;
        k1 += PHILOX_W1;
    }
    w[0] = c0, w[1] = c1, w[2] = c2, w[3] = c3;
}

PHILOX_DEVICE float bits_f32(unsigned u) {
#ifndef CUDA_HOST_EMULATION
    return __uint_as_float(u);
#else
    float f;
    __builtin_memcpy(&f, &u, 4);
    return f;
#endif
}

PHILOX_DEVICE unsigned f32_bits(float f) {
#ifndef CUDA_HOST_EMULATION
    return __float_as_uint(f);
#else
    unsigned u;
    __builtin_memcpy(&u, &f, 4);
    return u;
#endif
}

// m·2⁻²³ for 0 ≤ m < 2²³, exactly: the bits of 1 + m·2⁻²³, minus 1
PHILOX_DEVICE float int_to_f32(unsigned m) { return bits_f32(0x3F800000u | m) - 1.0f; }

// philox.uniform32: ((w >> 9) + ½)·2⁻²³, or (w + ½)·2⁻³² below 2²³; exact, never 0 or 1
PHILOX_DEVICE float uniform32(unsigned w) {
    unsigned coarse = w >= 0x800000u ? 1u : 0u;
    float v = int_to_f32(w >> (9u * coarse)) + 0x1p-24f;
    return v * bits_f32(0x3F800000u - (9u << 23) * (1u - coarse));
}

// philox.log32: ln x = k·ln 2 + f − f²/2 + f³ P(f), x = 2^k·(1 + f) with 1 + f in [√½, √2)
PHILOX_DEVICE float log32(float x) {
    int b = (int)f32_bits(x);
    int hx = b & 0x7FFFFF;
    int i = (hx + PHILOX_SQRT2_CARRY) & 0x800000;
    float k = bits_f32((unsigned)(0x4B400000 + (b >> 23) - 127 + (i >> 23))) - 0x1.8p+23f;
    float f = bits_f32((unsigned)(hx | (i ^ 0x3F800000))) - 1.0f;
    float p = LOG32_C0 + f * (LOG32_C1 + f * (LOG32_C2 + f * (LOG32_C3 + f * (LOG32_C4 + f * (LOG32_C5 + f * (LOG32_C6 +
              f * LOG32_C7))))));
    return k * LN2_HI32 + (k * LN2_LO32 + (f + (f * f) * (f * p - 0.5f)));
}

// philox.cos_sin_2pi32: the angle reduced exactly on the word (top 3 bits the octant, the next 23 the place in it)
PHILOX_DEVICE void cos_sin_2pi32(unsigned w, float* cos_t, float* sin_t) {
    unsigned octant = w >> 29;
    unsigned odd = octant & 1u;
    unsigned frac = ((w >> 6) & 0x7FFFFFu) ^ (odd * 0x7FFFFFu);
    float x = (int_to_f32(frac) + 0x1p-24f) * QUARTER_PI_F32;
    float z = x * x;
    unsigned c = f32_bits((1.0f - 0.5f * z) + (z * z) * (COS32_C0 + z * (COS32_C1 + z * COS32_C2)));
    unsigned s = f32_bits(x + (x * z) * (SIN32_C0 + z * (SIN32_C1 + z * SIN32_C2))) ^ (odd << 31);
    unsigned q = ((octant + 1u) >> 1) & 3u;
    unsigned swap = 0u - (q & 1u);
    *cos_t = bits_f32(((s & swap) | (c & ~swap)) ^ (((q ^ (q >> 1)) & 1u) << 31));
    *sin_t = bits_f32(((c & swap) | (s & ~swap)) ^ ((q >> 1) << 31));
}

// philox.normal4_32: Box–Muller over the word pairs (0, 1) and (2, 3) of block b
PHILOX_DEVICE void normal4_32(unsigned long long block, unsigned k0, unsigned k1, float z[4]) {
    unsigned w[4];
    philox_block(block, k0, k1, w);
    for (int h = 0; h < 2; ++h) {
        float r = sqrtf(-2.0f * log32(uniform32(w[2 * h])));
        float c, s;
        cos_sin_2pi32(w[2 * h + 1], &c, &s);
        z[2 * h] = r * c;
        z[2 * h + 1] = r * s;
    }
}

// philox.gumbel32: g = −ln(−ln u) of a word, both logs log32
PHILOX_DEVICE float gumbel32(unsigned w) { return -log32(-log32(uniform32(w))); }
