"""Philox4x32-10: the counter-based random number generator every kernel draws its noise from.

Salmon, Moraes, Dror & Shaw, "Parallel random numbers: as easy as 1, 2, 3" (SC 2011). A counter-based
generator is a pure function: 128 bits of counter and 64 bits of key go in, 128 random bits come out.
There is no state to carry from one draw to the next, so every element of an array can draw its own
number, in any order, on any number of threads, on a CPU or a GPU — and the same (seed, element index)
always gives the same bits. That is what lets the NumPy spec, the Numba CPU kernel and the CUDA kernel of
a family draw *bitwise the same* uniforms for the same seed.

The mapping used by every kernel in this project (one Philox call feeds four consecutive elements):

    key     = (seed mod 2^32, seed div 2^32)              the 64-bit seed
    counter = (b mod 2^32, b div 2^32, 0, 0)              b = i div 4, i = the element's flat (C-order) index
    word    = output word number (i mod 4)
    u       = (word + 1/2) / 2^32                         in (0, 1), never 0 or 1, exact in float64

and standard normals by the Box–Muller transform within each block of four words: the pairs of words
(0, 1) and (2, 3) give (u1, u2), r = sqrt(−2 ln u1), θ = 2π u2, and the even element of the pair takes
r cos θ, the odd one r sin θ.

float32 arrays get float32 noise, as PyTorch and cuRAND give them: the same words, mapped to float32 uniforms
(`uniform32`) and put through the same Box–Muller transform in float32 arithmetic (`normal32`). Its log, sin
and cos are written here as polynomials (errors under 1, 1 and 1.3 ulp) with exact argument reduction, in
operations that IEEE-754 rounds the same way everywhere (+, −, ×, √, bit casts): the NumPy spec and the Numba
CPU kernels give bitwise the same float32 noise, and a GPU, which contracts a·b + c into one fused
multiply-add, differs by an ulp or two. It costs a fraction of the float64 transform — on a GPU, whose float64
units are fewer, the float64 noise alone was more than the time the memory traffic needs.

This module holds the generator three ways, from one source where the language allows it:
- `philox4x32_10`, `philox_block` and `to_uniform` are written with operators only, so the very same
  function runs on NumPy arrays (the reference: all elements at once), is compiled by `numba.njit`
  (the CPU kernels) and by `numba.cuda.jit(device=True)` (the CUDA kernels);
- `uniform(seed, index)` / `normal(seed, index)` are the NumPy spec over index arrays, and `uniform32` /
  `normal32` the float32 one (`float32_functions` builds its transforms from one source for NumPy, Numba and
  numba.cuda alike);
- `scalar_functions(jit)` compiles the per-element functions with a given decorator: `cpu` holds them
  compiled with `numba.njit`, and `cuda_device_functions()` compiles them for CUDA on first use (so that
  importing this module never imports numba.cuda — the simulator must be chosen before that import);
- `cached_njit` compiles the CPU kernels that inline these functions with Numba's disk cache, keyed also on
  this file's contents, so that an edit here recompiles them.
"""

from __future__ import annotations

import hashlib
import math
import types
from pathlib import Path

import numpy as np
from llvmlite import ir
from numba import njit
from numba.core import types as nbtypes
from numba.core.caching import FunctionCache
from numba.extending import intrinsic

# The Philox4x32 multipliers and Weyl key increments (Random123, philox.h: PHILOX_M4x32_0/1, PHILOX_W32_0/1;
# the W are the golden ratio and sqrt(3) - 1 in 0.32 fixed point).
PHILOX_M0 = np.uint64(0xD2511F53)
PHILOX_M1 = np.uint64(0xCD9E8D57)
PHILOX_W0 = np.uint64(0x9E3779B9)
PHILOX_W1 = np.uint64(0xBB67AE85)
ROUNDS = 10
MASK32 = np.uint64(0xFFFFFFFF)
SHIFT32 = np.uint64(32)
ZERO = np.uint64(0)
TWO_POW_M32 = 2.0**-32
TWO_PI = 2.0 * math.pi
# Angle reduction for Box–Muller's cos/sin (see cos_sin_2pi) and fdlibm's kernel polynomials for sin and cos
# on [-π/4, π/4] (__kernel_sin S1..S6, __kernel_cos C1..C6).
ONE, THREE = np.uint64(1), np.uint64(3)
OCTANT_SHIFT = np.uint64(29)
OCTANT_MASK = np.uint64(2**29 - 1)
OCTANT_SIZE = np.uint64(2**29)
QUARTER_PI_OVER_OCTANT = (math.pi / 4) * 2.0**-29
SIN_C = (-1.66666666666666324348e-01, 8.33333333332248946124e-03, -1.98412698298579493134e-04,
         2.75573137070700676789e-06, -2.50507602534068634195e-08, 1.58969099521155010221e-10)
COS_C = (4.16666666666666019037e-02, -1.38888888888741095749e-03, 2.48015872894767294178e-05,
         -2.75573143513906633035e-07, 2.08757232129817482790e-09, -1.13596475577881948265e-11)


def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32 with 10 rounds: counter (c0, c1, c2, c3) and key (k0, k1) → four random 32-bit words.

    Every value is a uint64 holding 32 bits (so the 32×32 → 64-bit product is exact); works on NumPy
    uint64 arrays and on scalars under numba.njit and numba.cuda alike. One round (Salmon et al., §4.3):
        (hi0, lo0) = M0 · c0,   (hi1, lo1) = M1 · c2
        c ← (hi1 ⊕ c1 ⊕ k0,  lo1,  hi0 ⊕ c3 ⊕ k1,  lo0)
    and the key is bumped by the Weyl constants between rounds.
    """
    for _ in range(ROUNDS):
        p0 = PHILOX_M0 * c0
        p1 = PHILOX_M1 * c2
        c0, c1, c2, c3 = (p1 >> SHIFT32) ^ c1 ^ k0, p1 & MASK32, (p0 >> SHIFT32) ^ c3 ^ k1, p0 & MASK32
        k0 = (k0 + PHILOX_W0) & MASK32
        k1 = (k1 + PHILOX_W1) & MASK32
    return c0, c1, c2, c3


def philox_block(k0, k1, block):
    """The four words of Philox block `block` (uint64) under key (k0, k1): counter = (block lo, block hi, 0, 0)."""
    return philox4x32_10(block & MASK32, block >> SHIFT32, ZERO, ZERO, k0, k1)


def to_uniform(word):
    """A 32-bit word → (word + 1/2) / 2^32, a float64 in (0, 1); never 0 or 1, so −log(−log u) is finite."""
    return (word + 0.5) * TWO_POW_M32


def seed_key(seed):
    """Split a seed (an int in [0, 2^64)) into the Philox key words (k0, k1), as np.uint64."""
    seed = int(seed)
    if not 0 <= seed < 2**64:
        raise ValueError(f"seed must be an int in [0, 2**64), got {seed}")
    return np.uint64(seed & 0xFFFFFFFF), np.uint64(seed >> 32)


# ---------------------------------------------------------------------------------------------------------
# The NumPy spec: all elements at once.
# ---------------------------------------------------------------------------------------------------------
def _words(seed, index):
    """The four Philox words of the block of every index, and the index's lane (index mod 4)."""
    k0, k1 = seed_key(seed)
    index = np.asarray(index)
    if index.size and index.min() < 0:
        raise ValueError("element indices must be non-negative")
    index = index.astype(np.uint64)
    words = np.stack(philox_block(k0, k1, index >> np.uint64(2)))  # (4, *index.shape)
    return words, (index & np.uint64(3)).astype(np.intp)


def uniform(seed, index):
    """Uniform(0, 1) float64 for each element index (any integer array shape): word (i mod 4) of block i div 4."""
    words, lane = _words(seed, index)
    return to_uniform(np.take_along_axis(words, lane[None], axis=0)[0])


def normal(seed, index):
    """Standard normal float64 for each element index, by Box–Muller over the word pairs (0, 1) and (2, 3)."""
    words, lane = _words(seed, index)
    first = (lane >> 1) << 1  # the even word of the element's pair
    u1 = to_uniform(np.take_along_axis(words, first[None], axis=0)[0])
    u2 = to_uniform(np.take_along_axis(words, first[None] + 1, axis=0)[0])
    r, theta = np.sqrt(-2.0 * np.log(u1)), TWO_PI * u2
    return np.where(lane & 1, r * np.sin(theta), r * np.cos(theta))


def uniform32(seed, index):
    """Uniform(0, 1) float32 for each element index: `float32_functions`' uniform32 of the element's word."""
    words, lane = _words(seed, index)
    return _np32.uniform32(np.take_along_axis(words, lane[None], axis=0)[0])


def normal32(seed, index):
    """Standard normal float32 for each element index: Box–Muller in float32 over the word pairs (0, 1), (2, 3)."""
    words, lane = _words(seed, index)
    first = (lane >> 1) << 1
    zc, zs = _np32.box_muller32(np.take_along_axis(words, first[None], axis=0)[0],
                                np.take_along_axis(words, first[None] + 1, axis=0)[0])
    return np.where(lane & 1, zs, zc)


def gumbel32(seed, index):
    """float32 Gumbel(0, 1) noise for each element index: −log32(−log32 u) of its float32 uniform."""
    words, lane = _words(seed, index)
    return _np32.gumbel32(np.take_along_axis(words, lane[None], axis=0)[0])


def normal_like(seed, index, dtype):
    """The noise an array of `dtype` draws: `normal32` for float32, `normal` (float64) otherwise, in that dtype."""
    return normal32(seed, index) if np.dtype(dtype) == np.float32 else normal(seed, index).astype(dtype)


# ---------------------------------------------------------------------------------------------------------
# Per-element functions for the compiled kernels (one source, compiled by numba.njit or numba.cuda).
# ---------------------------------------------------------------------------------------------------------
def scalar_functions(jit, log=math.log, sqrt32=math.sqrt, bits32=None, from_bits32=None):
    """Compile the per-element generator with `jit` (and `log`, the natural log float64 Box–Muller uses; sqrt32,
    bits32 and from_bits32 for the float32 transforms, see float32_functions); returns a namespace of compiled
    functions:

    - block(k0, k1, b) → 4 words of block b (b a uint64),
    - uniform4(k0, k1, b) → the 4 uniforms of elements 4b .. 4b+3, and uniform4_32 their float32 uniforms,
    - normal4(k0, k1, b) → the 4 normals of elements 4b .. 4b+3, and normal4_32 their float32 normals,
    - gumbel4_32(k0, k1, b) → the float32 Gumbel noise of elements 4b .. 4b+3,
    - uniform_at(k0, k1, i) / normal_at(k0, k1, i) → the number of element i (an int64) alone.
    A kernel that walks elements in order calls uniform4/normal4 once per four elements.
    """
    philox = jit(philox4x32_10)
    uniform = jit(to_uniform)
    f32 = float32_functions(jit, sqrt32, bits32 or f32_bits, from_bits32 or bits_f32)
    uniform32, box_muller32, gumbel32 = f32.uniform32, f32.box_muller32, f32.gumbel32

    @jit
    def block(k0, k1, b):  # philox_block, calling the compiled philox
        return philox(b & MASK32, b >> SHIFT32, ZERO, ZERO, k0, k1)

    @jit
    def uniform4(k0, k1, b):
        w0, w1, w2, w3 = block(k0, k1, b)
        return uniform(w0), uniform(w1), uniform(w2), uniform(w3)

    @jit
    def sin_poly(x):  # sin x for |x| <= π/4 (fdlibm's __kernel_sin minimax polynomial, error < 1 ulp)
        z = x * x
        return x + x * z * (SIN_C[0] + z * (SIN_C[1] + z * (SIN_C[2] + z * (SIN_C[3] + z * (SIN_C[4] + z * SIN_C[5])))))

    @jit
    def cos_poly(x):  # cos x for |x| <= π/4 (fdlibm's __kernel_cos minimax polynomial)
        z = x * x
        r = z * z * (COS_C[0] + z * (COS_C[1] + z * (COS_C[2] + z * (COS_C[3] + z * (COS_C[4] + z * COS_C[5])))))
        return (1.0 - 0.5 * z) + r

    @jit
    def cos_sin_2pi(w):
        """(cos θ, sin θ) for θ = 2π·to_uniform(w), reducing the angle exactly on the integer word.

        The top 3 bits of w pick the octant o of the circle and the low 29 bits the place f in it, so
        θ = (o + f)·π/4 with no rounding in the reduction. In an even octant θ = Q·π/2 + x with x = f·π/4; in
        an odd one θ = Q·π/2 − x with x = (1 − f)·π/4 (Q = (o + 1) div 2); then a quarter-turn rotation by Q.
        """
        octant = w >> OCTANT_SHIFT
        odd = octant & ONE
        mf = (w & OCTANT_MASK) + 0.5
        x = (mf if odd == 0 else OCTANT_SIZE - mf) * QUARTER_PI_OVER_OCTANT
        c = cos_poly(x)
        s = sin_poly(x) * (1.0 - 2.0 * odd)  # odd octants measure the angle back from the upper edge
        q = ((octant + ONE) >> ONE) & THREE
        # rotate by q quarter turns: (c, s) → (c, s), (−s, c), (−c, −s), (s, −c); written with a select and
        # exact ±1 factors instead of branches, so that loops over it vectorize
        swap = q & ONE
        cos_t = (c if swap == 0 else s) * (1.0 - 2.0 * ((q ^ (q >> ONE)) & ONE))
        sin_t = (s if swap == 0 else c) * (1.0 - 2.0 * (q >> ONE))
        return cos_t, sin_t

    @jit
    def normal4(k0, k1, b):
        w0, w1, w2, w3 = block(k0, k1, b)
        r0 = math.sqrt(-2.0 * log(uniform(w0)))  # Box–Muller: r = sqrt(-2 ln u1), θ = 2π u2
        c0, s0 = cos_sin_2pi(w1)
        r1 = math.sqrt(-2.0 * log(uniform(w2)))
        c1, s1 = cos_sin_2pi(w3)
        return r0 * c0, r0 * s0, r1 * c1, r1 * s1

    @jit
    def uniform4_32(k0, k1, b):
        w0, w1, w2, w3 = block(k0, k1, b)
        return uniform32(w0), uniform32(w1), uniform32(w2), uniform32(w3)

    @jit
    def gumbel4_32(k0, k1, b):
        w0, w1, w2, w3 = block(k0, k1, b)
        return gumbel32(w0), gumbel32(w1), gumbel32(w2), gumbel32(w3)

    @jit
    def normal4_32(k0, k1, b):
        w0, w1, w2, w3 = block(k0, k1, b)
        z0, z1 = box_muller32(w0, w1)
        z2, z3 = box_muller32(w2, w3)
        return z0, z1, z2, z3

    @jit
    def uniform_at(k0, k1, i):
        w0, w1, w2, w3 = block(k0, k1, np.uint64(i >> 2))
        lane = i & 3
        w = w0 if lane == 0 else (w1 if lane == 1 else (w2 if lane == 2 else w3))
        return uniform(w)

    @jit
    def normal_at(k0, k1, i):
        z0, z1, z2, z3 = normal4(k0, k1, np.uint64(i >> 2))
        lane = i & 3
        return z0 if lane == 0 else (z1 if lane == 1 else (z2 if lane == 2 else z3))

    return types.SimpleNamespace(block=block, uniform=uniform, uniform4=uniform4, normal4=normal4,
                                 cos_sin_2pi=cos_sin_2pi, uniform_at=uniform_at, normal_at=normal_at,
                                 uniform4_32=uniform4_32, normal4_32=normal4_32, gumbel4_32=gumbel4_32, f32=f32)


# ---------------------------------------------------------------------------------------------------------
# Vectorizable log and exp for the CPU kernels.
#
# Numba calls libm for math.log / math.exp, and a loop with a call in it is never vectorized (Numba has no
# vector math library unless Intel's SVML is installed). These are fdlibm's algorithms (e_log.c, e_exp.c; error
# < 1 ulp) written with arithmetic and bit casts only, so that LLVM vectorizes the loops that call them. CPU only
# (the bit casts are LLVM intrinsics); the CUDA kernels use the GPU's math.log / math.exp.
# ---------------------------------------------------------------------------------------------------------


def _float_bits(float_type, int_type):
    """An intrinsic: the IEEE-754 bits of a float_type value as int_type (a bit cast, no conversion)."""

    def bits(typingctx, x):
        if x != float_type:
            return None
        cast = lambda context, builder, sig, args: builder.bitcast(args[0], ir.IntType(int_type.bitwidth))  # noqa: E731
        return int_type(float_type), cast

    return intrinsic(bits)


f64_bits = _float_bits(nbtypes.float64, nbtypes.int64)


@intrinsic
def bits_f64(typingctx, x):
    """The float64 whose IEEE-754 bits are the int64 x."""
    if x != nbtypes.int64:
        return None
    return nbtypes.float64(nbtypes.int64), lambda context, builder, sig, args: builder.bitcast(args[0], ir.DoubleType())


LN2_HI, LN2_LO, INV_LN2 = 6.93147180369123816490e-01, 1.90821492927058770002e-10, 1.44269504088896338700e+00
LG = (6.666666666666735130e-01, 3.999999999940941908e-01, 2.857142874366239149e-01, 2.222219843214978396e-01,
      1.818357216161805012e-01, 1.531383769920937332e-01, 1.479819860511658591e-01)
EXP_P = (1.66666666666666019037e-01, -2.77777777770155933842e-03, 6.61375632143793436117e-05,
         -1.65339022054652515390e-06, 4.13813679705723846039e-08)
MANTISSA = 0x000FFFFFFFFFFFFF
EXP_ONE = 0x3FF0000000000000


@njit(inline="always")
def fast_log(x):
    """log x for a positive, finite, normal float64 x (fdlibm e_log.c; no checks for 0, inf, NaN or subnormals).

    x = 2^k · m with m in [√2/2, √2); f = m − 1, s = f/(2 + f); log m = 2 atanh s = f − f²/2 + s(f²/2 + R(s²)).
    """
    bits = f64_bits(x)
    k = (bits >> 52) - 1023
    hx = bits & MANTISSA
    i = (hx + 0x95F6400000000) & 0x10000000000000  # set when the mantissa is ≥ √2: use x/2 and k + 1
    k += i >> 52
    f = bits_f64(hx | (i ^ EXP_ONE)) - 1.0
    s = f / (2.0 + f)
    z = s * s
    w = z * z
    r = z * (LG[0] + w * (LG[2] + w * (LG[4] + w * LG[6]))) + w * (LG[1] + w * (LG[3] + w * LG[5]))
    hfsq = 0.5 * f * f
    dk = np.float64(k)
    return dk * LN2_HI - ((hfsq - (s * (hfsq + r) + dk * LN2_LO)) - f)


@njit(inline="always")
def fast_exp(x):
    """e^x for x ≤ 709 (fdlibm e_exp.c); 0 below −708 (where e^x is subnormal) and NaN for NaN.

    x = k·ln2 + r with |r| ≤ ln2/2; e^r = 1 + r + r·c/(2 − c), c = r − r²(P1 + r²(P2 + …)); e^x = 2^k e^r.
    """
    k = math.floor(x * INV_LN2 + 0.5) if x > -708.0 else 0
    dk = np.float64(k)
    hi = x - dk * LN2_HI
    lo = dk * LN2_LO
    r = hi - lo
    t = r * r
    c = r - t * (EXP_P[0] + t * (EXP_P[1] + t * (EXP_P[2] + t * (EXP_P[3] + t * EXP_P[4]))))
    y = 1.0 - ((lo - (r * c) / (2.0 - c)) - hi)
    y = bits_f64(f64_bits(y) + (np.int64(k) << 52))  # · 2^k
    if x > -708.0:
        return y
    if x != x:  # NaN stays NaN
        return x
    return 0.0


# ---------------------------------------------------------------------------------------------------------
# float32 noise: the uniform, log, cos/sin and Box–Muller in float32 arithmetic, one source for every form
# ---------------------------------------------------------------------------------------------------------
f32_bits = _float_bits(nbtypes.float32, nbtypes.int32)


@intrinsic
def bits_f32(typingctx, x):
    """The float32 whose IEEE-754 bits are the low 32 bits of the integer x (of 32 bits or more)."""
    if not isinstance(x, nbtypes.Integer) or x.bitwidth < 32:
        return None

    def codegen(context, builder, sig, args):
        low = builder.trunc(args[0], ir.IntType(32)) if x.bitwidth > 32 else args[0]
        return builder.bitcast(low, ir.FloatType())

    return nbtypes.float32(x), codegen


def np_f32_bits(x):
    """f32_bits for NumPy values (the reference, and the CUDA simulator's Python device functions)."""
    return np.asarray(x, np.float32).view(np.int32)


def np_bits_f32(b):
    """bits_f32 for NumPy values."""
    return np.asarray(b, np.int32).view(np.float32)


F32, I32 = np.float32, np.int32
TAIL = np.uint64(2**23)  # words below this keep all 32 bits in their float32 uniform
TAIL_MASK = np.uint64(2**23 - 1)
SHIFT6, SHIFT9 = np.uint64(6), np.uint64(9)
HALF32, ONE32, MINUS_TWO32 = F32(0.5), F32(1.0), F32(-2.0)
TWO_POW_M24_F32 = F32(2.0**-24)
QUARTER_PI_F32 = F32(math.pi / 4)
MANTISSA32, EXP_ONE32, SIGN32 = np.int32(0x7FFFFF), np.int32(0x3F800000), np.int32(-(2**31))
NINE_OCTAVES32 = np.int32(9 << 23)  # subtracted from 1.0's exponent bits: 2⁻⁹
SQRT2_CARRY, BIT23 = np.int32(0x800000 - 0x3504F3), np.int32(0x800000)  # 0x3504F3: the mantissa bits of √2
INT_MAGIC_BITS, INT_MAGIC = np.int32(0x4B400000), F32(1.5 * 2**23)  # bits(1.5·2²³ + k) = bits(1.5·2²³) + k, |k| < 2²²
LN2_HI32, LN2_LO32 = F32(0.693145751953125), F32(1.428606765330187e-06)  # ln 2 = hi + lo; k·hi is exact
# Polynomials fitted for float32 by weighted least squares at Chebyshev nodes (relative error), coefficients
# rounded to float32; measured over every float32 argument: log < 1 ulp, sin < 0.75 ulp, cos < 1.3 ulp.
# ln(1 + f) = f − f²/2 + f³ P(f) on [√½ − 1, √2 − 1]
LOG32_C = tuple(F32(c) for c in (0.3333335518836975, -0.2500085234642029, 0.19999825954437256, -0.16621370613574982,
                                 0.14227114617824554, -0.13202103972434998, 0.1262032687664032, -0.07362867891788483))
# sin x = x + x³ S(x²), cos x = 1 − x²/2 + x⁴ C(x²) on [0, π/4]
SIN32_C = (F32(-0.16666655242443085), F32(0.008332186378538609), F32(-0.0001951815065694973))
COS32_C = (F32(0.04166664555668831), F32(-0.0013887312961742282), F32(2.443284392938949e-05))


def float32_functions(jit, sqrt, bits, from_bits):
    """The float32 noise transforms, compiled with `jit` (the identity for NumPy arrays, numba.njit, or
    numba.cuda.jit(device=True)), given that target's square root and float32 ↔ int32 bit casts.

    Written with operators only, so that the same source runs on NumPy arrays and on scalars: a select is a mask,
    a sign change an exclusive or of the sign bit, and an integer m < 2²³ becomes a float as the bits of 1 + m·2⁻²³
    minus 1 — a GPU converts 64-bit integers to floats at an eighth of its arithmetic rate. Every float constant is
    a float32 (a float64 one would promote the arithmetic), every integer one an int32 or uint64 like its operand.
    Numba computes an operation on int32 values in int64; `I32(...)` around each int32 result (a no-op on the
    values, all of which fit) lets LLVM keep the vector code 32 bits wide: 16 lanes of AVX-512 instead of 8 plus
    conversions (log32 on this project's CPU: 0.64 → 0.44 ns an element).
    """

    @jit
    def sel(mask, a, b):
        """a where the int32 mask is all ones, b where it is 0 (bitwise)."""
        return I32((a & mask) | (b & ~mask))

    @jit
    def int_to_f32(m):
        """m·2⁻²³ for an integer 0 ≤ m < 2²³, exactly."""
        return from_bits(I32(EXP_ONE32 | I32(m))) - ONE32

    @jit
    def uniform32(w):
        """A 32-bit word (uint64) → a float32 uniform in (0, 1): ((w >> 9) + ½)·2⁻²³ (23 bits, like PyTorch's float
        uniforms), except below 2²³, where (w + ½)·2⁻³² keeps all 32 bits — so that a normal's radius reaches
        √(−2 ln 2⁻³³) ≈ 6.8. Every value is exact in float32, and never 0 or 1."""
        coarse = np.uint64(w >= TAIL)
        v = int_to_f32(w >> (SHIFT9 * coarse)) + TWO_POW_M24_F32  # (m + ½)·2⁻²³
        return v * from_bits(I32(EXP_ONE32 - I32(NINE_OCTAVES32 * I32(I32(1) - I32(coarse)))))  # ·2⁻⁹ below

    @jit
    def log32(x):
        """ln x for a positive, normal float32 x (< 1 ulp): x = 2^k·m with m in [√½, √2), f = m − 1 (exact),
        ln x = k·ln 2 + f − f²/2 + f³ P(f)."""
        b = bits(x)
        hx = I32(b & MANTISSA32)
        i = I32((hx + SQRT2_CARRY) & BIT23)  # set when m's mantissa is ≥ √2's: take m/2 and k + 1
        k = from_bits(I32(INT_MAGIC_BITS + (b >> 23) - 127 + (i >> 23))) - INT_MAGIC
        f = from_bits(I32(hx | (i ^ EXP_ONE32))) - ONE32
        c = LOG32_C
        p = c[0] + f * (c[1] + f * (c[2] + f * (c[3] + f * (c[4] + f * (c[5] + f * (c[6] + f * c[7]))))))
        return k * LN2_HI32 + (k * LN2_LO32 + (f + f * f * (f * p - HALF32)))

    @jit
    def cos_sin_2pi32(w):
        """(cos θ, sin θ) for θ = 2π·(the word's top 26 bits + ½)·2⁻²⁶, reduced exactly on the integer word: the top
        3 bits pick the octant, the next 23 the place in it (cos_sin_2pi's reduction, in float32)."""
        octant = w >> OCTANT_SHIFT
        odd = I32(octant & ONE)
        frac = I32(I32((w >> SHIFT6) & TAIL_MASK) ^ I32(odd * MANTISSA32))  # odd octants: 2²³ − 1 − frac, from the top
        x = (int_to_f32(frac) + TWO_POW_M24_F32) * QUARTER_PI_F32
        z = x * x
        c = bits((ONE32 - HALF32 * z) + z * z * (COS32_C[0] + z * (COS32_C[1] + z * COS32_C[2])))
        s = I32(bits(x + x * z * (SIN32_C[0] + z * (SIN32_C[1] + z * SIN32_C[2]))) ^ I32(odd * SIGN32))
        q = ((octant + ONE) >> ONE) & THREE  # rotate by q quarter turns, as cos_sin_2pi does
        swap = I32(-I32(q & ONE))
        cos_t = I32(sel(swap, s, c) ^ I32(I32((q ^ (q >> ONE)) & ONE) * SIGN32))
        sin_t = I32(sel(swap, c, s) ^ I32(I32(q >> ONE) * SIGN32))
        return from_bits(cos_t), from_bits(sin_t)

    @jit
    def gumbel32(w):
        """The float32 Gumbel noise of a word: g = −ln(−ln u(w)), both logs log32."""
        return -log32(-log32(uniform32(w)))

    @jit
    def box_muller32(w0, w1):
        """The float32 normals (r cos θ, r sin θ) of a pair of words: r = √(−2 ln u(w0)), θ = 2π u(w1)."""
        r = sqrt(MINUS_TWO32 * log32(uniform32(w0)))
        c, s = cos_sin_2pi32(w1)
        return r * c, r * s

    return types.SimpleNamespace(uniform32=uniform32, log32=log32, cos_sin_2pi32=cos_sin_2pi32, gumbel32=gumbel32,
                                 box_muller32=box_muller32)


_np32 = float32_functions(lambda f: f, np.sqrt, np_f32_bits, np_bits_f32)
log32 = _np32.log32  # the float32 log on NumPy arrays (the spec the compiled forms follow)


def block_filler(values4):
    """A CPU helper, fill(k0, k1, first, n, buf): buf[j] for j < n + (first mod 4) = the values of the Philox blocks
    covering flat indices first … first + n − 1, four per call of values4(k0, k1, block) (uniform4, normal4_32, …);
    buf[first mod 4 + j] belongs to index first + j. Branch-free over whole blocks, so the loop vectorizes."""

    @njit(inline="always")
    def fill(k0, k1, first, n, buf):
        b0 = first >> 2
        for b in range(((first & 3) + n + 3) >> 2):
            v0, v1, v2, v3 = values4(k0, k1, np.uint64(b0 + b))
            buf[4 * b] = v0
            buf[4 * b + 1] = v1
            buf[4 * b + 2] = v2
            buf[4 * b + 3] = v3

    return fill


# ---------------------------------------------------------------------------------------------------------
# The CUDA C++ kernels' copy (philox.cuh), with this module's constants
# ---------------------------------------------------------------------------------------------------------
CUDA_HEADER = Path(__file__).with_name("philox.cuh")


def _f32_literal(v) -> str:
    """A float32 value as an exact C++ hex-float literal."""
    return f"({float(np.float32(v)).hex()}f)"


def cuda_source(kernel_source: str) -> str:
    """A CUDA C++ kernel's source with this module's constants (#defines) and philox.cuh — Philox4x32-10 and the
    float32 transforms, written operation for operation as float32_functions — in front of it."""
    defs = {"PHILOX_M0": f"{int(PHILOX_M0)}u", "PHILOX_M1": f"{int(PHILOX_M1)}u", "PHILOX_W0": f"{int(PHILOX_W0)}u",
            "PHILOX_W1": f"{int(PHILOX_W1)}u", "PHILOX_SQRT2_CARRY": str(int(SQRT2_CARRY)),
            "LN2_HI32": _f32_literal(LN2_HI32), "LN2_LO32": _f32_literal(LN2_LO32),
            "QUARTER_PI_F32": _f32_literal(QUARTER_PI_F32)}
    for name, coefficients in (("LOG32_C", LOG32_C), ("SIN32_C", SIN32_C), ("COS32_C", COS32_C)):
        defs.update({f"{name}{k}": _f32_literal(c) for k, c in enumerate(coefficients)})
    return "".join(f"#define {k} {v}\n" for k, v in defs.items()) + CUDA_HEADER.read_text() + "\n" + kernel_source


# ---------------------------------------------------------------------------------------------------------
# An on-disk cache for the kernels that inline this module
# ---------------------------------------------------------------------------------------------------------
SOURCE_HASH = hashlib.sha256(Path(__file__).read_bytes()).hexdigest()


class DependentCache(FunctionCache):
    """Numba's per-function disk cache, with this file's contents in the key.

    Numba checks a cached function against its own source file only (its time stamp, and the function's
    bytecode): a kernel that inlines the generator or fast_log/fast_exp from here would go on loading stale
    machine code after this file changes. With philox.py's hash in the index key such an edit is a cache miss,
    and the kernel is compiled afresh.
    """

    def _index_key(self, sig, codegen):
        return super()._index_key(sig, codegen) + (SOURCE_HASH,)


def cached_njit(**options):
    """`numba.njit(cache=True, **options)` for kernels that inline functions of this module (see DependentCache).

    Compiling a fused kernel with the ten Philox rounds inlined takes seconds; the cache makes that once per
    machine and source version instead of once per process. Works with parallel=True (parfors are cacheable).
    """

    def decorate(fn):
        dispatcher = njit(cache=True, **options)(fn)
        dispatcher._cache = DependentCache(dispatcher.py_func)  # replaces the FunctionCache that cache=True made
        return dispatcher

    return decorate


# ---------------------------------------------------------------------------------------------------------
# The compiled generators
# ---------------------------------------------------------------------------------------------------------
# inline='always' inlines at Numba's level, which lets LLVM vectorize loops over Philox blocks (~14× faster).
cpu = scalar_functions(njit(inline="always"), log=fast_log)

_cuda = None


def cuda_device_functions():
    """`scalar_functions` compiled as numba.cuda device functions (imports numba.cuda on first call)."""
    global _cuda
    if _cuda is None:
        from numba import config, cuda

        if config.ENABLE_CUDASIM:  # device functions run as Python there: NumPy's square root and bit casts
            _cuda = scalar_functions(cuda.jit(device=True), sqrt32=np.sqrt, bits32=np_f32_bits,
                                     from_bits32=np_bits_f32)
        else:
            _cuda = scalar_functions(cuda.jit(device=True))
    return _cuda
