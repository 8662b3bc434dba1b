"""The skeleton every task recipe shares: settings checks, the compiled-program cache, the sampling
program, the NaN check and terminal tables. A recipe supplies only its conditions, its denoiser
and its metrics.

* Settings are frozen dataclasses whose ``__post_init__`` calls the ``check_*`` helpers here;
  whatever depends on the model (its training schedule: how many steps a grid may have, whether
  a guidance window meets the grid) is checked by :func:`model_grid` and :func:`check_window`
  once the model is loaded, never against a hard-coded 1000.
* :class:`Programs` compiles each program once per argument *structure* (the static functions,
  names and shapes inside the pytrees of denoiser, scheme and sampler, plus the static keyword
  arguments), exactly what ``jax.jit`` would key on, so weights, references, scales and seeds
  never recompile. Programs can be lowered first and compiled together on worker threads: XLA
  releases the interpreter lock while it compiles, so two cores compile two programs at once.
* :func:`sample_seeds` is the one sampling program: image ``s`` of a run depends on
  ``PRNGKey(seed_s)`` alone (``x_T`` from ``fold_in(key, 0)``, the chain from ``fold_in(key, 1)``).
"""
from __future__ import annotations

import math
import time
import warnings
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from zmagic_jax.samplers import Sampler, ddim, ddpm_ancestral, ddpm_posterior, eta_mixing, predictor_corrector
from zmagic_jax.sampling import sample_chain
from zmagic_jax.schedules import Schedule, TimestepGrid, timestep_grid
from zmagic_jax.schemes import dependent, every_step_guided, independent, multi, none

SAMPLERS = {"ddpm_ancestral": ddpm_ancestral, "ddpm_posterior": ddpm_posterior, "ddim": ddim,
            "eta_mixing": eta_mixing, "pc": predictor_corrector}
SCHEMES = {"none": none, "independent": independent, "dependent": dependent, "multi": multi}
NAN_POLICIES = ("raise", "skip")


def sampler_by_name(name: str, **options) -> Sampler:
    """A sampler from its registry name (``ddpm_ancestral``, ``ddpm_posterior``, ``ddim``,
    ``eta_mixing``, ``pc``) and keyword options (``eta``, ``snr``, ``corrector_steps``)."""
    if name not in SAMPLERS:
        raise ValueError(f"sampler: unknown name {name!r}; choose one of {sorted(SAMPLERS)}.")
    return SAMPLERS[name](**options)


def scheme_by_name(name: str, conditions=(), **options):
    """A scheme from its registry name (``none``, ``independent``, ``dependent``, ``multi``)."""
    if name not in SCHEMES:
        raise ValueError(f"scheme: unknown name {name!r}; choose one of {sorted(SCHEMES)}.")
    return SCHEMES[name](conditions, **options)


# ----------------------------------------------------------------------------- settings checks

def check_seeds(seeds, who: str, minimum: int = 1) -> tuple:
    """Distinct integers >= 0, at least ``minimum`` of them, as a tuple of ints."""
    try:
        values = tuple(seeds)
    except TypeError:
        values = None
    if values is None or len(values) < minimum or len(set(values)) != len(values) or any(
            isinstance(s, bool) or not isinstance(s, (int, np.integer)) or s < 0 for s in values):
        raise ValueError(f"{who}: seeds must be distinct integers >= 0, at least {minimum}; got {seeds!r}.")
    return tuple(int(s) for s in values)


def check_int(value, who: str, name: str, low: int, high: Optional[int] = None) -> int:
    """An integer in ``[low, high]`` (``high=None``: no upper bound)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low or (
            high is not None and value > high):
        bounds = f"in [{low}, {high}]" if high is not None else f">= {low}"
        raise ValueError(f"{who}: {name} must be an integer {bounds}; got {value!r}.")
    return int(value)


def check_positive(value, who: str, name: str, zero: bool = False) -> float:
    """A finite real number ``> 0`` (``>= 0`` with ``zero=True``); ``inf`` and ``nan`` are refused."""
    ok = (not isinstance(value, bool) and isinstance(value, (int, float, np.integer, np.floating))
          and math.isfinite(value) and (value >= 0 if zero else value > 0))
    if not ok:
        raise ValueError(f"{who}: {name} must be a finite number {'>= 0' if zero else '> 0'}; got {value!r}.")
    return float(value)


def check_choice(value, choices: Sequence, who: str, name: str):
    if value not in choices:
        raise ValueError(f"{who}: {name} must be one of {tuple(choices)}; got {value!r}.")
    return value


def check_latent_size(value, who: str):
    """``None`` or two positive integers ``(h, w)``, as a tuple of ints."""
    if value is None:
        return None
    size = tuple(value)
    if len(size) != 2 or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1 for v in size):
        raise ValueError(f"{who}: latent_size must be None or two positive integers (h, w); got {value!r}.")
    return tuple(int(v) for v in size)


def check_nan_policy(value, who: str) -> str:
    return check_choice(value, NAN_POLICIES, who, "nan_policy")


def model_grid(schedule: Schedule, num_steps: int, who: str) -> TimestepGrid:
    """FreeDoM's leading grid of ``num_steps`` steps on the model's own training schedule."""
    steps = schedule.num_train_steps
    if num_steps > steps:
        raise ValueError(f"{who}: num_steps={num_steps} is more than the model's {steps} training steps; "
                         f"use at most {steps}.")
    return timestep_grid(steps, num_steps)


def check_window(grid: TimestepGrid, start: Optional[int], stop: Optional[int], who: str, what: str) -> None:
    """Raise unless the window ``stop < t <= start`` contains a step of the model's grid."""
    t = np.asarray(grid.t)
    on = (t <= (np.inf if start is None else start)) & (t > (-np.inf if stop is None else stop))
    if not on.any():
        raise ValueError(f"{who}: {what} (stop < t <= start with start={start}, stop={stop}) contains no step of "
                         f"the model's grid, whose timesteps run from {t.max()} down to {t.min()}; widen it.")


# ----------------------------------------------------------------------------- compiled programs

def _avals(tree) -> tuple:
    return tuple((jnp.shape(v), str(jnp.result_type(v)), bool(getattr(v, "weak_type", False)))
                 for v in jax.tree_util.tree_leaves(tree))


class Programs:
    """Compiled programs by argument structure (see the module docstring). One process-wide
    instance, :data:`PROGRAMS`, serves every recipe; pass your own to keep programs apart."""

    def __init__(self):
        self._compiled: dict = {}
        self._pending: dict = {}

    def key(self, fn: Callable, args: tuple, static: Optional[dict] = None,
            compiler_options: Optional[dict] = None):
        static = tuple(sorted((static or {}).items()))
        options = None if compiler_options is None else tuple(sorted(compiler_options.items()))
        return fn, jax.tree_util.tree_structure(args), _avals(args), static, options

    def __contains__(self, key) -> bool:
        return key in self._compiled

    def compiled(self, fn: Optional[Callable] = None) -> list:
        """The keys of the compiled programs (of ``fn`` only, if given)."""
        return [key for key in self._compiled if fn is None or key[0] is fn]

    def lower(self, fn: Callable, args: tuple, static: Optional[dict] = None,
              compiler_options: Optional[dict] = None):
        """Trace ``fn(*args, **static)`` now (unless compiled or pending); compile it later with
        :meth:`compile_pending`. Returns the program's key."""
        key = self.key(fn, args, static, compiler_options)
        if key not in self._compiled and key not in self._pending:
            jitted = jax.jit(fn, static_argnames=tuple(static or {}))
            self._pending[key] = (jitted.lower(*args, **(static or {})), compiler_options)
        return key

    def compile_pending(self, workers: int = 2) -> float:
        """Compile every lowered program, ``workers`` at a time. Returns the wall time in seconds."""
        start = time.perf_counter()
        pending, self._pending = self._pending, {}
        if pending:
            with ThreadPoolExecutor(max_workers=max(1, int(workers))) as pool:
                futures = {key: pool.submit(lowered.compile, compiler_options=options)
                           for key, (lowered, options) in pending.items()}
                for key, future in futures.items():
                    self._compiled[key] = future.result()
        return time.perf_counter() - start

    def call(self, fn: Callable, args: tuple, static: Optional[dict] = None,
             compiler_options: Optional[dict] = None):
        """Run ``fn(*args, **static)`` compiled: ``(outputs as numpy, compile seconds, run seconds)``."""
        key = self.lower(fn, args, static, compiler_options)
        compile_s = self.compile_pending(workers=1)
        start = time.perf_counter()
        outputs = jax.block_until_ready(self._compiled[key](*args))
        run_s = time.perf_counter() - start
        return jax.tree_util.tree_map(np.asarray, outputs), compile_s, run_s

    def clear(self) -> None:
        self._compiled.clear()
        self._pending.clear()


PROGRAMS = Programs()


def seed_keys(seeds: Sequence[int]):
    """``(S, 2)`` PRNG keys ``PRNGKey(seed)`` of a run's seeds."""
    return jnp.stack([jax.random.PRNGKey(int(s)) for s in seeds])


def sample_seeds(keys, contexts, denoiser, scheme, sampler, time_travel=None, *, shape: tuple,
                 dtype: str = "float32", skip_inactive: bool = True):
    """Every seed's chain, vmapped: ``(x0 (S, *shape), trace, finite (S, steps, n))``. The image of
    seed ``s`` depends on its key alone: ``x_T ~ N(0, I)`` from ``fold_in(key, 0)``, the chain from
    ``fold_in(key, 1)``. ``skip_inactive``: see :func:`~zmagic_jax.direction` (:func:`skips`)."""
    def one(key):
        x_T = jax.random.normal(jax.random.fold_in(key, 0), shape, jnp.dtype(dtype))
        return sample_chain(jax.random.fold_in(key, 1), x_T, contexts, denoiser=denoiser, scheme=scheme,
                            sampler=sampler, time_travel=time_travel, skip_inactive=skip_inactive)
    return jax.vmap(one)(keys)


def sample_batch(keys, x_T, contexts, denoiser, scheme, sampler, *, skip_inactive: bool = True):
    """The chains of given starting points ``x_T (B, ...)`` with keys ``(B, 2)``, vmapped."""
    def one(key, x):
        return sample_chain(key, x, contexts, denoiser=denoiser, scheme=scheme, sampler=sampler,
                            skip_inactive=skip_inactive)
    return jax.vmap(one)(keys, x_T)


def skips(scheme, contexts) -> dict:
    """The static option of the sampling programs: skip inactive steps unless every step is guided
    (a conditional branch costs time on XLA:CPU and saves nothing then)."""
    return {"skip_inactive": not every_step_guided(scheme.conditions, contexts)}


# ----------------------------------------------------------------------------- NaN check

def check_finite(finite, names: Sequence[str], seeds: Sequence, t, nan_policy: str, who: str, advice: str,
                 denoiser_finite=None) -> bool:
    """Raise (``nan_policy='raise'``) or warn about non-finite guidance, naming the condition (or
    the denoiser, when its ``eps`` failed first; ``denoiser_finite (S, steps)``), the seed and the
    step; ``finite (S, steps, n)``. Returns whether everything was finite."""
    from zmagic_jax.sampling import nonfinite_message

    message = nonfinite_message(finite, names, t, denoiser_finite, sample_name=lambda s: f"seed {seeds[s]}",
                                advice=advice, skip_hint="Keep such samples with --nan-policy skip "
                                                         "(nan_policy='skip' in Python).")
    if message is None:
        return True
    message = f"{who}: {message}"
    if nan_policy == "raise":
        raise FloatingPointError(message)
    warnings.warn(message, RuntimeWarning, stacklevel=3)
    return False


# ----------------------------------------------------------------------------- tables

def format_table(rows: Sequence[Sequence[str]], notes: Sequence[str] = ()) -> str:
    """A plain-text table: the first row is the header, a rule under it, columns left-aligned."""
    rows = [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines + list(notes))


def mean_std(values, digits: int = 2) -> str:
    values = np.asarray(values, np.float64)
    return f"{values.mean():.{digits}f}±{values.std():.{digits}f}"


def contribution_norms(trace, scheme_name: str, order: Sequence[int] = (0, 1)) -> np.ndarray:
    """``(S, steps, n)``: the norm of what each condition contributes to the step's displacement:
    its own ``d_i`` (independent, multi), the leader's ``d_i`` and the follower's term II
    (dependent), term II alone when the model's conditioning leads (dependent, one condition)."""
    norms = np.asarray(trace.displacement_norms, np.float64)
    if scheme_name != "dependent":
        return norms
    term2 = np.asarray(trace.term2_norms, np.float64)
    if norms.shape[-1] == 1:
        return term2[..., 0, 0][..., None]
    leader, follower = order
    out = norms.copy()
    out[..., follower] = term2[..., leader, follower]
    return out


def scheme_cosine(scheme_name: str) -> Optional[str]:
    """The cosine that describes a scheme's geometry (paper Fig. 1): FreeDoM's angle between the
    conditions for independent guidance, Z-Magic's leader-vs-term-II angle otherwise."""
    return {"none": None, "independent": "conditions"}.get(scheme_name, "term2")
