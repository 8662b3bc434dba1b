"""Time-travel (FreeDoM's repeated steps): the re-noising is the exact forward transition."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zmagic_jax as zm
from tests.conftest import gaussian_eps_fn

SCHEDULE = zm.linear_schedule()
MEAN, VAR = jnp.array([0.5, -0.5, 0.0]), jnp.array([0.4, 0.6, 0.3])
EPS = gaussian_eps_fn(SCHEDULE, MEAN, VAR)
COND = zm.condition("left", lambda x0: jnp.sum((x0[:2] - 0.3) ** 2), zm.freedom_rule(0.5, stop=100))


OTHER = zm.condition("right", lambda x0: jnp.sum((x0[1:] + 0.2) ** 2), zm.norm_relative_rule(0.05))


@pytest.mark.parametrize("scheme", [zm.none([COND]), zm.independent([COND]), zm.dependent([COND]),
                                    zm.dependent([COND, OTHER]), zm.multi([COND, OTHER])], ids=lambda s: s.name)
def test_one_repeat_is_plain_sampling(scheme):
    grid = zm.timestep_grid(1000, 20)
    x_T = jax.random.normal(jax.random.PRNGKey(0), (4, 3))
    a, ta = zm.sample(jax.random.PRNGKey(1), x_T, EPS, SCHEDULE, grid, scheme, "ddpm_posterior")
    b, tb = zm.sample(jax.random.PRNGKey(1), x_T, EPS, SCHEDULE, grid, scheme, "ddpm_posterior",
                      time_travel=zm.time_travel(1))
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(ta.energies), np.asarray(tb.energies))
    c, tc = zm.sample(jax.random.PRNGKey(1), x_T, EPS, SCHEDULE, grid, scheme, "ddpm_posterior",
                      time_travel=zm.time_travel(3, start=600, stop=200))
    assert np.all(np.isfinite(np.asarray(c))) and not np.array_equal(np.asarray(a), np.asarray(c))
    assert np.asarray(tc.finite).all()


def test_matches_a_python_loop_of_step_and_renoise():
    """Repeats happen exactly inside ``stop < t <= start``, re-noise with ``sqrt(ab_t / ab_next)``
    and draw pass ``r``'s keys from ``split(fold_in(step_key, r))``."""
    grid = zm.timestep_grid(1000, 10)
    sampler = zm.sampler_by_name("ddpm_posterior")
    scheme = zm.independent([COND])
    tt = zm.time_travel(3, start=700, stop=300)
    x_T = jax.random.normal(jax.random.PRNGKey(0), (2, 3))
    key = jax.random.PRNGKey(5)
    got, trace = zm.sample(key, x_T, EPS, SCHEDULE, grid, scheme, sampler, time_travel=tt)

    step = jax.jit(zm.guided_kernel(EPS, sampler, scheme))
    contexts = zm.step_contexts(SCHEDULE, grid)
    passes = 0
    for b, sample_key in enumerate(jax.random.split(key, 2)):
        x = x_T[b]
        for i in range(grid.num_steps):
            ctx = jax.tree_util.tree_map(lambda v: v[i], contexts)
            k = jax.random.fold_in(sample_key, i)
            x_next, _ = step(k, x, ctx)
            repeats = 3 if 300 < int(grid.t[i]) <= 700 else 1
            for r in range(1, repeats):
                noise_key, step_key = jax.random.split(jax.random.fold_in(k, r))
                a = ctx.alpha_bar / ctx.alpha_bar_next
                x_t = jnp.sqrt(a) * x_next + jnp.sqrt(1 - a) * jax.random.normal(noise_key, (3,))
                x_next, _ = step(step_key, x_t, ctx)
                passes += 1
            x = x_next
        np.testing.assert_allclose(got[b], x, rtol=1e-5, atol=1e-5)
    assert passes == 2 * 2 * 4  # 2 samples, 4 steps in the window (t = 700, 600, 500, 400), 2 extra passes
    assert trace.energies.shape == (2, 10, 1)


def test_repeats_keep_the_exact_marginals_of_a_gaussian_prior():
    """With the exact denoiser of a Gaussian prior, step-then-re-noise maps p_t to p_t; so heavy
    time-travel must leave the final distribution where plain sampling puts it (a wrong re-noising
    coefficient shifts the variance by far more than the tolerance)."""
    grid = zm.timestep_grid(1000, 200)
    x_T = jax.random.normal(jax.random.PRNGKey(0), (6000, 3))
    runs = [zm.sample(jax.random.PRNGKey(2), x_T, EPS, SCHEDULE, grid, None, "ddpm_ancestral", time_travel=tt)[0]
            for tt in (None, zm.time_travel(4, start=900, stop=100))]
    for x in runs:
        np.testing.assert_allclose(np.mean(x, 0), MEAN, atol=0.04)
        np.testing.assert_allclose(np.var(x, 0), VAR, rtol=0.08)
    np.testing.assert_allclose(np.var(runs[1], 0), np.var(runs[0], 0), rtol=0.08)
