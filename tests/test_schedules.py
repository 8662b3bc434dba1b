import jax.numpy as jnp
import numpy as np
import pytest

import zmagic_jax as zm


def test_linear_schedule_matches_ddpm():
    s = zm.linear_schedule()
    betas = np.linspace(1e-4, 0.02, 1000)
    # host data in float64: exact, whatever the sample's dtype
    assert isinstance(s.alphas_cumprod, np.ndarray) and s.alphas_cumprod.dtype == s.betas.dtype == np.float64
    np.testing.assert_allclose(s.betas, betas, rtol=1e-14)
    np.testing.assert_allclose(s.alphas_cumprod, np.cumprod(1 - betas), rtol=1e-12)


def test_scaled_linear_and_cosine():
    s = zm.scaled_linear_schedule()
    np.testing.assert_allclose(s.betas, np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000) ** 2, rtol=1e-14)
    c = zm.cosine_schedule(1000)
    f = lambda u: np.cos((u + 0.008) / 1.008 * np.pi / 2) ** 2
    # away from the clipped end, alpha_bar follows the cosine law exactly
    np.testing.assert_allclose(c.alphas_cumprod[:900], f(np.arange(1, 901) / 1000) / f(0), rtol=1e-10)
    assert float(c.betas.max()) == pytest.approx(0.999)


def test_freedom_grid():
    g = zm.timestep_grid(1000, 100)
    assert g.t[0] == 990 and g.t[-1] == 0 and g.num_steps == 100
    np.testing.assert_array_equal(g.t_next[:-1], g.t[1:])
    assert g.t_next[-1] == -1
    s = zm.linear_schedule()
    assert float(zm.alpha_bar(s, -1)) == 1.0
    assert float(zm.alpha_bar(s, 990)) == pytest.approx(float(s.alphas_cumprod[990]))
    lin = zm.timestep_grid(1000, 10, spacing="linspace")
    assert lin.t[0] == 999 and lin.t[-1] == 0


def test_alpha_bar_is_the_schedule_in_the_requested_dtype(x64):
    s = zm.linear_schedule()
    ab = zm.alpha_bar(s, jnp.array([-1, 0, 990]), jnp.float64)
    np.testing.assert_array_equal(ab, [1.0, s.alphas_cumprod[0], s.alphas_cumprod[990]])
    assert zm.alpha_bar(s, 990, jnp.float32).dtype == jnp.float32


def test_conversions_are_inverse():
    x = jnp.array([0.4, -1.0]); eps = jnp.array([1.0, 0.3]); ab = 0.37
    x0 = zm.x0_from_eps(x, eps, ab)
    np.testing.assert_allclose(zm.eps_from_x0(x, x0, ab), eps, rtol=1e-6)
    np.testing.assert_allclose(zm.eps_from_score(zm.score_from_eps(eps, ab), ab), eps, rtol=1e-6)
    # Tweedie: x_t = sqrt(ab) x0 + sqrt(1-ab) eps
    np.testing.assert_allclose(jnp.sqrt(ab) * x0 + jnp.sqrt(1 - ab) * eps, x, rtol=1e-6)


@pytest.mark.parametrize("call,word", [
    (lambda: zm.timestep_grid(1000, 0), "num_steps"),
    (lambda: zm.timestep_grid(1000, 10, spacing="odd"), "spacing"),
    (lambda: zm.linear_schedule(1), "num_train_steps"),
    (lambda: zm.linear_schedule(10, beta_start=0.0), "betas"),
])
def test_bad_schedule_arguments(call, word):
    with pytest.raises(ValueError, match=word):
        call()
