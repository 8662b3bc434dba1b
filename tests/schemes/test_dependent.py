"""Z-Magic term II against explicit Jacobians and Hessians in float64 (paper Eqs. 6-7)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zmagic_jax as zm
from zmagic_jax.schemes import dependent_terms
from tests.conftest import mlp_eps_fn


def _setup(sampler, index=40, dim=5):
    schedule = zm.linear_schedule()
    grid = zm.timestep_grid(1000, 100)
    ctx = jax.tree_util.tree_map(lambda a: a[index], zm.step_contexts(schedule, grid))
    ctx = ctx._replace(alpha_bar=jnp.float64(ctx.alpha_bar), alpha_bar_next=jnp.float64(ctx.alpha_bar_next))
    ctx = ctx._replace(score_coef=jnp.float64(sampler.score_coef(ctx)))
    eps_fn = mlp_eps_fn(jax.random.PRNGKey(3), dim, dtype=jnp.float64)
    a = jax.random.normal(jax.random.PRNGKey(4), (3, dim), jnp.float64)
    e1 = lambda x0: jnp.sum(jnp.sin(x0)) + 0.5 * jnp.sum((a @ x0 - 1.0) ** 2)
    e2 = lambda x0: jnp.log(jnp.sum(jnp.exp(x0 * jnp.arange(dim)))) + jnp.sum(x0 ** 4) / 4
    c1 = zm.condition("first", e1, zm.freedom_rule(0.7))
    c2 = zm.condition("second", e2, zm.norm_relative_rule(0.3))
    x = jax.random.normal(jax.random.PRNGKey(5), (dim,), jnp.float64)
    noise = sampler.noise_std(ctx) * jax.random.normal(jax.random.PRNGKey(6), (dim,), jnp.float64)
    return eps_fn, (c1, c2), x, ctx, noise


def _x0(eps_fn, x, ctx, t=None, ab=None):
    t = ctx.t if t is None else t
    ab = ctx.alpha_bar if ab is None else ab
    return zm.x0_from_eps(x, eps_fn(x, t), ab)


@pytest.mark.parametrize("sampler", [zm.ddpm_ancestral(), zm.ddim(0.4), zm.ddpm_posterior()],
                         ids=lambda s: s.name)
@pytest.mark.parametrize("xhat_time", ["current", "next"])
def test_term_two_equals_explicit_jacobian_transpose(x64, sampler, xhat_time):
    eps_fn, (c1, c2), x, ctx, noise = _setup(sampler)
    eps = eps_fn(x, ctx.t)
    g1 = jax.grad(lambda y: c1.energy(_x0(eps_fn, y, ctx)))(x)
    rho1 = c1.rule.rho(ctx, eps, g1)

    def xhat_fn(y):
        grad = jax.grad(lambda z: c1.energy(_x0(eps_fn, z, ctx)))(y)
        return sampler.mean(y, eps_fn(y, ctx.t), ctx) - rho1 * grad + noise

    jac = jax.jacobian(xhat_fn)(x)
    xhat = xhat_fn(x)
    if xhat_time == "current":
        t_hat, ab_hat = ctx.t, ctx.alpha_bar
    else:
        t_hat, ab_hat = ctx.t_next, ctx.alpha_bar_next
    g2 = jax.grad(lambda y: c2.energy(_x0(eps_fn, y, ctx, t_hat, ab_hat)))(xhat)
    rho2 = c2.rule.rho(ctx, eps_fn(xhat, t_hat), g2)
    gh = -rho2 * g2
    expected = jac.T @ gh

    d, term2, energies, eps_out, ok = dependent_terms((c1, c2), eps_fn, sampler, x, ctx, noise,
                                                       (0,), ((1,),), xhat_time)
    np.testing.assert_allclose(d[0], -rho1 * g1, rtol=1e-12, atol=0)
    rel = np.linalg.norm(term2[0, 0] - expected) / np.linalg.norm(expected)
    assert rel < 1e-10, rel
    assert bool(ok.all())
    # The full step's displacement is term I + term II.
    _, disp, info = zm.direction(zm.dependent((c1, c2), xhat_time=xhat_time), eps_fn, sampler, x, ctx, noise)
    np.testing.assert_allclose(disp, -rho1 * g1 + expected, rtol=1e-10, atol=1e-14)
    assert bool(info.guided)


def test_term_two_splits_into_score_jacobian_and_hessian_parts(x64):
    sampler = zm.ddpm_ancestral()
    eps_fn, (c1, c2), x, ctx, noise = _setup(sampler)
    eps = eps_fn(x, ctx.t)
    rho1 = c1.rule.rho(ctx, eps, None)
    score_map = lambda y: sampler.mean(y, eps_fn(y, ctx.t), ctx)
    a_mat = jax.jacobian(score_map)(x)
    hess = jax.hessian(lambda y: -rho1 * c1.energy(_x0(eps_fn, y, ctx)))(x)
    # A holds the network's score Jacobian: not symmetric, so A^T gh != A gh.
    assert np.abs(a_mat - a_mat.T).max() > 1e-3
    np.testing.assert_allclose(hess, hess.T, atol=1e-12)

    d, term2, *_ = dependent_terms((c1, c2), eps_fn, sampler, x, ctx, noise, (0,), ((1,),))
    xhat = score_map(x) + d[0] + noise
    g2 = jax.grad(lambda y: c2.energy(_x0(eps_fn, y, ctx)))(xhat)
    gh = -c2.rule.rho(ctx, eps_fn(xhat, ctx.t), g2) * g2
    score_part, hessian_part = a_mat.T @ gh, hess @ gh
    assert np.linalg.norm(hessian_part) > 1e-3 * np.linalg.norm(score_part)
    rel = np.linalg.norm(term2[0, 0] - (score_part + hessian_part)) / np.linalg.norm(term2[0, 0])
    assert rel < 1e-10, rel


def test_order_swaps_leader_and_follower(x64):
    sampler = zm.ddim(0.4)
    eps_fn, (c1, c2), x, ctx, noise = _setup(sampler)
    _, fwd, info_fwd = zm.direction(zm.dependent((c1, c2)), eps_fn, sampler, x, ctx, noise)
    _, rev, info_rev = zm.direction(zm.dependent((c1, c2), order=(1, 0)), eps_fn, sampler, x, ctx, noise)
    d, term2, *_ = dependent_terms((c1, c2), eps_fn, sampler, x, ctx, noise, (1,), ((0,),))
    np.testing.assert_allclose(rev, d[0] + term2[0, 0], rtol=1e-12)
    # diagnostics stay in the order the conditions were given, whichever is guided first
    np.testing.assert_allclose(info_rev.energies, info_fwd.energies, rtol=1e-12)
    np.testing.assert_allclose(info_rev.displacement_norms, [np.linalg.norm(term2[0, 0]), np.linalg.norm(d[0])],
                               rtol=1e-12)
    assert np.linalg.norm(fwd - rev) > 1e-6 * np.linalg.norm(fwd)


def test_multi_is_cagrad_of_all_ordered_pairs(x64):
    sampler = zm.ddpm_ancestral()
    eps_fn, (c1, c2), x, ctx, noise = _setup(sampler)
    c3 = zm.condition("third", lambda x0: jnp.sum(jnp.cos(2 * x0)), zm.freedom_rule(0.3))
    conds = (c1, c2, c3)
    tasks = []
    for i in range(3):
        for j in range(3):
            if i != j:
                d, term2, *_ = dependent_terms(conds, eps_fn, sampler, x, ctx, noise, (i,), ((j,),))
                tasks.append(d[0] + term2[0, 0])
    expected = zm.cagrad(jnp.stack(tasks), c=0.5, num_iters=2000)
    _, disp, info = zm.direction(zm.multi(conds), eps_fn, sampler, x, ctx, noise)
    np.testing.assert_allclose(disp, expected, rtol=1e-6, atol=1e-10)
    assert info.energies.shape == (3,) and bool(info.finite.all())


def test_independent_is_the_sum_of_per_condition_displacements(x64):
    sampler = zm.ddpm_posterior()
    eps_fn, (c1, c2), x, ctx, noise = _setup(sampler)
    eps = eps_fn(x, ctx.t)
    total = 0
    for c in (c1, c2):
        g = jax.grad(lambda y: c.energy(_x0(eps_fn, y, ctx)))(x)
        total = total - c.rule.rho(ctx, eps, g) * g
    eps_out, disp, info = zm.direction(zm.independent((c1, c2)), eps_fn, sampler, x, ctx, noise)
    np.testing.assert_allclose(disp, total, rtol=1e-12)
    np.testing.assert_allclose(eps_out, eps, rtol=1e-14)
    np.testing.assert_allclose(info.energies, [c1.energy(_x0(eps_fn, x, ctx)), c2.energy(_x0(eps_fn, x, ctx))],
                               rtol=1e-12)


def test_unguided_step_outside_window_does_no_gradient_work(x64):
    sampler = zm.ddpm_ancestral()
    eps_fn, (c1, c2), x, ctx, noise = _setup(sampler)
    late = zm.condition("late", c1.energy, zm.freedom_rule(1.0, stop=int(ctx.t)))  # guided only for t > now
    _, disp, info = zm.direction(zm.independent((late,)), eps_fn, sampler, x, ctx, noise)
    assert not bool(info.guided) and np.all(np.asarray(disp) == 0)
    assert np.isnan(info.cosine)


@pytest.mark.parametrize("xhat_time", ["current", "next"])
def test_model_led_term_equals_explicit_jacobian_transpose(x64, xhat_time):
    """One condition: the denoiser's own conditioning leads, ``xhat = M0(x_t) + noise``."""
    sampler = zm.ddpm_posterior()
    eps_fn, (_, c2), x, ctx, noise = _setup(sampler)
    xhat_fn = lambda y: sampler.mean(y, eps_fn(y, ctx.t), ctx) + noise
    jac = jax.jacobian(xhat_fn)(x)
    xhat = xhat_fn(x)
    t_hat, ab_hat = (ctx.t, ctx.alpha_bar) if xhat_time == "current" else (ctx.t_next, ctx.alpha_bar_next)
    g2 = jax.grad(lambda y: c2.energy(_x0(eps_fn, y, ctx, t_hat, ab_hat)))(xhat)
    expected = jac.T @ (-c2.rule.rho(ctx, eps_fn(xhat, t_hat), g2) * g2)

    eps_out, disp, info = zm.direction(zm.dependent([c2], xhat_time=xhat_time), eps_fn, sampler, x, ctx, noise)
    rel = np.linalg.norm(disp - expected) / np.linalg.norm(expected)
    assert rel < 1e-10, rel
    np.testing.assert_allclose(eps_out, eps_fn(x, ctx.t), rtol=1e-14)
    np.testing.assert_allclose(info.energies, [c2.energy(_x0(eps_fn, x, ctx))], rtol=1e-12)
    np.testing.assert_allclose(info.displacement_norms, [np.linalg.norm(expected)], rtol=1e-10)
    assert bool(info.finite.all()) and np.isnan(info.cosine)
    # It is not the independent (FreeDoM) gradient at x_t: the pull-back changes it.
    _, indep, _ = zm.direction(zm.independent([c2]), eps_fn, sampler, x, ctx, noise)
    assert np.linalg.norm(disp - indep) > 1e-3 * np.linalg.norm(indep)


def test_cfg_relative_rule_scales_to_the_correction(x64):
    """``|rho g| = factor |correction(x, t)|`` at the point where the gradient was taken."""
    sampler = zm.ddpm_posterior()
    eps_fn, (c1, _), x, ctx, noise = _setup(sampler)
    correction = lambda y, t: 0.3 * jnp.tanh(y) * (1.0 + t / 1000.0)
    cond = zm.condition("style", c1.energy, zm.cfg_relative_rule(0.2, correction))
    _, disp, _ = zm.direction(zm.independent([cond]), eps_fn, sampler, x, ctx, noise)
    np.testing.assert_allclose(np.linalg.norm(disp), 0.2 * np.linalg.norm(correction(x, ctx.t)), rtol=1e-12)
    g = jax.grad(lambda y: c1.energy(_x0(eps_fn, y, ctx)))(x)
    np.testing.assert_allclose(disp / np.linalg.norm(disp), -g / np.linalg.norm(g), rtol=1e-12)
    # dependent: the follower's step is sized by the correction at the look-ahead point
    _, lead, _ = zm.direction(zm.dependent([cond]), eps_fn, sampler, x, ctx, noise)
    assert np.all(np.isfinite(lead))
    assert float(cond.rule.rho(ctx, None, jnp.zeros(5), x)) == 0.0
