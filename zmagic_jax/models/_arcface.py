"""ArcFace IR-SE face-identity embedding (TreB1eN/InsightFace_Pytorch ``Backbone(mode='ir_se')``).

FreeDoM's identity energy uses ``Backbone(input_size=112, num_layers=50, drop_ratio=0.6,
mode='ir_se')`` with the published ``model_ir_se50.pth`` (``reference/guidance_peers.md`` §1.3).
The network, in eval mode (BatchNorm = per-channel affine, eps 1e-5; dropout = identity):

* input layer: ``conv3x3(3 -> 64, no bias) -> BN -> PReLU``;
* body: four stages of ``bottleneck_IR_SE`` units, depths ``(64, 128, 256, 512)``, units
  ``(3, 4, 14, 3)`` for 50 layers (``(3, 13, 30, 3)`` for 100, ``(3, 8, 36, 3)`` for 152), stride 2
  in the first unit of every stage. A unit computes ``res(x) + shortcut(x)`` with
  ``res = BN -> conv3x3 -> PReLU -> conv3x3(stride) -> BN -> SE`` and
  ``shortcut = x[::s, ::s]`` (``MaxPool2d(1, s)``) when the width is unchanged, else
  ``conv1x1(stride) -> BN``. SE: ``x * sigmoid(W2 relu(W1 mean_hw(x)))`` with ``W1`` reducing the
  width 16-fold, both without bias;
* output layer: ``BN2d -> Dropout -> Flatten -> Linear(512*7*7, 512) -> BN1d``, then ``e / |e|``.

PyTorch flattens NCHW (channel-major); this module flattens NHWC, and the converter permutes the
``Linear`` weight's input axis accordingly (``convert_arcface`` in ``ports/_arcface.py``).
"""
from __future__ import annotations

import dataclasses
from typing import Optional

import flax.linen as nn
import jax.numpy as jnp

from zmagic_jax.models._layers import Affine, Conv, PReLU
from zmagic_jax.models._resize import adaptive_avg_pool_torch

STAGE_UNITS = {50: (3, 4, 14, 3), 100: (3, 13, 30, 3), 152: (3, 8, 36, 3)}

# FreeDoM's crop of a 256x256 face (Face-GD/functions/arcface/model.py ``extract_feats``).
_FACE_SIZE = 256
_CROP_ROWS = (35, 223)
_CROP_COLS = (32, 220)


@dataclasses.dataclass(frozen=True)
class ArcFaceConfig:
    """IR-SE backbone. Defaults are the published IR-SE50 (``model_ir_se50.pth``).

    ``stage_units`` overrides the units per stage that ``num_layers`` implies (for tiny test
    variants); ``widths`` are the stage depths, the input layer has ``widths[0]`` channels.
    """

    num_layers: int = 50
    stage_units: Optional[tuple] = None
    widths: tuple = (64, 128, 256, 512)
    input_size: int = 112
    embedding_size: int = 512
    se_reduction: int = 16
    bn_eps: float = 1e-5

    def __post_init__(self):
        if self.stage_units is None and self.num_layers not in STAGE_UNITS:
            raise ValueError(f"ArcFaceConfig: num_layers must be one of {sorted(STAGE_UNITS)} (or give "
                             f"stage_units); got {self.num_layers}.")
        if len(self.units) != len(self.widths) or min(self.units) < 1:
            raise ValueError(f"ArcFaceConfig: need one positive unit count per stage width; got units "
                             f"{self.units} for widths {self.widths}.")
        if min(self.widths) < self.se_reduction:
            raise ValueError(f"ArcFaceConfig: every width must be >= se_reduction ({self.se_reduction}); "
                             f"got {self.widths}.")

    @property
    def units(self) -> tuple:
        return tuple(self.stage_units) if self.stage_units is not None else STAGE_UNITS[self.num_layers]

    @property
    def feature_size(self) -> int:
        """Side of the last feature map (each stage halves it, rounding up: 112 -> 7)."""
        size = self.input_size
        for _ in self.widths:
            size = (size + 1) // 2
        return size


def _conv(features: int, kernel: int, stride: int, name: str) -> nn.Conv:
    pad = kernel // 2
    return Conv(features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                   use_bias=False, name=name)


class SqueezeExcite(nn.Module):
    """``x * sigmoid(fc2(relu(fc1(mean_hw(x)))))`` (bias-free 1x1 convs as dense layers)."""

    reduction: int

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        s = jnp.mean(x, axis=(1, 2))
        s = nn.relu(nn.Dense(c // self.reduction, use_bias=False, name="fc1")(s))
        s = nn.sigmoid(nn.Dense(c, use_bias=False, name="fc2")(s))
        return x * s[:, None, None, :]


class BottleneckIRSE(nn.Module):
    """One ``bottleneck_IR_SE`` unit (module docstring)."""

    depth: int
    stride: int
    reduction: int

    @nn.compact
    def __call__(self, x):
        if x.shape[-1] == self.depth:
            shortcut = x[:, ::self.stride, ::self.stride, :]
        else:
            shortcut = Affine(name="shortcut_bn")(_conv(self.depth, 1, self.stride, "shortcut_conv")(x))
        r = Affine(name="res_bn1")(x)
        r = PReLU(name="res_prelu")(_conv(self.depth, 3, 1, "res_conv1")(r))
        r = Affine(name="res_bn2")(_conv(self.depth, 3, self.stride, "res_conv2")(r))
        r = SqueezeExcite(self.reduction, name="se")(r)
        return r + shortcut


class ArcFace(nn.Module):
    """IR-SE ArcFace: ``(B, S, S, 3)`` face crops in ``[-1, 1]`` (``S = config.input_size``, see
    :func:`arcface_preprocess`) -> ``(B, embedding_size)`` unit-norm identity embeddings."""

    config: ArcFaceConfig = ArcFaceConfig()

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        expected = (cfg.input_size, cfg.input_size, 3)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"ArcFace: expected NHWC input (B, {cfg.input_size}, {cfg.input_size}, 3) "
                             f"(use arcface_preprocess); got shape {x.shape}.")
        x = _conv(cfg.widths[0], 3, 1, "input_conv")(x)
        x = PReLU(name="input_prelu")(Affine(name="input_bn")(x))
        index = 0
        for depth, units in zip(cfg.widths, cfg.units):
            for unit in range(units):
                x = BottleneckIRSE(depth, 2 if unit == 0 else 1, cfg.se_reduction, name=f"body_{index}")(x)
                index += 1
        x = Affine(name="output_bn")(x)
        x = x.reshape(x.shape[0], -1)
        x = nn.Dense(cfg.embedding_size, name="output_dense")(x)
        x = Affine(name="embedding_bn")(x)
        return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def arcface_preprocess(x0, size: int = 112):
    """FreeDoM's ArcFace input from images ``x0`` (B, H, W, 3) in ``[-1, 1]`` (no mean/std).

    Images not 256x256 are first adaptive-average-pooled to 256x256 (FreeDoM's
    ``AdaptiveAvgPool2d((256, 256))``, which it applies when the height is not 256); then rows
    35:223 and columns 32:220 (188x188) are cropped and adaptive-average-pooled to ``size x size``
    exactly as PyTorch does (overlapping bins, see :func:`adaptive_avg_pool_torch`).
    """
    if jnp.ndim(x0) != 4 or jnp.shape(x0)[-1] != 3:
        raise ValueError(f"arcface_preprocess: x0 must be (B, H, W, 3) in [-1, 1]; got shape {jnp.shape(x0)}.")
    if tuple(x0.shape[1:3]) != (_FACE_SIZE, _FACE_SIZE):
        x0 = adaptive_avg_pool_torch(x0, (_FACE_SIZE, _FACE_SIZE))
    face = x0[:, _CROP_ROWS[0]:_CROP_ROWS[1], _CROP_COLS[0]:_CROP_COLS[1], :]
    return adaptive_avg_pool_torch(face, (size, size))
