"""The protocol of Z-Magic's face tables on the CelebA-HQ DDPM.

Table 1: text + segmentation + identity; Table 3: segmentation + text; Table 4: identity + landmarks.
For each of N reference faces (its identity, its parsing map and its landmarks are the targets) and
each seed, every run (unguided, independent, dependent in both orders for two-condition tasks,
multi) samples one face; the table reports each condition's metric (mean and std over references
and seeds) and a Frechet distance between the generated faces and the real faces in ArcFace's
embedding space (the tables' FID needs Inception weights we do not ship: every generated image is
also written under ``images/<run>/`` so an external FID tool can be run on the folders).

Real run (weights are not downloaded; pass local files):

    python experiments/face_tables.py --task id_landmarks --unet celeba_hq.ckpt \
        --arcface model_ir_se50.pth --landmarks mobilefacenet_model_best.pth.tar \
        --references celeba_hq_refs/ --num-references 50 --seeds 0 --out out/table4

``--tiny`` runs the same protocol end to end on tiny random models of the same architectures and
synthetic references (a check of the pipeline; its numbers say nothing about the method).
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

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from zmagic_jax._io import atomic_output_dir  # noqa: E402
from zmagic_jax.metrics import frechet_distance  # noqa: E402
from zmagic_jax.tasks import (FACE_TASKS, FaceReferences, FaceSettings, face_features,  # noqa: E402
                              load_face_models, run_faces)
from zmagic_jax.tasks._outputs import load_image, save_png  # noqa: E402

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def default_runs(task: str) -> list:
    runs = [("none", (0, 1)), ("independent", (0, 1))]
    if len(FACE_TASKS[task]) == 2:
        runs += [("dependent", (0, 1)), ("dependent", (1, 0))]
    return runs + [("multi", (0, 1))]


def parse_runs(values, task: str) -> list:
    """``none independent dependent:0,1 dependent:1,0 multi`` -> ``[(scheme, order), ...]``."""
    if not values:
        return default_runs(task)
    runs = []
    for value in values:
        scheme, _, order = value.partition(":")
        runs.append((scheme, tuple(int(i) for i in order.split(",")) if order else (0, 1)))
    return runs


def reference_files(folder, count=None) -> list:
    folder = Path(folder)
    if not folder.is_dir():
        raise SystemExit(f"--references: {folder} is not a folder of face images (PNG/JPEG).")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(files) < (count or 2):
        raise SystemExit(f"{folder} holds {len(files)} images; {count or 2} are needed.")
    return files[:count]


def run_protocol(models, settings: FaceSettings, references: list, runs: list, out_dir, real_images=None,
                 progress=print) -> dict:
    """Run every run on every reference; write ``results.json``, ``table.md`` and the images."""
    per_run, images = {}, {}
    start = time.perf_counter()
    for index, reference in enumerate(references):
        refs = FaceReferences(identity=reference, parsing=reference, landmarks=reference)
        result = run_faces(models, settings, refs, runs,
                           progress=lambda label: progress(f"reference {index + 1}/{len(references)}: {label}"))
        for label, metrics in result.metrics.items():
            rows = per_run.setdefault(label, {})
            for name, values in metrics.items():
                rows.setdefault(name, []).extend(values.tolist())
            images.setdefault(label, []).extend(result.samples[label].images)
    real = np.stack(references) if real_images is None else np.asarray(real_images)
    summary = {}
    real_features = face_features(models, real) if models.arcface is not None else None
    for label, metrics in per_run.items():
        entry = {name: {"mean": float(np.mean(v)), "std": float(np.std(v)), "n": len(v)} for name, v in metrics.items()}
        if real_features is not None and len(images[label]) >= 2 and len(real) >= 2:
            entry["frechet_arcface"] = frechet_distance(face_features(models, np.stack(images[label])), real_features)
        summary[label] = entry
    report = {"settings": {**dataclasses.asdict(settings), "runs": [list(map(str, r)) for r in runs],
                           "num_references": len(references)},
              "results": summary, "wall_time_s": round(time.perf_counter() - start, 1),
              "notes": "frechet_arcface: Frechet distance between Gaussians fitted to ArcFace embeddings of the "
                       "generated and the real faces (not Inception FID; with fewer samples than 512 the "
                       "covariances are rank-deficient, compare runs of the same size only)."}
    with atomic_output_dir(out_dir) as tmp:
        tmp = Path(tmp)
        for label, pictures in images.items():
            folder = tmp / "images" / label
            folder.mkdir(parents=True)
            for i, picture in enumerate(pictures):
                save_png(folder / f"{i:05d}.png", picture)
        (tmp / "results.json").write_text(json.dumps(report, indent=2, allow_nan=False))
        (tmp / "table.md").write_text(markdown_table(summary))
    return report


def markdown_table(summary: dict) -> str:
    metrics = sorted({name for entry in summary.values() for name in entry})
    lines = ["| run | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
    for label, entry in summary.items():
        cells = []
        for name in metrics:
            value = entry.get(name)
            cells.append("-" if value is None else (f"{value:.4g}" if isinstance(value, float)
                                                    else f"{value['mean']:.4g} ± {value['std']:.2g}"))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def tiny_setup(root: Path, task: str, num_references: int, resolution: int = 32):
    """Tiny random models of the real architectures (saved in the real formats) and smooth random
    reference images."""
    from experiments.tiny_models import save_tiny_face_models
    paths = save_tiny_face_models(root, resolution=resolution)
    models = load_face_models(paths["unet"], clip=paths["clip"] if "text" in FACE_TASKS[task] else None,
                              bisenet=paths["bisenet"], arcface=paths["arcface"], landmarks=paths["landmarks"])
    rng = np.random.default_rng(0)
    coarse = rng.uniform(-1, 1, (num_references, 4, 4, 3))
    references = [np.clip(np.kron(c, np.ones((resolution // 4, resolution // 4, 1))), -1, 1).astype(np.float32)
                  for c in coarse]
    return models, references


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", choices=sorted(FACE_TASKS), default="id_landmarks")
    parser.add_argument("--unet", help="CelebA-HQ DDPM checkpoint (celeba_hq.ckpt) or converted .safetensors")
    parser.add_argument("--clip", help="transformers CLIP folder (tasks with text)")
    parser.add_argument("--bisenet", help="BiSeNet face parsing checkpoint (79999_iter.pth)")
    parser.add_argument("--arcface", help="ArcFace IR-SE50 checkpoint (model_ir_se50.pth)")
    parser.add_argument("--landmarks", help="landmark checkpoint (MobileFaceNet .pth.tar, or ONet with "
                                            "--landmark-net onet; default the installed facenet-pytorch ONet)")
    parser.add_argument("--landmark-net", choices=("mobilefacenet", "onet"), default="mobilefacenet")
    parser.add_argument("--references", help="folder of CelebA-HQ reference faces (PNG/JPEG)")
    parser.add_argument("--num-references", type=int, default=10)
    parser.add_argument("--fid-real", help="folder of real faces for the Frechet distance (default: the references)")
    parser.add_argument("--prompt", default="a photo of a smiling person")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--runs", nargs="*", default=None,
                        help="e.g. none independent dependent:0,1 dependent:1,0 multi (default: all of the task)")
    parser.add_argument("--tiny", action="store_true", help="tiny random models and synthetic references")
    parser.add_argument("--out", default="experiments/results/face_tables")
    args = parser.parse_args(argv)

    settings = FaceSettings(task=args.task, prompt=args.prompt, seeds=tuple(args.seeds), num_steps=args.steps,
                            landmark_net=args.landmark_net)
    runs = parse_runs(args.runs, args.task)
    with tempfile.TemporaryDirectory() as scratch:
        if args.tiny:
            models, references = tiny_setup(Path(scratch), args.task, args.num_references)
            real = None
        else:
            if not args.unet or not args.references:
                parser.error("--unet and --references are required (or --tiny)")
            models = load_face_models(args.unet, clip=args.clip, bisenet=args.bisenet, arcface=args.arcface,
                                      landmarks=args.landmarks, landmark_net=args.landmark_net,
                                      onet_default=args.landmark_net == "onet")
            size = (int(models.unet.module.config.resolution),) * 2
            references = [load_image(p, size, "reference face") for p in reference_files(args.references,
                                                                                        args.num_references)]
            real = None if args.fid_real is None else [load_image(p, size, "real face") for p in
                                                       reference_files(args.fid_real)]
        report = run_protocol(models, settings, references, runs, args.out, real)
    print(markdown_table(report["results"]))
    print(f"wrote {args.out}/results.json, table.md and images/ ({report['wall_time_s']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
