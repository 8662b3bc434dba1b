"""AMDM: aggregation rules, posterior means and the K-model kernels against hand-computed values."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zmagic_jax as zm
from tests.conftest import mlp_denoiser

SCHEDULE = zm.scaled_linear_schedule()
GRID = zm.timestep_grid(1000, 10)
DIM = 6


def _orthogonal_pair(rng, dim, norm):
    q, _ = np.linalg.qr(rng.normal(size=(dim, 3)))
    return norm * q[:, 0], norm * q[:, 1], norm * q[:, 2]


def test_released_weights_as_released(x64):
    np.testing.assert_allclose(zm.released_weights(jnp.array([0.3])), [0.3, math.sqrt(1 - 0.09)], rtol=0, atol=1e-15)
    w1, w2 = 0.47, 0.5
    c = np.asarray(zm.released_weights(jnp.array([w1, w2])))
    r1, r2 = math.sqrt(1 - w1 ** 2), math.sqrt(1 - w2 ** 2)
    np.testing.assert_allclose(c, [w1 * w2, r1 * w2, r1 * r2], rtol=0, atol=1e-15)
    assert abs(np.sum(c ** 2) - (1 - w1 ** 2 + w1 ** 2 * w2 ** 2)) < 1e-15 and abs(np.sum(c ** 2) - 0.834) < 1e-3
    rng = np.random.default_rng(0)
    states = rng.normal(size=(3, DIM))
    np.testing.assert_allclose(zm.aggregate_states(jnp.asarray(states), jnp.array([w1, w2]), "released"),
                               c @ states, rtol=0, atol=1e-14)
    with pytest.raises(ValueError, match="2 or 3 models"):
        zm.released_weights(jnp.array([0.5, 0.5, 0.5]))


@pytest.mark.parametrize("w", [0.0, 0.2, 0.5, 0.9, 1.0])
def test_slerp_of_orthogonal_equal_norm_states_is_the_released_form(x64, w):
    a, b, _ = _orthogonal_pair(np.random.default_rng(1), DIM, 3.0)
    released = zm.aggregate_states(jnp.stack([a, b]), jnp.array([w]), "released")
    np.testing.assert_allclose(zm.slerp(a, b, w), released, rtol=0, atol=1e-13)
    np.testing.assert_allclose(zm.aggregate_states(jnp.stack([a, b]), jnp.array([w]), "slerp"), released,
                               rtol=0, atol=1e-13)


def test_slerp_by_hand(x64):
    rng = np.random.default_rng(2)
    a, b = rng.normal(size=DIM), 2.0 * rng.normal(size=DIM)
    w = 0.3
    theta = math.acos(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))
    s = 2 * math.acos(w) / math.pi
    expected = (math.sin((1 - s) * theta) * a + math.sin(s * theta) * b) / math.sin(theta)
    np.testing.assert_allclose(zm.slerp(a, b, w), expected, rtol=1e-13)
    np.testing.assert_array_equal(zm.slerp(a, b, 1.0), a)
    np.testing.assert_allclose(zm.slerp(a, b, 0.0), b, rtol=1e-13)
    s = 2 * math.acos(0.5) / math.pi  # parallel states: the linear limit (1 - s) a + s b
    np.testing.assert_allclose(zm.slerp(a, 2 * a, 0.5), (1 - s) * a + s * 2 * a, rtol=1e-13)


def test_nested_rules_for_three_models(x64):
    a, b, c = _orthogonal_pair(np.random.default_rng(3), DIM, 2.0)
    w1, w2 = 0.47, 0.5
    states, weights = jnp.stack([a, b, c]), jnp.array([w1, w2])
    nested = w1 * w2 * a + math.sqrt(1 - w1 ** 2) * w2 * b + math.sqrt(1 - w2 ** 2) * c
    np.testing.assert_allclose(zm.aggregate_states(states, weights, "slerp"), nested, rtol=0, atol=1e-13)
    mean = w2 * (w1 * a + (1 - w1) * b) + (1 - w2) * c
    np.testing.assert_allclose(zm.aggregate_states(states, weights, "mean"), mean, rtol=0, atol=1e-14)
    np.testing.assert_array_equal(zm.aggregate_states(states[:1], jnp.zeros((0,)), "slerp"), a)


def test_deviate_moves_a_fixed_distance_toward_mu(x64):
    rng = np.random.default_rng(4)
    xbar, mu = rng.normal(size=(2, 3, 4))
    moved = np.asarray(zm.deviate(xbar, mu, 0.7))
    np.testing.assert_allclose(np.linalg.norm(moved - xbar), 0.7, rtol=1e-14)
    np.testing.assert_allclose(moved, xbar + 0.7 * (mu - xbar) / np.linalg.norm(mu - xbar), rtol=1e-14)
    np.testing.assert_array_equal(zm.deviate(xbar, xbar, 0.7), xbar)
    g = jax.grad(lambda x: jnp.sum(zm.deviate(x, x, 0.7)))(jnp.asarray(xbar))
    assert np.all(np.isfinite(g))


def test_released_mu_is_the_posterior_mean_formula_one_step_off(x64):
    ctxs = zm.aggregation_contexts(SCHEDULE, GRID, jnp.float64)
    i = 4
    t, t_prev = int(GRID.t[i]), int(GRID.t[i - 1])
    assert t_prev == t + 1000 // 10  # the release's s = t + 1000 / N on a uniform grid
    alpha = 1.0 - SCHEDULE.betas[t_prev]
    ab = SCHEDULE.alphas_cumprod[t_prev]
    np.testing.assert_allclose([ctxs.alpha_prev[i], ctxs.alpha_bar_prev[i]], [alpha, ab], rtol=1e-15)
    rng = np.random.default_rng(5)
    x, eps = rng.normal(size=(2, DIM))
    by_hand = x / math.sqrt(alpha) - (1 - alpha) / (math.sqrt(1 - ab) * math.sqrt(alpha)) * eps
    np.testing.assert_allclose(zm.released_mu(x, eps, ctxs.alpha_prev[i], ctxs.alpha_bar_prev[i]), by_hand,
                               rtol=1e-14)
    ctx = jax.tree_util.tree_map(lambda a: a[i], ctxs.step)
    a = SCHEDULE.alphas_cumprod[t] / SCHEDULE.alphas_cumprod[int(GRID.t_next[i])]
    level = (x - (1 - a) / math.sqrt(1 - SCHEDULE.alphas_cumprod[t]) * eps) / math.sqrt(a)
    np.testing.assert_allclose(zm.level_mu(x, eps, ctx), level, rtol=1e-14)


# ---------------------------------------------------------------------------------------------
# K models on small random networks

MODELS = (mlp_denoiser(jax.random.PRNGKey(10), DIM), mlp_denoiser(jax.random.PRNGKey(11), DIM),
          mlp_denoiser(jax.random.PRNGKey(12), DIM))
SAMPLER = zm.ddim(0.5)  # noise on: the per-model keys matter
X_T = jax.random.normal(jax.random.PRNGKey(20), (3, 3, DIM))
KEY = jax.random.PRNGKey(21)


@jax.jit
def _plain_run(keys, x_T, ctxs, model, scheme):
    return jax.vmap(lambda k, x: zm.sample_chain(k, x, ctxs, denoiser=model, scheme=scheme,
                                                 sampler=SAMPLER)[0])(keys, x_T)


def _plain(keys, x_T, model, scheme=None):
    """Each model's own chain with the keys aggregate_sample gives it: split(split(key, B)[b], K)[k]."""
    scheme = zm.none() if scheme is None else scheme
    return _plain_run(keys, x_T, zm.step_contexts(SCHEDULE, GRID), model, scheme)


def _chain_keys(key, batch, k):
    return jax.vmap(lambda b: jax.random.split(b, k))(jax.random.split(key, batch))


def _same_chain(a, b):
    """The aggregate scan and the plain scan are two compiled programs: XLA may fuse their
    multiply-adds differently (jax 0.12.1 on this CPU: 1 ulp apart; earlier CI runs gave equal bits),
    so jitted they agree to float32 round-off; op by op they agree bit for bit
    (:func:`test_the_aggregate_step_adds_nothing_op_by_op`)."""
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=4e-6, atol=4e-6)


def test_one_model_or_w1_p0_is_the_first_models_plain_chain():
    plain = _plain(_chain_keys(KEY, 3, 1)[:, 0], X_T[:, 0], MODELS[0])
    one = zm.aggregate_sample(KEY, X_T[:, :1], SCHEDULE, GRID, denoisers=MODELS[:1], sampler=SAMPLER,
                              aggregation=zm.aggregation([0.0]))
    _same_chain(one.x0[:, 0], plain)
    _same_chain(one.mixed, plain)
    plain = _plain(_chain_keys(KEY, 3, 2)[:, 0], X_T[:, 0], MODELS[0])
    two = zm.aggregate_sample(KEY, X_T[:, :2], SCHEDULE, GRID, denoisers=MODELS[:2], sampler=SAMPLER,
                              aggregation=zm.aggregation([0.0, 0.0], 1.0, window=(0, 9)))
    _same_chain(two.x0[:, 0], plain)
    np.testing.assert_array_equal(np.asarray(two.trace.aggregated[0]), np.arange(10) >= 1)  # never index 0


def test_the_aggregate_step_adds_nothing_op_by_op():
    """Bit for bit, op by op (every primitive its own program, so no fusion can differ): one model,
    and two models with a window beyond the grid, are each model's plain chain."""
    keys = _chain_keys(KEY, 3, 2)
    with jax.disable_jit():
        plain = _plain(_chain_keys(KEY, 3, 1)[:, 0], X_T[:, 0], MODELS[0])
        one = zm.aggregate_sample(KEY, X_T[:, :1], SCHEDULE, GRID, denoisers=MODELS[:1], sampler=SAMPLER,
                                  aggregation=zm.aggregation([0.0]))
        late = zm.aggregate_sample(KEY, X_T[:, :2], SCHEDULE, GRID, denoisers=MODELS[:2], sampler=SAMPLER,
                                   aggregation=zm.aggregation([2.0, 3.0], window=(20, 30)))
        second = _plain(keys[:, 1], X_T[:, 1], MODELS[1])
    np.testing.assert_array_equal(one.x0[:, 0], plain)
    np.testing.assert_array_equal(late.x0[:, 1], second)


def test_outside_the_window_the_chains_are_independent():
    keys = _chain_keys(KEY, 3, 2)
    plains = [_plain(keys[:, k], X_T[:, k], MODELS[k]) for k in range(2)]
    late = zm.aggregate_sample(KEY, X_T[:, :2], SCHEDULE, GRID, denoisers=MODELS[:2], sampler=SAMPLER,
                               aggregation=zm.aggregation([2.0, 3.0], window=(20, 30)))
    for k in range(2):
        _same_chain(late.x0[:, k], plains[k])
    assert not np.any(np.asarray(late.trace.aggregated))
    mid = zm.aggregate_sample(KEY, X_T[:, :2], SCHEDULE, GRID, denoisers=MODELS[:2], sampler=SAMPLER,
                              aggregation=zm.aggregation([2.0, 3.0], window=(3, 4)))
    np.testing.assert_array_equal(np.asarray(mid.trace.aggregated[0]), [i in (3, 4) for i in range(10)])
    assert np.max(np.abs(np.asarray(mid.x0 - late.x0))) > 1e-2  # the deviation acts
    # the merged state is recorded every step: the released form of the two steps
    np.testing.assert_allclose(mid.trace.mixed[:, -1], mid.mixed)


def test_the_deviation_step_by_hand(x64):
    """One step inside the window, recomputed from the pieces: each model's plain step, the merge,
    the released mu from the stored state and eps."""
    models = tuple(mlp_denoiser(jax.random.PRNGKey(30 + k), DIM, dtype=jnp.float64) for k in range(2))
    agg = zm.aggregation([0.8, 1.1], 0.4)
    ctxs = zm.aggregation_contexts(SCHEDULE, GRID, jnp.float64)
    actx = jax.tree_util.tree_map(lambda a: a[2], ctxs)
    rng = np.random.default_rng(6)
    x, eps_prev = jnp.asarray(rng.normal(size=(2, 2, DIM)))
    keys = jax.random.split(jax.random.PRNGKey(7), 2)
    state, info = zm.aggregate_step(keys, zm.AggregateState(x, eps_prev), actx, denoisers=models, aggregation=agg,
                                    sampler=SAMPLER, schemes=(zm.none(), zm.none()))
    steps = [zm.step(keys[k], x[k], actx.step, denoiser=models[k], scheme=zm.none(), sampler=SAMPLER)[0]
             for k in range(2)]
    xbar = 0.4 * np.asarray(steps[0]) + math.sqrt(1 - 0.16) * np.asarray(steps[1])
    np.testing.assert_allclose(info.mixed, xbar, rtol=1e-13)
    a, ab = float(actx.alpha_prev), float(actx.alpha_bar_prev)
    for k, p in enumerate([0.8, 1.1]):
        mu = np.asarray(x[k]) / math.sqrt(a) - (1 - a) / (math.sqrt(1 - ab) * math.sqrt(a)) * np.asarray(eps_prev[k])
        expected = xbar + p * (mu - xbar) / np.linalg.norm(mu - xbar)
        np.testing.assert_allclose(state.x[k], expected, rtol=1e-12)
        np.testing.assert_allclose(info.distance[k], np.linalg.norm(mu - xbar), rtol=1e-12)
        eps = models[k](x[k], actx.step.t)
        np.testing.assert_allclose(state.eps[k], eps, rtol=1e-13)


def test_a_stack_equals_the_models_one_by_one(x64, rule="slerp", mu="level"):
    models = tuple(mlp_denoiser(jax.random.PRNGKey(40 + k), DIM, dtype=jnp.float64) for k in range(3))
    x_T = jnp.asarray(np.random.default_rng(8).normal(size=(2, 3, DIM)))
    agg = zm.aggregation([0.3, 0.4, 0.5], [0.47, 0.5], window=(1, 6), rule=rule, mu=mu)
    loop = zm.aggregate_sample(KEY, x_T, SCHEDULE, GRID, denoisers=models, aggregation=agg, sampler=SAMPLER)
    stack = zm.aggregate_sample(KEY, x_T, SCHEDULE, GRID, denoisers=zm.stack_denoisers(models), aggregation=agg,
                                sampler=SAMPLER)
    np.testing.assert_allclose(stack.x0, loop.x0, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stack.mixed, loop.mixed, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(stack.trace.distance, loop.trace.distance, rtol=1e-12)
    np.testing.assert_allclose(stack.trace.chains.energies[:, :, 1], loop.trace.chains[1].energies, rtol=1e-12)


def _target(y, x0):
    return jnp.sum((x0[:3] - y) ** 2)


def test_each_chain_carries_its_own_guidance():
    """AMDM + Z-Magic: model 0 guided by a dependent scheme; with w = 1, p = 0 its chain is the
    guided single-model chain, and the guidance lowers its energy."""
    cond = zm.condition("target", _target, zm.freedom_rule(0.3), jnp.ones(3))
    other = zm.condition("other", _target, zm.norm_relative_rule(0.05), -jnp.ones(3))
    scheme = zm.dependent([cond, other])
    keys = _chain_keys(KEY, 3, 2)
    plain = _plain(keys[:, 0], X_T[:, 0], MODELS[0], scheme)
    run = zm.aggregate_sample(KEY, X_T[:, :2], SCHEDULE, GRID, denoisers=MODELS[:2], sampler=SAMPLER,
                              schemes=(scheme, zm.none()), aggregation=zm.aggregation([0.0, 0.0], 1.0, window=(0, 9)))
    _same_chain(run.x0[:, 0], plain)
    assert run.trace.chains[0].energies.shape == (3, 10, 2) and run.trace.chains[1].energies.shape == (3, 10, 0)
    free = _plain(keys[:, 0], X_T[:, 0], MODELS[0])
    energy = jax.vmap(lambda x: _target(jnp.ones(3), x))
    assert float(jnp.mean(energy(plain))) < 0.8 * float(jnp.mean(energy(free)))


def test_a_stack_with_one_scheme_per_model_stacks_them():
    cond = lambda y: zm.condition("target", _target, zm.freedom_rule(0.3), y)  # noqa: E731
    schemes = tuple(zm.independent([cond(jnp.full(3, v))]) for v in (1.0, -1.0))
    agg = zm.aggregation([0.2, 0.2], 0.5, rule="slerp")
    loop = zm.aggregate_sample(KEY, X_T[:, :2], SCHEDULE, GRID, denoisers=MODELS[:2], aggregation=agg,
                               sampler=SAMPLER, schemes=schemes)
    stack = zm.aggregate_sample(KEY, X_T[:, :2], SCHEDULE, GRID, denoisers=zm.stack_denoisers(MODELS[:2]),
                                aggregation=agg, sampler=SAMPLER, schemes=schemes)
    np.testing.assert_allclose(stack.x0, loop.x0, rtol=1e-5, atol=1e-5)


def test_gradient_through_the_weights_matches_finite_differences(x64):
    models = tuple(mlp_denoiser(jax.random.PRNGKey(50 + k), DIM, dtype=jnp.float64) for k in range(2))
    ctxs = zm.aggregation_contexts(SCHEDULE, GRID, jnp.float64)
    x_T = jnp.asarray(np.random.default_rng(9).normal(size=(2, DIM)))

    def loss(w, p):
        agg = zm.aggregation(p, w, window=(1, 5), rule="slerp", mu="level")
        x, _ = zm.aggregate_chain(KEY, x_T, ctxs, denoisers=models, aggregation=agg, sampler=zm.ddim(0.0),
                                  schemes=(zm.none(), zm.none()))
        return jnp.sum(jnp.sin(x))

    w, p = jnp.array([0.6]), jnp.array([0.3, 0.2])
    g_w, g_p = jax.jit(jax.grad(loss, argnums=(0, 1)))(w, p)
    loss = jax.jit(loss)
    h = 1e-6
    fd_w = (loss(w + h, p) - loss(w - h, p)) / (2 * h)
    fd_p = [(loss(w, p.at[i].add(h)) - loss(w, p.at[i].add(-h))) / (2 * h) for i in range(2)]
    np.testing.assert_allclose(g_w[0], fd_w, rtol=1e-6)
    np.testing.assert_allclose(g_p, fd_p, rtol=1e-6)
    assert abs(float(g_w[0])) > 1e-3


def test_bad_input_is_named():
    with pytest.raises(ValueError, match="rule must be one of"):
        zm.aggregation([1.0, 1.0], rule="spherical")
    with pytest.raises(ValueError, match="K - 1 = 1 numbers"):
        zm.aggregation([1.0, 1.0], [0.5, 0.5])
    with pytest.raises(ValueError, match="lie in"):
        zm.aggregation([1.0, 1.0], 1.5)
    with pytest.raises(ValueError, match="released rule is defined for 2 or 3"):
        zm.aggregation([1.0] * 4)
    with pytest.raises(ValueError, match="aggregates no step"):
        zm.aggregation([1.0, 1.0], window=(0, 0))
    with pytest.raises(ValueError, match="step lengths for 2 models but 3"):
        zm.aggregate_sample(KEY, X_T, SCHEDULE, GRID, denoisers=MODELS, aggregation=zm.aggregation([1.0, 1.0]))
    with pytest.raises(ValueError, match=r"shape \(batch, K=2"):
        zm.aggregate_sample(KEY, X_T[:, 0], SCHEDULE, GRID, denoisers=MODELS[:2],
                            aggregation=zm.aggregation([1.0, 1.0]))
    wide = mlp_denoiser(jax.random.PRNGKey(60), DIM + 2)
    with pytest.raises(ValueError, match="model 1: "):
        zm.aggregate_sample(KEY, X_T[:, :2], SCHEDULE, GRID, denoisers=(MODELS[0], wide),
                            aggregation=zm.aggregation([1.0, 1.0]))
    with pytest.raises(ValueError, match="params differ"):
        zm.stack_denoisers([MODELS[0], wide])
    with pytest.raises(ValueError, match="release defines step lengths for 2 or 3"):
        zm.release_steps(4, (4, 8, 8))
    assert zm.release_steps(2, (4, 64, 64)) == (55.0, 45.0)
    np.testing.assert_allclose(zm.release_steps(3, (4, 16, 16)), (45 / 4, 10.0, 35 / 4))
