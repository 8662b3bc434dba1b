"""PyTorch-exact image preprocessing for the ported networks, as fixed per-axis matrices.

The networks were trained on images prepared by PyTorch code, so the resamplings here are
PyTorch's. ``jax.image.resize`` uses Keys' ``A = -0.5`` and antialiases when shrinking, so it does
not match ``F.interpolate``; each map here is two matmuls with matrices built once per shape with
numpy: exact, differentiable and fast on any backend.

* :func:`resize_bicubic_torch` is ``F.interpolate(mode="bicubic", align_corners=False)`` (Keys'
  cubic with ``A = -0.75``, no antialiasing), built on :func:`bicubic_matrix`.
* :func:`adaptive_avg_pool_torch` is ``F.adaptive_avg_pool2d`` (= ``interpolate(mode="area")``):
  output ``i`` of an axis averages the input bin ``[floor(i * in / out), ceil((i + 1) * in / out))``.
  The bins overlap when ``in`` is not a multiple of ``out`` (188 -> 112 for ArcFace), and the map
  also upsamples (bins of one pixel, repeated).

Both are linear in ``x``, so they are exact, differentiable and cheap on any backend.
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
    return resize_bicubic_torch(image[None], size)[0]


def normalize_signed(image, mean, std):
    """Normalise an image in ``[-1, 1]`` as ``Normalize(mean, std)`` would normalise it in ``[0, 1]``:
    ``(x - (2 m - 1)) / (2 s)`` (FreeDoM's convention for CLIP and face-parsing inputs)."""
    mean = jnp.asarray(mean, jnp.asarray(image).dtype)
    std = jnp.asarray(std, jnp.asarray(image).dtype)
    if mean.shape != (jnp.shape(image)[-1],) or std.shape != mean.shape:
        raise ValueError(f"normalize_signed: mean and std need one value per channel "
                         f"({jnp.shape(image)[-1]}); got {mean.shape} and {std.shape}.")
    return (image - (2.0 * mean - 1.0)) / (2.0 * std)


@functools.lru_cache(maxsize=64)
def adaptive_pool_matrix(size_in: int, size_out: int) -> np.ndarray:
    """``(size_out, size_in)`` matrix of PyTorch's adaptive average pooling along one axis."""
    if size_in < 1 or size_out < 1:
        raise ValueError(f"adaptive_pool_matrix: sizes must be >= 1; got {size_in} -> {size_out}.")
    matrix = np.zeros((size_out, size_in))
    for i in range(size_out):
        start = (i * size_in) // size_out
        end = -(-((i + 1) * size_in) // size_out)
        matrix[i, start:end] = 1.0 / (end - start)
    return matrix


def _check(x, out_hw, who: str) -> tuple:
    if jnp.ndim(x) != 4:
        raise ValueError(f"{who}: x must be an NHWC batch (B, H, W, C); got shape {jnp.shape(x)}.")
    try:
        out_h, out_w = (int(v) for v in out_hw)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{who}: out_hw must be (height, width) ints; got {out_hw!r}.") from error
    if out_h < 1 or out_w < 1:
        raise ValueError(f"{who}: out_hw must be >= 1; got {out_hw!r}.")
    return out_h, out_w


def _separable(x, rows: np.ndarray, cols: np.ndarray):
    x = jnp.asarray(x)
    rows, cols = jnp.asarray(rows, x.dtype), jnp.asarray(cols, x.dtype)
    return jnp.einsum("ph,bhwc,qw->bpqc", rows, x, cols)


def resize_bicubic_torch(x, out_hw):
    """Resize ``x`` (B, H, W, C) to ``out_hw = (H', W')`` as
    ``torch.nn.functional.interpolate(x, size=out_hw, mode="bicubic", align_corners=False)``."""
    out_h, out_w = _check(x, out_hw, "resize_bicubic_torch")
    return _separable(x, bicubic_matrix(x.shape[1], out_h), bicubic_matrix(x.shape[2], out_w))


def adaptive_avg_pool_torch(x, out_hw):
    """Pool ``x`` (B, H, W, C) to ``out_hw = (H', W')`` as
    ``torch.nn.functional.adaptive_avg_pool2d(x, out_hw)``."""
    out_h, out_w = _check(x, out_hw, "adaptive_avg_pool_torch")
    return _separable(x, adaptive_pool_matrix(x.shape[1], out_h), adaptive_pool_matrix(x.shape[2], out_w))


def check_box(box, height: int, width: int, who: str) -> tuple:
    """A face box of static ints, ``(top, left, size)`` or ``(top, left, height, width)``, inside an
    ``height x width`` image, as ``(top, left, height, width)``; anything else is a ``ValueError``
    naming ``who``."""
    try:
        box = tuple(int(v) for v in box)
    except (TypeError, ValueError):
        box = None
    if box is not None and len(box) == 3:
        box = box + (box[2],)
    if box is None or len(box) != 4 or box[2] < 1 or box[3] < 1 or box[0] < 0 or box[1] < 0 \
            or box[0] + box[2] > height or box[1] + box[3] > width:
        raise ValueError(f"{who}: box must be static ints (top, left, size) or (top, left, height, width), "
                         f"non-empty and inside the {height}x{width} image; got {box!r}.")
    return box
