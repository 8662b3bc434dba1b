"""Face tasks on the CelebA-HQ pixel DDPM: the paper's Tables 1, 3 and 4 with FreeDoM's face settings.

Tasks (conditions in their default leading order):

* ``text_seg_id`` (Table 1): CLIP text + face parsing + identity;
* ``seg_text`` (Table 3): face parsing + CLIP text;
* ``id_landmarks`` (Table 4): identity + landmarks.

Schemes: ``none`` (unguided, energies recorded), ``independent`` (FreeDoM: the sum of the
gradients at ``x_t``), ``dependent`` (Z-Magic Algorithm 1, two-condition tasks, ``order`` picks
which condition leads) and ``multi`` (Algorithm 2, CAGrad over every ordered pair).

Defaults follow FreeDoM's ``Face-GD/run.sh`` (``reference/guidance_peers.md`` §1.2): 100 steps of the
``eta = 0.5`` mixing sampler ``x_{t'} = sqrt(ab_{t'}) x0 + sqrt(1 - ab_{t'}) (eta z + sqrt(1 - eta^2) eps)``;
``rho_t = sqrt(ab_t) * scale`` guided for ``t > stop`` with (scale, stop) = (0.2, 200) segmentation,
(100, 100) identity, (500, 200) landmarks; the text follows the norm rule (2 % of the noise removal,
every step). Energies are FreeDoM's un-squared residual norms (:mod:`zmagic_jax.energies`).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Dict, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from zmagic_jax._io import atomic_output_dir
from zmagic_jax.energies import (Clip, clip_architecture, clip_text_distance, clip_text_energy, text_embedding,
                                 with_params)
from zmagic_jax.energies._face import (LANDMARK_NETS, Net, face_id_energy, face_parsing_energy, identity_distance,
                                       identity_embedding, landmark_distance, landmark_energy, parsing_mse)
from zmagic_jax.models._ddpm_unet import ddpm_denoiser
from zmagic_jax.samplers import eta_mixing, step_contexts
from zmagic_jax.schedules import Schedule, linear_schedule
from zmagic_jax.schemes import condition
from zmagic_jax.step_rules import freedom_rule, norm_relative_rule
from zmagic_jax.tasks._outputs import save_image_grid, save_png
from zmagic_jax.tasks._recipe import (PROGRAMS, Programs, check_choice, check_finite, check_int, check_nan_policy,
                                      check_positive, check_seeds, check_window, model_grid, sample_seeds,
                                      scheme_by_name, seed_keys, skips)

FACE_TASKS = {
    "text_seg_id": ("text", "segmentation", "identity"),
    "seg_text": ("segmentation", "text"),
    "id_landmarks": ("identity", "landmarks"),
}
FACE_SCHEMES = ("none", "independent", "dependent", "multi")
METRIC_OF = {"text": "text_distance", "segmentation": "segmentation_mse", "identity": "identity_distance",
             "landmarks": "landmark_distance"}
METRIC_NOTES = {
    "text_distance": "1 - cos(CLIP image embedding, CLIP text embedding of the prompt)",
    "segmentation_mse": "mean squared difference of BiSeNet main logits to those of the parsing source",
    "identity_distance": "1 - cos of ArcFace IR-SE50 embeddings to the identity reference",
    "landmark_distance": "mean Euclidean distance in pixels between the landmarks and the landmark source's",
}
NETWORK_OF = {"text": "clip", "segmentation": "parser", "identity": "arcface", "landmarks": "landmarks"}
METHOD_LABELS = {"none": "unguided", "independent": "independent (FreeDoM)", "dependent": "dependent (Z-Magic)",
                 "multi": "multi (Z-Magic, CAGrad)"}


@dataclasses.dataclass(frozen=True)
class FaceSettings:
    """Settings of one face run (all recorded in the report).

    task: ``text_seg_id``, ``seg_text`` or ``id_landmarks``. scheme: see the module docstring.
    order: for ``dependent`` on a two-condition task, ``(0, 1)`` lets the task's first condition lead,
      ``(1, 0)`` the second. prompt: the CLIP text of tasks with text.
    seeds: one image per seed (``PRNGKey(seed)`` alone draws ``x_T`` and the noise).
    text_factor: the norm rule's factor (FreeDoM 0.02); ``*_scale`` / ``*_stop``: ``rho_t =
      sqrt(ab_t) * scale`` for ``t > stop``. parse_size: BiSeNet input size (FreeDoM 512).
    landmark_net: ``mobilefacenet`` (68 points) or ``onet`` (MTCNN, 5 points); landmark_box: the face
      box ``(top, left, height, width)`` the landmark net sees, ``None`` = the whole image.
    """

    task: str = "id_landmarks"
    scheme: str = "independent"
    order: tuple = (0, 1)
    prompt: str = "a photo of a smiling person"
    seeds: tuple = (0,)
    num_steps: int = 100
    eta: float = 0.5
    text_factor: float = 0.02
    segmentation_scale: float = 0.2
    segmentation_stop: int = 200
    identity_scale: float = 100.0
    identity_stop: int = 100
    landmark_scale: float = 500.0
    landmark_stop: int = 200
    parse_size: int = 512
    landmark_net: str = "mobilefacenet"
    landmark_box: Optional[tuple] = None
    nan_policy: str = "raise"

    def __post_init__(self):
        who = "FaceSettings"
        if self.task not in FACE_TASKS:
            raise ValueError(f"{who}: task must be one of {sorted(FACE_TASKS)}; got {self.task!r}.")
        if self.scheme not in FACE_SCHEMES:
            raise ValueError(f"{who}: scheme must be one of {FACE_SCHEMES}; got {self.scheme!r}.")
        if self.scheme == "dependent" and len(FACE_TASKS[self.task]) != 2:
            raise ValueError(f"{who}: dependent (Algorithm 1) takes two conditions and task {self.task!r} has "
                             f"{len(FACE_TASKS[self.task])}; use multi (Algorithm 2) for it.")
        order = tuple(int(i) for i in self.order)
        if sorted(order) != [0, 1]:
            raise ValueError(f"{who}: order must be (0, 1) or (1, 0); got {self.order!r}.")
        object.__setattr__(self, "order", order)
        object.__setattr__(self, "seeds", check_seeds(self.seeds, who))
        check_int(self.num_steps, who, "num_steps", 2)
        check_positive(self.eta, who, "eta", zero=True)
        if self.eta > 1.0:
            raise ValueError(f"{who}: eta must be in [0, 1]; got {self.eta!r}.")
        for name in ("text_factor", "segmentation_scale", "identity_scale", "landmark_scale"):
            check_positive(getattr(self, name), who, name)
        if "text" in self.conditions and (not isinstance(self.prompt, str) or not self.prompt.strip()):
            raise ValueError(f"{who}: task {self.task!r} guides a text: prompt must be a non-empty string.")
        for name in self.conditions:
            if name != "text":
                check_int(getattr(self, f"{_prefix(name)}_stop"), who, f"{_prefix(name)}_stop", -1)
        if self.landmark_net not in LANDMARK_NETS:
            raise ValueError(f"{who}: landmark_net must be one of {LANDMARK_NETS}; got {self.landmark_net!r}.")
        if self.landmark_box is not None:
            object.__setattr__(self, "landmark_box", tuple(int(v) for v in self.landmark_box))
        check_nan_policy(self.nan_policy, who)

    def grid(self, schedule: Schedule):
        """The sampling grid on the model's own schedule, every guidance window checked against it."""
        who = "FaceSettings"
        grid = model_grid(schedule, self.num_steps, who)
        for name in self.conditions:
            if name != "text":
                stop = getattr(self, f"{_prefix(name)}_stop")
                check_window(grid, None, stop, who, f"{_prefix(name)}_stop={stop}, the {name} guidance window")
        return grid

    @property
    def conditions(self) -> tuple:
        """The task's condition names in the order the scheme receives them."""
        return FACE_TASKS[self.task]


def _prefix(name: str) -> str:
    return {"landmarks": "landmark"}.get(name, name)


class FaceModels(NamedTuple):
    """The networks of a face task (``None`` where the task does not use one).

    unet: the pixel DDPM (:func:`zmagic_jax.models.load_ddpm_unet`); clip: :class:`Clip`;
    parser (BiSeNet), arcface (IR-SE50), landmarks (MobileFaceNet or ONet): :class:`Net`.
    schedule: the DDPM's betas (CelebA-HQ: linear 1e-4 .. 0.02 over 1000 steps).
    """

    unet: Net
    clip: Optional[Clip] = None
    parser: Optional[Net] = None
    arcface: Optional[Net] = None
    landmarks: Optional[Net] = None
    schedule: Optional[Schedule] = None

    @property
    def betas(self) -> Schedule:
        """The schedule, default linear 1e-4 .. 0.02 over 1000 steps."""
        return linear_schedule(1000, 1e-4, 0.02) if self.schedule is None else self.schedule


class FaceReferences(NamedTuple):
    """Reference images ``(H, W, 3)`` in ``[-1, 1]`` at the DDPM's resolution: the identity
    reference, the parsing source (its parsing map is the target) and the landmark source."""

    identity: Optional[np.ndarray] = None
    parsing: Optional[np.ndarray] = None
    landmarks: Optional[np.ndarray] = None


REFERENCE_OF = {"segmentation": "parsing", "identity": "identity", "landmarks": "landmarks"}


def check_face_inputs(models: FaceModels, settings: FaceSettings, references: FaceReferences) -> None:
    """Raise naming what is missing: a network or a reference image the task needs."""
    for name in settings.conditions:
        network = NETWORK_OF[name]
        if getattr(models, network) is None:
            raise ValueError(f"face task {settings.task!r}: condition {name!r} needs the {network} network; "
                             "load it and pass it in FaceModels.")
        if name in REFERENCE_OF and getattr(references, REFERENCE_OF[name]) is None:
            raise ValueError(f"face task {settings.task!r}: condition {name!r} needs the "
                             f"{REFERENCE_OF[name]} reference image in FaceReferences.")


def _shape(models: FaceModels) -> tuple:
    config = models.unet.module.config
    return int(config.resolution), int(config.resolution), int(config.in_channels)


def _energies(models: FaceModels, settings: FaceSettings, references: FaceReferences) -> dict:
    """name -> :class:`~zmagic_jax.Energy` of the task's conditions (weights and references are params)."""
    energies = {}
    for name in settings.conditions:
        if name == "text":
            energies[name] = clip_text_energy(models.clip, settings.prompt)
        elif name == "segmentation":
            energies[name] = face_parsing_energy(models.parser, _reference(references, "parsing"), settings.parse_size)
        elif name == "identity":
            energies[name] = face_id_energy(models.arcface, _reference(references, "identity"))
        else:
            energies[name] = landmark_energy(models.landmarks, _reference(references, "landmarks"),
                                             settings.landmark_box, settings.landmark_net)
    return energies


def _reference(references: FaceReferences, name: str):
    return jnp.asarray(getattr(references, name), jnp.float32)


def _rule(settings: FaceSettings, name: str):
    if name == "text":
        return norm_relative_rule(settings.text_factor)
    prefix = _prefix(name)
    return freedom_rule(getattr(settings, f"{prefix}_scale"), stop=getattr(settings, f"{prefix}_stop"))


def _problem(models: FaceModels, settings: FaceSettings, references: FaceReferences, scheme: str):
    """The program's arguments ``(keys, contexts, denoiser, scheme, sampler)``, its static shape and
    the grid: weights, references, the prompt embedding and seed values are arguments, so one
    compiled program per (architecture, scheme, static setting) serves them all."""
    grid = settings.grid(models.betas)
    energies = _energies(models, settings, references)
    conds = [condition(name, energies[name], _rule(settings, name)) for name in settings.conditions]
    guidance = scheme_by_name(scheme, conds, **({"order": settings.order} if scheme == "dependent" else {}))
    contexts = step_contexts(models.betas, grid)
    args = (seed_keys(settings.seeds), contexts, ddpm_denoiser(models.unet.module, models.unet.params), guidance,
            eta_mixing(settings.eta))
    return args, {"shape": _shape(models), **skips(guidance, contexts)}, grid


class FaceSamples(NamedTuple):
    """One scheme's samples ``(S, H, W, 3)`` in ``[-1, 1]`` for every seed, its per-step trace
    (:class:`~zmagic_jax.GuidanceInfo`, ``(S, steps, ...)``), the grid's timesteps and timings."""

    scheme: str
    order: tuple
    images: np.ndarray
    trace: Any
    condition_names: tuple
    t: np.ndarray
    compile_s: float
    run_s: float


def sample_faces(models: FaceModels, settings: FaceSettings, references: FaceReferences,
                 scheme: Optional[str] = None, *, programs: Optional[Programs] = None,
                 compiler_options: Optional[dict] = None) -> FaceSamples:
    """Run ``scheme`` (default ``settings.scheme``) for every seed in one compiled program (seeds
    vmapped). Weights, references, prompt embedding and seed values are program arguments, so the
    process-wide cache (or ``programs``) compiles each (architecture, scheme, static setting) once.
    Raises ``FloatingPointError`` naming condition, seed and step if guidance went non-finite."""
    scheme = settings.scheme if scheme is None else scheme
    check_choice(scheme, FACE_SCHEMES, "sample_faces", "scheme")
    settings = dataclasses.replace(settings, scheme=scheme)
    check_face_inputs(models, settings, references)
    args, static, grid = _problem(models, settings, references, scheme)
    programs = PROGRAMS if programs is None else programs
    (images, trace, finite), compile_s, run_s = programs.call(sample_seeds, args, static, compiler_options)
    check_finite(finite, settings.conditions, settings.seeds, grid.t, settings.nan_policy, "face",
                 "Lower the condition's scale.", denoiser_finite=trace.denoiser_finite)
    return FaceSamples(scheme, settings.order if scheme == "dependent" else (), np.clip(images, -1, 1),
                       trace, settings.conditions, np.asarray(grid.t), compile_s, run_s)


def _metrics(params, refs, images, *, statics):
    conditions, parse_size, landmark_net, landmark_box, modules, clip_static = statics
    modules = dict(modules)

    def one(image):
        values = {}
        for name in conditions:
            if name == "text":
                values[METRIC_OF[name]] = clip_text_distance(with_params(clip_static, params["clip"]), image,
                                                             refs["text"])
            elif name == "segmentation":
                values[METRIC_OF[name]] = parsing_mse(Net(modules["parser"], params["parser"]), image,
                                                      refs["parsing"], parse_size)
            elif name == "identity":
                values[METRIC_OF[name]] = identity_distance(Net(modules["arcface"], params["arcface"]), image,
                                                            refs["identity"])
            else:
                values[METRIC_OF[name]] = landmark_distance(Net(modules["landmarks"], params["landmarks"]), image,
                                                            refs["landmarks"], landmark_box, landmark_net)
        return values
    return jax.vmap(one)(images)


def face_metrics(models: FaceModels, settings: FaceSettings, references: FaceReferences, images,
                 programs: Optional[Programs] = None) -> dict:
    """Per image, the table metric of each condition of the task (see ``METRIC_NOTES``):
    ``{metric: (S,) float64}``, one compiled program per task and architecture."""
    check_face_inputs(models, settings, references)
    used = {NETWORK_OF[name] for name in settings.conditions}
    params = {name: getattr(models, name).params for name in sorted(used)}
    modules = tuple(sorted((name, getattr(models, name).module) for name in used if name != "clip"))
    refs = {REFERENCE_OF[name]: _reference(references, REFERENCE_OF[name]) for name in settings.conditions
            if name != "text"}
    if "text" in settings.conditions:
        refs["text"] = text_embedding(models.clip, settings.prompt)
    clip_static = clip_architecture(models.clip) if "clip" in used else None
    statics = (settings.conditions, settings.parse_size, settings.landmark_net, settings.landmark_box,
               modules, clip_static)
    programs = PROGRAMS if programs is None else programs
    values, _, _ = programs.call(_metrics, (params, refs, jnp.asarray(images, jnp.float32)), {"statics": statics})
    return {name: np.asarray(v, np.float64) for name, v in values.items()}


def _identity_features(params, images, *, module):
    return jax.vmap(lambda x: identity_embedding(Net(module, params), x))(images)


def face_features(models: FaceModels, images) -> np.ndarray:
    """ArcFace embeddings ``(S, 512)`` of images in ``[-1, 1]``: the feature space of the Frechet
    distance the face experiment reports (``zmagic_jax.metrics.frechet_distance``)."""
    if models.arcface is None:
        raise ValueError("face_features: needs the arcface network in FaceModels.")
    values, _, _ = PROGRAMS.call(_identity_features, (models.arcface.params, jnp.asarray(images, jnp.float32)),
                                 {"module": models.arcface.module})
    return np.asarray(values, np.float64)


class FaceResult(NamedTuple):
    """Samples and metrics of several schemes on the same seeds and references."""

    settings: FaceSettings
    samples: Dict[str, FaceSamples]
    metrics: Dict[str, Dict[str, np.ndarray]]


def run_label(scheme: str, order: Sequence[int], settings: FaceSettings) -> str:
    """``scheme`` or, for dependent, ``dependent_<leader>_<follower>`` (which condition leads)."""
    if scheme != "dependent":
        return scheme
    names = settings.conditions
    return f"dependent_{names[order[0]]}_{names[order[1]]}"


def run_faces(models: FaceModels, settings: FaceSettings, references: FaceReferences,
              runs: Optional[Sequence[tuple]] = None, *, programs: Optional[Programs] = None,
              compiler_options: Optional[dict] = None,
              progress: Optional[Callable[[str], None]] = None) -> FaceResult:
    """Sample and measure several runs on the same seeds: ``runs = [(scheme, order), ...]`` (default
    unguided and ``settings.scheme``). ``progress(label)`` is called before each run."""
    progress = progress or (lambda label: None)
    runs = [("none", (0, 1)), (settings.scheme, settings.order)] if runs is None else list(runs)
    samples, metrics = {}, {}
    for scheme, order in runs:
        run_settings = dataclasses.replace(settings, scheme=scheme, order=tuple(order))
        label = run_label(scheme, run_settings.order, run_settings)
        if label in samples:
            continue
        progress(label)
        samples[label] = sample_faces(models, run_settings, references, programs=programs,
                                      compiler_options=compiler_options)
        metrics[label] = face_metrics(models, run_settings, references, samples[label].images, programs=programs)
    return FaceResult(settings, samples, metrics)


def face_report(result: FaceResult) -> dict:
    """The JSON-ready report: settings, per-image metrics, mean/std per run, guidance and timings."""
    settings = result.settings
    images, summary = [], {}
    for label, samples in result.samples.items():
        metrics = result.metrics[label]
        for i, seed in enumerate(settings.seeds):
            images.append({"seed": seed, "run": label, "file": f"seed{seed}_{label}.png",
                           **{name: float(values[i]) for name, values in metrics.items()}})
        guided = samples.trace.guided[0]
        summary[label] = {
            "mean": {name: float(np.mean(v)) for name, v in metrics.items()},
            "std": {name: float(np.std(v)) for name, v in metrics.items()},
            "guided_steps": int(np.sum(guided)),
            "compile_s": round(samples.compile_s, 3), "run_s": round(samples.run_s, 3)}
    return {"settings": dataclasses.asdict(settings), "metric_notes": {METRIC_OF[n]: METRIC_NOTES[METRIC_OF[n]]
                                                                        for n in settings.conditions},
            "images": images, "runs": summary}


def save_faces(out_dir, result: FaceResult, references: FaceReferences, *, overwrite: bool = False) -> dict:
    """Write ``seed<S>_<run>.png`` per image, ``grid.png`` (references, then one row per run) and
    ``metrics.json`` into ``out_dir`` atomically. Returns the report."""
    report = face_report(result)
    settings = result.settings
    with atomic_output_dir(out_dir, overwrite=overwrite, command='save_faces') as tmp:
        tmp = Path(tmp)
        for entry in report["images"]:
            samples = result.samples[entry["run"]]
            save_png(tmp / entry["file"], samples.images[settings.seeds.index(entry["seed"])])
        used = {REFERENCE_OF[n] for n in settings.conditions if n in REFERENCE_OF}
        reference_row = [getattr(references, name) for name in ("identity", "parsing", "landmarks") if name in used]
        rows = [("references", reference_row)] + [
            (label.replace("_", " "), list(samples.images)) for label, samples in result.samples.items()]
        titles = [f"{name} reference" for name in ("identity", "parsing", "landmarks") if name in used]
        heading = f"{settings.task}, seeds {', '.join(map(str, settings.seeds))}"
        if "text" in settings.conditions:
            heading += f": {settings.prompt!r}"
        save_image_grid(tmp / "grid.png", rows, column_titles=titles, title=heading)
        (tmp / "metrics.json").write_text(json.dumps(report, indent=2, allow_nan=False))
    return report


def load_face_models(unet, *, clip=None, bisenet=None, arcface=None, landmarks=None,
                     landmark_net: str = "mobilefacenet", onet_default: bool = False) -> FaceModels:
    """Load the networks of a face task from local files (PyTorch checkpoints are converted on the
    fly, ``.safetensors`` files written by ``zmagic convert`` are read directly; configs stored in a
    converted file are used). ``clip`` is a transformers CLIP folder. With ``landmark_net="onet"``
    and ``landmarks=None`` the weights of the installed facenet-pytorch are used."""
    from zmagic_jax.energies import load_clip
    from zmagic_jax.ports import load_arcface, load_bisenet, load_ddpm_unet, load_mobilefacenet, load_onet

    if landmark_net not in LANDMARK_NETS:
        raise ValueError(f"load_face_models: landmark_net must be one of {LANDMARK_NETS}; got {landmark_net!r}.")
    net = lambda loaded: None if loaded is None else Net(*loaded)
    if landmark_net == "onet" and (landmarks is not None or onet_default):
        landmark_model = net(load_onet(landmarks))
    else:
        landmark_model = None if landmarks is None else net(load_mobilefacenet(landmarks))
    return FaceModels(unet=net(load_ddpm_unet(unet)), clip=None if clip is None else load_clip(clip),
                      parser=None if bisenet is None else net(load_bisenet(bisenet)),
                      arcface=None if arcface is None else net(load_arcface(arcface)), landmarks=landmark_model)
