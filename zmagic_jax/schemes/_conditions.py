"""Conditions and the shared work of every scheme: energies at ``x0|t`` and their gradients at ``x_t``."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp

from zmagic_jax._pytree import pytree_dataclass
from zmagic_jax.contracts import Energy
from zmagic_jax.schedules import x0_from_eps
from zmagic_jax.step_rules import StepRule


@pytree_dataclass(static=("name", "energy", "noise_aware"))
class Condition:
    """One attribute to guide toward.

    Attributes:
      name: used in reports and error messages (static).
      energy: ``energy(params, x0) -> scalar`` for one sample, the condition's loss at Tweedie's
        estimate ``x0|t`` (FreeDoM; gradients flow through the denoiser). With ``noise_aware=True``
        it is ``energy(params, x_t, alpha_bar_t) -> scalar`` instead, e.g. an exact
        ``-log p(c | x_t)`` or a noise-conditional classifier, and no denoiser is differentiated
        for it. Static: reuse the same function to reuse a compiled program.
      rule: the :class:`~zmagic_jax.step_rules.StepRule` turning its gradient into a displacement
        (a pytree: its numbers are leaves).
      params: what the energy needs besides ``x0`` (network weights, a target label, a reference
        embedding), as a pytree of arrays: arguments of the compiled program, never constants.
    """

    name: str
    energy: Callable
    rule: StepRule
    params: Any = None
    noise_aware: bool = False

    def value(self, x, x0, alpha_bar):
        """The energy of this condition at ``x0`` (or at ``x_t = x`` if noise-aware)."""
        return self.energy(self.params, x, alpha_bar) if self.noise_aware else self.energy(self.params, x0)


def condition(name: str, energy, rule: StepRule, params: Any = None, noise_aware: bool = False) -> Condition:
    """Validated constructor of :class:`Condition`: ``energy`` is an :class:`~zmagic_jax.Energy`
    (as the constructors of :mod:`zmagic_jax.energies` return, carrying its params) or a function
    ``energy(params, x0) -> scalar`` with its ``params`` given here."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"condition: name must be a non-empty string; got {name!r}.")
    if isinstance(energy, Energy):
        if params is not None:
            raise ValueError(f"condition {name!r}: an Energy carries its own params; do not pass params too.")
        energy, params = energy.fn, energy.params
    if not callable(energy):
        raise ValueError(f"condition {name!r}: energy must be callable as energy(params, x0); "
                         f"got {type(energy).__name__}.")
    if not isinstance(rule, StepRule):
        raise ValueError(f"condition {name!r}: rule must be a StepRule (freedom_rule, norm_relative_rule, "
                         f"score_rule, cfg_relative_rule, schedule_rule); got {type(rule).__name__}.")
    return Condition(name, energy, rule, params, bool(noise_aware))


def check_conditions(conditions: Sequence[Condition], who: str, minimum: int = 1) -> tuple:
    conditions = tuple(conditions)
    if len(conditions) < minimum:
        raise ValueError(f"{who}: needs at least {minimum} condition(s); got {len(conditions)}. "
                         "Build them with zmagic_jax.condition(name, energy, rule, params).")
    for c in conditions:
        if not isinstance(c, Condition):
            raise ValueError(f"{who}: every condition must be a Condition; got {type(c).__name__}.")
    names = [c.name for c in conditions]
    if len(set(names)) != len(names):
        raise ValueError(f"{who}: condition names must be unique; got {names}.")
    return conditions


def energy_vector(conditions, denoiser, t, alpha_bar_t):
    """``x_t -> (energies (n,), eps)``: one denoiser call, every energy at ``x0|t(x_t)``."""
    def f(x):
        eps = denoiser(x, t)
        x0 = x0_from_eps(x, eps, alpha_bar_t)
        values = [c.value(x, x0, alpha_bar_t) for c in conditions]
        return jnp.stack([jnp.asarray(v, x.dtype) for v in values]), eps
    return f


def _value_and_grad(c: Condition, x, x0, alpha_bar_t):
    """``(E, dE/d input)`` of one condition: its input is ``x0`` (or ``x_t`` if noise-aware)."""
    if c.noise_aware:
        return jax.value_and_grad(lambda y: jnp.asarray(c.value(y, None, alpha_bar_t), x.dtype))(x)
    return jax.value_and_grad(lambda y: jnp.asarray(c.value(None, y, alpha_bar_t), x.dtype))(x0)


def energies_and_grads(x, t, alpha_bar_t, *, conditions, denoiser, rows):
    """Energies of all conditions and ``grad_{x_t} E_i`` for ``i in rows`` (a static tuple, or a
    traced index array). Returns ``(energies (n,), grads (len(rows), *x.shape), eps)``.

    One denoiser forward pass; each requested energy is differentiated on its own with respect to
    ``x0`` (so a non-finite energy cannot poison another condition's gradient, and no energy's
    backward pass is run for another's row), then one batched pullback through the denoiser:
    ``grad_x E = (v - sqrt(1 - ab) J_eps^T v) / sqrt(ab)`` with ``v = dE/dx0`` (Tweedie's map);
    noise-aware energies are differentiated with respect to ``x_t`` directly.
    """
    eps, pull_eps = jax.vjp(lambda y: denoiser(y, t), x)
    x0 = x0_from_eps(x, eps, alpha_bar_t)
    n = len(conditions)
    static_rows = not isinstance(rows, jax.Array) and all(isinstance(r, int) for r in rows)
    # traced rows (a vmapped leader): every energy's gradient is computed, the rows are picked
    needed = tuple(rows) if static_rows else tuple(range(n))
    pairs = {i: _value_and_grad(conditions[i], x, x0, alpha_bar_t) for i in needed}
    values = [pairs[i][0] if i in pairs else jnp.asarray(conditions[i].value(x, x0, alpha_bar_t), x.dtype)
              for i in range(n)]
    aware = jnp.asarray([c.noise_aware for c in conditions])
    if static_rows:
        inputs = jnp.stack([pairs[i][1] for i in rows])
        aware = aware[jnp.asarray(rows, int)]
    else:
        inputs = jnp.stack([pairs[i][1] for i in range(n)])[rows]
        aware = aware[rows]
    energies = jnp.stack(values) if values else jnp.zeros((0,), x.dtype)
    if all(c.noise_aware for c in conditions):
        return energies, inputs, eps
    (through_eps,) = jax.vmap(pull_eps)(inputs)
    root = jnp.sqrt(alpha_bar_t)
    tweedie = (inputs - jnp.sqrt(1.0 - alpha_bar_t) * through_eps) / root
    shape = (-1,) + (1,) * x.ndim
    return energies, jnp.where(aware.reshape(shape), inputs, tweedie), eps


def rho_of(conditions, index, ctx, eps, grad, x):
    """Step size of condition ``index`` (may be traced) for ``grad`` taken at ``x``, zero where it
    is inactive. Differentiable in everything (see :mod:`zmagic_jax.step_rules` for why no
    ``stop_gradient`` is needed)."""
    def one(c):
        return jnp.asarray(c.rule.rho(ctx, eps, grad, x), grad.dtype) * c.rule.active(ctx).astype(grad.dtype)

    if isinstance(index, int):  # a static index evaluates one rule (a rule may run a network)
        return one(conditions[index])
    return jnp.stack([one(c) for c in conditions])[index]


def any_active(conditions, ctx):
    return jnp.any(jnp.stack([c.rule.active(ctx) for c in conditions]))
