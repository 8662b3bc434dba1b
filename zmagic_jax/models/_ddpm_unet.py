"""The pixel-space DDPM UNet of Ho et al. (2020) in the ermongroup/ddim ``Model`` layout.

This is the CelebA-HQ 256x256 noise predictor SDEdit published (``celeba_hq.ckpt``) and FreeDoM's
face experiments guide. The network maps a noisy image ``x_t`` and the raw timestep ``t`` (0..999)
to ``eps_theta(x_t, t)``:

* ``temb = W2 swish(W1 e(t))`` with the sinusoidal embedding
  ``e(t) = [sin(t w), cos(t w)]``, ``w_k = exp(-log(10000) k / (ch/2 - 1))``, ``k < ch/2``;
* a down path of ``len(ch_mult)`` levels of ``num_res_blocks`` residual blocks (self-attention
  after each block at the ``attn_resolutions``), halving the size between levels; a middle
  block-attention-block; an up path of ``num_res_blocks + 1`` blocks per level that each
  concatenate one skip activation of the down path, doubling the size between levels;
* GroupNorm (``norm_groups`` groups, eps ``norm_eps``) and swish throughout, dropout omitted
  (inference).

Images are NHWC. Parameters live outside the module (``module.apply({"params": params}, x, t)``);
``load_ddpm_unet`` (the converters, one layer up: ``ports/_ddpm_unet.py``) converts the published
PyTorch weights.
"""
from __future__ import annotations

import dataclasses
import math

import flax.linen as nn
import jax.numpy as jnp

from zmagic_jax.contracts import Denoiser, static_partial
from zmagic_jax.models._layers import Conv


@dataclasses.dataclass(frozen=True)
class DDPMUNetConfig:
    """Architecture of the UNet; the defaults are SDEdit's CelebA-HQ 256 model."""

    ch: int = 128
    out_ch: int = 3
    ch_mult: tuple = (1, 1, 2, 2, 4, 4)
    num_res_blocks: int = 2
    attn_resolutions: tuple = (16,)
    in_channels: int = 3
    resolution: int = 256
    norm_groups: int = 32
    norm_eps: float = 1e-6
    resamp_with_conv: bool = True

    def __post_init__(self):
        object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
        object.__setattr__(self, "attn_resolutions", tuple(int(r) for r in self.attn_resolutions))
        if self.ch < 4 or self.ch % 2:
            raise ValueError(f"DDPMUNetConfig: ch must be even and >= 4 (the timestep embedding has "
                             f"ch/2 - 1 > 0 frequencies); got ch={self.ch}.")
        if not self.ch_mult or self.num_res_blocks < 1:
            raise ValueError(f"DDPMUNetConfig: need at least one level and one res block; got "
                             f"ch_mult={self.ch_mult}, num_res_blocks={self.num_res_blocks}.")
        bad = [self.ch * m for m in (1,) + self.ch_mult if (self.ch * m) % self.norm_groups]
        if bad:
            raise ValueError(f"DDPMUNetConfig: norm_groups={self.norm_groups} must divide every width "
                             f"ch * mult; it does not divide {bad}.")
        if self.resolution % 2 ** (len(self.ch_mult) - 1):
            raise ValueError(f"DDPMUNetConfig: resolution {self.resolution} must be divisible by "
                             f"2**(len(ch_mult) - 1) = {2 ** (len(self.ch_mult) - 1)}.")

    def level_resolutions(self) -> tuple:
        """Feature-map size at each level of the down path."""
        return tuple(self.resolution // 2 ** i for i in range(len(self.ch_mult)))


DDPM_CELEBA_HQ = DDPMUNetConfig()


def timestep_embedding(t, dim: int):
    """Sinusoidal embedding ``[sin(t w), cos(t w)]`` of timesteps ``t`` ``(B,)``, ``(B, dim)``, with
    ``w_k = exp(-log(10000) k / (dim/2 - 1))`` (the DDPM/fairseq variant: the last frequency is
    exactly 1/10000)."""
    half = dim // 2
    freqs = jnp.exp(jnp.arange(half, dtype=jnp.float32) * (-math.log(10000.0) / (half - 1)))
    angles = jnp.asarray(t, jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=1)


def _norm(config: DDPMUNetConfig, name: str) -> nn.GroupNorm:
    # Two-pass variance, as PyTorch's GroupNorm: E[x^2] - E[x]^2 loses digits on large activations.
    return nn.GroupNorm(num_groups=config.norm_groups, epsilon=config.norm_eps,
                        use_fast_variance=False, name=name)


class _ResnetBlock(nn.Module):
    """``x' = shortcut(x) + conv2(swish(norm2(conv1(swish(norm1(x))) + temb_proj(swish(temb)))))``;
    the shortcut is a 1x1 conv (``nin_shortcut``) when the width changes."""

    config: DDPMUNetConfig
    out_channels: int

    @nn.compact
    def __call__(self, x, temb):
        h = nn.swish(_norm(self.config, "norm1")(x))
        h = Conv(self.out_channels, (3, 3), padding=1, name="conv1")(h)
        h = h + nn.Dense(self.out_channels, name="temb_proj")(nn.swish(temb))[:, None, None, :]
        h = nn.swish(_norm(self.config, "norm2")(h))
        h = Conv(self.out_channels, (3, 3), padding=1, name="conv2")(h)
        if x.shape[-1] != self.out_channels:
            x = Conv(self.out_channels, (1, 1), name="nin_shortcut")(x)
        return x + h


class _AttnBlock(nn.Module):
    """Single-head self-attention over all positions, ``softmax(q k^T / sqrt(C)) v``, with 1x1-conv
    projections and a residual connection."""

    config: DDPMUNetConfig

    @nn.compact
    def __call__(self, x):
        b, hgt, wid, c = x.shape
        h = _norm(self.config, "norm")(x)
        q, k, v = (Conv(c, (1, 1), name=n)(h).reshape(b, hgt * wid, c) for n in ("q", "k", "v"))
        weights = nn.softmax(jnp.einsum("bic,bjc->bij", q, k) * c ** -0.5, axis=-1)
        h = jnp.einsum("bij,bjc->bic", weights, v).reshape(b, hgt, wid, c)
        return x + Conv(c, (1, 1), name="proj_out")(h)


class _Downsample(nn.Module):
    """Halve the size: zero-pad bottom/right by one, then a 3x3 stride-2 conv (or 2x2 average pool)."""

    with_conv: bool

    @nn.compact
    def __call__(self, x):
        if not self.with_conv:
            return nn.avg_pool(x, (2, 2), strides=(2, 2))
        x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
        return Conv(x.shape[-1], (3, 3), strides=(2, 2), padding="VALID", name="conv")(x)


class _Upsample(nn.Module):
    """Double the size by nearest-neighbour repetition, then a 3x3 conv (if ``with_conv``)."""

    with_conv: bool

    @nn.compact
    def __call__(self, x):
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        if self.with_conv:
            x = Conv(x.shape[-1], (3, 3), padding=1, name="conv")(x)
        return x


class DDPMUNet(nn.Module):
    """``eps_theta(x, t)``: ``x`` ``(B, H, W, in_channels)`` with ``H = W = resolution``, ``t``
    ``(B,)`` or a scalar (shared by the batch), raw timesteps as ints or floats. Returns
    ``(B, H, W, out_ch)``.

    Submodule names follow the PyTorch keys with ``.`` as ``_``: ``down_{i}_block_{j}``,
    ``down_{i}_attn_{j}``, ``down_{i}_downsample``, ``mid_block_1``, ``mid_attn_1``,
    ``mid_block_2``, ``up_{i}_block_{j}``, ``up_{i}_attn_{j}``, ``up_{i}_upsample``,
    ``temb_dense_0/1``, ``conv_in``, ``norm_out``, ``conv_out``.
    """

    config: DDPMUNetConfig = DDPM_CELEBA_HQ

    @nn.compact
    def __call__(self, x, t):
        cfg = self.config
        x = jnp.asarray(x)
        expected = (cfg.resolution, cfg.resolution, cfg.in_channels)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"DDPMUNet: expected x of shape (B, {', '.join(map(str, expected))}) "
                             f"(NHWC); got {tuple(x.shape)}.")
        t = jnp.asarray(t)
        if t.ndim == 0:
            t = jnp.broadcast_to(t, (x.shape[0],))
        if t.shape != (x.shape[0],):
            raise ValueError(f"DDPMUNet: t must be a scalar or have shape ({x.shape[0]},); got {t.shape}.")

        temb = nn.Dense(4 * cfg.ch, name="temb_dense_0")(timestep_embedding(t, cfg.ch))
        temb = nn.Dense(4 * cfg.ch, name="temb_dense_1")(nn.swish(temb))

        levels = len(cfg.ch_mult)
        sizes = cfg.level_resolutions()
        hs = [Conv(cfg.ch, (3, 3), padding=1, name="conv_in")(x)]
        for i in range(levels):
            for j in range(cfg.num_res_blocks):
                h = _ResnetBlock(cfg, cfg.ch * cfg.ch_mult[i], name=f"down_{i}_block_{j}")(hs[-1], temb)
                if sizes[i] in cfg.attn_resolutions:
                    h = _AttnBlock(cfg, name=f"down_{i}_attn_{j}")(h)
                hs.append(h)
            if i != levels - 1:
                hs.append(_Downsample(cfg.resamp_with_conv, name=f"down_{i}_downsample")(hs[-1]))

        h = hs[-1]
        h = _ResnetBlock(cfg, h.shape[-1], name="mid_block_1")(h, temb)
        h = _AttnBlock(cfg, name="mid_attn_1")(h)
        h = _ResnetBlock(cfg, h.shape[-1], name="mid_block_2")(h, temb)

        for i in reversed(range(levels)):
            for j in range(cfg.num_res_blocks + 1):
                h = jnp.concatenate([h, hs.pop()], axis=-1)
                h = _ResnetBlock(cfg, cfg.ch * cfg.ch_mult[i], name=f"up_{i}_block_{j}")(h, temb)
                if sizes[i] in cfg.attn_resolutions:
                    h = _AttnBlock(cfg, name=f"up_{i}_attn_{j}")(h)
            if i != 0:
                h = _Upsample(cfg.resamp_with_conv, name=f"up_{i}_upsample")(h)

        h = nn.swish(_norm(cfg, "norm_out")(h))
        return Conv(cfg.out_ch, (3, 3), padding=1, name="conv_out")(h)


def _ddpm_eps(module: DDPMUNet, params, x, t):
    return module.apply({"params": params}, x[None], t)[0]


def ddpm_denoiser(module: DDPMUNet, params) -> Denoiser:
    """The UNet as a :class:`~zmagic_jax.Denoiser`: ``denoiser(x, t)`` for ONE sample ``x``
    ``(H, W, C)`` and a scalar timestep ``t`` (raw, 0..999, traced) returns ``eps_theta(x, t)``
    ``(H, W, C)``; schemes ``vmap`` it over samples. ``params`` is the tree returned by
    ``load_ddpm_unet`` (without the ``{"params": ...}`` wrapper); the module is static, so every
    checkpoint of one architecture shares a compiled program."""
    return Denoiser(static_partial(_ddpm_eps, module), params)
