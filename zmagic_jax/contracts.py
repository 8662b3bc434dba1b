"""The two function contracts of the library, each a function that carries its weights.

* :class:`Denoiser` ``(apply, params)``: ``apply(params, x_t, t) -> eps`` for ONE sample;
* :class:`Energy` ``(fn, params)``: ``fn(params, x0) -> scalar`` for ONE sample (a noise-aware
  energy: ``fn(params, x_t, alpha_bar)``).

The weights (and references: a target label, a prompt embedding, a style Gram matrix) travel as the
``params`` leaf, an argument of every compiled program: a sweep over checkpoints or references
compiles once and nothing is baked into the program as a constant (at Stable Diffusion size a
closed-over UNet makes XLA capture 3.4 GB of constants and fail to compile). The function is static
and compared by equality: pass the same function (a module-level function, or a
:func:`static_partial` of one with hashable arguments such as a Flax module) to reuse a program.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

from zmagic_jax._pytree import pytree_dataclass


class StaticPartial(NamedTuple):
    """``fn`` with its leading arguments fixed, compared by value: ``static_partial(f, m) ==
    static_partial(f, m)`` (``functools.partial`` compares by identity, so every new partial would
    compile a new program). ``args`` must be hashable (Flax modules, ints, strings, tuples)."""

    fn: Callable
    args: tuple

    def __call__(self, *more):
        return self.fn(*self.args, *more)


class Keyed:
    """A static argument compared by a hashable ``key`` instead of by value, for objects that
    cannot be hashed (e.g. a module holding lists): programs compiled for one object serve any
    other with the same key (give the architecture, e.g. the module's ``repr``)."""

    __slots__ = ("value", "key")

    def __init__(self, value, key):
        self.value, self.key = value, key

    def __hash__(self):
        return hash(self.key)

    def __eq__(self, other):
        return isinstance(other, Keyed) and other.key == self.key


def static_partial(fn: Callable, *args) -> StaticPartial:
    """``lambda *more: fn(*args, *more)`` as a hashable, comparable static function."""
    return StaticPartial(fn, tuple(args))


@pytree_dataclass(static=("apply",), eq=False)
class Denoiser:
    """A noise predictor: ``denoiser(x_t, t) = apply(params, x_t, t)`` for one sample ``x_t`` (no
    batch axis) and an integer timestep ``t`` (traced), returning ``eps`` of ``x_t``'s shape.
    Schemes ``vmap`` it over samples."""

    apply: Callable
    params: Any = None

    def __call__(self, x, t):
        return self.apply(self.params, x, t)


@pytree_dataclass(static=("fn",), eq=False)
class Energy:
    """An energy of one sample: ``energy(x0) = fn(params, x0) -> scalar`` (what the energy
    constructors of :mod:`zmagic_jax.energies` return; :func:`~zmagic_jax.condition` takes it), or
    for a noise-aware one ``energy(x_t, alpha_bar) = fn(params, x_t, alpha_bar)``."""

    fn: Callable
    params: Any = None

    def __call__(self, *args):
        return self.fn(self.params, *args)


def check_denoiser(denoiser, who: str) -> Denoiser:
    """Raise a clear error unless ``denoiser`` is a :class:`Denoiser` with a callable ``apply``."""
    if not isinstance(denoiser, Denoiser):
        hint = (" A plain eps_fn(x_t, t) closes over its weights; write apply(params, x_t, t) and pass "
                "Denoiser(apply, params).") if callable(denoiser) else ""
        raise ValueError(f"{who}: denoiser must be a zmagic_jax.Denoiser(apply, params); got "
                         f"{type(denoiser).__name__}.{hint}")
    if not callable(denoiser.apply):
        raise ValueError(f"{who}: Denoiser.apply must be callable as apply(params, x_t, t); got "
                         f"{type(denoiser.apply).__name__}.")
    return denoiser
