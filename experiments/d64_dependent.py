"""Why class-led dependent guidance (``dependent (1->2)``) blows up on the d = 64 testbed, and what
the term-II trust region does about it. Writes JSON.

    python experiments/d64_dependent.py [--seed 0] [--out experiments/results/d64_dependent.json]

The demo's setting (seed 0, d = 64, 1000 samples, 100 ddpm_posterior steps, score rule 1.0), run
with the paper's ``dependent(pair)`` and with ``dependent(pair, term2_trust=2)``:

* in float32 and float64 (the same testbed, x_T and keys, cast), each also from ``x_T + 1e-7``:
  non-finite samples, samples outside the prior's support (``outside_support``) and the energy
  distance of the rest, so machine-to-machine variation shows up as sensitivity to round-off;
* per step of the float32 paper run (first 10 steps): the median and largest ``|term II|`` over
  samples and how many samples ``x_next`` lands farther than 50 from the origin (the data has
  ``|x| ~ 7``);
* at the first two steps: ``rho_1 lambda_max``, the largest eigenvalue of the Hessian of the
  class energy ``E_1(x0|t(x_t))`` in ``x_t`` times the leader's step size, the gain of the
  linearised leader step ``|1 - rho_1 lambda|`` that term II pulls the follower through.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from zmagic_jax import Record, sample_chain
from zmagic_jax._io import atomic_write_bytes
from zmagic_jax.metrics import energy_distance
from zmagic_jax.samplers import step_contexts
from zmagic_jax.samplers._base import with_score_coef
from zmagic_jax.schedules import linear_schedule, x0_from_eps
from zmagic_jax.schemes import dependent
from zmagic_jax.tasks._recipe import model_grid, sampler_by_name
from zmagic_jax.tasks._testbed_demo import TERM2_TRUST, DemoSettings, draw_dimension, outside_support

HERE = Path(__file__).resolve().parent


def setting(seed: int, dim: int = 64):
    """The demo's draws for one dimension (``draw_dimension``: the same testbed, noise and keys)."""
    schedule = linear_schedule()
    item = draw_dimension(DemoSettings(seed=seed, dims=(dim,)), dim, schedule)
    return dict(contexts=step_contexts(schedule, model_grid(schedule, 100, "d64")), bed=item.bed,
                denoiser=item.denoiser, conds=item.conditions[:2], exact=item.exact["pair"], x_T=item.x_T,
                keys=item.keys)


def _cast(tree, dtype):
    def cast(v):
        v = jnp.asarray(v)
        return v.astype(dtype) if jnp.issubdtype(v.dtype, jnp.floating) else v
    return jax.tree_util.tree_map(cast, tree)


def _keep(x_next, info):
    return (x_next, info.term2_norms[0, 1])


@jax.jit
def _run(keys, x_T, contexts, denoiser, scheme, sampler):
    def one(key, x):
        return sample_chain(key, x, contexts, denoiser=denoiser, scheme=scheme, sampler=sampler,
                            record=Record(_keep))
    return jax.vmap(one)(keys, x_T)


def _gains(s, xs, sampler):
    """``rho_1 lambda_max`` at steps 0 and 1 for every sample (float32, the paper run's states)."""
    c1, den = s["conds"][0], s["denoiser"]

    @jax.jit
    def gain(x, ctx):
        def one(x):
            energy = lambda y: c1.value(y, x0_from_eps(y, den(y, ctx.t), ctx.alpha_bar), ctx.alpha_bar)
            return c1.rule.rho(ctx, None, None, x) * jnp.linalg.eigvalsh(jax.hessian(energy)(x))[-1]
        return jax.vmap(one)(x)

    out = {}
    for i in (0, 1):
        ctx = with_score_coef(jax.tree_util.tree_map(lambda a: a[i], s["contexts"]), sampler, jnp.float32)
        x = s["x_T"] if i == 0 else xs[:, 0]
        g = np.asarray(gain(jnp.asarray(x), ctx))
        g = g[np.isfinite(g)]
        out[f"step {i} (t={int(ctx.t)})"] = {"median": float(np.median(g)), "p99": float(np.percentile(g, 99)),
                                           "max": float(g.max()), "samples_above_2": int((g > 2).sum())}
    return out


def main(seed: int, out: Path) -> dict:
    sampler = sampler_by_name("ddpm_posterior")
    s = setting(seed)
    schemes = {"paper": dependent(s["conds"]), "trust": dependent(s["conds"], term2_trust=TERM2_TRUST)}
    rows, per_step = [], None
    for dtype in ("float32", "float64"):
        with jax.enable_x64(dtype == "float64"):
            args = _cast((s["contexts"], s["denoiser"]), dtype)
            for shift in (0.0, 1e-7):
                x_T = _cast(s["x_T"], dtype) + shift
                for name, scheme in schemes.items():
                    start = time.perf_counter()
                    x0, (xs, term2), _ = _run(s["keys"], x_T, args[0], args[1], _cast(scheme, dtype), sampler)
                    x0 = np.asarray(x0, np.float64)
                    seconds = time.perf_counter() - start
                    nonfinite = ~np.all(np.isfinite(x0), axis=-1)
                    outside = outside_support(s["bed"].gmm, x0)
                    rows.append({"dtype": dtype, "x_T shift": shift, "scheme": name,
                                 "nonfinite": int(nonfinite.sum()), "outside_support": int(outside.sum()),
                                 "far_but_finite": int((outside & ~nonfinite).sum()),
                                 "energy_distance_kept": float(energy_distance(x0[~outside], s["exact"])),
                                 "seconds_incl_compile": round(seconds, 2)})
                    print(rows[-1])
                    if dtype == "float32" and shift == 0.0 and name == "paper":
                        xs_paper = xs
                        term2 = np.asarray(term2, np.float64)
                        norms = np.linalg.norm(np.asarray(xs, np.float64), axis=-1)
                        finite = lambda v: float(v) if np.isfinite(v) else None
                        per_step = {"median_|term II|": [finite(np.nanmedian(v)) for v in term2.T[:10]],
                                    "max_finite_|term II|": [finite(np.max(v[np.isfinite(v)])) for v in term2.T[:10]],
                                    "samples_with_|x_next|>50": [int((n > 50).sum()) for n in norms.T[:10]]}
    report = {"settings": {"seed": seed, "dim": 64, "samples": 1000, "steps": 100, "sampler": "ddpm_posterior",
                           "rule": "score_rule(1.0)", "term2_trust": TERM2_TRUST},
              "runs": rows, "paper_float32_first_10_steps": per_step,
              "rho1_lambda_max": _gains(s, xs_paper, sampler)}
    atomic_write_bytes(out, (json.dumps(report, indent=2, allow_nan=False) + "\n").encode())
    return report


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(HERE / "results" / "d64_dependent.json"))
    args = parser.parse_args()
    main(args.seed, Path(args.out))
