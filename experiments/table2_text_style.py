"""Z-Magic Table 2 protocol (text + style on Stable Diffusion): plain SD, FreeDoM and Z-Magic.

    python experiments/table2_text_style.py --sd SD_FOLDER --clip CLIP_FOLDER \\
        --prompts prompts.txt --styles style_images/ --seeds 0 1 2 --out experiments/results/table2
    python experiments/table2_text_style.py --tiny --steps 4 --out /tmp/table2   # tiny random models

Every prompt x style x seed is sampled with each method: ``none`` (plain SD with CFG, also the
content reference of the same prompt and seed), ``independent`` (FreeDoM: style gradient at
``x_t``), ``dependent`` (Z-Magic: the CFG prompt leads, the style gradient is pulled back from the
look-ahead point) and optionally ``multi`` (CAGrad over CLIP text and style). Recipe defaults are
FreeDoM's SD style run (``zmagic_jax.tasks.TextStyleSettings``). Per method the table gives the mean
(and standard deviation over images) of

* content loss: CLIP vision features vs the plain image of the same prompt and seed (the paper uses
  VGG features; no VGG weights are available here, so the numbers are not comparable with its table);
* style loss: CLIP Gram distance to the style image (the guided energy's value);
* text distance: ``1 - cos`` of CLIP image and text embeddings.

The prompts file holds one prompt per line (``#`` comments and blank lines skipped); a line
``sd prompt | clip prompt`` gives CLIP a different prompt (the tiny models' tokenizers know
different words). ``--tiny`` builds tiny random models (needs torch, the test extra) and
synthetic style images in a temporary folder: it checks the pipeline, not the method.

Writes ``<out>/table2_text_style.json`` (settings, every image's metrics, timings, summary) and
``<out>/table2_text_style.md`` (the table), both atomically.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from zmagic_jax._io import atomic_write_bytes
from zmagic_jax.tasks import (TextStyleSettings, load_text_style_models, sample_text_style,
                              text_style_metrics)
from zmagic_jax.tasks._text_style import METHOD_LABELS, METRIC_NOTES, METRICS

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")


def read_prompts(path) -> list:
    """``[(sd_prompt, clip_prompt or None), ...]`` from a prompts file."""
    prompts = []
    for line in Path(path).read_text().splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        sd_prompt, _, clip_prompt = (part.strip() for part in line.partition("|"))
        prompts.append((sd_prompt, clip_prompt or None))
    if not prompts:
        raise ValueError(f"--prompts: {path} holds no prompt; write one prompt per line.")
    return prompts


def style_images(folder) -> list:
    files = sorted(p for p in Path(folder).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"--styles: no image ({', '.join(IMAGE_SUFFIXES)}) in {folder}.")
    return files


def synthetic_styles(folder, count: int, size: int = 64) -> list:
    """Deterministic style images: coloured stripes, checkerboards and blobs of different hues."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    y, x = np.mgrid[0:size, 0:size] / size
    files = []
    for k in range(count):
        hue = np.array([np.cos(2 * np.pi * (k / 3 + c / 3)) for c in range(3)]) * 0.5 + 0.5
        pattern = [np.sin(2 * np.pi * (4 + k) * (x + y)),
                   np.sign(np.sin(2 * np.pi * (3 + k) * x) * np.sin(2 * np.pi * (3 + k) * y)),
                   np.cos(2 * np.pi * (2 + k) * np.hypot(x - 0.5, y - 0.5))][k % 3]
        image = 0.5 + 0.5 * pattern[..., None] * (2 * hue - 1)
        files.append(folder / f"style{k}.png")
        Image.fromarray(np.round(255 * np.clip(image, 0, 1)).astype(np.uint8)).save(files[-1])
    return files


def build_tiny(folder, num_styles: int):
    """Tiny random SD and CLIP folders, a prompts list valid for both tokenizers, style images."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from experiments.tiny_models import save_tiny_clip, save_tiny_stable_diffusion

    folder = Path(folder)
    sd = save_tiny_stable_diffusion(folder / "sd")["path"]
    clip = save_tiny_clip(folder / "clip")["path"]
    return sd, clip, [("lower newer", "a cat")], synthetic_styles(folder / "styles", num_styles)


def _stats(values) -> dict:
    values = np.asarray(values, np.float64)
    return {"mean": float(values.mean()), "std": float(values.std()), "n": int(values.size)}


def run(models, prompts, styles, methods, base: TextStyleSettings, progress=None) -> dict:
    """Every prompt x style with every method, all seeds of ``base`` per call; metrics per image."""
    records, timings = [], {m: {"compile_s": 0.0, "run_s": 0.0} for m in methods}
    for sd_prompt, clip_prompt in prompts:
        for style in styles:
            settings = dataclasses.replace(base, prompt=sd_prompt, clip_prompt=clip_prompt, style_image=str(style))
            samples = {}
            for method in methods:
                if progress:
                    progress(f"{sd_prompt!r} x {Path(style).name}: {method}")
                samples[method] = sample_text_style(models, settings, method)  # programs compile once per method
                timings[method]["compile_s"] += samples[method].compile_s
                timings[method]["run_s"] += samples[method].run_s
            # One metrics call for every method (one compilation), against the plain image.
            images = np.concatenate([samples[m].images for m in methods])
            metrics = text_style_metrics(models, settings, images,
                                         np.concatenate([samples["none"].images] * len(methods)))
            count = len(settings.seeds)
            for k, method in enumerate(methods):
                for i, seed in enumerate(settings.seeds):
                    records.append({"prompt": sd_prompt, "clip_prompt": settings.measured_prompt,
                                    "style": Path(style).name, "seed": seed, "method": method,
                                    **{name: float(metrics[name][k * count + i]) for name in METRICS}})
    summary = {m: {name: _stats([r[name] for r in records if r["method"] == m]) for name in METRICS}
               for m in methods}
    return {"records": records, "summary": summary, "timings": timings}


def markdown(result: dict, methods) -> str:
    lines = ["| method | content loss | style loss | text distance | images |",
             "| --- | --- | --- | --- | --- |"]
    for m in methods:
        s = result["summary"][m]
        cells = [f"{s[name]['mean']:.4g} ± {s[name]['std']:.2g}" for name in METRICS]
        lines.append(f"| {METHOD_LABELS[m]} | " + " | ".join(cells) + f" | {s['style_loss']['n']} |")
    notes = [f"- {name.replace('_', ' ')}: {note}" for name, note in METRIC_NOTES.items()]
    return "\n".join(lines + [""] + notes) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sd", help="local diffusers Stable Diffusion folder")
    parser.add_argument("--clip", help="local transformers CLIP folder")
    parser.add_argument("--prompts", help="prompts file, one per line ('sd prompt | clip prompt' allowed)")
    parser.add_argument("--styles", help="folder of style images")
    parser.add_argument("--tiny", action="store_true", help="tiny random models and synthetic styles (needs torch)")
    parser.add_argument("--tiny-styles", type=int, default=2, help="number of synthetic styles with --tiny")
    parser.add_argument("--methods", nargs="+", default=["none", "independent", "dependent"],
                        choices=["none", "independent", "dependent", "multi"],
                        help="'none' (plain SD, the content reference) is always run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--cfg-scale", type=float, default=5.0)
    parser.add_argument("--scale", type=float, default=0.2, help="cfg_relative factor (FreeDoM: 0.2)")
    parser.add_argument("--time-travel", type=int, default=3, metavar="REPEATS")
    parser.add_argument("--out", default="experiments/results/table2_text_style")
    args = parser.parse_args(argv)
    if not args.tiny and not all((args.sd, args.clip, args.prompts, args.styles)):
        parser.error("give --sd, --clip, --prompts and --styles, or --tiny")
    methods = ["none"] + [m for m in dict.fromkeys(args.methods) if m != "none"]

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="table2_tiny_") as tmp:
        if args.tiny:
            sd, clip, prompts, styles = build_tiny(tmp, args.tiny_styles)
        else:
            sd, clip, prompts, styles = args.sd, args.clip, read_prompts(args.prompts), style_images(args.styles)
        base = TextStyleSettings(prompt="-", style_image=str(styles[0]), seeds=tuple(args.seeds),
                                 num_steps=args.steps, cfg_scale=args.cfg_scale, guidance_scale=args.scale,
                                 time_travel_repeats=args.time_travel)
        models = load_text_style_models(sd, clip)
        result = run(models, prompts, styles, methods, base,
                     progress=lambda label: print(label, file=sys.stderr, flush=True))
    base_settings = {k: v for k, v in dataclasses.asdict(base).items()
                     if k not in ("prompt", "clip_prompt", "style_image")}
    report = {"settings": base_settings, "methods": methods, "tiny": args.tiny,
              "prompts": [list(p) for p in prompts], "styles": [Path(s).name for s in styles],
              "metric_notes": METRIC_NOTES, "platform": platform.platform(),
              "wall_time_s": round(time.perf_counter() - started, 1), **result}
    out = Path(args.out)
    atomic_write_bytes(out / "table2_text_style.json", json.dumps(report, indent=2, allow_nan=False).encode())
    table = markdown(result, methods)
    atomic_write_bytes(out / "table2_text_style.md", table.encode())
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
