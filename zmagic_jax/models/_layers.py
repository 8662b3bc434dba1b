"""Small layers the ported networks share, and the convolution every model of the library uses."""
from __future__ import annotations

import functools
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1, precision=None,
                         preferred_element_type=None):
    """``jax.lax.conv_general_dilated`` with the same values and derivatives, whose input gradient
    is fast inside a ``lax.scan`` on XLA:CPU.

    JAX's transpose of a convolution with respect to its input is a convolution that reads the
    kernel with its feature dimensions swapped through the dimension numbers. Inside a rolled
    loop (every sampler's ``lax.scan``) XLA:CPU runs that form 14-28x slower than the same
    convolution outside a loop (measured on 3x3 stride-1 convolutions, 48 x 16 x 16 x 64; a
    guided canvas-model step: 1.93 s in the scan against 0.42 s unrolled). Here the tangent of
    the input is computed on an explicitly transposed kernel (``swapaxes``, a real array), so
    the transpose that reverse mode derives reads a kernel in the standard layout and stays on
    the fast path; the primal is the plain convolution, bit for bit, and forward mode, reverse
    mode and higher orders all work (a ``custom_jvp``; its rule is made of ordinary ops). The
    gradients equal ``lax``'s bit for bit in float64 (tested). Strided convolutions (no loop
    penalty measured) and batch groups go to ``lax`` unchanged.
    """
    kwargs = dict(window_strides=window_strides, padding=padding, lhs_dilation=lhs_dilation,
                  rhs_dilation=rhs_dilation, feature_group_count=feature_group_count,
                  batch_group_count=batch_group_count, precision=precision,
                  preferred_element_type=preferred_element_type)
    dn = jax.lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
    if batch_group_count != 1 or any(int(s) != 1 for s in window_strides):
        return jax.lax.conv_general_dilated(lhs, rhs, dimension_numbers=dn, **kwargs)
    out_dim, in_dim = dn.rhs_spec[0], dn.rhs_spec[1]
    swapped = jax.lax.ConvDimensionNumbers(dn.lhs_spec, (in_dim, out_dim) + tuple(dn.rhs_spec[2:]), dn.out_spec)

    @jax.custom_jvp
    def conv(x, k):
        return jax.lax.conv_general_dilated(x, k, dimension_numbers=dn, **kwargs)

    def _conv_jvp(primals, tangents):
        x, k = primals
        dx, dk = tangents
        out = conv(x, k)
        # symbolic zeros: a kernel that is not differentiated costs no convolution
        terms = []
        if not isinstance(dx, SymbolicZero):
            terms.append(jax.lax.conv_general_dilated(dx, jnp.swapaxes(k, out_dim, in_dim),
                                                      dimension_numbers=swapped, **kwargs))
        if not isinstance(dk, SymbolicZero):
            terms.append(jax.lax.conv_general_dilated(x, dk, dimension_numbers=dn, **kwargs))
        return out, functools.reduce(jnp.add, terms) if terms else jnp.zeros_like(out)

    conv.defjvp(_conv_jvp, symbolic_zeros=True)
    return conv(lhs, rhs)


# ``flax.linen.Conv`` computing with :func:`conv_general_dilated`: same parameters, same names.
Conv = functools.partial(nn.Conv, conv_general_dilated=conv_general_dilated)


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
