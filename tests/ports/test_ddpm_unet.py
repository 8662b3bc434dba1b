"""The Flax DDPM UNet against a PyTorch reference with the published key names, and its loader.

The weights are numpy draws in the reference's layout (``tests/parity.py``); the PyTorch values are
computed live where PyTorch is installed and read from ``tests/references/ports_ddpm_unet.safetensors``
elsewhere (``tests/references.py``); the checkpoints are files ``torch.save`` wrote
(``experiments/make_parity_fixtures.py``)."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from experiments.make_parity_fixtures import PORT_FILE_CONFIGS, PORT_FILE_SEED
from tests.parity import CHECKPOINTS, file_state_dict, reference_state_dict, sketch
from tests.references import torch_reference
from zmagic_jax.models._ddpm_unet import (
    DDPM_CELEBA_HQ,
    DDPMUNet,
    DDPMUNetConfig,
    _Downsample,
    _Upsample,
    ddpm_denoiser,
    timestep_embedding,
)
from zmagic_jax.ports._checkpoint import CheckpointMismatchError, save_params
from zmagic_jax.ports._ddpm_unet import convert_ddpm_unet, load_ddpm_unet

GROUP = "ports_ddpm_unet"
TINY = DDPMUNetConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), resolution=16)
# Two downsamplings, attention at two levels, two blocks per level (three per up level).
SMALL = DDPMUNetConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(16, 8), resolution=32)
# The config of the committed checkpoints: one level, one block, no attention.
FILE = PORT_FILE_CONFIGS["ddpm_unet"]


def _torch_model(config, state_dict=None):
    """The PyTorch reference at ``config``, with ``state_dict`` loaded when given."""
    from ports.random_weights import load_weights_
    from ports.torch_ddpm_unet import Model
    model = Model(config)
    return model if state_dict is None else load_weights_(model, state_dict)


def _assert_same_params(a, b):
    fa, fb = traverse_util.flatten_dict(a, sep="/"), traverse_util.flatten_dict(b, sep="/")
    assert sorted(fa) == sorted(fb)
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


def _inputs(config, t):
    x = np.random.default_rng(0).standard_normal((len(t), config.resolution, config.resolution, 3))
    return x.astype(np.float32), np.asarray(t)


def _torch_eps(config, state_dict, x_nhwc, t):
    import torch
    with torch.no_grad():
        out = _torch_model(config, state_dict)(torch.from_numpy(np.asarray(x_nhwc).transpose(0, 3, 1, 2)),
                                               torch.as_tensor(t))
    return out.numpy().transpose(0, 2, 3, 1)


def _rel_err(a, b):
    return float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="module")
def tiny():
    return reference_state_dict(GROUP, "tiny", lambda: _torch_model(TINY), seed=0)


@pytest.fixture(scope="module")
def tiny_apply():
    """One compiled forward pass of the tiny UNet, shared by the tests that run it."""
    return jax.jit(DDPMUNet(TINY).apply)


def test_parity_with_pytorch_tiny(tiny, tiny_apply):
    x, t = _inputs(TINY, [0, 990])
    out = tiny_apply({"params": convert_ddpm_unet(tiny, TINY)}, x, t)
    assert out.shape == x.shape
    assert _rel_err(out, torch_reference(GROUP, "tiny/0,990", lambda: _torch_eps(TINY, tiny, x, t))) < 1e-4


def test_parity_with_pytorch_two_attention_levels():
    state_dict = reference_state_dict(GROUP, "small", lambda: _torch_model(SMALL), seed=1)
    x, t = _inputs(SMALL, [990, 0])
    params = convert_ddpm_unet(state_dict, SMALL)
    out = jax.jit(DDPMUNet(SMALL).apply)({"params": params}, x, t)
    assert out.shape == x.shape
    ref = torch_reference(GROUP, "small", lambda: sketch(_torch_eps(SMALL, state_dict, x, t)))
    assert _rel_err(sketch(out), ref) < 1e-4


def test_resampling_without_conv_matches_pytorch():
    x = np.random.default_rng(1).standard_normal((1, 8, 8, 4)).astype(np.float32)

    def torch_values():
        import torch
        x_torch = torch.from_numpy(x.transpose(0, 3, 1, 2))
        return dict(down=torch.nn.functional.avg_pool2d(x_torch, 2, 2).numpy().transpose(0, 2, 3, 1),
                    up=torch.nn.functional.interpolate(x_torch, scale_factor=2.0, mode="nearest")
                    .numpy().transpose(0, 2, 3, 1))

    ref = torch_reference(GROUP, "resampling", torch_values)
    np.testing.assert_allclose(_Downsample(with_conv=False).apply({}, x), ref["down"], rtol=1e-6)
    np.testing.assert_array_equal(_Upsample(with_conv=False).apply({}, x), ref["up"])


def test_timestep_embedding_matches_ddpm_formula():
    t = np.array([0.0, 1.0, 990.0])
    half = 16
    freqs = np.exp(-np.log(10000.0) * np.arange(half) / (half - 1))
    expected = np.concatenate([np.sin(t[:, None] * freqs), np.cos(t[:, None] * freqs)], axis=1)
    np.testing.assert_allclose(timestep_embedding(jnp.asarray(t), 2 * half), expected, atol=2e-4)


def test_denoiser_matches_batched_call(tiny, tiny_apply):
    denoiser = ddpm_denoiser(DDPMUNet(TINY), convert_ddpm_unet(tiny, TINY))
    x, t = _inputs(TINY, [990, 0])
    batched = np.asarray(tiny_apply({"params": denoiser.params}, x, t))
    # One sample and a scalar t per call, the denoiser contract: the scalar is broadcast to the batch of one;
    # the params are an argument of the compiled function.
    per_sample = jax.jit(jax.vmap(denoiser.apply, in_axes=(None, 0, 0)))(denoiser.params, x, t)
    assert per_sample.shape == x.shape
    assert _rel_err(per_sample, batched) < 1e-5
    assert _rel_err(per_sample, torch_reference(GROUP, "tiny/990,0", lambda: _torch_eps(TINY, tiny, x, t))) < 1e-4


def test_checkpoint_variants_load_the_same_params():
    """SDEdit's plain state dict and ermongroup/ddim's training list (its model entry, saved from
    ``DataParallel``: ``module.``-prefixed keys), with and without its EMA entry."""
    expected = convert_ddpm_unet(file_state_dict(GROUP, "ddpm_unet"), FILE)
    for name, ema in (("ddpm_unet.ckpt", True), ("ddpm_unet_training.pth", False),
                      ("ddpm_unet_training_no_ema.pth", True)):
        module, params = load_ddpm_unet(CHECKPOINTS / name, FILE, ema=ema)
        assert module.config == FILE
        _assert_same_params(params, expected)


def test_training_list_picks_ema_or_model_weights():
    path = CHECKPOINTS / "ddpm_unet_training.pth"
    ema = convert_ddpm_unet(file_state_dict(GROUP, "ddpm_unet", seed=PORT_FILE_SEED + 1), FILE)
    _assert_same_params(load_ddpm_unet(path, FILE)[1], ema)
    # Trained without EMA, the list stops at the step count: the model weights are the only ones.
    _assert_same_params(load_ddpm_unet(CHECKPOINTS / "ddpm_unet_training_no_ema.pth", FILE)[1],
                        load_ddpm_unet(path, FILE, ema=False)[1])


def test_list_without_state_dict_is_an_error():
    with pytest.raises(ValueError, match=r"ddpm_unet_list_without_weights\.pth.*found a list of 3 items"):
        load_ddpm_unet(CHECKPOINTS / "ddpm_unet_list_without_weights.pth", FILE)


def test_wrong_depth_names_missing_and_leftover_keys():
    deeper = dataclasses.replace(FILE, num_res_blocks=2, attn_resolutions=(FILE.resolution,))
    with pytest.raises(CheckpointMismatchError, match=r"ddpm_unet\.ckpt") as info:
        load_ddpm_unet(CHECKPOINTS / "ddpm_unet.ckpt", deeper)
    message = str(info.value)
    # Missing: the file has one block and no attention per down level, the config two of each.
    assert "down.0.block.1.conv1.weight" in message
    assert "down.0.attn.1.q.weight" in message
    with pytest.raises(CheckpointMismatchError,
                       match=r"not used by the architecture.*down\.0\.block\.1\.norm1"):
        convert_ddpm_unet(reference_state_dict(GROUP, "deeper", lambda: _torch_model(deeper), seed=0), FILE)


def test_wrong_width_is_an_error_naming_shapes():
    wider = dataclasses.replace(FILE, ch=2 * FILE.ch)
    with pytest.raises(CheckpointMismatchError,
                       match=r"ddpm_unet\.ckpt.*conv_in/kernel: shape \(3, 3, 3, 4\), expected \(3, 3, 3, 8\)"):
        load_ddpm_unet(CHECKPOINTS / "ddpm_unet.ckpt", wider)


def test_missing_file_names_file_architecture_and_source(tmp_path):
    for name in ("celeba_hq.ckpt", "celeba_hq.safetensors"):
        with pytest.raises(FileNotFoundError, match=r"celeba_hq.*SDEdit.*gwang-kim/DiffusionCLIP-CelebA_HQ"):
            load_ddpm_unet(tmp_path / name)


def test_safetensors_round_trip(tiny, tmp_path):
    params = convert_ddpm_unet(tiny, TINY)
    save_params(tmp_path / "unet.safetensors", params)
    _assert_same_params(load_ddpm_unet(tmp_path / "unet.safetensors", TINY)[1], params)
    with pytest.raises(CheckpointMismatchError,
                       match=r"unet\.safetensors.*missing down_1_downsample/conv/kernel"):
        load_ddpm_unet(tmp_path / "unet.safetensors", SMALL)


def test_default_config_is_the_celeba_hq_model():
    assert DDPM_CELEBA_HQ == DDPMUNetConfig(ch=128, out_ch=3, ch_mult=(1, 1, 2, 2, 4, 4), num_res_blocks=2,
                                            attn_resolutions=(16,), in_channels=3, resolution=256)
    shapes = jax.eval_shape(DDPMUNet(DDPM_CELEBA_HQ).init, jax.random.key(0),
                            jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32), jnp.zeros((1,)))
    # As ermongroup/ddim's Model at this config (SDEdit's celeba_hq.ckpt): 450 tensors, 113,673,219 numbers.
    leaves = jax.tree_util.tree_leaves(shapes["params"])
    assert len(leaves) == 450
    assert sum(int(np.prod(leaf.shape)) for leaf in leaves) == 113_673_219


@pytest.mark.parametrize("kwargs, match", [
    ({"ch": 30}, "norm_groups=32 must divide"),
    ({"resolution": 250}, "divisible by"),
    ({"ch": 3}, "ch must be even"),
])
def test_rejected_configs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        DDPMUNetConfig(**kwargs)


def test_rejected_inputs(tiny):
    variables = {"params": convert_ddpm_unet(tiny, TINY)}
    with pytest.raises(ValueError, match=r"expected x of shape \(B, 16, 16, 3\)"):
        jax.eval_shape(DDPMUNet(TINY).apply, variables, jnp.zeros((1, 3, 16, 16)), 0)
    with pytest.raises(ValueError, match="t must be a scalar or have shape"):
        jax.eval_shape(DDPMUNet(TINY).apply, variables, jnp.zeros((2, 16, 16, 3)), jnp.zeros((3,)))
