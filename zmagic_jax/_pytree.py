"""Frozen dataclasses registered as pytrees: numbers are leaves, functions and names are static.

The library's data objects (denoisers, samplers, step rules, conditions, schemes) mix functions,
which must be static so that ``jit`` can compare them, with numbers and weights, which must be
leaves so that ``jit`` traces them (one compiled program serves every value), ``grad`` reaches
them and ``vmap`` maps over them. Two objects with equal static fields and leaves of the same
shapes share one compiled program.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import numpy as np


def pytree_dataclass(cls=None, *, static: Sequence[str] = (), eq: bool = True):
    """Make ``cls`` a frozen dataclass and a pytree whose fields ``static`` are metadata (compared
    by equality, so they must be hashable) and every other field a child. Adds ``replace``.
    ``eq=False`` keeps identity equality and hashing (for callable objects such as a
    :class:`~zmagic_jax.Denoiser`, so that ``jax.jit(denoiser)`` can hash it)."""
    def wrap(cls):
        cls = dataclasses.dataclass(frozen=True, eq=eq)(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        unknown = set(static) - set(names)
        if unknown:
            raise TypeError(f"pytree_dataclass({cls.__name__}): static names {sorted(unknown)} are not fields.")
        jax.tree_util.register_dataclass(cls, data_fields=[n for n in names if n not in static],
                                         meta_fields=list(static))
        cls.replace = lambda self, **changes: dataclasses.replace(self, **changes)
        return cls
    return wrap if cls is None else wrap(cls)


def is_traced(value) -> bool:
    """True if ``value`` (or any leaf of it) is a tracer: its number is only known at run time."""
    return any(isinstance(leaf, jax.core.Tracer) for leaf in jax.tree_util.tree_leaves(value))


def concrete(value):
    """``value`` as a numpy array, or ``None`` when it is traced (checks then happen at run time)."""
    return None if is_traced(value) else np.asarray(value)


def check_scalar(value, who: str, name: str, *, minimum: float = 0.0, inclusive: bool = True):
    """Raise unless ``value`` is a finite real scalar ``>= minimum`` (``> minimum`` if not
    ``inclusive``); traced values pass (they are checked by the caller's own code or not at all)."""
    if isinstance(value, bool):
        raise ValueError(f"{who}: {name} must be a number; got {value!r}.")
    number = concrete(value)
    if number is None:
        return
    if number.shape != () or not np.issubdtype(number.dtype, np.number) or np.iscomplexobj(number):
        raise ValueError(f"{who}: {name} must be a real scalar; got {value!r}.")
    ok = np.isfinite(number) and (number >= minimum if inclusive else number > minimum)
    if not ok:
        relation = ">=" if inclusive else ">"
        raise ValueError(f"{who}: {name} must be a finite number {relation} {minimum:g}; got {value!r}.")
