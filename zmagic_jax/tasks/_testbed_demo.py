"""The embedded default of ``zmagic demo``: every scheme on the exact Gaussian-mixture testbed.

Two settings per dimension: the pair (class, measurement_1), run with none / independent /
dependent in both orders / multi, and the triple (class, measurement_1, measurement_2), run with
independent / multi. Every run starts from the same noise with the same key (common random
numbers), guides with the conditions' FreeDoM-style energies at ``x0|t`` under the score rule
(``-grad E`` used as ``grad log p(c | x_t)``), and is scored against samples of the exact posterior.
"""
from __future__ import annotations

import dataclasses
import json
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from zmagic_jax import figures
from zmagic_jax._io import atomic_output_dir
from zmagic_jax.geometry import (energy_curves, guided_cosines, loss_landscape, mean_guided_cosine,
                                 orthonormal_plane)
from zmagic_jax.metrics import energy_distance, sliced_wasserstein
from zmagic_jax.models import mixture_eps_fn, sample_mixture
from zmagic_jax.samplers import sampler_by_name, step_contexts
from zmagic_jax.sampling import sample
from zmagic_jax.schedules import linear_schedule, timestep_grid
from zmagic_jax.schemes import condition, dependent, direction, independent, multi, none
from zmagic_jax.step_rules import score_rule
from zmagic_jax.tasks._testbed import exact_posterior, make_testbed


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """Settings of the testbed demo (all recorded in report.json)."""

    seed: int = 0
    dims: tuple = (2, 64)
    num_samples: int = 1000
    num_steps: int = 100
    sampler: str = "ddpm_posterior"
    guidance_scale: float = 1.0

    def __post_init__(self):
        if not self.dims or any(int(d) < 2 for d in self.dims):
            raise ValueError(f"DemoSettings: dims must be integers >= 2; got {self.dims!r}.")
        if self.num_samples < 16:
            raise ValueError(f"DemoSettings: num_samples must be >= 16; got {self.num_samples}.")
        if not 2 <= self.num_steps <= 1000:
            raise ValueError(f"DemoSettings: num_steps must be in [2, 1000]; got {self.num_steps}.")
        if not self.guidance_scale > 0:
            raise ValueError(f"DemoSettings: guidance_scale must be > 0; got {self.guidance_scale}.")
        sampler_by_name(self.sampler)


def _runs(conds):
    pair, triple = conds[:2], conds
    return [
        ("none", "pair", none(pair)),
        ("independent", "pair", independent(pair)),
        ("dependent (1->2)", "pair", dependent(pair)),
        ("dependent (2->1)", "pair", dependent(pair, order=(1, 0))),
        ("multi", "pair", multi(pair)),
        ("independent [3]", "triple", independent(triple)),
        ("multi [3]", "triple", multi(triple)),
    ]


def run_testbed_demo(out_dir, settings: DemoSettings = DemoSettings(),
                     progress: Optional[Callable] = None) -> dict:
    """Run the demo and write ``report.json`` and the figures into ``out_dir`` (atomically).

    ``progress(label)`` is called before each run (the CLI drives a progress bar with it).
    Returns the report.
    """
    with atomic_output_dir(out_dir) as tmp:
        report = _run_all(Path(tmp), settings, progress or (lambda label: None))
        (Path(tmp) / "report.json").write_text(json.dumps(report, indent=2, allow_nan=False))
    return report


def _num(x):
    """JSON-safe float (NaN -> None)."""
    x = float(x)
    return x if np.isfinite(x) else None


def _run_all(out: Path, settings: DemoSettings, progress) -> dict:
    schedule = linear_schedule()
    grid = timestep_grid(schedule.num_train_steps, settings.num_steps)
    sampler = sampler_by_name(settings.sampler)
    rule = score_rule(settings.guidance_scale)
    key = jax.random.PRNGKey(settings.seed)
    report = {"settings": dataclasses.asdict(settings), "settings_notes": {
        "schedule": "linear betas 1e-4..0.02, T=1000", "grid": "leading spacing, last step to ab=1",
        "rule": "score_rule: displacement = guidance_scale * score_coef * (-grad_x E(x0|t))",
        "distances": "energy distance (sqrt, V-statistic) and sliced W2 (128 projections) to the same "
                     "number of exact posterior samples; noise_floor = the same distance between two "
                     "independent exact sample sets",
        "wall_time_s": "one jitted run of all samples, compilation included",
        "exact posterior": "rows scoring a second set of exact posterior samples: the reference values",
        "diverged_samples": "samples whose final state or energies are not finite; metrics use the others",
        "dropped_guidance_steps": "fraction of (sample, step) pairs whose guidance was non-finite and dropped"}, "results": []}
    cosine_panels, scatter, landscape_done = {}, {}, False
    for dim in settings.dims:
        k_bed, k_noise, k_run, k_exact, k_floor, k_sw, k_land = jax.random.split(jax.random.fold_in(key, dim), 7)
        bed = make_testbed(k_bed, dim)
        eps_fn = mixture_eps_fn(bed.gmm, schedule.alphas_cumprod)
        conds = tuple(condition(c.name, c.energy, rule) for c in bed.conditions)
        x_T = jax.random.normal(k_noise, (settings.num_samples, dim))
        posteriors = {"pair": exact_posterior(bed.gmm, bed.class_index, bed.measurements[:1]),
                      "triple": bed.posterior}
        exact = {s: sample_mixture(k_exact, p, settings.num_samples) for s, p in posteriors.items()}
        floor = {s: (energy_distance(exact[s], sample_mixture(k_floor, p, settings.num_samples)),
                     sliced_wasserstein(k_sw, exact[s], sample_mixture(k_floor, p, settings.num_samples)))
                 for s, p in posteriors.items()}
        curves, cosines = {}, {}
        for setting, reference in (("pair", conds[:2]), ("triple", conds)):
            # The target itself, scored like a scheme: its energies show what "fits the
            # conditions" means here (lower than this is over-fitting, not a better sample).
            energies = np.asarray(jax.vmap(lambda x: jnp.stack([c.energy(x) for c in reference]))(exact[setting]),
                                  np.float64)
            report["results"].append({
                "dim": dim, "setting": setting, "scheme": "exact posterior",
                "conditions": [c.name for c in reference],
                "final_energy": {c.name: {"mean": _num(energies[:, i].mean()), "std": _num(energies[:, i].std())}
                                 for i, c in enumerate(reference)},
                "energy_distance": _num(floor[setting][0]), "sliced_wasserstein": _num(floor[setting][1]),
                "noise_floor": {"energy_distance": _num(floor[setting][0]),
                                "sliced_wasserstein": _num(floor[setting][1])},
                "mean_guided_cosine": None, "diverged_samples": 0, "dropped_guidance_steps": 0.0,
                "wall_time_s": None})
        for label, setting, scheme in _runs(conds):
            progress(f"d={dim} {label}")
            start = time.perf_counter()
            with warnings.catch_warnings():  # dropped guidance is counted in the report instead
                warnings.simplefilter("ignore", RuntimeWarning)
                x0, trace = sample(k_run, x_T, eps_fn, schedule, grid, scheme, sampler, nan_policy="skip")
            x0 = jax.block_until_ready(x0)
            seconds = time.perf_counter() - start
            energies = np.asarray(jax.vmap(lambda x: jnp.stack([c.energy(x) for c in scheme.conditions]))(x0),
                                  np.float64)
            ok = np.asarray(jnp.all(jnp.isfinite(x0), axis=-1)) & np.all(np.isfinite(energies), axis=-1)
            x0, energies = x0[ok], energies[ok]
            entry = {
                "dim": dim, "setting": setting, "scheme": label,
                "conditions": [c.name for c in scheme.conditions],
                "final_energy": {c.name: {"mean": _num(energies[:, i].mean()), "std": _num(energies[:, i].std())}
                                 for i, c in enumerate(scheme.conditions)},
                "energy_distance": _num(energy_distance(x0, exact[setting])),
                "sliced_wasserstein": _num(sliced_wasserstein(k_sw, x0, exact[setting])),
                "noise_floor": {"energy_distance": _num(floor[setting][0]),
                                "sliced_wasserstein": _num(floor[setting][1])},
                "mean_guided_cosine": _num(mean_guided_cosine(trace)) if label != "none" else None,
                "diverged_samples": int((~ok).sum()),
                "dropped_guidance_steps": float(1.0 - np.asarray(trace.finite).all(-1).mean()),
                "wall_time_s": round(seconds, 3),
            }
            report["results"].append(entry)
            if setting == "pair":
                curves[label] = energy_curves(trace)
                if label != "none":
                    cosines[label] = (grid.t, np.nanmean(guided_cosines(trace), axis=0))
                if dim == 2:
                    scatter[label] = np.asarray(x0)
        cosine_panels[f"d = {dim}, conditions (class, measurement_1)"] = cosines
        names = [c.name for c in conds[:2]]
        figures.plot_energy_curves(out / f"energy_curves_d{dim}.png", grid.t, curves, names,
                                   f"d = {dim}: energy of each condition along the trajectory (Fig. 3 style)")
        if dim == 2:
            figures.plot_scatter(out / "samples_d2.png", scatter, np.asarray(exact["pair"]),
                                 np.asarray(sample_mixture(k_floor, bed.gmm, settings.num_samples)),
                                 "d = 2: samples (color) vs exact posterior p(x0 | class, measurement_1) (black)")
        if not landscape_done and dim == max(settings.dims):
            _landscape(out / f"landscape_d{dim}.png", k_land, bed, eps_fn, conds[:2], schedule, grid, sampler)
            landscape_done = True
    figures.plot_cosines(out / "cosines.png", cosine_panels)
    return report


def _landscape(path, key, bed, eps_fn, conds, schedule, grid, sampler):
    """Energies around a noised ground truth at the grid's middle step, on the plane spanned by the
    independent and dependent guidance displacements there."""
    index = grid.num_steps // 2
    ctx = jax.tree_util.tree_map(lambda a: a[index], step_contexts(schedule, grid))
    ctx = ctx._replace(score_coef=sampler.score_coef(ctx))
    k_x, k_z = jax.random.split(key)
    x = jnp.sqrt(ctx.alpha_bar) * bed.x0_true + jnp.sqrt(1 - ctx.alpha_bar) * jax.random.normal(k_x, bed.x0_true.shape)
    noise = sampler.noise_std(ctx) * jax.random.normal(k_z, x.shape)
    d_ind = direction(independent(conds), eps_fn, sampler, x, ctx, noise)[1]
    d_dep = direction(dependent(conds), eps_fn, sampler, x, ctx, noise)[1]
    extent = 2.0 * float(max(jnp.linalg.norm(d_ind), jnp.linalg.norm(d_dep)))
    coords, energies = loss_landscape(eps_fn, conds, x, ctx.t, ctx.alpha_bar, d_ind, d_dep, extent, 41)
    u, v = orthonormal_plane(d_ind, d_dep)
    arrows = {label: (float(jnp.dot(d, u)), float(jnp.dot(d, v)))
              for label, d in (("independent", d_ind), ("dependent (1->2)", d_dep))}
    figures.plot_landscape(path, coords, energies, [c.name for c in conds], arrows,
                           f"d = {bed.x0_true.shape[0]}, t = {int(ctx.t)}: energies at x0|t on the plane of the "
                           "independent and dependent displacements (Fig. 2 style)")
