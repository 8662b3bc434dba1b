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

import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from zmagic_jax.contracts import Energy, Keyed, static_partial
from zmagic_jax.energies._image import CLIP_MEAN, CLIP_STD, gram_matrix, normalize_signed, resize_bicubic, safe_norm

_WHERE_TO_GET = ("Such weights (e.g. openai/clip-vit-base-patch16, openai/clip-vit-large-patch14) are "
                 "published on the Hugging Face Hub and must be downloaded by you; this library never "
                 "downloads.")
_HELP = ("Expected a local transformers CLIP folder with config.json, vocab.json and merges.txt "
         "(tokenizer) and weights as model.safetensors or pytorch_model.bin (read without PyTorch). "
         + _WHERE_TO_GET)


class Clip(NamedTuple):
    """A loaded CLIP: the library's :class:`~zmagic_jax.models._clip.CLIPModel` module (both
    towers and their projections), its parameters, the tokenizer and the vision input resolution."""
    model: Any
    params: Any
    tokenizer: Any
    image_size: int


def load_clip(path, dtype=jnp.float32) -> Clip:
    """Load a CLIP model, parameters and tokenizer from the local transformers folder ``path``.

    PyTorch weights (``model.safetensors``, or ``pytorch_model.bin``, both read without PyTorch;
    ``.fp16`` variants and shards too) are mapped to the library's own Flax CLIP. ``dtype`` is the
    compute dtype; parameters stay float32. A missing file is a FileNotFoundError naming it, a
    config option the module does not implement a ValueError naming the key, and tensors that do
    not fit the config a ``CheckpointMismatchError`` listing the keys.
    """
    from zmagic_jax.models._clip import CLIPModel, clip_configs_from_dict, clip_params_from_torch
    from zmagic_jax.models._folders import read_config, read_weights
    from zmagic_jax.models._tokenizer import ClipTokenizer

    path = os.fspath(path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"load_clip: no such folder {path!r}. {_HELP}")
    raw = read_config(path, "load_clip", _HELP)
    text, vision, projection = clip_configs_from_dict(raw, file=os.path.join(path, "config.json"))
    if text is None or vision is None or projection is None:
        raise ValueError(f"load_clip: {os.path.join(path, 'config.json')!r} is not a full CLIPModel config "
                         f"(text_config, vision_config and projection_dim are all needed). {_HELP}")
    weights = read_weights(path, ("model", "pytorch_model"), "load_clip", architecture="a transformers CLIPModel",
                           published="openai/clip-vit-base-patch16 on the Hugging Face Hub", help_text=_HELP)
    params = clip_params_from_torch(weights.tensors, text, vision, projection, path=weights.source)
    params = jax.tree.map(jnp.asarray, params)
    tokenizer = ClipTokenizer.from_folder(path)
    return Clip(CLIPModel(text, vision, projection, dtype=dtype), params, tokenizer, int(vision.image_size))


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


def _nhwc(clip, image):
    return jnp.transpose(clip_image_input(clip, image), (0, 2, 3, 1))


def image_embedding(clip: Clip, image):
    """Projected CLIP image embedding ``(D,)`` (not normalised) of one ``[-1, 1]`` image."""
    return clip.model.apply({"params": clip.params}, _nhwc(clip, image), method="image_embeddings")[0]


def _text_features(model, params, ids):
    return model.value.apply({"params": params}, ids, method="text_embeddings")[0]


# Jitted as one program (op by op, every layer would compile separately: seconds per prompt); one
# program per architecture, the weights an argument.
_text_features_jit = jax.jit(_text_features, static_argnums=0)


def text_embedding(clip: Clip, prompt: str):
    """Projected CLIP text embedding ``(D,)`` (not normalised) of ``prompt``, computed once.

    No padding is needed: the text transformer is causal and pools at the end-of-text token,
    so tokens after it cannot change the embedding."""
    if not isinstance(prompt, str):
        raise TypeError(f"text_embedding: prompt must be a str; got {type(prompt).__name__}.")
    tok = clip.tokenizer
    length = min(clip.model.text_config.max_position_embeddings, tok.model_max_length)
    ids = [tok.bos_token_id] + tok.token_ids(prompt)[:length - 2] + [tok.eos_token_id]
    return _text_features_jit(Keyed(clip.model, repr(clip.model)), clip.params, jnp.asarray([ids], jnp.int32))


def clip_architecture(clip: Clip) -> Keyed:
    """The static part of a :class:`Clip` (everything but its parameters), keyed by its configs:
    programs compiled for one loaded CLIP serve every other of the same architecture."""
    return Keyed(clip._replace(params=None), (repr(clip.model), clip.image_size))


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
    num_layers = clip.model.vision_config.num_hidden_layers
    if not 0 <= layer <= num_layers:
        raise ValueError(f"clip_style_features: layer must be a hidden_states index in [0, {num_layers}]; "
                         f"got {layer}.")
    out = clip.model.apply({"params": clip.params}, _nhwc(clip, image), method="vision_outputs")
    return out.hidden_states[layer][0, 1:]


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
    num_layers = clip.model.vision_config.num_hidden_layers
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
