"""Energies and evaluator scores of the embedded digits task (``zmagic_jax.models._digits``).

Every function takes ONE image ``x0 (H, W, 1)`` in ``[-1, 1]`` (vmap for batches). The energy
constructors return an :class:`~zmagic_jax.Energy` whose params hold the network weights and the
target (label, mask, reference Gram matrices): both may be traced, so one compiled program serves
every target and every checkpoint of the architecture.

Guidance energies (networks trained by the project, ``experiments/train_digits.py``):

* class: ``-log p(label | x0)`` of the guidance classifier;
* layout: mean binary cross-entropy between the segmenter's ink logits and a target ink mask
  ``(H, W)`` in ``{0, 1}`` (where the digit's strokes should be);
* tile class: the class energy of one window of a larger canvas (:func:`tile_class_energy`);
* style: ``sum_s |G_s(x0) - G_s(ref)|_F`` over the feature net's stages, ``G = F^T F / (h w)`` of
  the stage's ``(h w, c)`` activations (a Gram / texture statistic: stroke width and contrast,
  not where the strokes are).

Scores (never used for guidance): :func:`class_probability` and :func:`style_distance` with the
evaluator network, :func:`ink_iou` and :func:`ink_fraction` directly on pixels.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from zmagic_jax.contracts import Energy, static_partial
from zmagic_jax.energies._image import check_one_image, gram_matrix, safe_norm
from zmagic_jax.models._digits import classifier_output, ink_logits
from zmagic_jax.models._layers import Net


def _check_one(x0, who: str):
    return check_one_image(x0, who, 1)


def _class_energy(module, params, x0):
    weights, label = params
    logits = classifier_output(Net(module, weights), _check_one(x0, "class_energy")).logits
    return -jax.nn.log_softmax(logits)[label]


def class_energy(net: Net, label) -> Energy:
    """``E(x0) = -log p(label | x0)`` under the classifier ``net``; params ``(net.params, label)``."""
    return Energy(static_partial(_class_energy, net.module), (net.params, label))


def _layout_energy(module, params, x0):
    weights, mask = params
    logits = ink_logits(Net(module, weights), _check_one(x0, "layout_energy"))
    if logits.shape != mask.shape:
        raise ValueError(f"layout_energy: mask shape {mask.shape} does not match the image {logits.shape}.")
    # log(1 + e^z) - m z, the numerically stable sigmoid cross-entropy
    return jnp.mean(jax.nn.softplus(logits) - mask * logits)


def layout_energy(net: Net, mask) -> Energy:
    """``E(x0) = mean BCE(ink_logits(x0), mask)``: ``mask (H, W)`` in ``{0, 1}`` marks where ink
    should be; params ``(net.params, mask)``."""
    mask = jnp.asarray(mask, jnp.float32)
    if mask.ndim != 2:
        raise ValueError(f"layout_energy: mask must be (H, W) in {{0, 1}}; got shape {mask.shape}.")
    return Energy(static_partial(_layout_energy, net.module), (net.params, mask))


def gram_features(net: Net, x0, stages=None) -> tuple:
    """Per stage of a digits classifier (all, or the indices ``stages``), the normalised Gram
    matrix ``F^T F / (h w)`` ``(c, c)``."""
    outputs = classifier_output(net, _check_one(x0, "gram_features")).stages
    chosen = range(len(outputs)) if stages is None else stages
    return tuple(gram_matrix(outputs[i].reshape(-1, outputs[i].shape[-1])) / (outputs[i].shape[0] * outputs[i].shape[1])
                 for i in chosen)


def _style_energy(module, stages, params, x0):
    weights, target = params
    return sum(safe_norm(g - r) for g, r in zip(gram_features(Net(module, weights), x0, stages), target))


def style_energy(net: Net, reference, stages=None) -> Energy:
    """``E(x0) = sum_s |G_s(x0) - G_s(reference)|_F`` with ``net``'s stage Gram matrices (all stages,
    or the indices ``stages``); params ``(net.params, reference Gram matrices)``."""
    stages = None if stages is None else tuple(stages)
    return Energy(static_partial(_style_energy, net.module, stages), (net.params, gram_features(net, reference, stages)))


def style_distance(net: Net, x0, reference):
    """The style score: the Gram distance of the FIRST stage (local stroke texture, not the digit's
    shape) measured with another network (the evaluator)."""
    return style_energy(net, reference, stages=(0,))(x0)


def ink_fraction(x0, threshold: float = 0.0):
    """Fraction of pixels with ink (``x0 > threshold``): stroke weight, a pixel-level style score."""
    return jnp.mean(_check_one(x0, "ink_fraction")[..., 0] > threshold)


def class_probability(net: Net, x0):
    """Softmax probabilities ``(classes,)`` of the classifier ``net`` for one image."""
    return jax.nn.softmax(classifier_output(net, _check_one(x0, "class_probability")).logits)


def ink_iou(x0, mask, threshold: float = 0.0):
    """Intersection over union of the ink ``x0 > threshold`` with the target mask (pixels only, no network)."""
    ink = _check_one(x0, "ink_iou")[..., 0] > threshold
    target = jnp.asarray(mask) > 0.5
    union = jnp.sum(ink | target)
    return jnp.where(union > 0, jnp.sum(ink & target) / jnp.maximum(union, 1), 1.0)


def _box_energy(params, x0):
    box, fill = params
    if x0.shape != box.shape:
        raise ValueError(f"box_energy: x0 shape {x0.shape} does not match the box {box.shape}.")
    ink = (x0 + 1.0) / 2.0
    outside = 1.0 - box
    stray = jnp.sum(jnp.square(ink) * outside) / jnp.maximum(jnp.sum(outside), 1.0)
    coverage = jnp.sum(ink * box) / jnp.maximum(jnp.sum(box), 1.0)
    return stray + jnp.square(coverage - fill)


def box_energy(box, fill=0.4) -> Energy:
    """A layout energy without a network, for images in ``[-1, 1]`` (background -1): with ink
    ``u = (x0 + 1) / 2``, ``E = mean_outside(u^2) + (mean_inside(u) - fill)^2``: no ink outside
    ``box`` (any shape, the image's; 1 inside, 0 outside) and about ``fill`` of the box inked (a
    digit covers about 40 % of its bounding box). Params ``(box, fill)``, both leaves."""
    box = jnp.asarray(box, jnp.float32)
    if box.ndim < 2:
        raise ValueError(f"box_energy: box must be an image-shaped array of 0 / 1 (e.g. (1, H, W)); got "
                         f"shape {box.shape}.")
    return Energy(_box_energy, (box, jnp.float32(fill)))


def _tile_class_energy(module, size, params, x0):
    weights, label, position = params
    if x0.ndim != 3 or x0.shape[0] != 1 or min(x0.shape[1:]) < size:
        raise ValueError(f"tile_class_energy: x0 must be one channels-first (1, H, W) canvas with H, W >= {size}; "
                         f"got shape {x0.shape}.")
    tile = jax.lax.dynamic_slice(x0, (0, position[0], position[1]), (1, size, size))
    return _class_energy(module, (weights, label), jnp.moveaxis(tile, 0, -1))


def tile_class_energy(net: Net, label, position, size: int = 16) -> Energy:
    """``E(x0) = -log p(label | tile)`` under the digits classifier ``net``, where ``tile`` is the
    ``size x size`` window of a channels-first canvas ``x0 (1, H, W)`` whose top-left corner is
    ``position = (row, col)`` (clamped into the canvas, as ``lax.dynamic_slice`` does). The class
    condition of a canvas whose layout says where the digit goes. Params ``(net.params, label,
    position)``, all leaves: one compiled program serves every label and position."""
    position = jnp.asarray(position, jnp.int32)
    if position.shape != (2,):
        raise ValueError(f"tile_class_energy: position must be (row, col); got shape {position.shape}.")
    return Energy(static_partial(_tile_class_energy, net.module, int(size)), (net.params, label, position))
