"""Layers Stable Diffusion's UNet and VAE share, as diffusers' PyTorch modules compute them.

Activations are channels-last: feature maps ``(B, H, W, C)``, token sequences ``(B, L, C)``.
Submodules carry diffusers' PyTorch attribute names (``norm1``, ``conv1``, ``time_emb_proj``,
``to_q``, ``to_out_0`` for ``to_out[0]``, ...), so the state-dict keys follow from the Flax
parameter paths (``zmagic_jax._state_dict.torch_key``).

``dtype`` is the compute dtype; parameters are always stored in float32 and cast for the
computation. Normalisation statistics and the attention softmax run in float32 whatever ``dtype``.
"""
from __future__ import annotations

from typing import Any, Optional

import flax.linen as nn
import jax.numpy as jnp

from zmagic_jax.models._attention import attention
from zmagic_jax.models._layers import Conv


def group_norm(groups: int, eps: float, dtype: Any, name: str) -> nn.GroupNorm:
    """``torch.nn.GroupNorm(groups, C, eps)`` over the last axis (groups of consecutive channels,
    as PyTorch's). Two-pass variance, as PyTorch's: ``E[x^2] - E[x]^2`` loses digits on large
    activations."""
    return nn.GroupNorm(num_groups=groups, epsilon=eps, use_fast_variance=False, dtype=dtype,
                        param_dtype=jnp.float32, name=name)


def conv(features: int, kernel: int, dtype: Any, name: str, *, stride: int = 1, padding=None) -> nn.Conv:
    """``torch.nn.Conv2d(., features, kernel, stride, padding)`` (default padding ``kernel // 2``)."""
    pad = kernel // 2 if padding is None else padding
    return Conv(features, (kernel, kernel), strides=(stride, stride),
                   padding=((pad, pad), (pad, pad)) if isinstance(pad, int) else pad,
                   dtype=dtype, param_dtype=jnp.float32, name=name)


def dense(features: int, dtype: Any, name: str, *, use_bias: bool = True) -> nn.Dense:
    return nn.Dense(features, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32, name=name)


class ResnetBlock2D(nn.Module):
    """diffusers' ``ResnetBlock2D`` (``time_embedding_norm="default"``, SiLU, inference):

    ``h = conv1(silu(norm1(x))) + time_emb_proj(silu(temb))``,
    ``out = (shortcut(x) + conv2(silu(norm2(h)))) / output_scale_factor``,

    the shortcut being a 1x1 ``conv_shortcut`` when the width changes. ``x`` ``(B, H, W, C_in)``,
    ``temb`` ``(B, T)`` or None (the VAE's blocks have no time embedding and no
    ``time_emb_proj``) -> ``(B, H, W, out_channels)``."""

    out_channels: int
    groups: int
    eps: float
    output_scale_factor: float = 1.0
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, temb=None):
        h = nn.silu(group_norm(self.groups, self.eps, self.dtype, "norm1")(x))
        h = conv(self.out_channels, 3, self.dtype, "conv1")(h)
        if temb is not None:
            h = h + dense(self.out_channels, self.dtype, "time_emb_proj")(nn.silu(temb))[:, None, None, :]
        h = nn.silu(group_norm(self.groups, self.eps, self.dtype, "norm2")(h))
        h = conv(self.out_channels, 3, self.dtype, "conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = conv(self.out_channels, 1, self.dtype, "conv_shortcut")(x)
        out = x + h
        # Skip the division by 1 (every SD network): it is exact anyway, but one op less.
        return out if self.output_scale_factor == 1 else out / self.output_scale_factor


class Downsample2D(nn.Module):
    """diffusers' ``Downsample2D`` with a convolution: a 3x3 stride-2 ``conv`` with symmetric
    zero padding ``padding``; ``padding=0`` (the VAE encoder) pads one row/column at the
    bottom/right only, as diffusers does. Halves ``(B, H, W, C)``."""

    padding: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        pad = ((0, 1), (0, 1)) if self.padding == 0 else self.padding
        return conv(x.shape[-1], 3, self.dtype, "conv", stride=2, padding=pad)(x)


class Upsample2D(nn.Module):
    """diffusers' ``Upsample2D`` with a convolution: nearest-neighbour 2x (``F.interpolate(...,
    scale_factor=2, mode="nearest")``) then a 3x3 ``conv``. Doubles ``(B, H, W, C)``."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        b, h, w, c = x.shape
        x = jnp.broadcast_to(x[:, :, None, :, None, :], (b, h, 2, w, 2, c)).reshape(b, 2 * h, 2 * w, c)
        return conv(c, 3, self.dtype, "conv")(x)


class Attention(nn.Module):
    """diffusers' ``Attention`` with its default processor: ``to_out_0(attn(to_q(x), to_k(c),
    to_v(c)))`` with ``heads`` heads of ``head_dim`` channels, ``c = context`` (cross-attention)
    or ``x`` (self-attention), through :func:`~zmagic_jax.models._attention.attention` (scale
    ``1/sqrt(head_dim)``, softmax in float32).

    ``x`` is ``(B, L, C)``, or with ``norm_groups`` set (the VAE's mid-block attention,
    ``group_norm`` + residual connection) ``(B, H, W, C)`` with ``out = x + attn(group_norm(x))``
    over the ``H W`` positions. ``modifier`` (broadcastable to ``(B, heads, Lq, Lk)``, or a callable
    of the scores returning one) is added to the scores. With ``record`` the probabilities ``(B, heads, Lq, Lk)`` are sown into the
    ``"attention"`` collection under the name ``layer`` (nothing is computed or stored otherwise).
    """

    heads: int
    head_dim: int
    layer: str
    qkv_bias: bool = False
    record: bool = False
    query_chunk: Optional[int] = None
    norm_groups: Optional[int] = None
    norm_eps: float = 1e-6
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, context=None, modifier=None):
        residual = x
        if self.norm_groups is not None:
            x = group_norm(self.norm_groups, self.norm_eps, self.dtype, "group_norm")(x)
            x = x.reshape(x.shape[0], -1, x.shape[-1])
        source = x if context is None else context
        inner = self.heads * self.head_dim
        b, lq, lk = x.shape[0], x.shape[1], source.shape[1]
        q = dense(inner, self.dtype, "to_q", use_bias=self.qkv_bias)(x).reshape(b, lq, self.heads, self.head_dim)
        k = dense(inner, self.dtype, "to_k", use_bias=self.qkv_bias)(source).reshape(b, lk, self.heads, self.head_dim)
        v = dense(inner, self.dtype, "to_v", use_bias=self.qkv_bias)(source).reshape(b, lk, self.heads, self.head_dim)
        if self.record:
            out, probs = attention(q, k, v, modifier=modifier, return_probs=True)
            self.sow("attention", self.layer, probs)
        else:
            out = attention(q, k, v, modifier=modifier, query_chunk=self.query_chunk)
        out = dense(residual.shape[-1], self.dtype, "to_out_0")(out.reshape(b, lq, inner))
        if self.norm_groups is not None:
            out = residual + out.reshape(residual.shape)
        return out
