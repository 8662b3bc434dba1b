"""Guided sampling end to end: validate at the edge, one ``jit``, ``vmap`` over samples, ``scan`` over steps."""
from __future__ import annotations

import warnings
from typing import Callable, NamedTuple, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from zmagic_jax.samplers import Sampler, StepContext, run_chain, sampler_by_name, step_contexts
from zmagic_jax.schedules import Schedule, TimestepGrid
from zmagic_jax.schemes._schemes import (Dependent, GuidanceInfo, Independent, Multi, NoGuidance, direction,
                                         none)
from zmagic_jax.step_rules import check_window, check_window_hits, in_window

_SCHEME_TYPES = (NoGuidance, Independent, Dependent, Multi)


class TimeTravel(NamedTuple):
    """FreeDoM's time-travel: inside the window ``stop < t <= start`` each step is taken
    ``repeats`` times, re-noising back to level ``t`` between repeats (see :func:`time_travel`)."""

    repeats: int
    start: Optional[int] = None
    stop: Optional[int] = None


def time_travel(repeats: int, start: Optional[int] = None, stop: Optional[int] = None) -> TimeTravel:
    """Repeat every guided step with ``stop < t <= start`` ``repeats`` times (FreeDoM Sec. 3.4).

    After each of the first ``repeats - 1`` passes the result ``x_next`` is sent back to level
    ``t`` by the forward process, ``x_t = sqrt(a) x_next + sqrt(1 - a) z`` with
    ``a = ab_t / ab_next`` and fresh ``z``, and the step is taken again; the last pass is kept.
    ``repeats = 1`` is plain sampling. FreeDoM's Stable Diffusion style recipe uses 3 repeats on
    DDIM indices 40..69 of 100 steps (``start=699, stop=399``).
    """
    if isinstance(repeats, bool) or not isinstance(repeats, (int, np.integer)) or repeats < 1:
        raise ValueError(f"time_travel: repeats must be an integer >= 1; got {repeats!r}.")
    check_window(start, stop, "time_travel")
    return TimeTravel(int(repeats), None if start is None else int(start), None if stop is None else int(stop))


def guided_kernel(eps_fn: Callable, sampler: Sampler, scheme,
                  time_travel: Optional[TimeTravel] = None) -> Callable:
    """One guided step of one sample: ``kernel(key, x_t, ctx) -> (x_next, GuidanceInfo)``.

    ``x_next = M0(x_t, eps) + d + sigma_t z``; the same ``z`` enters the scheme's look-ahead point
    ``xhat`` (Z-Magic Alg. 1, lines 5-10). A sampler's corrector sub-steps run first, each guided
    by the same scheme. With ``time_travel`` the step is repeated inside its window (a
    ``while_loop`` whose trip count depends only on the grid): pass ``r >= 1`` draws its re-noising
    and step noise from ``split(fold_in(key, r))``, pass 0 uses ``key`` as an unrepeated step does;
    the step is traced once (all passes run in the loop).
    The info of the last pass is returned, with ``finite`` accumulated over all passes.
    """
    def step(key, x, ctx: StepContext):
        keys = jax.random.split(key, sampler.corrector_steps + 1)
        for sub_key in keys[:-1]:
            sub, noise = sampler.corrector(sub_key, x, ctx, eps_fn)
            x, _ = _substep(sub, x, ctx, noise)
        noise = sampler.noise_std(ctx) * jax.random.normal(keys[-1], x.shape, x.dtype)
        return _substep(sampler, x, ctx, noise)

    def _substep(sub: Sampler, x, ctx, noise):
        ctx = ctx._replace(score_coef=jnp.asarray(sub.score_coef(ctx), x.dtype))
        eps, d, info = direction(scheme, eps_fn, sub, x, ctx, noise)
        return sub.mean(x, eps, ctx) + d + noise, info

    if time_travel is None:
        return step

    def kernel(key, x, ctx: StepContext):
        repeats = jnp.where(in_window(ctx.t, time_travel.start, time_travel.stop), time_travel.repeats, 1)
        a = ctx.alpha_bar / ctx.alpha_bar_next

        # One traced copy of the step: pass 0 runs inside the loop too (steps are costly to compile).
        def again(carry):
            r, x_next, info = carry
            noise_key, step_key = jax.random.split(jax.random.fold_in(key, r))
            step_key = jax.lax.cond(r == 0, lambda: key, lambda: step_key)
            z = jax.random.normal(noise_key, x.shape, x.dtype)
            x_t = jnp.where(r == 0, x, (jnp.sqrt(a) * x_next + jnp.sqrt(1.0 - a) * z).astype(x.dtype))
            x_new, new_info = step(step_key, x_t, ctx)
            return r + 1, x_new, new_info._replace(finite=new_info.finite & info.finite)

        n = len(scheme.conditions)
        info0 = GuidanceInfo(jnp.zeros((n,), x.dtype), jnp.zeros((n,), x.dtype), jnp.asarray(jnp.nan, x.dtype),
                             jnp.asarray(False), jnp.ones((n,), bool))
        _, x_next, info = jax.lax.while_loop(lambda c: c[0] < repeats, again, (jnp.int32(0), x, info0))
        return x_next, info

    return kernel


def _run(key, x_T, contexts, eps_fn, sampler, scheme, record, debug_loop, time_travel):
    kernel = guided_kernel(eps_fn, sampler, scheme, time_travel)
    keys = jax.random.split(key, x_T.shape[0])
    keep = record or (lambda x, info: info)
    both = lambda x, info: (keep(x, info), info.finite)
    one = lambda k, x: run_chain(k, x, kernel, contexts, both, debug_loop)
    x0, (trace, finite) = jax.vmap(one)(keys, x_T)
    return x0, trace, finite


_run_jit = jax.jit(_run, static_argnames=("eps_fn", "sampler", "scheme", "record", "debug_loop",
                                                 "time_travel"))


def sample(key, x_T, eps_fn: Callable, schedule: Schedule, grid: TimestepGrid, scheme=None,
           sampler: Union[Sampler, str] = "ddpm_ancestral", *, record: Optional[Callable] = None,
           nan_policy: str = "raise", debug_loop: bool = False,
           time_travel: Optional[TimeTravel] = None):
    """Draw a batch of guided samples.

    Args:
      key: PRNG key; sample ``b`` uses ``split(key, batch)[b]`` and step ``i`` its ``fold_in(., i)``,
        so the same key gives the same bits.
      x_T: ``(batch, *sample_shape)`` starting points (usually standard normal).
      eps_fn: denoiser ``eps_fn(x_t, t) -> eps`` for ONE sample (vmapped here).
      schedule, grid: the VP schedule and the static descending timestep grid.
      scheme: ``none(...)``, ``independent(...)``, ``dependent(...)`` or ``multi(...)``; default none.
      sampler: a :class:`Sampler` or a sampler name.
      record: ``record(x_next, info) -> pytree`` stacked per step (default: the ``GuidanceInfo``).
      nan_policy: ``"raise"`` (default) raises after the run if any condition gave a non-finite
        energy or gradient (those steps were taken without guidance); ``"skip"`` only warns.
      debug_loop: run steps in an eager Python loop instead of a jitted scan.
      time_travel: :func:`time_travel` settings (repeat steps inside a window), or ``None``.

    Returns:
      ``(x_0, trace)``: final samples ``(batch, *sample_shape)`` and the per-step records
      ``(batch, num_steps, ...)``.
    """
    scheme = none() if scheme is None else scheme
    if not isinstance(scheme, _SCHEME_TYPES):
        raise ValueError("sample: scheme must be built by zmagic_jax.none/independent/dependent/multi "
                         f"(or scheme_by_name); got {scheme!r}.")
    if isinstance(sampler, str):
        sampler = sampler_by_name(sampler)
    if not isinstance(sampler, Sampler):
        raise ValueError(f"sample: sampler must be a Sampler or a sampler name; got {type(sampler).__name__}.")
    if nan_policy not in ("raise", "skip"):
        raise ValueError(f"sample: nan_policy must be 'raise' or 'skip'; got {nan_policy!r}.")
    x_T = jnp.asarray(x_T)
    if x_T.ndim < 2 or x_T.shape[0] < 1 or not jnp.issubdtype(x_T.dtype, jnp.floating):
        raise ValueError("sample: x_T must be a float array of shape (batch, *sample_shape) with batch >= 1; "
                         f"got shape {x_T.shape} and dtype {x_T.dtype}. Add a leading batch axis.")
    if time_travel is not None:
        if not isinstance(time_travel, TimeTravel):
            raise ValueError("sample: time_travel must be built by zmagic_jax.time_travel(repeats, start, stop); "
                             f"got {time_travel!r}.")
        check_window_hits(grid, time_travel.start, time_travel.stop, "time_travel")
    contexts = step_contexts(schedule, grid)
    _check_shapes(eps_fn, scheme, x_T)
    for c in scheme.conditions:
        c.rule.check(grid)

    run = _run if debug_loop else _run_jit
    x0, trace, finite = run(key, x_T, contexts, eps_fn, sampler, scheme, record, debug_loop, time_travel)
    if scheme.conditions:
        _check_finite(finite, scheme, grid, nan_policy)
    return x0, trace


def _check_shapes(eps_fn, scheme, x_T):
    x = jax.ShapeDtypeStruct(x_T.shape[1:], x_T.dtype)
    t = jax.ShapeDtypeStruct((), jnp.int32)
    try:
        out = jax.eval_shape(eps_fn, x, t)
    except Exception as err:  # a shape error deep inside the model: say which call failed
        raise ValueError(f"sample: eps_fn(x_t, t) failed for one sample of shape {x.shape}: {err}") from err
    if getattr(out, "shape", None) != x.shape:
        raise ValueError(f"sample: eps_fn returned shape {getattr(out, 'shape', None)} for a sample of shape "
                         f"{x.shape}; it must return eps of the sample's shape (one sample, no batch axis).")
    ab = jax.ShapeDtypeStruct((), x_T.dtype)
    for c in scheme.conditions:
        args = (x, ab) if c.noise_aware else (x,)
        try:
            value = jax.eval_shape(c.energy, *args)
        except Exception as err:
            raise ValueError(f"sample: energy of condition {c.name!r} failed on one sample of shape "
                             f"{x.shape}: {err}") from err
        if getattr(value, "shape", None) != ():
            raise ValueError(f"sample: energy of condition {c.name!r} must return a scalar for one sample; "
                             f"got shape {getattr(value, 'shape', None)}.")


def _check_finite(finite, scheme, grid, nan_policy):
    if isinstance(finite, jax.core.Tracer):
        return  # under an outer jit the caller inspects trace.finite
    finite = np.asarray(finite)  # (batch, steps, n)
    if finite.all():
        return
    b, i, c = map(int, np.argwhere(~finite)[0])
    bad = [scheme.conditions[k].name for k in np.flatnonzero(~finite.all(axis=(0, 1)))]
    message = (f"guidance produced non-finite values for condition(s) {bad}: first at sample {b}, step {i} "
               f"(t={int(grid.t[i])}), condition {scheme.conditions[c].name!r}; the guidance of those "
               "steps was dropped. Check the energy for log(0) or division by zero, or lower its step size; "
               "pass nan_policy='skip' to keep such samples.")
    if nan_policy == "raise":
        raise FloatingPointError(message)
    warnings.warn(message, RuntimeWarning, stacklevel=3)
