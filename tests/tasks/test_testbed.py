"""Exact likelihoods and posteriors of the testbed against independent numpy/scipy references."""
import json
from functools import partial

import jax
import numpy as np
import pytest
from scipy.special import logsumexp
from scipy.stats import chi2
from scipy.stats import multivariate_normal as mvn

from tests.conftest import random_mixture_params
from zmagic_jax.models import (
    condition_on_linear,
    gaussian_mixture,
    marginal_log_prob,
    marginal_score,
    sample_mixture,
    select_component,
)
from zmagic_jax.tasks import (
    LinearMeasurement,
    Testbed,
    class_condition,
    exact_posterior,
    joint_exact_nll,
    make_testbed,
    measurement_condition,
)
from zmagic_jax.tasks import _testbed_demo
from zmagic_jax.tasks._testbed_demo import DemoSettings, outside_support, support_radii


def random_params(seed, num=3, dim=3):
    weights, means, covs = random_mixture_params(seed, num, dim, mean_std=1.0, jitter=0.2)
    return weights / weights.sum(), means, covs


def random_measurement(seed, rows, dim=3, sigma=0.4):
    rng = np.random.default_rng(seed)
    return LinearMeasurement(rng.normal(size=(rows, dim)), rng.normal(size=rows), sigma)


def ref_log_resp(params, x, ab):
    weights, means, covs = params
    eye = np.eye(means.shape[1])
    logs = np.array([np.log(w) + mvn.logpdf(x, np.sqrt(ab) * m, ab * c + (1 - ab) * eye)
                     for w, m, c in zip(weights, means, covs)])
    return logs - logsumexp(logs)


def ref_x0_given_xt(mean, cov, x, ab):
    """Gaussian x0 | x_t in information form: precision Sigma^-1 + ab/(1-ab) I."""
    precision = np.linalg.inv(cov) + ab / (1 - ab) * np.eye(mean.shape[0])
    post_cov = np.linalg.inv(precision)
    return post_cov @ (np.linalg.solve(cov, mean) + np.sqrt(ab) / (1 - ab) * x), post_cov


def ref_log_lik(params, measurements, x, ab):
    """Per component: log r_k(x) + log N(y; A m_k, A C_k A^T + Lambda) for stacked measurements."""
    _, means, covs = params
    log_resp = ref_log_resp(params, x, ab)
    if not measurements:
        return log_resp
    A = np.vstack([m.A for m in measurements])
    y = np.concatenate([m.y for m in measurements])
    noise = np.diag(np.concatenate([np.full(len(m.y), m.sigma ** 2) for m in measurements]))
    out = []
    for k in range(len(means)):
        m_k, c_k = ref_x0_given_xt(means[k], covs[k], x, ab)
        out.append(log_resp[k] + mvn.logpdf(y, A @ m_k, A @ c_k @ A.T + noise))
    return np.array(out)


def ref_nll(params, class_index, measurements, x, ab):
    per_component = ref_log_lik(params, measurements, x, ab)
    return -(logsumexp(per_component) if class_index is None else per_component[class_index])


def finite_difference_grad(f, x, h=1e-5):
    return np.array([(f(x + h * e) - f(x - h * e)) / (2 * h) for e in np.eye(len(x))])


POINTS = np.random.default_rng(11).normal(0.0, 1.0, (3, 3))
NOISE_LEVELS = [0.1, 0.5, 0.9]


def test_single_component_measurement_nll_is_closed_form(x64):
    weights, means, covs = random_params(1, num=1)
    gmm = gaussian_mixture(weights, means, covs)
    meas = random_measurement(2, rows=2)
    cond = measurement_condition(gmm, meas)
    grad = jax.jit(jax.grad(cond.exact_nll))

    def closed_form(x, ab):
        m, c = ref_x0_given_xt(means[0], covs[0], x, ab)
        return -mvn.logpdf(meas.y, meas.A @ m, meas.A @ c @ meas.A.T + meas.sigma ** 2 * np.eye(2))

    for ab in NOISE_LEVELS:
        for x in POINTS:
            np.testing.assert_allclose(cond.exact_nll(x, ab), closed_form(x, ab), rtol=1e-10)
            np.testing.assert_allclose(
                grad(x, ab), finite_difference_grad(lambda z: closed_form(z, ab), x),
                rtol=1e-6, atol=1e-7)


def test_class_nll_is_minus_log_responsibility(x64):
    params = random_params(3)
    cond = class_condition(gaussian_mixture(*params), 1)
    for x in POINTS:
        for ab in NOISE_LEVELS + [1.0]:
            np.testing.assert_allclose(cond.exact_nll(x, ab), -ref_log_resp(params, x, ab)[1],
                                       rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(cond.energy(x), -ref_log_resp(params, x, 1.0)[1],
                                   rtol=1e-10, atol=1e-12)


def test_measurement_energy_and_clean_limit(x64):
    gmm = gaussian_mixture(*random_params(4))
    meas = random_measurement(5, rows=2, sigma=0.3)
    cond = measurement_condition(gmm, meas, name="m")
    assert cond.name == "m"
    for x in POINTS:
        resid = meas.y - meas.A @ x
        np.testing.assert_allclose(cond.energy(x), resid @ resid / (2 * 0.3 ** 2), rtol=1e-12)
        # At ab = 1 the posterior of x0 is a point mass on x_t, so the exact NLL is the energy
        # plus the Gaussian normaliser.
        np.testing.assert_allclose(cond.exact_nll(x, 1.0),
                                   cond.energy(x) + np.log(2 * np.pi * 0.3 ** 2), rtol=1e-10)


def test_joint_with_one_condition_is_that_condition(x64):
    gmm = gaussian_mixture(*random_params(6))
    meas = random_measurement(7, rows=2)
    pairs = [(joint_exact_nll(gmm, 2, ()), class_condition(gmm, 2).exact_nll),
             (joint_exact_nll(gmm, None, [meas]), measurement_condition(gmm, meas).exact_nll)]
    for joint, single in pairs:
        for ab in NOISE_LEVELS:
            for x in POINTS:
                np.testing.assert_allclose(joint(x, ab), single(x, ab), rtol=1e-12)


@pytest.mark.parametrize("class_index, num_meas", [(0, 1), (2, 2), (None, 2)])
def test_joint_nll_matches_numpy(x64, class_index, num_meas):
    params = random_params(8)
    gmm = gaussian_mixture(*params)
    measurements = [random_measurement(9, rows=1, sigma=0.3),
                    random_measurement(10, rows=2, sigma=0.6)][:num_meas]
    nll = joint_exact_nll(gmm, class_index, measurements)
    grad = jax.jit(jax.grad(nll))
    for ab in NOISE_LEVELS:
        for x in POINTS:
            expected = ref_nll(params, class_index, measurements, x, ab)
            np.testing.assert_allclose(nll(x, ab), expected, rtol=1e-10)
            reference = partial(ref_nll, params, class_index, measurements, ab=ab)
            np.testing.assert_allclose(grad(x, ab), finite_difference_grad(reference, x),
                                       rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("class_index", [1, None])
def test_exact_posterior_diffuses_to_bayes_rule(x64, class_index):
    """p(x_t | c) = p(x_t) p(c | x_t) / p(c): the diffused exact posterior's score is the prior
    score minus the gradient of the joint exact NLL, and p(c) = p(c | x_t) at ab = 0."""
    gmm = gaussian_mixture(*random_params(12))
    measurements = [random_measurement(13, rows=1), random_measurement(14, rows=2, sigma=0.7)]
    posterior = exact_posterior(gmm, class_index, measurements)
    nll = joint_exact_nll(gmm, class_index, measurements)
    grad = jax.jit(jax.grad(nll))
    log_evidence = -nll(POINTS[0], 0.0)
    for x in POINTS:
        for ab in (0.2, 0.7, 1.0):
            np.testing.assert_allclose(marginal_score(posterior, x, ab),
                                       marginal_score(gmm, x, ab) - grad(x, ab),
                                       rtol=1e-8, atol=1e-9)
            np.testing.assert_allclose(marginal_log_prob(posterior, x, ab),
                                       marginal_log_prob(gmm, x, ab) - nll(x, ab) - log_evidence,
                                       rtol=1e-9)


def test_exact_posterior_is_class_component_conditioned_on_stacked_rows(x64):
    gmm = gaussian_mixture(*random_params(15))
    m1, m2 = random_measurement(16, rows=1, sigma=0.3), random_measurement(17, rows=2, sigma=0.5)
    posterior = exact_posterior(gmm, 0, [m1, m2])
    reference = condition_on_linear(select_component(gmm, 0), np.vstack([m1.A, m2.A]),
                                    np.r_[m1.y, m2.y], np.array([0.3, 0.5, 0.5]))
    for a, b in zip(posterior, reference):
        np.testing.assert_allclose(a, b, atol=1e-12)
    assert exact_posterior(gmm, 2, []).means.shape == (1, 3)
    np.testing.assert_allclose(exact_posterior(gmm, None, [m1]).means,
                               condition_on_linear(gmm, m1.A, m1.y, 0.3).means)


def test_validation():
    gmm = gaussian_mixture(*random_params(18))
    with pytest.raises(ValueError, match="give a class_index, measurements, or both"):
        joint_exact_nll(gmm, None, [])
    with pytest.raises(ValueError, match="class index must be an integer"):
        class_condition(gmm, 3)
    with pytest.raises(ValueError, match=r"A of shape \(m, 3\)"):
        measurement_condition(gmm, LinearMeasurement(np.ones((2, 4)), np.ones(2), 0.1))
    with pytest.raises(ValueError, match="sigma must be a positive scalar"):
        joint_exact_nll(gmm, 0, [LinearMeasurement(np.ones((2, 3)), np.ones(2), -1.0)])
    with pytest.raises(ValueError, match="dim must be an int >= 2"):
        make_testbed(jax.random.PRNGKey(0), 1)
    with pytest.raises(ValueError, match="class_index must be an int in"):
        make_testbed(jax.random.PRNGKey(0), 4, num_components=3, class_index=3)
    with pytest.raises(ValueError, match="noise_stds must be two positive numbers"):
        make_testbed(jax.random.PRNGKey(0), 4, noise_stds=(0.1,))


@pytest.fixture(scope="module")
def testbed64():
    return make_testbed(jax.random.PRNGKey(0), 64)


def columns_seen(A):
    return set(np.flatnonzero(np.any(np.asarray(A) != 0, axis=0)))


@pytest.mark.parametrize("dim", [2, 64])
def test_make_testbed_shapes_and_layout(dim, testbed64):
    tb = testbed64 if dim == 64 else make_testbed(jax.random.PRNGKey(0), dim)
    assert isinstance(tb, Testbed)
    K = tb.gmm.log_weights.shape[0]
    assert tb.gmm.means.shape == (K, dim) and tb.gmm.eigvecs.shape == (K, dim, dim)
    assert tb.x0_true.shape == (dim,)
    assert [c.name for c in tb.conditions] == ["class", "measurement_1", "measurement_2"]
    assert tb.class_index == 0 and len(tb.measurements) == 2
    assert tb.posterior.means.shape == (1, dim)
    seen = [columns_seen(m.A) for m in tb.measurements]
    assert seen[0] & seen[1], "the two measurements must share coordinates"
    if dim == 64:
        assert seen[0] == set(range(40)) and seen[1] == set(range(24, 64))
        assert all(m.A.shape == (20, 64) for m in tb.measurements)
    for m, sigma in zip(tb.measurements, (0.1, 0.2)):
        np.testing.assert_allclose(m.sigma, sigma)
    # Means are well separated relative to within-component spread.
    gaps = np.linalg.norm(tb.gmm.means[:, None] - tb.gmm.means[None], axis=-1)
    gaps = gaps[np.triu_indices(K, 1)]
    assert gaps.min() > 2.5 * np.sqrt(np.asarray(tb.gmm.eigvals).max())


def test_make_testbed_is_deterministic(testbed64):
    again = make_testbed(jax.random.PRNGKey(0), 64)
    def leaves(tb):
        return jax.tree_util.tree_leaves((tb.gmm, tb.measurements, tb.posterior, tb.x0_true))

    for a, b in zip(leaves(testbed64), leaves(again)):
        np.testing.assert_array_equal(a, b)
    other = make_testbed(jax.random.PRNGKey(1), 64)
    assert not np.allclose(other.x0_true, testbed64.x0_true)


def test_make_testbed_posterior_is_informative(testbed64):
    tb = testbed64
    weights = np.exp(np.asarray(tb.gmm.log_weights))
    means = np.asarray(tb.gmm.means)
    prior_mean = weights @ means
    covs = np.einsum("kij,kj,klj->kil", tb.gmm.eigvecs, tb.gmm.eigvals, tb.gmm.eigvecs)
    second_moment = np.einsum("k,kij->ij", weights, covs + np.einsum("ki,kj->kij", means, means))
    prior_cov = second_moment - np.outer(prior_mean, prior_mean)
    post_mean = np.asarray(tb.posterior.means[0])
    post_cov = np.einsum("ij,j,lj->il", tb.posterior.eigvecs[0], tb.posterior.eigvals[0],
                         tb.posterior.eigvecs[0])
    # Far from the prior mean, much tighter than the prior and tighter than the class component.
    assert np.linalg.norm(post_mean - prior_mean) > 3 * np.sqrt(np.trace(post_cov))
    assert np.trace(post_cov) < 0.1 * np.trace(prior_cov)
    k = tb.class_index
    class_cov = np.einsum("ij,j,lj->il", tb.gmm.eigvecs[k], tb.gmm.eigvals[k], tb.gmm.eigvecs[k])
    assert np.trace(post_cov) < 0.7 * np.trace(class_cov)
    # The measurements matter beyond the class: the posterior is far (in KL) from the class
    # component, and the truth is typical under it.
    resid = means[k] - post_mean
    kl = 0.5 * (np.trace(np.linalg.solve(class_cov, post_cov)) - 64
                + resid @ np.linalg.solve(class_cov, resid)
                + np.linalg.slogdet(class_cov)[1] - np.linalg.slogdet(post_cov)[1])
    assert kl > 10.0
    resid = np.asarray(tb.x0_true) - post_mean
    assert resid @ np.linalg.solve(post_cov, resid) < chi2.ppf(0.999, df=64)


def test_make_testbed_conditions_are_consistent(testbed64):
    tb = testbed64
    x = tb.x0_true
    cls, m1, m2 = tb.conditions
    np.testing.assert_allclose(cls.exact_nll(x, 1.0), cls.energy(x), rtol=1e-5, atol=1e-6)
    for cond, meas in zip((m1, m2), tb.measurements):
        rows = meas.y.shape[0]
        np.testing.assert_allclose(
            cond.exact_nll(x, 1.0),
            cond.energy(x) + 0.5 * rows * np.log(2 * np.pi * float(meas.sigma) ** 2), rtol=1e-4)


def test_outside_support_counts_blowups_not_outliers():
    """Diverged = farther than ``r_k = 10 sqrt(d lambda_max(C_k))`` from every mean, a set whose
    prior mass is below ``exp(-40 d)`` (checked with scipy's chi-square tail), or non-finite."""
    for d in (2, 3, 64):
        assert chi2.logsf(100 * d, df=d) < -40 * d
    weights, means, covs = random_params(19)
    gmm = gaussian_mixture(weights, means, covs)
    radii = support_radii(gmm)
    np.testing.assert_allclose(radii, 10 * np.sqrt(3 * np.linalg.eigvalsh(covs).max(axis=1)), rtol=1e-6)
    # Around the mean farthest from the others, along the direction away from them.
    k = int(np.argmax(np.linalg.norm(means - means.mean(0), axis=1)))
    away = (means[k] - means.mean(0)) / np.linalg.norm(means[k] - means.mean(0))
    points = np.stack([means[k] + s * radii[k] * away for s in (0.0, 0.99, 1.01 * max(radii) / radii[k] + 3.0)]
                      + [np.full(3, 1e30), np.array([np.nan, 0.0, 0.0]), np.array([np.inf, 0.0, 0.0])])
    np.testing.assert_array_equal(outside_support(gmm, points), [False, False, True, True, True, True])
    # every prior sample is inside
    prior = sample_mixture(jax.random.PRNGKey(0), gmm, 2000)
    assert not outside_support(gmm, prior).any()


@pytest.mark.xdist_group("demo")  # the settings of tests/test_cli.py: the same programs
def test_demo_whose_samples_all_diverge_finishes(tmp_path, monkeypatch):
    """A huge guidance scale throws every independent sample out of the prior's support: the run
    reports its samples as diverged and None metrics; the unguided run is scored as usual."""
    original = _testbed_demo._runs
    monkeypatch.setattr(_testbed_demo, "_runs", lambda conds: original(conds)[:2])  # none, independent
    settings = DemoSettings(dims=(2,), num_samples=32, num_steps=10, guidance_scale=1e30)
    report = _testbed_demo.run_testbed_demo(tmp_path / "demo", settings)
    rows = {r["scheme"]: r for r in report["results"]}
    assert json.loads((tmp_path / "demo" / "report.json").read_text())["results"] == report["results"]
    assert "10 sqrt(d lambda_max(C_k))" in report["settings_notes"]["diverged_samples"]
    guided, unguided = rows["independent"], rows["none"]
    assert guided["diverged_samples"] == 32 and guided["all_diverged"]
    assert guided["energy_distance"] is None and guided["sliced_wasserstein"] is None
    assert all(v["mean"] is None and v["std"] is None for v in guided["final_energy"].values())
    assert unguided["diverged_samples"] == 0 and not unguided["all_diverged"] and unguided["energy_distance"] > 0
    assert rows["exact posterior"]["diverged_samples"] == 0
