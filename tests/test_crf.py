"""Dense CRF mean field: a naive float64 mean field written here, the reference C++ (pydensecrf2),
CutLER's mask refinement, jit / vmap and the input checks."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from zmagic_jax.crf import dense_crf, refine_mask

CUTLER = dict(iterations=10, gaussian_sxy=3.0, gaussian_compat=7.0, bilateral_sxy=50.0, bilateral_srgb=5.0,
              bilateral_compat=10.0)
SOFT = dict(iterations=5, gaussian_sxy=2.0, gaussian_compat=1.5, bilateral_sxy=4.0, bilateral_srgb=30.0,
            bilateral_compat=2.0)
# Compiled once per shape and dtype and shared by the tests.
CRF = jax.jit(dense_crf, static_argnames="iterations")
REFINE = jax.jit(refine_mask, static_argnames="iterations")


def naive_mean_field(unary, image, *, iterations, gaussian_sxy, gaussian_compat, bilateral_sxy, bilateral_srgb,
                     bilateral_compat):
    """Krähenbühl & Koltun's mean field in float64 with explicit loops, in the energy form: the message
    to pixel i, label l is sum_k w_k sum_j Kn_k[i, j] sum_m [l != m] Q_j(m), the self term j = i
    included, Kn_k = D^-1/2 K_k D^-1/2."""
    labels, h, w = unary.shape
    pixels = [(r, c) for r in range(h) for c in range(w)]
    n = len(pixels)
    colours = np.asarray(image, np.float64).reshape(n, -1)
    u = np.asarray(unary, np.float64).reshape(labels, n)
    kernels = []
    for sxy, srgb, weight in ((gaussian_sxy, None, gaussian_compat),
                              (bilateral_sxy, bilateral_srgb, bilateral_compat)):
        k = np.empty((n, n))
        for i, (ri, ci) in enumerate(pixels):
            for j, (rj, cj) in enumerate(pixels):
                exponent = ((ri - rj) ** 2 + (ci - cj) ** 2) / (2 * sxy ** 2)
                if srgb is not None:
                    exponent += sum((a - b) ** 2 for a, b in zip(colours[i], colours[j])) / (2 * srgb ** 2)
                k[i, j] = math.exp(-exponent)
        d = k.sum(axis=1)
        kernels.append(weight * k / np.sqrt(np.outer(d, d)))

    def marginals(energy):
        e = np.exp(-(energy - energy.min(axis=0)))
        return e / e.sum(axis=0)

    potts = 1.0 - np.eye(labels)
    q = marginals(u)
    for _ in range(iterations):
        energy = u.copy()
        for i in range(n):
            for label in range(labels):
                for kn in kernels:
                    energy[label, i] += sum(kn[i, j] * (potts[label] @ q[:, j]) for j in range(n))
        q = marginals(energy)
    return q.reshape(labels, h, w)


def _random_problem(seed, labels, h=6, w=7, channels=3):
    rng = np.random.default_rng(seed)
    unary = rng.normal(size=(labels, h, w))
    image = rng.uniform(0, 255, size=(h, w, channels))
    return unary, image


def _scene(h, w, seed, noise):
    """A smooth two-colour image of an ellipse and its mask with a fraction ``noise`` of pixels flipped."""
    rng = np.random.default_rng(seed)
    r, c = np.mgrid[:h, :w]
    blob = (r - 0.45 * h) ** 2 / (0.3 * h) ** 2 + (c - 0.55 * w) ** 2 / (0.3 * w) ** 2 < 1
    shading = 10 * np.sin(r / 3.0) + 5 * np.cos(c / 4.0)
    image = np.where(blob[..., None], [200, 60, 40], [40, 90, 180]) + shading[..., None]
    image = np.clip(image, 0, 255).astype(np.uint8)
    mask = np.where(rng.random((h, w)) < noise, ~blob, blob).astype(np.float64)
    return image, mask, blob


@pytest.mark.parametrize("labels", [2, 3])
def test_matches_naive_mean_field_in_float64(x64, labels):
    unary, image = _random_problem(labels, labels)
    for options in (CUTLER, SOFT):
        expected = naive_mean_field(unary, image, **options)
        q = CRF(jnp.asarray(unary), jnp.asarray(image), **options)
        assert q.dtype == jnp.float64
        np.testing.assert_allclose(q, expected, rtol=0, atol=1e-10)
    np.testing.assert_allclose(dense_crf(jnp.asarray(unary), jnp.asarray(image), iterations=0),
                               jax.nn.softmax(-unary, axis=0), rtol=0, atol=1e-15)


@pytest.mark.parametrize("labels", [2, 3])
def test_matches_naive_mean_field_in_float32(labels):
    unary, image = _random_problem(10 + labels, labels)
    expected = naive_mean_field(unary, image, **SOFT)
    q = CRF(jnp.asarray(unary, jnp.float32), jnp.asarray(image, jnp.float32), **SOFT)
    assert q.dtype == jnp.float32
    np.testing.assert_allclose(q, expected, rtol=0, atol=1e-5)


def _pydensecrf_marginals(unary, image, *, iterations, gaussian_sxy, gaussian_compat, bilateral_sxy,
                          bilateral_srgb, bilateral_compat):
    dcrf = pytest.importorskip(
        "pydensecrf.densecrf", exc_type=ImportError,
        reason="the reference dense CRF is pydensecrf2 (import name pydensecrf); it builds from source with a "
               "C++ compiler: python -m pip install pydensecrf2==1.1 (make test / make test-oldest try it)")
    labels, h, w = unary.shape
    crf = dcrf.DenseCRF2D(w, h, labels)
    crf.setUnaryEnergy(np.ascontiguousarray(unary.reshape(labels, h * w), np.float32))
    crf.addPairwiseGaussian(sxy=gaussian_sxy, compat=gaussian_compat)
    crf.addPairwiseBilateral(sxy=bilateral_sxy, srgb=bilateral_srgb, rgbim=np.ascontiguousarray(image, np.uint8),
                             compat=bilateral_compat)
    return np.asarray(crf.inference(iterations)).reshape(labels, h, w)


# CutLER's constants make the CRF saturate, so the marginals agree closely except where a small
# cluster of flipped pixels sits near the tipping point: there the lattice's 10-20 % filter error (on
# the first message: max |exact - lattice| 0.017-0.054 against messages up to 0.16-0.27) can tip
# it the other way. Measured in float64 against pydensecrf2 1.1 (x86-64, its SSE lattice), seeds
# 0-4 at noise 0.2: max |dQ| 0.0002-0.0010 (16x16) and 0.0002-0.0007 (24x20), mean |dQ| <= 1e-5,
# argmax agreement 1.0. Over 20 seeds per size and noise 0.1 / 0.2 / 0.3, 1 / 2 / 5 of the 16x16
# images and 0 / 0 / 1 of the 24x20 ones flip a small cluster (max |dQ| 0.68-1.0, agreement >= 0.988
# at noise <= 0.2, down to 0.949 at 0.3, mean |dQ| <= 0.05); the bounds below tolerate one
# such flip of up to 5 pixels (on another platform, e.g. the non-SSE lattice).
@pytest.mark.parametrize("size", [(16, 16), (24, 20)])
def test_matches_pydensecrf_with_cutler_constants(x64, size):
    agreements, max_diffs = [], []
    for seed in range(5):
        image, mask, _ = _scene(*size, seed, noise=0.2)
        logits = np.stack([1 - mask, mask])
        unary = -(logits - np.log(np.exp(logits).sum(axis=0)))
        expected = _pydensecrf_marginals(unary, image, **CUTLER)
        q = np.asarray(CRF(jnp.asarray(unary), jnp.asarray(image, jnp.float64), **CUTLER))
        np.testing.assert_allclose(q[1], REFINE(jnp.asarray(mask), jnp.asarray(image)), rtol=0, atol=1e-12)
        diff = np.abs(q - expected)
        assert diff.mean() < 0.01, (seed, diff.mean())
        agreements.append(np.mean(q.argmax(0) == expected.argmax(0)))
        max_diffs.append(diff.max())
    assert min(agreements) >= 0.98, agreements
    assert np.median(max_diffs) < 5e-3, max_diffs


# Weaker, shorter-range couplings leave the marginals soft, so their difference shows the lattice's
# error directly. Measured (3 labels, float64, seeds 0-4): max |dQ| 0.030-0.053 (16x16) and
# 0.031-0.055 (24x20), argmax agreement >= 0.988 (16x16) and >= 0.996 (24x20).
@pytest.mark.parametrize("size", [(16, 16), (24, 20)])
def test_matches_pydensecrf_with_soft_marginals(x64, size):
    for seed in range(5):
        image, mask, _ = _scene(*size, seed, noise=0.2)
        unary = np.random.default_rng(seed).normal(size=(3,) + size)
        unary[0] -= mask
        unary[1] -= 1 - mask
        expected = _pydensecrf_marginals(unary, image, **SOFT)
        q = np.asarray(CRF(jnp.asarray(unary), jnp.asarray(image, jnp.float64), **SOFT))
        assert np.abs(q - expected).max() < 0.08, seed
        assert np.mean(q.argmax(0) == expected.argmax(0)) >= 0.98, seed


def test_refine_mask_removes_salt_and_pepper():
    h, w = 24, 24
    r, c = np.mgrid[:h, :w]
    blob = (r - 11.5) ** 2 + (c - 12.5) ** 2 < 7.5 ** 2
    image = np.where(blob[..., None], [220, 180, 60], [30, 60, 120]) + (2 * r + c)[..., None] // 4
    mask = blob.astype(np.float32)
    flips = [(1, 2), (3, 20), (5, 9), (8, 14), (11, 3), (12, 12), (14, 22), (16, 7), (19, 16), (22, 4), (22, 21)]
    for pixel in flips:
        mask[pixel] = 1 - mask[pixel]
    refined = REFINE(jnp.asarray(mask), jnp.asarray(image, jnp.float32))
    assert refined.shape == (h, w) and refined.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(refined) > 0.5, blob)


def test_one_program_serves_every_parameter_value():
    traces = []

    def counting(unary, image, gaussian_sxy, gaussian_compat, bilateral_sxy, bilateral_srgb, bilateral_compat):
        traces.append(1)
        return dense_crf(unary, image, gaussian_sxy=gaussian_sxy, gaussian_compat=gaussian_compat,
                         bilateral_sxy=bilateral_sxy, bilateral_srgb=bilateral_srgb, bilateral_compat=bilateral_compat)

    program = jax.jit(counting)
    unary, image = _random_problem(0, 3)
    unary, image = jnp.asarray(unary, jnp.float32), jnp.asarray(image, jnp.float32)
    names = ("gaussian_sxy", "gaussian_compat", "bilateral_sxy", "bilateral_srgb", "bilateral_compat")
    for values in ((3.0, 7.0, 50.0, 5.0, 10.0), (2.0, 1.5, 4.0, 30.0, 2.0), (1.0, 0.0, 9.0, 80.0, 0.5)):
        np.testing.assert_allclose(program(unary, image, *values), CRF(unary, image, **dict(zip(names, values))),
                                   rtol=0, atol=1e-6)
    assert len(traces) == 1, f"traced {len(traces)} times"


def test_batches_broadcast_and_vmap_equal_the_loop():
    rng = np.random.default_rng(4)
    unary = jnp.asarray(rng.normal(size=(2, 3, 2, 5, 6)), jnp.float32)
    images = jnp.asarray(rng.uniform(0, 255, size=(3, 5, 6, 3)), jnp.float32)
    looped = np.stack([np.stack([CRF(unary[a, b], images[b], **SOFT) for b in range(3)]) for a in range(2)])
    np.testing.assert_allclose(CRF(unary, images, **SOFT), looped, rtol=0, atol=1e-6)
    vmapped = jax.jit(jax.vmap(jax.vmap(lambda u, im: dense_crf(u, im, **SOFT)), in_axes=(0, None)))(unary, images)
    np.testing.assert_allclose(vmapped, looped, rtol=0, atol=1e-6)
    one_image = CRF(unary[:, 0], images[0], **SOFT)  # one image for a batch of unaries
    np.testing.assert_allclose(one_image, looped[:, 0], rtol=0, atol=1e-6)


def test_gradients_match_finite_differences(x64):
    unary, image = _random_problem(7, 2, h=3, w=4)
    options = dict(SOFT, iterations=3)

    @jax.jit
    def loss(unary, image, sxy, srgb, compat):
        q = dense_crf(unary, image, **dict(options, gaussian_sxy=sxy, bilateral_srgb=srgb, bilateral_compat=compat))
        return jnp.sum(q[0] * jnp.arange(12.0).reshape(3, 4))

    check_grads(loss, (jnp.asarray(unary), jnp.asarray(image), 2.0, 30.0, 2.0), order=1,
                modes=["rev"], atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("call, error, match", [
    (lambda u, im: dense_crf(u.astype(jnp.int32), im), TypeError, "unary must be a float array"),
    (lambda u, im: dense_crf(u[0], im), ValueError, r"unary must have shape \(\.\.\., L, H, W\)"),
    (lambda u, im: dense_crf(u, im[..., 0]), ValueError, r"image\[\.\.\., None\]"),
    (lambda u, im: dense_crf(u, im.astype(jnp.complex64)), TypeError, "image must be a real array"),
    (lambda u, im: dense_crf(u, im[:, :-1]), ValueError, r"image's \(H, W\) = \(6, 6\) must equal the \(H, W\) = "
                                                         r"\(6, 7\) of the unary"),
    (lambda u, im: dense_crf(jnp.stack([u, u]), jnp.stack([im] * 3)), ValueError, "do not broadcast"),
    (lambda u, im: dense_crf(u, im, iterations=2.0), ValueError, "iterations must be a Python int >= 0"),
    (lambda u, im: dense_crf(u, im, iterations=-1), ValueError, "iterations must be a Python int >= 0"),
    (lambda u, im: dense_crf(u, im, bilateral_srgb=jnp.ones(2)), ValueError, "bilateral_srgb must be a number"),
    (lambda u, im: refine_mask(u[0, 0], im), ValueError, r"refine_mask: mask must have shape \(\.\.\., H, W\)"),
    (lambda u, im: refine_mask(u[0, :, :-1], im), ValueError, "refine_mask: image's .* of the mask"),
    (lambda u, im: refine_mask(u[0].astype(jnp.complex64), im), TypeError, "refine_mask: mask must be a real array"),
    (lambda u, im: refine_mask(u[0], im, gaussian_sigma=3.0), TypeError, r"unknown crf_options \['gaussian_sigma'\]"),
])
def test_bad_inputs_say_what_to_fix(call, error, match):
    unary, image = _random_problem(0, 2)
    with pytest.raises(error, match=match):
        call(jnp.asarray(unary, jnp.float32), jnp.asarray(image, jnp.float32))
