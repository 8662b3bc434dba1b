"""CAGrad inside ``jit`` against scipy's SLSQP on the same dual problem, and its defining properties.

Every comparison runs in float64 (``enable_x64``, arrays created inside) except the float32 test.
Task gradients are zero-padded to ``D_PAD`` columns: padding changes neither the Gram matrix nor the
direction, so each function compiles once per number of tasks ``K``.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import minimize

from zmagic_jax.schemes import cagrad, cagrad_weights

C = 0.5
D_PAD = 50
TOL = 1e-4

_cagrad = jax.jit(cagrad, static_argnames=("rescale", "num_iters"))


@jax.jit
def _solve(grads, c):
    """Unrescaled direction and weights, from one compilation per shape."""
    return cagrad(grads, c, rescale="none"), cagrad_weights(grads @ grads.T, c)


def solve(grads, c=C, dtype=jnp.float64):
    """`_solve` on zero-padded gradients, returned as float64 numpy arrays."""
    d, w = _solve(jnp.asarray(pad(grads), dtype), c)
    return np.asarray(d, np.float64)[: grads.shape[1]], np.asarray(w, np.float64)


# ---------------------------------------------------------------------------------- reference

def dual_objective(w, gram, c):
    """F(w) = g_w . g0 + c |g0| |g_w| written with the Gram matrix, in float64."""
    k = gram.shape[0]
    return (w @ gram @ np.full(k, 1.0 / k)
            + c * np.sqrt(max(gram.mean(), 0.0)) * np.sqrt(max(w @ gram @ w, 0.0)))


def dual_gradient(w, gram, c):
    gw_norm = np.sqrt(max(w @ gram @ w, 0.0))
    radial = gram @ w / gw_norm if gw_norm > 0 else 0.0
    return gram.mean(axis=1) + c * np.sqrt(max(gram.mean(), 0.0)) * radial


def slsqp_weights(gram, c, seed=0, n_random_starts=3):
    """SLSQP (bounds [0, 1], sum w = 1, ftol 1e-12) from the uniform start, every vertex and a few
    random points; the best objective wins. The Gram matrix is first scaled to unit largest
    diagonal: the minimiser does not change, but SLSQP's ftol is absolute."""
    gram = gram / np.max(np.diag(gram))
    k = gram.shape[0]
    rng = np.random.default_rng(seed)
    starts = [np.full(k, 1.0 / k), *np.eye(k), *rng.dirichlet(np.ones(k), n_random_starts)]
    best_w, best_f = None, np.inf
    for x0 in starts:
        res = minimize(dual_objective, x0, args=(gram, c), jac=dual_gradient, method="SLSQP",
                       bounds=[(0.0, 1.0)] * k,
                       constraints=({"type": "eq", "fun": lambda w: np.sum(w) - 1.0,
                                     "jac": lambda w: np.ones((1, k))},),
                       options={"ftol": 1e-12, "maxiter": 1000})
        w = np.clip(res.x, 0.0, None)
        w = w / w.sum()
        f = dual_objective(w, gram, c)
        if f < best_f:
            best_w, best_f = w, f
    return best_w


def direction_from_weights(grads, w, c):
    """d* = g0 + c |g0| g_w / |g_w|, unrescaled."""
    g0, gw = grads.mean(0), w @ grads
    return g0 + c * np.linalg.norm(g0) * gw / np.linalg.norm(gw)


def pad(grads):
    return np.pad(grads, ((0, 0), (0, D_PAD - grads.shape[1])))


def random_task_grads(rng, k, d, shared=0.0):
    """Rows of different lengths; `shared` adds a common component (less conflict)."""
    grads = rng.normal(size=(k, d)) * rng.uniform(0.2, 2.0, size=(k, 1))
    return grads + shared * rng.normal(size=d)


def compare_with_slsqp(grads, c=C, check_direction=True):
    """Objective (relative to max_i |g_i|^2) and unrescaled direction (relative to |d_ref|) of the
    jitted solver against SLSQP; returns both weight vectors."""
    gram = grads @ grads.T
    scale = np.max(np.diag(gram))
    w_ref = slsqp_weights(gram, c)
    d, w = solve(grads, c)
    assert np.all(np.isfinite(d)) and np.all(np.isfinite(w))
    assert np.all(w >= 0) and abs(w.sum() - 1) < 1e-12
    assert abs(dual_objective(w, gram, c) - dual_objective(w_ref, gram, c)) <= TOL * scale
    if not check_direction:
        return w, w_ref
    # The direction is unique when the optimal g_w is not 0; check the test data is such.
    assert np.linalg.norm(w_ref @ grads) > 1e-4 * np.sqrt(scale)
    d_ref = direction_from_weights(grads, w_ref, c)
    assert_close(d, d_ref, TOL)
    # Reference-free: the worst task's progress along d (primal) meets F(w) (dual). This is far
    # tighter than SLSQP, which is the less accurate of the two when the scales are disparate.
    assert dual_objective(w, gram, c) - primal_value(grads, d) <= 1e-10 * scale
    return w, w_ref


def assert_close(actual, desired, rel):
    """Vectors agree within `rel` of the desired one's norm."""
    actual, desired = np.asarray(actual, np.float64), np.asarray(desired, np.float64)
    assert np.linalg.norm(actual - desired) <= rel * np.linalg.norm(desired)


def primal_value(grads, d):
    """min_i g_i . d, the worst task's first-order progress along d."""
    return np.min(grads @ d)


# ------------------------------------------------------------------------ agreement with SLSQP

@pytest.mark.parametrize("k", range(2, 13))
def test_matches_slsqp_on_random_sets(k):
    with jax.enable_x64():
        for seed, (d, shared) in enumerate([(3, 0.0), (8, 0.0), (D_PAD, 0.0), (7, 1.0)]):
            rng = np.random.default_rng(1000 * k + seed)
            w, w_ref = compare_with_slsqp(random_task_grads(rng, k, d, shared))
            if d >= k:  # full row rank: F is strictly convex on the simplex, w is unique
                np.testing.assert_allclose(w, w_ref, atol=1e-4)


@pytest.mark.parametrize("c", [0.1, 0.9, 2.0])
def test_matches_slsqp_for_other_radii(c):
    with jax.enable_x64():
        for k, d in [(2, 5), (4, 3), (7, 20)]:
            compare_with_slsqp(random_task_grads(np.random.default_rng(k), k, d), c)


# ------------------------------------------------------------------------------ special cases

@pytest.mark.parametrize("k", [1, 2, 3, 5])
def test_all_zero_gradients_give_zero(k):
    with jax.enable_x64():
        d, w = solve(np.zeros((k, D_PAD)))
        np.testing.assert_array_equal(d, 0.0)
        assert np.all(np.isfinite(w)) and abs(w.sum() - 1) < 1e-12


def test_a_zero_gradient_among_others():
    with jax.enable_x64():
        rng = np.random.default_rng(0)
        a = rng.normal(size=6)
        grads = np.stack([a, a + 0.3 * rng.normal(size=6), np.zeros(6)])
        # 0 is a vertex and no other point of the hull does better: g_w = 0, so d = g0 exactly,
        # and no direction can make progress on the zero task.
        compare_with_slsqp(grads, check_direction=False)
        np.testing.assert_allclose(solve(grads)[0], grads.mean(0), rtol=1e-12)


@pytest.mark.parametrize("lengths", [(1.0, 3.0), (2.0, 0.5, 5.0, 1.0)])
def test_colinear_same_direction(lengths):
    with jax.enable_x64():
        v = np.random.default_rng(1).normal(size=D_PAD)
        grads = np.asarray(lengths)[:, None] * v
        # g_w = l_w v, so F = l_w mean(l) |v|^2 (1 + c): all weight on the shortest, and
        # d* = g0 + c |g0| v / |v| = (1 + c) g0.
        d, w = solve(grads)
        np.testing.assert_allclose(w, np.eye(len(lengths))[np.argmin(lengths)], atol=1e-9)
        np.testing.assert_allclose(d, (1 + C) * grads.mean(0), rtol=1e-9)


def test_exactly_opposing_pairs():
    with jax.enable_x64():
        rng = np.random.default_rng(2)
        a, b, e = rng.normal(size=(3, D_PAD))
        for grads in (np.stack([a, -a]), np.stack([a, -a, b, -b])):
            np.testing.assert_allclose(solve(grads)[0], 0.0, atol=1e-12)
        # A pair cancels but a third task remains: the optimum is g_w = 0 (ill-posed direction),
        # the output must stay finite and keep at least the mean's worst-task progress.
        for grads in (np.stack([a, -a, b]), np.stack([a, -a, b, e])):
            compare_with_slsqp(grads, check_direction=False)
            assert primal_value(grads, solve(grads)[0]) >= primal_value(grads, grads.mean(0))


@pytest.mark.parametrize("k", [2, 5])
def test_one_gradient_much_larger(k):
    with jax.enable_x64():
        grads = random_task_grads(np.random.default_rng(3), k, 10)
        grads[0] *= 1e3
        compare_with_slsqp(grads)


def test_duplicated_rows():
    with jax.enable_x64():
        grads = random_task_grads(np.random.default_rng(4), 4, 9)
        compare_with_slsqp(np.concatenate([grads[:1], grads]))
        # Duplicating every task changes neither g0 nor the hull of the gradients.
        assert_close(solve(np.concatenate([grads, grads]))[0], solve(grads)[0], 1e-12)


# --------------------------------------------------------------------------------- properties

def test_single_task():
    with jax.enable_x64():
        g = np.random.default_rng(5).normal(size=(1, D_PAD))
        # K = 1: g0 = g_w = g, so d* = (1 + c) g before rescaling.
        expected = {"1+c^2": (1 + C) / (1 + C**2), "1+c": 1.0, "none": 1 + C}
        for rescale, factor in expected.items():
            np.testing.assert_allclose(_cagrad(jnp.asarray(g), C, rescale=rescale), factor * g[0],
                                       rtol=1e-12)
        np.testing.assert_array_equal(solve(g)[1], [1.0])


@pytest.mark.parametrize("k", [2, 5])
def test_zero_radius_gives_the_mean(k):
    with jax.enable_x64():
        grads = random_task_grads(np.random.default_rng(6), k, D_PAD)
        np.testing.assert_allclose(solve(grads, 0.0)[0], grads.mean(0), rtol=1e-12)


@pytest.mark.parametrize("k", [2, 5])
def test_odd_in_the_gradients(k):
    with jax.enable_x64():
        grads = random_task_grads(np.random.default_rng(7), k, D_PAD)
        np.testing.assert_allclose(solve(-grads)[0], -solve(grads)[0], rtol=1e-12)


def test_rescale_options():
    # The rescale is independent of the solver, so K = 2 (cheap to compile) covers it.
    with jax.enable_x64():
        grads = jnp.asarray(random_task_grads(np.random.default_rng(8), 2, D_PAD))
        for c in (0.7, 0.0):
            d = _cagrad(grads, c, rescale="none")
            np.testing.assert_allclose(_cagrad(grads, c), d / (1 + c**2), rtol=1e-12)
            np.testing.assert_allclose(_cagrad(grads, c, rescale="1+c"), d / (1 + c), rtol=1e-12)
        # c = 0: every rescale divides by 1 and d is the mean.
        np.testing.assert_allclose(_cagrad(grads, 0.0), grads.mean(0), rtol=1e-12)


@pytest.mark.parametrize("k", [2, 3, 6, 12])
def test_conflict_averse_and_dual_optimal(k):
    """Against the mean, d never lowers the worst task's progress min_i g_i . d (d* maximises it
    over a ball containing g0), and that progress equals the dual optimum F(w*)."""
    with jax.enable_x64():
        for seed in range(3):
            for c in (0.2, 0.5, 0.9):
                rng = np.random.default_rng(100 * k + seed)
                grads = random_task_grads(rng, k, D_PAD, shared=seed / 2)
                scale = np.max(np.sum(grads**2, axis=1))
                d, w = solve(grads, c)
                progress = primal_value(grads, d)
                assert progress >= primal_value(grads, grads.mean(0)) - 1e-12 * scale
                np.testing.assert_allclose(progress, dual_objective(w, grads @ grads.T, c),
                                           atol=1e-10 * scale)


def test_vmap_matches_per_set():
    with jax.enable_x64():
        rng = np.random.default_rng(9)
        batch = np.stack([random_task_grads(rng, 5, D_PAD) for _ in range(6)])
        batched = jax.jit(jax.vmap(lambda g: cagrad(g, C, rescale="none")))(jnp.asarray(batch))
        for grads, d in zip(batch, batched):
            assert_close(d, solve(grads)[0], 1e-12)


def test_trailing_shape_and_scale():
    with jax.enable_x64():
        grads = random_task_grads(np.random.default_rng(10), 5, D_PAD)
        d = solve(grads)[0]
        shaped = _cagrad(jnp.asarray(grads).reshape(5, 2, 5, 5), C, rescale="none")
        assert shaped.shape == (2, 5, 5)
        assert_close(shaped.reshape(-1), d, 1e-12)
        for s in (1e-3, 1e3):  # positively homogeneous of degree one
            assert_close(solve(s * grads)[0], s * d, 1e-12)


@pytest.mark.parametrize("k", [2, 12])
def test_float32(k):
    rng = np.random.default_rng(11 + k)
    sets = [random_task_grads(rng, k, d) for d in (4, D_PAD)]
    for grads in sets:
        gram = grads @ grads.T
        w_ref = slsqp_weights(gram, C)
        d, w = solve(grads, dtype=jnp.float32)
        assert_close(d, direction_from_weights(grads, w_ref, C), 1e-3)
        assert (abs(dual_objective(w, gram, C) - dual_objective(w_ref, gram, C))
                <= 1e-3 * np.max(np.diag(gram)))
    # Gradients far outside float32's squared range still work: the solve is scale-free.
    for s in (1e25, 1e-25):
        assert_close(solve(s * sets[0], dtype=jnp.float32)[0] / s,
                     solve(sets[0], dtype=jnp.float32)[0], 1e-3)


def test_dtype_follows_input():
    for dtype in (jnp.float32, jnp.float16):
        d, w = _solve(jnp.ones((2, 3), dtype), C)
        assert d.dtype == dtype and w.dtype == dtype


# ------------------------------------------------------------------------------- bad input

@pytest.mark.parametrize("kwargs, name", [
    ({"task_grads": np.ones(3)}, "task_grads"),
    ({"task_grads": np.ones((0, 3))}, "task_grads"),
    ({"task_grads": np.ones((2, 3)), "c": -0.1}, "c"),
    ({"task_grads": np.ones((2, 3)), "c": np.ones(2)}, "c"),
    ({"task_grads": np.ones((2, 3)), "rescale": "1+c2"}, "rescale"),
    ({"task_grads": np.ones((3, 3)), "num_iters": 0}, "num_iters"),
])
def test_bad_input_names_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=rf"^{name} must"):
        cagrad(**kwargs)


def test_bad_rescale_lists_the_valid_names():
    with pytest.raises(ValueError) as info:
        cagrad(np.ones((2, 3)), rescale="sum")
    for valid in ("1+c^2", "1+c", "none"):
        assert repr(valid) in str(info.value)


@pytest.mark.parametrize("gram", [np.ones(3), np.ones((2, 3)), np.ones((0, 0))])
def test_bad_gram_names_the_argument(gram):
    with pytest.raises(ValueError, match=r"^gram must"):
        cagrad_weights(gram)
