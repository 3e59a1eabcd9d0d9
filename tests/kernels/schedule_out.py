"""The `out=` contract of kernels.schedule, checked on any form (reference and cpu in test_schedule.py, cuda under the
simulator in cudasim/): results written into the caller's arrays equal the fresh results bit for bit, an update in
place (out = x_t, or = ε̂) equals one into new memory, and bad buffers are refused with an error that names them."""

from __future__ import annotations

import numpy as np
import pytest

from kernels.schedule import reference as ref

LINEAR = ref.Schedule.linear(1000)


def check_out_equals_fresh(form, shape, dtype, seed=3):
    """Every update of `form` (a module with q_sample, ddpm_step, ddim_step), into buffers and in place, equals the
    same update into fresh arrays, for drawn and for given noise."""
    rng = np.random.default_rng(seed)
    x, e, z = ((rng.standard_normal(shape) * 1.5).astype(dtype) for _ in range(3))
    t = rng.integers(1, 1000, shape[0])
    t_prev = t - 1
    for kw in (dict(seed=seed), dict(noise=z)):
        want_xt, want_eps = form.q_sample(x, t, LINEAR, **kw)
        xt, eps = np.full_like(x, np.nan), np.full_like(x, np.nan)
        got = form.q_sample(x, t, LINEAR, out=(xt, eps), **kw)
        assert got[0] is xt and got[1] is eps
        np.testing.assert_array_equal(xt, want_xt)
        np.testing.assert_array_equal(eps, want_eps)
        x_in = x.copy()  # x_t written over x_0
        form.q_sample(x_in, t, LINEAR, out=(x_in, eps), **kw)
        np.testing.assert_array_equal(x_in, want_xt)
        if "noise" in kw:  # ε may be the given noise array itself
            z_in = z.copy()
            assert form.q_sample(x, t, LINEAR, noise=z_in, out=(xt, z_in))[1] is z_in
            np.testing.assert_array_equal(z_in, z)
        steps = {"ddpm": lambda a, b, **o: form.ddpm_step(a, b, t, LINEAR, clip_x0=1.0, **kw, **o),
                 "ddim": lambda a, b, **o: form.ddim_step(a, b, t, t_prev, LINEAR, 0.5, **kw, **o)}
        for name, step in steps.items():
            want = step(x, e)
            buf = np.full_like(x, np.nan)
            assert step(x, e, out=buf) is buf, name
            np.testing.assert_array_equal(buf, want, err_msg=name)
            x_in, e_in = x.copy(), e.copy()
            step(x_in, e, out=x_in)  # x_{t−1} over x_t, as a sampling loop would
            np.testing.assert_array_equal(x_in, want, err_msg=f"{name} in place over x_t")
            step(x, e_in, out=e_in)
            np.testing.assert_array_equal(e_in, want, err_msg=f"{name} in place over eps_hat")


def check_bad_out_is_refused(form, dtype=np.float32):
    """Wrong shape, dtype, layout or kind, partial overlaps with an input, and ε over x_0: each a clear error."""
    x = np.zeros((4, 6), dtype)
    e = np.ones_like(x)
    t = [1, 2, 3, 4]
    ddpm = lambda out: form.ddpm_step(x, e, t, LINEAR, seed=1, out=out)
    with pytest.raises(ValueError, match=r"out has shape \(4, 5\)"):
        ddpm(np.zeros((4, 5), dtype))
    other = np.float64 if dtype == np.float32 else np.float32
    with pytest.raises(ValueError, match=f"dtype {np.dtype(other).name}"):
        ddpm(np.zeros((4, 6), other))
    with pytest.raises(ValueError, match="C-contiguous"):
        ddpm(np.zeros((6, 4), dtype).T)
    with pytest.raises(TypeError, match="out must be a numpy.ndarray"):
        ddpm([[0.0] * 6] * 4)
    big = np.zeros(x.size + 1, dtype)
    x_shifted = big[1:].reshape(x.shape)  # overlaps x, offset by one element: x[i+1] would be read after out[i]
    with pytest.raises(ValueError, match="overlaps"):
        form.ddpm_step(big[:-1].reshape(x.shape), e, t, LINEAR, seed=1, out=x_shifted)
    with pytest.raises(TypeError, match="tuple"):
        form.q_sample(x, t, LINEAR, seed=1, out=np.zeros_like(x))
    with pytest.raises(ValueError, match=r"out\[1\] \(eps\) overlaps"):
        form.q_sample(x, t, LINEAR, seed=1, out=(np.zeros_like(x), x))
    xt = np.zeros_like(x)
    with pytest.raises(ValueError, match=r"out\[1\] \(eps\) overlaps"):
        form.q_sample(x, t, LINEAR, seed=1, out=(xt, xt))
