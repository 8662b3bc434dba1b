"""The convolution every model of the library uses (zmagic_jax.models._layers.conv_general_dilated)
against lax's, and that it keeps the models' guided steps off XLA:CPU's slow in-loop path."""
import numpy as np
import pytest


@pytest.mark.parametrize("stride, groups, dilation", [(1, 1, 1), (1, 4, 1), (1, 1, 2), (2, 1, 1)])
def test_the_models_convolution_has_lax_values_and_derivatives(x64, stride, groups, dilation):
    """zmagic_jax.models._layers.conv_general_dilated: the same primal, vjp, jvp and
    forward-over-reverse Hessian-vector product as lax's, bit for bit in float64."""
    import jax
    import jax.numpy as jnp

    from zmagic_jax.models._layers import conv_general_dilated

    kw = dict(window_strides=(stride, stride), padding=((dilation, dilation),) * 2, rhs_dilation=(dilation, dilation),
              dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=groups)
    k = 0.2 * jax.random.normal(jax.random.PRNGKey(0), (3, 3, 8 // groups, 8), jnp.float64)
    x = jax.random.normal(jax.random.PRNGKey(1), (2, 7, 7, 8), jnp.float64)
    ref = lambda x, k: jax.lax.conv_general_dilated(x, k, **kw)  # noqa: E731
    ours = lambda x, k: conv_general_dilated(x, k, **kw)  # noqa: E731
    out = ref(x, k)
    assert np.array_equal(ours(x, k), out)
    ct = jax.random.normal(jax.random.PRNGKey(2), out.shape, jnp.float64)
    for a, b in zip(jax.vjp(ref, x, k)[1](ct), jax.vjp(ours, x, k)[1](ct)):
        assert np.array_equal(a, b)
    assert np.array_equal(jax.jvp(ref, (x, k), (x, k))[1], jax.jvp(ours, (x, k), (x, k))[1])

    def hvp(conv):
        energy = lambda y: jnp.sum(jnp.tanh(conv(y, k)) ** 2)  # noqa: E731
        return jax.jvp(jax.grad(energy), (x,), (jnp.cos(x),))[1]
    np.testing.assert_allclose(hvp(ours), hvp(ref), rtol=0, atol=1e-14)


def _slow_convolutions(fn, *args) -> list:
    """The stride-1 convolutions of ``fn``'s program that read their kernel with the feature
    dimensions swapped (``x[0, 1, o, i]``): the form XLA:CPU runs 14-28x slower inside a loop."""
    import re

    import jax

    lines = [line for line in jax.jit(fn).lower(*args).as_text().splitlines() if "convolution" in line]
    return [line for line in lines if "x[0, 1, o, i]" in line and re.search(r"lhs_dilate = \[1, 1\]", line)]


def test_guided_model_steps_use_only_fast_convolutions():
    """The input gradient through the library's models has no swapped-kernel convolution (a
    plain ``flax.linen.Conv`` has one per layer: the check can fail)."""
    import flax.linen as nn
    import jax
    import jax.numpy as jnp

    from zmagic_jax.models import encode_prompt, latent_denoiser
    from zmagic_jax.ports import load_canvas_models, load_digit_models

    plain = nn.Conv(4, (3, 3), padding=1)
    params = plain.init(jax.random.PRNGKey(0), jnp.zeros((1, 8, 8, 4)))
    assert _slow_convolutions(jax.grad(lambda x: jnp.sum(plain.apply(params, x) ** 2)), jnp.ones((1, 8, 8, 4)))

    sd = load_canvas_models().text
    den = latent_denoiser(sd, encode_prompt(sd, ["a 3"])[0], encode_prompt(sd, [""])[0], jnp.float32(3.0))
    assert not _slow_convolutions(jax.grad(lambda x: jnp.sum(den(x, 500) ** 2)), jnp.ones((1, 32, 32)))
    unet = load_digit_models().unet
    apply = lambda x: jnp.sum(unet.module.apply({"params": unet.params}, x, jnp.array([500])) ** 2)  # noqa: E731
    assert not _slow_convolutions(jax.grad(apply), jnp.ones((1, 16, 16, 1)))
