"""Guidance schemes: none, independent (FreeDoM), dependent (Z-Magic Alg. 1), multi (Z-Magic Alg. 2).

All schemes share one contract: ``direction(scheme, eps_fn, sampler, x_t, ctx, noise)`` returns
``(eps, d, info)`` where ``eps`` is the denoiser output at ``x_t`` and ``d`` the guidance
displacement; the step is then ``x_next = M0(x_t, eps) + d + noise`` (``noise = sigma_t z``).
Per condition ``i`` the displacement at ``x_t`` is ``d_i = -rho_i grad_{x_t} E_i(x0|t(x_t))``, the
Tweedie approximation of ``score_coef * grad log p(c_i | x_t)``.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp

from zmagic_jax.schemes._cagrad import cagrad
from zmagic_jax.schemes._conditions import (
    Condition,
    any_active,
    check_conditions,
    energies_and_grads,
    energy_vector,
    rho_of,
)


class GuidanceInfo(NamedTuple):
    """Diagnostics of one guided step (stacked over steps by the driver).

    energies: ``(n,)`` each condition's energy at ``x0|t(x_t)`` (Fig. 3 curves).
    displacement_norms: ``(n,)`` norm of what each condition contributes to ``d``
      (dependent: the follower's pulled-back term II).
    cosine: independent: mean pairwise ``cos(g_i, g_j)`` of the per-condition gradients;
      dependent / multi: mean over ordered pairs of ``cos(g_i, term II_ij)`` (paper Fig. 1);
      NaN on unguided steps.
    guided: whether any condition was active at this step.
    finite: ``(n,)`` False where a condition produced a non-finite energy or gradient (the whole
      guidance displacement of that step is then dropped).
    """

    energies: jnp.ndarray
    displacement_norms: jnp.ndarray
    cosine: jnp.ndarray
    guided: jnp.ndarray
    finite: jnp.ndarray


class NoGuidance(NamedTuple):
    """Unguided sampling; energies of ``conditions`` are still recorded (no gradient work)."""
    conditions: tuple = ()
    name: str = "none"


class Independent(NamedTuple):
    """FreeDoM: conditions independent given ``x_t``, ``d = sum_i d_i`` (paper Eq. 5)."""
    conditions: tuple
    name: str = "independent"


class Dependent(NamedTuple):
    """Z-Magic Algorithm 1 on two conditions, guiding ``conditions[order[0]]`` first (with one
    condition the denoiser's own conditioning leads: ``d = term II`` alone).

    ``xhat(x_t) = M0(x_t) + d_1(x_t) + sigma z`` (same ``z`` as the final update),
    ``gh = d_2`` evaluated at ``xhat`` and held constant, term II ``= J_xhat(x_t)^T gh`` by one
    ``jax.vjp`` (it holds ``A^T gh`` and ``b_t H_{c1} gh`` exactly, paper Eqs. 6-7; nothing is
    materialised), and ``d = d_1 + term II``. ``xhat_time`` says which level the denoiser sees at
    ``xhat``: ``"current"`` (``t``, as the public fork does) or ``"next"`` (``t_next``).
    Diagnostics keep the order of ``conditions``.
    """
    conditions: tuple
    order: tuple = (0, 1)
    xhat_time: str = "current"
    name: str = "dependent"


class Multi(NamedTuple):
    """Z-Magic Algorithm 2: every ordered pair ``(i, j), i != j`` gives a task gradient
    ``g_ij = d_i + J_{xhat_i}^T d_j(xhat_i)``; CAGrad (``c``, ``rescale``) combines them.
    For more than 2 conditions CAGrad runs ``cagrad_iters`` solver iterations per step."""
    conditions: tuple
    c: float = 0.5
    rescale: str = "1+c^2"
    xhat_time: str = "current"
    cagrad_iters: int = 100
    name: str = "multi"


def none(conditions: Sequence[Condition] = ()) -> NoGuidance:
    """Unguided sampling (energies of ``conditions`` are recorded for comparison)."""
    return NoGuidance(check_conditions(conditions, "none", minimum=0))


def independent(conditions: Sequence[Condition]) -> Independent:
    """FreeDoM's sum of per-condition gradients at ``x_t``."""
    return Independent(check_conditions(conditions, "independent"))


def dependent(conditions: Sequence[Condition], order=None, xhat_time: str = "current") -> Dependent:
    """Z-Magic Algorithm 1.

    Two conditions: ``order=(0, 1)`` (default) guides the first one first, ``(1, 0)`` the second.
    One condition: the denoiser's own conditioning leads (the prompt through classifier-free
    guidance, as in the paper's Stable Diffusion text + style setting) and the condition's
    gradient is pulled back through that step (:func:`model_led_term`).
    """
    conditions = check_conditions(conditions, "dependent", minimum=1)
    if len(conditions) > 2:
        raise ValueError(f"dependent: Algorithm 1 takes 1 or 2 conditions; got {len(conditions)}. "
                         "Use multi(conditions) for more.")
    if len(conditions) == 1:
        if order not in (None, (0,), [0]):
            raise ValueError(f"dependent: with one condition the model's conditioning leads and order "
                             f"must be None; got {order!r}.")
        order = (0,)
    else:
        order = (0, 1) if order is None else order
        if tuple(sorted(order)) != (0, 1):
            raise ValueError(f"dependent: order must be (0, 1) or (1, 0); got {order!r}.")
    return Dependent(conditions, tuple(int(i) for i in order), _check_xhat_time(xhat_time, "dependent"))


def multi(conditions: Sequence[Condition], c: float = 0.5, rescale: str = "1+c^2",
          xhat_time: str = "current", cagrad_iters: int = 100) -> Multi:
    """Z-Magic Algorithm 2 (CAGrad over all ordered pairs' dependent gradients).

    ``cagrad_iters`` (used for 3+ conditions, i.e. 6+ task gradients): 100 reaches float32
    rounding on random task sets (max relative error 2.3e-7 against 2000 iterations for 6 and 12
    tasks) at a fifth of the cost of :func:`cagrad`'s default 500; raise it for ``c`` near 1 with
    nearly cancelling gradients.
    """
    conditions = check_conditions(conditions, "multi", minimum=2)
    if not isinstance(c, (int, float)) or c < 0:
        raise ValueError(f"multi: c must be a number >= 0; got {c!r}.")
    if rescale not in ("1+c^2", "1+c", "none"):
        raise ValueError(f"multi: rescale must be '1+c^2', '1+c' or 'none'; got {rescale!r}.")
    if not isinstance(cagrad_iters, int) or cagrad_iters < 1:
        raise ValueError(f"multi: cagrad_iters must be a positive int; got {cagrad_iters!r}.")
    return Multi(conditions, float(c), rescale, _check_xhat_time(xhat_time, "multi"), cagrad_iters)


SCHEMES = {"none": none, "independent": independent, "dependent": dependent, "multi": multi}


def scheme_by_name(name: str, conditions: Sequence[Condition] = (), **options):
    """Build a scheme from its name: ``none``, ``independent``, ``dependent``, ``multi``."""
    if name not in SCHEMES:
        raise ValueError(f"scheme: unknown name {name!r}; choose one of {sorted(SCHEMES)}.")
    return SCHEMES[name](conditions, **options)


def _check_xhat_time(xhat_time, who):
    if xhat_time not in ("current", "next"):
        raise ValueError(f"{who}: xhat_time must be 'current' or 'next'; got {xhat_time!r}.")
    return xhat_time


def _flat(v):
    return v.reshape(v.shape[0], -1) if v.ndim > 1 else v


def _cosine(a, b):
    a, b = a.reshape(-1), b.reshape(-1)
    den = jnp.linalg.norm(a) * jnp.linalg.norm(b)
    return jnp.where(den > 0, jnp.dot(a, b) / jnp.where(den > 0, den, 1.0), 0.0)


def _norms(v):
    return jnp.linalg.norm(_flat(v), axis=-1)


def _all_finite(v):
    return jnp.all(jnp.isfinite(_flat(v)), axis=-1)


def _mean_pairwise_cosine(vectors):
    n = vectors.shape[0]
    pairs = [(i, j) for i in range(n) for j in range(i + 1, n)]
    return jnp.mean(jnp.stack([_cosine(vectors[i], vectors[j]) for i, j in pairs]))


def _unguided(conditions, eps_fn, x, ctx):
    energies, eps = energy_vector(conditions, eps_fn, ctx.t, ctx.alpha_bar)(x) if conditions else (
        jnp.zeros((0,), x.dtype), eps_fn(x, ctx.t))
    n = len(conditions)
    info = GuidanceInfo(energies, jnp.zeros((n,), x.dtype), jnp.asarray(jnp.nan, x.dtype),
                        jnp.asarray(False), jnp.isfinite(energies))
    return eps, jnp.zeros_like(x), info


def _finalize(eps, d, energies, contribution_norms, cosine, finite):
    finite = finite & jnp.isfinite(energies) & jnp.all(jnp.isfinite(d))
    d = jnp.where(jnp.all(finite), d, jnp.zeros_like(d))
    return eps, d, GuidanceInfo(energies, contribution_norms, cosine, jnp.asarray(True), finite)


def _independent(conditions, eps_fn, x, ctx):
    n = len(conditions)
    energies, grads, eps = energies_and_grads(conditions, eps_fn, x, ctx.t, ctx.alpha_bar, range(n))
    rhos = jnp.stack([rho_of(conditions, i, ctx, eps, grads[i], x) for i in range(n)])
    disp = -rhos.reshape((n,) + (1,) * x.ndim) * grads
    cosine = _mean_pairwise_cosine(-grads) if n > 1 else jnp.asarray(jnp.nan, x.dtype)
    return _finalize(eps, disp.sum(0), energies, _norms(disp), cosine, _all_finite(disp))


def _xhat_level(ctx, xhat_time):
    """``(t, alpha_bar)`` the denoiser sees at the look-ahead point ``xhat``."""
    if xhat_time == "current":
        return ctx.t, ctx.alpha_bar
    # at the clean level ab = 1 makes x0|t the point itself, whatever eps the model returns
    return jnp.where(ctx.t_next < 0, ctx.t, ctx.t_next), ctx.alpha_bar_next


def dependent_terms(conditions, eps_fn, sampler, x, ctx, noise, leaders, followers, xhat_time="current"):
    """Z-Magic dependent terms for the ordered pairs ``(leaders[k], followers[k][m])`` at one ``x_t``.

    ``leaders``: condition indices ``(L,)``; ``followers``: ``(L, F)`` indices, each row excluding
    its leader. ``noise`` is the step's ``sigma_t z``.

    For each leader ``i`` (vmapped): ``xhat_i = M0(x) + d_i(x) + noise`` linearised once; each
    follower's displacement at ``xhat_i`` is pulled back by that one linearisation (vmapped).
    The denoiser pass at ``x_t`` does not depend on the leader, so vmap computes it once.
    Returns the per-leader displacements ``d_i`` (L, ...), term II (L, F, ...), energies at
    ``x_t`` (n,), ``eps`` at ``x_t`` and per-pair finiteness (L, F).
    """
    t_hat, ab_hat = _xhat_level(ctx, xhat_time)

    def guided_point(x, i):
        energies, grads, eps = energies_and_grads(conditions, eps_fn, x, ctx.t, ctx.alpha_bar, i[None])
        d_i = -rho_of(conditions, i, ctx, eps, grads[0], x) * grads[0]
        return sampler.mean(x, eps, ctx) + d_i + noise, (d_i, energies, eps)

    def per_leader(i, follows):
        xhat, pullback, (d_i, energies, eps) = jax.vjp(lambda y: guided_point(y, i), x, has_aux=True)
        _, grads_hat, eps_hat = energies_and_grads(conditions, eps_fn, xhat, t_hat, ab_hat, follows)
        gh = jax.vmap(lambda j, g: -rho_of(conditions, j, ctx, eps_hat, g, xhat) * g)(follows, grads_hat)
        (term2,) = jax.vmap(pullback)(gh)
        finite = _all_finite(term2) & _all_finite(gh)
        return d_i, term2, energies, eps, finite

    d, term2, energies, eps, finite = jax.vmap(per_leader)(jnp.asarray(leaders), jnp.asarray(followers))
    return d, term2, energies[0], eps[0], finite


def _pair_finite(n, leaders, followers, pair_ok, lead_ok):
    """A condition is flagged if any pair it takes part in (as leader or follower) is non-finite."""
    finite = jnp.ones((n,), bool)
    for k, i in enumerate(leaders):
        finite = finite.at[i].set(finite[i] & lead_ok[k])
        for m, j in enumerate(followers[k]):
            finite = finite.at[i].set(finite[i] & pair_ok[k, m]).at[j].set(finite[j] & pair_ok[k, m])
    return finite


def model_led_term(conditions, eps_fn, sampler, x, ctx, noise, xhat_time="current"):
    """Z-Magic dependent term when the denoiser's own conditioning leads (e.g. the prompt through
    classifier-free guidance, the paper's ``p(x_t | c1)``) and ``conditions[0]`` follows.

    ``xhat = M0(x_t, eps(x_t)) + noise`` (no guidance displacement: the leader is inside
    ``eps``); ``gh = d_1`` at ``xhat`` held constant; term II ``= J_xhat(x_t)^T gh`` by one
    ``jax.vjp``. Returns ``(term II, energies at x_t (1,), eps at x_t, finite)``.
    """
    t_hat, ab_hat = _xhat_level(ctx, xhat_time)

    def guided_point(y):
        energies, eps = energy_vector(conditions, eps_fn, ctx.t, ctx.alpha_bar)(y)
        return sampler.mean(y, eps, ctx) + noise, (energies, eps)

    xhat, pullback, (energies, eps) = jax.vjp(guided_point, x, has_aux=True)
    _, grads_hat, eps_hat = energies_and_grads(conditions, eps_fn, xhat, t_hat, ab_hat, (0,))
    gh = -rho_of(conditions, 0, ctx, eps_hat, grads_hat[0], xhat) * grads_hat[0]
    (term2,) = pullback(gh)
    return term2, energies, eps, jnp.all(jnp.isfinite(term2)) & jnp.all(jnp.isfinite(gh))


def _dependent(scheme: Dependent, eps_fn, sampler, x, ctx, noise):
    if len(scheme.conditions) == 1:
        term2, energies, eps, ok = model_led_term(scheme.conditions, eps_fn, sampler, x, ctx, noise,
                                                  scheme.xhat_time)
        return _finalize(eps, term2, energies, jnp.linalg.norm(term2)[None],
                         jnp.asarray(jnp.nan, x.dtype), ok[None])
    first, second = scheme.order
    d, term2, energies, eps, pair_ok = dependent_terms(
        scheme.conditions, eps_fn, sampler, x, ctx, noise, (first,), ((second,),), scheme.xhat_time)
    d1, t2 = d[0], term2[0, 0]
    finite = _pair_finite(2, (first,), ((second,),), pair_ok, _all_finite(d))
    norms = jnp.zeros((2,), x.dtype).at[first].set(jnp.linalg.norm(d1)).at[second].set(jnp.linalg.norm(t2))
    return _finalize(eps, d1 + t2, energies, norms, _cosine(d1, t2), finite)


def _multi(scheme: Multi, eps_fn, sampler, x, ctx, noise):
    n = len(scheme.conditions)
    leaders = tuple(range(n))
    followers = tuple(tuple(j for j in range(n) if j != i) for i in range(n))
    d, term2, energies, eps, pair_ok = dependent_terms(
        scheme.conditions, eps_fn, sampler, x, ctx, noise, leaders, followers, scheme.xhat_time)
    tasks = (d[:, None] + term2).reshape((n * (n - 1),) + x.shape)
    direction = cagrad(tasks, c=scheme.c, rescale=scheme.rescale, num_iters=scheme.cagrad_iters)
    cosine = jnp.mean(jax.vmap(lambda a, bs: jax.vmap(lambda b: _cosine(a, b))(bs))(d, term2))
    finite = _pair_finite(n, leaders, followers, pair_ok, _all_finite(d))
    return _finalize(eps, direction, energies, _norms(d), cosine, finite)


def direction(scheme, eps_fn, sampler, x, ctx, noise):
    """Guidance of one step: ``(eps at x_t, displacement d, GuidanceInfo)``; unguided steps skip
    every gradient (``lax.cond`` on the grid-only activity predicate, so it stays a real branch
    under ``vmap`` over samples)."""
    conditions = scheme.conditions
    unguided = lambda x: _unguided(conditions, eps_fn, x, ctx)
    if isinstance(scheme, NoGuidance):
        return unguided(x)
    if isinstance(scheme, Independent):
        guided = lambda x: _independent(conditions, eps_fn, x, ctx)
    elif isinstance(scheme, Dependent):
        guided = lambda x: _dependent(scheme, eps_fn, sampler, x, ctx, noise)
    elif isinstance(scheme, Multi):
        guided = lambda x: _multi(scheme, eps_fn, sampler, x, ctx, noise)
    else:
        raise ValueError(f"scheme: expected none/independent/dependent/multi (from zmagic_jax.schemes); "
                         f"got {type(scheme).__name__}.")
    return jax.lax.cond(any_active(conditions, ctx), guided, unguided, x)
