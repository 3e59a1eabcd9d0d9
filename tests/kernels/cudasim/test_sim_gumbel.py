"""kernels.gumbel.cuda under the CUDA simulator: equal to the reference, the same noise, Gumbel-max sampling."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kernels.gumbel import cuda as gcuda
from kernels.gumbel import reference as ref

TOL = {np.float32: dict(rtol=2e-6, atol=1e-7), np.float64: dict(rtol=1e-12, atol=1e-15)}


@settings(max_examples=5, deadline=None)
@given(data=st.data(), shape=st.sampled_from([(3, 5), (1, 75), (2, 3, 4), (1, 7)]),
       dtype=st.sampled_from([np.float32, np.float64]), hard=st.booleans(), seeded=st.booleans())
def test_cuda_equals_reference(data, shape, dtype, hard, seeded):
    rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1)))
    dim = data.draw(st.integers(-len(shape), len(shape) - 1))
    tau = data.draw(st.sampled_from([1.0, 0.25]))
    logits = (rng.standard_normal(shape) * 3).astype(dtype)
    kw = dict(seed=int(rng.integers(0, 2**63))) if seeded else dict(noise=rng.gumbel(size=shape).astype(dtype))
    y, y_soft = gcuda.gumbel_softmax_forward(logits, tau, hard, dim=dim, **kw)
    y_ref, y_soft_ref = ref.gumbel_softmax_forward(logits, tau, hard, dim=dim, **kw)
    np.testing.assert_allclose(y_soft, y_soft_ref, **TOL[dtype])
    np.testing.assert_array_equal(y, y_ref) if hard else np.testing.assert_allclose(y, y_ref, **TOL[dtype])
    grad = rng.standard_normal(shape).astype(dtype)
    np.testing.assert_allclose(gcuda.gumbel_softmax_backward(grad, y_soft_ref, tau, dim=dim),
                               ref.gumbel_softmax_backward(grad, y_soft_ref, tau, dim=dim), **TOL[dtype])


def test_hard_index_is_the_first_max_of_logits_plus_noise_and_bad_dim():
    a = 1.7237803311822981
    logits = np.array([[a, np.nextafter(a, 2.0)], [np.nextafter(a, 2.0), a]])
    for tau in (3.0, 7.0, 0.1):
        y, _ = gcuda.gumbel_softmax_forward(logits, tau, True, noise=np.zeros_like(logits))
        np.testing.assert_array_equal(y, [[0.0, 1.0], [1.0, 0.0]])
    with pytest.raises(IndexError, match="out of range"):
        gcuda.gumbel_softmax_forward(logits, 1.0, seed=1, dim=2)
    with pytest.raises(IndexError, match="out of range"):
        gcuda.gumbel_softmax_backward(logits, logits, 1.0, dim=-3)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_cuda_noise_is_the_reference_noise(dtype):
    exact32 = dtype == np.float32
    np.testing.assert_allclose(gcuda.gumbel_noise(77, (3, 11), dtype), ref.gumbel_noise(77, (3, 11), dtype),
                               rtol=0 if exact32 else 1e-14, atol=0 if exact32 else 1e-14)


def test_hard_ties_and_huge_logits():
    logits = np.array([[1e4, -1e4, 0.0, 1e4], [-1e4, -1e4, -1e4, -1e4]])
    noise = np.zeros_like(logits)  # exact ties: the first maximum wins, as in the reference and PyTorch
    y, y_soft = gcuda.gumbel_softmax_forward(logits, 0.1, True, noise=noise)
    np.testing.assert_array_equal(y, [[1, 0, 0, 0], [1, 0, 0, 0]])
    np.testing.assert_allclose(y_soft, ref.gumbel_softmax_forward(logits, 0.1, True, noise=noise)[1], rtol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("n", [gcuda.CACHE_MAX, gcuda.CACHE_MAX + 3])
def test_rows_in_and_beyond_the_noise_cache(dtype, n):
    # float32 rows of up to CACHE_MAX keep g in shared memory, longer ones (and float64 rows) in y_soft's array
    # between the passes; 3 rows of odd n start and end inside Philox blocks, which neighbouring rows share
    rng = np.random.default_rng(n)
    logits = (rng.standard_normal((3, n)) * 3).astype(dtype)
    for hard in (False, True):
        y, y_soft = gcuda.gumbel_softmax_forward(logits, 0.25, hard, seed=99)
        y_ref, y_soft_ref = ref.gumbel_softmax_forward(logits, 0.25, hard, seed=99)
        np.testing.assert_allclose(y_soft, y_soft_ref, **TOL[dtype])
        np.testing.assert_array_equal(y, y_ref) if hard else np.testing.assert_allclose(y, y_ref, **TOL[dtype])


def test_long_rows_noise_given_dim_and_backward():
    # rows longer than 4·THREADS (several steps of 4 elements per thread), noise given, τ ≠ 1, dim ≠ −1
    rng = np.random.default_rng(5)
    n = 4 * gcuda.THREADS + 37
    logits = (rng.standard_normal((n, 2)) * 3).astype(np.float32)
    noise = rng.gumbel(size=logits.shape).astype(np.float32)
    y, y_soft = gcuda.gumbel_softmax_forward(logits, 3.0, True, noise=noise, dim=0)
    y_ref, y_soft_ref = ref.gumbel_softmax_forward(logits, 3.0, True, noise=noise, dim=0)
    np.testing.assert_allclose(y_soft, y_soft_ref, **TOL[np.float32])
    np.testing.assert_array_equal(y, y_ref)
    grad = rng.standard_normal(logits.shape).astype(np.float32)
    np.testing.assert_allclose(gcuda.gumbel_softmax_backward(grad, y_soft_ref, 3.0, dim=0),
                               ref.gumbel_softmax_backward(grad, y_soft_ref, 3.0, dim=0), **TOL[np.float32])
    # seeded with dim ≠ −1: the noise is drawn in the original layout (flat index), then moved with the axis
    y, y_soft = gcuda.gumbel_softmax_forward(logits, 0.5, True, seed=7, dim=0)
    y_ref, y_soft_ref = ref.gumbel_softmax_forward(logits, 0.5, True, seed=7, dim=0)
    np.testing.assert_allclose(y_soft, y_soft_ref, **TOL[np.float32])
    np.testing.assert_array_equal(y, y_ref)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_noise_kernel_over_several_grid_steps(dtype):
    # 305 values: a thread takes a Philox block (4 values) a step, the last block partly outside; more blocks than
    # the grid has threads, so threads take several steps
    shape = (5, 61)
    assert np.prod(shape) > 4 * gcuda.THREADS * gcuda.GRID_MAX
    exact32 = dtype == np.float32
    np.testing.assert_allclose(gcuda.gumbel_noise(3, shape, dtype), ref.gumbel_noise(3, shape, dtype),
                               rtol=0 if exact32 else 1e-14, atol=0 if exact32 else 1e-14)
