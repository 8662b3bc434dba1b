"""Guidance schemes: none, independent (FreeDoM), dependent (Z-Magic Alg. 1), multi (Z-Magic Alg. 2).

A scheme is data: a pytree carrying its ``conditions`` and a method

    ``scheme.direction(x, ctx, noise, *, denoiser, sampler, detail) -> (eps, d, GuidanceInfo)``

where ``eps`` is the denoiser output at ``x_t`` and ``d`` the guidance displacement of the mean;
the step is then ``x_next = M0(x_t, eps) + d + noise`` (``noise = sigma_t z``). Anything with that
contract runs in :func:`~zmagic_jax.step`, :func:`~zmagic_jax.sample_chain` and
:func:`~zmagic_jax.sample` (no type switch: write a ``NamedTuple`` with a ``direction`` method).
``ctx.score_coef`` is filled from ``sampler`` before ``direction`` is called, and steps on which
no condition's rule is active skip the scheme (:func:`direction`).

Per condition ``i`` the displacement at ``x_t`` is ``d_i = -rho_i grad_{x_t} E_i(x0|t(x_t))``, the
Tweedie approximation of ``score_coef * grad log p(c_i | x_t)``.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp

from zmagic_jax._pytree import check_scalar, is_traced, pytree_dataclass
from zmagic_jax.samplers._base import with_score_coef
from zmagic_jax.schemes._cagrad import RESCALES, cagrad
from zmagic_jax.schemes._conditions import (Condition, any_active, check_conditions, energies_and_grads,
                                            energy_vector, rho_of)
from zmagic_jax.schemes._info import (GuidanceInfo, all_finite, cosine, cosine_matrix, flat_norms, guidance_info,
                                      unguided_info)


def unguided(x, ctx, *, conditions, denoiser, detail: bool = False):
    """A step without guidance: ``(eps, 0, info)`` with the conditions' energies recorded."""
    if conditions:
        energies, eps = energy_vector(conditions, denoiser, ctx.t, ctx.alpha_bar)(x)
    else:
        energies, eps = jnp.zeros((0,), x.dtype), denoiser(x, ctx.t)
    return eps, jnp.zeros_like(x), unguided_info(x, energies, detail=detail)


def finalize(x, eps, d, energies, finite, **fields):
    """Drop the whole displacement if anything is non-finite (``finite`` flags the conditions that
    produced it), then build the step's info."""
    finite = finite & jnp.isfinite(energies)
    # a non-finite combination of finite parts (it should not happen) flags every condition
    finite = finite & (~jnp.all(finite) | jnp.all(jnp.isfinite(d)))
    d = jnp.where(jnp.all(finite), d, jnp.zeros_like(d))
    return eps, d, guidance_info(x, energies, d, finite=finite, **fields)


def _gradient_cosines(displacements):
    """``cos(d_i, d_j)`` = ``cos(grad E_i, grad E_j)`` where both are nonzero (``rho > 0``), else NaN."""
    cos = cosine_matrix(displacements)
    nonzero = flat_norms(displacements) > 0
    return jnp.where(nonzero[:, None] & nonzero[None, :], cos, jnp.nan)


@pytree_dataclass(static=("name",))
class NoGuidance:
    """Unguided sampling; energies of ``conditions`` are still recorded (no gradient work)."""
    conditions: tuple = ()
    name: str = "none"

    def direction(self, x, ctx, noise, *, denoiser, sampler, detail: bool = False):
        return unguided(x, ctx, conditions=self.conditions, denoiser=denoiser, detail=detail)


@pytree_dataclass(static=("name",))
class Independent:
    """FreeDoM: conditions independent given ``x_t``, ``d = sum_i d_i`` (paper Eq. 5)."""
    conditions: tuple
    name: str = "independent"

    def direction(self, x, ctx, noise, *, denoiser, sampler, detail: bool = False):
        conditions, n = self.conditions, len(self.conditions)
        energies, grads, eps = energies_and_grads(x, ctx.t, ctx.alpha_bar, conditions=conditions, denoiser=denoiser,
                                                  rows=range(n))
        rhos = jnp.stack([rho_of(conditions, i, ctx, eps, grads[i], x) for i in range(n)])
        disp = -rhos.reshape((n,) + (1,) * x.ndim) * grads
        return finalize(x, eps, disp.sum(0), energies, all_finite(disp), displacement_norms=flat_norms(disp),
                        condition_cosines=_gradient_cosines(disp), gradients=grads if detail else None,
                        detail=detail)


def _xhat_level(ctx, xhat_time):
    """``(t, alpha_bar)`` the denoiser sees at the look-ahead point ``xhat``."""
    if xhat_time == "current":
        return ctx.t, ctx.alpha_bar
    # at the clean level ab = 1 makes x0|t the point itself, whatever eps the model returns
    return jnp.where(ctx.t_next < 0, ctx.t, ctx.t_next), ctx.alpha_bar_next


class DependentTerms(NamedTuple):
    """What :func:`dependent_terms` computes for ``L`` leaders with ``F`` followers each.

    d: ``(L, *x)`` each leader's displacement ``d_i`` at ``x_t``; term2: ``(L, F, *x)`` term II of
    each pair; energies ``(n,)`` and eps at ``x_t``; follower_finite ``(L, F)``: the follower's
    displacement at ``xhat`` is finite; term2_finite ``(L, F)``: term II is finite.
    With ``detail``: gradients ``(n, *x)`` every ``grad E_i`` at ``x_t``; score_parts /
    hessian_parts ``(L, F, *x)``, ``J_{M0}^T gh`` and ``-rho_i J_{grad E_i}^T gh`` (their sum is
    term II); otherwise ``None``. follower_norms ``(L, F)``: ``|gh|``, each follower's
    displacement at ``xhat`` (the reference of :class:`Dependent`'s ``term2_trust``).
    """
    d: jnp.ndarray
    term2: jnp.ndarray
    energies: jnp.ndarray
    eps: jnp.ndarray
    follower_finite: jnp.ndarray
    term2_finite: jnp.ndarray
    gradients: Optional[jnp.ndarray] = None
    score_parts: Optional[jnp.ndarray] = None
    hessian_parts: Optional[jnp.ndarray] = None
    follower_norms: Optional[jnp.ndarray] = None


def dependent_terms(x, ctx, noise, *, conditions, denoiser, sampler, leaders, followers, xhat_time="current",
                    detail: bool = False) -> DependentTerms:
    """Z-Magic dependent terms for the ordered pairs ``(leaders[k], followers[k][m])`` at one ``x_t``.

    ``leaders``: condition indices ``(L,)``; ``followers``: ``(L, F)`` indices, each row excluding
    its leader. ``noise`` is the step's ``sigma_t z``.

    For each leader ``i`` (vmapped) the map ``y -> (M0(y), grad E_i(y))`` is linearised once at
    ``x_t``; ``rho_i`` is computed from its outputs, so the look-ahead point
    ``xhat_i = M0(x) - rho_i grad E_i(x) + noise`` is differentiated with ``rho_i`` a number
    (FreeDoM's convention) while an outer ``jax.grad`` still sees rho's true dependence.
    Each follower's displacement ``gh = d_j(xhat_i)`` is pulled back by that one linearisation:
    term II ``= J_{M0}^T gh - rho_i J_{grad E_i}^T gh = J_{xhat_i}(x_t)^T gh`` (paper Eqs. 6-7;
    nothing is materialised). The denoiser pass at ``x_t`` does not depend on the leader, so vmap
    computes it once.
    """
    n = len(conditions)
    ctx = with_score_coef(ctx, sampler, x.dtype)
    t_hat, ab_hat = _xhat_level(ctx, xhat_time)

    def parts(y, i):
        rows = jnp.arange(n) if detail else i[None]
        energies, grads, eps = energies_and_grads(y, ctx.t, ctx.alpha_bar, conditions=conditions, denoiser=denoiser,
                                                  rows=rows)
        return (sampler.mean(y, eps, ctx), grads[i] if detail else grads[0]), (energies, eps, grads)

    def per_leader(i, follows):
        (m0, g_i), pullback, (energies, eps, grads) = jax.vjp(lambda y: parts(y, i), x, has_aux=True)
        rho_i = rho_of(conditions, i, ctx, eps, g_i, x)
        d_i = -rho_i * g_i
        xhat = m0 + d_i + noise
        _, grads_hat, eps_hat = energies_and_grads(xhat, t_hat, ab_hat, conditions=conditions, denoiser=denoiser,
                                                   rows=follows)
        gh = jax.vmap(lambda j, g: -rho_of(conditions, j, ctx, eps_hat, g, xhat) * g)(follows, grads_hat)
        pull = jax.vmap(lambda a, b: pullback((a, b))[0])
        term2 = pull(gh, -rho_i * gh)
        if not detail:
            return d_i, term2, energies, eps, all_finite(gh), all_finite(term2), None, None, None, flat_norms(gh)
        zeros = jnp.zeros_like(gh)
        return (d_i, term2, energies, eps, all_finite(gh), all_finite(term2), grads, pull(gh, zeros),
                pull(zeros, -rho_i * gh), flat_norms(gh))

    d, term2, energies, eps, follow_ok, term_ok, grads, score, hess, gh_norms = jax.vmap(per_leader)(
        jnp.asarray(leaders), jnp.asarray(followers))
    first = lambda v: None if v is None else v[0]
    return DependentTerms(d, term2, energies[0], eps[0], follow_ok, term_ok, first(grads), score, hess, gh_norms)


def model_led_term(x, ctx, noise, *, conditions, denoiser, sampler, xhat_time="current", detail: bool = False):
    """Z-Magic dependent term when the denoiser's own conditioning leads (e.g. the prompt through
    classifier-free guidance, the paper's ``p(x_t | c1)``) and ``conditions[0]`` follows.

    ``xhat = M0(x_t, eps(x_t)) + noise`` (no guidance displacement: the leader is inside
    ``eps``); ``gh = d_1`` at ``xhat`` held constant; term II ``= J_xhat(x_t)^T gh`` by one
    ``jax.vjp`` (the score-Jacobian part alone: there is no leader energy to take a Hessian of).
    Returns ``(term II, energies at x_t (1,), eps at x_t, finite, gradient at x_t or None)``; the
    gradient of ``conditions[0]`` at ``x_t`` is computed only with ``detail``.
    """
    ctx = with_score_coef(ctx, sampler, x.dtype)
    t_hat, ab_hat = _xhat_level(ctx, xhat_time)

    def guided_point(y):
        if detail:
            energies, grads, eps = energies_and_grads(y, ctx.t, ctx.alpha_bar, conditions=conditions,
                                                      denoiser=denoiser, rows=(0,))
        else:
            (energies, eps), grads = energy_vector(conditions, denoiser, ctx.t, ctx.alpha_bar)(y), None
        return sampler.mean(y, eps, ctx) + noise, (energies, eps, grads)

    xhat, pullback, (energies, eps, grads) = jax.vjp(guided_point, x, has_aux=True)
    _, grads_hat, eps_hat = energies_and_grads(xhat, t_hat, ab_hat, conditions=conditions, denoiser=denoiser,
                                               rows=(0,))
    gh = -rho_of(conditions, 0, ctx, eps_hat, grads_hat[0], xhat) * grads_hat[0]
    (term2,) = pullback(gh)
    return term2, energies, eps, jnp.all(jnp.isfinite(term2)) & jnp.all(jnp.isfinite(gh)), grads


def _pair_finite(n, leaders, followers, terms: DependentTerms):
    """Which condition produced a non-finite value: a follower whose displacement at ``xhat`` is
    non-finite; a leader whose own displacement is, or whose linearisation turned a finite
    follower displacement into a non-finite term II (its Hessian)."""
    finite = jnp.ones((n,), bool)
    lead_ok = all_finite(terms.d)
    for k, i in enumerate(leaders):
        finite = finite.at[i].set(finite[i] & lead_ok[k])
        for m, j in enumerate(followers[k]):
            follow_ok, term_ok = terms.follower_finite[k, m], terms.term2_finite[k, m]
            finite = finite.at[j].set(finite[j] & follow_ok).at[i].set(finite[i] & (term_ok | ~follow_ok))
    return finite


def _pair_matrix(n, leaders, followers, values, fill=jnp.nan):
    """Scatter ``values (L, F)`` of the static pairs into an ``(n, n)`` matrix."""
    out = jnp.full((n, n), fill, values.dtype)
    for k, i in enumerate(leaders):
        for m, j in enumerate(followers[k]):
            out = out.at[i, j].set(values[k, m])
    return out


def _pair_array(n, leaders, followers, values):
    """Scatter ``values (L, F, *x)`` into ``(n, n, *x)`` zeros."""
    out = jnp.zeros((n, n) + values.shape[2:], values.dtype)
    for k, i in enumerate(leaders):
        for m, j in enumerate(followers[k]):
            out = out.at[i, j].set(values[k, m])
    return out


def _pair_fields(n, leaders, followers, terms: DependentTerms, detail: bool) -> dict:
    """The pair fields of :class:`GuidanceInfo` from :func:`dependent_terms`' output."""
    flat = lambda v: jnp.linalg.norm(v.reshape(v.shape[:2] + (-1,)), axis=-1)
    cos = jax.vmap(lambda a, bs: jax.vmap(lambda b: cosine(a, b))(bs))(terms.d, terms.term2)
    fields = dict(term2_norms=_pair_matrix(n, leaders, followers, flat(terms.term2)),
                  term2_cosines=_pair_matrix(n, leaders, followers, cos))
    if detail:
        fields.update(score_part_norms=_pair_matrix(n, leaders, followers, flat(terms.score_parts)),
                      hessian_part_norms=_pair_matrix(n, leaders, followers, flat(terms.hessian_parts)),
                      gradients=terms.gradients, term2=_pair_array(n, leaders, followers, terms.term2))
    return fields


def _displacements_at_x(x, ctx, conditions, eps, gradients):
    """Every ``d_i = -rho_i grad E_i`` at ``x_t`` from the gradients (``detail`` only)."""
    n = len(conditions)
    rhos = jnp.stack([rho_of(conditions, i, ctx, eps, gradients[i], x) for i in range(n)])
    return -rhos.reshape((n,) + (1,) * x.ndim) * gradients


def trust_term2(terms: DependentTerms, c) -> DependentTerms:
    """The term-II trust region of :class:`Dependent` / :class:`Multi`, pair by pair: term II of
    ``(i, j)`` (and its score / Hessian parts) times ``min(1, c max(|d_i|, |gh_ij|) / |term II_ij|)``."""
    flat = lambda v: jnp.linalg.norm(v.reshape(v.shape[:2] + (-1,)), axis=-1)
    lead = jnp.linalg.norm(terms.d.reshape(terms.d.shape[0], -1), axis=-1)
    bound = c * jnp.maximum(lead[:, None], terms.follower_norms)
    norm = flat(terms.term2)
    over = norm > bound
    scale = jnp.where(over, bound / jnp.where(over, norm, 1.0), 1.0).astype(terms.term2.dtype)
    scale = scale.reshape(scale.shape + (1,) * (terms.term2.ndim - 2))
    scaled = lambda v: None if v is None else scale * v
    return terms._replace(term2=scale * terms.term2, score_parts=scaled(terms.score_parts),
                          hessian_parts=scaled(terms.hessian_parts))


@pytree_dataclass(static=("order", "xhat_time", "name"))
class Dependent:
    """Z-Magic Algorithm 1 on two conditions, guiding ``conditions[order[0]]`` first (with one
    condition the denoiser's own conditioning leads: ``d = term II`` alone).

    ``xhat(x_t) = M0(x_t) + d_1(x_t) + sigma z`` (same ``z`` as the final update),
    ``gh = d_2`` evaluated at ``xhat`` and held constant, term II ``= J_xhat(x_t)^T gh`` by one
    ``jax.vjp`` (it holds ``A^T gh`` and ``b_t H_{c1} gh`` exactly, paper Eqs. 6-7; nothing is
    materialised), and ``d = d_1 + term II``. ``xhat_time`` says which level the denoiser sees at
    ``xhat``: ``"current"`` (``t``, as the public fork does) or ``"next"`` (``t_next``).
    Diagnostics keep the order of ``conditions``.

    ``term2_trust`` (``None``: off, the paper's algorithm; else ``c > 0``, a leaf) is a trust
    region on term II (two conditions only)::

        term II <- term II * min(1, c * max(|d_1|, |gh|) / |term II|)

    Term II is a first-order correction ``J_xhat^T gh`` with ``J_xhat = J_{M0} - rho_1 H_1``
    (``H_1`` the Hessian of ``E_1(x0|t(x_t))``). While the leader's step is resolved
    (``|1 - rho_1 lambda| <~ 1`` over ``H_1``'s spectrum) ``|term II| ~ |gh|``, and a cap
    ``c >~ 1`` is inactive; where the leader is stiff (``rho_1 lambda_max >> 1``, e.g. a
    classifier near its decision boundary at coarse steps) ``|term II| ~ rho_1 lambda_max |gh|``
    is no longer a small correction and is cut back to ``c`` times the larger of the two
    displacements the step rules chose, so ``|d| <= |d_1| + c max(|d_1|, |gh|)``, the size of an
    independent (FreeDoM) step. Both reference norms matter: ``|d_1|`` alone would zero term II
    when the leader saturates (``d_1 = 0``, term II is then the follower's pulled-back guidance).
    It costs two norms per step. The diagnostics report the
    rescaled term II (and its score / Hessian parts scaled alike).
    """
    conditions: tuple
    order: tuple = (0, 1)
    xhat_time: str = "current"
    name: str = "dependent"
    term2_trust: object = None

    def direction(self, x, ctx, noise, *, denoiser, sampler, detail: bool = False):
        conditions, n = self.conditions, len(self.conditions)
        if n == 1:
            return self._model_led(x, ctx, noise, denoiser, sampler, detail)
        first, second = self.order
        leaders, followers = (first,), ((second,),)
        terms = dependent_terms(x, ctx, noise, conditions=conditions, denoiser=denoiser, sampler=sampler,
                                leaders=leaders, followers=followers, xhat_time=self.xhat_time, detail=detail)
        if self.term2_trust is not None:
            terms = trust_term2(terms, self.term2_trust)
        d1, t2 = terms.d[0], terms.term2[0, 0]
        finite = _pair_finite(n, leaders, followers, terms)
        fields = _pair_fields(n, leaders, followers, terms, detail)
        if detail:
            disp = _displacements_at_x(x, ctx, conditions, terms.eps, terms.gradients)
            fields.update(displacement_norms=flat_norms(disp), condition_cosines=_gradient_cosines(disp))
        else:
            fields.update(displacement_norms=jnp.full((n,), jnp.nan, x.dtype).at[first].set(jnp.linalg.norm(d1)))
        return finalize(x, terms.eps, d1 + t2, terms.energies, finite, detail=detail, **fields)

    def _model_led(self, x, ctx, noise, denoiser, sampler, detail):
        term2, energies, eps, ok, grads = model_led_term(x, ctx, noise, conditions=self.conditions,
                                                         denoiser=denoiser, sampler=sampler,
                                                         xhat_time=self.xhat_time, detail=detail)
        norm = jnp.linalg.norm(term2).reshape(1, 1)
        fields = dict(term2_norms=norm)
        if detail:
            disp = _displacements_at_x(x, ctx, self.conditions, eps, grads)
            fields.update(displacement_norms=flat_norms(disp), condition_cosines=_gradient_cosines(disp),
                          score_part_norms=norm, hessian_part_norms=jnp.zeros((1, 1), x.dtype), gradients=grads,
                          term2=term2[None, None])
        return finalize(x, eps, term2, energies, ok[None], detail=detail, **fields)


@pytree_dataclass(static=("rescale", "xhat_time", "cagrad_iters", "name"))
class Multi:
    """Z-Magic Algorithm 2: every ordered pair ``(i, j), i != j`` gives a task gradient
    ``g_ij = d_i + J_{xhat_i}^T d_j(xhat_i)``; CAGrad (``c``, a leaf, and ``rescale``) combines
    them. For more than 2 conditions CAGrad runs ``cagrad_iters`` solver iterations per step.
    ``term2_trust`` (``None``: the paper's algorithm) caps each pair's term II as
    :class:`Dependent` does (:func:`trust_term2`), before CAGrad."""
    conditions: tuple
    c: object = 0.5
    rescale: str = "1+c^2"
    xhat_time: str = "current"
    cagrad_iters: int = 100
    name: str = "multi"
    term2_trust: object = None

    def direction(self, x, ctx, noise, *, denoiser, sampler, detail: bool = False):
        conditions, n = self.conditions, len(self.conditions)
        leaders = tuple(range(n))
        followers = tuple(tuple(j for j in range(n) if j != i) for i in range(n))
        terms = dependent_terms(x, ctx, noise, conditions=conditions, denoiser=denoiser, sampler=sampler,
                                leaders=leaders, followers=followers, xhat_time=self.xhat_time, detail=detail)
        if self.term2_trust is not None:
            terms = trust_term2(terms, self.term2_trust)
        tasks = (terms.d[:, None] + terms.term2).reshape((n * (n - 1),) + x.shape)
        d = cagrad(tasks, c=self.c, rescale=self.rescale, num_iters=self.cagrad_iters)
        finite = _pair_finite(n, leaders, followers, terms)
        fields = _pair_fields(n, leaders, followers, terms, detail)
        fields.update(displacement_norms=flat_norms(terms.d), condition_cosines=_gradient_cosines(terms.d))
        return finalize(x, terms.eps, d, terms.energies, finite, detail=detail, **fields)


def none(conditions: Sequence[Condition] = ()) -> NoGuidance:
    """Unguided sampling (energies of ``conditions`` are recorded for comparison)."""
    return NoGuidance(check_conditions(conditions, "none", minimum=0))


def independent(conditions: Sequence[Condition]) -> Independent:
    """FreeDoM's sum of per-condition gradients at ``x_t``."""
    return Independent(check_conditions(conditions, "independent"))


def dependent(conditions: Sequence[Condition], order=None, xhat_time: str = "current",
              term2_trust=None) -> Dependent:
    """Z-Magic Algorithm 1.

    Two conditions: ``order=(0, 1)`` (default) guides the first one first, ``(1, 0)`` the second.
    One condition: the denoiser's own conditioning leads (the prompt through classifier-free
    guidance, as in the paper's Stable Diffusion text + style setting) and the condition's
    gradient is pulled back through that step (:func:`model_led_term`).
    ``term2_trust``: ``None`` (the paper's algorithm) or ``c > 0`` (a leaf, may be traced), the
    trust region ``|term II| <= c max(|d_1|, |gh|)`` of :class:`Dependent`; two conditions only.
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
        if not isinstance(order, (tuple, list)) or tuple(sorted(order)) != (0, 1):
            raise ValueError(f"dependent: order must be (0, 1) or (1, 0); got {order!r}.")
    if term2_trust is not None:
        if len(conditions) == 1:
            raise ValueError("dependent: term2_trust bounds term II by the leader's displacement, and with one "
                             "condition the leader is inside the denoiser; pass term2_trust=None.")
        check_scalar(term2_trust, "dependent", "term2_trust", inclusive=False)
    return Dependent(conditions, tuple(int(i) for i in order), _check_xhat_time(xhat_time, "dependent"),
                     term2_trust=term2_trust)


def multi(conditions: Sequence[Condition], c=0.5, rescale: str = "1+c^2",
          xhat_time: str = "current", cagrad_iters: int = 100, term2_trust=None) -> Multi:
    """Z-Magic Algorithm 2 (CAGrad over all ordered pairs' dependent gradients).

    ``c`` is a leaf (may be traced or vmapped). ``cagrad_iters`` (used for 3+ conditions, i.e. 6+
    task gradients): 100 reaches float32 rounding on random task sets (max relative error 2.3e-7
    against 2000 iterations for 6 and 12 tasks) at a fifth of the cost of :func:`cagrad`'s
    default 500; raise it for ``c`` near 1 with nearly cancelling gradients. ``term2_trust``:
    ``None`` or ``c > 0``, each pair's term II capped at ``c max(|d_i|, |gh_ij|)`` (:class:`Dependent`).
    """
    conditions = check_conditions(conditions, "multi", minimum=2)
    if term2_trust is not None:
        check_scalar(term2_trust, "multi", "term2_trust", inclusive=False)
    check_scalar(c, "multi", "c")
    if rescale not in RESCALES:
        raise ValueError(f"multi: rescale must be one of {RESCALES}; got {rescale!r}.")
    if isinstance(cagrad_iters, bool) or not isinstance(cagrad_iters, int) or cagrad_iters < 1:
        raise ValueError(f"multi: cagrad_iters must be a positive int; got {cagrad_iters!r}.")
    return Multi(conditions, c, rescale, _check_xhat_time(xhat_time, "multi"), cagrad_iters,
                 term2_trust=term2_trust)


def _check_xhat_time(xhat_time, who):
    if xhat_time not in ("current", "next"):
        raise ValueError(f"{who}: xhat_time must be 'current' or 'next'; got {xhat_time!r}.")
    return xhat_time


def check_scheme(scheme, who: str):
    """Raise a clear error unless ``scheme`` satisfies the scheme contract; returns its conditions."""
    conditions = getattr(scheme, "conditions", None)
    if not callable(getattr(scheme, "direction", None)) or not isinstance(conditions, (tuple, list)):
        raise ValueError(f"{who}: scheme must carry .conditions (a tuple of Condition) and a method "
                         ".direction(x, ctx, noise, *, denoiser, sampler, detail) -> (eps, d, GuidanceInfo), as "
                         "zmagic_jax.none/independent/dependent/multi do; got "
                         f"{type(scheme).__name__}.")
    return check_conditions(conditions, who, minimum=0)


def direction(x, ctx, noise, *, scheme, denoiser, sampler, detail: bool = False, skip_inactive: bool = True):
    """Guidance of one step: ``(eps at x_t, displacement d, GuidanceInfo)``.

    Fills ``ctx.score_coef`` from ``sampler`` (so a context from
    :func:`~zmagic_jax.step_context` is enough), then runs ``scheme.direction``. With
    ``skip_inactive`` (default) steps on which no condition is active skip every gradient
    (``lax.cond`` on the grid-only activity predicate, so it stays a real branch under ``vmap``
    over samples). ``skip_inactive=False`` runs the scheme on every step (inactive rules give
    ``rho = 0``, so the step is the same): use it when every step is guided, because XLA:CPU
    runs a network's backward pass about 2x slower inside a conditional branch (the weights'
    layout changes for the backward convolutions are not shared with the rest of the program;
    measured in the note of ``experiments/README.md``). :func:`every_step_guided` tells.
    ``detail=True`` also computes the per-condition gradients and term II (:class:`GuidanceInfo`).
    """
    ctx = with_score_coef(ctx, sampler, x.dtype)
    conditions = tuple(scheme.conditions)

    def guided(x):
        return scheme.direction(x, ctx, noise, denoiser=denoiser, sampler=sampler, detail=detail)

    if not conditions:
        eps, d, info = guided(x)
    elif not skip_inactive:
        eps, d, info = guided(x)
        info = info._replace(guided=any_active(conditions, ctx))
    else:
        eps, d, info = jax.lax.cond(any_active(conditions, ctx), guided,
                                    lambda x: unguided(x, ctx, conditions=conditions, denoiser=denoiser,
                                                       detail=detail), x)
    # set here, after the branch, for every scheme (``scheme.direction`` leaves it None)
    return eps, d, info._replace(denoiser_finite=jnp.all(jnp.isfinite(eps)))


def every_step_guided(conditions, contexts) -> bool:
    """True if some condition is active at every step of ``contexts`` (stacked
    :class:`~zmagic_jax.StepContext`), so that skipping inactive steps can only cost time; False
    if not, or if the windows or the contexts are traced (unknown until run time)."""
    conditions = tuple(conditions)
    if not conditions or is_traced((conditions, contexts)):
        return False
    try:
        with jax.ensure_compile_time_eval():
            active = jax.vmap(lambda ctx: any_active(conditions, ctx))(contexts)
        return bool(jnp.all(active))
    except jax.errors.ConcretizationTypeError:
        return False
