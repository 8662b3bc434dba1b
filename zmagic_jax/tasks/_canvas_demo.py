"""AMDM on the embedded canvas models: does aggregating a text model and a layout model give both
attributes?

The text model (:func:`~zmagic_jax.ports.load_canvas_models`) draws the digit its prompt names at
a place of its choosing; the layout model draws some digit inside the boxes of its layout channel.
The target is ``"a d"`` inside one box: the ink box of a held-out digit of the digits assets placed
at ``position`` on the 32 x 32 canvas. Runs, all from the same starting noise (model k's ``x_T``
from ``fold_in(PRNGKey(seed), k)``, one per sample):

* ``text`` / ``layout``: each model alone;
* ``amdm released`` / ``amdm slerp``: both models sampled together (:func:`~zmagic_jax.aggregate_chain`),
  the released merge ``w x1 + sqrt(1 - w^2) x2`` or the true slerp; each model's own final
  canvas is scored (the release returns both);
* ``text + box guidance``: the text model guided by the layout's condition, the
  :func:`~zmagic_jax.energies.box_energy` of the box with FreeDoM's rule (independent scheme);
* ``layout + digit guidance``: the layout model guided by the text's condition, the digits
  assets' guidance classifier on the 16 x 16 window at ``position``
  (:func:`~zmagic_jax.energies.tile_class_energy`, FreeDoM's rule).

Scores come from the canvas evaluator, which guides nothing: ``digit`` (the evaluator finds the
digit), ``exact`` (it finds that digit and no other), ``box IoU`` (the ink's bounding box, pixels
> 0, against the target box), ``ink in box`` (share of the ink inside the box) and the Frechet
distance of the evaluator's penultimate features to the real canvases (every held-out digit of
the class placed at ``position``), next to the floor a real set of the same size scores.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from zmagic_jax import figures
from zmagic_jax.aggregation import aggregate_chain, aggregation, aggregation_contexts, release_steps
from zmagic_jax.energies import box_energy, tile_class_energy
from zmagic_jax.metrics import frechet_distance
from zmagic_jax.models import encode_prompt, latent_denoiser
from zmagic_jax.samplers import ddim, step_contexts
from zmagic_jax.schemes import condition, independent, none
from zmagic_jax.step_rules import freedom_rule
from zmagic_jax.tasks._outputs import save_image_grid
from zmagic_jax.tasks._recipe import (PROGRAMS, Programs, check_int, check_positive, model_grid, sample_batch,
                                      skips)

RUNS = ("text", "layout", "amdm released", "amdm slerp", "text + box guidance", "layout + digit guidance")
TILE = 16


@dataclasses.dataclass(frozen=True)
class CanvasDemoSettings:
    """The canvas AMDM section's settings (recorded in its ``scores.json``).

    digit: the digit the text model's prompt ``"a {digit}"`` names.
    layout_source / position: the layout is the ink box of held-out digit ``layout_source`` of the
      digits assets, its 16 x 16 tile placed with its top-left corner at ``position`` (row, col).
    count: samples per run (seed ``seed``'s keys).
    num_steps: DDIM steps (eta 0, as the release).
    text_cfg / layout_cfg: CFG scales (the layout model's unconditional branch sees a blank layout).
    weight / window / step_scale: AMDM's ``w``, aggregation window (loop indices) and the deviation
      step lengths as a multiple of the release's rescaled to the canvas
      (:func:`~zmagic_jax.release_steps`: 55 / 45 x sqrt(1024 / 16384) = 13.75 / 11.25).
    box_scale: the FreeDoM scale of the box energy in the text model's guided run.
    digit_scale: the FreeDoM scale of the digit (tile class) energy in the layout model's guided run.
    """

    digit: int = 3
    layout_source: int = 0
    position: tuple = (8, 14)
    count: int = 24
    seed: int = 0
    num_steps: int = 25
    text_cfg: float = 3.0
    layout_cfg: float = 3.0
    weight: float = 0.5
    window: tuple = (1, 3)
    step_scale: float = 1.0
    box_scale: float = 100.0
    digit_scale: float = 4.0

    def __post_init__(self):
        who = "CanvasDemoSettings"
        if isinstance(self.digit, bool) or not isinstance(self.digit, (int, np.integer)) or not 0 <= self.digit <= 9:
            raise ValueError(f"{who}: digit must be 0..9; got {self.digit!r}.")
        check_int(self.layout_source, who, "layout_source", 0)
        position = tuple(self.position)
        if len(position) != 2 or not all(isinstance(v, (int, np.integer)) and 0 <= v <= 32 - TILE for v in position):
            raise ValueError(f"{who}: position must be (row, col) of the tile's top-left corner, each 0..{32 - TILE}; "
                             f"got {self.position!r}.")
        object.__setattr__(self, "position", (int(position[0]), int(position[1])))
        check_int(self.count, who, "count", 2)
        check_int(self.seed, who, "seed", 0)
        check_int(self.num_steps, who, "num_steps", 4, 1000)
        for name in ("text_cfg", "layout_cfg", "step_scale", "box_scale", "digit_scale"):
            check_positive(getattr(self, name), who, name, zero=True)
        if not 0.0 <= float(self.weight) <= 1.0:
            raise ValueError(f"{who}: weight must be in [0, 1]; got {self.weight!r}.")
        window = tuple(self.window)
        if len(window) != 2 or not 1 <= window[0] <= window[1] < self.num_steps:
            raise ValueError(f"{who}: window must be (first, last) loop indices, 1 <= first <= last < num_steps "
                             f"({self.num_steps}); got {self.window!r}.")
        object.__setattr__(self, "window", (int(window[0]), int(window[1])))


def place(tile, position, canvas: int = 32):
    """A ``(canvas, canvas)`` image in ``[-1, 1]`` holding ``tile (16, 16)`` at ``position``, and its
    layout: 1 inside the tile's ink box (pixels > 0), 0 elsewhere."""
    tile = np.asarray(tile, np.float32).reshape(TILE, TILE)
    r, c = position
    image = -np.ones((canvas, canvas), np.float32)
    image[r:r + TILE, c:c + TILE] = tile
    ink = tile > 0
    rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
    box = np.zeros((canvas, canvas), np.float32)
    if rows.size:
        box[r + rows[0]:r + rows[-1] + 1, c + cols[0]:c + cols[-1] + 1] = 1.0
    return image, box


def box_iou(images, box) -> np.ndarray:
    """Per image ``(N, H, W)``: IoU of the ink's bounding box (pixels > 0) with ``box (H, W)`` in
    ``{0, 1}``; 0 for an image without ink."""
    out = []
    target = np.asarray(box) > 0.5
    for image in np.asarray(images):
        ink = image > 0
        rows, cols = np.flatnonzero(ink.any(1)), np.flatnonzero(ink.any(0))
        if not rows.size:
            out.append(0.0)
            continue
        mine = np.zeros_like(target)
        mine[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1] = True
        out.append(float((mine & target).sum() / (mine | target).sum()))
    return np.asarray(out)


def ink_in_box(images, box) -> np.ndarray:
    """Per image: the share of its ink (pixels > 0) inside ``box``; 0 without ink."""
    ink = np.asarray(images) > 0
    inside = (ink & (np.asarray(box) > 0.5)).sum((1, 2))
    return np.where(ink.sum((1, 2)) > 0, inside / np.maximum(ink.sum((1, 2)), 1), 0.0)


def _amdm(keys, x_T, contexts, denoisers, agg, sampler):
    """Every sample's K aggregated chains, vmapped: ``x0 (N, K, ...)``."""
    def one(key, x):
        return aggregate_chain(key, x, contexts, denoisers=denoisers, aggregation=agg, sampler=sampler,
                               schemes=(none(),))[0]
    return jax.vmap(one)(keys, x_T)


def _evaluate(params, images, *, module):
    out = module.apply({"params": params}, images)
    return jax.nn.sigmoid(out.logits), out.penultimate


class CanvasPlan(NamedTuple):
    """The traced programs of the section: per run ``(fn, args, static)``, and the targets."""
    runs: dict
    layout: np.ndarray
    box: np.ndarray
    real: np.ndarray


def prepare_canvas_demo(canvas, digits, settings: CanvasDemoSettings = CanvasDemoSettings(), *,
                        programs: Optional[Programs] = None) -> CanvasPlan:
    """Trace (do not compile) every run's program; ``canvas`` from
    :func:`~zmagic_jax.ports.load_canvas_models` (with its layout model), ``digits`` from
    :func:`~zmagic_jax.ports.load_digit_models` (its held-out digits give the layout and the real
    references)."""
    if canvas.layout is None:
        raise ValueError("canvas demo: the canvas assets have no layout model; retrain them with "
                         "`python experiments/train_canvas_digits.py`.")
    held, labels = np.asarray(digits.heldout_images), np.asarray(digits.heldout_labels)
    if settings.layout_source >= held.shape[0]:
        raise ValueError(f"canvas demo: layout_source={settings.layout_source} is out of range; there are "
                         f"{held.shape[0]} held-out digits.")
    _, box = place(held[settings.layout_source], settings.position)
    real = np.stack([place(t, settings.position)[0] for t in held[labels == settings.digit]])
    programs = PROGRAMS if programs is None else programs
    text, layout = canvas.text, canvas.layout
    schedule = text.schedule
    grid = model_grid(schedule, settings.num_steps, "canvas demo")
    contexts = step_contexts(schedule, grid)
    shape = (text.latent_channels, int(text.sample_size), int(text.sample_size))
    base = jax.random.PRNGKey(settings.seed)
    x_T = [jax.random.normal(jax.random.fold_in(base, k), (settings.count,) + shape) for k in range(2)]
    keys = jax.random.split(jax.random.fold_in(base, 2), settings.count)
    uncond, empty = encode_prompt(text, [""])[0], encode_prompt(layout, [""])[0]
    text_den = latent_denoiser(text, encode_prompt(text, [f"a {settings.digit}"])[0], uncond,
                               jnp.float32(settings.text_cfg))
    box_c = jnp.asarray(box)[None]
    layout_den = latent_denoiser(layout, empty, empty, jnp.float32(settings.layout_cfg),
                                 extra=jnp.stack([jnp.zeros_like(box_c), box_c]))
    sampler = ddim(0.0)
    by_box = independent([condition("box", box_energy(box_c), freedom_rule(jnp.float32(settings.box_scale)))])
    by_digit = independent([condition("digit", tile_class_energy(digits.classifier, jnp.int32(settings.digit),
                                                                 settings.position, TILE),
                                      freedom_rule(jnp.float32(settings.digit_scale)))])
    runs = {}
    for name, den, x, scheme in (("text", text_den, x_T[0], none()), ("layout", layout_den, x_T[1], none()),
                                 ("text + box guidance", text_den, x_T[0], by_box),
                                 ("layout + digit guidance", layout_den, x_T[1], by_digit)):
        runs[name] = (sample_batch, (keys, x, contexts, den, scheme, sampler), skips(scheme, contexts))
    steps = tuple(settings.step_scale * p for p in release_steps(2, shape))
    stacked_x = jnp.stack(x_T, 1)
    actx = aggregation_contexts(schedule, grid, jnp.float32)
    for rule in ("released", "slerp"):
        agg = aggregation(steps, settings.weight, window=settings.window, rule=rule)
        runs[f"amdm {rule}"] = (_amdm, (keys, stacked_x, actx, (text_den, layout_den), agg, sampler), {})
    for fn, args, static in runs.values():
        programs.lower(fn, args, static)
    evaluator = canvas.evaluator
    programs.lower(_evaluate, (evaluator.params, jnp.zeros((settings.count, 32, 32, 1))), {"module": evaluator.module})
    return CanvasPlan(runs, held[settings.layout_source], box, real)


def _scores(canvas, images, box, digit, real_features, programs) -> dict:
    (probs, features), _, _ = programs.call(_evaluate, (canvas.evaluator.params, jnp.asarray(images[..., None])),
                                            {"module": canvas.evaluator.module})
    found = np.asarray(probs) >= 0.5
    truth = np.zeros(10, bool)
    truth[digit] = True
    scores = {"digit": float(found[:, digit].mean()), "exact": float(np.all(found == truth, -1).mean()),
              "box_iou": float(box_iou(images, box).mean()), "ink_in_box": float(ink_in_box(images, box).mean()),
              "frechet": float(frechet_distance(np.asarray(features, np.float64), real_features))}
    return scores


def run_canvas_demo(canvas, plan: CanvasPlan, settings: CanvasDemoSettings, *, programs: Optional[Programs] = None,
                    progress: Optional[Callable[[str], None]] = None, only: Optional[tuple] = None) -> dict:
    """Run every traced program (or the runs named in ``only``), score the canvases. Returns
    ``{"rows": {label: scores}, "images": {label: (N, 32, 32)}, "floor": ..., "timing": ...}``."""
    programs = PROGRAMS if programs is None else programs
    real_features = evaluator_features(canvas, plan.real, settings.count, programs)
    rows, images, timing = {}, {}, {}
    for name, (fn, args, static) in plan.runs.items():
        if only is not None and name not in only:
            continue
        out, compile_s, run_s = programs.call(fn, args, static)
        x0 = np.clip(np.asarray(out[0] if isinstance(out, tuple) else out), -1.0, 1.0)
        if name.startswith("amdm"):
            for k, model in enumerate(("text", "layout")):
                label = f"{name} -> {model}"
                images[label] = x0[:, k, 0]
                rows[label] = _scores(canvas, images[label], plan.box, settings.digit, real_features, programs)
        else:
            images[name] = x0[:, 0]
            rows[name] = _scores(canvas, images[name], plan.box, settings.digit, real_features, programs)
        timing[name] = {"compile_s": round(compile_s, 2), "run_s": round(run_s, 2)}
        if progress is not None:
            progress(f"canvas: {name}")
    real_scores = {"box_iou": float(box_iou(plan.real, plan.box).mean()),
                   "ink_in_box": float(ink_in_box(plan.real, plan.box).mean())}
    return {"rows": rows, "images": images, "timing": timing,
            "floor": {**frechet_floor(real_features, settings.count, settings.seed), **real_scores}}


def evaluator_features(canvas, images, count: int, programs: Programs) -> np.ndarray:
    """The canvas evaluator's penultimate features (float64) of ``images (N, 32, 32)``, in chunks
    of ``count`` (the size of the evaluator program the section compiled)."""
    chunks = []
    for start in range(0, len(images), count):
        part = np.asarray(images[start:start + count])
        padded = np.concatenate([part, np.repeat(part[:1], count - len(part), 0)])
        (_, feats), _, _ = programs.call(_evaluate, (canvas.evaluator.params, jnp.asarray(padded[..., None])),
                                         {"module": canvas.evaluator.module})
        chunks.append(np.asarray(feats, np.float64)[:len(part)])
    return np.concatenate(chunks)


def frechet_floor(real_features, count: int, seed: int) -> dict:
    """The Frechet distance between two disjoint random halves (at most ``count`` each) of the real
    features, 20 draws: the floor a real set of a run's size scores."""
    rng = np.random.default_rng(seed)
    floors = []
    half = min(count, len(real_features) // 2)
    for _ in range(20):
        order = rng.permutation(len(real_features))
        floors.append(frechet_distance(real_features[order[:half]], real_features[order[half:]]))
    return {"frechet_real_vs_real": [float(np.mean(floors)), float(np.std(floors))], "size": half,
            "references": int(len(real_features))}


def canvas_table(report: dict) -> str:
    from zmagic_jax.tasks._recipe import format_table
    rows = [("run", "digit", "exact", "box IoU", "ink in box", "FD")]
    for label, s in report["rows"].items():
        rows.append((label, f"{s['digit']:.2f}", f"{s['exact']:.2f}", f"{s['box_iou']:.2f}", f"{s['ink_in_box']:.2f}",
                     f"{s['frechet']:.1f}"))
    floor = report["floor"]
    rows.append(("real canvases", "-", "-", f"{floor['box_iou']:.2f}", f"{floor['ink_in_box']:.2f}",
                 f"{floor['frechet_real_vs_real'][0]:.1f} (floor)"))
    return format_table(rows)


def save_canvas_demo(out: Path, report: dict, plan: CanvasPlan, settings: CanvasDemoSettings) -> dict:
    """Write ``grid.png`` (the layout, then 8 canvases per run), ``scores.png`` and ``scores.json``
    into ``out`` (a staging folder). Returns the JSON report."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    target = np.where(plan.box > 0.5, 0.4, -1.0)
    rows = [("target box", [target[..., None]])]
    rows += [(label, [im[..., None] for im in images[:8]]) for label, images in report["images"].items()]
    save_image_grid(out / "grid.png", rows, title=f"AMDM on the canvas models: \"a {settings.digit}\" + one box "
                    f"(DDIM {settings.num_steps}, window {settings.window[0]}..{settings.window[1]})", cell=0.8)
    plt = figures.plt
    labels = list(report["rows"])
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    for ax, key, title in ((axes[0], "digit", "evaluator finds the digit"), (axes[1], "box_iou", "box IoU")):
        ax.barh(range(len(labels)), [report["rows"][n][key] for n in labels], color="tab:blue")
        ax.set_yticks(range(len(labels)))
        ax.set_yticklabels(labels if ax is axes[0] else [""] * len(labels), fontsize=7)
        ax.set_xlim(0, 1)
        ax.set_title(title, fontsize=9)
        ax.invert_yaxis()
    axes[1].axvline(report["floor"]["box_iou"], color="k", ls="--", lw=1, label="real canvases")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "scores.png", dpi=110)
    plt.close(fig)
    data = {"settings": dataclasses.asdict(settings), "rows": report["rows"], "floor": report["floor"],
            "timing": report["timing"], "runs": list(RUNS)}
    (out / "scores.json").write_text(json.dumps(data, indent=2, allow_nan=False))
    return data
