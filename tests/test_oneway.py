"""COW's kernels (zmagic_jax.oneway) against hand-computed values: levels, inversion, the exact
noise jump, the one-way property, C = 0 as inversion-based replacement, one program for any C."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import zmagic_jax as zm
from zmagic_jax import oneway
from tests.conftest import gaussian_denoiser, mlp_denoiser

SCHEDULE = zm.linear_schedule()
N = 10
GRID = zm.timestep_grid(1000, N)
DIM = 8


def _contexts(dtype=jnp.float32):
    return zm.step_contexts(SCHEDULE, GRID, dtype)


def test_levels_by_hand():
    lv = oneway.levels(_contexts())
    # leading grid of 10: steps start at 900, 800, ..., 0 and the last ends clean (-1, ab = 1)
    np.testing.assert_array_equal(lv.t, [-1, 0, 100, 200, 300, 400, 500, 600, 700, 800, 900])
    ab = SCHEDULE.alphas_cumprod
    np.testing.assert_allclose(lv.alpha_bar, np.concatenate([[1.0], ab[[0, 100, 200, 300, 400, 500, 600, 700, 800,
                                                                          900]]]), rtol=1e-6)


def test_settings_defaults_and_errors():
    s = oneway.one_way()
    assert (s.replace, s.back, s.preserve, s.cycles, s.jump) == (5, 7, 4, 10, "level")
    assert float(s.cycle_sampler.hyper.eta) == 1.0 and float(s.final_sampler.hyper.eta) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="preserve <= replace < back <= num_steps"):
        oneway.one_way(10, replace=7, back=7)
    with pytest.raises(ValueError, match="jump must be one of"):
        oneway.one_way(jump="off-by-one")
    with pytest.raises(ValueError, match="back \\+ 1 = 11"):
        oneway.one_way(10, back=10, jump="released")
    with pytest.raises(ValueError, match="cycles must be a non-negative integer"):
        oneway.one_way(cycles=-1)


def test_inversion_by_hand_and_as_ddim_invert(x64):
    den = mlp_denoiser(jax.random.PRNGKey(0), DIM, dtype=jnp.float64)
    ctx = _contexts(jnp.float64)
    x0 = jax.random.normal(jax.random.PRNGKey(1), (DIM,), jnp.float64)
    for at in ("target", "source"):
        traj = oneway.invert_levels(x0, ctx, 6, denoiser=den, at=at)
        assert traj.shape == (7, DIM)
        lv = oneway.levels(ctx)
        x = np.asarray(x0)
        np.testing.assert_array_equal(traj[0], x0)
        for k in range(6):  # level k -> k + 1 by hand
            ab_s, ab_t = float(lv.alpha_bar[k]), float(lv.alpha_bar[k + 1])
            t = int(lv.t[k + 1]) if at == "target" or k == 0 else int(lv.t[k])
            eps = np.asarray(den(jnp.asarray(x), t))
            x = np.sqrt(ab_t) * (x - np.sqrt(1 - ab_s) * eps) / np.sqrt(ab_s) + np.sqrt(1 - ab_t) * eps
            np.testing.assert_allclose(traj[k + 1], x, rtol=1e-12, atol=1e-12)
    full = oneway.invert_levels(x0, ctx, N, denoiser=den, at="source")
    np.testing.assert_allclose(full[-1], zm.ddim_invert(x0, SCHEDULE, GRID, denoiser=den), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="upto must be a level 0..10"):
        oneway.invert_levels(x0, ctx, 11, denoiser=den)


def test_inversion_then_reconstruction_converges_with_the_exact_denoiser(x64):
    """On a Gaussian prior the exact eps makes DDIM a discretised probability-flow ODE: inverting
    and sampling back returns the data up to a first-order discretisation error (measured: 0.0206
    / 0.0105 at 100 / 200 steps with the target convention, 0.0367 / 0.0186 with the source one)."""
    den = gaussian_denoiser(SCHEDULE, np.full(DIM, 0.5), np.full(DIM, 0.3), jnp.float64)
    x0 = 0.5 + np.sqrt(0.3) * np.random.default_rng(0).normal(size=DIM)
    for at in ("target", "source"):
        errors = []
        for n in (100, 200):
            ctx = zm.step_contexts(SCHEDULE, zm.timestep_grid(1000, n), jnp.float64)
            up = oneway.invert_levels(jnp.asarray(x0), ctx, n, denoiser=den, at=at)[-1]
            back, _ = jax.lax.scan(lambda x, c: (zm.ddim(0.0).mean(x, den(x, c.t), c), None), up, ctx)
            errors.append(np.abs(np.asarray(back) - x0).max())
        assert errors[1] < 0.02 and 1.8 < errors[0] / errors[1] < 2.2, (at, errors)


def test_noise_jump_has_the_forward_process_moments(x64):
    """x0 ~ N(m, s^2), x_r ~ q(x_r | x0), then the jump: x_b must be distributed as q(x_b | x0)
    marginally, N(sqrt(ab_b) m, ab_b s^2 + 1 - ab_b); checked to 5 standard errors."""
    ab = SCHEDULE.alphas_cumprod
    ab_r, ab_b = float(ab[400]), float(ab[600])
    m, s, n = 0.7, 0.4, 200_000
    k0, k1, k2 = jax.random.split(jax.random.PRNGKey(0), 3)
    x0 = m + s * jax.random.normal(k0, (n,), jnp.float64)
    x_r = np.sqrt(ab_r) * x0 + np.sqrt(1 - ab_r) * jax.random.normal(k1, (n,), jnp.float64)
    x_b = np.asarray(jax.vmap(oneway.noise_jump, (0, 0, None, None))(jax.random.split(k2, n), x_r, ab_r, ab_b))
    var = ab_b * s ** 2 + 1 - ab_b
    assert abs(x_b.mean() - np.sqrt(ab_b) * m) < 5 * np.sqrt(var / n)
    assert abs(x_b.var() - var) < 5 * var * np.sqrt(2 / n)
    # and conditionally on x_r: mean sqrt(a) x_r, variance 1 - a
    a = ab_b / ab_r
    np.testing.assert_allclose(np.cov(x_b, x_r)[0, 1] / x_r.var(), np.sqrt(a), atol=5e-3)


def _setup(dtype=jnp.float32, cycles=3, **kw):
    den = mlp_denoiser(jax.random.PRNGKey(0), DIM, dtype=dtype)
    ctx = _contexts(dtype)
    settings = oneway.one_way(N, cycles=cycles, **kw)
    condition = jax.random.normal(jax.random.PRNGKey(1), (DIM,), dtype)
    canvas = jax.random.normal(jax.random.PRNGKey(2), (DIM,), dtype)
    mask = (jnp.arange(DIM) < 3).astype(dtype)
    anchors = oneway.invert_levels(condition, ctx, settings.back, denoiser=den)
    start = oneway.invert_levels(canvas, ctx, settings.replace, denoiser=den)[-1]
    return den, ctx, settings, anchors, start, mask


def test_the_condition_region_holds_the_anchors_bit_for_bit():
    den, ctx, settings, anchors, start, mask = _setup()
    x0, info = oneway.one_way_chain(jax.random.PRNGKey(3), start, anchors, mask, ctx, denoiser=den,
                                    settings=settings, record=True)
    r, b = settings.replace, settings.back
    inside = np.asarray(mask) > 0.5
    assert info.cycles.shape == (3, b - r + 1, DIM)
    for c in range(3):
        for j, level in enumerate(range(b, r - 1, -1)):
            np.testing.assert_array_equal(np.asarray(info.cycles[c, j])[inside], np.asarray(anchors[level])[inside])
    np.testing.assert_array_equal(np.asarray(info.preserved)[inside], np.asarray(anchors[settings.preserve])[inside])
    # outside the region the state moved (the cycles regrow it), and the output is finite
    assert not np.allclose(np.asarray(info.cycles[0, -1])[~inside], np.asarray(start)[~inside])
    assert np.all(np.isfinite(x0))
    # one way: what is outside the region never reaches the region's pasted states
    other = start + 3.0 * (1 - mask)
    _, info2 = oneway.one_way_chain(jax.random.PRNGKey(3), other, anchors, mask, ctx, denoiser=den,
                                    settings=settings, record=True)
    np.testing.assert_array_equal(np.asarray(info2.cycles)[..., inside], np.asarray(info.cycles)[..., inside])


def test_no_cycle_is_inversion_based_replacement(x64):
    """C = 0 with deterministic final steps: DDIM from level r to p, paste z_p, DDIM to 0 (by hand)."""
    den, ctx, settings, anchors, start, mask = _setup(jnp.float64, cycles=0, final_eta=0.0)
    out = oneway.one_way_chain(jax.random.PRNGKey(3), start, anchors, mask, ctx, denoiser=den, settings=settings)
    lv = oneway.levels(ctx)
    x = np.asarray(start)

    def step(x, k):  # level k -> k - 1
        ab, ab_next = float(lv.alpha_bar[k]), float(lv.alpha_bar[k - 1])
        eps = np.asarray(den(jnp.asarray(x), int(lv.t[k])))
        return np.sqrt(ab_next) * (x - np.sqrt(1 - ab) * eps) / np.sqrt(ab) + np.sqrt(1 - ab_next) * eps

    for k in range(settings.replace, settings.preserve, -1):
        x = step(x, k)
    x = np.where(np.asarray(mask) > 0.5, np.asarray(anchors[settings.preserve]), x)
    for k in range(settings.preserve, 0, -1):
        x = step(x, k)
    np.testing.assert_allclose(out, x, rtol=1e-12, atol=1e-12)


def test_the_released_jump_reads_one_level_higher(x64):
    """The state right after the jump (mask empty, so nothing is pasted): its mean over keys is
    sqrt(ab_to / ab_from) x with the levels' alpha-bars (r, b) or one higher (r + 1, b + 1)."""
    lv = oneway.levels(_contexts(jnp.float64))
    for jump, up in (("level", 0), ("released", 1)):
        den, ctx, settings, anchors, start, mask = _setup(jnp.float64, cycles=1, jump=jump)
        keys = jax.random.split(jax.random.PRNGKey(4), 4000)
        run = jax.vmap(lambda k: oneway.one_way_chain(k, start, anchors, jnp.zeros(DIM), ctx, denoiser=den,
                                                      settings=settings, record=True)[1].cycles[0, 0])
        after = np.asarray(run(keys))
        a = float(lv.alpha_bar[settings.back + up] / lv.alpha_bar[settings.replace + up])
        np.testing.assert_allclose(after.mean(0), np.sqrt(a) * np.asarray(start), atol=5 * np.sqrt((1 - a) / 4000))
        np.testing.assert_allclose(after.var(0), 1 - a, rtol=0.1)


def test_one_program_for_any_cycle_count():
    """C and N only set scan lengths: the traced program has the same equations."""
    den, ctx, _, anchors, start, mask = _setup()

    def size(cycles, n):
        ctx_n = zm.step_contexts(SCHEDULE, zm.timestep_grid(1000, n))
        s = oneway.one_way(n, replace=5, back=7, preserve=4, cycles=cycles)
        anchors_n = jnp.zeros((8,) + start.shape)
        jaxpr = jax.make_jaxpr(lambda k, x: oneway.one_way_chain(k, x, anchors_n, mask, ctx_n, denoiser=den,
                                                                 settings=s))(jax.random.PRNGKey(0), start)
        return len(jaxpr.eqns), str(jaxpr).count("scan")

    assert size(1, 10) == size(10, 10) == size(40, 20)


def test_seed_canvas_by_hand_and_its_errors():
    cond = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4) / 10
    mask = np.array([[1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0]], np.float32)
    canvas, region = oneway.seed_canvas(cond, mask, (1, 2), (2, 5, 7), background=-1.0)
    expected = -np.ones((2, 5, 7), np.float32)
    expected[:, 1:4, 2:6] = np.where(mask > 0.5, cond, -1.0)
    np.testing.assert_array_equal(canvas, expected)
    assert region.sum() == 2 * 5 and np.array_equal(region[0, 1:4, 2:6], mask)
    # the release's polarity: keep where the mask is black
    canvas0, region0 = oneway.seed_canvas(cond, 1 - mask, (1, 2), (2, 5, 7), background=-1.0, keep="zeros")
    np.testing.assert_array_equal(canvas0, canvas)
    np.testing.assert_array_equal(region0, region)
    bad = [(dict(mask=np.zeros((3, 4))), "keeps no pixel.*keep='zeros'"),
           (dict(mask=np.ones((3, 5))), r"mask must be \(h, w\) = \(3, 4\)"),
           (dict(position=(3, 2)), "leaves the 5 x 7 canvas"),
           (dict(position=(0, -1)), "leaves the 5 x 7 canvas"),
           (dict(canvas_shape=(2, 2, 7)), "larger than the canvas"),
           (dict(canvas_shape=(2, 3, 4), mask=np.ones((3, 4)), position=(0, 0)), "covers the whole canvas"),
           (dict(keep="black"), "keep must be 'ones'")]
    for change, message in bad:
        args = dict(mask=mask, position=(1, 2), canvas_shape=(2, 5, 7)) | change
        keep = args.pop("keep", "ones")
        with pytest.raises(ValueError, match=message):
            oneway.seed_canvas(cond, args["mask"], args["position"], args["canvas_shape"], keep=keep)


def test_replacement_pastes_the_next_level_after_every_step(x64):
    """Inpainting by replacement by hand: DDIM (eta 0) from level N, pasting z_{k-1} after the step
    k -> k - 1; the last paste puts the condition itself in its region."""
    den, ctx, _, _, _, mask = _setup(jnp.float64)
    condition = jax.random.normal(jax.random.PRNGKey(1), (DIM,), jnp.float64)
    anchors = oneway.invert_levels(condition, ctx, N, denoiser=den)
    x_T = jax.random.normal(jax.random.PRNGKey(5), (DIM,), jnp.float64)
    out = oneway.replacement_chain(jax.random.PRNGKey(6), x_T, anchors, mask, ctx, denoiser=den, sampler=zm.ddim(0.0))
    lv = oneway.levels(ctx)
    x, inside = np.asarray(x_T), np.asarray(mask) > 0.5
    for k in range(N, 0, -1):
        ab, ab_next = float(lv.alpha_bar[k]), float(lv.alpha_bar[k - 1])
        eps = np.asarray(den(jnp.asarray(x), int(lv.t[k])))
        x = np.sqrt(ab_next) * (x - np.sqrt(1 - ab) * eps) / np.sqrt(ab) + np.sqrt(1 - ab_next) * eps
        x = np.where(inside, np.asarray(anchors[k - 1]), x)
    np.testing.assert_allclose(out, x, rtol=1e-12, atol=1e-12)
    np.testing.assert_array_equal(np.asarray(out)[inside], np.asarray(condition)[inside])
    with pytest.raises(ValueError, match="anchors must hold levels 0..9"):
        oneway.replacement_chain(jax.random.PRNGKey(6), x_T, anchors[:5], mask, ctx, denoiser=den,
                                 sampler=zm.ddim(0.0))


def test_a_cycle_denoiser_may_depend_on_the_cycle_index():
    """cycle_denoiser=f(c) is called with c = 0 .. C - 1: with eps scaled by 1 + c, one cycle equals
    the unscaled run and a second cycle differs from it."""
    den, ctx, _, anchors, start, mask = _setup(cycles=1)
    scaled = lambda c: zm.Denoiser(lambda p, x, t: p * den(x, t), 1.0 + c)
    for cycles, same in ((1, True), (2, False)):
        settings = oneway.one_way(N, cycles=cycles)
        run = lambda cd: oneway.one_way_chain(jax.random.PRNGKey(3), start, anchors, mask, ctx, denoiser=den,
                                              settings=settings, cycle_denoiser=cd)
        assert np.allclose(run(scaled), run(den), rtol=1e-6, atol=1e-6) == same
    with pytest.raises(ValueError, match="cycle_denoiser must be a Denoiser or a function"):
        oneway.one_way_chain(jax.random.PRNGKey(3), start, anchors, mask, ctx, denoiser=den, settings=settings,
                             cycle_denoiser=3)


def test_the_default_planner_by_rule():
    face = np.zeros((3, 256, 256))
    assert oneway.default_planner(face, None, "a photo of a person at a formal event.", (512, 512)) == oneway.Plan(
        "a photo of a person at a formal event.", (0, 128, 256, 384), (256, 0, 512, 512))
    obj = np.zeros((3, 64, 64))
    assert oneway.default_planner(obj, None, "a red apple", (512, 512)) == oneway.Plan(
        "a red apple", (224, 224, 288, 288), (192, 192, 320, 320))
    top, side = np.zeros((1, 8, 16)), np.zeros((1, 16, 8))
    for kind, piece, box, related in (("top", top, (8, 8, 16, 24), (16, 8, 24, 24)),
                                      ("bottom", top, (16, 8, 24, 24), (8, 8, 16, 24)),
                                      ("left", side, (8, 8, 24, 16), (8, 16, 24, 24)),
                                      ("right", side, (8, 16, 24, 24), (8, 8, 24, 16))):
        plan = oneway.default_planner(piece, None, "a 3", (32, 32), kind=kind)
        assert plan == oneway.Plan("a 3", box, related), kind
        assert plan == oneway.default_planner(piece, None, "a 3", (32, 32), kind=kind)  # deterministic
    with pytest.raises(ValueError, match="kind must be one of"):
        oneway.default_planner(top, None, "a 3", (32, 32), kind="middle")
    with pytest.raises(ValueError, match="needs 16 x 16 of the 12 x 32 canvas"):
        oneway.default_planner(top, None, "a 3", (12, 32), kind="top")


def test_the_planner_hook_is_called_with_the_documented_arguments():
    calls = []
    condition, mask = np.ones((1, 8, 16)), np.ones((8, 16))

    def mine(*args, **kwargs):
        calls.append((args, kwargs))
        return ("a 3, drawn boldly", (0, 0, 8, 16), (8, 0, 16, 16))

    plan = oneway.plan_layout(condition, mask, "a 3", (32, 32), planner=mine)
    assert plan == oneway.Plan("a 3, drawn boldly", (0, 0, 8, 16), (8, 0, 16, 16))
    (args, kwargs), = calls
    assert kwargs == {} and args[2:] == ("a 3", (32, 32))
    np.testing.assert_array_equal(args[0], condition)
    np.testing.assert_array_equal(args[1], mask)
    bad = [(lambda *a: None, "must return Plan"), (lambda *a: ("", (0, 0, 8, 16), (8, 0, 16, 16)), "non-empty"),
           (lambda *a: ("p", (0, 0, 8, 40), (8, 0, 16, 16)), "condition_box .* inside the 32 x 32"),
           (lambda *a: ("p", (0, 0, 8, 16), (8, 8, 8, 16)), "related_box"),
           (lambda *a: ("p", (0, 0, 9, 16), (8, 0, 16, 16)), "must have the condition's size 8 x 16")]
    for planner, message in bad:
        with pytest.raises(ValueError, match=message):
            oneway.plan_layout(condition, mask, "a 3", (32, 32), planner=planner)
