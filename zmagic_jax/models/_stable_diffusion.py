"""Stable Diffusion as a library denoiser: loader, prompt encoder, guided eps, latent decoder.

The model is read from a local diffusers-format folder; nothing is ever downloaded. Layout::

    <path>/unet/config.json   + diffusion_flax_model.msgpack | diffusion_pytorch_model.safetensors
                                | diffusion_pytorch_model.bin
    <path>/vae/               (same files as unet/)
    <path>/text_encoder/config.json + flax_model.msgpack | model.safetensors | pytorch_model.bin
    <path>/tokenizer/                  (CLIPTokenizer files: vocab.json, merges.txt, ...)
    <path>/scheduler/scheduler_config.json

A latent sample uses the UNet's native channels-first layout ``(4, h, w)`` (no batch axis): the
diffusers Flax UNet consumes NCHW, so keeping that layout avoids a transpose per network call.
"""
from __future__ import annotations

import json
import os
from types import SimpleNamespace
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
from flax.traverse_util import flatten_dict, unflatten_dict

from zmagic_jax.contracts import Denoiser, Keyed, static_partial
from zmagic_jax.schedules import Schedule, linear_schedule, scaled_linear_schedule

_DEFAULT_VAE_SCALING_FACTOR = 0.18215

# Per model subfolder: weight files in order of preference. Flax weights are used as they are,
# PyTorch weights are converted on load (the Flax classes' ``from_pt`` path).
# diffusers names its Flax files ``diffusion_flax_model.msgpack``, transformers
# ``flax_model.msgpack``.
_DIFFUSERS_FILES = ("diffusion_flax_model.msgpack", "flax_model.msgpack",
                    "diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin")
_WEIGHT_FILES = {
    "unet": _DIFFUSERS_FILES,
    "vae": _DIFFUSERS_FILES,
    "text_encoder": ("flax_model.msgpack", "model.safetensors", "pytorch_model.bin"),
}

# PyTorch config options the Flax classes silently drop: they hard-code these values, so a
# checkpoint setting anything else would load without error yet compute a different network.
_FLAX_IMPLICIT_CONFIG = {
    "unet": {"act_fn": "silu", "norm_num_groups": 32, "norm_eps": 1e-5,
             "center_input_sample": False, "class_embed_type": None, "num_class_embeds": None,
             "resnet_time_scale_shift": "default", "time_embedding_type": "positional",
             "time_cond_proj_dim": None, "encoder_hid_dim": None, "conv_in_kernel": 3,
             "conv_out_kernel": 3, "mid_block_scale_factor": 1, "downsample_padding": 1,
             "dual_cross_attention": False, "timestep_post_act": None},
    "vae": {"use_quant_conv": True, "use_post_quant_conv": True, "mid_block_add_attention": True,
            "shift_factor": None, "latents_mean": None, "latents_std": None},
}

_LAYOUT_HELP = (
    "Expected a local diffusers-format Stable Diffusion folder with subfolders: "
    "unet/ (config.json + diffusion_flax_model.msgpack or "
    "diffusion_pytorch_model.safetensors/.bin), "
    "vae/ (config.json + diffusion_flax_model.msgpack or "
    "diffusion_pytorch_model.safetensors/.bin), "
    "text_encoder/ (config.json + flax_model.msgpack or model.safetensors/pytorch_model.bin), "
    "tokenizer/ (vocab.json, merges.txt, tokenizer_config.json), "
    "scheduler/ (scheduler_config.json). Such weights are published e.g. as "
    "CompVis/stable-diffusion-v1-4 or stabilityai/stable-diffusion-2-base on the Hugging Face Hub, "
    "downloaded by you (e.g. `huggingface-cli download <repo> --local-dir <path>`); "
    "this library never downloads."
)


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
    """A loaded Stable Diffusion: the three networks with their parameters, the tokenizer, the
    training noise schedule and the VAE latent scaling ``z = vae_scaling_factor * E(image)``."""

    unet: Any
    unet_params: Any
    vae: Any
    vae_params: Any
    text_encoder: Any
    text_params: Any
    tokenizer: Any
    schedule: Schedule
    vae_scaling_factor: float


def _missing(what: str, path: str) -> FileNotFoundError:
    return FileNotFoundError(f"load_stable_diffusion: missing {what} {path!r}. {_LAYOUT_HELP}")


def _weight_file(folder: str, component: str) -> str:
    for name in _WEIGHT_FILES[component]:
        candidate = os.path.join(folder, name)
        if os.path.isfile(candidate):
            return candidate
    names = " or ".join(_WEIGHT_FILES[component])
    raise _missing(f"{component} weight file ({names}) in", folder)


def _read_weights(file: str) -> dict:
    """Flat ``{key tuple | dotted name: array}`` from a Flax msgpack or a PyTorch file; any
    parse failure (truncated download, git-lfs pointer, garbage) becomes a ValueError naming it."""
    if file.endswith(".safetensors"):  # checked structure first: a clear error, and no allocation from a bad header
        from zmagic_jax.checkpoint_io import read_safetensors_header
        read_safetensors_header(file, "Stable Diffusion weight file")
    try:
        if file.endswith(".msgpack"):
            from flax.serialization import msgpack_restore
            with open(file, "rb") as f:
                state = msgpack_restore(f.read())
            if not isinstance(state, dict) or not state:
                raise ValueError("not a parameter dictionary")
            return flatten_dict(state)
        if file.endswith(".safetensors"):
            import safetensors.torch
            return safetensors.torch.load_file(file)
        import torch
        state = torch.load(file, map_location="cpu", weights_only=True)
        if not isinstance(state, dict) or not state:
            raise ValueError("not a state dict")
        return state
    except Exception as e:  # the readers raise many unrelated types on corrupt input
        raise ValueError(f"load_stable_diffusion: cannot read weight file {file!r} "
                         f"(corrupted or truncated?): {type(e).__name__}: {e}") from e


def _checked_params(flat: dict, expected: dict, file: str) -> dict:
    """Keep exactly the parameters the model expects; a missing or mis-shaped one is an error
    (diffusers only warns and would fail later, far from the cause)."""
    missing = sorted(".".join(k) for k in expected if k not in flat)
    if missing:
        raise ValueError(f"load_stable_diffusion: weight file {file!r} lacks {len(missing)} "
                         f"parameters of the model, e.g. {missing[:5]}.")
    for k, spec in expected.items():
        if tuple(flat[k].shape) != tuple(spec.shape):
            raise ValueError(f"load_stable_diffusion: weight file {file!r}: parameter "
                             f"{'.'.join(k)} has shape {tuple(flat[k].shape)}, the config "
                             f"expects {tuple(spec.shape)}.")
    return unflatten_dict({k: jnp.asarray(flat[k]) for k in expected})


def _load_diffusers_model(cls, folder: str, component: str, dtype):
    config_file = os.path.join(folder, "config.json")
    if not os.path.isfile(config_file):
        raise _missing(f"{component} config", config_file)
    file = _weight_file(folder, component)
    raw = _read_weights(file)
    try:
        config = cls.load_config(folder, local_files_only=True)
    except Exception as e:
        raise ValueError(f"load_stable_diffusion: cannot read {component} config "
                         f"{config_file!r}: {type(e).__name__}: {e}") from e
    for key, implicit in _FLAX_IMPLICIT_CONFIG[component].items():
        if config.get(key, implicit) != implicit:
            raise ValueError(f"load_stable_diffusion: {component} config {config_file!r} sets "
                             f"{key}={config[key]!r}; the Flax {cls.__name__} only implements "
                             f"{key}={implicit!r}.")
    try:
        model = cls.from_config(config, dtype=dtype)
        expected = flatten_dict(jax.eval_shape(model.init_weights, jax.random.PRNGKey(0)))
        if file.endswith(".msgpack"):
            flat = raw
        else:
            from diffusers.models.modeling_flax_pytorch_utils import (
                convert_pytorch_state_dict_to_flax)
            # The converter only reads names and shapes off `init_weights()`; handing it the
            # shape tree skips a real random init (tens of seconds for SD's UNet on CPU).
            shapes = unflatten_dict(expected)
            flat = flatten_dict(convert_pytorch_state_dict_to_flax(
                raw, SimpleNamespace(init_weights=lambda rng: shapes)))
    except Exception as e:
        raise ValueError(f"load_stable_diffusion: failed to build component {component!r} from "
                         f"{folder!r}: {type(e).__name__}: {e}") from e
    return model, _checked_params(flat, expected, file)


def _load_text_encoder(folder: str, dtype):
    from transformers import CLIPTextConfig, FlaxCLIPTextModel

    config_file = os.path.join(folder, "config.json")
    if not os.path.isfile(config_file):
        raise _missing("text_encoder config", config_file)
    file = _weight_file(folder, "text_encoder")
    raw = _read_weights(file)
    try:
        config = CLIPTextConfig.from_pretrained(folder, local_files_only=True)
        # No random init (`_do_init=False`): the parameters come from the file.
        model = FlaxCLIPTextModel(config, dtype=dtype, _do_init=False)
        expected = flatten_dict(model.params_shape_tree)
        if file.endswith(".msgpack"):
            flat = raw
        else:
            from transformers.modeling_flax_pytorch_utils import (
                convert_pytorch_state_dict_to_flax)
            # The converter only reads names and shapes off `.params` and the prefix.
            proxy = SimpleNamespace(params=model.params_shape_tree,
                                    base_model_prefix=model.base_model_prefix)
            flat = flatten_dict(convert_pytorch_state_dict_to_flax(raw, proxy))
    except Exception as e:
        raise ValueError(f"load_stable_diffusion: failed to build component 'text_encoder' from "
                         f"{folder!r}: {type(e).__name__}: {e}") from e
    return model, _checked_params(flat, expected, file)


def _load_tokenizer(folder: str):
    from transformers import CLIPTokenizer

    for name in ("vocab.json", "merges.txt"):
        if not os.path.isfile(os.path.join(folder, name)):
            raise _missing("tokenizer file", os.path.join(folder, name))
    try:
        return CLIPTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as e:
        raise ValueError(f"load_stable_diffusion: failed to load component 'tokenizer' from "
                         f"{folder!r}: {type(e).__name__}: {e}") from e


def _load_schedule(folder: str) -> Schedule:
    """The training schedule from ``scheduler_config.json``; absent keys take diffusers'
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
    if prediction != "epsilon":
        # v-prediction (e.g. SD 2.x 768) would need eps = sqrt(ab) v + sqrt(1 - ab) x conversion.
        raise ValueError(f"load_stable_diffusion: scheduler prediction_type {prediction!r} in "
                         f"{file!r} is not supported; only 'epsilon' models are.")
    if config.get("trained_betas") is not None:
        raise ValueError(f"load_stable_diffusion: explicit trained_betas in {file!r} are not "
                         "supported; use beta_schedule 'linear' or 'scaled_linear'.")
    kind = config.get("beta_schedule", "linear")
    builders = {"linear": linear_schedule, "scaled_linear": scaled_linear_schedule}
    if kind not in builders:
        raise ValueError(f"load_stable_diffusion: scheduler beta_schedule {kind!r} in {file!r} "
                         f"is not supported; expected one of {sorted(builders)}.")
    return builders[kind](int(config.get("num_train_timesteps", 1000)),
                          float(config.get("beta_start", 1e-4)),
                          float(config.get("beta_end", 0.02)))


def load_stable_diffusion(path, dtype=jnp.float32) -> StableDiffusion:
    """Load a local diffusers-format Stable Diffusion folder (see the module docstring).

    Flax weights (``flax_model.msgpack``) are preferred when present; PyTorch weights
    (safetensors or ``.bin``) are converted to Flax on load. ``dtype`` is the networks'
    computation dtype; parameters keep the dtype stored in the files.

    Raises FileNotFoundError naming the missing folder/file and the expected layout, and
    ValueError for an unreadable weight file or an unsupported scheduler.
    """
    from diffusers import FlaxAutoencoderKL, FlaxUNet2DConditionModel

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise _missing("Stable Diffusion folder", path)
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        if not os.path.isdir(os.path.join(path, sub)):
            raise _missing(f"{sub} folder", os.path.join(path, sub))
    schedule = _load_schedule(os.path.join(path, "scheduler"))
    unet, unet_params = _load_diffusers_model(
        FlaxUNet2DConditionModel, os.path.join(path, "unet"), "unet", dtype)
    vae, vae_params = _load_diffusers_model(
        FlaxAutoencoderKL, os.path.join(path, "vae"), "vae", dtype)
    text_encoder, text_params = _load_text_encoder(os.path.join(path, "text_encoder"), dtype)
    tokenizer = _load_tokenizer(os.path.join(path, "tokenizer"))
    scaling = dict(vae.config).get("scaling_factor")
    return StableDiffusion(unet, unet_params, vae, vae_params, text_encoder, text_params,
                           tokenizer, schedule,
                           float(_DEFAULT_VAE_SCALING_FACTOR if scaling is None else scaling))


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
    tokens = sd.tokenizer(list(prompts), padding="max_length", max_length=length,
                          truncation=True, return_tensors="np")
    out = sd.text_encoder(tokens["input_ids"], params=sd.text_params)
    return out.last_hidden_state


def _cfg_params(sd: StableDiffusion, prompt_embeds, uncond_embeds, guidance_scale, who: str) -> dict:
    """Validated params of the CFG denoisers: UNet weights, the ``(2, L, D)`` context
    ``[uncond, cond]`` and the scale, all leaves."""
    cond = jnp.asarray(prompt_embeds)
    uncond = jnp.asarray(uncond_embeds)
    cross_dim = int(sd.unet.cross_attention_dim)
    if cond.ndim != 2 or cond.shape[-1] != cross_dim:
        raise ValueError(f"{who}: prompt_embeds must have shape (L, {cross_dim}); got {cond.shape}.")
    if uncond.shape != cond.shape:
        raise ValueError(f"{who}: uncond_embeds must have the shape of prompt_embeds "
                         f"{cond.shape}; got {uncond.shape}.")
    if isinstance(guidance_scale, bool) or jnp.ndim(guidance_scale) != 0:
        raise ValueError(f"{who}: guidance_scale must be a scalar; got {guidance_scale!r}.")
    return {"unet": sd.unet_params, "context": jnp.stack([uncond, cond]), "scale": guidance_scale}


def _cfg(unet, remat, correction_only, params, x, t):
    """``eps_u + w (eps_c - eps_u)`` (or ``w (eps_c - eps_u)``) of one latent: both branches in one
    UNet call on a batch of two copies of ``x``."""
    unet = unet.value
    channels = int(unet.in_channels)
    if x.ndim != 3 or x.shape[0] != channels:
        raise ValueError(f"latent denoiser: x must be one latent ({channels}, h, w); got shape {x.shape}.")
    call = _rematerialized(lambda p, x, timesteps, context: unet.apply(
        {"params": p}, x, timesteps, context, train=False).sample, remat, "latent denoiser")
    # One timestep per batch row; integer like the PyTorch UNet's (it embeds t as float).
    timesteps = jnp.broadcast_to(jnp.asarray(t, jnp.int32), (2,))
    eps_u, eps_c = call(params["unet"], jnp.stack([x, x]), timesteps, params["context"])
    correction = params["scale"] * (eps_c - eps_u)
    return (correction if correction_only else eps_u + correction).astype(x.dtype)


def latent_denoiser(sd: StableDiffusion, prompt_embeds, uncond_embeds, guidance_scale, *, remat=False) -> Denoiser:
    """Classifier-free-guided noise predictor for ONE latent sample, a :class:`~zmagic_jax.Denoiser`.

    ``denoiser(x, t) = eps_u + w (eps_c - eps_u)`` with ``eps_c = UNet(x, t, c)``,
    ``eps_u = UNet(x, t, u)`` and ``w = guidance_scale`` (``w = 1``: conditional model only,
    ``w = 0``: unconditional). ``x`` is a latent ``(4, h, w)`` in the UNet's channels-first
    layout (``h, w`` multiples of the UNet's downsampling factor), ``t`` an integer timestep
    (traced) of ``sd.schedule``. ``prompt_embeds`` / ``uncond_embeds`` are one prompt's embeddings
    ``(L, D)`` (e.g. ``encode_prompt(sd, [p])[0]`` and of ``""``). The UNet weights, both
    embeddings and ``w`` are the params (leaves): a new prompt or scale reuses the program.
    Both branches run in a single UNet call on a batch of two copies of ``x``.

    ``remat=True`` wraps the UNet call in ``jax.checkpoint``: differentiating through the denoiser
    (every guidance scheme does) then stores only the UNet's inputs and recomputes its
    activations in the backward pass, bounding memory at the price of one more forward pass.
    A ``jax.checkpoint_policies`` name (e.g. ``"dots_saveable"``) keeps what that policy saves.
    """
    _rematerialized(lambda: None, remat, "latent_denoiser")
    params = _cfg_params(sd, prompt_embeds, uncond_embeds, guidance_scale, "latent_denoiser")
    return Denoiser(static_partial(_cfg, Keyed(sd.unet, repr(sd.unet)), remat, False), params)


def latent_cfg_correction(sd: StableDiffusion, prompt_embeds, uncond_embeds, guidance_scale, *,
                          remat=False) -> Denoiser:
    """``correction(x, t) = w (eps_c - eps_u)``: what classifier-free guidance adds to the
    unconditional noise prediction of one latent (same arguments and params as
    :func:`latent_denoiser`).

    FreeDoM's Stable Diffusion step size is relative to its size (see
    :func:`zmagic_jax.cfg_relative_rule`).
    """
    _rematerialized(lambda: None, remat, "latent_cfg_correction")
    params = _cfg_params(sd, prompt_embeds, uncond_embeds, guidance_scale, "latent_cfg_correction")
    return Denoiser(static_partial(_cfg, Keyed(sd.unet, repr(sd.unet)), remat, True), params)


def decode_latents(sd: StableDiffusion, latents, *, remat=False) -> jnp.ndarray:
    """Decode one latent ``z`` ``(4, h, w)`` to an image ``(f h, f w, 3)`` (channels-last) in the
    VAE's range ``[-1, 1]`` (not clipped, so it stays differentiable): ``D(z / scaling_factor)``.
    ``f = 2 ** (len(vae block_out_channels) - 1)``, 8 for Stable Diffusion.

    ``remat`` as in :func:`latent_denoiser`, for the VAE decoder call: its activations at the full
    image resolution dominate the memory of gradients of image energies."""
    decoder = _rematerialized(
        lambda params, z: sd.vae.apply({"params": params}, z, method=sd.vae.decode).sample,
        remat, "decode_latents")
    z = jnp.asarray(latents)
    channels = int(sd.vae.latent_channels)
    if z.ndim != 3 or z.shape[0] != channels:
        raise ValueError(f"decode_latents: latents must be one latent ({channels}, h, w); "
                         f"got shape {z.shape}.")
    # Hand the VAE channels-last input: its decode() guesses the layout from the last axis and
    # would mis-read an NCHW latent whose width equals the channel count.
    z = jnp.transpose(z / sd.vae_scaling_factor, (1, 2, 0))[None]
    image = decoder(sd.vae_params, z)
    return jnp.transpose(image[0], (1, 2, 0))
