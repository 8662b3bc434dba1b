"""Scaled dot-product attention that can show and steer its probabilities.

One function serves every attention layer of the library's own models (UNet self/cross attention,
VAE mid-block attention, CLIP text and vision):

* ``modifier``: an additive score modifier, added to ``q k^T / sqrt(d)`` before the softmax,
  broadcastable to ``(B, H, Lq, Lk)``. A modifier of zeros leaves the result bit-identical
  (``s + 0 == s``); ``-inf`` (or a large negative value) at a key removes that key. A modifier
  may also be a callable ``scores -> additive modifier`` (``scores`` = ``q k^T / sqrt(d)``,
  ``(B, H, Lq, Lk)`` float32, masked): a modification that depends on the layer's own scores
  (SOW's min-max modulation, :mod:`zmagic_jax.modulation`), e.g. a pytree with ``__call__``
  whose numbers are leaves. The scores it reads are computed once more (one extra ``q k^T``).
* ``mask``: boolean, broadcastable to ``(B, H, Lq, Lk)``, True where a key may be attended
  (CLIP's causal mask). Masked scores become the dtype's lowest value, so a row keeps a defined
  softmax.
* ``return_probs``: also return the probabilities ``(B, H, Lq, Lk)`` (rows sum to 1 over keys).

Without probabilities the computation goes through :func:`jax.nn.dot_product_attention`, so an
accelerator backend may pick a fused kernel; ``query_chunk`` splits the queries into chunks of
that many rows computed one after another (``lax.map``), bounding the size of the score matrix
(``B H chunk Lk`` instead of ``B H Lq Lk``) for long sequences (a 64x64 SD latent has 4096
tokens). Inputs are ``(B, L, H, D)``; the softmax runs in float32 whatever the input dtype.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp


def attention_scores(q, k, *, modifier=None, mask=None):
    """``q k^T / sqrt(d) (+ modifier)``, masked, as ``(B, H, Lq, Lk)`` float32 scores."""
    scale = 1.0 / jnp.sqrt(jnp.asarray(q.shape[-1], jnp.float32))
    scores = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    if modifier is not None:
        scores = scores + jnp.asarray(modifier, jnp.float32)
    if mask is not None:
        scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    return scores


def _explicit(q, k, v, modifier, mask):
    probs = jax.nn.softmax(attention_scores(q, k, modifier=modifier, mask=mask), axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", probs.astype(v.dtype), v)
    return out, probs


def _fused(q, k, v, modifier, mask):
    bias = None if modifier is None else jnp.asarray(modifier, q.dtype)
    return jax.nn.dot_product_attention(q, k, v, bias=bias, mask=mask)


def _chunk_rows(array, axis: int, size: int, chunk: int):
    """``array`` split along ``axis`` (of length ``size``, a multiple of ``chunk``) into a leading
    axis of chunks; an array that broadcasts along ``axis`` (length 1) is repeated."""
    if array.shape[axis] == 1:
        array = jnp.broadcast_to(array, array.shape[:axis] + (size,) + array.shape[axis + 1:])
    moved = jnp.moveaxis(array, axis, 0)
    return moved.reshape((size // chunk, chunk) + moved.shape[1:])


def attention(q, k, v, *, modifier=None, mask=None, return_probs: bool = False,
              query_chunk: Optional[int] = None):
    """Attention of ``q`` ``(B, Lq, H, D)`` over ``k``, ``v`` ``(B, Lk, H, D)`` -> ``(B, Lq, H, D)``
    (and the probabilities ``(B, H, Lq, Lk)`` with ``return_probs``); see the module docstring."""
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"attention: q, k, v must be (batch, length, heads, head_dim); got "
                         f"{q.shape}, {k.shape}, {v.shape}.")
    if callable(modifier):
        modifier = modifier(attention_scores(q, k, mask=mask))
    if return_probs:
        return _explicit(q, k, v, modifier, mask)
    lq = q.shape[1]
    if query_chunk is None or query_chunk >= lq:
        return _fused(q, k, v, modifier, mask)
    if lq % query_chunk:
        raise ValueError(f"attention: query_chunk={query_chunk} must divide the query length {lq}.")
    extras = [a if a is None else jnp.broadcast_to(a, jnp.broadcast_shapes(a.shape, (1, 1, 1, 1)))
              for a in (modifier, mask)]
    chunks = [_chunk_rows(q, 1, lq, query_chunk)]
    chunks += [None if a is None else _chunk_rows(a, 2, lq, query_chunk) for a in extras]

    def one(args):
        qc, mod, msk = args
        # back to (B, chunk, H, D) / (B, H, chunk, Lk) from the chunk-first layout
        qc = jnp.moveaxis(qc, 0, 1)
        mod = None if mod is None else jnp.moveaxis(mod, 0, 2)
        msk = None if msk is None else jnp.moveaxis(msk, 0, 2)
        return _fused(qc, k, v, mod, msk)

    out = jax.lax.map(one, tuple(chunks))  # (n, B, chunk, H, D)
    return jnp.moveaxis(out, 0, 1).reshape(q.shape[:1] + (lq,) + out.shape[3:])
