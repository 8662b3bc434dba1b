"""The term-II trust region of ``dependent(..., term2_trust=c)`` against a float64 explicit Jacobian."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zmagic_jax as zm
from tests.schemes.test_dependent import _energy, _guidance, _setup

SAMPLER = zm.ddpm_posterior()


def _direction(scheme, den, x, ctx, noise, detail=False):
    """One compiled program serves every value of ``term2_trust`` (a leaf)."""
    return _guidance(x, ctx, noise, scheme=scheme, denoiser=den, sampler=SAMPLER, detail=detail)


@jax.jit
def _reference(den, c1, c2, x, ctx, noise):
    """``(d_1, term II, |gh|, score part, Hessian part)`` from explicit matrices:
    ``term II = jacfwd(xhat)(x_t)^T gh``, parts ``jacfwd(M0)^T gh`` and ``-rho_1 hessian(E_1) gh``."""
    g1 = jax.grad(lambda y: _energy(c1, den, y, ctx))(x)
    rho1 = c1.rule.rho(ctx, den(x, ctx.t), g1, x)

    def xhat_fn(y):
        return SAMPLER.mean(y, den(y, ctx.t), ctx) - rho1 * jax.grad(lambda z: _energy(c1, den, z, ctx))(y) + noise

    xhat = xhat_fn(x)
    g2 = jax.grad(lambda y: _energy(c2, den, y, ctx))(xhat)
    gh = -c2.rule.rho(ctx, den(xhat, ctx.t), g2, xhat) * g2
    score = jax.jacfwd(lambda y: SAMPLER.mean(y, den(y, ctx.t), ctx))(x).T @ gh
    hessian = -rho1 * jax.hessian(lambda y: _energy(c1, den, y, ctx))(x) @ gh
    return -rho1 * g1, jax.jacfwd(xhat_fn)(x).T @ gh, jnp.linalg.norm(gh), score, hessian


@pytest.fixture(scope="module")
def point():
    with jax.enable_x64():
        den, conds, x, ctx, noise = _setup(SAMPLER)
        d1, term2, gh_norm, score, hessian = map(np.asarray, _reference(den, *conds, x, ctx, noise))
        return (den, conds, x, ctx, noise, d1, term2, max(np.linalg.norm(d1), float(gh_norm)),
                np.linalg.norm(score), np.linalg.norm(hessian))


def test_no_trust_region_is_the_paper_scheme(x64, point):
    den, conds, x, ctx, noise, d1, term2, ref, _, _ = point
    assert zm.dependent(conds, term2_trust=None) == zm.dependent(conds)
    _, paper, info = _direction(zm.dependent(conds), den, x, ctx, noise)
    np.testing.assert_allclose(paper, d1 + term2, rtol=1e-10)
    # a bound that is never reached leaves every number as it was, bit for bit
    _, loose, loose_info = _direction(zm.dependent(conds, term2_trust=1e6), den, x, ctx, noise)
    np.testing.assert_array_equal(loose, paper)
    np.testing.assert_array_equal(loose_info.term2_norms, info.term2_norms)


def test_trust_region_caps_term_two_at_c_times_the_larger_displacement(x64, point):
    den, conds, x, ctx, noise, d1, term2, ref, score_norm, hessian_norm = point
    ratio = np.linalg.norm(term2) / ref
    c = 0.5 * ratio  # active: |term II| = 2 c ref before the cap
    _, capped, info = _direction(zm.dependent(conds, term2_trust=c), den, x, ctx, noise)
    expected = d1 + term2 * (c * ref / np.linalg.norm(term2))
    np.testing.assert_allclose(capped, expected, rtol=1e-10)
    np.testing.assert_allclose(info.term2_norms[0, 1], c * ref, rtol=1e-10)  # the applied term II
    _, uncapped, _ = _direction(zm.dependent(conds, term2_trust=1.01 * ratio), den, x, ctx, noise)
    np.testing.assert_allclose(uncapped, d1 + term2, rtol=1e-10)
    # detail: both parts of term II are scaled alike (by 1/2 here), so they still sum to it
    _, _, detail = _direction(zm.dependent(conds, term2_trust=c), den, x, ctx, noise, detail=True)
    np.testing.assert_allclose(detail.term2[0, 1], capped - d1, rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(detail.score_part_norms[0, 1], 0.5 * score_norm, rtol=1e-10)
    np.testing.assert_allclose(detail.hessian_part_norms[0, 1], 0.5 * hessian_norm, rtol=1e-10)


def test_gradient_and_vmap_over_term2_trust(x64, point):
    den, conds, x, ctx, noise, d1, term2, ref, _, _ = point
    c = 0.5 * np.linalg.norm(term2) / ref
    w = jax.random.normal(jax.random.PRNGKey(7), x.shape, jnp.float64)

    def loss(c):
        return jnp.vdot(w, _direction(zm.dependent(conds, term2_trust=c), den, x, ctx, noise)[1])

    grad = jax.grad(loss)(c)
    h = 1e-5 * c
    np.testing.assert_allclose(grad, (loss(c + h) - loss(c - h)) / (2 * h), rtol=1e-6)
    np.testing.assert_allclose(grad, ref * np.vdot(w, term2) / np.linalg.norm(term2), rtol=1e-8)
    cs = jnp.asarray([c, 4 * c])  # capped, then not
    batched = jax.vmap(lambda c: _direction(zm.dependent(conds, term2_trust=c), den, x, ctx, noise)[1])(cs)
    np.testing.assert_allclose(batched[0], d1 + term2 * (c * ref / np.linalg.norm(term2)), rtol=1e-10)
    np.testing.assert_allclose(batched[1], d1 + term2, rtol=1e-10)


@pytest.mark.parametrize("bad", [0.0, -1.0, float("inf"), float("nan"), True, "2", [1.0, 2.0]])
def test_bad_term2_trust_is_refused(bad):
    conds = (zm.condition("a", lambda p, x0: jnp.sum(x0), zm.score_rule()),
             zm.condition("b", lambda p, x0: jnp.sum(x0 ** 2), zm.score_rule()))
    with pytest.raises(ValueError, match="dependent: term2_trust"):
        zm.dependent(conds, term2_trust=bad)
    with pytest.raises(ValueError, match="term2_trust"):
        zm.dependent(conds[:1], term2_trust=1.0)
    # traced values are not checked (the scheme is built inside someone's jit)
    assert jax.jit(lambda c: zm.dependent(conds, term2_trust=c).term2_trust)(2.0) == 2.0


def test_multi_caps_each_pair_like_dependent(x64, point):
    """``multi(term2_trust=c)``: CAGrad over the two ordered pairs' task gradients, each the
    displacement of ``dependent(order, term2_trust=c)``."""
    den, conds, x, ctx, noise, d1, term2, ref, _, _ = point
    c = 0.5 * np.linalg.norm(term2) / ref
    tasks = jnp.stack([_direction(zm.dependent(conds, order=order, term2_trust=c), den, x, ctx, noise)[1]
                       for order in ((0, 1), (1, 0))])
    _, d, _ = _direction(zm.multi(conds, term2_trust=c), den, x, ctx, noise)
    np.testing.assert_allclose(d, zm.cagrad(tasks, c=0.5), rtol=1e-9, atol=1e-14)
    _, paper, _ = _direction(zm.multi(conds), den, x, ctx, noise)
    assert np.linalg.norm(np.asarray(d) - np.asarray(paper)) > 1e-3 * np.linalg.norm(paper)  # the cap acted
    with pytest.raises(ValueError, match="multi: term2_trust"):
        zm.multi(conds, term2_trust=-1.0)
