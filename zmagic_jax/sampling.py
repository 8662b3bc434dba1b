"""Guided sampling end to end: validate at the edge, one ``jit``, ``vmap`` over samples, ``scan`` over steps."""
from __future__ import annotations

import warnings
from typing import Callable, Optional, Union

import jax
import jax.numpy as jnp
import numpy as np

from zmagic_jax.samplers import Sampler, StepContext, run_chain, sampler_by_name, step_contexts
from zmagic_jax.schedules import Schedule, TimestepGrid
from zmagic_jax.schemes._schemes import Dependent, Independent, Multi, NoGuidance, direction, none

_SCHEME_TYPES = (NoGuidance, Independent, Dependent, Multi)


def guided_kernel(eps_fn: Callable, sampler: Sampler, scheme) -> Callable:
    """One guided step of one sample: ``kernel(key, x_t, ctx) -> (x_next, GuidanceInfo)``.

    ``x_next = M0(x_t, eps) + d + sigma_t z``; the same ``z`` enters the scheme's look-ahead point
    ``xhat`` (Z-Magic Alg. 1, lines 5-10). A sampler's corrector sub-steps run first, each guided
    by the same scheme.
    """
    def kernel(key, x, ctx: StepContext):
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

    return kernel


def _run(key, x_T, contexts, eps_fn, sampler, scheme, record, debug_loop):
    kernel = guided_kernel(eps_fn, sampler, scheme)
    keys = jax.random.split(key, x_T.shape[0])
    keep = record or (lambda x, info: info)
    both = lambda x, info: (keep(x, info), info.finite)
    one = lambda k, x: run_chain(k, x, kernel, contexts, both, debug_loop)
    x0, (trace, finite) = jax.vmap(one)(keys, x_T)
    return x0, trace, finite


_run_jit = jax.jit(_run, static_argnames=("eps_fn", "sampler", "scheme", "record", "debug_loop"))


def sample(key, x_T, eps_fn: Callable, schedule: Schedule, grid: TimestepGrid, scheme=None,
           sampler: Union[Sampler, str] = "ddpm_ancestral", *, record: Optional[Callable] = None,
           nan_policy: str = "raise", debug_loop: bool = False):
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
    contexts = step_contexts(schedule, grid)
    _check_shapes(eps_fn, scheme, x_T)
    for c in scheme.conditions:
        c.rule.check(grid)

    run = _run if debug_loop else _run_jit
    x0, trace, finite = run(key, x_T, contexts, eps_fn, sampler, scheme, record, debug_loop)
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
