"""Step rules: how a condition's energy gradient becomes a displacement of the sampler's mean.

A rule gives ``rho_t >= 0`` and the displacement is ``d = -rho_t * grad_{x_t} E(x0|t(x_t))``; the
scheme treats ``rho_t`` as a constant (``stop_gradient``), as FreeDoM does with ``.item()``.
Every rule has a guidance window: it is active iff ``stop < t <= start`` (``None`` = unbounded);
inactive steps skip all gradient work (``lax.cond`` on a predicate that depends only on the grid).
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from zmagic_jax.schedules import TimestepGrid


class StepRule(NamedTuple):
    """``rho(ctx, eps, grad, x) -> scalar``, ``active(ctx) -> bool``, ``check(grid)`` raises if unusable.

    ``rho`` sees the step's context, the denoiser output ``eps`` and the gradient ``grad`` at the
    point ``x`` where the gradient was taken (``x_t``, or the look-ahead point of a dependent term).
    """

    rho: Callable
    active: Callable
    check: Callable


def _rms(v):
    return jnp.sqrt(jnp.mean(jnp.square(v)))


def check_window(start: Optional[int], stop: Optional[int], who: str) -> None:
    """Validate a window ``stop < t <= start`` (``None`` = unbounded) at construction time."""
    for name, value in (("start", start), ("stop", stop)):
        if value is not None and not isinstance(value, (int, np.integer)):
            raise ValueError(f"{who}: {name} must be an integer timestep or None; got {value!r}.")
    if start is not None and stop is not None and start <= stop:
        raise ValueError(f"{who}: the window stop < t <= start is empty (start={start}, stop={stop}); "
                         "pass start > stop.")


def in_window(t, start: Optional[int], stop: Optional[int]):
    """``stop < t <= start`` for a (traced or numpy) timestep array ``t``."""
    on = t == t
    if start is not None:
        on = on & (t <= start)
    if stop is not None:
        on = on & (t > stop)
    return on


def check_window_hits(grid: TimestepGrid, start: Optional[int], stop: Optional[int], who: str) -> None:
    """Raise unless some step of ``grid`` lies in the window."""
    t = np.asarray(grid.t)
    if not in_window(t, start, stop).any():
        raise ValueError(
            f"{who}: the window stop < t <= start (start={start}, stop={stop}) contains no "
            f"step of the grid, whose timesteps run from {t.max()} down to {t.min()}; "
            "widen the window or change the grid.")


def _window(start: Optional[int], stop: Optional[int], who: str):
    check_window(start, stop, who)
    return (lambda ctx: in_window(ctx.t, start, stop),
            lambda grid: check_window_hits(grid, start, stop, who))


def freedom_rule(scale: float, stop: Optional[int] = None, start: Optional[int] = None) -> StepRule:
    """FreeDoM's face rule: ``rho_t = sqrt(ab_t) * scale``, guided only for ``stop < t <= start``."""
    active, check = _window(start, stop, "freedom_rule")
    return StepRule(lambda ctx, eps, grad, x=None: jnp.sqrt(ctx.alpha_bar) * scale, active, check)


def norm_relative_rule(factor: float = 0.02, stop: Optional[int] = None,
                       start: Optional[int] = None) -> StepRule:
    """FreeDoM's text rule: the displacement has RMS ``factor`` times that of the noise removal.

    ``rho_t = factor * rms(eps) * sqrt(1 - ab_t) / sqrt(ab_t) * c1 / rms(grad)`` with the DDPM
    posterior coefficient ``c1 = sqrt(ab_n) (1 - ab_t / ab_n) / (1 - ab_t)``; ``rho = 0`` for a
    zero gradient.
    """
    active, check = _window(start, stop, "norm_relative_rule")

    def rho(ctx, eps, grad, x=None):
        c1 = jnp.sqrt(ctx.alpha_bar_next) * ctx.beta / (1.0 - ctx.alpha_bar)
        removal = _rms(eps) * jnp.sqrt(1.0 - ctx.alpha_bar) / jnp.sqrt(ctx.alpha_bar) * c1
        g = _rms(grad)
        return jnp.where(g > 0, factor * removal / jnp.where(g > 0, g, 1.0), 0.0)

    return StepRule(rho, active, check)


def score_rule(scale: float = 1.0, stop: Optional[int] = None, start: Optional[int] = None) -> StepRule:
    """Treat ``-scale * grad E`` as score-space guidance ``g ~ grad log p(c|x_t)`` (classifier
    guidance, DPS-style plug-in): ``rho_t = scale * score_coef``, the sampler's ``d M0 / d score``.

    With an exact ``E = -log p(c | x_t)`` and ``scale = 1`` this samples the exact posterior in the
    small-step limit.
    """
    active, check = _window(start, stop, "score_rule")
    return StepRule(lambda ctx, eps, grad, x=None: scale * ctx.score_coef, active, check)


def cfg_relative_rule(factor: float, correction_fn: Callable, stop: Optional[int] = None,
                      start: Optional[int] = None) -> StepRule:
    """FreeDoM's Stable Diffusion rule: the displacement has RMS ``factor`` times that of the
    classifier-free guidance correction at the same point.

    ``rho_t = factor * rms(correction_fn(x, t)) / rms(grad)`` where ``correction_fn(x, t) =
    w (eps_c - eps_u)`` (:func:`zmagic_jax.models.latent_cfg_correction_fn`); FreeDoM's style
    guidance uses ``factor = 0.2``. ``rho = 0`` for a zero gradient. The correction is evaluated
    at the point where the gradient was taken, under ``stop_gradient`` like every ``rho``.
    """
    if not isinstance(factor, (int, float)) or not factor >= 0:
        raise ValueError(f"cfg_relative_rule: factor must be a number >= 0; got {factor!r}.")
    if not callable(correction_fn):
        raise ValueError("cfg_relative_rule: correction_fn must be callable as correction_fn(x_t, t), "
                         f"e.g. zmagic_jax.models.latent_cfg_correction_fn(...); got {correction_fn!r}.")
    active, check = _window(start, stop, "cfg_relative_rule")

    def rho(ctx, eps, grad, x=None):
        if x is None:
            raise ValueError("cfg_relative_rule: rho needs the point x where the gradient was taken.")
        reference = _rms(jax.lax.stop_gradient(correction_fn(jax.lax.stop_gradient(x), ctx.t)))
        g = _rms(grad)
        return jnp.where(g > 0, factor * reference / jnp.where(g > 0, g, 1.0), 0.0)

    return StepRule(rho, active, check)


def schedule_rule(rhos) -> StepRule:
    """An explicit per-step schedule: ``rho = rhos[i]`` at grid step ``i``; steps with ``rho = 0``
    are unguided."""
    rhos = np.asarray(rhos, np.float32)
    if rhos.ndim != 1 or not np.all(np.isfinite(rhos)) or np.any(rhos < 0):
        raise ValueError("schedule_rule: rhos must be a 1-D array of finite values >= 0, one per grid step.")
    table = jnp.asarray(rhos)

    def check(grid: TimestepGrid):
        if rhos.shape[0] != grid.num_steps:
            raise ValueError(f"schedule_rule: rhos has {rhos.shape[0]} entries but the grid has "
                             f"{grid.num_steps} steps; give one rho per step.")

    return StepRule(lambda ctx, eps, grad, x=None: table[ctx.index], lambda ctx: table[ctx.index] > 0, check)
