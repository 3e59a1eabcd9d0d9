"""kernels.gumbel: forms equal the reference, the reference equals PyTorch, Gumbel-max sampling, stability."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy import stats

from kernels import gumbel, philox
from kernels.gumbel import cpu, cuda
from kernels.gumbel import reference as ref

TOL = {np.float32: dict(rtol=2e-6, atol=1e-7), np.float64: dict(rtol=1e-12, atol=1e-15)}


@settings(max_examples=30, deadline=None)
@given(data=st.data(), shape=st.lists(st.integers(1, 11), min_size=1, max_size=3).map(tuple),
       dtype=st.sampled_from([np.float32, np.float64]), hard=st.booleans(), seeded=st.booleans(),
       tau=st.sampled_from([1.0, 0.5, 1 / 16, 3.0]))
def test_cpu_equals_reference(data, shape, dtype, hard, seeded, tau):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    dim = data.draw(st.integers(-len(shape), len(shape) - 1))
    logits = (rng.standard_normal(shape) * 3).astype(dtype)
    kw = dict(seed=int(rng.integers(0, 2**63))) if seeded else dict(noise=rng.gumbel(size=shape).astype(dtype))
    y, y_soft = gumbel.gumbel_softmax_forward(logits, tau, hard, dim=dim, **kw)
    y_ref, y_soft_ref = ref.gumbel_softmax_forward(logits, tau, hard, dim=dim, **kw)
    assert y.dtype == dtype and y.shape == shape
    np.testing.assert_allclose(y_soft, y_soft_ref, **TOL[dtype])
    np.testing.assert_array_equal(y, y_ref) if hard else np.testing.assert_allclose(y, y_ref, **TOL[dtype])
    grad = rng.standard_normal(shape).astype(dtype)
    # dlogits = y ∘ (g − Σ g y)/τ: the cancellation inside leaves an absolute error of about ε·max|g|/τ,
    # so the absolute tolerance is scaled by that magnitude (near-zero entries cannot meet rtol alone)
    tol = dict(TOL[dtype], atol=TOL[dtype]["atol"] * float(np.abs(grad).max()) / min(tau, 1.0))
    np.testing.assert_allclose(gumbel.gumbel_softmax_backward(grad, y_soft_ref, tau, dim=dim),
                               ref.gumbel_softmax_backward(grad, y_soft_ref, tau, dim=dim), **tol)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(3, 1001), (2, 4097), (5, 7, 3)])
def test_cpu_noise_is_the_reference_noise(dtype, shape):
    g = cpu.gumbel_noise(77, shape, dtype)
    assert g.dtype == dtype
    if dtype == np.float32:  # float32 noise: the same float32 operations (no FMAs on the CPU), bit for bit
        np.testing.assert_array_equal(g, ref.gumbel_noise(77, shape, dtype))
    else:  # float64: fast_log agrees with NumPy's log to an ulp or so
        np.testing.assert_allclose(g, ref.gumbel_noise(77, shape, dtype), rtol=1e-14, atol=1e-14)
    # the fused kernel draws it too: softmax of zeros + g is softmax(g) (rows start mid Philox block: n odd)
    y, _ = cpu.gumbel_softmax_forward(np.zeros(shape, dtype), 1.0, seed=77)
    np.testing.assert_allclose(y, torch.softmax(torch.from_numpy(g.astype(np.float64)), -1).numpy(),
                               **TOL[dtype])


@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("dim", [-1, 0])
def test_reference_equals_pytorch_formula(hard, dim):
    rng = np.random.default_rng(0)
    logits, g, grad = (rng.standard_normal((6, 9)) for _ in range(3))
    tau = 0.7
    lt = torch.tensor(logits, requires_grad=True)
    y_soft_t = torch.softmax((lt + torch.tensor(g)) / tau, dim)  # PyTorch's F.gumbel_softmax, given its gumbels
    if hard:
        index = y_soft_t.max(dim, keepdim=True)[1]
        y_t = torch.zeros_like(y_soft_t).scatter_(dim, index, 1.0) - y_soft_t.detach() + y_soft_t
    else:
        y_t = y_soft_t
    y_t.backward(torch.tensor(grad))
    y, y_soft = ref.gumbel_softmax_forward(logits, tau, hard, noise=g, dim=dim)
    np.testing.assert_allclose(y, y_t.detach().numpy(), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(y_soft, y_soft_t.detach().numpy(), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(ref.gumbel_softmax_backward(grad, y_soft, tau, dim=dim), lt.grad.numpy(),
                               rtol=1e-10, atol=1e-14)


def test_pytorch_gumbel_softmax_statistics_match():
    # torch's own F.gumbel_softmax draws other noise; its hard samples and ours follow the same law
    logits = np.array([1.0, 0.0, -1.0, 2.0], dtype=np.float32)
    n = 20_000
    ours = cpu.gumbel_softmax_forward(np.tile(logits, (n, 1)), 1.0, True, seed=5)[0].sum(0)
    torch.manual_seed(0)
    theirs = torch.nn.functional.gumbel_softmax(torch.from_numpy(np.tile(logits, (n, 1))), 1.0, hard=True).sum(0)
    assert stats.chi2_contingency(np.stack([ours, theirs.numpy()])).pvalue > 1e-3


def test_cpu_float32_forward_draws_the_reference_noise():
    # seeded float32 rows (odd n: rows start mid Philox block) see the reference's float32 noise: the hard sample
    # is the reference's, and y_soft is as close as with given noise
    rng = np.random.default_rng(1)
    logits = (rng.standard_normal((37, 1001)) * 3).astype(np.float32)
    y, y_soft = cpu.gumbel_softmax_forward(logits, 0.5, True, seed=11)
    y_ref, y_soft_ref = ref.gumbel_softmax_forward(logits, 0.5, True, seed=11)
    np.testing.assert_array_equal(y, y_ref)
    np.testing.assert_allclose(y_soft, y_soft_ref, **TOL[np.float32])
    g = ref.gumbel_noise(11, logits.shape, np.float32)
    _, y_soft_given = cpu.gumbel_softmax_forward(logits, 0.5, True, noise=g)
    np.testing.assert_array_equal(y_soft, y_soft_given)


def test_float32_noise_is_the_float64_noise_to_the_float32_uniform_step():
    """float32 noise g32 = −log32(−log32 u32) against the float64 noise rounded to float32, over 2²² draws.

    u32 is u64 itself below 2⁻⁹ (all 32 bits kept), and above it the middle of u64's 2⁻²³-wide step, so
    |u32 − u64| ≤ δ = 2⁻²⁴. With E = −ln u, |ΔE| ≤ δ/u and |Δg| = |ln E − ln E'| ≤ |ΔE|/min(E, E'): near u → 1, where
    E ≈ 1 − u, a step of u moves g by up to ≈ δ/(1 − u) — 0.1 at g ≈ 15 (E ≈ 6·2⁻²⁴), however exact the logs. On top
    of that the float32 arithmetic: the logs' < 1 ulp each (E's relative error is g's absolute error) and the
    roundings of g, within 4·2⁻²⁴(1 + |g|). Measured: the bound holds with a largest ratio of 0.996 (it is the exact
    worst case of the step), the median |Δg| is one ulp of g near 1, and where u32 = u64 (u < 2⁻⁹) |Δg| ≤ 1 ulp of g.
    In the top step (u32 = 1 − 2⁻²⁴, u64 in (1 − 2⁻²³, 1 − 2⁻³³]: one draw in 2²³) E32/E64 lies in [1/2, 2⁹]."""
    n, seed = 1 << 22, 11  # this seed puts one draw in the top step
    g32 = ref.gumbel_noise(seed, (n,), np.float32).astype(np.float64)
    g64 = ref.gumbel_noise(seed, (n,), np.float64).astype(np.float32).astype(np.float64)
    u32 = philox.uniform32(seed, np.arange(n)).astype(np.float64)
    d = np.abs(g32 - g64)
    arithmetic = 4 * 2.0**-24 * (1 + np.abs(g32))
    step = 2.0**-24 / (u32 - 2.0**-24)  # |ΔE| ≤ δ/min(u, u')
    e32 = -np.log(u32)
    top = u32 == 1 - 2.0**-24
    assert top.sum() == 1 and (e32[~top] > step[~top]).all()
    quantization = step[~top] / (e32[~top] - step[~top])  # |ΔE|/min(E, E'), min(E, E') ≥ E32 − |ΔE|
    assert (d[~top] <= quantization + arithmetic[~top]).all()
    assert (d[top] <= 9 * np.log(2) + arithmetic[top]).all()
    assert np.median(d) <= 2.0**-23  # most draws: an ulp or so
    fine = u32 < 2.0**-9  # the same uniform: the float32 arithmetic alone, within an ulp of g
    assert (d[fine] <= np.spacing(np.abs(g32[fine]).astype(np.float32))).all()
    # and both are Gumbel(0, 1): the float32 noise tops out at −ln(−ln(1 − 2⁻²⁴)) ≈ 16.6
    assert g32.max() < 16.7 and stats.kstest(g32[:200_000], "gumbel_r").pvalue > 1e-3


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("form", ["reference", "cpu"])
def test_gumbel_max_follows_softmax_chi2(form, dtype):
    k, n = 7, 50_000
    logits = np.array([2.0, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])
    y, _ = gumbel.gumbel_softmax_forward(np.tile(logits, (n, 1)).astype(dtype), 1.0, True, seed=2024, form=form)
    counts = y.sum(0)
    p = np.exp(logits) / np.exp(logits).sum()
    assert counts.sum() == n and y.max() == 1
    assert stats.chisquare(counts, p * n).pvalue > 1e-3
    # a wrong law is rejected by the same test (the test can fail)
    assert stats.chisquare(counts, np.full(k, n / k)).pvalue < 1e-6


@pytest.mark.parametrize("form", ["reference", "cpu"])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_stable_for_huge_logits(form, dtype):
    logits = np.array([[1e4, -1e4, 0.0, 1e4 - 1.0], [-1e4, -1e4, -1e4, -1e4]], dtype=dtype)
    y, y_soft = gumbel.gumbel_softmax_forward(logits, 0.1, True, seed=3, form=form)
    assert np.isfinite(y_soft).all()
    np.testing.assert_allclose(y_soft.sum(-1), 1.0, rtol=1e-6)
    assert y_soft[0, 1] == 0 and y_soft[0, 2] == 0  # 1e4 below the max: exactly underflows
    assert y.sum() == 2 and y[0, 1] == 0
    grad = np.ones_like(logits)
    assert np.isfinite(gumbel.gumbel_softmax_backward(grad, y_soft, 0.1, form=form)).all()


def test_argument_checks():
    x = np.zeros((2, 3), np.float32)
    for form in ("reference", "cpu"):
        with pytest.raises(ValueError):
            gumbel.gumbel_softmax_forward(x, 1.0, seed=1, noise=x, form=form)
        with pytest.raises(ValueError):
            gumbel.gumbel_softmax_forward(x, 0.0, seed=1, form=form)
        with pytest.raises(TypeError):
            gumbel.gumbel_softmax_forward(x.astype(np.int32), 1.0, seed=1, form=form)
    with pytest.raises(ValueError):
        gumbel.gumbel_softmax_forward(x, 1.0, seed=1, form="tpu")


def test_bad_dim_tau_and_empty_rows():
    """dim outside the array is an IndexError naming the range (not a wrap-around), as in PyTorch; τ NaN or so small
    that 1/τ overflows is refused; rows of no values give empty results; a 0-d logit is a row of one."""
    x = np.arange(6.0).reshape(2, 3)
    for form in ("reference", "cpu"):
        for dim in (2, 5, -3):
            with pytest.raises(IndexError, match=r"dim .* out of range for a 2-d array \(expected one in \[-2, 1\]\)"):
                gumbel.gumbel_softmax_forward(x, 1.0, noise=np.zeros_like(x), dim=dim, form=form)
            with pytest.raises(IndexError, match="out of range"):
                gumbel.gumbel_softmax_backward(x, x, 1.0, dim=dim, form=form)
        for tau in (float("nan"), 1e-310, -1.0):
            with pytest.raises(ValueError, match="tau must be positive"):
                gumbel.gumbel_softmax_forward(x, tau, seed=1, form=form)
        empty = np.zeros((3, 0))
        y, y_soft = gumbel.gumbel_softmax_forward(empty, 1.0, True, seed=1, form=form)
        assert y.shape == y_soft.shape == (3, 0)
        assert gumbel.gumbel_softmax_backward(empty, empty, 1.0, form=form).shape == (3, 0)
        y, y_soft = gumbel.gumbel_softmax_forward(np.float64(3.0), 1.0, True, seed=1, form=form)
        assert y.shape == y_soft.shape == () and y == y_soft == 1.0


@pytest.mark.parametrize("tau", [3.0, 7.0, 0.1])
def test_hard_index_is_the_first_max_of_logits_plus_noise(tau):
    """Two logits one ulp apart: dividing by τ may round them equal, and multiplying by 1/τ (the CPU form's) may even
    order them otherwise; the sample is the larger l + g, in every form."""
    a = 1.7237803311822981
    logits = np.array([[a, np.nextafter(a, 2.0)], [np.nextafter(a, 2.0), a]])
    for form in ("reference", "cpu"):
        y, _ = gumbel.gumbel_softmax_forward(logits, tau, True, noise=np.zeros_like(logits), form=form)
        np.testing.assert_array_equal(y, [[0.0, 1.0], [1.0, 0.0]])


def test_uniform_source_is_philox():
    g = ref.gumbel_noise(9, (4, 5))
    np.testing.assert_array_equal(g, -np.log(-np.log(philox.uniform(9, np.arange(20)))).reshape(4, 5))


@pytest.mark.parametrize("name", sorted(cuda.SIGNATURES))
def test_cuda_kernels_compile_for_sm90(ptx_sm90, name):
    kernel, signature = cuda.SIGNATURES[name]
    ptx = ptx_sm90(kernel, signature)
    if name.startswith(("forward", "backward")):
        assert ".shared" in ptx and "bar.sync" in ptx  # the shared-memory reductions survived compilation
        assert ".local" not in ptx  # every per-thread value (the Philox words, z, the running max) in registers
        assert "div.rn" not in ptx  # 1/τ and 1/sum are taken once per row: the elements multiply by them


def test_benchmark_helper_runs():
    result = cpu.benchmark_gumbel_softmax(shape=(8, 64), repeats=2, threads=1)
    assert result["ours_s"] > 0 and result["torch_s"] > 0 and result["speedup"] > 0


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cuda_equals_reference_on_gpu(cupy, dtype):
    """On a real GPU with CuPy arrays, the numba.cuda form (float32 rows it takes default to cuda_vec, tested in
    test_gumbel_vec.py): rows longer than the block, several rows per block, dim ≠ −1, hard and soft."""
    rng = np.random.default_rng(0)
    for shape, dim in (((64, 1000), -1), ((5, 7, 300), 1), ((1, 100_003), -1), ((9000, 3), -1)):
        logits = (rng.standard_normal(shape) * 3).astype(dtype)
        for hard in (False, True):
            for kw in (dict(seed=123), dict(noise=rng.gumbel(size=shape).astype(dtype))):
                dkw = {k: cupy.asarray(v) if k == "noise" else v for k, v in kw.items()}
                y, y_soft = gumbel.gumbel_softmax_forward(cupy.asarray(logits), 0.5, hard, dim=dim, form="cuda",
                                                          **dkw)
                y_ref, y_soft_ref = ref.gumbel_softmax_forward(logits, 0.5, hard, dim=dim, **kw)
                np.testing.assert_allclose(cupy.asnumpy(y_soft), y_soft_ref, **TOL[dtype])
                if hard:
                    np.testing.assert_array_equal(cupy.asnumpy(y), y_ref)
                grad = rng.standard_normal(shape).astype(dtype)
                got = gumbel.gumbel_softmax_backward(cupy.asarray(grad), cupy.asarray(y_soft_ref), 0.5, dim=dim,
                                                     form="cuda")
                np.testing.assert_allclose(cupy.asnumpy(got), ref.gumbel_softmax_backward(grad, y_soft_ref, 0.5,
                                                                                          dim=dim), **TOL[dtype])
    # the same seed draws the same noise on the device as the reference on the host. float64: the device's log may
    # differ from NumPy's by an ulp: g = −log(−log u) near 0 (u near 1/e) then moves by an ulp of −log u, ~2.2e-16 in
    # absolute terms (seen on an H200: 0.7% of 10⁶ values not bit-equal, 54 beyond a relative 1e-14, none by more
    # than 2.2e-16).
    g = cupy.asnumpy(cuda.gumbel_noise(77, (1000, 1000), dtype, xp=cupy))
    want = ref.gumbel_noise(77, (1000, 1000), dtype)
    assert g.dtype == dtype
    if dtype == np.float32:
        # the same float32 uniforms; the device contracts log32's multiply-adds into FMAs, which moves −log u (E) by
        # an ulp or so — an absolute error of ~2⁻²⁴ in g = −ln E, however small g — and g itself by an ulp or so.
        # With the CPU made to contract them the same way (fastmath "contract"), over 4·2²² draws: 96% bit-equal,
        # |Δg| ≤ 2.0·2⁻²⁴(1 + |g|). Allowed: 8·2⁻²⁴(1 + |g|).
        np.testing.assert_allclose(g, want, rtol=2.0**-21, atol=2.0**-21)
        assert np.mean(g == want) > 0.5
    else:
        np.testing.assert_allclose(g, want, rtol=1e-14, atol=4.5e-16)


def test_max_argmax_is_the_plain_scan():
    """The eight-way max and first-index search equal a scan keeping the first strict improvement, ties, NaNs (skipped
    unless first) and lengths off the unroll included."""
    from kernels.gumbel.cpu import _max_argmax

    def scan(z):
        best, arg = z[0], 0
        for j in range(1, len(z)):
            if z[j] > best:
                best, arg = z[j], j
        return best, arg

    rng = np.random.default_rng(0)
    cases = [np.array([3.0]), np.array([np.nan, 5.0, 1.0]), np.array([1.0, np.nan, 5.0, 5.0]),
             np.array([-0.0, 0.0, -1.0]), np.full(19, 2.0)]
    cases += [rng.integers(-3, 4, size).astype(np.float64) for size in (1, 7, 8, 9, 16, 17, 100)]
    for z in cases:
        best, arg = _max_argmax(z, len(z))
        want_best, want_arg = scan(z)
        assert arg == want_arg and (best == want_best or (np.isnan(best) and np.isnan(want_best))), z


@pytest.mark.parametrize("hard", [False, True])
@pytest.mark.parametrize("dim", [-1, 0])
def test_core_gumbel_softmax_takes_a_0d_logit_as_pytorch_does(hard, dim):
    """F.gumbel_softmax of a 0-d logit is a row of one (dim −1 or 0): the value 1 and a zero gradient, as PyTorch
    (and the kernels) give — not an IndexError; any other dim is still out of range."""
    import core
    from core import functional as F

    x = core.Tensor(np.array(1.5), requires_grad=True)
    y = F.gumbel_softmax(x, hard=hard, dim=dim)
    y.backward(core.Tensor(np.array(2.0)))
    xt = torch.tensor(1.5, dtype=torch.float64, requires_grad=True)
    yt = torch.nn.functional.gumbel_softmax(xt, hard=hard, dim=dim)
    yt.backward(torch.tensor(2.0, dtype=torch.float64))
    assert y.shape == () and y.numpy() == yt.item() == 1.0
    assert np.asarray(x.grad.numpy() if hasattr(x.grad, "numpy") else x.grad) == xt.grad.item() == 0.0
    with pytest.raises(IndexError, match="out of range"):
        F.gumbel_softmax(core.Tensor(np.array(1.5)), dim=1)
