"""Stable Diffusion's UNet and VAE parameters from and to diffusers' PyTorch state dicts.

The Flax modules name their submodules as diffusers' PyTorch modules (``name_N`` for item N of a
ModuleList), so each parameter's key is mechanical (``zmagic_jax._state_dict.torch_key``): e.g.
``down_blocks_0/attentions_0/transformer_blocks_0/attn1/to_out_0/kernel`` is
``down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0.weight``. Convolutions are
OIHW <-> HWIO, linear weights are transposed, and every tensor of the checkpoint must be used:
missing, left-over and misshapen keys raise ``CheckpointMismatchError`` listing them all.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from zmagic_jax.models._autoencoder_kl import AutoencoderKL, AutoencoderKLConfig
from zmagic_jax.models._unet2d import UNet2DConditionConfig, UNet2DConditionModel
from zmagic_jax._state_dict import CheckpointMismatchError, params_from_torch, torch_from_params, torch_key

# The ModuleLists / Sequentials of the two networks (``time_embedding.linear_1`` is an attribute).
_LISTS = frozenset({"down_blocks", "up_blocks", "resnets", "attentions", "transformer_blocks", "to_out", "net",
                    "downsamplers", "upsamplers"})


def _key(flax_path: tuple) -> str:
    return torch_key(flax_path, _LISTS)


def _shapes_of(tree) -> dict:
    return {path: tuple(leaf.shape) for path, leaf in traverse_util.flatten_dict(tree).items()}


@functools.lru_cache(maxsize=8)
def unet_param_shapes(config: UNet2DConditionConfig) -> dict:
    """``{flax path tuple: shape}`` of every parameter of ``UNet2DConditionModel(config)`` (traced
    on the smallest input, not run)."""
    side = 2 ** (len(config.block_out_channels) - 1)
    args = (jax.ShapeDtypeStruct((1, side, side, config.in_channels), jnp.float32),
            jax.ShapeDtypeStruct((1,), jnp.float32),
            jax.ShapeDtypeStruct((1, 1, config.context_dim or 1), jnp.float32))
    return _shapes_of(jax.eval_shape(UNet2DConditionModel(config).init, jax.random.key(0), *args)["params"])


@functools.lru_cache(maxsize=8)
def vae_param_shapes(config: AutoencoderKLConfig) -> dict:
    """``{flax path tuple: shape}`` of every parameter of ``AutoencoderKL(config)``."""
    side = config.downsample_factor
    x = jax.ShapeDtypeStruct((1, side, side, config.in_channels), jnp.float32)
    return _shapes_of(jax.eval_shape(AutoencoderKL(config).init, jax.random.key(0), x)["params"])


def _unet_architecture(config: UNet2DConditionConfig) -> str:
    return (f"diffusers UNet2DConditionModel (block_out_channels={list(config.block_out_channels)}, "
            f"layers_per_block={list(config.layers_per_block)}, "
            f"use_linear_projection={config.use_linear_projection})")


def _vae_architecture(config: AutoencoderKLConfig) -> str:
    return (f"diffusers AutoencoderKL (block_out_channels={list(config.block_out_channels)}, "
            f"layers_per_block={config.layers_per_block}, latent_channels={config.latent_channels})")


def unet_params_from_torch(state_dict: dict, config: UNet2DConditionConfig, *, path: str = "<memory>") -> dict:
    """Flax params of ``UNet2DConditionModel(config)`` (nested dicts of float32 numpy arrays) from a
    diffusers ``UNet2DConditionModel`` state dict (``{key: numpy array}``, any float dtype).
    Raises ``CheckpointMismatchError`` (naming ``path`` and every mismatched key) unless the
    tensors are exactly those of ``config``."""
    return params_from_torch(state_dict, unet_param_shapes(config), _key, architecture=_unet_architecture(config),
                             path=path)


def _check_tree(params, shapes: dict, architecture: str) -> None:
    found = _shapes_of(params)
    problems = [f"missing {'/'.join(k)} {v}" for k, v in shapes.items() if k not in found]
    problems += [f"unexpected {'/'.join(k)}" for k in found if k not in shapes]
    problems += [f"{'/'.join(k)}: shape {found[k]}, expected {v}" for k, v in shapes.items()
                 if k in found and found[k] != v]
    if problems:
        raise CheckpointMismatchError(f"params do not match {architecture} ({len(problems)} problems): "
                                      + "; ".join(problems[:20]) + (" ..." if len(problems) > 20 else ""))


def unet_torch_state_dict(params, config: UNet2DConditionConfig) -> dict:
    """The diffusers state dict (``{key: float32 numpy array}``, PyTorch layouts) of ``params`` of
    ``UNet2DConditionModel(config)``, the inverse of :func:`unet_params_from_torch`; params of
    another architecture raise ``CheckpointMismatchError``."""
    _check_tree(params, unet_param_shapes(config), _unet_architecture(config))
    return torch_from_params(jax.tree.map(np.asarray, params), _key)


# Attention names of diffusers' old VAE checkpoints (the deprecated ``AttentionBlock``), which
# diffusers still loads; their projections may also be stored as 1x1 convolutions (the layout
# conversion reshapes those).
_OLD_ATTENTION_NAMES = {"query": "to_q", "key": "to_k", "value": "to_v", "proj_attn": "to_out.0"}


def _vae_renames(config: AutoencoderKLConfig) -> dict:
    if not config.mid_block_add_attention:
        return {}
    return {f"{part}.mid_block.attentions.0.{old}.{leaf}": f"{part}.mid_block.attentions.0.{new}.{leaf}"
            for part in ("encoder", "decoder") for old, new in _OLD_ATTENTION_NAMES.items()
            for leaf in ("weight", "bias")}


def vae_params_from_torch(state_dict: dict, config: AutoencoderKLConfig, *, path: str = "<memory>") -> dict:
    """Flax params of ``AutoencoderKL(config)`` from a diffusers ``AutoencoderKL`` state dict, in
    the current or the deprecated attention names (``query``/``key``/``value``/``proj_attn``,
    linear- or 1x1-conv-shaped). Raises ``CheckpointMismatchError`` (naming ``path`` and every
    mismatched key) unless the tensors are exactly those of ``config``."""
    return params_from_torch(state_dict, vae_param_shapes(config), _key, architecture=_vae_architecture(config),
                             path=path, renames=_vae_renames(config))


def vae_torch_state_dict(params, config: AutoencoderKLConfig) -> dict:
    """The diffusers state dict (current key names, PyTorch layouts) of ``params`` of
    ``AutoencoderKL(config)``, the inverse of :func:`vae_params_from_torch`."""
    _check_tree(params, vae_param_shapes(config), _vae_architecture(config))
    return torch_from_params(jax.tree.map(np.asarray, params), _key)
