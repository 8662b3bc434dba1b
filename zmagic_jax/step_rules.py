"""Step rules: how a condition's energy gradient becomes a displacement of the sampler's mean.

A rule gives ``rho_t >= 0`` and the displacement is ``d = -rho_t * grad_{x_t} E(x0|t(x_t))``.

A rule is data (a pytree): its numbers (scale, factor, the window's ``start`` / ``stop``, a
per-step table) are leaves, so ``jax.grad`` and ``jax.vmap`` reach them and a new value never
recompiles; its function ``rho_fn`` is static.

Which inputs of rho are held constant: FreeDoM's convention is that ``rho`` does not depend on
``x`` when a guided step is differentiated. The schemes honour it by construction: rho is
evaluated from the gradient *outside* the map they linearise (Z-Magic's look-ahead map
``x -> M0(x) - rho grad E(x)`` is differentiated with ``rho`` a number), so no ``stop_gradient``
is needed. Nothing else is cut: a user's own ``jax.grad`` through a whole sampling run sees the
true derivative of what was computed, through rho's hyper-parameters and through its
dependence on the trajectory (norm- and CFG-relative rules depend on ``x`` via ``eps`` and the
gradient), so it equals finite differences.

Every rule has a guidance window: it is active iff ``stop < t <= start`` (``None`` = unbounded).
Inactive steps skip all gradient work (``lax.cond`` on a predicate that depends only on the grid
and the window).
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import jax.numpy as jnp
import numpy as np

from zmagic_jax._pytree import check_scalar, concrete, pytree_dataclass
from zmagic_jax.contracts import Denoiser
from zmagic_jax.schedules import TimestepGrid

NO_START = np.iinfo(np.int32).max   # ``start=None``: every t is <= it
NO_STOP = -1                        # ``stop=None``: every t (>= 0) is above it


@pytree_dataclass(static=("name", "rho_fn", "active_fn", "check_fn"))
class StepRule:
    """``rho(ctx, eps, grad, x) = rho_fn(hyper, ctx, eps, grad, x)``, active for ``stop < t <= start``.

    ``rho_fn`` sees the rule's numbers ``hyper``, the step's context (with the sampler's
    ``score_coef`` filled in), the denoiser output ``eps`` and the gradient ``grad`` at the point
    ``x`` where it was taken (``x_t``, or the look-ahead point of a dependent term). ``active_fn``
    (optional, ``active_fn(rule, ctx) -> bool``) replaces the window test and ``check_fn``
    (optional, ``check_fn(rule, grid)``, raises) the host-side check against the grid.
    A custom rule is ``StepRule("mine", rho_fn, hyper)``.
    """

    name: str
    rho_fn: Callable
    hyper: Any = ()
    start: Any = NO_START
    stop: Any = NO_STOP
    active_fn: Optional[Callable] = None
    check_fn: Optional[Callable] = None

    def rho(self, ctx, eps, grad, x):
        return self.rho_fn(self.hyper, ctx, eps, grad, x)

    def active(self, ctx):
        """Whether the rule guides at this step, as a boolean array (never a Python bool)."""
        if self.active_fn is not None:
            return jnp.asarray(self.active_fn(self, ctx), bool)
        return (ctx.t <= self.start) & (ctx.t > self.stop)

    def check(self, grid: TimestepGrid) -> None:
        """Raise unless some step of ``grid`` can be guided (skipped while the window is traced)."""
        if self.check_fn is not None:
            self.check_fn(self, grid)
            return
        if self.active_fn is not None:
            return
        start, stop = concrete(self.start), concrete(self.stop)
        if start is None or stop is None:
            return
        t = np.asarray(grid.t)
        if not np.any((t <= start) & (t > stop)):
            raise ValueError(
                f"{self.name}: the window stop < t <= start (start={_shown(start, NO_START)}, "
                f"stop={_shown(stop, NO_STOP)}) contains no step of the grid, whose timesteps run from {t.max()} "
                f"down to {t.min()}; widen the window or change the grid.")


def _shown(value, unbounded) -> str:
    return "None" if int(value) == unbounded else str(int(value))


def window(start: Optional[int], stop: Optional[int], who: str) -> tuple:
    """Validated window bounds as leaves: ``None`` becomes an unbounded sentinel. Integers or
    integer arrays (possibly traced) are accepted; an empty window ``start <= stop`` is an error."""
    bounds = []
    for name, value, unbounded in (("start", start, NO_START), ("stop", stop, NO_STOP)):
        if value is None:
            bounds.append(unbounded)
            continue
        number = concrete(value)
        if isinstance(value, bool) or (number is not None and (number.shape != () or
                                                               not np.issubdtype(number.dtype, np.integer))):
            raise ValueError(f"{who}: {name} must be an integer timestep or None; got {value!r}.")
        bounds.append(int(number) if number is not None else value)
    s, p = concrete(bounds[0]), concrete(bounds[1])
    if s is not None and p is not None and s <= p:
        raise ValueError(f"{who}: the window stop < t <= start is empty (start={start}, stop={stop}); "
                         "pass start > stop.")
    return tuple(bounds)


def in_window(t, start, stop):
    """``stop < t <= start`` for a timestep array ``t`` (``None`` = unbounded)."""
    start, stop = window(start, stop, "window")
    return (t <= start) & (t > stop)


def _rms(v):
    return jnp.sqrt(jnp.mean(jnp.square(v)))


def _relative(target, grad):
    """``target / rms(grad)``, 0 for a zero gradient (the displacement is then 0 whatever rho is)."""
    g = _rms(grad)
    return jnp.where(g > 0, target / jnp.where(g > 0, g, 1.0), 0.0)


def _freedom_rho(scale, ctx, eps, grad, x):
    return jnp.sqrt(ctx.alpha_bar) * scale


def freedom_rule(scale, stop: Optional[int] = None, start: Optional[int] = None) -> StepRule:
    """FreeDoM's face rule: ``rho_t = sqrt(ab_t) * scale``, guided only for ``stop < t <= start``."""
    check_scalar(scale, "freedom_rule", "scale")
    return StepRule("freedom_rule", _freedom_rho, scale, *window(start, stop, "freedom_rule"))


def _norm_relative_rho(factor, ctx, eps, grad, x):
    c1 = jnp.sqrt(ctx.alpha_bar_next) * ctx.beta / (1.0 - ctx.alpha_bar)
    removal = _rms(eps) * jnp.sqrt(1.0 - ctx.alpha_bar) / jnp.sqrt(ctx.alpha_bar) * c1
    return _relative(factor * removal, grad)


def norm_relative_rule(factor=0.02, stop: Optional[int] = None, start: Optional[int] = None) -> StepRule:
    """FreeDoM's text rule: the displacement has RMS ``factor`` times that of the noise removal.

    ``rho_t = factor * rms(eps) * sqrt(1 - ab_t) / sqrt(ab_t) * c1 / rms(grad)`` with the DDPM
    posterior coefficient ``c1 = sqrt(ab_n) (1 - ab_t / ab_n) / (1 - ab_t)``; ``rho = 0`` for a
    zero gradient.
    """
    check_scalar(factor, "norm_relative_rule", "factor")
    return StepRule("norm_relative_rule", _norm_relative_rho, factor, *window(start, stop, "norm_relative_rule"))


def _score_rho(scale, ctx, eps, grad, x):
    return scale * ctx.score_coef


def score_rule(scale=1.0, stop: Optional[int] = None, start: Optional[int] = None) -> StepRule:
    """Treat ``-scale * grad E`` as score-space guidance ``g ~ grad log p(c|x_t)`` (classifier
    guidance, DPS-style plug-in): ``rho_t = scale * score_coef``, the sampler's ``d M0 / d score``.

    With an exact ``E = -log p(c | x_t)`` and ``scale = 1`` this samples the exact posterior in the
    small-step limit.
    """
    check_scalar(scale, "score_rule", "scale")
    return StepRule("score_rule", _score_rho, scale, *window(start, stop, "score_rule"))


def _cfg_relative_rho(hyper, ctx, eps, grad, x):
    factor, correction = hyper
    return _relative(factor * _rms(correction(x, ctx.t)), grad)


def cfg_relative_rule(factor, correction: Denoiser, stop: Optional[int] = None,
                      start: Optional[int] = None) -> StepRule:
    """FreeDoM's Stable Diffusion rule: the displacement has RMS ``factor`` times that of the
    classifier-free guidance correction at the same point.

    ``rho_t = factor * rms(correction(x, t)) / rms(grad)`` where ``correction`` is a
    :class:`~zmagic_jax.Denoiser` returning ``w (eps_c - eps_u)``
    (:func:`zmagic_jax.models.latent_cfg_correction`), evaluated at the point where the gradient
    was taken; its weights are leaves of the rule. FreeDoM's style guidance uses ``factor = 0.2``.
    ``rho = 0`` for a zero gradient.
    """
    check_scalar(factor, "cfg_relative_rule", "factor")
    if not isinstance(correction, Denoiser):
        raise ValueError("cfg_relative_rule: correction must be a zmagic_jax.Denoiser whose apply returns "
                         "w (eps_c - eps_u), e.g. zmagic_jax.models.latent_cfg_correction(...); got "
                         f"{type(correction).__name__}.")
    return StepRule("cfg_relative_rule", _cfg_relative_rho, (factor, correction),
                    *window(start, stop, "cfg_relative_rule"))


def _table_rho(rhos, ctx, eps, grad, x):
    return rhos[ctx.index]


def _table_active(rule, ctx):
    return rule.hyper[ctx.index] > 0


def schedule_rule(rhos) -> StepRule:
    """An explicit per-step schedule: ``rho = rhos[i]`` at grid step ``i``; steps with ``rho = 0``
    are unguided. ``rhos`` is a leaf (may be traced)."""
    values = concrete(rhos)
    if values is not None and (values.ndim != 1 or not np.all(np.isfinite(values)) or np.any(values < 0)):
        raise ValueError("schedule_rule: rhos must be a 1-D array of finite values >= 0, one per grid step.")
    table = jnp.asarray(rhos) if values is None else jnp.asarray(values, jnp.result_type(float))
    return StepRule("schedule_rule", _table_rho, table, active_fn=_table_active, check_fn=_table_check)


def _table_check(rule, grid: TimestepGrid) -> None:
    if rule.hyper.shape[0] != grid.num_steps:
        raise ValueError(f"schedule_rule: rhos has {rule.hyper.shape[0]} entries but the grid has "
                         f"{grid.num_steps} steps; give one rho per step.")
