"""Gradient geometry of multi-condition guidance (Z-Magic Figs. 1-3).

* per-step cosines between guidance terms come from :class:`GuidanceInfo`'s ``condition_cosines``
  (between conditions, FreeDoM's angle) and ``term2_cosines`` (leader vs term II) (Fig. 1);
* per-condition energies along the trajectory from :class:`GuidanceInfo.energies` (Fig. 3);
* :func:`loss_landscape` evaluates every condition's energy at ``x0|t`` over a 2-D plane
  through ``x_t`` (Fig. 2; the paper projects random samples by PCA, we slice the plane spanned
  by two chosen directions, e.g. the independent and the dependent guidance directions).
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from zmagic_jax.schemes._conditions import Condition, energy_vector


COSINES = ("conditions", "term2")


def guided_cosines(trace, which: str = "term2") -> np.ndarray:
    """Per sample and step, the mean cosine of the scheme's pairs, ``(batch, steps)``, NaN on
    unguided steps and where the scheme has no such pair.

    ``which="conditions"``: ``cos(grad E_i, grad E_j)`` at ``x_t`` over the pairs ``i < j``
    (FreeDoM's angle; :attr:`GuidanceInfo.condition_cosines`); ``"term2"``: ``cos(d_i, term II_ij)``
    over the ordered pairs (Z-Magic's angle; :attr:`GuidanceInfo.term2_cosines`).
    """
    if which == "conditions":
        matrices = np.asarray(trace.condition_cosines, np.float64)
        n = matrices.shape[-1]
        mask = np.triu(np.ones((n, n), bool), 1)
    elif which == "term2":
        matrices = np.asarray(trace.term2_cosines, np.float64)
        n = matrices.shape[-1]
        mask = ~np.eye(n, dtype=bool)
    else:
        raise ValueError(f"guided_cosines: which must be one of {COSINES}; got {which!r}.")
    values = matrices[..., mask]
    count = np.isfinite(values).sum(-1)
    mean = np.where(count > 0, np.nansum(values, -1) / np.maximum(count, 1), np.nan)
    return np.where(np.asarray(trace.guided), mean, np.nan)


def mean_guided_cosine(trace, which: str = "term2") -> float:
    """Mean over samples and guided steps of :func:`guided_cosines` (NaN if none is defined)."""
    cos = guided_cosines(trace, which)
    return float(np.nanmean(cos)) if np.isfinite(cos).any() else float("nan")


def energy_curves(trace, reduce: str = "median") -> np.ndarray:
    """Each condition's energy at ``x0|t`` per step, reduced over the batch: ``(steps, n)``.

    ``reduce="median"`` (default) is robust to a few diverging samples; ``"mean"`` is the plain mean.
    """
    e = np.asarray(trace.energies, np.float64)
    if reduce == "median":
        return np.median(e, axis=0)
    if reduce == "mean":
        return e.mean(axis=0)
    raise ValueError(f"energy_curves: reduce must be 'median' or 'mean'; got {reduce!r}.")


def orthonormal_plane(u, v):
    """Gram-Schmidt basis of span(u, v); if v is (nearly) parallel to u, a fixed orthogonal direction."""
    u = u.reshape(-1) / jnp.linalg.norm(u)
    w = v.reshape(-1) - jnp.dot(v.reshape(-1), u) * u
    if float(jnp.linalg.norm(w)) < 1e-6 * float(jnp.linalg.norm(v)):
        e = jnp.zeros_like(u).at[jnp.argmin(jnp.abs(u))].set(1.0)
        w = e - jnp.dot(e, u) * u
    return u, w / jnp.linalg.norm(w)


def loss_landscape(x, t, alpha_bar_t, u, v, *, conditions: Sequence[Condition], denoiser,
                   extent: float = 1.0, num: int = 41):
    """Energies of all conditions at ``x0|t(x + a u' + b v')`` for ``a, b in linspace(-extent, extent, num)``,
    with ``(u', v')`` the orthonormalised plane of ``u, v``.

    Returns ``(coords (num,), energies (num, num, n))``; ``energies[i, j]`` is at ``a = coords[i]``,
    ``b = coords[j]``.
    """
    if x.shape != u.shape or x.shape != v.shape:
        raise ValueError(f"loss_landscape: x, u and v must share a shape; got {x.shape}, {u.shape}, {v.shape}.")
    if not conditions:
        raise ValueError("loss_landscape: conditions is empty; give at least one Condition.")
    pu, pv = orthonormal_plane(u, v)
    coords = jnp.linspace(-extent, extent, num, dtype=x.dtype)
    energies = _landscape(x, t, alpha_bar_t, pu, pv, coords, tuple(conditions), denoiser)
    return np.asarray(coords), np.asarray(energies)


@jax.jit
def _landscape(x, t, alpha_bar_t, pu, pv, coords, conditions, denoiser):
    f = energy_vector(conditions, denoiser, t, alpha_bar_t)

    def at(a, b):
        return f(x + (a * pu + b * pv).reshape(x.shape))[0]
    return jax.vmap(lambda a: jax.vmap(lambda b: at(a, b))(coords))(coords)
