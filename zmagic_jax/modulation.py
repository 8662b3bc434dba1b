"""SOW: selective one-way diffusion's dynamic attention modulation, on self-attention scores.

SOW (Pei et al., "SOWing Information", arXiv 2411.19182) keeps COW's disturb-and-reconstruct
cycles (:mod:`zmagic_jax.oneway`) and also steers the UNet's self-attention: it *suppresses* the
attention from the condition region to the rest of the canvas (the condition's features stay its
own) and *enhances* the attention from the condition-related region (the "guiding box", e.g. the
body below a face) to the condition region (the rest grows from the condition). The paper's
equations did not survive in our copy, so this module is a reconstruction on the closest public
template, DenseDiffusion's min-max modulation (Kim et al. 2023), and every choice below is ours.

For one self-attention layer with scores ``S = q k^T / sqrt(d)`` ``(B, H, Lq, Lk)``, per query row
``S_max = max_k S``, ``S_min = min_k S``:

    S' = S + tau * gate * (E (S_max - S) - U (S - S_min))

* ``E[q, k] = w_e s_r d(q) 1[q in related] 1[k in condition]`` (enhancement: moves the scores of
  condition keys toward the row's maximum), ``U[q, k] = w_s s_c 1[q in condition] 1[k not in
  condition]`` (suppression: moves the scores of the other keys toward the row's minimum);
  ``w_e``, ``w_s`` the strengths, ``s = 1 - size_reg * area / (h w)`` DenseDiffusion's size factor
  of the query's region (condition ``s_c``, related ``s_r``).
* spatial decay ``d(q) = exp(-dist(q, centre) / spatial_scale)``: the enhancement fades with the
  distance of the query from the condition region's centre (distances in canvas widths).
* temporal decay ``tau = decay ** c`` in cycle ``c = 0 .. C - 1`` (:func:`at_cycle`): the
  modulation is strongest in the first cycle and fades as the canvas settles. The final pass
  (after the cycles) runs unmodulated.
* the indicator ``gate``: the queries of the related region closest to the condition's centre
  (the closest fifth, at least one) are probed; if their attention mass on the condition keys
  (softmax of the unmodified ``S``, mean over heads and probed queries) already reaches
  ``threshold``, the sample's modulation at that layer is off (gate 0), else on (gate 1).

Each part has a switch in :class:`Modulation` (``suppress``, ``enhance``, ``temporal_decay``,
``spatial_decay``, ``indicator``), so the paper's ablation is one flag each; switching a part off
sets its factor to exactly 0 or 1. Region masks are brought to each layer's resolution by
averaging the canvas-resolution mask over the layer's cells and keeping cells at least half
inside. All numbers are leaves of :class:`RegionModulation` (one compiled program for every
strength, box and cycle); with both strengths 0 the added term is exactly 0, so the scores are
unchanged bit for bit (``s + 0 == s``).
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from zmagic_jax._pytree import pytree_dataclass
from zmagic_jax.contracts import Denoiser


@dataclasses.dataclass(frozen=True)
class Modulation:
    """SOW's modulation settings (module docstring for the formula; defaults ours, see the README).

    Attributes:
      suppress, enhance, temporal_decay, spatial_decay, indicator: the switches of the ablation.
      suppress_strength, enhance_strength: ``w_s``, ``w_e`` (DenseDiffusion's self-attention
        weight is 0.3).
      decay: the temporal decay's ratio per cycle (``tau = decay ** c``).
      spatial_scale: the spatial decay's length, in canvas widths.
      threshold: the indicator's attention mass above which a layer's modulation stops.
      size_reg: DenseDiffusion's size regularisation (0: no size factor).
      layers: which self-attention layers: ``"all"``, or a tuple of resolutions (ints, e.g.
        ``(16,)``) to restrict to.
    """

    suppress: bool = True
    enhance: bool = True
    temporal_decay: bool = True
    spatial_decay: bool = True
    indicator: bool = True
    suppress_strength: float = 0.3
    enhance_strength: float = 0.3
    decay: float = 0.8
    spatial_scale: float = 0.5
    threshold: float = 0.5
    size_reg: float = 1.0
    layers: object = "all"

    def __post_init__(self):
        who = "Modulation"
        for name in ("suppress", "enhance", "temporal_decay", "spatial_decay", "indicator"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{who}: {name} must be True or False; got {getattr(self, name)!r}.")
        for name, low, high in (("suppress_strength", 0.0, None), ("enhance_strength", 0.0, None),
                                ("decay", 0.0, 1.0), ("spatial_scale", 0.0, None), ("threshold", 0.0, 1.0),
                                ("size_reg", 0.0, 1.0)):
            value = getattr(self, name)
            ok = (not isinstance(value, bool) and isinstance(value, (int, float, np.floating, np.integer))
                  and np.isfinite(value) and value >= low and (high is None or value <= high))
            if not ok or (name == "spatial_scale" and value == 0):
                bounds = f"in [{low:g}, {high:g}]" if high is not None else f">= {low:g}"
                raise ValueError(f"{who}: {name} must be a finite number {bounds}"
                                 f"{' and > 0' if name == 'spatial_scale' else ''}; got {value!r}.")
        if self.layers != "all" and not (isinstance(self.layers, tuple) and self.layers
                                         and all(isinstance(v, int) and v > 0 for v in self.layers)):
            raise ValueError(f"{who}: layers must be 'all' or a tuple of layer resolutions (e.g. (16,)); "
                             f"got {self.layers!r}.")


@pytree_dataclass(static=("indicator",))
class RegionModulation:
    """One self-attention layer's SOW modulation, a score modifier (``__call__(scores) -> added
    scores``, see :func:`zmagic_jax.models.attention`). Built by :func:`region_modulations`.

    Attributes (leaves; ``Lq = Lk = h w`` positions of the layer, row-major):
      enhance_rows: ``w_e s_r d(q)`` on the related region's queries, 0 elsewhere ``(Lq,)``.
      suppress_rows: ``w_s s_c`` on the condition region's queries, 0 elsewhere ``(Lq,)``.
      condition_keys: 1 on the condition region's keys, 0 elsewhere ``(Lk,)``.
      probe_rows: the indicator's probed queries, weights summing to 1 ``(Lq,)``.
      decay, cycle: ``tau = decay ** cycle`` (:func:`at_cycle` sets the cycle).
      threshold: the indicator's threshold.
      indicator: static, whether the indicator gates the modulation.
    """

    enhance_rows: jnp.ndarray
    suppress_rows: jnp.ndarray
    condition_keys: jnp.ndarray
    probe_rows: jnp.ndarray
    decay: jnp.ndarray
    cycle: jnp.ndarray
    threshold: jnp.ndarray
    indicator: bool = True

    def __call__(self, scores):
        if scores.shape[-2:] != (self.enhance_rows.shape[0], self.condition_keys.shape[0]):
            raise ValueError(f"RegionModulation: this layer's modulation is for {self.enhance_rows.shape[0]} queries "
                             f"x {self.condition_keys.shape[0]} keys; the scores are {scores.shape[-2:]} (a "
                             "modulation built for another layer or canvas size).")
        keys = self.condition_keys.astype(scores.dtype)
        top = jnp.max(scores, -1, keepdims=True) - scores
        bottom = scores - jnp.min(scores, -1, keepdims=True)
        added = (self.enhance_rows[:, None] * keys) * top - (self.suppress_rows[:, None] * (1.0 - keys)) * bottom
        added = (self.decay ** self.cycle) * added
        if self.indicator:
            probs = jax.nn.softmax(scores, axis=-1)
            mass = jnp.einsum("bhqk,q,k->b", probs, self.probe_rows.astype(scores.dtype), keys) / scores.shape[1]
            added = added * (mass < self.threshold).astype(scores.dtype)[:, None, None, None]
        return added


def pool_mask(mask, size) -> np.ndarray:
    """A 0/1 ``mask (H, W)`` on a coarser grid ``size (h, w)`` (dividing ``(H, W)``): a cell is
    inside when at least half of its pixels are (float32)."""
    mask = np.asarray(mask)
    big_h, big_w = mask.shape
    h, w = (int(v) for v in size)
    cells = mask.reshape(h, big_h // h, w, big_w // w).mean((1, 3))
    return (cells >= 0.5).astype(np.float32)


def _check_mask(mask, who: str, name: str) -> np.ndarray:
    mask = np.asarray(mask, np.float64)
    if mask.ndim != 2 or not np.all((mask == 0) | (mask == 1)):
        raise ValueError(f"{who}: {name} must be a 0/1 array (H, W) at the canvas's resolution; got "
                         f"{mask.dtype} {mask.shape}.")
    if not mask.any():
        raise ValueError(f"{who}: {name} is empty; mark its region with ones.")
    return mask


def box_mask(box, size) -> np.ndarray:
    """A 0/1 ``size (H, W)`` mask, 1 inside ``box = (top, left, bottom, right)`` (bottom/right
    exclusive)."""
    top, left, bottom, right = (int(v) for v in box)
    height, width = (int(v) for v in size)
    if not (0 <= top < bottom <= height and 0 <= left < right <= width):
        raise ValueError(f"box_mask: box (top, left, bottom, right) = {tuple(box)} must lie inside the "
                         f"{height} x {width} canvas with top < bottom and left < right.")
    mask = np.zeros((height, width), np.float64)
    mask[top:bottom, left:right] = 1.0
    return mask


def region_modulation(condition, related, resolution, settings: Modulation, *, cycle=0.0) -> RegionModulation:
    """The :class:`RegionModulation` of one self-attention layer at ``resolution (h, w)`` (which
    must divide the canvas's), for the ``condition`` region and the ``related`` region, 0/1 masks
    ``(H, W)`` at the canvas's resolution (pixels, or latent cells of a latent model)."""
    who = "region_modulation"
    condition = _check_mask(condition, who, "condition")
    related = _check_mask(related, who, "related")
    if related.shape != condition.shape:
        raise ValueError(f"{who}: related must have the condition's shape {condition.shape}; got {related.shape}.")
    h, w = (int(v) for v in resolution)
    big_h, big_w = condition.shape
    if big_h % h or big_w % w:
        raise ValueError(f"{who}: the layer's resolution {(h, w)} must divide the canvas's {(big_h, big_w)}.")
    cond, rel = pool_mask(condition, (h, w)), pool_mask(related, (h, w))
    rows, cols = np.nonzero(condition)
    centre = ((rows.mean() + 0.5) / big_h, (cols.mean() + 0.5) / big_w)
    grid_r, grid_c = np.meshgrid((np.arange(h) + 0.5) / h, (np.arange(w) + 0.5) / w, indexing="ij")
    dist = np.hypot(grid_r - centre[0], grid_c - centre[1]).ravel()
    size = lambda m: 1.0 - settings.size_reg * m.sum() / m.size
    spatial = np.exp(-dist / settings.spatial_scale) if settings.spatial_decay else np.ones_like(dist)
    enhance = (settings.enhance_strength * size(rel) * spatial * rel.ravel()) if settings.enhance else 0 * dist
    suppress = (settings.suppress_strength * size(cond) * cond.ravel()) if settings.suppress else 0 * dist
    probe = np.zeros(h * w)
    inside = np.flatnonzero(rel.ravel())
    if inside.size:
        count = max(1, int(np.ceil(inside.size / 5)))
        closest = inside[np.argsort(dist[inside], kind="stable")[:count]]
        probe[closest] = 1.0 / count
    f32 = lambda a: jnp.asarray(a, jnp.float32)
    return RegionModulation(f32(enhance), f32(suppress), f32(cond.ravel()), f32(probe),
                            f32(settings.decay if settings.temporal_decay else 1.0), f32(cycle),
                            f32(settings.threshold), bool(settings.indicator and inside.size))


def region_modulations(layers: Sequence, condition, related, settings: Modulation = Modulation()) -> dict:
    """``{layer name: RegionModulation}`` for the self-attention layers of ``layers``
    (:func:`~zmagic_jax.models.attention_layers`) that ``settings.layers`` selects: the UNet's
    ``modifiers`` (pass them to :func:`~zmagic_jax.models.latent_denoiser`)."""
    chosen = [layer for layer in layers if layer.kind == "self"
              and (settings.layers == "all" or layer.resolution[0] in settings.layers)]
    if not chosen:
        raise ValueError(f"region_modulations: no self-attention layer matches layers={settings.layers!r}; the "
                         f"model has self-attention at {sorted({l.resolution for l in layers if l.kind == 'self'})}.")
    return {layer.name: region_modulation(condition, related, layer.resolution, settings) for layer in chosen}


def at_cycle(denoiser: Denoiser, cycle) -> Denoiser:
    """``denoiser`` with every :class:`RegionModulation` in its params set to cycle ``cycle``
    (traced is fine): the temporal decay of cycle ``c`` (use as :func:`~zmagic_jax.one_way_chain`'s
    ``cycle_denoiser=lambda c: at_cycle(den, c)``)."""
    def set_cycle(leaf):
        if isinstance(leaf, RegionModulation):
            return leaf.replace(cycle=jnp.asarray(cycle, leaf.cycle.dtype))
        return leaf
    params = jax.tree_util.tree_map(set_cycle, denoiser.params, is_leaf=lambda v: isinstance(v, RegionModulation))
    return Denoiser(denoiser.apply, params)


def strip_modulation(denoiser: Denoiser) -> Denoiser:
    """``denoiser`` without the ``modifiers`` of its params (SOW's unmodulated final pass)."""
    if not isinstance(denoiser.params, dict) or "modifiers" not in denoiser.params:
        return denoiser
    params = dict(denoiser.params)
    del params["modifiers"]
    return Denoiser(denoiser.apply, params)
