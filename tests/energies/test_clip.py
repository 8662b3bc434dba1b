"""CLIP energies against PyTorch ``CLIPModel`` on a tiny random CLIP (no download, no hub).

The tiny CLIP is written by ``experiments/tiny_models.py`` (numpy random weights, PyTorch key
layout); the references are transformers' ``CLIPModel.from_pretrained`` of that very folder,
computed live where PyTorch is installed and read from ``tests/references/energies_clip.safetensors``
elsewhere (``tests/references.py``)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.references import torch_reference
from zmagic_jax.energies import (CLIP_MEAN, CLIP_STD, clip_image_input, clip_style_energy,
                                 clip_style_features, clip_text_energy, image_embedding, load_clip,
                                 text_embedding)
from zmagic_jax.energies import safe_norm

LAYER = 3
GROUP = "energies_clip"


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
    """The tiny random CLIP folder and the library's load of it."""
    return dict(path=tiny_clip_dirs["path"], clip=load_clip(tiny_clip_dirs["path"]))


def images(seed, num=None, size=(40, 28)):
    shape = size + (3,) if num is None else (num,) + size + (3,)
    return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


@functools.lru_cache(maxsize=1)
def _torch_clip(path):
    import transformers
    return (transformers.CLIPModel.from_pretrained(str(path), local_files_only=True).eval(),
            transformers.CLIPTokenizer.from_pretrained(str(path), local_files_only=True))


def torch_pixels(image):
    """The reference preprocessing: bicubic ``F.interpolate`` then ``Normalize`` on ``(x + 1) / 2``."""
    import torch
    import torch.nn.functional as F
    x = torch.from_numpy(np.asarray(image)).permute(2, 0, 1)[None]
    x = F.interpolate(x, size=(32, 32), mode="bicubic", align_corners=False)
    mean, std = torch.tensor(CLIP_MEAN)[:, None, None], torch.tensor(CLIP_STD)[:, None, None]
    return ((x + 1) / 2 - mean) / std


def _features(out):
    """The projected embedding of one input: transformers 4 returns the tensor, transformers 5 an
    output whose ``pooler_output`` holds it."""
    return getattr(out, "pooler_output", out)[0].numpy()


def _torch_text(path, prompt):
    import torch
    model, tokenizer = _torch_clip(path)
    with torch.no_grad():
        return _features(model.get_text_features(input_ids=torch.tensor([tokenizer(prompt)["input_ids"]])))


def _torch_image(path, image):
    import torch
    with torch.no_grad():
        return _features(_torch_clip(path)[0].get_image_features(pixel_values=torch_pixels(image)))


def _torch_hidden(path, image, layer):
    import torch
    with torch.no_grad():
        out = _torch_clip(path)[0].vision_model(pixel_values=torch_pixels(image), output_hidden_states=True)
    return out.hidden_states[layer][0, 1:].numpy()


# The references, by a name that says what they are (the inputs are fixed seeds).
def torch_text(tiny, prompt):
    return torch_reference(GROUP, f"text/{prompt}", lambda: _torch_text(tiny["path"], prompt))


def torch_image(tiny, image, name):
    return torch_reference(GROUP, f"image/{name}", lambda: _torch_image(tiny["path"], image))


def torch_style(tiny, image, name, layer=LAYER):
    return torch_reference(GROUP, f"hidden{layer}/{name}", lambda: _torch_hidden(tiny["path"], image, layer))


def gram(f):
    f = np.asarray(f, np.float64)
    return f.T @ f


def cosine_distance(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return 1.0 - a @ b / (np.linalg.norm(a) * np.linalg.norm(b))


def rel_err(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return np.max(np.abs(a - b)) / np.max(np.abs(b))


def test_folder_loads_the_params_written(tiny, tiny_clip_dirs):
    clip = tiny["clip"]
    assert clip.image_size == 32
    written = jax.tree.leaves(tiny_clip_dirs["params"])
    assert len(jax.tree.leaves(clip.params)) == len(written)
    for a, b in zip(jax.tree.leaves(clip.params), written):
        np.testing.assert_array_equal(a, b)


def test_image_input_matches_torch_preprocessing(tiny):
    image = images(0)
    out = clip_image_input(tiny["clip"], image)
    assert out.shape == (1, 3, 32, 32)
    ref = torch_reference(GROUP, "pixels/0", lambda: torch_pixels(image).numpy())
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_embeddings_and_style_features_match_torch(tiny):
    clip, image = tiny["clip"], images(1)
    for prompt in ("a cat", "a cat to a cat!"):
        assert rel_err(text_embedding(clip, prompt), torch_text(tiny, prompt)) < 1e-4
    embedding, features = jax.jit(lambda x: (image_embedding(clip, x), clip_style_features(clip, x, LAYER)))(image)
    assert rel_err(embedding, torch_image(tiny, image, "1")) < 1e-4
    assert features.shape == (16, 32)
    assert rel_err(features, torch_style(tiny, image, "1")) < 1e-4


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
    text, ref_style = torch_text(tiny, "a cat"), torch_style(tiny, ref, "3")
    for i, (image, seed) in enumerate(zip(batch[:2], ("2", "4"))):
        emb, style = torch_image(tiny, image, seed), torch_style(tiny, image, seed)
        expected = {"freedom": np.linalg.norm(np.asarray(text, np.float64) - emb),
                    "cosine": cosine_distance(text, emb),
                    "style": np.linalg.norm(gram(style) - gram(ref_style))}
        for name, value in expected.items():
            energy, grad = results[name][0][i], results[name][1][i]
            assert rel_err(energy, value) < 1e-4, name
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
        (folder / name).write_bytes((tiny["path"] / name).read_bytes())
    with pytest.raises(FileNotFoundError, match=r"(?s)no weight file.*model\.safetensors.*pytorch_model\.bin"):
        load_clip(folder)
    (folder / "flax_model.msgpack").write_bytes(b"old")
    with pytest.raises(FileNotFoundError, match=r"(?s)Flax weights \(flax_model\.msgpack\).*PyTorch weights"):
        load_clip(folder)
    (folder / "model.safetensors").write_bytes((tiny["path"] / "model.safetensors").read_bytes())
    (folder / "vocab.json").unlink()
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        load_clip(folder)


@pytest.mark.parametrize("name", ["model.safetensors", "pytorch_model.bin"])
def test_garbage_weights(tmp_path, tiny, name):
    for file in ("config.json", "vocab.json", "merges.txt"):
        (tmp_path / file).write_bytes((tiny["path"] / file).read_bytes())
    (tmp_path / name).write_bytes(np.random.default_rng(0).bytes(300))
    expected = "is not a valid .safetensors file" if name.endswith(".safetensors") else "could not read"
    with pytest.raises(ValueError, match=f"(?s)({expected}.*{name}|{name}.*{expected})"):
        load_clip(tmp_path)


def test_bad_mode_and_layer(tiny):
    with pytest.raises(ValueError, match="mode must be 'freedom' or 'cosine'"):
        clip_text_energy(tiny["clip"], "a cat", mode="l2")
    with pytest.raises(ValueError, match="layer must be a hidden_states index"):
        clip_style_energy(tiny["clip"], images(0), layer=5)


def test_content_style_and_text_metrics_equal_torch_formulas(tiny):
    """One image's metrics against PyTorch: content = mean squared CLIP feature difference,
    style = Frobenius norm of the Gram difference (the style energy's value), text distance =
    1 - cosine (from a prompt or its embedding); the content energy is the content loss, with a
    finite nonzero gradient under jit and vmap."""
    from zmagic_jax.energies import clip_content_energy, clip_content_loss, clip_style_loss, clip_text_distance

    clip, image, content, style = tiny["clip"], images(5), images(6, size=(32, 32)), images(7, size=(20, 20))
    layer = 2
    f = np.asarray(torch_style(tiny, image, "5", layer), np.float64)
    fc = np.asarray(torch_style(tiny, content, "6", layer), np.float64)
    expected_content = np.mean((f - fc) ** 2)
    expected_style = np.linalg.norm(gram(torch_style(tiny, image, "5")) - gram(torch_style(tiny, style, "7")))
    expected_text = cosine_distance(torch_text(tiny, "a cat"), torch_image(tiny, image, "5"))

    metrics = jax.jit(lambda x, c, s, e: (clip_content_loss(clip, x, c, layer), clip_style_loss(clip, x, s, LAYER),
                                          clip_text_distance(clip, x, e)))
    content_loss, style_loss, text_distance = metrics(image, content, style, text_embedding(clip, "a cat"))
    assert rel_err(content_loss, expected_content) < 1e-4
    assert rel_err(style_loss, expected_style) < 1e-4
    assert rel_err(text_distance, expected_text) < 1e-4
    assert rel_err(clip_text_distance(clip, image, "a cat"), expected_text) < 1e-4
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
