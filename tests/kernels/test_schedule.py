"""kernels.schedule: known schedule values, DDIM ↔ DDPM, each form equal to the reference, the noise stream."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ptx_tools import ptxas_usage
from schedule_out import check_bad_out_is_refused, check_out_equals_fresh

from kernels import philox, schedule
from kernels.schedule import cpu, cuda
from kernels.schedule import reference as ref

LINEAR = ref.Schedule.linear(1000)
COSINE = ref.Schedule.cosine(1000)
TOL = {np.float32: dict(rtol=2e-6, atol=2e-6), np.float64: dict(rtol=1e-12, atol=1e-12)}


# ---------------------------------------------------------------------------------------------------------
# Schedules
# ---------------------------------------------------------------------------------------------------------
def test_linear_known_values():
    assert LINEAR.betas[0] == 1e-4 and LINEAR.betas[-1] == 0.02
    assert LINEAR.alphas_cumprod[999] == pytest.approx(4.0358e-5, rel=1e-4)
    assert LINEAR.posterior_variance[487] == pytest.approx(0.0097916, rel=1e-5)
    assert LINEAR.posterior_variance[0] == 0.0
    assert LINEAR.posterior_log_variance_clipped[0] == LINEAR.posterior_log_variance_clipped[1]


def test_cosine_known_values():
    assert COSINE.betas[999] == 0.999
    assert (COSINE.betas <= 0.999).all() and (COSINE.betas > 0).all()
    f = lambda t: np.cos((t / 1000 + 0.008) / 1.008 * np.pi / 2) ** 2  # eq. 17
    np.testing.assert_allclose(COSINE.alphas_cumprod[:990], f(np.arange(1, 991)) / f(0), rtol=1e-12)


@pytest.mark.parametrize("fn", [ref.linear_betas, ref.cosine_betas, ref.sigmoid_betas, ref.scaled_linear_betas])
def test_schedules_are_valid(fn):
    betas = fn(1000)
    assert betas.dtype == np.float64 and betas.shape == (1000,)
    assert (betas > 0).all() and (betas <= 0.999).all()
    ab = np.cumprod(1 - betas)
    assert (np.diff(ab) < 0).all() and ab[-1] < 0.01  # noise grows to (almost) pure noise


def test_scaled_linear_is_stable_diffusions():
    b = ref.scaled_linear_betas(1000)
    assert b[0] == pytest.approx(0.00085) and b[-1] == pytest.approx(0.012)
    np.testing.assert_allclose(np.diff(np.sqrt(b)), np.diff(np.sqrt(b))[0], rtol=1e-9)


def test_posterior_matches_bayes():
    # eq. 7 against the product of Gaussians q(x_t | x_{t-1}) q(x_{t-1} | x_0) written out directly
    t = np.arange(1, 1000)
    ab_prev, beta = LINEAR.alphas_cumprod[t - 1], LINEAR.betas[t]
    precision = 1 / beta * (1 - beta) + 1 / (1 - ab_prev)
    np.testing.assert_allclose(LINEAR.posterior_variance[t], 1 / precision, rtol=1e-10)
    np.testing.assert_allclose(LINEAR.posterior_mean_coef2[t], np.sqrt(1 - beta) / beta / precision, rtol=1e-10)
    np.testing.assert_allclose(LINEAR.posterior_mean_coef1[t], np.sqrt(ab_prev) / (1 - ab_prev) / precision,
                               rtol=1e-10)


@pytest.mark.parametrize("sched", [LINEAR, COSINE])
def test_ddim_eta_one_is_ddpm_posterior_variance(sched):
    t = np.arange(1, sched.T)
    np.testing.assert_allclose(ref.ddim_sigma(sched, t, t - 1, 1.0) ** 2, sched.posterior_variance[t], rtol=1e-9)


def test_ddim_eta_one_step_equals_ddpm_step():
    rng = np.random.default_rng(3)
    x, e, z = (rng.standard_normal((4, 3, 5)) for _ in range(3))
    t = np.array([1, 10, 500, 999])
    a = ref.ddim_step(x, e, t, t - 1, LINEAR, 1.0, noise=z)
    b = ref.ddpm_step(x, e, t, LINEAR, noise=z)
    np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-9)


def test_ddim_deterministic_inversion_round_trip():
    rng = np.random.default_rng(4)
    x, e = rng.standard_normal((2, 6)), rng.standard_normal((2, 6))
    zeros = np.zeros_like(x)
    up = ref.ddim_step(x, e, 100, 150, LINEAR, 0.0, noise=zeros)  # inversion: x_100 → x_150
    back = ref.ddim_step(up, e, 150, 100, LINEAR, 0.0, noise=zeros)
    np.testing.assert_allclose(back, x, rtol=1e-10, atol=1e-10)
    with pytest.raises(ValueError):
        ref.ddim_step(x, e, 100, 150, LINEAR, 0.5, noise=zeros)


def test_ddpm_last_step_has_no_noise_and_clip_equals_eq11_when_nothing_clips():
    rng = np.random.default_rng(5)
    x, e = rng.standard_normal((3, 4)) * 0.1, rng.standard_normal((3, 4)) * 0.1
    a = ref.ddpm_step(x, e, 0, LINEAR, noise=rng.standard_normal((3, 4)), variance="beta")
    b = ref.ddpm_step(x, e, 0, LINEAR, noise=np.zeros((3, 4)), variance="beta")
    np.testing.assert_array_equal(a, b)
    z = rng.standard_normal((3, 4))
    np.testing.assert_allclose(ref.ddpm_step(x, e, 5, LINEAR, noise=z, clip_x0=1e6),
                               ref.ddpm_step(x, e, 5, LINEAR, noise=z), rtol=1e-9, atol=1e-12)


def test_q_sample_statistics():
    x0 = np.full((8, 20_000), 0.7)
    t = np.arange(0, 1000, 125)
    xt, eps = ref.q_sample(x0, t, LINEAR, seed=99)
    a, s = LINEAR.sqrt_alphas_cumprod[t], LINEAR.sqrt_one_minus_alphas_cumprod[t]
    n = x0.shape[1]
    assert np.all(np.abs(xt.mean(1) - 0.7 * a) < 5 * s / np.sqrt(n))  # mean √ᾱ x0, 5 standard errors
    assert np.all(np.abs(xt.var(1) / s**2 - 1) < 5 * np.sqrt(2 / n))  # variance 1 − ᾱ
    np.testing.assert_allclose(eps, philox.normal(99, np.arange(x0.size)).reshape(x0.shape))


def test_argument_checks():
    x = np.zeros((2, 3))
    with pytest.raises(ValueError):
        ref.q_sample(x, 0, LINEAR)
    with pytest.raises(ValueError):
        cpu.q_sample(x, 0, LINEAR, seed=1, noise=x)
    with pytest.raises(ValueError):
        cpu.q_sample(x, 1000, LINEAR, seed=1)
    with pytest.raises(ValueError):
        cpu.ddpm_step(x, x, 3, LINEAR, seed=1, variance="huge")
    with pytest.raises(ValueError):
        schedule.q_sample(x, 0, LINEAR, seed=1, form="tpu")


@pytest.mark.parametrize("form", ["reference", "cpu"])
def test_bad_timesteps_eta_clip_and_inputs_name_the_argument(form):
    """What the forms refuse, each with a message naming the argument — nothing rounded, broadcast or wrapped."""
    x = np.zeros((3, 4))
    q = lambda t, **kw: schedule.q_sample(x, t, LINEAR, seed=1, form=form, **kw)  # noqa: E731
    with pytest.raises(ValueError, match=r"t has shape \(2,\): give one timestep, or one per sample of the batch of 3"):
        q([1, 2])
    with pytest.raises(ValueError, match=r"t has shape \(3, 1\)"):
        q(np.ones((3, 1), np.int64))
    for bad in (2.9, [1.0, 2.0, 3.0], np.nan, True, "5"):
        with pytest.raises(TypeError, match="t must be integer timesteps"):
            q(bad)
    with pytest.raises(ValueError, match=r"t_prev must lie in \[-1, 1000\)"):
        schedule.ddim_step(x, x, 5, -2, LINEAR, seed=1, form=form)
    with pytest.raises(ValueError, match="0-d"):
        schedule.q_sample(np.float64(1.0), 3, LINEAR, seed=1, form=form)
    for eta in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match=r"eta must lie in \[0, 1\]"):
            schedule.ddim_step(x, x, 5, 4, LINEAR, eta, seed=1, form=form)
    with pytest.raises(ValueError, match="clip_x0 must be None or a number >= 0"):
        schedule.ddpm_step(x, x, 5, LINEAR, seed=1, clip_x0=float("nan"), form=form)
    with pytest.raises(ValueError, match=r"eps_hat shape \(1, 4\) != x shape \(3, 4\)"):
        schedule.ddpm_step(x, x[:1], 5, LINEAR, seed=1, form=form)
    with pytest.raises(TypeError, match="float32 or float64"):
        schedule.q_sample(x.astype(np.int64), 3, LINEAR, seed=1, form=form)


def test_reference_reads_no_noise_where_sigma_is_zero():
    """A sample that adds no noise (DDPM's last step, DDIM with η = 0) ignores the noise given for it — NaN included —
    in the reference as in the compiled forms."""
    rng = np.random.default_rng(4)
    x, e = rng.standard_normal((2, 3, 5)), rng.standard_normal((2, 3, 5))
    z = rng.standard_normal((2, 3, 5))
    z[0] = np.nan  # sample 0: t = 0 for DDPM, η = 0 for DDIM
    for form in ("reference", "cpu"):
        got = schedule.ddpm_step(x, e, np.array([0, 7]), LINEAR, noise=z, form=form)
        assert np.isfinite(got[0]).all() and np.isfinite(got[1]).all()
        got = schedule.ddim_step(x, e, np.array([9, 9]), np.array([8, 8]), LINEAR, 0.0, noise=z, form=form)
        assert np.isfinite(got).all()
    np.testing.assert_allclose(ref.ddpm_step(x, e, np.array([0, 7]), LINEAR, noise=z),
                               cpu.ddpm_step(x, e, np.array([0, 7]), LINEAR, noise=z), **TOL[np.float64])


# ---------------------------------------------------------------------------------------------------------
# The CPU form equals the reference
# ---------------------------------------------------------------------------------------------------------
shapes = st.lists(st.integers(1, 9), min_size=1, max_size=4).map(tuple)


def _case(data, shape, dtype):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    x = (rng.standard_normal(shape) * 1.5).astype(dtype)
    e = rng.standard_normal(shape).astype(dtype)
    z = rng.standard_normal(shape).astype(dtype)
    t = rng.integers(0, 1000, shape[0])
    return rng, x, e, z, t


@settings(max_examples=30, deadline=None)
@given(data=st.data(), shape=shapes, dtype=st.sampled_from([np.float32, np.float64]),
       seeded=st.booleans(), sched=st.sampled_from([LINEAR, COSINE]))
def test_cpu_equals_reference(data, shape, dtype, seeded, sched):
    rng, x, e, z, t = _case(data, shape, dtype)
    noise = dict(seed=int(rng.integers(0, 2**63))) if seeded else dict(noise=z)
    tol = TOL[dtype]
    for got, want in zip(schedule.q_sample(x, t, sched, **noise), ref.q_sample(x, t, sched, **noise)):
        assert got.dtype == dtype and got.shape == shape
        np.testing.assert_allclose(got, want, **tol)
    clip = data.draw(st.sampled_from([None, 1.0]))
    var = data.draw(st.sampled_from(["posterior", "beta"]))
    np.testing.assert_allclose(schedule.ddpm_step(x, e, t, sched, clip_x0=clip, variance=var, **noise),
                               ref.ddpm_step(x, e, t, sched, clip_x0=clip, variance=var, **noise), **tol)
    t_prev = t - rng.integers(1, 50, shape[0])  # strided; -1 and below land on x_0
    t_prev = np.maximum(t_prev, -1)
    eta = data.draw(st.sampled_from([0.0, 0.5, 1.0]))
    np.testing.assert_allclose(schedule.ddim_step(x, e, t, t_prev, sched, eta, clip_x0=clip, **noise),
                               ref.ddim_step(x, e, t, t_prev, sched, eta, clip_x0=clip, **noise), **tol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cpu_noise_is_the_reference_noise(dtype):
    x = np.zeros((3, 5, 7), dtype=dtype)  # 105 elements: not a multiple of 4, nor of a chunk
    _, eps_cpu = cpu.q_sample(x, [1, 2, 3], LINEAR, seed=2**33 + 5)
    _, eps_ref = ref.q_sample(x, [1, 2, 3], LINEAR, seed=2**33 + 5)
    assert eps_cpu.dtype == eps_ref.dtype == dtype
    if dtype == np.float32:  # float32 noise: the same float32 operations, bit for bit
        np.testing.assert_array_equal(eps_cpu, eps_ref)
    else:
        np.testing.assert_allclose(eps_cpu, eps_ref, rtol=1e-13, atol=1e-13)
    # and across a chunk boundary of the parallel loop, with t per sample
    x = np.zeros((3, cpu.CHUNK + 3))
    xt, eps = cpu.q_sample(x, [0, 999, 5], LINEAR, seed=1)
    np.testing.assert_allclose(eps, philox.normal(1, np.arange(x.size)).reshape(x.shape), rtol=1e-13, atol=1e-13)
    np.testing.assert_allclose(xt, LINEAR.sqrt_one_minus_alphas_cumprod[[0, 999, 5], None] * eps, rtol=1e-13)


@pytest.mark.parametrize("per_sample", [3, cpu.CHUNK + 5])
def test_noise_free_samples_skip_the_draw_only_where_s_is_zero(per_sample):
    # DDPM's last step (t = 0) adds no noise: chunks of only such samples skip the draw. Samples with t = 0 sit
    # beside noisy ones inside one chunk (per_sample = 3) and across chunk boundaries (per_sample = CHUNK + 5);
    # a chunk that wrongly skipped would lose its noise, one that wrongly drew would still match — so compare
    # against the reference with the noise, and against the noise-free update where t = 0.
    rng = np.random.default_rng(6)
    t = np.array([0, 500, 0, 0, 7, 0])
    x, e = (rng.standard_normal((len(t), per_sample)).astype(np.float32) for _ in range(2))
    got = cpu.ddpm_step(x, e, t, LINEAR, seed=11)
    np.testing.assert_allclose(got, ref.ddpm_step(x, e, t, LINEAR, seed=11), **TOL[np.float32])
    quiet = ref.ddpm_step(x, e, t, LINEAR, noise=np.zeros_like(x))
    np.testing.assert_array_equal(got[t == 0], quiet[t == 0])
    assert np.abs(got[t > 0] - quiet[t > 0]).min() > 0  # the noisy samples did get noise
    # explicit noise: S = 0 samples do not read it (NaN there would otherwise poison the result)
    z = rng.standard_normal(x.shape).astype(np.float32)
    z[t == 0] = np.nan
    got = cpu.ddim_step(x, e, t, t - 1, LINEAR, 1.0, noise=z)
    assert np.isfinite(got[t == 0]).all()
    np.testing.assert_allclose(got[t > 0], ref.ddim_step(x, e, t, t - 1, LINEAR, 1.0, noise=z)[t > 0],
                               **TOL[np.float32])


def test_seeded_noise_round_trips_through_explicit_noise():
    x = np.random.default_rng(0).standard_normal((4, 9)).astype(np.float32)
    xt, eps = cpu.q_sample(x, [3, 30, 300, 999], LINEAR, seed=8)
    xt2, _ = cpu.q_sample(x, [3, 30, 300, 999], LINEAR, noise=eps)
    np.testing.assert_array_equal(xt, xt2)


@pytest.mark.parametrize("form", [ref, cpu], ids=["reference", "cpu"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_out_buffers_and_in_place_equal_fresh_results(form, dtype):
    # 2 samples of CHUNK + 5 values: chunks of the parallel loop straddle the samples
    check_out_equals_fresh(form, (2, cpu.CHUNK + 5), dtype)


@pytest.mark.parametrize("form", [ref, cpu], ids=["reference", "cpu"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_bad_out_buffers_are_refused(form, dtype):
    check_bad_out_is_refused(form, dtype)


@pytest.mark.parametrize("dtype, noise_dtype", [(np.float32, np.float64), (np.float64, np.float32)])
def test_given_noise_of_another_dtype(dtype, noise_dtype):
    """The kernel's scratch takes the noise's dtype; x's results must still be exact in it, in place too."""
    rng = np.random.default_rng(4)
    x, e = (rng.standard_normal((3, cpu.CHUNK + 7)).astype(dtype) for _ in range(2))
    z = rng.standard_normal(x.shape).astype(noise_dtype)
    t = np.array([5, 500, 999])
    want = ref.ddpm_step(x, e, t, LINEAR, noise=z, clip_x0=1.0)
    np.testing.assert_allclose(cpu.ddpm_step(x, e, t, LINEAR, noise=z, clip_x0=1.0), want, **TOL[dtype])
    x_in = x.copy()
    cpu.ddpm_step(x_in, e, t, LINEAR, noise=z, clip_x0=1.0, out=x_in)
    np.testing.assert_allclose(x_in, want, **TOL[dtype])


def test_out_through_the_dispatcher():
    x = np.random.default_rng(0).standard_normal((2, 3, 4)).astype(np.float32)
    buf = np.empty_like(x)
    assert schedule.ddim_step(x, x, [5, 6], [4, 5], LINEAR, seed=1, out=buf) is buf
    np.testing.assert_array_equal(buf, cpu.ddim_step(x, x, [5, 6], [4, 5], LINEAR, seed=1))


# ---------------------------------------------------------------------------------------------------------
# The CUDA form: PTX for sm_90 here; the simulator runs it in tests/kernels/cudasim
# ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(cuda.SIGNATURES))
def test_cuda_kernels_compile_for_sm90(ptx_sm90, name):
    """The kernel compiles for sm_90 with its launch bounds; where ptxas is installed, the registers it allocates
    let BLOCKS_PER_SM blocks share an SM (65536 registers), spilling no more than the bounds were measured with
    (float32 at 6 blocks and float64 at 4: none)."""
    kernel, signature = cuda.SIGNATURES[name]
    blocks = cuda.BLOCKS_PER_SM[np.dtype(np.float32 if name.endswith("f32") else np.float64)]
    ptx = ptx_sm90(kernel, signature)
    assert ".entry" in ptx and ".local" not in ptx
    assert f".maxntid {cuda.THREADS}, 1, 1" in ptx and f".minnctapersm {blocks}" in ptx
    usage = ptxas_usage(ptx)
    if usage:
        registers, spilled = usage
        assert registers * cuda.THREADS * blocks <= 65536 and spilled == 0, usage


def test_cuda_grid_is_two_waves_of_resident_blocks(monkeypatch):
    """One block per tile up to WAVES waves of the blocks an SM holds (the grid-stride loop takes the rest); the
    simulator's NumPy arrays use MAX_BLOCKS."""
    monkeypatch.setattr(cuda, "sm_count", lambda: 132)
    gpu = object()  # any array module but NumPy
    assert cuda._blocks(5 * cuda.TILE + 1, np.float32, gpu) == 6
    assert cuda._blocks(10**9, np.float32, gpu) == 2 * 132 * cuda.BLOCKS_PER_SM[np.dtype(np.float32)]
    assert cuda._blocks(10**9, np.float64, gpu) == 2 * 132 * cuda.BLOCKS_PER_SM[np.dtype(np.float64)]
    assert cuda._blocks(10**9, np.float32, np) == cuda.MAX_BLOCKS


@settings(max_examples=200, deadline=None)
@given(per_sample=st.integers(1, 2**40), k=st.integers(1, 2**49))
def test_cuda_sample_index_is_exact_at_sample_boundaries(per_sample, k):
    """The kernel's i // per_sample by a float64 multiply is exact at the indices where it could round the wrong
    way (either side of a sample boundary), for every array below its 2^50-element limit."""
    k = min(k, (2**50 - 1) // per_sample)
    i = np.array([k * per_sample - 1, k * per_sample, k * per_sample + per_sample - 1, 0], dtype=np.int64)
    got = cuda._sample.py_func(i, 1.0 / per_sample)
    np.testing.assert_array_equal(got, i // per_sample)


@settings(max_examples=40, deadline=None)
@given(n=st.integers(1, 3 * cpu.CHUNK + 5), seed=st.integers(0, 2**64 - 1), dtype=st.sampled_from([np.float32,
                                                                                                    np.float64]))
def test_draw_is_the_noise_q_sample_returns(n, seed, dtype):
    """cpu.draw (the noise alone, for the bench) is q_sample's ε for the same seed, bit for bit, at sizes around the
    chunk's; and philox's normals (float32: bit for bit; float64: the CPU's log is within an ulp of NumPy's)."""
    out = cpu.draw(np.full(n, np.nan, dtype), seed)
    want = philox.normal_like(seed, np.arange(n), dtype)
    if dtype == np.float32:
        np.testing.assert_array_equal(out, want)
    else:
        np.testing.assert_allclose(out, want, rtol=1e-13, atol=1e-13)
    _, eps = cpu.q_sample(np.zeros((1, n), dtype), np.array([500]), LINEAR, seed=seed)
    np.testing.assert_array_equal(out, eps[0])


def test_draw_refuses_what_it_cannot_fill():
    with pytest.raises(TypeError, match="float32 or float64"):
        cpu.draw(np.empty(4, np.int32), 1)
    with pytest.raises(ValueError, match="draw: out must be a C-contiguous"):
        cpu.draw(np.empty((4, 4), np.float32)[:, ::2], 1)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("sched", [LINEAR, COSINE], ids=["linear", "cosine"])
def test_cuda_equals_reference_on_gpu(cupy, dtype, sched):
    """On a real GPU with CuPy arrays, the numba.cuda form (float32 arrays default to cuda_vec, tested in
    test_schedule_vec.py): every update, drawn noise and given noise, clipping and both variances."""
    rng = np.random.default_rng(1)
    shape = (16, 3, 33, 31)
    x, e, z = ((rng.standard_normal(shape) * 1.5).astype(dtype) for _ in range(3))
    t = rng.integers(0, 1000, shape[0])
    t_prev = np.maximum(t - rng.integers(1, 50, shape[0]), -1)
    xd, ed = cupy.asarray(x), cupy.asarray(e)
    tol = TOL[dtype]
    for kw, dkw in ((dict(seed=7), dict(seed=7)), (dict(noise=z), dict(noise=cupy.asarray(z)))):
        for got, want in zip(schedule.q_sample(xd, t, sched, form="cuda", **dkw), ref.q_sample(x, t, sched, **kw)):
            assert isinstance(got, cupy.ndarray) and got.dtype == dtype
            np.testing.assert_allclose(cupy.asnumpy(got), want, **tol)
        for clip in (None, 1.0):
            for var in ("posterior", "beta"):
                np.testing.assert_allclose(
                    cupy.asnumpy(schedule.ddpm_step(xd, ed, t, sched, clip_x0=clip, variance=var, form="cuda",
                                                    **dkw)),
                    ref.ddpm_step(x, e, t, sched, clip_x0=clip, variance=var, **kw), **tol)
            for eta in (0.0, 1.0):
                np.testing.assert_allclose(
                    cupy.asnumpy(schedule.ddim_step(xd, ed, t, t_prev, sched, eta, clip_x0=clip, form="cuda",
                                                    **dkw)),
                    ref.ddim_step(x, e, t, t_prev, sched, eta, clip_x0=clip, **kw), **tol)
