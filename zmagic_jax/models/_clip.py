"""CLIP (Radford et al., "Learning Transferable Visual Models From Natural Language Supervision",
ICML 2021) as Flax Linen modules, equal to transformers' PyTorch ``CLIPModel`` /
``CLIPTextModel`` / ``CLIPVisionModel`` (and their ``WithProjection`` variants).

Both towers are pre-LayerNorm transformers: each encoder layer is
``x <- x + out_proj(attention(q_proj(LN1 x), k_proj(LN1 x), v_proj(LN1 x)))``, then
``x <- x + fc2(act(fc1(LN2 x)))`` with ``act`` quick-GELU ``x sigmoid(1.702 x)`` (OpenAI) or the
exact erf GELU (some Stable Diffusion 2.x / OpenCLIP text encoders).

* Text: token + position embeddings, causal self-attention, ``final_layer_norm``; the pooled
  output is the final state at the end-of-text token: the first position whose id is
  ``eos_token_id`` or, for configs written before transformers fixed that id (``eos_token_id ==
  2``), the position of the largest id (CLIP's eot token is the last of its vocabulary).
* Vision: a ``patch_size`` convolution without bias, a learned class token in front, position
  embeddings, ``pre_layrnorm`` (transformers' spelling), the encoder, ``post_layernorm`` on the
  class token for the pooled output. Pixels are channels-last ``(B, S, S, C)``.
* :class:`CLIPModel`: ``text_projection`` / ``visual_projection`` (linear, no bias) of the pooled
  outputs to ``projection_dim``, and ``logit_scale`` (``logits = exp(logit_scale) cos``).

``hidden_states`` follows transformers: entry 0 is the encoder input (embeddings; for vision after
``pre_layrnorm``), entry ``i`` the output of encoder layer ``i`` (before any final norm).

Flax submodules are named as transformers' PyTorch module paths (``name_N`` for item ``N`` of a
``ModuleList``), so :func:`clip_params_from_torch` maps state-dict keys mechanically and rejects
a checkpoint whose keys or shapes do not match. Parameters are float32; ``dtype`` is the compute
dtype; ``remat`` recomputes each encoder layer in the backward pass.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple, Optional, Tuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from zmagic_jax._state_dict import params_from_torch, torch_from_params, torch_key
from zmagic_jax.models._attention import attention
from zmagic_jax.models._layers import Conv

# transformers' ACT2FN entries CLIP checkpoints use: "quick_gelu" (QuickGELUActivation) and
# "gelu" (GELUActivation, torch's exact erf form).
_ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
}

# transformers' CLIPConfig default (log(1 / 0.07)); only the init value, checkpoints carry their own.
_LOGIT_SCALE_INIT = 2.6592


@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    """The text tower; defaults are transformers' ``CLIPTextConfig`` defaults (a key missing from a
    ``config.json`` takes them, as there). ``eos_token_id`` selects the pooling rule (module
    docstring)."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_attention_heads: int = 8
    num_hidden_layers: int = 12
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407

    def __post_init__(self):
        _check(dataclasses.asdict(self), type(self), f"{type(self).__name__}.")


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    """The vision tower; defaults are transformers' ``CLIPVisionConfig`` defaults. Images are
    ``image_size`` square with ``num_channels`` channels, cut into ``patch_size`` patches."""

    hidden_size: int = 768
    intermediate_size: int = 3072
    num_attention_heads: int = 12
    num_hidden_layers: int = 12
    image_size: int = 224
    patch_size: int = 32
    num_channels: int = 3
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5

    def __post_init__(self):
        _check(dataclasses.asdict(self), type(self), f"{type(self).__name__}.")

    @property
    def num_positions(self) -> int:
        """Patches plus the class token."""
        return (self.image_size // self.patch_size) ** 2 + 1


def _check(values: dict, kind: type, where: str) -> None:
    """Raise ValueError naming the key (prefixed by ``where``) of a value ``kind`` cannot take."""
    for field in dataclasses.fields(kind):
        if field.name not in values:
            continue
        value, lowest = values[field.name], 0 if field.name == "eos_token_id" else 1
        if field.name == "hidden_act":
            if not isinstance(value, str) or value not in _ACTIVATIONS:
                raise ValueError(f"{where}hidden_act = {value!r} is not supported; CLIP checkpoints use "
                                 f"'quick_gelu' (OpenAI CLIP) or 'gelu' (exact GELU, e.g. Stable Diffusion "
                                 f"2.x text encoders). Use a config of one of those.")
        elif field.name == "layer_norm_eps":
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
                raise ValueError(f"{where}layer_norm_eps must be a positive number; got {value!r}.")
        elif isinstance(value, bool) or not isinstance(value, int) or value < lowest:
            raise ValueError(f"{where}{field.name} must be an integer >= {lowest}; got {value!r}.")
    heads, hidden = values.get("num_attention_heads"), values.get("hidden_size")
    if heads and hidden and hidden % heads:
        raise ValueError(f"{where}hidden_size = {hidden} is not a multiple of num_attention_heads = {heads}; "
                         f"fix the config (each head gets hidden_size / num_attention_heads channels).")
    if values.get("patch_size", 0) > values.get("image_size", 1 << 30):
        raise ValueError(f"{where}patch_size = {values['patch_size']} exceeds image_size = "
                         f"{values['image_size']}.")


def _tower(kind: type, values, *, file: str, section: str):
    if not isinstance(values, dict):
        raise ValueError(f"{file}: {section} must be a JSON object of {kind.__name__} fields; got {values!r:.60}.")
    full = {f.name: values.get(f.name, f.default) for f in dataclasses.fields(kind)}
    _check(full, kind, f"{file}: {section}." if section else f"{file}: ")
    return kind(**full)


def clip_configs_from_dict(config: dict, *, file: str = "config.json"
                           ) -> Tuple[Optional[CLIPTextConfig], Optional[CLIPVisionConfig], Optional[int]]:
    """``(text config, vision config, projection_dim)`` of a transformers CLIP ``config.json``.

    * ``model_type "clip"`` (a ``CLIPModel``): both towers from ``text_config`` / ``vision_config``
      (the legacy ``text_config_dict`` / ``vision_config_dict`` win, as in transformers) and the
      top-level ``projection_dim``;
    * ``"clip_text_model"`` (``CLIPTextModel``, e.g. Stable Diffusion's ``text_encoder/``):
      ``(text, None, None)``, or ``(text, None, projection_dim)`` when ``architectures`` names
      ``CLIPTextModelWithProjection``;
    * ``"clip_vision_model"``: ``(None, vision, None or projection_dim)`` likewise.

    Without ``model_type`` the kind is read from the keys. Keys outside the architecture (dropout,
    initialisation, bookkeeping) are ignored; unsupported values raise ValueError naming ``file``,
    the key and the fix."""
    if not isinstance(config, dict):
        raise ValueError(f"{file}: a CLIP config must be a JSON object; got {type(config).__name__}.")
    model_type = config.get("model_type")
    architectures = config.get("architectures") or []

    def projection(default=512):
        value = config.get("projection_dim", default)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{file}: projection_dim must be a positive integer; got {value!r}.")
        return value

    if model_type == "clip" or (model_type is None and ("text_config" in config or "vision_config" in config)):
        towers = []
        for key, kind in (("text_config", CLIPTextConfig), ("vision_config", CLIPVisionConfig)):
            legacy = config.get(f"{key}_dict")
            section = f"{key}_dict" if legacy is not None else key
            towers.append(_tower(kind, legacy if legacy is not None else (config.get(key) or {}),
                                 file=file, section=section))
        return towers[0], towers[1], projection()
    if model_type == "clip_text_model" or (model_type is None and "vocab_size" in config):
        text = _tower(CLIPTextConfig, config, file=file, section="")
        return text, None, projection() if "CLIPTextModelWithProjection" in architectures else None
    if model_type == "clip_vision_model" or (model_type is None and "image_size" in config):
        vision = _tower(CLIPVisionConfig, config, file=file, section="")
        return None, vision, projection() if "CLIPVisionModelWithProjection" in architectures else None
    raise ValueError(f"{file}: model_type {model_type!r} is not a CLIP model. Expected 'clip' (a CLIPModel "
                     f"config with text_config and vision_config), 'clip_text_model' (a CLIPTextModel, e.g. "
                     f"Stable Diffusion's text_encoder/config.json) or 'clip_vision_model'.")


class CLIPTransformerOutput(NamedTuple):
    """One tower's outputs: ``last_hidden_state`` ``(B, L, D)`` (text: after ``final_layer_norm``;
    vision: the encoder output), ``pooled_output`` ``(B, D)`` and ``hidden_states``, a tuple of
    ``num_hidden_layers + 1`` arrays ``(B, L, D)`` (entry 0 the encoder input)."""

    last_hidden_state: jax.Array
    pooled_output: jax.Array
    hidden_states: Tuple[jax.Array, ...]


class CLIPModelOutput(NamedTuple):
    """:class:`CLIPModel` outputs; a field whose tower (or projection) is absent is None.
    ``text_embeds`` ``(B_t, P)`` / ``image_embeds`` ``(B_i, P)`` are projected and unnormalised;
    ``logits_per_image`` ``(B_i, B_t)`` is ``exp(logit_scale)`` times their cosine similarity."""

    text: Optional[CLIPTransformerOutput]
    vision: Optional[CLIPTransformerOutput]
    text_embeds: Optional[jax.Array]
    image_embeds: Optional[jax.Array]
    logits_per_image: Optional[jax.Array]


def _layer_norm(config, dtype, name):
    # use_fast_variance=False: E[(x - mean)^2] as torch computes it, not E[x^2] - mean^2.
    return nn.LayerNorm(epsilon=config.layer_norm_eps, dtype=dtype, use_fast_variance=False, name=name)


class CLIPAttention(nn.Module):
    """Multi-head self-attention with ``q_proj``/``k_proj``/``v_proj``/``out_proj``; ``mask``
    (boolean) or ``modifier`` (additive) as in :func:`~zmagic_jax.models._attention.attention`."""

    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None, modifier=None):
        batch, length, width = x.shape
        heads = self.config.num_attention_heads
        q, k, v = (nn.Dense(width, dtype=self.dtype, name=name)(x).reshape(batch, length, heads, width // heads)
                   for name in ("q_proj", "k_proj", "v_proj"))
        out = attention(q, k, v, mask=mask, modifier=modifier).reshape(batch, length, width)
        return nn.Dense(width, dtype=self.dtype, name="out_proj")(out)


class CLIPMLP(nn.Module):
    """``fc2(act(fc1(x)))``."""

    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        x = nn.Dense(self.config.intermediate_size, dtype=self.dtype, name="fc1")(x)
        x = _ACTIVATIONS[self.config.hidden_act](x)
        return nn.Dense(self.config.hidden_size, dtype=self.dtype, name="fc2")(x)


class CLIPEncoderLayer(nn.Module):
    """One pre-LayerNorm block (module docstring)."""

    config: Any
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None, modifier=None):
        h = _layer_norm(self.config, self.dtype, "layer_norm1")(x)
        x = x + CLIPAttention(self.config, self.dtype, name="self_attn")(h, mask, modifier)
        h = _layer_norm(self.config, self.dtype, "layer_norm2")(x)
        return x + CLIPMLP(self.config, self.dtype, name="mlp")(h)


class CLIPEncoder(nn.Module):
    """``num_hidden_layers`` layers ``layers_0 ...``; returns all hidden states, input first."""

    config: Any
    dtype: Any = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, x, mask=None, modifier=None) -> tuple:
        layer = nn.remat(CLIPEncoderLayer) if self.remat else CLIPEncoderLayer
        states = [x]
        for index in range(self.config.num_hidden_layers):
            x = layer(self.config, self.dtype, name=f"layers_{index}")(x, mask, modifier)
            states.append(x)
        return tuple(states)


class CLIPTextEmbeddings(nn.Module):
    config: CLIPTextConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, input_ids, position_ids, extra_embeddings=None):
        cfg = self.config
        embed = nn.Embed(cfg.vocab_size, cfg.hidden_size, dtype=self.dtype, name="token_embedding")
        if extra_embeddings is None:
            tokens = embed(input_ids)
        else:
            # ids vocab_size + i read row i of the extra table; the table's rows are never looked up
            # for them (no NaN fill, no gradient to the frozen table)
            extra = jnp.asarray(extra_embeddings)
            beyond = input_ids >= cfg.vocab_size
            tokens = jnp.where(beyond[..., None],
                               extra[jnp.clip(input_ids - cfg.vocab_size, 0, extra.shape[0] - 1)].astype(self.dtype),
                               embed(jnp.where(beyond, 0, input_ids)))
        positions = nn.Embed(cfg.max_position_embeddings, cfg.hidden_size, dtype=self.dtype,
                             name="position_embedding")(position_ids)
        return tokens + positions


class CLIPTextTransformer(nn.Module):
    """CLIP's text tower (transformers' ``CLIPTextTransformer``, the ``text_model`` of
    ``CLIPTextModel``).

    ``input_ids`` ``(B, L)`` integers in ``[0, vocab_size)`` (outside it the embedding lookup
    gives NaN, JAX's gather fill, where PyTorch raises), ``L <= max_position_embeddings``; ``attention_mask``
    ``(B, L)`` (optional; positions whose value is not 1 are removed as keys, on top of the causal
    mask, in one mask as transformers 5 builds it, so even a row left without keys agrees: it
    attends uniformly to every key;
    Stable Diffusion passes none, so padding is attended); ``position_ids`` ``(B, L)`` or
    ``(1, L)`` (default ``0 .. L-1``); ``extra_embeddings`` ``(N, hidden_size)`` (optional): the
    input embeddings of the ids ``vocab_size .. vocab_size + N - 1`` (learned concept tokens,
    :mod:`zmagic_jax.concepts`), a separate table spliced in front of the position embeddings.
    Returns a :class:`CLIPTransformerOutput`."""

    config: CLIPTextConfig
    dtype: Any = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, input_ids, attention_mask=None, position_ids=None,
                 extra_embeddings=None) -> CLIPTransformerOutput:
        cfg = self.config
        input_ids = jnp.asarray(input_ids)
        if extra_embeddings is not None and (jnp.ndim(extra_embeddings) != 2
                                             or jnp.shape(extra_embeddings)[1] != cfg.hidden_size):
            raise ValueError(f"CLIPTextTransformer: extra_embeddings must be (N, {cfg.hidden_size}) rows for the "
                             f"ids vocab_size ({cfg.vocab_size}) .. vocab_size + N - 1; got shape "
                             f"{jnp.shape(extra_embeddings)}.")
        if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
            raise ValueError(f"CLIPTextTransformer: input_ids must be (batch, length) integers; got "
                             f"{input_ids.dtype} {input_ids.shape}.")
        batch, length = input_ids.shape
        if length > cfg.max_position_embeddings:
            raise ValueError(f"CLIPTextTransformer: {length} tokens exceed max_position_embeddings = "
                             f"{cfg.max_position_embeddings}; truncate the prompt (the tokenizer's max_length).")
        if position_ids is None:
            position_ids = jnp.arange(length)[None]
        hidden = CLIPTextEmbeddings(cfg, self.dtype, name="embeddings")(input_ids, position_ids, extra_embeddings)
        causal = jnp.tril(jnp.ones((length, length), bool))[None, None]
        if attention_mask is None:
            mask = causal
        else:
            # transformers 5 gives every removed key the same finfo.min score (transformers 4 added a
            # causal and a padding finfo.min mask, which differs on rows left without keys)
            attention_mask = jnp.asarray(attention_mask)
            if attention_mask.shape != (batch, length):
                raise ValueError(f"CLIPTextTransformer: attention_mask must have the shape of input_ids "
                                 f"{(batch, length)}; got {attention_mask.shape}.")
            mask = causal & (attention_mask[:, None, None, :] == 1)
        states = CLIPEncoder(cfg, self.dtype, self.remat, name="encoder")(hidden, mask)
        last = _layer_norm(cfg, self.dtype, "final_layer_norm")(states[-1])
        if cfg.eos_token_id == 2:
            # configs from before transformers' fix say 2; CLIP's eot is then the largest id
            pool_at = jnp.argmax(jnp.where(input_ids >= cfg.vocab_size, -1, input_ids), axis=-1)
        else:
            pool_at = jnp.argmax((input_ids == cfg.eos_token_id).astype(jnp.int32), axis=-1)
        return CLIPTransformerOutput(last, last[jnp.arange(batch), pool_at], states)


class CLIPVisionEmbeddings(nn.Module):
    config: CLIPVisionConfig
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, pixel_values):
        cfg = self.config
        width, patch = cfg.hidden_size, cfg.patch_size
        class_embedding = self.param("class_embedding", nn.initializers.normal(1.0), (width,), jnp.float32)
        patches = Conv(width, (patch, patch), strides=(patch, patch), padding="VALID", use_bias=False,
                          dtype=self.dtype, name="patch_embedding")(pixel_values)
        batch = patches.shape[0]
        # row-major over the patch grid, as torch's flatten(2) of (B, D, h, w)
        patches = patches.reshape(batch, -1, width)
        tokens = jnp.concatenate([jnp.broadcast_to(class_embedding.astype(patches.dtype), (batch, 1, width)),
                                  patches], axis=1)
        positions = nn.Embed(cfg.num_positions, width, dtype=self.dtype, name="position_embedding")(
            jnp.arange(cfg.num_positions))
        return tokens + positions[None]


class CLIPVisionTransformer(nn.Module):
    """CLIP's vision tower (transformers' ``CLIPVisionTransformer``).

    ``pixel_values``: ``(B, S, S, C)`` channels-last, ``S = image_size``, already normalised with
    CLIP's mean/std. Returns a :class:`CLIPTransformerOutput` with ``L = (S / patch)^2 + 1``
    tokens, the class token first."""

    config: CLIPVisionConfig
    dtype: Any = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, pixel_values) -> CLIPTransformerOutput:
        cfg = self.config
        expected = (cfg.image_size, cfg.image_size, cfg.num_channels)
        if pixel_values.ndim != 4 or tuple(pixel_values.shape[1:]) != expected:
            raise ValueError(f"CLIPVisionTransformer: pixel_values must be (batch, {cfg.image_size}, "
                             f"{cfg.image_size}, {cfg.num_channels}) (channels last); got {pixel_values.shape}.")
        hidden = CLIPVisionEmbeddings(cfg, self.dtype, name="embeddings")(pixel_values)
        hidden = _layer_norm(cfg, self.dtype, "pre_layrnorm")(hidden)
        states = CLIPEncoder(cfg, self.dtype, self.remat, name="encoder")(hidden)
        pooled = _layer_norm(cfg, self.dtype, "post_layernorm")(states[-1][:, 0])
        return CLIPTransformerOutput(states[-1], pooled, states)


class CLIPModel(nn.Module):
    """CLIP's towers with their projections: transformers' ``CLIPModel`` (both towers and
    ``projection_dim``), ``CLIPTextModel`` (text only, ``projection_dim=None``),
    ``CLIPTextModelWithProjection`` (text and ``projection_dim``) and the vision counterparts; the
    parameter tree is that of the matching PyTorch state dict (``text_model``, ``vision_model``,
    ``text_projection``, ``visual_projection``, ``logit_scale`` when both towers are projected).

    ``__call__(input_ids=None, pixel_values=None, *, attention_mask=None, position_ids=None)`` runs
    the towers whose inputs are given (init with both) and returns a :class:`CLIPModelOutput`;
    :meth:`text_outputs`, :meth:`vision_outputs`, :meth:`text_embeddings` and
    :meth:`image_embeddings` are for ``apply(..., method=...)``."""

    text_config: Optional[CLIPTextConfig] = None
    vision_config: Optional[CLIPVisionConfig] = None
    projection_dim: Optional[int] = None
    dtype: Any = jnp.float32
    remat: bool = False

    def setup(self):
        if self.text_config is None and self.vision_config is None:
            raise ValueError("CLIPModel: give text_config, vision_config or both.")
        if self.text_config is not None:
            self.text_model = CLIPTextTransformer(self.text_config, self.dtype, self.remat)
        if self.vision_config is not None:
            self.vision_model = CLIPVisionTransformer(self.vision_config, self.dtype, self.remat)
        if self.projection_dim is not None:
            if self.text_config is not None:
                self.text_projection = nn.Dense(self.projection_dim, use_bias=False, dtype=self.dtype)
            if self.vision_config is not None:
                self.visual_projection = nn.Dense(self.projection_dim, use_bias=False, dtype=self.dtype)
            if self.text_config is not None and self.vision_config is not None:
                self.logit_scale = self.param("logit_scale", nn.initializers.constant(_LOGIT_SCALE_INIT), (),
                                              jnp.float32)

    def _need(self, config, what: str):
        if config is None:
            raise ValueError(f"CLIPModel: {what} needs the {'text' if what.startswith('text') else 'vision'} "
                             f"tower, which this model (config) does not have.")
        if what.endswith("embeddings") and self.projection_dim is None:
            raise ValueError(f"CLIPModel: {what} needs a projection; this model has projection_dim=None "
                             f"(a CLIPTextModel / CLIPVisionModel). Use text_outputs / vision_outputs.")

    def text_outputs(self, input_ids, attention_mask=None, position_ids=None) -> CLIPTransformerOutput:
        """The text tower's :class:`CLIPTransformerOutput` of ``input_ids`` ``(B, L)``."""
        self._need(self.text_config, "text_outputs")
        return self.text_model(input_ids, attention_mask, position_ids)

    def vision_outputs(self, pixel_values) -> CLIPTransformerOutput:
        """The vision tower's :class:`CLIPTransformerOutput` of ``(B, S, S, C)`` pixels."""
        self._need(self.vision_config, "vision_outputs")
        return self.vision_model(pixel_values)

    def text_embeddings(self, input_ids, attention_mask=None, position_ids=None):
        """Projected, unnormalised text embeddings ``(B, projection_dim)`` (transformers'
        ``get_text_features``)."""
        self._need(self.text_config, "text_embeddings")
        return self.text_projection(self.text_model(input_ids, attention_mask, position_ids).pooled_output)

    def image_embeddings(self, pixel_values):
        """Projected, unnormalised image embeddings ``(B, projection_dim)`` (transformers'
        ``get_image_features``)."""
        self._need(self.vision_config, "image_embeddings")
        return self.visual_projection(self.vision_model(pixel_values).pooled_output)

    def __call__(self, input_ids=None, pixel_values=None, *, attention_mask=None,
                 position_ids=None) -> CLIPModelOutput:
        projected = self.projection_dim is not None
        text = vision = text_embeds = image_embeds = logits = None
        if input_ids is not None:
            text = self.text_outputs(input_ids, attention_mask, position_ids)
            text_embeds = self.text_projection(text.pooled_output) if projected else None
        if pixel_values is not None:
            vision = self.vision_outputs(pixel_values)
            image_embeds = self.visual_projection(vision.pooled_output) if projected else None
        if text_embeds is not None and image_embeds is not None:
            def unit(e):
                e = e.astype(jnp.float32)
                return e / jnp.linalg.norm(e, axis=-1, keepdims=True)
            logits = jnp.exp(self.logit_scale) * unit(image_embeds) @ unit(text_embeds).T
        return CLIPModelOutput(text, vision, text_embeds, image_embeds, logits)


def clip_example_inputs(text_config: Optional[CLIPTextConfig], vision_config: Optional[CLIPVisionConfig]) -> tuple:
    """``(input_ids, pixel_values)`` shape structs (None for an absent tower) for
    ``CLIPModel.init`` / ``jax.eval_shape``."""
    ids = None if text_config is None else jax.ShapeDtypeStruct((1, 1), jnp.int32)
    pixels = None if vision_config is None else jax.ShapeDtypeStruct(
        (1, vision_config.image_size, vision_config.image_size, vision_config.num_channels), jnp.float32)
    return ids, pixels


@functools.lru_cache(maxsize=32)
def _shapes(text_config, vision_config, projection_dim) -> tuple:
    module = CLIPModel(text_config, vision_config, projection_dim)
    tree = jax.eval_shape(module.init, jax.random.key(0), *clip_example_inputs(text_config, vision_config))
    return tuple((path, tuple(leaf.shape)) for path, leaf in traverse_util.flatten_dict(tree["params"]).items())


def clip_param_shapes(text_config: Optional[CLIPTextConfig], vision_config: Optional[CLIPVisionConfig],
                      projection_dim: Optional[int]) -> dict:
    """``{flax path tuple: shape}`` of :class:`CLIPModel` params for these configs (from
    ``jax.eval_shape`` of its init, cached per config)."""
    return dict(_shapes(text_config, vision_config, projection_dim))


_LISTS = frozenset({"layers"})


def _torch_key(flax_path: tuple) -> str:
    return torch_key(flax_path, _LISTS)


def _architecture(text_config, vision_config, projection_dim) -> str:
    if text_config is not None and vision_config is not None:
        return "transformers CLIPModel"
    tower = "CLIPTextModel" if text_config is not None else "CLIPVisionModel"
    return f"transformers {tower}{'WithProjection' if projection_dim is not None else ''}"


def clip_params_from_torch(state_dict: dict, text_config: Optional[CLIPTextConfig],
                           vision_config: Optional[CLIPVisionConfig], projection_dim: Optional[int], *,
                           path: str = "<memory>") -> dict:
    """:class:`CLIPModel` params (float32 numpy, nested dicts) from a transformers PyTorch state dict
    (name -> array): a ``CLIPModel`` (``text_model.*``, ``vision_model.*``, ``text_projection``,
    ``visual_projection``, ``logit_scale``), a ``CLIPTextModel`` (``text_model.*``; pass
    ``vision_config=None, projection_dim=None``) or the other single-tower variants. The
    ``*.embeddings.position_ids`` buffers older checkpoints carry are consumed; any other tensor
    left over, missing or of the wrong shape raises ``CheckpointMismatchError`` listing the keys.

    The tree always starts at the :class:`CLIPModel` level (``params["text_model"]`` is the
    :class:`CLIPTextTransformer`'s)."""
    state_dict = dict(state_dict)
    for tower, config in (("text_model", text_config), ("vision_model", vision_config)):
        if config is not None:
            state_dict.pop(f"{tower}.embeddings.position_ids", None)
    return params_from_torch(state_dict, clip_param_shapes(text_config, vision_config, projection_dim),
                             _torch_key, architecture=_architecture(text_config, vision_config, projection_dim),
                             path=path)


def clip_torch_state_dict(params) -> dict:
    """The inverse of :func:`clip_params_from_torch`: the PyTorch state dict (numpy arrays, keys
    and layouts of transformers) of :class:`CLIPModel` ``params``, without the non-persistent
    ``position_ids`` buffers."""
    state_dict = torch_from_params(params, _torch_key)
    if "logit_scale" in state_dict:  # a 0-d tensor in PyTorch; torch_from_params returns it 1-d
        state_dict["logit_scale"] = state_dict["logit_scale"].reshape(())
    return state_dict
