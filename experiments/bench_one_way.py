"""What COW and SOW cost: against plain sampling with the same number of denoiser calls, and SOW's
attention-modulation overhead per UNet call.

On one model, ``--batch`` samples (vmapped), prompt with CFG, timed round robin (medians of
``--repeats`` calls, compile excluded):

* ``replace``: inpainting by replacement on N = ``--steps`` steps (N inversion + N sampling calls);
* ``cow``: COW with the release's levels for N (r, b, p = 0.5, 0.7, 0.4 N) and C = ``--cycles``
  (b inversion + C (b - r) cycle + r final calls);
* ``sow``: COW with SOW's modulation on every self-attention layer in the cycles;
* ``plain (same calls)``: DDIM sampling with as many steps as COW makes denoiser calls.

Then one CFG UNet call of the batch with and without the modulation (``modulation overhead``),
and COW's compile time for C = 2, 10, 40 (one ``lax.scan`` over cycles: it should not grow).

Models: ``canvas`` (the embedded canvas text model, 1 x 32 x 32 pixels, attention at 16 x 16 and
8 x 8) and ``tiny_sd`` (the tiny random SD of ``tiny_models.py``, 4 x 8 x 8 latents).

    python experiments/bench_one_way.py [--steps 10] [--cycles 10] [--batch 8] [--repeats 5]
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

import zmagic_jax as zm  # noqa: E402
from bench_amdm import bench_models, compile_seconds  # noqa: E402
from bench_schemes import time_round_robin  # noqa: E402
from zmagic_jax.models import attention_layers, encode_prompt, latent_denoiser  # noqa: E402
from zmagic_jax.modulation import Modulation, box_mask, region_modulations  # noqa: E402
from zmagic_jax.tasks._one_way import _one_way_run, _replace_run  # noqa: E402
from zmagic_jax.tasks._recipe import sample_batch  # noqa: E402


def _plain(keys, x_T, contexts, denoiser):
    return sample_batch(keys, x_T, contexts, denoiser, zm.none(), zm.ddim(0.0))[0]


def _unet_call(x, t, denoiser):
    return jax.vmap(lambda x: denoiser(x, t))(x)


def bench_model(sd, steps: int, cycles: int, batch: int, repeats: int) -> dict:
    c, side = sd.latent_channels, int(sd.sample_size)
    shape = (c, side, side)
    grid = zm.timestep_grid(sd.schedule.num_train_steps, steps)
    contexts = zm.step_contexts(sd.schedule, grid)
    uncond = encode_prompt(sd, [""])[0]
    prompt = encode_prompt(sd, ["a 3"])[0]
    den = latent_denoiser(sd, prompt, uncond, jnp.float32(3.0))
    # the condition: the top quarter rows, middle half columns; related: the rows below it
    q = side // 4
    condition = box_mask((q, q, 2 * q, 3 * q), (side, side))
    related = box_mask((2 * q, q, 3 * q, 3 * q), (side, side))
    mods = region_modulations(attention_layers(sd.unet.config, side), condition, related, Modulation())
    modulated = latent_denoiser(sd, prompt, uncond, jnp.float32(3.0), modifiers=mods)
    keys = jax.random.split(jax.random.PRNGKey(0), batch)
    x = jax.random.normal(jax.random.PRNGKey(1), (batch,) + shape)
    region = jnp.broadcast_to(jnp.asarray(condition, jnp.float32), shape)
    settings = zm.oneway.one_way(steps, cycles=cycles)
    r, b = settings.replace, settings.back
    calls_cow = b + cycles * (b - r) + r
    plain_contexts = zm.step_contexts(sd.schedule, zm.timestep_grid(sd.schedule.num_train_steps, calls_cow))
    runs = {"replace": (jax.jit(_replace_run), (keys, x, region, contexts, den, zm.ddim(0.0))),
            "cow": (jax.jit(_one_way_run), (keys, x, region, contexts, den, settings)),
            "sow": (jax.jit(_one_way_run), (keys, x, region, contexts, modulated, settings)),
            "plain (same calls)": (jax.jit(_plain), (keys, x, plain_contexts, den))}
    denoiser_calls = {"replace": 2 * steps, "cow": calls_cow, "sow": calls_cow, "plain (same calls)": calls_cow}
    times = time_round_robin(runs, repeats)
    out = {"shape": list(shape), "steps": steps, "cycles": cycles, "levels": [r, b, settings.preserve], "rows": {}}
    for name, t in times.items():
        out["rows"][name] = {"run_s": round(t["seconds_median"], 4), "denoiser_calls": denoiser_calls[name],
                             "per_call_ms": round(1000 * t["seconds_median"] / denoiser_calls[name], 2)}
    base = times["plain (same calls)"]["seconds_median"]
    for name in ("cow", "sow"):
        out["rows"][name]["vs_plain_same_calls"] = round(times[name]["seconds_median"] / base, 3)
    t = jnp.int32(500)
    unet = jax.jit(_unet_call)
    call_times = time_round_robin({"unmodulated": (unet, (x, t, den)), "modulated": (unet, (x, t, modulated))},
                                  max(repeats, 10))
    plain_ms, mod_ms = (1000 * call_times[k]["seconds_median"] for k in ("unmodulated", "modulated"))
    out["unet_call_ms"] = {"unmodulated": round(plain_ms, 3), "modulated": round(mod_ms, 3),
                           "modulation_overhead": round(mod_ms / plain_ms, 3),
                           "modulated_layers": len(mods)}
    compile_s = {}
    for count in (2, 10, 40):
        args = (keys, x, region, contexts, den, zm.oneway.one_way(steps, cycles=count))
        compile_s[str(count)] = compile_seconds(_one_way_run, args)
    out["compile_s_cow_by_cycles"] = compile_s
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--cycles", type=int, default=10)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", nargs="*", default=["canvas", "tiny_sd"])
    parser.add_argument("--out", default=str(HERE / "results" / "bench_one_way.json"))
    args = parser.parse_args(argv)
    result = {"batch": args.batch, "repeats": args.repeats, "cfg": 3.0, "backend": jax.default_backend(),
              "devices": jax.device_count(), "numpy": np.__version__, "jax": jax.__version__, "models": {}}
    return bench_models(args.only, lambda sd: bench_model(sd, args.steps, args.cycles, args.batch, args.repeats),
                        result, args.out)


if __name__ == "__main__":
    raise SystemExit(main())
