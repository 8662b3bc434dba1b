"""Cost of the guidance schemes: seconds per guided step, compile time against grid length, memory.

    python experiments/bench_schemes.py --out experiments/results/bench_schemes.json [--quick]

Sections of the JSON report:

* ``testbed_build``: seconds of ``make_testbed`` at small dimensions (why section 1 does not
  call it at d = 4096).
* ``testbed``: one jitted guided step (``zm.step`` vmapped over a small batch, at a
  mid-grid step where every condition is active) on the exact Gaussian-mixture testbed at
  d = 4096, for none / independent / dependent / multi; the shares of multi's step spent in its
  pair terms (``zm.dependent_terms``) and in its CAGrad solve; a probe of the two batched
  contractions of the mixture denoiser, which XLA:CPU runs at very different speeds.
* ``conv``: the same on a small random-init convolutional UNet with three image energies.
* ``compile_vs_steps``: first call of ``zm.sample`` (trace + compile + run) minus a second call
  (run only), for grids of 10, 100 and 1000 steps; the scan should keep it flat. The weights (the
  mixture) are arguments of the program, as in every library call.
* Memory: ``memory_analysis()`` of every compiled function, next to its timing.

Every jitted function takes the weights (mixture, UNet and energy parameters) as arguments and
builds its ``zm.Denoiser`` and conditions from them, so nothing is baked into a program as a
constant and the memory analysis counts each array once, as an argument.

Times are ``time.perf_counter`` around ``jax.block_until_ready``, after a warm-up call. The
functions of a section are timed round-robin (one call of each per round), so load from other
processes on a shared machine hits them alike; ratios are taken within a section.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import subprocess
import time
import warnings
from functools import partial
from pathlib import Path
from typing import Callable, NamedTuple

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

import zmagic_jax as zm
from zmagic_jax._io import atomic_write_bytes
from zmagic_jax.models import GaussianMixture, mixture_denoiser
from zmagic_jax.tasks import LinearMeasurement, class_condition, make_testbed, measurement_condition
from zmagic_jax.tasks._recipe import sampler_by_name, scheme_by_name

SCHEDULE = zm.linear_schedule()
GRID = zm.timestep_grid(SCHEDULE.num_train_steps, 100)
MID_STEP = 50  # t = 490 on the 100-step grid; score_rule() has no window, so all conditions act
SAMPLER = sampler_by_name("ddpm_posterior")
MEMORY_FIELDS = ("argument_size_in_bytes", "output_size_in_bytes", "alias_size_in_bytes",
                 "temp_size_in_bytes", "generated_code_size_in_bytes", "peak_memory_in_bytes")


class Config(NamedTuple):
    """Sizes of one run."""
    dim: int                  # testbed dimension of section 1
    batch: int                # samples per guided step
    repeats: int              # timed calls per function (median reported)
    compile_repeats: int      # fresh compiles per grid length in section 3
    grids: tuple              # grid lengths of section 3
    build_dims: tuple         # dimensions at which make_testbed's build time is measured
    image_size: int           # side of the square RGB images of section 2
    testbed_plan: tuple       # (scheme, n) step functions of section 1
    testbed_split: tuple      # n whose multi step is split into pair terms and CAGrad
    conv_plan: tuple          # the same for section 2
    conv_split: tuple
    probe_counts: tuple       # vectors per component in the testbed's contraction probe


def _plan(counts):
    """none and dependent on 2 conditions; independent and multi on each n of ``counts``."""
    return (("none", 2), ("dependent", 2)) + tuple((s, n) for n in counts for s in ("independent", "multi"))


# Compilation (seconds per step function, whatever the size) dominates the quick run, so it
# compiles few functions: multi with the iterative CAGrad solver (n = 3) on the testbed, the
# dependent scheme on the conv net, and none of the probes.
FULL = Config(dim=4096, batch=4, repeats=5, compile_repeats=5, grids=(10, 100, 1000), build_dims=(512, 1024),
              image_size=32, testbed_plan=_plan((2, 3, 4)), testbed_split=(4,), conv_plan=_plan((2, 3)),
              conv_split=(3,), probe_counts=(1, 4, 8))
QUICK = Config(dim=512, batch=4, repeats=3, compile_repeats=1, grids=(10, 100), build_dims=(256,),
               image_size=16, testbed_plan=(("independent", 3), ("multi", 3)), testbed_split=(),
               conv_plan=(("none", 2), ("dependent", 2)), conv_split=(), probe_counts=())


class Problem(NamedTuple):
    """A denoiser and its conditions built from explicit parameters.

    The parameters are arguments of every jitted step (as a trained network's weights would
    be), so the large testbed matrices are not baked into the programs as constants; the
    mixture, which the denoiser and the class energy share, is one argument.
    """
    params: object
    x: jnp.ndarray            # (batch, *sample_shape) points at the mid-grid noise level
    denoiser: Callable        # params -> zm.Denoiser
    conditions: Callable      # params -> tuple of zm.Condition
    description: dict


# ----------------------------------------------------------------------------- problems

def _normal_pieces(key, shapes):
    """Standard normal arrays of the given shapes cut from ONE draw: on CPU every separate draw
    is an XLA kernel of its own, and compiling those dominates building a problem."""
    sizes = [math.prod(shape) for shape in shapes]
    flat = jax.random.normal(key, (sum(sizes),))
    return [piece.reshape(shape) for piece, shape in zip(jnp.split(flat, np.cumsum(sizes)[:-1]), shapes)]


def _kron_factor_sides(dim):
    """Sides ``(a, dim // a)`` of two orthogonal factors, ``a`` the largest divisor <= sqrt(dim)."""
    side = max(f for f in range(1, math.isqrt(dim) + 1) if dim % f == 0)
    return side, dim // side


def _window_measurement(block, noise, x0, start, sigma):
    """``y = A x0 + sigma noise``, ``A`` the rows of ``block`` normalised to unit length and
    placed on columns ``[start, start + width)``: the recipe of ``make_testbed``'s measurements."""
    block = block / jnp.linalg.norm(block, axis=1, keepdims=True)
    A = jnp.zeros((block.shape[0], x0.shape[0])).at[:, start:start + block.shape[1]].set(block)
    return LinearMeasurement(A, A @ x0 + sigma * noise, jnp.asarray(sigma))


@partial(jax.jit, static_argnums=(1, 2, 3))
def _testbed_arrays(key, dim, batch, num_components, alpha_bar):
    """Mixture, three window measurements of one draw ``x0`` and ``batch`` points at level
    ``alpha_bar`` around it. Each eigenvector matrix is ``Q1 kron Q2`` of two random orthogonal
    factors of side ~sqrt(dim): dense like a QR of a ``dim x dim`` Gaussian, far cheaper."""
    width = math.ceil(5 * dim / 8)
    rows = max(1, width // 2)
    sides = _kron_factor_sides(dim)
    k_normal, k_uniform = jax.random.split(key)
    shapes = [(dim, num_components), (dim,), (batch, dim)]
    shapes += [(side, side) for _ in range(num_components) for side in sides]
    shapes += [(rows, width), (rows,)] * 3
    means, z0, z, *pieces = _normal_pieces(k_normal, shapes)
    factors, blocks = pieces[:2 * num_components], pieces[2 * num_components:]
    uniforms = jax.random.uniform(k_uniform, (num_components, dim + 1))

    means = 0.9 * math.sqrt(dim) * jnp.linalg.qr(means)[0].T
    q = [jnp.linalg.qr(f)[0] for f in factors]
    eigvecs = jnp.stack([jnp.kron(q[2 * k], q[2 * k + 1]) for k in range(num_components)])
    eigvals = jnp.exp(math.log(0.01) + math.log(25.0) * uniforms[:, 1:])
    weights = 0.5 + uniforms[:, 0]
    gmm = GaussianMixture(jnp.log(weights / weights.sum()), means, eigvecs, eigvals)
    x0 = means[0] + eigvecs[0] @ (jnp.sqrt(eigvals[0]) * z0)
    starts, sigmas = (0, dim - width, (dim - width) // 2), (0.1, 0.2, 0.15)
    measurements = tuple(_window_measurement(blocks[2 * i], blocks[2 * i + 1], x0, start, sigma)
                         for i, (start, sigma) in enumerate(zip(starts, sigmas)))
    x = jnp.sqrt(alpha_bar) * x0 + jnp.sqrt(1 - alpha_bar) * z
    return (gmm, measurements), x


def testbed_problem(key, dim, batch, ctx, num_components=4):
    """The exact testbed's prior and conditions at ``dim``, with a fourth condition.

    Shapes and code paths are those of ``make_testbed(key, dim, num_components)``: a mixture
    with dense ``(K, d, d)`` eigenvectors, eigenvalues log-uniform on [0.01, 0.25], orthogonal
    means of norm ``0.9 sqrt(d)``; conditions "class" (``tasks.class_condition``) and two
    ``tasks.measurement_condition`` on windows ``[0, w)`` and ``[d - w, d)``, ``w = ceil(5d/8)``.
    The fourth, "measurement_3", is another linear measurement energy
    ``0.5 |A x0 - y|^2 / sigma^2`` on the centred window. The eigenvectors are Kronecker
    products (see :func:`_testbed_arrays`), because ``make_testbed`` spends minutes at
    d = 4096 on QRs and on the exact posterior, neither of which a guided step uses.
    """
    params, x = _testbed_arrays(key, dim, batch, num_components, ctx.alpha_bar)
    rule = zm.score_rule()

    def conditions(params):
        gmm, measurements = params
        conds = [class_condition(gmm, 0, "class")]
        conds += [measurement_condition(gmm, m, f"measurement_{i + 1}") for i, m in enumerate(measurements)]
        return tuple(c.condition(rule) for c in conds)

    width = math.ceil(5 * dim / 8)
    description = {
        "dim": dim, "num_components": num_components,
        "conditions": ["class", "measurement_1 [0, w)", "measurement_2 [d-w, d)",
                       "measurement_3 [(d-w)//2, (d-w)//2 + w) (added by this benchmark)"],
        "window_w": width, "rows_per_measurement": max(1, width // 2),
        "note": "same array shapes and library energies as make_testbed(PRNGKey(0), dim, num_components=4) "
                "plus a fourth linear measurement built here; eigenvectors are dense Kronecker products "
                "of two random orthogonal factors instead of one d x d QR, and the exact posterior is not "
                "built (see testbed_build for make_testbed's own cost). Step cost depends on shapes, not values.",
    }
    return Problem(params, x, lambda params: mixture_denoiser(params[0], SCHEDULE.alphas_cumprod),
                   conditions, description)


def _sinusoidal(t, dim):
    half = dim // 2
    freqs = jnp.exp(-math.log(10_000.0) * jnp.arange(half) / half)
    angles = t.astype(jnp.float32)[:, None] * freqs[None]
    return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


class NormConv(nn.Module):
    """GroupNorm, swish, 3x3 conv."""
    channels: int

    @nn.compact
    def __call__(self, x):
        return nn.Conv(self.channels, (3, 3))(nn.swish(nn.GroupNorm(num_groups=8)(x)))


class TinyUNet(nn.Module):
    """eps network: 3x3 convs with GroupNorm + swish, one down / up level (32 and 64 channels)
    with a skip connection, and a sinusoidal time embedding added after the input conv."""
    channels: int = 32

    @nn.compact
    def __call__(self, x, t):
        emb = nn.Dense(self.channels)(nn.swish(nn.Dense(4 * self.channels)(_sinusoidal(t, self.channels))))
        h = nn.Conv(self.channels, (3, 3))(x) + emb[:, None, None, :]
        skip = NormConv(self.channels)(h)
        h = NormConv(2 * self.channels)(nn.Conv(2 * self.channels, (3, 3), strides=(2, 2))(skip))
        h = jnp.repeat(jnp.repeat(h, 2, axis=1), 2, axis=2)
        h = NormConv(self.channels)(jnp.concatenate([h, skip], axis=-1))
        return NormConv(x.shape[-1])(h)


UNET = TinyUNet()


def _conv(image, kernel):
    return jax.lax.conv_general_dilated(image[None], kernel, (1, 1), "SAME",
                                        dimension_numbers=("NHWC", "HWIO", "NHWC"))[0]


@partial(jax.jit, static_argnums=(1, 2))
def _conv_arrays(key, size, batch, alpha_bar):
    """UNet weights (kernels ``N(0, 1/fan_in)``, biases 0, GroupNorm scales 1), energy
    parameters and ``batch`` noisy images at level ``alpha_bar`` of a random target image, all
    cut from one normal draw (see :func:`_normal_pieces`; Flax's own init draws per layer)."""
    shape = (size, size, 3)
    abstract, treedef = jax.tree_util.tree_flatten_with_path(
        jax.eval_shape(UNET.init, key, jnp.zeros((1,) + shape), jnp.zeros((1,), jnp.int32)))
    energy_shapes = [(3, 3, 3, 8), (3, 3, 3, 8), (size * size * 3, 10), shape, (batch,) + shape]
    *weights, feature_kernel, gram_kernel, classifier, target, z = _normal_pieces(
        key, [leaf.shape for _, leaf in abstract] + energy_shapes)

    def init(path, leaf, normal):
        name = path[-1].key
        if name == "kernel":
            return normal / math.sqrt(math.prod(leaf.shape[:-1]))
        return jnp.ones(leaf.shape) if name == "scale" else jnp.zeros(leaf.shape)
    unet = jax.tree_util.tree_unflatten(treedef, [init(p, l, w) for (p, l), w in zip(abstract, weights)])

    target = jnp.tanh(target)
    left, right = _column_windows(size)
    feature_kernel, gram_kernel = feature_kernel / math.sqrt(27), gram_kernel / math.sqrt(27)
    energies = {
        "feature_kernel": feature_kernel, "gram_kernel": gram_kernel,
        "feature_target": _conv(target[:, left], feature_kernel),
        "gram_target": _gram(_conv(target[:, right], gram_kernel)),
        "classifier": classifier / math.sqrt(size * size * 3),
    }
    x = jnp.sqrt(alpha_bar) * target + jnp.sqrt(1 - alpha_bar) * z
    return {"unet": unet, "energies": energies}, x


def _column_windows(size):
    """Left and right two thirds of the columns; they share the middle third."""
    return slice(0, 2 * size // 3), slice(size // 3, size)


def _unet_eps(params, x, t):
    return UNET.apply(params, x[None], t[None])[0]


def _features_energy(e, x0):
    left, _ = _column_windows(x0.shape[1])
    return jnp.mean((_conv(x0[:, left], e["feature_kernel"]) - e["feature_target"]) ** 2)


def _gram_energy(e, x0):
    _, right = _column_windows(x0.shape[1])
    return jnp.sum((_gram(_conv(x0[:, right], e["gram_kernel"])) - e["gram_target"]) ** 2)


def _label_energy(e, x0):
    return -jax.nn.log_softmax(x0.reshape(-1) @ e["classifier"])[3]


def conv_problem(key, size, batch, ctx):
    """A random-init :class:`TinyUNet` on ``size x size x 3`` images and three image energies
    on overlapping pixels: feature-map MSE of a fixed random conv on the left two thirds of the
    columns, a Gram-matrix loss of a second fixed random conv on the right two thirds, and the
    cross-entropy of a linear 10-class classifier on the whole image."""
    params, x = _conv_arrays(key, size, batch, ctx.alpha_bar)
    rule = zm.score_rule()

    def conditions(params):
        e = params["energies"]
        return (zm.condition("features_left", _features_energy, rule, e),
                zm.condition("gram_right", _gram_energy, rule, e),
                zm.condition("classifier", _label_energy, rule, e))

    num_params = sum(p.size for p in jax.tree_util.tree_leaves(params["unet"]))
    description = {"image_shape": [size, size, 3], "unet_parameters": int(num_params),
                   "conditions": ["features_left: MSE of a random 3x3x3x8 conv map, columns [0, 2/3)",
                                  "gram_right: Gram-matrix loss of a second random conv, columns [1/3, 1)",
                                  "classifier: cross-entropy of a linear 10-class classifier, all pixels"]}
    return Problem(params, x, lambda params: zm.Denoiser(_unet_eps, params["unet"]), conditions, description)


def _gram(features):
    flat = features.reshape(-1, features.shape[-1])
    return flat.T @ flat / flat.shape[0]


# ----------------------------------------------------------------------------- measurement

def memory_report(compiled):
    """``compiled.memory_analysis()`` as a dict of byte counts, or null fields with the reason."""
    try:
        stats = compiled.memory_analysis()
    except Exception as err:  # backends without the analysis raise; record why
        return {"available": False, "reason": f"{type(err).__name__}: {err}"}
    if stats is None:
        return {"available": False, "reason": "memory_analysis() returned None on this backend"}
    report = {"available": True}
    for field in MEMORY_FIELDS:
        value = getattr(stats, field, None)
        report[field] = None if value is None else int(value)
    parts = [report[f] for f in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes",
                                 "alias_size_in_bytes")]
    report["live_bytes_bound"] = None if None in parts else parts[0] + parts[1] + parts[2] - parts[3]
    return report


def time_round_robin(calls: dict, repeats: int) -> dict:
    """Median seconds per call of every ``name -> (fn, args)``: one warm-up call each, then
    ``repeats`` rounds that call each function once in turn."""
    for fn, args in calls.values():
        jax.block_until_ready(fn(*args))
    samples = {name: [] for name in calls}
    for _ in range(repeats):
        for name, (fn, args) in calls.items():
            start = time.perf_counter()
            jax.block_until_ready(fn(*args))
            samples[name].append(time.perf_counter() - start)
    return {name: {"seconds_median": statistics.median(s), "seconds_min": min(s),
                   "seconds_all": [round(v, 6) for v in s]} for name, s in samples.items()}


def compile_step(fn, args):
    """``jax.jit(fn)`` lowered and compiled for ``args``: ``(executable, seconds, memory report)``."""
    start = time.perf_counter()
    compiled = jax.jit(fn).lower(*args).compile()
    return compiled, time.perf_counter() - start, memory_report(compiled)


def guided_step(problem: Problem, scheme_name: str, n: int):
    """``step(params, keys, x, ctx)``: one guided step of the batch, ``vmap`` of ``zm.step`` over
    samples with a shared step context."""
    def step(params, keys, x, ctx):
        scheme = scheme_by_name(scheme_name, problem.conditions(params)[:n])
        denoiser = problem.denoiser(params)
        return jax.vmap(lambda key, x: zm.step(key, x, ctx, denoiser=denoiser, scheme=scheme, sampler=SAMPLER))(
            keys, x)
    return step


def pair_terms_step(problem: Problem, n: int):
    """The pair work of ``multi`` on ``n`` conditions alone: ``zm.dependent_terms`` over all
    ordered pairs, vmapped over the batch (no CAGrad)."""
    leaders = tuple(range(n))
    followers = tuple(tuple(j for j in range(n) if j != i) for i in range(n))

    def step(params, keys, x, ctx):
        conds = problem.conditions(params)[:n]
        denoiser = problem.denoiser(params)

        def one(key, x):
            noise = SAMPLER.noise_std(ctx) * jax.random.normal(key, x.shape, x.dtype)
            return zm.dependent_terms(x, ctx, noise, conditions=conds, denoiser=denoiser, sampler=SAMPLER,
                                      leaders=leaders, followers=followers)
        return jax.vmap(one)(keys, x)
    return step


def cagrad_step(scheme):
    """``cagrad_step(tasks)``: the CAGrad call of ``scheme`` (a multi scheme: its ``c``, rescale
    and solver iterations) on ``(batch, K, ...)`` task gradients, vmapped over the batch."""
    solve = partial(zm.cagrad, c=scheme.c, rescale=scheme.rescale, num_iters=scheme.cagrad_iters)
    return jax.vmap(solve)


def scheme_section(problem: Problem, ctx, plan: tuple, split_counts: tuple, repeats: int) -> dict:
    """Per-step seconds, compile seconds and memory of the ``(scheme, n)`` step functions of
    ``plan``, with ratios to independent on the same n. Timed in the same rounds: the CAGrad
    solve of every multi step in ``plan`` and, for each n of ``split_counts``, multi's pair terms
    without CAGrad, giving each part's share of the multi step."""
    batch = problem.x.shape[0]
    keys = jax.random.split(jax.random.PRNGKey(2), batch)
    args = (problem.params, keys, problem.x, ctx)
    functions = {f"{name}_n{n}": (guided_step(problem, name, n), args) for name, n in plan}
    functions.update({f"pair_terms_n{n}": (pair_terms_step(problem, n), args) for n in split_counts})
    multi_counts = [n for name, n in plan if name == "multi"]
    cagrad_iters = {}
    for n in multi_counts:
        scheme = scheme_by_name("multi", problem.conditions(problem.params)[:n])
        cagrad_iters[f"cagrad_K{n * (n - 1)}"] = scheme.cagrad_iters if n > 2 else "closed form (K = 2)"
        tasks = jax.random.normal(jax.random.PRNGKey(3), (batch, n * (n - 1)) + problem.x.shape[1:])
        functions[f"cagrad_K{n * (n - 1)}"] = (cagrad_step(scheme), (tasks,))
    calls, entries = {}, {}
    for label, (fn, fn_args) in functions.items():
        compiled, seconds, memory = compile_step(fn, fn_args)
        calls[label] = (compiled, fn_args)
        entries[label] = {"compile_seconds": seconds, "memory": memory}
    for label, timing in time_round_robin(calls, repeats).items():
        entries[label].update(timing)
    per_step = lambda label: entries[label]["seconds_median"]
    ratios = {f"{name}_n{n}/independent_n{n}": per_step(f"{name}_n{n}") / per_step(f"independent_n{n}")
              for name, n in plan if name != "independent" and ("independent", n) in plan}
    shares = {f"cagrad_K{n * (n - 1)}/multi_n{n}": per_step(f"cagrad_K{n * (n - 1)}") / per_step(f"multi_n{n}")
              for n in multi_counts}
    shares.update({f"pair_terms_n{n}/multi_n{n}": per_step(f"pair_terms_n{n}") / per_step(f"multi_n{n}")
                   for n in split_counts})
    return {"problem": problem.description, "batch": batch,
            "step": {"index": MID_STEP, "t": int(ctx.t), "sampler": SAMPLER.name,
                     "rule": "score_rule() (always active)"},
            "functions": entries, "ratios": ratios, "multi_shares": shares, "cagrad_iters": cagrad_iters}


# The batched dot_general forms in which the compiled testbed steps read the eigenvectors U
# (K, d, d) (as listed by their optimised HLO): U^T v or U v, with U as the left or the right
# operand, batched over the K components. name -> (dimension numbers, vectors are the left operand)
DOT_FORMS = {
    "UTv_U_left": ((((1,), (1,)), ((0,), (0,))), False),
    "Uv_U_left": ((((2,), (1,)), ((0,), (0,))), False),
    "Uv_U_right": ((((2,), (2,)), ((0,), (0,))), True),
    "UTv_U_right": ((((2,), (1,)), ((0,), (0,))), True),
}


def contraction_probe(problem: Problem, counts: tuple, repeats: int) -> dict:
    """Seconds of each :data:`DOT_FORMS` contraction of the testbed's eigenvectors with ``n``
    vectors per component (``n`` = batch x leaders under ``vmap``); equal work, unequal speed."""
    eigvecs = problem.params[0].eigvecs
    num, dim, _ = eigvecs.shape
    calls = {}
    for n in counts:
        for name, (dims, vectors_left) in DOT_FORMS.items():
            vectors = jax.random.normal(jax.random.PRNGKey(6), (num, n, dim) if vectors_left else (num, dim, n))
            fn = (lambda u, v, dims=dims: jax.lax.dot_general(v, u, dims)) if vectors_left else \
                 (lambda u, v, dims=dims: jax.lax.dot_general(u, v, dims))
            calls[f"{name}_n{n}"] = (compile_step(fn, (eigvecs, vectors))[0], (eigvecs, vectors))
    return {"eigvecs_shape": list(eigvecs.shape), "dimension_numbers": {k: v[0] for k, v in DOT_FORMS.items()},
            "contractions": time_round_robin(calls, repeats)}


def testbed_section(config: Config, ctx) -> dict:
    """Section 1: :func:`scheme_section` on the testbed problem, then its contraction probe."""
    problem = testbed_problem(jax.random.PRNGKey(0), config.dim, config.batch, ctx)
    report = scheme_section(problem, ctx, config.testbed_plan, config.testbed_split, config.repeats)
    if config.probe_counts:
        report["contraction_probe"] = contraction_probe(problem, config.probe_counts, config.repeats)
    return report


def testbed_build_times(dims: tuple) -> dict:
    """Seconds of ``make_testbed(PRNGKey(0), d, num_components=4)``, compile included (a user's
    first build at that size)."""
    seconds = {}
    for dim in dims:
        start = time.perf_counter()
        jax.block_until_ready(make_testbed(jax.random.PRNGKey(0), dim, num_components=4))
        seconds[str(dim)] = time.perf_counter() - start
    return {"seconds": seconds}


def compile_vs_steps(grids: tuple, repeats: int, dim=16, batch=8) -> dict:
    """Compile seconds of ``zm.sample`` (dependent scheme, testbed at ``dim``) per grid length:
    first call minus second call with the same arguments. The mixture is an argument of the
    program (``mixture_denoiser``'s params, the class energy's params); each repeat gives the
    denoiser a new ``apply`` (a ``functools.partial`` of the same function, which compares by
    identity), a new static part, so the program is traced and compiled afresh while the weights
    stay arguments."""
    bed = make_testbed(jax.random.PRNGKey(0), dim, num_components=4)
    mixture = mixture_denoiser(bed.gmm, SCHEDULE.alphas_cumprod)
    scheme = zm.dependent([c.condition(zm.score_rule()) for c in bed.conditions[:2]])
    x_T = jax.random.normal(jax.random.PRNGKey(4), (batch, dim))
    key = jax.random.PRNGKey(5)
    report = {}
    for num_steps in grids:
        grid = zm.timestep_grid(SCHEDULE.num_train_steps, num_steps)
        first, second = [], []
        with warnings.catch_warnings(record=True) as caught:  # dropped guidance: counted, not fatal
            warnings.simplefilter("always", RuntimeWarning)
            for _ in range(repeats):
                denoiser = zm.Denoiser(partial(mixture.apply), mixture.params)  # a fresh static part
                for times in (first, second):
                    start = time.perf_counter()
                    jax.block_until_ready(zm.sample(key, x_T, SCHEDULE, grid, denoiser=denoiser, scheme=scheme,
                                                    sampler=SAMPLER, nan_policy="skip"))
                    times.append(time.perf_counter() - start)
        compile_s = [a - b for a, b in zip(first, second)]
        report[str(num_steps)] = {"compile_seconds_median": statistics.median(compile_s),
                                  "compile_seconds_all": [round(v, 4) for v in compile_s],
                                  "first_call_seconds_median": statistics.median(first),
                                  "run_seconds_median": statistics.median(second),
                                  "calls_with_dropped_guidance": len(caught),
                                  "dropped_guidance_message": str(caught[0].message) if caught else None}
    medians = [report[str(n)]["compile_seconds_median"] for n in grids]
    return {"dim": dim, "batch": batch, "scheme": "dependent (class, measurement_1)", "sampler": SAMPLER.name,
            "grids": report, "compile_ratio_longest/shortest": medians[-1] / medians[0]}


def library_revision() -> dict:
    """Git commit of the checkout and whether ``zmagic_jax/`` differs from it (None outside git)."""
    root = Path(__file__).resolve().parent.parent
    git = lambda *args: subprocess.run(["git", *args], cwd=root, capture_output=True, text=True).stdout.strip()
    try:
        return {"commit": git("rev-parse", "HEAD") or None,
                "zmagic_jax_modified": bool(git("status", "--porcelain", "--", "zmagic_jax"))}
    except OSError:
        return {"commit": None, "zmagic_jax_modified": None}


def machine_info() -> dict:
    """Versions, backend and CPU of this run."""
    return {"zmagic_jax": library_revision(), "jax": jax.__version__, "jaxlib": jaxlib.__version__,
            "flax": flax.__version__, "numpy": np.__version__, "python": platform.python_version(),
            "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()],
            "cpu_count": os.cpu_count(), "cpu_affinity": len(os.sched_getaffinity(0)),
            "platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "load_average_at_start": list(os.getloadavg()), "xla_flags": os.environ.get("XLA_FLAGS")}


def run_sections(report: dict, sections) -> None:
    """``report[name] = run()`` for each ``(name, run)``, with its wall time, printed as it ends."""
    for name, run in sections:
        section_start = time.perf_counter()
        report[name] = run()
        report[name]["section_seconds"] = time.perf_counter() - section_start
        print(f"{name}: {report[name]['section_seconds']:.1f} s", flush=True)


def write_report(out, report: dict, start: float) -> None:
    """Add the total time since ``start`` and write ``report`` as JSON, atomically."""
    report["total_seconds"] = time.perf_counter() - start
    atomic_write_bytes(out, (json.dumps(report, indent=2, allow_nan=False) + "\n").encode())
    print(f"wrote {out} in {report['total_seconds']:.1f} s")


def main(argv=None):
    """Run every section of the full (or ``--quick``) configuration and write the JSON report."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="JSON report path (written atomically)")
    parser.add_argument("--quick", action="store_true",
                        help="small sizes and fewer repeats (< 1 min), for checking the script")
    args = parser.parse_args(argv)
    config = QUICK if args.quick else FULL
    start = time.perf_counter()
    ctx = zm.step_context(SCHEDULE, GRID, MID_STEP)
    report = {"machine": machine_info(), "mode": "quick" if args.quick else "full",
              "config": config._asdict(),
              "timing": "median of repeats after a warm-up; functions of a section timed round-robin",
              "memory": "memory_analysis() of each compiled function; live_bytes_bound = argument + output + "
                        "temp - alias bytes. XLA:CPU's peak_memory_in_bytes stays near the argument size "
                        "(it seems not to count temp buffers), so read temp_size_in_bytes for the "
                        "scheme's own working memory."}
    sections = (
        ("testbed_build", lambda: testbed_build_times(config.build_dims)),
        ("testbed", lambda: testbed_section(config, ctx)),
        ("conv", lambda: scheme_section(conv_problem(jax.random.PRNGKey(1), config.image_size, config.batch, ctx),
                                        ctx, config.conv_plan, config.conv_split, config.repeats)),
        ("compile_vs_steps", lambda: compile_vs_steps(config.grids, config.compile_repeats)),
    )
    run_sections(report, sections)
    write_report(args.out, report, start)


if __name__ == "__main__":
    main()
