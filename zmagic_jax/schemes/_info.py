"""What a guided step reports: :class:`GuidanceInfo`, one field per quantity, one meaning per field."""
from __future__ import annotations

from typing import NamedTuple, Optional

import jax
import jax.numpy as jnp


class GuidanceInfo(NamedTuple):
    """Diagnostics of one guided step of one sample (stacked over steps by the chain).

    ``n`` is the number of conditions; indices follow the scheme's ``conditions`` (whatever the
    order in which a dependent scheme guides them). Pair matrices are indexed ``[leader, follower]``.
    On unguided steps (no rule active) every norm is 0, every cosine NaN.

    energies: ``(n,)`` each condition's energy at ``x0|t(x_t)`` (Fig. 3 curves).
    displacement_norm: ``()`` norm of the whole guidance displacement ``d`` applied to the mean.
    displacement_norms: ``(n,)`` ``|d_i|`` with ``d_i = -rho_i grad_{x_t} E_i`` at ``x_t``; NaN
      where the scheme does not compute ``d_i`` at ``x_t`` (the follower of ``dependent`` and the
      model-led term, unless ``detail`` is on).
    condition_cosines: ``(n, n)`` ``cos(grad E_i, grad E_j)`` at ``x_t`` (paper Fig. 1, FreeDoM's
      angle); 1 on the diagonal where computed, NaN where either gradient is not computed.
    term2_norms: ``(n, n)`` ``|term II_ij|`` of the ordered pair (``i`` leads, ``j`` follows); the
      diagonal ``[j, j]`` holds the model-led term (the denoiser's own conditioning leads); NaN
      where the scheme has no such pair.
    term2_cosines: ``(n, n)`` ``cos(d_i, term II_ij)`` (paper Fig. 1, Z-Magic's angle); NaN where
      there is no such pair (and for the model-led term, whose leader is inside ``eps``).
    score_part_norms / hessian_part_norms: ``(n, n)`` norms of term II's two parts,
      ``J_{M0}^T gh`` (score Jacobian, paper Eq. 6) and ``-rho_i H_{E_i} gh`` (Hessian of the
      leader's energy through the denoiser, Eq. 7); computed only with ``detail`` (two more
      pullbacks per pair), NaN otherwise.
    guided: ``()`` whether any condition was active at this step.
    finite: ``(n,)`` False where a condition produced a non-finite energy or gradient (the whole
      guidance displacement of that step is then dropped).
    gradients: ``(n, *x.shape)`` ``grad_{x_t} E_i`` at ``x_t`` with ``detail``, else ``None``;
      NaN where not computed.
    term2: ``(n, n, *x.shape)`` term II of each pair with ``detail``, else ``None``; zeros where
      there is no pair.
    denoiser_finite: ``()`` whether the denoiser's ``eps`` at ``x_t`` was finite (set by
      :func:`~zmagic_jax.direction` for every scheme; ``None`` from a bare ``scheme.direction``).
      A non-finite ``eps`` makes every energy at ``x0|t`` non-finite too: this field says whose
      fault it was.
    """

    energies: jnp.ndarray
    displacement_norm: jnp.ndarray
    displacement_norms: jnp.ndarray
    condition_cosines: jnp.ndarray
    term2_norms: jnp.ndarray
    term2_cosines: jnp.ndarray
    score_part_norms: jnp.ndarray
    hessian_part_norms: jnp.ndarray
    guided: jnp.ndarray
    finite: jnp.ndarray
    gradients: Optional[jnp.ndarray] = None
    term2: Optional[jnp.ndarray] = None
    denoiser_finite: Optional[jnp.ndarray] = None


def guidance_info(x, energies, d, *, finite=None, displacement_norms=None, condition_cosines=None,
                  term2_norms=None, term2_cosines=None, score_part_norms=None, hessian_part_norms=None,
                  gradients=None, term2=None, detail: bool = False, guided=True) -> GuidanceInfo:
    """A :class:`GuidanceInfo` of a guided step with every field the scheme did not compute set to
    "not computed" (NaN norms and cosines; with ``detail``, NaN gradients and zero term II).
    Custom schemes return ``guidance_info(x, energies, d, ...)``."""
    n = energies.shape[0]
    dtype = x.dtype
    nan_vector, nan_matrix = jnp.full((n,), jnp.nan, dtype), jnp.full((n, n), jnp.nan, dtype)
    pick = lambda value, default: default if value is None else jnp.asarray(value, dtype)
    if detail:
        gradients = jnp.full((n,) + x.shape, jnp.nan, dtype) if gradients is None else gradients
        term2 = jnp.zeros((n, n) + x.shape, dtype) if term2 is None else term2
    else:
        gradients = term2 = None
    return GuidanceInfo(
        energies=jnp.asarray(energies, dtype), displacement_norm=jnp.linalg.norm(d.reshape(-1)).astype(dtype),
        displacement_norms=pick(displacement_norms, nan_vector),
        condition_cosines=pick(condition_cosines, nan_matrix), term2_norms=pick(term2_norms, nan_matrix),
        term2_cosines=pick(term2_cosines, nan_matrix), score_part_norms=pick(score_part_norms, nan_matrix),
        hessian_part_norms=pick(hessian_part_norms, nan_matrix), guided=jnp.asarray(guided),
        finite=jnp.ones((n,), bool) if finite is None else jnp.asarray(finite, bool),
        gradients=gradients, term2=term2)


def unguided_info(x, energies, *, detail: bool = False) -> GuidanceInfo:
    """The info of a step where no condition is active: norms 0, cosines NaN."""
    n = energies.shape[0]
    zeros_v, zeros_m = jnp.zeros((n,), x.dtype), jnp.zeros((n, n), x.dtype)
    return guidance_info(x, energies, jnp.zeros_like(x), finite=jnp.isfinite(energies), displacement_norms=zeros_v,
                         term2_norms=zeros_m, score_part_norms=zeros_m, hessian_part_norms=zeros_m,
                         detail=detail, guided=False)


def flat_norms(v):
    """Norms over every axis but the first: ``(k, ...) -> (k,)``."""
    return jnp.linalg.norm(v.reshape(v.shape[0], -1), axis=-1)


def cosine(a, b):
    """``cos(a, b)`` of two arrays of one shape (0 if either is zero)."""
    a, b = a.reshape(-1), b.reshape(-1)
    den = jnp.linalg.norm(a) * jnp.linalg.norm(b)
    return jnp.where(den > 0, jnp.dot(a, b) / jnp.where(den > 0, den, 1.0), 0.0)


def cosine_matrix(vectors):
    """``(k, ...) -> (k, k)`` pairwise cosines."""
    return jax.vmap(lambda a: jax.vmap(lambda b: cosine(a, b))(vectors))(vectors)


def all_finite(v):
    """Per first-axis entry: are all values finite? ``(k, ...) -> (k,)``."""
    return jnp.all(jnp.isfinite(v.reshape(v.shape[0], -1)), axis=-1)
