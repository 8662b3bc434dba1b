"""Stable Diffusion's VAE (diffusers ``AutoencoderKL``) in Flax: encoder and decoder.

* ``Encoder``: ``conv_in``; per level ``layers_per_block`` ResNet blocks (no time embedding) and a
  stride-2 conv (padded bottom/right) between levels; a middle block ResNet-attention-ResNet
  (single-head self-attention over all positions, with a GroupNorm and a residual);
  ``GroupNorm``, SiLU, ``conv_out`` to ``2 * latent_channels`` moments.
* ``quant_conv`` (1x1) on the moments, split into the mean and log-variance of the diagonal
  Gaussian posterior, the log-variance clamped to ``[-30, 20]`` as diffusers does.
* ``post_quant_conv`` (1x1) on a latent, then the ``Decoder``: ``conv_in``; the middle block;
  per level (widths reversed) ``layers_per_block + 1`` ResNet blocks and a nearest 2x upsampling
  + conv between levels; ``GroupNorm``, SiLU, ``conv_out``.

All GroupNorms have eps 1e-6. Images ``(B, H, W, in_channels)`` in ``[-1, 1]`` and latents
``(B, H/f, W/f, latent_channels)``, ``f = 2**(len(block_out_channels) - 1)``, are channels
last. ``decode`` takes the latent of the autoencoder itself: the pipeline's scaled latent
``scaling_factor * z`` must be divided by ``config.scaling_factor`` first (diffusers' pipelines do
the same). Submodules are named as diffusers' PyTorch modules (``encoder`` > ``down_blocks_0`` >
``resnets_0`` > ``conv1``; ``decoder`` > ``mid_block`` > ``attentions_0`` > ``to_q``).
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from zmagic_jax.models._diffusers_config import config_from_diffusers
from zmagic_jax.models._layers import Conv
from zmagic_jax.models._sd_layers import Attention, Downsample2D, ResnetBlock2D, Upsample2D, conv, group_norm

_EPS = 1e-6  # diffusers hard-codes the VAE's normalisation eps


@dataclasses.dataclass(frozen=True)
class AutoencoderKLConfig:
    """Architecture of the VAE, in diffusers' option names; defaults are diffusers' defaults
    (``scaling_factor`` is SD 1.x/2.x's 0.18215; it is not used by the network itself)."""

    in_channels: int = 3
    out_channels: int = 3
    down_block_types: tuple = ("DownEncoderBlock2D",)
    up_block_types: tuple = ("UpDecoderBlock2D",)
    block_out_channels: tuple = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    scaling_factor: float = 0.18215
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self):
        object.__setattr__(self, "block_out_channels", tuple(self.block_out_channels))
        object.__setattr__(self, "down_block_types", tuple(self.down_block_types))
        object.__setattr__(self, "up_block_types", tuple(self.up_block_types))
        object.__setattr__(self, "scaling_factor", float(self.scaling_factor))
        n = len(self.block_out_channels)
        if n == 0 or not all(isinstance(c, int) and c > 0 for c in self.block_out_channels):
            raise ValueError(f"AutoencoderKLConfig: block_out_channels must be a non-empty list of positive ints; "
                             f"got {self.block_out_channels!r}.")
        for name, types, supported in (("down_block_types", self.down_block_types, "DownEncoderBlock2D"),
                                       ("up_block_types", self.up_block_types, "UpDecoderBlock2D")):
            if len(types) != n:
                raise ValueError(f"AutoencoderKLConfig: {name} needs one entry per block_out_channels ({n}); "
                                 f"got {types!r}.")
            for t in types:
                if t != supported:
                    raise ValueError(f"AutoencoderKLConfig: {name} contains {t!r}, which is not supported "
                                     f"(supported: {supported}).")
        for name in ("in_channels", "out_channels", "layers_per_block", "latent_channels", "norm_num_groups"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"AutoencoderKLConfig: {name} must be a positive int; got {value!r}.")
        bad = sorted({c for c in self.block_out_channels if c % self.norm_num_groups})
        if bad:
            raise ValueError(f"AutoencoderKLConfig: norm_num_groups={self.norm_num_groups} must divide every "
                             f"block_out_channels; it does not divide {bad}.")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)


_VAE_REQUIRED = {
    "act_fn": ("silu", "swish"),
    # Latent normalisations of later VAEs (SD3, Flux, SDXL-style latents_mean/std): a pipeline
    # applies them around the network; code that knows only scaling_factor would mis-scale them.
    "shift_factor": (None,),
    "latents_mean": (None,),
    "latents_std": (None,),
}

def vae_config_from_dict(config: dict, *, file: str) -> AutoencoderKLConfig:
    """The :class:`AutoencoderKLConfig` of a diffusers ``vae/config.json`` (read by the caller).
    Options this module does not compute (another ``act_fn``, a ``shift_factor``,
    ``latents_mean``/``latents_std``, other block types) raise ``ValueError`` naming ``file``,
    the key, its value and what is supported; ``sample_size``, ``force_upcast`` and underscore
    keys are accepted without effect."""
    return config_from_diffusers(AutoencoderKLConfig, config, file=file, component="AutoencoderKL",
                                 required=_VAE_REQUIRED)


class _MidBlock(nn.Module):
    """diffusers' ``UNetMidBlock2D`` without time embedding: ResNet, single-head self-attention
    (named ``{prefix}.attentions.0``), ResNet."""

    config: AutoencoderKLConfig
    prefix: str
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        cfg, c = self.config, x.shape[-1]
        x = ResnetBlock2D(c, cfg.norm_num_groups, _EPS, dtype=self.dtype, name="resnets_0")(x)
        if cfg.mid_block_add_attention:
            x = Attention(1, c, f"{self.prefix}.attentions.0", qkv_bias=True, norm_groups=cfg.norm_num_groups,
                          norm_eps=_EPS, dtype=self.dtype, name="attentions_0")(x)
        return ResnetBlock2D(c, cfg.norm_num_groups, _EPS, dtype=self.dtype, name="resnets_1")(x)


class _DownEncoderBlock2D(nn.Module):
    out_channels: int
    layers: int
    groups: int
    downsample: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        for j in range(self.layers):
            x = ResnetBlock2D(self.out_channels, self.groups, _EPS, dtype=self.dtype, name=f"resnets_{j}")(x)
        if self.downsample:
            x = Downsample2D(0, self.dtype, name="downsamplers_0")(x)
        return x


class _UpDecoderBlock2D(nn.Module):
    out_channels: int
    layers: int
    groups: int
    upsample: bool
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        for j in range(self.layers):
            x = ResnetBlock2D(self.out_channels, self.groups, _EPS, dtype=self.dtype, name=f"resnets_{j}")(x)
        if self.upsample:
            x = Upsample2D(self.dtype, name="upsamplers_0")(x)
        return x


def _maybe_remat(remat: bool):
    return nn.remat if remat else (lambda cls: cls)


class Encoder(nn.Module):
    """Image ``(B, H, W, in_channels)`` -> moments ``(B, H/f, W/f, 2 * latent_channels)`` (before
    ``quant_conv``). ``remat`` recomputes each block in the backward pass."""

    config: AutoencoderKLConfig
    dtype: Any = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, x):
        cfg, wrap = self.config, _maybe_remat(self.remat)
        widths = cfg.block_out_channels
        x = conv(widths[0], 3, self.dtype, "conv_in")(x.astype(self.dtype))
        for i, width in enumerate(widths):
            x = wrap(_DownEncoderBlock2D)(width, cfg.layers_per_block, cfg.norm_num_groups, i < len(widths) - 1,
                                          self.dtype, name=f"down_blocks_{i}")(x)
        x = wrap(_MidBlock)(cfg, "encoder.mid_block", self.dtype, name="mid_block")(x)
        x = nn.silu(group_norm(cfg.norm_num_groups, _EPS, self.dtype, "conv_norm_out")(x))
        return conv(2 * cfg.latent_channels, 3, self.dtype, "conv_out")(x)


class Decoder(nn.Module):
    """Latent ``(B, h, w, latent_channels)`` (after ``post_quant_conv``) -> image
    ``(B, f h, f w, out_channels)``. ``remat`` recomputes each block in the backward pass."""

    config: AutoencoderKLConfig
    dtype: Any = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, z):
        cfg, wrap = self.config, _maybe_remat(self.remat)
        widths = tuple(reversed(cfg.block_out_channels))
        x = conv(widths[0], 3, self.dtype, "conv_in")(z.astype(self.dtype))
        x = wrap(_MidBlock)(cfg, "decoder.mid_block", self.dtype, name="mid_block")(x)
        for i, width in enumerate(widths):
            x = wrap(_UpDecoderBlock2D)(width, cfg.layers_per_block + 1, cfg.norm_num_groups, i < len(widths) - 1,
                                        self.dtype, name=f"up_blocks_{i}")(x)
        x = nn.silu(group_norm(cfg.norm_num_groups, _EPS, self.dtype, "conv_norm_out")(x))
        return conv(cfg.out_channels, 3, self.dtype, "conv_out")(x)


class AutoencoderKL(nn.Module):
    """diffusers' ``AutoencoderKL`` (see the module docstring), channels last.

    * ``encode(x)``: image ``(B, H, W, in_channels)`` in ``[-1, 1]`` with ``H, W`` divisible by
      ``config.downsample_factor`` -> ``(mean, logvar)``, each ``(B, H/f, W/f, latent_channels)``
      float32: the posterior ``N(mean, exp(logvar))`` (``logvar`` clamped to ``[-30, 20]``).
    * ``decode(z)``: latent ``(B, h, w, latent_channels)`` (unscaled) -> image
      ``(B, f h, f w, out_channels)`` float32 (about ``[-1, 1]``).
    * ``__call__(x)``: ``decode(encode(x)[0])``, the reconstruction from the posterior mean
      (it builds every parameter, so ``init`` uses it).

    Call a method with ``module.apply({"params": params}, x, method="encode")``. ``dtype`` is the
    compute dtype (parameters stay float32); ``remat`` recomputes each encoder/decoder block in the
    backward pass.
    """

    config: AutoencoderKLConfig = AutoencoderKLConfig()
    dtype: Any = jnp.float32
    remat: bool = False

    def setup(self):
        cfg = self.config
        self.encoder = Encoder(cfg, self.dtype, self.remat)
        self.decoder = Decoder(cfg, self.dtype, self.remat)
        one_by_one = dict(kernel_size=(1, 1), dtype=self.dtype, param_dtype=jnp.float32)
        self.quant_conv = Conv(2 * cfg.latent_channels, **one_by_one) if cfg.use_quant_conv else None
        self.post_quant_conv = Conv(cfg.latent_channels, **one_by_one) if cfg.use_post_quant_conv else None

    def encode(self, x):
        cfg = self.config
        x = jnp.asarray(x)
        f = cfg.downsample_factor
        if x.ndim != 4 or x.shape[-1] != cfg.in_channels or x.shape[1] % f or x.shape[2] % f:
            raise ValueError(f"AutoencoderKL.encode: x must be (B, H, W, {cfg.in_channels}) (channels last) with "
                             f"H, W divisible by {f}; got {tuple(x.shape)}.")
        moments = self.encoder(x)
        if self.quant_conv is not None:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0)

    def decode(self, z):
        cfg = self.config
        z = jnp.asarray(z)
        if z.ndim != 4 or z.shape[-1] != cfg.latent_channels:
            raise ValueError(f"AutoencoderKL.decode: z must be (B, h, w, {cfg.latent_channels}) (channels last); "
                             f"got {tuple(z.shape)}.")
        z = z.astype(self.dtype)
        if self.post_quant_conv is not None:
            z = self.post_quant_conv(z)
        return self.decoder(z).astype(jnp.float32)

    def __call__(self, x):
        return self.decode(self.encode(x)[0])
