import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zmagic_jax as zm
from zmagic_jax.geometry import orthonormal_plane
from tests.conftest import gaussian_eps_fn

SCHEDULE = zm.linear_schedule()
EPS = gaussian_eps_fn(SCHEDULE, jnp.array([0.5, -0.5, 0.0]), jnp.array([0.4, 0.6, 0.3]))
C1 = zm.condition("a", lambda x0: jnp.sum((x0[:2] - 0.3) ** 2), zm.score_rule())
C2 = zm.condition("b", lambda x0: jnp.sum(jnp.sin(x0)), zm.score_rule())


def test_landscape_matches_direct_evaluation():
    x = jnp.array([0.2, -0.1, 0.4])
    u, v = jnp.array([1.0, 1.0, 0.0]), jnp.array([0.0, 1.0, 2.0])
    coords, energies = zm.loss_landscape(EPS, [C1, C2], x, 300, SCHEDULE.alphas_cumprod[300], u, v, 0.5, 5)
    pu, pv = orthonormal_plane(u, v)
    assert abs(float(jnp.dot(pu, pv))) < 1e-6 and float(jnp.linalg.norm(pv)) == pytest.approx(1.0, abs=1e-6)
    ab = SCHEDULE.alphas_cumprod[300]
    for i, j in [(0, 0), (1, 3), (4, 2)]:
        y = x + coords[i] * pu + coords[j] * pv
        x0 = zm.x0_from_eps(y, EPS(y, 300), ab)
        np.testing.assert_allclose(energies[i, j], [C1.energy(x0), C2.energy(x0)], rtol=1e-5)


def test_parallel_directions_still_give_a_plane():
    u = jnp.array([1.0, 0.0, 0.0])
    pu, pv = orthonormal_plane(u, 2 * u)
    assert abs(float(jnp.dot(pu, pv))) < 1e-6


def test_cosine_and_energy_summaries_follow_the_trace():
    grid = zm.timestep_grid(1000, 10)
    x_T = jax.random.normal(jax.random.PRNGKey(0), (6, 3))
    late = zm.condition("late", C1.energy, zm.score_rule(stop=500))
    _, trace = zm.sample(jax.random.PRNGKey(1), x_T, EPS, SCHEDULE, grid, zm.independent([late, C2]))
    cos = zm.guided_cosines(trace)
    assert np.all(np.isfinite(cos))  # C2 is active at every step
    _, unguided = zm.sample(jax.random.PRNGKey(1), x_T, EPS, SCHEDULE, grid, zm.none([late, C2]))
    assert np.isnan(zm.mean_guided_cosine(unguided))
    assert np.all(np.isnan(zm.guided_cosines(unguided)))
    np.testing.assert_allclose(zm.energy_curves(trace, "mean"), np.asarray(trace.energies).mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(zm.energy_curves(trace), np.median(np.asarray(trace.energies), 0), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="reduce"):
        zm.energy_curves(trace, "max")
