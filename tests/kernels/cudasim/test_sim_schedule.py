"""kernels.schedule.cuda under the CUDA simulator (and the Philox device functions): equal to the reference."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from numba import cuda
from schedule_out import check_bad_out_is_refused, check_out_equals_fresh

from kernels import philox
from kernels.schedule import cuda as sched_cuda
from kernels.schedule import reference as ref

LINEAR = ref.Schedule.linear(1000)
COSINE = ref.Schedule.cosine(1000)
TOL = {np.float32: dict(rtol=2e-6, atol=2e-6), np.float64: dict(rtol=1e-12, atol=1e-12)}
_dev = philox.cuda_device_functions()
_block, _uniform_at, _normal_at = _dev.block, _dev.uniform_at, _dev.normal_at


@cuda.jit
def _kat_kernel(ctr_key, out):
    i = cuda.grid(1)
    if i < ctr_key.shape[0]:
        w0, w1, w2, w3 = _dev_philox(ctr_key[i, 0], ctr_key[i, 1], ctr_key[i, 2], ctr_key[i, 3], ctr_key[i, 4],
                                     ctr_key[i, 5])
        out[i, 0], out[i, 1], out[i, 2], out[i, 3] = w0, w1, w2, w3


_dev_philox = cuda.jit(device=True)(philox.philox4x32_10)


@cuda.jit
def _streams_kernel(k0, k1, u, z):
    i = cuda.grid(1)
    if i < u.size:
        u[i] = _uniform_at(k0, k1, i)
        z[i] = _normal_at(k0, k1, i)


_uniform4_32, _normal4_32 = _dev.uniform4_32, _dev.normal4_32


@cuda.jit
def _streams32_kernel(k0, k1, u, z):
    b = cuda.grid(1)
    if 4 * b < u.size:
        u0, u1, u2, u3 = _uniform4_32(k0, k1, np.uint64(b))
        z0, z1, z2, z3 = _normal4_32(k0, k1, np.uint64(b))
        u[4 * b], u[4 * b + 1], u[4 * b + 2], u[4 * b + 3] = u0, u1, u2, u3
        z[4 * b], z[4 * b + 1], z[4 * b + 2], z[4 * b + 3] = z0, z1, z2, z3


def test_philox_known_answers_on_the_device():
    rows = np.array([[0] * 6, [0xFFFFFFFF] * 6,
                     [0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344, 0xA4093822, 0x299F31D0]], dtype=np.uint64)
    out = np.zeros((3, 4), dtype=np.uint64)
    _kat_kernel[1, 32](rows, out)
    assert out.tolist() == [[0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8],
                            [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD],
                            [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]]


def test_device_streams_equal_the_reference():
    k0, k1 = philox.seed_key(2**35 + 11)
    u, z = np.zeros(37), np.zeros(37)
    _streams_kernel[2, 32](k0, k1, u, z)
    np.testing.assert_array_equal(u, philox.uniform(2**35 + 11, np.arange(37)))  # bitwise
    np.testing.assert_allclose(z, philox.normal(2**35 + 11, np.arange(37)), rtol=1e-14, atol=1e-14)


def test_device_float32_streams_equal_the_reference():
    """The float32 uniforms and normals of the device functions (Python under the simulator: bitwise, as the CPU's)."""
    k0, k1 = philox.seed_key(2**35 + 11)
    u, z = np.zeros(40, np.float32), np.zeros(40, np.float32)
    _streams32_kernel[1, 32](k0, k1, u, z)
    np.testing.assert_array_equal(u, philox.uniform32(2**35 + 11, np.arange(40)))
    np.testing.assert_array_equal(z, philox.normal32(2**35 + 11, np.arange(40)))


@settings(max_examples=8, deadline=None)
@given(data=st.data(), shape=st.lists(st.integers(1, 5), min_size=1, max_size=3).map(tuple),
       dtype=st.sampled_from([np.float32, np.float64]), seeded=st.booleans(), sched=st.sampled_from([LINEAR, COSINE]))
def test_cuda_equals_reference(data, shape, dtype, seeded, sched):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    x, e, z = ((rng.standard_normal(shape) * 1.5).astype(dtype) for _ in range(3))
    t = rng.integers(0, 1000, shape[0])
    kw = dict(seed=int(rng.integers(0, 2**63))) if seeded else dict(noise=z)
    tol = TOL[dtype]
    for got, want in zip(sched_cuda.q_sample(x, t, sched, **kw), ref.q_sample(x, t, sched, **kw)):
        assert got.dtype == dtype and got.shape == shape
        np.testing.assert_allclose(got, want, **tol)
    clip = data.draw(st.sampled_from([None, 1.0]))
    var = data.draw(st.sampled_from(["posterior", "beta"]))
    np.testing.assert_allclose(sched_cuda.ddpm_step(x, e, t, sched, clip_x0=clip, variance=var, **kw),
                               ref.ddpm_step(x, e, t, sched, clip_x0=clip, variance=var, **kw), **tol)
    t_prev = np.maximum(t - rng.integers(1, 50, shape[0]), -1)
    eta = data.draw(st.sampled_from([0.0, 1.0]))
    np.testing.assert_allclose(sched_cuda.ddim_step(x, e, t, t_prev, sched, eta, clip_x0=clip, **kw),
                               ref.ddim_step(x, e, t, t_prev, sched, eta, clip_x0=clip, **kw), **tol)


def test_cuda_noise_is_the_reference_noise():
    x = np.zeros((3, 7), dtype=np.float64)  # 21 elements: the last Philox block is partial
    _, eps = sched_cuda.q_sample(x, [0, 1, 2], LINEAR, seed=5)
    np.testing.assert_allclose(eps, philox.normal(5, np.arange(21)).reshape(3, 7), rtol=1e-14, atol=1e-14)
    _, eps32 = sched_cuda.q_sample(x.astype(np.float32), [0, 1, 2], LINEAR, seed=5)
    assert eps32.dtype == np.float32
    np.testing.assert_array_equal(eps32, philox.normal32(5, np.arange(21)).reshape(3, 7))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_cuda_tiles_grid_stride_and_samples_that_skip_the_draw(monkeypatch, dtype):
    """Many tiles over few blocks (the grid-stride loop), tiles inside one sample (coefficients read once) and
    across samples, samples whose size is odd (Philox blocks straddle two samples), DDPM's last step (t = 0: σ = 0,
    no draw) beside samples that draw, the clipped x̂_0, and a step where no sample draws: equal to the reference."""
    monkeypatch.setattr(sched_cuda, "MAX_BLOCKS", 3)
    rng = np.random.default_rng(5)
    shape = (5, 3, 7, 11)  # 231 values per sample, 10 tiles of 128
    x, e = ((rng.standard_normal(shape) * 2).astype(dtype) for _ in range(2))
    t = np.array([0, 500, 0, 999, 1])
    tol = TOL[dtype]
    for got, want in zip(sched_cuda.q_sample(x, t, LINEAR, seed=9), ref.q_sample(x, t, LINEAR, seed=9)):
        np.testing.assert_allclose(got, want, **tol)
    for clip in (None, 1.0):
        np.testing.assert_allclose(sched_cuda.ddpm_step(x, e, t, LINEAR, seed=9, clip_x0=clip),
                                   ref.ddpm_step(x, e, t, LINEAR, seed=9, clip_x0=clip), **tol)
    t_prev = np.array([-1, 400, -1, 10, 0])
    for eta in (1.0, 0.0):  # η = 0: no sample draws
        np.testing.assert_allclose(sched_cuda.ddim_step(x, e, t, t_prev, LINEAR, eta, seed=9, clip_x0=1.0),
                                   ref.ddim_step(x, e, t, t_prev, LINEAR, eta, seed=9, clip_x0=1.0), **tol)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_cuda_out_buffers_and_in_place(monkeypatch, dtype):
    """Into the caller's arrays and in place (the next tile's values are loaded before this tile is written, each by
    the thread that writes them), over several tiles and a grid-stride loop: equal to fresh results."""
    monkeypatch.setattr(sched_cuda, "MAX_BLOCKS", 2)
    check_out_equals_fresh(sched_cuda, (3, 2 * sched_cuda.TILE + 7), dtype)
    check_bad_out_is_refused(sched_cuda, dtype)


def test_cuda_draws_for_a_noisy_sample_inside_a_philox_block():
    """Samples of one element: a Philox block spans four, and the noisy one may sit between two that add none."""
    rng = np.random.default_rng(3)
    x, e = (rng.standard_normal(8).astype(np.float32) for _ in range(2))
    t = np.array([0, 7, 0, 0, 0, 0, 9, 0])
    np.testing.assert_allclose(sched_cuda.ddpm_step(x, e, t, LINEAR, seed=4), ref.ddpm_step(x, e, t, LINEAR, seed=4),
                               **TOL[np.float32])
