"""Cost of one guided face step at 256x256 on CPU: each energy's gradient and the full schemes.

    python experiments/bench_face.py --out experiments/results/bench_face.json [--quick]

Networks have the published architectures (CelebA-HQ DDPM UNet 113.7 M parameters, BiSeNet at
512, ArcFace IR-SE50, MobileFaceNet, MTCNN ONet) with random weights (costs do not depend on the
values; the ONet uses its real weights when facenet-pytorch is installed). One sample, the step at
t = 500 of FreeDoM's 100-step grid, the eta = 0.5 mixing sampler.

Sections of the JSON report:

* ``parts``: the UNet forward; per energy, the energy's own gradient w.r.t. ``x0`` and the
  guidance gradient ``grad_{x_t} E(x0|t(x_t))`` through the UNet (what every guided step pays per
  condition); ratios to the UNet forward.
* ``steps``: one ``zm.step`` of the Table 4 task (identity + landmarks) with
  none / independent / dependent / multi, and ratios to independent.

Every jitted function takes the weights and references as arguments (the ``zm.Denoiser``, the
``zm.Energy`` objects, the scheme), as the library's own programs do, so nothing is baked in as
a constant: the memory analysis counts the weights as arguments, and compile times are those of
programs that serve any weights of the same architectures.

Times are medians of ``time.perf_counter`` around ``jax.block_until_ready`` after a warm-up call,
functions of a section timed round-robin (``bench_schemes.time_round_robin``); compile times and
XLA's memory analysis are recorded per function. ``--quick`` uses 64x64 images and reduced
networks (< 5 min), for checking the script.
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import zmagic_jax as zm  # noqa: E402
from bench_schemes import compile_step, machine_info, run_sections, time_round_robin, write_report  # noqa: E402
from tiny_models import random_params, tiny_face_configs  # noqa: E402
from zmagic_jax.energies import Net, face_id_energy, face_parsing_energy, landmark_energy  # noqa: E402
from zmagic_jax.models import ddpm_denoiser  # noqa: E402
from zmagic_jax.ports import PORTS, load_onet  # noqa: E402
from zmagic_jax.schedules import x0_from_eps  # noqa: E402
from zmagic_jax.tasks._recipe import scheme_by_name  # noqa: E402

STEP = 50  # of 100: t = 500


def networks(quick: bool) -> dict:
    configs = tiny_face_configs(64) if quick else {name: PORTS[name].default_config
                                                    for name in ("ddpm_unet", "bisenet", "arcface", "mobilefacenet")}
    nets = {name: Net(PORTS[name].module(config), random_params(PORTS[name], config, seed=i))
            for i, (name, config) in enumerate(configs.items())}
    if importlib.util.find_spec("facenet_pytorch") is not None:
        nets["onet"] = Net(*load_onet())
        nets["onet_weights"] = "real (facenet-pytorch)"
    else:
        config = PORTS["onet"].default_config
        nets["onet"] = Net(PORTS["onet"].module(config), random_params(PORTS["onet"], config))
        nets["onet_weights"] = "random"
    return nets


def context():
    return zm.step_context(zm.linear_schedule(1000, 1e-4, 0.02), zm.timestep_grid(1000, 100), STEP)


def energies(nets: dict, reference, parse_size: int) -> dict:
    return {"segmentation": face_parsing_energy(nets["bisenet"], reference, parse_size),
            "identity": face_id_energy(nets["arcface"], reference),
            "landmarks_mobilefacenet": landmark_energy(nets["mobilefacenet"], reference),
            "landmarks_onet": landmark_energy(nets["onet"], reference, kind="onet")}


def timed(calls: dict, repeats: int) -> dict:
    compiled, report = {}, {}
    for name, (fn, args) in calls.items():
        executable, seconds, memory = compile_step(fn, args)
        compiled[name] = (executable, args)
        report[name] = {"compile_seconds": seconds, "memory": memory}
        print(f"  compiled {name} in {seconds:.1f} s", flush=True)
    for name, timing in time_round_robin(compiled, repeats).items():
        report[name].update(timing)
    return report


def unet_denoiser(nets):
    return ddpm_denoiser(nets["ddpm_unet"].module, nets["ddpm_unet"].params)


def _unet_forward(denoiser, ctx, x):
    return denoiser(x, ctx.t)


def _energy_gradient(energy, x0):
    return jax.grad(energy)(x0)


def _guidance_gradient(denoiser, energy, ctx, x):
    """``grad_{x_t} E(x0|t(x_t))``: the energy at Tweedie's estimate, through the UNet."""
    return jax.grad(lambda x: energy(x0_from_eps(x, denoiser(x, ctx.t), ctx.alpha_bar)))(x)


def _step(denoiser, scheme, sampler, key, x, ctx):
    return zm.step(key, x, ctx, denoiser=denoiser, scheme=scheme, sampler=sampler)[0]


def parts_section(nets, x, ctx, reference, parse_size, repeats) -> dict:
    unet = unet_denoiser(nets)
    calls = {"unet_forward": (_unet_forward, (unet, ctx, x))}
    for name, energy in energies(nets, reference, parse_size).items():
        calls[f"{name}/grad_x0"] = (_energy_gradient, (energy, reference * 0.9))
        calls[f"{name}/grad_xt_through_unet"] = (_guidance_gradient, (unet, energy, ctx, x))
    report = timed(calls, repeats)
    unit = report["unet_forward"]["seconds_median"]
    report["ratios_to_unet_forward"] = {name: report[name]["seconds_median"] / unit for name in calls}
    return report


def steps_section(nets, x, ctx, reference, parse_size, repeats) -> dict:
    unet = unet_denoiser(nets)
    found = energies(nets, reference, parse_size)
    conditions = (zm.condition("identity", found["identity"], zm.freedom_rule(100.0, stop=100)),
                  zm.condition("landmarks", found["landmarks_mobilefacenet"], zm.freedom_rule(500.0, stop=200)))
    sampler = zm.eta_mixing(0.5)
    key = jax.random.PRNGKey(0)
    calls = {}
    for name in ("none", "independent", "dependent", "multi"):
        calls[name] = (_step, (unet, scheme_by_name(name, conditions), sampler, key, x, ctx))
    report = timed(calls, repeats)
    base = report["independent"]["seconds_median"]
    report["ratios_to_independent"] = {name: report[name]["seconds_median"] / base for name in calls}
    return report


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="JSON report path (written atomically)")
    parser.add_argument("--quick", action="store_true", help="64x64 and reduced networks, for checking the script")
    parser.add_argument("--repeats", type=int, default=None)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    nets = networks(args.quick)
    resolution = nets["ddpm_unet"].module.config.resolution
    parse_size = 64 if args.quick else 512
    repeats = args.repeats or (2 if args.quick else 3)
    x = jax.random.normal(jax.random.PRNGKey(1), (resolution, resolution, 3))
    reference = jnp.tanh(jax.random.normal(jax.random.PRNGKey(2), (resolution, resolution, 3)))
    ctx = context()
    report = {"machine": machine_info(), "mode": "quick" if args.quick else "full", "resolution": resolution,
              "parse_size": parse_size, "onet_weights": nets.pop("onet_weights"), "repeats": repeats,
              "t": int(ctx.t),
              "timing": "median of repeats after a warm-up; functions of a section timed round-robin"}
    run_sections(report, (("parts", lambda: parts_section(nets, x, ctx, reference, parse_size, repeats)),
                          ("steps", lambda: steps_section(nets, x, ctx, reference, parse_size, repeats))))
    write_report(args.out, report, start)


if __name__ == "__main__":
    main()
