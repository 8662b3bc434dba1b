"""MTCNN's output network (ONet) as in facenet-pytorch, with its differentiable preprocessing.

ONet is the third MTCNN stage (Zhang et al. 2016, "Joint Face Detection and Alignment using
Multi-task Cascaded Convolutional Networks"): it scores a 48x48 face candidate, refines its box and
regresses five landmarks (eyes, nose, mouth corners). The layers, the crop resampling and the pixel
normalisation follow facenet-pytorch 2.6.0 (``models/mtcnn.py`` ``ONet``, ``models/utils/
detect_face.py`` third stage), whose weights ``data/onet.pt`` are converted by
``load_onet`` (the converters, one layer up: ``ports/_mtcnn.py``).

facenet-pytorch feeds RGB crops in the ordinary (rows, columns) orientation; its converter swapped the
kernels' two spatial axes of the original (transposed-image) TensorFlow MTCNN instead, and keeps the
original flatten order by permuting NCHW to (N, W, H, C) before the first dense layer. The port
reproduces that flatten order.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from zmagic_jax.models._layers import Conv, PReLU
from zmagic_jax.models._resize import adaptive_avg_pool_torch, check_box

# facenet-pytorch normalises uint8 pixels p as (p - 127.5) * 0.0078125 (= 1/128); with
# p = 127.5 * (x0 + 1) that is x0 * 127.5 / 128.
_PIXEL_SCALE = 127.5 * 0.0078125

# (conv kernel, (max-pool window, stride) or None) of conv1..conv4.
_LAYERS = ((3, (3, 2)), (3, (3, 2)), (3, (2, 2)), (2, None))


@dataclasses.dataclass(frozen=True)
class ONetConfig:
    """ONet's architecture; the defaults are the published network.

    ``widths`` are the channels of conv1..conv4 (kernels 3, 3, 3, 2; max-pools 3/2, 3/2, 2/2 with
    ceil mode after the first three), ``hidden`` the width of ``dense5``, ``input_size`` the side of
    the square crop (48 for the published weights; it fixes ``dense5``'s input size).
    """

    widths: Sequence[int] = (32, 64, 64, 128)
    hidden: int = 256
    input_size: int = 48

    def __post_init__(self):
        if len(self.widths) != 4:
            raise ValueError(f"ONetConfig: widths needs 4 channel counts (conv1..conv4), got {self.widths!r}")
        side = self.input_size
        for kernel, pool in _LAYERS:
            side -= kernel - 1
            if pool is not None and side >= pool[0]:
                side = _ceil_pool_size(side, *pool)
            elif pool is not None:
                side = 0
        if side < 1:
            raise ValueError(f"ONetConfig: input_size {self.input_size} is too small for ONet's convolutions "
                             "and pools (at least 26; the published network uses 48)")


def _ceil_pool_size(size: int, window: int, stride: int) -> int:
    """Output length of PyTorch ``MaxPool2d(window, stride, ceil_mode=True)`` without padding."""
    out = math.ceil((size - window) / stride) + 1
    if (out - 1) * stride >= size:  # PyTorch drops a last window that would start past the input
        out -= 1
    return out


def _max_pool_ceil(x, window: int, stride: int):
    """``MaxPool2d(window, stride, ceil_mode=True)`` on NHWC: the last, partial window is padded
    with -inf on the bottom/right so it takes the max over the pixels it covers."""
    pads = []
    for size in x.shape[1:3]:
        out = _ceil_pool_size(size, window, stride)
        pads.append((0, max(0, (out - 1) * stride + window - size)))
    return nn.max_pool(x, (window, window), strides=(stride, stride), padding=pads)


class ONet(nn.Module):
    """MTCNN ONet on NHWC crops ``(B, S, S, 3)`` already normalised by :func:`onet_preprocess`.

    Returns ``prob`` (B, 2) = softmax of the face/non-face logits (``prob[:, 1]`` is the face
    probability), ``box`` (B, 4) the box regression offsets and ``landmarks`` (B, 10) the five points
    as fractions of the crop, x coordinates first (map them with :func:`onet_landmarks`).
    """

    config: ONetConfig = ONetConfig()

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        if x.shape[1:] != (cfg.input_size, cfg.input_size, 3):
            raise ValueError(f"ONet: expected crops of shape (B, {cfg.input_size}, {cfg.input_size}, 3), "
                             f"got {x.shape}; use onet_preprocess to crop and resize")
        for i, (width, (kernel, pool)) in enumerate(zip(cfg.widths, _LAYERS), start=1):
            x = Conv(width, (kernel, kernel), padding="VALID", name=f"conv{i}")(x)
            x = PReLU(name=f"prelu{i}")(x)
            if pool is not None:
                x = _max_pool_ceil(x, *pool)
        # PyTorch flattens x.permute(0, 3, 2, 1) of NCHW, i.e. (W, H, C) order.
        x = jnp.transpose(x, (0, 2, 1, 3)).reshape(x.shape[0], -1)
        x = PReLU(name="prelu5")(nn.Dense(cfg.hidden, name="dense5")(x))
        return {
            "prob": jax.nn.softmax(nn.Dense(2, name="dense6_1")(x), axis=-1),
            "box": nn.Dense(4, name="dense6_2")(x),
            "landmarks": nn.Dense(10, name="dense6_3")(x),
        }


def onet_preprocess(x0, box, size: int = 48):
    """ONet's input for the face in ``box`` of images ``x0`` (B, H, W, 3), RGB in [-1, 1].

    ``box = (top, left, height, width)`` (static ints, inside the image) is cropped and resampled to
    ``size x size`` with area interpolation, as facenet-pytorch's ``imresample``
    (``interpolate(mode='area')`` = adaptive average pooling: each output pixel is the mean of the
    input bin ``[floor(i*in/out), ceil((i+1)*in/out))`` per axis; a crop smaller than ``size`` is
    upsampled by repetition). Pixels are then normalised as facenet does for uint8 ``p``:
    ``(p - 127.5) / 128`` with ``p = 127.5 (x0 + 1)``, i.e. ``x0 * 127.5 / 128`` (without facenet's
    uint8 quantisation, so it stays differentiable).
    """
    top, left, height, width = check_box(box, x0.shape[1], x0.shape[2], "onet_preprocess")
    crop = x0[:, top:top + height, left:left + width, :]
    return adaptive_avg_pool_torch(crop, (size, size)) * _PIXEL_SCALE


def onet_landmarks(outputs, box):
    """Five landmarks (B, 5, 2) as (x, y) pixel coordinates of the full image.

    facenet-pytorch maps ONet's outputs relative to the crop: ``x = left + width * out[:, 0:5]``,
    ``y = top + height * out[:, 5:10]`` (0-based pixel indices; its ``+ x1 - 1`` turns MTCNN's
    1-based boxes into the same). ``outputs`` is ONet's dict or its ``landmarks`` array.
    """
    points = outputs["landmarks"] if isinstance(outputs, dict) else outputs
    top, left, height, width = (int(v) for v in box)
    return jnp.stack([left + width * points[:, 0:5], top + height * points[:, 5:10]], axis=-1)
