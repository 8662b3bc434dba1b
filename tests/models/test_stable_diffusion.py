"""Stable Diffusion loader: Flax networks vs the PyTorch ones on a tiny random SD."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

import zmagic_jax as zm  # noqa: E402
from zmagic_jax.models import (  # noqa: E402
    decode_latents,
    encode_prompt,
    latent_cfg_correction,
    latent_denoiser,
    load_stable_diffusion,
)

PROMPTS = ["lower newer", "lowest wider lower"]


def _rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="module")
def tiny_sd(tiny_sd_dirs):
    return tiny_sd_dirs


@pytest.fixture(scope="module")
def sd(tiny_sd):
    return load_stable_diffusion(tiny_sd["pt"])


def _latent(seed=1, shape=(4, 8, 8)):
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


# Eager op-by-op UNet execution and XLA's optimising CPU compile each cost tens of seconds
# here; a compile without the expensive LLVM passes keeps the suite fast (results still float32).
_FAST_COMPILE = {"xla_backend_optimization_level": 0, "xla_llvm_disable_expensive_passes": True}


def _compile(fn, *args):
    return jax.jit(fn).lower(*args).compile(compiler_options=_FAST_COMPILE)


def _denoise(den, x, t):
    return den(x, t)


@pytest.fixture(scope="module")
def guided_eps(sd):
    """``latent_denoiser`` compiled once for all tests: weights, embeddings and scale are its params."""
    emb = jnp.zeros((77, 32), jnp.float32)
    compiled = _compile(_denoise, latent_denoiser(sd, emb, emb, jnp.float32(1.0)), jnp.zeros((4, 8, 8), jnp.float32),
                        jnp.int32(0))
    return lambda x, t, cond, uncond, w: compiled(latent_denoiser(sd, cond, uncond, jnp.float32(w)), jnp.asarray(x),
                                                  jnp.int32(t))


def _torch_unet(tiny_sd, x, t, emb):
    with torch.no_grad():
        return tiny_sd["unet"](torch.from_numpy(x)[None], torch.tensor([t]),
                               torch.from_numpy(np.array(emb))[None]).sample.numpy()[0]


def test_components_match_pytorch(sd, tiny_sd, guided_eps):
    tokenizer = tiny_sd["tokenizer"]
    ids = tokenizer(PROMPTS, padding="max_length", max_length=77, truncation=True,
                    return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref_text = tiny_sd["text"](ids).last_hidden_state.numpy()
    text = encode_prompt(sd, PROMPTS)
    assert text.shape == (2, 77, 32)
    assert _rel_err(text, ref_text) < 1e-4

    # Guidance scale 1 is the conditional UNet alone (eps_u + (eps_c - eps_u) = eps_c).
    x, t = _latent(), 537
    eps = guided_eps(x, t, text[0], text[1], 1.0)
    assert _rel_err(eps, _torch_unet(tiny_sd, x, t, ref_text[0])) < 1e-4

    assert sd.vae_scaling_factor == pytest.approx(tiny_sd["vae"].config.scaling_factor)
    with torch.no_grad():
        ref_img = tiny_sd["vae"].decode(
            torch.from_numpy(x)[None] / sd.vae_scaling_factor).sample.numpy()
    img = _compile(lambda z: decode_latents(sd, z), x)(x)
    assert img.shape == (16, 16, 3)  # the tiny VAE upsamples 2x (SD's 4-level VAE: 8x)
    assert _rel_err(img, ref_img[0].transpose(1, 2, 0)) < 1e-4


@pytest.mark.parametrize("fmt", ["flax", "pt_bin"])
def test_other_formats_load_same_parameters(sd, tiny_sd, fmt):
    other = load_stable_diffusion(tiny_sd[fmt])
    for name in ("unet_params", "vae_params", "text_params"):
        a, b = getattr(sd, name), getattr(other, name)
        assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(b)
        for u, v in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
            np.testing.assert_array_equal(np.asarray(u), np.asarray(v))
    np.testing.assert_array_equal(other.schedule.alphas_cumprod, sd.schedule.alphas_cumprod)


def test_latent_denoiser_is_cfg_of_two_pytorch_calls(sd, tiny_sd, guided_eps):
    emb = np.asarray(encode_prompt(sd, ["lower newer", ""]))
    # Float32 UNet differences (~1e-5) are amplified by 2w + 1 in the guided output, so a
    # moderate w keeps the 1e-4 bound meaningful.
    x, t, w = _latent(2), 250, 2.0
    eps = guided_eps(x, t, emb[0], emb[1], w)
    eps_c, eps_u = _torch_unet(tiny_sd, x, t, emb[0]), _torch_unet(tiny_sd, x, t, emb[1])
    assert eps.shape == x.shape
    assert _rel_err(eps, eps_u + w * (eps_c - eps_u)) < 1e-4
    correction = latent_cfg_correction(sd, emb[0], emb[1], w)
    correction = _compile(_denoise, correction, x, jnp.int32(t))(correction, x, jnp.int32(t))
    assert _rel_err(correction, w * (eps_c - eps_u)) < 1e-3  # a difference: relative error grows


def _decoded_tweedie_loss(sd, remat=False):
    """``|D(x0|t(x))|^2`` at t = 600: the path of latent guidance methods (Tweedie, then the decoder)."""
    def loss(den, x):
        ab = zm.alpha_bar(sd.schedule, 600, x.dtype)
        x0 = (x - jnp.sqrt(1 - ab) * den(x, 600)) / jnp.sqrt(ab)
        return jnp.sum(decode_latents(sd, x0, remat=remat) ** 2)
    return loss


def test_gradient_through_eps_and_decoder_is_finite(sd):
    emb = encode_prompt(sd, ["lowest", ""])
    den = latent_denoiser(sd, emb[0], emb[1], 3.0)
    x = jnp.asarray(_latent(3))
    g = _compile(jax.grad(_decoded_tweedie_loss(sd), argnums=1), den, x)(den, x)
    assert g.shape == (4, 8, 8)
    assert np.all(np.isfinite(g)) and float(jnp.max(jnp.abs(g))) > 0


def test_schedule_matches_diffusers(sd, tiny_sd):
    ref = tiny_sd["scheduler"].alphas_cumprod.numpy()
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


@pytest.fixture
def sd_copy(tiny_sd, tmp_path):
    dst = tmp_path / "sd"
    shutil.copytree(tiny_sd["pt"], dst)
    return dst


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


@pytest.mark.parametrize("sub,name", [("unet", "diffusion_pytorch_model.safetensors"),
                                      ("text_encoder", "model.safetensors")])
@pytest.mark.parametrize("damage", ["garbage", "truncated"])
def test_corrupted_weight_file(sd_copy, sub, name, damage):
    file = sd_copy / sub / name
    data = file.read_bytes()
    file.write_bytes(b"not a checkpoint" * 8 if damage == "garbage" else data[: len(data) // 2])
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        load_stable_diffusion(sd_copy)


def test_corrupted_flax_weight_file(tiny_sd, tmp_path):
    dst = tmp_path / "sd"
    shutil.copytree(tiny_sd["flax"], dst)
    (dst / "vae" / "diffusion_flax_model.msgpack").write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match=r"vae.diffusion_flax_model\.msgpack"):
        load_stable_diffusion(dst)


@pytest.mark.parametrize("config_path,key,value", [
    ("scheduler/scheduler_config.json", "prediction_type", "v_prediction"),  # only epsilon is supported
    ("unet/config.json", "resnet_time_scale_shift", "scale_shift"),         # the Flax UNet ignores it
])
def test_unsupported_config_is_rejected(sd_copy, config_path, key, value):
    file = sd_copy / config_path
    config = json.loads(file.read_text())
    config[key] = value
    file.write_text(json.dumps(config))
    with pytest.raises(ValueError, match=value if key == "prediction_type" else key):
        load_stable_diffusion(sd_copy)


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
def test_remat_gives_the_same_values_and_gradients(tiny_sd, x64):
    # In float64: recomputing the forward pass inside the backward one is compiled (fused,
    # reassociated) differently, which moves float32 gradients by ~1e-5 relative.
    sd = load_stable_diffusion(tiny_sd["pt"], dtype=jnp.float64)
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
