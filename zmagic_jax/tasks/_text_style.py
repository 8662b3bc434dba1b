"""Text + style on Stable Diffusion: FreeDoM's SD style recipe and Z-Magic's dependent variant.

The prompt conditions the latent denoiser through classifier-free guidance (CFG); the style is an
energy on the decoded clean-latent estimate, ``E(z0) = || G(F(D(z0))) - G(F(style)) ||_F``
(:func:`~zmagic_jax.energies.clip_style_energy`: CLIP vision tokens ``F``, Gram ``G``, VAE
decoder ``D``). Schemes:

* ``none``: CFG only (plain Stable Diffusion; also the content reference of every other run).
* ``independent``: FreeDoM, the style gradient at ``x_t``, ``d = -rho grad_{x_t} E``.
* ``dependent``: Z-Magic with the CFG prompt as the leading condition (``p(x_t | c1)`` of the
  paper): the style gradient is taken at the look-ahead point ``xhat = M0(x_t) + sigma z`` and
  pulled back to ``x_t`` by one ``jax.vjp`` (:func:`zmagic_jax.model_led_term`).
* ``multi``: Z-Magic Algorithm 2, CAGrad over the ordered pairs of [CLIP text, style].

With ``text_guidance=True`` independent and dependent also guide the CLIP text distance
``1 - cos(e_I, e_T)``: ``independent([text, style])`` and ``dependent([text, style])`` (text leads).

Defaults follow FreeDoM's SD_style run (100 steps, CFG 5, DDPM posterior sampler, step size
``rho = 0.2 rms(w (eps_c - eps_u)) / rms(grad)``, guidance on DDIM indices 30..69 i.e.
``299 < t <= 699``, time-travel 3 repeats on indices 40..69 i.e. ``399 < t <= 699``).
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, Dict, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from zmagic_jax import figures
from zmagic_jax._io import atomic_output_dir
from zmagic_jax.contracts import Keyed, static_partial
from zmagic_jax.energies import (Clip, clip_architecture, clip_content_loss, clip_style_energy, clip_style_loss,
                                 clip_text_distance, load_clip, text_embedding, with_params)
from zmagic_jax.models import (StableDiffusion, decode_latents, encode_prompt, latent_cfg_correction, latent_denoiser,
                               load_stable_diffusion)
from zmagic_jax.samplers import step_contexts
from zmagic_jax.sampling import time_travel
from zmagic_jax.schemes import condition
from zmagic_jax.step_rules import cfg_relative_rule, freedom_rule
from zmagic_jax.tasks._outputs import load_image, save_png, to_uint8
from zmagic_jax.tasks._recipe import (PROGRAMS, Programs, check_choice, check_finite, check_int, check_latent_size,
                                      check_nan_policy, check_positive, check_seeds, check_window, contribution_norms,
                                      model_grid, sample_seeds, sampler_by_name, scheme_by_name, seed_keys, skips)

TEXT_STYLE_SCHEMES = ("none", "independent", "dependent", "multi")
METRICS = ("content_loss", "style_loss", "text_distance")


@dataclasses.dataclass(frozen=True)
class TextStyleSettings:
    """Settings of one text + style run (all recorded in the CLI's metrics.json).

    prompt: the Stable Diffusion prompt (CFG); clip_prompt: the prompt CLIP measures (and guides,
      with ``text_guidance`` or ``multi``), default ``prompt``; negative_prompt: CFG's
      unconditional prompt.
    style_image: path of the style reference (any RGB image; resized to CLIP's input size,
      bilinear, as FreeDoM prepares it).
    scheme: ``none``, ``independent``, ``dependent`` or ``multi`` (see the module docstring).
    seeds: one image per seed; seed ``s`` draws ``x_T`` and the sampling noise from
      ``PRNGKey(s)`` alone, so an image does not depend on the other seeds of the run.
    guidance_start, guidance_stop: style (and text) guidance for ``stop < t <= start``.
    time_travel_repeats, time_travel_start/stop: each step with ``stop < t <= start`` is taken
      ``repeats`` times with forward re-noising in between (``1`` = off).
    rule: ``cfg_relative`` (``rho = guidance_scale * rms(w (eps_c - eps_u)) / rms(grad)``) or
      ``freedom`` (``rho = sqrt(ab_t) * guidance_scale``).
    latent_size: ``(h, w)`` of the latent, default the UNet's ``sample_size`` (image ``8h x 8w``).
    style_layer: CLIP ``hidden_states`` index of the style features (FreeDoM: 3);
      content_layer: of the content metric, default half the vision depth (6 for ViT-B).
    remat: rematerialise UNet and VAE activations in the backward pass (less memory).
    nan_policy: ``raise`` (default) or ``skip`` when guidance produced non-finite values (those
      steps were taken unguided either way).
    """

    prompt: str
    style_image: str
    scheme: str = "dependent"
    clip_prompt: Optional[str] = None
    negative_prompt: str = ""
    seeds: tuple = (0,)
    num_steps: int = 100
    cfg_scale: float = 5.0
    guidance_start: int = 699
    guidance_stop: int = 299
    time_travel_repeats: int = 3
    time_travel_start: int = 699
    time_travel_stop: int = 399
    rule: str = "cfg_relative"
    guidance_scale: float = 0.2
    text_guidance: bool = False
    sampler: str = "ddpm_posterior"
    latent_size: Optional[tuple] = None
    style_layer: int = 3
    content_layer: Optional[int] = None
    remat: bool = False
    nan_policy: str = "raise"

    def __post_init__(self):
        who = "TextStyleSettings"
        for name in ("prompt", "style_image"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name).strip():
                raise ValueError(f"{who}: {name} must be a non-empty string; got {getattr(self, name)!r}.")
        if self.clip_prompt is not None and (not isinstance(self.clip_prompt, str) or not self.clip_prompt.strip()):
            raise ValueError(f"{who}: clip_prompt must be None (use prompt) or a non-empty string; "
                             f"got {self.clip_prompt!r}.")
        if self.scheme not in TEXT_STYLE_SCHEMES:
            raise ValueError(f"{who}: scheme must be one of {TEXT_STYLE_SCHEMES}; got {self.scheme!r}.")
        object.__setattr__(self, "seeds", check_seeds(self.seeds, who))
        check_int(self.num_steps, who, "num_steps", 2)
        check_choice(self.rule, ("cfg_relative", "freedom"), who, "rule")
        check_positive(self.cfg_scale, who, "cfg_scale", zero=self.rule != "cfg_relative")
        check_positive(self.guidance_scale, who, "guidance_scale")
        check_int(self.time_travel_repeats, who, "time_travel_repeats", 1)
        for label, start, stop in (("guidance", self.guidance_start, self.guidance_stop),
                                   ("time-travel", self.time_travel_start, self.time_travel_stop)):
            if label == "time-travel" and self.time_travel_repeats == 1:
                continue
            if isinstance(start, bool) or isinstance(stop, bool) or not isinstance(start, (int, np.integer)) \
                    or not isinstance(stop, (int, np.integer)) or start <= stop:
                raise ValueError(f"{who}: the {label} window stop < t <= start needs integers with start > stop; "
                                 f"got start={start!r}, stop={stop!r}.")
        object.__setattr__(self, "latent_size", check_latent_size(self.latent_size, who))
        sampler_by_name(self.sampler)
        check_nan_policy(self.nan_policy, who)

    def grid(self, schedule):
        """The sampling grid on the model's own schedule, with both windows checked against it."""
        who = "TextStyleSettings"
        grid = model_grid(schedule, self.num_steps, who)
        check_window(grid, self.guidance_start, self.guidance_stop, who, "the guidance window")
        if self.time_travel_repeats > 1:
            check_window(grid, self.time_travel_start, self.time_travel_stop, who, "the time-travel window")
        return grid

    @property
    def measured_prompt(self) -> str:
        return self.prompt if self.clip_prompt is None else self.clip_prompt

    def condition_names(self, scheme: Optional[str] = None) -> tuple:
        """Names of the guided (or, for ``none``, recorded) conditions, in order."""
        scheme = self.scheme if scheme is None else scheme
        with_text = scheme == "multi" or (self.text_guidance and scheme in ("independent", "dependent"))
        return ("text", "style") if with_text else ("style",)


class TextStyleModels(NamedTuple):
    """The loaded Stable Diffusion and CLIP (see :func:`load_text_style_models`)."""
    sd: StableDiffusion
    clip: Clip


def load_text_style_models(sd_path, clip_path, dtype=jnp.float32) -> TextStyleModels:
    """Load Stable Diffusion (diffusers folder) and CLIP (transformers folder) from local paths."""
    return TextStyleModels(load_stable_diffusion(sd_path, dtype=dtype), load_clip(clip_path, dtype=dtype))


def load_style_image(path, size: int) -> np.ndarray:
    """Read an RGB image as a ``(size, size, 3)`` float32 array in ``[-1, 1]`` (PIL bilinear resize,
    FreeDoM's reference preprocessing). Raises ``FileNotFoundError`` / ``ValueError`` naming the file."""
    return load_image(path, (size, size), "style image")


def _latent_shape(sd: StableDiffusion, settings: TextStyleSettings) -> tuple:
    h, w = settings.latent_size or (int(sd.sample_size),) * 2
    return int(sd.unet.config.in_channels), h, w


def _rule(settings: TextStyleSettings, sd, cond, uncond):
    window = dict(start=settings.guidance_start, stop=settings.guidance_stop)
    if settings.rule == "freedom":
        return freedom_rule(settings.guidance_scale, **window)
    correction = latent_cfg_correction(sd, cond, uncond, settings.cfg_scale, remat=settings.remat)
    return cfg_relative_rule(settings.guidance_scale, correction, **window)


def _decoded(vae, scaling_factor, remat, params, z):
    sd = StableDiffusion(None, None, vae.value, params, None, None, None, None, scaling_factor)
    return decode_latents(sd, z, remat=remat)


def _style_of_latent(decoder, style_fn, params, z):
    """The style energy of the decoded latent: ``E(D(z))``; ``params = (vae params, style params)``."""
    vae, style = params
    return style_fn(style, decoder(vae, z))


def _text_of_latent(decoder, clip_static, params, z):
    vae, (clip_params, text) = params
    return clip_text_distance(with_params(clip_static, clip_params), decoder(vae, z), text)


def _conditions(models: TextStyleModels, settings: TextStyleSettings, decoder, cond, uncond, style_image,
                text) -> dict:
    """name -> Condition: the energies see the decoded ``x0|t``; weights and references are params."""
    sd, clip = models
    style = clip_style_energy(clip, style_image, settings.style_layer)
    rule = _rule(settings, sd, cond, uncond)
    clip_static = clip_architecture(clip)
    return {"style": condition("style", static_partial(_style_of_latent, decoder, style.fn), rule,
                               (sd.vae_params, style.params)),
            "text": condition("text", static_partial(_text_of_latent, decoder, clip_static), rule,
                              (sd.vae_params, (clip.params, text)))}


def _scheme(settings: TextStyleSettings, scheme: str, conditions: dict):
    """``conditions``: name -> Condition; the scheme uses those of :meth:`condition_names`."""
    return scheme_by_name(scheme, [conditions[name] for name in settings.condition_names(scheme)])


def _sample_and_decode(keys, contexts, denoiser, scheme, sampler, travel, vae_params, *, shape, decoder,
                       skip_inactive=True):
    latents, trace, finite = sample_seeds(keys, contexts, denoiser, scheme, sampler, travel, shape=shape,
                                          skip_inactive=skip_inactive)
    return latents, jax.vmap(lambda z: decoder(vae_params, z))(latents), trace, finite


def _problem(models: TextStyleModels, settings: TextStyleSettings, scheme: str, inputs):
    """The program's arguments, static options and grid: weights, prompts, the style image and seed
    values are arguments, so a compiled program serves any models of the same architecture."""
    sd = models.sd
    grid = settings.grid(sd.schedule)
    cond, uncond, style_image, text = inputs
    travel = None if settings.time_travel_repeats == 1 else time_travel(
        settings.time_travel_repeats, settings.time_travel_start, settings.time_travel_stop)
    decoder = static_partial(_decoded, Keyed(sd.vae, repr(sd.vae)), float(sd.vae_scaling_factor), settings.remat)
    conditions = _conditions(models, settings, decoder, cond, uncond, style_image, text)
    guidance = _scheme(settings, scheme, conditions)
    denoiser = latent_denoiser(sd, cond, uncond, settings.cfg_scale, remat=settings.remat)
    contexts = step_contexts(sd.schedule, grid, cond.dtype)
    args = (seed_keys(settings.seeds), contexts, denoiser, guidance, sampler_by_name(settings.sampler), travel,
            sd.vae_params)
    return args, {"shape": _latent_shape(sd, settings), "decoder": decoder, **skips(guidance, contexts)}, grid


class TextStyleSamples(NamedTuple):
    """One scheme's samples for every seed.

    latents ``(S, 4, h, w)``; images ``(S, H, W, 3)`` decoded, clipped to ``[-1, 1]``;
    trace: the per-step :class:`~zmagic_jax.GuidanceInfo` ``(S, steps, ...)`` as numpy;
    condition_names: order of the trace's condition axis; t: the grid's timesteps;
    compile_s / run_s: seconds to compile the program and to run it.
    """
    scheme: str
    latents: np.ndarray
    images: np.ndarray
    trace: Any
    condition_names: tuple
    t: np.ndarray
    compile_s: float
    run_s: float


def _inputs(models: TextStyleModels, settings: TextStyleSettings):
    sd, clip = models
    embeddings = encode_prompt(sd, [settings.prompt, settings.negative_prompt])
    style = jnp.asarray(load_style_image(settings.style_image, clip.image_size))
    return embeddings[0], embeddings[1], style, text_embedding(clip, settings.measured_prompt)


def sample_text_style(models: TextStyleModels, settings: TextStyleSettings, scheme: Optional[str] = None, *,
                      programs: Optional[Programs] = None,
                      compiler_options: Optional[dict] = None) -> TextStyleSamples:
    """Run ``scheme`` (default ``settings.scheme``) for every seed: one compiled program, seeds vmapped.

    ``programs`` (default the process-wide cache) keeps compiled programs; weights, prompts, style
    image and seed values are program arguments, so only a new architecture, scheme, grid length,
    number of seeds or other static setting compiles again. ``compiler_options`` are passed to XLA.
    Raises ``FloatingPointError`` naming condition, seed and step if guidance went non-finite
    (``settings.nan_policy='skip'`` keeps the samples).
    """
    scheme = settings.scheme if scheme is None else scheme
    check_choice(scheme, TEXT_STYLE_SCHEMES, "sample_text_style", "scheme")
    args, static, grid = _problem(models, settings, scheme, _inputs(models, settings))
    programs = PROGRAMS if programs is None else programs
    (latents, images, trace, finite), compile_s, run_s = programs.call(_sample_and_decode, args, static,
                                                                       compiler_options)
    names = settings.condition_names(scheme)
    check_finite(finite[..., :len(names)], names, settings.seeds, grid.t, settings.nan_policy, "text-style",
                 "Lower the guidance scale.", denoiser_finite=trace.denoiser_finite)
    return TextStyleSamples(scheme, latents, np.clip(images, -1.0, 1.0), trace, names, np.asarray(grid.t),
                            compile_s, run_s)


def content_layer(clip: Clip, settings: TextStyleSettings) -> int:
    """The content metric's CLIP ``hidden_states`` index (default: half the vision depth)."""
    depth = int(clip.model.vision_config.num_hidden_layers)
    return max(1, depth // 2) if settings.content_layer is None else int(settings.content_layer)


def _metrics(params, style, text, images, contents, *, clip_static, style_layer, content_layer):
    clip = with_params(clip_static, params)

    def one(image, content):
        return {"content_loss": clip_content_loss(clip, image, content, content_layer),
                "style_loss": clip_style_loss(clip, image, style, style_layer),
                "text_distance": clip_text_distance(clip, image, text)}
    return jax.vmap(one)(images, contents)


def text_style_metrics(models: TextStyleModels, settings: TextStyleSettings, images, content_images) -> dict:
    """Per image: ``content_loss`` against ``content_images`` (:func:`clip_content_loss`),
    ``style_loss`` against the style image (:func:`clip_style_loss`, the style energy's value) and
    ``text_distance`` ``1 - cos`` to the CLIP prompt (:func:`clip_text_distance`); arrays ``(S,)``."""
    clip = models.clip
    style = jnp.asarray(load_style_image(settings.style_image, clip.image_size))
    text = text_embedding(clip, settings.measured_prompt)
    static = {"clip_static": clip_architecture(clip), "style_layer": settings.style_layer,
              "content_layer": content_layer(clip, settings)}
    values, _, _ = PROGRAMS.call(_metrics, (clip.params, style, text, jnp.asarray(images), jnp.asarray(content_images)),
                                 static)
    return {name: np.asarray(values[name], np.float64) for name in METRICS}


class TextStyleResult(NamedTuple):
    """A run and its content reference (plain CFG, same seeds), with metrics ``name -> (S,)``."""
    settings: TextStyleSettings
    guided: TextStyleSamples
    reference: TextStyleSamples
    metrics: Dict[str, np.ndarray]
    reference_metrics: Dict[str, np.ndarray]


def run_text_style(models: TextStyleModels, settings: TextStyleSettings, *, programs: Optional[Programs] = None,
                   compiler_options: Optional[dict] = None,
                   progress: Optional[Callable[[str], None]] = None) -> TextStyleResult:
    """Plain CFG samples (the content references) and ``settings.scheme``'s samples for every seed,
    and the metrics of both (the reference's content loss is 0 by construction).
    ``progress(label)`` is called before each stage."""
    progress = progress or (lambda label: None)
    progress("plain SD (content reference)")
    reference = sample_text_style(models, settings, "none", programs=programs, compiler_options=compiler_options)
    guided = reference
    if settings.scheme != "none":
        progress(settings.scheme)
        guided = sample_text_style(models, settings, programs=programs, compiler_options=compiler_options)
    progress("metrics")
    both = text_style_metrics(models, settings, np.concatenate([guided.images, reference.images]),
                              np.concatenate([reference.images, reference.images]))
    count = len(settings.seeds)
    return TextStyleResult(settings, guided, reference, {k: v[:count] for k, v in both.items()},
                           {k: v[count:] for k, v in both.items()})


METHOD_LABELS = {"none": "plain SD (CFG)", "independent": "independent (FreeDoM)",
                 "dependent": "dependent (Z-Magic)", "multi": "multi (Z-Magic, CAGrad)"}
METRIC_NOTES = {
    "content_loss": "mean squared difference of CLIP vision tokens (hidden_states[content_layer], CLS dropped) "
                    "to the plain-CFG image of the same seed (a CLIP stand-in for the usual VGG content loss); "
                    "0 for the plain image itself",
    "style_loss": "|| G(F(x)) - G(F(style)) ||_F, unnormalised Gram of CLIP tokens at hidden_states[style_layer] "
                  "(the style energy's value); lower = closer to the style",
    "text_distance": "1 - cos(CLIP image embedding, CLIP text embedding of clip_prompt); lower = closer to the prompt",
}


def _save_grid(path, result: TextStyleResult, style) -> None:
    plt = figures.plt
    rows = [("none", result.reference)] + ([] if result.settings.scheme == "none"
                                           else [(result.settings.scheme, result.guided)])
    seeds = result.settings.seeds
    fig, axes = plt.subplots(len(rows), len(seeds) + 1, figsize=(1.9 * (len(seeds) + 1), 2.0 * len(rows)),
                             squeeze=False)
    for r, (scheme, samples) in enumerate(rows):
        axes[r, 0].axis("off")
        for c, seed in enumerate(seeds):
            ax = axes[r, c + 1]
            ax.imshow(to_uint8(samples.images[c]))
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                ax.set_title(f"seed {seed}", fontsize=8)
            if c == 0:
                ax.set_ylabel(METHOD_LABELS[scheme], fontsize=7)
    axes[0, 0].imshow(to_uint8(style))
    axes[0, 0].set_title("style", fontsize=8)
    fig.suptitle(f"{result.settings.prompt!r}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _summary(samples: TextStyleSamples) -> dict:
    guided = samples.trace.guided[0]
    norms = contribution_norms(samples.trace, samples.scheme)
    return {"compile_s": round(samples.compile_s, 3), "run_s": round(samples.run_s, 3),
            "guided_steps": int(np.sum(guided)),
            "mean_displacement_norm": {name: float(np.mean(norms[:, guided, i])) if guided.any() else None
                                       for i, name in enumerate(samples.condition_names)}}


def text_style_report(result: TextStyleResult, models: Optional[TextStyleModels] = None) -> dict:
    """The JSON-ready report of a run: settings, per-image metrics, means, guidance and timings."""
    settings = result.settings
    rows = [("none", result.reference, result.reference_metrics)]
    if settings.scheme != "none":
        rows.append((settings.scheme, result.guided, result.metrics))
    images = [{"seed": seed, "scheme": scheme, "method": METHOD_LABELS[scheme], "file": f"seed{seed}_{scheme}.png",
               **{name: float(metrics[name][i]) for name in METRICS}}
              for scheme, _, metrics in rows for i, seed in enumerate(settings.seeds)]
    means = {scheme: {name: float(np.mean(metrics[name])) for name in METRICS} for scheme, _, metrics in rows}
    return {"settings": {**dataclasses.asdict(settings), "clip_prompt": settings.measured_prompt},
            "content_layer": None if models is None else content_layer(models.clip, settings),
            "metric_notes": METRIC_NOTES, "images": images, "mean": means,
            "runs": {scheme: _summary(samples) for scheme, samples, _ in rows}}


def save_text_style(out_dir, result: TextStyleResult, models: Optional[TextStyleModels] = None, *,
                    overwrite: bool = False) -> dict:
    """Write ``seed<S>_<scheme>.png`` for every image (the plain CFG reference and the guided
    one), ``grid.png`` (style reference, plain row, guided row) and ``metrics.json`` into
    ``out_dir``, atomically (an interrupted write leaves the previous folder untouched).
    Returns the report written to metrics.json."""
    report = text_style_report(result, models)
    size = result.guided.images.shape[1]
    style = load_style_image(result.settings.style_image, size)
    with atomic_output_dir(out_dir, overwrite=overwrite, command='save_text_style') as tmp:
        tmp = Path(tmp)
        for entry in report["images"]:
            samples = result.reference if entry["scheme"] == "none" else result.guided
            save_png(tmp / entry["file"], samples.images[result.settings.seeds.index(entry["seed"])])
        _save_grid(tmp / "grid.png", result, style)
        (tmp / "metrics.json").write_text(json.dumps(report, indent=2, allow_nan=False))
    return report
