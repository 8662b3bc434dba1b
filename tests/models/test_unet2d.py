"""The Flax SD UNet against diffusers' PyTorch UNet2DConditionModel on tiny random configs; its
converter, config reader, attention maps and score modifiers.

The weights are numpy random (``experiments.tiny_models.random_tree``), so both ends of the
supported range have them without storing them; diffusers' model loads them (``strict=True``)
and what it computes (outputs, its processor names, its saved config, its state-dict keys) is a
reference of group ``unet2d`` (``tests/references.py``): live with PyTorch, committed without."""
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
from zmagic_jax.models._sd_convert import unet_param_shapes, unet_params_from_torch, unet_torch_state_dict
from zmagic_jax.models._unet2d import (
    UNet2DConditionConfig,
    UNet2DConditionModel,
    attention_layers,
    select_attention,
    timestep_features,
    unet_apply,
    unet_config_from_dict,
)
from zmagic_jax.ports._checkpoint import CheckpointMismatchError, torch_key

GROUP = "unet2d"
# SD 1.x-like: conv proj_in/out, 8 heads everywhere, a cross-attention block on each side of the mid block.
SD1 = dict(block_out_channels=[32, 64], down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"],
           up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"], layers_per_block=1, attention_head_dim=8,
           cross_attention_dim=32, norm_num_groups=32, sample_size=8)
# SD 2.x-like: linear proj_in/out, heads per block, two ResNets per block, two transformer layers in the
# second level, a cross-attention width unlike the UNet's, and the other timestep-embedding convention.
SD2 = dict(block_out_channels=[32, 64], down_block_types=["CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
           up_block_types=["CrossAttnUpBlock2D", "CrossAttnUpBlock2D"], layers_per_block=2,
           attention_head_dim=[2, 4], transformer_layers_per_block=[1, 2], cross_attention_dim=48,
           use_linear_projection=True, upcast_attention=True, norm_num_groups=16, flip_sin_to_cos=False,
           freq_shift=1, sample_size=8)
CASES = {"sd1": (SD1, 0), "sd2": (SD2, 1)}  # name -> (diffusers options, seed of weights and inputs)
# One level, so op-by-op (eager) runs and extra compilations stay cheap; self and cross attention.
MINI = UNet2DConditionConfig(block_out_channels=(32,), down_block_types=("CrossAttnDownBlock2D",),
                             up_block_types=("CrossAttnUpBlock2D",), layers_per_block=1, num_attention_heads=4,
                             cross_attention_dim=16, norm_num_groups=8)
TIMESTEPS = np.array([10, 900])
TOKENS = 7


def _rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _weights(name: str):
    """``(config, params, sample, context)`` of a case: numpy random weights and inputs."""
    options, seed = CASES[name]
    config = unet_config_from_dict(options, file="unet/config.json")
    rng = np.random.default_rng(seed)
    sample = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    context = rng.standard_normal((2, TOKENS, config.context_dim)).astype(np.float32)
    return config, random_tree(unet_param_shapes(config), seed), sample, context


@functools.lru_cache(maxsize=None)
def _torch_unet(name: str):
    """diffusers' UNet of case ``name`` with the case's weights (every key, every shape)."""
    import diffusers
    import torch
    config, params, _, _ = _weights(name)
    model = diffusers.UNet2DConditionModel(**CASES[name][0]).eval()
    model.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v))
                           for k, v in unet_torch_state_dict(params, config).items()}, strict=True)
    return model


def _torch_outputs(name: str) -> dict:
    """What diffusers computes and names for case ``name``: the output on the case's inputs, its
    attention processors (sorted names, heads, cross or self), the config.json it saves (without
    the version) and its state-dict keys with shapes."""
    import torch
    model = _torch_unet(name)
    _, _, sample, context = _weights(name)
    with torch.no_grad():
        out = model(torch.from_numpy(sample.transpose(0, 3, 1, 2)), torch.from_numpy(TIMESTEPS),
                    torch.from_numpy(context)).sample.numpy().transpose(0, 2, 3, 1)
    names = sorted(k[:-len(".processor")] for k in model.attn_processors)
    modules = dict(model.named_modules())
    saved = {k: v for k, v in json.loads(model.to_json_string()).items() if k != "_diffusers_version"}
    keys = "\n".join(sorted(f"{k} {tuple(v.shape)}" for k, v in model.state_dict().items()))
    return {"output": out, "attention_names": text_array("\n".join(names)),
            "attention_heads": np.array([modules[n].heads for n in names]),
            "attention_cross": np.array([modules[n].is_cross_attention for n in names], np.uint8),
            "config_json": text_array(json.dumps(saved, sort_keys=True)), "state_dict_keys": text_array(keys)}


class Case(NamedTuple):
    config: UNet2DConditionConfig
    module: UNet2DConditionModel
    params: dict
    sample: np.ndarray
    context: np.ndarray
    torch: dict  # _torch_outputs
    reference: np.ndarray  # diffusers' output
    apply: object  # jitted unet_apply(module, params, sample, t, context)


def _case(name: str) -> Case:
    config, params, sample, context = _weights(name)
    reference = torch_reference(GROUP, name, lambda: _torch_outputs(name))
    module = UNet2DConditionModel(config)
    apply = jax.jit(lambda params, x, t, c: unet_apply(module, params, x, t, c))
    return Case(config, module, params, sample, context, reference, np.asarray(reference["output"]), apply)


@pytest.fixture(scope="module")
def sd1():
    return _case("sd1")


@pytest.fixture(scope="module")
def sd2():
    return _case("sd2")


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_parity_with_diffusers(name, request):
    case = request.getfixturevalue(name)
    out = case.apply(case.params, case.sample, TIMESTEPS, case.context)
    assert out.shape == case.reference.shape and out.dtype == jnp.float32
    assert _rel_err(out, case.reference) < 1e-4


def test_config_reads_diffusers_semantics(sd1, sd2):
    assert sd1.config.num_attention_heads == (8, 8)  # attention_head_dim is the number of heads
    assert sd1.config.layers_per_block == (1, 1) and not sd1.config.use_linear_projection
    assert sd2.config.num_attention_heads == (2, 4) and sd2.config.transformer_layers_per_block == (1, 2)
    assert sd2.config.use_linear_projection and sd2.config.context_dim == 48
    # num_attention_heads, when given, wins over attention_head_dim.
    assert unet_config_from_dict({**SD1, "num_attention_heads": 4}, file="f").num_attention_heads == (4, 4)
    assert unet_config_from_dict({**SD1, "_class_name": "UNet2DConditionModel", "_diffusers_version": "0.35.2",
                                  "dropout": 0.1, "an_option_diffusers_ignores": 1}, file="f") == sd1.config
    # The complete config.json diffusers saves for these models (every default written out).
    for case in (sd1, sd2):
        saved = json.loads(array_text(case.torch["config_json"]))
        assert saved["_class_name"] == "UNet2DConditionModel" and len(saved) > 40
        assert unet_config_from_dict(saved, file="unet/config.json") == case.config


@pytest.mark.parametrize("dim, flip, shift", [(32, True, 0), (32, False, 1), (33, True, 1)])
def test_timestep_features_match_diffusers(dim, flip, shift):
    t = np.array([0, 1, 500, 999])

    def diffusers_features():
        import torch
        from diffusers.models.embeddings import get_timestep_embedding
        return get_timestep_embedding(torch.from_numpy(t), dim, flip_sin_to_cos=flip,
                                      downscale_freq_shift=shift).numpy()

    expected = torch_reference(GROUP, f"timestep_features/{dim}_{flip}_{shift}", diffusers_features)
    got = timestep_features(jnp.asarray(t), dim, flip_sin_to_cos=flip, freq_shift=shift)
    np.testing.assert_allclose(got, expected, atol=2e-4)


@pytest.mark.parametrize("name", ["sd1", "sd2"])
def test_attention_layers_are_diffusers_processors(name, request):
    case = request.getfixturevalue(name)
    layers = attention_layers(case.config, (8, 8))
    names = array_text(case.torch["attention_names"]).split("\n")
    assert sorted(layer.name for layer in layers) == names
    by_name = {layer.name: layer for layer in layers}
    for layer_name, heads, cross in zip(names, case.torch["attention_heads"], case.torch["attention_cross"]):
        assert by_name[layer_name].heads == heads
        assert by_name[layer_name].kind == ("cross" if cross else "self")


def test_select_attention():
    config = unet_config_from_dict(SD2, file="f")
    layers = attention_layers(config, 16)
    assert len(layers) == 2 * (2 * 1 + 2 * 2 + 2 + 3 * 2 + 3 * 1)
    mid = select_attention(layers, place="mid", kind="self")
    assert mid == ("mid_block.attentions.0.transformer_blocks.0.attn1",
                   "mid_block.attentions.0.transformer_blocks.1.attn1")
    assert {layer.resolution for layer in layers if layer.name in mid} == {(8, 8)}
    high = select_attention(layers, kind="cross", resolution=16)
    assert high and all(n.endswith("attn2") and not n.startswith("mid") for n in high)
    assert all(layer.heads == 2 and layer.head_dim == 16 for layer in layers if layer.name in high)
    assert select_attention(layers, resolution=(4, 4)) == ()
    with pytest.raises(ValueError, match="place must be"):
        select_attention(layers, place="middle")
    with pytest.raises(ValueError, match="divisible by 2"):
        attention_layers(config, (8, 5))


# --- attention maps and modifiers ------------------------------------------------------------------

_LISTS = frozenset({"down_blocks", "up_blocks", "attentions", "transformer_blocks"})


@pytest.fixture(scope="module")
def recording(sd1):
    """One compiled program recording every attention layer of the SD 1.x-like UNet with a
    modifier on each (arrays of one shape, so every modifier value reuses it), capturing the
    ``to_q``/``to_k`` outputs for an independent recomputation of the maps."""
    layers = attention_layers(sd1.config, (8, 8))
    names = tuple(layer.name for layer in layers)

    def run(params, modifiers):
        return sd1.module.apply({"params": params}, sd1.sample, TIMESTEPS, sd1.context, record=names,
                                modifiers=modifiers, mutable=["attention", "intermediates"],
                                capture_intermediates=lambda mdl, _: mdl.name in ("to_q", "to_k"))

    keys = {layer.name: TOKENS if layer.kind == "cross" else layer.resolution[0] * layer.resolution[1]
            for layer in layers}
    zeros = {name: np.zeros((1, 1, 1, n), np.float32) for name, n in keys.items()}
    return layers, jax.jit(run), zeros


def _projections(intermediates) -> dict:
    """``{layer name: {"to_q": q, "to_k": k}}`` from the captured intermediates, the layer name
    rebuilt from the module path (independently of the names the layers sow under)."""
    out = {}
    for path, value in traverse_util.flatten_dict(dict(intermediates)).items():
        layer = torch_key(path[:-2] + ("bias",), _LISTS)[:-len(".bias")]
        out.setdefault(layer, {})[path[-2]] = np.asarray(value[0], np.float64)
    return out


def test_recorded_maps_are_the_softmax_of_the_layer_scores(sd1, recording):
    layers, run, zeros = recording
    out, state = run(sd1.params, zeros)
    assert _rel_err(out, sd1.reference) < 1e-4
    probs = {path[-1]: np.asarray(v[0]) for path, v in traverse_util.flatten_dict(dict(state["attention"])).items()}
    qk = _projections(state["intermediates"])
    assert set(probs) == set(qk) == {layer.name for layer in layers}
    for layer in layers:
        p = probs[layer.name]
        lq = layer.resolution[0] * layer.resolution[1]
        assert p.shape == (2, layer.heads, lq, TOKENS if layer.kind == "cross" else lq)
        np.testing.assert_allclose(p.sum(-1), 1.0, atol=1e-5)
        q, k = (qk[layer.name][n].reshape(2, -1, layer.heads, layer.head_dim) for n in ("to_q", "to_k"))
        scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(layer.head_dim)
        expected = np.exp(scores - scores.max(-1, keepdims=True))
        expected /= expected.sum(-1, keepdims=True)
        np.testing.assert_allclose(p, expected, atol=2e-6, err_msg=layer.name)


def test_minus_infinity_modifier_removes_keys(sd1, recording):
    layers, run, zeros = recording
    cross = select_attention(layers, kind="cross", place="up")[0]
    self_attn = select_attention(layers, kind="self", place="down")[0]
    modifiers = dict(zeros)
    modifiers[cross] = zeros[cross].copy()
    modifiers[cross][..., [2, 5]] = -np.inf
    modifiers[self_attn] = zeros[self_attn].copy()
    modifiers[self_attn][..., :10] = -1e9
    out, state = run(sd1.params, modifiers)
    probs = {path[-1]: np.asarray(v[0]) for path, v in traverse_util.flatten_dict(dict(state["attention"])).items()}
    assert np.all(probs[cross][..., [2, 5]] == 0.0) and np.all(probs[self_attn][..., :10] == 0.0)
    for name in (cross, self_attn):
        np.testing.assert_allclose(probs[name].sum(-1), 1.0, atol=1e-5)
    assert _rel_err(out, sd1.reference) > 1e-3  # the removed keys mattered


def test_unet_apply_returns_maps_by_name(sd1):
    names = select_attention(attention_layers(sd1.config, 8), kind="cross")
    out, maps = jax.jit(lambda p: unet_apply(sd1.module, p, sd1.sample, TIMESTEPS, sd1.context, record=names))(
        sd1.params)
    assert tuple(maps) == names
    assert _rel_err(out, sd1.reference) < 1e-4
    assert maps[names[0]].shape == (2, 8, 64, TOKENS)


@pytest.fixture(scope="module")
def mini():
    """``(module, params, sample, context)`` of the one-level UNet with random params."""
    rng = np.random.default_rng(5)
    sample = rng.standard_normal((2, 8, 8, 4)).astype(np.float32)
    context = rng.standard_normal((2, 5, 16)).astype(np.float32)
    return UNet2DConditionModel(MINI), random_tree(unet_param_shapes(MINI), 5), sample, context


def test_zero_modifier_leaves_the_output_unchanged(mini):
    module, params, sample, context = mini
    zeros = {layer.name: jnp.zeros((1, 1, 1, 1)) for layer in attention_layers(MINI, 8)}
    assert {layer.kind for layer in attention_layers(MINI, 8)} == {"self", "cross"}
    # Op by op, s + 0 == s exactly: bit-identical.
    plain = module.apply({"params": params}, sample, TIMESTEPS, context)
    modified = module.apply({"params": params}, sample, TIMESTEPS, context, modifiers=zeros)
    np.testing.assert_array_equal(np.asarray(modified), np.asarray(plain))
    # Under jit XLA fuses the attention with and without the bias add differently (a different
    # order of float32 operations), so the outputs agree to float32 round-off only.
    jitted = jax.jit(lambda p, m: unet_apply(module, p, sample, TIMESTEPS, context, modifiers=m))
    assert _rel_err(jitted(params, zeros), plain) < 1e-5


def test_query_chunks_give_the_same_output(sd1):
    chunked = jax.jit(lambda p: unet_apply(sd1.module, p, sd1.sample, TIMESTEPS, sd1.context, query_chunk=16))
    assert _rel_err(chunked(sd1.params), sd1.reference) < 1e-4
    with pytest.raises(ValueError, match="query_chunk=48 must divide"):
        jax.eval_shape(lambda p: unet_apply(sd1.module, p, sd1.sample, TIMESTEPS, sd1.context, query_chunk=48),
                       sd1.params)


# --- compute options -------------------------------------------------------------------------------

def test_remat_gives_the_same_output_and_gradient(mini):
    module, params, sample, context = mini
    weights = np.random.default_rng(3).standard_normal(sample.shape).astype(np.float32)

    def value_and_grad(module):
        loss = lambda x: jnp.sum(unet_apply(module, params, x, TIMESTEPS, context) * weights)  # noqa: E731
        return jax.jit(jax.value_and_grad(loss))(sample)

    (v, g), (v_remat, g_remat) = value_and_grad(module), value_and_grad(UNet2DConditionModel(MINI, remat=True))
    assert abs(float(v_remat) - float(v)) <= 1e-5 * abs(float(v))
    assert _rel_err(g_remat, g) < 1e-5


def test_bfloat16_compute_keeps_float32_params(sd1):
    module = UNet2DConditionModel(sd1.config, dtype=jnp.bfloat16)
    shapes = jax.eval_shape(module.init, jax.random.key(0), sd1.sample, TIMESTEPS, sd1.context)["params"]
    assert {leaf.dtype for leaf in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}
    out = jax.jit(lambda p: unet_apply(module, p, sd1.sample, TIMESTEPS, sd1.context))(sd1.params)
    assert out.dtype == jnp.float32
    assert _rel_err(out, sd1.reference) < 5e-2


# --- converter ---------------------------------------------------------------------------------------

def test_converter_round_trip(sd1, sd2):
    for case in (sd1, sd2):
        state_dict = unet_torch_state_dict(case.params, case.config)
        # diffusers' own keys and shapes (its load_state_dict(strict=True) took exactly these)
        keys = "\n".join(sorted(f"{k} {v.shape}" for k, v in state_dict.items()))
        assert keys == array_text(case.torch["state_dict_keys"])
        again = traverse_util.flatten_dict(unet_params_from_torch(state_dict, case.config))
        for path, value in traverse_util.flatten_dict(case.params).items():
            np.testing.assert_array_equal(again[path], value)
        assert set(again) == set(unet_param_shapes(case.config))


def test_mismatched_checkpoints_name_the_keys(sd1):
    state_dict = unet_torch_state_dict(sd1.params, sd1.config)
    key = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight"
    with pytest.raises(CheckpointMismatchError, match=r"(?s)unet\.bin.*not used.*extra\.weight"):
        unet_params_from_torch({**state_dict, "extra.weight": np.zeros(3)}, sd1.config, path="unet.bin")
    with pytest.raises(CheckpointMismatchError, match=rf"(?s)missing from the checkpoint.*{key}"):
        unet_params_from_torch({k: v for k, v in state_dict.items() if k != key}, sd1.config)
    wrong = rf"(?s)wrong shapes.*{key}: shape \(5, 32\) in the file, the config expects \(32, 32\)"
    with pytest.raises(CheckpointMismatchError, match=wrong):
        unet_params_from_torch({**state_dict, key: np.zeros((32, 5), np.float32)}, sd1.config)
    # The SD 1.x-like checkpoint does not fit the SD 2.x-like config (two ResNets per block).
    with pytest.raises(CheckpointMismatchError, match="down_blocks.0.resnets.1"):
        unet_params_from_torch(state_dict, unet_config_from_dict(SD2, file="f"))
    with pytest.raises(CheckpointMismatchError, match="params do not match"):
        unet_torch_state_dict(sd1.params, unet_config_from_dict(SD2, file="f"))


# --- rejected configs and inputs ---------------------------------------------------------------------

@pytest.mark.parametrize("key, value, shown", [
    ("class_embed_type", "timestep", "'timestep'"), ("addition_embed_type", "text_time", "'text_time'"),
    ("encoder_hid_dim", 64, "64"), ("time_cond_proj_dim", 16, "16"), ("dual_cross_attention", True, "True"),
    ("only_cross_attention", [True, False], "[True, False]"),
    ("resnet_time_scale_shift", "scale_shift", "'scale_shift'"),
    ("act_fn", "gelu", "'gelu'"), ("conv_in_kernel", 7, "7"), ("num_class_embeds", 10, "10"),
    ("time_embedding_type", "fourier", "'fourier'"), ("attention_type", "gated", "'gated'"),
    ("down_block_types", ["AttnDownBlock2D", "DownBlock2D"], "'AttnDownBlock2D'"),
    ("up_block_types", ["UpBlock2D", "AttnUpBlock2D"], "'AttnUpBlock2D'"),
    ("mid_block_type", "UNetMidBlock2DSimpleCrossAttn", "'UNetMidBlock2DSimpleCrossAttn'"),
    ("transformer_layers_per_block", [[1, 2], [1, 1]], "[[1, 2], [1, 1]]"),
    ("norm_num_groups", 24, "24"),
])
def test_unsupported_options_are_rejected(key, value, shown):
    with pytest.raises(ValueError, match="unet/config.json") as info:
        unet_config_from_dict({**SD1, key: value}, file="unet/config.json")
    assert key in str(info.value) and shown in str(info.value)


def test_unsupported_option_message_says_what_is_supported():
    with pytest.raises(ValueError, match=r"act_fn='gelu' is not supported.*'silu'"):
        unet_config_from_dict({**SD1, "act_fn": "gelu"}, file="unet/config.json")
    with pytest.raises(ValueError, match=r"'AttnDownBlock2D'.*supported: CrossAttnDownBlock2D, DownBlock2D"):
        unet_config_from_dict({**SD1, "down_block_types": ["AttnDownBlock2D", "DownBlock2D"]}, file="f")


def test_rejected_inputs(sd1):
    def shape_of(*args, **kwargs):
        return jax.eval_shape(lambda p: unet_apply(sd1.module, p, *args, **kwargs), sd1.params)

    with pytest.raises(ValueError, match=r"sample must be \(B, h, w, 4\)"):
        shape_of(sd1.sample.transpose(0, 3, 1, 2), TIMESTEPS, sd1.context)
    with pytest.raises(ValueError, match="divisible by 2"):
        shape_of(sd1.sample[:, :7], TIMESTEPS, sd1.context)
    with pytest.raises(ValueError, match=r"encoder_hidden_states must be \(2, L, 32\)"):
        shape_of(sd1.sample, TIMESTEPS, sd1.context[..., :16])
    with pytest.raises(ValueError, match="timesteps must be a scalar or"):
        shape_of(sd1.sample, np.arange(3), sd1.context)
    with pytest.raises(ValueError, match="unknown attention layer names.*attn3"):
        shape_of(sd1.sample, TIMESTEPS, sd1.context,
                 record=("down_blocks.0.attentions.0.transformer_blocks.0.attn3",))
    assert shape_of(sd1.sample, 5, sd1.context).shape == sd1.sample.shape  # a scalar timestep is shared
