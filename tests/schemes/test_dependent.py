"""Z-Magic term II against explicit Jacobians and Hessians in float64 (paper Eqs. 6-7)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zmagic_jax as zm
from tests.conftest import mlp_denoiser


def first(a, x0):
    return jnp.sum(jnp.sin(x0)) + 0.5 * jnp.sum((a @ x0 - 1.0) ** 2)


def second(params, x0):
    return jnp.log(jnp.sum(jnp.exp(x0 * jnp.arange(x0.shape[0])))) + jnp.sum(x0 ** 4) / 4


def third(params, x0):
    return jnp.sum(jnp.cos(2 * x0))


def _correction(scale, y, t):
    return scale * jnp.tanh(y) * (1.0 + t / 1000.0)


def _setup(sampler, index=40, dim=5):
    schedule = zm.linear_schedule()
    ctx = zm.step_context(schedule, zm.timestep_grid(1000, 100), index, jnp.float64)
    ctx = ctx._replace(score_coef=sampler.score_coef(ctx))
    den = mlp_denoiser(jax.random.PRNGKey(3), dim, dtype=jnp.float64)
    a = jax.random.normal(jax.random.PRNGKey(4), (3, dim), jnp.float64)
    c1 = zm.condition("first", first, zm.freedom_rule(0.7), a)
    c2 = zm.condition("second", second, zm.norm_relative_rule(0.3))
    x = jax.random.normal(jax.random.PRNGKey(5), (dim,), jnp.float64)
    noise = sampler.noise_std(ctx) * jax.random.normal(jax.random.PRNGKey(6), (dim,), jnp.float64)
    return den, (c1, c2), x, ctx, noise


def _energy(c, den, x, ctx, t=None, ab=None):
    """``E_c(x0|t(x))``, by hand."""
    t = ctx.t if t is None else t
    ab = ctx.alpha_bar if ab is None else ab
    return c.energy(c.params, zm.x0_from_eps(x, den(x, t), ab))


# The library under jit (as it runs), the references op by op.
_dependent_terms = jax.jit(zm.dependent_terms, static_argnames=("xhat_time", "detail"))
_guidance = jax.jit(zm.direction, static_argnames=("detail",))


def _terms(conds, den, sampler, x, ctx, noise, leaders, followers, **kw):
    return _dependent_terms(x, ctx, noise, conditions=conds, denoiser=den, sampler=sampler, leaders=leaders,
                            followers=followers, **kw)


def _direction(scheme, den, sampler, x, ctx, noise):
    return _guidance(x, ctx, noise, scheme=scheme, denoiser=den, sampler=sampler)


@pytest.mark.parametrize("sampler", [zm.ddpm_ancestral(), zm.ddim(0.4), zm.ddpm_posterior()],
                         ids=lambda s: s.label)
@pytest.mark.parametrize("xhat_time", ["current", "next"])
def test_term_two_equals_explicit_jacobian_transpose(x64, sampler, xhat_time):
    den, (c1, c2), x, ctx, noise = _setup(sampler)
    eps = den(x, ctx.t)
    g1 = jax.grad(lambda y: _energy(c1, den, y, ctx))(x)
    rho1 = c1.rule.rho(ctx, eps, g1, x)

    def xhat_fn(y):
        grad = jax.grad(lambda z: _energy(c1, den, z, ctx))(y)
        return sampler.mean(y, den(y, ctx.t), ctx) - rho1 * grad + noise

    jac = jax.jacobian(xhat_fn)(x)
    xhat = xhat_fn(x)
    if xhat_time == "current":
        t_hat, ab_hat = ctx.t, ctx.alpha_bar
    else:
        t_hat, ab_hat = ctx.t_next, ctx.alpha_bar_next
    g2 = jax.grad(lambda y: _energy(c2, den, y, ctx, t_hat, ab_hat))(xhat)
    rho2 = c2.rule.rho(ctx, den(xhat, t_hat), g2, xhat)
    gh = -rho2 * g2
    expected = jac.T @ gh

    terms = _terms((c1, c2), den, sampler, x, ctx, noise, (0,), ((1,),), xhat_time=xhat_time)
    np.testing.assert_allclose(terms.d[0], -rho1 * g1, rtol=1e-12, atol=0)
    rel = np.linalg.norm(terms.term2[0, 0] - expected) / np.linalg.norm(expected)
    assert rel < 1e-10, rel
    assert bool(terms.follower_finite.all()) and bool(terms.term2_finite.all())
    # The full step's displacement is term I + term II.
    _, disp, info = _direction(zm.dependent((c1, c2), xhat_time=xhat_time), den, sampler, x, ctx, noise)
    np.testing.assert_allclose(disp, -rho1 * g1 + expected, rtol=1e-10, atol=1e-14)
    assert bool(info.guided)


def test_term_two_splits_into_score_jacobian_and_hessian_parts(x64):
    sampler = zm.ddpm_ancestral()
    den, (c1, c2), x, ctx, noise = _setup(sampler)
    eps = den(x, ctx.t)
    rho1 = c1.rule.rho(ctx, eps, None, None)  # freedom_rule: sqrt(ab_t) * scale
    score_map = lambda y: sampler.mean(y, den(y, ctx.t), ctx)
    a_mat = jax.jacobian(score_map)(x)
    hess = jax.hessian(lambda y: -rho1 * _energy(c1, den, y, ctx))(x)
    # A holds the network's score Jacobian: not symmetric, so A^T gh != A gh.
    assert np.abs(a_mat - a_mat.T).max() > 1e-3
    np.testing.assert_allclose(hess, hess.T, atol=1e-12)

    terms = _terms((c1, c2), den, sampler, x, ctx, noise, (0,), ((1,),), detail=True)
    xhat = score_map(x) + terms.d[0] + noise
    g2 = jax.grad(lambda y: _energy(c2, den, y, ctx))(xhat)
    gh = -c2.rule.rho(ctx, den(xhat, ctx.t), g2, xhat) * g2
    score_part, hessian_part = a_mat.T @ gh, hess @ gh
    assert np.linalg.norm(hessian_part) > 1e-3 * np.linalg.norm(score_part)
    rel = np.linalg.norm(terms.term2[0, 0] - (score_part + hessian_part)) / np.linalg.norm(terms.term2[0, 0])
    assert rel < 1e-10, rel
    # detail=True reports the two parts separately, and the gradient of every condition at x_t
    for got, expected in ((terms.score_parts[0, 0], score_part), (terms.hessian_parts[0, 0], hessian_part)):
        rel = np.linalg.norm(got - expected) / np.linalg.norm(expected)
        assert rel < 1e-10, rel
    for k, c in enumerate((c1, c2)):
        np.testing.assert_allclose(terms.gradients[k], jax.grad(lambda y: _energy(c, den, y, ctx))(x), rtol=1e-12)


def test_order_swaps_leader_and_follower(x64):
    sampler = zm.ddim(0.4)
    den, (c1, c2), x, ctx, noise = _setup(sampler)
    _, fwd, info_fwd = _direction(zm.dependent((c1, c2)), den, sampler, x, ctx, noise)
    _, rev, info_rev = _direction(zm.dependent((c1, c2), order=(1, 0)), den, sampler, x, ctx, noise)
    terms = _terms((c1, c2), den, sampler, x, ctx, noise, (1,), ((0,),))
    np.testing.assert_allclose(rev, terms.d[0] + terms.term2[0, 0], rtol=1e-12)
    # diagnostics stay in the order the conditions were given, whichever is guided first
    np.testing.assert_allclose(info_rev.energies, info_fwd.energies, rtol=1e-12)
    np.testing.assert_allclose(info_rev.displacement_norms, [np.nan, np.linalg.norm(terms.d[0])], rtol=1e-12)
    np.testing.assert_allclose(info_rev.term2_norms, [[np.nan, np.nan], [np.linalg.norm(terms.term2[0, 0]), np.nan]],
                               rtol=1e-12)
    np.testing.assert_array_equal(np.isfinite(info_fwd.term2_norms), [[False, True], [False, False]])
    assert np.linalg.norm(fwd - rev) > 1e-6 * np.linalg.norm(fwd)


def test_multi_is_cagrad_of_all_ordered_pairs(x64):
    sampler = zm.ddpm_ancestral()
    den, (c1, c2), x, ctx, noise = _setup(sampler)
    c3 = zm.condition("third", third, zm.freedom_rule(0.3))
    conds = (c1, c2, c3)
    tasks = []
    for i in range(3):
        for j in range(3):
            if i != j:
                terms = _terms(conds, den, sampler, x, ctx, noise, (i,), ((j,),))
                tasks.append(terms.d[0] + terms.term2[0, 0])
    expected = zm.cagrad(jnp.stack(tasks), c=0.5, num_iters=2000)
    _, disp, info = _direction(zm.multi(conds), den, sampler, x, ctx, noise)
    np.testing.assert_allclose(disp, expected, rtol=1e-6, atol=1e-10)
    assert info.energies.shape == (3,) and bool(info.finite.all())


def test_independent_is_the_sum_of_per_condition_displacements(x64):
    sampler = zm.ddpm_posterior()
    den, (c1, c2), x, ctx, noise = _setup(sampler)
    eps = den(x, ctx.t)
    total = 0
    for c in (c1, c2):
        g = jax.grad(lambda y: _energy(c, den, y, ctx))(x)
        total = total - c.rule.rho(ctx, eps, g, x) * g
    eps_out, disp, info = _direction(zm.independent((c1, c2)), den, sampler, x, ctx, noise)
    np.testing.assert_allclose(disp, total, rtol=1e-12)
    np.testing.assert_allclose(eps_out, eps, rtol=1e-14)
    np.testing.assert_allclose(info.energies, [_energy(c1, den, x, ctx), _energy(c2, den, x, ctx)], rtol=1e-12)


def test_unguided_step_outside_window_does_no_gradient_work(x64):
    sampler = zm.ddpm_ancestral()
    den, (c1, c2), x, ctx, noise = _setup(sampler)
    late = c1.replace(name="late", rule=zm.freedom_rule(1.0, stop=int(ctx.t)))  # guided only for t > now
    _, disp, info = _direction(zm.independent((late,)), den, sampler, x, ctx, noise)
    assert not bool(info.guided) and np.all(np.asarray(disp) == 0)
    assert float(info.displacement_norm) == 0.0 and np.all(np.asarray(info.displacement_norms) == 0)
    assert np.all(np.isnan(info.condition_cosines)) and np.all(np.isnan(info.term2_cosines))
    np.testing.assert_allclose(info.energies, [_energy(c1, den, x, ctx)], rtol=1e-12)  # still recorded


@pytest.mark.parametrize("xhat_time", ["current", "next"])
def test_model_led_term_equals_explicit_jacobian_transpose(x64, xhat_time):
    """One condition: the denoiser's own conditioning leads, ``xhat = M0(x_t) + noise``."""
    sampler = zm.ddpm_posterior()
    den, (_, c2), x, ctx, noise = _setup(sampler)
    xhat_fn = lambda y: sampler.mean(y, den(y, ctx.t), ctx) + noise
    jac = jax.jacobian(xhat_fn)(x)
    xhat = xhat_fn(x)
    t_hat, ab_hat = (ctx.t, ctx.alpha_bar) if xhat_time == "current" else (ctx.t_next, ctx.alpha_bar_next)
    g2 = jax.grad(lambda y: _energy(c2, den, y, ctx, t_hat, ab_hat))(xhat)
    expected = jac.T @ (-c2.rule.rho(ctx, den(xhat, t_hat), g2, xhat) * g2)

    eps_out, disp, info = _direction(zm.dependent([c2], xhat_time=xhat_time), den, sampler, x, ctx, noise)
    rel = np.linalg.norm(disp - expected) / np.linalg.norm(expected)
    assert rel < 1e-10, rel
    np.testing.assert_allclose(eps_out, den(x, ctx.t), rtol=1e-14)
    np.testing.assert_allclose(info.energies, [_energy(c2, den, x, ctx)], rtol=1e-12)
    # the model-led term is the diagonal pair [0, 0]; no displacement of the condition at x_t is computed
    np.testing.assert_allclose(info.term2_norms, [[np.linalg.norm(expected)]], rtol=1e-10)
    assert np.isnan(info.displacement_norms).all() and np.isnan(info.term2_cosines).all()
    assert bool(info.finite.all())
    # It is not the independent (FreeDoM) gradient at x_t: the pull-back changes it.
    _, indep, _ = _direction(zm.independent([c2]), den, sampler, x, ctx, noise)
    assert np.linalg.norm(disp - indep) > 1e-3 * np.linalg.norm(indep)


def test_cfg_relative_rule_scales_to_the_correction(x64):
    """``|rho g| = factor |correction(x, t)|`` at the point where the gradient was taken."""
    sampler = zm.ddpm_posterior()
    den, (c1, _), x, ctx, noise = _setup(sampler)
    correction = zm.Denoiser(_correction, 0.3)
    cond = c1.replace(name="style", rule=zm.cfg_relative_rule(0.2, correction))
    _, disp, _ = _direction(zm.independent([cond]), den, sampler, x, ctx, noise)
    np.testing.assert_allclose(np.linalg.norm(disp), 0.2 * np.linalg.norm(correction(x, ctx.t)), rtol=1e-12)
    g = jax.grad(lambda y: _energy(c1, den, y, ctx))(x)
    np.testing.assert_allclose(disp / np.linalg.norm(disp), -g / np.linalg.norm(g), rtol=1e-12)
    # dependent: the follower's step is sized by the correction at the look-ahead point
    _, lead, _ = _direction(zm.dependent([cond]), den, sampler, x, ctx, noise)
    assert np.all(np.isfinite(lead))
    assert float(cond.rule.rho(ctx, None, jnp.zeros(5), x)) == 0.0
