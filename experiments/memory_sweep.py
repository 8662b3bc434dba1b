"""A sweep over weights and guidance scales: compiles and memory of weights-as-arguments against
weights closed over (the contract of ``zmagic_jax.contracts``, measured).

Each of 10 calls of ``zm.sample`` gets new weights (a 64 MB array the denoiser reads) and a new
guidance scale. ``arguments``: ``Denoiser(apply, params)`` and the scale a step-rule leaf, as the
library asks. ``closure``: the same denoiser closing over its weights and a new rule per call, what
the old API invited (every call is a new static function, so it retraces, recompiles and keeps the
weights as a constant of a cached program). Writes per call: wall time, traces of the denoiser and
the process RSS (from /proc/self/statm), to ``experiments/results/memory_sweep.json``.

    python experiments/memory_sweep.py [--calls 10] [--megabytes 64] [--out PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

import zmagic_jax as zm  # noqa: E402

TRACES = []


def rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def apply(params, x, t):
    TRACES.append(1)
    return 0.1 * x + 1e-9 * jnp.mean(params)


def energy(target, x0):
    return jnp.sum((x0 - target) ** 2)


def run(mode: str, calls: int, megabytes: int) -> list:
    schedule = zm.linear_schedule()
    grid = zm.timestep_grid(1000, 10)
    x_T = jnp.zeros((4, 8))
    rows = []
    for i in range(calls):
        weights = jnp.full((megabytes * 2 ** 18,), float(i), jnp.float32)  # megabytes of float32
        scale = 0.5 + 0.1 * i
        if mode == "arguments":
            denoiser = zm.Denoiser(apply, weights)
        else:
            denoiser = zm.Denoiser(lambda p, x, t, w=weights: apply(w, x, t))  # weights baked in
        scheme = zm.independent([zm.condition("c", energy, zm.freedom_rule(scale), 0.3)])
        TRACES.clear()
        start = time.perf_counter()
        out = zm.sample(jax.random.PRNGKey(0), x_T, schedule, grid, denoiser=denoiser, scheme=scheme)
        jax.block_until_ready(out.x0)
        rows.append({"call": i, "seconds": round(time.perf_counter() - start, 4), "traces": len(TRACES),
                     "rss_mb": round(rss_mb(), 1)})
        del weights, denoiser, out
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--calls", type=int, default=10)
    parser.add_argument("--megabytes", type=int, default=64)
    parser.add_argument("--out", default="experiments/results/memory_sweep.json")
    args = parser.parse_args(argv)
    report = {"calls": args.calls, "megabytes": args.megabytes, "jax": jax.__version__}
    for mode in ("arguments", "closure"):
        rows = run(mode, args.calls, args.megabytes)
        report[mode] = {"calls": rows, "rss_growth_mb": round(rows[-1]["rss_mb"] - rows[0]["rss_mb"], 1),
                        "retraced_calls": sum(r["traces"] > 0 for r in rows[1:])}
        print(f"{mode:9s}: RSS {rows[0]['rss_mb']:.0f} -> {rows[-1]['rss_mb']:.0f} MB over {args.calls} calls, "
              f"{report[mode]['retraced_calls']} of {args.calls - 1} later calls retraced, "
              f"median call {sorted(r['seconds'] for r in rows[1:])[len(rows) // 2 - 1]:.3f} s")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
