"""The Flax SD VAE against diffusers' PyTorch AutoencoderKL on tiny random configs: encoder moments,
decoder output and its gradient; converter (current and deprecated attention names) and config reader.

The weights are numpy random (``experiments.tiny_models.random_tree``), so both ends of the
supported range have them without storing them; diffusers' model loads them (``strict=True``)
and what it computes (moments, decoded images, the decoder's gradient, its saved config, its
state-dict keys) is a reference of group ``autoencoder_kl`` (``tests/references.py``): live with
PyTorch, committed without."""
import functools
import json
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from experiments.tiny_models import random_tree
from tests.references import array_text, text_array, torch_reference
from zmagic_jax.models._autoencoder_kl import AutoencoderKL, AutoencoderKLConfig, vae_config_from_dict
from zmagic_jax.models._sd_convert import vae_param_shapes, vae_params_from_torch, vae_torch_state_dict
from zmagic_jax.ports._checkpoint import CheckpointMismatchError

GROUP = "autoencoder_kl"
# SD-like: two levels, mid-block attention, quant convs.
VAE = dict(block_out_channels=[32, 64], down_block_types=["DownEncoderBlock2D"] * 2,
           up_block_types=["UpDecoderBlock2D"] * 2, layers_per_block=1, latent_channels=4, norm_num_groups=16,
           sample_size=16)
# The other options: no attention, no quant convs, deeper blocks, other channel counts.
BARE = dict(block_out_channels=[16, 32], down_block_types=["DownEncoderBlock2D"] * 2,
            up_block_types=["UpDecoderBlock2D"] * 2, layers_per_block=2, latent_channels=3, norm_num_groups=8,
            in_channels=3, out_channels=1, mid_block_add_attention=False, use_quant_conv=False,
            use_post_quant_conv=False)
CASES = {"vae": (VAE, 0), "bare": (BARE, 1)}  # name -> (diffusers options, seed of weights and inputs)


def _rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _nchw(x):
    import torch
    return torch.from_numpy(np.ascontiguousarray(np.asarray(x).transpose(0, 3, 1, 2)))


def _nhwc(t):
    return t.detach().numpy().transpose(0, 2, 3, 1)


def _weights(name: str):
    """``(config, params, image, latent)`` of a case: numpy random weights and inputs."""
    options, seed = CASES[name]
    config = vae_config_from_dict(options, file="vae/config.json")
    rng = np.random.default_rng(seed)
    image = rng.uniform(-1, 1, (2, 16, 16, config.in_channels)).astype(np.float32)
    latent = rng.standard_normal((2, 8, 8, config.latent_channels)).astype(np.float32)
    return config, random_tree(vae_param_shapes(config), seed), image, latent


@functools.lru_cache(maxsize=None)
def _torch_vae(name: str):
    """diffusers' AutoencoderKL of case ``name`` with the case's weights (every key, every shape)."""
    import diffusers
    import torch
    config, params, _, _ = _weights(name)
    model = diffusers.AutoencoderKL(**CASES[name][0]).eval()
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v))
                           for k, v in vae_torch_state_dict(params, config).items()}, strict=True)
    return model


def _torch_outputs(name: str) -> dict:
    """What diffusers computes for case ``name``: posterior moments of the image, the decoded
    latent (NHWC), the config.json it saves (without the version), its state-dict keys with shapes."""
    import torch
    model = _torch_vae(name)
    _, _, image, latent = _weights(name)
    with torch.no_grad():
        posterior = model.encode(_nchw(image)).latent_dist
        decoded = _nhwc(model.decode(_nchw(latent)).sample)
    saved = {k: v for k, v in json.loads(model.to_json_string()).items() if k != "_diffusers_version"}
    keys = "\n".join(sorted(f"{k} {tuple(v.shape)}" for k, v in model.state_dict().items()))
    return {"mean": _nhwc(posterior.mean), "logvar": _nhwc(posterior.logvar), "decoded": decoded,
            "config_json": text_array(json.dumps(saved, sort_keys=True)), "state_dict_keys": text_array(keys)}


class Case(NamedTuple):
    config: AutoencoderKLConfig
    params: dict
    image: np.ndarray
    latent: np.ndarray
    torch: dict  # _torch_outputs
    encode: object  # jitted (params, image) -> (mean, logvar)
    decode: object  # jitted (params, latent) -> image


def _case(name: str) -> Case:
    config, params, image, latent = _weights(name)
    module = AutoencoderKL(config)
    encode = jax.jit(lambda p, x: module.apply({"params": p}, x, method="encode"))
    decode = jax.jit(lambda p, z: module.apply({"params": p}, z, method="decode"))
    return Case(config, params, image, latent, torch_reference(GROUP, name, lambda: _torch_outputs(name)), encode,
                decode)


@pytest.fixture(scope="module")
def vae():
    return _case("vae")


@pytest.fixture(scope="module")
def bare():
    return _case("bare")


@pytest.mark.parametrize("name", ["vae", "bare"])
def test_parity_with_diffusers(name, request):
    case = request.getfixturevalue(name)
    mean, logvar = case.encode(case.params, case.image)
    decoded = case.decode(case.params, case.latent)
    assert mean.shape == logvar.shape == case.latent.shape
    assert decoded.shape == case.torch["decoded"].shape == case.image.shape[:3] + (case.config.out_channels,)
    assert _rel_err(mean, case.torch["mean"]) < 1e-4
    assert _rel_err(logvar, case.torch["logvar"]) < 1e-4
    assert _rel_err(decoded, case.torch["decoded"]) < 1e-4


@pytest.fixture(scope="module")
def decode_grad(vae):
    """Jitted gradient of ``sum(w * decode(z))`` w.r.t. ``z``, for a ``remat`` flag (compiled once each)."""
    weights = np.random.default_rng(7).standard_normal(vae.image.shape).astype(np.float32)

    @functools.lru_cache(maxsize=None)
    def build(remat: bool):
        module = AutoencoderKL(vae.config, remat=remat)
        loss = lambda p, z: jnp.sum(weights * module.apply({"params": p}, z, method="decode"))  # noqa: E731
        return jax.jit(jax.grad(loss, argnums=1))

    return weights, build


def test_decoder_gradient_matches_pytorch(vae, decode_grad):
    weights, build = decode_grad

    def torch_gradient():
        import torch
        z = _nchw(vae.latent).requires_grad_(True)
        (torch.from_numpy(weights.transpose(0, 3, 1, 2)) * _torch_vae("vae").decode(z).sample).sum().backward()
        return _nhwc(z.grad)

    reference = torch_reference(GROUP, "vae/decoder_gradient", torch_gradient)
    assert _rel_err(build(False)(vae.params, vae.latent), reference) < 1e-4


def test_remat_gives_the_same_gradient(vae, decode_grad):
    _, build = decode_grad
    assert _rel_err(build(True)(vae.params, vae.latent), build(False)(vae.params, vae.latent)) < 1e-5


def test_logvar_is_clamped(vae):
    params = jax.tree.map(np.array, vae.params)
    params["quant_conv"]["bias"][4:] += 1e3  # the log-variance half of the moments
    _, logvar = vae.encode(params, vae.image)
    np.testing.assert_array_equal(np.asarray(logvar), 20.0)
    params["quant_conv"]["bias"][4:] -= 2e3
    np.testing.assert_array_equal(np.asarray(vae.encode(params, vae.image)[1]), -30.0)


def test_bfloat16_compute_keeps_float32_params(vae):
    module = AutoencoderKL(vae.config, dtype=jnp.bfloat16)
    shapes = jax.eval_shape(module.init, jax.random.key(0), vae.image)["params"]
    assert {leaf.dtype for leaf in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}
    decoded = jax.jit(lambda p, z: module.apply({"params": p}, z, method="decode"))(vae.params, vae.latent)
    assert decoded.dtype == jnp.float32
    assert _rel_err(decoded, vae.decode(vae.params, vae.latent)) < 5e-2


def test_config_reader(vae, bare):
    assert vae.config == AutoencoderKLConfig(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                                             up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1,
                                             latent_channels=4, norm_num_groups=16)
    assert vae.config.scaling_factor == 0.18215 and vae.config.downsample_factor == 2
    assert not (bare.config.use_quant_conv or bare.config.use_post_quant_conv or bare.config.mid_block_add_attention)
    harmless = {"_class_name": "AutoencoderKL", "_diffusers_version": "0.35.2", "force_upcast": True,
                "sample_size": 512, "shift_factor": None, "latents_mean": None, "latents_std": None}
    assert vae_config_from_dict({**VAE, **harmless}, file="f") == vae.config
    # The complete config.json diffusers saves for these models (every default written out).
    for case in (vae, bare):
        saved = json.loads(array_text(case.torch["config_json"]))
        assert saved["_class_name"] == "AutoencoderKL" and len(saved) > 15
        assert vae_config_from_dict(saved, file="vae/config.json") == case.config


@pytest.mark.parametrize("key, value, shown", [
    ("shift_factor", 0.1159, "0.1159"), ("latents_mean", [0.1] * 4, "[0.1, 0.1, 0.1, 0.1]"),
    ("latents_std", [1.0] * 4, "[1.0, 1.0, 1.0, 1.0]"), ("act_fn", "relu", "'relu'"),
    ("down_block_types", ["AttnDownEncoderBlock2D", "DownEncoderBlock2D"], "'AttnDownEncoderBlock2D'"),
    ("up_block_types", ["UpDecoderBlock2D", "AttnUpDecoderBlock2D"], "'AttnUpDecoderBlock2D'"),
    ("layers_per_block", [1, 2], "[1, 2]"), ("norm_num_groups", 24, "24"),
])
def test_unsupported_options_are_rejected(key, value, shown):
    with pytest.raises(ValueError, match="vae/config.json") as info:
        vae_config_from_dict({**VAE, key: value}, file="vae/config.json")
    assert key in str(info.value) and shown in str(info.value)


def test_converter_round_trip(vae, bare):
    for case in (vae, bare):
        state_dict = vae_torch_state_dict(case.params, case.config)
        # diffusers' own keys and shapes (its load_state_dict(strict=True) took exactly these)
        keys = "\n".join(sorted(f"{k} {v.shape}" for k, v in state_dict.items()))
        assert keys == array_text(case.torch["state_dict_keys"])
        again = traverse_util.flatten_dict(vae_params_from_torch(state_dict, case.config))
        flat = traverse_util.flatten_dict(case.params)
        assert set(again) == set(flat)
        for path, value in flat.items():
            np.testing.assert_array_equal(again[path], value)


def test_deprecated_attention_names_load(vae):
    """Old checkpoints name the mid-block attention ``query``/``key``/``value``/``proj_attn``,
    some with 1x1-convolution weights (out, in, 1, 1)."""
    new_to_old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    old = {}
    for key, value in vae_torch_state_dict(vae.params, vae.config).items():
        for new, previous in new_to_old.items():
            if f"attentions.0.{new}." in key:
                key = key.replace(f"attentions.0.{new}.", f"attentions.0.{previous}.")
                value = value[:, :, None, None] if key.endswith("weight") and key.startswith("decoder") else value
        old[key] = value
    assert "encoder.mid_block.attentions.0.proj_attn.bias" in old
    assert old["decoder.mid_block.attentions.0.query.weight"].ndim == 4
    converted = traverse_util.flatten_dict(vae_params_from_torch(old, vae.config))
    for path, value in traverse_util.flatten_dict(vae.params).items():
        np.testing.assert_array_equal(converted[path], value)


def test_mismatched_checkpoints_name_the_keys(vae):
    state_dict = vae_torch_state_dict(vae.params, vae.config)
    key = "decoder.up_blocks.1.resnets.0.conv1.weight"
    with pytest.raises(CheckpointMismatchError, match=r"(?s)vae\.safetensors.*not used.*extra\.bias"):
        vae_params_from_torch({**state_dict, "extra.bias": np.zeros(2)}, vae.config, path="vae.safetensors")
    with pytest.raises(CheckpointMismatchError, match=rf"(?s)missing from the checkpoint.*{key}"):
        vae_params_from_torch({k: v for k, v in state_dict.items() if k != key}, vae.config)
    with pytest.raises(CheckpointMismatchError, match=rf"(?s)wrong shapes.*{key}: shape \(3, 3, 64, 16\)"):
        vae_params_from_torch({**state_dict, key: np.zeros((16, 64, 3, 3), np.float32)}, vae.config)
    no_attention = vae_config_from_dict({**VAE, "mid_block_add_attention": False}, file="f")
    with pytest.raises(CheckpointMismatchError, match=r"not used.*encoder\.mid_block\.attentions\.0\.group_norm"):
        vae_params_from_torch(state_dict, no_attention)


def test_rejected_inputs(vae):
    module = AutoencoderKL(vae.config)
    variables = {"params": vae.params}
    with pytest.raises(ValueError, match=r"x must be \(B, H, W, 3\)"):
        jax.eval_shape(lambda x: module.apply(variables, x, method="encode"), vae.image.transpose(0, 3, 1, 2))
    with pytest.raises(ValueError, match="divisible by 2"):
        jax.eval_shape(lambda x: module.apply(variables, x, method="encode"), vae.image[:, :15])
    with pytest.raises(ValueError, match=r"z must be \(B, h, w, 4\)"):
        jax.eval_shape(lambda z: module.apply(variables, z, method="decode"), vae.latent[..., :3])
