"""The reverse-process solvers: DDPM ancestral (paper form), DDPM posterior, DDIM, predictor-corrector.

Each is a :class:`Sampler` of pure functions of one sample whose numbers (``eta``, ``snr``) are
pytree leaves, so ``ddim()``, ``ddim(0.0)`` and ``ddim(eta=0.3)`` share one compiled program.
``b = 1 - ab_t / ab_next`` is the effective beta of a strided step, ``s = -eps / sqrt(1 - ab_t)`` the
score and ``x0 = (x_t - sqrt(1 - ab_t) eps) / sqrt(ab_t)`` Tweedie's estimate.
"""
from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp

from zmagic_jax._math import safe_sqrt
from zmagic_jax._pytree import check_scalar, concrete
from zmagic_jax.samplers._base import Sampler, StepContext
from zmagic_jax.schedules import score_from_eps, x0_from_eps


def _ancestral_mean(hyper, x, eps, ctx: StepContext):
    b = ctx.beta
    return (2.0 - jnp.sqrt(1.0 - b)) * x + b * score_from_eps(eps, ctx.alpha_bar)


def _sqrt_beta(hyper, ctx):
    return jnp.sqrt(ctx.beta)


def _beta(hyper, ctx):
    return ctx.beta


def ddpm_ancestral() -> Sampler:
    """Z-Magic's ancestral DDPM step (paper Sec. 3.2), score_sde's reverse-diffusion VP predictor:

    ``x_next = (2 - sqrt(1 - b)) x_t + b (s(x_t) + g) + sqrt(b) z``.

    Accurate for small ``b`` (many steps); for coarse grids prefer :func:`ddpm_posterior`.
    """
    return Sampler("ddpm_ancestral", _ancestral_mean, _sqrt_beta, _beta)


def _posterior_coefs(ctx: StepContext):
    """DDPM posterior q(x_next | x_t, x0) = N(c1 x0 + c2 x_t, c3^2 I) between strided steps."""
    ab, abn, b = ctx.alpha_bar, ctx.alpha_bar_next, ctx.beta
    c1 = jnp.sqrt(abn) * b / (1.0 - ab)
    c2 = jnp.sqrt(ab / abn) * (1.0 - abn) / (1.0 - ab)
    c3 = safe_sqrt((1.0 - abn) * b / (1.0 - ab))
    return c1, c2, c3


def _posterior_mean(hyper, x, eps, ctx):
    c1, c2, _ = _posterior_coefs(ctx)
    return c1 * x0_from_eps(x, eps, ctx.alpha_bar) + c2 * x


def _posterior_std(hyper, ctx):
    return _posterior_coefs(ctx)[2]


def _posterior_score_coef(hyper, ctx):
    c1, _, _ = _posterior_coefs(ctx)
    return c1 * (1.0 - ctx.alpha_bar) / jnp.sqrt(ctx.alpha_bar)


def ddpm_posterior() -> Sampler:
    """DDPM step through the posterior ``q(x_next | x_t, x0|t)`` (FreeDoM's text sampler):

    ``x_next = c1 x0|t + c2 x_t + c3 z`` with ``c1 = sqrt(ab_n) b / (1 - ab)``,
    ``c2 = sqrt(ab / ab_n) (1 - ab_n) / (1 - ab)``, ``c3 = sqrt((1 - ab_n) b / (1 - ab))``.
    """
    return Sampler("ddpm_posterior", _posterior_mean, _posterior_std, _posterior_score_coef)


class Eta(NamedTuple):
    eta: jnp.ndarray


def _ddim_sigma(hyper: Eta, ctx):
    return hyper.eta * _posterior_coefs(ctx)[2]


def _ddim_direction(hyper: Eta, ctx):
    return safe_sqrt(1.0 - ctx.alpha_bar_next - _ddim_sigma(hyper, ctx) ** 2)


def _ddim_mean(hyper, x, eps, ctx):
    return jnp.sqrt(ctx.alpha_bar_next) * x0_from_eps(x, eps, ctx.alpha_bar) + _ddim_direction(hyper, ctx) * eps


def _ddim_score_coef(hyper, ctx):
    ab, abn = ctx.alpha_bar, ctx.alpha_bar_next
    return jnp.sqrt(abn) * (1.0 - ab) / jnp.sqrt(ab) - _ddim_direction(hyper, ctx) * jnp.sqrt(1.0 - ab)


def ddim(eta=0.0) -> Sampler:
    """DDIM (Song et al. 2021, Eq. 12) with its noise term really applied:

    ``x_next = sqrt(ab_n) x0|t + sqrt(1 - ab_n - sigma^2) eps + sigma z``,
    ``sigma = eta sqrt((1 - ab_n) / (1 - ab)) sqrt(1 - ab / ab_n)``. ``eta = 1`` is the DDPM
    posterior step, ``eta = 0`` the deterministic ODE-like step. ``eta`` may be traced.
    """
    return Sampler("ddim", _ddim_mean, _ddim_sigma, _ddim_score_coef, Eta(_check_eta(eta, "ddim")))


def _mixing_keep(hyper: Eta):
    return safe_sqrt(1.0 - hyper.eta ** 2)


def _mixing_mean(hyper, x, eps, ctx):
    return (jnp.sqrt(ctx.alpha_bar_next) * x0_from_eps(x, eps, ctx.alpha_bar)
            + jnp.sqrt(1.0 - ctx.alpha_bar_next) * _mixing_keep(hyper) * eps)


def _mixing_std(hyper, ctx):
    return hyper.eta * jnp.sqrt(1.0 - ctx.alpha_bar_next)


def _mixing_score_coef(hyper, ctx):
    ab, abn = ctx.alpha_bar, ctx.alpha_bar_next
    return jnp.sqrt(abn) * (1.0 - ab) / jnp.sqrt(ab) - jnp.sqrt(1.0 - abn) * _mixing_keep(hyper) * jnp.sqrt(1.0 - ab)


def eta_mixing(eta=0.5) -> Sampler:
    """FreeDoM's face sampler: ``x_next = sqrt(ab_n) x0|t + sqrt(1 - ab_n) (eta z + sqrt(1 - eta^2) eps)``.

    Not DDIM's sigma formula: the noise fraction ``eta`` is fixed at every step (FreeDoM uses 0.5).
    """
    return Sampler("eta_mixing", _mixing_mean, _mixing_std, _mixing_score_coef, Eta(_check_eta(eta, "eta_mixing")))


class Snr(NamedTuple):
    snr: jnp.ndarray


class LangevinStep(NamedTuple):
    e: jnp.ndarray


def _langevin_mean(hyper: LangevinStep, x, eps, ctx):
    return x + hyper.e * score_from_eps(eps, ctx.alpha_bar)


def _langevin_std(hyper: LangevinStep, ctx):
    return jnp.sqrt(2.0 * hyper.e)


def _langevin_score_coef(hyper: LangevinStep, ctx):
    return hyper.e


def _langevin(hyper: Snr, ctx) -> Sampler:
    e = 2.0 * (1.0 - ctx.beta) * hyper.snr ** 2 * (1.0 - ctx.alpha_bar)
    return Sampler("langevin", _langevin_mean, _langevin_std, _langevin_score_coef, LangevinStep(e))


def _pc_mean(hyper, x, eps, ctx):
    b = ctx.beta
    return (x + b * score_from_eps(eps, ctx.alpha_bar)) / jnp.sqrt(1.0 - b)


def _pc_score_coef(hyper, ctx):
    return ctx.beta / jnp.sqrt(1.0 - ctx.beta)


def predictor_corrector(snr=0.16, corrector_steps: int = 1) -> Sampler:
    """VP-SDE predictor-corrector sampler (Song et al. 2021), guided in every sub-step.

    Corrector: ``corrector_steps`` Langevin moves at level ``t``,
    ``x <- x + e (s(x) + g) + sqrt(2 e) z'``. score_sde sets ``e = 2 (1 - b) (snr |z'| / |s|)^2``
    from sampled norms; we use their expectations under the model (``E|z'|^2 = D``,
    ``E|s|^2 = D / (1 - ab_t)``), ``e = 2 (1 - b) snr^2 (1 - ab_t)``: the same step in high
    dimension, but one that does not explode when ``|s|`` happens to be small in low dimension,
    and that keeps samples independent of each other and of the batch.
    Predictor: ancestral VP step ``x_next = (x_t + b (s + g)) / sqrt(1 - b) + sqrt(b) z``.
    Guidance ``g`` enters both, as in score_sde's conditional PC sampler. ``snr`` may be traced;
    ``corrector_steps`` is static.
    """
    check_scalar(snr, "predictor_corrector", "snr", inclusive=False)
    if isinstance(corrector_steps, bool) or not isinstance(corrector_steps, int) or corrector_steps < 0:
        raise ValueError(f"predictor_corrector: corrector_steps must be an int >= 0; got {corrector_steps!r}.")
    return Sampler("pc", _pc_mean, _sqrt_beta, _pc_score_coef, Snr(snr),
                   _langevin if corrector_steps else None, corrector_steps)


def _check_eta(eta, who: str):
    check_scalar(eta, who, "eta")
    value = concrete(eta)
    if value is not None and value > 1.0:
        raise ValueError(f"{who}: eta must be a number in [0, 1]; got {eta!r}.")
    return eta  # a Python number stays weakly typed: it never changes the sample's dtype
