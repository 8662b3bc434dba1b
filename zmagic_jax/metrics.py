"""Distances between two sample sets ``x`` ``(n, d)`` and ``y`` ``(m, d)``.

The energy distance and sliced Wasserstein compare empirical distributions (every sample weighs ``1/n`` or ``1/m``), are
symmetric, vanish for identical sets, and never build an ``(n, m, d)`` tensor, so sets of a few
thousand 64-dimensional samples fit comfortably in memory. The Frechet distance compares the
Gaussians fitted to the two sets (FID's formula in a chosen feature space).
"""
from __future__ import annotations

import operator
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

# Upper bound on the elements of one (rows, m, d) difference block: 2^22 floats is 16 MiB in
# float32, whatever n and m are.
_BLOCK_ELEMENTS = 2 ** 22


def _check_pair(name: str, x, y):
    x = jnp.asarray(x)
    y = jnp.asarray(y)
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"{name}: x and y must be sample sets of shapes (n, d) and (m, d) with "
                         f"the same d (use x[:, None] for 1-D samples); got {x.shape} and "
                         f"{y.shape}.")
    if x.shape[0] == 0 or y.shape[0] == 0:
        raise ValueError(f"{name}: x and y must each hold at least one sample; "
                         f"got {x.shape} and {y.shape}.")
    dtype = jnp.result_type(x, y, float)
    return x.astype(dtype), y.astype(dtype)


def _mean_distance(a, b):
    """``(1/(n m)) sum_ij |a_i - b_j|`` (Euclidean), over row blocks of ``a``. Differences are
    formed explicitly rather than via ``|a|^2 + |b|^2 - 2 a.b``, which cancels for close points
    and would make the distance of a set to itself nonzero."""
    rows = max(1, min(a.shape[0], _BLOCK_ELEMENTS // (b.shape[0] * b.shape[1])))
    row_sums = jax.lax.map(
        lambda a_i: jnp.sum(jnp.sqrt(jnp.sum((a_i[None, :] - b) ** 2, axis=-1))), a,
        batch_size=rows)
    return jnp.sum(row_sums) / (a.shape[0] * b.shape[0])


def energy_distance(x, y, squared: bool = False) -> jnp.ndarray:
    """Energy distance between the empirical distributions of ``x`` ``(n, d)`` and ``y`` ``(m, d)``.

    ``D^2 = 2 E|X - Y| - E|X - X'| - E|Y - Y'|`` (Euclidean norms) estimated by V-statistics:
    every pair counts, including ``i = j`` in the within-set terms, so ``D^2`` is the exact energy
    distance of the two empirical measures and is ``>= 0``. Returns ``D = sqrt(D^2)`` by default,
    matching ``scipy.stats.energy_distance`` in 1-D; ``squared=True`` returns ``D^2``.
    """
    x, y = _check_pair("energy_distance", x, y)
    d2 = _energy_distance_squared(x, y)
    return d2 if squared else jnp.sqrt(d2)


# The kernels are compiled whole: op-by-op dispatch of the blocked loops and sorts is far slower.
@jax.jit
def _energy_distance_squared(x, y):
    d2 = 2 * _mean_distance(x, y) - _mean_distance(x, x) - _mean_distance(y, y)
    # The V-statistic is nonnegative in exact arithmetic; clip the round-off of equal sets.
    return jnp.maximum(d2, 0.0)


def sliced_wasserstein(key, x, y, num_projections: int = 128, p: float = 2) -> jnp.ndarray:
    """Monte Carlo sliced Wasserstein distance
    ``SW_p = (mean_l W_p^p(theta_l . X, theta_l . Y))^(1/p)`` over ``num_projections`` directions
    ``theta_l`` drawn uniformly on the unit sphere from ``key``.

    Each 1-D ``W_p`` between the projected empirical measures is exact, for any ``n`` and ``m``:
    ``W_p^p = int_0^1 |F_x^{-1}(u) - F_y^{-1}(u)|^p du`` with piecewise-constant quantile
    functions, integrated over the merged breakpoints ``{i/n} U {j/m}``. For ``n = m`` this is the
    sorted matching ``mean_i |x_(i) - y_(i)|^p``. In 1-D (``d = 1``, directions ``+-1``) it is the
    plain ``W_p``, e.g. ``scipy.stats.wasserstein_distance`` for ``p = 1``. The same ``key`` gives
    the same directions, so comparisons of several sets against one reference share them.
    """
    x, y = _check_pair("sliced_wasserstein", x, y)
    try:
        num_projections = operator.index(num_projections)
    except TypeError:
        raise ValueError(f"sliced_wasserstein: num_projections must be an integer; "
                         f"got {num_projections!r}.") from None
    if num_projections < 1:
        raise ValueError(f"sliced_wasserstein: num_projections must be >= 1; "
                         f"got {num_projections}.")
    try:
        p = float(p)
    except TypeError:
        raise ValueError(f"sliced_wasserstein: p must be a static number; got {p!r}.") from None
    if not p >= 1:
        raise ValueError(f"sliced_wasserstein: p must be >= 1 (W_p is a metric only then); "
                         f"got {p}.")
    # Drawn outside the compiled kernel: the PRNG's compilation is cached per (L, d) this way
    # instead of being repeated for every new pair of sample sizes.
    theta = jax.random.normal(key, (num_projections, x.shape[1]), x.dtype)
    return _sliced_wasserstein(theta / jnp.linalg.norm(theta, axis=1, keepdims=True), x, y, p)


@partial(jax.jit, static_argnums=3)
def _sliced_wasserstein(theta, x, y, p: float):
    n, m = x.shape[0], y.shape[0]
    x_proj = jnp.sort(x @ theta.T, axis=0)
    y_proj = jnp.sort(y @ theta.T, axis=0)
    widths, ix, iy = _quantile_pieces(n, m)
    cost = widths.astype(x.dtype) @ jnp.abs(x_proj[ix] - y_proj[iy]) ** p
    return jnp.mean(cost) ** (1.0 / p)


def _quantile_pieces(n: int, m: int):
    """The pieces ``(a, b]`` of ``[0, 1]`` between consecutive merged breakpoints ``{i/n} U {j/m}``,
    on which both empirical quantile functions are constant: their widths and the order-statistic
    indices of ``x`` and ``y`` there. Static in ``(n, m)``, so computed exactly on the host in
    integer units of ``1/(n m)`` (ties merge, no float rounding, no device sort of constants)."""
    ends = sorted(set(range(m, n * m + 1, m)) | set(range(n, n * m + 1, n)))
    starts = [0] + ends[:-1]
    widths = jnp.asarray([(b - a) / (n * m) for a, b in zip(starts, ends)])
    # u in (a, b] lies in x's piece ((i-1)/n, i/n] with i - 1 = a // m, likewise for y.
    return (widths, jnp.asarray([a // m for a in starts], jnp.int32),
            jnp.asarray([a // n for a in starts], jnp.int32))


def frechet_distance(x, y) -> float:
    """Frechet distance between Gaussians fitted to two feature sets ``x (n, d)``, ``y (m, d)``:
    ``|mu_x - mu_y|^2 + tr(S_x + S_y - 2 (S_x^1/2 S_y S_x^1/2)^1/2)`` (the FID formula, in whatever
    feature space the features come from). Computed on the host in float64 with symmetric
    eigendecompositions (``tr (S_x S_y)^1/2`` equals the trace of the symmetric form's root), so no
    complex parts or ``sqrtm`` iterations arise; needs ``n, m >= 2``."""
    x = np.asarray(x, np.float64)
    y = np.asarray(y, np.float64)
    _check_pair("frechet_distance", x, y)
    if x.shape[0] < 2 or y.shape[0] < 2:
        raise ValueError(f"frechet_distance: needs at least 2 samples per set to fit a covariance; got "
                         f"{x.shape[0]} and {y.shape[0]}.")
    cov_x = np.atleast_2d(np.cov(x, rowvar=False))
    cov_y = np.atleast_2d(np.cov(y, rowvar=False))
    values, vectors = np.linalg.eigh(cov_x)
    root_x = (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T
    inner = np.linalg.eigvalsh(root_x @ cov_y @ root_x)
    cross = np.sum(np.sqrt(np.clip(inner, 0.0, None)))
    mean = np.sum(np.square(x.mean(0) - y.mean(0)))
    return float(max(mean + np.trace(cov_x) + np.trace(cov_y) - 2.0 * cross, 0.0))
