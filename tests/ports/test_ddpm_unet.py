"""The Flax DDPM UNet against a PyTorch reference with the published key names, and its loader."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from flax import traverse_util  # noqa: E402

from ports.torch_ddpm_unet import Model, randomize_  # noqa: E402
from zmagic_jax.models._ddpm_unet import (  # noqa: E402
    DDPM_CELEBA_HQ,
    DDPMUNet,
    DDPMUNetConfig,
    _Downsample,
    _Upsample,
    ddpm_denoiser,
    timestep_embedding,
)
from zmagic_jax.ports._checkpoint import CheckpointMismatchError, save_params  # noqa: E402
from zmagic_jax.ports._ddpm_unet import convert_ddpm_unet, load_ddpm_unet  # noqa: E402

TINY = DDPMUNetConfig(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), resolution=16)
# Two downsamplings, attention at two levels, two blocks per level (three per up level).
SMALL = DDPMUNetConfig(ch=32, ch_mult=(1, 2, 2), num_res_blocks=2, attn_resolutions=(16, 8), resolution=32)


def _numpy_state_dict(model):
    return {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}


def _assert_same_params(a, b):
    fa, fb = traverse_util.flatten_dict(a, sep="/"), traverse_util.flatten_dict(b, sep="/")
    assert sorted(fa) == sorted(fb)
    for k in fa:
        np.testing.assert_array_equal(np.asarray(fa[k]), np.asarray(fb[k]), err_msg=k)


def _inputs(config, t):
    x = np.random.default_rng(0).standard_normal((len(t), config.resolution, config.resolution, 3))
    return x.astype(np.float32), np.asarray(t)


def _torch_eps(model, x_nhwc, t):
    with torch.no_grad():
        out = model(torch.from_numpy(np.asarray(x_nhwc).transpose(0, 3, 1, 2)), torch.as_tensor(t))
    return out.numpy().transpose(0, 2, 3, 1)


def _rel_err(a, b):
    return float(np.max(np.abs(np.asarray(a) - b)) / np.max(np.abs(b)))


@pytest.fixture(scope="module")
def tiny():
    model = randomize_(Model(TINY), seed=0)
    return model, _numpy_state_dict(model)


@pytest.fixture(scope="module")
def tiny_apply():
    """One compiled forward pass of the tiny UNet, shared by the tests that run it."""
    return jax.jit(DDPMUNet(TINY).apply)


def test_parity_with_pytorch_tiny(tiny, tiny_apply):
    model, sd = tiny
    x, t = _inputs(TINY, [0, 990])
    out = tiny_apply({"params": convert_ddpm_unet(sd, TINY)}, x, t)
    assert out.shape == x.shape
    assert _rel_err(out, _torch_eps(model, x, t)) < 1e-4


def test_parity_with_pytorch_two_attention_levels():
    model = randomize_(Model(SMALL), seed=1)
    x, t = _inputs(SMALL, [990, 0])
    params = convert_ddpm_unet(_numpy_state_dict(model), SMALL)
    out = jax.jit(DDPMUNet(SMALL).apply)({"params": params}, x, t)
    assert _rel_err(out, _torch_eps(model, x, t)) < 1e-4


def test_resampling_without_conv_matches_pytorch():
    x = np.random.default_rng(1).standard_normal((1, 8, 8, 4)).astype(np.float32)
    x_torch = torch.from_numpy(x.transpose(0, 3, 1, 2))
    down = _Downsample(with_conv=False).apply({}, x)
    up = _Upsample(with_conv=False).apply({}, x)
    np.testing.assert_allclose(down, F.avg_pool2d(x_torch, 2, 2).numpy().transpose(0, 2, 3, 1), rtol=1e-6)
    np.testing.assert_array_equal(up, F.interpolate(x_torch, scale_factor=2.0, mode="nearest")
                                  .numpy().transpose(0, 2, 3, 1))


def test_timestep_embedding_matches_ddpm_formula():
    t = np.array([0.0, 1.0, 990.0])
    half = 16
    freqs = np.exp(-np.log(10000.0) * np.arange(half) / (half - 1))
    expected = np.concatenate([np.sin(t[:, None] * freqs), np.cos(t[:, None] * freqs)], axis=1)
    np.testing.assert_allclose(timestep_embedding(jnp.asarray(t), 2 * half), expected, atol=2e-4)


def test_denoiser_matches_batched_call(tiny, tiny_apply):
    model, sd = tiny
    denoiser = ddpm_denoiser(DDPMUNet(TINY), convert_ddpm_unet(sd, TINY))
    x, t = _inputs(TINY, [990, 0])
    batched = np.asarray(tiny_apply({"params": denoiser.params}, x, t))
    # One sample and a scalar t per call, the denoiser contract: the scalar is broadcast to the batch of one;
    # the params are an argument of the compiled function.
    per_sample = jax.jit(jax.vmap(denoiser.apply, in_axes=(None, 0, 0)))(denoiser.params, x, t)
    assert per_sample.shape == x.shape
    assert _rel_err(per_sample, batched) < 1e-5
    assert _rel_err(per_sample, _torch_eps(model, x, t)) < 1e-4


def test_checkpoint_variants_load_the_same_params(tiny, tmp_path):
    model, sd = tiny
    plain, prefixed, training = tmp_path / "celeba_hq.ckpt", tmp_path / "dp.pth", tmp_path / "ckpt.pth"
    torch.save(model.state_dict(), plain)
    torch.save({f"module.{k}": v for k, v in model.state_dict().items()}, prefixed)
    # ermongroup/ddim's training list: the model is DataParallel-wrapped, the EMA shadow is not.
    optimizer = torch.optim.Adam(model.parameters(), lr=0.0)
    model(torch.zeros(1, 3, 16, 16), torch.tensor([5])).sum().backward()
    optimizer.step()
    optimizer.zero_grad()
    torch.save([{f"module.{k}": v for k, v in model.state_dict().items()}, optimizer.state_dict(), 3, 1000,
                {k: p.detach().clone() for k, p in model.named_parameters()}], training)
    expected = convert_ddpm_unet(sd, TINY)
    for path in (plain, prefixed, training):
        module, params = load_ddpm_unet(path, TINY)
        assert module.config == TINY
        _assert_same_params(params, expected)


def _training_list(sd, ema_sd):
    return [{f"module.{k}": torch.from_numpy(v) for k, v in sd.items()},
            {"state": {}, "param_groups": [{"lr": 2e-4, "params": []}]}, 7, 500000,
            {k: torch.from_numpy(v) for k, v in ema_sd.items()}]


def test_training_list_picks_ema_or_model_weights(tiny, tmp_path):
    _, sd = tiny
    ema_sd = {k: v + 1.0 for k, v in sd.items()}
    path = tmp_path / "ckpt.pth"
    torch.save(_training_list(sd, ema_sd), path)
    _assert_same_params(load_ddpm_unet(path, TINY)[1], convert_ddpm_unet(ema_sd, TINY))
    _assert_same_params(load_ddpm_unet(path, TINY, ema=False)[1], convert_ddpm_unet(sd, TINY))
    # Trained without EMA: the list stops at the step count, so the model weights are the only ones.
    torch.save(_training_list(sd, ema_sd)[:4], path)
    _assert_same_params(load_ddpm_unet(path, TINY)[1], convert_ddpm_unet(sd, TINY))


def test_list_without_state_dict_is_an_error(tmp_path):
    path = tmp_path / "odd.pth"
    torch.save([{"lr": 1.0}, 3, 4], path)
    with pytest.raises(ValueError, match=r"odd\.pth.*found a list of 3 items"):
        load_ddpm_unet(path, TINY)


def test_wrong_depth_names_missing_and_leftover_keys(tmp_path):
    deeper = DDPMUNetConfig(ch=32, ch_mult=(1, 2), num_res_blocks=2, attn_resolutions=(8,), resolution=16)
    path = tmp_path / "deeper.ckpt"
    torch.save(Model(deeper).state_dict(), path)
    with pytest.raises(CheckpointMismatchError, match=r"deeper\.ckpt") as info:
        load_ddpm_unet(path, TINY)
    message = str(info.value)
    # Left over: TINY has one block (and attention) per down level, two per up level.
    assert "down.0.block.1.conv1.weight" in message
    assert "down.1.attn.1.q.weight" in message
    with pytest.raises(CheckpointMismatchError,
                       match=r"missing from the checkpoint.*down\.0\.block\.1\.norm1"):
        convert_ddpm_unet(_numpy_state_dict(Model(TINY)), deeper)


def test_wrong_width_is_an_error_naming_shapes(tmp_path):
    wider = DDPMUNetConfig(ch=64, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), resolution=16)
    path = tmp_path / "wider.pth"
    torch.save(Model(wider).state_dict(), path)
    with pytest.raises(CheckpointMismatchError,
                       match=r"wider\.pth.*conv_in/kernel: shape \(3, 3, 3, 64\), expected \(3, 3, 3, 32\)"):
        load_ddpm_unet(path, TINY)


def test_missing_file_names_file_architecture_and_source(tmp_path):
    for name in ("celeba_hq.ckpt", "celeba_hq.safetensors"):
        with pytest.raises(FileNotFoundError, match=r"celeba_hq.*SDEdit.*gwang-kim/DiffusionCLIP-CelebA_HQ"):
            load_ddpm_unet(tmp_path / name)


def test_safetensors_round_trip(tiny, tmp_path):
    params = convert_ddpm_unet(tiny[1], TINY)
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
    variables = {"params": convert_ddpm_unet(tiny[1], TINY)}
    with pytest.raises(ValueError, match=r"expected x of shape \(B, 16, 16, 3\)"):
        jax.eval_shape(DDPMUNet(TINY).apply, variables, jnp.zeros((1, 3, 16, 16)), 0)
    with pytest.raises(ValueError, match="t must be a scalar or have shape"):
        jax.eval_shape(DDPMUNet(TINY).apply, variables, jnp.zeros((2, 16, 16, 3)), jnp.zeros((3,)))
