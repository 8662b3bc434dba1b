"""The exact testbed: conditions on a Gaussian-mixture prior whose posteriors are closed-form.

A condition ``c`` has two faces here, both :class:`~zmagic_jax.Energy` objects whose params hold
the mixture and the measurement (arguments of any compiled program, never constants):

* ``energy(x0)``: its negative log-likelihood at a clean estimate, exactly what a FreeDoM-style
  guidance network evaluates on Tweedie's ``x0|t``;
* ``exact_nll(x_t, ab) = -log p(c | x_t)``: the true noisy-level likelihood under the mixture prior
  and the VP forward process, whose gradient is the guidance an ideal method would add to the score.

Class labels are mixture components (``p(c = k | x0)`` is the Bayes classifier of the prior) and
measurements are linear-Gaussian, ``y = A x0 + N(0, sigma^2 I)``. Given ``x_t``, the posterior of
``x0`` is the mixture ``sum_k r_k(x_t) N(m_k(x_t), C_k)`` (:func:`~zmagic_jax.models.x0_posterior`),
so every likelihood below is a finite sum of Gaussian integrals. Conditions are dependent given
``x_t`` (they all read the same ``x0``), which is why the joint likelihood is not the product of the
single ones.
"""
from __future__ import annotations

import itertools
import math
import numbers
from functools import partial
from typing import NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
from jax.scipy.special import logsumexp

from zmagic_jax.contracts import Energy, static_partial
from zmagic_jax.models import (GaussianMixture, condition_on_linear, linear_log_evidence,
                               log_responsibilities, select_component, x0_posterior)
from zmagic_jax.schemes import Condition, condition
from zmagic_jax.step_rules import StepRule


class LinearMeasurement(NamedTuple):
    """``y = A x0 + e``, ``e ~ N(0, sigma^2 I)``: ``A`` ``(m, d)``, ``y`` ``(m,)``, scalar
    ``sigma > 0``."""

    A: jnp.ndarray
    y: jnp.ndarray
    sigma: jnp.ndarray


class TestbedCondition(NamedTuple):
    """One condition of the testbed.

    Attributes:
      name: what it is called in reports.
      energy: :class:`~zmagic_jax.Energy`, ``energy(x0) -> scalar``: the condition's negative
        log-likelihood at a clean estimate (up to an additive constant), as a guidance network
        would compute it.
      exact_nll: :class:`~zmagic_jax.Energy`, ``exact_nll(x_t, alpha_bar) -> scalar``: the exact
        ``-log p(c | x_t)``.
    """

    __test__ = False  # not a pytest test class despite its name

    name: str
    energy: Energy
    exact_nll: Energy

    def condition(self, rule: StepRule) -> Condition:
        """The FreeDoM-style condition: ``energy`` at ``x0|t``, guided by ``rule``."""
        return condition(self.name, self.energy, rule)

    def exact_condition(self, rule: StepRule) -> Condition:
        """The ideal condition: the exact ``-log p(c | x_t)``, noise-aware, guided by ``rule``."""
        return condition(self.name, self.exact_nll, rule, noise_aware=True)


class Testbed(NamedTuple):
    """A complete setting: prior, conditions (class first, then measurements), their ground truth
    and the exact posterior ``p(x0 | class, y_1, ..., y_n)``."""

    __test__ = False  # not a pytest test class despite its name

    gmm: GaussianMixture
    conditions: tuple
    class_index: Optional[int]
    measurements: tuple
    posterior: GaussianMixture
    x0_true: jnp.ndarray


def _check_class(name: str, gmm: GaussianMixture, class_index) -> None:
    num = gmm.log_weights.shape[0]
    if not isinstance(class_index, numbers.Integral) or not 0 <= class_index < num:
        raise ValueError(f"{name}: the class index must be an integer in [0, {num}) (a mixture "
                         f"component); got {class_index!r}.")


def _check_measurement(name: str, gmm: GaussianMixture, meas: LinearMeasurement) -> None:
    dim = gmm.means.shape[1]
    a_shape, y_shape = jnp.shape(meas.A), jnp.shape(meas.y)
    if len(a_shape) != 2 or a_shape[1] != dim or y_shape != a_shape[:1]:
        raise ValueError(f"{name}: a LinearMeasurement needs A of shape (m, {dim}) and y of shape "
                         f"(m,); got A {a_shape} and y {y_shape}.")
    if jnp.ndim(meas.sigma) == 0:
        # Evaluated now even inside jit, so a constant sigma is still checked.
        with jax.ensure_compile_time_eval():
            positive = jnp.asarray(meas.sigma) > 0
        if isinstance(positive, jax.core.Tracer) or bool(positive):
            return
    raise ValueError(f"{name}: LinearMeasurement.sigma must be a positive scalar; "
                     f"got {meas.sigma}.")


def _stack(gmm: GaussianMixture, measurements: tuple):
    """Rows of all measurements as one: ``(A, y, per-row std)``. Independent noises make the
    stacked observation exactly the conjunction of the separate ones."""
    for i, meas in enumerate(measurements):
        _check_measurement(f"measurements[{i}]", gmm, meas)
    A = jnp.concatenate([jnp.asarray(m.A) for m in measurements])
    y = jnp.concatenate([jnp.asarray(m.y) for m in measurements])
    std = jnp.concatenate([jnp.full((jnp.shape(m.y)[0],), m.sigma) for m in measurements])
    return A, y, std


def _joint_nll(with_class: bool, params, x_t, alpha_bar):
    gmm, class_index, stacked = params
    posterior = x0_posterior(gmm, x_t, alpha_bar)
    log_joint = posterior.log_weights
    if stacked is not None:
        log_joint = log_joint + linear_log_evidence(posterior, *stacked)
    return -log_joint[class_index] if with_class else -logsumexp(log_joint)


# Compiled once per structure (with or without class, number of rows): it is evaluated and
# differentiated many times, also outside any jit (tests, figures).
_joint_nll_jit = jax.jit(_joint_nll, static_argnums=0)


def joint_exact_nll(gmm: GaussianMixture, class_index: Optional[int],
                    measurements: Sequence[LinearMeasurement]) -> Energy:
    """``nll(x_t, ab) = -log p(class, y_1, ..., y_n | x_t)``, all given conditions jointly.

    With ``r_k = p(k | x_t)`` and ``y`` the stacked measurements (``A`` stacked rows, ``Lambda``
    the diagonal of their noise variances),

        p(y | x_t, k) = N(y; A m_k(x_t), A C_k A^T + Lambda),
        p(class = j, y | x_t) = r_j p(y | x_t, j),      p(y | x_t) = sum_k r_k p(y | x_t, k).

    ``class_index=None`` leaves the class out; ``measurements`` may be empty but not both.
    Returns a noise-aware :class:`~zmagic_jax.Energy` ``nll(x_t, ab)``.
    """
    measurements = tuple(measurements)
    if class_index is None and not measurements:
        raise ValueError("joint_exact_nll: give a class_index, measurements, or both; "
                         "the likelihood of no condition is the constant 1.")
    if class_index is not None:
        _check_class("joint_exact_nll", gmm, class_index)
    stacked = _stack(gmm, measurements) if measurements else None
    return Energy(static_partial(_joint_nll_jit, class_index is not None),
                  (gmm, 0 if class_index is None else class_index, stacked))


@jax.jit
def _class_energy(params, x0):
    gmm, k = params
    return -log_responsibilities(gmm, x0, 1.0)[k]


@jax.jit
def _measurement_energy(meas: LinearMeasurement, x0):
    resid = meas.y - meas.A @ x0
    return 0.5 * jnp.sum(resid * resid) / meas.sigma ** 2


def class_condition(gmm: GaussianMixture, k: int, name: str = "class") -> TestbedCondition:
    """The label "``x0`` came from component ``k``".

    ``energy(x0) = -log p(k | x0)``, the exact Bayes classifier of clean data (responsibilities at
    ``ab = 1``); ``exact_nll(x_t, ab) = -log r_k(x_t)`` at noise level ``ab``.
    """
    _check_class("class_condition", gmm, k)
    return TestbedCondition(name, Energy(_class_energy, (gmm, k)), joint_exact_nll(gmm, k, ()))


def measurement_condition(gmm: GaussianMixture, meas: LinearMeasurement,
                          name: str = "measurement") -> TestbedCondition:
    """The observation ``y = A x0 + N(0, sigma^2 I)``.

    ``energy(x0) = |y - A x0|^2 / (2 sigma^2)`` (the Gaussian NLL without its constant);
    ``exact_nll(x_t, ab) = -log sum_k r_k(x_t) N(y; A m_k(x_t), A C_k A^T + sigma^2 I)``.
    """
    _check_measurement("measurement_condition", gmm, meas)
    params = LinearMeasurement(*(jnp.asarray(v) for v in meas))
    return TestbedCondition(name, Energy(_measurement_energy, params), joint_exact_nll(gmm, None, (meas,)))


def exact_posterior(gmm: GaussianMixture, class_index: Optional[int],
                    measurements: Sequence[LinearMeasurement]) -> GaussianMixture:
    """``p(x0 | class, y_1, ..., y_n)``: the class selects its component, then the stacked
    measurements condition it (:func:`~zmagic_jax.models.condition_on_linear`)."""
    measurements = tuple(measurements)
    posterior = gmm
    if class_index is not None:
        _check_class("exact_posterior", gmm, class_index)
        posterior = select_component(gmm, class_index)
    if measurements:
        posterior = condition_on_linear(posterior, *_stack(gmm, measurements))
    return posterior


# Component covariance eigenvalues are log-uniform on this range: anisotropic (condition number
# up to 25) and small against the mean spread, so components are well separated.
_EIGVAL_RANGE = (0.01, 0.25)


def make_testbed(key, dim: int, num_components: int = 5, class_index: int = 0,
                 noise_stds: tuple = (0.1, 0.2), mean_scale: float = 0.9) -> Testbed:
    """The demo setting: a class label and two overlapping linear measurements on a mixture prior.

    Prior: ``K = num_components`` Gaussians with weights ``~ Uniform(0.5, 1.5)`` (normalised),
    random orthogonal eigenvectors and eigenvalues log-uniform on ``[0.01, 0.25]``. Means have
    norm ``mean_scale sqrt(d)`` (mean squared coordinate ``mean_scale^2``, so the data variance
    per coordinate is about ``0.81 + 0.07 ~ 0.9``, suited to a VP schedule): mutually orthogonal
    random directions when ``K <= d``, else evenly spaced on a circle in a random plane (the
    ``d = 2`` plotting case).

    Conditions, in order:

    1. ``"class"``: ``x0`` belongs to component ``class_index``;
    2. ``"measurement_1"``: ``y1 = A1 x0 + N(0, noise_stds[0]^2 I)``, ``A1`` sees coordinates
       ``[0, w)``;
    3. ``"measurement_2"``: ``y2 = A2 x0 + N(0, noise_stds[1]^2 I)``, ``A2`` sees ``[d - w, d)``;

    with window ``w = ceil(5 d / 8)``, so the windows share ``2 w - d`` coordinates (16 of 64 for
    ``d = 64``, both coordinates for ``d = 2``). Each ``A_i`` has ``max(1, w // 2)`` rows, random
    unit vectors supported on its window, so each measurement alone is underdetermined and the
    prior shapes the posterior along the directions it does not see. Ground truth ``x0_true`` is
    drawn from the class component and ``y_i = A_i x0_true + noise``.

    The default noise stds ``(0.1, 0.2)`` sit between the smallest and largest component standard
    deviations (0.1 to 0.5): the exact posterior keeps a fraction (about 0.45 at ``d = 64``, 0.2 to
    0.45 at ``d = 2``) of the class component's total variance, and is tens of nats (KL) away from
    it at ``d = 64``. At ``d = 2`` a single measurement line usually crosses several components,
    so each measurement alone is ambiguous about (and may favour another than) the class.

    Deterministic given ``key``; computed in the default float dtype.
    """
    if not isinstance(dim, numbers.Integral) or dim < 2:
        raise ValueError(f"make_testbed: dim must be an int >= 2; got {dim!r}.")
    if not isinstance(num_components, numbers.Integral) or num_components < 2:
        raise ValueError(f"make_testbed: num_components must be an int >= 2 (a class label needs "
                         f"alternatives); got {num_components!r}.")
    if not isinstance(class_index, numbers.Integral) or not 0 <= class_index < num_components:
        raise ValueError(f"make_testbed: class_index must be an int in [0, {num_components}); "
                         f"got {class_index!r}.")
    if len(noise_stds) != 2 or not all(float(s) > 0 for s in noise_stds):
        raise ValueError(f"make_testbed: noise_stds must be two positive numbers (one per "
                         f"measurement); got {noise_stds!r}.")
    if not float(mean_scale) > 0:
        raise ValueError(f"make_testbed: mean_scale must be positive; got {mean_scale!r}.")
    gmm, x0_true, measurements = _draw_setting(key, int(dim), int(num_components),
                                               int(class_index), jnp.asarray(noise_stds, float),
                                               jnp.asarray(mean_scale, float))
    conditions = (class_condition(gmm, class_index, "class"),
                  measurement_condition(gmm, measurements[0], "measurement_1"),
                  measurement_condition(gmm, measurements[1], "measurement_2"))
    return Testbed(gmm, conditions, int(class_index), measurements,
                   exact_posterior(gmm, class_index, measurements), x0_true)


# One compiled program per (dim, num_components, class_index). All randomness comes from one
# uniform and one normal draw cut into pieces: every separate draw adds a PRNG kernel whose
# compilation dominates the cost of building a testbed.
@partial(jax.jit, static_argnums=(1, 2, 3))
def _draw_setting(key, dim: int, num: int, class_index: int, noise_stds, mean_scale):
    width = math.ceil(5 * dim / 8)
    rows = max(1, width // 2)
    shapes = ((dim, num if num <= dim else 2),           # mean directions (or their plane)
              (num, dim, dim),                             # eigenvector matrices before QR
              (dim,),                                      # x0_true's standard normal
              (rows, width), (rows,),                      # measurement 1: rows, noise
              (rows, width), (rows,))                      # measurement 2: rows, noise
    key_uniform, key_normal = jax.random.split(key)
    uniforms = jax.random.uniform(key_uniform, (num * (dim + 1),))
    sizes = [math.prod(s) for s in shapes]
    normals = jax.random.normal(key_normal, (sum(sizes),))
    pieces = [p.reshape(s) for p, s in
              zip(jnp.split(normals, list(itertools.accumulate(sizes))[:-1]), shapes)]
    directions, rotations, z, rows_1, noise_1, rows_2, noise_2 = pieces

    weights = 0.5 + uniforms[:num]
    if num <= dim:
        directions = jnp.linalg.qr(directions)[0].T
    else:
        angles = 2 * math.pi * jnp.arange(num) / num
        directions = jnp.stack([jnp.cos(angles), jnp.sin(angles)], axis=1) @ \
            jnp.linalg.qr(directions)[0].T
    means = mean_scale * math.sqrt(dim) * directions
    eigvecs = jnp.linalg.qr(rotations)[0]
    low, high = math.log(_EIGVAL_RANGE[0]), math.log(_EIGVAL_RANGE[1])
    eigvals = jnp.exp(low + (high - low) * uniforms[num:].reshape(num, dim))
    gmm = GaussianMixture(jnp.log(weights / jnp.sum(weights)), means, eigvecs, eigvals)

    x0_true = means[class_index] + eigvecs[class_index] @ (jnp.sqrt(eigvals[class_index]) * z)
    measurements = []
    for start, sigma, block, noise in ((0, noise_stds[0], rows_1, noise_1),
                                       (dim - width, noise_stds[1], rows_2, noise_2)):
        block = block / jnp.linalg.norm(block, axis=1, keepdims=True)
        A = jnp.zeros((rows, dim), block.dtype).at[:, start:start + width].set(block)
        measurements.append(LinearMeasurement(A, A @ x0_true + sigma * noise, sigma))
    return gmm, x0_true, tuple(measurements)
