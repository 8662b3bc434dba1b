"""Small numerical helpers shared by the samplers and CAGrad."""
from __future__ import annotations

import jax.numpy as jnp


def safe_sqrt(x):
    """``sqrt(max(x, 0))`` with a finite derivative everywhere (0 where ``x <= 0``): ``jax.grad``
    through it (e.g. with respect to DDIM's ``eta`` on a step that lands on clean data, or
    through CAGrad) never meets ``inf * 0``."""
    positive = x > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1)), 0)
