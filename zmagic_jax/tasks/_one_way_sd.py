"""COW and SOW on Stable Diffusion folders: a visual condition (a face, an object) kept in its box of
a gray canvas while the prompt grows the rest of the image around it (:mod:`zmagic_jax.oneway`,
:mod:`zmagic_jax.modulation`).

The recipe, as released (``wangruoyu02/COW`` ``pipeline_COW.py``; defaults: 10 DDIM steps, levels
r = 5, b = 7, p = 4, C = 10 cycles, CFG 7.5, a 256 px seed on the 512 px canvas of SD 2.1-base):

1. The condition image is resized to the seed size (bilinear), its mask too (nearest, binarised);
   the mask's polarity is explicit (``keep``: the release keeps the mask's black region,
   ``keep="zeros"``).
2. A planner places it (:func:`~zmagic_jax.oneway.plan_layout`; the offline
   :func:`~zmagic_jax.oneway.default_planner` unless the user gives one) unless ``position`` is
   given; :func:`~zmagic_jax.oneway.seed_canvas` pastes it on a gray (0 in ``[-1, 1]``) canvas of
   the image size, the non-kept pixels gray as well.
3. The VAE encodes the canvas (the posterior mean). The latent region is the pixel region pooled
   to the latent grid: a latent cell is inside when at least half of its pixels are.
4. The anchors ``z_0 .. z_b`` are the DDIM inversion of the encoded canvas with the prompt and CFG
   (the release inverts with CFG too); the chain starts at ``z_r``
   (:func:`~zmagic_jax.oneway.one_way_chain`, vmapped over the seeds, key ``fold_in(PRNGKey(seed),
   1)``), then every final latent is decoded.
5. SOW (``modulate``): the cycles' denoiser carries the attention modulation of
   :func:`~zmagic_jax.modulation.region_modulations` for the condition region and the plan's
   related box (both pooled to the latent grid like the region), with cycle ``c``'s temporal
   decay (:func:`~zmagic_jax.modulation.at_cycle`); the inversion and the final pass run
   unmodulated, as in the embedded version (:mod:`zmagic_jax.tasks._one_way`).
6. ``masked_cfg``: the release's four-way guidance in the cycles (below).

All of it (encode, invert, every seed's chain, decode) is ONE compiled program whose arguments
carry the UNet / VAE weights, the prompt embeddings, the CFG scale, the canvas, the regions and the
modulation's numbers, so a new prompt, image, mask, position, scale or strength reuses it.

The release's masked four-way CFG (``sample_with_mask``; ``masked_cfg=True``): the cycles' UNet
call sees four prompts ``[negative, prompt, suppress, diverse]`` (defaults "a bad quality and low
resolution image,extra fingers,deformed hands", "human face", "a high quality and colorful
image"); with ``M`` the latent region,

    e_n' = M e_n + (1 - M) (e_n + e_s - e_d),    eps = e_n' + w (e_p - e_n'),

pushing the background away from a second face and toward a high-quality image. The inversion and
the final pass use plain CFG with ``negative_prompt`` (the release: empty).
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from zmagic_jax._io import atomic_output_dir
from zmagic_jax.contracts import Denoiser, Keyed, static_partial
from zmagic_jax.modulation import Modulation, at_cycle, box_mask, pool_mask, region_modulations
from zmagic_jax.models import StableDiffusion, attention_layers, encode_image, encode_prompt, latent_denoiser, \
    v_to_eps
from zmagic_jax.oneway import JUMPS, KEEP, PLAN_KINDS, Plan, default_planner, invert_levels, one_way, \
    one_way_chain, plan_layout, seed_canvas
from zmagic_jax.samplers import step_contexts
from zmagic_jax.tasks._aggregate import _decoded
from zmagic_jax.tasks._outputs import ASPECT_TOLERANCE, load_image, save_image_grid, save_png
from zmagic_jax.tasks._recipe import PROGRAMS, Programs, check_choice, check_int, check_positive, check_seeds, \
    model_grid, seed_keys

RELEASE_MASKED_PROMPTS = ("a bad quality and low resolution image,extra fingers,deformed hands", "human face",
                          "a high quality and colorful image")


def _size_pair(value, who: str, name: str):
    """``None``, or an int / two ints ``>= 1`` as ``(h, w)``."""
    if value is None:
        return None
    pair = (value, value) if isinstance(value, (int, np.integer)) and not isinstance(value, bool) else value
    try:
        pair = tuple(pair)
    except TypeError:
        pair = ()
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1 for v in pair):
        raise ValueError(f"{who}: {name} must be None, a positive integer or two (h, w); got {value!r}.")
    return tuple(int(v) for v in pair)


@dataclasses.dataclass(frozen=True)
class OneWaySettings:
    """Settings of one COW / SOW run on Stable Diffusion (recorded in metrics.json).

    prompt: the text the image grows from (a user planner may rewrite it).
    negative_prompt: CFG's unconditional prompt (inversion, final pass; the cycles too unless
      ``masked_cfg``).
    num_steps, cycles, replace, back, preserve, jump: the DDIM grid and COW's levels
      (:func:`~zmagic_jax.oneway.one_way`; ``None`` levels: the release's 0.5, 0.7, 0.4 N).
    cfg_scale: the CFG scale of every pass.
    seed_size: the condition's size in pixels on the canvas, an int or ``(h, w)``; default half
      the image's side (the release's 256 of 512).
    position: ``(row, col)`` of the condition's top-left pixel; ``None``: the planner places it.
    planner_kind: :func:`~zmagic_jax.oneway.default_planner`'s ``kind`` (``None``: from the prompt).
    keep: ``"ones"`` keeps the mask's white (1) pixels, ``"zeros"`` its black ones (the release).
    seeds: one image per seed; seed ``s`` uses ``PRNGKey(s)`` alone.
    modulate: SOW's attention modulation in the cycles, with ``modulation``'s settings.
    image_size: the canvas in pixels, an int or ``(H, W)``; default the model's native size (the
      UNet's sample_size times the VAE's factor).
    masked_cfg, masked_cfg_prompts: the release's four-way CFG in the cycles and its three extra
      prompts ``(negative, suppress, diverse)`` (module docstring).
    """

    prompt: str
    negative_prompt: str = ""
    num_steps: int = 10
    cycles: int = 10
    replace: Optional[int] = None
    back: Optional[int] = None
    preserve: Optional[int] = None
    jump: str = "level"
    cfg_scale: float = 7.5
    seed_size: Optional[object] = None
    position: Optional[tuple] = None
    planner_kind: Optional[str] = None
    keep: str = "ones"
    seeds: tuple = (0,)
    modulate: bool = False
    modulation: Modulation = Modulation()
    image_size: Optional[object] = None
    masked_cfg: bool = False
    masked_cfg_prompts: tuple = RELEASE_MASKED_PROMPTS

    def __post_init__(self):
        who = "OneWaySettings"
        if not isinstance(self.prompt, str) or not self.prompt.strip():
            raise ValueError(f"{who}: prompt must be a non-empty string; got {self.prompt!r}.")
        if not isinstance(self.negative_prompt, str):
            raise ValueError(f"{who}: negative_prompt must be a string; got {self.negative_prompt!r}.")
        check_int(self.num_steps, who, "num_steps", 2)
        check_int(self.cycles, who, "cycles", 0)
        check_choice(self.jump, JUMPS, who, "jump")
        try:
            self.levels()
        except ValueError as err:
            named = [n for n in ("replace", "back", "preserve") if getattr(self, n) is not None]
            raise ValueError(f"{who}: {' / '.join(['num_steps'] + named)}: {err}") from err
        check_positive(self.cfg_scale, who, "cfg_scale", zero=True)
        object.__setattr__(self, "seed_size", _size_pair(self.seed_size, who, "seed_size"))
        object.__setattr__(self, "image_size", _size_pair(self.image_size, who, "image_size"))
        if self.position is not None:
            position = tuple(self.position) if isinstance(self.position, (tuple, list)) else ()
            if len(position) != 2 or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 0
                                         for v in position):
                raise ValueError(f"{who}: position must be None (the planner places the condition) or (row, col), "
                                 f"two integers >= 0 in pixels; got {self.position!r}.")
            object.__setattr__(self, "position", tuple(int(v) for v in position))
        if self.planner_kind is not None:
            check_choice(self.planner_kind, PLAN_KINDS, who, "planner_kind")
        check_choice(self.keep, KEEP, who, "keep")
        object.__setattr__(self, "seeds", check_seeds(self.seeds, who))
        for name in ("modulate", "masked_cfg"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{who}: {name} must be True or False; got {getattr(self, name)!r}.")
        if not isinstance(self.modulation, Modulation):
            raise ValueError(f"{who}: modulation must be a zmagic_jax.modulation.Modulation; got "
                             f"{type(self.modulation).__name__}.")
        prompts = self.masked_cfg_prompts
        if isinstance(prompts, str) or not isinstance(prompts, (tuple, list)) or len(prompts) != 3 or \
                not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"{who}: masked_cfg_prompts must be three strings (negative, suppress, diverse); got "
                             f"{prompts!r}.")
        object.__setattr__(self, "masked_cfg_prompts", tuple(prompts))

    def levels(self):
        """COW's :func:`~zmagic_jax.oneway.one_way` settings."""
        return one_way(self.num_steps, replace=self.replace, back=self.back, preserve=self.preserve,
                       cycles=self.cycles, jump=self.jump)


# ----------------------------------------------------------------------------- the layout (host side)

def vae_factor(sd: StableDiffusion) -> int:
    """Pixels per latent cell along each side."""
    return 2 ** (len(sd.vae.config.block_out_channels) - 1)


def _centre_crop(array: np.ndarray, size) -> np.ndarray:
    """``array (h, w, ...)`` centre-cropped to the aspect ratio of ``size (H, W)``, by the rule of
    :func:`~zmagic_jax.tasks._outputs.load_image` (so an image file and its mask stay aligned)."""
    h, w = array.shape[:2]
    target = size[1] / size[0]
    if abs(w / h - target) <= ASPECT_TOLERANCE * target:
        return array
    crop_w, crop_h = (round(h * target), h) if w / h > target else (w, round(w / target))
    left, top = (w - crop_w) // 2, (h - crop_h) // 2
    return array[top:top + crop_h, left:left + crop_w]


def _resize(channels: np.ndarray, size, resample) -> np.ndarray:
    """``(h, w, c)`` float32 to ``(H, W, c)``, channel by channel in PIL's float mode."""
    from PIL import Image

    return np.stack([np.asarray(Image.fromarray(np.ascontiguousarray(channels[..., k], np.float32), "F").resize(
        (size[1], size[0]), resample), np.float32) for k in range(channels.shape[-1])], -1)


def _read_condition(image, mask, size):
    """The condition image ``(h, w, 3)`` in [-1, 1] and its 0/1 mask ``(h, w)`` at the seed size
    ``(h, w)``. ``image``: a file or an ``(H, W, 3)`` array in [-1, 1]; ``mask``: a file (grey
    levels / 255) or an ``(H, W)`` / ``(H, W, c)`` array in [0, 1], of the image's size."""
    from PIL import Image

    def source_size(value, what):
        if isinstance(value, (str, os.PathLike)):
            if not os.path.isfile(value):
                raise FileNotFoundError(f"{what} {os.fspath(value)!r} does not exist; give the path of a PNG or JPEG "
                                        "file.")
            try:
                with Image.open(value) as opened:
                    return opened.size[::-1], None
            except OSError as err:
                raise ValueError(f"{what} {os.fspath(value)!r} could not be read as an image ({err}).") from err
        array = np.asarray(value, np.float32)
        return array.shape[:2], array

    image_hw, image_array = source_size(image, "image")
    mask_hw, mask_array = source_size(mask, "mask")
    if tuple(mask_hw) != tuple(image_hw):
        raise ValueError(f"run_one_way: the mask is {mask_hw[0]} x {mask_hw[1]} (h x w) but the image "
                         f"{image_hw[0]} x {image_hw[1]}; the mask must mark the image's own pixels.")
    if image_array is None:
        condition = load_image(image, size, what="image")
    else:
        if image_array.ndim != 3 or image_array.shape[-1] != 3 or not np.all(np.isfinite(image_array)):
            raise ValueError(f"run_one_way: image must be a file or a finite (H, W, 3) array in [-1, 1]; got shape "
                             f"{image_array.shape}.")
        condition = _resize(_centre_crop(image_array, size), size, Image.BILINEAR)
    if mask_array is None:
        with Image.open(mask) as opened:
            mask_array = np.asarray(opened.convert("L"), np.float32) / 255.0
    if mask_array.ndim == 3:
        mask_array = mask_array.mean(-1)
    if mask_array.ndim != 2 or not np.all(np.isfinite(mask_array)):
        raise ValueError(f"run_one_way: mask must be a file or a finite (H, W) array in [0, 1]; got shape "
                         f"{mask_array.shape}.")
    kept = _resize(_centre_crop(mask_array, size)[..., None], size, Image.NEAREST)[..., 0]
    return condition.astype(np.float32), (kept > 0.5).astype(np.float32)


def _related_at(condition, mask, prompt, canvas, position, kind):
    """The related box when the user gives the position: the planner rule's related box moved
    with the condition (clipped to the canvas); the ``object`` rule's (the condition's
    surroundings, never empty) when that rule does not fit the canvas or nothing of it is left."""
    def moved(rule):
        try:
            planned = default_planner(condition, mask, prompt, canvas, kind=rule)
        except ValueError:
            return None
        dr, dc = position[0] - planned.condition_box[0], position[1] - planned.condition_box[1]
        top, left, bottom, right = planned.related_box
        box = (max(0, top + dr), max(0, left + dc), min(canvas[0], bottom + dr), min(canvas[1], right + dc))
        return box if box[0] < box[2] and box[1] < box[3] else None
    return moved(kind) or moved("object")


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where everything goes (host side, numpy): the ``condition`` ``(h, w, 3)`` and its kept
    ``mask`` ``(h, w)`` at the seed size, the ``plan``, the seed ``canvas`` ``(H, W, 3)``, the pixel
    ``region`` and ``related`` box ``(H, W)`` and both on the latent grid (``latent_region``,
    ``latent_related``, ``(H / f, W / f)``)."""

    condition: np.ndarray
    mask: np.ndarray
    plan: Plan
    canvas: np.ndarray
    region: np.ndarray
    related: np.ndarray
    latent_region: np.ndarray
    latent_related: np.ndarray


def one_way_layout(image, mask, settings: OneWaySettings, image_size, factor: int, *,
                   planner: Optional[Callable] = None) -> Layout:
    """The host-side part of :func:`run_one_way`, without a model: read and resize the condition
    and its mask, plan, paste on the gray canvas, pool the regions to the latent grid. ``image_size``
    ``(H, W)`` is the canvas, ``factor`` the VAE's (:func:`vae_factor`). Errors name the setting
    (``seed_size``, ``position``, ``keep``) or the input (``image``, ``mask``) at fault."""
    who = "run_one_way"
    height, width = image_size
    seed = settings.seed_size or (height // 2, width // 2)
    if seed[0] > height or seed[1] > width:
        raise ValueError(f"{who}: seed_size {seed[0]} x {seed[1]} is larger than the {height} x {width} image (the "
                         "condition must fit on the canvas); lower it.")
    condition, kept = _read_condition(image, mask, seed)
    chw = np.transpose(condition, (2, 0, 1))
    region_of_seed = kept if settings.keep == "ones" else 1.0 - kept
    if not region_of_seed.any():
        other = "zeros" if settings.keep == "ones" else "ones"
        raise ValueError(f"{who}: the mask keeps no pixel with keep={settings.keep!r} (it is all "
                         f"{'black' if settings.keep == 'ones' else 'white'} at the seed size); mark the condition "
                         f"or use keep={other!r}.")
    if settings.position is None:  # the planner sees the condition and its region (1 = kept)
        plan = plan_layout(chw, region_of_seed, settings.prompt, (height, width),
                           planner=planner or (lambda *a: default_planner(*a, kind=settings.planner_kind)))
    else:
        top, left = settings.position
        if top + seed[0] > height or left + seed[1] > width:
            raise ValueError(f"{who}: position {settings.position} puts the {seed[0]} x {seed[1]} condition outside "
                             f"the {height} x {width} canvas; rows must be 0..{height - seed[0]}, columns "
                             f"0..{width - seed[1]}.")
        related = _related_at(chw, region_of_seed, settings.prompt, (height, width), settings.position,
                              settings.planner_kind)
        plan = Plan(settings.prompt, (top, left, top + seed[0], left + seed[1]), related)
    try:
        canvas, region = seed_canvas(chw, kept, plan.condition_box[:2], (3, height, width), background=0.0,
                                     keep=settings.keep)
    except ValueError as err:
        raise ValueError(f"{who}: mask / seed_size: {err}") from err
    related = box_mask(plan.related_box, (height, width)).astype(np.float32)
    latent_hw = (height // factor, width // factor)
    latent_region, latent_related = pool_mask(region[0], latent_hw), pool_mask(related, latent_hw)
    if not latent_region.any():
        raise ValueError(f"{who}: the mask's region covers less than half of every {factor} x {factor} latent cell, "
                         "so no latent cell is kept; mark a larger region or raise seed_size.")
    if settings.modulate and not latent_related.any():
        raise ValueError(f"{who}: the plan's related box {plan.related_box} covers no {factor} x {factor} latent "
                         "cell (at least half); SOW needs one. Give a planner with a larger related box.")
    return Layout(condition, region_of_seed.astype(np.float32), plan, np.transpose(canvas, (1, 2, 0)), region[0],
                  related, latent_region, latent_related)


# ----------------------------------------------------------------------------- the program

def _masked_cfg(unet, params, x, t):
    """The release's four-way CFG of one latent (module docstring): one UNet call on four copies of
    ``x`` with the contexts ``[negative, prompt, suppress, diverse]``, ``M`` = ``params["region"]``."""
    unet = unet.value
    hwc = jnp.transpose(x, (1, 2, 0))
    out = unet.apply({"params": params["unet"]}, jnp.stack([hwc] * 4), jnp.broadcast_to(jnp.asarray(t, jnp.int32),
                     (4,)), params["context"], modifiers=params.get("modifiers"))
    negative, prompt, suppress, diverse = jnp.transpose(out, (0, 3, 1, 2)).astype(x.dtype)
    if "alphas_cumprod" in params:  # v-prediction: every branch to eps (affine, exact)
        ab = params["alphas_cumprod"][t].astype(x.dtype)
        negative, prompt, suppress, diverse = (v_to_eps(o, x, ab) for o in (negative, prompt, suppress, diverse))
    inside = params["region"].astype(x.dtype)
    base = inside * negative + (1.0 - inside) * (negative + suppress - diverse)
    return base + params["scale"] * (prompt - base)


def masked_cfg_denoiser(sd: StableDiffusion, embeds, guidance_scale, region, *, modifiers=None) -> Denoiser:
    """The release's masked four-way CFG as a :class:`~zmagic_jax.Denoiser` of one latent.
    ``embeds`` ``(4, L, D)``: the ``[negative, prompt, suppress, diverse]`` prompts' embeddings;
    ``region`` ``(h, w)``: 1 on the condition's latent cells. Weights, embeddings, scale, region and
    ``modifiers`` (SOW) are leaves of the params."""
    embeds = jnp.asarray(embeds)
    if embeds.ndim != 3 or embeds.shape[0] != 4:
        raise ValueError(f"masked_cfg_denoiser: embeds must be (4, L, D): negative, prompt, suppress, diverse; got "
                         f"shape {embeds.shape}.")
    params = {"unet": sd.unet_params, "context": embeds, "scale": guidance_scale,
              "region": jnp.asarray(region, jnp.float32)}
    if sd.prediction_type == "v_prediction":
        params["alphas_cumprod"] = jnp.asarray(sd.schedule.alphas_cumprod)
    if modifiers:
        params["modifiers"] = dict(modifiers)
    return Denoiser(static_partial(_masked_cfg, Keyed(sd.unet, repr(sd.unet))), params)


def _encoded(vae, scaling_factor, params, image):
    sd = StableDiffusion(None, None, vae.value, params, None, None, None, None, scaling_factor)
    return encode_image(sd, image)


def _one_way_program(keys, canvas, region, contexts, denoiser, cycle_denoiser, settings, vae_params, *, vae,
                     scaling_factor):
    """Encode the canvas, invert it to level b (the anchors), run every seed's chain from level r
    (``cycle_denoiser``: the cycles' own, with the cycle's temporal decay; ``None``: ``denoiser``),
    decode. Returns ``(anchors, latents, preserved, images, reconstruction)``: ``preserved`` each
    chain's state right after the final paste at level p, ``reconstruction`` the decoded
    anchor ``z_0`` (the VAE's own round trip of the canvas)."""
    encode = static_partial(_encoded, vae, scaling_factor)
    decode = static_partial(_decoded, vae, scaling_factor)
    anchors = invert_levels(encode(vae_params, canvas), contexts, settings.back, denoiser=denoiser)
    cycles = None if cycle_denoiser is None else (lambda c: at_cycle(cycle_denoiser, c))

    def one(key):
        x, info = one_way_chain(jax.random.fold_in(key, 1), anchors[settings.replace], anchors, region, contexts,
                                denoiser=denoiser, settings=settings, cycle_denoiser=cycles, record=True)
        return x, info.preserved, decode(vae_params, x)

    latents, preserved, images = jax.vmap(one)(keys)
    return anchors, latents, preserved, images, decode(vae_params, anchors[0])


def image_size_of(sd: StableDiffusion, settings: OneWaySettings) -> tuple:
    """The canvas ``(H, W)`` in pixels: ``settings.image_size`` or the model's native size, checked
    to be a multiple of the VAE factor times the UNet's downsampling."""
    factor = vae_factor(sd)
    size = settings.image_size or (int(sd.sample_size) * factor,) * 2
    step = factor * 2 ** (len(sd.unet.config.block_out_channels) - 1)
    if size[0] % step or size[1] % step:
        raise ValueError(f"run_one_way: image_size {size[0]} x {size[1]} must be a multiple of {step} (the VAE's "
                         f"factor {factor} times the UNet's downsampling).")
    return size


def run_one_way(sd: StableDiffusion, image, mask, settings: OneWaySettings, *, planner: Optional[Callable] = None,
                progress: Optional[Callable[[str], None]] = None, programs: Optional[Programs] = None,
                compiler_options: Optional[dict] = None) -> dict:
    """COW (or SOW with ``settings.modulate``) on a loaded Stable Diffusion, every seed in one
    compiled program (module docstring).

    ``image``: a file or an ``(H, W, 3)`` array in ``[-1, 1]``; ``mask`` a file or an ``(H, W)``
    array in ``[0, 1]`` of the same size (``settings.keep`` says which pixels are the
    condition). ``planner``: :func:`~zmagic_jax.oneway.plan_layout`'s hook (used unless
    ``settings.position`` is given). ``progress(label)`` is called after each stage.
    ``compiler_options`` are passed to XLA.

    Returns a dict: ``images`` ``(S, H, W, 3)`` in ``[-1, 1]``, ``latents`` ``(S, c, h, w)``,
    ``preserved`` (each chain right after the final paste at level p), ``anchors`` ``(b + 1, c, h,
    w)``, ``layout`` (:class:`Layout`), ``plan``, ``levels`` ``(r, b, p)``, ``metrics`` per seed
    (``region_error``: mean ``|image - canvas|`` over the pixel region's pixels and channels),
    ``region_error_floor`` (the VAE's own round trip of the canvas, the same measure),
    ``compile_s``, ``run_s`` and the ``settings``.
    """
    if sd.extra_channels:
        raise ValueError(f"run_one_way: this UNet takes {sd.extra_channels} conditioning channel(s) (an inpainting "
                         "model); COW needs a plain text-to-image model.")
    if sd.vae is None:
        raise ValueError("run_one_way: this is a pixel-space model (no vae/ folder); the recipe encodes the canvas "
                         "with a VAE (the embedded canvas models run with zmagic one-way --embedded).")
    programs = PROGRAMS if programs is None else programs
    factor = vae_factor(sd)
    size = image_size_of(sd, settings)
    layout = one_way_layout(image, mask, settings, size, factor, planner=planner)
    if progress is not None:
        progress("plan")
    cow = settings.levels()
    grid = model_grid(sd.schedule, settings.num_steps, "OneWaySettings")
    contexts = step_contexts(sd.schedule, grid)
    prompt = layout.plan.prompt
    scale = jnp.float32(settings.cfg_scale)
    cond, uncond = encode_prompt(sd, [prompt, settings.negative_prompt])
    denoiser = latent_denoiser(sd, cond, uncond, scale)
    latent_hw = layout.latent_region.shape
    modifiers = region_modulations(attention_layers(sd.unet.config, latent_hw), layout.latent_region,
                                   layout.latent_related, settings.modulation) if settings.modulate else None
    if settings.masked_cfg:
        negative, suppress, diverse = settings.masked_cfg_prompts
        embeds = encode_prompt(sd, [negative, prompt, suppress, diverse])
        cycle_denoiser = masked_cfg_denoiser(sd, embeds, scale, layout.latent_region, modifiers=modifiers)
    elif settings.modulate:
        cycle_denoiser = latent_denoiser(sd, cond, uncond, scale, modifiers=modifiers)
    else:
        cycle_denoiser = None
    args = (seed_keys(settings.seeds), jnp.asarray(layout.canvas), jnp.asarray(layout.latent_region), contexts,
            denoiser, cycle_denoiser, cow, sd.vae_params)
    static = {"vae": Keyed(sd.vae, repr(sd.vae)), "scaling_factor": float(sd.vae_scaling_factor)}
    (anchors, latents, preserved, images, reconstruction), compile_s, run_s = programs.call(
        _one_way_program, args, static, compiler_options)
    if progress is not None:
        progress("sample")
    if not np.all(np.isfinite(latents)):
        bad = sorted({int(settings.seeds[s]) for s in np.argwhere(~np.isfinite(latents))[:, 0]})
        raise FloatingPointError(f"run_one_way: non-finite latents for seeds {bad}. Lower the CFG scale or the "
                                 "modulation's strengths.")
    inside = layout.region > 0.5
    error = lambda im: float(np.abs(np.asarray(im, np.float64) - layout.canvas)[inside].mean())
    metrics = [{"seed": int(seed), "region_error": error(np.clip(images[i], -1, 1))}
               for i, seed in enumerate(settings.seeds)]
    return {"settings": settings, "layout": layout, "plan": layout.plan,
            "levels": (cow.replace, cow.back, cow.preserve), "images": np.clip(images, -1.0, 1.0),
            "latents": latents, "preserved": preserved, "anchors": anchors, "metrics": metrics,
            "region_error_floor": error(np.clip(reconstruction, -1, 1)), "compile_s": compile_s, "run_s": run_s}


# ----------------------------------------------------------------------------- outputs

def one_way_report(result: dict) -> dict:
    """The JSON-ready report of :func:`run_one_way`: settings, resolved levels and sizes, the plan,
    per-seed metrics and files, timings."""
    settings, layout = result["settings"], result["layout"]
    r, b, p = result["levels"]
    plan = layout.plan
    return {"settings": dataclasses.asdict(settings), "prompt": plan.prompt,
            "levels": {"replace": r, "back": b, "preserve": p},
            "image_size": list(layout.canvas.shape[:2]), "seed_size": list(layout.condition.shape[:2]),
            "latent_size": list(layout.latent_region.shape),
            "plan": {"condition_box": list(plan.condition_box), "related_box": list(plan.related_box)},
            "region_pixels": int(layout.region.sum()), "region_latent_cells": int(layout.latent_region.sum()),
            "metrics": [dict(m, file=f"seed{m['seed']}.png") for m in result["metrics"]],
            "region_error_floor": result["region_error_floor"],
            "metric_notes": {"region_error": "mean |image - seed canvas| over the condition region's pixels and "
                                             "channels, in [-1, 1] units",
                             "region_error_floor": "the same for the VAE's own decode(encode(canvas))"},
            "compile_s": round(result["compile_s"], 3), "run_s": round(result["run_s"], 3)}


def _layout_image(layout: Layout) -> np.ndarray:
    """The canvas with the related box tinted blue and the condition region's border red."""
    image = layout.canvas.copy()
    related = layout.related > 0.5
    image[related] = 0.6 * image[related] + 0.4 * np.array([-1.0, -0.2, 1.0])
    inside = layout.region > 0.5
    border = inside & ~(np.roll(inside, 1, 0) & np.roll(inside, -1, 0) & np.roll(inside, 1, 1)
                        & np.roll(inside, -1, 1))
    image[border] = np.array([1.0, -1.0, -1.0])
    return image


def save_one_way(out_dir, result: dict, *, overwrite: bool = False) -> dict:
    """Write ``seed<S>.png`` per seed, ``canvas.png`` (the seed canvas), ``grid.png`` (the canvas,
    the layout, every seed) and ``metrics.json`` into ``out_dir``, built in a staging folder and
    swapped in at the end (:func:`~zmagic_jax._io.atomic_output_dir`). Returns the report."""
    report = one_way_report(result)
    settings, layout = result["settings"], result["layout"]
    with atomic_output_dir(out_dir, overwrite=overwrite, command="one-way") as tmp:
        tmp = Path(tmp)
        for i, seed in enumerate(settings.seeds):
            save_png(tmp / f"seed{seed}.png", result["images"][i])
        save_png(tmp / "canvas.png", layout.canvas)
        method = "SOW" if settings.modulate else "COW"
        save_image_grid(tmp / "grid.png", [(method, [layout.canvas, _layout_image(layout), *result["images"]])],
                        column_titles=["seed canvas", "layout"] + [f"seed {s}" for s in settings.seeds],
                        title=f"{method}: \"{report['prompt']}\" (DDIM {settings.num_steps}, C = {settings.cycles})")
        (tmp / "metrics.json").write_text(json.dumps(report, indent=2, allow_nan=False))
    return report
