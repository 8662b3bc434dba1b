"""What AMDM costs per step: K models aggregated in one scan against K single-model chains.

For K = 2 and 3 copies of one model (each its own prompt, CFG on), a whole run of ``--steps``
DDIM steps of ``--batch`` samples (vmapped), timed round robin (medians of ``--repeats`` calls,
compile excluded):

* ``single x K``: K separate single-model runs (``sample_batch``, one compiled program), summed;
* ``amdm stacked``: :func:`~zmagic_jax.aggregate_chain` with the K models as one
  :class:`~zmagic_jax.DenoiserStack` (one vmapped UNet call per step);
* ``amdm tuple``: the same models as a tuple of denoisers (K UNet calls per step, the path of
  models of different architectures).

The aggregation window covers every step but the first (``(1, steps - 1)``), the most work AMDM
does; the release aggregates 3 of 50. Per-step cost = run time / steps. Then the compile time of
``amdm stacked`` (K = 2) for 10, 25 and 50 steps: one ``lax.scan``, so it should not grow.

Models: ``canvas`` (the embedded canvas text model, 32 x 32 pixels; random weights of its
architecture when the assets are absent) and ``tiny_sd`` (the tiny random SD of
``tiny_models.py``, 4 x 8 x 8 latents).

    python experiments/bench_amdm.py [--steps 20] [--batch 4] [--repeats 5] [--out experiments/results/bench_amdm.json]
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import zmagic_jax as zm  # noqa: E402
from bench_schemes import time_round_robin  # noqa: E402
from zmagic_jax._io import atomic_write_bytes  # noqa: E402
from zmagic_jax.models import encode_prompt, latent_denoiser, load_stable_diffusion  # noqa: E402
from zmagic_jax.tasks._recipe import sample_batch  # noqa: E402

PROMPTS = ("a 3", "a 7", "a 1 and a 5")


def _models(tmp: Path) -> dict:
    from zmagic_jax.ports import load_canvas_models
    from zmagic_jax.ports._canvas import CANVAS_ASSETS
    out = {}
    if CANVAS_ASSETS.is_dir():
        out["canvas"] = (load_canvas_models().text, "embedded weights")
    else:
        from tiny_models import save_sd_folder
        from train_canvas_digits import MAX_TOKENS, SCHEDULER, UNET, Nets, text_config, vocabulary
        vocab, merges = vocabulary()
        params = Nets(UNET, text_config(vocab)).init(0)
        folder = save_sd_folder(tmp / "canvas", unet=UNET, unet_params=params["unet"], text=text_config(vocab),
                                text_params=params["text"], vocab=vocab, merges=merges, scheduler=SCHEDULER,
                                model_max_length=MAX_TOKENS)
        out["canvas"] = (load_stable_diffusion(folder), "random weights of the canvas architecture")
    from tiny_models import save_tiny_stable_diffusion
    out["tiny_sd"] = (load_stable_diffusion(save_tiny_stable_diffusion(tmp / "tiny_sd")["path"]), "random")
    return out


def _single(keys, x_T, contexts, denoiser):
    return sample_batch(keys, x_T, contexts, denoiser, zm.none(), zm.ddim(0.0))[0]


def _amdm(keys, x_T, contexts, denoisers, agg):
    def one(key, x):
        return zm.aggregate_chain(key, x, contexts, denoisers=denoisers, aggregation=agg, sampler=zm.ddim(0.0),
                                  schemes=(zm.none(),))[0]
    return jax.vmap(one)(keys, x_T)


def bench_model(sd, steps: int, batch: int, repeats: int) -> dict:
    shape = (sd.latent_channels, int(sd.sample_size), int(sd.sample_size))
    grid = zm.timestep_grid(sd.schedule.num_train_steps, steps)
    contexts = zm.step_contexts(sd.schedule, grid)
    actx = zm.aggregation_contexts(sd.schedule, grid, jnp.float32)
    uncond = encode_prompt(sd, [""])[0]
    dens = [latent_denoiser(sd, encode_prompt(sd, [p])[0], uncond, jnp.float32(3.0)) for p in PROMPTS]
    keys = jax.random.split(jax.random.PRNGKey(0), batch)
    out = {"shape": list(shape), "rows": {}}
    single = jax.jit(_single)
    amdm = jax.jit(_amdm)
    for k in (2, 3):
        x_T = jax.random.normal(jax.random.PRNGKey(1), (batch, k) + shape)
        agg = zm.aggregation(zm.release_steps(k, shape), 0.5 if k == 2 else (0.47, 0.5), window=(1, steps - 1))
        calls = {f"single x{k}": (lambda *a, k=k: [single(*a[:2], a[2], dens[i]) for i in range(k)],
                                  (keys, x_T[:, 0], contexts)),
                 f"amdm stacked K={k}": (amdm, (keys, x_T, actx, zm.stack_denoisers(dens[:k]), agg)),
                 f"amdm tuple K={k}": (amdm, (keys, x_T, actx, tuple(dens[:k]), agg))}
        times = time_round_robin(calls, repeats)
        for name, t in times.items():
            out["rows"][name] = {"run_s": round(t["seconds_median"], 4),
                                 "per_step_ms": round(1000 * t["seconds_median"] / steps, 2)}
        base = times[f"single x{k}"]["seconds_median"]
        for kind in ("stacked", "tuple"):
            out["rows"][f"amdm {kind} K={k}"]["vs_single_xK"] = round(times[f"amdm {kind} K={k}"]["seconds_median"]
                                                                      / base, 3)
    compile_s = {}
    for n in (10, 25, 50):
        g = zm.timestep_grid(sd.schedule.num_train_steps, n)
        x_T = jax.random.normal(jax.random.PRNGKey(1), (batch, 2) + shape)
        args = (keys, x_T, zm.aggregation_contexts(sd.schedule, g, jnp.float32), zm.stack_denoisers(dens[:2]),
                zm.aggregation(zm.release_steps(2, shape), 0.5, window=(1, n - 1)))
        compile_s[str(n)] = compile_seconds(_amdm, args)
    out["compile_s_amdm_stacked_K2_by_steps"] = compile_s
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--only", nargs="*", default=["canvas", "tiny_sd"])
    parser.add_argument("--out", default=str(HERE / "results" / "bench_amdm.json"))
    args = parser.parse_args(argv)
    result = {"steps": args.steps, "batch": args.batch, "repeats": args.repeats, "cfg": 3.0,
              "window": "every step but the first", "backend": jax.default_backend(),
              "devices": jax.device_count(), "models": {}}
    return bench_models(args.only, lambda sd: bench_model(sd, args.steps, args.batch, args.repeats), result,
                        args.out)


def bench_models(only, bench, result: dict, out) -> int:
    """``result["models"][name] = bench(sd)`` for every model named in ``only`` (:func:`_models`),
    printed as it goes; ``result`` written to ``out`` atomically."""
    with tempfile.TemporaryDirectory() as tmp:
        models = _models(Path(tmp))
        for name in only:
            sd, weights = models[name]
            print(f"{name} ({weights}) ...", flush=True)
            result["models"][name] = {"weights": weights, **bench(sd)}
            print(json.dumps(result["models"][name], indent=1), flush=True)
    atomic_write_bytes(Path(out), json.dumps(result, indent=1).encode())
    print(f"wrote {out}")
    return 0


def compile_seconds(fn, args) -> float:
    """Seconds to lower and compile ``jax.jit(fn)`` for ``args`` on a cold cache (earlier timed
    runs may have compiled the same program)."""
    jax.clear_caches()
    start = time.perf_counter()
    jax.jit(fn).lower(*args).compile()
    return round(time.perf_counter() - start, 2)


if __name__ == "__main__":
    raise SystemExit(main())
