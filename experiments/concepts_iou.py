"""The paper's mask-IoU-over-iterations protocol (Rahman et al., Fig. 3) on your images: EM
against the masks estimated once, both scored against annotated masks.

For every image of ``--data`` (``NAME.png`` / ``.jpg`` with ``NAME.mask0.png``, ``NAME.mask1.png``,
...: the annotated masks, white inside, one per concept) the concepts are learned without masks
(:func:`zmagic_jax.concepts.learn_concepts`: tokens from ``--words`` or at random, the first masks
from the E-step), and the masks after every E-step are scored against the annotations at the
latent size (nearest). The once-estimated baseline is the first E-step's masks kept through
training, so its IoU is iteration 0's.

    python experiments/concepts_iou.py --sd /data/stable-diffusion-2-1-base --data scenes/ \\
        --words man woman --out results/concepts_iou.json
    python experiments/concepts_iou.py --tiny --out /tmp/iou.json    # tiny random SD, two synthetic images

Writes per image the IoU per iteration per concept, and the mean per iteration.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import jax  # noqa: E402

from zmagic_jax import concepts  # noqa: E402
from zmagic_jax._io import atomic_write_bytes  # noqa: E402
from zmagic_jax.models import load_stable_diffusion  # noqa: E402
from zmagic_jax.tasks._outputs import load_image  # noqa: E402

SUFFIXES = (".png", ".jpg", ".jpeg")


def read_dataset(folder: Path, size) -> list:
    """``[(name, image (H, W, 3) in [-1, 1], masks (N, H, W) in {0, 1})]`` of ``folder``."""
    items = []
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() not in SUFFIXES or ".mask" in path.stem:
            continue
        masks = sorted(folder.glob(f"{path.stem}.mask*.png"))
        if not masks:
            raise FileNotFoundError(f"concepts_iou: {path} has no annotated masks {path.stem}.mask0.png, ...")
        image = load_image(path, size, "image")
        items.append((path.stem, image, np.stack([load_image(m, size, "mask")[..., 0] > 0 for m in masks])
                      .astype(np.float32)))
    if not items:
        raise FileNotFoundError(f"concepts_iou: no images in {folder}.")
    return items


def tiny_dataset(folder: Path) -> tuple:
    """A tiny random SD folder and two 16 x 16 images of two squares each, with their masks."""
    from experiments.tiny_models import save_tiny_stable_diffusion
    save_tiny_stable_diffusion(folder / "sd")
    items = []
    for k in range(2):
        image = np.full((16, 16, 3), -0.5, np.float32)
        masks = np.zeros((2, 16, 16), np.float32)
        masks[0, 2 + k:8 + k, 1:7] = 1
        masks[1, 9:15, 8 + k:14 + k] = 1
        image[masks[0] > 0] = 0.9
        image[masks[1] > 0] = -0.95
        items.append((f"tiny{k}", image, masks))
    return folder / "sd", items


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sd", help="local diffusers Stable Diffusion folder")
    parser.add_argument("--data", help="folder of NAME.png with NAME.mask<i>.png")
    parser.add_argument("--tiny", action="store_true", help="a tiny random SD and two synthetic images")
    parser.add_argument("--words", nargs="+", help="one initial word per concept (default: random tokens)")
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--steps-per-iteration", type=int, default=200)
    parser.add_argument("--phase1-steps", type=int, default=400)
    parser.add_argument("--phase2", default="full", choices=concepts.PHASE2_TARGETS)
    parser.add_argument("--mask-timesteps", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="experiments/results/concepts_iou.json")
    args = parser.parse_args(argv)
    if args.tiny == bool(args.sd or args.data):
        parser.error("give --sd and --data, or --tiny")
    settings = concepts.ConceptSettings(iterations=args.iterations, steps_per_iteration=args.steps_per_iteration,
                                        phase1_steps=args.phase1_steps, phase2=args.phase2,
                                        mask_timesteps=args.mask_timesteps)
    with tempfile.TemporaryDirectory() as tmp:
        if args.tiny:
            folder, items = tiny_dataset(Path(tmp))
        else:
            folder = args.sd
        sd = load_stable_diffusion(folder)
        if not args.tiny:
            side = int(sd.sample_size) * (1 if sd.vae is None else 2 ** (len(sd.vae.config.block_out_channels) - 1))
            items = read_dataset(Path(args.data), (side, side))
        rows, start = [], time.perf_counter()
        for index, (name, image, true) in enumerate(items):
            count = None if args.words else len(true)
            result = concepts.learn_concepts(sd, image, jax.random.key(args.seed + index), count=count,
                                             words=args.words, settings=settings)
            latent_true = np.asarray(concepts.resize_nearest(true, result.masks.shape[-2:]))
            iou = concepts.mask_iou(result.masks, latent_true[None])
            rows.append({"image": name, "iou": iou.tolist()})
            print(f"{name}: IoU per iteration (mean over concepts) {np.round(iou.mean(1), 3).tolist()}", flush=True)
    per_iteration = np.mean([np.mean(r["iou"], 1) for r in rows], 0)
    summary = {"iou_per_iteration": per_iteration.round(4).tolist(), "once_estimated": float(per_iteration[0]),
               "images": len(rows), "seconds": round(time.perf_counter() - start, 1)}
    print(json.dumps(summary))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(args.out, json.dumps({"settings": dataclasses.asdict(settings), "summary": summary,
                                             "images": rows}, indent=1).encode())
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
