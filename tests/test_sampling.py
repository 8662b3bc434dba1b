"""The driver: reproducibility, no retracing, debug loop, NaN policy and clear errors at the edge."""
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zmagic_jax as zm
from tests.conftest import gaussian_denoiser

SCHEDULE = zm.linear_schedule()
DEN = gaussian_denoiser(SCHEDULE, [0.5, -0.5, 0.0], [0.4, 0.6, 0.3])


def left(target, x0):
    return jnp.sum((x0[:2] - target) ** 2)


def right(target, x0):
    return jnp.sum((x0[1:] + target) ** 2)


def log_zero(params, x0):
    return jnp.log(jnp.minimum(x0[0], 0.0) * 0.0)


C1 = zm.condition("left", left, zm.freedom_rule(0.5, stop=100), 0.3)
C2 = zm.condition("right", right, zm.norm_relative_rule(0.05), 0.2)
SCHEMES = [zm.none([C1, C2]), zm.independent([C1, C2]), zm.dependent([C1, C2]), zm.dependent([C2]),
           zm.multi([C1, C2])]
POSTERIOR = zm.ddpm_posterior()


def _sample(key, x_T, grid, scheme=None, sampler=POSTERIOR, **kw):
    return zm.sample(key, x_T, SCHEDULE, grid, denoiser=DEN, scheme=scheme, sampler=sampler, **kw)


@pytest.mark.parametrize("scheme", SCHEMES, ids=lambda s: f"{s.name}{len(s.conditions)}")
def test_same_key_same_bits(scheme):
    grid = zm.timestep_grid(1000, 20)
    x_T = jax.random.normal(jax.random.PRNGKey(0), (8, 3))
    a = _sample(jax.random.PRNGKey(7), x_T, grid, scheme)
    b = _sample(jax.random.PRNGKey(7), x_T, grid, scheme)
    c = _sample(jax.random.PRNGKey(8), x_T, grid, scheme)
    np.testing.assert_array_equal(np.asarray(a.x0), np.asarray(b.x0))
    np.testing.assert_array_equal(np.asarray(a.trace.energies), np.asarray(b.trace.energies))
    assert not np.array_equal(np.asarray(a.x0), np.asarray(c.x0))
    assert a.trace.energies.shape == (8, 20, len(scheme.conditions))
    assert a.finite.shape == (8, 20, len(scheme.conditions)) and bool(np.all(a.finite))


def test_guidance_window_and_records():
    grid = zm.timestep_grid(1000, 20)
    x_T = jax.random.normal(jax.random.PRNGKey(0), (4, 3))
    early = zm.condition("early", left, zm.freedom_rule(0.5, start=600, stop=300), 0.3)
    trace = _sample(jax.random.PRNGKey(1), x_T, grid, zm.independent([early]), zm.ddim()).trace
    guided = np.asarray(trace.guided[0])
    np.testing.assert_array_equal(guided, (grid.t <= 600) & (grid.t > 300))
    assert np.all(np.asarray(trace.displacement_norms)[:, ~guided] == 0)
    assert np.all(np.asarray(trace.displacement_norms)[:, guided] > 0)
    np.testing.assert_allclose(trace.displacement_norm, trace.displacement_norms[..., 0], rtol=1e-6)
    out = _sample(jax.random.PRNGKey(1), x_T, grid, zm.independent([early]), zm.ddim(), record=lambda x, info: x)
    assert out.trace.shape == (4, 20, 3)
    np.testing.assert_allclose(out.trace[:, -1], out.x0)
    assert out.finite.shape == (4, 20, 1)  # finite comes with every trace


def test_compile_does_not_grow_with_steps():
    traces = []

    def counting(params, x, t):
        traces.append(1)
        return DEN.apply(params, x, t)

    den = zm.Denoiser(counting, DEN.params)
    x_T = jax.random.normal(jax.random.PRNGKey(0), (2, 3))
    counts = []
    scheme = zm.dependent([C1, C2])
    for steps in (10, 100):
        traces.clear()
        zm.sample(jax.random.PRNGKey(1), x_T, SCHEDULE, zm.timestep_grid(1000, steps), denoiser=den, scheme=scheme)
        counts.append(len(traces))
    # the step body is traced a fixed number of times (shape check + scan body), whatever the steps
    assert 0 < counts[1] <= counts[0] < 10, counts
    traces.clear()
    zm.sample(jax.random.PRNGKey(2), x_T, SCHEDULE, zm.timestep_grid(1000, 100), denoiser=den, scheme=scheme)
    assert not traces  # same structure and shapes: the compiled run is reused, nothing is traced


def test_debug_loop_matches_scan():
    grid = zm.timestep_grid(1000, 2)
    x_T = jax.random.normal(jax.random.PRNGKey(0), (3, 3))
    scheme = zm.dependent([C1, C2])
    a = _sample(jax.random.PRNGKey(1), x_T, grid, scheme, zm.ddpm_ancestral())
    b = _sample(jax.random.PRNGKey(1), x_T, grid, scheme, zm.ddpm_ancestral(), debug_loop=True)
    np.testing.assert_allclose(a.x0, b.x0, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(a.trace.energies, b.trace.energies, rtol=1e-4, atol=1e-5)


def test_non_finite_energy_raises_naming_the_condition():
    bad = zm.condition("logzero", log_zero, zm.freedom_rule(1.0))
    x_T = jax.random.normal(jax.random.PRNGKey(0), (2, 3))
    grid = zm.timestep_grid(1000, 5)
    with pytest.raises(FloatingPointError, match="logzero"):
        _sample(jax.random.PRNGKey(1), x_T, grid, zm.independent([C1, bad]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = _sample(jax.random.PRNGKey(1), x_T, grid, zm.dependent([C1, bad]), nan_policy="skip")
    assert any("logzero" in str(w.message) for w in caught)
    assert np.all(np.isfinite(np.asarray(out.x0)))  # the poisoned guidance was dropped, not applied
    assert not np.asarray(out.finite)[..., 1].any()


def test_non_finite_energy_raises_under_an_outer_jit():
    bad = zm.condition("logzero", log_zero, zm.freedom_rule(1.0))
    grid = zm.timestep_grid(1000, 5)

    @jax.jit
    def run(x_T, scale):
        scheme = zm.independent([zm.condition("left", left, zm.freedom_rule(scale), 0.3), bad])
        return _sample(jax.random.PRNGKey(1), x_T, grid, scheme)

    with pytest.raises(Exception, match="logzero"):
        jax.block_until_ready(run(jnp.zeros((2, 3)), 0.5))

    @jax.jit
    def skip(x_T):
        out = _sample(jax.random.PRNGKey(1), x_T, grid, zm.independent([C1, bad]), nan_policy="skip")
        return jnp.all(out.finite, axis=(0, 1))

    np.testing.assert_array_equal(skip(jnp.zeros((2, 3))), [True, False])  # the documented mechanism


@pytest.mark.parametrize("call,word", [
    (lambda g, x: _sample(jax.random.PRNGKey(0), x[0], g), "batch"),
    (lambda g, x: _sample(jax.random.PRNGKey(0), x[:, :2], g), "denoiser"),
    (lambda g, x: _sample(jax.random.PRNGKey(0), x, g, sampler="heun"), "sampler"),
    (lambda g, x: _sample(jax.random.PRNGKey(0), x, g, scheme="dependent"), "scheme"),
    (lambda g, x: zm.sample(jax.random.PRNGKey(0), x, SCHEDULE, g, denoiser=DEN.apply), "Denoiser"),
    (lambda g, x: zm.sample(0, x, SCHEDULE, g, denoiser=DEN), "key"),
    (lambda g, x: zm.sample(jax.random.PRNGKey(0), x, g, SCHEDULE, denoiser=DEN), "schedule"),
    (lambda g, x: zm.independent([]), "at least 1"),
    (lambda g, x: zm.dependent([C1, C2, C1.replace(name="c3")]), "1 or 2"),
    (lambda g, x: zm.dependent([C1], order=(1, 0)), "order"),
    (lambda g, x: zm.dependent([C1, C2], order=(0, 0)), "order"),
    (lambda g, x: zm.multi([C1, C2], rescale="twice"), "rescale"),
    (lambda g, x: zm.multi([C1, C2], c=-1.0), "c"),
    (lambda g, x: _sample(jax.random.PRNGKey(0), x, g, zm.independent([
        zm.condition("w", left, zm.freedom_rule(1.0, start=5, stop=2), 0.3)])), "window"),
    (lambda g, x: _sample(jax.random.PRNGKey(0), x, g, zm.independent([
        zm.condition("vec", lambda p, x0: x0, zm.freedom_rule(1.0))])), "vec"),
    (lambda g, x: _sample(jax.random.PRNGKey(0), x, g, zm.independent([
        zm.condition("sched", left, zm.schedule_rule([1.0, 2.0]), 0.3)])), "rhos"),
    (lambda g, x: zm.sample(jax.random.PRNGKey(0), x, zm.linear_schedule(100), g, denoiser=DEN), "grid"),
    (lambda g, x: _sample(jax.random.PRNGKey(0), x, zm.TimestepGrid(np.array([900, 500]), np.array([500, -7])),
                          ), "t_next"),
    (lambda g, x: _sample(jax.random.PRNGKey(0), x, zm.TimestepGrid(np.array([900.0]), np.array([-1.0]))),
     "integer"),
    (lambda g, x: _sample(jax.random.PRNGKey(0), x, g, nan_policy="ignore"), "nan_policy"),
    (lambda g, x: zm.condition("", left, C1.rule), "name"),
    (lambda g, x: zm.condition("r", left, 0.5), "rule"),
    (lambda g, x: zm.condition("e", zm.Energy(left, 0.3), C1.rule, params=0.3), "params"),
    (lambda g, x: zm.freedom_rule(-1.0), "scale"),
    (lambda g, x: zm.freedom_rule(float("inf")), "scale"),
    (lambda g, x: zm.norm_relative_rule(float("nan")), "factor"),
    (lambda g, x: zm.ddim(1.5), "eta"),
    (lambda g, x: zm.time_travel(0), "repeats"),
    (lambda g, x: zm.time_travel(2, start=100, stop=200), "window"),
    (lambda g, x: _sample(jax.random.PRNGKey(0), x, g, time_travel=3), "time_travel"),
    (lambda g, x: _sample(jax.random.PRNGKey(0), x, g, time_travel=zm.time_travel(2, start=5, stop=1)),
     "time_travel"),
    (lambda g, x: zm.cfg_relative_rule(-1.0, DEN), "factor"),
    (lambda g, x: zm.cfg_relative_rule(0.2, lambda x, t: x), "correction"),
    (lambda g, x: zm.step_context(SCHEDULE, g, 10), "index"),
    (lambda g, x: zm.sample(jnp.array([0.0, 1.0]), x, SCHEDULE, g, denoiser=DEN), "key"),
    (lambda g, x: _sample(jax.random.PRNGKey(0), x, zm.TimestepGrid(np.array([], int), np.array([], int))), "length"),
    (lambda g, x: _sample(jax.random.PRNGKey(0), x, zm.TimestepGrid(np.array([900, 500]), np.array([500]))),
     "same length"),
    (lambda g, x: _sample(jax.random.PRNGKey(0), x.astype(jnp.float16), g), "x_T has dtype float16"),
    (lambda g, x: _sample(jax.random.PRNGKey(0), x.astype(jnp.bfloat16), g), "x_T has dtype bfloat16"),
    (lambda g, x: zm.sample(jax.random.PRNGKey(0), x, SCHEDULE, g, denoiser=zm.Denoiser(
        lambda p, x, t: (x * p).astype(jnp.float16), 1.0)), "returned float16 eps"),
    (lambda g, x: _sample(jax.random.PRNGKey(0), x, g, zm.independent([
        zm.condition("argmax", lambda p, x0: jnp.argmax(x0), zm.freedom_rule(1.0))])), "argmax"),
])
def test_bad_input_names_the_argument(call, word):
    grid = zm.timestep_grid(1000, 10)
    x = jnp.zeros((2, 3))
    with pytest.raises(ValueError, match=word):
        call(grid, x)


def nan_eps(params, x, t):
    return x * jnp.where(t < 500, jnp.nan, 1.0)


@pytest.mark.parametrize("scheme", [zm.none(), zm.none([C1]), zm.independent([C1])], ids=["none", "none1", "ind"])
def test_a_non_finite_denoiser_is_reported_as_the_denoisers(scheme):
    grid = zm.timestep_grid(1000, 4)  # t = 750, 500, 250, 0: eps turns NaN at step 2
    with pytest.raises(FloatingPointError, match=r"denoiser returned non-finite eps at sample 0, step 2 \(t=250\)"):
        zm.sample(jax.random.PRNGKey(0), jnp.ones((2, 3)), SCHEDULE, grid, denoiser=zm.Denoiser(nan_eps, None),
                  scheme=scheme, sampler=POSTERIOR)


def test_the_condition_that_failed_is_named_not_a_healthy_one():
    bad = zm.condition("logzero", log_zero, zm.freedom_rule(1.0))
    for conditions in ([C1, bad], [bad, C1]):
        with pytest.raises(FloatingPointError) as err:
            _sample(jax.random.PRNGKey(1), jnp.ones((2, 3)), zm.timestep_grid(1000, 3), zm.independent(conditions))
        assert "['logzero']" in str(err.value) and "'left'" not in str(err.value)


@pytest.mark.parametrize("energy", [lambda p, x0: jnp.argmax(x0).astype(jnp.float32),
                                    lambda p, x0: jnp.sum(jnp.round(x0)),
                                    lambda p, x0: jax.lax.stop_gradient(jnp.sum(x0 ** 2))],
                         ids=["argmax", "round", "stop_gradient"])
def test_an_energy_without_gradient_warns_once_before_the_run(energy):
    flat = zm.condition("flat", energy, zm.freedom_rule(1.0))
    with pytest.warns(RuntimeWarning, match="'flat' has a gradient that is zero everywhere"):
        zm.sample(jax.random.PRNGKey(0), jnp.ones((1, 3)), SCHEDULE, zm.timestep_grid(1000, 2), denoiser=DEN,
                  scheme=zm.independent([flat]), sampler=POSTERIOR)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a differentiable energy: no warning
        zm.sample(jax.random.PRNGKey(0), jnp.ones((1, 3)), SCHEDULE, zm.timestep_grid(1000, 2), denoiser=DEN,
                  scheme=zm.independent([C1]), sampler=POSTERIOR)
