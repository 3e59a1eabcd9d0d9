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
