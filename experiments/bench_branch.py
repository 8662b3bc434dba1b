"""What a ``lax.cond`` around guidance costs on XLA:CPU (why ``zm.direction`` has ``skip_inactive``).

``zm.direction`` skips every gradient on steps where no condition is active with a ``lax.cond``
on the grid-only predicate. On XLA:CPU a network's backward pass inside a conditional branch ran
about 2x slower than the same computation outside one, with the weights as program arguments
(measured here; the layout changes XLA makes for the backward convolutions are not shared with
the rest of the program). So ``sample`` only builds the branch when some step is unguided.

Sections (medians of ``--repeats`` round-robin calls after a warm-up; compile excluded):

* ``tiny_sd``: the tiny random Stable Diffusion of ``tiny_models.py`` (CFG UNet, VAE, CLIP style
  and text energies on the decoded ``x0|t``; needs the test extra for torch): the UNet gradient
  ``grad_x sum(eps(x)^2)`` plain and inside a ``lax.cond`` whose predicate is an argument, and
  one independent guided ``zm.step`` with ``skip_inactive`` off and on (the step is guided, so the
  results are equal).
* ``digits``: the embedded digits UNet (real weights), a whole 20-step class + layout run of 6
  seeds, independent guidance, ``skip_inactive`` off and on.

    python experiments/bench_branch.py [--repeats 7] [--out experiments/results/bench_branch.json]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import zmagic_jax as zm  # noqa: E402
from bench_schemes import compile_step, time_round_robin  # noqa: E402


def _unet_grad(denoiser, ctx, x):
    return jax.grad(lambda x: jnp.sum(denoiser(x, ctx.t) ** 2))(x)


def _unet_grad_in_cond(denoiser, ctx, x, predicate):
    return jax.lax.cond(predicate, lambda x: _unet_grad(denoiser, ctx, x), jnp.zeros_like, x)


def _step(denoiser, scheme, key, x, ctx, skip_inactive):
    return zm.step(key, x, ctx, denoiser=denoiser, scheme=scheme, sampler=zm.ddpm_posterior(),
                   skip_inactive=skip_inactive)[0]


def tiny_sd(repeats: int) -> dict:
    import bench_text_style as bts

    with tempfile.TemporaryDirectory() as root:
        m = bts.build_models(Path(root))
    denoiser = bts.jax_denoiser(m)
    scheme = zm.independent(bts.jax_conditions(m))
    x, key = jnp.asarray(m.x[0]), jax.random.PRNGKey(0)
    report, calls = {}, {}
    for name, fn, args in [
            ("unet_grad", _unet_grad, (denoiser, m.ctx, x)),
            ("unet_grad_in_cond", _unet_grad_in_cond, (denoiser, m.ctx, x, jnp.asarray(True))),
            ("step_no_branch", lambda d, s, k, x, c: _step(d, s, k, x, c, False), (denoiser, scheme, key, x, m.ctx)),
            ("step_in_branch", lambda d, s, k, x, c: _step(d, s, k, x, c, True), (denoiser, scheme, key, x, m.ctx))]:
        compiled, seconds, _ = compile_step(fn, args)
        calls[name] = (compiled, args)
        report[name] = {"compile_seconds": seconds}
        print(f"  tiny_sd: compiled {name} in {seconds:.1f} s", flush=True)
    a = calls["step_no_branch"][0](*calls["step_no_branch"][1])
    b = calls["step_in_branch"][0](*calls["step_in_branch"][1])
    report["steps_max_relative_difference"] = float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(a)))
    for name, value in time_round_robin(calls, repeats).items():
        report[name].update(value)
    report["ratio_unet_grad_in_cond"] = report["unet_grad_in_cond"]["seconds_median"] / report["unet_grad"]["seconds_median"]
    report["ratio_step_in_branch"] = report["step_in_branch"]["seconds_median"] / report["step_no_branch"]["seconds_median"]
    return report


def digits(repeats: int) -> dict:
    from zmagic_jax.ports import load_digit_models
    from zmagic_jax.tasks._digits import DigitSettings, _problem, check_run
    from zmagic_jax.tasks._recipe import sample_seeds

    models = load_digit_models()
    settings = DigitSettings(seeds=tuple(range(6)))
    args, static, _ = _problem(models, settings, "independent", check_run("independent", ("class", "layout"), "bench"))
    report, calls = {"every_step_guided": not static["skip_inactive"]}, {}
    for name, skip in (("run_no_branch", False), ("run_in_branch", True)):
        options = dict(static, skip_inactive=skip)
        compiled, seconds, _ = compile_step(lambda *a, options=options: sample_seeds(*a, **options), args)
        calls[name] = (compiled, args)
        report[name] = {"compile_seconds": seconds}
        print(f"  digits: compiled {name} in {seconds:.1f} s", flush=True)
    for name, value in time_round_robin(calls, repeats).items():
        report[name].update(value)
    report["ratio_run_in_branch"] = report["run_in_branch"]["seconds_median"] / report["run_no_branch"]["seconds_median"]
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=str(HERE / "results" / "bench_branch.json"))
    args = parser.parse_args(argv)
    report = {"jax": jax.__version__, "backend": jax.default_backend(), "cpu_count": os.cpu_count(),
              "load_at_start": os.getloadavg()[0], "repeats": args.repeats,
              "tiny_sd": tiny_sd(args.repeats), "digits": digits(args.repeats)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    tmp.replace(out)
    print(json.dumps({k: report[k] for k in ("tiny_sd", "digits")}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
