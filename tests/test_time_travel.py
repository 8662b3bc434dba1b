"""Time-travel (FreeDoM's repeated steps): the re-noising is the exact forward transition."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zmagic_jax as zm
from tests.conftest import gaussian_denoiser

SCHEDULE = zm.linear_schedule()
MEAN, VAR = np.array([0.5, -0.5, 0.0]), np.array([0.4, 0.6, 0.3])
DEN = gaussian_denoiser(SCHEDULE, MEAN, VAR)
POSTERIOR = zm.ddpm_posterior()


def left(target, x0):
    return jnp.sum((x0[:2] - target) ** 2)


def right(target, x0):
    return jnp.sum((x0[1:] + target) ** 2)


COND = zm.condition("left", left, zm.freedom_rule(0.5, stop=100), 0.3)
OTHER = zm.condition("right", right, zm.norm_relative_rule(0.05), 0.2)


def _sample(key, x_T, grid, scheme=None, sampler=POSTERIOR, **kw):
    return zm.sample(key, x_T, SCHEDULE, grid, denoiser=DEN, scheme=scheme, sampler=sampler, **kw)


@pytest.mark.parametrize("scheme", [zm.none([COND]), zm.independent([COND]), zm.dependent([COND]),
                                    zm.dependent([COND, OTHER]), zm.multi([COND, OTHER])],
                         ids=lambda s: f"{s.name}{len(s.conditions)}")
def test_one_repeat_is_plain_sampling(scheme):
    grid = zm.timestep_grid(1000, 20)
    x_T = jax.random.normal(jax.random.PRNGKey(0), (4, 3))
    a = _sample(jax.random.PRNGKey(1), x_T, grid, scheme)
    b = _sample(jax.random.PRNGKey(1), x_T, grid, scheme, time_travel=zm.time_travel(1))
    np.testing.assert_array_equal(np.asarray(a.x0), np.asarray(b.x0))
    np.testing.assert_array_equal(np.asarray(a.trace.energies), np.asarray(b.trace.energies))
    c = _sample(jax.random.PRNGKey(1), x_T, grid, scheme, time_travel=zm.time_travel(3, start=600, stop=200))
    assert np.all(np.isfinite(np.asarray(c.x0))) and not np.array_equal(np.asarray(a.x0), np.asarray(c.x0))
    assert np.asarray(c.finite).all() and np.asarray(c.trace.finite).all()


def test_matches_a_python_loop_of_step_and_renoise():
    """Repeats happen exactly inside ``stop < t <= start``, re-noise with ``sqrt(ab_t / ab_next)``
    and draw pass ``r``'s keys from ``split(fold_in(step_key, r))``; the recorded info is the last pass's."""
    grid = zm.timestep_grid(1000, 10)
    scheme = zm.independent([COND])
    tt = zm.time_travel(3, start=700, stop=300)
    x_T = jax.random.normal(jax.random.PRNGKey(0), (2, 3))
    key = jax.random.PRNGKey(5)
    out = _sample(key, x_T, grid, scheme, time_travel=tt)

    step = jax.jit(zm.step)
    passes = 0
    for b, sample_key in enumerate(jax.random.split(key, 2)):
        x = x_T[b]
        for i in range(grid.num_steps):
            ctx = zm.step_context(SCHEDULE, grid, i)
            k = jax.random.fold_in(sample_key, i)
            x_next, info = step(k, x, ctx, denoiser=DEN, scheme=scheme, sampler=POSTERIOR)
            repeats = 3 if 300 < int(grid.t[i]) <= 700 else 1
            for r in range(1, repeats):
                noise_key, step_key = jax.random.split(jax.random.fold_in(k, r))
                a = ctx.alpha_bar / ctx.alpha_bar_next
                x_t = jnp.sqrt(a) * x_next + jnp.sqrt(1 - a) * jax.random.normal(noise_key, (3,))
                x_next, info = step(step_key, x_t, ctx, denoiser=DEN, scheme=scheme, sampler=POSTERIOR)
                passes += 1
            np.testing.assert_allclose(out.trace.energies[b, i], info.energies, rtol=1e-5, atol=1e-5)
            x = x_next
        np.testing.assert_allclose(out.x0[b], x, rtol=1e-5, atol=1e-5)
    assert passes == 2 * 2 * 4  # 2 samples, 4 steps in the window (t = 700, 600, 500, 400), 2 extra passes
    assert out.trace.energies.shape == (2, 10, 1)


def test_repeats_keep_the_exact_marginals_of_a_gaussian_prior():
    """With the exact denoiser of a Gaussian prior, step-then-re-noise maps p_t to p_t; so heavy
    time-travel must leave the final distribution where plain sampling puts it (a wrong re-noising
    coefficient shifts the variance by far more than the tolerance)."""
    grid = zm.timestep_grid(1000, 200)
    x_T = jax.random.normal(jax.random.PRNGKey(0), (6000, 3))
    runs = [_sample(jax.random.PRNGKey(2), x_T, grid, sampler=zm.ddpm_ancestral(), time_travel=tt).x0
            for tt in (None, zm.time_travel(4, start=900, stop=100))]
    for x in runs:
        np.testing.assert_allclose(np.mean(x, 0), MEAN, atol=0.04)
        np.testing.assert_allclose(np.var(x, 0), VAR, rtol=0.08)
    np.testing.assert_allclose(np.var(runs[1], 0), np.var(runs[0], 0), rtol=0.08)
