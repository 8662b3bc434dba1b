"""CLIP energies: text guidance and style guidance on the clean-image estimate ``x0``.

The energy constructors return an :class:`~zmagic_jax.Energy` ``(fn, params)`` for ONE
``(H, W, 3)`` image in ``[-1, 1]``: the CLIP weights and the reference (text embedding, style Gram
matrix, content features) are its params, arguments of the compiled program; pure JAX (jit /
vmap / grad friendly). Gradients are taken by the schemes, never in here.

* Text (FreeDoM: Yu et al., "FreeDoM: Training-Free Energy-Guided Conditional Diffusion Model",
  ICCV 2023): ``E(x0) = || e_T - e_I(x0) ||_2`` on the projected, *unnormalised* CLIP
  embeddings. Z-Magic (Deng, He, Tang & Dong, CVPR 2025, arXiv:2503.12124) measures the same
  condition as a cosine distance ``1 - cos(e_T, e_I(x0))``.
* Style (FreeDoM): ``E(x0) = || G(F(x0)) - G(F(ref)) ||_F`` with ``F`` the CLIP vision tokens
  after a few encoder blocks and ``G(F) = F^T F`` the Gram matrix.
* Content (a perceptual loss to a reference image): the mean squared difference of those CLIP
  tokens, standing in for the usual VGG content loss (no VGG weights are available here).

Metrics of one image (Z-Magic Table 2 style): :func:`clip_content_loss`, :func:`clip_style_loss`
and :func:`clip_text_distance`.

Weights are read from a local folder only; this module never downloads anything.
"""
from __future__ import annotations

import functools
import os
from types import SimpleNamespace
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from zmagic_jax.contracts import Energy, Keyed, static_partial
from zmagic_jax.energies._image import CLIP_MEAN, CLIP_STD, gram_matrix, normalize_signed, resize_bicubic, safe_norm

_FLAX_WEIGHTS = "flax_model.msgpack"
_PT_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
_TOKENIZER_FILES = ("vocab.json", "merges.txt")
_WHERE_TO_GET = ("Such weights (e.g. openai/clip-vit-base-patch16, openai/clip-vit-large-patch14) are "
                 "published on the Hugging Face Hub and must be downloaded by you; this library never "
                 "downloads.")


class Clip(NamedTuple):
    """A loaded CLIP: the transformers ``FlaxCLIPModel`` (used only for its ``module``), its
    parameters, the ``CLIPTokenizer`` and the vision input resolution."""
    model: Any
    params: Any
    tokenizer: Any
    image_size: int


def _missing(path, what):
    return FileNotFoundError(
        f"load_clip: {what} in {path!r}. Expected a local CLIP folder with config.json, "
        f"{' and '.join(_TOKENIZER_FILES)} (tokenizer) and weights as {_FLAX_WEIGHTS} (Flax) or "
        f"{' / '.join(_PT_WEIGHTS)} (PyTorch, converted on load). {_WHERE_TO_GET}")


def load_clip(path, dtype=jnp.float32) -> Clip:
    """Load a CLIP model, parameters and tokenizer from the local folder ``path``.

    Flax weights (``flax_model.msgpack``) are preferred; otherwise PyTorch weights
    (``model.safetensors``, or ``pytorch_model.bin`` which needs torch) are converted on load.
    ``dtype`` is the computation dtype; floating parameters are cast to it as well.
    """
    from transformers import CLIPConfig, CLIPTokenizer, FlaxCLIPModel

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise _missing(path, "no such folder")
    for name in ("config.json",) + _TOKENIZER_FILES:
        if not os.path.isfile(os.path.join(path, name)):
            raise _missing(path, f"missing {name}")
    if os.path.isfile(os.path.join(path, _FLAX_WEIGHTS)):
        weights, from_pt = _FLAX_WEIGHTS, False
    else:
        present = [name for name in _PT_WEIGHTS if os.path.isfile(os.path.join(path, name))]
        if not present:
            raise _missing(path, "no weight file")
        weights, from_pt = present[0], True
    if weights == "pytorch_model.bin":
        try:
            import torch  # noqa: F401  (a pickled checkpoint is read with torch.load; safetensors is not)
        except ImportError as err:
            raise ImportError(f"load_clip: {os.path.join(path, weights)} is a pickled PyTorch checkpoint; "
                              f"reading it needs torch installed (or save Flax weights once with "
                              f"FlaxCLIPModel.save_pretrained).") from err
    if weights.endswith(".safetensors"):  # checked structure first (a clear error for a damaged file)
        from zmagic_jax.checkpoint_io import read_safetensors_header
        read_safetensors_header(os.path.join(path, weights), "CLIP weight file")
    # _do_init=False: no random initialisation, only the abstract parameter shapes.
    model = FlaxCLIPModel(CLIPConfig.from_pretrained(path, local_files_only=True), dtype=dtype, _do_init=False)
    try:
        params = _read_weights(model, os.path.join(path, weights), from_pt)
    except ImportError:
        raise
    # Broad on purpose: a corrupt file surfaces as whatever its deserialiser raises
    # (UnicodeDecodeError for msgpack, SafetensorError, UnpicklingError, ...); the cause is chained.
    except Exception as err:
        raise ValueError(f"load_clip: could not read CLIP weights {os.path.join(path, weights)!r} "
                         f"({type(err).__name__}: {err}). Is the file complete and a CLIP checkpoint?") from err
    params = jax.tree.map(lambda p: jnp.asarray(p, dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p,
                          params)
    tokenizer = CLIPTokenizer.from_pretrained(path, local_files_only=True)
    return Clip(model, params, tokenizer, int(model.config.vision_config.image_size))


def _read_weights(model, file, from_pt):
    """Parameters of ``model`` (built with ``_do_init=False``) read from ``file``.

    transformers' own ``from_pt`` path first initialises the whole network at random, eagerly
    (one XLA compilation per op: ~15 s on CPU even for a tiny CLIP), only to read parameter
    shapes from it. Its converter needs nothing but ``params`` and ``base_model_prefix``, so it is
    given the abstract shapes instead."""
    from flax.serialization import msgpack_restore
    from flax.traverse_util import flatten_dict
    from transformers.modeling_flax_pytorch_utils import load_pytorch_checkpoint_in_flax_state_dict

    expected = flatten_dict(model.params_shape_tree)
    if from_pt:
        shapes = SimpleNamespace(params=model.params_shape_tree, base_model_prefix=model.base_model_prefix)
        params = load_pytorch_checkpoint_in_flax_state_dict(shapes, file, is_sharded=False)
    else:
        with open(file, "rb") as handle:
            params = msgpack_restore(handle.read())
    found = flatten_dict(params)
    if set(found) != set(expected):
        missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
        raise ValueError(f"parameters do not match the config: missing {missing[:5]}, unexpected {unexpected[:5]}")
    for key, leaf in expected.items():
        if tuple(found[key].shape) != tuple(leaf.shape):
            raise ValueError(f"parameter {'/'.join(key)} has shape {found[key].shape}, config says {leaf.shape}")
    return params


def clip_image_input(clip: Clip, image):
    """Differentiable CLIP preprocessing of one ``[-1, 1]`` image ``(H, W, 3)``: PyTorch-exact
    bicubic resize to ``(image_size, image_size)``, then ``Normalize(CLIP_MEAN, CLIP_STD)`` of the
    ``[0, 1]`` image. Returns the model's NCHW pixel batch ``(1, 3, S, S)``.

    As in FreeDoM the whole image is resized (no centre crop), so all of ``x0`` is guided."""
    image = jnp.asarray(image)
    if image.ndim != 3 or image.shape[-1] != 3:
        raise ValueError(f"clip_image_input: image must be one (H, W, 3) array (vmap for batches); "
                         f"got shape {image.shape}.")
    resized = resize_bicubic(image, (clip.image_size, clip.image_size))
    return jnp.transpose(normalize_signed(resized, CLIP_MEAN, CLIP_STD), (2, 0, 1))[None]


# The Flax CLIP wrappers (get_image_features etc.) transpose NCHW -> NHWC and wrap the pixels in
# jnp.array; calling the module directly keeps one code path for embeddings and hidden states.
def _image_features(module, pixels_nhwc):
    pooled = module.vision_model(pixel_values=pixels_nhwc, deterministic=True)[1]
    return module.visual_projection(pooled)


def _vision_hidden_state(module, pixels_nhwc, layer):
    out = module.vision_model(pixel_values=pixels_nhwc, deterministic=True, output_hidden_states=True)
    return out.hidden_states[layer]


def _text_features(module, input_ids, attention_mask, position_ids):
    pooled = module.text_model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                               deterministic=True)[1]
    return module.text_projection(pooled)


def _nhwc(clip, image):
    return jnp.transpose(clip_image_input(clip, image), (0, 2, 3, 1))


def image_embedding(clip: Clip, image):
    """Projected CLIP image embedding ``(D,)`` (not normalised) of one ``[-1, 1]`` image."""
    return clip.model.module.apply({"params": clip.params}, _nhwc(clip, image), method=_image_features)[0]


def text_embedding(clip: Clip, prompt: str):
    """Projected CLIP text embedding ``(D,)`` (not normalised) of ``prompt``, computed once.

    No padding is needed: the text transformer is causal and pools at the end-of-text token,
    so tokens after it cannot change the embedding."""
    if not isinstance(prompt, str):
        raise TypeError(f"text_embedding: prompt must be a str; got {type(prompt).__name__}.")
    max_length = clip.model.config.text_config.max_position_embeddings
    ids = np.asarray(clip.tokenizer(prompt, truncation=True, max_length=max_length)["input_ids"], np.int32)[None]
    positions = np.arange(ids.shape[1], dtype=np.int32)[None]
    # Jitted as one program: run eagerly, Flax compiles every op separately (seconds per prompt).
    features = jax.jit(functools.partial(clip.model.module.apply, method=_text_features))
    return features({"params": clip.params}, ids, np.ones_like(ids), positions)[0]


def clip_architecture(clip: Clip) -> Keyed:
    """The static part of a :class:`Clip` (everything but its parameters), keyed by its config:
    programs compiled for one loaded CLIP serve every other of the same architecture."""
    return Keyed(clip._replace(params=None), (clip.model.config.to_json_string(), clip.image_size))


def with_params(architecture, params) -> Clip:
    """The :class:`Clip` of :func:`clip_architecture` (or a :class:`Clip`) with ``params``."""
    clip = architecture.value if isinstance(architecture, Keyed) else architecture
    return clip._replace(params=params)


def _text_energy(arch, mode, params, x0):
    weights, text = params
    image = image_embedding(with_params(arch, weights), x0)
    if mode == "freedom":
        return safe_norm(text - image)
    return 1.0 - jnp.dot(text, image) / (jnp.linalg.norm(text) * jnp.linalg.norm(image))


def clip_text_energy(clip: Clip, prompt, mode: str = "freedom") -> Energy:
    """CLIP text energy of ``x0`` for ``prompt``, with ``e_T`` the text and ``e_I(x0)`` the image
    embedding (both projected, unnormalised):

    * ``mode="freedom"``: ``E(x0) = || e_T - e_I(x0) ||_2`` (FreeDoM's residual norm);
    * ``mode="cosine"``: ``E(x0) = 1 - <e_T, e_I(x0)> / (|e_T| |e_I(x0)|)`` (Z-Magic's text
      distance, insensitive to the embedding scale).

    ``prompt`` is a string or its :func:`text_embedding`; params ``(clip.params, e_T)``.
    """
    if mode not in ("freedom", "cosine"):
        raise ValueError(f"clip_text_energy: mode must be 'freedom' or 'cosine'; got {mode!r}.")
    text = text_embedding(clip, prompt) if isinstance(prompt, str) else jnp.asarray(prompt)
    return Energy(static_partial(_text_energy, clip_architecture(clip), mode), (clip.params, text))


def clip_style_features(clip: Clip, image, layer: int = 3):
    """Vision-transformer tokens ``(tokens, channels)`` of one ``[-1, 1]`` image after ``layer``
    encoder blocks, CLS token dropped. ``layer`` indexes transformers' ``hidden_states``, where
    ``hidden_states[0]`` is the embedding output (after CLIP's pre-LayerNorm) and ``hidden_states[k]`` the
    output of block ``k - 1``."""
    num_layers = clip.model.config.vision_config.num_hidden_layers
    if not 0 <= layer <= num_layers:
        raise ValueError(f"clip_style_features: layer must be a hidden_states index in [0, {num_layers}]; "
                         f"got {layer}.")
    hidden = clip.model.module.apply({"params": clip.params}, _nhwc(clip, image), layer,
                                     method=_vision_hidden_state)
    return hidden[0, 1:]


def clip_style_energy(clip: Clip, style_image, layer: int = 3):
    """FreeDoM's style energy ``E(x0) = || G(F(x0)) - G(F(ref)) ||_F``.

    ``F`` are the CLIP vision tokens (CLS dropped) after ``layer`` encoder blocks and
    ``G(F) = F^T F`` the Gram matrix. FreeDoM takes the output of residual block index 2 of
    OpenAI's CLIP, which is ``hidden_states[3]`` in transformers' numbering (``hidden_states[0]``
    is the embedding output); ``layer`` is that ``hidden_states`` index, 3 by default. The
    reference ``style_image`` is a ``[-1, 1]`` ``(H, W, 3)`` array; its Gram matrix is computed
    once, here; params ``(clip.params, reference Gram matrix)``.
    """
    layer = _check_layer(clip, layer, "clip_style_energy")
    reference = jax.jit(lambda params, image: gram_matrix(clip_style_features(with_params(clip, params), image, layer)))(
        clip.params, style_image)
    return Energy(static_partial(_style_energy, clip_architecture(clip), layer), (clip.params, reference))


def _style_energy(arch, layer, params, x0):
    weights, reference = params
    return safe_norm(gram_matrix(clip_style_features(with_params(arch, weights), x0, layer)) - reference)


def _check_layer(clip: Clip, layer, who: str) -> int:
    num_layers = clip.model.config.vision_config.num_hidden_layers
    if isinstance(layer, bool) or not isinstance(layer, (int, np.integer)) or not 0 <= layer <= num_layers:
        raise ValueError(f"{who}: layer must be a hidden_states index in [0, {num_layers}]; got {layer!r}.")
    return int(layer)


def clip_content_loss(clip: Clip, image, content_image, layer: int):
    """Perceptual content loss of one ``[-1, 1]`` image against a content reference:
    ``mean_{k, c} (F(x)_{k c} - F(ref)_{k c})^2`` over the CLIP vision tokens ``F`` (CLS dropped)
    after ``layer`` encoder blocks (a ``hidden_states`` index, as in :func:`clip_style_features`).

    The style-transfer literature (and Z-Magic's Table 2) measures content with VGG features;
    no VGG weights are available to this library, so the CLIP vision tower stands in: same role
    (squared feature difference at one depth), different network, so the numbers are not
    comparable with VGG content losses."""
    layer = _check_layer(clip, layer, "clip_content_loss")
    return jnp.mean(jnp.square(clip_style_features(clip, image, layer)
                               - clip_style_features(clip, content_image, layer)))


def clip_content_energy(clip: Clip, content_image, layer: int):
    """``E(x0) = clip_content_loss(x0, content_image)``, the reference features computed once
    here (see :func:`clip_content_loss`; a CLIP stand-in for the usual VGG content loss); params
    ``(clip.params, reference features)``."""
    layer = _check_layer(clip, layer, "clip_content_energy")
    reference = jax.jit(lambda params, image: clip_style_features(with_params(clip, params), image, layer))(
        clip.params, content_image)
    return Energy(static_partial(_content_energy, clip_architecture(clip), layer), (clip.params, reference))


def _content_energy(arch, layer, params, x0):
    weights, reference = params
    return jnp.mean(jnp.square(clip_style_features(with_params(arch, weights), x0, layer) - reference))


def clip_style_loss(clip: Clip, image, style_image, layer: int = 3):
    """Style loss of one ``[-1, 1]`` image: ``|| G(F(x)) - G(F(style)) ||_F``, the value of
    :func:`clip_style_energy` (unnormalised Gram ``G(F) = F^T F`` of the CLIP vision tokens)."""
    layer = _check_layer(clip, layer, "clip_style_loss")
    return safe_norm(gram_matrix(clip_style_features(clip, image, layer))
                      - gram_matrix(clip_style_features(clip, style_image, layer)))


def clip_text_distance(clip: Clip, image, text):
    """CLIP text distance of one ``[-1, 1]`` image: ``1 - cos(e_I(x), e_T)`` (Z-Magic's text
    metric; ``1 - CLIPScore / 100`` up to CLIPScore's clipping at 0). ``text`` is a prompt, or its
    :func:`text_embedding` (an array, e.g. to keep it a traced argument under ``jit``)."""
    text = text_embedding(clip, text) if isinstance(text, str) else jnp.asarray(text)
    image = image_embedding(clip, image)
    return 1.0 - jnp.dot(text, image) / (jnp.linalg.norm(text) * jnp.linalg.norm(image))
