r"""CAGrad: conflict-averse combination of several task gradients, solved inside ``jit``.

References:
    Liu, Liu, Jin, Stone & Liu, "Conflict-Averse Gradient Descent for Multi-task Learning",
    NeurIPS 2021 (reference code: Cranial-XIX/CAGrad and LibMTL).
    Deng, He, Tang & Dong, "Z-Magic: Zero-shot Multiple Attributes Guided Image Creator",
    CVPR 2025 (arXiv:2503.12124), Algorithm 2, which combines the guidance gradients of several
    conditions with CAGrad.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from zmagic_jax._math import safe_sqrt

RESCALES = ("1+c^2", "1+c", "none")
DEFAULT_NUM_ITERS = 500


def cagrad_weights(gram: jax.Array, c=0.5, num_iters: int = DEFAULT_NUM_ITERS) -> jax.Array:
    r"""Simplex weights of the CAGrad dual problem, from the Gram matrix of the task gradients.

    With the task gradients :math:`g_1, \dots, g_K` as rows of :math:`G`, ``gram`` is
    :math:`A = G G^\top`, :math:`g_0 = \frac1K \sum_i g_i` and :math:`g_w = \sum_i w_i g_i`.
    The weights solve

    .. math::
        w^\star = \arg\min_{w \in \Delta_K} F(w), \qquad
        F(w) = g_w^\top g_0 + c \|g_0\| \|g_w\|
             = \tfrac1K w^\top A \mathbf{1} + c \sqrt{\bar A} \sqrt{w^\top A w},

    where :math:`\Delta_K` is the probability simplex and :math:`\bar A` the mean entry of
    :math:`A` (:math:`\sqrt{\bar A} = \|g_0\|`). :math:`F` is convex. Its minimiser need not be
    unique (e.g. when :math:`D < K`), but :math:`g_{w^\star}`, hence the CAGrad direction, is
    whenever :math:`g_{w^\star} \neq 0`.

    Solvers, each with a fixed cost known at trace time:

    * ``K = 1``: :math:`w = (1)`.
    * ``K = 2``: closed form. On the segment :math:`g_w = g_2 + a (g_1 - g_2)`, :math:`F` is
      linear plus :math:`c \|g_0\|` times the distance to the origin; its minimiser on the line
      sees the segment under a fixed angle, and is clipped to :math:`a \in [0, 1]`.
    * ``K > 2``: ``num_iters`` steps of FISTA with gradient-based adaptive restart
      (Beck & Teboulle 2009; O'Donoghue & Candès 2015) in the Jacobi metric
      :math:`\operatorname{diag}(A)`, each step ending in a sort-based projection onto the
      simplex in that metric; the last iterate is returned. The step size comes from the
      quadratic majoriser of :math:`\sqrt{w^\top A w}` at the extrapolated point, valid however
      close :math:`g_w` gets to zero. The norm is smoothed to

      .. math::
          \|g_w\|_\epsilon = \sqrt{\|g_w\|^2
              + \epsilon \big( (\textstyle\sum_i w_i \|g_i\|)^2 + \min_{g_i \neq 0} \|g_i\|^2 \big)}

      with :math:`\epsilon` the machine epsilon: the first term is the rounding error of
      :math:`w^\top A w`, below which the quadratic form is noise, and the second keeps the
      curvature finite on zero gradients. This moves :math:`F` by at most
      :math:`c \|g_0\| \sqrt{\epsilon} (\max_i \|g_i\| + \min_{g_i \neq 0} \|g_i\|)`.
      500 iterations reach float64 rounding on typical problems with ``c <= 0.5``; for ``c``
      near 1 with nearly cancelling gradients (a small optimal :math:`\|g_w\|`), raise
      ``num_iters``.

    Args:
        gram: ``(K, K)`` positive semi-definite Gram matrix :math:`G G^\top`; ``K`` is static.
        c: conflict-aversion radius, a scalar :math:`c \ge 0` (may be traced).
        num_iters: FISTA iterations for ``K > 2`` (static); unused for ``K <= 2``.

    Returns:
        ``(K,)`` weights on the simplex, in the dtype of ``gram`` (float32 for integer input).
    """
    gram = jnp.asarray(gram)
    if gram.ndim != 2 or gram.shape[0] != gram.shape[1] or gram.shape[0] < 1:
        raise ValueError(
            f"gram must be a square (K, K) Gram matrix with K >= 1, got shape {gram.shape}; "
            "pass G @ G.T for task gradients stacked as the rows of G.")
    _check_c(c)
    _check_num_iters(num_iters)
    out_dtype, dtype = _dtypes(gram.dtype)
    gram = gram.astype(dtype)
    c = jnp.asarray(c, dtype)
    num_tasks = gram.shape[0]
    if num_tasks == 1:
        return jnp.ones((1,), out_dtype)
    # The minimiser is invariant to positive rescaling of the Gram matrix; a unit mean squared
    # norm keeps float32 in range.
    scale = jnp.trace(gram) / num_tasks
    gram = gram / jnp.where(scale > 0, scale, 1)
    if num_tasks == 2:
        w = _two_task_weights(gram, c)
    else:
        w = _fista_weights(gram, c, num_iters)
    return w.astype(out_dtype)


def cagrad(task_grads: jax.Array, c=0.5, rescale: str = "1+c^2",
           num_iters: int = DEFAULT_NUM_ITERS) -> jax.Array:
    r"""Conflict-averse direction of several task gradients (CAGrad, Liu et al., NeurIPS 2021).

    With task gradients :math:`g_1, \dots, g_K` and their mean :math:`g_0`, CAGrad takes the
    direction that maximises the worst task's first-order progress in a ball around the mean,

    .. math::
        d^\star = \arg\max_{\|d - g_0\| \le c \|g_0\|} \; \min_i g_i^\top d .

    By duality, with :math:`w^\star` from :func:`cagrad_weights` and
    :math:`g_w = \sum_i w^\star_i g_i`,

    .. math::
        d^\star = g_0 + \frac{c \|g_0\|}{\|g_w\|} g_w, \qquad
        d = d^\star / s, \quad
        s = \begin{cases}
            1 + c^2 & \texttt{"1+c^2"} \text{ (LibMTL, the K-task reference code)} \\
            1 + c   & \texttt{"1+c"} \text{ (the 2-task toy code)} \\
            1       & \texttt{"none"}.
        \end{cases}

    The term :math:`c \|g_0\| / \|g_w\|` is 0 when :math:`c \|g_0\| = 0` (all-zero or exactly
    cancelling gradients: :math:`d^\star = g_0`), and :math:`\|g_w\|` is smoothed as in
    :func:`cagrad_weights`, so :math:`g_w \to 0` gives a finite, continuous result. For ``K = 1``,
    :math:`d^\star = (1 + c) g_1`; for ``c = 0``, :math:`d = g_0` whatever ``rescale``.

    Sign convention: :math:`G \mapsto d` is odd, ``cagrad(-G) == -cagrad(G)``, and the criterion
    :math:`g_i^\top d` only needs every row to follow the same convention. The paper feeds loss
    gradients and steps along :math:`-d`; this library feeds ascent directions (gradients of
    log-likelihoods) and steps along :math:`+d`.

    Works under ``jit`` and ``vmap``; ``rescale`` and ``num_iters`` are static.

    Args:
        task_grads: ``(K, ...)`` array, one task gradient per index of axis 0, ``K >= 1``; the
            trailing axes are flattened for the solve.
        c: conflict-aversion radius, a scalar :math:`c \ge 0` (0.5 in the paper; may be traced).
        rescale: ``"1+c^2"`` (default), ``"1+c"`` or ``"none"``.
        num_iters: solver iterations for ``K > 2``, see :func:`cagrad_weights`.

    Returns:
        The direction, shaped like one task gradient (``task_grads.shape[1:]``), in the dtype of
        ``task_grads`` (float32 for integer input).
    """
    task_grads = jnp.asarray(task_grads)
    if task_grads.ndim < 2 or task_grads.shape[0] < 1:
        raise ValueError(
            f"task_grads must have shape (K, ...) with K >= 1 task gradients stacked on axis 0, "
            f"got shape {task_grads.shape}; for a single gradient g pass g[None].")
    _check_c(c)
    if rescale not in RESCALES:
        raise ValueError(f"rescale must be one of {RESCALES}, got {rescale!r}.")
    _check_num_iters(num_iters)
    out_dtype, dtype = _dtypes(task_grads.dtype)
    grads = task_grads.reshape(task_grads.shape[0], -1).astype(dtype)
    c = jnp.asarray(c, dtype)
    # d is positively homogeneous of degree one in the gradients: solving for G / max|G| keeps
    # the Gram matrix inside the float range whatever the gradients' magnitude.
    size = jnp.max(jnp.abs(grads), initial=0)
    size = jnp.where(size > 0, size, 1)
    grads = grads / size
    gram = jnp.matmul(grads, grads.T, precision=lax.Precision.HIGHEST)
    w = cagrad_weights(gram, c, num_iters)
    g0 = jnp.mean(grads, axis=0)
    gw = jnp.matmul(w, grads, precision=lax.Precision.HIGHEST)
    radius = c * safe_sqrt(jnp.sum(g0 * g0))
    gw_norm = jnp.sqrt(jnp.sum(gw * gw) + _smoothing(w, *_smoothing_terms(gram)))
    lam = jnp.where(radius > 0, radius / jnp.where(gw_norm > 0, gw_norm, 1), 0)
    d = g0 + lam * gw
    if rescale == "1+c^2":
        d = d / (1 + c * c)
    elif rescale == "1+c":
        d = d / (1 + c)
    return (d * size).reshape(task_grads.shape[1:]).astype(out_dtype)


def _two_task_weights(gram, c):
    # Coordinates on the line g_w = g2 + a e, e = g1 - g2: s is the signed position of g_w along
    # e / |e| and h its (constant) distance to the origin, so that
    # F = beta s + radius sqrt(s^2 + h^2) + const. The minimiser over the line solves
    # s / sqrt(s^2 + h^2) = -beta / radius; if |beta| >= radius, F is monotone in s and the
    # minimum sits at an end of the segment.
    a11, a12, a22 = gram[0, 0], gram[0, 1], gram[1, 1]
    e_sq = jnp.maximum(a11 - 2 * a12 + a22, 0)
    has_segment = e_sq > jnp.finfo(gram.dtype).eps * (a11 + a22)
    e_sq = jnp.where(has_segment, e_sq, 1)
    e_norm = jnp.sqrt(e_sq)
    h = safe_sqrt((a11 * a22 - a12 * a12) / e_sq)
    radius = c * safe_sqrt(jnp.mean(gram))
    beta = 0.5 * (a11 - a22) / e_norm
    slack = safe_sqrt(radius * radius - beta * beta)
    interior = slack > 0
    s_star = -beta * h / jnp.where(interior, slack, 1)
    a_interior = (s_star * e_norm - (a12 - a22)) / e_sq
    # beta = radius = 0 makes F constant on the segment (and identical gradients make the
    # segment a point); the midpoint keeps the two tasks symmetric.
    a_end = jnp.where(beta < 0, 1, jnp.where(beta > 0, 0, 0.5))
    a = jnp.clip(jnp.where(interior, a_interior, a_end), 0, 1)
    a = jnp.where(has_segment, a, 0.5).astype(gram.dtype)
    return jnp.stack([a, 1 - a])


def _fista_weights(gram, c, num_iters):
    num_tasks = gram.shape[0]
    dtype = gram.dtype
    eps = jnp.finfo(dtype).eps
    b = jnp.mean(gram, axis=1)
    g0_norm = safe_sqrt(jnp.mean(gram))
    radius = c * g0_norm
    lengths, floor_sq = _smoothing_terms(gram)
    # Jacobi metric on the Hessian A + eps l l^T of the smoothed squared norm: one gradient
    # much longer than the others would otherwise force a step size far too small for the rest.
    # The floor keeps (near-)zero rows invertible.
    smoothed_gram = gram + eps * jnp.outer(lengths, lengths)
    metric = jnp.maximum(jnp.diagonal(smoothed_gram), eps)
    root = jnp.sqrt(metric)
    # The largest diagonal entry of the scaled matrix is exactly 1 (unit mean squared norm), a
    # lower bound of its top eigenvalue; the floor also covers all-zero gradients.
    scaled = smoothed_gram / root[:, None] / root[None, :]
    top_eig = jnp.maximum(jnp.linalg.eigvalsh(scaled)[-1], 1)
    # For c = 0 the objective is linear and any curvature is a valid bound; sqrt(eps) keeps
    # the steps, hence the projection's cancellation, bounded. Exact for every c >= sqrt(eps).
    curvature = jnp.maximum(c, jnp.sqrt(eps)) * g0_norm * top_eig

    def projected_step(y):
        # The smoothing stays out of A so that exact cancellations (g and -g) remain exact.
        gram_y = gram @ y
        smoothing = _smoothing(y, lengths, floor_sq)
        norm_y = safe_sqrt(y @ gram_y + smoothing)
        # norm_y = 0 only for all-zero gradients, where radius = curvature = 0.
        norm_y = jnp.where(norm_y > 0, norm_y, 1)
        grad = b + radius * (gram_y + eps * (lengths @ y) * lengths) / norm_y
        # sqrt(q) <= q / (2n) + n / 2 with n = |g_y| majorises F by a quadratic whose Hessian
        # radius (A + eps l l^T) / n is below (curvature / n) diag(metric). Zero curvature means
        # g0 = 0, where grad vanishes too and F is constant.
        lipschitz = curvature / norm_y
        step = grad / (jnp.where(lipschitz > 0, lipschitz, 1) * metric)
        return _project_simplex(y - step, metric)

    def body(_, state):
        x, y, t = state
        z = projected_step(y)
        t_next = (1 + jnp.sqrt(1 + 4 * t * t)) / 2
        y_next = z + ((t - 1) / t_next) * (z - x)
        # Restart when the momentum points against the gradient mapping y - z. This test uses
        # gradients, not objective values, so the iterates keep converging below the rounding
        # level of F (where a value-based test would stall at a sqrt(eps)-accurate point).
        restart = jnp.sum(metric * (y - z) * (z - x)) > 0
        y_next = jnp.where(restart, z, y_next)
        t_next = jnp.where(restart, 1, t_next)
        return z, y_next, t_next

    w0 = jnp.full((num_tasks,), 1 / num_tasks, dtype)
    w = lax.fori_loop(0, num_iters, body, (w0, w0, jnp.ones((), dtype)))[0]
    # Long steps (small c) leave the projection's sum off by about eps |z|.
    return w / jnp.sum(w)


def _smoothing_terms(gram):
    """Gradient lengths and the squared length of the shortest nonzero one (0 if none)."""
    lengths = safe_sqrt(jnp.diagonal(gram))
    shortest = jnp.min(jnp.where(lengths > 0, lengths, jnp.max(lengths)))
    return lengths, shortest * shortest


def _smoothing(w, lengths, floor_sq):
    # eps (sum_i w_i |g_i|)^2 is the rounding error of |g_w|^2 computed at w, below which it
    # is noise; eps min_i |g_i|^2 keeps the curvature finite where w sits on zero gradients.
    return jnp.finfo(lengths.dtype).eps * ((lengths @ w) ** 2 + floor_sq)


def _project_simplex(z, metric):
    # argmin over the simplex of sum_i metric_i (w_i - z_i)^2. KKT: w_i = max(z_i - theta /
    # metric_i, 0), so the support holds the largest keys metric_i z_i; for the r largest,
    # theta_r = (sum z - 1) / sum(1 / metric), and the support is the largest r whose r-th key
    # still exceeds theta_r (r = 1 always does).
    key = metric * z
    order = jnp.argsort(-key)
    theta = (jnp.cumsum(z[order]) - 1) / jnp.cumsum(1 / metric[order])
    ranks = jnp.arange(1, z.shape[0] + 1)
    r = jnp.max(jnp.where(key[order] > theta, ranks, 1))
    return jnp.maximum(z - theta[r - 1] / metric, 0)


def _dtypes(dtype):
    # (output dtype, compute dtype): half precision cannot resolve the solver's epsilon floors,
    # so it is solved in float32 and cast back; integers carry no precision intent.
    compute = jnp.promote_types(dtype, jnp.float32)
    return (dtype if jnp.issubdtype(dtype, jnp.floating) else compute), compute


def _check_c(c):
    if jnp.ndim(c) != 0:
        raise ValueError(f"c must be a scalar >= 0, got an array of shape {jnp.shape(c)}.")
    if not isinstance(c, jax.core.Tracer) and not np.asarray(c) >= 0:
        raise ValueError(f"c must be >= 0 (0.5 in the CAGrad paper), got {c}.")


def _check_num_iters(num_iters):
    if not isinstance(num_iters, (int, np.integer)) or num_iters < 1:
        raise ValueError(
            f"num_iters must be a positive Python int (static under jit), got {num_iters!r}.")
