"""Tiny random Stable Diffusion and CLIP models of the real architectures, saved in the real formats.

They stand in for real weights wherever none can be downloaded: the test suite, the benchmarks and
the ``--tiny`` mode of ``table2_text_style.py`` build them here and load them back through the
library's own loaders. No PyTorch is needed: random parameters of the library's own Flax modules
are written in the PyTorch key layout (``*.safetensors``) with diffusers / transformers
``config.json`` files, exactly as those libraries save them (the committed parity fixtures of
``tests/references/`` were written by the PyTorch libraries themselves, ``.bin`` included).
Same seed, same weights.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

# A toy BPE vocabulary (CLIP marks word ends with </w>): every word is one character except those
# built by the merges, so any lower-case prompt made of these letters tokenises.
SD_VOCAB = ["l", "o", "w", "e", "r", "s", "t", "i", "d", "n", "lo", "l</w>", "w</w>", "r</w>",
            "t</w>", "low</w>", "er</w>", "lowest</w>", "newer</w>", "wider", "<|startoftext|>",
            "<|endoftext|>"]
SD_MERGES = ["#version: 0.2", "l o", "lo w</w>", "e r</w>"]
CLIP_VOCAB = ["!", "a", "c", "t", "o", "a</w>", "c</w>", "t</w>", "o</w>", "ca", "cat</w>",
              "<|startoftext|>", "<|endoftext|>"]
CLIP_MERGES = ["#version: 0.2", "c a", "ca t</w>"]

# diffusers / transformers configs of the tiny models (what their save_pretrained writes, minus
# version keys): UNet 32/64 channels on 8x8 latents, 2-level VAE, 2-layer CLIP text encoder.
TINY_UNET = dict(_class_name="UNet2DConditionModel", block_out_channels=[32, 64], layers_per_block=1,
                 sample_size=8, in_channels=4, out_channels=4,
                 down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
                 up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], cross_attention_dim=32,
                 attention_head_dim=8, norm_num_groups=32)
TINY_VAE = dict(_class_name="AutoencoderKL", in_channels=3, out_channels=3, block_out_channels=[32, 32],
                layers_per_block=1, down_block_types=["DownEncoderBlock2D"] * 2,
                up_block_types=["UpDecoderBlock2D"] * 2, latent_channels=4, norm_num_groups=16,
                sample_size=16, scaling_factor=0.18215)
TINY_SD_TEXT = dict(architectures=["CLIPTextModel"], model_type="clip_text_model", hidden_size=32,
                    intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                    vocab_size=len(SD_VOCAB), max_position_embeddings=77, bos_token_id=20, eos_token_id=21,
                    pad_token_id=21, hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=32)
TINY_SCHEDULER = dict(_class_name="DDIMScheduler", beta_start=0.00085, beta_end=0.012,
                      beta_schedule="scaled_linear", num_train_timesteps=1000, clip_sample=False,
                      set_alpha_to_one=False, prediction_type="epsilon")
_TEXT_CONFIG = dict(model_type="clip_text_model", hidden_size=32, intermediate_size=37, num_attention_heads=4,
                    num_hidden_layers=2, max_position_embeddings=77, projection_dim=16, hidden_act="quick_gelu",
                    layer_norm_eps=1e-5)
_VISION_CONFIG = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=37, num_attention_heads=4,
                      num_hidden_layers=4, image_size=32, patch_size=8, num_channels=3, projection_dim=16,
                      hidden_act="quick_gelu", layer_norm_eps=1e-5)


def random_tree(shapes: dict, seed: int) -> dict:
    """Random float32 params for ``{flax path: shape}``: kernels ``N(0, 1/fan_in)``, norm scales
    near 1, embeddings ``N(0, 0.5)``, biases and the rest small, so that every parameter moves
    the outputs (an op-by-op random init of even a tiny UNet takes seconds on CPU; this is instant)."""
    from flax import traverse_util
    rng = np.random.default_rng(seed)
    params = {}
    for path, shape in shapes.items():  # in the given (flatten) order: same seed, same weights
        shape, name = tuple(shape), path[-1]
        if name == "kernel":
            value = rng.normal(0.0, 1.0 / np.sqrt(max(int(np.prod(shape[:-1])), 1)), shape)
        elif name == "scale":
            value = 1.0 + 0.1 * rng.normal(size=shape)
        elif name in ("embedding", "class_embedding"):
            value = 0.5 * rng.normal(size=shape)
        elif name == "alpha":
            value = np.full(shape, 0.25)
        else:
            value = 0.05 * rng.normal(size=shape)
        params[path] = value.astype(np.float32)
    return traverse_util.unflatten_dict(params)


def _write_json(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data, indent=2, sort_keys=True))


def _save_tensors(path: Path, tensors: dict) -> None:
    from safetensors.numpy import save_file
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: np.array(v, np.float32) for k, v in tensors.items()}, str(path),  # np.array keeps 0-d
              metadata={"format": "pt"})


def save_clip_tokenizer(folder, vocab, merges, *, pad_token="<|endoftext|>", model_max_length: int = 77) -> None:
    """A CLIP tokenizer folder as transformers saves one: vocab.json, merges.txt,
    tokenizer_config.json and special_tokens_map.json."""
    folder = Path(folder)
    _write_json(folder / "vocab.json", {token: i for i, token in enumerate(vocab)})
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "merges.txt").write_text("\n".join(merges) + "\n")
    special = dict(bos_token="<|startoftext|>", eos_token="<|endoftext|>", unk_token="<|endoftext|>",
                   pad_token=pad_token)
    _write_json(folder / "tokenizer_config.json", dict(special, model_max_length=model_max_length,
                                                       tokenizer_class="CLIPTokenizer"))
    _write_json(folder / "special_tokens_map.json", special)


def save_sd_folder(root, *, unet: dict, unet_params, text: dict, text_params, vocab, merges, scheduler: dict,
                   vae: dict = None, vae_params=None, model_max_length: int = 77) -> Path:
    """Write a diffusers-format Stable Diffusion folder at ``root`` from Flax params: ``unet/``,
    ``text_encoder/`` (``text_params`` of the text tower), ``tokenizer/`` (``vocab``, ``merges``),
    ``scheduler/`` and, when ``vae`` is given, ``vae/`` (a pixel-space model has none). Configs
    are the diffusers / transformers ``config.json`` dicts."""
    from zmagic_jax.models._autoencoder_kl import vae_config_from_dict
    from zmagic_jax.models._clip import clip_torch_state_dict
    from zmagic_jax.models._sd_convert import unet_torch_state_dict, vae_torch_state_dict
    from zmagic_jax.models._unet2d import unet_config_from_dict

    root = Path(root)
    parts = [("unet", unet, unet_torch_state_dict(unet_params, unet_config_from_dict(unet, file="unet config")))]
    if vae is not None:
        parts.append(("vae", vae, vae_torch_state_dict(vae_params, vae_config_from_dict(vae, file="vae config"))))
    for sub, config, tensors in parts:
        _write_json(root / sub / "config.json", config)
        _save_tensors(root / sub / "diffusion_pytorch_model.safetensors", tensors)
    _write_json(root / "text_encoder" / "config.json", text)
    _save_tensors(root / "text_encoder" / "model.safetensors", clip_torch_state_dict({"text_model": text_params}))
    save_clip_tokenizer(root / "tokenizer", vocab, merges, model_max_length=model_max_length)
    _write_json(root / "scheduler" / "scheduler_config.json", scheduler)
    return root


def save_tiny_stable_diffusion(root, seed: int = 0, *, prediction_type: str = "epsilon", unet: dict = TINY_UNET,
                               vae: dict = TINY_VAE, text: dict = TINY_SD_TEXT) -> dict:
    """Save a tiny random SD (configs ``unet``, ``vae``, ``text``: by default ``TINY_UNET``,
    ``TINY_VAE``, ``TINY_SD_TEXT``; the text vocabulary is ``SD_VOCAB``) as a complete diffusers
    folder with safetensors weights at ``root``. Returns ``{"path": root, "unet", "vae", "text":
    the Flax params written}``."""
    from zmagic_jax.models._autoencoder_kl import vae_config_from_dict
    from zmagic_jax.models._clip import clip_configs_from_dict, clip_param_shapes
    from zmagic_jax.models._sd_convert import unet_param_shapes, vae_param_shapes
    from zmagic_jax.models._unet2d import unet_config_from_dict

    root = Path(root)
    unet_config = unet_config_from_dict(unet, file="unet config")
    vae_config = vae_config_from_dict(vae, file="vae config")
    text_config, _, _ = clip_configs_from_dict(text, file="text config")
    unet_params = random_tree(unet_param_shapes(unet_config), seed)
    vae_params = random_tree(vae_param_shapes(vae_config), seed + 1)
    text_params = random_tree(clip_param_shapes(text_config, None, None), seed + 2)["text_model"]
    save_sd_folder(root, unet=unet, unet_params=unet_params, text=text, text_params=text_params, vocab=SD_VOCAB,
                   merges=SD_MERGES, scheduler=dict(TINY_SCHEDULER, prediction_type=prediction_type), vae=vae,
                   vae_params=vae_params)
    return dict(path=root, unet=unet_params, vae=vae_params, text={"text_model": text_params})


def tiny_clip_config(tokenizer_size: int = len(CLIP_VOCAB)) -> dict:
    """The transformers ``CLIPModel`` config of the tiny CLIP (4-layer ViT on 32x32 images, patch 8;
    2-layer text model; projection 16); bos/eos/pad are the toy tokenizer's (both frameworks pool
    the text at the first eos token)."""
    bos, eos = CLIP_VOCAB.index("<|startoftext|>"), CLIP_VOCAB.index("<|endoftext|>")
    text = dict(_TEXT_CONFIG, vocab_size=tokenizer_size, bos_token_id=bos, eos_token_id=eos, pad_token_id=eos)
    return dict(architectures=["CLIPModel"], model_type="clip", projection_dim=16, logit_scale_init_value=2.6592,
                text_config=text, vision_config=dict(_VISION_CONFIG))


def save_tiny_clip(root, seed: int = 0) -> dict:
    """Save a tiny random CLIP (``tiny_clip_config``) as a transformers folder (config.json,
    model.safetensors, tokenizer files) at ``root``. Returns ``{"path": root, "params"}``."""
    from zmagic_jax.models._clip import clip_configs_from_dict, clip_param_shapes, clip_torch_state_dict

    root = Path(root)
    config = tiny_clip_config()
    text, vision, projection = clip_configs_from_dict(config, file="tiny_clip_config")
    params = random_tree(clip_param_shapes(text, vision, projection), seed)
    _write_json(root / "config.json", config)
    _save_tensors(root / "model.safetensors", clip_torch_state_dict(params))
    save_clip_tokenizer(root, CLIP_VOCAB, CLIP_MERGES)
    return dict(path=root, params=params)


def random_params(port, config, seed: int = 0) -> dict:
    """Random params of ``port``'s module at ``config`` without running its init: shapes from
    ``jax.eval_shape``; kernels ``N(0, 1/fan_in)``, biases and shifts small, scales near 1, PReLU
    slopes 0.25 (an op-by-op init of even a tiny UNet takes seconds on CPU, this is instant)."""
    import jax
    from flax import traverse_util

    module = port.module(config)
    shapes = traverse_util.flatten_dict(jax.eval_shape(module.init, jax.random.key(0),
                                                       *port.example(config))["params"])
    return random_tree({path: leaf.shape for path, leaf in shapes.items()}, seed)


def tiny_face_configs(resolution: int = 32) -> dict:
    """Reduced configs of the face networks (same code paths as the published ones)."""
    from zmagic_jax.models import ArcFaceConfig, BiSeNetConfig, DDPMUNetConfig, MobileFaceNetConfig
    return {
        "ddpm_unet": DDPMUNetConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(resolution // 2,),
                               resolution=resolution),
        "bisenet": BiSeNetConfig(resnet_widths=(8, 16, 32, 64), context_channels=16, fuse_channels=32,
                                 aux_mid_channels=8),
        "arcface": ArcFaceConfig(stage_units=(1, 1, 1, 1), widths=(16, 16, 32, 32), input_size=32, embedding_size=32),
        "mobilefacenet": MobileFaceNetConfig(input_size=32, widths=(8, 16, 32), expansions=(16, 16, 32, 32, 32, 32),
                                             residual_units=(1, 1, 1)),
    }


def save_tiny_face_models(root, resolution: int = 32, seed: int = 0, clip: bool = True) -> dict:
    """Tiny random face networks written as converted ``.safetensors`` (network name and config in
    the header, as ``zmagic convert`` writes them) and, with ``clip``, a tiny CLIP folder.
    Returns ``{"unet", "bisenet", "arcface", "landmarks", "clip"}`` paths."""
    from zmagic_jax.ports import PORTS, save_params
    from zmagic_jax.ports._checkpoint import config_to_json

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    paths = {}
    for i, (name, config) in enumerate(tiny_face_configs(resolution).items()):
        port = PORTS[name]
        path = root / f"{name}.safetensors"
        save_params(path, random_params(port, config, seed + i),
                    metadata={"network": port.name, "config": config_to_json(config)})
        paths[{"mobilefacenet": "landmarks", "ddpm_unet": "unet"}.get(name, name)] = path
    if clip:
        paths["clip"] = save_tiny_clip(root / "clip", seed)["path"]
    return paths
