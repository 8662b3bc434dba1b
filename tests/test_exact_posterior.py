"""Guidance with the exact likelihood gradient samples the closed-form posterior (Gaussian prior,
linear-Gaussian measurement): the whole chain (schedule, sampler, score rule, scheme) is exact."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zmagic_jax as zm
from tests.conftest import gaussian_denoiser

MEAN = np.array([0.8, -0.4, 0.3])
VAR = np.array([0.5, 0.3, 0.8])
A = np.array([[1.0, 1.0, 0.0], [0.0, 1.0, -1.0]])
NOISE = 0.3
Y = np.array([0.9, 0.6])


def exact_measurement_nll(params, x_t, ab):
    """-log p(y | x_t): x0 | x_t is Gaussian, so y | x_t is Gaussian (closed form)."""
    mean, var, a, noise, y = params
    gain = jnp.sqrt(ab) * var / (ab * var + 1.0 - ab)
    m_t = mean + gain * (x_t - jnp.sqrt(ab) * mean)
    c_t = var * (1.0 - ab) / (ab * var + 1.0 - ab)
    cov = (a * c_t) @ a.T + noise ** 2 * jnp.eye(2)
    r = y - a @ m_t
    return 0.5 * r @ jnp.linalg.solve(cov, r) + 0.5 * jnp.linalg.slogdet(cov)[1]


def closed_form_posterior():
    precision = np.diag(1 / VAR) + A.T @ A / NOISE ** 2
    cov = np.linalg.inv(precision)
    return cov @ (MEAN / VAR + A.T @ Y / NOISE ** 2), cov


@pytest.mark.parametrize("sampler", [zm.ddpm_ancestral(), zm.ddpm_posterior(), zm.predictor_corrector()],
                         ids=lambda s: s.name)
def test_exact_likelihood_guidance_matches_closed_form_posterior(sampler):
    schedule = zm.linear_schedule()
    grid = zm.timestep_grid(1000, 1000)
    params = tuple(jnp.asarray(v, jnp.float32) for v in (MEAN, VAR, A, NOISE, Y))
    cond = zm.condition("y", exact_measurement_nll, zm.score_rule(), params, noise_aware=True)
    n = 4000
    x_T = jax.random.normal(jax.random.PRNGKey(0), (n, 3))
    x0 = zm.sample(jax.random.PRNGKey(1), x_T, schedule, grid, denoiser=gaussian_denoiser(schedule, MEAN, VAR),
                   scheme=zm.independent([cond]), sampler=sampler).x0
    x0 = np.asarray(x0, np.float64)
    mean, cov = closed_form_posterior()
    se = np.sqrt(np.diag(cov) / n)
    assert np.all(np.abs(x0.mean(0) - mean) < 4 * se), (x0.mean(0), mean)
    emp = np.cov(x0.T)
    # sample covariance: relative standard error ~ sqrt(2/n) ~ 2.2 %; allow discretisation bias too
    np.testing.assert_allclose(emp, cov, atol=0.08 * np.abs(cov).max())
    # and it is far from the prior, so the check has teeth
    assert np.abs(x0.mean(0) - MEAN).max() > 20 * se.max()
