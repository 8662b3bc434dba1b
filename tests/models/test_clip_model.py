"""The library's own CLIP: parity with transformers' PyTorch CLIPModel / CLIPTextModel (both
activations, both pooling rules, with and without an attention mask) and the WithProjection
variants on tiny random models, the state-dict converter both ways and its errors, and the config
reader's errors.

The weights are numpy random (``experiments.tiny_models.random_tree``), so both ends of the
supported range have them without storing them; transformers' ``from_pretrained`` loads them (no
key missing, unexpected or of another shape) and what it computes (outputs, hidden states, the
pixel gradient, the keys of the checkpoint it saves) is a reference of group ``clip_model``
(``tests/references.py``): live with PyTorch, committed without."""
import dataclasses
import functools
import json
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from experiments.tiny_models import random_tree
from tests.references import array_text, text_array, torch_reference
from zmagic_jax.models._clip import (
    CLIPModel,
    CLIPTextConfig,
    CLIPTextTransformer,
    CLIPVisionConfig,
    clip_configs_from_dict,
    clip_param_shapes,
    clip_params_from_torch,
    clip_torch_state_dict,
)
from zmagic_jax.ports._checkpoint import CheckpointMismatchError

GROUP = "clip_model"
VOCAB, LENGTH, BATCH = 64, 12, 2
TEXT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=2,
            max_position_embeddings=16, layer_norm_eps=1e-5)
VISION = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_hidden_layers=4, image_size=32,
              patch_size=8, num_channels=3, layer_norm_eps=1e-5)
PROJECTION = 16

# name -> (model_type of the config.json, hidden_act, eos_token_id, with an attention mask)
CASES = {
    "clip_quick_gelu_eos": ("clip", "quick_gelu", 5, False),
    "clip_gelu_legacy_eos2": ("clip", "gelu", 2, False),
    "text_only_masked": ("clip_text_model", "quick_gelu", 7, True),
}


def rel(a, b) -> float:
    """max |a - b| / max |b|."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape, (a.shape, b.shape)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def config_json(model_type, act, eos) -> dict:
    """A config.json as transformers writes it for this case."""
    text = dict(TEXT, hidden_act=act, eos_token_id=eos, bos_token_id=VOCAB - 2, pad_token_id=1,
                model_type="clip_text_model", projection_dim=PROJECTION, attention_dropout=0.0)
    if model_type == "clip_text_model":
        return dict(text, architectures=["CLIPTextModel"])
    return {"model_type": "clip", "architectures": ["CLIPModel"], "projection_dim": PROJECTION,
            "logit_scale_init_value": 2.6592, "text_config": text,
            "vision_config": dict(VISION, hidden_act=act, model_type="clip_vision_model")}


def token_ids(eos, seed) -> np.ndarray:
    """Ids whose eos position differs from the position of the largest id (so the two pooling
    rules disagree), with eos repeated as padding after it, as SD 1.x tokenizers pad."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(8, VOCAB, (BATCH, LENGTH))
    for row, end in enumerate((5, 9)):
        ids[row, end:] = eos
        ids[row, 2] = VOCAB - 1  # the largest id, before the eos
    return ids.astype(np.int32)


def random_state_dict(text, vision, projection, seed=0) -> dict:
    """A state dict of numpy random weights (``random_tree``) in transformers' key layout."""
    return clip_torch_state_dict(random_tree(clip_param_shapes(text, vision, projection), seed))


def key_lines(shapes: dict) -> str:
    """``{key: shape}`` of a checkpoint as sorted lines ``key (shape)``."""
    return "\n".join(sorted(f"{k} {tuple(shape)}" for k, shape in shapes.items()))


def _torch_model(raw: dict, state_dict: dict):
    """transformers' ``from_pretrained`` of a folder of the config.json ``raw`` and ``state_dict``
    (less the position_ids buffers, which transformers 5 neither saves nor expects): every key
    used, none missing, no shape mismatched. Returns the model and the keys and shapes of the
    checkpoint its ``save_pretrained`` writes (transformers 5's CLIPTextModel has other module
    paths in memory than in its files, so ``state_dict()`` would not show the file layout)."""
    import safetensors
    import transformers
    from safetensors.numpy import save_file
    with tempfile.TemporaryDirectory() as folder:
        (Path(folder) / "config.json").write_text(json.dumps(raw))
        save_file({k: np.array(v) for k, v in state_dict.items() if not k.endswith("position_ids")},
                  str(Path(folder) / "model.safetensors"), metadata={"format": "pt"})
        model, info = getattr(transformers, raw["architectures"][0]).from_pretrained(
            folder, attn_implementation="eager", output_loading_info=True)
        assert not any(info.values()), info
        model.save_pretrained(Path(folder) / "saved")
        with safetensors.safe_open(str(Path(folder) / "saved" / "model.safetensors"), "np") as saved:
            keys = key_lines({k: saved.get_slice(k).get_shape() for k in saved.keys()})
    return model.eval(), keys


def _features(out):
    """A projected embedding: transformers 4 returns the tensor, transformers 5 an output whose
    ``pooler_output`` holds it."""
    return getattr(out, "pooler_output", out)


def _torch_outputs(raw, state_dict, ids, mask, pixels, weights) -> dict:
    """What transformers computes for a case: the text tower's last / pooled / hidden states (with
    the mask); for a CLIPModel also the vision tower's, the logits, both embeddings and the
    gradient of ``sum(image_embeds * weights)`` in the pixels (channels last); its state-dict keys."""
    import torch
    model, keys = _torch_model(raw, state_dict)
    ids_t = torch.from_numpy(ids.astype(np.int64))
    mask_t = None if mask is None else torch.from_numpy(mask)
    with torch.no_grad():
        text_tower = model.text_model if raw["model_type"] == "clip" else model
        text = text_tower(ids_t, attention_mask=mask_t, output_hidden_states=True)
    out = {"text_last": text.last_hidden_state.numpy(), "text_pooled": text.pooler_output.numpy(),
           "text_states": np.stack([h.numpy() for h in text.hidden_states]),
           "state_dict_keys": text_array(keys)}
    if raw["model_type"] == "clip":
        pixels_t = torch.from_numpy(pixels.transpose(0, 3, 1, 2).copy()).requires_grad_(True)
        with torch.no_grad():
            # the tower itself: transformers 5's CLIPModel returns the projection as the vision pooler_output
            vision = model.vision_model(pixels_t, output_hidden_states=True)
            out.update(vision_last=vision.last_hidden_state.numpy(), vision_pooled=vision.pooler_output.numpy(),
                       vision_states=np.stack([h.numpy() for h in vision.hidden_states]),
                       logits_per_image=model(input_ids=ids_t, pixel_values=pixels_t).logits_per_image.numpy(),
                       text_embeds=_features(model.get_text_features(ids_t)).numpy())
        image_embeds = _features(model.get_image_features(pixels_t))
        (image_embeds * torch.from_numpy(weights)).sum().backward()
        out["image_embeds"] = image_embeds.detach().numpy()
        out["pixel_grad"] = pixels_t.grad.numpy().transpose(0, 2, 3, 1)
    return out


@pytest.fixture(scope="module", params=sorted(CASES))
def case(request):
    model_type, act, eos, masked = CASES[request.param]
    raw = config_json(model_type, act, eos)
    configs = clip_configs_from_dict(raw, file=f"{request.param}/config.json")
    state_dict = random_state_dict(*configs, seed=0)
    # older checkpoints carry the position_ids buffers; the converter consumes them
    state_dict["text_model.embeddings.position_ids"] = np.arange(TEXT["max_position_embeddings"])[None]
    if model_type == "clip":
        state_dict["vision_model.embeddings.position_ids"] = np.arange(17)[None]
    ids = token_ids(eos, seed=1)
    mask = None
    if masked:
        # right padding, and (row 0) masked leading keys, so some query rows have no key left:
        # transformers then attends uniformly to every key; so must ours
        mask = np.ones_like(ids)
        mask[1, 9:] = 0
        mask[0, :2] = 0
    rng = np.random.default_rng(2)
    pixels = rng.normal(size=(BATCH, VISION["image_size"], VISION["image_size"], 3)).astype(np.float32)
    weights = rng.normal(size=(PROJECTION,)).astype(np.float32)
    reference = dict(torch_reference(GROUP, request.param,
                                     lambda: _torch_outputs(raw, state_dict, ids, mask, pixels, weights)))
    torch_keys = array_text(reference.pop("state_dict_keys"))
    params = clip_params_from_torch(state_dict, *configs, path=request.param)
    return dict(name=request.param, raw=raw, state_dict=state_dict, params=params, ids=ids, mask=mask,
                pixels=pixels, weights=weights, reference=reference, torch_keys=torch_keys, configs=configs)


def _outputs(module, params, ids, mask, pixels, weights):
    """Every compared quantity of one model in one program."""
    variables = {"params": params}
    text = module.apply(variables, ids, mask, method="text_outputs")
    out = {"text_last": text.last_hidden_state, "text_pooled": text.pooled_output,
           "text_states": text.hidden_states}
    if module.vision_config is not None:
        full = module.apply(variables, ids, pixels)
        out.update(vision_last=full.vision.last_hidden_state, vision_pooled=full.vision.pooled_output,
                   vision_states=full.vision.hidden_states, text_embeds=full.text_embeds,
                   image_embeds=full.image_embeds, logits_per_image=full.logits_per_image)
        out["pixel_grad"] = jax.grad(lambda x: jnp.sum(
            module.apply(variables, x, method="image_embeddings") * weights))(pixels)
    return out


@pytest.fixture(scope="module")
def outputs(case):
    run = jax.jit(functools.partial(_outputs, CLIPModel(*case["configs"])))
    return run(case["params"], case["ids"], case["mask"],
               case["pixels"] if case["configs"][1] is not None else None, case["weights"])


def test_matches_transformers(case, outputs):
    errors = {}
    for key, expected in case["reference"].items():
        if key.endswith("_states"):  # stacked there, a tuple here
            assert len(outputs[key]) == len(expected)
            for index, (a, b) in enumerate(zip(outputs[key], expected)):
                errors[f"{key}[{index}]"] = rel(a, b)
        else:
            errors[key] = rel(outputs[key], expected)
    print(case["name"], "max rel", max(errors.values()), errors)
    assert max(errors.values()) < 1e-4, errors


def test_pooling_rule_is_transformers(case):
    """The two pooling rules pick different tokens on these ids, so parity pins the rule."""
    ids, eos = case["ids"], case["configs"][0].eos_token_id
    assert np.all(np.argmax(ids, -1) != np.argmax(ids == eos, -1))


def test_text_transformer_alone(case, outputs):
    """``CLIPTextTransformer`` applied to ``params["text_model"]`` is the text tower."""
    text_config = case["configs"][0]
    out = jax.jit(lambda p, i: CLIPTextTransformer(text_config).apply({"params": p}, i))(
        case["params"]["text_model"], case["ids"])
    if case["mask"] is None:
        np.testing.assert_allclose(out.last_hidden_state, outputs["text_last"], rtol=1e-6, atol=1e-6)
    else:  # the mask changes exactly the rows that lost keys
        np.testing.assert_allclose(out.last_hidden_state[1, :9], outputs["text_last"][1, :9], rtol=1e-6, atol=1e-6)
        assert not np.allclose(out.last_hidden_state[1, 9:], outputs["text_last"][1, 9:], atol=1e-4)
        assert not np.allclose(out.last_hidden_state[0], outputs["text_last"][0], atol=1e-4)


def test_remat_gradient(case):
    if case["name"] != "clip_quick_gelu_eos":
        pytest.skip("one remat check suffices")
    module = CLIPModel(*case["configs"], remat=True)

    @jax.jit
    def grad(params, pixels, weights):
        return jax.grad(lambda x: jnp.sum(module.apply({"params": params}, x, method="image_embeddings")
                                          * weights))(pixels)

    assert rel(grad(case["params"], case["pixels"], case["weights"]), case["reference"]["pixel_grad"]) < 1e-4


def test_bfloat16_compute(case, outputs):
    if case["name"] != "clip_quick_gelu_eos":
        pytest.skip("one dtype check suffices")
    module = CLIPModel(*case["configs"], dtype=jnp.bfloat16)
    out = jax.jit(lambda p, i, x: module.apply({"params": p}, i, x))(case["params"], case["ids"], case["pixels"])
    assert out.image_embeds.dtype == jnp.bfloat16 and out.text.last_hidden_state.dtype == jnp.bfloat16
    assert rel(out.image_embeds, outputs["image_embeds"]) < 5e-2
    assert rel(out.text.last_hidden_state, outputs["text_last"]) < 5e-2


def test_state_dict_round_trip(case):
    """The converter writes transformers' keys and shapes, and gives back the checkpoint's tensors
    (less the position_ids buffers it consumed)."""
    expected = {k: v for k, v in case["state_dict"].items() if not k.endswith("position_ids")}
    back = clip_torch_state_dict(case["params"])
    assert key_lines({k: v.shape for k, v in back.items()}) == case["torch_keys"]
    assert sorted(back) == sorted(expected)
    for key, value in expected.items():
        assert back[key].shape == value.shape and np.array_equal(back[key], value), key


# --- converter and config errors ----------------------------------------------------------------

SMALL_TEXT = CLIPTextConfig(**TEXT)
SMALL_VISION = CLIPVisionConfig(**VISION)


@pytest.mark.parametrize("towers", [(SMALL_TEXT, SMALL_VISION, PROJECTION), (SMALL_TEXT, None, None),
                                    (SMALL_TEXT, None, PROJECTION), (None, SMALL_VISION, PROJECTION)])
def test_converter_round_trip_without_torch(towers):
    sd = random_state_dict(*towers)
    params = clip_params_from_torch(sd, *towers)
    back = clip_torch_state_dict(params)
    assert sorted(back) == sorted(sd)
    assert all(back[k].shape == sd[k].shape and np.array_equal(back[k], sd[k]) for k in sd)
    assert ("logit_scale" in sd) == (towers[0] is not None and towers[1] is not None)


def test_torch_key_names():
    sd = random_state_dict(SMALL_TEXT, SMALL_VISION, PROJECTION)
    for key in ("text_model.embeddings.token_embedding.weight", "text_model.encoder.layers.1.self_attn.q_proj.bias",
                "text_model.final_layer_norm.weight", "vision_model.embeddings.class_embedding",
                "vision_model.embeddings.patch_embedding.weight", "vision_model.pre_layrnorm.bias",
                "vision_model.encoder.layers.3.mlp.fc2.weight", "vision_model.post_layernorm.weight",
                "text_projection.weight", "visual_projection.weight", "logit_scale"):
        assert key in sd, key
    assert sd["vision_model.embeddings.patch_embedding.weight"].shape == (32, 3, 8, 8)
    assert sd["text_projection.weight"].shape == (PROJECTION, 32)
    assert "vision_model.embeddings.patch_embedding.bias" not in sd


def test_converter_errors_name_the_keys():
    towers = (SMALL_TEXT, None, None)
    sd = random_state_dict(*towers)
    sd["text_model.embeddings.position_ids"] = np.arange(16)[None]
    clip_params_from_torch(sd, *towers)  # the buffer is consumed

    leftover = dict(sd, **{"vision_model.embeddings.position_ids": np.arange(17)[None]})
    with pytest.raises(CheckpointMismatchError, match=r"vision_model\.embeddings\.position_ids"):
        clip_params_from_torch(leftover, *towers, path="text_encoder/model.safetensors")
    missing = dict(sd)
    del missing["text_model.encoder.layers.1.mlp.fc1.weight"]
    with pytest.raises(CheckpointMismatchError, match=r"missing.*text_model\.encoder\.layers\.1\.mlp\.fc1\.weight"):
        clip_params_from_torch(missing, *towers)
    wrong = dict(sd, **{"text_model.final_layer_norm.bias": np.zeros(31, np.float32)})
    with pytest.raises(CheckpointMismatchError, match=r"text_model\.final_layer_norm\.bias: shape \(31,\)"):
        clip_params_from_torch(wrong, *towers)
    with pytest.raises(CheckpointMismatchError, match=r"text_projection\.weight"):
        clip_params_from_torch(random_state_dict(SMALL_TEXT, SMALL_VISION, PROJECTION), *towers)


def test_configs_from_dict():
    full = config_json("clip", "gelu", 2)
    text, vision, projection = clip_configs_from_dict(full, file="clip/config.json")
    assert text == dataclasses.replace(SMALL_TEXT, hidden_act="gelu", eos_token_id=2)
    assert vision == dataclasses.replace(SMALL_VISION, hidden_act="gelu")
    assert projection == PROJECTION
    legacy = dict(full, text_config_dict=dict(full["text_config"], hidden_act="quick_gelu"))
    assert clip_configs_from_dict(legacy, file="c")[0].hidden_act == "quick_gelu"
    sd_text = config_json("clip_text_model", "quick_gelu", 2)
    assert clip_configs_from_dict(sd_text, file="t") == (dataclasses.replace(SMALL_TEXT, eos_token_id=2), None, None)
    with_projection = dict(sd_text, architectures=["CLIPTextModelWithProjection"])
    assert clip_configs_from_dict(with_projection, file="t")[2] == PROJECTION
    assert clip_configs_from_dict({"model_type": "clip"}, file="c") == (CLIPTextConfig(), CLIPVisionConfig(), 512)


@pytest.mark.parametrize("edit, match", [
    (lambda c: c["text_config"].update(hidden_act="relu"), r"bad/config\.json: text_config\.hidden_act = 'relu'"),
    (lambda c: c["vision_config"].update(hidden_act="gelu_new"), r"vision_config\.hidden_act"),
    (lambda c: c["vision_config"].update(num_attention_heads=5), r"vision_config\.hidden_size = 32 is not a multiple"),
    (lambda c: c["text_config"].update(num_hidden_layers=2.0), r"text_config\.num_hidden_layers must be"),
    (lambda c: c["text_config"].update(eos_token_id=None), r"text_config\.eos_token_id"),
    (lambda c: c.update(projection_dim=0), r"projection_dim must be a positive integer"),
    (lambda c: c.update(model_type="siglip"), r"model_type 'siglip' is not a CLIP model"),
])
def test_unsupported_config_values(edit, match):
    raw = config_json("clip", "quick_gelu", 5)
    edit(raw)
    with pytest.raises(ValueError, match=match):
        clip_configs_from_dict(raw, file="bad/config.json")


def test_sd_text_config_error_names_key():
    raw = dict(config_json("clip_text_model", "quick_gelu", 2), hidden_act="silu")
    with pytest.raises(ValueError, match=r"text_encoder/config\.json: hidden_act = 'silu'"):
        clip_configs_from_dict(raw, file="text_encoder/config.json")


def test_input_errors():
    module = CLIPModel(SMALL_TEXT, SMALL_VISION, PROJECTION)
    params = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), jax.eval_shape(
        module.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32), jnp.zeros((1, 32, 32, 3))))
    with pytest.raises(ValueError, match="exceed max_position_embeddings"):
        module.apply(params, jnp.zeros((1, 17), jnp.int32), method="text_outputs")
    with pytest.raises(ValueError, match="channels last"):
        module.apply(params, jnp.zeros((1, 3, 32, 32)), method="vision_outputs")
    text_only = CLIPModel(SMALL_TEXT)
    with pytest.raises(ValueError, match="projection_dim=None"):
        text_only.apply({"params": {"text_model": params["params"]["text_model"]}}, jnp.zeros((1, 4), jnp.int32),
                        method="text_embeddings")


def _torch_projection(raw, state_dict, tower, inputs) -> np.ndarray:
    """transformers' ``text_embeds`` of ids or ``image_embeds`` of channels-last pixels."""
    import torch
    model, _ = _torch_model(raw, state_dict)
    with torch.no_grad():
        if tower == "text":
            return model(torch.from_numpy(inputs.astype(np.int64))).text_embeds.numpy()
        return model(torch.from_numpy(inputs.transpose(0, 3, 1, 2).copy())).image_embeds.numpy()


@pytest.mark.parametrize("tower", ["text", "vision"])
def test_with_projection_variants_match_transformers(tower):
    """CLIPTextModelWithProjection / CLIPVisionModelWithProjection: one tower and its projection."""
    arch = f"CLIP{tower.capitalize()}ModelWithProjection"
    raw = dict(config_json("clip", "quick_gelu", 5)[f"{tower}_config"], projection_dim=PROJECTION, architectures=[arch])
    configs = clip_configs_from_dict(raw, file=arch)
    assert (configs[0] is None, configs[1] is None, configs[2]) == (tower != "text", tower == "text", PROJECTION)
    state_dict = random_state_dict(*configs, seed=3)
    params = clip_params_from_torch(state_dict, *configs, path=arch)
    module = CLIPModel(*configs)
    if tower == "text":
        inputs = token_ids(5, seed=4)
        got = jax.jit(lambda p, i: module.apply({"params": p}, i, method="text_embeddings"))(params, inputs)
    else:
        inputs = np.random.default_rng(4).normal(size=(BATCH, 32, 32, 3)).astype(np.float32)
        got = jax.jit(lambda p, x: module.apply({"params": p}, x, method="image_embeddings"))(params, inputs)
    expected = torch_reference(GROUP, arch, lambda: _torch_projection(raw, state_dict, tower, inputs))
    assert rel(got, expected) < 1e-4
