"""Tiny random Stable Diffusion and CLIP models of the real architectures, saved in the real formats.

They stand in for real weights wherever none can be downloaded: the test suite, the benchmark
``bench_text_style.py`` and the ``--tiny`` mode of ``table2_text_style.py`` build them here and
load them back through the library's own loaders. Building needs PyTorch, diffusers and
transformers (``pip install -e '.[test]'``). Same seed, same weights.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

# A toy BPE vocabulary (CLIP marks word ends with </w>): every word is one character except those
# built by the merges, so any lower-case prompt made of these letters tokenises.
SD_VOCAB = ["l", "o", "w", "e", "r", "s", "t", "i", "d", "n", "lo", "l</w>", "w</w>", "r</w>",
            "t</w>", "low</w>", "er</w>", "lowest</w>", "newer</w>", "wider", "<|startoftext|>",
            "<|endoftext|>"]
SD_MERGES = ["#version: 0.2", "l o", "lo w</w>", "e r</w>"]
CLIP_VOCAB = ["!", "a", "c", "t", "o", "a</w>", "c</w>", "t</w>", "o</w>", "ca", "cat</w>",
              "<|startoftext|>", "<|endoftext|>"]
CLIP_MERGES = "#version: 0.2\nc a\nca t</w>\n"


def _flax_from_pt_with_shape_init(cls, *args, **kwargs):
    """``cls.from_pretrained(..., from_pt=True)`` without a real random init.

    The Flax converters only need the names and shapes of a random init, and an op-by-op random
    init of the UNet takes ~30 s on CPU, so ``init_weights`` is swapped for its shape tree.
    """
    import jax

    original = cls.init_weights
    cls.init_weights = lambda self, *a, **k: jax.eval_shape(lambda: original(self, *a, **k))
    try:
        return cls.from_pretrained(*args, from_pt=True, local_files_only=True, **kwargs)
    finally:
        cls.init_weights = original


def save_tiny_stable_diffusion(root, seed: int = 0) -> dict:
    """Save a tiny random SD (UNet 32/64 channels on 8x8 latents, 2-level VAE, 2-layer CLIP text
    encoder) three ways under ``root``: ``pt`` (PyTorch safetensors), ``pt_bin`` (PyTorch .bin)
    and ``flax`` (Flax msgpack), each a complete diffusers folder.

    Returns the three paths and the PyTorch modules (``unet``, ``vae``, ``text``, ``tokenizer``,
    ``scheduler``) for parity checks.
    """
    import torch
    from diffusers import (AutoencoderKL, DDIMScheduler, FlaxAutoencoderKL, FlaxUNet2DConditionModel,
                           UNet2DConditionModel)
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer, FlaxCLIPTextModel

    root = Path(root)
    pt, pt_bin, fx, tok_dir = root / "pt", root / "pt_bin", root / "flax", root / "tok_src"
    tok_dir.mkdir(parents=True, exist_ok=True)
    (tok_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(SD_VOCAB)}))
    (tok_dir / "merges.txt").write_text("\n".join(SD_MERGES) + "\n")
    tokenizer = CLIPTokenizer(str(tok_dir / "vocab.json"), str(tok_dir / "merges.txt"), model_max_length=77)

    torch.manual_seed(seed)
    unet = UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4,
        out_channels=4, down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"), cross_attention_dim=32,
        attention_head_dim=8).eval()
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, block_out_channels=(32, 32), layers_per_block=1,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4, norm_num_groups=16, sample_size=16).eval()
    text = CLIPTextModel(CLIPTextConfig(
        hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        vocab_size=len(SD_VOCAB), max_position_embeddings=77, bos_token_id=20, eos_token_id=21,
        pad_token_id=21)).eval()
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, clip_sample=False, set_alpha_to_one=False)
    # Random init leaves some layers at exactly zero (e.g. UNet conv_out); perturb every
    # parameter so that each one influences the outputs.
    with torch.no_grad():
        for model in (unet, vae, text):
            for p in model.parameters():
                p.add_(0.05 * torch.randn_like(p))

    for folder, safe in ((pt, True), (pt_bin, False)):
        unet.save_pretrained(folder / "unet", safe_serialization=safe)
        vae.save_pretrained(folder / "vae", safe_serialization=safe)
        text.save_pretrained(folder / "text_encoder", safe_serialization=safe)
        tokenizer.save_pretrained(folder / "tokenizer")
        scheduler.save_pretrained(folder / "scheduler")

    # diffusers' Flax from_pt reads .bin only.
    for cls, sub in ((FlaxUNet2DConditionModel, "unet"), (FlaxAutoencoderKL, "vae")):
        model, params = _flax_from_pt_with_shape_init(cls, str(pt_bin / sub))
        model.save_pretrained(str(fx / sub), params=params)
    _flax_from_pt_with_shape_init(FlaxCLIPTextModel, str(pt / "text_encoder")).save_pretrained(
        str(fx / "text_encoder"))
    for sub in ("tokenizer", "scheduler"):
        shutil.copytree(pt / sub, fx / sub, dirs_exist_ok=True)
    return dict(pt=pt, pt_bin=pt_bin, flax=fx, unet=unet, vae=vae, text=text, tokenizer=tokenizer,
                scheduler=scheduler)


def save_tiny_clip(root, seed: int = 0) -> dict:
    """Save a tiny random CLIP (4-layer ViT on 32x32 images, patch 8; 2-layer text model) under
    ``root`` twice: ``pt`` (PyTorch safetensors) and ``flax`` (Flax msgpack, converted by
    :func:`zmagic_jax.energies.load_clip`). Returns both paths, the PyTorch ``CLIPModel`` and the
    tokenizer."""
    import torch
    from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, CLIPTokenizer, CLIPVisionConfig

    from zmagic_jax.energies import load_clip

    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    (root / "vocab.json").write_text(json.dumps({token: i for i, token in enumerate(CLIP_VOCAB)}))
    (root / "merges.txt").write_text(CLIP_MERGES)
    tokenizer = CLIPTokenizer(str(root / "vocab.json"), str(root / "merges.txt"))
    # eos/bos must be the tokenizer's: both frameworks pool the text at the first eos token.
    text = CLIPTextConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                          vocab_size=len(tokenizer), max_position_embeddings=77, projection_dim=16,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.pad_token_id)
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=4,
                              image_size=32, patch_size=8, projection_dim=16)
    torch.manual_seed(seed)
    torch_model = CLIPModel(CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                                       projection_dim=16)).eval()
    pt_dir, flax_dir = root / "pt", root / "flax"
    torch_model.save_pretrained(pt_dir)
    tokenizer.save_pretrained(pt_dir)
    clip_pt = load_clip(pt_dir)
    clip_pt.model.save_pretrained(flax_dir, params=clip_pt.params)
    tokenizer.save_pretrained(flax_dir)
    return dict(pt=pt_dir, flax=flax_dir, torch=torch_model, tokenizer=tokenizer)


def random_params(port, config, seed: int = 0) -> dict:
    """Random params of ``port``'s module at ``config`` without running its init: shapes from
    ``jax.eval_shape``; kernels ``N(0, 1/fan_in)``, biases and shifts small, scales near 1, PReLU
    slopes 0.25 (an op-by-op init of even a tiny UNet takes seconds on CPU, this is instant)."""
    import jax
    from flax import traverse_util
    import numpy as np

    module = port.module(config)
    shapes = traverse_util.flatten_dict(jax.eval_shape(module.init, jax.random.key(0),
                                                       *port.example(config))["params"])
    rng = np.random.default_rng(seed)
    params = {}
    for path, leaf in shapes.items():
        shape, name = tuple(leaf.shape), path[-1]
        if name == "kernel":
            fan_in = int(np.prod(shape[:-1]))
            value = rng.normal(0.0, 1.0 / np.sqrt(fan_in), shape)
        elif name == "scale":
            value = 1.0 + 0.1 * rng.normal(size=shape)
        elif name == "alpha":
            value = np.full(shape, 0.25)
        else:
            value = 0.05 * rng.normal(size=shape)
        params[path] = value.astype(np.float32)
    return traverse_util.unflatten_dict(params)


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
        paths["clip"] = save_tiny_clip(root / "clip", seed)["flax"]
    return paths
