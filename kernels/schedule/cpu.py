"""Diffusion updates as one fused Numba pass over the elements (the CPU form of kernels.schedule).

The three updates of reference.py are all the same per-element shape once their per-sample coefficients are
known (O(batch) work, done here in NumPy by `coefficients`):

    x̂_0 = clip(p·x − q·e, ±clip)            (only where A ≠ 0)
    out = A·x̂_0 + Bx·x + Be·e + S·z          z: the Gaussian noise of element i

    q_sample      x = x_0, no e:   Bx = √ᾱ_t, S = √(1 − ᾱ_t)                                      (eq. 4)
    ddpm_step     no clip:         Bx = 1/√α_t, Be = −β_t/(√α_t √(1 − ᾱ_t)), S = σ_t             (eq. 11)
                  clip:            p = 1/√ᾱ_t, q = √(1/ᾱ_t − 1), A = coef1, Bx = coef2, S = σ_t    (eqs. 15, 7)
    ddim_step                      p, q as above, A = √ᾱ_prev, Be = √(1 − ᾱ_prev − σ²), S = σ      (eq. 12)

so a single kernel, `fused_update`, serves all three: it reads x (and e), draws z from Philox for its flat
index in the same pass (or reads it), and writes the result (and, for q_sample, the noise). Each thread takes
chunks of CHUNK elements (a multiple of 4, so every Philox block of four normals belongs to one chunk).
Drawing the normals costs several times more than moving the bytes, so a chunk whose samples all have S = 0
(DDIM with η = 0, DDPM's last step) draws none: it is then a pure pass over memory. `draw` fills an array with the
same noise alone — what the bench times as the floor under the noisy updates.
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from kernels import philox
from kernels.schedule.reference import (
    Schedule,
    check_clip,
    check_float,
    check_update,
    ddim_sigma,
    given_noise,
    per_sample_t,
)

# 1024 elements: the chunk's scratch of normals (4 KiB in float32, 8 KiB in float64) stays in the 32 KiB L1 cache
# beside the arrays streaming through it. Measured on this project's 2-core EPYC (64×3×256×256 float32, into buffers,
# with the float64 scratch of then): 4096 took DDIM η = 0 4.6 ms, q_sample 16.1 ms; 2048 4.2 / 15.7; 1024 3.4 / 13.5;
# 512 3.4 / 13.6; 256 3.7 / 13.7.
CHUNK = 1024
NO_CLIP = np.inf


# ---------------------------------------------------------------------------------------------------------
# Per-sample coefficients (shared with the CUDA form). Columns: p, q, A, Bx, Be, S.
# ---------------------------------------------------------------------------------------------------------
def q_sample_coefficients(sched: Schedule, t) -> np.ndarray:
    c = np.zeros((len(t), 6))
    c[:, 3] = sched.sqrt_alphas_cumprod[t]
    c[:, 5] = sched.sqrt_one_minus_alphas_cumprod[t]
    return c


def ddpm_coefficients(sched: Schedule, t, clip_x0, variance) -> np.ndarray:
    if variance not in ("posterior", "beta"):
        raise ValueError(f"variance must be 'posterior' or 'beta', got {variance!r}")
    var = sched.posterior_variance[t] if variance == "posterior" else sched.betas[t]
    c = np.zeros((len(t), 6))
    ab, alpha, beta = sched.alphas_cumprod[t], sched.alphas[t], sched.betas[t]
    if clip_x0 is None:
        c[:, 3] = 1.0 / np.sqrt(alpha)
        c[:, 4] = -beta / (np.sqrt(alpha) * np.sqrt(1.0 - ab))
    else:
        c[:, 0], c[:, 1] = np.sqrt(1.0 / ab), np.sqrt(1.0 / ab - 1.0)
        c[:, 2], c[:, 3] = sched.posterior_mean_coef1[t], sched.posterior_mean_coef2[t]
    c[:, 5] = np.where(t > 0, np.sqrt(var), 0.0)
    return c


def ddim_coefficients(sched: Schedule, t, t_prev, eta) -> np.ndarray:
    ab, ab_prev = sched.alpha_bar(t), sched.alpha_bar(t_prev)
    sigma = ddim_sigma(sched, t, t_prev, eta)
    c = np.zeros((len(t), 6))
    c[:, 0], c[:, 1] = np.sqrt(1.0 / ab), np.sqrt(1.0 / ab - 1.0)
    c[:, 2] = np.sqrt(ab_prev)
    c[:, 4] = np.sqrt(np.maximum(1.0 - ab_prev - sigma**2, 0.0))
    c[:, 5] = sigma
    return c


def clip_value(clip_x0) -> float:
    check_clip(clip_x0)
    return NO_CLIP if clip_x0 is None else float(clip_x0)


# ---------------------------------------------------------------------------------------------------------
# The kernel
# ---------------------------------------------------------------------------------------------------------
_fill32, _fill64 = philox.block_filler(philox.cpu.normal4_32), philox.block_filler(philox.cpu.normal4)


@njit(inline="always")
def _fill(k0, k1, first, n, buf, noise32):
    """buf[:n] = the normals of flat indices first … first + n − 1 (first a multiple of 4), float32 when noise32."""
    if noise32:
        _fill32(k0, k1, first, n, buf)
    else:
        _fill64(k0, k1, first, n, buf)


@njit(inline="always", error_model="numpy")
def _combine(xs, es, zs, dst, has_e, p, q, A, Bx, Be, S, clip):
    """dst[i] = A·clip(p·x − q·e) + Bx·x + Be·e + S·z over one sample's run of elements (constant coefficients); where
    S = 0 the noise is not read (neither drawn nor, when given, looked at: a NaN there stays out).

    Inlined at each call, so that the call with dst = zs (z read, then its place written) is one loop over one array
    as LLVM sees it and vectorizes; a loop reading x and writing out vectorizes behind a runtime check that the two do
    not overlap, which an update in place (out = x) fails — it would run element by element."""
    if not has_e:
        if S == 0.0:
            for i in range(len(dst)):
                dst[i] = Bx * np.float64(xs[i])
        else:
            for i in range(len(dst)):
                dst[i] = Bx * np.float64(xs[i]) + S * np.float64(zs[i])
    elif A == 0.0:
        if S == 0.0:
            for i in range(len(dst)):
                dst[i] = Bx * np.float64(xs[i]) + Be * np.float64(es[i])
        else:
            for i in range(len(dst)):
                dst[i] = Bx * np.float64(xs[i]) + Be * np.float64(es[i]) + S * np.float64(zs[i])
    elif S == 0.0:
        for i in range(len(dst)):
            xi, ei = np.float64(xs[i]), np.float64(es[i])
            dst[i] = A * min(max(p * xi - q * ei, -clip), clip) + Bx * xi + Be * ei
    else:
        for i in range(len(dst)):
            xi, ei = np.float64(xs[i]), np.float64(es[i])
            x0 = min(max(p * xi - q * ei, -clip), clip)
            dst[i] = A * x0 + Bx * xi + Be * ei + S * np.float64(zs[i])


@philox.cached_njit(parallel=True, error_model="numpy")
def fused_update(x, e, has_e, coef, per_sample, clip, seeded, k0, k1, z, write_z, z_out, noise32, out, in_place):
    """out = A·clip(p·x − q·e) + Bx·x + Be·e + S·z over flat arrays, with per-sample coefficient rows.

    z comes from Philox (seeded: the normal of (k0, k1) at the flat index — float32 when noise32 —, stored to
    z_out when write_z) or from the array z. Each task takes a chunk of CHUNK elements: first the
    chunk's normals into a scratch buffer (whole Philox blocks, a vectorized loop), then one loop per sample the
    chunk overlaps, whose coefficients are constants there — so that loop vectorizes too. in_place: out is x or e
    itself (see _combine).
    (error_model="numpy" drops the ZeroDivisionError checks that would stop the vectorizer.)
    """
    n = x.size
    for c in prange((n + CHUNK - 1) // CHUNK):
        lo = c * CHUNK
        hi = min(lo + CHUNK, n)
        m = hi - lo
        # a chunk whose samples all have S = 0 (DDIM with η = 0, DDPM's last step) neither draws nor reads noise,
        # unless the noise is an output (q_sample)
        noisy = write_z
        for s in range(lo // per_sample, (hi - 1) // per_sample + 1):
            noisy = noisy or coef[s, 5] != 0.0
        # scratch of the noise's dtype: float32 normals for float32 arrays (half the bytes of float64 ones: measured
        # q_sample 13.5 → 11.7 ms, DDPM 13.3 → 11.7 ms at 64×3×256×256), or the given noise's
        zbuf = np.empty(CHUNK, z.dtype)
        if not noisy:
            pass
        elif seeded:
            _fill(k0, k1, lo, m, zbuf, noise32)  # float32 arrays: float32 noise (exact in zbuf)
            if write_z:
                zo = z_out[lo:hi]
                for j in range(m):
                    zo[j] = zbuf[j]
        else:
            zi = z[lo:hi]
            for j in range(m):
                zbuf[j] = zi[j]
        start = lo
        while start < hi:  # one run of elements per sample
            s = start // per_sample
            stop = min(hi, (s + 1) * per_sample)
            p, q, A, Bx, Be, S = coef[s, 0], coef[s, 1], coef[s, 2], coef[s, 3], coef[s, 4], coef[s, 5]
            # slices indexed from 0: Numba then knows the indices are not negative (no wraparound code)
            xs, zs, os = x[start:stop], zbuf[start - lo:stop - lo], out[start:stop]
            es = e[start:stop]
            if in_place:  # via zs (see _combine), then copied out
                _combine(xs, es, zs, zs, has_e, p, q, A, Bx, Be, S, clip)
                for i in range(stop - start):
                    os[i] = zs[i]
            else:
                _combine(xs, es, zs, os, has_e, p, q, A, Bx, Be, S, clip)
            start = stop


@philox.cached_njit(parallel=True, error_model="numpy")
def _draw(k0, k1, out, noise32):
    """out[i] = the normal of (k0, k1) at flat index i, chunk by chunk through a scratch as fused_update draws."""
    n = out.size
    for c in prange((n + CHUNK - 1) // CHUNK):
        lo = c * CHUNK
        m = min(CHUNK, n - lo)
        zbuf = np.empty(CHUNK, out.dtype)
        _fill(k0, k1, lo, m, zbuf, noise32)
        o = out[lo:lo + m]
        for j in range(m):
            o[j] = zbuf[j]


def draw(out, seed):
    """Fill out with the noise the updates draw for `seed` (float32 normals for float32, float64 for float64; element
    i's is philox's normal of (seed, i)) and return it: the noise alone, what q_sample returns as ε, so that its cost
    can be measured apart from the update's memory traffic."""
    if not isinstance(out, np.ndarray) or not out.flags.c_contiguous:
        raise ValueError("draw: out must be a C-contiguous NumPy array")
    check_float(out)
    k0, k1 = philox.seed_key(seed)
    _draw(k0, k1, out.reshape(-1), out.dtype == np.float32)
    return out


_EMPTY = np.empty(0)


def run(x, e, coef, clip, seed, noise, want_noise, out=None):
    """Launch fused_update on NumPy arrays; returns (result, noise or None). out: None, the result's buffer, or
    with want_noise the pair (result, noise) of buffers (see reference.check_out)."""
    e, noise, out, z_given = check_update(x, e, seed, noise, want_noise, out)
    has_e = e is not None
    xc = np.ascontiguousarray(x)
    res = np.empty_like(xc) if out is None else out
    per_sample = max(x.size // max(coef.shape[0], 1), 1)
    e_flat = np.ascontiguousarray(e).reshape(-1) if has_e else xc.reshape(-1)
    in_place = out is not None and (np.may_share_memory(res, xc) or (has_e and np.may_share_memory(res, e_flat)))
    if seed is not None:
        k0, k1 = philox.seed_key(seed)
        z_out = (np.empty_like(xc) if z_given is None else z_given) if want_noise else _EMPTY.astype(x.dtype)
        fused_update(xc.reshape(-1), e_flat, has_e, coef, per_sample, clip, True, k0, k1, xc.reshape(-1),
                     want_noise, z_out.reshape(-1), x.dtype == np.float32, res.reshape(-1), in_place)
        return res, (z_out if want_noise else None)
    # given noise of another dtype than x's: the scratch (of the noise's dtype) must hold x's results exactly in place
    zf = np.ascontiguousarray(noise, dtype=np.promote_types(noise.dtype, x.dtype)).reshape(-1)
    fused_update(xc.reshape(-1), e_flat, has_e, coef, per_sample, clip, False, np.uint64(0), np.uint64(0), zf,
                 False, _EMPTY.astype(x.dtype), False, res.reshape(-1), in_place)
    return res, given_noise(noise, z_given)


# ---------------------------------------------------------------------------------------------------------
# The public updates (same signatures as reference.py), for any form's `run`
# ---------------------------------------------------------------------------------------------------------
def _host(a):
    """a as a NumPy array (a CuPy array copied from the GPU)."""
    return a.get() if hasattr(a, "get") and not isinstance(a, np.ndarray) else np.asarray(a)


def updates(run, array=np.asarray, check=check_float):
    """(q_sample, ddpm_step, ddim_step) of a compiled form, given its `run(x, e, coef, clip, seed, noise, want_noise,
    out)`: each computes its per-sample coefficients here (O(batch), from t on the host) and leaves the per-element
    pass to run. array converts x, check tests its dtype."""

    def q_sample(x0, t, sched: Schedule, *, seed=None, noise=None, out=None):
        """x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε in one pass (eq. 4); returns (x_t, ε), into out=(x_t, ε) when given."""
        x0 = array(x0)
        check(x0)
        t = per_sample_t(_host(t), x0, sched.T)
        return run(x0, None, q_sample_coefficients(sched, t), NO_CLIP, seed, noise, want_noise=True, out=out)

    def ddpm_step(x_t, eps_hat, t, sched: Schedule, *, seed=None, noise=None, clip_x0=None, variance="posterior",
                  out=None):
        """One ancestral DDPM step x_t → x_{t−1} (Algorithm 2; eq. 11, or eqs. 15 + 7 with clip_x0), into out if
        given."""
        x_t = array(x_t)
        check(x_t)
        t = per_sample_t(_host(t), x_t, sched.T)
        coef = ddpm_coefficients(sched, t, clip_x0, variance)
        return run(x_t, eps_hat, coef, clip_value(clip_x0), seed, noise, want_noise=False, out=out)[0]

    def ddim_step(x_t, eps_hat, t, t_prev, sched: Schedule, eta: float = 0.0, *, seed=None, noise=None, clip_x0=None,
                  out=None):
        """One DDIM step x_t → x_{t_prev} (eq. 12, σ from eq. 16), into out if given."""
        x_t = array(x_t)
        check(x_t)
        t = per_sample_t(_host(t), x_t, sched.T)
        t_prev = per_sample_t(_host(t_prev), x_t, sched.T, lowest=-1, name="t_prev")
        coef = ddim_coefficients(sched, t, t_prev, eta)
        return run(x_t, eps_hat, coef, clip_value(clip_x0), seed, noise, want_noise=False, out=out)[0]

    return q_sample, ddpm_step, ddim_step


q_sample, ddpm_step, ddim_step = updates(run)
