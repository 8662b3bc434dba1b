"""AMDM: several diffusion models sampled together, their states aggregated on a shared grid.

AMDM (Yue et al., "Aggregation of Multi Diffusion Models", arXiv 2410.01262) runs K conditional
models, each controlling one aspect, on one schedule and one timestep grid. At every loop index
``i`` each model takes its own (optionally guided) step ``x_k -> x_k'``; the K results are merged
into ``xbar``; inside the aggregation window every model's state is then replaced by ``xbar``
moved a fixed distance ``p_k`` toward that model's own posterior mean ``mu_k`` ("manifold" or
"deviation" optimization)::

    x_k <- xbar + p_k (mu_k - xbar) / |mu_k - xbar|

Outside the window the models run independently. The pieces, each a pure function of one sample:

* aggregation rules (:func:`aggregate_states`): ``"released"`` is what the released code computes
  (``w x1 + sqrt(1 - w^2) x2``; for three models the weights ``w1 w2, sqrt(1 - w1^2) w2,
  sqrt(1 - w1^2) sqrt(1 - w2^2)``, whose squares do NOT sum to 1: 0.83 at the release's
  ``w1 = 0.47, w2 = 0.5``); ``"slerp"`` is the paper's wording, a true spherical interpolation
  whose angle is computed from the two states (:func:`slerp`; nested for K > 2); ``"mean"`` a
  plain weighted mean (baseline). All take the same weights ``w``: at orthogonal states of equal
  norm (what independent high-dimensional Gaussian latents nearly are) slerp with weight ``w``
  equals the released form.
* posterior means (:func:`released_mu`, :func:`level_mu`): ``"released"`` is the released
  ``compute_mu``, the DDPM posterior-mean formula with a one-iteration index offset (the current
  state, but the previous iteration's eps and single-step alpha); ``"level"`` uses the current
  step's eps and the strided step's alpha, so ``mu`` sits at the level ``xbar`` is at.
* :func:`deviate`: the fixed-length step, its norm taken per sample (the release's whole-tensor
  norm is the same thing at its batch size of 1).

Kernels as for single-model sampling: :func:`aggregate_step` (one step of one sample's K states)
and :func:`aggregate_chain` (one ``lax.scan`` over the grid) are pure and un-jitted;
:func:`aggregate_sample` validates, vmaps over the batch and jits. K models of one architecture
run as one vmapped call over stacked params (:func:`stack_denoisers`); models of different
architectures as a tuple of :class:`~zmagic_jax.Denoiser`. Each chain may carry any guidance
scheme of the library (AMDM + Z-Magic).
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from zmagic_jax._pytree import check_scalar, concrete, pytree_dataclass
from zmagic_jax.contracts import Denoiser, check_denoiser
from zmagic_jax.samplers import Sampler, StepContext, ddim, step_contexts
from zmagic_jax.sampling import _check_finite, _check_key, _check_shapes, plain_step_eps
from zmagic_jax.schedules import Schedule, TimestepGrid, check_grid
from zmagic_jax.schemes import every_step_guided, none
from zmagic_jax.schemes._schemes import check_scheme

RULES = ("released", "slerp", "mean")
MU_RULES = ("released", "level")
# The release's step lengths p_k (Hammour-steak/AMDM), in SD 1.x latent units: a 4 x 64 x 64 latent
# of norm ~ sqrt(16384) = 128. Two models (InteractDiffusion, then MIGC / IP-Adapter) and three.
RELEASE_STEPS = {2: (55.0, 45.0), 3: (45.0, 40.0, 35.0)}
RELEASE_DIM = 4 * 64 * 64


@pytree_dataclass(static=("rule", "mu"))
class Aggregation:
    """AMDM's settings (:func:`aggregation`): the rule and the posterior mean are static names,
    the numbers leaves (a sweep over ``w`` or ``p`` reuses one program; ``jax.grad`` reaches them).

    Attributes:
      rule: ``"released"``, ``"slerp"`` or ``"mean"`` (:func:`aggregate_states`).
      mu: ``"released"`` or ``"level"`` (:func:`released_mu`, :func:`level_mu`).
      weights: ``(K - 1,)`` aggregation weights ``w``.
      steps: ``(K,)`` deviation step lengths ``p_k``, in the units of the state.
      first, last: the aggregation window, loop indices ``first <= i <= last`` (inclusive);
        index 0 is never aggregated (the released mu needs a previous step).
    """

    rule: str
    mu: str
    weights: Any
    steps: Any
    first: Any
    last: Any

    @property
    def num_models(self) -> int:
        return int(np.shape(self.steps)[0])


def aggregation(steps, weights=0.5, *, window=(1, 3), rule: str = "released", mu: str = "released") -> Aggregation:
    """AMDM settings for K = ``len(steps)`` models.

    Args:
      steps: the deviation step lengths ``p_k``, one per model, in the units of the state (the
        release's 55 / 45 are SD 1.x latent units, norm ~128; :func:`release_steps` rescales them).
        ``0`` turns the deviation off (every state becomes ``xbar``).
      weights: ``w`` for each of the K - 1 merges (a number is used for all); in ``[0, 1]``.
        The release's defaults: 0.5 for two models, (0.47, 0.5) for three.
      window: ``(first, last)`` loop indices, inclusive; the release aggregates indices 1..3.
      rule: ``"released"`` (the code), ``"slerp"`` (the paper) or ``"mean"`` (a baseline).
      mu: ``"released"`` (the code's index offset) or ``"level"`` (level-consistent).
    """
    if rule not in RULES:
        raise ValueError(f"aggregation: rule must be one of {', '.join(RULES)}; got {rule!r}.")
    if mu not in MU_RULES:
        raise ValueError(f"aggregation: mu must be one of {', '.join(MU_RULES)}; got {mu!r}.")
    steps = jnp.asarray(steps)
    if steps.ndim != 1 or steps.shape[0] < 1 or not jnp.issubdtype(steps.dtype, jnp.number):
        raise ValueError(f"aggregation: steps must be one number p_k per model, e.g. (55.0, 45.0); got {steps!r}.")
    k = steps.shape[0]
    if rule == "released" and k > 3:
        raise ValueError(f"aggregation: the released rule is defined for 2 or 3 models; got {k} step lengths. Use "
                         "rule='slerp' (nested) or 'mean' for more models.")
    known = concrete(steps)
    for i in range(k if known is not None else 0):
        check_scalar(known[i], "aggregation", f"steps[{i}]")
    weights = jnp.asarray(weights, jnp.result_type(float))
    if weights.ndim == 0:
        weights = jnp.full((max(k - 1, 0),), weights)
    if weights.shape != (max(k - 1, 0),):
        raise ValueError(f"aggregation: weights must be one number or K - 1 = {k - 1} numbers for {k} models; got "
                         f"shape {weights.shape}.")
    w = concrete(weights)
    if w is not None and not np.all((w >= 0) & (w <= 1)):
        raise ValueError(f"aggregation: every weight must lie in [0, 1]; got {w.tolist()}.")
    if not isinstance(window, (tuple, list)) or len(window) != 2:
        raise ValueError(f"aggregation: window must be (first, last) loop indices; got {window!r}.")
    first, last = window
    for name, value in (("first", first), ("last", last)):
        number = concrete(value)
        if isinstance(value, bool) or (number is not None and (number.shape != () or
                                                               not np.issubdtype(number.dtype, np.integer))):
            raise ValueError(f"aggregation: window {name} must be an integer loop index; got {value!r}.")
    if concrete(first) is not None and concrete(last) is not None and int(last) < max(int(first), 1):
        raise ValueError(f"aggregation: the window {first}..{last} aggregates no step (index 0 never is); pass "
                         "first <= last with last >= 1.")
    return Aggregation(rule, mu, weights, steps.astype(jnp.result_type(float)), jnp.asarray(first, jnp.int32),
                       jnp.asarray(last, jnp.int32))


def release_steps(num_models: int, shape: Sequence[int]) -> tuple:
    """The release's step lengths for 2 or 3 models rescaled to a state of ``shape``: ``p`` scales
    with the norm of a noisy state, ``sqrt(prod(shape))``, so ``p_k = p_release * sqrt(d / 16384)``
    (the release's 4 x 64 x 64 SD latent). Equal to the release at that size."""
    if num_models not in RELEASE_STEPS:
        raise ValueError(f"release_steps: the release defines step lengths for 2 or 3 models; got {num_models}. "
                         "Pass your own steps to aggregation().")
    scale = math.sqrt(math.prod(int(s) for s in shape) / RELEASE_DIM)
    return tuple(p * scale for p in RELEASE_STEPS[num_models])


# ----------------------------------------------------------------------------------------------
# Pure rules of one sample


def released_weights(weights) -> jnp.ndarray:
    """The released code's coefficients of the K = 2 or 3 states: ``(w, sqrt(1 - w^2))``, or
    ``(w1 w2, sqrt(1 - w1^2) w2, sqrt(1 - w1^2) sqrt(1 - w2^2))`` (squares summing to
    ``1 - w1^2 + w1^2 w2^2``, not 1)."""
    weights = jnp.asarray(weights)
    if weights.shape == (1,):
        w = weights[0]
        return jnp.stack([w, jnp.sqrt(1.0 - w * w)])
    if weights.shape == (2,):
        w1, w2 = weights[0], weights[1]
        r1, r2 = jnp.sqrt(1.0 - w1 * w1), jnp.sqrt(1.0 - w2 * w2)
        return jnp.stack([w1 * w2, r1 * w2, r1 * r2])
    raise ValueError(f"aggregate_states: the released rule is defined for 2 or 3 models (1 or 2 weights); got "
                     f"weights of shape {weights.shape}. Use rule='slerp' or 'mean' for more models.")


def slerp(x1, x2, w):
    """Spherical interpolation of two states (one sample), weighted so that it equals the released
    ``w x1 + sqrt(1 - w^2) x2`` at orthogonal states of equal norm.

    With ``cos(theta) = <x1, x2> / (|x1| |x2|)`` and the fraction ``s = 2 arccos(w) / pi``:
    ``sin((1 - s) theta) / sin(theta) x1 + sin(s theta) / sin(theta) x2``; ``w = 1`` gives ``x1``,
    ``w = 0`` gives ``x2``. Nearly parallel states (``sin(theta) < 1e-6``) fall back to the linear
    interpolation ``(1 - s) x1 + s x2``, its limit."""
    x1, x2 = jnp.asarray(x1), jnp.asarray(x2)
    w = jnp.asarray(w, x1.dtype)
    s = 2.0 * jnp.arccos(jnp.clip(w, 0.0, 1.0)) / jnp.pi
    n1, n2 = jnp.sqrt(jnp.sum(x1 * x1)), jnp.sqrt(jnp.sum(x2 * x2))
    cos = jnp.clip(jnp.sum(x1 * x2) / jnp.where(n1 * n2 > 0, n1 * n2, 1.0), -1.0, 1.0)
    theta = jnp.arccos(cos)
    sin = jnp.sin(theta)
    curved = sin > 1e-6
    safe = jnp.where(curved, sin, 1.0)
    a = jnp.where(curved, jnp.sin((1.0 - s) * theta) / safe, 1.0 - s)
    b = jnp.where(curved, jnp.sin(s * theta) / safe, s)
    return (a * x1 + b * x2).astype(x1.dtype)


def aggregate_states(states, weights, rule: str = "released"):
    """Merge K states of one sample ``(K, *shape)`` into one ``xbar``.

    * ``"released"``: the released code (:func:`released_weights`), K = 2 or 3;
    * ``"slerp"``: :func:`slerp`, nested for K > 2: ``y = x1``, ``y = slerp(y, x_k, w_{k-1})``;
      at orthogonal equal-norm states the coefficients are ``w1 w2, sqrt(1 - w1^2) w2,
      sqrt(1 - w2^2)``, which differ from the released three-model weights in the last two;
    * ``"mean"``: nested weighted mean ``y = w_{k-1} y + (1 - w_{k-1}) x_k``.
    ``weights`` has K - 1 entries. K = 1 returns the one state."""
    states = jnp.asarray(states)
    weights = jnp.asarray(weights, states.dtype)
    k = states.shape[0]
    if weights.shape != (k - 1,):
        raise ValueError(f"aggregate_states: {k} states need {k - 1} weights; got shape {weights.shape}.")
    if k == 1:
        return states[0]
    if rule == "released":
        c = released_weights(weights).astype(states.dtype)
        y = c[0] * states[0]
        for i in range(1, k):
            y = y + c[i] * states[i]
        return y
    if rule not in ("slerp", "mean"):
        raise ValueError(f"aggregate_states: rule must be one of {', '.join(RULES)}; got {rule!r}.")
    y = states[0]
    for i in range(1, k):
        w = weights[i - 1]
        y = slerp(y, states[i], w) if rule == "slerp" else w * y + (1.0 - w) * states[i]
    return y


def released_mu(x, eps_prev, alpha_prev, alpha_bar_prev):
    """The released ``compute_mu``: ``x / sqrt(a) - (1 - a) / (sqrt(1 - ab) sqrt(a)) eps_prev`` with
    ``a = 1 - beta`` the single-step alpha and ``ab`` the alpha-bar of the PREVIOUS loop index's
    timestep, ``x`` the current state and ``eps_prev`` the previous iteration's noise prediction:
    the DDPM posterior-mean formula one iteration off (on a uniform grid the release's
    ``t + 1000 / N`` is that previous timestep)."""
    root = jnp.sqrt(alpha_prev)
    return x / root - (1.0 - alpha_prev) / (jnp.sqrt(1.0 - alpha_bar_prev) * root) * eps_prev


def level_mu(x, eps, ctx: StepContext):
    """The level-consistent posterior mean: the DDPM reverse mean of the step taken,
    ``(x - (1 - a) / sqrt(1 - ab_t) eps) / sqrt(a)`` with ``a = ab_t / ab_next`` and this step's
    ``eps``, a point at the level ``xbar`` is at."""
    a = ctx.alpha_bar / ctx.alpha_bar_next
    return (x - (1.0 - a) / jnp.sqrt(1.0 - ctx.alpha_bar) * eps) / jnp.sqrt(a)


def deviate(xbar, mu, p):
    """``xbar + p (mu - xbar) / |mu - xbar|`` for one sample (the norm over the whole sample);
    ``xbar`` itself where ``mu == xbar`` (no direction) or ``p == 0``."""
    return _deviation(xbar, mu, p)[0]


def _deviation(xbar, mu, p):
    """:func:`deviate` and the distance ``|mu - xbar|`` it normalises by, from one reduction."""
    diff = mu - xbar
    square = jnp.sum(diff * diff)
    moves = square > 0
    scale = jnp.where(moves, p / jnp.sqrt(jnp.where(moves, square, 1.0)), 0.0)  # finite gradients at mu == xbar
    return (xbar + scale.astype(xbar.dtype) * diff).astype(xbar.dtype), jnp.sqrt(square)


# ----------------------------------------------------------------------------------------------
# K models


@pytree_dataclass(static=("apply",), eq=False)
class DenoiserStack:
    """K models of ONE architecture: ``apply(params_k, x_t, t)`` with every leaf of ``params``
    stacked along a leading axis of size K (:func:`stack_denoisers`). Runs as one vmapped call.

    On XLA:CPU this is slower than a tuple of the same models (measured 1.2-1.4x K single runs
    against 0.8-0.86x for the tuple, ``experiments/bench_amdm.py``): prefer the tuple there; the
    stacked call is meant for accelerators."""

    apply: Callable
    params: Any

    @property
    def num_models(self) -> int:
        return int(jax.tree_util.tree_leaves(self.params)[0].shape[0])

    def model(self, k: int) -> Denoiser:
        """Model ``k`` alone, as a :class:`~zmagic_jax.Denoiser`."""
        return Denoiser(self.apply, jax.tree_util.tree_map(lambda a: a[k], self.params))


def stack_denoisers(denoisers: Sequence[Denoiser]) -> DenoiserStack:
    """Stack models of one architecture (the same ``apply``, params of the same structure and
    shapes) into a :class:`DenoiserStack`."""
    denoisers = tuple(denoisers)
    if not denoisers:
        raise ValueError("stack_denoisers: give at least one Denoiser.")
    for k, d in enumerate(denoisers):
        check_denoiser(d, f"stack_denoisers: model {k}")
    first = denoisers[0]
    shapes = jax.tree_util.tree_map(lambda a: (jnp.shape(a), jnp.result_type(a)), first.params)
    for k, d in enumerate(denoisers[1:], 1):
        if d.apply != first.apply:
            raise ValueError(f"stack_denoisers: model {k} has a different apply function than model 0; models of "
                             "different architectures go to aggregate_sample as a tuple of Denoisers instead.")
        other = jax.tree_util.tree_map(lambda a: (jnp.shape(a), jnp.result_type(a)), d.params)
        if jax.tree_util.tree_structure(other) != jax.tree_util.tree_structure(shapes) or other != shapes:
            raise ValueError(f"stack_denoisers: model {k}'s params differ from model 0's in structure, shape or "
                             "dtype; pass the models as a tuple of Denoisers instead.")
    return DenoiserStack(first.apply, _stack_trees([d.params for d in denoisers]))


class AggregateContext(NamedTuple):
    """Per loop index (the ``xs`` of the scan, :func:`aggregation_contexts`): the step's
    :class:`~zmagic_jax.StepContext` and, for the released mu, the single-step alpha and the
    alpha-bar of the previous index's timestep (index 0: its own, unused)."""

    step: StepContext
    alpha_prev: jnp.ndarray
    alpha_bar_prev: jnp.ndarray


def aggregation_contexts(schedule: Schedule, grid: TimestepGrid, dtype=jnp.float32) -> AggregateContext:
    """Stacked :class:`AggregateContext` for every step of ``grid``, in ``dtype``."""
    grid = check_grid(schedule, grid, "aggregation_contexts")
    t = np.asarray(grid.t)
    t_prev = np.concatenate([t[:1], t[:-1]])
    return AggregateContext(step_contexts(schedule, grid, dtype),
                            jnp.asarray(1.0 - schedule.betas[t_prev], dtype),
                            jnp.asarray(schedule.alphas_cumprod[t_prev], dtype))


class AggregateState(NamedTuple):
    """One sample's carry: the K states ``x`` ``(K, *shape)`` and the K noise predictions of
    the previous step ``eps`` (what the released mu reads)."""

    x: jnp.ndarray
    eps: jnp.ndarray


class AggregateInfo(NamedTuple):
    """Per step: ``aggregated`` (inside the window), ``mixed`` the merged state ``xbar``,
    ``distance`` ``(K,)`` ``|mu_k - xbar|`` (at index 0 the released mu has no previous eps yet:
    read it inside the window) and ``chains``, one :class:`~zmagic_jax.GuidanceInfo`
    per model (a tuple; stacked along a leading K axis for a :class:`DenoiserStack`)."""

    aggregated: jnp.ndarray
    mixed: jnp.ndarray
    distance: jnp.ndarray
    chains: Any


def _num_models(denoisers) -> int:
    return denoisers.num_models if isinstance(denoisers, DenoiserStack) else len(denoisers)


def _is_scheme(value) -> bool:
    return hasattr(value, "direction") and hasattr(value, "conditions")


def _stack_trees(trees):
    return jax.tree_util.tree_map(lambda *a: jnp.stack([jnp.asarray(x) for x in a]), *trees)


def _chain_steps(keys, x, ctx, denoisers, schemes, sampler, detail, skip):
    """Every model's own step: ``(x' (K, ...), eps (K, ...), infos)``; ``schemes`` a tuple of 1 or K."""
    k = x.shape[0]
    if isinstance(denoisers, DenoiserStack):
        def one(key, x, params, scheme):
            return plain_step_eps(key, x, ctx, Denoiser(denoisers.apply, params), scheme, sampler, detail, skip)
        scheme, axis = (schemes[0], None) if len(schemes) == 1 else (_stack_trees(schemes), 0)
        x_new, info, eps = jax.vmap(one, in_axes=(0, 0, 0, axis))(keys, x, denoisers.params, scheme)
        return x_new, eps, info
    schemes = schemes * k if len(schemes) == 1 else schemes
    outs = [plain_step_eps(keys[i], x[i], ctx, d, schemes[i], sampler, detail, skip)
            for i, d in enumerate(denoisers)]
    return jnp.stack([o[0] for o in outs]), jnp.stack([o[2] for o in outs]), tuple(o[1] for o in outs)


def aggregate_step(keys, state: AggregateState, actx: AggregateContext, *, denoisers, aggregation: Aggregation,
                   sampler: Sampler, schemes, detail: bool = False, skip_inactive: bool = True):
    """One AMDM step of one sample's K states: ``(new AggregateState, AggregateInfo)``. Pure, un-jitted.

    ``keys`` ``(K,)``: model k's step uses ``keys[k]`` exactly as :func:`~zmagic_jax.step` uses
    its key. ``denoisers``: a tuple of K :class:`~zmagic_jax.Denoiser` or a :class:`DenoiserStack`;
    ``schemes``: a tuple of one scheme (every model's) or of K (one per model; for a stack they
    must share their structure and are stacked into the one vmapped call). Order (as released): every model
    steps, the results are merged (every step), and inside the window each state becomes
    :func:`deviate` ``(xbar, mu_k, p_k)``; outside it each keeps its own step."""
    ctx = actx.step
    x_new, eps, infos = _chain_steps(keys, state.x, ctx, denoisers, schemes, sampler, detail, skip_inactive)
    xbar = aggregate_states(x_new, aggregation.weights, aggregation.rule)
    if aggregation.mu == "released":
        mu = released_mu(state.x, state.eps, actx.alpha_prev.astype(x_new.dtype),
                         actx.alpha_bar_prev.astype(x_new.dtype))
    else:
        mu = jax.vmap(level_mu, in_axes=(0, 0, None))(state.x, eps, ctx)
    inside = (ctx.index >= jnp.maximum(aggregation.first, 1)) & (ctx.index <= aggregation.last)
    steps = aggregation.steps.astype(x_new.dtype)
    moved, distance = jax.vmap(_deviation, in_axes=(None, 0, 0))(xbar, mu, steps)
    x_next = jnp.where(inside, moved, x_new)
    return AggregateState(x_next, eps), AggregateInfo(inside, xbar, distance, infos)


def aggregate_chain(key, x_T, contexts: AggregateContext, *, denoisers, aggregation: Aggregation, sampler: Sampler,
                    schemes, detail: bool = False, skip_inactive: bool = True):
    """One sample's K chains over every step (one ``lax.scan``): ``(x_final (K, ...), trace)``
    with ``trace`` the stacked :class:`AggregateInfo`. Model k's step i uses
    ``fold_in(split(key, K)[k], i)``, the key :func:`~zmagic_jax.sample_chain` would use for
    step i given ``split(key, K)[k]``. Pure and un-jitted."""
    k = x_T.shape[0]
    chain_keys = jax.random.split(key, k)

    def body(state, actx):
        keys = jax.vmap(lambda c: jax.random.fold_in(c, actx.step.index))(chain_keys)
        return aggregate_step(keys, state, actx, denoisers=denoisers, aggregation=aggregation, sampler=sampler,
                              schemes=schemes, detail=detail, skip_inactive=skip_inactive)

    state, trace = jax.lax.scan(body, AggregateState(x_T, jnp.zeros_like(x_T)), contexts)
    return state.x, trace


class Aggregated(NamedTuple):
    """What :func:`aggregate_sample` returns: every model's final state ``x0`` ``(batch, K, ...)``,
    the merged state of the last step ``mixed`` ``(batch, ...)`` and the per-step
    :class:`AggregateInfo` ``trace`` (leading axes ``(batch, steps)``)."""

    x0: jnp.ndarray
    mixed: jnp.ndarray
    trace: AggregateInfo


def _run(keys, x_T, contexts, denoisers, aggregation, sampler, schemes, detail=False, skip_inactive=True):
    def one(key, x):
        return aggregate_chain(key, x, contexts, denoisers=denoisers, aggregation=aggregation, sampler=sampler,
                               schemes=schemes, detail=detail, skip_inactive=skip_inactive)
    return jax.vmap(one)(keys, x_T)


_run_jit = jax.jit(_run, static_argnames=("detail", "skip_inactive"))


def _check_schemes(schemes, k: int, stacked: bool):
    """``schemes`` as the kernels take it (a tuple of 1 or K), and the list of K schemes."""
    if schemes is None:
        schemes = none()
    if _is_scheme(schemes):
        check_scheme(schemes, "aggregate_sample")
        return (schemes,), [schemes] * k
    if not isinstance(schemes, (tuple, list)):
        raise ValueError(f"aggregate_sample: schemes must be None, one scheme or a tuple of one per model; got "
                         f"{type(schemes).__name__}.")
    schemes = tuple(schemes)
    if len(schemes) not in (1, k):
        raise ValueError(f"aggregate_sample: schemes must be one scheme for every model or one per model ({k}); got "
                         f"{len(schemes)}.")
    for i, s in enumerate(schemes):
        check_scheme(s, f"aggregate_sample: schemes[{i}]")
    if stacked and len({jax.tree_util.tree_structure(s) for s in schemes}) != 1:
        raise ValueError("aggregate_sample: with a DenoiserStack every model's scheme must have the same structure "
                         "(same kind, same conditions' functions) to be stacked; pass the models as a tuple of "
                         "Denoisers for different schemes.")
    return schemes, list(schemes) * (k if len(schemes) == 1 else 1)


def aggregate_sample(key, x_T, schedule: Schedule, grid: TimestepGrid, *, denoisers, aggregation: Aggregation,
                     sampler: Optional[Sampler] = None, schemes=None, nan_policy: str = "raise",
                     detail: bool = False) -> Aggregated:
    """Sample K models together with AMDM, jitted and vmapped over the batch.

    Args:
      key: PRNG key; sample ``b`` uses ``split(key, batch)[b]`` (:func:`aggregate_chain`).
      x_T: ``(batch, K, *shape)`` starting states, one per model (the release draws them
        independently).
      schedule, grid: the one schedule and grid every model shares.
      denoisers: a tuple of K :class:`~zmagic_jax.Denoiser` (any architectures) or a
        :class:`DenoiserStack` (:func:`stack_denoisers`, one vmapped call).
      aggregation: :func:`aggregation` settings for K models.
      sampler: default :func:`~zmagic_jax.ddim` with ``eta = 0`` (the release).
      schemes: guidance of each chain: ``None`` (none), one scheme for every model, or one per
        model (e.g. ``dependent(...)`` on model 1: AMDM + Z-Magic).
      nan_policy: ``"raise"`` or ``"skip"``, as :func:`~zmagic_jax.sample`, per model.
      detail: record per-condition gradients and term II in each chain's info.
    """
    sampler = ddim(0.0) if sampler is None else sampler
    if not isinstance(sampler, Sampler):
        raise ValueError(f"aggregate_sample: sampler must be a zmagic_jax Sampler (ddim(eta), ...); got "
                         f"{type(sampler).__name__}.")
    if not isinstance(aggregation, Aggregation):
        raise ValueError("aggregate_sample: aggregation must be built by zmagic_jax.aggregation(steps, weights, ...); "
                         f"got {type(aggregation).__name__}.")
    if nan_policy not in ("raise", "skip"):
        raise ValueError(f"aggregate_sample: nan_policy must be 'raise' or 'skip'; got {nan_policy!r}.")
    stacked = isinstance(denoisers, DenoiserStack)
    if not stacked:
        if isinstance(denoisers, Denoiser) or not isinstance(denoisers, (tuple, list)) or not denoisers:
            raise ValueError("aggregate_sample: denoisers must be a tuple of zmagic_jax.Denoiser (one per model) or "
                             "stack_denoisers([...]) for models of one architecture.")
        denoisers = tuple(denoisers)
        for i, d in enumerate(denoisers):
            check_denoiser(d, f"aggregate_sample: model {i}")
    k = _num_models(denoisers)
    if aggregation.num_models != k:
        raise ValueError(f"aggregate_sample: the aggregation has step lengths for {aggregation.num_models} models but "
                         f"{k} denoisers were given; pass one p_k per model.")
    _check_key(key)
    x_T = jnp.asarray(x_T)
    if x_T.ndim < 3 or x_T.shape[1] != k or not jnp.issubdtype(x_T.dtype, jnp.floating):
        raise ValueError(f"aggregate_sample: x_T must be a float array of shape (batch, K={k}, *shape), one "
                         f"starting state per model; got shape {x_T.shape} and dtype {x_T.dtype}.")
    grid = check_grid(schedule, grid, "aggregate_sample")
    schemes, per_model = _check_schemes(schemes, k, stacked)
    contexts = aggregation_contexts(schedule, grid, x_T.dtype)
    names = []
    for i, scheme in enumerate(per_model):
        conditions = tuple(scheme.conditions)
        for c in conditions:
            c.rule.check(grid)
        model = denoisers.model(i) if stacked else denoisers[i]
        try:
            _check_shapes(model, conditions, x_T[:, i])
        except ValueError as err:
            raise ValueError(f"aggregate_sample: model {i}: {err}") from err
        names.append([c.name for c in conditions])
    skip = any(not every_step_guided(s.conditions, contexts.step) for s in per_model)
    keys = jax.random.split(key, x_T.shape[0])
    x0, trace = _run_jit(keys, x_T, contexts, denoisers, aggregation, sampler, schemes, detail=detail,
                         skip_inactive=skip)
    t = np.asarray(grid.t)
    for i in range(k):
        info = trace.chains[i] if not stacked else jax.tree_util.tree_map(lambda a: a[:, :, i], trace.chains)
        try:
            _check_finite(info.finite, names[i], t, nan_policy, info.denoiser_finite)
        except FloatingPointError as err:
            raise FloatingPointError(f"aggregate_sample: model {i}: {err}") from err
    return Aggregated(x0, trace.mixed[:, -1], trace)
