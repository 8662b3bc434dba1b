"""Concept learning by EM on the embedded canvas text model: mask IoU per EM iteration against the
once-estimated baseline, and generations from each learned token, over many composites.

Each composite holds two held-out digits (writers the model never saw) and the background
(:mod:`zmagic_jax.tasks._concepts_demo`); the true masks are the digits' ink. The protocol is the
paper's Fig. 3 (mask IoU over iterations, EM against masks estimated once) on known masks; the
baseline keeps the initial masks (the digits' 16 x 16 tiles) through the same training.

    python experiments/concepts_canvas.py                  # the full run (FULL_SETTINGS, 10 pairs)
    python experiments/concepts_canvas.py --demo-settings  # the demo's smaller setting
    python experiments/concepts_canvas.py --pairs 37 52 --out /tmp/c.json

Writes ``experiments/results/concepts_canvas.json`` (per pair: IoU per iteration per concept,
the baseline's, the generations' found rates, timings; and the means).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from zmagic_jax._io import atomic_write_bytes  # noqa: E402
from zmagic_jax.ports import load_canvas_models, load_digit_models  # noqa: E402
from zmagic_jax.tasks._concepts_demo import DEMO_SETTINGS, FULL_SETTINGS, concepts_table, run_concepts_demo  # noqa: E402

PAIRS = ((3, 7), (5, 2), (0, 1), (4, 9), (6, 8), (1, 5), (2, 3), (7, 0), (8, 4), (9, 6))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", nargs="+", default=[f"{a}{b}" for a, b in PAIRS],
                        help="composites as two-digit strings (left, right), e.g. 37 52")
    parser.add_argument("--demo-settings", action="store_true", help="the demo section's settings (tokens only)")
    parser.add_argument("--out", default="experiments/results/concepts_canvas.json")
    args = parser.parse_args(argv)
    pairs = tuple((int(p[0]), int(p[1])) for p in args.pairs)
    settings = dataclasses.replace(DEMO_SETTINGS if args.demo_settings else FULL_SETTINGS, pairs=pairs)
    canvas, digits = load_canvas_models(), load_digit_models()
    start = time.perf_counter()
    report = run_concepts_demo(canvas, digits, settings, progress=lambda label: print(label, flush=True))
    seconds = time.perf_counter() - start
    print(concepts_table(report))
    iou = np.asarray([entry["iou"] for entry in report["pairs"]])          # (pairs, iterations + 1, 3)
    baseline = np.asarray([entry["baseline"] for entry in report["pairs"]])  # (pairs, 3)
    found = np.asarray([entry["found"] for entry in report["pairs"]])       # (pairs, 2)
    summary = {
        "digits_iou_per_iteration": iou[:, :, :2].mean((0, 2)).round(4).tolist(),
        "background_iou_per_iteration": iou[:, :, 2].mean(0).round(4).tolist(),
        "digits_iou_baseline": float(baseline[:, :2].mean().round(4)),
        "pairs_where_final_em_beats_baseline": int((iou[:, -1, :2].mean(1) > baseline[:, :2].mean(1)).sum()),
        "found_left_right": found.mean(0).round(4).tolist(),
        "seconds": round(seconds, 1),
    }
    print(json.dumps(summary, indent=1))
    data = {"settings": dataclasses.asdict(settings), "summary": summary,
            "pairs": [{k: entry[k] for k in ("pair", "iou", "baseline", "found")} for entry in report["pairs"]],
            "timing": report["timing"]}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.out, json.dumps(data, indent=1).encode())
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
