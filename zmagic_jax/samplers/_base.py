"""Sampler anatomy shared by every step rule and scheme.

A sampler moves one sample from timestep ``t`` to ``t_next`` in two parts:

* the *mean map* ``M0(x_t, eps, ctx)``: the deterministic part, differentiable, so schemes can
  pull gradients back through it (Z-Magic term II);
* Gaussian noise ``noise_std(ctx) * z``.

Guidance enters as a displacement ``d`` of the mean: ``x_next = M0(x_t, eps) + d + noise_std z``.
A score-space guidance term ``g = grad log p(c | x_t)`` (the paper's form, which adds ``g`` to the
score) is the displacement ``d = score_coef(ctx) * g``, because every sampler here is affine in the
score; FreeDoM's ``x_next -= rho * grad E`` is the displacement ``d = -rho grad E`` directly.
"""
from __future__ import annotations

from typing import Callable, NamedTuple, Optional

import jax.numpy as jnp
import numpy as np

from zmagic_jax.schedules import Schedule, TimestepGrid, alpha_bar


class StepContext(NamedTuple):
    """Everything a step may need about where it is on the grid (scanned over, never closed over)."""

    index: jnp.ndarray
    t: jnp.ndarray
    t_next: jnp.ndarray
    alpha_bar: jnp.ndarray
    alpha_bar_next: jnp.ndarray
    score_coef: jnp.ndarray = jnp.float32(0.0)

    @property
    def beta(self):
        """Effective beta of the (possibly strided) step: ``1 - ab_t / ab_next``."""
        return 1.0 - self.alpha_bar / self.alpha_bar_next


class Sampler(NamedTuple):
    """A solver of the reverse process, as pure functions of one sample.

    Attributes:
      name: what it is called in reports.
      mean: ``mean(x_t, eps, ctx) -> M0``, the deterministic part of the step.
      noise_std: ``noise_std(ctx) -> scalar`` standard deviation of the added noise.
      score_coef: ``score_coef(ctx) -> scalar`` = ``d M0 / d score``; converts score-space guidance
        into a displacement.
      corrector: optional ``corrector(key, x_t, ctx, eps_fn) -> (sub_sampler, noise)`` describing
        one guided sub-step taken at level ``t`` before the main step (Langevin moves of a
        predictor-corrector sampler); run ``corrector_steps`` times.
    """

    name: str
    mean: Callable
    noise_std: Callable
    score_coef: Callable
    corrector: Optional[Callable] = None
    corrector_steps: int = 0


def step_contexts(schedule: Schedule, grid: TimestepGrid) -> StepContext:
    """Stacked :class:`StepContext` for every step of ``grid`` (the ``xs`` of the ``lax.scan``)."""
    t = np.asarray(grid.t)
    if t.size and (t.max() >= schedule.num_train_steps or t.min() < 0):
        raise ValueError(
            f"grid: timesteps must lie in [0, {schedule.num_train_steps - 1}] for this schedule; "
            f"got range [{t.min()}, {t.max()}]. Build the grid with the schedule's num_train_steps.")
    t = jnp.asarray(grid.t, jnp.int32)
    t_next = jnp.asarray(grid.t_next, jnp.int32)
    return StepContext(
        index=jnp.arange(t.shape[0], dtype=jnp.int32), t=t, t_next=t_next,
        alpha_bar=alpha_bar(schedule, t), alpha_bar_next=alpha_bar(schedule, t_next),
        score_coef=jnp.zeros(t.shape, jnp.float32))
