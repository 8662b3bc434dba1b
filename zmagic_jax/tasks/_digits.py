"""The embedded digits task: real images with several attributes at once, on CPU, no download.

The project's own 16x16 MNIST DDPM (``zmagic_jax.models._digits``) is guided toward three
conditions of different kinds (``zmagic_jax.energies._digits``):

* ``class``: a digit class (the guidance classifier's ``-log p(label | x0)``);
* ``layout``: an ink mask taken from a held-out real digit (where strokes should be);
* ``style``: the Gram statistics of a held-out reference digit (stroke width / contrast).

``class`` and ``layout`` act on the same pixels (strongly dependent, as the paper's identity and
landmarks); ``class`` and ``style`` hardly interact (weakly dependent, as hair and parsing).

Runs are ``(scheme, conditions)`` pairs: ``none``, ``independent`` (FreeDoM), ``dependent``
(Z-Magic Algorithm 1, the first condition leads) and ``multi`` (Algorithm 2, CAGrad over both
orders); ``none`` and ``independent`` also take a single condition. Every run of a scheme
shares ONE compiled program: which energies fill the two condition slots, and with what scale, is
a weight matrix in the slots' params (a leaf), so both orders and both pairs reuse it. Scores come from the evaluator (another architecture and seed, never used for guidance)
and from the pixels (ink IoU); sample quality is a Frechet distance in the evaluator's
penultimate features against the held-out real digits.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable, Dict, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from zmagic_jax import figures
from zmagic_jax._io import atomic_output_dir
from zmagic_jax.contracts import static_partial
from zmagic_jax.energies._digits import (class_energy, class_probability, ink_fraction, ink_iou, layout_energy,
                                         style_distance, style_energy)
from zmagic_jax.metrics import frechet_distance
from zmagic_jax.models._ddpm_unet import ddpm_denoiser
from zmagic_jax.models._digits import DigitModels, classifier_output
from zmagic_jax.models._layers import Net
from zmagic_jax.samplers import step_contexts
from zmagic_jax.schedules import linear_schedule
from zmagic_jax.schemes import condition
from zmagic_jax.step_rules import freedom_rule
from zmagic_jax.geometry import mean_guided_cosine
from zmagic_jax.tasks._outputs import save_image_grid, save_png
from zmagic_jax.tasks._recipe import (PROGRAMS, Programs, check_finite, check_int, check_nan_policy, check_positive,
                                      check_seeds, check_window, format_table, model_grid, sampler_by_name,
                                      sample_seeds, scheme_by_name, scheme_cosine, seed_keys, skips)

DIGIT_CONDITIONS = ("class", "layout", "style")
DIGIT_SCHEMES = ("none", "independent", "dependent", "multi")
STRONG_PAIR = ("class", "layout")
WEAK_PAIR = ("class", "style")
DEFAULT_RUNS = (("none", STRONG_PAIR), ("independent", STRONG_PAIR), ("dependent", STRONG_PAIR),
                ("dependent", STRONG_PAIR[::-1]), ("multi", STRONG_PAIR), ("independent", WEAK_PAIR),
                ("dependent", WEAK_PAIR))
SCORE_NOTES = {
    "class_accuracy": "fraction the evaluator classifies as the target class",
    "class_probability": "evaluator softmax probability of the target class",
    "layout_iou": "IoU of the ink (pixels > 0) with the layout mask",
    "style_distance": "first-stage Gram-matrix distance to the style reference in the evaluator's features "
                      "(lower = closer)",
    "ink_gap": "|ink fraction - the style reference's ink fraction| (stroke weight; lower = closer)",
}


@dataclasses.dataclass(frozen=True)
class DigitSettings:
    """Settings of one digits experiment (all recorded in the report).

    target_class: the class condition's digit. layout_source / style_source: indices into the
      held-out real digits: the ink (pixels > 0) of the first is the layout mask, the second is
      the style reference. seeds: one image per seed. sampler: a ``sampler_by_name`` name.
    *_scale: ``rho_t = sqrt(ab_t) * scale`` (FreeDoM's rule), guided for ``t > stop``.
    """

    target_class: int = 3
    layout_source: int = 156
    style_source: int = 422
    seeds: tuple = tuple(range(6))
    num_steps: int = 20
    sampler: str = "ddim"
    class_scale: float = 4.0
    layout_scale: float = 10.0
    style_scale: float = 0.1
    stop: int = 0
    nan_policy: str = "raise"

    def __post_init__(self):
        who = "DigitSettings"
        check_int(self.target_class, who, "target_class", 0, 9)
        for name in ("layout_source", "style_source"):
            check_int(getattr(self, name), who, name, 0)
        object.__setattr__(self, "seeds", check_seeds(self.seeds, who, minimum=2))  # scores report mean and std
        check_int(self.num_steps, who, "num_steps", 2)
        sampler_by_name(self.sampler)
        for name in ("class_scale", "layout_scale", "style_scale"):
            check_positive(getattr(self, name), who, name)
        check_int(self.stop, who, "stop", -1)
        check_nan_policy(self.nan_policy, who)


def run_label(scheme: str, conditions: Sequence[str]) -> str:
    """``none``, ``independent class+layout``, ``dependent class->layout``, ``multi class+style``..."""
    if scheme == "none":
        return "none"
    joiner = "->" if scheme == "dependent" else "+"
    return f"{scheme} {joiner.join(conditions)}"


def check_run(scheme: str, conditions: Sequence[str], who: str = "digits") -> tuple:
    """Validate one ``(scheme, conditions)`` run; returns the conditions as a tuple. ``none`` and
    ``independent`` take one or two conditions, ``dependent`` and ``multi`` two."""
    if scheme not in DIGIT_SCHEMES:
        raise ValueError(f"{who}: scheme must be one of {DIGIT_SCHEMES}; got {scheme!r}.")
    conditions = tuple(conditions)
    sizes = (1, 2) if scheme in ("none", "independent") else (2,)
    if len(conditions) not in sizes or len(set(conditions)) != len(conditions) \
            or any(c not in DIGIT_CONDITIONS for c in conditions):
        raise ValueError(f"{who}: {scheme} guides {' or '.join(map(str, sizes))} distinct condition(s) of "
                         f"{DIGIT_CONDITIONS} (the first leads under dependent); got {conditions!r}.")
    return conditions


class DigitTargets(NamedTuple):
    """The targets of the three conditions: class label, layout mask ``(H, W)`` in ``{0, 1}``, style
    reference ``(H, W, 1)`` in ``[-1, 1]`` (and the layout source image, for figures)."""

    label: int
    mask: np.ndarray
    style: np.ndarray
    layout_image: np.ndarray


def digit_targets(models: DigitModels, settings: DigitSettings) -> DigitTargets:
    """The targets ``settings`` names, taken from the held-out real digits."""
    count = models.heldout_images.shape[0]
    for name in ("layout_source", "style_source"):
        if getattr(settings, name) >= count:
            raise ValueError(f"digits: {name}={getattr(settings, name)} is out of range; there are {count} "
                             "held-out digits.")
    layout = models.heldout_images[settings.layout_source]
    return DigitTargets(int(settings.target_class), (layout[..., 0] > 0).astype(np.float32),
                        models.heldout_images[settings.style_source], layout)


def _weights(settings: DigitSettings, conditions: Sequence[str]) -> np.ndarray:
    """``(2, 3)``: row i puts the scale of ``conditions[i]`` on its energy (slot i's energy is
    ``sum_k W[i, k] E_k``); a one-condition run leaves the second slot at zero."""
    w = np.zeros((2, len(DIGIT_CONDITIONS)), np.float32)
    for i, name in enumerate(conditions):
        w[i, DIGIT_CONDITIONS.index(name)] = getattr(settings, f"{name}_scale")
    return w


def _weighted_energy(fns, params, x0):
    """A condition slot's energy ``sum_k w_k E_k(x0)``: ``params = (w (3,), (params of E_k)_k)``."""
    weights, parts = params
    return sum(weights[k] * fn(p, x0) for k, (fn, p) in enumerate(zip(fns, parts)))


def _problem(models: DigitModels, settings: DigitSettings, scheme: str, conditions: tuple):
    """The program's arguments ``(keys, contexts, denoiser, scheme, sampler)``, static options and grid. The two
    slot conditions carry the weight matrix row and every energy's params (weights, targets) as
    leaves, so every pair, order and target of one scheme shares the compiled program."""
    schedule = linear_schedule()
    grid = model_grid(schedule, settings.num_steps, "digits")
    check_window(grid, None, settings.stop, "digits", f"stop={settings.stop}, the guidance window")
    targets = digit_targets(models, settings)
    energies = (class_energy(models.classifier, jnp.int32(targets.label)),
                layout_energy(models.segmenter, targets.mask), style_energy(models.features, targets.style))
    fns, parts = tuple(e.fn for e in energies), tuple(e.params for e in energies)
    weights = jnp.asarray(_weights(settings, conditions))
    rule = freedom_rule(1.0, stop=settings.stop)
    slots = [condition(f"slot{i}", static_partial(_weighted_energy, fns), rule, (weights[i], parts)) for i in range(2)]
    contexts, guidance = step_contexts(schedule, grid), scheme_by_name(scheme, slots)
    args = (seed_keys(settings.seeds), contexts, ddpm_denoiser(models.unet.module, models.unet.params), guidance,
            sampler_by_name(settings.sampler))
    static = {"shape": (models.resolution, models.resolution, 1), **skips(guidance, contexts)}
    return args, static, grid


class DigitSamples(NamedTuple):
    """One run's samples ``(S, H, W, 1)`` in ``[-1, 1]``, its per-step trace (``(S, steps, ...)``),
    the grid's timesteps and timings."""

    scheme: str
    conditions: tuple
    images: np.ndarray
    trace: object
    t: np.ndarray
    compile_s: float
    run_s: float


def compile_digits(models: DigitModels, settings: DigitSettings, runs: Sequence[tuple] = DEFAULT_RUNS, *,
                   programs: Optional[Programs] = None, workers: int = 2) -> float:
    """Compile the programs ``runs`` need (one per scheme), ``workers`` at a time (default: into
    the process-wide :data:`~zmagic_jax.tasks._recipe.PROGRAMS`). Returns the wall time in seconds."""
    programs = PROGRAMS if programs is None else programs
    prepare_digits(models, settings, runs, programs=programs)
    return programs.compile_pending(workers)


def prepare_digits(models: DigitModels, settings: DigitSettings, runs: Sequence[tuple] = DEFAULT_RUNS, *,
                   programs: Optional[Programs] = None) -> None:
    """Lower (trace) the programs ``runs`` need without compiling them, so that they compile
    together with other programs (:meth:`Programs.compile_pending`)."""
    programs = PROGRAMS if programs is None else programs
    for scheme, conditions in runs:
        args, static, _ = _problem(models, settings, scheme, check_run(scheme, conditions, "compile_digits"))
        programs.lower(sample_seeds, args, static)


def sample_digits(models: DigitModels, settings: DigitSettings, scheme: str,
                  conditions: Sequence[str] = STRONG_PAIR, *, programs: Optional[Programs] = None) -> DigitSamples:
    """Run ``scheme`` on ``conditions`` (the first leads under ``dependent``) for every seed in one
    compiled program (seeds vmapped). One program per scheme serves every pair, order and target.
    Raises ``FloatingPointError`` naming the condition, seed and step if guidance went non-finite
    (``nan_policy='skip'`` warns instead)."""
    conditions = check_run(scheme, conditions, "sample_digits")
    args, static, grid = _problem(models, settings, scheme, conditions)
    programs = PROGRAMS if programs is None else programs
    (images, trace, finite), compile_s, run_s = programs.call(sample_seeds, args, static)
    guided = len(conditions) if scheme != "none" else 0  # unguided runs: only the denoiser is checked
    check_finite(finite[..., :guided], conditions[:guided], settings.seeds, grid.t, settings.nan_policy,
                 f"digits ({run_label(scheme, conditions)})", "Lower the condition's scale.",
                 denoiser_finite=trace.denoiser_finite)
    return DigitSamples(scheme, conditions, np.clip(images, -1.0, 1.0), trace, np.asarray(grid.t),
                        compile_s, run_s)


def _scores(params, label, mask, style, images, *, module):
    def one(image):
        net = Net(module, params)
        probs = class_probability(net, image)
        return {"class_accuracy": (jnp.argmax(probs) == label).astype(jnp.float32),
                "class_probability": probs[label],
                "layout_iou": ink_iou(image, mask),
                "style_distance": style_distance(net, image, style),
                "ink_gap": jnp.abs(ink_fraction(image) - ink_fraction(style)),
                "features": classifier_output(net, image).penultimate}
    return jax.vmap(one)(images)


def digit_scores(models: DigitModels, settings: DigitSettings, images) -> Dict[str, np.ndarray]:
    """Per image, the evaluator's scores of every condition (``SCORE_NOTES``) and its penultimate
    ``features (S, hidden)``, as float64 arrays."""
    targets = digit_targets(models, settings)
    args = (models.evaluator.params, jnp.int32(targets.label), jnp.asarray(targets.mask), jnp.asarray(targets.style),
            jnp.asarray(images, jnp.float32))
    values, _, _ = PROGRAMS.call(_scores, args, {"module": models.evaluator.module})
    return {name: np.asarray(v, np.float64) for name, v in values.items()}


def _penultimate(params, images, *, module):
    return module.apply({"params": params}, images).penultimate


def evaluator_features(models: DigitModels, images) -> np.ndarray:
    """The evaluator's penultimate features ``(N, hidden)`` of images ``(N, H, W, 1)`` in ``[-1, 1]``."""
    values, _, _ = PROGRAMS.call(_penultimate, (models.evaluator.params, jnp.asarray(images, jnp.float32)),
                                 {"module": models.evaluator.module})
    return np.asarray(values, np.float64)


def _reference_sets(models: DigitModels, label: int) -> dict:
    """The evaluator features of the held-out real digits: all of them, and those of ``label``."""
    features = evaluator_features(models, models.heldout_images)
    return {"all": features, "class": features[models.heldout_labels == label]}


def real_frechet_floor(models: DigitModels, count: int, label: int, draws: int = 20, seed: int = 0,
                       references: Optional[dict] = None) -> dict:
    """Per reference set (``all`` held-out digits, or those of ``label``): the Frechet distance of
    ``count`` held-out real digits to the rest of the set, ``(mean, std)`` over ``draws`` random
    splits. It is what a perfect sampler scores at this sample size: small sets are biased upward,
    so compare runs with this floor, not with zero. ``references``: the sets of
    :func:`_reference_sets` when already computed."""
    rng = np.random.default_rng(seed)
    floors = {}
    references = _reference_sets(models, label) if references is None else references
    for name, features in references.items():
        values = []
        for _ in range(draws):
            order = rng.permutation(features.shape[0])
            values.append(frechet_distance(features[order[:count]], features[order[count:]]))
        floors[name] = (float(np.mean(values)), float(np.std(values)))
    return floors


class DigitResult(NamedTuple):
    """Samples and scores of several runs on the same seeds and targets."""

    settings: DigitSettings
    targets: DigitTargets
    samples: Dict[str, DigitSamples]
    scores: Dict[str, Dict[str, np.ndarray]]
    frechet: Dict[str, Dict[str, float]]
    frechet_floor: Dict[str, tuple]
    compile_s: float


def run_digits(models: DigitModels, settings: DigitSettings = DigitSettings(),
               runs: Sequence[tuple] = DEFAULT_RUNS, *, programs: Optional[Programs] = None,
               progress: Optional[Callable[[str], None]] = None) -> DigitResult:
    """Sample and score ``runs = [(scheme, (condition, condition)), ...]`` on the same seeds.
    ``progress(label)`` is called before each run."""
    progress = progress or (lambda label: None)
    runs = [(scheme, check_run(scheme, conds, "run_digits")) for scheme, conds in runs]
    if not runs:
        raise ValueError("run_digits: runs must name at least one (scheme, conditions) run.")
    compile_s = compile_digits(models, settings, runs, programs=programs)
    references = _reference_sets(models, settings.target_class)
    samples, scores, frechet = {}, {}, {}
    for scheme, conds in runs:
        label = run_label(scheme, conds)
        if label in samples:
            continue
        progress(label)
        samples[label] = sample_digits(models, settings, scheme, conds, programs=programs)
        scores[label] = digit_scores(models, settings, samples[label].images)
        features = scores[label].pop("features")
        frechet[label] = {name: frechet_distance(features, ref) for name, ref in references.items()}
    return DigitResult(settings, digit_targets(models, settings), samples, scores, frechet,
                       real_frechet_floor(models, len(settings.seeds), settings.target_class,
                                          references=references), compile_s)


def digit_report(result: DigitResult, models: Optional[DigitModels] = None) -> dict:
    """The JSON-ready report: settings, per-image scores, mean/std per run, Frechet distances,
    the guided-step gradient cosine and timings."""
    settings = result.settings
    runs, images = {}, []
    for label, samples in result.samples.items():
        scores = result.scores[label]
        for i, seed in enumerate(settings.seeds):
            images.append({"seed": seed, "run": label, "file": _file(label, seed),
                           **{name: float(v[i]) for name, v in scores.items()}})
        runs[label] = {
            "scheme": samples.scheme, "conditions": list(samples.conditions) if samples.scheme != "none" else [],
            "mean": {name: float(np.mean(v)) for name, v in scores.items()},
            "std": {name: float(np.std(v)) for name, v in scores.items()},
            "frechet_distance": {name: float(v) for name, v in result.frechet[label].items()},
            "mean_guided_cosine": _cosine(samples),
            "guided_steps": int(np.sum(samples.trace.guided[0])),
            "run_s": round(samples.run_s, 3)}
    report = {"settings": dataclasses.asdict(settings), "score_notes": SCORE_NOTES,
              "frechet_note": ("Frechet distance of the run's evaluator penultimate features to the held-out real "
                               "digits of the target class ('class', 50 digits) and to all of them ('all', 500); "
                               "frechet_floor is that of the same number of held-out real digits to the rest of the "
                               "set (mean, std over 20 splits): small sets are biased upward."),
              "cosine_note": ("independent: mean cos of the two conditions' gradients at x_t; dependent / multi: "
                              "mean cos(g_leader, term II) over guided steps and seeds"),
              "frechet_floor": {name: {"mean": m, "std": sd} for name, (m, sd) in result.frechet_floor.items()},
              "compile_s": round(result.compile_s, 3), "runs": runs, "images": images}
    if models is not None:
        report["models"] = models.info
    return report


def _cosine(samples: DigitSamples) -> Optional[float]:
    which = scheme_cosine(samples.scheme)
    value = None if which is None else mean_guided_cosine(samples.trace, which)
    return None if value is None or not np.isfinite(value) else value


def _file(label: str, seed: int) -> str:
    return f"seed{seed}_{label.replace(' ', '_').replace('->', '_to_').replace('+', '_and_')}.png"


def digit_table(report: dict) -> str:
    """A plain-text table of the report's runs (mean ± std over seeds)."""
    rows = [("run", "class acc", "p(class)", "layout IoU", "ink gap", "style dist", "FD class", "FD all", "cos",
             "run s")]
    for label, r in report["runs"].items():
        m, s = r["mean"], r["std"]
        cos = r["mean_guided_cosine"]
        rows.append((label, f"{m['class_accuracy']:.2f}", f"{m['class_probability']:.2f}±{s['class_probability']:.2f}",
                     f"{m['layout_iou']:.2f}±{s['layout_iou']:.2f}", f"{m['ink_gap']:.2f}±{s['ink_gap']:.2f}",
                     f"{m['style_distance']:.0f}±{s['style_distance']:.0f}",
                     f"{r['frechet_distance']['class']:.0f}", f"{r['frechet_distance']['all']:.0f}",
                     "-" if cos is None else f"{cos:+.2f}", f"{r['run_s']:.1f}"))
    floor = report["frechet_floor"]
    # 0 when the programs were compiled beforehand (the demo compiles every program together)
    compiled = (f"compiling the runs' programs: {report['compile_s']:.0f} s" if report["compile_s"] >= 0.5
                else "programs compiled beforehand")
    return format_table(rows, [f"(FD of {len(report['settings']['seeds'])} held-out real digits to the rest: class "
                               f"{floor['class']['mean']:.0f}±{floor['class']['std']:.0f}, all {floor['all']['mean']:.0f}"
                               f"±{floor['all']['std']:.0f}; {compiled})"])


def _scores_figure(path, report: dict) -> None:
    plt = figures.plt
    labels = list(report["runs"])
    panels = [("class_probability", "p(target class), evaluator"), ("layout_iou", "layout IoU (higher = closer)"),
              ("ink_gap", "ink gap to style ref (lower = closer)")]
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.6))
    y = np.arange(len(labels))
    for ax, (name, title) in zip(axes, panels):
        ax.barh(y, [report["runs"][l]["mean"][name] for l in labels],
                xerr=[report["runs"][l]["std"][name] for l in labels], color="#4c72b0")
        ax.set_title(title, fontsize=9)
    axes[3].barh(y, [report["runs"][l]["frechet_distance"]["class"] for l in labels], color="#dd8452")
    axes[3].axvline(report["frechet_floor"]["class"]["mean"], color="k", ls="--", lw=1,
                    label="real digits of the class, same count")
    axes[3].set_title("Frechet distance to real digits of the class", fontsize=9)
    axes[3].legend(fontsize=7)
    for ax in axes:
        ax.set_yticks(y)
        ax.set_yticklabels(labels if ax is axes[0] else [], fontsize=8)
        ax.invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_digits(out_dir, result: DigitResult, models: Optional[DigitModels] = None, *,
                overwrite: bool = False) -> dict:
    """Write into ``out_dir`` (atomically): ``grid_<run>.png`` per run, ``comparison.png`` (targets,
    then one row per run), ``scores.png``, one PNG per image under ``images/`` and ``report.json``.
    Returns the report."""
    report = digit_report(result, models)
    settings, targets = result.settings, result.targets
    with atomic_output_dir(out_dir, overwrite=overwrite, command='save_digits') as tmp:
        tmp = Path(tmp)
        (tmp / "images").mkdir()
        for entry in report["images"]:
            save_png(tmp / "images" / entry["file"],
                     result.samples[entry["run"]].images[settings.seeds.index(entry["seed"])])
        seeds = ", ".join(map(str, settings.seeds))
        for label, samples in result.samples.items():
            per_row = 8
            rows = [(f"seeds {i}..", list(samples.images[i:i + per_row]))
                    for i in range(0, len(samples.images), per_row)]
            save_image_grid(tmp / f"grid_{_file(label, 0)[6:]}", rows, title=f"{label} (seeds {seeds})", cell=1.0)
        mask_image = targets.mask[..., None] * 2.0 - 1.0
        rows = [("targets", [mask_image, targets.layout_image, targets.style])] + [
            (label.replace(" ", "\n"), list(samples.images)) for label, samples in result.samples.items()]
        save_image_grid(tmp / "comparison.png", rows, column_titles=["layout mask", "layout source", "style ref"],
                        title=f"digits: class {settings.target_class}, layout and style from held-out digits "
                              f"{settings.layout_source} / {settings.style_source}; seeds {seeds}", cell=1.0)
        _scores_figure(tmp / "scores.png", report)
        (tmp / "report.json").write_text(json.dumps(report, indent=2, allow_nan=False))
    return report
