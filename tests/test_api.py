"""The open, differentiable core API: hyper-parameters are leaves, weights are arguments, schemes are
data, kernels compose with the caller's own jit / vmap / grad, geometry is recorded on request."""
import os
import subprocess
import sys
import textwrap
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zmagic_jax as zm
from tests.conftest import _gaussian_apply, _mlp_apply, gaussian_denoiser, mlp_denoiser

SCHEDULE = zm.linear_schedule()
MEAN, VAR = [0.5, -0.5, 0.0], [0.4, 0.6, 0.3]


def left(target, x0):
    return jnp.sum((x0[:2] - target) ** 2)


def right(target, x0):
    return jnp.sum(jnp.sin(x0[1:] + target) ** 2)


def _perturbed_apply(params, x, t):
    """The exact Gaussian denoiser plus a small random MLP: stable trajectories, and a Jacobian
    that is not symmetric, as a real network's."""
    gaussian, mlp = params
    return _gaussian_apply(gaussian, x, t) + 0.1 * _mlp_apply(mlp, x, t)


def perturbed_denoiser(dtype=jnp.float64):
    return zm.Denoiser(_perturbed_apply, (gaussian_denoiser(SCHEDULE, MEAN, VAR, dtype).params,
                                          mlp_denoiser(jax.random.PRNGKey(2), 3, dtype=dtype).params))


def _correction(params, x, t):
    return params * jnp.tanh(x) * (1.0 + t / 1000.0)


def central_difference(f, s, h=1e-6):
    """Fourth-order central difference (the guided chains are stiff: second order needs tiny h)."""
    return (8 * (f(s + h) - f(s - h)) - (f(s + 2 * h) - f(s - 2 * h))) / (12 * h)


def _final_energy(x):
    return left(0.3, x) + jnp.sum(x ** 2)


RULES = {
    "freedom": lambda s: zm.freedom_rule(s),
    "norm_relative": lambda s: zm.norm_relative_rule(s),
    "score": lambda s: zm.score_rule(s),
    "cfg_relative": lambda s: zm.cfg_relative_rule(s, zm.Denoiser(_correction, 0.7)),
    "schedule": lambda s: zm.schedule_rule(s * jnp.linspace(0.0, 1.0, 4)),
}
SCHEMES = {"independent": zm.independent, "dependent": zm.dependent, "multi": zm.multi}


def _chain_energy(rule, scheme, den, sampler=None, steps=4):
    ctxs = zm.step_contexts(SCHEDULE, zm.timestep_grid(1000, steps), jnp.float64)
    x_T = jax.random.normal(jax.random.PRNGKey(0), (3,), jnp.float64)
    c1 = zm.condition("left", left, rule, 0.3)
    c2 = zm.condition("right", right, zm.norm_relative_rule(0.05), 0.2)
    x, _, finite = zm.sample_chain(jax.random.PRNGKey(3), x_T, ctxs, denoiser=den, scheme=scheme([c1, c2]),
                                   sampler=sampler or zm.ddpm_posterior())
    return _final_energy(x)


# Every rule under the dependent scheme (whose look-ahead map holds rho as a number while the outer
# derivative sees it all), and FreeDoM's rule under the other two schemes.
CASES = [(rule, "dependent") for rule in RULES] + [("freedom", "independent"), ("freedom", "multi")]


@pytest.mark.parametrize("rule, scheme", CASES)
def test_grad_through_the_chain_equals_finite_differences(x64, rule, scheme):
    den = perturbed_denoiser()
    f = lambda s: _chain_energy(RULES[rule](s), SCHEMES[scheme], den)
    f = jax.jit(f)
    s = 0.2
    grad, fd = jax.grad(f)(s), central_difference(f, s)
    assert abs(fd) > 1e-6  # the scale matters, so the check has teeth
    assert abs(grad - fd) <= 1e-5 * abs(fd), (float(grad), float(fd))


def test_grad_reaches_cagrad_c_and_ddim_eta(x64):
    den = perturbed_denoiser()
    checks = {"c": lambda v: _chain_energy(zm.freedom_rule(0.2), lambda cs: zm.multi(cs, c=v), den),
              "eta": lambda v: _chain_energy(zm.freedom_rule(0.2), zm.independent, den, zm.ddim(v))}
    for name, f in checks.items():
        f, v = jax.jit(f), 0.4
        grad, fd = jax.grad(f)(v), central_difference(f, v)
        assert abs(fd) > 1e-6 and abs(grad - fd) <= 1e-5 * abs(fd), (name, float(grad), float(fd))


def test_vmap_over_scales_equals_a_loop():
    den = gaussian_denoiser(SCHEDULE, MEAN, VAR)
    ctxs = zm.step_contexts(SCHEDULE, zm.timestep_grid(1000, 8))
    x_T = jax.random.normal(jax.random.PRNGKey(0), (3,))

    def run(scale):
        scheme = zm.dependent([zm.condition("left", left, zm.freedom_rule(scale), 0.3),
                               zm.condition("right", right, zm.score_rule(scale), 0.2)])
        return zm.sample_chain(jax.random.PRNGKey(1), x_T, ctxs, denoiser=den, scheme=scheme,
                               sampler=zm.ddim(0.5))[0]

    scales = jnp.array([0.0, 0.1, 0.5, 2.0])
    batched = jax.jit(jax.vmap(run))(scales)
    looped = jnp.stack([jax.jit(run)(s) for s in scales])
    np.testing.assert_allclose(batched, looped, rtol=1e-5, atol=1e-6)
    assert not np.allclose(batched[0], batched[-1])


def _rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def test_new_scales_and_weights_never_retrace_and_memory_stays_flat():
    traces = []

    def apply(params, x, t):
        traces.append(1)
        weights, mean = params
        return 0.1 * x - 1e-9 * jnp.sum(weights) + 0.0 * mean

    x_T = jnp.zeros((2, 3))
    grid = zm.timestep_grid(1000, 5)
    weights = jnp.zeros((4 * 1024 * 1024,), jnp.float32)  # 16 MB of "weights"

    def call(scale, w):
        den = zm.Denoiser(apply, (w, jnp.float32(0.0)))
        scheme = zm.independent([zm.condition("left", left, zm.freedom_rule(scale, stop=100), 0.3)])
        return zm.sample(jax.random.PRNGKey(0), x_T, SCHEDULE, grid, denoiser=den, scheme=scheme).x0

    jax.block_until_ready(call(0.5, weights))
    traces.clear()
    before = _rss_mb()
    outputs = [call(0.5 + i, weights + i) for i in range(10)]
    jax.block_until_ready(outputs)
    grown = _rss_mb() - before
    assert not traces, f"retraced {len(traces)} times"
    assert not np.allclose(outputs[0], outputs[-1])
    # Weights closed over as constants would keep ~32 MB per call alive in the jit cache (320 MB).
    assert grown < 80, f"RSS grew by {grown:.0f} MB over 10 calls"


class Averaged(NamedTuple):
    """A scheme written outside the package: the weighted mean of the conditions' displacements."""
    conditions: tuple
    weight: jnp.ndarray

    def direction(self, x, ctx, noise, *, denoiser, sampler, detail=False):
        n = len(self.conditions)
        energies, grads, eps = zm.energies_and_grads(x, ctx.t, ctx.alpha_bar, conditions=self.conditions,
                                                     denoiser=denoiser, rows=tuple(range(n)))
        rhos = jnp.stack([c.rule.rho(ctx, eps, g, x) * c.rule.active(ctx) for c, g in zip(self.conditions, grads)])
        d = -self.weight * jnp.tensordot(rhos, grads, 1) / n
        return eps, d, zm.guidance_info(x, energies, d, detail=detail)


def test_a_scheme_defined_here_runs_through_sample_and_step():
    den = gaussian_denoiser(SCHEDULE, MEAN, VAR)
    conds = (zm.condition("left", left, zm.freedom_rule(0.5), 0.3), zm.condition("right", right, zm.freedom_rule(0.5), 0.2))
    grid = zm.timestep_grid(1000, 10)
    x_T = jax.random.normal(jax.random.PRNGKey(0), (4, 3))
    mine = zm.sample(jax.random.PRNGKey(1), x_T, SCHEDULE, grid, denoiser=den, scheme=Averaged(conds, 2.0))
    ref = zm.sample(jax.random.PRNGKey(1), x_T, SCHEDULE, grid, denoiser=den, scheme=zm.independent(conds))
    np.testing.assert_allclose(mine.x0, ref.x0, rtol=1e-5, atol=1e-6)  # weight 2 / n=2 is FreeDoM's sum
    ctx = zm.step_context(SCHEDULE, grid, 3)
    x1, info = jax.jit(lambda x: zm.step(jax.random.PRNGKey(2), x, ctx, denoiser=den, scheme=Averaged(conds, 1.0),
                                         sampler=zm.ddim()))(x_T[0])
    assert x1.shape == (3,) and bool(info.guided) and info.energies.shape == (2,)


def test_step_in_my_own_loop_reproduces_sample():
    den = gaussian_denoiser(SCHEDULE, MEAN, VAR)
    scheme = zm.multi([zm.condition("left", left, zm.freedom_rule(0.5), 0.3),
                       zm.condition("right", right, zm.norm_relative_rule(0.1), 0.2)])
    grid = zm.timestep_grid(1000, 6)
    sampler = zm.ddpm_posterior()
    x_T = jax.random.normal(jax.random.PRNGKey(0), (2, 3))
    key = jax.random.PRNGKey(4)
    out = zm.sample(key, x_T, SCHEDULE, grid, denoiser=den, scheme=scheme, sampler=sampler)
    # the same compiled vmapped step as sample's scan body, driven from Python
    one_step = jax.jit(jax.vmap(lambda k, x, ctx: zm.step(k, x, ctx, denoiser=den, scheme=scheme, sampler=sampler),
                                in_axes=(0, 0, None)))
    keys, x = jax.random.split(key, 2), x_T
    for i in range(grid.num_steps):
        x, info = one_step(jax.vmap(lambda k: jax.random.fold_in(k, i))(keys), x, zm.step_context(SCHEDULE, grid, i))
    # Outside the scan XLA fuses the step differently, so equality is to float32 round-off, not bits.
    np.testing.assert_allclose(x, out.x0, rtol=2e-6, atol=2e-6)
    np.testing.assert_allclose(info.energies, out.trace.energies[:, -1], rtol=2e-6, atol=2e-6)


def test_direction_with_score_rule_on_a_step_context_is_the_sampler_driven_value():
    den = gaussian_denoiser(SCHEDULE, MEAN, VAR)
    grid = zm.timestep_grid(1000, 10)
    scheme = zm.independent([zm.condition("left", left, zm.score_rule(1.0), 0.3)])
    sampler = zm.ddpm_posterior()
    x = jnp.array([0.3, -0.2, 0.1])
    ctx = zm.step_context(SCHEDULE, grid, 4)
    _, d, _ = zm.direction(x, ctx, jnp.zeros(3), scheme=scheme, denoiser=den, sampler=sampler)
    assert float(jnp.linalg.norm(d)) > 0
    record = zm.Record(lambda x_next, info: info.displacement_norm)
    norms = zm.sample(jax.random.PRNGKey(0), x[None], SCHEDULE, zm.TimestepGrid(grid.t[4:5], grid.t_next[4:5]),
                      denoiser=den, scheme=scheme, sampler=sampler, record=record).trace
    np.testing.assert_allclose(norms[0, 0], jnp.linalg.norm(d), rtol=1e-6)
    # and it is score_coef times the likelihood-gradient step
    g = jax.grad(lambda y: left(0.3, zm.x0_from_eps(y, den(y, ctx.t), ctx.alpha_bar)))(x)
    np.testing.assert_allclose(d, -sampler.score_coef(ctx) * g, rtol=1e-5)


def test_a_custom_rule_with_python_bools_and_numbers_works():
    rule = zm.StepRule("half", lambda hyper, ctx, eps, grad, x: 0.5, active_fn=lambda rule, ctx: True)
    den = gaussian_denoiser(SCHEDULE, MEAN, VAR)
    out = zm.sample(jax.random.PRNGKey(0), jnp.zeros((2, 3)), SCHEDULE, zm.timestep_grid(1000, 5), denoiser=den,
                    scheme=zm.dependent([zm.condition("left", left, rule, 0.3), zm.condition("r", right, rule, 0.2)]))
    assert bool(jnp.all(out.trace.guided)) and bool(jnp.all(out.finite))


def _numpy_ddim(x, steps):
    """Unguided deterministic DDIM with the exact Gaussian denoiser, in numpy float64."""
    ab = np.cumprod(1 - np.linspace(1e-4, 0.02, 1000))
    grid = zm.timestep_grid(1000, steps)
    mean, var = np.asarray(MEAN), np.asarray(VAR)
    for t, tn in zip(grid.t, grid.t_next):
        a, an = ab[t], (1.0 if tn < 0 else ab[tn])
        eps = np.sqrt(1 - a) * (x - np.sqrt(a) * mean) / (a * var + 1 - a)
        x0 = (x - np.sqrt(1 - a) * eps) / np.sqrt(a)
        x = np.sqrt(an) * x0 + np.sqrt(1 - an) * eps
    return x


def test_a_float64_run_is_float64_throughout(x64):
    den = gaussian_denoiser(SCHEDULE, MEAN, VAR, dtype=jnp.float64)
    x_T = np.random.default_rng(0).normal(size=(4, 3))
    out = zm.sample(jax.random.PRNGKey(0), jnp.asarray(x_T), SCHEDULE, zm.timestep_grid(1000, 50), denoiser=den,
                    sampler=zm.ddim(0.0))
    assert out.x0.dtype == jnp.float64
    expected = np.stack([_numpy_ddim(x, 50) for x in x_T])
    np.testing.assert_allclose(np.asarray(out.x0), expected, rtol=1e-12, atol=1e-12)


def test_record_detail_gives_gradients_term2_and_its_parts(x64):
    den = perturbed_denoiser()
    conds = [zm.condition("left", left, zm.freedom_rule(0.5), 0.3), zm.condition("right", right, zm.freedom_rule(0.4), 0.2)]
    grid = zm.timestep_grid(1000, 5)
    x_T = jax.random.normal(jax.random.PRNGKey(0), (2, 3), jnp.float64)
    sampler = zm.ddpm_posterior()
    plain = zm.sample(jax.random.PRNGKey(1), x_T, SCHEDULE, grid, denoiser=den, scheme=zm.dependent(conds, order=(1, 0)),
                      sampler=sampler)
    full = zm.sample(jax.random.PRNGKey(1), x_T, SCHEDULE, grid, denoiser=den, scheme=zm.dependent(conds, order=(1, 0)),
                     sampler=sampler, record=zm.Record(detail=True))
    assert plain.trace.gradients is None and plain.trace.term2 is None
    np.testing.assert_allclose(full.x0, plain.x0, rtol=1e-12)  # detail changes what is recorded, not the step
    info = full.trace
    assert info.gradients.shape == (2, 5, 2, 3) and info.term2.shape == (2, 5, 2, 2, 3)
    t2 = info.term2[:, :, 1, 0]  # the pair: "right" (1) leads, "left" (0) follows
    np.testing.assert_allclose(jnp.linalg.norm(t2, axis=-1), info.term2_norms[:, :, 1, 0], rtol=1e-10)
    assert np.all(np.isnan(np.asarray(info.term2_norms[:, :, 0, 1])))  # no such pair
    # the parts are two vectors summing to term II: |a + b| <= |a| + |b|
    assert np.all(info.score_part_norms[:, :, 1, 0] + info.hessian_part_norms[:, :, 1, 0]
                  >= info.term2_norms[:, :, 1, 0] * (1 - 1e-12))
    assert np.all(np.isnan(np.asarray(plain.trace.score_part_norms)[np.asarray(plain.trace.guided)]))
    # the recorded gradients are the per-condition gradients at x_t, so both cosines are available
    assert np.all(np.isfinite(np.asarray(info.condition_cosines[:, :, 0, 1])))
    assert np.all(np.isnan(np.asarray(plain.trace.condition_cosines[:, :, 0, 1])))
    # term II equals dependent_terms' at the same point: check step 2 of sample 0 by hand
    ctx = zm.step_context(SCHEDULE, grid, 0, jnp.float64)
    key = jax.random.fold_in(jax.random.split(jax.random.PRNGKey(1), 2)[0], 0)
    noise = sampler.noise_std(ctx) * jax.random.normal(jax.random.split(key, 1)[-1], (3,), jnp.float64)
    terms = zm.dependent_terms(x_T[0], ctx, noise, conditions=tuple(conds), denoiser=den, sampler=sampler,
                               leaders=(1,), followers=((0,),), detail=True)
    np.testing.assert_allclose(terms.term2[0, 0], info.term2[0, 0, 1, 0], rtol=1e-10)
    np.testing.assert_allclose(terms.score_parts[0, 0] + terms.hessian_parts[0, 0], terms.term2[0, 0], rtol=1e-10)
    np.testing.assert_allclose(jnp.linalg.norm(terms.hessian_parts[0, 0]), info.hessian_part_norms[0, 0, 1, 0],
                               rtol=1e-10)


SHARDED = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=4"
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh
    import zmagic_jax as zm
    from tests.conftest import gaussian_denoiser
    from tests.test_api import left
    assert len(jax.devices()) == 4
    schedule = zm.linear_schedule()
    den = gaussian_denoiser(schedule, np.linspace(-1, 1, 8), np.linspace(0.2, 0.8, 8))
    whole = lambda p, x0: jnp.sum((x0 + p) ** 2)
    conds = [zm.condition("left", left, zm.freedom_rule(0.5), 0.3), zm.condition("whole", whole, zm.score_rule(), 0.2)]
    mesh = Mesh(np.array(jax.devices()), ("batch",))
    grid = zm.timestep_grid(1000, 8)
    for scheme, shapes in ((zm.independent(conds), ((32, 8), (8, 3))), (zm.multi(conds), ((8, 3),))):
        for shape in shapes:
            x_T = jax.random.normal(jax.random.PRNGKey(0), shape)
            d = den if shape[1] == 8 else gaussian_denoiser(schedule, [0.5, -0.5, 0.0], [0.4, 0.6, 0.3])
            one = zm.sample(jax.random.PRNGKey(1), x_T, schedule, grid, denoiser=d, scheme=scheme, sampler=zm.ddpm_ancestral())
            four = zm.sample(jax.random.PRNGKey(1), x_T, schedule, grid, denoiser=d, scheme=scheme,
                             sampler=zm.ddpm_ancestral(), mesh=mesh)
            assert len(four.x0.sharding.device_set) == 4
            diff = float(np.max(np.abs(np.asarray(one.x0) - np.asarray(four.x0))))
            print(scheme.name, shape, diff)
            assert diff <= 4e-7 * float(np.max(np.abs(np.asarray(one.x0)))) + 1e-7, (scheme.name, shape, diff)
            np.testing.assert_array_equal(np.asarray(one.finite), np.asarray(four.finite))
""")


def test_sharded_sampling_over_four_host_devices_equals_one_device():
    """To one or two float32 ulps. The sharded run is another XLA program (per-device shapes after
    SPMD partitioning); XLA:CPU vectorises each shape's loops differently and the scalar remainder
    of a partial vector may round a multiply-add differently (measured 6e-8 .. 3e-7). On jax 0.7
    8-float samples (8 per device) came out bit for bit; jax 0.12's XLA differs there by 3e-7."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root)
    out = subprocess.run([sys.executable, "-c", SHARDED], cwd=root, env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]


def test_time_travel_is_differentiable(x64):
    den = perturbed_denoiser()
    grid = zm.timestep_grid(1000, 5)
    ctxs = zm.step_contexts(SCHEDULE, grid, jnp.float64)
    x_T = jax.random.normal(jax.random.PRNGKey(0), (3,), jnp.float64)

    def f(s):
        scheme = zm.independent([zm.condition("left", left, zm.freedom_rule(s), 0.3)])
        x, _, _ = zm.sample_chain(jax.random.PRNGKey(1), x_T, ctxs, denoiser=den, scheme=scheme,
                                  sampler=zm.ddpm_posterior(), time_travel=zm.time_travel(3, start=700, stop=300))
        return _final_energy(x)

    f, s = jax.jit(f), 0.3
    grad, fd = jax.grad(f)(s), central_difference(f, s)
    assert abs(grad - fd) <= 1e-5 * abs(fd), (float(grad), float(fd))
