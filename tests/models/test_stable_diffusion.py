"""The Stable Diffusion loader and pipeline functions on tiny random SD folders, against PyTorch.

The folders are written by ``experiments/tiny_models.py`` (numpy random weights, PyTorch key
layout; epsilon and v-prediction, same weights); diffusers / transformers load those very folders
with ``from_pretrained`` and their outputs are references of group ``stable_diffusion``
(``tests/references.py``): live with PyTorch, committed without. The ``.bin`` folder
``tests/references/sd_tiny_bin`` was written by PyTorch itself
(``experiments/make_parity_fixtures.py``)."""
import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import FAST_COMPILE
import zmagic_jax as zm
from experiments.make_parity_fixtures import SD_TINY_BIN_DIR, save_sd_tiny_bin_safetensors
from experiments.tiny_models import TINY_UNET, save_tiny_stable_diffusion
from tests.references import torch_reference
from zmagic_jax.models import (
    decode_latents,
    encode_image,
    encode_prompt,
    latent_cfg_correction,
    latent_denoiser,
    load_stable_diffusion,
    v_to_eps,
)

GROUP = "stable_diffusion"
PROMPTS = ["lower newer", "lowest wider lower", ""]  # cond, another, uncond
COND, UNCOND = 0, 2
T, W = 250, 2.0  # the guided point; a moderate w keeps float32 round-off, amplified ~2w + 1, small


def _rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _latent(seed=1, shape=(4, 8, 8)):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


LATENT = _latent(2)
IMAGE = np.random.default_rng(5).uniform(-1, 1, (16, 16, 3)).astype(np.float32)

# Eager op-by-op UNet execution and XLA's optimising CPU compile each cost tens of seconds
# here; a compile without the expensive LLVM passes keeps the suite fast (results still float32).


def _compile(fn, *args):
    return jax.jit(fn).lower(*args).compile(compiler_options=FAST_COMPILE)


def _denoise(den, x, t):
    return den(x, t)


def _with_vae_params(sd, fn):
    """``fn(sd, *args)`` as a function of ``(vae_params, *args)``: the VAE weights are an argument
    of the compiled program, not constants in it."""
    return lambda params, *args: fn(sd._replace(vae_params=params), *args)


def _assert_same_leaves(a, b):
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
    for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        assert np.asarray(u).dtype == np.float32
        np.testing.assert_array_equal(np.asarray(u), np.asarray(v))


# --- the PyTorch side: diffusers / transformers on the same folders ---------------------------------

@functools.lru_cache(maxsize=None)
def _torch_sd(path: str) -> dict:
    import diffusers
    import transformers
    return dict(unet=diffusers.UNet2DConditionModel.from_pretrained(os.path.join(path, "unet")).eval(),
                vae=diffusers.AutoencoderKL.from_pretrained(os.path.join(path, "vae")).eval(),
                text=transformers.CLIPTextModel.from_pretrained(os.path.join(path, "text_encoder")).eval(),
                tokenizer=transformers.CLIPTokenizer.from_pretrained(os.path.join(path, "tokenizer")),
                scheduler=diffusers.DDIMScheduler.from_pretrained(os.path.join(path, "scheduler")))


def _torch_text(path: str) -> np.ndarray:
    """transformers' CLIPTokenizer + CLIPTextModel: the last hidden state of ``PROMPTS``."""
    import torch
    models = _torch_sd(path)
    ids = models["tokenizer"](PROMPTS, padding="max_length", max_length=77, truncation=True,
                              return_tensors="pt")["input_ids"]
    with torch.no_grad():
        return models["text"](ids).last_hidden_state.numpy()


def _torch_unet(path: str) -> dict:
    """Two diffusers UNet calls at ``(LATENT, T)``: with the cond and the uncond text states."""
    import torch
    text = _torch_text(path)
    with torch.no_grad():
        return {name: _torch_sd(path)["unet"](torch.from_numpy(LATENT)[None], torch.tensor([T]),
                                              torch.from_numpy(text[row])[None]).sample.numpy()[0]
                for name, row in (("cond", COND), ("uncond", UNCOND))}


def _torch_v_prediction(path: str) -> dict:
    """The raw outputs of the v-prediction UNet and diffusers' DDIMScheduler conversion of their
    CFG combination ``v_u + W (v_c - v_u)`` to the predicted clean latent (``pred_original_sample``)."""
    import torch
    out = _torch_unet(path)
    scheduler = _torch_sd(path)["scheduler"]
    scheduler.set_timesteps(50)
    guided = out["uncond"] + W * (out["cond"] - out["uncond"])
    step = scheduler.step(torch.from_numpy(guided)[None], T, torch.from_numpy(LATENT)[None], eta=0.0)
    return dict(out, x0=step.pred_original_sample.numpy()[0])


def _torch_decoded(path: str) -> dict:
    import torch
    vae = _torch_sd(path)["vae"]
    with torch.no_grad():
        image = vae.decode(torch.from_numpy(LATENT)[None] / vae.config.scaling_factor).sample
    return {"image": image.numpy()[0].transpose(1, 2, 0), "scaling_factor": np.float32(vae.config.scaling_factor)}


def _torch_encoded(path: str) -> dict:
    """diffusers' ``AutoencoderKL.encode(image).latent_dist``: mean and std ``(4, h, w)``."""
    import torch
    with torch.no_grad():
        posterior = _torch_sd(path)["vae"].encode(torch.from_numpy(IMAGE.transpose(2, 0, 1))[None]).latent_dist
    return {"mean": posterior.mean.numpy()[0], "std": posterior.std.numpy()[0]}


def torch_values(dirs, name, compute):
    """The reference ``name`` of the folder ``dirs`` (``compute(path)`` live)."""
    return torch_reference(GROUP, name, lambda: compute(str(dirs["path"])))


# --- the library side ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def sd(tiny_sd_dirs):
    return load_stable_diffusion(tiny_sd_dirs["path"])


@pytest.fixture(scope="module")
def v_dirs(tmp_path_factory):
    """The tiny SD with a v-prediction scheduler (same seed, so the same weights as ``tiny_sd_dirs``)."""
    return save_tiny_stable_diffusion(tmp_path_factory.mktemp("tiny_sd_v") / "sd", prediction_type="v_prediction")


@pytest.fixture(scope="module")
def sd_v(v_dirs):
    return load_stable_diffusion(v_dirs["path"])


@pytest.fixture(scope="module")
def text(sd):
    return np.asarray(encode_prompt(sd, PROMPTS))


@pytest.fixture(scope="module")
def guided_eps(sd):
    """``latent_denoiser`` compiled once for all tests: weights, embeddings and scale are its params."""
    emb = jnp.zeros((77, 32), jnp.float32)
    compiled = _compile(_denoise, latent_denoiser(sd, emb, emb, jnp.float32(1.0)), jnp.zeros((4, 8, 8), jnp.float32),
                        jnp.int32(0))
    return lambda x, t, cond, uncond, w: compiled(latent_denoiser(sd, cond, uncond, jnp.float32(w)), jnp.asarray(x),
                                                  jnp.int32(t))


def test_folder_loads_the_params_written(sd, tiny_sd_dirs):
    for name in ("unet", "vae", "text"):
        _assert_same_leaves(getattr(sd, f"{name}_params"), tiny_sd_dirs[name]["text_model"] if name == "text"
                            else tiny_sd_dirs[name])
    assert sd.prediction_type == "epsilon" and sd.sample_size == 8


def test_components_match_pytorch(sd, tiny_sd_dirs, text, guided_eps):
    assert text.shape == (3, 77, 32)
    assert _rel_err(text, torch_values(tiny_sd_dirs, "text", _torch_text)) < 1e-4

    # Guidance scale 1 is the conditional UNet alone (eps_u + (eps_c - eps_u) = eps_c).
    eps = torch_values(tiny_sd_dirs, "unet", _torch_unet)
    assert _rel_err(guided_eps(LATENT, T, text[COND], text[UNCOND], 1.0), eps["cond"]) < 1e-4

    decoded = torch_values(tiny_sd_dirs, "decoded", _torch_decoded)
    assert sd.vae_scaling_factor == pytest.approx(float(decoded["scaling_factor"]))
    img = _compile(_with_vae_params(sd, decode_latents), sd.vae_params, LATENT)(sd.vae_params, LATENT)
    assert img.shape == (16, 16, 3)  # the tiny VAE upsamples 2x (SD's 4-level VAE: 8x)
    assert _rel_err(img, decoded["image"]) < 1e-4


def test_latent_denoiser_is_cfg_of_two_pytorch_calls(sd, tiny_sd_dirs, text, guided_eps):
    eps = guided_eps(LATENT, T, text[COND], text[UNCOND], W)
    ref = torch_values(tiny_sd_dirs, "unet", _torch_unet)
    eps_c, eps_u = ref["cond"], ref["uncond"]
    assert eps.shape == LATENT.shape
    assert _rel_err(eps, eps_u + W * (eps_c - eps_u)) < 1e-4
    correction = latent_cfg_correction(sd, text[COND], text[UNCOND], W)
    correction = _compile(_denoise, correction, LATENT, jnp.int32(T))(correction, LATENT, jnp.int32(T))
    assert _rel_err(correction, W * (eps_c - eps_u)) < 1e-3  # a difference: relative error grows


def _guided_pair(den, correction, x, t):
    return den(x, t), correction(x, t)


def test_v_prediction_is_converted_to_eps(sd, sd_v, v_dirs, text, guided_eps):
    """eps = sqrt(ab) v + sqrt(1 - ab) x of the CFG-combined v (v_to_eps is affine in v, so CFG
    on v then conversion = conversion then CFG): against the raw UNet outputs in float64, and
    against diffusers' UNet + DDIMScheduler on the v-prediction folder."""
    assert sd_v.prediction_type == "v_prediction"
    _assert_same_leaves(sd_v.unet_params, sd.unet_params)
    den = latent_denoiser(sd_v, text[COND], text[UNCOND], jnp.float32(W))
    correction = latent_cfg_correction(sd_v, text[COND], text[UNCOND], jnp.float32(W))
    args = (den, correction, jnp.asarray(LATENT), jnp.int32(T))
    eps, corr = (np.asarray(a, np.float64) for a in _compile(_guided_pair, *args)(*args))
    ab = float(np.asarray(sd_v.schedule.alphas_cumprod, np.float64)[T])
    x = LATENT.astype(np.float64)

    # The raw UNet outputs: the epsilon folder's denoiser (same weights) at w = 1 and w = 0.
    v_c, v_u = (np.asarray(guided_eps(LATENT, T, text[COND], text[UNCOND], w), np.float64) for w in (1.0, 0.0))
    v = v_u + W * (v_c - v_u)
    assert _rel_err(eps, np.sqrt(ab) * v + np.sqrt(1 - ab) * x) < 1e-5
    assert _rel_err(corr, W * np.sqrt(ab) * (v_c - v_u)) < 1e-4
    np.testing.assert_allclose(v_to_eps(v.astype(np.float32), LATENT, np.float32(ab)),
                               np.sqrt(ab) * v + np.sqrt(1 - ab) * x, rtol=1e-5, atol=1e-6)

    ref = torch_values(v_dirs, "v_prediction", _torch_v_prediction)
    v_ref = ref["uncond"].astype(np.float64) + W * (ref["cond"] - ref["uncond"].astype(np.float64))
    assert _rel_err(eps, np.sqrt(ab) * v_ref + np.sqrt(1 - ab) * x) < 1e-4
    assert _rel_err((x - np.sqrt(1 - ab) * eps) / np.sqrt(ab), ref["x0"]) < 1e-4  # DDIM's x0 from v


def test_encode_image_matches_diffusers(sd, tiny_sd_dirs):
    key = jax.random.key(3)

    def both(sd, image, key):
        return encode_image(sd, image), encode_image(sd, image, key)

    z_mean, z_sample = _compile(_with_vae_params(sd, both), sd.vae_params, IMAGE, key)(sd.vae_params, IMAGE, key)
    ref = torch_values(tiny_sd_dirs, "encoded", _torch_encoded)
    scale = sd.vae_scaling_factor
    assert z_mean.shape == (4, 8, 8)
    assert _rel_err(z_mean, scale * ref["mean"]) < 1e-4
    # latent_dist.sample(): mean + std * n, n drawn from the key in the VAE's channels-last layout
    noise = np.asarray(jax.random.normal(key, (1, 8, 8, 4), jnp.float32))[0].transpose(2, 0, 1)
    assert _rel_err(z_sample, scale * (ref["mean"] + ref["std"] * noise)) < 1e-4
    assert _rel_err(z_sample, z_mean) > 1e-3


def _decoded_tweedie_loss(sd, remat=False):
    """``|D(x0|t(x))|^2`` at t = 600: the path of latent guidance methods (Tweedie, then the decoder)."""
    def loss(den, x):
        ab = zm.alpha_bar(sd.schedule, 600, x.dtype)
        x0 = (x - jnp.sqrt(1 - ab) * den(x, 600)) / jnp.sqrt(ab)
        return jnp.sum(decode_latents(sd, x0, remat=remat) ** 2)
    return loss


def test_gradient_through_eps_and_decoder_is_finite(sd, text):
    den = latent_denoiser(sd, text[1], text[UNCOND], 3.0)
    x = jnp.asarray(_latent(3))
    g = _compile(jax.grad(_decoded_tweedie_loss(sd), argnums=1), den, x)(den, x)
    assert g.shape == (4, 8, 8)
    assert np.all(np.isfinite(g)) and float(jnp.max(jnp.abs(g))) > 0


def test_schedule_matches_diffusers(sd, tiny_sd_dirs):
    ref = torch_values(tiny_sd_dirs, "alphas_cumprod", lambda path: _torch_sd(path)["scheduler"].alphas_cumprod.numpy())
    assert sd.schedule.num_train_steps == 1000
    np.testing.assert_allclose(np.asarray(sd.schedule.alphas_cumprod), ref, atol=1e-6, rtol=0)


def test_input_validation(sd):
    emb = np.zeros((77, 32), np.float32)
    with pytest.raises(ValueError, match="prompts"):
        encode_prompt(sd, "a string, not a list")
    for make in (latent_denoiser, latent_cfg_correction):
        with pytest.raises(ValueError, match=f"{make.__name__}: prompt_embeds"):
            make(sd, emb[:, :16], emb[:, :16], 1.0)
        with pytest.raises(ValueError, match=f"{make.__name__}: uncond_embeds"):
            make(sd, emb, emb[:10], 1.0)
        with pytest.raises(ValueError, match=f"{make.__name__}: guidance_scale"):
            make(sd, emb, emb, np.ones(2))
        with pytest.raises(ValueError, match="x must be"):
            make(sd, emb, emb, 1.0)(jnp.zeros((8, 8, 4)), 10)
    with pytest.raises(ValueError, match="latents"):
        decode_latents(sd, jnp.zeros((8, 8, 4)))
    with pytest.raises(ValueError, match=r"encode_image: image must be one \(H, W, 3\)"):
        encode_image(sd, np.zeros((3, 16, 16), np.float32))


# --- folder formats ------------------------------------------------------------------------------------

def test_bin_folder_written_by_pytorch_loads_the_same_params(tmp_path):
    """diffusers' save_pretrained(safe_serialization=False) and torch.save files (the committed
    fixture) load to exactly the params the same weights have as safetensors."""
    files = {p.relative_to(SD_TINY_BIN_DIR).as_posix() for p in SD_TINY_BIN_DIR.rglob("*") if p.is_file()}
    assert {"unet/diffusion_pytorch_model.bin", "vae/diffusion_pytorch_model.bin",
            "text_encoder/pytorch_model.bin"} <= files
    assert not [f for f in files if f.endswith(".safetensors")]
    from_bin = load_stable_diffusion(SD_TINY_BIN_DIR)
    same = load_stable_diffusion(save_sd_tiny_bin_safetensors(tmp_path / "sd")["path"])
    for name in ("unet", "vae", "text_encoder"):
        assert getattr(from_bin, name).config == getattr(same, name).config
    for name in ("unet_params", "vae_params", "text_params"):
        _assert_same_leaves(getattr(from_bin, name), getattr(same, name))
    np.testing.assert_array_equal(from_bin.schedule.alphas_cumprod, same.schedule.alphas_cumprod)
    assert (from_bin.vae_scaling_factor, from_bin.prediction_type) == (same.vae_scaling_factor, "epsilon")


@pytest.fixture
def sd_copy(tiny_sd_dirs, tmp_path):
    dst = tmp_path / "sd"
    shutil.copytree(tiny_sd_dirs["path"], dst)
    return dst


def test_sharded_and_fp16_variant_files_load(sd, sd_copy):
    """The UNet as two safetensors shards with a diffusers index, the VAE as the .fp16 variant file."""
    from safetensors.numpy import load_file, save_file
    folder = sd_copy / "unet"
    tensors = load_file(folder / "diffusion_pytorch_model.safetensors")
    (folder / "diffusion_pytorch_model.safetensors").unlink()
    keys = sorted(tensors)
    shards = {"diffusion_pytorch_model-00001-of-00002.safetensors": keys[:len(keys) // 2],
              "diffusion_pytorch_model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for shard, names in shards.items():
        save_file({k: tensors[k] for k in names}, str(folder / shard), metadata={"format": "pt"})
    index = {"metadata": {"total_size": sum(v.nbytes for v in tensors.values())},
             "weight_map": {k: shard for shard, names in shards.items() for k in names}}
    (folder / "diffusion_pytorch_model.safetensors.index.json").write_text(json.dumps(index))
    vae = load_file(sd_copy / "vae" / "diffusion_pytorch_model.safetensors")
    (sd_copy / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    save_file({k: v.astype(np.float16) for k, v in vae.items()},
              str(sd_copy / "vae" / "diffusion_pytorch_model.fp16.safetensors"), metadata={"format": "pt"})

    loaded = load_stable_diffusion(sd_copy)
    _assert_same_leaves(loaded.unet_params, sd.unet_params)
    _assert_same_leaves(loaded.vae_params,
                        jax.tree.map(lambda a: np.asarray(a).astype(np.float16).astype(np.float32), sd.vae_params))
    (folder / "diffusion_pytorch_model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"diffusion_pytorch_model-00002-of-00002\.safetensors"):
        load_stable_diffusion(sd_copy)


def test_flax_only_folder_is_refused(sd_copy):
    (sd_copy / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    (sd_copy / "unet" / "diffusion_flax_model.msgpack").write_bytes(b"\x81\xa7conv_in\x80")
    with pytest.raises(FileNotFoundError,
                       match=r"(?s)no weight file.*diffusion_flax_model\.msgpack.*not read.*PyTorch weights"):
        load_stable_diffusion(sd_copy)


def test_missing_folder_and_files(sd_copy, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_stable_diffusion(tmp_path / "nowhere")
    os.remove(sd_copy / "vae" / "diffusion_pytorch_model.safetensors")
    with pytest.raises(FileNotFoundError, match=r"diffusion_pytorch_model\.safetensors") as err:
        load_stable_diffusion(sd_copy)
    assert "vae" in str(err.value) and "never downloads" in str(err.value)
    shutil.rmtree(sd_copy / "unet")
    with pytest.raises(FileNotFoundError, match="unet") as err:
        load_stable_diffusion(sd_copy)
    assert "CompVis/stable-diffusion-v1-4" in str(err.value)


@pytest.mark.parametrize("folder, sub, name", [
    ("safetensors", "unet", "diffusion_pytorch_model.safetensors"),
    ("safetensors", "text_encoder", "model.safetensors"),
    ("bin", "unet", "diffusion_pytorch_model.bin"),
    ("bin", "text_encoder", "pytorch_model.bin"),
])
@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupted_weight_file(tiny_sd_dirs, tmp_path, folder, sub, name, damage):
    dst = tmp_path / "sd"
    shutil.copytree(tiny_sd_dirs["path"] if folder == "safetensors" else SD_TINY_BIN_DIR, dst)
    file = dst / sub / name
    data = file.read_bytes()
    file.write_bytes(b"not a checkpoint" * 8 if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        load_stable_diffusion(dst)


@pytest.mark.parametrize("config_path, key, value", [
    ("scheduler/scheduler_config.json", "prediction_type", "sample"),  # epsilon and v_prediction only
    ("scheduler/scheduler_config.json", "beta_schedule", "squaredcos_cap_v2"),
    ("unet/config.json", "resnet_time_scale_shift", "scale_shift"),
    ("vae/config.json", "shift_factor", 0.1159),
])
def test_unsupported_config_is_rejected(sd_copy, config_path, key, value):
    file = sd_copy / config_path
    config = json.loads(file.read_text())
    config[key] = value
    file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=key) as err:
        load_stable_diffusion(sd_copy)
    assert os.path.basename(config_path) in str(err.value)


# --- remat -----------------------------------------------------------------------------------------------

def _guided_outputs(sd, remat):
    """eps, CFG correction, decoded image and the gradient of a decoded-Tweedie loss, all with
    the networks under ``remat``."""
    loss = _decoded_tweedie_loss(sd, remat)

    def outputs(den, correction, x):
        return (den(x, 600), correction(x, 600), decode_latents(sd, x, remat=remat),
                jax.grad(loss, argnums=1)(den, x))
    return outputs


def _all_eqns(jaxpr):
    """Every equation of a jaxpr, inside nested jaxprs (pjit, scan, cond, custom_vjp) as well."""
    for eqn in jaxpr.eqns:
        yield eqn
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    yield from _all_eqns(inner)


def test_remat_wraps_unet_correction_and_vae_with_the_policy(sd):
    """remat=True / a named policy puts the UNet, the CFG correction and the VAE decoder inside
    jax.checkpoint with that policy (read off the traced program; jax.checkpoint itself is
    value-preserving, checked numerically by the slow variant below)."""
    emb = np.zeros((77, 32), np.float32)
    x = jnp.asarray(_latent(4))
    for remat, policy in ((True, None), ("dots_saveable", jax.checkpoint_policies.dots_saveable)):
        args = (latent_denoiser(sd, emb, emb, 3.0, remat=remat),
                latent_cfg_correction(sd, emb, emb, 3.0, remat=remat), x)
        jaxpr = jax.make_jaxpr(_guided_outputs(sd, remat))(*args)
        found = [e.params["policy"] for e in _all_eqns(jaxpr.jaxpr) if e.primitive.name.startswith(("checkpoint", "remat"))]
        assert len(found) >= 3 and all(p is policy for p in found), (remat, found)  # UNet, correction, VAE
    plain = jax.make_jaxpr(_guided_outputs(sd, False))(latent_denoiser(sd, emb, emb, 3.0),
                                                      latent_cfg_correction(sd, emb, emb, 3.0), x)
    assert not [e for e in _all_eqns(plain.jaxpr) if e.primitive.name.startswith(("checkpoint", "remat"))]


@pytest.mark.skipif(not os.environ.get("ZMAGIC_SLOW_TESTS"), reason="slow: set ZMAGIC_SLOW_TESTS=1")
def test_remat_gives_the_same_values_and_gradients(tiny_sd_dirs, x64):
    # In float64: recomputing the forward pass inside the backward one is compiled (fused,
    # reassociated) differently, which moves float32 gradients by ~1e-5 relative.
    sd = load_stable_diffusion(tiny_sd_dirs["path"], dtype=jnp.float64)
    emb = encode_prompt(sd, ["lowest", ""])
    x = jnp.asarray(_latent(4), jnp.float64)

    def run(remat):
        args = (latent_denoiser(sd, emb[0], emb[1], 3.0, remat=remat),
                latent_cfg_correction(sd, emb[0], emb[1], 3.0, remat=remat), x)
        return _compile(_guided_outputs(sd, remat), *args)(*args)

    plain = run(False)
    assert plain[3].dtype == jnp.float64 and float(jnp.max(jnp.abs(plain[3]))) > 0
    for a, b in zip(run(True), plain):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("remat", ["bogus_policy", 1, None, "save_only_these_names"])
def test_bad_remat_is_rejected(sd, remat):
    emb = np.zeros((77, 32), np.float32)
    with pytest.raises(ValueError, match="latent_denoiser: remat"):
        latent_denoiser(sd, emb, emb, 1.0, remat=remat)
    with pytest.raises(ValueError, match="latent_cfg_correction: remat"):
        latent_cfg_correction(sd, emb, emb, 1.0, remat=remat)
    with pytest.raises(ValueError, match="decode_latents: remat"):
        decode_latents(sd, jnp.zeros((4, 8, 8)), remat=remat)
    with pytest.raises(ValueError, match="encode_image: remat"):
        encode_image(sd, np.zeros((16, 16, 3), np.float32), remat=remat)


# --- pixel-space folders and conditioning channels ---------------------------------------------------

PIXEL_UNET = dict(TINY_UNET, in_channels=2, out_channels=1, sample_size=8)


@pytest.fixture(scope="module")
def pixel_sd(tmp_path_factory, tiny_sd_dirs):
    """A folder without vae/ whose UNet takes one conditioning channel after the 1-channel sample
    (the embedded layout model's shape), text encoder and tokenizer of the tiny SD."""
    from experiments.tiny_models import SD_MERGES, SD_VOCAB, TINY_SCHEDULER, TINY_SD_TEXT, random_tree, save_sd_folder
    from zmagic_jax.models._sd_convert import unet_param_shapes
    from zmagic_jax.models._unet2d import unet_config_from_dict
    params = random_tree(unet_param_shapes(unet_config_from_dict(PIXEL_UNET, file="pixel")), 7)
    root = save_sd_folder(tmp_path_factory.mktemp("pixel") / "sd", unet=PIXEL_UNET, unet_params=params,
                          text=TINY_SD_TEXT, text_params=tiny_sd_dirs["text"]["text_model"], vocab=SD_VOCAB,
                          merges=SD_MERGES, scheduler=TINY_SCHEDULER)
    return load_stable_diffusion(root)


def test_a_folder_without_vae_is_a_pixel_space_model(pixel_sd):
    sd = pixel_sd
    assert sd.vae is None and sd.vae_params is None and sd.vae_scaling_factor == 1.0
    assert (sd.latent_channels, sd.extra_channels) == (1, 1)
    z = _latent(3, (1, 8, 8))
    image = decode_latents(sd, z)
    np.testing.assert_array_equal(np.asarray(image), np.transpose(z, (1, 2, 0)))
    np.testing.assert_array_equal(np.asarray(encode_image(sd, image)), z)
    with pytest.raises(ValueError, match=r"encode_image: image must be one \(H, W, 1\)"):
        encode_image(sd, np.zeros((8, 8, 3), np.float32))


def test_conditioning_channels_follow_the_latent_in_each_branch(pixel_sd):
    sd = pixel_sd
    cond, uncond = (np.random.default_rng(s).standard_normal((77, 32)).astype(np.float32) for s in (1, 2))
    x = _latent(4, (1, 8, 8))
    layouts = np.random.default_rng(6).uniform(0, 1, (2, 1, 8, 8)).astype(np.float32)  # [uncond, cond]

    def unet(extra, context):  # the UNet by hand on the channel-concatenated input
        inp = np.concatenate([x, extra], 0).transpose(1, 2, 0)[None]
        return np.asarray(sd.unet.apply({"params": sd.unet_params}, inp, jnp.full((1,), T), context[None]))[0]

    e_u, e_c = unet(layouts[0], uncond), unet(layouts[1], cond)
    for extra, want in ((layouts, e_u + W * (e_c - e_u)),                                  # a layout per branch
                        (layouts[1], unet(layouts[1], uncond) + W * (e_c - unet(layouts[1], uncond)))):  # shared
        den = latent_denoiser(sd, cond, uncond, jnp.float32(W), extra=extra)
        got = np.asarray(den(jnp.asarray(x), jnp.int32(T)))
        assert _rel_err(got, want.transpose(2, 0, 1)) < 1e-5
    correction = latent_cfg_correction(sd, cond, uncond, jnp.float32(W), extra=layouts)
    assert _rel_err(correction(jnp.asarray(x), jnp.int32(T)), (W * (e_c - e_u)).transpose(2, 0, 1)) < 1e-5


def test_conditioning_channel_errors_name_the_fix(pixel_sd, sd):
    emb = jnp.zeros((77, 32), jnp.float32)
    with pytest.raises(ValueError, match=r"takes 1 conditioning channel.*pass extra="):
        latent_denoiser(pixel_sd, emb, emb, jnp.float32(1.0))
    with pytest.raises(ValueError, match=r"extra must be a float array \(1, h, w\) or \(2, 1, h, w\)"):
        latent_denoiser(pixel_sd, emb, emb, jnp.float32(1.0), extra=np.zeros((3, 8, 8), np.float32))
    with pytest.raises(ValueError, match=r"this UNet takes none.*leave extra=None"):
        latent_denoiser(sd, emb, emb, jnp.float32(1.0), extra=np.zeros((1, 8, 8), np.float32))
    den = latent_denoiser(pixel_sd, emb, emb, jnp.float32(1.0), extra=np.zeros((1, 4, 4), np.float32))
    with pytest.raises(ValueError, match=r"conditioning channels \(1, 4, 4\) must have the latent's size \(8, 8\)"):
        den(jnp.zeros((1, 8, 8)), jnp.int32(3))


def test_a_tokenizer_larger_than_the_embedding_table_is_refused(sd_copy):
    vocab_path = sd_copy / "tokenizer" / "vocab.json"
    vocab = json.loads(vocab_path.read_text())
    vocab["extra</w>"] = len(vocab)  # one id past the text encoder's table (an embedding lookup would give NaN)
    vocab_path.write_text(json.dumps(vocab))
    with pytest.raises(ValueError, match=r"gives ids up to 22 but the text encoder's vocab_size is 22.*same model"):
        load_stable_diffusion(sd_copy)
