"""A Gaussian-mixture prior whose VP-diffused marginals, scores and posteriors are exact.

Prior ``p(x0) = sum_k pi_k N(x0; mu_k, Sigma_k)``. Under the VP forward process
``x_t = sqrt(ab) x0 + sqrt(1 - ab) n`` with ``n ~ N(0, I)`` and ``ab = alpha_bar in [0, 1]``,
every marginal is again a mixture with the same weights:

    p_ab(x) = sum_k pi_k N(x; sqrt(ab) mu_k, ab Sigma_k + (1 - ab) I).

Each covariance is stored as an eigendecomposition ``Sigma_k = U_k diag(lam_k) U_k^T``. The
noised covariance shares the eigenvectors, ``cov_t = U_k diag(s_k) U_k^T`` with
``s_k = ab lam_k + 1 - ab``, so every inverse and log-determinant below is an elementwise
operation on ``s_k``: exact, cheap and differentiable. ``s_k`` stays positive on all of
``[0, 1]`` (it is ``lam_k`` at ``ab = 1`` and ``1`` at ``ab = 0``), so nothing divides by
``ab`` or ``1 - ab``.

Every function acts on ONE sample ``x`` of shape ``(d,)``; batch with ``jax.vmap``.
"""
from __future__ import annotations

import math
import operator
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.scipy.linalg import cho_solve, solve_triangular
from jax.scipy.special import logsumexp

from zmagic_jax.contracts import Denoiser
from zmagic_jax.schedules import eps_from_score


class GaussianMixture(NamedTuple):
    """``sum_k exp(log_weights[k]) N(means[k], eigvecs[k] diag(eigvals[k]) eigvecs[k]^T)``.

    Attributes:
      log_weights: ``(K,)`` normalised log mixture weights (``logsumexp == 0``).
      means: ``(K, d)`` component means.
      eigvecs: ``(K, d, d)`` orthogonal matrices; column ``j`` of ``eigvecs[k]`` is an
        eigenvector of ``Sigma_k``.
      eigvals: ``(K, d)`` eigenvalues of ``Sigma_k``; positive for a prior, ``>= 0`` for the
        degenerate posteriors returned by :func:`x0_posterior` at ``ab = 1``.
    """

    log_weights: jnp.ndarray
    means: jnp.ndarray
    eigvecs: jnp.ndarray
    eigvals: jnp.ndarray


def _fails(check: Callable) -> bool:
    """Whether the boolean array ``check()`` is concretely False somewhere.

    Evaluated with ``ensure_compile_time_eval`` so that constants are still checked inside jit
    (where even comparisons of constants would otherwise be staged out); values that are truly
    traced (arguments under jit/vmap/grad) cannot be checked and pass.
    """
    with jax.ensure_compile_time_eval():
        ok = jnp.all(check())
    return not isinstance(ok, jax.core.Tracer) and not bool(ok)


def gaussian_mixture(weights, means, covs) -> GaussianMixture:
    """Build a :class:`GaussianMixture` from weights ``(K,)``, means ``(K, d)``, covs ``(K, d, d)``.

    Weights must be positive (they are normalised to sum to one); each covariance must be
    symmetric positive definite. A constructor: call it outside ``jit`` (it checks values).
    """
    weights = jnp.asarray(weights, dtype=float)
    means = jnp.asarray(means, dtype=float)
    covs = jnp.asarray(covs, dtype=float)
    if weights.ndim != 1 or weights.shape[0] == 0:
        raise ValueError(f"gaussian_mixture: weights must have shape (K,) with K >= 1; "
                         f"got {weights.shape}.")
    num = weights.shape[0]
    if means.ndim != 2 or means.shape[0] != num:
        raise ValueError(f"gaussian_mixture: means must have shape (K, d) = ({num}, d) to match "
                         f"weights; got {means.shape}.")
    dim = means.shape[1]
    if covs.shape != (num, dim, dim):
        raise ValueError(f"gaussian_mixture: covs must have shape (K, d, d) = {(num, dim, dim)} "
                         f"to match means; got {covs.shape}.")
    if not bool(jnp.all(jnp.isfinite(weights) & (weights > 0))):
        raise ValueError(f"gaussian_mixture: weights must be finite and positive; got {weights}. "
                         "Drop zero-weight components instead of passing them.")
    if not bool(jnp.all(jnp.isfinite(means)) & jnp.all(jnp.isfinite(covs))):
        raise ValueError("gaussian_mixture: means and covs must be finite.")
    scale = jnp.max(jnp.abs(covs), axis=(1, 2))
    asym = jnp.max(jnp.abs(covs - jnp.swapaxes(covs, 1, 2)), axis=(1, 2))
    bad = jnp.flatnonzero(asym > 1e-5 * scale)
    if bad.size:
        raise ValueError(f"gaussian_mixture: covs[{int(bad[0])}] is not symmetric (max |C - C^T| = "
                         f"{float(asym[bad[0]]):.3g}); pass (C + C^T) / 2.")
    # Symmetrise the round-off that passed the check so eigh sees an exactly symmetric matrix.
    eigvals, eigvecs = jnp.linalg.eigh(0.5 * (covs + jnp.swapaxes(covs, 1, 2)))
    bad = jnp.flatnonzero(eigvals[:, 0] <= 0)
    if bad.size:
        raise ValueError(f"gaussian_mixture: covs[{int(bad[0])}] is not positive definite "
                         f"(smallest eigenvalue {float(eigvals[bad[0], 0]):.3g}); add a small "
                         "multiple of the identity.")
    log_weights = jnp.log(weights) - jnp.log(jnp.sum(weights))
    return GaussianMixture(log_weights, means, eigvecs, eigvals)


def _check_point(name: str, gmm: GaussianMixture, x, alpha_bar):
    x = jnp.asarray(x)
    dim = gmm.means.shape[1]
    if x.shape != (dim,):
        raise ValueError(f"{name}: x must be one sample of shape ({dim},) (vmap for batches); "
                         f"got {x.shape}.")
    if jnp.ndim(alpha_bar) != 0:
        raise ValueError(f"{name}: alpha_bar must be a scalar (vmap for batches); "
                         f"got shape {jnp.shape(alpha_bar)}.")
    if _fails(lambda: (jnp.asarray(alpha_bar) >= 0) & (jnp.asarray(alpha_bar) <= 1)):
        raise ValueError(f"{name}: alpha_bar must lie in [0, 1]; got {float(alpha_bar)}.")
    return x, jnp.asarray(alpha_bar, dtype=x.dtype)


def _noised_terms(gmm: GaussianMixture, x, alpha_bar):
    """Per component: ``s_k`` (eigenvalues of cov_t), ``z_k = U_k^T (x - sqrt(ab) mu_k)`` and the
    component log-densities ``log N(x; sqrt(ab) mu_k, cov_t)``."""
    s = alpha_bar * gmm.eigvals + (1.0 - alpha_bar)
    z = jnp.einsum("kji,kj->ki", gmm.eigvecs, x[None, :] - jnp.sqrt(alpha_bar) * gmm.means)
    dim = x.shape[0]
    log_norm = -0.5 * (jnp.sum(z * z / s, axis=1) + jnp.sum(jnp.log(s), axis=1)
                       + dim * math.log(2 * math.pi))
    return s, z, log_norm


def marginal_log_prob(gmm: GaussianMixture, x, alpha_bar) -> jnp.ndarray:
    """``log p_ab(x) = logsumexp_k [log pi_k + log N(x; sqrt(ab) mu_k, ab Sigma_k + (1-ab) I)]``."""
    x, alpha_bar = _check_point("marginal_log_prob", gmm, x, alpha_bar)
    _, _, log_norm = _noised_terms(gmm, x, alpha_bar)
    return logsumexp(gmm.log_weights + log_norm)


def log_responsibilities(gmm: GaussianMixture, x, alpha_bar) -> jnp.ndarray:
    """``log r_k(x) = log p(k | x_t = x)``, shape ``(K,)``: the normalised log posterior
    component probabilities at noise level ``ab`` (at ``ab = 1`` the Bayes classifier of clean
    data)."""
    x, alpha_bar = _check_point("log_responsibilities", gmm, x, alpha_bar)
    _, _, log_norm = _noised_terms(gmm, x, alpha_bar)
    joint = gmm.log_weights + log_norm
    return joint - logsumexp(joint)


def responsibilities(gmm: GaussianMixture, x, alpha_bar) -> jnp.ndarray:
    """``r_k(x) = p(k | x_t = x)``, shape ``(K,)``, summing to one
    (``exp`` of :func:`log_responsibilities`)."""
    return jnp.exp(log_responsibilities(gmm, x, alpha_bar))


def marginal_score(gmm: GaussianMixture, x, alpha_bar) -> jnp.ndarray:
    """Closed-form score ``grad_x log p_ab(x) = -sum_k r_k(x) cov_t,k^{-1} (x - sqrt(ab) mu_k)``."""
    x, alpha_bar = _check_point("marginal_score", gmm, x, alpha_bar)
    s, z, log_norm = _noised_terms(gmm, x, alpha_bar)
    joint = gmm.log_weights + log_norm
    resp = jnp.exp(joint - logsumexp(joint))
    # cov_t^{-1} v = U diag(1/s) U^T v, and z already holds U^T v.
    component_scores = -jnp.einsum("kij,kj->ki", gmm.eigvecs, z / s)
    return resp @ component_scores


def component_x0_posterior(gmm: GaussianMixture, x, alpha_bar):
    """Per-component posterior ``x0 | x_t = x, k ~ N(m_k, C_k)``.

    Kalman form, which stays finite for every ``ab in [0, 1]``:

        m_k = mu_k + sqrt(ab) Sigma_k cov_t^{-1} (x - sqrt(ab) mu_k)
        C_k = Sigma_k - ab Sigma_k cov_t^{-1} Sigma_k = U_k diag(lam_k (1 - ab) / s_k) U_k^T.

    ``C_k`` shares the prior eigenvectors ``gmm.eigvecs``, so only its eigenvalues are returned.

    Returns:
      ``(means, eigvals)`` of shapes ``(K, d)`` and ``(K, d)``; ``eigvals`` is zero at ``ab = 1``
      (x0 is then known) and equals ``lam_k`` at ``ab = 0``.
    """
    x, alpha_bar = _check_point("component_x0_posterior", gmm, x, alpha_bar)
    s, z, _ = _noised_terms(gmm, x, alpha_bar)
    gain = gmm.eigvals / s
    means = gmm.means + jnp.sqrt(alpha_bar) * jnp.einsum("kij,kj->ki", gmm.eigvecs, gain * z)
    # lam - ab lam^2 / s = lam (s - ab lam) / s = lam (1 - ab) / s: no cancellation.
    return means, gain * (1.0 - alpha_bar)


def x0_posterior(gmm: GaussianMixture, x, alpha_bar) -> GaussianMixture:
    """The exact posterior ``p(x0 | x_t = x) = sum_k r_k(x) N(m_k, C_k)`` as a mixture
    (weights :func:`log_responsibilities`, components :func:`component_x0_posterior`)."""
    means, eigvals = component_x0_posterior(gmm, x, alpha_bar)
    return GaussianMixture(log_responsibilities(gmm, x, alpha_bar), means, gmm.eigvecs, eigvals)


def posterior_mean_x0(gmm: GaussianMixture, x, alpha_bar) -> jnp.ndarray:
    """Exact ``E[x0 | x_t = x]``.

    Equal to Tweedie's formula ``(x + (1 - ab) grad log p_ab(x)) / sqrt(ab)``, but evaluated as
    ``sum_k r_k(x) m_k(x)`` (:func:`component_x0_posterior`), which stays finite at ``ab = 0``
    (where it is the prior mean) instead of dividing a cancelling difference by ``sqrt(ab)``.
    """
    means, _ = component_x0_posterior(gmm, x, alpha_bar)
    return responsibilities(gmm, x, alpha_bar) @ means


def _mixture_eps(params, x_t, t):
    gmm, alphas_cumprod = params
    alpha_bar_t = alphas_cumprod[t]
    return eps_from_score(marginal_score(gmm, x_t, alpha_bar_t), alpha_bar_t)


def mixture_denoiser(gmm: GaussianMixture, alphas_cumprod) -> Denoiser:
    """The exact noise predictor of the mixture as a :class:`~zmagic_jax.Denoiser`.

    ``denoiser(x_t, t) = -sqrt(1 - ab_t) grad log p_{ab_t}(x_t)`` for one sample ``x_t`` ``(d,)``
    and an integer timestep ``t`` in ``[0, T)`` (traced) indexing ``alphas_cumprod`` ``(T,)`` (e.g.
    ``schedule.alphas_cumprod``). This is the minimiser of the DDPM loss, i.e. what a perfectly
    trained network would output. The mixture and the schedule are its params (cast to the
    mixture's dtype).
    """
    shape = jnp.shape(alphas_cumprod)
    if len(shape) != 1 or shape[0] == 0:
        raise ValueError(f"mixture_denoiser: alphas_cumprod must have shape (T,) with T >= 1; "
                         f"got {shape}.")
    if _fails(lambda: (jnp.asarray(alphas_cumprod) >= 0) & (jnp.asarray(alphas_cumprod) <= 1)):
        raise ValueError("mixture_denoiser: alphas_cumprod must lie in [0, 1] (a VP schedule).")
    return Denoiser(_mixture_eps, (gmm, jnp.asarray(alphas_cumprod, gmm.means.dtype)))


def sample_mixture(key, gmm: GaussianMixture, n: int) -> jnp.ndarray:
    """``n`` i.i.d. draws ``(n, d)``: ``k ~ Categorical(pi)``, then
    ``x = mu_k + U_k diag(sqrt(lam_k)) z`` with ``z ~ N(0, I)``.

    ``n`` is static. Zero eigenvalues (degenerate posteriors) are allowed.
    """
    try:
        n = operator.index(n)
    except TypeError:
        raise ValueError(f"sample_mixture: n must be a static integer; got {n!r}.") from None
    if n < 0:
        raise ValueError(f"sample_mixture: n must be non-negative; got {n}.")
    key_component, key_noise = jax.random.split(key)
    component = jax.random.categorical(key_component, gmm.log_weights, shape=(n,))
    z = jax.random.normal(key_noise, (n, gmm.means.shape[1]), dtype=gmm.means.dtype)
    roots = gmm.eigvecs * jnp.sqrt(gmm.eigvals)[:, None, :]
    # Transform the noise by every component's root (n K d numbers) and keep the drawn one:
    # cheaper in memory than gathering an (n, d, d) stack of roots.
    candidates = jnp.einsum("kij,nj->nki", roots, z) + gmm.means[None]
    return jnp.take_along_axis(candidates, component[:, None, None], axis=1)[:, 0]


def select_component(gmm: GaussianMixture, k) -> GaussianMixture:
    """The single component ``k`` as a one-component mixture: the posterior given class ``k``."""
    num = gmm.log_weights.shape[0]
    if _fails(lambda: (k >= 0) & (k < num)):
        raise ValueError(f"select_component: k must index one of the {num} components; got {k}.")
    return GaussianMixture(jnp.zeros((1,), gmm.log_weights.dtype), gmm.means[k][None],
                           gmm.eigvecs[k][None], gmm.eigvals[k][None])


def _check_linear(name: str, gmm: GaussianMixture, A, y, sigma):
    A = jnp.asarray(A, dtype=gmm.means.dtype)
    y = jnp.asarray(y, dtype=gmm.means.dtype)
    raw_sigma, sigma = sigma, jnp.asarray(sigma, dtype=gmm.means.dtype)
    dim = gmm.means.shape[1]
    if A.ndim != 2 or A.shape[1] != dim:
        raise ValueError(f"{name}: A must have shape (m, d) with d = {dim}; got {A.shape}.")
    rows = A.shape[0]
    if y.shape != (rows,):
        raise ValueError(f"{name}: y must have shape (m,) = ({rows},) to match A's rows; "
                         f"got {y.shape}.")
    if sigma.shape not in ((), (rows,)):
        raise ValueError(f"{name}: sigma must be a scalar or one std per row, shape ({rows},); "
                         f"got {sigma.shape}.")
    if _fails(lambda: jnp.asarray(raw_sigma) > 0):
        raise ValueError(f"{name}: sigma must be positive (exact observations have no density); "
                         f"got {raw_sigma}.")
    return A, y, jnp.broadcast_to(sigma, (rows,))


def _linear_evidence_parts(mean, eigvecs, eigvals, A, y, noise_std):
    """One component: ``log N(y; A mu, S)`` with ``S = A Sigma A^T + diag(noise_std^2)``, plus the
    pieces conditioning reuses (``root`` with ``Sigma = root root^T``, ``B = A root``, the
    Cholesky factor of ``S`` and the residual ``y - A mu``)."""
    root = eigvecs * jnp.sqrt(eigvals)[None, :]
    B = A @ root
    chol = jnp.linalg.cholesky(B @ B.T + jnp.diag(noise_std ** 2))
    resid = y - A @ mean
    white = solve_triangular(chol, resid, lower=True)
    log_evidence = -0.5 * (white @ white + y.shape[0] * math.log(2 * math.pi)) \
        - jnp.sum(jnp.log(jnp.diagonal(chol)))
    return log_evidence, root, B, chol, resid


def linear_log_evidence(gmm: GaussianMixture, A, y, sigma) -> jnp.ndarray:
    """Per-component evidence ``log N(y; A mu_k, A Sigma_k A^T + diag(sigma^2))``, shape ``(K,)``,
    of the observation ``y = A x0 + e``, ``e ~ N(0, diag(sigma^2))``; ``sigma`` is a scalar or one
    std per row. ``logsumexp(log_weights + evidence)`` is ``log p(y)`` under the mixture."""
    A, y, noise_std = _check_linear("linear_log_evidence", gmm, A, y, sigma)
    evidence = jax.vmap(lambda m, u, lam: _linear_evidence_parts(m, u, lam, A, y, noise_std)[0])
    return evidence(gmm.means, gmm.eigvecs, gmm.eigvals)


def condition_on_linear(gmm: GaussianMixture, A, y, sigma) -> GaussianMixture:
    """Exact posterior of ``x0`` under ``y = A x0 + e``, ``e ~ N(0, diag(sigma^2))``.

    ``A`` is ``(m, d)``, ``y`` is ``(m,)``, ``sigma`` a positive scalar or ``(m,)`` per-row stds.
    Component ``k`` is conditioned as a Gaussian,

        mu_k'    = mu_k + Sigma_k A^T S_k^{-1} (y - A mu_k),   S_k = A Sigma_k A^T + diag(sigma^2),
        Sigma_k' = Sigma_k - Sigma_k A^T S_k^{-1} A Sigma_k,

    and its weight is multiplied by the evidence ``N(y; A mu_k, S_k)`` (then renormalised).
    Independent measurements compose: conditioning on several in turn equals conditioning once
    on their stacked rows.
    """
    return _condition_on_linear(gmm, *_check_linear("condition_on_linear", gmm, A, y, sigma))


# Compiled as one program: op-by-op dispatch of the batched eigh/SVD is slow on first use.
@jax.jit
def _condition_on_linear(gmm: GaussianMixture, A, y, noise_std) -> GaussianMixture:
    def condition(mean, eigvecs, eigvals):
        log_evidence, root, B, chol, resid = _linear_evidence_parts(
            mean, eigvecs, eigvals, A, y, noise_std)
        new_mean = mean + root @ (B.T @ cho_solve((chol, True), resid))
        # Square-root form: Sigma' = root (I + B_w^T B_w)^{-1} root^T with whitened B_w = B / std.
        # Factoring the inner inverse and taking an SVD of the resulting root gives eigenpairs of
        # Sigma' that are PSD by construction, where subtracting two covariances could go negative.
        white = B / noise_std[:, None]
        inner_vals, inner_vecs = jnp.linalg.eigh(jnp.eye(B.shape[1]) + white.T @ white)
        new_root = root @ (inner_vecs / jnp.sqrt(inner_vals)[None, :])
        new_eigvecs, singular, _ = jnp.linalg.svd(new_root)
        return log_evidence, new_mean, new_eigvecs, singular ** 2

    log_evidence, means, eigvecs, eigvals = jax.vmap(condition)(
        gmm.means, gmm.eigvecs, gmm.eigvals)
    log_weights = gmm.log_weights + log_evidence
    return GaussianMixture(log_weights - logsumexp(log_weights), means, eigvecs, eigvals)
