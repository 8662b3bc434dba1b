"""BiSeNet face parser (zllrunning/face-parsing.PyTorch), the segmentation network of FreeDoM.

Architecture (``model.py`` / ``resnet.py`` of that repository, also vendored by FreeDoM in
``Face-GD/functions/face_parsing``): a ResNet-18 context path gives features at strides 8, 16
and 32; attention refinement modules (ARM) re-weight the stride-16/32 features by a sigmoid of
their global average, the global context ``conv_avg(mean(f32))`` is added at stride 32, and the
sum is brought to stride 16 and then 8 by nearest upsampling and 3x3 ConvBNReLU heads. The
stride-8 ResNet feature stands in for the spatial path; a feature fusion module
``f + f * sigmoid(W2 relu(W1 mean(f)))`` with ``f = ConvBNReLU([res8, cp8])`` mixes the two.
Three output heads (main on the fused feature, aux on the stride-8 and stride-16 context
features) are upsampled to the input size with bilinear ``align_corners=True`` interpolation.
BatchNorm runs in eval mode (folded into :class:`~zmagic_jax.models._layers.Affine`, eps 1e-5).

Inputs are NHWC, already normalised (see :func:`bisenet_preprocess`); outputs are NHWC logits
over 19 classes (1 skin, 12/13 lips, 16 cloth, 17 hair, ...).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from zmagic_jax.models._layers import Affine, Conv
from zmagic_jax.models._resize import IMAGENET_MEAN, IMAGENET_STD, normalize_signed, resize_bicubic_torch


@dataclasses.dataclass(frozen=True)
class BiSeNetConfig:
    """Shape of a BiSeNet; the defaults are the published 19-class face parser.

    ``resnet_widths`` / ``resnet_blocks``: channels and BasicBlocks of the four ResNet stages
    (ResNet-18: 64..512, two blocks each). ``context_channels``: width of the ARMs, heads and
    global context (128). ``fuse_channels``: width of the fusion module and main head (256; its
    attention squeezes to a quarter). ``aux_mid_channels``: hidden width of the two aux heads (64).
    """
    n_classes: int = 19
    resnet_widths: Sequence[int] = (64, 128, 256, 512)
    resnet_blocks: Sequence[int] = (2, 2, 2, 2)
    context_channels: int = 128
    fuse_channels: int = 256
    aux_mid_channels: int = 64

    def __post_init__(self):
        object.__setattr__(self, "resnet_widths", tuple(int(w) for w in self.resnet_widths))
        object.__setattr__(self, "resnet_blocks", tuple(int(b) for b in self.resnet_blocks))
        if len(self.resnet_widths) != 4 or len(self.resnet_blocks) != 4 or min(self.resnet_blocks) < 1:
            raise ValueError(f"BiSeNetConfig: need 4 ResNet stages with >= 1 block each; got widths "
                             f"{self.resnet_widths} and blocks {self.resnet_blocks}.")
        if self.fuse_channels % 4:
            raise ValueError(f"BiSeNetConfig: fuse_channels must be divisible by 4 (its attention "
                             f"squeezes to a quarter); got {self.fuse_channels}.")


def _nearest_indices(size_in: int, size_out: int) -> np.ndarray:
    # PyTorch's legacy 'nearest': floor(i * (in / out)) with the scale in float32.
    if size_out == size_in:
        return np.arange(size_out)
    if size_out == 2 * size_in:
        return np.arange(size_out) // 2
    scale = np.float32(size_in) / np.float32(size_out)
    return np.minimum(np.floor(np.arange(size_out, dtype=np.float32) * scale).astype(np.int64), size_in - 1)


def resize_nearest_torch(x, out_hw):
    """``F.interpolate(x, out_hw, mode='nearest')`` for NHWC ``x``."""
    rows = _nearest_indices(x.shape[1], int(out_hw[0]))
    cols = _nearest_indices(x.shape[2], int(out_hw[1]))
    return x[:, rows][:, :, cols]


def _align_corners_taps(size_in: int, size_out: int):
    # PyTorch computes the scale (in - 1) / (out - 1) and the source coordinate in float32.
    if size_out > 1:
        scale = np.float32(size_in - 1) / np.float32(size_out - 1)
    else:
        scale = np.float32(0.0)
    src = np.arange(size_out, dtype=np.float32) * scale
    lo = np.minimum(src.astype(np.int64), size_in - 1)
    hi = np.minimum(lo + 1, size_in - 1)
    frac = (src - lo.astype(np.float32)).astype(np.float32)
    return lo, hi, frac


def resize_bilinear_align_corners(x, out_hw):
    """``F.interpolate(x, out_hw, mode='bilinear', align_corners=True)`` for NHWC ``x``.

    Output pixel ``i`` samples the input at ``i (in - 1) / (out - 1)``, so the corner pixels of
    input and output coincide; separable linear interpolation between the two neighbours.
    """
    lo, hi, frac = _align_corners_taps(x.shape[1], int(out_hw[0]))
    w = jnp.asarray(frac, x.dtype)[None, :, None, None]
    x = x[:, lo] * (1 - w) + x[:, hi] * w
    lo, hi, frac = _align_corners_taps(x.shape[2], int(out_hw[1]))
    w = jnp.asarray(frac, x.dtype)[None, None, :, None]
    return x[:, :, lo] * (1 - w) + x[:, :, hi] * w


def _conv(features, kernel, stride=1, name=None):
    pad = kernel // 2
    return Conv(features, (kernel, kernel), strides=(stride, stride), padding=((pad, pad), (pad, pad)),
                   use_bias=False, name=name)


class ConvBNReLU(nn.Module):
    features: int
    kernel: int = 3

    @nn.compact
    def __call__(self, x):
        return nn.relu(Affine(name="bn")(_conv(self.features, self.kernel, name="conv")(x)))


class BasicBlock(nn.Module):
    features: int
    stride: int = 1

    @nn.compact
    def __call__(self, x):
        residual = nn.relu(Affine(name="bn1")(_conv(self.features, 3, self.stride, name="conv1")(x)))
        residual = Affine(name="bn2")(_conv(self.features, 3, name="conv2")(residual))
        shortcut = x
        if x.shape[-1] != self.features or self.stride != 1:
            shortcut = Affine(name="downsample_bn")(_conv(self.features, 1, self.stride, name="downsample_conv")(x))
        return nn.relu(shortcut + residual)


class ResNetFeatures(nn.Module):
    """ResNet trunk of BasicBlocks (ResNet-18 by default) returning the stride-8, 16 and 32 features."""
    widths: Sequence[int]
    blocks: Sequence[int]

    @nn.compact
    def __call__(self, x):
        x = nn.relu(Affine(name="bn1")(_conv(self.widths[0], 7, 2, name="conv1")(x)))
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        features = []
        for stage, (width, blocks) in enumerate(zip(self.widths, self.blocks)):
            for block in range(blocks):
                stride = 2 if stage > 0 and block == 0 else 1
                x = BasicBlock(width, stride, name=f"layer{stage + 1}_{block}")(x)
            features.append(x)
        return features[1], features[2], features[3]


class AttentionRefinement(nn.Module):
    features: int

    @nn.compact
    def __call__(self, x):
        feat = ConvBNReLU(self.features, 3, name="conv")(x)
        atten = jnp.mean(feat, axis=(1, 2), keepdims=True)
        atten = nn.sigmoid(Affine(name="bn_atten")(_conv(self.features, 1, name="conv_atten")(atten)))
        return feat * atten


class ContextPath(nn.Module):
    config: BiSeNetConfig

    @nn.compact
    def __call__(self, x):
        c = self.config
        feat8, feat16, feat32 = ResNetFeatures(c.resnet_widths, c.resnet_blocks, name="resnet")(x)
        avg = ConvBNReLU(c.context_channels, 1, name="conv_avg")(jnp.mean(feat32, axis=(1, 2), keepdims=True))
        feat32_sum = AttentionRefinement(c.context_channels, name="arm32")(feat32) + avg
        feat32_up = resize_nearest_torch(feat32_sum, feat16.shape[1:3])
        feat32_up = ConvBNReLU(c.context_channels, 3, name="conv_head32")(feat32_up)
        feat16_sum = AttentionRefinement(c.context_channels, name="arm16")(feat16) + feat32_up
        feat16_up = resize_nearest_torch(feat16_sum, feat8.shape[1:3])
        feat16_up = ConvBNReLU(c.context_channels, 3, name="conv_head16")(feat16_up)
        return feat8, feat16_up, feat32_up


class FeatureFusion(nn.Module):
    features: int

    @nn.compact
    def __call__(self, spatial, context):
        feat = ConvBNReLU(self.features, 1, name="convblk")(jnp.concatenate([spatial, context], axis=-1))
        atten = jnp.mean(feat, axis=(1, 2), keepdims=True)
        atten = nn.relu(_conv(self.features // 4, 1, name="conv1")(atten))
        atten = nn.sigmoid(_conv(self.features, 1, name="conv2")(atten))
        return feat * atten + feat


class BiSeNetOutput(nn.Module):
    mid_channels: int
    n_classes: int

    @nn.compact
    def __call__(self, x):
        return _conv(self.n_classes, 1, name="conv_out")(ConvBNReLU(self.mid_channels, 3, name="conv")(x))


class BiSeNet(nn.Module):
    """BiSeNet face parser: ``(B, H, W, 3)`` normalised images -> ``(B, H, W, n_classes)`` logits.

    Returns the main head (what FreeDoM's segmentation energy uses, ``net(x)[0]``); with
    ``return_aux=True`` returns ``(main, aux16, aux32)`` as the PyTorch ``forward`` does. ``init``
    always creates the aux heads' parameters, so converted checkpoints are complete either way.
    """
    config: BiSeNetConfig = BiSeNetConfig()

    @nn.compact
    def __call__(self, x, return_aux: bool = False):
        c = self.config
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"BiSeNet: expected NHWC images (B, H, W, 3); got shape {x.shape}.")
        feat_res8, feat_cp8, feat_cp16 = ContextPath(c, name="cp")(x)
        fused = FeatureFusion(c.fuse_channels, name="ffm")(feat_res8, feat_cp8)
        main = resize_bilinear_align_corners(BiSeNetOutput(c.fuse_channels, c.n_classes, name="conv_out")(fused),
                                             x.shape[1:3])
        if not (return_aux or self.is_initializing()):
            return main
        aux = [BiSeNetOutput(c.aux_mid_channels, c.n_classes, name=name)(feat)
               for name, feat in (("conv_out16", feat_cp8), ("conv_out32", feat_cp16))]
        if not return_aux:
            return main
        return (main, *(resize_bilinear_align_corners(a, x.shape[1:3]) for a in aux))


def bisenet_preprocess(x0, size: int = 512):
    """FreeDoM's face-parsing input from images ``x0`` in ``[-1, 1]`` (NHWC, any batch shape).

    PyTorch-exact bicubic resize to ``size x size`` (``F.interpolate(mode='bicubic')``,
    ``align_corners=False``), then ImageNet normalisation adapted to ``[-1, 1]``:
    ``(x - (2 m - 1)) / (2 s)``.
    """
    x0 = jnp.asarray(x0)
    if x0.ndim < 3 or x0.shape[-1] != 3:
        raise ValueError(f"bisenet_preprocess: expected images (..., H, W, 3); got shape {x0.shape}.")
    lead = x0.shape[:-3]
    resized = resize_bicubic_torch(x0.reshape((-1,) + x0.shape[-3:]), (size, size))
    return normalize_signed(resized, IMAGENET_MEAN, IMAGENET_STD).reshape(lead + resized.shape[1:])
