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
import time
import warnings
from pathlib import Path
from typing import Any, Callable, Dict, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from zmagic_jax import figures
from zmagic_jax._io import atomic_output_dir
from zmagic_jax.energies import (Clip, clip_content_loss, clip_style_energy, clip_style_loss,
                                 clip_text_distance, load_clip, text_embedding)
from zmagic_jax.models import (StableDiffusion, decode_latents, encode_prompt, latent_cfg_correction_fn,
                               latent_eps_fn, load_stable_diffusion)
from zmagic_jax.samplers import sampler_by_name
from zmagic_jax.sampling import sample, time_travel
from zmagic_jax.schedules import timestep_grid
from zmagic_jax.schemes import condition, dependent, independent, multi, none
from zmagic_jax.step_rules import cfg_relative_rule, check_window_hits, freedom_rule
from zmagic_jax.tasks._outputs import load_image, save_png, to_uint8

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
        seeds = tuple(self.seeds)
        if not seeds or any(isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0 for s in seeds) \
                or len(set(seeds)) != len(seeds):
            raise ValueError(f"{who}: seeds must be distinct integers >= 0, at least one; got {self.seeds!r}.")
        object.__setattr__(self, "seeds", tuple(int(s) for s in seeds))
        if not isinstance(self.num_steps, (int, np.integer)) or not 2 <= self.num_steps <= 1000:
            raise ValueError(f"{who}: num_steps must be an integer in [2, 1000]; got {self.num_steps!r}.")
        if self.rule not in ("cfg_relative", "freedom"):
            raise ValueError(f"{who}: rule must be 'cfg_relative' or 'freedom'; got {self.rule!r}.")
        if not self.cfg_scale >= 0 or (self.rule == "cfg_relative" and self.cfg_scale == 0):
            raise ValueError(f"{who}: cfg_scale must be >= 0 (and > 0 with rule 'cfg_relative', whose step "
                             f"size is relative to the CFG correction); got {self.cfg_scale!r}.")
        if not self.guidance_scale > 0:
            raise ValueError(f"{who}: guidance_scale must be > 0; got {self.guidance_scale!r}.")
        if isinstance(self.time_travel_repeats, bool) or not isinstance(self.time_travel_repeats, (int, np.integer)) \
                or self.time_travel_repeats < 1:
            raise ValueError(f"{who}: time_travel_repeats must be an integer >= 1 (1 = off); "
                             f"got {self.time_travel_repeats!r}.")
        grid = timestep_grid(1000, int(self.num_steps))
        for label, start, stop in (("guidance", self.guidance_start, self.guidance_stop),
                                   ("time-travel", self.time_travel_start, self.time_travel_stop)):
            if label == "time-travel" and self.time_travel_repeats == 1:
                continue
            if not isinstance(start, (int, np.integer)) or not isinstance(stop, (int, np.integer)) or start <= stop:
                raise ValueError(f"{who}: the {label} window stop < t <= start needs integers with start > stop; "
                                 f"got start={start!r}, stop={stop!r}.")
            check_window_hits(grid, start, stop, f"{who}: {label} window")
        if self.latent_size is not None:
            size = tuple(self.latent_size)
            if len(size) != 2 or any(not isinstance(v, (int, np.integer)) or v < 1 for v in size):
                raise ValueError(f"{who}: latent_size must be None or two positive integers (h, w); "
                                 f"got {self.latent_size!r}.")
            object.__setattr__(self, "latent_size", tuple(int(v) for v in size))
        sampler_by_name(self.sampler)
        if self.nan_policy not in ("raise", "skip"):
            raise ValueError(f"{who}: nan_policy must be 'raise' or 'skip'; got {self.nan_policy!r}.")

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
    h, w = settings.latent_size or (int(sd.unet.sample_size),) * 2
    return int(sd.unet.in_channels), h, w


def _rule(settings: TextStyleSettings, sd, cond, uncond):
    window = dict(start=settings.guidance_start, stop=settings.guidance_stop)
    if settings.rule == "freedom":
        return freedom_rule(settings.guidance_scale, **window)
    correction = latent_cfg_correction_fn(sd, cond, uncond, settings.cfg_scale, remat=settings.remat)
    return cfg_relative_rule(settings.guidance_scale, correction, **window)


def _scheme(settings: TextStyleSettings, scheme: str, conditions: dict):
    """``conditions``: name -> Condition; the scheme uses those of :meth:`condition_names`."""
    conds = [conditions[name] for name in settings.condition_names(scheme)]
    return {"none": none, "independent": independent, "dependent": dependent, "multi": multi}[scheme](conds)


def _program(models: TextStyleModels, settings: TextStyleSettings, scheme: str):
    """``run(params, keys, cond, uncond, style, text) -> (latents, images, trace)`` for every seed
    (vmapped). Network parameters are arguments, not captured constants: a compiled program never
    embeds the weights and serves any models of the same architecture."""
    grid = timestep_grid(models.sd.schedule.num_train_steps, settings.num_steps)
    shape = _latent_shape(models.sd, settings)
    travel = None if settings.time_travel_repeats == 1 else time_travel(
        settings.time_travel_repeats, settings.time_travel_start, settings.time_travel_stop)

    def run(params, keys, cond, uncond, style_image, text):
        sd = models.sd._replace(unet_params=params["unet"], vae_params=params["vae"])
        clip = models.clip._replace(params=params["clip"])
        eps_fn = latent_eps_fn(sd, cond, uncond, settings.cfg_scale, remat=settings.remat)
        decode = lambda z: decode_latents(sd, z, remat=settings.remat)
        rule = _rule(settings, sd, cond, uncond)
        style = clip_style_energy(clip, style_image, settings.style_layer)
        conditions = {"style": condition("style", lambda z: style(decode(z)), rule),
                      "text": condition("text", lambda z: clip_text_distance(clip, decode(z), text), rule)}
        guidance = _scheme(settings, scheme, conditions)

        def one(key):
            x_T = jax.random.normal(jax.random.fold_in(key, 0), shape, cond.dtype)
            z0, trace = sample(jax.random.fold_in(key, 1), x_T[None], eps_fn, sd.schedule, grid, guidance,
                               settings.sampler, time_travel=travel, nan_policy=settings.nan_policy)
            return z0[0], decode(z0[0]), jax.tree.map(lambda a: a[0], trace)
        return jax.vmap(one)(keys)

    return run, grid


def _architecture(models: TextStyleModels) -> tuple:
    """What a compiled program depends on besides its arguments."""
    sd = models.sd
    return (repr(sd.unet), repr(sd.vae), models.clip.model.config.to_json_string(), sd.vae_scaling_factor,
            np.asarray(sd.schedule.alphas_cumprod).tobytes())


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
    style = load_style_image(settings.style_image, clip.image_size)
    keys = jnp.stack([jax.random.PRNGKey(s) for s in settings.seeds])
    params = {"unet": sd.unet_params, "vae": sd.vae_params, "clip": clip.params}
    text = text_embedding(clip, settings.measured_prompt)
    return params, keys, embeddings[0], embeddings[1], jnp.asarray(style), text


def sample_text_style(models: TextStyleModels, settings: TextStyleSettings, scheme: Optional[str] = None, *,
                      cache: Optional[dict] = None, compiler_options: Optional[dict] = None) -> TextStyleSamples:
    """Run ``scheme`` (default ``settings.scheme``) for every seed: one compiled program, seeds vmapped.

    ``cache``: a dict reused across calls keeps compiled programs; weights, prompts, style image
    and seed values are program arguments, so only a new architecture, scheme, grid, number of
    seeds or other static setting compiles again. ``compiler_options`` are passed to XLA's ``compile``.
    Raises ``FloatingPointError`` naming condition, seed and step if guidance went non-finite
    (``settings.nan_policy='skip'`` keeps the samples).
    """
    scheme = settings.scheme if scheme is None else scheme
    if scheme not in TEXT_STYLE_SCHEMES:
        raise ValueError(f"sample_text_style: scheme must be one of {TEXT_STYLE_SCHEMES}; got {scheme!r}.")
    args = _inputs(models, settings)
    # Everything that is not a program argument decides which compiled program serves this call.
    key = dataclasses.replace(settings, scheme=scheme, prompt="-", clip_prompt=None, negative_prompt="",
                              style_image="-", seeds=tuple(range(len(settings.seeds))))
    options = None if compiler_options is None else tuple(sorted(compiler_options.items()))
    key = (key, _architecture(models), options)
    cache = {} if cache is None else cache
    start = time.perf_counter()
    if key not in cache:
        run, grid = _program(models, settings, scheme)
        cache[key] = jax.jit(run).lower(*args).compile(compiler_options=compiler_options), grid
    compiled, grid = cache[key]
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    latents, images, trace = jax.block_until_ready(compiled(*args))
    run_s = time.perf_counter() - start
    trace = jax.tree.map(np.asarray, trace)
    names = settings.condition_names(scheme)
    _check_finite(trace.finite, names, settings, grid)
    return TextStyleSamples(scheme, np.asarray(latents), np.clip(np.asarray(images), -1.0, 1.0), trace, names,
                            np.asarray(grid.t), compile_s, run_s)


def _check_finite(finite, names, settings, grid):
    if finite.all():
        return
    s, i, c = map(int, np.argwhere(~finite)[0])
    message = (f"text-style: guidance produced non-finite values for condition {names[c]!r}: first at seed "
               f"{settings.seeds[s]}, step {i} (t={int(grid.t[i])}); the guidance of those steps was dropped. "
               "Lower the guidance scale, or keep such samples with nan_policy='skip'.")
    if settings.nan_policy == "raise":
        raise FloatingPointError(message)
    warnings.warn(message, RuntimeWarning, stacklevel=3)


def content_layer(clip: Clip, settings: TextStyleSettings) -> int:
    """The content metric's CLIP ``hidden_states`` index (default: half the vision depth)."""
    depth = int(clip.model.config.vision_config.num_hidden_layers)
    return max(1, depth // 2) if settings.content_layer is None else int(settings.content_layer)


def text_style_metrics(models: TextStyleModels, settings: TextStyleSettings, images, content_images) -> dict:
    """Per image: ``content_loss`` against ``content_images`` (:func:`clip_content_loss`),
    ``style_loss`` against the style image (:func:`clip_style_loss`, the style energy's value) and
    ``text_distance`` ``1 - cos`` to the CLIP prompt (:func:`clip_text_distance`); arrays ``(S,)``."""
    clip = models.clip
    style = jnp.asarray(load_style_image(settings.style_image, clip.image_size))
    text = text_embedding(clip, settings.measured_prompt)
    layer = content_layer(clip, settings)

    def one(image, content):
        return {"content_loss": clip_content_loss(clip, image, content, layer),
                "style_loss": clip_style_loss(clip, image, style, settings.style_layer),
                "text_distance": clip_text_distance(clip, image, text)}
    values = jax.jit(jax.vmap(one))(jnp.asarray(images), jnp.asarray(content_images))
    return {name: np.asarray(values[name], np.float64) for name in METRICS}


class TextStyleResult(NamedTuple):
    """A run and its content reference (plain CFG, same seeds), with metrics ``name -> (S,)``."""
    settings: TextStyleSettings
    guided: TextStyleSamples
    reference: TextStyleSamples
    metrics: Dict[str, np.ndarray]
    reference_metrics: Dict[str, np.ndarray]


def run_text_style(models: TextStyleModels, settings: TextStyleSettings, *, cache: Optional[dict] = None,
                   compiler_options: Optional[dict] = None,
                   progress: Optional[Callable[[str], None]] = None) -> TextStyleResult:
    """Plain CFG samples (the content references) and ``settings.scheme``'s samples for every seed,
    and the metrics of both (the reference's content loss is 0 by construction).
    ``progress(label)`` is called before each stage."""
    progress = progress or (lambda label: None)
    cache = {} if cache is None else cache
    progress("plain SD (content reference)")
    reference = sample_text_style(models, settings, "none", cache=cache, compiler_options=compiler_options)
    guided = reference
    if settings.scheme != "none":
        progress(settings.scheme)
        guided = sample_text_style(models, settings, cache=cache, compiler_options=compiler_options)
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
    return {"compile_s": round(samples.compile_s, 3), "run_s": round(samples.run_s, 3),
            "guided_steps": int(np.sum(guided)),
            "mean_displacement_norm": {name: float(np.mean(samples.trace.displacement_norms[:, guided, i]))
                                       if guided.any() else None
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


def save_text_style(out_dir, result: TextStyleResult, models: Optional[TextStyleModels] = None) -> dict:
    """Write ``seed<S>_<scheme>.png`` for every image (the plain CFG reference and the guided
    one), ``grid.png`` (style reference, plain row, guided row) and ``metrics.json`` into
    ``out_dir``, atomically (an interrupted write leaves the previous folder untouched).
    Returns the report written to metrics.json."""
    report = text_style_report(result, models)
    size = result.guided.images.shape[1]
    style = load_style_image(result.settings.style_image, size)
    with atomic_output_dir(out_dir) as tmp:
        tmp = Path(tmp)
        for entry in report["images"]:
            samples = result.reference if entry["scheme"] == "none" else result.guided
            save_png(tmp / entry["file"], samples.images[result.settings.seeds.index(entry["seed"])])
        _save_grid(tmp / "grid.png", result, style)
        (tmp / "metrics.json").write_text(json.dumps(report, indent=2, allow_nan=False))
    return report
