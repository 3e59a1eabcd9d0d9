"""kernels.philox: the Random123 known answers, one stream on every form, and the distributions."""

from __future__ import annotations

import numpy as np
import pytest
from numba import cuda, njit
from scipy import stats

from kernels import philox

# Random123's tests/kat_vectors, philox4x32 with 10 rounds: counter (4 words), key (2 words) → output (4 words).
KAT = [
    ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
    ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
    ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
     (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
]
u64 = np.uint64


@pytest.mark.parametrize("ctr,key,want", KAT)
def test_known_answers_numpy_and_njit(ctr, key, want):
    args = [u64(v) for v in ctr + key]
    assert tuple(int(w) for w in philox.philox4x32_10(*args)) == want
    assert tuple(int(w) for w in njit(philox.philox4x32_10)(*args)) == want
    # vectorized over NumPy arrays: the same function, all counters at once
    arrays = [np.full(3, v, dtype=np.uint64) for v in args]
    assert all((w == np.uint64(x)).all() for w, x in zip(philox.philox4x32_10(*arrays), want))


def test_element_mapping_uses_all_four_words():
    k0, k1 = philox.seed_key(2**40 + 7)
    assert (int(k0), int(k1)) == (7, 256)
    words = philox.philox_block(k0, k1, u64(5))  # elements 20..23
    u = philox.uniform(2**40 + 7, np.arange(20, 24))
    np.testing.assert_array_equal(u, [(int(w) + 0.5) / 2**32 for w in words])


def test_uniform_open_interval_at_the_extremes():
    assert 0.0 < philox.to_uniform(u64(0)) < 1e-9
    assert philox.to_uniform(u64(0xFFFFFFFF)) < 1.0
    assert np.isfinite(-np.log(-np.log(philox.to_uniform(np.array([0, 0xFFFFFFFF], dtype=np.uint64))))).all()


def test_seed_validation_and_streams_differ():
    with pytest.raises(ValueError):
        philox.seed_key(-1)
    with pytest.raises(ValueError):
        philox.seed_key(2**64)
    a, b = philox.uniform(1, np.arange(64)), philox.uniform(2, np.arange(64))
    assert not np.any(a == b)
    np.testing.assert_array_equal(a, philox.uniform(1, np.arange(64)))


def test_cpu_scalar_functions_draw_the_reference_stream():
    k0, k1 = philox.seed_key(12345)
    idx = np.arange(41)
    u = np.array([philox.cpu.uniform_at(k0, k1, i) for i in idx])
    z = np.array([philox.cpu.normal_at(k0, k1, i) for i in idx])
    np.testing.assert_array_equal(u, philox.uniform(12345, idx))  # bitwise
    np.testing.assert_allclose(z, philox.normal(12345, idx), rtol=1e-14, atol=1e-14)
    np.testing.assert_array_equal(np.array(philox.cpu.uniform4(k0, k1, u64(3))), u[12:16])


def test_uniform_is_uniform_ks():
    u = philox.uniform(2024, np.arange(200_000))
    assert stats.kstest(u, "uniform").pvalue > 1e-3
    # consecutive elements (same Philox block, then across blocks) are uncorrelated
    assert abs(np.corrcoef(u[:-1], u[1:])[0, 1]) < 0.01


def test_normal_is_standard_normal_ks():
    z = philox.normal(7, np.arange(200_000))
    assert stats.kstest(z, "norm").pvalue > 1e-3
    assert abs(z.mean()) < 0.01 and abs(z.std() - 1) < 0.01
    assert abs(np.corrcoef(z[0::2], z[1::2])[0, 1]) < 0.01  # the two halves of each Box–Muller pair


def test_cos_sin_2pi_matches_libm():
    w = np.random.default_rng(0).integers(0, 2**32, 20_000).astype(np.uint64)
    w = np.concatenate([w, np.array([0, 2**29 - 1, 2**29, 2**30, 3 * 2**30 + 5, 2**32 - 1], dtype=np.uint64)])
    theta = 2 * np.pi * philox.to_uniform(w)
    cs = np.array([philox.cpu.cos_sin_2pi(x) for x in w])
    np.testing.assert_allclose(cs[:, 0], np.cos(theta), rtol=0, atol=2e-15)
    np.testing.assert_allclose(cs[:, 1], np.sin(theta), rtol=0, atol=2e-15)


@njit(error_model="numpy")
def _apply_log_exp(x, y_log, y_exp):
    for i in range(x.size):
        y_log[i] = philox.fast_log(x[i])
        y_exp[i] = philox.fast_exp(-x[i])


def test_fast_log_exp_within_one_ulp():
    rng = np.random.default_rng(1)
    x = np.concatenate([rng.uniform(2**-33, 1, 100_000), 1 - rng.uniform(0, 1e-7, 10_000),
                        np.exp(rng.uniform(-700, 700, 10_000)), [1.0, 2.0, 0.5, 2**-33, 1 - 2**-33, 707.0]])
    y_log, y_exp = np.empty_like(x), np.empty_like(x)
    _apply_log_exp(x, y_log, y_exp)
    ulps = lambda got, want: np.abs(got - want) / np.spacing(np.abs(want))
    ok = np.log(x) != 0
    assert ulps(y_log[ok], np.log(x)[ok]).max() <= 1.0
    assert y_log[x == 1.0][0] == 0.0
    ref = np.exp(-x)
    normal = ref > 1e-300
    assert ulps(y_exp[normal], ref[normal]).max() <= 1.0
    assert (y_exp[-x < -708] == 0).all()


def test_fast_exp_special_values():
    x = np.array([-np.inf, np.nan, -708.0, -1e300])
    y_log, y_exp = np.empty_like(x), np.empty_like(x)
    _apply_log_exp(-x, y_log, y_exp)  # _apply_log_exp computes exp(-input)
    assert y_exp[0] == 0 and np.isnan(y_exp[1]) and y_exp[2] == 0 and y_exp[3] == 0


_normal_at = philox.cuda_device_functions().normal_at


def _philox_kernel(out, k0, k1):
    i = cuda.grid(1)
    if i < out.size:
        out[i] = _normal_at(k0, k1, i)


def test_device_functions_compile_to_ptx(ptx_sm90):
    ptx = ptx_sm90(_philox_kernel, "void(float64[::1], uint64, uint64)")
    assert "mul.wide.u32" in ptx or "mul.hi.u32" in ptx or "mul.lo.s64" in ptx


# ---------------------------------------------------------------------------------------------------------
# The on-disk cache of the kernels that inline the generator
# ---------------------------------------------------------------------------------------------------------
# the probe uses the gumbel backward kernel: cached like the others by philox.cached_njit, and the quickest to compile
_CACHE_PROBE = """
import json, numpy as np
from kernels import philox
from kernels.gumbel import cpu
cpu.gumbel_softmax_backward(np.ones((2, 5)), np.ones((2, 5)), 0.5)
d = cpu.backward_rows
sig = d.signatures[0]
loaded = d._cache.load_overload(sig, d.targetctx) is not None
philox.SOURCE_HASH = "an edited philox.py"  # what the key would hold after an edit of philox.py
stale = d._cache.load_overload(sig, d.targetctx) is not None
print(json.dumps(dict(hits=sum(d.stats.cache_hits.values()), misses=sum(d.stats.cache_misses.values()),
                      loaded=loaded, stale=stale)))
"""


def test_kernels_load_from_the_disk_cache_keyed_on_this_source(tmp_path):
    import json
    import os
    import subprocess
    import sys

    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path))
    run = lambda: json.loads(subprocess.run([sys.executable, "-c", _CACHE_PROBE], env=env, capture_output=True,
                                            text=True, check=True, timeout=300).stdout)
    first, second = run(), run()
    assert first["misses"] == 1 and first["hits"] == 0  # an empty cache: compiled, then saved
    assert second == dict(hits=1, misses=0, loaded=True, stale=False)  # a fresh process loads it; an edit misses


def test_gumbel_and_schedule_kernels_use_the_dependent_cache():
    from kernels.gumbel import cpu as gumbel_cpu
    from kernels.schedule import cpu as schedule_cpu

    kernels = [schedule_cpu.fused_update, gumbel_cpu.forward_rows, gumbel_cpu.backward_rows,
               gumbel_cpu.gumbel_noise_kernel]
    assert all(isinstance(k._cache, philox.DependentCache) for k in kernels)


# ---------------------------------------------------------------------------------------------------------
# float32 noise
# ---------------------------------------------------------------------------------------------------------
@njit
def _cpu_streams32(k0, k1, u, z):
    for b in range(u.size // 4):
        u0, u1, u2, u3 = _uniform4_32(k0, k1, np.uint64(b))
        z0, z1, z2, z3 = _normal4_32(k0, k1, np.uint64(b))
        u[4 * b], u[4 * b + 1], u[4 * b + 2], u[4 * b + 3] = u0, u1, u2, u3
        z[4 * b], z[4 * b + 1], z[4 * b + 2], z[4 * b + 3] = z0, z1, z2, z3


_uniform4_32, _normal4_32 = philox.cpu.uniform4_32, philox.cpu.normal4_32


def test_cpu_float32_streams_are_the_reference_bitwise():
    """The CPU kernels' float32 uniforms and normals are the NumPy spec's, bit for bit (the same float32 operations,
    no fused multiply-adds on the CPU)."""
    k0, k1 = philox.seed_key(2**40 + 3)
    u, z = np.empty(4096, np.float32), np.empty(4096, np.float32)
    _cpu_streams32(k0, k1, u, z)
    np.testing.assert_array_equal(u, philox.uniform32(2**40 + 3, np.arange(4096)))
    np.testing.assert_array_equal(z, philox.normal32(2**40 + 3, np.arange(4096)))
    assert philox.normal_like(1, np.arange(8), np.float32).dtype == np.float32
    np.testing.assert_array_equal(philox.normal_like(1, np.arange(8), np.float64), philox.normal(1, np.arange(8)))


def test_uniform32_exact_values_at_the_edges():
    """(w + ½)·2⁻³² below 2²³, ((w >> 9) + ½)·2⁻²³ above: exact, strictly inside (0, 1), and never decreasing in w."""
    w = np.array([0, 1, 2**23 - 1, 2**23, 2**23 + 511, 2**23 + 512, 2**31, 2**32 - 1], dtype=np.uint64)
    u = philox._np32.uniform32(w)
    assert u.dtype == np.float32
    want = np.where(w < 2**23, (w + 0.5) * 2.0**-32, ((w >> np.uint64(9)) + 0.5) * 2.0**-23)
    np.testing.assert_array_equal(u.astype(np.float64), want)
    assert (np.diff(u) >= 0).all() and u[0] > 0 and u[-1] == np.float32(1 - 2.0**-24)
    words = np.random.default_rng(3).integers(0, 2**32, 200_000).astype(np.uint64)
    assert stats.kstest(philox._np32.uniform32(words), "uniform").pvalue > 1e-3


def test_log32_within_one_ulp():
    """Over a sweep of float32 arguments from 2⁻³⁴ (the smallest uniform's order) to 40 (past any −log u)."""
    lo, hi = np.float32(2.0**-34).view(np.int32), np.float32(40.0).view(np.int32)
    x = np.arange(lo, hi, 97, dtype=np.int32).view(np.float32)
    x = np.concatenate([x, np.float32([1.0, 2.0, 0.5, 1 - 2.0**-24, 1 + 2.0**-23, np.sqrt(2), np.sqrt(0.5)])])
    got, want = philox.log32(x), np.log(x.astype(np.float64))
    assert got.dtype == np.float32 and philox.log32(np.float32([1.0]))[0] == 0
    ok = want != 0
    assert (np.abs(got[ok] - want[ok]) / np.spacing(np.abs(want[ok]).astype(np.float32))).max() < 1.0


def test_cos_sin_2pi32_matches_libm():
    """Exact octant reduction, then the angle x rounded to float32 once (≤ 2⁻²⁴ relative, ~3·10⁻⁸ in the result) and
    float32 polynomials (≤ 1.3 ulp): within 2⁻²³ absolute (measured: 1.01·10⁻⁷)."""
    w = np.random.default_rng(0).integers(0, 2**32, 50_000).astype(np.uint64)
    w = np.concatenate([w, np.array([0, 2**29 - 1, 2**29, 2**30, 3 * 2**30 + 5, 2**32 - 1], dtype=np.uint64)])
    c, s = philox._np32.cos_sin_2pi32(w)
    theta = 2 * np.pi * ((w >> np.uint64(6)).astype(np.float64) + 0.5) * 2.0**-26
    np.testing.assert_allclose(c, np.cos(theta), rtol=0, atol=2.0**-23)
    np.testing.assert_allclose(s, np.sin(theta), rtol=0, atol=2.0**-23)


def test_normal32_is_the_float64_normal_to_float32_precision_and_standard_normal():
    """The same words through float32: the radius differs by the uniform's 23-bit rounding — most near u → 1, where
    r → 0 and Δr = Δ(r²)/2r grows (2⁻²⁴ in u, r ≈ 5·10⁻⁴ at worst among 10⁶ draws, so Δ ≲ 10⁻⁴) — the angle by
    2⁻²⁶ of a turn; typically they agree to float32 rounding."""
    idx = np.arange(1_000_000)
    z32, z64 = philox.normal32(7, idx), philox.normal(7, idx)
    assert z32.dtype == np.float32
    d = np.abs(z32 - z64)
    assert d.max() < 2e-4 and np.median(d) < 1e-6
    assert stats.kstest(z32[:200_000], "norm").pvalue > 1e-3
    assert abs(z32.mean()) < 0.005 and abs(z32.std() - 1) < 0.005
    assert abs(np.corrcoef(z32[0::2], z32[1::2])[0, 1]) < 0.01
    assert np.abs(z32).max() < np.sqrt(-2 * np.log(2.0**-33))  # the radius's bound
