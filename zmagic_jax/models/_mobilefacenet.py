"""MobileFaceNet 68-point landmark regressor (cunjian/pytorch_face_landmark, used by FreeDoM).

FreeDoM's landmark energy builds ``MobileFaceNet([112, 112], 136)`` (``output_name='GDC'``) and
loads ``mobilefacenet_model_best.pth.tar`` (``{'state_dict': ...}``); the network returns
``(landmarks, conv_features)`` and FreeDoM uses ``[0]``, the ``(B, 136)`` landmarks: 68 ``(x, y)``
pairs, interleaved, relative to the input crop (``reference/guidance_peers.md`` §1.3).
In eval mode (BatchNorm = per-channel affine, eps 1e-5), with
``ConvBlock = conv(no bias) -> BN -> PReLU`` and ``LinearBlock = conv(no bias) -> BN``:

* ``conv1``: ConvBlock 3x3 stride 2, 3 -> 64; ``conv2_dw``: depthwise ConvBlock 3x3, 64;
* ``DepthWise(out, e, stride)``: ConvBlock 1x1 -> ``e``, depthwise ConvBlock 3x3(stride) on ``e``,
  LinearBlock 1x1 ``e -> out``; residual units add their input (stride 1, ``out = in``);
* ``conv_23`` DepthWise(64, e=128, s2), ``conv_3`` 4 residual units (e=128), ``conv_34``
  DepthWise(128, e=256, s2), ``conv_4`` 6 units (e=256), ``conv_45`` DepthWise(128, e=512, s2),
  ``conv_5`` 2 units (e=256), ``conv_6_sep`` ConvBlock 1x1 128 -> 512;
* GDC head: depthwise LinearBlock 7x7 (valid: 7x7 -> 1x1), ``Linear(512, 136, no bias)``, BN1d.
"""
from __future__ import annotations

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from zmagic_jax.models._layers import Affine, Conv, PReLU
from zmagic_jax.models._resize import check_box, resize_bicubic_torch


@dataclasses.dataclass(frozen=True)
class MobileFaceNetConfig:
    """Defaults are the published 68-point regressor (``mobilefacenet_model_best.pth.tar``).

    ``widths = (stem and conv_3 width, conv_4/conv_5 width, conv_6_sep width)``;
    ``expansions`` are the depthwise widths of ``conv_23, conv_3, conv_34, conv_4, conv_45,
    conv_5``; ``residual_units`` the units of ``conv_3, conv_4, conv_5``.
    """

    input_size: int = 112
    widths: tuple = (64, 128, 512)
    expansions: tuple = (128, 128, 256, 256, 512, 256)
    residual_units: tuple = (4, 6, 2)
    num_outputs: int = 136
    bn_eps: float = 1e-5

    def __post_init__(self):
        if len(self.widths) != 3 or len(self.expansions) != 6 or len(self.residual_units) != 3:
            raise ValueError(f"MobileFaceNetConfig: need 3 widths, 6 expansions and 3 residual unit counts; "
                             f"got {self.widths}, {self.expansions}, {self.residual_units}.")
        if self.input_size % 16:
            raise ValueError(f"MobileFaceNetConfig: input_size must be a multiple of 16 (four stride-2 "
                             f"layers before the GDC kernel); got {self.input_size}.")

    @property
    def feature_size(self) -> int:
        """Side of the map the GDC depthwise kernel covers (112 -> 7)."""
        return self.input_size // 16


class ConvBN(nn.Module):
    """``Conv_block`` (with PReLU) or ``Linear_block`` (``prelu=False``) of the PyTorch model."""

    features: int
    kernel: int = 1
    stride: int = 1
    padding: int = 0
    depthwise: bool = False
    prelu: bool = True

    @nn.compact
    def __call__(self, x):
        pad = ((self.padding, self.padding), (self.padding, self.padding))
        x = Conv(self.features, (self.kernel, self.kernel), strides=(self.stride, self.stride), padding=pad,
                    feature_group_count=self.features if self.depthwise else 1, use_bias=False, name="conv")(x)
        x = Affine(name="bn")(x)
        return PReLU(name="prelu")(x) if self.prelu else x


class DepthWise(nn.Module):
    """``Depth_Wise``: expand 1x1, depthwise 3x3 (stride), project 1x1; ``residual`` adds the input."""

    features: int
    expansion: int
    stride: int = 1
    residual: bool = False

    @nn.compact
    def __call__(self, x):
        y = ConvBN(self.expansion, name="conv")(x)
        y = ConvBN(self.expansion, 3, self.stride, 1, depthwise=True, name="conv_dw")(y)
        y = ConvBN(self.features, prelu=False, name="project")(y)
        return x + y if self.residual else y


class MobileFaceNet(nn.Module):
    """``(B, S, S, 3)`` RGB face crops in ``[0, 1]`` (``S = config.input_size``, see
    :func:`landmark_preprocess`) -> ``(B, num_outputs)`` landmark coordinates
    ``(x_1, y_1, x_2, y_2, ...)`` relative to the crop (about ``[0, 1]``)."""

    config: MobileFaceNetConfig = MobileFaceNetConfig()

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        expected = (cfg.input_size, cfg.input_size, 3)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(f"MobileFaceNet: expected NHWC input (B, {cfg.input_size}, {cfg.input_size}, 3) "
                             f"in [0, 1] (use landmark_preprocess); got shape {x.shape}.")
        stem, middle, top = cfg.widths
        e23, e3, e34, e4, e45, e5 = cfg.expansions
        n3, n4, n5 = cfg.residual_units
        x = ConvBN(stem, 3, 2, 1, name="conv1")(x)
        x = ConvBN(stem, 3, 1, 1, depthwise=True, name="conv2_dw")(x)
        x = DepthWise(stem, e23, stride=2, name="conv_23")(x)
        for i in range(n3):
            x = DepthWise(stem, e3, residual=True, name=f"conv_3_{i}")(x)
        x = DepthWise(middle, e34, stride=2, name="conv_34")(x)
        for i in range(n4):
            x = DepthWise(middle, e4, residual=True, name=f"conv_4_{i}")(x)
        x = DepthWise(middle, e45, stride=2, name="conv_45")(x)
        for i in range(n5):
            x = DepthWise(middle, e5, residual=True, name=f"conv_5_{i}")(x)
        x = ConvBN(top, name="conv_6_sep")(x)
        x = ConvBN(top, cfg.feature_size, depthwise=True, prelu=False, name="gdc_dw")(x)
        x = nn.Dense(cfg.num_outputs, use_bias=False, name="gdc_linear")(x.reshape(x.shape[0], -1))
        return Affine(name="gdc_bn")(x)


def landmark_preprocess(x0, box, size: int = 112):
    """FreeDoM's landmark input from images ``x0`` (B, H, W, 3) in ``[-1, 1]``: ``(x0 + 1) / 2``,
    crop the face box (static ints ``(top, left, size)`` or ``(top, left, height, width)``, FreeDoM's
    square box around the reference's detected face) and resize to ``size x size`` with PyTorch's
    bicubic ``interpolate`` (``align_corners=False``, no antialiasing)."""
    if jnp.ndim(x0) != 4 or jnp.shape(x0)[-1] != 3:
        raise ValueError(f"landmark_preprocess: x0 must be (B, H, W, 3) in [-1, 1]; got shape {jnp.shape(x0)}.")
    top, left, height, width = check_box(box, x0.shape[1], x0.shape[2], "landmark_preprocess")
    face = (x0[:, top:top + height, left:left + width, :] + 1.0) / 2.0
    return resize_bicubic_torch(face, (size, size))
