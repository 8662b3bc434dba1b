"""Why the models use their own convolution: JAX's input gradient of a convolution inside a
rolled loop on XLA:CPU, against the library's (``zmagic_jax.models._layers.conv_general_dilated``).

Two measurements, each round robin in one process (medians of ``--repeats``):

* one 3 x 3 stride-1 convolution (48 x 16 x 16 x 64, float32), 10 gradient steps in a
  ``lax.scan``: ``lax`` rolled, ``lax`` unrolled, the library's rolled;
* one guided step of the embedded canvas text model (FreeDoM box guidance, CFG, batch
  ``--batch``) inside the sampler's scan (``sample_batch``, 5 steps), with the models' convolution
  against ``lax.conv_general_dilated`` (the same UNet built with flax's own ``Conv``), and the
  plain (unguided) step for scale.

    python experiments/bench_conv_loop.py [--repeats 5] [--batch 24] [--out experiments/results/bench_conv_loop.json]
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from zmagic_jax._io import atomic_write_bytes  # noqa: E402
from zmagic_jax.models import _layers  # noqa: E402


def round_robin(fns: dict, repeats: int) -> dict:
    for fn in fns.values():
        jax.block_until_ready(fn())
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            begin = time.perf_counter()
            jax.block_until_ready(fn())
            times[name].append(time.perf_counter() - begin)
    return {name: statistics.median(t) for name, t in times.items()}


def single_conv(repeats: int) -> dict:
    k = 0.05 * jax.random.normal(jax.random.PRNGKey(0), (3, 3, 64, 64))
    x = jax.random.normal(jax.random.PRNGKey(1), (48, 16, 16, 64))
    kw = dict(window_strides=(1, 1), padding=((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC"))

    def program(conv, unroll):
        def grad(k, x):
            return jax.grad(lambda y: jnp.sum(jnp.tanh(conv(y, k, **kw))))(x)
        return jax.jit(lambda k, x: jax.lax.scan(lambda x, _: (x - 0.01 * grad(k, x), None), x, None, length=10,
                                                 unroll=unroll)[0])
    fns = {"lax rolled": program(jax.lax.conv_general_dilated, False),
           "lax unrolled": program(jax.lax.conv_general_dilated, True),
           "library rolled": program(_layers.conv_general_dilated, False)}
    seconds = round_robin({n: (lambda f=f: f(k, x)) for n, f in fns.items()}, repeats)
    return {"per_gradient_step_ms": {n: round(1e3 * s / 10, 3) for n, s in seconds.items()},
            "lax_rolled_over_library": round(seconds["lax rolled"] / seconds["library rolled"], 2)}


def canvas_step(repeats: int, batch: int) -> dict:
    from zmagic_jax.energies import box_energy
    from zmagic_jax.models import encode_prompt, latent_denoiser
    from zmagic_jax.ports import load_canvas_models
    from zmagic_jax.samplers import ddim, step_contexts
    from zmagic_jax.schemes import condition, independent, none
    from zmagic_jax.step_rules import freedom_rule
    from zmagic_jax.tasks._recipe import model_grid, sample_batch

    steps = 5
    x = jax.random.normal(jax.random.PRNGKey(0), (batch, 1, 32, 32))
    keys = jax.random.split(jax.random.PRNGKey(1), batch)
    box = jnp.zeros((1, 32, 32)).at[:, 8:20, 14:26].set(1.0)
    guided = independent([condition("box", box_energy(box), freedom_rule(jnp.float32(100.0)))])
    fns = {}
    for label, conv in (("library", _layers.conv_general_dilated), ("lax", jax.lax.conv_general_dilated)):
        _layers.Conv.keywords["conv_general_dilated"] = conv  # the models build their layers from this
        sd = load_canvas_models().text
        den = latent_denoiser(sd, encode_prompt(sd, ["a 3"])[0], encode_prompt(sd, [""])[0], jnp.float32(3.0))
        ctx = step_contexts(sd.schedule, model_grid(sd.schedule, steps, "bench"))
        for name, scheme, skip in (("guided", guided, False), ("plain", none(), True)):
            program = jax.jit(lambda k, x, c, d, s, skip=skip: sample_batch(k, x, c, d, s, ddim(0.0),
                                                                            skip_inactive=skip))
            compiled = program.lower(keys, x, ctx, den, scheme).compile()
            fns[f"{name} ({label} conv)"] = lambda c=compiled, d=den, s=scheme, ctx=ctx: c(keys, x, ctx, d, s)
    _layers.Conv.keywords["conv_general_dilated"] = _layers.conv_general_dilated
    seconds = round_robin(fns, repeats)
    per_step = {n: round(1e3 * s / steps, 1) for n, s in seconds.items()}
    return {"batch": batch, "steps": steps, "per_step_ms": per_step,
            "guided_lax_over_library": round(seconds["guided (lax conv)"] / seconds["guided (library conv)"], 2),
            "guided_over_plain_library": round(seconds["guided (library conv)"] / seconds["plain (library conv)"], 2),
            "guided_over_plain_lax": round(seconds["guided (lax conv)"] / seconds["plain (lax conv)"], 2)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=24)
    parser.add_argument("--out", default=str(HERE / "results" / "bench_conv_loop.json"))
    args = parser.parse_args(argv)
    result = {"machine": {"platform": platform.platform(), "jax": jax.__version__, "devices": str(jax.devices())},
              "single_conv": single_conv(args.repeats), "canvas_step": canvas_step(args.repeats, args.batch)}
    text = json.dumps(result, indent=1)
    atomic_write_bytes(Path(args.out), text.encode())
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
