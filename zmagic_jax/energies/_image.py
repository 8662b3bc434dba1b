"""Differentiable image preprocessing shared by perception energies (CLIP, face parsing, style).

Guidance networks were trained on images prepared by PyTorch code, so the resize here is
PyTorch's: ``F.interpolate(mode="bicubic", align_corners=False, antialias=False)``, i.e. Keys'
cubic convolution with ``A = -0.75``, source coordinate ``(i + 0.5) * in / out - 0.5`` and
replicated borders. ``jax.image.resize`` uses ``A = -0.5`` and antialiases when shrinking, so it
does not match. Implemented as two fixed interpolation matrices (built once per shape with
numpy), so the resize is two matmuls: exact, differentiable and fast on any backend.
"""
from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _cubic(d, a=-0.75):
    d = np.abs(d)
    near = ((a + 2) * d - (a + 3)) * d * d + 1
    far = ((a * d - 5 * a) * d + 8 * a) * d - 4 * a
    return np.where(d <= 1, near, np.where(d < 2, far, 0.0))


@functools.lru_cache(maxsize=64)
def bicubic_matrix(size_in: int, size_out: int) -> np.ndarray:
    """``(size_out, size_in)`` matrix of PyTorch's bicubic resize along one axis."""
    if size_in < 1 or size_out < 1:
        raise ValueError(f"bicubic_matrix: sizes must be >= 1; got {size_in} -> {size_out}.")
    src = (np.arange(size_out) + 0.5) * (size_in / size_out) - 0.5
    base = np.floor(src).astype(np.int64)
    frac = src - base
    matrix = np.zeros((size_out, size_in))
    for k in range(-1, 3):
        np.add.at(matrix, (np.arange(size_out), np.clip(base + k, 0, size_in - 1)), _cubic(frac - k))
    return matrix


def resize_bicubic(image, size):
    """Resize one ``(H, W, C)`` image to ``size = (H', W')`` exactly as PyTorch's bicubic
    ``interpolate`` (``align_corners=False``, no antialiasing) does."""
    image = jnp.asarray(image)
    if image.ndim != 3:
        raise ValueError(f"resize_bicubic: image must be one (H, W, C) array (vmap for batches); "
                         f"got shape {image.shape}.")
    if len(size) != 2 or min(size) < 1:
        raise ValueError(f"resize_bicubic: size must be (height, width) >= 1; got {size!r}.")
    rows = jnp.asarray(bicubic_matrix(image.shape[0], int(size[0])), image.dtype)
    cols = jnp.asarray(bicubic_matrix(image.shape[1], int(size[1])), image.dtype)
    return jnp.einsum("ph,hwc,qw->pqc", rows, image, cols)


def normalize_signed(image, mean, std):
    """Normalise an image in ``[-1, 1]`` as ``Normalize(mean, std)`` would normalise it in ``[0, 1]``:
    ``(x - (2 m - 1)) / (2 s)`` (FreeDoM's convention for CLIP and face-parsing inputs)."""
    mean = jnp.asarray(mean, jnp.asarray(image).dtype)
    std = jnp.asarray(std, jnp.asarray(image).dtype)
    if mean.shape != (jnp.shape(image)[-1],) or std.shape != mean.shape:
        raise ValueError(f"normalize_signed: mean and std need one value per channel "
                         f"({jnp.shape(image)[-1]}); got {mean.shape} and {std.shape}.")
    return (image - (2.0 * mean - 1.0)) / (2.0 * std)


def gram_matrix(features):
    """Unnormalised Gram matrix ``F^T F`` of ``(tokens, channels)`` features (FreeDoM's style
    energy uses ``|G(x) - G(ref)|_F`` on CLIP tokens)."""
    features = jnp.asarray(features)
    if features.ndim != 2:
        raise ValueError(f"gram_matrix: features must be (tokens, channels); got shape {features.shape}.")
    return features.T @ features
