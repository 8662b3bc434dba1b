"""AMDM on the embedded canvas models at full size, and the sweep its small-model defaults come from.

The demo's AMDM section (:mod:`zmagic_jax.tasks._canvas_demo`: the text model prompted ``"a d"``,
the layout model given one box) with ``--count`` canvases per run for every digit 0..9 (the layout
of held-out digit ``d``'s first example each time), then a sweep of AMDM's numbers, all leaves of
one compiled program: the window's last loop index, the deviation step lengths as a multiple of
the release's rescaled to the canvas (13.75 / 11.25), and ``w``. Scores per chain: the evaluator
finds the digit, the box IoU, and their product ("both"): does aggregation give both attributes?

    python experiments/amdm_canvas.py [--count 64] [--steps 25] [--out experiments/results/amdm_canvas]
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
from zmagic_jax.tasks._canvas_demo import (CanvasDemoSettings, canvas_table, prepare_canvas_demo,  # noqa: E402
                                           run_canvas_demo, save_canvas_demo)
from zmagic_jax.tasks._recipe import PROGRAMS  # noqa: E402


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--count", type=int, default=64)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--digits", type=int, nargs="*", default=list(range(10)))
    parser.add_argument("--lasts", type=int, nargs="*", default=[3, 6, 12])
    parser.add_argument("--scales", type=float, nargs="*", default=[0.5, 1.0, 2.0])
    parser.add_argument("--weights", type=float, nargs="*", default=[0.5])
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
    for digit in args.digits:
        settings = settings_for(digit)
        plan = prepare_canvas_demo(canvas, digits, settings)
        PROGRAMS.compile_pending(2)
        report = run_canvas_demo(canvas, plan, settings)
        result["per_digit"][str(digit)] = {"rows": report["rows"], "floor": report["floor"]}
        print(f"digit {digit}\n{canvas_table(report)}", flush=True)
        if digit == args.digits[0]:
            save_canvas_demo(out / f"digit{digit}", report, plan, settings)
    labels_run = list(next(iter(result["per_digit"].values()))["rows"])
    result["mean_over_digits"] = {
        label: {key: float(np.mean([d["rows"][label][key] for d in result["per_digit"].values()]))
                for key in ("digit", "exact", "box_iou", "ink_in_box", "frechet")} for label in labels_run}
    for last, scale, weight in itertools.product(args.lasts, args.scales, args.weights):
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
    result["settings_default"] = dataclasses.asdict(CanvasDemoSettings())
    atomic_write_bytes(out / "results.json", json.dumps(result, indent=1).encode())
    print(f"wrote {out}/results.json; best {json.dumps(best)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
