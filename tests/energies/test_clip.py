"""CLIP energies against PyTorch ``CLIPModel`` on a tiny random CLIP (no download, no hub)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from zmagic_jax.energies import (CLIP_MEAN, CLIP_STD, clip_image_input, clip_style_energy,
                                 clip_style_features, clip_text_energy, image_embedding, load_clip,
                                 text_embedding)
from zmagic_jax.energies import safe_norm

LAYER = 3


@jax.jit
def _value(energy, x):
    """An energy of one image: its weights and reference are arguments of the compiled program."""
    return energy(x)


@jax.jit
def _values_and_grads(energies, batch):
    """``{name: (values, gradients)}`` of a dict of energies over a batch, in one program."""
    return {name: jax.vmap(jax.value_and_grad(energy))(batch) for name, energy in energies.items()}


@pytest.fixture(scope="module")
def tiny(tiny_clip_dirs):
    """The tiny random CLIP in PyTorch format (``pt_dir``) and Flax format (``flax_dir``)."""
    return dict(torch=tiny_clip_dirs["torch"], tokenizer=tiny_clip_dirs["tokenizer"],
                pt_dir=tiny_clip_dirs["pt"], flax_dir=tiny_clip_dirs["flax"],
                clip_pt=load_clip(tiny_clip_dirs["pt"]), clip=load_clip(tiny_clip_dirs["flax"]))


def images(seed, num=None, size=(40, 28)):
    shape = size + (3,) if num is None else (num,) + size + (3,)
    return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


def torch_pixels(image):
    """The reference preprocessing: bicubic ``F.interpolate`` then ``Normalize`` on ``(x + 1) / 2``."""
    x = torch.from_numpy(np.asarray(image)).permute(2, 0, 1)[None]
    x = F.interpolate(x, size=(32, 32), mode="bicubic", align_corners=False)
    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    return ((x + 1) / 2 - mean) / std


def torch_text(tiny, prompt):
    ids = torch.tensor([tiny["tokenizer"](prompt)["input_ids"]])
    with torch.no_grad():
        return tiny["torch"].get_text_features(input_ids=ids)[0]


def torch_image(tiny, image):
    with torch.no_grad():
        return tiny["torch"].get_image_features(pixel_values=torch_pixels(image))[0]


def torch_style(tiny, image):
    with torch.no_grad():
        out = tiny["torch"].vision_model(pixel_values=torch_pixels(image), output_hidden_states=True)
    return out.hidden_states[LAYER][0, 1:]


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.max(np.abs(a - b)) / np.max(np.abs(b))


def test_both_formats_load_and_agree(tiny):
    clip, clip_pt = tiny["clip"], tiny["clip_pt"]
    assert clip.image_size == clip_pt.image_size == 32
    for a, b in zip(jax.tree.leaves(clip.params), jax.tree.leaves(clip_pt.params)):
        np.testing.assert_array_equal(a, b)


def test_image_input_matches_torch_preprocessing(tiny):
    image = images(0)
    out = clip_image_input(tiny["clip"], image)
    assert out.shape == (1, 3, 32, 32)
    np.testing.assert_allclose(out, torch_pixels(image).numpy(), rtol=1e-5, atol=1e-5)


def test_embeddings_and_style_features_match_torch(tiny):
    clip, image = tiny["clip"], images(1)
    for prompt in ("a cat", "a cat to a cat!"):
        assert rel_err(text_embedding(clip, prompt), torch_text(tiny, prompt).numpy()) < 1e-4
    embedding, features = jax.jit(lambda x: (image_embedding(clip, x), clip_style_features(clip, x, LAYER)))(image)
    assert rel_err(embedding, torch_image(tiny, image).numpy()) < 1e-4
    assert features.shape == (16, 32)
    assert rel_err(features, torch_style(tiny, image).numpy()) < 1e-4


def test_energies_equal_torch_formulas_under_jit_vmap_grad(tiny):
    """All three energies in one compiled ``vmap(value_and_grad)`` over a batch whose last image is
    the style reference: values equal the formulas evaluated with PyTorch, gradients are finite
    and nonzero, and the style energy of the reference is ~0."""
    clip, ref = tiny["clip"], images(3, size=(24, 36))
    batch = np.stack([images(2, size=(24, 36)), images(4, size=(24, 36)), ref])
    energies = {"freedom": clip_text_energy(clip, "a cat", "freedom"),
                "cosine": clip_text_energy(clip, "a cat", "cosine"),
                "style": clip_style_energy(clip, ref, LAYER)}
    results = _values_and_grads(energies, batch)
    text, ref_style = torch_text(tiny, "a cat"), torch_style(tiny, ref).double()
    for i, image in enumerate(batch[:2]):
        emb, style = torch_image(tiny, image), torch_style(tiny, image).double()
        expected = {"freedom": torch.linalg.norm(text - emb),
                    "cosine": 1 - F.cosine_similarity(text, emb, dim=0),
                    "style": torch.linalg.norm(style.T @ style - ref_style.T @ ref_style)}
        for name, value in expected.items():
            energy, grad = results[name][0][i], results[name][1][i]
            assert rel_err(energy, value.numpy()) < 1e-4, name
            assert np.all(np.isfinite(grad)) and np.max(np.abs(grad)) > 0, name
    # ~0 up to float32 round-off (the reference was computed by a separately compiled graph, so
    # the residual is tiny but not exactly zero and the gradient of its norm stays O(1)).
    assert abs(float(results["style"][0][2])) < 1e-5 * float(results["style"][0][0])
    assert np.all(np.isfinite(results["style"][1][2]))
    # The energies are functions of one image: unbatched calls agree with the vmapped ones.
    np.testing.assert_allclose(_value(energies["cosine"], batch[1]), results["cosine"][0][1], rtol=1e-5)


def test_norm_at_the_minimum_has_zero_gradient():
    """At an exact match the guidance step must be zero, not NaN (the gradient of sqrt at 0)."""
    np.testing.assert_array_equal(jax.grad(safe_norm)(jnp.zeros((4, 4))), 0.0)
    np.testing.assert_allclose(jax.grad(safe_norm)(jnp.array([3.0, 4.0])), [0.6, 0.8], rtol=1e-6)


def test_missing_folder_files_and_weights(tmp_path, tiny):
    with pytest.raises(FileNotFoundError, match=r"(?s)no such folder.*config\.json.*openai/clip-vit-base-patch16"
                                                r".*never downloads"):
        load_clip(tmp_path / "nowhere")
    folder = tmp_path / "noweights"
    folder.mkdir()
    for name in ("config.json", "vocab.json", "merges.txt"):
        (folder / name).write_bytes((tiny["flax_dir"] / name).read_bytes())
    with pytest.raises(FileNotFoundError, match=r"(?s)no weight file.*flax_model\.msgpack.*model\.safetensors"):
        load_clip(folder)
    (folder / "vocab.json").unlink()
    with pytest.raises(FileNotFoundError, match="missing vocab.json"):
        load_clip(folder)


@pytest.mark.parametrize("name", ["flax_model.msgpack", "model.safetensors", "pytorch_model.bin"])
def test_garbage_weights(tmp_path, tiny, name):
    for file in ("config.json", "vocab.json", "merges.txt"):
        (tmp_path / file).write_bytes((tiny["flax_dir"] / file).read_bytes())
    (tmp_path / name).write_bytes(np.random.default_rng(0).bytes(300))
    expected = "is not a valid .safetensors file" if name.endswith(".safetensors") else "could not read CLIP weights"
    with pytest.raises(ValueError, match=f"(?s)({expected}.*{name}|{name}.*{expected})"):
        load_clip(tmp_path)


def test_bad_mode_and_layer(tiny):
    with pytest.raises(ValueError, match="mode must be 'freedom' or 'cosine'"):
        clip_text_energy(tiny["clip"], "a cat", mode="l2")
    with pytest.raises(ValueError, match="layer must be a hidden_states index"):
        clip_style_energy(tiny["clip"], images(0), layer=5)


def torch_content(tiny, image, layer):
    with torch.no_grad():
        out = tiny["torch"].vision_model(pixel_values=torch_pixels(image), output_hidden_states=True)
    return out.hidden_states[layer][0, 1:].double()


def test_content_style_and_text_metrics_equal_torch_formulas(tiny):
    """One image's metrics against PyTorch: content = mean squared CLIP feature difference,
    style = Frobenius norm of the Gram difference (the style energy's value), text distance =
    1 - cosine (from a prompt or its embedding); the content energy is the content loss, with a
    finite nonzero gradient under jit and vmap."""
    from zmagic_jax.energies import clip_content_energy, clip_content_loss, clip_style_loss, clip_text_distance

    clip, image, content, style = tiny["clip"], images(5), images(6, size=(32, 32)), images(7, size=(20, 20))
    layer = 2
    f, fc = torch_content(tiny, image, layer), torch_content(tiny, content, layer)
    expected_content = torch.mean((f - fc) ** 2)
    fs, fx = torch_style(tiny, style).double(), torch_style(tiny, image).double()
    expected_style = torch.linalg.norm(fx.T @ fx - fs.T @ fs)
    expected_text = 1 - F.cosine_similarity(torch_text(tiny, "a cat"), torch_image(tiny, image), dim=0)

    metrics = jax.jit(lambda x, c, s, e: (clip_content_loss(clip, x, c, layer), clip_style_loss(clip, x, s, LAYER),
                                          clip_text_distance(clip, x, e)))
    content_loss, style_loss, text_distance = metrics(image, content, style, text_embedding(clip, "a cat"))
    assert rel_err(content_loss, expected_content.numpy()) < 1e-4
    assert rel_err(style_loss, expected_style.numpy()) < 1e-4
    assert rel_err(text_distance, expected_text.numpy()) < 1e-4
    assert rel_err(clip_text_distance(clip, image, "a cat"), expected_text.numpy()) < 1e-4
    np.testing.assert_allclose(_value(clip_style_energy(clip, style, LAYER), image), style_loss, rtol=1e-5)

    energy = clip_content_energy(clip, content, layer)
    values, grads = _values_and_grads({"content": energy}, np.stack([image, images(8)]))["content"]
    np.testing.assert_allclose(values[0], content_loss, rtol=1e-5)
    assert np.all(np.isfinite(grads)) and np.max(np.abs(grads)) > 0
    assert float(_value(energy, content)) < 1e-10  # the content reference itself


def test_content_and_metric_layers_are_checked(tiny):
    from zmagic_jax.energies import clip_content_energy, clip_content_loss, clip_style_loss

    with pytest.raises(ValueError, match=r"clip_content_energy: layer must be a hidden_states index in \[0, 4\]"):
        clip_content_energy(tiny["clip"], images(0), layer=5)
    with pytest.raises(ValueError, match="clip_content_loss: layer"):
        clip_content_loss(tiny["clip"], images(0), images(1), layer=-1)
    with pytest.raises(ValueError, match="clip_style_loss: layer"):
        clip_style_loss(tiny["clip"], images(0), images(1), layer=2.0)
