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

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from zmagic_jax._pytree import pytree_dataclass
from zmagic_jax.schedules import Schedule, TimestepGrid, alpha_bar, check_grid


class StepContext(NamedTuple):
    """Where a step is on the grid (scanned over as ``xs``, never closed over).

    ``score_coef`` is the sampler's ``d M0 / d score`` at this step; :func:`~zmagic_jax.direction`
    and the kernels fill it from the sampler they are given, so a context from
    :func:`step_context` is complete for any sampler.
    """

    index: jnp.ndarray
    t: jnp.ndarray
    t_next: jnp.ndarray
    alpha_bar: jnp.ndarray
    alpha_bar_next: jnp.ndarray
    score_coef: jnp.ndarray

    @property
    def beta(self):
        """Effective beta of the (possibly strided) step: ``1 - ab_t / ab_next``."""
        return 1.0 - self.alpha_bar / self.alpha_bar_next


@pytree_dataclass(static=("name", "mean_fn", "noise_std_fn", "score_coef_fn", "corrector_fn", "corrector_steps"))
class Sampler:
    """A solver of the reverse process, as pure functions of one sample.

    Its numbers (``hyper``, e.g. DDIM's ``eta``) are pytree leaves: ``ddim(0.0)`` and ``ddim(0.3)``
    share one compiled program, and ``jax.grad`` reaches them.

    Attributes:
      name: what it is called in reports (the label adds the numbers, see :attr:`label`).
      mean_fn: ``mean_fn(hyper, x_t, eps, ctx) -> M0``, the deterministic part of the step.
      noise_std_fn: ``noise_std_fn(hyper, ctx) -> scalar`` standard deviation of the added noise.
      score_coef_fn: ``score_coef_fn(hyper, ctx) -> scalar`` = ``d M0 / d score``; converts
        score-space guidance into a displacement.
      hyper: the sampler's numbers (a pytree of arrays, ``()`` if none).
      corrector_fn: optional ``corrector_fn(hyper, ctx) -> Sampler``: one guided sub-step taken at
        level ``t`` before the main step (a Langevin move of a predictor-corrector sampler), run
        ``corrector_steps`` times with noise ``noise_std(ctx) z``.
    """

    name: str
    mean_fn: Callable
    noise_std_fn: Callable
    score_coef_fn: Callable
    hyper: Any = ()
    corrector_fn: Optional[Callable] = None
    corrector_steps: int = 0

    def mean(self, x, eps, ctx):
        return self.mean_fn(self.hyper, x, eps, ctx)

    def noise_std(self, ctx):
        return self.noise_std_fn(self.hyper, ctx)

    def score_coef(self, ctx):
        return self.score_coef_fn(self.hyper, ctx)

    def corrector(self, ctx) -> "Sampler":
        return self.corrector_fn(self.hyper, ctx)

    @property
    def label(self) -> str:
        """``name`` with its numbers, e.g. ``ddim(eta=0.3)`` (``name`` alone when they are traced)."""
        leaves = jax.tree_util.tree_leaves(self.hyper)
        if not leaves or any(isinstance(v, jax.core.Tracer) for v in leaves):
            return self.name
        names = self.hyper._fields if hasattr(self.hyper, "_fields") else range(len(leaves))
        return f"{self.name}(" + ",".join(f"{n}={float(v):g}" for n, v in zip(names, leaves)) + ")"


def with_score_coef(ctx: StepContext, sampler: Sampler, dtype) -> StepContext:
    """``ctx`` with ``score_coef`` set from ``sampler`` (what every rule that works in score space needs)."""
    return ctx._replace(score_coef=jnp.asarray(sampler.score_coef(ctx), dtype))


def step_contexts(schedule: Schedule, grid: TimestepGrid, dtype=jnp.float32) -> StepContext:
    """Stacked :class:`StepContext` for every step of ``grid`` (the ``xs`` of the ``lax.scan``), its
    noise levels in ``dtype`` (use the sample's dtype). ``score_coef`` is zero until a sampler fills it."""
    grid = check_grid(schedule, grid, "step_contexts")
    t = jnp.asarray(grid.t, jnp.int32)
    t_next = jnp.asarray(grid.t_next, jnp.int32)
    return StepContext(
        index=jnp.arange(t.shape[0], dtype=jnp.int32), t=t, t_next=t_next,
        alpha_bar=alpha_bar(schedule, t, dtype), alpha_bar_next=alpha_bar(schedule, t_next, dtype),
        score_coef=jnp.zeros(t.shape, dtype))


def step_context(schedule: Schedule, grid: TimestepGrid, index: int, dtype=jnp.float32) -> StepContext:
    """The :class:`StepContext` of step ``index`` of ``grid`` (``-1`` = the last step), e.g. to call
    :func:`~zmagic_jax.direction` or :func:`~zmagic_jax.step` on one step by hand."""
    grid = check_grid(schedule, grid, "step_context")
    steps = grid.num_steps
    if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not -steps <= index < steps:
        raise ValueError(f"step_context: index must be an integer in [{-steps}, {steps}) for a grid of {steps} "
                         f"steps; got {index!r}.")
    return jax.tree_util.tree_map(lambda a: a[int(index)], step_contexts(schedule, grid, dtype))
