"""Conditions and the shared work of every scheme: energies at ``x0|t`` and their gradients at ``x_t``."""
from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp

from zmagic_jax.schedules import x0_from_eps
from zmagic_jax.step_rules import StepRule


class Condition(NamedTuple):
    """One attribute to guide toward.

    Attributes:
      name: used in reports and error messages.
      energy: ``energy(x0) -> scalar`` for one sample, the condition's loss at Tweedie's estimate
        ``x0|t`` (FreeDoM; gradients flow through the denoiser). With ``noise_aware=True`` it is
        ``energy(x_t, alpha_bar_t) -> scalar`` instead, e.g. an exact ``-log p(c | x_t)`` or a
        noise-conditional classifier, and no denoiser is differentiated for it.
      rule: the :class:`~zmagic_jax.step_rules.StepRule` turning its gradient into a displacement.
    """

    name: str
    energy: Callable
    rule: StepRule
    noise_aware: bool = False


def condition(name: str, energy: Callable, rule: StepRule, noise_aware: bool = False) -> Condition:
    """Validated constructor of :class:`Condition`."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"condition: name must be a non-empty string; got {name!r}.")
    if not callable(energy):
        raise ValueError(f"condition {name!r}: energy must be callable; got {type(energy).__name__}.")
    if not isinstance(rule, StepRule):
        raise ValueError(f"condition {name!r}: rule must be a StepRule (freedom_rule, norm_relative_rule, "
                         f"score_rule, schedule_rule); got {type(rule).__name__}.")
    return Condition(name, energy, rule, bool(noise_aware))


def check_conditions(conditions: Sequence[Condition], who: str, minimum: int = 1) -> tuple:
    conditions = tuple(conditions)
    if len(conditions) < minimum:
        raise ValueError(f"{who}: needs at least {minimum} condition(s); got {len(conditions)}. "
                         "Build them with zmagic_jax.condition(name, energy, rule).")
    for c in conditions:
        if not isinstance(c, Condition):
            raise ValueError(f"{who}: every condition must be a Condition; got {type(c).__name__}.")
    names = [c.name for c in conditions]
    if len(set(names)) != len(names):
        raise ValueError(f"{who}: condition names must be unique; got {names}.")
    return conditions


def energy_vector(conditions, eps_fn, t, alpha_bar_t):
    """``x_t -> (energies (n,), eps)``: one denoiser call, every energy at ``x0|t(x_t)``."""
    def f(x):
        eps = eps_fn(x, t)
        x0 = x0_from_eps(x, eps, alpha_bar_t)
        values = [c.energy(x, alpha_bar_t) if c.noise_aware else c.energy(x0) for c in conditions]
        return jnp.stack([jnp.asarray(v, x.dtype) for v in values]), eps
    return f


def energies_and_grads(conditions, eps_fn, x, t, alpha_bar_t, rows):
    """Energies of all conditions and ``grad_{x_t} E_i`` for ``i in rows`` (rows may be traced).

    The denoiser forward pass is shared; one pullback per requested gradient, vmapped.
    Returns ``(energies (n,), grads (len(rows), *x.shape), eps)``.
    """
    values, pullback, eps = jax.vjp(energy_vector(conditions, eps_fn, t, alpha_bar_t), x, has_aux=True)
    basis = jnp.eye(len(conditions), dtype=values.dtype)[jnp.asarray(rows)]
    (grads,) = jax.vmap(pullback)(basis)
    return values, grads, eps


def rho_of(conditions, index, ctx, eps, grad, x):
    """Step size of condition ``index`` (may be traced) for ``grad`` taken at ``x``, zero where it
    is inactive.

    Constant for differentiation: ``stop_gradient``, as every step rule prescribes.
    """
    def one(c):
        return jnp.asarray(c.rule.rho(ctx, eps, grad, x), grad.dtype) * c.rule.active(ctx).astype(grad.dtype)

    if isinstance(index, int):  # a static index evaluates one rule (a rule may run a network)
        return jax.lax.stop_gradient(one(conditions[index]))
    return jax.lax.stop_gradient(jnp.stack([one(c) for c in conditions])[index])


def any_active(conditions, ctx):
    return jnp.any(jnp.stack([c.rule.active(ctx) for c in conditions]))
