"""Building blocks of perception energies: Gram matrices and a norm with a safe gradient at 0.

The PyTorch-exact resize and the input normalisations live with the networks that need them
(:mod:`zmagic_jax.models._resize`) and are re-exported here.
"""
from __future__ import annotations

import jax.numpy as jnp

from zmagic_jax.models._resize import (CLIP_MEAN, CLIP_STD, IMAGENET_MEAN, IMAGENET_STD,  # noqa: F401
                                       bicubic_matrix, normalize_signed, resize_bicubic)


def gram_matrix(features):
    """Unnormalised Gram matrix ``F^T F`` of ``(tokens, channels)`` features (FreeDoM's style
    energy uses ``|G(x) - G(ref)|_F`` on CLIP tokens)."""
    features = jnp.asarray(features)
    if features.ndim != 2:
        raise ValueError(f"gram_matrix: features must be (tokens, channels); got shape {features.shape}.")
    return features.T @ features


def safe_norm(x):
    """Euclidean / Frobenius norm whose gradient at ``x = 0`` is 0 instead of NaN (the energy's
    minimum, e.g. the style reference itself, must give a zero guidance step, not NaNs)."""
    squared = jnp.sum(jnp.square(x))
    positive = squared > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, squared, 1.0)), 0.0)


def check_one_image(image, who: str, channels: int):
    """``image`` as an array, or a ValueError naming ``who`` unless it is ONE ``(H, W, channels)`` image."""
    image = jnp.asarray(image)
    if image.ndim != 3 or image.shape[-1] != channels:
        raise ValueError(f"{who}: image must be one (H, W, {channels}) array in [-1, 1] (vmap for batches); "
                         f"got shape {image.shape}.")
    return image
