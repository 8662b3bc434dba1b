"""Fully-connected (dense) CRF mean field with exact Gaussian kernels.

The model of Krähenbühl & Koltun, "Efficient Inference in Fully Connected CRFs with Gaussian Edge
Potentials" (NIPS 2011), Eq. 1-3, with the Potts label compatibility and the two kernels of its
Eq. 3 (a smoothness Gaussian on pixel positions and an appearance kernel on positions and colours),
run by the same mean-field iteration as the authors' C++ ``densecrf`` (version 2, as wrapped by
``pydensecrf`` / ``pydensecrf2``: ``DenseCRF::inference``), with its default per-kernel
``NORMALIZE_SYMMETRIC`` normalisation. The reference filters with the permutohedral lattice, an
approximation of the Gaussian filter; here the ``(HW, HW)`` kernel matrices are built exactly, which
limits the images to a few thousand pixels (a refinement at attention-map resolution, e.g. 64 x 64).

:func:`refine_mask` is CutLER's recipe (``facebookresearch/CutLER:maskcut/crf.py``, ``densecrf``) for
cleaning a foreground mask with it.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def dense_crf(unary, image, *, iterations: int = 10, gaussian_sxy=3.0, gaussian_compat=7.0,
              bilateral_sxy=50.0, bilateral_srgb=5.0, bilateral_compat=10.0) -> jnp.ndarray:
    """Marginals ``Q`` ``(..., L, H, W)`` of a dense CRF after ``iterations`` mean-field updates.

    ``unary`` ``(..., L, H, W)``: float energies ``U_i(l)`` (negative log probabilities, up to a
    per-pixel constant) of ``L`` labels; ``image`` ``(..., H, W, C)``: colours ``I_i`` in 0..255 units
    (``bilateral_srgb`` is in those units, as for the uint8 images of pydensecrf and CutLER; any
    ``C``, integer or float). Leading batch axes of the two broadcast against each other; the
    function is pure, so ``jit``, ``vmap`` and ``grad`` (in the unary, the image and the five
    parameters) all apply. Pixel ``i`` sits at the integer position ``p_i = (row, col)``.
    Computed in the unary's dtype; the defaults are CutLER's constants.

    The two kernels of the paper's Eq. 3 (weights ``w_g = gaussian_compat``, ``w_b = bilateral_compat``)::

        K_g[i, j] = exp(-|p_i - p_j|^2 / (2 gaussian_sxy^2))
        K_b[i, j] = exp(-|p_i - p_j|^2 / (2 bilateral_sxy^2) - |I_i - I_j|^2 / (2 bilateral_srgb^2))

    are each normalised symmetrically, ``Kn_k = D_k^{-1/2} K_k D_k^{-1/2}`` with
    ``D_k = diag(K_k 1)`` (the reference's default ``NORMALIZE_SYMMETRIC``), and enter the energy
    ``E(x) = sum_i U_i(x_i) + sum_{i<j} [x_i != x_j] sum_k w_k Kn_k[i, j]`` (Potts compatibility).
    The mean field (the paper's Algorithm 1; the label-independent part of the Potts message
    cancels in the normalisation over labels) is, for every pixel ``i`` and label ``l``::

        Q^0_i(l)     = softmax_l(-U_i(l))
        Q^{t+1}_i(l) = softmax_l(-U_i(l) + sum_k w_k sum_j Kn_k[i, j] Q^t_j(l))     for t < iterations

    ``iterations`` is static (0 returns ``softmax(-U)``); the five parameters are numbers or 0-d
    arrays, traced, so one compiled program serves all their values (``vmap`` for per-example
    values). The matrix ``sum_k w_k Kn_k`` is built once per call, then reused by every iteration
    of a ``fori_loop``.

    What the reference does identically: the iteration above, including the self term ``j = i``
    of the message (its filter adds each pixel's own value; the paper's sums are over ``j != i``
    and the energy has none, ``[x_i != x_i] = 0``), a self-reinforcement ``w_k Kn_k[i, i] Q_i(l)``,
    and the Potts sign (its ``PottsCompatibility`` multiplies by ``-w``, subtracted from ``-U``);
    the features ``(col / sxy, row / sxy)`` and ``(col / sxy, row / sxy, I / srgb)`` of
    ``addPairwiseGaussian`` / ``addPairwiseBilateral`` in a Gaussian ``exp(-|f_i - f_j|^2 / 2)``,
    i.e. the distances above. Where this exact form differs:

    * the reference evaluates ``K_k Q`` (and ``K_k 1`` for ``D_k``) with the permutohedral lattice
      (Adams et al. 2010): splat onto a lattice, blur, slice. That filter is an approximation of
      the Gaussian, not translation invariant, and its self weight is not exactly 1; here the sums
      are exact, so the marginals differ by the lattice's error (tests/test_crf.py measures it);
    * it computes in float32 and adds ``1e-20`` inside ``1 / sqrt(K 1)``; here ``K 1 >= 1`` (the
      self term), so no epsilon is needed, and float64 inputs run in float64;
    * its ``addPairwiseBilateral`` takes uint8 RGB only; here any real ``C``-channel image. Round
      to uint8 first to reproduce it.

    Memory and time grow as ``(HW)^2`` per image: a few ``(HW, HW)`` arrays while the matrix is
    built (64 x 64 pixels: 16.8 M entries, 67 MB each in float32), then ``O(L (HW)^2)`` per iteration.
    """
    parameters = dict(gaussian_sxy=gaussian_sxy, gaussian_compat=gaussian_compat, bilateral_sxy=bilateral_sxy,
                      bilateral_srgb=bilateral_srgb, bilateral_compat=bilateral_compat)
    return _dense_crf("dense_crf", "unary", unary, image, iterations, parameters)


def refine_mask(mask, image, **crf_options) -> jnp.ndarray:
    """CutLER's DenseCRF refinement of a foreground mask: the foreground marginal ``(..., H, W)``.

    ``mask`` ``(..., H, W)`` in [0, 1] (binary or soft, not checked) becomes the 2-channel logits
    ``[1 - m, m]``, softmaxed over the channels (a binary mask gives ``p = e / (1 + e) ~ 0.73`` to
    its label; pydensecrf's ``unary_from_softmax`` clips ``p`` at 1e-5, never reached as
    ``p >= 1 / (1 + e)``), unary ``U = -log p``, then :func:`dense_crf` with ``crf_options``
    (CutLER's constants by default) and the marginal of label 1 is returned; threshold it at 0.5
    (the argmax of the two marginals, as CutLER does). ``image`` ``(..., H, W, C)`` in 0..255 must
    already have the mask's size: nothing is resized here, whereas CutLER bilinearly resizes the
    logits to the image (upsample ``m`` first, e.g. ``jax.image.resize(m, (H, W), "bilinear")``,
    the same since the logits are linear in ``m``). Computed in the mask's float dtype (the
    default float for boolean or integer masks).
    """
    mask = jnp.asarray(mask)
    if mask.ndim < 2:
        raise ValueError(f"refine_mask: mask must have shape (..., H, W); got shape {mask.shape}.")
    if not (jnp.issubdtype(mask.dtype, jnp.floating) or jnp.issubdtype(mask.dtype, jnp.integer)
            or mask.dtype == jnp.bool_):
        raise TypeError(f"refine_mask: mask must be a real array in [0, 1]; got dtype {mask.dtype}.")
    if not jnp.issubdtype(mask.dtype, jnp.floating):
        mask = mask.astype(jnp.result_type(float))
    logits = jnp.stack([1 - mask, mask], axis=-3)
    unary = -jax.nn.log_softmax(logits, axis=-3)
    options = {**dense_crf.__kwdefaults__, **crf_options}  # dense_crf's signature holds the defaults
    unknown = sorted(set(options) - set(dense_crf.__kwdefaults__))
    if unknown:
        raise TypeError(f"refine_mask: unknown crf_options {unknown}; the options are dense_crf's keywords "
                        f"{sorted(dense_crf.__kwdefaults__)}.")
    iterations = options.pop("iterations")
    return _dense_crf("refine_mask", "mask", unary, image, iterations, options)[..., 1, :, :]


def _dense_crf(who, subject, unary, image, iterations, parameters):
    """:func:`dense_crf` with its checks' messages naming the caller ``who`` and the array
    ``subject`` the unary comes from."""
    unary, image = _check_inputs(who, subject, unary, image)
    if isinstance(iterations, bool) or not isinstance(iterations, (int, np.integer)) or iterations < 0:
        raise ValueError(f"{who}: iterations must be a Python int >= 0 (it is static: the loop length); "
                         f"got {iterations!r}.")
    iterations = int(iterations)
    dtype = unary.dtype
    for name, value in parameters.items():
        if jnp.ndim(value) != 0:
            raise ValueError(f"{who}: {name} must be a number or a 0-d array (jax.vmap the call for "
                             f"per-example values); got shape {jnp.shape(value)}.")
    parameters = {name: jnp.asarray(value, dtype) for name, value in parameters.items()}

    def single(u, im):
        return _mean_field(u, im.astype(dtype), iterations, **parameters)

    return jnp.vectorize(single, signature="(l,h,w),(h,w,c)->(l,h,w)")(unary, image)


def _check_inputs(who, subject, unary, image):
    unary = jnp.asarray(unary)
    image = jnp.asarray(image)
    if not jnp.issubdtype(unary.dtype, jnp.floating):
        raise TypeError(f"{who}: unary must be a float array of energies (negative log probabilities); "
                        f"got dtype {unary.dtype}; convert it, e.g. unary.astype(jnp.float32).")
    if unary.ndim < 3 or unary.shape[-3] == 0:
        raise ValueError(f"{who}: unary must have shape (..., L, H, W) with L >= 1 labels; got shape "
                         f"{unary.shape}.")
    if not (jnp.issubdtype(image.dtype, jnp.floating) or jnp.issubdtype(image.dtype, jnp.integer)):
        raise TypeError(f"{who}: image must be a real array of colours in 0..255 (uint8 or float); got "
                        f"dtype {image.dtype}.")
    if image.ndim < 3:
        raise ValueError(f"{who}: image must have shape (..., H, W, C) with colours last; got shape "
                         f"{image.shape} (a grey image needs a channel axis: image[..., None]).")
    if image.shape[-3:-1] != unary.shape[-2:]:
        raise ValueError(f"{who}: image's (H, W) = {image.shape[-3:-1]} must equal the (H, W) = "
                         f"{unary.shape[-2:]} of the {subject}; "
                         f"resize one to the other first (nothing is resized here).")
    try:
        np.broadcast_shapes(unary.shape[:-3], image.shape[:-3])
    except ValueError:
        raise ValueError(f"{who}: the leading batch axes of the {subject} "
                         f"{unary.shape[:-3]} and the image {image.shape[:-3]} do not broadcast.") from None
    return unary, image


def _normalised(kernel):
    """``D^{-1/2} K D^{-1/2}`` with ``D = diag(K 1)``."""
    scale = jax.lax.rsqrt(jnp.sum(kernel, axis=1))
    return scale[:, None] * kernel * scale[None, :]


def _mean_field(unary, image, iterations, *, gaussian_sxy, gaussian_compat, bilateral_sxy,
                bilateral_srgb, bilateral_compat):
    labels, height, width = unary.shape
    n = height * width
    dtype = unary.dtype
    rows = jnp.arange(height, dtype=dtype)
    cols = jnp.arange(width, dtype=dtype)
    row_d2 = (rows[:, None] - rows[None, :]) ** 2
    col_d2 = (cols[:, None] - cols[None, :]) ** 2
    position_d2 = (row_d2[:, None, :, None] + col_d2[None, :, None, :]).reshape(n, n)
    # Channel by channel: explicit differences, never an (HW, HW, C) tensor nor |a|^2 + |b|^2 - 2ab
    # (which cancels for close colours).
    colours = image.reshape(n, image.shape[-1])
    colour_d2 = sum((colours[:, None, c] - colours[None, :, c]) ** 2 for c in range(colours.shape[1]))
    gaussian = jnp.exp(-position_d2 / (2 * gaussian_sxy ** 2))
    bilateral = jnp.exp(-position_d2 / (2 * bilateral_sxy ** 2) - colour_d2 / (2 * bilateral_srgb ** 2))
    message = gaussian_compat * _normalised(gaussian) + bilateral_compat * _normalised(bilateral)

    minus_unary = -unary.reshape(labels, n)

    def update(_, q):
        pairwise = jnp.matmul(q, message, precision=jax.lax.Precision.HIGHEST)
        return jax.nn.softmax(minus_unary + pairwise, axis=0)

    q = jax.lax.fori_loop(0, iterations, update, jax.nn.softmax(minus_unary, axis=0))
    return q.reshape(labels, height, width)
