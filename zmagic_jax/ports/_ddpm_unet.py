"""SDEdit's CelebA-HQ DDPM UNet (ermongroup/ddim ``Model``) from its PyTorch checkpoint to Flax params.

Accepted files:

* a plain ``state_dict`` (SDEdit's ``celeba_hq.ckpt``), keys possibly ``module.``-prefixed
  (saved from ``DataParallel``);
* the ermongroup/ddim training checkpoint ``ckpt.pth``, a list
  ``[model_state_dict, optimizer_state_dict, epoch, step, ema_state_dict]`` (the EMA entry is
  there only when EMA was on). FreeDoM's loader silently loads nothing for this list; here
  ``ema=True`` takes the EMA weights (the last entry) when present, else the model weights;
* a ``.safetensors`` file written by ``save_params`` from converted params.
"""
from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
from flax import traverse_util

from zmagic_jax.models._ddpm_unet import DDPM_CELEBA_HQ, DDPMUNet, DDPMUNetConfig
from zmagic_jax.ports._checkpoint import (
    Port,
    StateDict,
    check_param_shapes,
    conv_kernel,
    dense_kernel,
    is_state_dict,
    load_port,
    state_dict_of,
    strip_prefix,
)

ARCHITECTURE = "the ermongroup/ddim DDPM UNet (SDEdit CelebA-HQ 256, celeba_hq.ckpt)"
PUBLISHED = ("SDEdit (ermongroup/SDEdit README, celeba_hq.ckpt; its original S3 link is dead) — mirrored "
             "e.g. in the Hugging Face repo gwang-kim/DiffusionCLIP-CelebA_HQ; FreeDoM expects it at "
             "Face-GD/exp/logs/celeba/celeba_hq.ckpt")


def _pick_weights(obj, *, path, ema: bool) -> dict:
    """The state dict inside a checkpoint object; for the ermongroup training list, its EMA entry
    (last) when ``ema`` and present, else its model entry (first, as ``state_dict_of`` takes it)."""
    if ema and isinstance(obj, (list, tuple)) and len(obj) > 1 and is_state_dict(obj[-1]):
        return strip_prefix(obj[-1])
    return state_dict_of(obj, path=path, architecture=ARCHITECTURE)


# Flax submodule name -> PyTorch module path; the names inside a block (conv1, temb_proj, q, ...) agree.
_RENAMES = (
    (re.compile(r"(down|up)_(\d+)_(block|attn)_(\d+)"), r"\1.\2.\3.\4"),
    (re.compile(r"(down|up)_(\d+)_(downsample|upsample)"), r"\1.\2.\3"),
    (re.compile(r"mid_(block_1|attn_1|block_2)"), r"mid.\1"),
    (re.compile(r"temb_dense_(\d+)"), r"temb.dense.\1"),
)
_LEAVES = {"kernel": "weight", "scale": "weight", "bias": "bias"}


def _torch_name(flax_path: tuple) -> str:
    top, *inner, leaf = flax_path
    for pattern, replacement in _RENAMES:
        if pattern.fullmatch(top):
            top = pattern.sub(replacement, top)
            break
    return ".".join([top, *inner, _LEAVES[leaf]])


@functools.lru_cache(maxsize=8)
def _param_shapes(config: DDPMUNetConfig) -> dict:
    """``{flax path tuple: shape}`` of every parameter of ``DDPMUNet(config)`` (traced, not run)."""
    x = jax.ShapeDtypeStruct((1, config.resolution, config.resolution, config.in_channels), jnp.float32)
    t = jax.ShapeDtypeStruct((1,), jnp.float32)
    tree = jax.eval_shape(DDPMUNet(config).init, jax.random.key(0), x, t)["params"]
    return {path: tuple(leaf.shape) for path, leaf in traverse_util.flatten_dict(tree).items()}


def convert_ddpm_unet(state_dict: dict, config: DDPMUNetConfig = DDPM_CELEBA_HQ, *,
                      path: str = "<memory>") -> dict:
    """Flax params of :class:`DDPMUNet` from an ermongroup/ddim ``Model`` state dict (numpy arrays,
    no ``module.`` prefix): each parameter of ``DDPMUNet(config)`` is taken by its PyTorch name
    (conv weights OIHW -> HWIO, linear weights transposed). Every tensor must be used and have the
    shape ``config`` implies: a missing, left-over or misshapen tensor (a checkpoint of another
    config) raises ``CheckpointMismatchError`` naming them all."""
    sd = StateDict(state_dict, architecture=f"{ARCHITECTURE} with {config}", path=path)
    flat = {}
    for flax_path, shape in _param_shapes(config).items():
        value = sd.take(_torch_name(flax_path))
        # A missing tensor (empty) or one of the wrong rank is kept as is and reported below.
        if flax_path[-1] == "kernel" and value.ndim == len(shape) == 4:
            value = conv_kernel(value)
        elif flax_path[-1] == "kernel" and value.ndim == len(shape) == 2:
            value = dense_kernel(value)
        flat[flax_path] = value
    sd.finish()
    params = traverse_util.unflatten_dict(flat)
    check_param_shapes(DDPM_UNET, DDPMUNet(config), params, config, path=path)
    return params


def _example(config: DDPMUNetConfig) -> tuple:
    return (jax.ShapeDtypeStruct((1, config.resolution, config.resolution, config.in_channels), jnp.float32),
            jax.ShapeDtypeStruct((1,), jnp.float32))


def _pick(obj, *, path, ema: bool = True) -> dict:
    return _pick_weights(obj, path=path, ema=ema)


def _convert(state_dict: dict, config: DDPMUNetConfig, *, path: str = "<memory>") -> dict:
    return convert_ddpm_unet(state_dict, config, path=path)


DDPM_UNET = Port(name="ddpm_unet", architecture=ARCHITECTURE, published=PUBLISHED, config_type=DDPMUNetConfig,
                 default_config=DDPM_CELEBA_HQ, module=DDPMUNet, convert=_convert, example=_example, pick=_pick)


def load_ddpm_unet(path, config: DDPMUNetConfig | None = None, *, ema: bool = True):
    """``(DDPMUNet(config), params)`` from a local checkpoint; ``config`` defaults to
    ``DDPM_CELEBA_HQ`` (or the config stored in a converted file). ``path`` is a PyTorch file
    (``.ckpt``/``.pth``/``.pt``/``.tar``/``.bin``, read without PyTorch) or a ``.safetensors`` file
    written by ``convert_file(DDPM_UNET, ...)``. ``ema`` matters only for an ermongroup training
    list: True takes its EMA weights (last entry) when present."""
    return load_port(DDPM_UNET, path, config, ema=ema)
