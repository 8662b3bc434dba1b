"""Samplers: exact coefficients, prior reproduction, DDIM inversion."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zmagic_jax as zm
from zmagic_jax.metrics import energy_distance
from zmagic_jax.models import gaussian_mixture, mixture_denoiser, sample_mixture

SAMPLERS = [zm.ddpm_ancestral(), zm.ddpm_posterior(), zm.ddim(0.0), zm.ddim(0.7), zm.eta_mixing(0.5),
            zm.predictor_corrector()]


def _contexts(steps=50, dtype=jnp.float32):
    return zm.step_contexts(zm.linear_schedule(), zm.timestep_grid(1000, steps), dtype)


@pytest.mark.parametrize("sampler", SAMPLERS, ids=lambda s: s.label)
def test_score_coef_is_the_derivative_of_the_mean_in_the_score(x64, sampler):
    """Guidance g added to the score moves the mean by score_coef * g, at every step of the grid."""
    ctxs = _contexts(dtype=jnp.float64)
    x = jax.random.normal(jax.random.PRNGKey(0), (4,), jnp.float64)
    eps = jax.random.normal(jax.random.PRNGKey(1), (4,), jnp.float64)

    def check(ctx):
        def mean_of_score(s):
            return sampler.mean(x, zm.eps_from_score(s, ctx.alpha_bar), ctx)
        s0 = zm.score_from_eps(eps, ctx.alpha_bar)
        _, slope = jax.jvp(mean_of_score, (s0,), (jnp.ones_like(s0),))
        return slope, sampler.score_coef(ctx)

    slopes, coefs = jax.vmap(check)(ctxs)
    np.testing.assert_allclose(slopes, np.broadcast_to(np.asarray(coefs)[:, None], slopes.shape), rtol=1e-10)


def test_ddim_eta_one_is_the_ddpm_posterior_step():
    ctxs = _contexts()
    x = jax.random.normal(jax.random.PRNGKey(0), (6,))
    eps = jax.random.normal(jax.random.PRNGKey(1), (6,))
    a, b = zm.ddim(1.0), zm.ddpm_posterior()
    np.testing.assert_allclose(jax.vmap(lambda c: a.mean(x, eps, c))(ctxs),
                               jax.vmap(lambda c: b.mean(x, eps, c))(ctxs), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jax.vmap(a.noise_std)(ctxs), jax.vmap(b.noise_std)(ctxs), rtol=1e-5)


def test_ddpm_ancestral_is_the_papers_formula():
    ctx = jax.tree_util.tree_map(lambda a: a[10], _contexts())
    x = jnp.array([0.3, -1.2]); eps = jnp.array([0.5, 0.1])
    b = 1 - ctx.alpha_bar / ctx.alpha_bar_next
    score = -eps / jnp.sqrt(1 - ctx.alpha_bar)
    np.testing.assert_allclose(zm.ddpm_ancestral().mean(x, eps, ctx), (2 - jnp.sqrt(1 - b)) * x + b * score,
                               rtol=1e-6)
    np.testing.assert_allclose(zm.ddpm_ancestral().noise_std(ctx), jnp.sqrt(b), rtol=1e-6)


def test_last_step_lands_on_tweedie_estimate():
    ctx = jax.tree_util.tree_map(lambda a: a[-1], _contexts())
    assert int(ctx.t_next) == -1 and float(ctx.alpha_bar_next) == 1.0
    x = jnp.array([0.3, -1.2]); eps = jnp.array([0.5, 0.1])
    x0 = zm.x0_from_eps(x, eps, ctx.alpha_bar)
    for s in (zm.ddim(0.0), zm.ddpm_posterior(), zm.eta_mixing(0.5)):
        np.testing.assert_allclose(s.mean(x, eps, ctx), x0, rtol=1e-5)
        assert float(s.noise_std(ctx)) == 0.0


def _mixture():
    means = jnp.array([[1.5, 0.0, 0.5], [-1.0, 1.0, -0.5], [0.0, -1.5, 0.0]])
    covs = jnp.stack([jnp.diag(jnp.array(v)) for v in ([0.2, 0.1, 0.3], [0.15, 0.3, 0.1], [0.3, 0.1, 0.2])])
    return gaussian_mixture(jnp.array([0.5, 0.3, 0.2]), means, covs)


@pytest.mark.parametrize("sampler,steps", [(zm.ddpm_ancestral(), 1000), (zm.ddpm_posterior(), 250),
                                           (zm.ddim(0.0), 250), (zm.ddim(0.5), 250), (zm.eta_mixing(0.5), 250),
                                           (zm.predictor_corrector(), 1000)], ids=lambda v: getattr(v, "label", v))
def test_unguided_sampler_reproduces_the_mixture_prior(sampler, steps):
    gmm = _mixture()
    schedule = zm.linear_schedule()
    n = 3000
    x_T = jax.random.normal(jax.random.PRNGKey(0), (n, 3))
    x0 = zm.sample(jax.random.PRNGKey(1), x_T, schedule, zm.timestep_grid(1000, steps),
                   denoiser=mixture_denoiser(gmm, schedule.alphas_cumprod), sampler=sampler).x0
    exact = sample_mixture(jax.random.PRNGKey(2), gmm, n)
    same = sample_mixture(jax.random.PRNGKey(3), gmm, n)
    # Sample-size-aware: compare with the distance between two exact sample sets of the same size.
    noise_floor = float(energy_distance(exact, same))
    assert float(energy_distance(x0, exact)) < 3 * noise_floor + 2e-3
    mean = jnp.exp(gmm.log_weights) @ gmm.means
    se = np.sqrt(np.asarray(jnp.var(exact, 0)) / n)
    assert np.all(np.abs(np.asarray(x0.mean(0) - mean)) < 4 * se + 0.01)
    np.testing.assert_allclose(np.var(np.asarray(x0), 0), np.var(np.asarray(exact), 0), rtol=0.12)


def test_ddim_inversion_reconstructs():
    gmm = _mixture()
    schedule = zm.linear_schedule()
    grid = zm.timestep_grid(1000, 200)
    den = mixture_denoiser(gmm, schedule.alphas_cumprod)
    x0 = sample_mixture(jax.random.PRNGKey(4), gmm, 64)
    invert = jax.jit(jax.vmap(lambda d, x: zm.ddim_invert(x, schedule, grid, denoiser=d), in_axes=(None, 0)))
    latents = invert(den, x0)
    assert float(jnp.std(latents)) > 0.5  # it really went to the noise end
    recon = zm.sample(jax.random.PRNGKey(5), latents, schedule, grid, denoiser=den, sampler=zm.ddim(0.0)).x0
    err = jnp.linalg.norm(recon - x0, axis=-1) / jnp.linalg.norm(x0, axis=-1)
    assert float(jnp.median(err)) < 0.02 and float(jnp.max(err)) < 0.1, (jnp.median(err), jnp.max(err))
