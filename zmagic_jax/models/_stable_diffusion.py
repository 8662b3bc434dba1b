"""Stable Diffusion as a library denoiser: loader, prompt encoder, guided eps, latent encoder/decoder.

The model is read from a local diffusers-format folder; nothing is ever downloaded. Layout::

    <path>/unet/config.json         + diffusion_pytorch_model.safetensors | .bin
    <path>/vae/config.json          + diffusion_pytorch_model.safetensors | .bin
    <path>/text_encoder/config.json + model.safetensors | pytorch_model.bin
    <path>/tokenizer/               vocab.json, merges.txt (+ tokenizer_config.json, special_tokens_map.json)
    <path>/scheduler/scheduler_config.json

(``.fp16`` variant files and sharded ``.index.json`` weights are read too; see
:mod:`zmagic_jax.models._folders`.) The networks are the library's own Flax modules
(:mod:`~zmagic_jax.models._unet2d`, :mod:`~zmagic_jax.models._autoencoder_kl`,
:mod:`~zmagic_jax.models._clip`), built from each folder's ``config.json``; PyTorch weights are
read without PyTorch and mapped tensor by tensor (a key left over or missing is an error listing
them). SD 1.x and 2.x are supported, epsilon and v-prediction (converted to eps exactly).

A latent sample uses the channels-first layout ``(4, h, w)`` (no batch axis) of diffusers'
pipelines; the modules run channels-last inside (one transpose of the small latent per call).

Two variants of the layout:

* **pixel space**: a folder without ``vae/`` is a model that denoises images directly (as
  diffusers' pixel pipelines, and the embedded canvas-digits models): ``vae`` is ``None``, the
  "latent" is the image channels-first, :func:`decode_latents` / :func:`encode_image` are the
  identity up to that transpose and the scaling factor is 1;
* **conditioning channels**: a UNet with more input than output channels (SD's inpainting
  models: 9 in, 4 out; the embedded layout model: 2 in, 1 out) denoises a latent of
  ``out_channels`` channels and takes the other ``in_channels - out_channels`` as a condition
  image (``extra`` of :func:`latent_denoiser`), concatenated after the latent's channels.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp

from zmagic_jax.contracts import Denoiser, Keyed, static_partial
from zmagic_jax.models._autoencoder_kl import AutoencoderKL, vae_config_from_dict
from zmagic_jax.models._folders import read_config, read_weights
from zmagic_jax.models._sd_convert import unet_params_from_torch, vae_params_from_torch
from zmagic_jax.models._tokenizer import ClipTokenizer
from zmagic_jax.models._unet2d import UNet2DConditionModel, unet_config_from_dict
from zmagic_jax.schedules import Schedule, linear_schedule, scaled_linear_schedule

_PUBLISHED = ("e.g. CompVis/stable-diffusion-v1-4, stable-diffusion-v1-5/stable-diffusion-v1-5, "
              "stabilityai/stable-diffusion-2-1-base or stabilityai/stable-diffusion-2-1 (v-prediction) "
              "on the Hugging Face Hub")
_LAYOUT_HELP = (
    "Expected a local diffusers-format Stable Diffusion folder with subfolders: "
    "unet/ and vae/ (config.json + diffusion_pytorch_model.safetensors or .bin; no vae/ for a pixel-space "
    "model), "
    "text_encoder/ (config.json + model.safetensors or pytorch_model.bin), "
    "tokenizer/ (vocab.json, merges.txt, tokenizer_config.json), "
    "scheduler/ (scheduler_config.json). Such weights are published " + _PUBLISHED + ", "
    "downloaded by you (e.g. `huggingface-cli download <repo> --local-dir <path>`); "
    "this library never downloads."
)
_PREDICTION_TYPES = ("epsilon", "v_prediction")


# ``remat`` names: the ready-made policies of ``jax.checkpoint_policies`` (the others there are
# factories that need arguments).
_REMAT_POLICIES = ("everything_saveable", "nothing_saveable", "dots_saveable", "checkpoint_dots",
                   "dots_with_no_batch_dims_saveable", "checkpoint_dots_with_no_batch_dims")


def _rematerialized(fn: Callable, remat, who: str) -> Callable:
    """``fn`` as it is (``remat=False``), under ``jax.checkpoint`` (``True``: nothing inside
    ``fn`` is kept for the backward pass, it is recomputed) or under ``jax.checkpoint`` with the
    ``jax.checkpoint_policies`` of that name (e.g. ``"dots_saveable"``)."""
    if isinstance(remat, bool):
        return jax.checkpoint(fn) if remat else fn
    if isinstance(remat, str) and remat in _REMAT_POLICIES:
        return jax.checkpoint(fn, policy=getattr(jax.checkpoint_policies, remat))
    raise ValueError(f"{who}: remat must be False, True or the name of a jax.checkpoint_policies "
                     f"policy, one of {list(_REMAT_POLICIES)}; got {remat!r}.")


class StableDiffusion(NamedTuple):
    """A loaded Stable Diffusion: the three Flax modules with their parameters, the tokenizer, the
    training noise schedule, the VAE latent scaling ``z = vae_scaling_factor * E(image)``, what
    the UNet predicts (``"epsilon"`` or ``"v_prediction"``) and its native latent size."""

    unet: UNet2DConditionModel
    unet_params: Any
    vae: AutoencoderKL
    vae_params: Any
    text_encoder: Any  # zmagic_jax.models._clip.CLIPTextTransformer
    text_params: Any
    tokenizer: ClipTokenizer
    schedule: Schedule
    vae_scaling_factor: float
    prediction_type: str = "epsilon"
    sample_size: int = 64

    @property
    def latent_channels(self) -> int:
        """Channels of the sampled latent: the UNet's output channels."""
        return int(self.unet.config.out_channels)

    @property
    def extra_channels(self) -> int:
        """Conditioning channels the UNet takes after the latent's (``in - out`` channels)."""
        return int(self.unet.config.in_channels) - int(self.unet.config.out_channels)


def _missing(what: str, path: str) -> FileNotFoundError:
    return FileNotFoundError(f"load_stable_diffusion: missing {what} {path!r}. {_LAYOUT_HELP}")


def _component(path: str, sub: str, bases: tuple, architecture: str):
    folder = os.path.join(path, sub)
    who = f"load_stable_diffusion ({sub})"
    config = read_config(folder, who, _LAYOUT_HELP)
    weights = read_weights(folder, bases, who, architecture=architecture, published=_PUBLISHED,
                           help_text=_LAYOUT_HELP)
    return config, weights, os.path.join(folder, "config.json")


def _load_schedule(folder: str) -> tuple:
    """``(schedule, prediction_type)`` from ``scheduler_config.json``; absent keys take diffusers'
    defaults."""
    file = os.path.join(folder, "scheduler_config.json")
    if not os.path.isfile(file):
        raise _missing("scheduler config", file)
    try:
        with open(file) as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise ValueError(
            f"load_stable_diffusion: cannot parse scheduler config {file!r}: {e}") from e
    prediction = config.get("prediction_type", "epsilon")
    if prediction not in _PREDICTION_TYPES:
        raise ValueError(f"load_stable_diffusion: scheduler prediction_type {prediction!r} in "
                         f"{file!r} is not supported; expected one of {list(_PREDICTION_TYPES)}.")
    if config.get("trained_betas") is not None:
        raise ValueError(f"load_stable_diffusion: explicit trained_betas in {file!r} are not "
                         "supported; use beta_schedule 'linear' or 'scaled_linear'.")
    kind = config.get("beta_schedule", "linear")
    builders = {"linear": linear_schedule, "scaled_linear": scaled_linear_schedule}
    if kind not in builders:
        raise ValueError(f"load_stable_diffusion: scheduler beta_schedule {kind!r} in {file!r} "
                         f"is not supported; expected one of {sorted(builders)}.")
    schedule = builders[kind](int(config.get("num_train_timesteps", 1000)),
                              float(config.get("beta_start", 1e-4)),
                              float(config.get("beta_end", 0.02)))
    return schedule, prediction


def load_stable_diffusion(path, dtype=jnp.float32, *, remat: bool = False) -> StableDiffusion:
    """Load a local diffusers-format Stable Diffusion folder (see the module docstring).

    PyTorch weights (safetensors or ``.bin``, float32 or the fp16 variant) are read without
    PyTorch and mapped to the library's Flax modules; parameters are float32. ``dtype`` is the
    networks' compute dtype (``jnp.bfloat16`` computes in bfloat16 with float32 parameters);
    ``remat=True`` recomputes every UNet / VAE / text-encoder block in the backward pass.

    Raises FileNotFoundError naming the missing folder/file and the expected layout, ValueError
    for an unsupported config option or scheduler (naming the file and key), and
    ``CheckpointMismatchError`` listing missing, left-over or misshapen tensors.
    """
    from zmagic_jax.models._clip import CLIPTextTransformer, clip_configs_from_dict, clip_params_from_torch

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise _missing("Stable Diffusion folder", path)
    for sub in ("unet", "text_encoder", "tokenizer", "scheduler"):
        if not os.path.isdir(os.path.join(path, sub)):
            raise _missing(f"{sub} folder", os.path.join(path, sub))
    schedule, prediction = _load_schedule(os.path.join(path, "scheduler"))

    raw, weights, file = _component(path, "unet", ("diffusion_pytorch_model",),
                                    "a diffusers UNet2DConditionModel")
    unet_config = unet_config_from_dict(raw, file=file)
    sample_size = raw.get("sample_size", 64)
    sample_size = int(sample_size[0] if isinstance(sample_size, (list, tuple)) else sample_size)
    unet_params = unet_params_from_torch(weights.tensors, unet_config, path=weights.source)
    del weights
    if unet_config.in_channels < unet_config.out_channels:
        raise ValueError(f"load_stable_diffusion: {file!r} has in_channels {unet_config.in_channels} < out_channels "
                         f"{unet_config.out_channels}; the UNet's input holds the latent (out_channels) and any "
                         "conditioning channels after it.")

    vae, vae_params, scaling = None, None, 1.0  # a folder without vae/ is a pixel-space model
    if os.path.isdir(os.path.join(path, "vae")):
        raw, weights, file = _component(path, "vae", ("diffusion_pytorch_model",), "a diffusers AutoencoderKL")
        vae_config = vae_config_from_dict(raw, file=file)
        if vae_config.latent_channels != unet_config.out_channels:
            raise ValueError(f"load_stable_diffusion: the VAE's latent_channels ({vae_config.latent_channels}, "
                             f"{file!r}) differ from the UNet's out_channels ({unet_config.out_channels}).")
        vae_params = vae_params_from_torch(weights.tensors, vae_config, path=weights.source)
        vae, scaling = AutoencoderKL(vae_config, dtype=dtype, remat=remat), float(vae_config.scaling_factor)

    raw, weights, file = _component(path, "text_encoder", ("model", "pytorch_model"),
                                    "a transformers CLIPTextModel")
    text_config, _, _ = clip_configs_from_dict(raw, file=file)
    if text_config is None:
        raise ValueError(f"load_stable_diffusion: {file!r} is not a CLIP text model config.")
    text_params = clip_params_from_torch(weights.tensors, text_config, None, None, path=weights.source)["text_model"]

    tokenizer = ClipTokenizer.from_folder(os.path.join(path, "tokenizer"))
    if tokenizer.id_count > text_config.vocab_size:
        raise ValueError(f"load_stable_diffusion: the tokenizer ({os.path.join(path, 'tokenizer')}) gives ids up to "
                         f"{tokenizer.id_count - 1} but the text encoder's vocab_size is {text_config.vocab_size} "
                         f"({file!r}): those tokens have no embedding. Use the tokenizer folder of the same model.")
    # Device arrays once, here: numpy params would be copied host -> device on every jitted call.
    unet_params, vae_params, text_params = jax.tree.map(jnp.asarray, (unet_params, vae_params, text_params))
    return StableDiffusion(UNet2DConditionModel(unet_config, dtype=dtype, remat=remat), unet_params,
                           vae, vae_params, CLIPTextTransformer(text_config, dtype=dtype, remat=remat), text_params,
                           tokenizer, schedule, scaling, prediction, sample_size)


def encode_prompt(sd: StableDiffusion, prompts: Sequence[str]) -> jnp.ndarray:
    """CLIP text embeddings ``(B, L, D)``: the text encoder's last hidden state (after its final
    layer norm, as Stable Diffusion conditions on) for each prompt, tokenised to exactly
    ``L = min(tokenizer.model_max_length, max_position_embeddings)`` tokens (77 for SD):
    padded with the pad token, longer prompts truncated."""
    if isinstance(prompts, str) or not isinstance(prompts, Sequence) or len(prompts) == 0 \
            or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"encode_prompt: prompts must be a non-empty list of strings; "
                         f"got {prompts!r}.")
    length = min(int(sd.tokenizer.model_max_length),
                 int(sd.text_encoder.config.max_position_embeddings))
    ids = sd.tokenizer(list(prompts), length)
    return _encode_ids(Keyed(sd.text_encoder, repr(sd.text_encoder)), sd.text_params, jnp.asarray(ids))


def _text_states(encoder, params, ids):
    return encoder.value.apply({"params": params}, ids).last_hidden_state


# One compiled program per text-encoder architecture (``Keyed`` hashes by its key); the weights are
# an argument.
_encode_ids = jax.jit(_text_states, static_argnums=0)


def _cfg_params(sd: StableDiffusion, prompt_embeds, uncond_embeds, guidance_scale, who: str, extra=None,
                modifiers=None) -> dict:
    """Validated params of the CFG denoisers: UNet weights, the ``(2, L, D)`` context
    ``[uncond, cond]``, the scale, the conditioning channels ``(2, h, w, c)`` (``[uncond, cond]``)
    of a UNet that takes them and (v-prediction) the schedule's ``alphas_cumprod``, all leaves."""
    cond = jnp.asarray(prompt_embeds)
    uncond = jnp.asarray(uncond_embeds)
    cross_dim = sd.unet.config.context_dim
    if cond.ndim != 2 or (cross_dim is not None and cond.shape[-1] != cross_dim):
        raise ValueError(f"{who}: prompt_embeds must have shape (L, {cross_dim}); got {cond.shape}.")
    if uncond.shape != cond.shape:
        raise ValueError(f"{who}: uncond_embeds must have the shape of prompt_embeds "
                         f"{cond.shape}; got {uncond.shape}.")
    if isinstance(guidance_scale, bool) or jnp.ndim(guidance_scale) != 0:
        raise ValueError(f"{who}: guidance_scale must be a scalar; got {guidance_scale!r}.")
    params = {"unet": sd.unet_params, "context": jnp.stack([uncond, cond]), "scale": guidance_scale}
    wanted = sd.extra_channels
    if wanted and extra is None:
        raise ValueError(f"{who}: this UNet takes {wanted} conditioning channel(s) after the latent's "
                         f"{sd.latent_channels} (in_channels {sd.unet.config.in_channels}, out_channels "
                         f"{sd.latent_channels}); pass extra=an array ({wanted}, h, w), or (2, {wanted}, h, w) for "
                         "[unconditional, conditional] branches.")
    if extra is not None:
        extra = jnp.asarray(extra)
        if not wanted:
            raise ValueError(f"{who}: extra conditioning channels were given but this UNet takes none "
                             f"(in_channels = out_channels = {sd.latent_channels}); leave extra=None.")
        if extra.ndim == 3:
            extra = jnp.stack([extra, extra])
        if extra.ndim != 4 or extra.shape[:2] != (2, wanted) or not jnp.issubdtype(extra.dtype, jnp.floating):
            raise ValueError(f"{who}: extra must be a float array ({wanted}, h, w) or (2, {wanted}, h, w) "
                             f"([unconditional, conditional]); got {extra.dtype} {tuple(extra.shape)}.")
        params["extra"] = jnp.transpose(extra, (0, 2, 3, 1))  # channels-last once, not in every UNet call
    if sd.prediction_type == "v_prediction":
        params["alphas_cumprod"] = jnp.asarray(sd.schedule.alphas_cumprod)
    if modifiers:
        if not isinstance(modifiers, dict):
            raise ValueError(f"{who}: modifiers must be a dict {{attention layer name: modifier}}; got "
                             f"{type(modifiers).__name__}.")
        params["modifiers"] = dict(modifiers)
    return params


def v_to_eps(v, x, alpha_bar):
    """The noise prediction of a v-prediction model: ``eps = sqrt(ab) v + sqrt(1 - ab) x`` (from
    ``v = sqrt(ab) eps - sqrt(1 - ab) x0`` and ``x = sqrt(ab) x0 + sqrt(1 - ab) eps``)."""
    return jnp.sqrt(alpha_bar) * v + jnp.sqrt(1.0 - alpha_bar) * x


def _cfg(unet, remat, correction_only, params, x, t):
    """``eps_u + w (eps_c - eps_u)`` (or ``w (eps_c - eps_u)``) of one latent: both branches in one
    UNet call on a batch of two copies of ``x``. A v-prediction UNet's outputs are converted to
    eps first (exact and affine in v, so CFG on v then conversion gives the same eps)."""
    unet = unet.value
    channels = int(unet.config.out_channels)
    if x.ndim != 3 or x.shape[0] != channels:
        raise ValueError(f"latent denoiser: x must be one latent ({channels}, h, w); got shape {x.shape}.")
    call = _rematerialized(lambda p, x, timesteps, context, modifiers: unet.apply(
        {"params": p}, x, timesteps, context, modifiers=modifiers), remat, "latent denoiser")
    # One timestep per batch row; integer like the PyTorch pipelines' (the UNet embeds t as float).
    timesteps = jnp.broadcast_to(jnp.asarray(t, jnp.int32), (2,))
    hwc = jnp.transpose(x, (1, 2, 0))
    batch = jnp.stack([hwc, hwc])
    if "extra" in params:  # conditioning channels after the latent's, one set per branch (2, h, w, c)
        extra = params["extra"]
        if extra.shape[1:3] != x.shape[1:]:
            raise ValueError(f"latent denoiser: the conditioning channels {(extra.shape[3],) + tuple(extra.shape[1:3])} "
                             f"must have the latent's size {tuple(x.shape[1:])}.")
        batch = jnp.concatenate([batch, extra.astype(batch.dtype)], -1)
    out_u, out_c = jnp.transpose(call(params["unet"], batch, timesteps, params["context"], params.get("modifiers")),
                                 (0, 3, 1, 2)).astype(x.dtype)
    if "alphas_cumprod" in params:  # v-prediction
        ab = params["alphas_cumprod"][t].astype(x.dtype)
        if correction_only:
            return params["scale"] * jnp.sqrt(ab) * (out_c - out_u)
        out_u, out_c = v_to_eps(out_u, x, ab), v_to_eps(out_c, x, ab)
    correction = params["scale"] * (out_c - out_u)
    return (correction if correction_only else out_u + correction).astype(x.dtype)


def latent_denoiser(sd: StableDiffusion, prompt_embeds, uncond_embeds, guidance_scale, *, remat=False,
                    extra=None, modifiers=None) -> Denoiser:
    """Classifier-free-guided noise predictor for ONE latent sample, a :class:`~zmagic_jax.Denoiser`.

    ``denoiser(x, t) = eps_u + w (eps_c - eps_u)`` with ``eps_c = UNet(x, t, c)``,
    ``eps_u = UNet(x, t, u)`` and ``w = guidance_scale`` (``w = 1``: conditional model only,
    ``w = 0``: unconditional). For a v-prediction model (SD 2.x 768) each branch is converted to
    eps by :func:`v_to_eps`. ``x`` is a latent ``(4, h, w)`` (channels first; ``h, w`` multiples
    of the UNet's downsampling factor), ``t`` an integer timestep (traced) of ``sd.schedule``.
    ``prompt_embeds`` / ``uncond_embeds`` are one prompt's embeddings ``(L, D)`` (e.g.
    ``encode_prompt(sd, [p])[0]`` and of ``""``). The UNet weights, both embeddings and ``w`` are
    the params (leaves): a new prompt or scale reuses the program. Both branches run in a single
    UNet call on a batch of two copies of ``x``.

    ``remat=True`` wraps the UNet call in ``jax.checkpoint``: differentiating through the denoiser
    (every guidance scheme does) then stores only the UNet's inputs and recomputes its
    activations in the backward pass, bounding memory at the price of one more forward pass.
    A ``jax.checkpoint_policies`` name (e.g. ``"dots_saveable"``) keeps what that policy saves.

    ``extra``: the conditioning channels of a UNet with more input than output channels (module
    docstring), ``(c, h, w)`` for both branches or ``(2, c, h, w)`` for ``[unconditional,
    conditional]`` (e.g. a blank layout in the first: CFG on the layout); a leaf of the params.

    ``modifiers``: the UNet's attention score modifiers ``{layer name: modifier}`` (arrays, or
    callables of the scores such as SOW's :func:`zmagic_jax.modulation.region_modulations`), applied to both
    branches in every call; ``params["modifiers"]``, so their numbers are leaves.
    """
    _rematerialized(lambda: None, remat, "latent_denoiser")
    params = _cfg_params(sd, prompt_embeds, uncond_embeds, guidance_scale, "latent_denoiser", extra, modifiers)
    return Denoiser(static_partial(_cfg, Keyed(sd.unet, repr(sd.unet)), remat, False), params)


def latent_cfg_correction(sd: StableDiffusion, prompt_embeds, uncond_embeds, guidance_scale, *,
                          remat=False, extra=None) -> Denoiser:
    """``correction(x, t) = w (eps_c - eps_u)``: what classifier-free guidance adds to the
    unconditional noise prediction of one latent (same arguments and params as
    :func:`latent_denoiser`).

    FreeDoM's Stable Diffusion step size is relative to its size (see
    :func:`zmagic_jax.cfg_relative_rule`).
    """
    _rematerialized(lambda: None, remat, "latent_cfg_correction")
    params = _cfg_params(sd, prompt_embeds, uncond_embeds, guidance_scale, "latent_cfg_correction", extra)
    return Denoiser(static_partial(_cfg, Keyed(sd.unet, repr(sd.unet)), remat, True), params)


def decode_latents(sd: StableDiffusion, latents, *, remat=False) -> jnp.ndarray:
    """Decode one latent ``z`` ``(4, h, w)`` to an image ``(f h, f w, 3)`` (channels-last) in the
    VAE's range ``[-1, 1]`` (not clipped, so it stays differentiable): ``D(z / scaling_factor)``.
    ``f = 2 ** (len(vae block_out_channels) - 1)``, 8 for Stable Diffusion. A pixel-space model
    (no VAE) returns its ``(c, h, w)`` sample as the image ``(h, w, c)``.

    ``remat`` as in :func:`latent_denoiser`, for the VAE decoder call: its activations at the full
    image resolution dominate the memory of gradients of image energies."""
    decoder = _rematerialized(
        lambda params, z: sd.vae.apply({"params": params}, z, method="decode"), remat, "decode_latents")
    z = jnp.asarray(latents)
    if sd.vae is None:
        if z.ndim != 3:
            raise ValueError(f"decode_latents: latents must be one sample (c, h, w); got shape {z.shape}.")
        return jnp.transpose(z, (1, 2, 0))
    channels = int(sd.vae.config.latent_channels)
    if z.ndim != 3 or z.shape[0] != channels:
        raise ValueError(f"decode_latents: latents must be one latent ({channels}, h, w); "
                         f"got shape {z.shape}.")
    z = jnp.transpose(z / sd.vae_scaling_factor, (1, 2, 0))[None]
    return decoder(sd.vae_params, z)[0].astype(z.dtype)


def encode_image(sd: StableDiffusion, image, key: Optional[jax.Array] = None, *, remat=False) -> jnp.ndarray:
    """Encode one image ``(H, W, 3)`` in ``[-1, 1]`` (``H, W`` multiples of the VAE factor) to a
    latent ``(4, H/f, W/f)`` scaled as the UNet expects: ``scaling_factor * mean`` of the VAE
    posterior, or ``scaling_factor * (mean + exp(logvar / 2) n)`` with ``n ~ N(0, I)`` drawn from
    ``key`` (diffusers' ``latent_dist.sample()``). Differentiable; ``remat`` as in
    :func:`decode_latents`. A pixel-space model (no VAE) returns the image channels-first."""
    image = jnp.asarray(image)
    if sd.vae is None:
        if image.ndim != 3 or image.shape[-1] != sd.latent_channels:
            raise ValueError(f"encode_image: image must be one (H, W, {sd.latent_channels}) image in [-1, 1]; "
                             f"got shape {image.shape}.")
        return jnp.transpose(image, (2, 0, 1))
    if image.ndim != 3 or image.shape[-1] != sd.vae.config.in_channels:
        raise ValueError(f"encode_image: image must be one (H, W, {sd.vae.config.in_channels}) image in [-1, 1]; "
                         f"got shape {image.shape}.")
    encoder = _rematerialized(lambda params, x: sd.vae.apply({"params": params}, x, method="encode"),
                              remat, "encode_image")
    mean, logvar = encoder(sd.vae_params, image[None])
    z = mean if key is None else mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
    return jnp.transpose(sd.vae_scaling_factor * z[0], (2, 0, 1)).astype(image.dtype)
