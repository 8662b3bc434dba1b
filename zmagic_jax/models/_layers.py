"""Small layers the ported networks share."""
from __future__ import annotations

from typing import Any, NamedTuple

import flax.linen as nn
import jax.numpy as jnp


class Affine(nn.Module):
    """Per-channel ``y = x * scale + shift`` over the last axis: an eval-mode BatchNorm with its
    running statistics folded in (see ``batchnorm_affine`` in ``ports/_checkpoint.py``)."""

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
        shift = self.param("shift", nn.initializers.zeros, (c,), jnp.float32)
        return x * scale.astype(x.dtype) + shift.astype(x.dtype)


class PReLU(nn.Module):
    """Parametric ReLU with one slope per channel (last axis), as ``torch.nn.PReLU(C)``."""

    @nn.compact
    def __call__(self, x):
        alpha = self.param("alpha", nn.initializers.constant(0.25), (x.shape[-1],), jnp.float32)
        return jnp.where(x >= 0, x, alpha.astype(x.dtype) * x)


class Net(NamedTuple):
    """A network: its Flax ``module`` and ``params`` (as the ``load_*`` functions return them)."""

    module: Any
    params: Any
