"""COW: cyclic one-way diffusion, a visual condition kept pixel-exact while the image grows around it.

COW (Wang et al., ICLR 2024, "Cyclic One-Way Diffusion") pastes a visual condition (a face, an
object, a piece of a digit) into a box of a gray canvas and generates the rest from a prompt,
training-free. The information flows one way, from the condition to the rest: the condition's
own DDIM-inverted trajectory is written back into its region after every step of a short
"disturb and reconstruct" cycle, so the region stays what it was while the rest of the canvas is
re-noised and regrown around it C times.

Levels. On a grid of N steps (:func:`~zmagic_jax.timestep_grid`), level ``k`` is the noise level
after ``N - k`` sampling steps: level ``N`` is the grid's first timestep, level 0 clean data
(:func:`levels`). Denoising from level ``k`` to ``k - 1`` is grid step ``N - k``.

The algorithm (the released ``pipeline_COW.py``, with its parameters; defaults N = 10,
``replace`` r = 5, ``back`` b = 7, ``preserve`` p = 4, C = 10):

1. :func:`seed_canvas` pastes the condition into its box; :func:`invert_levels` the condition (pasted on the gray canvas) from level 0 to b, keeping
   every level: the anchors ``z_0 .. z_b``; invert the whole canvas to level r: the start ``x``.
2. C cycles (:func:`one_way_chain`, one ``lax.scan``): jump from level r to b with fresh noise
   (:func:`noise_jump`, the exact forward transition), paste ``z_b`` inside the mask, then for
   ``k = b .. r + 1`` denoise ``k -> k - 1`` and paste ``z_{k-1}``.
3. Final pass: denoise r -> p, paste ``z_p`` (visual-condition preservation), denoise p -> 0.

Pasting is ``where(mask, z_k, x)`` (:func:`paste`): after every paste the condition region equals
the stored anchor bit for bit. The cycles' DDIM steps are stochastic with the noise term really
applied (the library's :func:`~zmagic_jax.ddim`; eta 1.0 in the cycles and 0.1 in the final pass,
as released; diffusers' Flax DDIM scheduler accepts ``eta`` but adds no noise).

Deviations from the release, each an option:

* ``jump="level"`` (default) jumps between the levels the states are at (``ab_b / ab_r``); the
  release (``jump="released"``) reads both alpha-bars one level higher (its inverse scheduler's
  timesteps ``r + 1``, ``b + 1``: ``ab_701 / ab_501`` where the latent sits at 401 and the next
  step starts at 601), a slightly larger jump. The default is level-consistent so that C = 0 and
  the exact testbed mean what they say.
* inversion evaluates the denoiser at the target level (``at="target"``, diffusers' inverse
  scheduler, the release) or at the current point (``at="source"``, :func:`~zmagic_jax.ddim_invert`).

Every function is pure and un-jitted, for one sample (vmap over seeds).
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from zmagic_jax._pytree import pytree_dataclass
from zmagic_jax.contracts import Denoiser
from zmagic_jax.samplers import Sampler, StepContext, ddim
from zmagic_jax.schedules import x0_from_eps

JUMPS = ("level", "released")
INVERT_AT = ("target", "source")


class Levels(NamedTuple):
    """Per level ``k = 0 .. N``: its timestep ``t`` (``-1`` = clean) and ``alpha_bar``."""

    t: jnp.ndarray
    alpha_bar: jnp.ndarray


def levels(contexts: StepContext) -> Levels:
    """The ``N + 1`` levels of the grid whose stacked contexts are ``contexts``
    (:func:`~zmagic_jax.step_contexts`): level ``k`` is where grid step ``N - k`` starts, level 0
    where the last step ends."""
    return Levels(jnp.concatenate([contexts.t_next[-1:], contexts.t[::-1]]),
                  jnp.concatenate([contexts.alpha_bar_next[-1:], contexts.alpha_bar[::-1]]))


@pytree_dataclass(static=("replace", "back", "preserve", "cycles", "jump"))
class OneWay:
    """COW's settings (:func:`one_way`): the levels and the cycle count are static (they shape the
    loops), the samplers' numbers (their ``eta``) are leaves.

    Attributes:
      replace, back, preserve: the levels r, b, p (``0 <= p <= r < b <= N``): cycles run between
        r and b, the final pass pastes once more at p.
      cycles: C, the number of disturb-and-reconstruct cycles (0: no cycle).
      jump: ``"level"`` or ``"released"`` (module docstring).
      cycle_sampler, final_sampler: the samplers of the cycles' and of the final pass's steps.
    """

    replace: int
    back: int
    preserve: int
    cycles: int
    jump: str
    cycle_sampler: Sampler
    final_sampler: Sampler


def one_way(num_steps: int = 10, *, replace: Optional[int] = None, back: Optional[int] = None,
            preserve: Optional[int] = None, cycles: int = 10, jump: str = "level", cycle_eta=1.0,
            final_eta=0.1) -> OneWay:
    """COW's settings on a grid of ``num_steps`` steps; the levels default to the release's
    ``floor(0.5 N)``, ``floor(0.7 N)`` and ``floor(0.4 N)`` (5, 7, 4 for N = 10)."""
    who = "one_way"
    if isinstance(num_steps, bool) or not isinstance(num_steps, (int, np.integer)) or num_steps < 2:
        raise ValueError(f"{who}: num_steps must be an integer >= 2; got {num_steps!r}.")
    r = int(0.5 * num_steps) if replace is None else replace
    b = int(0.7 * num_steps) if back is None else back
    p = int(0.4 * num_steps) if preserve is None else preserve
    for name, value in (("replace", r), ("back", b), ("preserve", p), ("cycles", cycles)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise ValueError(f"{who}: {name} must be a non-negative integer; got {value!r}.")
    if not p <= r < b <= num_steps:
        raise ValueError(f"{who}: the levels must satisfy 0 <= preserve <= replace < back <= num_steps; got "
                         f"preserve={p}, replace={r}, back={b}, num_steps={num_steps}.")
    if jump not in JUMPS:
        raise ValueError(f"{who}: jump must be one of {', '.join(JUMPS)}; got {jump!r}.")
    if jump == "released" and b + 1 > num_steps:
        raise ValueError(f"{who}: jump='released' reads level back + 1 = {b + 1}, above the grid's {num_steps}; "
                         "lower back or use jump='level'.")
    return OneWay(int(r), int(b), int(p), int(cycles), jump, ddim(cycle_eta), ddim(final_eta))


KEEP = ("ones", "zeros")


def seed_canvas(condition, mask, position, canvas_shape, *, background=0.0, keep: str = "ones"):
    """COW's seed initialisation: the visual condition pasted into a canvas of ``background``.

    Args:
      condition: ``(C, h, w)`` channels first (an image in [-1, 1], or a latent), already at the
        seed size.
      mask: ``(h, w)`` (or ``(C, h, w)``, channels equal) marking the condition region; which values
        are kept is explicit: ``keep="ones"`` keeps where the mask is 1 (> 0.5), ``keep="zeros"``
        where it is 0 (the release's masks: black on the face, white around it).
      position: ``(row, col)`` of the condition's top-left corner on the canvas.
      canvas_shape: ``(C, H, W)``.
      background: the canvas's value outside the condition region (the release: gray, 0 in
        [-1, 1]; a digits canvas is -1), also painted over the condition's non-kept pixels.

    Returns ``(canvas (C, H, W), region (C, H, W))``, region 1 where the condition is kept. Host-side
    (numpy): errors name the argument (empty or full region, wrong mask size, a box outside the
    canvas, a condition larger than it).
    """
    who = "seed_canvas"
    condition = np.asarray(condition, np.float32)
    if condition.ndim != 3:
        raise ValueError(f"{who}: condition must be (C, h, w) channels first; got shape {condition.shape}.")
    c, h, w = condition.shape
    shape = tuple(int(v) for v in canvas_shape)
    if len(shape) != 3 or shape[0] != c:
        raise ValueError(f"{who}: canvas_shape must be (C, H, W) with the condition's {c} channels; got {canvas_shape}.")
    if h > shape[1] or w > shape[2]:
        raise ValueError(f"{who}: the condition ({h} x {w}) is larger than the canvas ({shape[1]} x {shape[2]}); "
                         "resize it to the seed size first.")
    mask = np.asarray(mask, np.float32)
    if mask.ndim == 3:
        if mask.shape[0] != c or not np.all(mask == mask[:1]):
            raise ValueError(f"{who}: a (C, h, w) mask must have the condition's {c} channels, all equal; got shape "
                             f"{mask.shape}.")
        mask = mask[0]
    if mask.shape != (h, w):
        raise ValueError(f"{who}: mask must be (h, w) = ({h}, {w}), the condition's size; got shape {mask.shape}.")
    if keep not in KEEP:
        raise ValueError(f"{who}: keep must be 'ones' (keep where the mask is 1) or 'zeros' (where it is 0, the "
                         f"release's convention); got {keep!r}.")
    kept = mask > 0.5 if keep == "ones" else mask <= 0.5
    if not kept.any():
        raise ValueError(f"{who}: the mask keeps no pixel with keep={keep!r}; check the mask's polarity (keep="
                         f"{'zeros' if keep == 'ones' else 'ones'!r}?).")
    position = tuple(position)
    if len(position) != 2 or not all(isinstance(v, (int, np.integer)) for v in position):
        raise ValueError(f"{who}: position must be (row, col) integers; got {position!r}.")
    r0, c0 = int(position[0]), int(position[1])
    if r0 < 0 or c0 < 0 or r0 + h > shape[1] or c0 + w > shape[2]:
        raise ValueError(f"{who}: the box at {position} of size {h} x {w} leaves the {shape[1]} x {shape[2]} canvas; "
                         f"rows must be 0..{shape[1] - h}, columns 0..{shape[2] - w}.")
    canvas = np.full(shape, background, np.float32)
    region = np.zeros(shape, np.float32)
    canvas[:, r0:r0 + h, c0:c0 + w] = np.where(kept, condition, background)
    region[:, r0:r0 + h, c0:c0 + w] = kept
    if region.all():
        raise ValueError(f"{who}: the condition region covers the whole canvas: nothing is left to generate.")
    return canvas, region


def _segment(contexts: StepContext, first: int, stop: int) -> StepContext:
    return jax.tree_util.tree_map(lambda a: a[first:stop], contexts)


def invert_levels(x0, contexts: StepContext, upto: int, *, denoiser: Denoiser, at: str = "target"):
    """Deterministic DDIM inversion of one sample from level 0 up to level ``upto``, keeping every
    level: ``(upto + 1, *x0.shape)``, entry ``k`` the state at level ``k`` (entry 0 is ``x0``).

    The step from level ``k`` (``ab_s``) to ``k + 1`` (``ab_t``, timestep ``t``):
    ``x_{k+1} = sqrt(ab_t) x0|(x_k) + sqrt(1 - ab_t) eps`` with ``x0|(x_k) = (x_k - sqrt(1 - ab_s)
    eps) / sqrt(ab_s)`` and ``eps`` the denoiser at the target timestep ``t`` (``at="target"``,
    diffusers' inverse scheduler) or at the current point (``at="source"``; at the clean level,
    which has no timestep, the target's)."""
    if at not in INVERT_AT:
        raise ValueError(f"invert_levels: at must be one of {', '.join(INVERT_AT)}; got {at!r}.")
    n = int(contexts.t.shape[0])
    if isinstance(upto, bool) or not isinstance(upto, (int, np.integer)) or not 0 <= upto <= n:
        raise ValueError(f"invert_levels: upto must be a level 0..{n} of the grid; got {upto!r}.")
    x0 = jnp.asarray(x0)
    upward = jax.tree_util.tree_map(lambda a: a[::-1][:upto], contexts)

    def body(x, ctx):
        t = ctx.t if at == "target" else jnp.where(ctx.t_next < 0, ctx.t, ctx.t_next)
        eps = denoiser(x, t)
        clean = x0_from_eps(x, eps, ctx.alpha_bar_next)
        x = jnp.sqrt(ctx.alpha_bar) * clean + jnp.sqrt(1.0 - ctx.alpha_bar) * eps
        return x, x

    _, ups = jax.lax.scan(body, x0, upward)
    return jnp.concatenate([x0[None], ups])


def noise_jump(key, x, alpha_bar_from, alpha_bar_to):
    """The exact forward transition from level ``alpha_bar_from`` to the noisier ``alpha_bar_to``:
    ``sqrt(a) x + sqrt(1 - a) z`` with ``a = alpha_bar_to / alpha_bar_from`` and ``z ~ N(0, I)``."""
    a = alpha_bar_to / alpha_bar_from
    return jnp.sqrt(a) * x + jnp.sqrt(1.0 - a) * jax.random.normal(key, x.shape, x.dtype)


def paste(x, anchor, mask):
    """``anchor`` inside ``mask`` (1 = the condition region; broadcast to ``x``), ``x`` elsewhere."""
    return jnp.where(jnp.asarray(mask) > 0.5, anchor, x)


def _denoise(key, x, ctx: StepContext, denoiser: Denoiser, sampler: Sampler):
    eps = denoiser(x, ctx.t)
    noise = jax.random.normal(key, x.shape, x.dtype)
    return sampler.mean(x, eps, ctx) + sampler.noise_std(ctx) * noise


def _run(key, x, segment: StepContext, denoiser, sampler, anchors=None, mask=None):
    """Denoise through ``segment`` (consecutive grid steps); with ``anchors`` (one per step), paste
    each after its step. Returns the final state and the states after each step."""
    count = int(segment.t.shape[0])
    if count == 0:
        return x, jnp.zeros((0,) + x.shape, x.dtype)

    def body(x, xs):
        k, ctx, anchor = xs
        x = _denoise(k, x, ctx, denoiser, sampler)
        if anchor is not None:
            x = paste(x, anchor, mask)
        return x, x

    return jax.lax.scan(body, x, (jax.random.split(key, count), segment, anchors))


class OneWayInfo(NamedTuple):
    """What :func:`one_way_chain` returns next to ``x0`` with ``record=True``: ``cycles`` the
    states after every paste of every cycle ``(C, b - r + 1, ...)`` (the first right after the
    jump's paste at level b), ``preserved`` the state after the final paste at level p."""

    cycles: jnp.ndarray
    preserved: jnp.ndarray


def one_way_chain(key, x, anchors, mask, contexts: StepContext, *, denoiser: Denoiser, settings: OneWay,
                  cycle_denoiser: Optional[Denoiser | Callable[[jnp.ndarray], Denoiser]] = None,
                  record: bool = False) -> Any:
    """COW's cycles and final pass for one sample, pure and un-jitted (vmap over seeds).

    Args:
      key: this sample's PRNG key (the jumps' and the stochastic steps' noise).
      x: the canvas at level ``settings.replace`` (r), e.g. ``invert_levels(canvas, ...)[r]``.
      anchors: the condition's trajectory, levels ``0 .. b`` (``(b + 1, *x.shape)``, at least), in
        the canvas's coordinates (the condition pasted where it goes; outside the mask unused).
      mask: 1 inside the condition region, 0 elsewhere (broadcast to ``x``).
      contexts: the grid's stacked :class:`~zmagic_jax.StepContext`.
      denoiser: the final pass's noise predictor, and the cycles' unless ``cycle_denoiser`` is given
        (e.g. the release's masked four-way CFG), or a function of the cycle index ``c`` (a float32
        scalar, traced; ``0 .. C - 1``) returning the cycle's denoiser (SOW's temporally decaying
        attention modulation: ``lambda c: zm.modulation.at_cycle(modulated, c)``).
      settings: :func:`one_way`.
      record: also return :class:`OneWayInfo`.

    Returns ``x0`` (or ``(x0, OneWayInfo)``).
    """
    r, b, p, n = settings.replace, settings.back, settings.preserve, int(contexts.t.shape[0])
    if not p <= r < b <= n:
        raise ValueError(f"one_way_chain: settings' levels (preserve {p}, replace {r}, back {b}) do not fit a grid "
                         f"of {n} steps.")
    if anchors.shape[0] < b + 1 or anchors.shape[1:] != x.shape:
        raise ValueError(f"one_way_chain: anchors must hold levels 0..{b} of the state's shape {x.shape}; got shape "
                         f"{anchors.shape}.")
    if cycle_denoiser is None:
        cycle_den = lambda c: denoiser
    elif isinstance(cycle_denoiser, Denoiser):
        cycle_den = lambda c: cycle_denoiser
    elif callable(cycle_denoiser):
        cycle_den = cycle_denoiser
    else:
        raise ValueError(f"one_way_chain: cycle_denoiser must be a Denoiser or a function of the cycle index "
                         f"returning one; got {type(cycle_denoiser).__name__}.")
    level = levels(contexts)
    up = 1 if settings.jump == "released" else 0
    ab_from, ab_to = level.alpha_bar[r + up], level.alpha_bar[b + up]
    inner = _segment(contexts, n - b, n - r)      # levels b -> r, pasting z_{b-1} .. z_r
    inner_anchors = anchors[r:b][::-1]
    key_cycles, key_final = jax.random.split(key)

    def cycle(x, xs):
        k, c = xs
        k_jump, k_steps = jax.random.split(k)
        x = paste(noise_jump(k_jump, x, ab_from, ab_to), anchors[b], mask)
        first = x
        x, states = _run(k_steps, x, inner, cycle_den(c), settings.cycle_sampler, inner_anchors, mask)
        return x, jnp.concatenate([first[None], states])

    x, cycle_states = jax.lax.scan(cycle, x, (jax.random.split(key_cycles, settings.cycles),
                                              jnp.arange(settings.cycles, dtype=jnp.float32)))
    k1, k2 = jax.random.split(key_final)
    x, _ = _run(k1, x, _segment(contexts, n - r, n - p), denoiser, settings.final_sampler)
    x = paste(x, anchors[p], mask)
    preserved = x
    x, _ = _run(k2, x, _segment(contexts, n - p, n), denoiser, settings.final_sampler)
    if record:
        return x, OneWayInfo(cycle_states, preserved)
    return x


def replacement_chain(key, x, anchors, mask, contexts: StepContext, *, denoiser: Denoiser, sampler: Sampler):
    """Inpainting by replacement, the baseline without cycles: from ``x`` at the grid's first level
    N, every step ``k -> k - 1`` is followed by pasting the anchor of level ``k - 1`` (levels
    ``0 .. N - 1`` of ``anchors``, e.g. :func:`invert_levels` up to N), so the last paste puts the
    condition itself in its region. Pure and un-jitted, for one sample."""
    n = int(contexts.t.shape[0])
    if anchors.shape[0] < n or anchors.shape[1:] != x.shape:
        raise ValueError(f"replacement_chain: anchors must hold levels 0..{n - 1} of the state's shape {x.shape}; "
                         f"got shape {anchors.shape}.")
    return _run(key, x, contexts, denoiser, sampler, anchors[:n][::-1], mask)[0]


class Plan(NamedTuple):
    """Where the visual condition goes and what relates to it (SOW's planner): the ``prompt`` to
    generate with, the ``condition_box`` and the ``related_box`` (the region whose attention to
    the condition SOW enhances), boxes ``(top, left, bottom, right)`` on the canvas, bottom/right
    exclusive."""

    prompt: str
    condition_box: tuple
    related_box: tuple


PLAN_KINDS = ("face", "object", "top", "bottom", "left", "right")
_FACE_WORDS = frozenset({"face", "faces", "person", "man", "woman", "boy", "girl", "portrait", "people", "child",
                         "lady", "gentleman", "selfie", "headshot"})


def default_planner(condition, mask, prompt: str, canvas_size, *, kind: Optional[str] = None) -> Plan:
    """The offline, deterministic planner (no model, no network): places a condition of
    ``condition``'s size ``(C, h, w)`` on a canvas of ``canvas_size (H, W)`` by rule, keeps the
    prompt as it is. ``kind`` (default: ``"face"`` if the prompt names a person or a face, else
    ``"object"``):

    * ``"face"``: top centre (the release's 256 px face at (128, 0) of 512); related: the body
      below it, twice the face's width (clipped), to the bottom of the canvas.
    * ``"object"``: the centre; related: the condition's box grown by half its size on every side
      (clipped), its surroundings.
    * ``"top"`` / ``"bottom"`` / ``"left"`` / ``"right"``: the condition is that half of an object
      whose other half (of the condition's size) is to be generated: the whole object is centred,
      the related box is the other half.

    ``mask`` is not used by the rules (it is part of the planner interface, see
    :func:`plan_layout`)."""
    who = "default_planner"
    _, h, w = (int(v) for v in np.shape(condition))
    height, width = (int(v) for v in canvas_size)
    if kind is None:
        words = {word.strip(".,;:!?\"'()").lower() for word in str(prompt).split()}
        kind = "face" if words & _FACE_WORDS else "object"
    if kind not in PLAN_KINDS:
        raise ValueError(f"{who}: kind must be one of {', '.join(PLAN_KINDS)}; got {kind!r}.")
    whole = {"top": (2 * h, w), "bottom": (2 * h, w), "left": (h, 2 * w), "right": (h, 2 * w)}.get(kind, (h, w))
    if whole[0] > height or whole[1] > width:
        raise ValueError(f"{who}: a condition of {h} x {w} as kind {kind!r} needs {whole[0]} x {whole[1]} of the "
                         f"{height} x {width} canvas; resize the condition or pick another kind.")
    clip = lambda top, left, bottom, right: (max(0, top), max(0, left), min(height, bottom), min(width, right))
    if kind == "face":
        top, left = 0, (width - w) // 2
        related = clip(h, left - w // 2, height, left + w + w // 2)
    elif kind == "object":
        top, left = (height - h) // 2, (width - w) // 2
        related = clip(top - h // 2, left - w // 2, top + h + h // 2, left + w + w // 2)
    else:
        top0, left0 = (height - whole[0]) // 2, (width - whole[1]) // 2
        top = top0 + (h if kind == "bottom" else 0)
        left = left0 + (w if kind == "right" else 0)
        other = {"top": (top + h, left), "bottom": (top0, left), "left": (top, left + w), "right": (top, left0)}[kind]
        related = (other[0], other[1], other[0] + h, other[1] + w)
    return Plan(str(prompt), (top, left, top + h, left + w), related)


def plan_layout(condition, mask, prompt: str, canvas_size, *, planner: Optional[Callable] = None) -> Plan:
    """Run a planner and check what it returns. ``planner(condition, mask, prompt, canvas_size)``
    is called with exactly these arguments: ``condition`` the visual condition ``(C, h, w)``
    (numpy, channels first, at the seed size), ``mask`` its ``(h, w)`` mask, ``prompt`` the
    user's text and ``canvas_size`` ``(H, W)``; it returns a :class:`Plan` (or a 3-tuple in its
    order). Default :func:`default_planner`. A user-supplied planner (for example one that asks
    a multimodal model in the user's own code; the library makes no network calls) may rewrite
    the prompt and pick both boxes; the condition box must have the condition's size."""
    condition = np.asarray(condition)
    height, width = (int(v) for v in canvas_size)
    result = (default_planner if planner is None else planner)(condition, np.asarray(mask), prompt, (height, width))
    try:
        result = Plan(*result)
    except TypeError as err:
        raise ValueError(f"plan_layout: the planner must return Plan(prompt, condition_box, related_box); got "
                         f"{result!r}.") from err
    if not isinstance(result.prompt, str) or not result.prompt:
        raise ValueError(f"plan_layout: the planner's prompt must be a non-empty string; got {result.prompt!r}.")
    for name in ("condition_box", "related_box"):
        box = tuple(getattr(result, name))
        if len(box) != 4 or not all(isinstance(v, (int, np.integer)) for v in box) or not (
                0 <= box[0] < box[2] <= height and 0 <= box[1] < box[3] <= width):
            raise ValueError(f"plan_layout: the planner's {name} (top, left, bottom, right) = {box!r} must be "
                             f"integers inside the {height} x {width} canvas, top < bottom, left < right.")
    top, left, bottom, right = result.condition_box
    if (bottom - top, right - left) != condition.shape[1:]:
        raise ValueError(f"plan_layout: the planner's condition_box is {bottom - top} x {right - left}; it must have "
                         f"the condition's size {condition.shape[1]} x {condition.shape[2]}.")
    return Plan(result.prompt, tuple(int(v) for v in result.condition_box),
                tuple(int(v) for v in result.related_box))
