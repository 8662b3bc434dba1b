"""COW / SOW on the embedded canvas text model, beyond the demo's setting: every digit and every
piece, SOW's strength sweep and the paper's ablation (each part of the modulation switched off).

For each digit 0..9 and piece (``--pieces``, default top and left): the demo's three runs (replacement,
COW, SOW at its defaults) on ``--count`` held-out digits of the class, scored as in the demo
(:mod:`zmagic_jax.tasks._one_way`). Then, on the digits 3 and 7 (top halves), SOW with both
strengths at 0.1 / 0.3 / 1 / 3 and the ablation at strength 1 (no suppression, no enhancement,
no temporal decay, no spatial decay, no indicator). Strengths, digits and pieces are leaves of
the same programs (compiled once); the indicator switch is static (one more program).

    python experiments/one_way_canvas.py [--count 16] [--pieces top left] [--out ...]   # about 15 min
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import numpy as np  # noqa: E402

from zmagic_jax._io import atomic_write_bytes  # noqa: E402
from zmagic_jax.modulation import Modulation  # noqa: E402
from zmagic_jax.ports import load_canvas_models, load_digit_models  # noqa: E402
from zmagic_jax.tasks._one_way import PIECES, OneWayDemoSettings, prepare_one_way_demo, run_one_way_demo  # noqa: E402
from zmagic_jax.tasks._recipe import PROGRAMS  # noqa: E402

SWEEP = (0.1, 0.3, 1.0, 3.0)
ABLATION = ("suppress", "enhance", "temporal_decay", "spatial_decay", "indicator")


def run(canvas, digits, settings: OneWayDemoSettings, only=None) -> dict:
    plan = prepare_one_way_demo(canvas, digits, settings)
    PROGRAMS.compile_pending(2)
    if only is not None:
        plan = plan._replace(runs={k: v for k, v in plan.runs.items() if k in only})
    report = run_one_way_demo(canvas, plan, settings)
    return {"rows": report["rows"], "floor": report["floor"]}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=16)
    parser.add_argument("--digits", type=int, nargs="+", default=list(range(10)))
    parser.add_argument("--pieces", nargs="+", default=["top", "left"], choices=PIECES)
    parser.add_argument("--out", default=str(HERE / "results" / "one_way_canvas.json"))
    args = parser.parse_args(argv)
    canvas, digits = load_canvas_models(), load_digit_models()
    start = time.perf_counter()
    result = {"count": args.count, "settings": dataclasses.asdict(OneWayDemoSettings(count=args.count)),
              "by_digit": {}, "sweep": {}, "ablation": {}}
    for piece in args.pieces:
        for digit in args.digits:
            result["by_digit"][f"{digit} {piece}"] = run(canvas, digits, OneWayDemoSettings(
                digit=digit, piece=piece, count=args.count))
            print(piece, digit, {k: round(v["frechet"], 1) for k, v in result["by_digit"][f"{digit} {piece}"]
                                 ["rows"].items()}, flush=True)
    mean = {}
    for name in ("replace", "cow", "sow"):
        rows = [entry["rows"][name] for entry in result["by_digit"].values()]
        mean[name] = {key: float(np.mean([r[key] for r in rows])) for key in rows[0]}
    mean["real floor"] = {"frechet": float(np.mean([e["floor"]["frechet_real_vs_real"][0]
                                                    for e in result["by_digit"].values()])),
                          "seam": float(np.mean([e["floor"]["seam"] for e in result["by_digit"].values()]))}
    result["mean_over_digits_and_pieces"] = mean
    for digit in (3, 7):
        for strength in SWEEP:
            modulation = Modulation(suppress_strength=strength, enhance_strength=strength)
            result["sweep"][f"{digit} w={strength}"] = run(canvas, digits, OneWayDemoSettings(
                digit=digit, count=args.count, modulation=modulation), only=("cow", "sow"))
        for part in ABLATION:
            modulation = Modulation(suppress_strength=1.0, enhance_strength=1.0, **{part: False})
            result["ablation"][f"{digit} no {part}"] = run(canvas, digits, OneWayDemoSettings(
                digit=digit, count=args.count, modulation=modulation), only=("sow",))
        print(digit, "sweep and ablation done", flush=True)
    result["seconds"] = round(time.perf_counter() - start, 1)
    atomic_write_bytes(Path(args.out), json.dumps(result, indent=1).encode())
    print(json.dumps(mean, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
