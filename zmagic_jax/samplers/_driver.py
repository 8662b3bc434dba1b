"""DDIM inversion: the deterministic walk from clean data up the grid."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from zmagic_jax.samplers._base import step_contexts
from zmagic_jax.schedules import Schedule, TimestepGrid, x0_from_eps


def ddim_invert(x0, schedule: Schedule, grid: TimestepGrid, *, denoiser):
    """Deterministic DDIM inversion (eta = 0) of one sample: walk ``grid`` from clean data up to ``grid.t[0]``.

    Step from level ``t_next`` up to ``t`` with the noise prediction taken at the current point:
    ``x_t = sqrt(ab_t) x0|(x_tn) + sqrt(1 - ab_t) eps(x_tn, t_n)`` (at the clean level the current
    point is the data itself). Sampling back with ``ddim(eta=0)`` on the same grid reconstructs
    ``x0`` up to the discretisation error of that approximation. ``denoiser(x, t)`` is a
    :class:`~zmagic_jax.Denoiser`. Pure and un-jitted.
    """
    x0 = jnp.asarray(x0)
    ctxs = step_contexts(schedule, grid, x0.dtype)
    reverse = jax.tree_util.tree_map(lambda a: a[::-1], ctxs)

    def body(x, ctx):
        # At the clean level there is no noise prediction; use level t's (ab_next = 1 makes
        # x0_from_eps return x itself there).
        eps = denoiser(x, jnp.where(ctx.t_next < 0, ctx.t, ctx.t_next))
        clean = x0_from_eps(x, eps, ctx.alpha_bar_next)
        return jnp.sqrt(ctx.alpha_bar) * clean + jnp.sqrt(1.0 - ctx.alpha_bar) * eps, None

    x, _ = jax.lax.scan(body, x0, reverse)
    return x
