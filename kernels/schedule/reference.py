"""Noise schedules and the per-element diffusion updates — the NumPy specification.

Papers, and the equation numbers cited on the lines below:
- Ho, Jain & Abbeel 2020, "Denoising Diffusion Probabilistic Models" (DDPM): eq. 4 (q(x_t | x_0)),
  eqs. 6–7 (the posterior q(x_{t−1} | x_t, x_0)), eq. 11 (the mean from ε̂), eq. 15 (x_0 from ε̂),
  Algorithm 2 (ancestral sampling).
- Nichol & Dhariwal 2021, "Improved Denoising Diffusion Probabilistic Models": eq. 17 (cosine schedule).
- Song, Meng & Ermon 2021, "Denoising Diffusion Implicit Models" (DDIM): eq. 12 (the step), eq. 16 (σ(η)).
  DDIM writes α_t for what DDPM (and this code) calls ᾱ_t.

Conventions. Timesteps are 0-based: t = 0 … T−1 is the paper's t = 1 … T, so ᾱ_t = Π_{s ≤ t} (1 − β_s) and the
"previous" of t = 0 is ᾱ = 1 (clean data); in `ddim_step`, t_prev = −1 means that clean end. All tables are
float64. `t` is an int or an integer array with one entry per sample (the leading axis of x).

Noise. Every update draws its Gaussian noise in the same pass, for the flat (C-order) index i of each element:
`kernels.philox.normal32(seed, i)` for float32 arrays (Box–Muller in float32, as PyTorch draws float32 noise),
`kernels.philox.normal(seed, i)` (float64) otherwise — or takes it from `noise=` so that tests (and callers) can
compare exactly. The arithmetic is float64 and the result is rounded to the input dtype.

Outputs. Like PyTorch's `out=`, every update can write into arrays the caller owns (`out=x_prev`, and for q_sample
`out=(x_t, ε)`): a sampling loop then reuses its buffers — `ddim_step(x, e, …, out=x)` updates x in place — instead
of taking fresh memory every step, which on a CPU costs the operating system a page fault and a page of zeros per
4 KiB. `check_out` states what every form accepts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kernels import philox
from kernels.dispatch import data_ptr


# ---------------------------------------------------------------------------------------------------------
# β schedules
# ---------------------------------------------------------------------------------------------------------
def linear_betas(T: int, start: float = 1e-4, end: float = 0.02) -> np.ndarray:
    """DDPM's schedule (Ho et al. §4): β rises linearly from 1e-4 to 0.02 over T = 1000 steps."""
    return np.linspace(start, end, T, dtype=np.float64)


def scaled_linear_betas(T: int, start: float = 0.00085, end: float = 0.012) -> np.ndarray:
    """Latent/Stable Diffusion's schedule: √β linear from √start to √end (squared), for T = 1000."""
    return np.linspace(start**0.5, end**0.5, T, dtype=np.float64) ** 2


def betas_from_alpha_bar(alpha_bar, T: int, max_beta: float = 0.999) -> np.ndarray:
    """β_t = 1 − ᾱ(t+1/T)/ᾱ(t/T) for a continuous ᾱ(τ) on [0, 1], capped at max_beta (Nichol & Dhariwal §3.2)."""
    tau = np.arange(T + 1, dtype=np.float64) / T
    ab = alpha_bar(tau)
    return np.minimum(1.0 - ab[1:] / ab[:-1], max_beta)


def cosine_betas(T: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Improved DDPM's cosine schedule (eq. 17): ᾱ(τ) = f(τ)/f(0), f(τ) = cos²(π/2 · (τ + s)/(1 + s)), β ≤ 0.999.

    The cap stops the singularity at τ = 1, where ᾱ reaches 0 and β would be exactly 1.
    """
    f = lambda tau: np.cos((tau + s) / (1 + s) * np.pi / 2) ** 2
    return betas_from_alpha_bar(lambda tau: f(tau) / f(0.0), T, max_beta)


def sigmoid_betas(T: int, start: float = -3.0, end: float = 3.0, tau: float = 1.0, max_beta: float = 0.999):
    """The sigmoid schedule of Chen 2023 ("On the importance of noise scheduling", Alg. 1), as in common use:
    ᾱ(τ) ∝ sigmoid(end/τ_) − sigmoid((τ(end − start) + start)/τ_), normalized so ᾱ(0) = 1."""
    sig = lambda z: 1.0 / (1.0 + np.exp(-z))
    v_start, v_end = sig(start / tau), sig(end / tau)
    ab = lambda t: (v_end - sig((t * (end - start) + start) / tau)) / (v_end - v_start)
    return np.clip(betas_from_alpha_bar(lambda t: ab(t) / ab(0.0), T, max_beta), 0.0, max_beta)


@dataclass(frozen=True, eq=False)
class Schedule:
    """Everything the updates need, precomputed in float64 from β (names as in the DDPM/improved-DDPM code)."""

    betas: np.ndarray
    alphas: np.ndarray  # α_t = 1 − β_t
    alphas_cumprod: np.ndarray  # ᾱ_t = Π_{s≤t} α_s
    alphas_cumprod_prev: np.ndarray  # ᾱ_{t−1}, with ᾱ_{−1} = 1
    sqrt_alphas_cumprod: np.ndarray  # √ᾱ_t            (eq. 4)
    sqrt_one_minus_alphas_cumprod: np.ndarray  # √(1 − ᾱ_t)
    posterior_variance: np.ndarray  # β̃_t = (1 − ᾱ_{t−1})/(1 − ᾱ_t) · β_t  (eq. 7)
    posterior_log_variance_clipped: np.ndarray  # log β̃_t, with β̃_0 = 0 replaced by β̃_1
    posterior_mean_coef1: np.ndarray  # μ̃ = coef1 · x_0 + coef2 · x_t  (eq. 7)
    posterior_mean_coef2: np.ndarray

    @classmethod
    def from_betas(cls, betas) -> Schedule:
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or not ((betas > 0) & (betas <= 1)).all():
            raise ValueError("betas must be a 1-D array in (0, 1]")
        alphas = 1.0 - betas
        ab = np.cumprod(alphas)
        ab_prev = np.concatenate([[1.0], ab[:-1]])
        post_var = betas * (1.0 - ab_prev) / (1.0 - ab)
        # β̃_0 = 0 (x_0 is known exactly given x_1); its log is clipped to β̃_1 as in improved DDPM.
        post_log_var = np.log(np.concatenate([post_var[1:2], post_var[1:]])) if len(betas) > 1 else np.log(betas)
        return cls(
            betas=betas,
            alphas=alphas,
            alphas_cumprod=ab,
            alphas_cumprod_prev=ab_prev,
            sqrt_alphas_cumprod=np.sqrt(ab),
            sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - ab),
            posterior_variance=post_var,
            posterior_log_variance_clipped=post_log_var,
            posterior_mean_coef1=betas * np.sqrt(ab_prev) / (1.0 - ab),
            posterior_mean_coef2=(1.0 - ab_prev) * np.sqrt(alphas) / (1.0 - ab),
        )

    @classmethod
    def linear(cls, T: int = 1000, **kw) -> Schedule:
        return cls.from_betas(linear_betas(T, **kw))

    @classmethod
    def cosine(cls, T: int = 1000, **kw) -> Schedule:
        return cls.from_betas(cosine_betas(T, **kw))

    @property
    def T(self) -> int:
        return len(self.betas)

    def alpha_bar(self, t):
        """ᾱ_t for 0-based t, with ᾱ_{−1} = 1 (so DDIM's last step lands on x_0)."""
        t = np.asarray(t)
        return np.where(t >= 0, self.alphas_cumprod[np.maximum(t, 0)], 1.0)


# ---------------------------------------------------------------------------------------------------------
# Per-sample coefficients (O(batch) work, shared by every form; the kernels do the O(elements) part)
# ---------------------------------------------------------------------------------------------------------
def per_sample_t(t, x, T: int, lowest: int = 0, name: str = "t") -> np.ndarray:
    """t as an int64 array with one entry per sample (x.shape[0]): integer timesteps in [lowest, T), one for the
    whole batch or one per sample — anything else refused, naming the argument (a float t is not rounded)."""
    if x.ndim == 0:
        raise ValueError("the diffusion updates take a batch x of shape (B, ...), got a 0-d array")
    batch = x.shape[0]
    t = np.asarray(t)
    if t.dtype.kind not in "iu":
        raise TypeError(f"{name} must be integer timesteps, got {t.dtype} values {t.reshape(-1)[:4].tolist()}")
    if t.ndim > 1 or t.size not in (1, batch):
        raise ValueError(f"{name} has shape {t.shape}: give one timestep, or one per sample of the batch of {batch}")
    t = np.broadcast_to(t.reshape(-1).astype(np.int64), (batch,))
    if t.size and (t.min() < lowest or t.max() >= T):
        raise ValueError(f"{name} must lie in [{lowest}, {T}), got {t.min()}..{t.max()}")
    return t


def check_clip(clip_x0):
    """clip_x0: None (no clipping) or a number ≥ 0 (x̂_0 is clipped to ±clip_x0)."""
    if clip_x0 is not None and not clip_x0 >= 0:  # (NaN fails the comparison)
        raise ValueError(f"clip_x0 must be None or a number >= 0, got {clip_x0}")


def check_float(x):
    """The updates compute float32 and float64 arrays."""
    if x.dtype not in (np.float32, np.float64):
        raise TypeError(f"expected a float32 or float64 array, got {x.dtype}")


def ddim_sigma(sched: Schedule, t, t_prev, eta: float) -> np.ndarray:
    """DDIM eq. 16: σ = η · √((1 − ᾱ_prev)/(1 − ᾱ_t)) · √(1 − ᾱ_t/ᾱ_prev); η = 1 gives DDPM's β̃ when t_prev = t − 1."""
    ab, ab_prev = sched.alpha_bar(t), sched.alpha_bar(t_prev)
    if not 0 <= eta <= 1:  # (NaN fails it too) η > 1 would make σ² exceed 1 − ᾱ_prev, the direction term's room
        raise ValueError(f"eta must lie in [0, 1] (0: DDIM, 1: DDPM's variance), got {eta}")
    if eta == 0:
        return np.zeros(np.shape(ab))
    if np.any(np.asarray(t_prev) >= np.asarray(t)):
        raise ValueError("ddim_step with eta > 0 needs t_prev < t (inversion, t_prev > t, is deterministic: eta=0)")
    return eta * np.sqrt((1.0 - ab_prev) / (1.0 - ab) * (1.0 - ab / ab_prev))


def _span(a):
    """The bytes an array's buffer covers, (first address, one past its end), for NumPy and CuPy arrays alike."""
    lo = data_ptr(a)
    return lo, lo + a.nbytes


def check_out(out, x, name="out", same_ok=(), disjoint=()):
    """Check an `out=` buffer for an update of x: an array of x's kind, shape and dtype, C-contiguous, which is either
    one of the arrays in `same_ok` itself (an in-place update: each element is read before it is written) or shares
    no memory with any of them nor with those in `disjoint`. Returns out."""
    if type(out) is not type(x):
        raise TypeError(f"{name} must be a {type(x).__module__}.{type(x).__name__} like the input, "
                        f"got {type(out).__module__}.{type(out).__name__}")
    if out.shape != x.shape or out.dtype != x.dtype:
        raise ValueError(f"{name} has shape {out.shape} and dtype {out.dtype}; the update's result is {x.shape} "
                         f"{x.dtype}")
    if not out.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous (shape {out.shape}, strides {out.strides})")
    lo, hi = _span(out)
    for a, may_be_same in [(a, True) for a in same_ok] + [(a, False) for a in disjoint]:
        if a is None or out.nbytes == 0:
            continue
        a_lo, a_hi = _span(a)
        same = (a_lo, a_hi) == (lo, hi) and a.flags.c_contiguous and a.dtype == out.dtype and a.shape == out.shape
        if lo < a_hi and a_lo < hi and not (may_be_same and same):
            raise ValueError(f"{name} overlaps an input or another output (shape {a.shape}); it may only be the "
                             "very array of the update's input (in place) or memory of its own")
    return out


def out_pair(out, x0, noise):
    """q_sample's out=(x_t, ε), checked: x_t may be x_0 itself, ε may be the given noise array itself; otherwise
    each is memory of its own."""
    if not (isinstance(out, tuple) and len(out) == 2):
        raise TypeError(f"q_sample's out must be a tuple (x_t, eps) of two arrays, got {type(out).__name__}")
    xt, eps = out
    check_out(xt, x0, "out[0] (x_t)", same_ok=(x0,), disjoint=(noise,))
    check_out(eps, x0, "out[1] (eps)", same_ok=(noise,), disjoint=(x0, xt))
    return xt, eps


def check_update(x, e, seed, noise, want_noise, out, asarray=np.asarray):
    """The argument checks of a compiled form's update: exactly one of seed= and noise=, ε̂ and the noise of x's shape,
    and `out` (check_out; with want_noise, q_sample's pair: out_pair). Returns (e, noise, out, noise_out) — e and
    noise as arrays of `asarray` (np.asarray or cupy.asarray), out the result's buffer or None, noise_out ε's."""
    if (seed is None) == (noise is None):
        raise ValueError("pass exactly one of seed= and noise=")
    if e is not None:
        e = asarray(e)
        if e.shape != x.shape:
            raise ValueError(f"eps_hat shape {e.shape} != x shape {x.shape}")
    if noise is not None:
        noise = asarray(noise)
        if noise.shape != x.shape:
            raise ValueError(f"noise shape {noise.shape} != x shape {x.shape}")
    noise_out = None
    if want_noise and out is not None:
        out, noise_out = out_pair(out, x, noise)
    elif out is not None:
        check_out(out, x, same_ok=(x, e, noise))
    return e, noise, out, noise_out


def given_noise(noise, noise_out):
    """The ε an update with given noise returns: the noise itself, or copied into noise_out (q_sample's out[1])."""
    if noise_out is None:
        return noise
    if noise_out is not noise:
        noise_out[...] = noise
    return noise_out


def _store(out, result):
    """result, or result written into out (the caller's buffer) when out is given."""
    if out is None:
        return result
    out[...] = result
    return out


def _expand(v, x):
    """A per-sample vector shaped to broadcast against x (B, ...)."""
    return np.asarray(v).reshape((-1,) + (1,) * (x.ndim - 1))


def _inputs(x, e, seed, noise, clip_x0, want_noise, out):
    """An update's arguments checked as the compiled forms check them (check_update: one of seed= and noise=,
    shapes, out; the dtype, clip_x0), and its Gaussian noise: given, or drawn from Philox for (seed, flat index)
    in x's dtype. Returns (x, e, z, out, z_out) — out and z_out the buffers of the result and of ε (q_sample)."""
    x = np.asarray(x)
    check_float(x)
    check_clip(clip_x0)
    e, z, out, z_out = check_update(x, e, seed, noise, want_noise, out)
    if z is None:
        z = philox.normal_like(seed, np.arange(x.size), x.dtype).reshape(x.shape)
    return x, e, z, out, z_out


# ---------------------------------------------------------------------------------------------------------
# The updates
# ---------------------------------------------------------------------------------------------------------
def _scaled_noise(sigma, z):
    """σ·z, and 0 where σ = 0 whatever z holds there: a sample that adds no noise does not read it (a NaN stays out),
    as in the compiled forms."""
    return np.where(sigma != 0, sigma * z, 0.0)


def q_sample(x0, t, sched: Schedule, *, seed=None, noise=None, out=None):
    """Diffuse x_0 to step t in one jump (eq. 4): x_t = √ᾱ_t · x_0 + √(1 − ᾱ_t) · ε, ε ~ N(0, I).

    Returns (x_t, ε) — the noise is the regression target of L_simple, so the training step needs it back — into
    out=(x_t, ε) when given.
    """
    x0, _, eps, out, eps_out = _inputs(x0, None, seed, noise, None, True, out)
    t = per_sample_t(t, x0, sched.T)
    a = _expand(sched.sqrt_alphas_cumprod[t], x0)
    s = _expand(sched.sqrt_one_minus_alphas_cumprod[t], x0)
    xt = (a * x0 + s * eps).astype(x0.dtype)
    return _store(out, xt), _store(eps_out, eps)


def predict_x0(x_t, eps_hat, ab, clip_x0=None):
    """x̂_0 = (x_t − √(1 − ᾱ_t) ε̂)/√ᾱ_t (eq. 4 solved for x_0, DDPM eq. 15), optionally clipped to ±clip_x0."""
    x0 = np.sqrt(1.0 / ab) * x_t - np.sqrt(1.0 / ab - 1.0) * eps_hat
    return x0 if clip_x0 is None else np.clip(x0, -clip_x0, clip_x0)


def ddpm_step(x_t, eps_hat, t, sched: Schedule, *, seed=None, noise=None, clip_x0=None, variance="posterior",
              out=None):
    """One ancestral step x_t → x_{t−1} from the predicted noise ε̂ (DDPM Algorithm 2, line 4):

        x_{t−1} = μ_θ(x_t, t) + σ_t z,   z ~ N(0, I), and z = 0 at the last step (t = 0)
        μ_θ = (x_t − β_t/√(1 − ᾱ_t) · ε̂)/√α_t                         (eq. 11)
    or, with clip_x0 = c, through the clipped prediction x̂_0 = clip((x_t − √(1 − ᾱ_t) ε̂)/√ᾱ_t, ±c) (eq. 15)
    and the posterior mean μ̃ = coef1 · x̂_0 + coef2 · x_t (eq. 7) — the same mean when nothing is clipped.
    σ_t² = β̃_t (variance="posterior", the lower bound of §3.2) or β_t (variance="beta", the upper bound).
    Written into out (which may be x_t itself) when given.
    """
    x_t, eps_hat, z, out, _ = _inputs(x_t, eps_hat, seed, noise, clip_x0, False, out)
    t = per_sample_t(t, x_t, sched.T)
    if variance == "posterior":
        var = sched.posterior_variance[t]
    elif variance == "beta":
        var = sched.betas[t]
    else:
        raise ValueError(f"variance must be 'posterior' or 'beta', got {variance!r}")
    sigma = _expand(np.where(t > 0, np.sqrt(var), 0.0), x_t)
    if clip_x0 is None:
        beta, alpha, ab = (_expand(v[t], x_t) for v in (sched.betas, sched.alphas, sched.alphas_cumprod))
        mean = (x_t - beta / np.sqrt(1.0 - ab) * eps_hat) / np.sqrt(alpha)
    else:
        x0 = predict_x0(x_t, eps_hat, _expand(sched.alphas_cumprod[t], x_t), clip_x0)
        mean = _expand(sched.posterior_mean_coef1[t], x_t) * x0 + _expand(sched.posterior_mean_coef2[t], x_t) * x_t
    return _store(out, (mean + _scaled_noise(sigma, z)).astype(x_t.dtype))


def ddim_step(x_t, eps_hat, t, t_prev, sched: Schedule, eta: float = 0.0, *, seed=None, noise=None, clip_x0=None,
              out=None):
    """One DDIM step x_t → x_{t_prev} (Song et al. eq. 12, their α = our ᾱ):

        x_prev = √ᾱ_prev · x̂_0 + √(1 − ᾱ_prev − σ²) · ε̂ + σ z,   x̂_0 = (x_t − √(1 − ᾱ_t) ε̂)/√ᾱ_t
    with σ from eq. 16 (η = 0: deterministic; η = 1: DDPM's posterior variance). t_prev may skip steps
    (strided sampling), be −1 (land on x_0), or, with η = 0, exceed t (DDIM inversion, x_t → x_{t_next}).
    Written into out (which may be x_t itself) when given.
    """
    x_t, eps_hat, z, out, _ = _inputs(x_t, eps_hat, seed, noise, clip_x0, False, out)
    t = per_sample_t(t, x_t, sched.T)
    t_prev = per_sample_t(t_prev, x_t, sched.T, lowest=-1, name="t_prev")
    ab, ab_prev = sched.alpha_bar(t), sched.alpha_bar(t_prev)
    sigma = ddim_sigma(sched, t, t_prev, eta)
    x0 = predict_x0(x_t, eps_hat, _expand(ab, x_t), clip_x0)
    direction = _expand(np.sqrt(np.maximum(1.0 - ab_prev - sigma**2, 0.0)), x_t) * eps_hat  # "direction to x_t"
    return _store(out, (_expand(np.sqrt(ab_prev), x_t) * x0 + direction + _scaled_noise(_expand(sigma, x_t), z))
                  .astype(x_t.dtype))
