import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zmagic_jax as zm
from zmagic_jax.geometry import orthonormal_plane
from tests.conftest import gaussian_denoiser

SCHEDULE = zm.linear_schedule()
DEN = gaussian_denoiser(SCHEDULE, [0.5, -0.5, 0.0], [0.4, 0.6, 0.3])


def near(target, x0):
    return jnp.sum((x0[:2] - target) ** 2)


def waves(params, x0):
    return jnp.sum(jnp.sin(x0))


C1 = zm.condition("a", near, zm.score_rule(), 0.3)
C2 = zm.condition("b", waves, zm.score_rule())


def test_landscape_matches_direct_evaluation():
    x = jnp.array([0.2, -0.1, 0.4])
    u, v = jnp.array([1.0, 1.0, 0.0]), jnp.array([0.0, 1.0, 2.0])
    ab = zm.alpha_bar(SCHEDULE, 300, x.dtype)
    coords, energies = zm.loss_landscape(x, 300, ab, u, v, conditions=[C1, C2], denoiser=DEN, extent=0.5, num=5)
    pu, pv = orthonormal_plane(u, v)
    assert abs(float(jnp.dot(pu, pv))) < 1e-6 and float(jnp.linalg.norm(pv)) == pytest.approx(1.0, abs=1e-6)
    for i, j in [(0, 0), (1, 3), (4, 2)]:
        y = x + coords[i] * pu + coords[j] * pv
        x0 = zm.x0_from_eps(y, DEN(y, 300), ab)
        np.testing.assert_allclose(energies[i, j], [C1.energy(C1.params, x0), C2.energy(C2.params, x0)], rtol=1e-5)


def test_parallel_directions_still_give_a_plane():
    u = jnp.array([1.0, 0.0, 0.0])
    pu, pv = orthonormal_plane(u, 2 * u)
    assert abs(float(jnp.dot(pu, pv))) < 1e-6


def test_cosine_and_energy_summaries_follow_the_trace():
    grid = zm.timestep_grid(1000, 10)
    x_T = jax.random.normal(jax.random.PRNGKey(0), (6, 3))
    late = zm.condition("late", near, zm.score_rule(stop=500), 0.3)
    run = lambda scheme: zm.sample(jax.random.PRNGKey(1), x_T, SCHEDULE, grid, denoiser=DEN, scheme=scheme).trace
    trace = run(zm.independent([late, C2]))
    guided = np.asarray(trace.guided)
    both = np.broadcast_to(grid.t > 500, guided.shape)
    assert guided.all()  # C2 is active at every step
    cos = zm.guided_cosines(trace, "conditions")
    assert np.all(np.isfinite(cos[both])) and np.all(np.isnan(cos[~both]))  # "late" only guides t > 500
    assert np.all(np.isnan(zm.guided_cosines(trace, "term2")))  # independent has no dependent pairs
    unguided = run(zm.none([late, C2]))
    for which in ("conditions", "term2"):
        assert np.isnan(zm.mean_guided_cosine(unguided, which))
        assert np.all(np.isnan(zm.guided_cosines(unguided, which)))
    with pytest.raises(ValueError, match="which"):
        zm.guided_cosines(trace, "angles")
    np.testing.assert_allclose(zm.energy_curves(trace, "mean"), np.asarray(trace.energies).mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(zm.energy_curves(trace), np.median(np.asarray(trace.energies), 0), rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="reduce"):
        zm.energy_curves(trace, "max")
