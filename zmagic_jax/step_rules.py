"""Step rules: how a condition's energy gradient becomes a displacement of the sampler's mean.

A rule gives ``rho_t >= 0`` and the displacement is ``d = -rho_t * grad_{x_t} E(x0|t(x_t))``; the
scheme treats ``rho_t`` as a constant (``stop_gradient``), as FreeDoM does with ``.item()``.
Every rule has a guidance window: it is active iff ``stop < t <= start`` (``None`` = unbounded);
inactive steps skip all gradient work (``lax.cond`` on a predicate that depends only on the grid).
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax.numpy as jnp
import numpy as np

from zmagic_jax.samplers._base import StepContext
from zmagic_jax.schedules import TimestepGrid


class StepRule(NamedTuple):
    """``rho(ctx, eps, grad) -> scalar``, ``active(ctx) -> bool``, ``check(grid)`` raises if unusable."""

    rho: Callable
    active: Callable
    check: Callable


def _rms(v):
    return jnp.sqrt(jnp.mean(jnp.square(v)))


def _window(start: Optional[int], stop: Optional[int], who: str):
    for name, value in (("start", start), ("stop", stop)):
        if value is not None and not isinstance(value, (int, np.integer)):
            raise ValueError(f"{who}: {name} must be an integer timestep or None; got {value!r}.")
    if start is not None and stop is not None and start <= stop:
        raise ValueError(f"{who}: the window stop < t <= start is empty (start={start}, stop={stop}); "
                         "pass start > stop.")

    def active(ctx: StepContext):
        on = jnp.asarray(True)
        if start is not None:
            on = on & (ctx.t <= start)
        if stop is not None:
            on = on & (ctx.t > stop)
        return on

    def check(grid: TimestepGrid):
        t = np.asarray(grid.t)
        inside = np.ones(t.shape, bool)
        if start is not None:
            inside &= t <= start
        if stop is not None:
            inside &= t > stop
        if not inside.any():
            raise ValueError(
                f"{who}: the guidance window stop < t <= start (start={start}, stop={stop}) contains no "
                f"step of the grid, whose timesteps run from {t.max()} down to {t.min()}; "
                "widen the window or change the grid.")

    return active, check


def freedom_rule(scale: float, stop: Optional[int] = None, start: Optional[int] = None) -> StepRule:
    """FreeDoM's face rule: ``rho_t = sqrt(ab_t) * scale``, guided only for ``stop < t <= start``."""
    active, check = _window(start, stop, "freedom_rule")
    return StepRule(lambda ctx, eps, grad: jnp.sqrt(ctx.alpha_bar) * scale, active, check)


def norm_relative_rule(factor: float = 0.02, stop: Optional[int] = None,
                       start: Optional[int] = None) -> StepRule:
    """FreeDoM's text rule: the displacement has RMS ``factor`` times that of the noise removal.

    ``rho_t = factor * rms(eps) * sqrt(1 - ab_t) / sqrt(ab_t) * c1 / rms(grad)`` with the DDPM
    posterior coefficient ``c1 = sqrt(ab_n) (1 - ab_t / ab_n) / (1 - ab_t)``; ``rho = 0`` for a
    zero gradient.
    """
    active, check = _window(start, stop, "norm_relative_rule")

    def rho(ctx, eps, grad):
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
    return StepRule(lambda ctx, eps, grad: scale * ctx.score_coef, active, check)


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

    return StepRule(lambda ctx, eps, grad: table[ctx.index], lambda ctx: table[ctx.index] > 0, check)
