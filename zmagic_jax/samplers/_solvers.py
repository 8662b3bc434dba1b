"""The reverse-process solvers: DDPM ancestral (paper form), DDPM posterior, DDIM, predictor-corrector.

Each is a :class:`Sampler` of pure functions of one sample (constructors are cached, so equal
arguments give the same object and a jitted run compiled for it is reused); ``b = 1 - ab_t / ab_next`` is the
effective beta of a strided step, ``s = -eps / sqrt(1 - ab_t)`` the score and
``x0 = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t)`` Tweedie's estimate.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from zmagic_jax.samplers._base import Sampler, StepContext
from zmagic_jax.schedules import score_from_eps, x0_from_eps


@functools.lru_cache(maxsize=None)
def ddpm_ancestral() -> Sampler:
    """Z-Magic's ancestral DDPM step (paper Sec. 3.2), score_sde's reverse-diffusion VP predictor:

    ``x_next = (2 - sqrt(1 - b)) x_t + b (s(x_t) + g) + sqrt(b) z``.

    Accurate for small ``b`` (many steps); for coarse grids prefer :func:`ddpm_posterior`.
    """
    def mean(x, eps, ctx: StepContext):
        b = ctx.beta
        return (2.0 - jnp.sqrt(1.0 - b)) * x + b * score_from_eps(eps, ctx.alpha_bar)

    return Sampler("ddpm_ancestral", mean, lambda ctx: jnp.sqrt(ctx.beta), lambda ctx: ctx.beta)


def _posterior_coefs(ctx: StepContext):
    """DDPM posterior q(x_next | x_t, x0) = N(c1 x0 + c2 x_t, c3^2 I) between strided steps."""
    ab, abn, b = ctx.alpha_bar, ctx.alpha_bar_next, ctx.beta
    c1 = jnp.sqrt(abn) * b / (1.0 - ab)
    c2 = jnp.sqrt(ab / abn) * (1.0 - abn) / (1.0 - ab)
    c3 = jnp.sqrt((1.0 - abn) * b / (1.0 - ab))
    return c1, c2, c3


@functools.lru_cache(maxsize=None)
def ddpm_posterior() -> Sampler:
    """DDPM step through the posterior ``q(x_next | x_t, x0|t)`` (FreeDoM's text sampler):

    ``x_next = c1 x0|t + c2 x_t + c3 z`` with ``c1 = sqrt(ab_n) b / (1 - ab)``,
    ``c2 = sqrt(ab / ab_n) (1 - ab_n) / (1 - ab)``, ``c3 = sqrt((1 - ab_n) b / (1 - ab))``.
    """
    def mean(x, eps, ctx):
        c1, c2, _ = _posterior_coefs(ctx)
        return c1 * x0_from_eps(x, eps, ctx.alpha_bar) + c2 * x

    def score_coef(ctx):
        c1, _, _ = _posterior_coefs(ctx)
        return c1 * (1.0 - ctx.alpha_bar) / jnp.sqrt(ctx.alpha_bar)

    return Sampler("ddpm_posterior", mean, lambda ctx: _posterior_coefs(ctx)[2], score_coef)


@functools.lru_cache(maxsize=None)
def ddim(eta: float = 0.0) -> Sampler:
    """DDIM (Song et al. 2021, Eq. 12) with its noise term really applied:

    ``x_next = sqrt(ab_n) x0|t + sqrt(1 - ab_n - sigma^2) eps + sigma z``,
    ``sigma = eta sqrt((1 - ab_n) / (1 - ab)) sqrt(1 - ab / ab_n)``. ``eta = 1`` is the DDPM
    posterior step, ``eta = 0`` the deterministic ODE-like step.
    """
    eta = _check_eta(eta, "ddim")

    def sigma(ctx):
        return eta * _posterior_coefs(ctx)[2]

    def mean(x, eps, ctx):
        direction = jnp.sqrt(jnp.maximum(1.0 - ctx.alpha_bar_next - sigma(ctx) ** 2, 0.0))
        return jnp.sqrt(ctx.alpha_bar_next) * x0_from_eps(x, eps, ctx.alpha_bar) + direction * eps

    def score_coef(ctx):
        ab, abn = ctx.alpha_bar, ctx.alpha_bar_next
        direction = jnp.sqrt(jnp.maximum(1.0 - abn - sigma(ctx) ** 2, 0.0))
        return jnp.sqrt(abn) * (1.0 - ab) / jnp.sqrt(ab) - direction * jnp.sqrt(1.0 - ab)

    return Sampler(f"ddim(eta={eta:g})", mean, sigma, score_coef)


@functools.lru_cache(maxsize=None)
def eta_mixing(eta: float = 0.5) -> Sampler:
    """FreeDoM's face sampler: ``x_next = sqrt(ab_n) x0|t + sqrt(1 - ab_n) (eta z + sqrt(1 - eta^2) eps)``.

    Not DDIM's sigma formula: the noise fraction ``eta`` is fixed at every step (FreeDoM uses 0.5).
    """
    eta = _check_eta(eta, "eta_mixing")
    keep = (1.0 - eta ** 2) ** 0.5

    def mean(x, eps, ctx):
        return (jnp.sqrt(ctx.alpha_bar_next) * x0_from_eps(x, eps, ctx.alpha_bar)
                + jnp.sqrt(1.0 - ctx.alpha_bar_next) * keep * eps)

    def score_coef(ctx):
        ab, abn = ctx.alpha_bar, ctx.alpha_bar_next
        return jnp.sqrt(abn) * (1.0 - ab) / jnp.sqrt(ab) - jnp.sqrt(1.0 - abn) * keep * jnp.sqrt(1.0 - ab)

    return Sampler(f"eta_mixing(eta={eta:g})", mean,
                   lambda ctx: eta * jnp.sqrt(1.0 - ctx.alpha_bar_next), score_coef)


@functools.lru_cache(maxsize=None)
def predictor_corrector(snr: float = 0.16, corrector_steps: int = 1) -> Sampler:
    """VP-SDE predictor-corrector sampler (Song et al. 2021), guided in every sub-step.

    Corrector: ``corrector_steps`` Langevin moves at level ``t``,
    ``x <- x + e (s(x) + g) + sqrt(2 e) z'``. score_sde sets ``e = 2 (1 - b) (snr |z'| / |s|)^2``
    from sampled norms; we use their expectations under the model (``E|z'|^2 = D``,
    ``E|s|^2 = D / (1 - ab_t)``), ``e = 2 (1 - b) snr^2 (1 - ab_t)``: the same step in high
    dimension, but one that does not explode when ``|s|`` happens to be small in low dimension,
    and that keeps samples independent of each other and of the batch.
    Predictor: ancestral VP step ``x_next = (x_t + b (s + g)) / sqrt(1 - b) + sqrt(b) z``.
    Guidance ``g`` enters both, as in score_sde's conditional PC sampler.
    """
    if not snr > 0:
        raise ValueError(f"predictor_corrector: snr must be > 0; got {snr!r}.")
    if not isinstance(corrector_steps, int) or corrector_steps < 0:
        raise ValueError(f"predictor_corrector: corrector_steps must be an int >= 0; got {corrector_steps!r}.")

    def mean(x, eps, ctx):
        b = ctx.beta
        return (x + b * score_from_eps(eps, ctx.alpha_bar)) / jnp.sqrt(1.0 - b)

    def corrector(key, x, ctx, eps_fn):
        e = 2.0 * (1.0 - ctx.beta) * snr ** 2 * (1.0 - ctx.alpha_bar)
        langevin = Sampler("langevin", lambda x, eps, ctx: x + e * score_from_eps(eps, ctx.alpha_bar),
                           lambda ctx: jnp.sqrt(2.0 * e), lambda ctx: e)
        return langevin, jnp.sqrt(2.0 * e) * jax.random.normal(key, x.shape, x.dtype)

    return Sampler(f"pc(snr={snr:g},n={corrector_steps})", mean, lambda ctx: jnp.sqrt(ctx.beta),
                   lambda ctx: ctx.beta / jnp.sqrt(1.0 - ctx.beta),
                   corrector if corrector_steps else None, corrector_steps)


def _check_eta(eta, who: str) -> float:
    if not isinstance(eta, (int, float)) or not 0.0 <= eta <= 1.0:
        raise ValueError(f"{who}: eta must be a number in [0, 1]; got {eta!r}.")
    return float(eta)


SAMPLERS = {
    "ddpm_ancestral": ddpm_ancestral,
    "ddpm_posterior": ddpm_posterior,
    "ddim": ddim,
    "eta_mixing": eta_mixing,
    "pc": predictor_corrector,
}


def sampler_by_name(name: str, **options) -> Sampler:
    """Build a sampler from its name (``ddpm_ancestral``, ``ddpm_posterior``, ``ddim``,
    ``eta_mixing``, ``pc``) and keyword options (``eta``, ``snr``, ``corrector_steps``)."""
    if name not in SAMPLERS:
        raise ValueError(f"sampler: unknown name {name!r}; choose one of {sorted(SAMPLERS)}.")
    return SAMPLERS[name](**options)
