"""Concept learning by EM: new text tokens and their latent masks, learned together from one image.

Rahman et al. ("Visual Concept-driven Image Generation with Text-to-Image Diffusion Model",
arXiv 2402.11487) learn a token for each of several concepts entangled in one image without
user-drawn masks by alternating

* an **M-step**: Break-A-Scene's training (Avrahami et al. 2023) of the tokens (and, in its second
  phase, the UNet and text encoder, or low-rank adapters) under the current masks, and
* an **E-step**: each concept's mask re-estimated from its token's cross-attention, averaged over
  timesteps, thresholded and refined by a dense CRF (:mod:`zmagic_jax.crf`).

The tokens are a separate trainable table ``(N, d)`` spliced into the text encoder's input
embeddings at the ids ``vocab_size .. vocab_size + N - 1`` (``extra_embeddings`` of
:class:`~zmagic_jax.models.CLIPTextTransformer`); the frozen table is never touched, so nothing has
to be restored after a step. Every loss is Break-A-Scene's (``train.py``), per training step:

* union sampling: ``k ~ U{1..N}`` concepts in a random order, the prompt ``template`` filled with
  them (``"a photo of <c0> and <c2>"``), the image and masks flipped left-right with probability
  ``flip_p``;
* ``t ~ U{0..T-1}``, ``x_t = sqrt(ab_t) z0 + sqrt(1 - ab_t) eps``; ``z0`` the VAE posterior mean
  (Break-A-Scene samples the posterior; the mean keeps a step a function of its key alone);
* the masked diffusion loss ``mean((m * pred - m * target)**2)`` over all elements (not normalised
  by the mask's area, as released), ``m`` the union of the sampled concepts' masks at the latent
  size, ``target = eps`` (``v`` for a v-prediction model);
* the cross-attention loss ``lambda_attention * sum_i mean((A_i / max A_i - M_i)**2)`` over the
  sampled concepts, ``A_i`` the cross-attention probabilities of token ``i`` averaged over the
  chosen layers (SD: the 16 x 16 layers of the down and up paths) and all heads, ``M_i`` the mask
  resized (nearest, as ``F.interpolate``) to that resolution;
* optional prior preservation: an unmasked diffusion loss on a class image with the class prompt,
  weight ``prior_weight``.

Phase 1 trains the tokens only (AdamW 5e-4); phase 2 starts fresh AdamW moments (2e-6) over the
tokens and the UNet (and the text encoder), or over low-rank adapters of the UNet's attention
projections (``W + (alpha / r) A B``, merged functionally: the optimiser holds moments for the
adapters only). Both clip the global gradient norm to 1; AdamW's betas (0.9, 0.999), eps 1e-8,
weight decay 1e-2 (Break-A-Scene's settings). The learning rates live in the optimiser state
(``optax.inject_hyperparams``): leaves, not constants.

The pieces are pure functions (:func:`concept_loss`, :func:`train_steps`,
:func:`attention_maps`, :func:`masks_from_attention`) that run inside a user's ``jit``; the EM
driver :func:`learn_concepts` jits them, records masks and losses per iteration and checkpoints
after each (a resumed run equals an uninterrupted one bit for bit: step ``s`` draws its randomness
from ``fold_in(key, s)``).
"""
from __future__ import annotations

import dataclasses
import functools
import hashlib
import itertools
import json
import re
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import traverse_util

from zmagic_jax._io import atomic_write_bytes
from zmagic_jax.checkpoint_io import DamagedFileError, read_safetensors, safetensors_save
from zmagic_jax.contracts import Keyed
from zmagic_jax.crf import dense_crf, refine_mask
from zmagic_jax.models._stable_diffusion import StableDiffusion, encode_image
from zmagic_jax.models._unet2d import attention_layers, unet_apply

PHASE2_TARGETS = ("full", "unet", "lora", "tokens")
LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out_0")
CHECKPOINT_FORMAT = "zmagic-concepts-checkpoint/1"


# ----------------------------------------------------------------------------- tokens and prompts

def placeholder_names(count: int) -> tuple:
    """The default placeholder strings ``("<c0>", ..., "<c{count-1}>")`` of the concept tokens."""
    return tuple(f"<c{i}>" for i in range(int(count)))


def prompt_length(sd: StableDiffusion) -> int:
    """Tokens per prompt: ``min(tokenizer.model_max_length, max_position_embeddings)``."""
    return min(int(sd.tokenizer.model_max_length), int(sd.text_encoder.config.max_position_embeddings))


def concept_token_ids(sd: StableDiffusion, count: int) -> np.ndarray:
    """The ids of the ``count`` concept tokens: ``vocab_size + i`` of the text encoder's table."""
    return np.arange(count, dtype=np.int32) + int(sd.text_encoder.config.vocab_size)


def tokenize_with_concepts(sd: StableDiffusion, prompts: Sequence[str], names: Sequence[str]) -> np.ndarray:
    """``(B, L)`` int32 ids of ``prompts`` in which each placeholder ``names[i]`` is the concept
    token ``vocab_size + i`` (the text between placeholders goes through the model's tokenizer):
    bos, tokens, eos, padding, as :func:`~zmagic_jax.models.encode_prompt` tokenises."""
    if isinstance(prompts, str) or not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError(f"tokenize_with_concepts: prompts must be a non-empty list of strings; got {prompts!r:.80}.")
    names = tuple(names)
    if not names or len(set(names)) != len(names) or not all(isinstance(n, str) and n.strip() for n in names):
        raise ValueError(f"tokenize_with_concepts: names must be distinct non-empty strings; got {names!r}.")
    length = prompt_length(sd)
    ids_of = dict(zip(names, concept_token_ids(sd, len(names)).tolist()))
    pattern = re.compile("|".join(re.escape(n) for n in sorted(names, key=len, reverse=True)))
    tok = sd.tokenizer
    out = np.full((len(prompts), length), tok.pad_token_id, np.int32)
    for row, prompt in enumerate(prompts):
        ids, last = [], 0
        for match in pattern.finditer(prompt):
            ids += tok.token_ids(prompt[last:match.start()]) + [ids_of[match.group()]]
            last = match.end()
        ids += tok.token_ids(prompt[last:])
        if len(ids) > length - 2:
            raise ValueError(f"tokenize_with_concepts: prompt {prompt!r} has {len(ids)} tokens, more than the "
                             f"{length - 2} this text encoder takes; shorten it.")
        out[row, :len(ids) + 2] = [tok.bos_token_id] + ids + [tok.eos_token_id]
    return out


def init_tokens(sd: StableDiffusion, *, words: Optional[Sequence[str]] = None, count: Optional[int] = None,
                key: Optional[jax.Array] = None) -> jnp.ndarray:
    """The initial token table ``(N, d)``: the input embedding of each word's first sub-token
    (Break-A-Scene's initialiser), or ``count`` rows drawn from ``N(mean, std**2)`` of the frozen
    table's columns with ``key``."""
    table = sd.text_params["embeddings"]["token_embedding"]["embedding"]
    if words is not None:
        rows = []
        for word in words:
            ids = sd.tokenizer.token_ids(word) if isinstance(word, str) else []
            if not ids:
                raise ValueError(f"init_tokens: word {word!r} gives no token; give words the tokenizer knows.")
            rows.append(table[ids[0]])
        return jnp.stack(rows).astype(jnp.float32)
    if count is None or key is None or int(count) < 1:
        raise ValueError("init_tokens: give words=[...] or count >= 1 and key= for a random table.")
    mean, std = jnp.mean(table, 0), jnp.std(table, 0)
    return (mean + std * jax.random.normal(key, (int(count), table.shape[1]))).astype(jnp.float32)


def union_prompts(names: Sequence[str], template: str = "a photo of {}", joiner: str = " and ") -> tuple:
    """Every prompt of union sampling: each ordered choice of ``k = 1 .. N`` concepts joined by
    ``joiner`` into ``template``. Returns ``(prompts, selections (S, N) 0/1, sizes (S,))``."""
    if template.count("{}") != 1:
        raise ValueError(f"union_prompts: template must hold one '{{}}'; got {template!r}.")
    prompts, selections, sizes = [], [], []
    for k in range(1, len(names) + 1):
        for order in itertools.permutations(range(len(names)), k):
            prompts.append(template.format(joiner.join(names[i] for i in order)))
            selections.append([1.0 if i in order else 0.0 for i in range(len(names))])
            sizes.append(k)
    return prompts, np.asarray(selections, np.float32), np.asarray(sizes, np.int32)


def concept_context(sd: StableDiffusion, tokens, prompts: Sequence[str], names: Sequence[str], *,
                    text_params=None) -> jnp.ndarray:
    """Text embeddings ``(B, L, D)`` of prompts holding learned concept tokens (``tokens (N, d)``,
    ``names`` their placeholders; ``text_params`` a fine-tuned text encoder's, default the
    model's): use one row as ``prompt_embeds`` of :func:`~zmagic_jax.models.latent_denoiser`, so
    every guidance scheme composes with the learned concepts."""
    ids = jnp.asarray(tokenize_with_concepts(sd, prompts, names))
    params = sd.text_params if text_params is None else text_params
    return _encode_program(Keyed(sd.text_encoder, repr(sd.text_encoder)), params, jnp.asarray(tokens), ids)


def _text_states(text, params, tokens, ids):
    return text.apply({"params": params}, ids, extra_embeddings=tokens).last_hidden_state


_encode_program = jax.jit(lambda text, params, tokens, ids: _text_states(text.value, params, tokens, ids),
                          static_argnums=0)


# ----------------------------------------------------------------------------- masks

def resize_nearest(masks, size) -> jnp.ndarray:
    """``(..., H, W)`` -> ``(..., h, w)`` as PyTorch's ``F.interpolate(mode="nearest")``: output
    pixel ``i`` reads input pixel ``floor(i * H / h)``."""
    masks = jnp.asarray(masks)
    h, w = (size, size) if isinstance(size, int) else size
    rows = np.floor(np.arange(h) * masks.shape[-2] / h).astype(np.int32)
    cols = np.floor(np.arange(w) * masks.shape[-1] / w).astype(np.int32)
    return masks[..., rows, :][..., cols]


def box_masks(boxes, size) -> np.ndarray:
    """``(N, H, W)`` float masks of an image of ``size = (H, W)``: 1 inside each box
    ``(top, left, bottom, right)`` in pixels, bottom and right exclusive."""
    h, w = size
    boxes = np.asarray(boxes, np.float64)
    if boxes.ndim != 2 or boxes.shape[1] != 4:
        raise ValueError(f"box_masks: boxes must be (N, 4) rows (top, left, bottom, right); got {boxes.shape}.")
    out = np.zeros((len(boxes), h, w), np.float32)
    for mask, (top, left, bottom, right) in zip(out, boxes):
        if not (0 <= top < bottom <= h and 0 <= left < right <= w):
            raise ValueError(f"box_masks: box {(top, left, bottom, right)} must satisfy 0 <= top < bottom <= {h} "
                             f"and 0 <= left < right <= {w}.")
        mask[int(top):int(np.ceil(bottom)), int(left):int(np.ceil(right))] = 1.0
    return out


def mask_iou(predicted, true) -> np.ndarray:
    """IoU per mask of ``(..., H, W)`` masks (> 0.5 is inside); 1 when both are empty."""
    p, t = np.asarray(predicted) > 0.5, np.asarray(true) > 0.5
    inter = (p & t).sum((-2, -1))
    union = (p | t).sum((-2, -1))
    return np.where(union > 0, inter / np.maximum(union, 1), 1.0)


# ----------------------------------------------------------------------------- losses

def masked_diffusion_loss(pred, target, mask) -> jnp.ndarray:
    """Break-A-Scene's masked loss ``mean((m * pred - m * target)**2)`` over all elements of
    ``pred`` / ``target`` ``(c, h, w)``, ``mask (h, w)`` broadcast over the channels."""
    return jnp.mean((mask * pred - mask * target) ** 2)


def attention_loss(maps, masks, selected) -> jnp.ndarray:
    """Break-A-Scene's cross-attention loss (before ``lambda_attention``): ``sum_i s_i
    mean((A_i / max A_i - M_i)**2)`` for maps ``A (N, r, r)`` (each token's probabilities averaged
    over layers and heads), masks ``M (N, r, r)`` and the sampled concepts ``s (N,)`` in {0, 1}."""
    peak = jnp.max(maps, axis=(-2, -1), keepdims=True)
    # a concept absent from the prompt has an all-zero map: divide by 1 there (its term is dropped
    # by s_i = 0, and 0 * NaN would not be)
    error = jnp.mean((maps / jnp.where(peak > 0, peak, 1.0) - masks) ** 2, axis=(-2, -1))
    return jnp.sum(jnp.where(selected > 0, selected * error, 0.0))


def token_maps(probs: Sequence, ids, concept_ids, resolution) -> jnp.ndarray:
    """Each concept token's cross-attention map ``(N, r, r)``: the probabilities ``(heads, r * r,
    L)`` of each recorded layer (one sample), averaged over layers and heads, at the positions of
    the ids ``concept_ids (N,)`` in the prompt ``ids (L,)`` (summed if a token appears twice; zero
    for a token absent from the prompt)."""
    h, w = resolution
    mean = jnp.mean(jnp.stack([jnp.mean(p, 0) for p in probs]), 0)  # (r * r, L)
    where = (jnp.asarray(ids)[None, :] == jnp.asarray(concept_ids)[:, None]).astype(mean.dtype)  # (N, L)
    return jnp.einsum("ql,nl->nq", mean, where).reshape(-1, h, w)


# ----------------------------------------------------------------------------- low-rank adapters

def _lora_kernels(unet_params) -> dict:
    flat = traverse_util.flatten_dict(unet_params)
    return {path[:-1]: value for path, value in flat.items()
            if path[-1] == "kernel" and len(path) >= 2 and path[-2] in LORA_TARGETS}


def lora_init(unet_params, rank: int, key: jax.Array) -> dict:
    """Low-rank adapters of every attention projection (``to_q``, ``to_k``, ``to_v``,
    ``to_out_0``) of a UNet: ``{"path/of/projection": {"down": (in, r) ~ N(0, 1/r**2), "up": (r,
    out) zeros}}`` (LoRA's initialisation: the adapted UNet starts equal to the UNet)."""
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise ValueError(f"lora_init: rank must be an integer >= 1; got {rank!r}.")
    kernels = _lora_kernels(unet_params)
    if not kernels:
        raise ValueError("lora_init: the UNet has no attention projections (to_q, to_k, to_v, to_out_0).")
    out = {}
    for i, (path, kernel) in enumerate(sorted(kernels.items())):
        d_in, d_out = kernel.shape
        out["/".join(path)] = {"down": jax.random.normal(jax.random.fold_in(key, i), (d_in, rank)) / rank,
                               "up": jnp.zeros((rank, d_out), jnp.float32)}
    return out


def lora_merge(unet_params, lora: dict, scale=1.0) -> dict:
    """The UNet params with each adapted kernel ``W + scale * down @ up`` (``scale = alpha / r``)."""
    flat = traverse_util.flatten_dict(unet_params)
    for name, adapter in lora.items():
        path = tuple(name.split("/")) + ("kernel",)
        if path not in flat:
            raise ValueError(f"lora_merge: the adapter {name!r} names no kernel of this UNet.")
        kernel = flat[path]
        flat[path] = kernel + (scale * adapter["down"] @ adapter["up"]).astype(kernel.dtype)
    return traverse_util.unflatten_dict(flat)


# ----------------------------------------------------------------------------- the training step

class ConceptModel(NamedTuple):
    """What the pure functions need of a model, hashable (a static argument): the UNet and text
    modules (with the compute dtype and remat chosen), the recorded cross-attention layers and
    their resolution, and the prediction type."""

    unet: Keyed
    text: Keyed
    layers: tuple
    resolution: tuple
    prediction_type: str


def concept_model(sd: StableDiffusion, latent_hw, *, resolution=None, dtype=None, remat: bool = False
                  ) -> ConceptModel:
    """The :class:`ConceptModel` of ``sd`` on latents of ``latent_hw``: the cross-attention layers
    of the down and up paths at ``resolution`` (default: the smallest resolution that has cross
    attention in both paths, SD's 16 x 16 at 512 px), ``dtype`` the compute dtype (e.g.
    ``jnp.bfloat16``; weights stay float32), ``remat`` recomputes each UNet block and text layer
    in the backward pass (``jax.checkpoint``)."""
    layers = attention_layers(sd.unet.config, latent_hw)
    cross = [layer for layer in layers if layer.kind == "cross" and layer.place in ("down", "up")]
    both = sorted({layer.resolution for layer in cross if layer.place == "down"}
                  & {layer.resolution for layer in cross if layer.place == "up"})
    if not both:
        raise ValueError("concept_model: this UNet has no cross-attention layers in both its down and up paths.")
    chosen = min(both, key=lambda r: r[0] * r[1]) if resolution is None else (
        (resolution, resolution) if isinstance(resolution, int) else tuple(resolution))
    if chosen not in both:
        raise ValueError(f"concept_model: resolution must be one of {both} (cross attention in the down and up "
                         f"paths on latents {latent_hw}); got {resolution!r}.")
    changes = {"remat": bool(remat)} | ({} if dtype is None else {"dtype": dtype})
    unet, text = sd.unet.clone(**changes), sd.text_encoder.clone(**changes)
    names = tuple(layer.name for layer in cross if layer.resolution == chosen)
    return ConceptModel(Keyed(unet, repr(unet)), Keyed(text, repr(text)), names, chosen, sd.prediction_type)


class ConceptData(NamedTuple):
    """The leaves one training step reads: the image's latents ``(2, c, h, w)`` (as is, flipped
    left-right), the concepts' masks ``(N, h, w)``, the union-sampling prompts' ids ``(S, L)`` with
    their selections ``(S, N)``, the start and count of the prompts of each size ``k = 1 .. N``
    (``(N,)`` each), the concept ids ``(N,)``, the training schedule's ``alphas_cumprod`` and the
    prior class latents ``(P, c, h, w)`` with the class prompt's ids ``(L,)`` (or ``None``)."""

    latents: Any
    masks: Any
    prompt_ids: Any
    selections: Any
    size_start: Any
    size_count: Any
    concept_ids: Any
    alphas_cumprod: Any
    prior_latents: Any = None
    prior_ids: Any = None


class Hyper(NamedTuple):
    """The loss weights and flip probability, leaves."""

    lambda_attention: Any = 0.01
    prior_weight: Any = 1.0
    flip_p: Any = 0.5
    lora_scale: Any = 1.0


def _params(trainable: dict, frozen: dict, hyper: Hyper) -> tuple:
    unet = trainable.get("unet", frozen.get("unet"))
    if "lora" in trainable:
        unet = lora_merge(unet, trainable["lora"], hyper.lora_scale)
    return unet, trainable.get("text", frozen.get("text"))


def concept_loss(trainable: dict, frozen: dict, data: ConceptData, hyper: Hyper, key: jax.Array, *,
                 model: ConceptModel) -> tuple:
    """One Break-A-Scene training loss (module docstring) for the step drawn from ``key``:
    ``(loss, (diffusion, attention, prior))``. ``trainable`` holds ``"tokens"`` and what phase 2
    trains (``"unet"``, ``"text"`` or ``"lora"``); ``frozen`` the rest (``"unet"``, ``"text"``)."""
    k_size, k_pick, k_flip, k_t, k_eps, k_prior = jax.random.split(key, 6)
    n = data.masks.shape[0]
    size = jax.random.randint(k_size, (), 0, n)
    row = data.size_start[size] + jax.random.randint(k_pick, (), 0, data.size_count[size])
    selected = data.selections[row]
    flip = jax.random.bernoulli(k_flip, hyper.flip_p)
    z0 = data.latents[flip.astype(jnp.int32)]
    masks = jnp.where(flip, data.masks[..., ::-1], data.masks)
    union = jnp.max(selected[:, None, None] * masks, axis=0)

    alphas = data.alphas_cumprod
    t = jax.random.randint(k_t, (), 0, alphas.shape[0])
    ab = alphas[t].astype(z0.dtype)
    unet_params, text_params = _params(trainable, frozen, hyper)
    ids = data.prompt_ids[row][None]
    samples, targets = [], []
    for z, k in ((z0, k_eps),) + (() if data.prior_latents is None else
                                  ((data.prior_latents[jax.random.randint(k_prior, (), 0, data.prior_latents.shape[0])],
                                    jax.random.fold_in(k_prior, 1)),)):
        eps = jax.random.normal(k, z.shape, z.dtype)
        samples.append(jnp.sqrt(ab) * z + jnp.sqrt(1.0 - ab) * eps)
        targets.append(eps if model.prediction_type == "epsilon" else jnp.sqrt(ab) * eps - jnp.sqrt(1.0 - ab) * z)
    if data.prior_latents is not None:
        ids = jnp.concatenate([ids, data.prior_ids[None]])
    context = _text_states(model.text.value, text_params, trainable["tokens"], ids)
    batch = jnp.transpose(jnp.stack(samples), (0, 2, 3, 1))
    out, probs = unet_apply(model.unet.value, unet_params, batch, jnp.full((len(samples),), t), context,
                            record=model.layers)
    pred = jnp.transpose(out, (0, 3, 1, 2)).astype(z0.dtype)
    diffusion = masked_diffusion_loss(pred[0], targets[0], union)
    maps = token_maps([probs[name][0].astype(jnp.float32) for name in model.layers], ids[0], data.concept_ids,
                      model.resolution)
    attention = attention_loss(maps, resize_nearest(masks, model.resolution), selected)
    prior = jnp.mean((pred[1] - targets[1]) ** 2) if data.prior_latents is not None else jnp.zeros(())
    loss = diffusion + hyper.lambda_attention * attention + hyper.prior_weight * prior
    return loss, (diffusion, attention, prior)


def optimizer(learning_rate, *, clip: float = 1.0, weight_decay: float = 1e-2,
              lora_learning_rate=None) -> optax.GradientTransformation:
    """Break-A-Scene's optimiser: global-norm clipping to ``clip``, then AdamW (betas 0.9, 0.999,
    eps 1e-8) with the learning rate and weight decay in its state (leaves). With
    ``lora_learning_rate``, the params' ``"lora"`` entry has its own AdamW at that rate."""
    def adamw(rate):
        return optax.inject_hyperparams(optax.adamw)(learning_rate=rate, b1=0.9, b2=0.999, eps=1e-8,
                                                     weight_decay=weight_decay)

    if lora_learning_rate is None:
        return optax.chain(optax.clip_by_global_norm(clip), adamw(learning_rate))
    return optax.chain(optax.clip_by_global_norm(clip), optax.multi_transform(
        {"lora": adamw(lora_learning_rate), "rest": adamw(learning_rate)},
        lambda params: {name: jax.tree.map(lambda _: "lora" if name == "lora" else "rest", value)
                        for name, value in params.items()}))


def train_steps(trainable: dict, opt_state, losses, frozen: dict, data: ConceptData, hyper: Hyper, key, start,
                count, *, model: ConceptModel, clip: float = 1.0) -> tuple:
    """Steps ``start .. start + count - 1`` (``count`` may be traced): step ``s`` takes the loss of
    :func:`concept_loss` with ``fold_in(key, s)``, its gradient w.r.t. ``trainable`` and one update
    of :func:`optimizer`; ``losses[s]`` receives ``(loss, diffusion, attention, prior)``. Returns
    ``(trainable, opt_state, losses)``."""
    # the learning rates and weight decay are read from opt_state; only the structure is built here
    opt = optimizer(0.0, clip=clip, lora_learning_rate=0.0 if "lora" in trainable else None)

    def body(i, carry):
        params, state, record = carry
        step = start + i
        (loss, parts), grads = jax.value_and_grad(concept_loss, has_aux=True)(
            params, frozen, data, hyper, jax.random.fold_in(key, step), model=model)
        updates, state = opt.update(grads, state, params)
        record = record.at[step].set(jnp.stack([loss, *parts]).astype(record.dtype))
        return optax.apply_updates(params, updates), state, record

    return jax.lax.fori_loop(0, count, body, (trainable, opt_state, losses))


# ----------------------------------------------------------------------------- the E-step

def attention_maps(unet_params, text_params, tokens, latent, ids, concept_ids, alphas_cumprod, key, timesteps, *,
                   model: ConceptModel) -> jnp.ndarray:
    """Each concept's cross-attention map ``(N, r, r)`` on the image's latent ``(c, h, w)``: the
    prompt ``ids (L,)`` (all concepts) at each of ``timesteps (T,)`` on ``x_t`` noised with
    ``fold_in(key, j)``, averaged over the timesteps, the model's layers and heads."""
    context = _text_states(model.text.value, text_params, tokens, ids[None])
    hwc = jnp.transpose(latent, (1, 2, 0))

    def one(j):
        t = timesteps[j]
        ab = alphas_cumprod[t].astype(latent.dtype)
        x = jnp.sqrt(ab) * hwc + jnp.sqrt(1.0 - ab) * jax.random.normal(jax.random.fold_in(key, j), hwc.shape,
                                                                       hwc.dtype)
        _, probs = unet_apply(model.unet.value, unet_params, x[None], t[None], context, record=model.layers)
        return token_maps([probs[name][0].astype(jnp.float32) for name in model.layers], ids, concept_ids,
                          model.resolution)

    return jnp.mean(jax.lax.map(one, jnp.arange(timesteps.shape[0])), 0)


def masks_from_attention(maps, image, threshold=0.5, *, crf: bool = True, exclusive: bool = True,
                         assignment: str = "threshold", previous=None, mask_prior=0.0,
                         crf_options: Optional[dict] = None) -> jnp.ndarray:
    """The E-step's masks ``(N, H, W)`` in {0, 1} from attention maps ``(N, r, r)``, bilinearly
    upsampled to the image ``(H, W, C)`` (0..255, at the latent size) and, with ``previous`` masks
    ``(N, H, W)``, weighted by them as a prior: ``A_i (1 - mask_prior + mask_prior M_i)`` (0: no
    prior; 0.9: attention outside the previous mask counts a tenth); a concept left with an empty
    mask keeps its previous one (an empty mask would train its token to attend nowhere, and it
    would never come back):

    * ``assignment="threshold"``: each map divided by its maximum, thresholded at ``threshold``,
      refined by the dense CRF one mask at a time (CutLER's recipe,
      :func:`zmagic_jax.crf.refine_mask`) and, with ``exclusive``, a pixel claimed by several
      concepts given to the one of largest normalised attention. For concepts that need not
      cover the image.
    * ``assignment="argmax"``: the concepts compete for every pixel: ``p_i = A_i / sum_j A_j``,
      a dense CRF over the ``N`` labels with unaries ``-log p_i`` (:func:`zmagic_jax.crf.dense_crf`)
      and each pixel to its most probable concept. For concepts that cover the image (a
      background among them)."""
    if assignment not in ("threshold", "argmax"):
        raise ValueError(f"masks_from_attention: assignment must be 'threshold' or 'argmax'; got {assignment!r}.")
    image = jnp.asarray(image, jnp.float32)
    h, w = image.shape[:2]
    up = jax.image.resize(jnp.asarray(maps, jnp.float32), (maps.shape[0], h, w), "bilinear")
    if previous is not None:
        previous = jnp.asarray(previous, jnp.float32)
        up = up * (1.0 - mask_prior + mask_prior * previous)
    if assignment == "argmax":
        share = jnp.maximum(up, 1e-12) / jnp.sum(jnp.maximum(up, 1e-12), axis=0, keepdims=True)
        if crf:
            share = dense_crf(-jnp.log(share), image, **(crf_options or {}))
        masks = (jnp.arange(maps.shape[0])[:, None, None] == jnp.argmax(share, 0)[None]).astype(jnp.float32)
        return masks if previous is None else _keep_nonempty(masks, previous)
    # min-max over the pixels the prior allows (all without one): the threshold is a fraction of
    # the map's own range there, whatever its floor
    support = jnp.ones_like(up, bool) if previous is None else (1.0 - mask_prior + mask_prior * previous) > 0
    low = jnp.min(jnp.where(support, up, jnp.inf), axis=(-2, -1), keepdims=True)
    high = jnp.max(jnp.where(support, up, -jnp.inf), axis=(-2, -1), keepdims=True)
    norm = jnp.where(support, (up - low) / jnp.maximum(high - low, 1e-12), 0.0)
    masks = (norm > threshold).astype(jnp.float32)
    if crf:
        masks = (jax.vmap(lambda m: refine_mask(m, image, **(crf_options or {})))(masks) > 0.5).astype(jnp.float32)
    if exclusive:
        best = jnp.argmax(jnp.where(masks > 0, norm, -1.0), axis=0)
        masks = masks * (jnp.arange(masks.shape[0])[:, None, None] == best[None]).astype(masks.dtype)
    return masks if previous is None else _keep_nonempty(masks, previous)


def _keep_nonempty(masks, previous):
    empty = jnp.sum(masks, axis=(-2, -1), keepdims=True) == 0
    return jnp.where(empty, previous, masks)


# ----------------------------------------------------------------------------- the EM driver

@dataclasses.dataclass(frozen=True)
class ConceptSettings:
    """Settings of :func:`learn_concepts` (Break-A-Scene's defaults where it has one).

    Attributes:
      iterations: EM iterations; each is an M-step of ``steps_per_iteration`` training steps, then
        an E-step (unless ``reestimate`` is False: the masks estimated once are kept, the
        paper's baseline).
      phase1_steps: training steps of phase 1 (tokens only, ``lr_tokens``); later steps are
        phase 2 (fresh AdamW moments): ``phase2`` "full" (tokens, UNet and text encoder at
        ``lr_phase2``), "unet" (tokens and UNet), "lora" (tokens at ``lr_phase2``, adapters of rank
        ``lora_rank`` scaled ``lora_alpha / lora_rank`` at ``lr_lora``) or "tokens".
      weight_decay, clip: AdamW's decoupled weight decay and the global-norm clip.
      lambda_attention, prior_weight, flip_p: the loss weights and the flip probability.
      template, joiner: union sampling's prompt ("a photo of {}" with " and ").
      attention_resolution: the cross-attention layers' resolution (None: :func:`concept_model`).
      mask_timesteps, mask_max_timestep, threshold, assignment, mask_prior, crf, exclusive: the E-step (random timesteps
        below ``mask_max_timestep``, default all, averaged; then :func:`masks_from_attention`).
        ``mask_prompts``: "joint" reads every map from the prompt naming all concepts, "each"
        reads concept ``i``'s map from the prompt naming it alone (no token is read at another's
        place in the sentence). ``crf_options``: ``(name, value)`` pairs of :func:`zmagic_jax.crf.dense_crf` (default
        CutLER's constants, tuned at 480 px: a 32 x 32 mask wants smaller ``sxy``).
      inversion_steps: before the initial masks, this many steps of tokens-only training on the
        whole image (masks all ones, no attention loss): the "unmasked inversion" initialisation.
      dtype: None (float32) or "bfloat16" compute; remat: ``jax.checkpoint`` per UNet block.
    """

    iterations: int = 4
    steps_per_iteration: int = 200
    phase1_steps: int = 400
    phase2: str = "full"
    lr_tokens: float = 5e-4
    lr_phase2: float = 2e-6
    lora_rank: int = 4
    lora_alpha: float = 4.0
    lr_lora: float = 1e-4
    weight_decay: float = 1e-2
    clip: float = 1.0
    lambda_attention: float = 0.01
    prior_weight: float = 1.0
    flip_p: float = 0.5
    template: str = "a photo of {}"
    joiner: str = " and "
    attention_resolution: Optional[int] = None
    mask_timesteps: int = 50
    mask_max_timestep: Optional[int] = None
    threshold: float = 0.5
    assignment: str = "threshold"
    mask_prompts: str = "joint"
    mask_prior: float = 0.0
    crf: bool = True
    crf_options: tuple = ()
    exclusive: bool = True
    reestimate: bool = True
    inversion_steps: int = 0
    dtype: Optional[str] = None
    remat: bool = False

    def __post_init__(self):
        for name in ("iterations", "steps_per_iteration", "mask_timesteps", "lora_rank"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"ConceptSettings: {name} must be an integer >= 1; got {value!r}.")
        if self.mask_max_timestep is not None and (isinstance(self.mask_max_timestep, bool) or not isinstance(
                self.mask_max_timestep, int) or self.mask_max_timestep < 1):
            raise ValueError(f"ConceptSettings: mask_max_timestep must be None or an integer >= 1; got "
                             f"{self.mask_max_timestep!r}.")
        for name in ("phase1_steps", "inversion_steps"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"ConceptSettings: {name} must be an integer >= 0; got {value!r}.")
        if self.mask_prompts not in ("joint", "each"):
            raise ValueError(f"ConceptSettings: mask_prompts must be 'joint' or 'each'; got {self.mask_prompts!r}.")
        if self.assignment not in ("threshold", "argmax"):
            raise ValueError(f"ConceptSettings: assignment must be 'threshold' or 'argmax'; got {self.assignment!r}.")
        if self.phase2 not in PHASE2_TARGETS:
            raise ValueError(f"ConceptSettings: phase2 must be one of {PHASE2_TARGETS}; got {self.phase2!r}.")
        if self.dtype not in (None, "float32", "bfloat16"):
            raise ValueError(f"ConceptSettings: dtype must be None, 'float32' or 'bfloat16'; got {self.dtype!r}.")
        if not 0.0 < self.threshold < 1.0:
            raise ValueError(f"ConceptSettings: threshold must be in (0, 1); got {self.threshold!r}.")
        known = ("gaussian_sxy", "gaussian_compat", "bilateral_sxy", "bilateral_srgb", "bilateral_compat")
        if not isinstance(self.crf_options, tuple) or not all(
                isinstance(o, tuple) and len(o) == 2 and o[0] in known for o in self.crf_options):
            raise ValueError(f"ConceptSettings: crf_options must be a tuple of (name, value) pairs with names in "
                             f"{known}; got {self.crf_options!r}.")
        if not 0.0 <= self.mask_prior <= 1.0:
            raise ValueError(f"ConceptSettings: mask_prior must be in [0, 1]; got {self.mask_prior!r}.")
        if not 0.0 <= self.flip_p <= 1.0:
            raise ValueError(f"ConceptSettings: flip_p must be in [0, 1]; got {self.flip_p!r}.")

    @property
    def total_steps(self) -> int:
        return self.iterations * self.steps_per_iteration


class ConceptResult(NamedTuple):
    """What :func:`learn_concepts` learned: the placeholder ``names``, the ``tokens (N, d)``, the
    phase-2 parameters (``trained``: ``"unet"``, ``"text"`` or ``"lora"``, empty if none), the
    masks after each iteration ``(iterations + 1, N, h, w)`` (index 0: the initial masks), the
    per-step losses ``(steps, 4)`` (loss, diffusion, attention, prior) and the settings."""

    names: tuple
    tokens: Any
    trained: dict
    masks: np.ndarray
    losses: np.ndarray
    settings: ConceptSettings

    def model(self, sd: StableDiffusion) -> StableDiffusion:
        """``sd`` with the phase-2 UNet / text encoder (adapters merged) in place of its own."""
        unet, text = _params(self.trained, {"unet": sd.unet_params, "text": sd.text_params},
                             Hyper(lora_scale=self.settings.lora_alpha / self.settings.lora_rank))
        return sd._replace(unet_params=unet, text_params=text)

    def context(self, sd: StableDiffusion, prompts: Sequence[str]) -> jnp.ndarray:
        """:func:`concept_context` of ``prompts`` with the learned tokens (and text encoder)."""
        return concept_context(sd, self.tokens, prompts, self.names, text_params=self.model(sd).text_params)


def _latent_image(sd: StableDiffusion, image: np.ndarray, latent_hw) -> np.ndarray:
    """The image ``(H, W, C)`` in [-1, 1] averaged over the cells of the latent grid, in 0..255
    (the CRF's colour units)."""
    h, w = latent_hw
    H, W, C = image.shape
    cells = image.reshape(h, H // h, w, W // w, C).mean((1, 3))
    return np.clip((cells + 1.0) * 127.5, 0.0, 255.0).astype(np.float32)


def _phase2_trainable(sd: StableDiffusion, tokens, settings: ConceptSettings, key) -> dict:
    trainable = {"tokens": tokens}
    if settings.phase2 in ("full", "unet"):
        trainable["unet"] = sd.unet_params
    if settings.phase2 == "full":
        trainable["text"] = sd.text_params
    if settings.phase2 == "lora":
        trainable["lora"] = lora_init(sd.unet_params, settings.lora_rank, jax.random.fold_in(key, 2))
    return trainable


def _frozen(sd: StableDiffusion, trainable: dict) -> dict:
    return {name: params for name, params in (("unet", sd.unet_params), ("text", sd.text_params))
            if name not in trainable}


def _opt_state(trainable: dict, settings: ConceptSettings, phase: int):
    rate = settings.lr_tokens if phase == 1 else settings.lr_phase2
    return optimizer(rate, clip=settings.clip, weight_decay=settings.weight_decay,
                     lora_learning_rate=settings.lr_lora if "lora" in trainable else None).init(trainable)


def _estimate(unet_params, text_params, tokens, latent, ids, concept_ids, alphas_cumprod, key, timesteps, image,
              threshold, previous, mask_prior, crf_options, *, model: ConceptModel, crf: bool, exclusive: bool,
              assignment: str):
    if ids.ndim == 1:
        maps = attention_maps(unet_params, text_params, tokens, latent, ids, concept_ids, alphas_cumprod, key,
                              timesteps, model=model)
    else:  # one prompt per concept: concept i's map from prompt i
        maps = jax.lax.map(lambda row: attention_maps(unet_params, text_params, tokens, latent, row, concept_ids,
                                                      alphas_cumprod, key, timesteps, model=model), ids)
        maps = maps[jnp.arange(ids.shape[0]), jnp.arange(ids.shape[0])]
    return masks_from_attention(maps, image, threshold, crf=crf, exclusive=exclusive, assignment=assignment,
                                previous=previous, mask_prior=mask_prior, crf_options=crf_options)


@functools.lru_cache(maxsize=None)
def _programs(compiler_options: tuple) -> tuple:
    """The jitted training chunk and E-step, one pair per set of XLA compiler options."""
    options = dict(compiler_options) or None
    return (jax.jit(train_steps, static_argnames=("model", "clip"), compiler_options=options),
            jax.jit(_estimate, static_argnames=("model", "crf", "exclusive", "assignment"),
                    compiler_options=options))


_train_program, _estimate_program = _programs(())


def _checked_image(sd: StableDiffusion, image) -> np.ndarray:
    image = np.asarray(image, np.float32)
    channels = sd.latent_channels if sd.vae is None else int(sd.vae.config.in_channels)
    if image.ndim != 3 or image.shape[-1] != channels or not np.all(np.isfinite(image)) \
            or image.min() < -1.0 - 1e-6 or image.max() > 1.0 + 1e-6:
        raise ValueError(f"learn_concepts: image must be one (H, W, {channels}) image in [-1, 1]; got "
                         f"{image.dtype} {image.shape}" + (f" in [{image.min():.3g}, {image.max():.3g}]"
                                                           if image.size else "") + ".")
    return image


def _fingerprint(settings: ConceptSettings, names, words, arrays: Sequence, key) -> str:
    """What makes a run: its settings, names, words, input arrays (None for absent) and key."""
    digest = hashlib.sha256(json.dumps([dataclasses.asdict(settings), list(names), words], sort_keys=True).encode())
    for array in (*arrays, np.asarray(jax.random.key_data(key))):
        digest.update(b"-" if array is None else np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def _tensor_digest(arrays: dict) -> str:
    digest = hashlib.sha256()
    for name in sorted(arrays):
        digest.update(name.encode() + str(arrays[name].dtype).encode() + str(arrays[name].shape).encode())
        digest.update(np.ascontiguousarray(arrays[name]).tobytes())
    return digest.hexdigest()


def _flat(state) -> dict:
    return {jax.tree_util.keystr(path): np.asarray(value)
            for path, value in jax.tree_util.tree_flatten_with_path(state)[0]}


def save_checkpoint(path, state: dict, info: dict) -> None:
    """Write the EM state (a pytree) with ``info`` (JSON) to a safetensors file, atomically, with
    a SHA-256 of every tensor so a damaged file is detected when read back."""
    arrays = {name: np.array(value, order="C") for name, value in _flat(state).items()}
    metadata = {"format": CHECKPOINT_FORMAT, "sha256": _tensor_digest(arrays), "info": json.dumps(info)}
    atomic_write_bytes(path, safetensors_save(arrays, metadata=metadata))


def read_checkpoint_info(path) -> dict:
    """The ``info`` of a checkpoint written by :func:`save_checkpoint` (checked first)."""
    tensors, metadata = read_safetensors(path, "concept checkpoint")
    if metadata.get("format") != CHECKPOINT_FORMAT:
        raise DamagedFileError(f"concept checkpoint {path}: not a concept-learning checkpoint (format "
                               f"{metadata.get('format')!r}, expected {CHECKPOINT_FORMAT!r}); pass the file that "
                               "learn_concepts / `zmagic concepts` wrote, or start without resuming.")
    if metadata.get("sha256") != _tensor_digest(tensors):
        raise DamagedFileError(f"concept checkpoint {path}: its tensors do not match the SHA-256 recorded when it "
                               "was written (the file is damaged); delete it to start the run again.")
    try:
        return json.loads(metadata["info"])
    except (KeyError, ValueError) as err:
        raise DamagedFileError(f"concept checkpoint {path}: its info is not JSON ({err}); the file is damaged, "
                               "delete it to start again.") from None


def load_checkpoint(path, template) -> Any:
    """The state saved by :func:`save_checkpoint`, in the structure of ``template``: every tensor
    must be present with the template's shape and dtype (else :class:`DamagedFileError`)."""
    tensors, _ = read_safetensors(path, "concept checkpoint")
    expected = _flat(template)
    if set(tensors) != set(expected):
        missing, extra = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
        raise DamagedFileError(f"concept checkpoint {path}: its tensors are not this run's state (missing "
                               f"{missing[:4]}, unexpected {extra[:4]}); it was written by another version or "
                               "setting; delete it to start again.")
    for name, value in expected.items():
        if tensors[name].shape != value.shape or tensors[name].dtype != value.dtype:
            raise DamagedFileError(f"concept checkpoint {path}: tensor {name} is {tensors[name].dtype} "
                                   f"{tensors[name].shape}, this run's is {value.dtype} {value.shape}; delete it "
                                   "to start again.")
    leaves, treedef = jax.tree_util.tree_flatten_with_path(template)
    return jax.tree_util.tree_unflatten(treedef, [jnp.asarray(tensors[jax.tree_util.keystr(p)]) for p, _ in leaves])


def learn_concepts(sd: StableDiffusion, image, key: jax.Array, *, count: Optional[int] = None,
                   names: Optional[Sequence[str]] = None, words: Optional[Sequence[str]] = None, masks=None,
                   boxes=None, settings: ConceptSettings = ConceptSettings(), prior_images=None,
                   prior_prompt: str = "a photo", checkpoint=None, progress: Optional[Callable] = None,
                   compiler_options: Optional[dict] = None) -> ConceptResult:
    """Learn ``N`` concept tokens (and masks) from one ``image (H, W, C)`` in [-1, 1] by EM
    (module docstring).

    The concepts are named by ``names`` (placeholders, default ``<c0> ..``), or counted by
    ``count``, ``words`` or the masks / boxes. Tokens start from ``words`` (first sub-token) or at
    random (then, with ``settings.inversion_steps``, an unmasked inversion). Initial masks:
    ``masks (N, H, W)`` in [0, 1], ``boxes (N, 4)`` (top, left, bottom, right in image pixels) or,
    with neither, the E-step. ``prior_images (P, H, W, C)`` turn on prior preservation with
    ``prior_prompt``. ``checkpoint``: a file path; the state is saved there after each iteration
    and, if the file exists (from this same run: settings, image, masks, key), the run resumes
    from it. ``progress(iteration, masks, losses)`` is called after each iteration.
    ``compiler_options``: XLA options of the two compiled programs (e.g. a lower optimisation level
    for short runs)."""
    image = _checked_image(sd, image)
    given = [len(x) for x in (names, words, masks, boxes) if x is not None] + ([int(count)] if count else [])
    if not given or len(set(given)) != 1:
        raise ValueError(f"learn_concepts: give the number of concepts once (count, names, words, masks or boxes "
                         f"of one length); got lengths {given}.")
    names = tuple(names) if names is not None else placeholder_names(given[0])
    n = len(names)
    if masks is not None and boxes is not None:
        raise ValueError("learn_concepts: give masks or boxes, not both.")
    if boxes is not None:
        masks = box_masks(boxes, image.shape[:2])
    if masks is not None:
        masks = np.asarray(masks, np.float32)
        if masks.shape != (n,) + image.shape[:2] or masks.min() < 0 or masks.max() > 1:
            raise ValueError(f"learn_concepts: masks must be ({n}, {image.shape[0]}, {image.shape[1]}) in [0, 1]; "
                             f"got {masks.shape}.")
    dtype = None if settings.dtype in (None, "float32") else jnp.bfloat16

    latents = jnp.stack([encode_image(sd, image), encode_image(sd, image[:, ::-1])])
    latent_hw = tuple(latents.shape[2:])
    model = concept_model(sd, latent_hw, resolution=settings.attention_resolution, dtype=dtype, remat=settings.remat)
    prompts, selections, sizes = union_prompts(names, settings.template, settings.joiner)
    concept_ids = jnp.asarray(concept_token_ids(sd, n))
    full_ids = jnp.asarray(tokenize_with_concepts(sd, [prompts[len(prompts) - 1]], names)[0]
                           if settings.mask_prompts == "joint" else tokenize_with_concepts(sd, prompts[:n], names))
    prior = None
    if prior_images is not None:
        prior_images = np.asarray(prior_images, np.float32)
        prior = jnp.stack([encode_image(sd, _checked_image(sd, p)) for p in prior_images])
    alphas = jnp.asarray(sd.schedule.alphas_cumprod, jnp.float32)
    ones = jnp.ones((n,) + latent_hw, jnp.float32)
    data = ConceptData(latents, ones, jnp.asarray(tokenize_with_concepts(sd, prompts, names)),
                       jnp.asarray(selections), jnp.asarray([int(np.flatnonzero(sizes == k)[0]) for k in range(1, n + 1)]),
                       jnp.asarray([int((sizes == k).sum()) for k in range(1, n + 1)]), concept_ids, alphas,
                       prior, None if prior is None else jnp.asarray(tokenize_with_concepts(sd, [prior_prompt], names)[0]))
    hyper = Hyper(*(jnp.asarray(v, jnp.float32) for v in (settings.lambda_attention, settings.prior_weight,
                                                          settings.flip_p, settings.lora_alpha / settings.lora_rank)))
    small = jnp.asarray(_latent_image(sd, image, latent_hw))
    k_init, k_train, k_masks, k_inversion = (jax.random.fold_in(key, i) for i in range(4))
    train_program, estimate_program = _programs(tuple(sorted((compiler_options or {}).items())))

    def estep(trainable, iteration, previous):
        unet, text = _params(trainable, _frozen(sd, trainable), hyper)
        timesteps = jax.random.randint(jax.random.fold_in(k_masks, iteration), (settings.mask_timesteps,), 0,
                                       settings.mask_max_timestep or alphas.shape[0])
        return estimate_program(unet, text, trainable["tokens"], latents[0], full_ids, concept_ids, alphas,
                                 jax.random.fold_in(k_masks, 10_000 + iteration), timesteps, small,
                                 jnp.float32(settings.threshold), previous,
                                 jnp.float32(settings.mask_prior if iteration else 0.0),
                                 {name: jnp.float32(value) for name, value in settings.crf_options},
                                 model=model, crf=settings.crf,
                                 exclusive=settings.exclusive, assignment=settings.assignment)

    def train(trainable, opt_state, losses, masks_now, hyper_now, key_now, start, count_now):
        return train_program(trainable, opt_state, losses, _frozen(sd, trainable), data._replace(masks=masks_now),
                              hyper_now, key_now, jnp.int32(start), jnp.int32(count_now), model=model,
                              clip=float(settings.clip))

    fingerprint = _fingerprint(settings, [*names, prior_prompt if prior is not None else ""],
                               None if words is None else list(words), (image, masks, prior_images), key)
    total = settings.total_steps
    phase = 1 if settings.phase1_steps > 0 else 2
    tokens = init_tokens(sd, words=words) if words is not None else init_tokens(sd, count=n, key=k_init)
    trainable = {"tokens": tokens} if phase == 1 else _phase2_trainable(sd, tokens, settings, k_init)
    history = jnp.zeros((settings.iterations + 1, n) + latent_hw, jnp.float32)
    state = {"trainable": trainable, "opt_state": _opt_state(trainable, settings, phase),
             "losses": jnp.zeros((total, 4), jnp.float32), "masks": history}
    iteration = 0
    path = None if checkpoint is None else Path(checkpoint).expanduser()
    if path is not None and path.exists():
        info = read_checkpoint_info(path)
        if info.get("fingerprint") != fingerprint:
            raise ValueError(f"learn_concepts: checkpoint {path} was written by another run (different settings, "
                             "image, masks, words or key); pass another checkpoint path or delete this file.")
        iteration, phase = int(info["iteration"]), int(info["phase"])
        if phase == 2:
            state["trainable"] = _phase2_trainable(sd, tokens, settings, k_init)
            state["opt_state"] = _opt_state(state["trainable"], settings, 2)
        state = load_checkpoint(path, state)
    else:
        if settings.inversion_steps:
            inverted, _, _ = train({"tokens": tokens}, _opt_state({"tokens": tokens}, settings, 1),
                                   jnp.zeros((settings.inversion_steps, 4), jnp.float32), ones,
                                   hyper._replace(lambda_attention=jnp.float32(0.0)), k_inversion, 0,
                                   settings.inversion_steps)
            tokens = inverted["tokens"]
            state["trainable"] = dict(state["trainable"], tokens=tokens)
        first = jnp.asarray(resize_nearest(masks, latent_hw)) if masks is not None else estep(state["trainable"], 0, ones)
        state["masks"] = state["masks"].at[0].set(first)

    for it in range(iteration, settings.iterations):
        begin, end = it * settings.steps_per_iteration, (it + 1) * settings.steps_per_iteration
        cuts = sorted({begin, end} | ({settings.phase1_steps} if begin < settings.phase1_steps < end else set()))
        for a, b in zip(cuts, cuts[1:]):
            if phase == 1 and a >= settings.phase1_steps:
                phase = 2
                state["trainable"] = _phase2_trainable(sd, state["trainable"]["tokens"], settings, k_init)
                state["opt_state"] = _opt_state(state["trainable"], settings, 2)
            state["trainable"], state["opt_state"], state["losses"] = train(
                state["trainable"], state["opt_state"], state["losses"], state["masks"][it], hyper, k_train, a, b - a)
        estimate = estep(state["trainable"], it + 1, state["masks"][it]) if settings.reestimate else state["masks"][it]
        state["masks"] = state["masks"].at[it + 1].set(estimate)
        if path is not None:
            save_checkpoint(path, state, {"fingerprint": fingerprint, "iteration": it + 1, "phase": phase,
                                          "step": end})
        if progress is not None:
            progress(it + 1, np.asarray(estimate), np.asarray(state["losses"][:end]))
    trained = {name: value for name, value in state["trainable"].items() if name != "tokens"}
    return ConceptResult(names, state["trainable"]["tokens"], trained, np.asarray(state["masks"]),
                         np.asarray(state["losses"]), settings)
