"""Noise schedules of the discrete VP process and the conversions between eps, x0 and score.

Forward process (DDPM, Ho et al. 2020): ``x_t = sqrt(ab_t) x0 + sqrt(1 - ab_t) n`` with
``ab_t = prod_{s<=t} (1 - beta_s)`` for integer timesteps ``t = 0..T-1``. A timestep of ``-1``
stands for clean data (``ab_{-1} = 1``), as in FreeDoM's strided grid whose last step lands on x0.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax.numpy as jnp
import numpy as np


class Schedule(NamedTuple):
    """Discrete VP schedule: ``betas[t]`` and ``alphas_cumprod[t] = prod_{s<=t} (1 - betas[s])``.

    Stored as float64 numpy arrays (host data, exact): every use casts them to the dtype of the
    sample it serves (:func:`alpha_bar`, :func:`~zmagic_jax.step_contexts`), so a float64 run
    under ``jax_enable_x64`` is float64 throughout.
    """

    betas: np.ndarray
    alphas_cumprod: np.ndarray

    @property
    def num_train_steps(self) -> int:
        return int(self.betas.shape[0])


def _schedule_from_betas(betas: np.ndarray) -> Schedule:
    betas = np.asarray(betas, dtype=np.float64)
    if betas.ndim != 1 or betas.size == 0 or not np.all((betas > 0) & (betas < 1)):
        raise ValueError(
            "schedule: betas must be a non-empty 1-D array with every entry in (0, 1); "
            f"got shape {betas.shape}."
        )
    return Schedule(betas, np.cumprod(1.0 - betas))


def linear_schedule(num_train_steps: int = 1000, beta_start: float = 1e-4,
                    beta_end: float = 0.02) -> Schedule:
    """DDPM's linear betas, ``linspace(beta_start, beta_end, T)`` (FreeDoM, SDEdit, score_sde VP)."""
    _check_steps(num_train_steps)
    return _schedule_from_betas(np.linspace(beta_start, beta_end, num_train_steps))


def scaled_linear_schedule(num_train_steps: int = 1000, beta_start: float = 0.00085,
                           beta_end: float = 0.012) -> Schedule:
    """Stable Diffusion's betas, ``linspace(sqrt(beta_start), sqrt(beta_end), T) ** 2``."""
    _check_steps(num_train_steps)
    return _schedule_from_betas(
        np.linspace(math.sqrt(beta_start), math.sqrt(beta_end), num_train_steps) ** 2)


def cosine_schedule(num_train_steps: int = 1000, s: float = 0.008,
                    max_beta: float = 0.999) -> Schedule:
    """Nichol & Dhariwal (2021) cosine schedule: ``ab(t) = cos^2(((t/T + s)/(1 + s)) pi/2)``,
    betas ``1 - ab(t+1)/ab(t)`` clipped to ``max_beta``."""
    _check_steps(num_train_steps)
    f = lambda u: np.cos((u + s) / (1.0 + s) * math.pi / 2) ** 2
    u = np.arange(num_train_steps + 1) / num_train_steps
    betas = np.minimum(1.0 - f(u[1:]) / f(u[:-1]), max_beta)
    return _schedule_from_betas(betas)


def _check_steps(num_train_steps: int) -> None:
    if not isinstance(num_train_steps, (int, np.integer)) or num_train_steps < 2:
        raise ValueError(f"schedule: num_train_steps must be an integer >= 2; got {num_train_steps!r}.")


class TimestepGrid(NamedTuple):
    """A static sampling grid: step ``i`` moves from timestep ``t[i]`` to ``t_next[i]`` (``-1`` = clean)."""

    t: np.ndarray
    t_next: np.ndarray

    @property
    def num_steps(self) -> int:
        return int(self.t.shape[0])


def timestep_grid(num_train_steps: int, num_steps: int, spacing: str = "leading") -> TimestepGrid:
    """Strided descending grid ending on clean data.

    ``spacing="leading"`` is FreeDoM's / DDIM's grid: ``skip = T // num_steps``,
    ``t = range(0, T, skip)`` reversed and ``t_next = t - skip`` (so 1000 -> 100 gives
    ``t = 990, 980, ..., 0`` and the final ``t_next = -1`` with ``ab = 1``).
    ``spacing="linspace"`` rounds ``linspace(T - 1, 0, num_steps)``, so the first step starts at
    pure noise level ``T - 1``.
    """
    _check_steps(num_train_steps)
    if not isinstance(num_steps, (int, np.integer)) or not 1 <= num_steps <= num_train_steps:
        raise ValueError(
            f"timestep_grid: num_steps must be an integer in [1, {num_train_steps}]; got {num_steps!r}.")
    if spacing == "leading":
        skip = num_train_steps // num_steps
        t = np.arange(0, num_train_steps, skip)[:num_steps][::-1]
    elif spacing == "linspace":
        t = np.round(np.linspace(num_train_steps - 1, 0, num_steps)).astype(np.int64)
        if len(np.unique(t)) != num_steps:
            raise ValueError("timestep_grid: linspace spacing produced repeated timesteps; "
                             "use fewer num_steps.")
    else:
        raise ValueError(f"timestep_grid: spacing must be 'leading' or 'linspace'; got {spacing!r}.")
    t = np.asarray(t, np.int32)
    t_next = np.concatenate([t[1:], np.array([-1], np.int32)])
    return TimestepGrid(t, t_next)


def check_grid(schedule: Schedule, grid: TimestepGrid, who: str = "grid") -> TimestepGrid:
    """Validate ``grid`` against ``schedule`` (host-side): integer arrays of one length >= 1, every
    ``t`` in ``[0, T)``, every ``t_next`` in ``[-1, t)``. Returns the grid as int32 numpy arrays."""
    if not isinstance(schedule, Schedule):
        raise ValueError(f"{who}: schedule must be a Schedule (zmagic_jax.linear_schedule(), ...); got "
                         f"{type(schedule).__name__}. Pass the schedule first, then the grid.")
    if not isinstance(grid, TimestepGrid):
        raise ValueError(f"{who}: grid must be a TimestepGrid (zmagic_jax.timestep_grid(T, steps)); got "
                         f"{type(grid).__name__}.")
    t, t_next = np.asarray(grid.t), np.asarray(grid.t_next)
    for name, a in (("t", t), ("t_next", t_next)):
        if a.ndim != 1 or not np.issubdtype(a.dtype, np.integer):
            raise ValueError(f"{who}: grid.{name} must be a 1-D integer array of timesteps; got shape {a.shape} "
                             f"and dtype {a.dtype}. Build the grid with zmagic_jax.timestep_grid.")
    if t.size == 0 or t.shape != t_next.shape:
        raise ValueError(f"{who}: grid.t and grid.t_next must have the same length >= 1; got {t.size} and "
                         f"{t_next.size}.")
    T = schedule.num_train_steps
    if t.min() < 0 or t.max() >= T or t_next.min() < -1 or np.any(t_next >= t):
        raise ValueError(f"{who}: every step must go down from t in [0, {T - 1}] to t_next in [-1, t) for this "
                         f"schedule of {T} steps; got t in [{t.min()}, {t.max()}] and t_next in "
                         f"[{t_next.min()}, {t_next.max()}]. Build the grid with the schedule's num_train_steps.")
    return TimestepGrid(t.astype(np.int32), t_next.astype(np.int32))


def alpha_bar(schedule: Schedule, t, dtype=None) -> jnp.ndarray:
    """``ab_t`` for integer ``t`` (traced or static), with ``ab_{-1} = 1`` (clean data), in
    ``dtype`` (default: JAX's default float, float64 under ``jax_enable_x64``)."""
    padded = jnp.asarray(np.concatenate([[1.0], np.asarray(schedule.alphas_cumprod, np.float64)]),
                         dtype or jnp.result_type(float))
    return padded[jnp.asarray(t) + 1]


def x0_from_eps(x_t, eps, alpha_bar_t):
    """Tweedie's estimate from a noise prediction: ``x0|t = (x_t - sqrt(1 - ab) eps) / sqrt(ab)``."""
    return (x_t - jnp.sqrt(1.0 - alpha_bar_t) * eps) / jnp.sqrt(alpha_bar_t)


def eps_from_x0(x_t, x0, alpha_bar_t):
    """Inverse of :func:`x0_from_eps`: ``eps = (x_t - sqrt(ab) x0) / sqrt(1 - ab)``."""
    return (x_t - jnp.sqrt(alpha_bar_t) * x0) / jnp.sqrt(1.0 - alpha_bar_t)


def score_from_eps(eps, alpha_bar_t):
    """Score of the noisy marginal: ``grad log p_t(x_t) = -eps / sqrt(1 - ab)``."""
    return -eps / jnp.sqrt(1.0 - alpha_bar_t)


def eps_from_score(score, alpha_bar_t):
    """Inverse of :func:`score_from_eps`."""
    return -jnp.sqrt(1.0 - alpha_bar_t) * score
