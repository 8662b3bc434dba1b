"""Exactness of the Gaussian-mixture model against independent numpy/scipy references."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.special import logsumexp
from scipy.stats import multivariate_normal as mvn

from tests.conftest import random_mixture_params
from zmagic_jax.models import (
    GaussianMixture,
    component_x0_posterior,
    condition_on_linear,
    gaussian_mixture,
    linear_log_evidence,
    log_responsibilities,
    marginal_log_prob,
    marginal_score,
    mixture_denoiser,
    posterior_mean_x0,
    responsibilities,
    sample_mixture,
    select_component,
    x0_posterior,
)

ALPHA_BARS = [0.0, 1e-3, 0.3, 0.9, 1.0]


pytestmark = pytest.mark.usefixtures("x64")


def random_params(seed, num=3, dim=3):
    return random_mixture_params(seed, num, dim)


@pytest.fixture
def params():
    return random_params(0)


@pytest.fixture
def gmm(params):
    return gaussian_mixture(*params)


def points(dim, num=4, seed=1):
    return np.random.default_rng(seed).normal(0.0, 1.5, (num, dim))


def ref_component_logpdfs(params, x, ab):
    weights, means, covs = params
    eye = np.eye(means.shape[1])
    return np.array([np.log(w / weights.sum())
                     + mvn.logpdf(x, np.sqrt(ab) * m, ab * c + (1 - ab) * eye)
                     for w, m, c in zip(weights, means, covs)])


def ref_log_prob(params, x, ab):
    return logsumexp(ref_component_logpdfs(params, x, ab))


def ref_x0_posterior_joint(mean, cov, x, ab):
    """x0 | x_t by conditioning the joint Gaussian of (x0, x_t) in information form."""
    dim = mean.shape[0]
    joint_cov = np.block([[cov, np.sqrt(ab) * cov],
                          [np.sqrt(ab) * cov, ab * cov + (1 - ab) * np.eye(dim)]])
    precision = np.linalg.inv(joint_cov)
    p00, p01 = precision[:dim, :dim], precision[:dim, dim:]
    post_cov = np.linalg.inv(p00)
    post_mean = mean - post_cov @ p01 @ (x - np.sqrt(ab) * mean)
    return post_mean, post_cov


def ref_condition(params, A, y, sigma):
    """Exact Bayes posterior of the mixture under y = A x0 + N(0, diag(sigma^2))."""
    weights, means, covs = params
    noise = np.diag(np.broadcast_to(sigma, y.shape) ** 2)
    log_w, new_means, new_covs = [], [], []
    for w, m, c in zip(weights, means, covs):
        precision = np.linalg.inv(c) + A.T @ np.linalg.inv(noise) @ A
        post_cov = np.linalg.inv(precision)
        new_means.append(post_cov @ (np.linalg.solve(c, m) + A.T @ np.linalg.solve(noise, y)))
        new_covs.append(post_cov)
        log_w.append(np.log(w) + mvn.logpdf(y, A @ m, A @ c @ A.T + noise))
    log_w = np.array(log_w)
    return log_w - logsumexp(log_w), np.array(new_means), np.array(new_covs)


def covs_of(gmm):
    return np.einsum("kij,kj,klj->kil", gmm.eigvecs, gmm.eigvals, gmm.eigvecs)


def test_constructor_normalises_weights_and_decomposes(params, gmm):
    weights, means, covs = params
    np.testing.assert_allclose(np.exp(gmm.log_weights), weights / weights.sum(), rtol=1e-12)
    np.testing.assert_allclose(gmm.means, means)
    np.testing.assert_allclose(covs_of(gmm), covs, atol=1e-12)
    eye = np.broadcast_to(np.eye(3), (3, 3, 3))
    np.testing.assert_allclose(np.swapaxes(gmm.eigvecs, 1, 2) @ gmm.eigvecs, eye, atol=1e-12)


@pytest.mark.parametrize("change, match", [
    (lambda w, m, c: (-w, m, c), "weights must be finite and positive"),
    (lambda w, m, c: (np.r_[w[:-1], 0.0], m, c), "weights must be finite and positive"),
    (lambda w, m, c: (w[:, None], m, c), "weights must have shape"),
    (lambda w, m, c: (w, m[:2], c), "means must have shape"),
    (lambda w, m, c: (w, m, c[:, :2]), "covs must have shape"),
    (lambda w, m, c: (w, m, c + np.triu(np.ones((3, 3)), 1)), "not symmetric"),
    (lambda w, m, c: (w, m, c - 10.0 * np.eye(3)), "not positive definite"),
])
def test_constructor_rejects_bad_input(params, change, match):
    with pytest.raises(ValueError, match=match):
        gaussian_mixture(*change(*params))


@pytest.mark.parametrize("ab", ALPHA_BARS)
def test_marginal_log_prob_matches_scipy(params, gmm, ab):
    for x in points(3):
        np.testing.assert_allclose(marginal_log_prob(gmm, x, ab), ref_log_prob(params, x, ab),
                                   rtol=1e-10)


def test_marginal_endpoints_are_prior_and_standard_normal(params, gmm):
    weights, means, covs = params
    for x in points(3):
        prior = logsumexp([np.log(w / weights.sum()) + mvn.logpdf(x, m, c)
                           for w, m, c in zip(weights, means, covs)])
        np.testing.assert_allclose(marginal_log_prob(gmm, x, 1.0), prior, rtol=1e-10)
        np.testing.assert_allclose(marginal_log_prob(gmm, x, 0.0),
                                   mvn.logpdf(x, np.zeros(3), np.eye(3)), rtol=1e-10)
        np.testing.assert_allclose(marginal_score(gmm, x, 0.0), -x, atol=1e-12)


@pytest.mark.parametrize("ab", ALPHA_BARS)
def test_score_matches_autodiff_and_finite_differences(params, gmm, ab):
    grad_log_prob = jax.jit(jax.grad(marginal_log_prob, argnums=1))
    h = 1e-5
    for x in points(3):
        score = marginal_score(gmm, x, ab)
        np.testing.assert_allclose(score, grad_log_prob(gmm, x, ab), rtol=1e-9, atol=1e-11)
        fd = [(ref_log_prob(params, x + h * e, ab) - ref_log_prob(params, x - h * e, ab)) / (2 * h)
              for e in np.eye(3)]
        np.testing.assert_allclose(score, fd, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("ab", [0.0, 0.3, 1.0])
def test_responsibilities_match_scipy(params, gmm, ab):
    for x in points(3):
        logs = ref_component_logpdfs(params, x, ab)
        expected = logs - logsumexp(logs)
        np.testing.assert_allclose(log_responsibilities(gmm, x, ab), expected,
                                   rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(responsibilities(gmm, x, ab), np.exp(expected), rtol=1e-10)


def test_denoiser_is_scaled_score_with_traced_timestep(gmm):
    """The timestep is traced; the mixture and the schedule are params, so another mixture of the
    same shapes reuses the compiled program."""
    alphas_cumprod = np.linspace(0.999, 0.01, 10)
    traces = []

    @jax.jit
    def eps(den, xs, t):
        traces.append(1)
        return jax.vmap(den, in_axes=(0, None))(xs, t)

    xs = points(3, num=5)
    for mixture in (gmm, gaussian_mixture(*random_params(2))):
        den = mixture_denoiser(mixture, alphas_cumprod)
        for t in (0, 4, 9):
            ab = alphas_cumprod[t]
            expected = np.stack([-np.sqrt(1 - ab) * marginal_score(mixture, x, ab) for x in xs])
            np.testing.assert_allclose(eps(den, xs, jnp.int32(t)), expected, rtol=1e-10, atol=1e-12)
    assert len(traces) == 1


@pytest.mark.parametrize("ab", [1e-3, 0.3, 0.9, 1.0])
def test_posterior_mean_is_tweedie_and_component_sum(gmm, ab):
    for x in points(3):
        tweedie = (x + (1 - ab) * np.asarray(marginal_score(gmm, x, ab))) / np.sqrt(ab)
        means, _ = component_x0_posterior(gmm, x, ab)
        component_sum = np.asarray(responsibilities(gmm, x, ab)) @ np.asarray(means)
        mean = posterior_mean_x0(gmm, x, ab)
        np.testing.assert_allclose(mean, tweedie, rtol=1e-8, atol=1e-8)
        np.testing.assert_allclose(mean, component_sum, rtol=1e-12, atol=1e-12)


def test_posterior_mean_is_finite_at_both_ends(params, gmm):
    weights, means, _ = params
    x = points(3)[0]
    np.testing.assert_allclose(posterior_mean_x0(gmm, x, 0.0), weights @ means / weights.sum(),
                               rtol=1e-12)
    np.testing.assert_allclose(posterior_mean_x0(gmm, x, 1.0), x, rtol=1e-12)


@pytest.mark.parametrize("ab", [0.05, 0.5, 0.95])
def test_component_posterior_matches_joint_conditioning(params, gmm, ab):
    _, means, covs = params
    for x in points(3, num=2):
        post_means, post_eigvals = component_x0_posterior(gmm, x, ab)
        post_covs = covs_of(GaussianMixture(gmm.log_weights, post_means, gmm.eigvecs, post_eigvals))
        for k in range(3):
            ref_mean, ref_cov = ref_x0_posterior_joint(means[k], covs[k], x, ab)
            np.testing.assert_allclose(post_means[k], ref_mean, rtol=1e-9, atol=1e-10)
            np.testing.assert_allclose(post_covs[k], ref_cov, rtol=1e-9, atol=1e-10)


def test_component_posterior_endpoints_and_mixture(params, gmm):
    _, means, _ = params
    x = points(3)[0]
    post_means, post_eigvals = component_x0_posterior(gmm, x, 1.0)
    np.testing.assert_allclose(post_means, np.broadcast_to(x, (3, 3)), rtol=1e-12)
    np.testing.assert_array_equal(post_eigvals, 0.0)
    post_means, post_eigvals = component_x0_posterior(gmm, x, 0.0)
    np.testing.assert_allclose(post_means, means, rtol=1e-12)
    np.testing.assert_allclose(post_eigvals, gmm.eigvals, rtol=1e-12)
    mixture = x0_posterior(gmm, x, 0.4)
    np.testing.assert_allclose(mixture.log_weights, log_responsibilities(gmm, x, 0.4))
    np.testing.assert_allclose(mixture.means, component_x0_posterior(gmm, x, 0.4)[0])


def test_sample_mixture_moments_and_determinism(params, gmm):
    weights, means, covs = params
    p = weights / weights.sum()
    key = jax.random.PRNGKey(3)
    samples = np.asarray(sample_mixture(key, gmm, 40_000))
    assert samples.shape == (40_000, 3)
    np.testing.assert_array_equal(samples, sample_mixture(key, gmm, 40_000))
    mean = p @ means
    second_moment = np.einsum("k,kij->ij", p, covs + np.einsum("ki,kj->kij", means, means))
    cov = second_moment - np.outer(mean, mean)
    se = np.sqrt(np.diag(cov) / samples.shape[0])
    np.testing.assert_array_less(np.abs(samples.mean(0) - mean), 5 * se)
    np.testing.assert_allclose(np.cov(samples.T), cov, atol=0.05 * np.abs(cov).max())


@pytest.mark.parametrize("sigma", [0.3, np.array([0.2, 0.5])])
def test_condition_on_linear_matches_numpy_bayes(params, gmm, sigma):
    rng = np.random.default_rng(5)
    A = rng.normal(size=(2, 3))
    y = rng.normal(size=2)
    posterior = condition_on_linear(gmm, A, y, sigma)
    ref_log_w, ref_means, ref_covs = ref_condition(params, A, y, sigma)
    np.testing.assert_allclose(posterior.log_weights, ref_log_w, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(posterior.means, ref_means, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(covs_of(posterior), ref_covs, rtol=1e-9, atol=1e-10)
    assert np.all(np.asarray(posterior.eigvals) > 0)
    weights, means, covs = params
    noise = np.diag(np.broadcast_to(sigma, (2,)) ** 2)
    expected = [mvn.logpdf(y, A @ m, A @ c @ A.T + noise) for m, c in zip(means, covs)]
    np.testing.assert_allclose(linear_log_evidence(gmm, A, y, sigma), expected, rtol=1e-10)


def test_sequential_conditioning_equals_stacked_rows(gmm):
    rng = np.random.default_rng(6)
    A1, A2 = rng.normal(size=(1, 3)), rng.normal(size=(2, 3))
    y1, y2 = rng.normal(size=1), rng.normal(size=2)
    sequential = condition_on_linear(condition_on_linear(gmm, A1, y1, 0.3), A2, y2, 0.6)
    stacked = condition_on_linear(gmm, np.vstack([A1, A2]), np.r_[y1, y2],
                                  np.array([0.3, 0.6, 0.6]))
    np.testing.assert_allclose(sequential.log_weights, stacked.log_weights, atol=1e-10)
    np.testing.assert_allclose(sequential.means, stacked.means, atol=1e-10)
    np.testing.assert_allclose(covs_of(sequential), covs_of(stacked), atol=1e-10)


def test_conditioning_matches_importance_weighted_prior_samples():
    weights, means, covs = random_params(7, num=3, dim=2)
    gmm = gaussian_mixture(weights, means, covs)
    A, y, sigma = np.array([[1.0, -0.5]]), np.array([0.8]), 0.4
    posterior = condition_on_linear(gmm, A, y, sigma)
    samples = np.asarray(sample_mixture(jax.random.PRNGKey(8), gmm, 50_000))
    log_lik = -0.5 * ((y - samples @ A.T) ** 2).sum(1) / sigma ** 2
    w = np.exp(log_lik - log_lik.max())
    w /= w.sum()
    ess = 1.0 / np.sum(w ** 2)
    mc_mean = w @ samples
    p = np.exp(np.asarray(posterior.log_weights))
    post_mean = p @ np.asarray(posterior.means)
    post_var = p @ (np.einsum("kii->ki", covs_of(posterior)) + np.asarray(posterior.means) ** 2) \
        - post_mean ** 2
    assert ess > 1000
    np.testing.assert_array_less(np.abs(mc_mean - post_mean), 5 * np.sqrt(post_var / ess))


def test_select_component(params, gmm):
    _, means, covs = params
    single = select_component(gmm, 2)
    np.testing.assert_array_equal(single.log_weights, [0.0])
    np.testing.assert_allclose(single.means, means[2:3])
    np.testing.assert_allclose(covs_of(single), covs[2:3], atol=1e-12)
    with pytest.raises(ValueError, match="select_component: k"):
        select_component(gmm, 3)


@pytest.mark.parametrize("A, y, sigma, match", [
    (np.ones((2, 4)), np.ones(2), 0.1, "A must have shape"),
    (np.ones(3), np.ones(1), 0.1, "A must have shape"),
    (np.ones((2, 3)), np.ones(3), 0.1, "y must have shape"),
    (np.ones((2, 3)), np.ones(2), 0.0, "sigma must be positive"),
    (np.ones((2, 3)), np.ones(2), np.ones(3), "sigma must be a scalar or one std per row"),
])
def test_linear_validation(gmm, A, y, sigma, match):
    with pytest.raises(ValueError, match=match):
        condition_on_linear(gmm, A, y, sigma)


def test_point_and_schedule_validation(gmm):
    with pytest.raises(ValueError, match="x must be one sample of shape"):
        marginal_score(gmm, np.ones((2, 3)), 0.5)
    with pytest.raises(ValueError, match=r"alpha_bar must lie in \[0, 1\]"):
        marginal_log_prob(gmm, np.ones(3), 1.5)
    with pytest.raises(ValueError, match="alpha_bar must be a scalar"):
        posterior_mean_x0(gmm, np.ones(3), np.ones(2))
    with pytest.raises(ValueError, match="mixture_denoiser: alphas_cumprod must have shape"):
        mixture_denoiser(gmm, np.ones((2, 2)))
    with pytest.raises(ValueError, match="n must be a static integer"):
        sample_mixture(jax.random.PRNGKey(0), gmm, 2.5)


def test_batched_jit_matches_single_calls(gmm):
    xs = points(3, num=6)
    abs_ = np.linspace(0.0, 1.0, 6)
    batched = jax.jit(jax.vmap(marginal_score, in_axes=(None, 0, 0)))(gmm, xs, abs_)
    for x, ab, row in zip(xs, abs_, batched):
        np.testing.assert_allclose(row, marginal_score(gmm, x, ab), rtol=1e-12, atol=1e-12)
