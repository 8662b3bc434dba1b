"""Stable Diffusion's UNet (diffusers ``UNet2DConditionModel``, SD 1.x and 2.x) in Flax, with
attention maps and score modifiers by layer name.

The network maps a latent ``x_t`` ``(B, h, w, C_in)`` (channels last), timesteps ``t`` ``(B,)``
and text states ``c`` ``(B, L, D)`` to the model output ``(B, h, w, C_out)`` (eps or v):

* ``emb = linear_2(silu(linear_1(e(t))))`` with diffusers' sinusoidal embedding
  ``e(t) = [sin(t w), cos(t w)]`` (``[cos, sin]`` with ``flip_sin_to_cos``),
  ``w_k = exp(-log(10000) k / (C0/2 - freq_shift))``, ``k < C0/2``;
* ``conv_in``, a down path of blocks (ResNet blocks, each followed by a spatial transformer in
  ``CrossAttnDownBlock2D``; a stride-2 conv between blocks), a middle block
  ResNet-transformer-ResNet, an up path whose ResNet blocks each concatenate one skip activation
  of the down path (nearest 2x upsampling + conv between blocks), ``GroupNorm``, SiLU,
  ``conv_out``;
* a spatial transformer (``Transformer2DModel``): ``GroupNorm`` (eps 1e-6), ``proj_in`` (1x1
  conv, or linear with ``use_linear_projection`` as SD 2.x), blocks of
  ``x += attn1(LN(x))`` (self), ``x += attn2(LN(x), c)`` (cross), ``x += FF(LN(x))`` (GEGLU,
  4x width), ``proj_out``, plus the block's input.

Submodules are named as diffusers' PyTorch modules (``down_blocks_0`` > ``attentions_0`` >
``transformer_blocks_0`` > ``attn1`` > ``to_q``; item N of a ModuleList is ``name_N``), so the
state-dict keys follow from the parameter paths (``_sd_convert.py``).

Attention layers are named as diffusers names their processors, without ``.processor``:
``down_blocks.0.attentions.0.transformer_blocks.0.attn1`` (``attn1`` self-, ``attn2``
cross-attention); :func:`attention_layers` lists them with their place, resolution and heads.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, NamedTuple, Optional

import flax.linen as nn
import jax.numpy as jnp
from flax import traverse_util

from zmagic_jax.models._diffusers_config import config_from_diffusers
from zmagic_jax.models._sd_layers import Attention, Downsample2D, ResnetBlock2D, Upsample2D, conv, dense, group_norm

DOWN_BLOCK_TYPES = ("CrossAttnDownBlock2D", "DownBlock2D")
UP_BLOCK_TYPES = ("CrossAttnUpBlock2D", "UpBlock2D")
MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn", None)
_CROSS_TYPES = ("CrossAttnDownBlock2D", "CrossAttnUpBlock2D", "UNetMidBlock2DCrossAttn")


def _per_block(name: str, value, n: int) -> tuple:
    """An int-or-list option as one positive int per block."""
    values = (value,) * n if isinstance(value, (int, float)) and not isinstance(value, bool) else value
    if not isinstance(values, (list, tuple)) or len(values) != n:
        raise ValueError(f"UNet2DConditionConfig: {name} must be an int or a list of {n} ints (one per "
                         f"block); got {value!r}.")
    if not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in values):
        raise ValueError(f"UNet2DConditionConfig: {name} must hold positive ints; got {value!r}"
                         + (" (nested per-layer lists need reverse_transformer_layers_per_block, which is "
                            "not supported)" if any(isinstance(v, (list, tuple)) for v in values) else "")
                         + ".")
    return tuple(values)


class BlockPlan(NamedTuple):
    """One block of the UNet as diffusers builds it: ``in_channels``/``out_channels``/
    ``prev_channels`` in diffusers' meaning (for an up block ``prev_channels`` is the incoming width
    and ``in_channels`` the width of its last skip), ``layers`` ResNet blocks (each followed by a
    transformer of ``transformer_layers`` blocks in a cross-attention block), ``heads`` heads of
    ``out_channels // heads`` channels, and whether the block ends by resampling."""

    type: str
    in_channels: int
    out_channels: int
    prev_channels: int
    layers: int
    transformer_layers: int
    heads: int
    cross_attention_dim: int
    resample: bool

    @property
    def cross(self) -> bool:
        return self.type in _CROSS_TYPES


@dataclasses.dataclass(frozen=True)
class UNet2DConditionConfig:
    """Architecture of the UNet, in diffusers' option names; defaults are diffusers' defaults.

    ``layers_per_block``, ``transformer_layers_per_block``, ``num_attention_heads`` and
    ``cross_attention_dim`` may be given as one int or one per down block (stored as tuples).
    ``num_attention_heads`` is the NUMBER of heads of each block (heads have
    ``block_out_channels[i] // heads`` channels); :func:`unet_config_from_dict` translates
    diffusers' historical ``attention_head_dim`` (which means the number of heads) into it.
    Up blocks take the per-block values reversed, the middle block the last ones.
    """

    in_channels: int = 4
    out_channels: int = 4
    block_out_channels: tuple = (320, 640, 1280, 1280)
    down_block_types: tuple = ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",)
    mid_block_type: Optional[str] = "UNetMidBlock2DCrossAttn"
    up_block_types: tuple = ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3
    layers_per_block: tuple = 2
    transformer_layers_per_block: tuple = 1
    num_attention_heads: tuple = 8
    cross_attention_dim: tuple = 1280
    use_linear_projection: bool = False
    norm_num_groups: int = 32
    norm_eps: float = 1e-5
    flip_sin_to_cos: bool = True
    freq_shift: float = 0.0
    downsample_padding: int = 1
    mid_block_scale_factor: float = 1.0
    center_input_sample: bool = False
    time_embedding_dim: Optional[int] = None

    def __post_init__(self):
        def put(name, value):
            object.__setattr__(self, name, value)

        put("block_out_channels", tuple(self.block_out_channels))
        put("down_block_types", tuple(self.down_block_types))
        put("up_block_types", tuple(self.up_block_types))
        n = len(self.block_out_channels)
        if n == 0 or not all(isinstance(c, int) and c > 0 for c in self.block_out_channels):
            raise ValueError(f"UNet2DConditionConfig: block_out_channels must be a non-empty list of positive "
                             f"ints; got {self.block_out_channels!r}.")
        for name, types, supported in (("down_block_types", self.down_block_types, DOWN_BLOCK_TYPES),
                                       ("up_block_types", self.up_block_types, UP_BLOCK_TYPES)):
            if len(types) != n:
                raise ValueError(f"UNet2DConditionConfig: {name} needs one entry per block_out_channels "
                                 f"({n}); got {types!r}.")
            for t in types:
                if t not in supported:
                    raise ValueError(f"UNet2DConditionConfig: {name} contains {t!r}, which is not supported "
                                     f"(supported: {', '.join(supported)}).")
        if self.mid_block_type not in MID_BLOCK_TYPES:
            raise ValueError(f"UNet2DConditionConfig: mid_block_type={self.mid_block_type!r} is not supported "
                             f"(supported: {MID_BLOCK_TYPES[0]!r} or None).")
        for name in ("layers_per_block", "transformer_layers_per_block", "num_attention_heads",
                     "cross_attention_dim"):
            put(name, _per_block(name, getattr(self, name), n))
        for name in ("in_channels", "out_channels", "norm_num_groups"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"UNet2DConditionConfig: {name} must be a positive int; got "
                                 f"{getattr(self, name)!r}.")
        if not isinstance(self.downsample_padding, int) or self.downsample_padding < 0:
            raise ValueError(f"UNet2DConditionConfig: downsample_padding must be an int >= 0; got "
                             f"{self.downsample_padding!r}.")
        if self.time_embedding_dim is not None and (not isinstance(self.time_embedding_dim, int)
                                                    or self.time_embedding_dim < 1):
            raise ValueError(f"UNet2DConditionConfig: time_embedding_dim must be None or a positive int; got "
                             f"{self.time_embedding_dim!r}.")
        put("norm_eps", float(self.norm_eps))
        put("freq_shift", float(self.freq_shift))
        put("mid_block_scale_factor", float(self.mid_block_scale_factor))
        if self.block_out_channels[0] // 2 - self.freq_shift == 0:
            raise ValueError(f"UNet2DConditionConfig: freq_shift={self.freq_shift} equals half of "
                             f"block_out_channels[0]; the timestep frequencies would divide by zero.")
        blocks = self.down_blocks() + self.mid_blocks() + self.up_blocks()
        too_many = [(b.type, b.out_channels, b.heads) for b in blocks if b.cross and b.heads > b.out_channels]
        if too_many:
            raise ValueError(f"UNet2DConditionConfig: more heads than channels in (block, channels, heads) "
                             f"{too_many}; check num_attention_heads / attention_head_dim.")
        context_dims = sorted({b.cross_attention_dim for b in blocks if b.cross})
        if len(context_dims) > 1:
            raise ValueError(f"UNet2DConditionConfig: the cross-attention blocks have different "
                             f"cross_attention_dim {context_dims}; one encoder_hidden_states feeds them all.")
        bad = sorted({w for w in self._normalized_widths() if w % self.norm_num_groups})
        if bad:
            raise ValueError(f"UNet2DConditionConfig: norm_num_groups={self.norm_num_groups} must divide the "
                             f"width of every normalised feature map; it does not divide {bad}.")

    @property
    def time_embed_dim(self) -> int:
        return self.time_embedding_dim or 4 * self.block_out_channels[0]

    @property
    def context_dim(self) -> Optional[int]:
        """The last dimension ``encoder_hidden_states`` must have (None without cross-attention)."""
        dims = [b.cross_attention_dim for b in self.down_blocks() + self.mid_blocks() + self.up_blocks() if b.cross]
        return dims[0] if dims else None

    def down_blocks(self) -> tuple:
        c = self.block_out_channels
        n = len(c)
        return tuple(BlockPlan(t, c[max(i - 1, 0)], c[i], c[max(i - 1, 0)], self.layers_per_block[i],
                               self.transformer_layers_per_block[i], self.num_attention_heads[i],
                               self.cross_attention_dim[i], i < n - 1)
                     for i, t in enumerate(self.down_block_types))

    def mid_blocks(self) -> tuple:
        """The middle block (one ResNet-transformer-ResNet), or none."""
        if self.mid_block_type is None:
            return ()
        c = self.block_out_channels[-1]
        return (BlockPlan(self.mid_block_type, c, c, c, 1, self.transformer_layers_per_block[-1],
                          self.num_attention_heads[-1], self.cross_attention_dim[-1], False),)

    def up_blocks(self) -> tuple:
        rev = lambda values: tuple(reversed(values))  # noqa: E731
        c, layers = rev(self.block_out_channels), rev(self.layers_per_block)
        tl, heads, cross = (rev(self.transformer_layers_per_block), rev(self.num_attention_heads),
                            rev(self.cross_attention_dim))
        n = len(c)
        return tuple(BlockPlan(t, c[min(i + 1, n - 1)], c[i], c[max(i - 1, 0)], layers[i] + 1, tl[i], heads[i],
                               cross[i], i < n - 1)
                     for i, t in enumerate(self.up_block_types))

    def _normalized_widths(self) -> list:
        """Channels of every GroupNorm input (diffusers' ``in_channels`` bookkeeping)."""
        widths = [self.block_out_channels[0]]
        for b in self.down_blocks() + self.mid_blocks():
            widths += [b.in_channels, b.out_channels]
        for b in self.up_blocks():
            widths.append(b.out_channels)
            widths += [(b.prev_channels if j == 0 else b.out_channels)
                       + (b.in_channels if j == b.layers - 1 else b.out_channels) for j in range(b.layers)]
        return widths


# diffusers options the module implements at these values only (their defaults).
_UNET_REQUIRED = {
    "act_fn": ("silu", "swish"),
    "only_cross_attention": (False,),
    "dual_cross_attention": (False,),
    "class_embed_type": (None,),
    "num_class_embeds": (None,),
    "class_embeddings_concat": (False,),
    "addition_embed_type": (None,),
    "encoder_hid_dim": (None,),
    "encoder_hid_dim_type": (None,),
    "time_cond_proj_dim": (None,),
    "time_embedding_type": ("positional",),
    "time_embedding_act_fn": (None,),
    "timestep_post_act": (None,),
    "resnet_time_scale_shift": ("default",),
    "conv_in_kernel": (3,),
    "conv_out_kernel": (3,),
    "attention_type": ("default",),
    "reverse_transformer_layers_per_block": (None,),
}

def unet_config_from_dict(config: dict, *, file: str) -> UNet2DConditionConfig:
    """The :class:`UNet2DConditionConfig` of a diffusers ``unet/config.json`` (read by the caller).

    Heads follow diffusers: ``num_attention_heads`` if set, else ``attention_head_dim`` (which
    diffusers has always used as the number of heads), int or per block. Options that change the
    network to something this module does not compute raise ``ValueError`` naming ``file``, the
    key, its value and what is supported. Accepted without effect: ``upcast_attention`` (the
    softmax always runs in float32), ``dropout`` (inference), ``sample_size``, underscore keys, and
    options only other block types read (``resnet_skip_time_act``, ``resnet_out_scale_factor``,
    ``cross_attention_norm``, ``mid_block_only_cross_attention``, ``addition_*`` without
    ``addition_embed_type``, ``projection_class_embeddings_input_dim``)."""
    if isinstance(config, dict):
        # diffusers: num_attention_heads if given, else attention_head_dim, both the number of heads
        heads = config.get("num_attention_heads") or config.get("attention_head_dim", 8)
        config = {**config, "num_attention_heads": heads}
    return config_from_diffusers(UNet2DConditionConfig, config, file=file, component="UNet2DConditionModel",
                                 required=_UNET_REQUIRED)


class AttentionLayer(NamedTuple):
    """One attention layer of the UNet: its ``name`` (as diffusers names its processor, without
    ``.processor``), ``place`` ("down", "mid" or "up"), the ``resolution`` ``(h, w)`` of its
    feature map (queries ``h * w``), ``kind`` ("self": keys are the ``h * w`` positions; "cross":
    keys are the text tokens), ``heads`` and ``head_dim``."""

    name: str
    place: str
    resolution: tuple
    kind: str
    heads: int
    head_dim: int


def _hw(latent_hw) -> tuple:
    return (latent_hw, latent_hw) if isinstance(latent_hw, int) else tuple(int(s) for s in latent_hw)


def attention_layers(config: UNet2DConditionConfig, latent_hw) -> tuple:
    """Every attention layer of ``UNet2DConditionModel(config)`` on latents of ``latent_hw``
    (``(h, w)`` or an int for a square), in execution order (down, mid, up), as
    :class:`AttentionLayer` tuples."""
    h, w = _hw(latent_hw)
    n = len(config.block_out_channels)
    if h % 2 ** (n - 1) or w % 2 ** (n - 1):
        raise ValueError(f"attention_layers: latent size {(h, w)} must be divisible by 2**{n - 1} "
                         f"= {2 ** (n - 1)} ({n} blocks).")
    layers = []
    places = [("down", f"down_blocks.{i}", b, i) for i, b in enumerate(config.down_blocks())]
    places += [("mid", "mid_block", b, n - 1) for b in config.mid_blocks()]
    places += [("up", f"up_blocks.{i}", b, n - 1 - i) for i, b in enumerate(config.up_blocks())]
    for place, prefix, block, level in places:
        if not block.cross:
            continue
        attentions = 1 if place == "mid" else block.layers
        for j in range(attentions):
            for k in range(block.transformer_layers):
                for attn, kind in (("attn1", "self"), ("attn2", "cross")):
                    layers.append(AttentionLayer(f"{prefix}.attentions.{j}.transformer_blocks.{k}.{attn}", place,
                                                 (h // 2 ** level, w // 2 ** level), kind, block.heads,
                                                 block.out_channels // block.heads))
    return tuple(layers)


def select_attention(layers, *, place: Optional[str] = None, kind: Optional[str] = None,
                     resolution=None) -> tuple:
    """Names of the ``layers`` (from :func:`attention_layers`) at ``place`` ("down", "mid",
    "up"), of ``kind`` ("self", "cross") and at ``resolution`` (``(h, w)`` or an int for a
    square); None matches anything."""
    if place not in (None, "down", "mid", "up"):
        raise ValueError(f"select_attention: place must be 'down', 'mid', 'up' or None; got {place!r}.")
    if kind not in (None, "self", "cross"):
        raise ValueError(f"select_attention: kind must be 'self', 'cross' or None; got {kind!r}.")
    size = None if resolution is None else _hw(resolution)
    return tuple(layer.name for layer in layers
                 if (place is None or layer.place == place) and (kind is None or layer.kind == kind)
                 and (size is None or layer.resolution == size))


def timestep_features(t, dim: int, *, flip_sin_to_cos: bool, freq_shift: float):
    """diffusers' ``get_timestep_embedding``: ``(B,)`` timesteps (int or float) -> ``(B, dim)``
    float32 ``[sin(t w), cos(t w)]`` (``[cos, sin]`` when ``flip_sin_to_cos``), with
    ``w_k = exp(-log(10000) k / (dim/2 - freq_shift))``, zero-padded when ``dim`` is odd."""
    half = dim // 2
    freqs = jnp.exp(-math.log(10000.0) * jnp.arange(half, dtype=jnp.float32) / (half - freq_shift))
    angles = jnp.asarray(t).astype(jnp.float32)[:, None] * freqs[None, :]
    parts = [jnp.cos(angles), jnp.sin(angles)] if flip_sin_to_cos else [jnp.sin(angles), jnp.cos(angles)]
    if dim % 2:
        parts.append(jnp.zeros_like(angles[:, :1]))
    return jnp.concatenate(parts, axis=-1)


class _TimestepEmbedding(nn.Module):
    """``linear_2(silu(linear_1(e)))``."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, e):
        return dense(self.features, self.dtype, "linear_2")(nn.silu(dense(self.features, self.dtype, "linear_1")(e)))


class _GEGLU(nn.Module):
    """``a * gelu(b)`` with ``[a, b] = proj(x)`` (exact erf GELU, as ``F.gelu``)."""

    features: int
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        a, b = jnp.split(dense(2 * self.features, self.dtype, "proj")(x), 2, axis=-1)
        return a * nn.gelu(b, approximate=False)


class _FeedForward(nn.Module):
    """diffusers' ``FeedForward`` with GEGLU: ``net_2(net_0(x))``, hidden width ``4 * dim``."""

    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        dim = x.shape[-1]
        return dense(dim, self.dtype, "net_2")(_GEGLU(4 * dim, self.dtype, name="net_0")(x))


def _layer_norm(dtype, name: str) -> nn.LayerNorm:
    # torch.nn.LayerNorm(dim) (eps 1e-5, two-pass variance)
    return nn.LayerNorm(epsilon=1e-5, use_fast_variance=False, dtype=dtype, param_dtype=jnp.float32, name=name)


class _BasicTransformerBlock(nn.Module):
    """``x += attn1(norm1(x))``; ``x += attn2(norm2(x), context)``; ``x += ff(norm3(x))`` on
    ``(B, L, dim)`` tokens. ``prefix`` is the block's diffusers name; its attention layers are
    ``{prefix}.attn1`` / ``{prefix}.attn2``."""

    heads: int
    head_dim: int
    prefix: str
    record: tuple = ()
    query_chunk: Optional[int] = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, context, modifiers):
        for attn, norm, source in (("attn1", "norm1", None), ("attn2", "norm2", context)):
            layer = f"{self.prefix}.{attn}"
            x = x + Attention(self.heads, self.head_dim, layer, record=layer in self.record,
                              query_chunk=self.query_chunk, dtype=self.dtype, name=attn)(
                _layer_norm(self.dtype, norm)(x), source, modifiers.get(layer))
        return x + _FeedForward(self.dtype, name="ff")(_layer_norm(self.dtype, "norm3")(x))


class _Transformer2DModel(nn.Module):
    """diffusers' ``Transformer2DModel`` on continuous inputs: ``x + proj_out(blocks(proj_in(
    norm(x))))`` for ``x`` ``(B, H, W, C)``, the blocks running on the ``H W`` tokens of width
    ``heads * head_dim``."""

    heads: int
    head_dim: int
    layers: int
    groups: int
    linear: bool
    prefix: str
    record: tuple = ()
    query_chunk: Optional[int] = None
    dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x, context, modifiers):
        b, h, w, c = x.shape
        inner = self.heads * self.head_dim
        y = group_norm(self.groups, 1e-6, self.dtype, "norm")(x)
        if self.linear:
            y = dense(inner, self.dtype, "proj_in")(y.reshape(b, h * w, c))
        else:
            y = conv(inner, 1, self.dtype, "proj_in")(y).reshape(b, h * w, inner)
        for k in range(self.layers):
            y = _BasicTransformerBlock(self.heads, self.head_dim, f"{self.prefix}.transformer_blocks.{k}",
                                       self.record, self.query_chunk, self.dtype,
                                       name=f"transformer_blocks_{k}")(y, context, modifiers)
        if self.linear:
            y = dense(c, self.dtype, "proj_out")(y).reshape(b, h, w, c)
        else:
            y = conv(c, 1, self.dtype, "proj_out")(y.reshape(b, h, w, inner))
        return y + x


class _Block(nn.Module):
    """What the three block kinds share: their ResNet blocks and transformers, named as diffusers'
    ``resnets.j`` / ``attentions.j``."""

    plan: BlockPlan
    config: UNet2DConditionConfig
    prefix: str
    record: tuple = ()
    query_chunk: Optional[int] = None
    dtype: Any = jnp.float32

    def resnet(self, j: int, scale: float = 1.0) -> ResnetBlock2D:
        return ResnetBlock2D(self.plan.out_channels, self.config.norm_num_groups, self.config.norm_eps, scale,
                             self.dtype, name=f"resnets_{j}")

    def transformer(self, j: int) -> _Transformer2DModel:
        p = self.plan
        return _Transformer2DModel(p.heads, p.out_channels // p.heads, p.transformer_layers,
                                   self.config.norm_num_groups, self.config.use_linear_projection,
                                   f"{self.prefix}.attentions.{j}", self.record, self.query_chunk, self.dtype,
                                   name=f"attentions_{j}")


class _DownBlock(_Block):
    """``CrossAttnDownBlock2D`` / ``DownBlock2D``: returns the output and its skip activations
    (one per ResNet block, plus the downsampled output)."""

    @nn.compact
    def __call__(self, x, temb, context, modifiers):
        skips = []
        for j in range(self.plan.layers):
            x = self.resnet(j)(x, temb)
            if self.plan.cross:
                x = self.transformer(j)(x, context, modifiers)
            skips.append(x)
        if self.plan.resample:
            x = Downsample2D(self.config.downsample_padding, self.dtype, name="downsamplers_0")(x)
            skips.append(x)
        return x, tuple(skips)


class _MidBlock(_Block):
    """``UNetMidBlock2DCrossAttn``: ResNet, transformer, ResNet (outputs divided by
    ``mid_block_scale_factor``)."""

    @nn.compact
    def __call__(self, x, temb, context, modifiers):
        scale = self.config.mid_block_scale_factor
        x = self.resnet(0, scale)(x, temb)
        x = self.transformer(0)(x, context, modifiers)
        return self.resnet(1, scale)(x, temb)


class _UpBlock(_Block):
    """``CrossAttnUpBlock2D`` / ``UpBlock2D``: ResNet block ``j`` takes the concatenation of the
    hidden state and ``skips[-1 - j]`` (channels last)."""

    @nn.compact
    def __call__(self, x, skips, temb, context, modifiers):
        for j in range(self.plan.layers):
            x = self.resnet(j)(jnp.concatenate([x, skips[-1 - j]], axis=-1), temb)
            if self.plan.cross:
                x = self.transformer(j)(x, context, modifiers)
        if self.plan.resample:
            x = Upsample2D(self.dtype, name="upsamplers_0")(x)
        return x


class UNet2DConditionModel(nn.Module):
    """diffusers' ``UNet2DConditionModel`` (see the module docstring) on channels-last inputs.

    ``dtype`` is the compute dtype (e.g. ``jnp.bfloat16``); parameters stay float32 and the output
    is float32. ``remat`` recomputes each down/mid/up block in the backward pass
    (``jax.checkpoint``) instead of storing its activations.

    ``__call__(sample, timesteps, encoder_hidden_states, *, record=(), modifiers=None,
    query_chunk=None)``: ``sample`` ``(B, h, w, in_channels)`` with ``h, w`` divisible by
    ``2**(len(block_out_channels) - 1)``; ``timesteps`` ``(B,)`` or a scalar (int or float,
    embedded as float); ``encoder_hidden_states`` ``(B, L, cross_attention_dim)``. Returns
    ``(B, h, w, out_channels)``.

    * ``record``: static tuple of attention layer names (:func:`attention_layers`); each of those
      layers sows its probabilities ``(B, heads, Lq, Lk)`` in the ``"attention"`` collection under
      its name (run with ``mutable=["attention"]``, or use :func:`unet_apply`).
    * ``modifiers``: ``{layer name: array broadcastable to (B, heads, Lq, Lk)}`` added to that
      layer's scores before the softmax (arrays, so one compiled program serves every value), or
      a callable of the layer's scores returning such an array (a pytree whose numbers are
      leaves, e.g. :class:`zmagic_jax.modulation.RegionModulation`).
    * ``query_chunk``: compute attention over chunks of this many queries (bounds memory at large
      resolutions; must divide the query count of every layer not recorded).
    """

    config: UNet2DConditionConfig = UNet2DConditionConfig()
    dtype: Any = jnp.float32
    remat: bool = False

    @nn.compact
    def __call__(self, sample, timesteps, encoder_hidden_states, *, record=(), modifiers=None,
                 query_chunk: Optional[int] = None):
        cfg = self.config
        sample = jnp.asarray(sample)
        context = jnp.asarray(encoder_hidden_states)
        t = self._check_inputs(sample, timesteps, context)
        record = tuple(record)
        modifiers = dict(modifiers or {})
        known = {layer.name for layer in attention_layers(cfg, sample.shape[1:3])}
        unknown = sorted((set(record) | set(modifiers)) - known)
        if unknown:
            raise ValueError(f"UNet2DConditionModel: unknown attention layer names {unknown[:6]}; the names "
                             f"are those of attention_layers(config, latent_hw), e.g. {sorted(known)[:2]}.")

        x = sample.astype(self.dtype)
        if cfg.center_input_sample:
            x = 2 * x - 1.0
        features = timestep_features(t, cfg.block_out_channels[0], flip_sin_to_cos=cfg.flip_sin_to_cos,
                                     freq_shift=cfg.freq_shift)
        emb = _TimestepEmbedding(cfg.time_embed_dim, self.dtype, name="time_embedding")(features.astype(self.dtype))
        context = context.astype(self.dtype)
        x = conv(cfg.block_out_channels[0], 3, self.dtype, "conv_in")(x)

        wrap = nn.remat if self.remat else (lambda cls: cls)
        static = dict(record=record, query_chunk=query_chunk, dtype=self.dtype)
        skips = [x]
        for i, plan in enumerate(cfg.down_blocks()):
            x, block_skips = wrap(_DownBlock)(plan, cfg, f"down_blocks.{i}", **static, name=f"down_blocks_{i}")(
                x, emb, context, modifiers)
            skips.extend(block_skips)
        for plan in cfg.mid_blocks():
            x = wrap(_MidBlock)(plan, cfg, "mid_block", **static, name="mid_block")(x, emb, context, modifiers)
        for i, plan in enumerate(cfg.up_blocks()):
            block_skips, skips = tuple(skips[-plan.layers:]), skips[:-plan.layers]
            x = wrap(_UpBlock)(plan, cfg, f"up_blocks.{i}", **static, name=f"up_blocks_{i}")(
                x, block_skips, emb, context, modifiers)

        x = nn.silu(group_norm(cfg.norm_num_groups, cfg.norm_eps, self.dtype, "conv_norm_out")(x))
        return conv(cfg.out_channels, 3, self.dtype, "conv_out")(x).astype(jnp.float32)

    def _check_inputs(self, sample, timesteps, context):
        """The timesteps as ``(B,)``; shape errors name what was received."""
        cfg = self.config
        factor = 2 ** (len(cfg.block_out_channels) - 1)
        if sample.ndim != 4 or sample.shape[-1] != cfg.in_channels or sample.shape[1] % factor \
                or sample.shape[2] % factor:
            raise ValueError(f"UNet2DConditionModel: sample must be (B, h, w, {cfg.in_channels}) (channels last) "
                             f"with h, w divisible by {factor}; got {tuple(sample.shape)}.")
        b = sample.shape[0]
        if context.ndim != 3 or context.shape[0] != b or (cfg.context_dim is not None
                                                           and context.shape[-1] != cfg.context_dim):
            raise ValueError(f"UNet2DConditionModel: encoder_hidden_states must be ({b}, L, {cfg.context_dim}); "
                             f"got {tuple(context.shape)}.")
        t = jnp.asarray(timesteps)
        if t.ndim == 0:
            t = jnp.broadcast_to(t, (b,))
        if t.shape != (b,):
            raise ValueError(f"UNet2DConditionModel: timesteps must be a scalar or ({b},); got {tuple(t.shape)}.")
        return t


def unet_apply(module: UNet2DConditionModel, params, sample, timesteps, context, *, record=(), modifiers=None,
               query_chunk: Optional[int] = None):
    """``module`` applied with ``params`` (the tree of ``unet_params_from_torch``, without the
    ``{"params": ...}`` wrapper): the output ``(B, h, w, C_out)`` when ``record`` is empty, else
    ``(output, {layer name: probabilities (B, heads, Lq, Lk)})`` in the order of ``record``.
    ``record`` and ``query_chunk`` are static (close over them or mark them static under jit)."""
    variables = {"params": params}
    if not record:
        return module.apply(variables, sample, timesteps, context, modifiers=modifiers, query_chunk=query_chunk)
    out, state = module.apply(variables, sample, timesteps, context, record=tuple(record), modifiers=modifiers,
                              query_chunk=query_chunk, mutable=["attention"])
    # Each recording layer sowed a 1-tuple under its own layer name, whatever its module path.
    sown = {path[-1]: value[0] for path, value in traverse_util.flatten_dict(dict(state["attention"])).items()}
    return out, {name: sown[name] for name in record}
