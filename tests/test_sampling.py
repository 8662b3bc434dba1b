"""The driver: reproducibility, no retracing, debug loop, and clear errors at the edge."""
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zmagic_jax as zm
from tests.conftest import gaussian_eps_fn

SCHEDULE = zm.linear_schedule()
EPS = gaussian_eps_fn(SCHEDULE, jnp.array([0.5, -0.5, 0.0]), jnp.array([0.4, 0.6, 0.3]))
C1 = zm.condition("left", lambda x0: jnp.sum((x0[:2] - 0.3) ** 2), zm.freedom_rule(0.5, stop=100))
C2 = zm.condition("right", lambda x0: jnp.sum((x0[1:] + 0.2) ** 2), zm.norm_relative_rule(0.05))
SCHEMES = [zm.none([C1, C2]), zm.independent([C1, C2]), zm.dependent([C1, C2]), zm.dependent([C2]),
           zm.multi([C1, C2])]


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: s.name)
def test_same_key_same_bits(scheme):
    grid = zm.timestep_grid(1000, 20)
    x_T = jax.random.normal(jax.random.PRNGKey(0), (8, 3))
    a, ta = zm.sample(jax.random.PRNGKey(7), x_T, EPS, SCHEDULE, grid, scheme, "ddpm_posterior")
    b, tb = zm.sample(jax.random.PRNGKey(7), x_T, EPS, SCHEDULE, grid, scheme, "ddpm_posterior")
    c, _ = zm.sample(jax.random.PRNGKey(8), x_T, EPS, SCHEDULE, grid, scheme, "ddpm_posterior")
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(ta.energies), np.asarray(tb.energies))
    assert not np.array_equal(np.asarray(a), np.asarray(c))
    assert ta.energies.shape == (8, 20, len(scheme.conditions))


def test_guidance_window_and_records():
    grid = zm.timestep_grid(1000, 20)
    x_T = jax.random.normal(jax.random.PRNGKey(0), (4, 3))
    early = zm.condition("early", C1.energy, zm.freedom_rule(0.5, start=600, stop=300))
    _, trace = zm.sample(jax.random.PRNGKey(1), x_T, EPS, SCHEDULE, grid, zm.independent([early]), "ddim")
    guided = np.asarray(trace.guided[0])
    np.testing.assert_array_equal(guided, (grid.t <= 600) & (grid.t > 300))
    assert np.all(np.asarray(trace.displacement_norms)[:, ~guided] == 0)
    assert np.all(np.asarray(trace.displacement_norms)[:, guided] > 0)
    x0, states = zm.sample(jax.random.PRNGKey(1), x_T, EPS, SCHEDULE, grid, zm.independent([early]), "ddim",
                           record=lambda x, info: x)
    assert states.shape == (4, 20, 3)
    np.testing.assert_allclose(states[:, -1], x0)


def test_compile_does_not_grow_with_steps():
    traces = []

    def counting_eps(x, t):
        traces.append(1)
        return EPS(x, t)

    x_T = jax.random.normal(jax.random.PRNGKey(0), (2, 3))
    counts = []
    for steps in (10, 100):
        traces.clear()
        scheme = zm.dependent([C1, C2])
        zm.sample(jax.random.PRNGKey(1), x_T, counting_eps, SCHEDULE, zm.timestep_grid(1000, steps), scheme)
        counts.append(len(traces))
    # the step body is traced a fixed number of times (shape check + scan body), whatever the steps
    assert 0 < counts[1] <= counts[0] < 10, counts
    traces.clear()
    zm.sample(jax.random.PRNGKey(2), x_T, counting_eps, SCHEDULE, zm.timestep_grid(1000, 100), scheme)
    assert len(traces) <= 1  # same shapes and objects: the compiled run is reused (only shape checks trace)


def test_debug_loop_matches_scan():
    grid = zm.timestep_grid(1000, 4)
    x_T = jax.random.normal(jax.random.PRNGKey(0), (3, 3))
    scheme = zm.dependent([C1, C2])
    a, ta = zm.sample(jax.random.PRNGKey(1), x_T, EPS, SCHEDULE, grid, scheme, "ddpm_ancestral")
    b, tb = zm.sample(jax.random.PRNGKey(1), x_T, EPS, SCHEDULE, grid, scheme, "ddpm_ancestral", debug_loop=True)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(ta.energies, tb.energies, rtol=1e-4, atol=1e-5)


def test_non_finite_energy_raises_naming_the_condition():
    bad = zm.condition("logzero", lambda x0: jnp.log(jnp.minimum(x0[0], 0.0) * 0.0), zm.freedom_rule(1.0))
    x_T = jax.random.normal(jax.random.PRNGKey(0), (2, 3))
    grid = zm.timestep_grid(1000, 5)
    with pytest.raises(FloatingPointError, match="logzero"):
        zm.sample(jax.random.PRNGKey(1), x_T, EPS, SCHEDULE, grid, zm.independent([C1, bad]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        x0, trace = zm.sample(jax.random.PRNGKey(1), x_T, EPS, SCHEDULE, grid, zm.dependent([C1, bad]),
                              nan_policy="skip")
    assert any("logzero" in str(w.message) for w in caught)
    assert np.all(np.isfinite(np.asarray(x0)))  # the poisoned guidance was dropped, not applied
    assert not np.asarray(trace.finite)[..., 1].any()


@pytest.mark.parametrize("call,word", [
    (lambda g, x: zm.sample(jax.random.PRNGKey(0), x[0], EPS, SCHEDULE, g), "batch"),
    (lambda g, x: zm.sample(jax.random.PRNGKey(0), x[:, :2], EPS, SCHEDULE, g), "eps_fn"),
    (lambda g, x: zm.sample(jax.random.PRNGKey(0), x, EPS, SCHEDULE, g, sampler="heun"), "heun"),
    (lambda g, x: zm.sample(jax.random.PRNGKey(0), x, EPS, SCHEDULE, g, scheme="dependent"), "scheme"),
    (lambda g, x: zm.scheme_by_name("zigzag", [C1]), "zigzag"),
    (lambda g, x: zm.independent([]), "at least 1"),
    (lambda g, x: zm.dependent([C1, C2, C1._replace(name="c3")]), "1 or 2"),
    (lambda g, x: zm.dependent([C1], order=(1, 0)), "order"),
    (lambda g, x: zm.dependent([C1, C2], order=(0, 0)), "order"),
    (lambda g, x: zm.multi([C1, C2], rescale="twice"), "rescale"),
    (lambda g, x: zm.sample(jax.random.PRNGKey(0), x, EPS, SCHEDULE, g, zm.independent([
        zm.condition("w", C1.energy, zm.freedom_rule(1.0, start=5, stop=2))])), "window"),
    (lambda g, x: zm.sample(jax.random.PRNGKey(0), x, EPS, SCHEDULE, g, zm.independent([
        zm.condition("vec", lambda x0: x0, zm.freedom_rule(1.0))])), "vec"),
    (lambda g, x: zm.sample(jax.random.PRNGKey(0), x, EPS, SCHEDULE, g, zm.independent([
        zm.condition("sched", C1.energy, zm.schedule_rule([1.0, 2.0]))])), "rhos"),
    (lambda g, x: zm.sample(jax.random.PRNGKey(0), x, EPS, zm.linear_schedule(100), g), "grid"),
    (lambda g, x: zm.sample(jax.random.PRNGKey(0), x, EPS, SCHEDULE, g, nan_policy="ignore"), "nan_policy"),
    (lambda g, x: zm.condition("", C1.energy, C1.rule), "name"),
    (lambda g, x: zm.condition("r", C1.energy, 0.5), "rule"),
    (lambda g, x: zm.time_travel(0), "repeats"),
    (lambda g, x: zm.time_travel(2, start=100, stop=200), "window"),
    (lambda g, x: zm.sample(jax.random.PRNGKey(0), x, EPS, SCHEDULE, g, time_travel=3), "time_travel"),
    (lambda g, x: zm.sample(jax.random.PRNGKey(0), x, EPS, SCHEDULE, g,
                            time_travel=zm.time_travel(2, start=5, stop=1)), "time_travel"),
    (lambda g, x: zm.cfg_relative_rule(-1.0, lambda x, t: x), "factor"),
    (lambda g, x: zm.cfg_relative_rule(0.2, None), "correction_fn"),
])
def test_bad_input_names_the_argument(call, word):
    grid = zm.timestep_grid(1000, 10)
    x = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match=word):
        call(grid, x)
