"""Run a step kernel over a static grid: one ``lax.scan``, per-step keys by ``fold_in``."""
from __future__ import annotations

from typing import Callable, Optional

import jax
import jax.numpy as jnp

from zmagic_jax.samplers._base import StepContext, step_contexts
from zmagic_jax.schedules import Schedule, TimestepGrid, x0_from_eps


def _default_record(x_next, info):
    return info


def run_chain(key, x, kernel: Callable, contexts: StepContext,
              record: Optional[Callable] = None, debug_loop: bool = False):
    """Apply ``kernel(key_i, x, ctx_i) -> (x, info)`` for every step of ``contexts``.

    Step ``i`` uses ``fold_in(key, i)``, so a run is reproducible bit for bit and independent of
    how steps are scheduled. ``record(x_next, info)`` picks what is stacked per step (default: the
    info). The scan body is traced once, so compile time does not grow with the number of steps;
    ``debug_loop=True`` runs the same kernel in a Python loop (eager, for breakpoints and prints).
    """
    record = record or _default_record

    def body(x, ctx):
        x_next, info = kernel(jax.random.fold_in(key, ctx.index), x, ctx)
        return x_next, record(x_next, info)

    if not debug_loop:
        return jax.lax.scan(body, x, contexts)
    outputs = []
    for i in range(contexts.t.shape[0]):
        x, out = body(x, jax.tree_util.tree_map(lambda a: a[i], contexts))
        outputs.append(out)
    return x, jax.tree_util.tree_map(lambda *a: jnp.stack(a), *outputs)


def ddim_invert(x0, eps_fn: Callable, schedule: Schedule, grid: TimestepGrid):
    """Deterministic DDIM inversion (eta = 0) of one sample: walk ``grid`` from clean data up to ``grid.t[0]``.

    Step from level ``t_next`` up to ``t`` with the noise prediction taken at the current point:
    ``x_t = sqrt(ab_t) x0|(x_tn) + sqrt(1 - ab_t) eps(x_tn, t_n)`` (at the clean level the current
    point is the data itself). Sampling back with ``ddim(eta=0)`` on the same grid reconstructs
    ``x0`` up to the discretisation error of that approximation.
    """
    ctxs = step_contexts(schedule, grid)
    reverse = jax.tree_util.tree_map(lambda a: a[::-1], ctxs)

    def body(x, ctx):
        # At the clean level there is no noise prediction; use level t's (ab_next = 1 makes
        # x0_from_eps return x itself there).
        eps = eps_fn(x, jnp.where(ctx.t_next < 0, ctx.t, ctx.t_next))
        clean = x0_from_eps(x, eps, ctx.alpha_bar_next)
        return jnp.sqrt(ctx.alpha_bar) * clean + jnp.sqrt(1.0 - ctx.alpha_bar) * eps, None

    x, _ = jax.lax.scan(body, x0, reverse)
    return x
