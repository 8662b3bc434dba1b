"""The embedded default of ``zmagic demo``: every scheme on the exact Gaussian-mixture testbed.

Two settings per dimension: the pair (class, measurement_1), run with none / independent /
dependent in both orders / dependent (class first) with the term-II trust region
(``term2_trust``, :class:`~zmagic_jax.schemes.Dependent`) / multi, and the triple (class,
measurement_1, measurement_2), run with independent / multi / multi with the trust region. Every
run starts from the same noise with the same key (common random numbers), guides with the
conditions' FreeDoM-style energies at ``x0|t`` under the score rule (``-grad E`` used as
``grad log p(c | x_t)``), and is scored against samples of the exact posterior.

The demo is planned first (:func:`prepare_testbed_demo` traces every run's program), compiled
together with other work (:meth:`~zmagic_jax.tasks._recipe.Programs.compile_pending`), then run
and written (:func:`write_testbed_demo`).

A sample is counted as diverged when its final state or energies are not finite, or when it lies
far outside the prior's support (:func:`outside_support`); every metric uses the other samples,
and a run whose samples all diverged reports ``None`` for them.
"""
from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp
import numpy as np

from zmagic_jax import figures
from zmagic_jax._io import atomic_output_dir, check_output_dir
from zmagic_jax.geometry import energy_curves, guided_cosines, loss_landscape, mean_guided_cosine, orthonormal_plane
from zmagic_jax.metrics import energy_distance, sliced_wasserstein
from zmagic_jax.models import mixture_denoiser, sample_mixture
from zmagic_jax.samplers import step_context, step_contexts
from zmagic_jax.schedules import linear_schedule
from zmagic_jax.schemes import dependent, direction, independent, multi, none
from zmagic_jax.step_rules import score_rule
from zmagic_jax.tasks._recipe import (PROGRAMS, Programs, check_int, check_positive, model_grid,
                                      sample_batch, sampler_by_name, scheme_cosine, skips)
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
        who = "DemoSettings"
        check_int(self.seed, who, "seed", 0)
        dims = tuple(self.dims)
        if not dims or len(set(dims)) != len(dims) or any(
                isinstance(d, bool) or not isinstance(d, (int, np.integer)) or d < 2 for d in dims):
            raise ValueError(f"{who}: dims must be distinct integers >= 2; got {self.dims!r}.")
        object.__setattr__(self, "dims", tuple(int(d) for d in dims))
        check_int(self.num_samples, who, "num_samples", 16)
        check_int(self.num_steps, who, "num_steps", 2)
        check_positive(self.guidance_scale, who, "guidance_scale")
        sampler_by_name(self.sampler)


# How many times a component's largest RMS radius a sample must be from every mean to count
# as diverged (:func:`support_radii`).
SUPPORT_RADII = 10.0


def support_radii(gmm) -> np.ndarray:
    """``(K,)`` radii ``r_k = 10 sqrt(d lambda_max(C_k))``: ten times component ``k``'s largest
    RMS radius.

    ``|y - m_k| > r_k`` implies ``(y - m_k)^T C_k^-1 (y - m_k) >= |y - m_k|^2 / lambda_max(C_k)
    > 100 d``, and ``P(chi2_d >= 100 d) <= P(chi2_d >= d + 2 sqrt(d x) + 2 x) <= e^-x`` with
    ``x = 40 d`` (Laurent & Massart 2000, Lemma 1), so the set of points farther than ``r_k``
    from every mean ``m_k`` has prior probability below ``e^(-40 d)``. The bound is meant for
    blow-ups: guided samples that are merely off the data (squared Mahalanobis distances up to
    ``~30 d`` in the demo) stay inside and count in the metrics.
    """
    d = gmm.means.shape[1]
    return SUPPORT_RADII * np.sqrt(d * np.asarray(gmm.eigvals, np.float64).max(axis=1))


def outside_support(gmm, x0) -> np.ndarray:
    """``(B,)`` True where a sample ``x0 (B, d)`` is non-finite or farther than
    :func:`support_radii` ``r_k`` from every component mean ``m_k`` (prior mass below
    ``e^(-40 d)``)."""
    x0 = np.asarray(x0, np.float64)
    with np.errstate(over="ignore", invalid="ignore"):
        sq = np.sum((x0[:, None, :] - np.asarray(gmm.means, np.float64)[None]) ** 2, axis=-1)
        inside = np.any(sq <= support_radii(gmm)[None] ** 2, axis=1)
    return ~(inside & np.all(np.isfinite(x0), axis=-1))


# ``c`` of the trust-region row: inactive while the leader's step is resolved (|term II| ~ |gh|),
# active only on stiff steps (see zmagic_jax.schemes.Dependent).
TERM2_TRUST = 2.0


def _runs(conds):
    pair, triple = conds[:2], conds
    return [
        ("none", "pair", none(pair)),
        ("independent", "pair", independent(pair)),
        ("dependent (1->2)", "pair", dependent(pair)),
        ("dependent (1->2) trust", "pair", dependent(pair, term2_trust=TERM2_TRUST)),
        ("dependent (2->1)", "pair", dependent(pair, order=(1, 0))),
        ("multi", "pair", multi(pair)),
        ("independent [3]", "triple", independent(triple)),
        ("multi [3]", "triple", multi(triple)),
        ("multi [3] trust", "triple", multi(triple, term2_trust=TERM2_TRUST)),
    ]


class _Run(NamedTuple):
    label: str
    setting: str
    scheme: object


class _Dim(NamedTuple):
    """Everything one dimension of the demo needs, its programs lowered."""
    dim: int
    bed: object
    denoiser: object
    conditions: tuple
    x_T: jnp.ndarray
    keys: jnp.ndarray
    exact: dict
    floor: dict
    k_sw: jnp.ndarray
    k_floor: jnp.ndarray
    k_land: jnp.ndarray
    runs: list


class DemoPlan(NamedTuple):
    settings: DemoSettings
    schedule: object
    grid: object
    sampler: object
    contexts: object
    dims: list


def draw_dimension(settings: DemoSettings, dim: int, schedule) -> _Dim:
    """One dimension of the demo: its testbed, conditions (score rule), exact posterior samples and
    noise floors, starting noise and keys, all from ``fold_in(PRNGKey(seed), dim)``, and its runs."""
    k_bed, k_noise, k_run, k_exact, k_floor, k_sw, k_land = jax.random.split(
        jax.random.fold_in(jax.random.PRNGKey(settings.seed), dim), 7)
    bed = make_testbed(k_bed, dim)
    denoiser = mixture_denoiser(bed.gmm, schedule.alphas_cumprod)
    conds = tuple(c.condition(score_rule(settings.guidance_scale)) for c in bed.conditions)
    posteriors = {"pair": exact_posterior(bed.gmm, bed.class_index, bed.measurements[:1]), "triple": bed.posterior}
    exact = {s: sample_mixture(k_exact, p, settings.num_samples) for s, p in posteriors.items()}
    floor = {s: (energy_distance(exact[s], sample_mixture(k_floor, p, settings.num_samples)),
                 sliced_wasserstein(k_sw, exact[s], sample_mixture(k_floor, p, settings.num_samples)))
             for s, p in posteriors.items()}
    x_T = jax.random.normal(k_noise, (settings.num_samples, dim))
    keys = jax.random.split(k_run, settings.num_samples)
    runs = [_Run(*run) for run in _runs(conds)]
    return _Dim(dim, bed, denoiser, conds, x_T, keys, exact, floor, k_sw, k_floor, k_land, runs)


def prepare_testbed_demo(settings: DemoSettings = DemoSettings(), programs: Optional[Programs] = None) -> DemoPlan:
    """Draw every dimension (:func:`draw_dimension`) and lower (trace) every run's program into
    ``programs`` (default the process-wide cache) without compiling."""
    programs = PROGRAMS if programs is None else programs
    schedule = linear_schedule()
    grid = model_grid(schedule, settings.num_steps, "demo")
    sampler = sampler_by_name(settings.sampler)
    contexts = step_contexts(schedule, grid)
    dims = [draw_dimension(settings, dim, schedule) for dim in settings.dims]
    for item in dims:
        for run in item.runs:
            programs.lower(sample_batch, (item.keys, item.x_T, contexts, item.denoiser, run.scheme, sampler),
                           skips(run.scheme, contexts))
    return DemoPlan(settings, schedule, grid, sampler, contexts, dims)


def run_testbed_demo(out_dir, settings: DemoSettings = DemoSettings(),
                     progress: Optional[Callable] = None, programs: Optional[Programs] = None, *,
                     overwrite: bool = False) -> dict:
    """Run the demo and write ``report.json`` and the figures into ``out_dir`` (atomically).

    ``progress(label)`` is called before each run (the CLI drives a progress bar with it).
    Returns the report.
    """
    programs = PROGRAMS if programs is None else programs
    check_output_dir(out_dir, overwrite=overwrite)  # before any work
    plan = prepare_testbed_demo(settings, programs)
    compile_s = programs.compile_pending()
    with atomic_output_dir(out_dir, overwrite=overwrite, command="run_testbed_demo") as tmp:
        report = write_testbed_demo(Path(tmp), plan, progress, programs, compile_s)
    return report


def _num(x):
    """JSON-safe float (NaN -> None)."""
    x = float(x)
    return x if np.isfinite(x) else None


def write_testbed_demo(out: Path, plan: DemoPlan, progress: Optional[Callable] = None,
                       programs: Optional[Programs] = None, compile_s: Optional[float] = None) -> dict:
    """Run every planned run (compiling what is not compiled yet) and write ``report.json`` and the
    figures into the existing folder ``out``. Returns the report."""
    progress = progress or (lambda label: None)
    programs = PROGRAMS if programs is None else programs
    settings, grid = plan.settings, plan.grid
    report = {"settings": dataclasses.asdict(settings), "settings_notes": {
        "schedule": "linear betas 1e-4..0.02, T=1000", "grid": "leading spacing, last step to ab=1",
        "rule": "score_rule: displacement = guidance_scale * score_coef * (-grad_x E(x0|t))",
        "distances": "energy distance (sqrt, V-statistic) and sliced W2 (128 projections) to the same "
                     "number of exact posterior samples; noise_floor = the same distance between two "
                     "independent exact sample sets",
        "wall_time_s": "one compiled run of all samples (compilation excluded: compile_s, all programs at once)",
        "exact posterior": "rows scoring a second set of exact posterior samples: the reference values",
        "diverged_samples": "samples whose final state or energies are not finite, or that lie outside the "
                            "prior's support: farther than r_k = 10 sqrt(d lambda_max(C_k)) from every component "
                            "mean m_k (squared Mahalanobis distance > 100 d to every component; prior mass of "
                            "that set < exp(-40 d) by the Laurent-Massart chi-square bound); metrics (distances, "
                            "energies) use the others and are None if every sample diverged (all_diverged: true)",
        "term2_trust": "rows marked trust: each pair's term II scaled by min(1, c max(|d_i|, |d_j(xhat_i)|) / "
                       f"|term II|) with c = {TERM2_TRUST} (off in every other row: the paper's algorithm)",
        "dropped_guidance_steps": "fraction of (sample, step) pairs whose guidance was non-finite and dropped",
        "mean_guided_cosine": "independent: cos(grad E_i, grad E_j) between conditions; dependent / multi: "
                              "cos(d_leader, term II); mean over samples, guided steps and pairs"},
        "compile_s": None if compile_s is None else round(compile_s, 3), "results": []}
    cosine_panels, scatter, landscape_done = {}, {}, False
    for item in plan.dims:
        dim, conds, exact, floor = item.dim, item.conditions, item.exact, item.floor
        curves, cosines = {}, {}
        for setting, reference in (("pair", conds[:2]), ("triple", conds)):
            # The target itself, scored like a scheme: its energies show what "fits the
            # conditions" means here (lower than this is over-fitting, not a better sample).
            energies = _final_energies(reference, exact[setting])
            report["results"].append({
                "dim": dim, "setting": setting, "scheme": "exact posterior",
                "conditions": [c.name for c in reference], "final_energy": _energy_stats(reference, energies),
                "energy_distance": _num(floor[setting][0]), "sliced_wasserstein": _num(floor[setting][1]),
                "noise_floor": {"energy_distance": _num(floor[setting][0]),
                                "sliced_wasserstein": _num(floor[setting][1])},
                "mean_guided_cosine": None,
                "diverged_samples": int(_diverged(item.bed.gmm, exact[setting], energies).sum()),
                "all_diverged": False, "dropped_guidance_steps": 0.0, "wall_time_s": None})
        for run in item.runs:
            progress(f"d={dim} {run.label}")
            args = (item.keys, item.x_T, plan.contexts, item.denoiser, run.scheme, plan.sampler)
            (x0, trace, finite), _, seconds = programs.call(sample_batch, args, skips(run.scheme, plan.contexts))
            energies = _final_energies(run.scheme.conditions, x0)
            ok = ~_diverged(item.bed.gmm, x0, energies)
            x0, energies = x0[ok], energies[ok]
            which = scheme_cosine(run.scheme.name)
            kept = bool(ok.any())
            entry = {
                "dim": dim, "setting": run.setting, "scheme": run.label,
                "conditions": [c.name for c in run.scheme.conditions],
                "final_energy": _energy_stats(run.scheme.conditions, energies),
                "energy_distance": _num(energy_distance(x0, exact[run.setting])) if kept else None,
                "sliced_wasserstein": _num(sliced_wasserstein(item.k_sw, x0, exact[run.setting])) if kept else None,
                "noise_floor": {"energy_distance": _num(floor[run.setting][0]),
                                "sliced_wasserstein": _num(floor[run.setting][1])},
                "mean_guided_cosine": None if which is None else _num(mean_guided_cosine(trace, which)),
                "diverged_samples": int((~ok).sum()), "all_diverged": not kept,
                "dropped_guidance_steps": float(1.0 - finite.all(-1).mean()),
                "wall_time_s": round(seconds, 6),
            }
            report["results"].append(entry)
            if run.setting == "pair":
                curves[run.label] = energy_curves(trace)
                if which is not None:
                    with warnings.catch_warnings():  # steps where every sample's cosine is NaN
                        warnings.simplefilter("ignore", RuntimeWarning)
                        cosines[run.label] = (grid.t, np.nanmean(guided_cosines(trace, which), axis=0))
                if dim == 2:
                    scatter[run.label] = np.asarray(x0)
        cosine_panels[f"d = {dim}, conditions (class, measurement_1)"] = cosines
        names = [c.name for c in conds[:2]]
        figures.plot_energy_curves(out / f"energy_curves_d{dim}.png", grid.t, curves, names,
                                   f"d = {dim}: energy of each condition along the trajectory (Fig. 3 style)")
        if dim == 2:
            figures.plot_scatter(out / "samples_d2.png", scatter, np.asarray(exact["pair"]),
                                 np.asarray(sample_mixture(item.k_floor, item.bed.gmm, settings.num_samples)),
                                 "d = 2: samples (color) vs exact posterior p(x0 | class, measurement_1) (black)")
        if not landscape_done and dim == max(settings.dims):
            _landscape(out / f"landscape_d{dim}.png", item, plan)
            landscape_done = True
    figures.plot_cosines(out / "cosines.png", cosine_panels)
    (out / "report.json").write_text(json.dumps(report, indent=2, allow_nan=False))
    return report


def _diverged(gmm, x0, energies) -> np.ndarray:
    """``(B,)`` diverged samples: outside the prior's support (:func:`outside_support`) or with a
    non-finite final energy."""
    return outside_support(gmm, x0) | ~np.all(np.isfinite(energies), axis=-1)


def _energy_stats(conditions, energies) -> dict:
    """Mean and std of each condition's final energy over the kept samples (``None`` if none)."""
    kept = energies.shape[0] > 0
    return {c.name: {"mean": _num(energies[:, i].mean()) if kept else None,
                     "std": _num(energies[:, i].std()) if kept else None} for i, c in enumerate(conditions)}


def _final_energies(conditions, x0) -> np.ndarray:
    with warnings.catch_warnings():  # a diverged sample is counted, not reported twice
        warnings.simplefilter("ignore", RuntimeWarning)
        values = jax.vmap(lambda x: jnp.stack([c.value(x, x, 1.0) for c in conditions]))(jnp.asarray(x0))
    return np.asarray(values, np.float64)


def _landscape(path, item: _Dim, plan: DemoPlan):
    """Energies around a noised ground truth at the grid's middle step, on the plane spanned by the
    independent and dependent guidance displacements there."""
    ctx = step_context(plan.schedule, plan.grid, plan.grid.num_steps // 2)
    k_x, k_z = jax.random.split(item.k_land)
    bed, conds, sampler = item.bed, item.conditions[:2], plan.sampler
    x = jnp.sqrt(ctx.alpha_bar) * bed.x0_true + jnp.sqrt(1 - ctx.alpha_bar) * jax.random.normal(k_x, bed.x0_true.shape)
    noise = sampler.noise_std(ctx) * jax.random.normal(k_z, x.shape)
    d_ind = direction(x, ctx, noise, scheme=independent(conds), denoiser=item.denoiser, sampler=sampler)[1]
    d_dep = direction(x, ctx, noise, scheme=dependent(conds), denoiser=item.denoiser, sampler=sampler)[1]
    extent = 2.0 * float(max(jnp.linalg.norm(d_ind), jnp.linalg.norm(d_dep)))
    coords, energies = loss_landscape(x, ctx.t, ctx.alpha_bar, d_ind, d_dep, conditions=conds,
                                      denoiser=item.denoiser, extent=extent, num=41)
    u, v = orthonormal_plane(d_ind, d_dep)
    arrows = {label: (float(jnp.dot(d, u)), float(jnp.dot(d, v)))
              for label, d in (("independent", d_ind), ("dependent (1->2)", d_dep))}
    figures.plot_landscape(path, coords, energies, [c.name for c in conds], arrows,
                           f"d = {bed.x0_true.shape[0]}, t = {int(ctx.t)}: energies at x0|t on the plane of the "
                           "independent and dependent displacements (Fig. 2 style)")
