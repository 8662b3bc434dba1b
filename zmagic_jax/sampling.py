"""Guided sampling in three layers, as blackjax has them.

* :func:`step` — the pure, un-jitted kernel of one sample: ``step(key, x_t, ctx, *, denoiser,
  scheme, sampler) -> (x_next, GuidanceInfo)``. Put it in your own ``jit`` / ``vmap`` / ``grad``
  or drive it from your own loop.
* :func:`sample_chain` — one sample's whole run as one ``lax.scan`` over the grid (compile time
  flat in the number of steps), also pure and un-jitted.
* :func:`sample` — the host-side convenience: validate, split keys, ``vmap`` over the batch,
  ``jit``, shard over a device mesh, apply the NaN policy.

Everything that may change between calls is data: weights (``Denoiser.params``,
``Condition.params``), guidance scales and windows (step-rule leaves), sampler numbers and the
grid's noise levels are arguments of the one compiled program, so a new value never retraces.
Static are only the functions, names, shapes and options that change the program's structure.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from zmagic_jax._pytree import concrete, is_traced, pytree_dataclass
from zmagic_jax.contracts import Denoiser, check_denoiser
from zmagic_jax.samplers import Sampler, StepContext, ddpm_ancestral, step_contexts
from zmagic_jax.schedules import Schedule, TimestepGrid, check_grid
from zmagic_jax.schemes._info import GuidanceInfo
from zmagic_jax.schemes._schemes import check_scheme, direction, every_step_guided, none
from zmagic_jax.step_rules import window


@pytree_dataclass(static=("repeats",))
class TimeTravel:
    """FreeDoM's time-travel: inside the window ``stop < t <= start`` each step is taken
    ``repeats`` times (static), re-noising back to level ``t`` between repeats (see
    :func:`time_travel`); the window bounds are leaves."""

    repeats: int
    start: Any
    stop: Any


def time_travel(repeats: int, start: Optional[int] = None, stop: Optional[int] = None) -> TimeTravel:
    """Repeat every guided step with ``stop < t <= start`` ``repeats`` times (FreeDoM Sec. 3.4).

    After each of the first ``repeats - 1`` passes the result ``x_next`` is sent back to level
    ``t`` by the forward process, ``x_t = sqrt(a) x_next + sqrt(1 - a) z`` with
    ``a = ab_t / ab_next`` and fresh ``z``, and the step is taken again; the last pass is kept.
    ``repeats = 1`` is plain sampling (the same program, so bit for bit the same samples). FreeDoM's Stable Diffusion style recipe uses 3 repeats on
    DDIM indices 40..69 of 100 steps (``start=699, stop=399``).
    """
    if isinstance(repeats, bool) or not isinstance(repeats, (int, np.integer)) or repeats < 1:
        raise ValueError(f"time_travel: repeats must be an integer >= 1; got {repeats!r}.")
    return TimeTravel(int(repeats), *window(start, stop, "time_travel"))


class Record(NamedTuple):
    """What :func:`sample_chain` stacks per step: ``fn(x_next, info)`` (default: the
    :class:`GuidanceInfo` itself). ``detail=True`` makes every step also compute the
    per-condition gradients at ``x_t``, term II of every pair and the norms of its two parts
    (``GuidanceInfo.gradients``, ``.term2``, ``.score_part_norms``, ``.hessian_part_norms``);
    off, none of it is computed. ``fn`` is static: pass the same function to reuse a program."""

    fn: Optional[Callable] = None
    detail: bool = False


def _record_parts(record):
    if record is None:
        return _keep_info, False
    if isinstance(record, Record):
        return (record.fn or _keep_info), bool(record.detail)
    if callable(record):
        return record, False
    raise ValueError(f"record must be a callable record(x_next, info) or zmagic_jax.Record(fn, detail); got "
                     f"{type(record).__name__}.")


def _keep_info(x_next, info):
    return info


def _substep(sub: Sampler, x, ctx, noise, denoiser, scheme, detail, skip):
    eps, d, info = direction(x, ctx, noise, scheme=scheme, denoiser=denoiser, sampler=sub, detail=detail,
                             skip_inactive=skip)
    return (sub.mean(x, eps, ctx) + d + noise).astype(x.dtype), info, eps


def plain_step_eps(key, x, ctx, denoiser, scheme, sampler, detail=False, skip=True):
    """:func:`step` without time travel, also returning the noise prediction of its main step:
    ``(x_next, info, eps)`` (what multi-model samplers store, e.g. AMDM's posterior mean)."""
    keys = jax.random.split(key, sampler.corrector_steps + 1)
    for sub_key in keys[:-1]:
        sub = sampler.corrector(ctx)
        noise = sub.noise_std(ctx) * jax.random.normal(sub_key, x.shape, x.dtype)
        x, _, _ = _substep(sub, x, ctx, noise, denoiser, scheme, detail, skip)
    noise = sampler.noise_std(ctx) * jax.random.normal(keys[-1], x.shape, x.dtype)
    return _substep(sampler, x, ctx, noise, denoiser, scheme, detail, skip)


def _plain_step(key, x, ctx, denoiser, scheme, sampler, detail, skip):
    x_next, info, _ = plain_step_eps(key, x, ctx, denoiser, scheme, sampler, detail, skip)
    return x_next, info


def step(key, x, ctx: StepContext, *, denoiser: Denoiser, scheme, sampler: Sampler,
         time_travel: Optional[TimeTravel] = None, detail: bool = False, skip_inactive: bool = True):
    """One guided step of one sample: ``(x_next, GuidanceInfo)``. Pure and un-jitted.

    ``x_next = M0(x_t, eps) + d + sigma_t z`` with ``z ~ N(0, I)`` from ``key``; the same ``z``
    enters the scheme's look-ahead point ``xhat`` (Z-Magic Alg. 1, lines 5-10). A sampler's
    corrector sub-steps run first (keys ``split(key, corrector_steps + 1)``), each guided by the
    same scheme. ``ctx`` is a :class:`StepContext` (:func:`~zmagic_jax.step_context`);
    ``ctx.score_coef`` is filled from ``sampler``.

    With ``time_travel`` the step is repeated inside its window (a ``lax.scan`` over the repeats,
    each pass behind a ``lax.cond`` on the grid-only predicate, so the step is traced once and the
    kernel stays reverse-differentiable): pass ``r >= 1`` draws its re-noising and step noise from
    ``split(fold_in(key, r))``, pass 0 uses ``key`` as an unrepeated step does. The info of the
    last pass is returned, with ``finite`` accumulated over all passes. ``skip_inactive``: see
    :func:`~zmagic_jax.direction`.
    """
    if time_travel is None or time_travel.repeats == 1:  # static: one pass is the plain step's own program
        return _plain_step(key, x, ctx, denoiser, scheme, sampler, detail, skip_inactive)
    repeats = jnp.where((ctx.t <= time_travel.start) & (ctx.t > time_travel.stop), time_travel.repeats, 1)
    a = ctx.alpha_bar / ctx.alpha_bar_next

    def again(carry, r):
        def take(carry):
            x_next, info = carry
            noise_key, step_key = jax.random.split(jax.random.fold_in(key, r))
            step_key = jax.lax.cond(r == 0, lambda: key, lambda: step_key)
            z = jax.random.normal(noise_key, x.shape, x.dtype)
            x_t = jnp.where(r == 0, x, (jnp.sqrt(a) * x_next + jnp.sqrt(1.0 - a) * z).astype(x.dtype))
            x_new, new_info = _plain_step(step_key, x_t, ctx, denoiser, scheme, sampler, detail, skip_inactive)
            return x_new, new_info._replace(finite=new_info.finite & info.finite,
                                            denoiser_finite=new_info.denoiser_finite & info.denoiser_finite)
        return jax.lax.cond(r < repeats, take, lambda c: c, carry), None

    n = len(scheme.conditions)
    info0 = jax.tree_util.tree_map(jnp.zeros_like, _info_shape(x, n, detail))._replace(
        finite=jnp.ones((n,), bool), denoiser_finite=jnp.asarray(True))
    (x_next, info), _ = jax.lax.scan(again, (x, info0), jnp.arange(time_travel.repeats))
    return x_next, info


def _info_shape(x, n, detail) -> GuidanceInfo:
    """Zeros of :class:`GuidanceInfo`'s structure for ``n`` conditions (the scan carry's start)."""
    v, m = jnp.zeros((n,), x.dtype), jnp.zeros((n, n), x.dtype)
    full = (jnp.zeros((n,) + x.shape, x.dtype), jnp.zeros((n, n) + x.shape, x.dtype)) if detail else (None, None)
    return GuidanceInfo(v, jnp.zeros((), x.dtype), v, m, m, m, m, m, jnp.asarray(False), jnp.ones((n,), bool), *full,
                        denoiser_finite=jnp.asarray(True))


def sample_chain(key, x, contexts: StepContext, *, denoiser: Denoiser, scheme, sampler: Sampler,
                 record=None, time_travel: Optional[TimeTravel] = None, debug_loop: bool = False,
                 skip_inactive: bool = True):
    """One sample's run over every step of ``contexts`` (:func:`~zmagic_jax.step_contexts`):
    ``(x_final, trace, finite)``. Pure and un-jitted; one ``lax.scan``.

    Step ``i`` uses ``fold_in(key, i)``, so a run is reproducible bit for bit and independent of
    how steps are scheduled. ``trace`` stacks ``record(x_next, info)`` per step (default: the
    :class:`GuidanceInfo`; see :class:`Record` for ``detail``), ``finite`` ``(steps, n)`` is each
    step's ``info.finite`` whatever is recorded: act on it (e.g. ``jnp.all(finite)``) when the
    run is inside your own ``jit``. The scan body is traced once, so compile time does not grow
    with the number of steps; ``debug_loop=True`` runs the same kernel in a Python loop (eager,
    for breakpoints and prints). ``skip_inactive``: see :func:`~zmagic_jax.direction` (pass
    ``not every_step_guided(scheme.conditions, contexts)``).
    """
    keep, detail = _record_parts(record)

    def body(x, ctx):
        x_next, info = step(jax.random.fold_in(key, ctx.index), x, ctx, denoiser=denoiser, scheme=scheme,
                            sampler=sampler, time_travel=time_travel, detail=detail, skip_inactive=skip_inactive)
        return x_next, (keep(x_next, info), info.finite)

    if not debug_loop:
        x, (trace, finite) = jax.lax.scan(body, x, contexts)
        return x, trace, finite
    outputs = []
    for i in range(contexts.t.shape[0]):
        x, out = body(x, jax.tree_util.tree_map(lambda a: a[i], contexts))
        outputs.append(out)
    trace, finite = jax.tree_util.tree_map(lambda *a: jnp.stack(a), *outputs)
    return x, trace, finite


class Samples(NamedTuple):
    """What :func:`sample` returns: final samples ``x0`` ``(batch, *shape)``, the per-step records
    ``trace`` ``(batch, steps, ...)`` and ``finite`` ``(batch, steps, n)`` (False where a
    condition's guidance was non-finite and dropped)."""

    x0: jnp.ndarray
    trace: Any
    finite: jnp.ndarray


def _run(keys, x_T, contexts, denoiser, scheme, sampler, time_travel, record=None, debug_loop=False,
         skip_inactive=True):
    def one(key, x):
        return sample_chain(key, x, contexts, denoiser=denoiser, scheme=scheme, sampler=sampler, record=record,
                            time_travel=time_travel, debug_loop=debug_loop, skip_inactive=skip_inactive)
    return jax.vmap(one)(keys, x_T)


_run_jit = jax.jit(_run, static_argnames=("record", "debug_loop", "skip_inactive"))


def sample(key, x_T, schedule: Schedule, grid: TimestepGrid, *, denoiser: Denoiser, scheme=None,
           sampler: Optional[Sampler] = None, record=None, nan_policy: str = "raise",
           time_travel: Optional[TimeTravel] = None, mesh=None, debug_loop: bool = False) -> Samples:
    """Draw a batch of guided samples: :func:`sample_chain` vmapped over the batch, jitted.

    Args:
      key: PRNG key; sample ``b`` uses ``split(key, batch)[b]`` and step ``i`` its ``fold_in(., i)``,
        so the same key gives the same bits.
      x_T: ``(batch, *sample_shape)`` starting points (usually standard normal); its dtype is the
        run's (float64 under ``jax_enable_x64`` makes the schedule float64 too).
      schedule, grid: the VP schedule and the descending timestep grid (its noise levels are
        program arguments: any grid of the same length reuses the compiled program).
      denoiser: :class:`~zmagic_jax.Denoiser` ``(apply, params)`` for ONE sample.
      scheme: any object with the scheme contract (``none(...)``, ``independent(...)``,
        ``dependent(...)``, ``multi(...)`` or your own); default ``none()``.
      sampler: a :class:`Sampler`; default :func:`~zmagic_jax.ddpm_ancestral`.
      record: ``record(x_next, info) -> pytree`` or :class:`Record` (default: the ``GuidanceInfo``).
      nan_policy: ``"raise"`` (default) raises ``FloatingPointError`` naming the condition, sample
        and step if guidance went non-finite (those steps were taken without guidance); under
        your own ``jit`` the check runs when the program runs (``jax.debug.callback``) and the
        error reaches you as a JAX runtime error carrying that message. ``"skip"`` keeps such
        samples and only warns (outside ``jit``); inspect ``finite`` yourself.
      time_travel: :func:`time_travel` settings (repeat steps inside a window), or ``None``.
      mesh: a ``jax.sharding.Mesh``: the batch axis is sharded over its first axis, weights and
        settings replicated (data parallel; ``batch`` must be a multiple of that axis' size).
        Inputs already sharded by you are used as they are. Several hosts: call
        ``jax.distributed.initialize()`` in every process, build the mesh over ``jax.devices()``
        and call ``sample`` with the same arguments everywhere; ``finite`` is gathered across
        processes for the NaN check.
      debug_loop: run steps in an eager Python loop instead of a jitted scan.

    Returns:
      :class:`Samples` ``(x0, trace, finite)``.
    """
    scheme = none() if scheme is None else scheme
    sampler = ddpm_ancestral() if sampler is None else sampler
    conditions = check_scheme(scheme, "sample")
    check_denoiser(denoiser, "sample")
    if not isinstance(sampler, Sampler):
        raise ValueError(f"sample: sampler must be a zmagic_jax Sampler (ddpm_ancestral(), ddim(eta), ...); got "
                         f"{type(sampler).__name__}.")
    if nan_policy not in ("raise", "skip"):
        raise ValueError(f"sample: nan_policy must be 'raise' or 'skip'; got {nan_policy!r}.")
    _check_key(key)
    x_T = jnp.asarray(x_T)
    if x_T.ndim < 2 or x_T.shape[0] < 1 or not jnp.issubdtype(x_T.dtype, jnp.floating):
        raise ValueError("sample: x_T must be a float array of shape (batch, *sample_shape) with batch >= 1; "
                         f"got shape {x_T.shape} and dtype {x_T.dtype}. Add a leading batch axis.")
    grid = check_grid(schedule, grid, "sample")
    if time_travel is not None:
        if not isinstance(time_travel, TimeTravel):
            raise ValueError("sample: time_travel must be built by zmagic_jax.time_travel(repeats, start, stop); "
                             f"got {time_travel!r}.")
        _check_time_travel_hits(time_travel, grid)
    contexts = step_contexts(schedule, grid, x_T.dtype)
    for c in conditions:
        c.rule.check(grid)
    _check_shapes(denoiser, conditions, x_T)

    keys = jax.random.split(key, x_T.shape[0])
    # a program without the branch when no step can be skipped (a conditional only costs then)
    skip = not every_step_guided(conditions, contexts)
    args = (keys, x_T, contexts, denoiser, scheme, sampler, time_travel)
    if mesh is not None:
        args = _shard(mesh, args, x_T.shape[0])
    if debug_loop:
        x0, trace, finite = _run(*args, record=record, debug_loop=True, skip_inactive=skip)
    else:
        x0, trace, finite = _run_jit(*args, record=record, skip_inactive=skip)
    denoiser_finite = getattr(trace, "denoiser_finite", None) if isinstance(trace, GuidanceInfo) else None
    _check_finite(finite, [c.name for c in conditions], np.asarray(grid.t), nan_policy, denoiser_finite)
    return Samples(x0, trace, finite)


def _check_key(key) -> None:
    key = jnp.asarray(key) if not hasattr(key, "dtype") else key
    if jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key):
        if key.shape == ():
            return
    elif key.dtype == jnp.uint32 and key.shape == (2,):
        return
    raise ValueError(f"sample: key must be one PRNG key (jax.random.key(seed) or jax.random.PRNGKey(seed)); got "
                     f"dtype {key.dtype} and shape {key.shape}.")


def _check_time_travel_hits(tt: TimeTravel, grid: TimestepGrid) -> None:
    start, stop = concrete(tt.start), concrete(tt.stop)
    if start is None or stop is None:
        return
    t = np.asarray(grid.t)
    if not np.any((t <= start) & (t > stop)):
        raise ValueError(f"time_travel: the window stop < t <= start (start={int(start)}, stop={int(stop)}) contains "
                         f"no step of the grid, whose timesteps run from {t.max()} down to {t.min()}; widen the "
                         "window or change the grid.")


def _shard(mesh, args, batch):
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    if not isinstance(mesh, Mesh):
        raise ValueError(f"sample: mesh must be a jax.sharding.Mesh; got {type(mesh).__name__}.")
    axis = mesh.axis_names[0]
    size = mesh.shape[axis]
    if batch % size:
        raise ValueError(f"sample: the batch ({batch}) must be a multiple of the mesh axis {axis!r} ({size} "
                         "devices) to shard it; pad the batch or use a smaller mesh.")
    batched, replicated = NamedSharding(mesh, PartitionSpec(axis)), NamedSharding(mesh, PartitionSpec())
    keys, x_T, *rest = args
    return (jax.device_put(keys, batched), jax.device_put(x_T, batched), *jax.device_put(rest, replicated))


_CHECKED: set = set()


def _abstract(tree):
    leaves, treedef = jax.tree_util.tree_flatten(tree)
    return treedef, tuple((jnp.shape(v), jnp.result_type(v)) for v in leaves)


SUPPORTED_DTYPES = ("float32", "float64")


def _check_shapes(denoiser, conditions, x_T) -> None:
    """Abstract evaluation of the denoiser and every energy on one sample (once per structure and
    shape): shapes, dtypes, and energies whose gradient is identically zero."""
    x = jax.ShapeDtypeStruct(x_T.shape[1:], x_T.dtype)
    signature = (_abstract(denoiser), _abstract(conditions), x.shape, str(x.dtype))
    if signature in _CHECKED:
        return
    if str(x.dtype) not in SUPPORTED_DTYPES:
        raise ValueError(f"sample: x_T has dtype {x.dtype}; the sampler's state must be float32 or float64 (its "
                         "coefficients, e.g. 1 - alpha_bar near 1e-4, and the guidance displacements lose most of "
                         "their digits in half precision). Pass x_T.astype(jnp.float32) and run the network in half "
                         "precision inside the denoiser if you want (cast its input and output).")
    t = jax.ShapeDtypeStruct((), jnp.int32)
    try:
        out = jax.eval_shape(lambda d, x, t: d(x, t), denoiser, x, t)
    except Exception as err:  # a shape error deep inside the model: say which call failed
        raise ValueError(f"sample: denoiser(x_t, t) failed for one sample of shape {x.shape}: {err}") from err
    if getattr(out, "shape", None) != x.shape:
        raise ValueError(f"sample: the denoiser returned shape {getattr(out, 'shape', None)} for a sample of shape "
                         f"{x.shape}; it must return eps of the sample's shape (one sample, no batch axis).")
    if out.dtype != x.dtype:
        raise ValueError(f"sample: the denoiser returned {out.dtype} eps for a {x.dtype} x_T; the state and eps must "
                         f"share one dtype. Give x_T in {out.dtype}, or cast the denoiser's params (or its output) "
                         f"to {x.dtype}.")
    ab = jax.ShapeDtypeStruct((), x_T.dtype)
    for c in conditions:
        try:
            value = jax.eval_shape(lambda c, x, ab: c.value(x, x, ab), c, x, ab)
        except Exception as err:
            raise ValueError(f"sample: energy of condition {c.name!r} failed on one sample of shape "
                             f"{x.shape}: {err}") from err
        if getattr(value, "shape", None) != ():
            raise ValueError(f"sample: energy of condition {c.name!r} must return a scalar for one sample; "
                             f"got shape {getattr(value, 'shape', None)}.")
        if not jnp.issubdtype(value.dtype, jnp.floating):
            raise ValueError(f"sample: energy of condition {c.name!r} returned {value.dtype}; it must return a float "
                             "scalar with a gradient (an argmax or a count has none; use a log-probability or a "
                             "distance instead).")
        if value.dtype != x.dtype:
            raise ValueError(f"sample: energy of condition {c.name!r} returned {value.dtype} for a {x.dtype} x_T; "
                             f"cast its params (targets, references, weights) to {x.dtype}.")
        if _gradient_is_zero(c, x, ab):
            warnings.warn(f"sample: the energy of condition {c.name!r} has a gradient that is zero everywhere (it "
                          "goes through argmax, rounding, an integer or stop_gradient, or ignores x0), so guiding "
                          "by it does nothing. Use a differentiable energy.", RuntimeWarning, stacklevel=3)
    _CHECKED.add(signature)


_PASS_THROUGH = ("convert_element_type", "reshape", "broadcast_in_dim", "copy")


def _gradient_is_zero(condition, x, ab) -> bool:
    """Whether ``grad_x E(x)`` is identically zero, read off the gradient's jaxpr (no compilation,
    no values): JAX writes a zero it knows symbolically as a broadcast literal 0."""
    try:
        closed = jax.make_jaxpr(lambda c, x, ab: jax.grad(lambda y: c.value(y, y, ab))(x))(condition, x, ab)
    except Exception:  # not differentiable in a way the checks above did not catch: let the run say
        return False
    return _is_literal_zero(closed.jaxpr, closed.jaxpr.outvars[0])


def _is_literal_zero(jaxpr, var) -> bool:
    from jax.extend.core import Literal

    if isinstance(var, Literal):
        return bool(np.all(np.asarray(var.val) == 0))
    producer = next((e for e in jaxpr.eqns if any(v is var for v in e.outvars)), None)
    if producer is None:
        return False
    inner = producer.params.get("jaxpr")
    if inner is not None:  # a nested jit: follow the output into its body
        inner = getattr(inner, "jaxpr", inner)
        k = next(i for i, v in enumerate(producer.outvars) if v is var)
        return _is_literal_zero(inner, inner.outvars[k])
    if producer.primitive.name in _PASS_THROUGH and len(producer.invars) == 1:
        return _is_literal_zero(jaxpr, producer.invars[0])
    if producer.primitive.name == "mul":
        return any(_is_literal_zero(jaxpr, v) for v in producer.invars)
    return False


def nonfinite_message(finite, names, t, denoiser_finite=None, *, sample_name=None,
                      advice: str = "Check the energy for log(0) or division by zero, or lower its step size;",
                      skip_hint: str = "pass nan_policy='skip' to keep such samples.") -> Optional[str]:
    """The error message for non-finite values in a run, or ``None`` if everything was finite.

    ``finite (batch, steps, n)``: each condition's guidance; ``denoiser_finite (batch, steps)``
    (optional): the denoiser's ``eps``. A non-finite ``eps`` makes every energy at ``x0|t``
    non-finite as well, so when the denoiser failed at or before a sample's first failing
    condition the message names the denoiser, not the condition. ``sample_name(b)`` labels
    sample ``b`` (default ``"sample b"``)."""
    finite = np.asarray(finite)
    label = sample_name or (lambda b: f"sample {b}")
    guidance_ok = bool(finite.all())
    den = None if denoiser_finite is None else np.asarray(denoiser_finite)
    if guidance_ok and (den is None or den.all()):
        return None
    culprit = None if den is None else _denoiser_failed_first(finite, den, guidance_ok)
    if culprit is not None:
        b, i = culprit
        return (f"the denoiser returned non-finite eps at {label(b)}, step {i} (t={int(t[i])}); everything after "
                "it in that sample is non-finite. Check the network's weights and input dtype, and whether "
                f"guidance pushed x_t far outside the data (lower the guidance scales). {skip_hint}")
    b, i, c = map(int, np.argwhere(~finite)[0])
    bad = [names[k] for k in np.flatnonzero(~finite.all(axis=(0, 1)))]
    return (f"guidance produced non-finite values for condition(s) {bad}: first at {label(b)}, step {i} "
            f"(t={int(t[i])}), condition {names[c]!r}; the guidance of those steps was dropped. {advice} {skip_hint}")


def _denoiser_failed_first(finite, den, guidance_ok):
    """``(sample, step)`` where the denoiser failed, if it did so at or before the first failing
    condition of that sample (or no condition failed); else ``None``."""
    if den.all():
        return None
    if guidance_ok:
        return tuple(map(int, np.argwhere(~den)[0]))
    b, i, _ = map(int, np.argwhere(~finite)[0])
    first = np.flatnonzero(~den[b])
    return (b, int(first[0])) if first.size and first[0] <= i else None


def _check_finite(finite, names, t, nan_policy, denoiser_finite=None) -> None:
    if is_traced(finite) or is_traced(denoiser_finite):
        if nan_policy == "raise":
            def check(finite, denoiser_finite):
                message = nonfinite_message(finite, names, t, denoiser_finite)
                if message is not None:
                    raise FloatingPointError(message)
            jax.debug.callback(check, finite, denoiser_finite)
        return
    gather = lambda v: v
    if not getattr(finite, "is_fully_addressable", True):  # several hosts: every process checks all samples
        from jax.experimental import multihost_utils
        gather = lambda v: None if v is None else multihost_utils.process_allgather(v, tiled=True)
    message = nonfinite_message(gather(finite), names, t, gather(denoiser_finite))
    if message is None:
        return
    if nan_policy == "raise":
        raise FloatingPointError(message)
    warnings.warn(message, RuntimeWarning, stacklevel=3)
