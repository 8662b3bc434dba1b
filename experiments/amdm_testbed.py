"""AMDM on the exact testbed: two exact conditional models aggregated, scored against the exact joint.

    python experiments/amdm_testbed.py --out experiments/results/amdm_testbed.json [--quick]

The setting is the demo testbed (``make_testbed``): a Gaussian-mixture prior and two overlapping
linear measurements ``y1 = A1 x0 + e1``, ``y2 = A2 x0 + e2``. Every model is exact:

* model 1 = ``p(x | y1)`` and model 2 = ``p(x | y2)``: the conditioned mixtures
  (``exact_posterior``), their exact noise predictors (``mixture_denoiser``);
* the target ``p(x | y1, y2)``: exact samples of the doubly conditioned mixture.

Methods, each drawing the same number of samples from the same starting noise on one 50-step
grid, with DDIM eta 0 (the release's sampler) and again with the DDPM posterior sampler, scored
by the energy distance and the sliced Wasserstein distance to exact joint samples (the noise
floor: two independent exact sample sets) and by the mean measurement energies
``|y_i - A_i x|^2 / (2 sigma_i^2)``:

* each conditional model alone;
* AMDM: released rule and slerp, released and level-consistent mu, the release's window (loop
  indices 1..3) and a window over every step, ``w = 0.5`` and the release's step lengths
  rescaled to the state's size (``release_steps``), plus a sweep of the step length;
* the product of experts ``s1 + s2 - s0`` (the score sum of two conditional models over the
  prior, exact at t = 0 only);
* guidance on the prior: FreeDoM's sum of gradients (``independent``) and Z-Magic's ``dependent``
  on both measurement energies (``score_rule(1)``);
* model 1 guided by condition 2 (independent and dependent), and AMDM whose model 1 chain also
  carries that dependent guidance (AMDM + Z-Magic);
* the exact joint model sampled on the same grid (the discretisation floor).
"""
from __future__ import annotations

import argparse
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

import zmagic_jax as zm
from bench_schemes import machine_info, write_report
from zmagic_jax.metrics import energy_distance, sliced_wasserstein
from zmagic_jax.models import marginal_score, mixture_denoiser, sample_mixture
from zmagic_jax.tasks import exact_posterior, make_testbed

SCHEDULE = zm.linear_schedule()
SAMPLERS = {"ddim(eta=0)": zm.ddim(0.0), "ddpm_posterior": zm.ddpm_posterior()}


def _poe_eps(params, x, t):
    """Product of experts: score s1 + s2 - s0 of the noisy marginals, as eps."""
    m1, m2, m0, alphas_cumprod = params
    ab = alphas_cumprod[t]
    score = marginal_score(m1, x, ab) + marginal_score(m2, x, ab) - marginal_score(m0, x, ab)
    return zm.eps_from_score(score, ab)


def _score(x, exact, floor_set, key, conditions):
    x = jnp.asarray(x)
    finite = np.all(np.isfinite(np.asarray(x)), axis=1)
    xs = x[finite]
    energies = [float(jnp.mean(jax.vmap(c.energy)(xs))) for c in conditions]
    return {"energy_distance": float(energy_distance(xs, exact)),
            "sliced_wasserstein": float(sliced_wasserstein(key, xs, exact)),
            "energies": energies, "finite_fraction": float(np.mean(finite))}


def run_dim(dim: int, num: int, steps: int, seed: int, sampler) -> dict:
    keys = jax.random.split(jax.random.fold_in(jax.random.PRNGKey(seed), dim), 6)
    k_bed, k_noise, k_run, k_exact, k_floor, k_sw = keys
    bed = make_testbed(k_bed, dim)
    m1, m2 = bed.measurements
    c1, c2 = bed.conditions[1], bed.conditions[2]
    post1, post2 = exact_posterior(bed.gmm, None, [m1]), exact_posterior(bed.gmm, None, [m2])
    joint = exact_posterior(bed.gmm, None, [m1, m2])
    ab = SCHEDULE.alphas_cumprod
    prior_model, model1, model2 = (mixture_denoiser(g, ab) for g in (bed.gmm, post1, post2))
    joint_model = mixture_denoiser(joint, ab)
    poe = zm.Denoiser(_poe_eps, (post1, post2, bed.gmm, jnp.asarray(ab, jnp.float32)))
    grid = zm.timestep_grid(SCHEDULE.num_train_steps, steps)
    exact = sample_mixture(k_exact, joint, num)
    floor = sample_mixture(k_floor, joint, num)
    x_T = jax.random.normal(k_noise, (num, 2, dim))
    conds = (c1.condition(zm.score_rule(1.0)), c2.condition(zm.score_rule(1.0)))
    p_release = zm.release_steps(2, (dim,))

    def single(model, scheme=None):
        return zm.sample(k_run, x_T[:, 0], SCHEDULE, grid, denoiser=model, scheme=scheme, sampler=sampler,
                         nan_policy="skip").x0

    def amdm(p, rule="released", mu="released", window=(1, 3), schemes=None, which=0):
        agg = zm.aggregation(p, 0.5, window=window, rule=rule, mu=mu)
        out = zm.aggregate_sample(k_run, x_T, SCHEDULE, grid, denoisers=(model1, model2), aggregation=agg,
                                  sampler=sampler, schemes=schemes, nan_policy="skip")
        return out.x0[:, which], out.mixed

    rows = {}

    def add(name, x):
        start = time.perf_counter()
        rows[name] = _score(x, exact, floor, k_sw, (c1, c2))
        rows[name]["score_seconds"] = time.perf_counter() - start

    add("exact joint samples (floor)", floor)
    add("exact joint model, same sampler", single(joint_model))
    add("model 1 alone p(x|y1)", single(model1))
    add("model 2 alone p(x|y2)", single(model2))
    last = steps - 1
    for rule in ("released", "slerp"):
        for mu in ("released", "level"):
            x1, mixed = amdm(p_release, rule, mu)
            add(f"AMDM {rule}, mu {mu}, window 1..3: model 1", x1)
            x1, mixed = amdm(p_release, rule, mu, window=(1, last))
            add(f"AMDM {rule}, mu {mu}, every step: model 1", x1)
            add(f"AMDM {rule}, mu {mu}, every step: merged", mixed)
    for scale in (0.25, 0.5, 2.0, 4.0):
        p = tuple(scale * v for v in p_release)
        x1, _ = amdm(p, window=(1, last))
        add(f"AMDM released, every step, p x{scale:g}", x1)
    x1, _ = amdm((0.0, 0.0), window=(1, last))
    add("AMDM released, every step, p = 0 (merge only)", x1)
    add("product of experts s1 + s2 - s0", single(poe))
    add("prior + independent (FreeDoM) [y1, y2]", single(prior_model, zm.independent(conds)))
    add("prior + dependent (1->2) [y1, y2]", single(prior_model, zm.dependent(conds)))
    add("model 1 + independent [y2]", single(model1, zm.independent(conds[1:])))
    add("model 1 + dependent [y2]", single(model1, zm.dependent(conds[1:])))
    x1, _ = amdm(p_release, schemes=(zm.dependent(conds[1:]), zm.none()))
    add("AMDM released window 1..3 + model 1 dependent [y2]", x1)
    return {"dim": dim, "sampler": sampler.label, "num_samples": num, "steps": steps,
            "p_release_rescaled": list(p_release), "rows": rows}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--quick", action="store_true", help="d = 2 only, 256 samples")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    dims, num = ((2,), 256) if args.quick else ((2, 16), 2000)
    report = {"settings": {"dims": list(dims), "num_samples": num, "samplers": list(SAMPLERS), "seed": args.seed,
                           "w": 0.5, "steps": 50},
              "machine": machine_info(), "results": []}
    for dim in dims:
        for name, sampler in SAMPLERS.items():
            result = run_dim(dim, num, 50, args.seed, sampler)
            report["results"].append(result)
            print(f"d = {dim}, {name}:")
            width = max(len(n) for n in result["rows"])
            for label, row in result["rows"].items():
                print(f"  {label:<{width}}  ED {row['energy_distance']:.3g}  SW {row['sliced_wasserstein']:.3g}  "
                      f"E1 {row['energies'][0]:.3g}  E2 {row['energies'][1]:.3g}  finite {row['finite_fraction']:.2f}")
            sys.stdout.flush()
    write_report(args.out, report, start)


if __name__ == "__main__":
    main()
