"""AMDM on Stable Diffusion folders: two or three models (or one model with several prompts) sampled
together, their latents aggregated (:mod:`zmagic_jax.aggregation`).

Each model is a diffusers folder with its own prompt, classifier-free guidance and VAE; they must
share one latent space and one training schedule (the release assigns one scheduler to every
pipeline): the betas, the VAE scaling factor and the latent channels are checked, and a mismatch is
an error naming both models. Defaults are the release's (Hammour-steak/AMDM): ``w = 0.5`` (three
models: 0.47, 0.5), aggregation window loop indices 1..3, step lengths 55 / 45 (three models: 45 /
40 / 35) in SD 1.x latent units at 64 x 64, rescaled with the latent's size
(:func:`~zmagic_jax.release_steps`), 50 DDIM steps with ``eta = 0``, CFG 7.5.

Every model's final latent is decoded by its own VAE; the merged latent of the last step by the
first model's.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from zmagic_jax import figures
from zmagic_jax._io import atomic_output_dir
from zmagic_jax.aggregation import (MU_RULES, RULES, aggregate_chain, aggregation, aggregation_contexts,
                                    release_steps, stack_denoisers)
from zmagic_jax.contracts import Keyed, static_partial
from zmagic_jax.models import StableDiffusion, decode_latents, encode_prompt, latent_denoiser, load_stable_diffusion
from zmagic_jax.samplers import ddim
from zmagic_jax.schemes import none
from zmagic_jax.tasks._outputs import save_png, to_uint8
from zmagic_jax.tasks._recipe import (PROGRAMS, Programs, check_choice, check_int, check_latent_size, check_nan_policy,
                                      check_positive, check_seeds, model_grid)

RELEASE_WEIGHTS = {2: (0.5,), 3: (0.47, 0.5)}


@dataclasses.dataclass(frozen=True)
class AggregateSettings:
    """Settings of one AMDM run on Stable Diffusion (recorded in metrics.json).

    prompts: one prompt per model (K = 2 or 3 for the released rule; any K >= 2 for slerp / mean);
      ``""`` for a model conditioned otherwise (conditioning channels, ``extras`` of
      :func:`run_aggregate`).
    weights: ``w`` of the K - 1 merges; default the release's (0.5; three models 0.47, 0.5).
    steps: the deviation step lengths ``p_k``, one per model; default the release's rescaled to
      the latent's size (:func:`~zmagic_jax.release_steps`).
    window: aggregation loop indices ``(first, last)``, inclusive (index 0 never aggregates).
    rule / mu: see :func:`~zmagic_jax.aggregation`.
    seeds: one image per model and seed; seed ``s`` draws every model's starting latent and noise
      from ``PRNGKey(s)`` alone.
    eta: DDIM's eta (the release: 0).
    """

    prompts: tuple
    negative_prompt: str = ""
    seeds: tuple = (0,)
    num_steps: int = 50
    cfg_scale: float = 7.5
    weights: Optional[tuple] = None
    steps: Optional[tuple] = None
    window: tuple = (1, 3)
    rule: str = "released"
    mu: str = "released"
    eta: float = 0.0
    latent_size: Optional[tuple] = None
    nan_policy: str = "raise"

    def __post_init__(self):
        who = "AggregateSettings"
        prompts = self.prompts
        if isinstance(prompts, str) or not isinstance(prompts, Sequence) or len(prompts) < 2 or \
                not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"{who}: prompts must be two or more prompts (strings; \"\" for a model whose "
                             f"condition is not text), one per model; got {prompts!r}.")
        object.__setattr__(self, "prompts", tuple(prompts))
        k = len(self.prompts)
        check_choice(self.rule, RULES, who, "rule")
        check_choice(self.mu, MU_RULES, who, "mu")
        if self.rule == "released" and k > 3:
            raise ValueError(f"{who}: the released rule aggregates 2 or 3 models; got {k} prompts. Use rule slerp or "
                             "mean for more.")
        object.__setattr__(self, "seeds", check_seeds(self.seeds, who))
        check_int(self.num_steps, who, "num_steps", 2)
        check_positive(self.cfg_scale, who, "cfg_scale", zero=True)
        check_positive(self.eta, who, "eta", zero=True)
        if self.weights is not None:
            weights = tuple(float(w) for w in self.weights)
            if len(weights) != k - 1 or not all(0.0 <= w <= 1.0 for w in weights):
                raise ValueError(f"{who}: weights must be {k - 1} numbers in [0, 1] for {k} models; got "
                                 f"{self.weights!r}.")
            object.__setattr__(self, "weights", weights)
        elif k not in RELEASE_WEIGHTS:
            object.__setattr__(self, "weights", (0.5,) * (k - 1))
        if self.steps is not None:
            steps = tuple(float(p) for p in self.steps)
            if len(steps) != k or not all(np.isfinite(p) and p >= 0 for p in steps):
                raise ValueError(f"{who}: steps must be {k} numbers >= 0 (one p_k per model); got {self.steps!r}.")
            object.__setattr__(self, "steps", steps)
        elif k not in (2, 3):
            raise ValueError(f"{who}: the release defines step lengths for 2 or 3 models; give steps for {k}.")
        window = tuple(self.window)
        if len(window) != 2 or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) for v in window) \
                or window[1] < max(window[0], 1) or window[1] >= self.num_steps:
            raise ValueError(f"{who}: window must be (first, last) loop indices with 1 <= last < num_steps "
                             f"({self.num_steps}) and first <= last; got {self.window!r}.")
        object.__setattr__(self, "window", (int(window[0]), int(window[1])))
        object.__setattr__(self, "latent_size", check_latent_size(self.latent_size, who))
        check_nan_policy(self.nan_policy, who)

    @property
    def num_models(self) -> int:
        return len(self.prompts)

    def resolved_weights(self) -> tuple:
        return self.weights if self.weights is not None else RELEASE_WEIGHTS[self.num_models]

    def resolved_steps(self, latent_shape) -> tuple:
        return self.steps if self.steps is not None else release_steps(self.num_models, latent_shape)


def load_aggregate_models(paths: Sequence, num_models: int, dtype=jnp.float32) -> tuple:
    """One :class:`~zmagic_jax.models.StableDiffusion` per model from local diffusers folders: K
    paths, or one path for every model (one model, K prompts; loaded once). Checked to share one
    latent space and schedule (:func:`check_compatible`)."""
    paths = [str(p) for p in paths]
    if len(paths) not in (1, num_models):
        raise ValueError(f"load_aggregate_models: give one folder for all {num_models} prompts or one per prompt; "
                         f"got {len(paths)} folders.")
    loaded = {}
    for p in paths:
        if p not in loaded:
            loaded[p] = load_stable_diffusion(p, dtype=dtype)
    models = tuple(loaded[p] for p in (paths * num_models if len(paths) == 1 else paths))
    check_compatible(models, paths * num_models if len(paths) == 1 else paths)
    return models


def check_compatible(models: Sequence[StableDiffusion], names: Sequence[str]) -> None:
    """Raise naming both models unless every model shares the first one's training schedule (betas),
    VAE scaling factor, latent channels and native latent size: AMDM exchanges latents."""
    first = models[0]
    for k, sd in enumerate(models[1:], 1):
        pair = f"model 1 ({names[0]}) and model {k + 1} ({names[k]})"
        if sd.schedule.betas.shape != first.schedule.betas.shape or \
                not np.allclose(sd.schedule.betas, first.schedule.betas, rtol=1e-6, atol=0):
            raise ValueError(f"AMDM: {pair} have different noise schedules (betas of {first.schedule.num_train_steps} "
                             f"vs {sd.schedule.num_train_steps} steps, or different values); the models must share "
                             "one schedule and grid.")
        if sd.latent_channels != first.latent_channels or (sd.vae is None) != (first.vae is None):
            space = lambda m: f"{m.latent_channels}-channel {'pixels' if m.vae is None else 'VAE latents'}"
            raise ValueError(f"AMDM: {pair} sample different spaces ({space(first)} vs {space(sd)}).")
        if float(sd.vae_scaling_factor) != float(first.vae_scaling_factor):
            raise ValueError(f"AMDM: {pair} have different VAE scaling factors ({first.vae_scaling_factor} vs "
                             f"{sd.vae_scaling_factor}): their latents live in different spaces.")
        if int(sd.sample_size) != int(first.sample_size):
            raise ValueError(f"AMDM: {pair} have different native latent sizes ({first.sample_size} vs "
                             f"{sd.sample_size}); give latent_size (--latent-size) to sample both at one size.")


def _latent_shape(sd: StableDiffusion, settings: AggregateSettings) -> tuple:
    h, w = settings.latent_size or (int(sd.sample_size),) * 2
    return sd.latent_channels, h, w


def _denoisers(models, settings: AggregateSettings, extras):
    """Every model's CFG denoiser; one stack (one vmapped UNet call) when all are one architecture."""
    denoisers = []
    for sd, prompt, extra in zip(models, settings.prompts, extras):
        embeds = encode_prompt(sd, [prompt, settings.negative_prompt])
        denoisers.append(latent_denoiser(sd, embeds[0], embeds[1], jnp.float32(settings.cfg_scale),
                                         extra=None if extra is None else jnp.asarray(extra, jnp.float32)))
    try:
        return stack_denoisers(denoisers)
    except ValueError:
        return tuple(denoisers)


def _decoded(vae, scaling_factor, params, z):
    sd = StableDiffusion(None, None, vae.value, params, None, None, None, None, scaling_factor)
    return decode_latents(sd, z)


def _sample_and_decode(keys, contexts, denoisers, agg, sampler, vae_params, *, shape, decoders):
    """Every seed's K chains (x_T of model k from ``fold_in(fold_in(key, 0), k)``, the chains from
    ``fold_in(key, 1)``), each model's final latent decoded by its VAE, the merge by the first's."""
    k = len(decoders)
    schemes = (none(),)

    def one(key):
        x_T = jnp.stack([jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, 0), i), shape)
                         for i in range(k)])
        x0, trace = aggregate_chain(jax.random.fold_in(key, 1), x_T, contexts, denoisers=denoisers, aggregation=agg,
                                    sampler=sampler, schemes=schemes)
        images = jnp.stack([decoders[i](vae_params[i], x0[i]) for i in range(k)])
        mixed = trace.mixed[-1]
        return x0, mixed, images, decoders[0](vae_params[0], mixed), trace
    return jax.vmap(one)(keys)


class AggregateResult(NamedTuple):
    """An AMDM run: ``latents`` ``(S, K, c, h, w)``, ``mixed`` ``(S, c, h, w)`` (the last step's
    merge), ``images`` ``(S, K, H, W, 3)`` and ``mixed_images`` ``(S, H, W, 3)`` in ``[-1, 1]``,
    ``trace`` the per-step :class:`~zmagic_jax.AggregateInfo` as numpy, ``t`` the grid, and the
    resolved weights and step lengths."""
    settings: AggregateSettings
    latents: np.ndarray
    mixed: np.ndarray
    images: np.ndarray
    mixed_images: np.ndarray
    trace: Any
    t: np.ndarray
    weights: tuple
    steps: tuple
    compile_s: float
    run_s: float


def run_aggregate(models: Sequence[StableDiffusion], settings: AggregateSettings, *,
                  extras: Optional[Sequence] = None, programs: Optional[Programs] = None,
                  compiler_options: Optional[dict] = None) -> AggregateResult:
    """Sample every seed with AMDM: one compiled program (weights, prompts, conditioning channels
    and AMDM's numbers are its arguments), seeds vmapped. ``extras``: per model, ``None`` or the
    conditioning channels of a UNet that takes them (``extra`` of
    :func:`~zmagic_jax.models.latent_denoiser`). ``compiler_options`` are passed to XLA."""
    models = tuple(models)
    if len(models) != settings.num_models:
        raise ValueError(f"run_aggregate: {settings.num_models} prompts need {settings.num_models} models; got "
                         f"{len(models)}.")
    extras = (None,) * len(models) if extras is None else tuple(extras)
    if len(extras) != len(models):
        raise ValueError(f"run_aggregate: extras must hold one entry (None or an array) per model ({len(models)}); "
                         f"got {len(extras)}.")
    sd = models[0]
    grid = model_grid(sd.schedule, settings.num_steps, "AggregateSettings")
    shape = _latent_shape(sd, settings)
    weights, steps = settings.resolved_weights(), settings.resolved_steps(shape)
    agg = aggregation(steps, weights, window=settings.window, rule=settings.rule, mu=settings.mu)
    decoders = tuple(static_partial(_decoded, Keyed(m.vae, repr(m.vae)), float(m.vae_scaling_factor)) for m in models)
    args = (jnp.stack([jax.random.PRNGKey(int(s)) for s in settings.seeds]),
            aggregation_contexts(sd.schedule, grid, jnp.float32), _denoisers(models, settings, extras), agg,
            ddim(settings.eta), tuple(m.vae_params for m in models))
    programs = PROGRAMS if programs is None else programs
    (latents, mixed, images, mixed_images, trace), compile_s, run_s = programs.call(
        _sample_and_decode, args, {"shape": shape, "decoders": decoders}, compiler_options)
    if not np.all(np.isfinite(latents)):
        bad = sorted({int(settings.seeds[s]) for s in np.argwhere(~np.isfinite(latents))[:, 0]})
        message = f"zmagic aggregate: non-finite latents for seeds {bad}. Lower the step lengths or the CFG scale."
        if settings.nan_policy == "raise":
            raise FloatingPointError(message)
        import warnings
        warnings.warn(message, RuntimeWarning, stacklevel=2)
    return AggregateResult(settings, latents, mixed, np.clip(images, -1.0, 1.0), np.clip(mixed_images, -1.0, 1.0),
                           trace, np.asarray(grid.t), tuple(weights), tuple(float(p) for p in steps), compile_s,
                           run_s)


def aggregate_report(result: AggregateResult, model_names: Sequence[str]) -> dict:
    """The JSON-ready report: settings, resolved numbers, per step whether it aggregated and the mean
    distance ``|mu_k - xbar|`` per model, files, timings."""
    settings = result.settings
    k = settings.num_models
    images = [{"seed": int(seed), "model": i + 1, "prompt": settings.prompts[i], "folder": str(model_names[i]),
               "file": f"seed{seed}_model{i + 1}.png"} for seed in settings.seeds for i in range(k)]
    images += [{"seed": int(seed), "model": "merged", "file": f"seed{seed}_merged.png"} for seed in settings.seeds]
    aggregated = np.asarray(result.trace.aggregated)[0]
    distance = np.asarray(result.trace.distance)  # (S, steps, K)
    return {"settings": dataclasses.asdict(settings), "weights": list(result.weights), "steps": list(result.steps),
            "rule_note": {"released": "w x1 + sqrt(1 - w^2) x2 (the released code)",
                          "slerp": "spherical interpolation, angle from the states (the paper)",
                          "mean": "weighted mean (baseline)"}[settings.rule],
            "per_step": [{"index": i, "t": int(t), "aggregated": bool(aggregated[i]),
                          "mean_distance_mu_to_merge": [float(v) for v in distance[:, i].mean(axis=0)]}
                         for i, t in enumerate(result.t)],
            "images": images, "compile_s": round(result.compile_s, 3), "run_s": round(result.run_s, 3)}


def _save_grid(path, result: AggregateResult) -> None:
    plt = figures.plt
    settings = result.settings
    k, seeds = settings.num_models, settings.seeds
    fig, axes = plt.subplots(len(seeds), k + 1, figsize=(2.0 * (k + 1), 2.1 * len(seeds)), squeeze=False)
    for r, seed in enumerate(seeds):
        for c in range(k + 1):
            ax = axes[r, c]
            ax.imshow(to_uint8(result.images[r, c] if c < k else result.mixed_images[r]))
            ax.set_xticks([])
            ax.set_yticks([])
            if r == 0:
                title = f"model {c + 1}: {settings.prompts[c]}" if c < k else "merged (last step)"
                ax.set_title(title[:28], fontsize=7)
            if c == 0:
                ax.set_ylabel(f"seed {seed}", fontsize=8)
    fig.suptitle(f"AMDM ({settings.rule}, w {', '.join(f'{w:g}' for w in result.weights)}, window "
                 f"{settings.window[0]}..{settings.window[1]})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def save_aggregate(out_dir, result: AggregateResult, model_names: Sequence[str], *, overwrite: bool = False,
                   progress: Optional[Callable[[str], None]] = None) -> dict:
    """Write ``seed<S>_model<k>.png`` (each model's final image), ``seed<S>_merged.png``, ``grid.png``
    and ``metrics.json`` into ``out_dir``, atomically. Returns the report."""
    report = aggregate_report(result, model_names)
    with atomic_output_dir(out_dir, overwrite=overwrite, command="aggregate") as tmp:
        tmp = Path(tmp)
        for r, seed in enumerate(result.settings.seeds):
            for i in range(result.settings.num_models):
                save_png(tmp / f"seed{seed}_model{i + 1}.png", result.images[r, i])
            save_png(tmp / f"seed{seed}_merged.png", result.mixed_images[r])
        _save_grid(tmp / "grid.png", result)
        (tmp / "metrics.json").write_text(json.dumps(report, indent=2, allow_nan=False))
    return report
