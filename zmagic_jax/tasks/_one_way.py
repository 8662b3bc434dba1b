"""COW and SOW on the embedded canvas text model: half of a held-out digit is the visual condition,
the prompt names the digit, the model draws the other half around it.

Each sample's condition is one half (``piece``: top, bottom, left or right) of a held-out digit of
the digits assets (a writer no model saw), the whole half-tile box kept (ink and background); the
planner (:func:`~zmagic_jax.oneway.default_planner` with the piece as its kind) centres the whole
digit on the 32 x 32 canvas and names the other half the related box. The prompt is ``"a d"``.
Runs, all from the same keys:

* ``replace``: inpainting by replacement, no cycle (:func:`~zmagic_jax.oneway.replacement_chain`:
  DDIM from noise, the condition's inverted level pasted after every step);
* ``cow``: COW's cycles (:func:`~zmagic_jax.oneway.one_way_chain`, the release's levels for the
  grid, C cycles);
* ``sow``: COW with SOW's attention modulation on every self-attention layer during the cycles
  (:mod:`zmagic_jax.modulation`).

Scores: the canvas evaluator (guides nothing) finds the digit (``digit``), its probability
(``confidence``), the Frechet distance of its features to real canvases (every held-out digit of
the class, whole, at the same place), ``region error`` the mean absolute difference to the
condition inside its region (0: kept exactly) and ``seam`` the mean absolute difference between
4-neighbour pixels on either side of the region's border, next to the real digits' own.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from zmagic_jax.metrics import frechet_distance
from zmagic_jax.modulation import Modulation, at_cycle, box_mask, region_modulations, strip_modulation
from zmagic_jax.models import attention_layers, encode_prompt, latent_denoiser
from zmagic_jax.oneway import default_planner, invert_levels, one_way, one_way_chain, plan_layout, \
    replacement_chain, seed_canvas
from zmagic_jax.samplers import ddim, step_contexts
from zmagic_jax.tasks._canvas_demo import _evaluate, evaluator_features, frechet_floor, place
from zmagic_jax.tasks._outputs import save_image_grid
from zmagic_jax.tasks._recipe import PROGRAMS, Programs, check_choice, check_int, check_positive, format_table, \
    model_grid

RUNS = ("replace", "cow", "sow")
PIECES = ("top", "bottom", "left", "right")
TILE = 16
CANVAS = 32


@dataclasses.dataclass(frozen=True)
class OneWayDemoSettings:
    """The one-way section's settings (recorded in its ``scores.json``).

    digit: the class of the held-out digits whose halves are the conditions; the prompt "a {digit}".
    piece: which half of each digit is kept ("top", "bottom", "left", "right").
    count: samples per run (the first ``count`` held-out digits of the class).
    seed: the runs' keys.
    num_steps: the DDIM grid; COW's levels are the release's for it (r, b, p = 0.5, 0.7, 0.4 N).
    cycles: COW's C.
    cfg: the text model's CFG scale.
    modulation: SOW's :class:`~zmagic_jax.modulation.Modulation`.
    """

    digit: int = 3
    piece: str = "top"
    count: int = 16
    seed: int = 0
    num_steps: int = 10
    cycles: int = 10
    cfg: float = 3.0
    modulation: Modulation = Modulation()

    def __post_init__(self):
        who = "OneWayDemoSettings"
        if isinstance(self.digit, bool) or not isinstance(self.digit, (int, np.integer)) or not 0 <= self.digit <= 9:
            raise ValueError(f"{who}: digit must be 0..9; got {self.digit!r}.")
        check_choice(self.piece, PIECES, who, "piece")
        check_int(self.count, who, "count", 2)
        check_int(self.seed, who, "seed", 0)
        check_int(self.num_steps, who, "num_steps", 4, 1000)
        check_int(self.cycles, who, "cycles", 0, 1000)
        check_positive(self.cfg, who, "cfg", zero=True)
        if not isinstance(self.modulation, Modulation):
            raise ValueError(f"{who}: modulation must be a zmagic_jax.modulation.Modulation; got "
                             f"{type(self.modulation).__name__}.")


def half_of(tile, piece: str):
    """The ``piece`` half of a ``(16, 16)`` tile, channels first ``(1, h, w)``."""
    tile = np.asarray(tile, np.float32).reshape(TILE, TILE)
    half = TILE // 2
    return {"top": tile[:half], "bottom": tile[half:], "left": tile[:, :half], "right": tile[:, half:]}[piece][None]


def seam(images, region) -> np.ndarray:
    """Per image ``(N, H, W)``: the mean absolute difference of the 4-neighbour pixel pairs that
    straddle the border of ``region (H, W)`` (one pixel inside, one outside)."""
    images, inside = np.asarray(images, np.float64), np.asarray(region) > 0.5
    diffs, count = 0.0, 0
    for axis in (1, 2):
        a = np.take(images, range(images.shape[axis] - 1), axis=axis)
        b = np.take(images, range(1, images.shape[axis]), axis=axis)
        ia = np.take(inside, range(inside.shape[axis - 1] - 1), axis=axis - 1)
        ib = np.take(inside, range(1, inside.shape[axis - 1]), axis=axis - 1)
        cross = ia != ib
        diffs = diffs + (np.abs(a - b) * cross).sum((1, 2))
        count += int(cross.sum())
    return diffs / max(count, 1)


def _replace_run(keys, conditions, region, contexts, denoiser, sampler):
    """Every sample's replacement chain: ``x_T`` from ``fold_in(key, 0)``, the chain from
    ``fold_in(key, 1)``."""
    n = int(contexts.t.shape[0])

    def one(key, condition):
        anchors = invert_levels(condition, contexts, n, denoiser=denoiser)
        x_T = jax.random.normal(jax.random.fold_in(key, 0), condition.shape, condition.dtype)
        return replacement_chain(jax.random.fold_in(key, 1), x_T, anchors, region, contexts, denoiser=denoiser,
                                 sampler=sampler)
    return jax.vmap(one)(keys, conditions)


def _one_way_run(keys, conditions, region, contexts, denoiser, settings):
    """Every sample's COW chain from its seed canvas (inverted up to b; the start is level r). The
    modifiers of ``denoiser`` (SOW) act in the cycles only, with cycle ``c``'s temporal decay; the
    inversion and the final pass run unmodulated."""
    plain = strip_modulation(denoiser)

    def one(key, condition):
        anchors = invert_levels(condition, contexts, settings.back, denoiser=plain)
        return one_way_chain(jax.random.fold_in(key, 1), anchors[settings.replace], anchors, region, contexts,
                             denoiser=plain, settings=settings, cycle_denoiser=lambda c: at_cycle(denoiser, c))
    return jax.vmap(one)(keys, conditions)


class OneWayPlan(NamedTuple):
    """The traced programs (per run ``(fn, args)``), the conditions, their region and the real canvases."""
    runs: dict
    conditions: np.ndarray
    region: np.ndarray
    related: np.ndarray
    real: np.ndarray
    prompt: str
    compiler_options: Optional[dict] = None


def prepare_one_way_demo(canvas, digits, settings: OneWayDemoSettings = OneWayDemoSettings(), *,
                         programs: Optional[Programs] = None, planner: Optional[Callable] = None,
                         compiler_options: Optional[dict] = None) -> OneWayPlan:
    """Trace (do not compile) every run's program. ``canvas`` from
    :func:`~zmagic_jax.ports.load_canvas_models`, ``digits`` from
    :func:`~zmagic_jax.ports.load_digit_models` (its held-out digits give the conditions and the
    real references). ``planner``: :func:`~zmagic_jax.oneway.plan_layout`'s hook (default: the
    rule for the piece). ``compiler_options``: XLA options of the section's programs (kept in the
    plan for :func:`run_one_way_demo`)."""
    held, labels = np.asarray(digits.heldout_images), np.asarray(digits.heldout_labels)
    tiles = held[labels == settings.digit]
    if len(tiles) < settings.count:
        raise ValueError(f"one-way demo: count={settings.count} but there are {len(tiles)} held-out {settings.digit}s.")
    programs = PROGRAMS if programs is None else programs
    text = canvas.text
    pieces = [half_of(t, settings.piece) for t in tiles[:settings.count]]
    mask = np.ones(pieces[0].shape[1:], np.float32)
    plan = plan_layout(pieces[0], mask, f"a {settings.digit}", (CANVAS, CANVAS),
                       planner=planner or (lambda *a: default_planner(*a, kind=settings.piece)))
    position = plan.condition_box[:2]
    shape = (text.latent_channels, CANVAS, CANVAS)
    seeded = [seed_canvas(p, mask, position, shape, background=-1.0) for p in pieces]
    conditions = np.stack([c for c, _ in seeded])
    region = seeded[0][1]
    related = box_mask(plan.related_box, (CANVAS, CANVAS))
    # the whole digits: where the planner put the condition, the digit's tile follows from the piece
    top, left = position[0] - (TILE // 2 if settings.piece == "bottom" else 0), \
        position[1] - (TILE // 2 if settings.piece == "right" else 0)
    real = [place(t, (top, left), CANVAS)[0] for t in tiles]
    grid = model_grid(text.schedule, settings.num_steps, "one-way demo")
    contexts = step_contexts(text.schedule, grid)
    keys = jax.random.split(jax.random.PRNGKey(settings.seed), settings.count)
    prompt, uncond = encode_prompt(text, [plan.prompt])[0], encode_prompt(text, [""])[0]
    scale = jnp.float32(settings.cfg)
    den = latent_denoiser(text, prompt, uncond, scale)
    layers = attention_layers(text.unet.config, CANVAS)
    modulated = latent_denoiser(text, prompt, uncond, scale, modifiers=region_modulations(
        layers, region[0], related, settings.modulation))
    cow = one_way(settings.num_steps, cycles=settings.cycles)
    x, r = jnp.asarray(conditions), jnp.asarray(region)
    runs = {"replace": (_replace_run, (keys, x, r, contexts, den, ddim(0.0))),
            "cow": (_one_way_run, (keys, x, r, contexts, den, cow)),
            "sow": (_one_way_run, (keys, x, r, contexts, modulated, cow))}
    for fn, args in runs.values():
        programs.lower(fn, args, compiler_options=compiler_options)
    programs.lower(_evaluate, (canvas.evaluator.params, jnp.zeros((settings.count, CANVAS, CANVAS, 1))),
                   {"module": canvas.evaluator.module})
    return OneWayPlan(runs, conditions[:, 0], region[0], related, np.stack(real), plan.prompt, compiler_options)


def _scores(canvas, images, plan: OneWayPlan, digit: int, real_features, programs) -> dict:
    (probs, features), _, _ = programs.call(_evaluate, (canvas.evaluator.params, jnp.asarray(images[..., None])),
                                            {"module": canvas.evaluator.module})
    probs = np.asarray(probs)
    inside = plan.region > 0.5
    return {"digit": float((probs[:, digit] >= 0.5).mean()), "confidence": float(probs[:, digit].mean()),
            "frechet": float(frechet_distance(np.asarray(features, np.float64), real_features)),
            "region_error": float(np.abs(images - plan.conditions)[:, inside].mean()),
            "seam": float(seam(images, plan.region).mean())}


def run_one_way_demo(canvas, plan: OneWayPlan, settings: OneWayDemoSettings, *,
                     programs: Optional[Programs] = None, progress: Optional[Callable[[str], None]] = None) -> dict:
    """Run every traced program and score it. Returns ``{"rows": {run: scores}, "images": {run:
    (N, 32, 32)}, "floor": ..., "timing": ...}``."""
    programs = PROGRAMS if programs is None else programs
    real_features = evaluator_features(canvas, plan.real, settings.count, programs)
    rows, images, timing = {}, {}, {}
    for name, (fn, args) in plan.runs.items():
        out, compile_s, run_s = programs.call(fn, args, compiler_options=plan.compiler_options)
        images[name] = np.clip(np.asarray(out)[:, 0], -1.0, 1.0)
        rows[name] = _scores(canvas, images[name], plan, settings.digit, real_features, programs)
        timing[name] = {"compile_s": round(compile_s, 2), "run_s": round(run_s, 2)}
        if progress is not None:
            progress(f"one-way: {name}")
    floor = frechet_floor(real_features, settings.count, settings.seed)
    floor["seam"] = float(seam(plan.real, plan.region).mean())
    return {"rows": rows, "images": images, "timing": timing, "floor": floor}


def one_way_table(report: dict) -> str:
    rows = [("run", "digit", "confidence", "FD", "region error", "seam")]
    for label, s in report["rows"].items():
        rows.append((label, f"{s['digit']:.2f}", f"{s['confidence']:.2f}", f"{s['frechet']:.1f}",
                     f"{s['region_error']:.3f}", f"{s['seam']:.3f}"))
    floor = report["floor"]
    rows.append(("real digits", "-", "-", f"{floor['frechet_real_vs_real'][0]:.1f} (floor)", "0", f"{floor['seam']:.3f}"))
    return format_table(rows)


def save_one_way_demo(out: Path, report: dict, plan: OneWayPlan, settings: OneWayDemoSettings) -> dict:
    """Write ``grid.png`` (the conditions on their canvases, the related box, then 8 canvases per
    run) and ``scores.json`` into ``out`` (a staging folder). Returns the JSON report."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    shown = min(8, settings.count)
    boxes = np.where(plan.related > 0.5, 0.3, np.where(plan.region > 0.5, 0.8, -1.0))
    rows = [("condition", [c[..., None] for c in plan.conditions[:shown]]), ("boxes", [boxes[..., None]])]
    rows += [(label, [im[..., None] for im in images[:shown]]) for label, images in report["images"].items()]
    save_image_grid(out / "grid.png", rows, title=f"COW / SOW on the canvas text model: the {settings.piece} half of "
                    f"held-out {settings.digit}s, \"{plan.prompt}\" (DDIM {settings.num_steps}, C = {settings.cycles})",
                    cell=0.8)
    data = {"settings": {**dataclasses.asdict(settings), "prompt": plan.prompt}, "rows": report["rows"],
            "floor": report["floor"], "timing": report["timing"], "runs": list(RUNS)}
    (out / "scores.json").write_text(json.dumps(data, indent=2, allow_nan=False))
    return data
