"""AMDM on the embedded canvas models at full size, and the sweep its small-model defaults come from.

The demo's AMDM section (:mod:`zmagic_jax.tasks._canvas_demo`: the text model prompted ``"a d"``,
the layout model given one box) with ``--count`` canvases per run for every digit 0..9 (the layout
of held-out digit ``d``'s first example each time); the two guided runs (a backward pass through
the UNet per step, about 10x a plain run on CPU) only for ``--sweep-digits``. Then sweeps, all
leaves of one compiled program each: AMDM's window (its last loop index) x the deviation step
lengths as a multiple of the release's rescaled to the canvas (13.75 / 11.25) at ``w = 0.5``, then
``w`` at the default window and steps; and the FreeDoM scale of the layout model's digit guidance.
Scores per chain: the evaluator finds the digit, the box IoU, and their product ("both"): does
aggregation give both attributes?

    python experiments/amdm_canvas.py [--count 32] [--steps 25] [--out experiments/results/amdm_canvas]
"""
from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))

import numpy as np  # noqa: E402

from zmagic_jax._io import atomic_write_bytes  # noqa: E402
from zmagic_jax.ports import load_canvas_models, load_digit_models  # noqa: E402
from zmagic_jax.tasks._canvas_demo import (RUNS, CanvasDemoSettings, canvas_table, prepare_canvas_demo,  # noqa: E402
                                           run_canvas_demo, save_canvas_demo)
from zmagic_jax.tasks._recipe import PROGRAMS  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=32)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--digits", type=int, nargs="*", default=list(range(10)))
    parser.add_argument("--lasts", type=int, nargs="*", default=[3, 6, 12])
    parser.add_argument("--scales", type=float, nargs="*", default=[0.5, 1.0, 2.0])
    parser.add_argument("--weights", type=float, nargs="*", default=[0.3, 0.7])
    parser.add_argument("--digit-scales", type=float, nargs="*", default=[1.0, 4.0, 16.0])
    parser.add_argument("--sweep-digits", type=int, nargs="*", default=[3, 7])
    parser.add_argument("--out", default=str(HERE / "results" / "amdm_canvas"))
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    canvas, digits = load_canvas_models(), load_digit_models()
    labels = np.asarray(digits.heldout_labels)

    def settings_for(digit, **kw):
        return CanvasDemoSettings(digit=digit, layout_source=int(np.flatnonzero(labels == digit)[0]),
                                  count=args.count, num_steps=args.steps, **kw)

    result = {"count": args.count, "steps": args.steps, "per_digit": {}, "sweep": []}
    guided = tuple(r for r in RUNS if "guidance" in r)
    for digit in args.digits:
        settings = settings_for(digit)
        plan = prepare_canvas_demo(canvas, digits, settings)
        PROGRAMS.compile_pending(2)
        report = run_canvas_demo(canvas, plan, settings,
                                 only=None if digit in args.sweep_digits else tuple(r for r in RUNS if r not in guided))
        result["per_digit"][str(digit)] = {"rows": report["rows"], "floor": report["floor"]}
        print(f"digit {digit}\n{canvas_table(report)}", flush=True)
        if digit == args.sweep_digits[0]:
            save_canvas_demo(out / f"digit{digit}", report, plan, settings)
    labels_run = sorted({label for d in result["per_digit"].values() for label in d["rows"]})
    result["mean_over_digits"] = {
        label: {key: float(np.mean([d["rows"][label][key] for d in result["per_digit"].values() if label in d["rows"]]))
                for key in ("digit", "exact", "box_iou", "ink_in_box", "frechet")} | {
            "digits": [int(k) for k, d in result["per_digit"].items() if label in d["rows"]]} for label in labels_run}
    default = CanvasDemoSettings()
    grid = [(last, scale, default.weight) for last, scale in itertools.product(args.lasts, args.scales)]
    grid += [(default.window[1], default.step_scale, w) for w in args.weights if w != default.weight]
    for last, scale, weight in grid:
        if last >= args.steps:
            continue
        row = {"window": [1, last], "step_scale": scale, "weight": weight}
        for digit in args.sweep_digits:
            settings = settings_for(digit, window=(1, last), step_scale=scale, weight=weight)
            plan = prepare_canvas_demo(canvas, digits, settings)
            report = run_canvas_demo(canvas, plan, settings, only=("amdm released", "amdm slerp"))
            for label, scores in report["rows"].items():
                row.setdefault(label, []).append(scores)
        for label in [k for k in row if k.startswith("amdm")]:
            row[label] = {key: float(np.mean([s[key] for s in row[label]])) for key in row[label][0]}
            row[label]["both"] = row[label]["digit"] * row[label]["box_iou"]
        result["sweep"].append(row)
        print(json.dumps({k: (v if not isinstance(v, dict) else round(v["both"], 3)) for k, v in row.items()}),
              flush=True)
    best = max(result["sweep"], key=lambda r: max(r[k]["both"] for k in r if k.startswith("amdm")))
    result["best"] = best
    result["digit_scale_sweep"] = []
    for scale in args.digit_scales:
        row = {"digit_scale": scale}
        for digit in args.sweep_digits:
            settings = settings_for(digit, digit_scale=scale)
            plan = prepare_canvas_demo(canvas, digits, settings)
            report = run_canvas_demo(canvas, plan, settings, only=("layout + digit guidance",))
            row.setdefault("scores", []).append(report["rows"]["layout + digit guidance"])
        row["scores"] = {key: float(np.mean([s[key] for s in row["scores"]])) for key in row["scores"][0]}
        result["digit_scale_sweep"].append(row)
        print(json.dumps(row), flush=True)
    result["settings_default"] = dataclasses.asdict(CanvasDemoSettings())
    atomic_write_bytes(out / "results.json", json.dumps(result, indent=1).encode())
    print(f"wrote {out}/results.json; best {json.dumps(best)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
