"""CelebA-TV2I protocol (COW, Wang et al. ICLR 2024; SOW, Pei et al. arXiv 2411.19182): a face kept,
the prompt's scene grown around it, COW and SOW on Stable Diffusion.

    python experiments/celeba_tv2i.py --sd SD_FOLDER --clip CLIP_FOLDER --arcface model_ir_se50.pth \\
        --faces faces/ [--masks masks/ --keep zeros] --prompts prompts.txt --seeds 0 \\
        --out experiments/results/celeba_tv2i
    python experiments/celeba_tv2i.py --tiny --steps 5 --cycles 2 --out /tmp/tv2i   # tiny random models

Every face x prompt is generated with each method (``cow``: :func:`run_one_way`; ``sow``: the same
with SOW's attention modulation, ``--modulate``'s defaults), every seed in one call (one compiled
program per method for the whole set). The face is the visual condition at the seed size (default
half the image side: 256 of 512), placed by the offline planner's ``face`` rule (top centre). Per
image:

* ``id_distance``: ``1 - cos`` of the ArcFace (IR-SE50) embeddings of the generated image's
  condition box and of the condition itself (FreeDoM's crop and pool,
  :func:`zmagic_jax.energies.identity_distance`); only with ``--arcface`` (the ID model is
  optional: without it the field is ``null``);
* ``text_distance``: ``1 - cos`` of the CLIP image embedding of the whole generated image and the
  CLIP text embedding of the prompt (:func:`zmagic_jax.energies.clip_text_distance`);
* ``region_error``: mean ``|image - seed canvas|`` inside the condition region (what the
  condition lost, the VAE's round trip included; ``region_error_floor`` is the VAE's alone).

The summary holds each method's mean and standard deviation over every image. The faces folder
holds images (``.png``, ``.jpg``, ...); a masks folder, if given, holds one mask per face with the
same file stem (without one the whole face box is kept). The prompts file holds one prompt per
line (``#`` comments and blank lines skipped); ``sd prompt | clip prompt`` gives CLIP a different
text (the tiny models' tokenizers know different words). ``--tiny`` builds tiny random SD, CLIP
and ArcFace models and synthetic faces in a temporary folder: it checks the pipeline, not the
method.

Writes ``<out>/celeba_tv2i.json`` (settings, every image's metrics, the summary, timings) and
``<out>/celeba_tv2i.md`` (the table), both atomically; ``--images`` also writes every generated
image to ``<out>/images/``.
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

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from table2_text_style import IMAGE_SUFFIXES, read_prompts as read_text_style_prompts  # noqa: E402
from zmagic_jax._io import atomic_write_bytes
from zmagic_jax.energies import Net, clip_architecture, clip_text_distance, identity_distance, load_clip, \
    text_embedding, with_params
from zmagic_jax.contracts import Keyed
from zmagic_jax.models import load_stable_diffusion
from zmagic_jax.tasks._one_way_sd import OneWaySettings, run_one_way
from zmagic_jax.tasks._outputs import save_png

METHODS = ("cow", "sow")
METRICS = ("id_distance", "text_distance", "region_error")
METRIC_NOTES = {"id_distance": "1 - cos of ArcFace embeddings: the generated condition box vs the condition",
                "text_distance": "1 - cos of CLIP image (whole generated image) and text embeddings",
                "region_error": "mean |image - seed canvas| inside the condition region ([-1, 1] units)"}


def read_prompts(path) -> list:
    """``[(sd_prompt, clip_prompt), ...]`` from a prompts file (``sd | clip`` lines allowed; the
    format of ``table2_text_style.py``), the CLIP prompt defaulting to the SD one."""
    return [(sd_prompt, clip_prompt or sd_prompt) for sd_prompt, clip_prompt in read_text_style_prompts(path)]


def face_files(faces, masks=None) -> list:
    """``[(face, mask or None), ...]``: every image of ``faces``, its mask the file of ``masks``
    with the same stem (``None`` without a masks folder; an error if the folder lacks one)."""
    files = sorted(p for p in Path(faces).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise ValueError(f"--faces: no image ({', '.join(IMAGE_SUFFIXES)}) in {faces}.")
    if masks is None:
        return [(f, None) for f in files]
    by_stem = {p.stem: p for p in Path(masks).iterdir() if p.suffix.lower() in IMAGE_SUFFIXES}
    missing = [f.name for f in files if f.stem not in by_stem]
    if missing:
        raise ValueError(f"--masks: no mask with the stem of {missing[:5]} in {masks}.")
    return [(f, by_stem[f.stem]) for f in files]


def synthetic_faces(folder, count: int = 2, size: int = 32) -> list:
    """Deterministic face-like images: a skin-toned ellipse with two eyes and a mouth on a
    coloured background (for ``--tiny``)."""
    from PIL import Image

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    y, x = (np.mgrid[0:size, 0:size] + 0.5) / size
    files = []
    for k in range(count):
        image = np.broadcast_to(np.array([0.2 + 0.3 * k, 0.4, 0.7 - 0.3 * k]), (size, size, 3)).copy()
        face = ((x - 0.5) / 0.32) ** 2 + ((y - 0.52) / 0.42) ** 2 <= 1
        image[face] = [0.9, 0.7 - 0.1 * k, 0.55]
        for cx in (0.38, 0.62):
            image[np.hypot(x - cx, y - 0.42) < 0.05] = [0.1, 0.1, 0.1]
        image[(np.abs(y - 0.7) < 0.03) & (np.abs(x - 0.5) < 0.12)] = [0.6, 0.1, 0.1]
        files.append(folder / f"face{k}.png")
        Image.fromarray(np.round(255 * image).astype(np.uint8)).save(files[-1])
    return files


def save_tiny_arcface(path, seed: int = 0) -> Path:
    """A tiny random ArcFace (``tiny_models.tiny_face_configs``) as a converted ``.safetensors``."""
    from experiments.tiny_models import random_params, tiny_face_configs
    from zmagic_jax.ports import ARCFACE, save_params
    from zmagic_jax.ports._checkpoint import config_to_json

    config = tiny_face_configs()["arcface"]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_params(path, random_params(ARCFACE, config, seed),
                metadata={"network": ARCFACE.name, "config": config_to_json(config)})
    return path


def build_tiny(folder):
    """Tiny random SD, CLIP and ArcFace, a prompts list valid for both tokenizers, synthetic faces:
    ``(sd, clip, arcface, prompts, faces)``."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from experiments.tiny_models import save_tiny_clip, save_tiny_stable_diffusion

    folder = Path(folder)
    sd = save_tiny_stable_diffusion(folder / "sd")["path"]
    clip = save_tiny_clip(folder / "clip")["path"]
    arcface = save_tiny_arcface(folder / "arcface.safetensors")
    return sd, clip, arcface, [("lower newer", "a cat")], [(f, None) for f in synthetic_faces(folder / "faces")]


def _id_distances(module, params, crops, condition):
    net = Net(module.value, params)
    return jax.vmap(lambda crop: identity_distance(net, crop, condition))(crops)


def _text_distances(arch, params, images, text):
    clip = with_params(arch, params)
    return jax.vmap(lambda image: clip_text_distance(clip, image, text))(images)


# One program per architecture and image size, the weights and references arguments.
_id_distances_jit = jax.jit(_id_distances, static_argnums=0)
_text_distances_jit = jax.jit(_text_distances, static_argnums=0)


def _stats(values) -> dict:
    values = np.asarray([v for v in values if v is not None], np.float64)
    if values.size == 0:
        return {"mean": None, "std": None, "n": 0}
    return {"mean": float(values.mean()), "std": float(values.std()), "n": int(values.size)}


def run(sd, clip, arcface, faces, prompts, base: OneWaySettings, *, images_dir=None, progress=None) -> dict:
    """Every face x prompt with COW and SOW, all seeds of ``base`` per call; metrics per image.
    ``arcface``: ``(module, params)`` or ``None`` (no ID distance)."""
    records, floors = [], []
    timings = {m: {"compile_s": 0.0, "run_s": 0.0} for m in METHODS}
    arch = clip_architecture(clip)
    for face, mask in faces:
        for p, (sd_prompt, clip_prompt) in enumerate(prompts):
            text = text_embedding(clip, clip_prompt)
            for method in METHODS:
                if progress:
                    progress(f"{Path(face).name} x {sd_prompt!r}: {method}")
                settings = dataclasses.replace(base, prompt=sd_prompt, modulate=method == "sow")
                if mask is None:  # the whole face box is the condition
                    mask_input, settings = np.ones(_image_hw(face), np.float32), dataclasses.replace(settings,
                                                                                                   keep="ones")
                else:
                    mask_input = str(mask)
                result = run_one_way(sd, str(face), mask_input, settings)
                timings[method]["compile_s"] += result["compile_s"]
                timings[method]["run_s"] += result["run_s"]
                layout = result["layout"]
                top, left, bottom, right = layout.plan.condition_box
                images = jnp.asarray(result["images"])
                text_d = np.asarray(_text_distances_jit(arch, clip.params, images, text))
                id_d = None if arcface is None else np.asarray(_id_distances_jit(
                    Keyed(arcface[0], repr(arcface[0])), arcface[1], images[:, top:bottom, left:right],
                    jnp.asarray(layout.condition)))
                floors.append(result["region_error_floor"])
                for i, seed in enumerate(base.seeds):
                    records.append({"face": Path(face).name, "prompt": sd_prompt, "clip_prompt": clip_prompt,
                                    "method": method, "seed": int(seed),
                                    "id_distance": None if id_d is None else float(id_d[i]),
                                    "text_distance": float(text_d[i]),
                                    "region_error": result["metrics"][i]["region_error"],
                                    "condition_box": list(layout.plan.condition_box)})
                    if images_dir is not None:
                        name = f"{Path(face).stem}_p{p}_{method}_seed{seed}.png"
                        Path(images_dir).mkdir(parents=True, exist_ok=True)
                        save_png(Path(images_dir) / name, result["images"][i])
                        records[-1]["file"] = f"images/{name}"
    summary = {m: {name: _stats([r[name] for r in records if r["method"] == m]) for name in METRICS}
               for m in METHODS}
    return {"records": records, "summary": summary, "timings": timings,
            "region_error_floor": _stats(floors)}


def _image_hw(path) -> tuple:
    from PIL import Image

    with Image.open(path) as image:
        return image.size[::-1]


def markdown(result: dict) -> str:
    lines = ["| method | ID distance | text distance | region error | images |", "| --- | --- | --- | --- | --- |"]
    for m in METHODS:
        s = result["summary"][m]
        cells = ["-" if s[name]["mean"] is None else f"{s[name]['mean']:.4g} ± {s[name]['std']:.2g}"
                 for name in METRICS]
        lines.append(f"| {m.upper()} | " + " | ".join(cells) + f" | {s['text_distance']['n']} |")
    floor = result["region_error_floor"]["mean"]
    notes = [f"- {name.replace('_', ' ')}: {note}" for name, note in METRIC_NOTES.items()]
    notes.append(f"- region error of the VAE's own round trip of the canvas: {floor:.4g}")
    return "\n".join(lines + [""] + notes) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sd", help="local diffusers Stable Diffusion folder")
    parser.add_argument("--clip", help="local transformers CLIP folder (the text distance)")
    parser.add_argument("--arcface", help="ArcFace IR-SE50 checkpoint (model_ir_se50.pth or converted "
                                          ".safetensors); optional: without it no ID distance")
    parser.add_argument("--faces", help="folder of face images (the visual conditions)")
    parser.add_argument("--masks", help="folder of masks, one per face with its file stem (default: whole box)")
    parser.add_argument("--keep", default="ones", choices=("ones", "zeros"),
                        help="which mask pixels are the face (the released COW masks: zeros)")
    parser.add_argument("--prompts", help="prompts file, one per line ('sd prompt | clip prompt' allowed)")
    parser.add_argument("--tiny", action="store_true", help="tiny random models and synthetic faces")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--cycles", type=int, default=10)
    parser.add_argument("--cfg-scale", type=float, default=7.5)
    parser.add_argument("--seed-size", type=int, default=None, help="default half the image side")
    parser.add_argument("--planner", default="face", help="default_planner's kind (face: top centre)")
    parser.add_argument("--images", action="store_true", help="also write every generated image")
    parser.add_argument("--out", default="experiments/results/celeba_tv2i")
    args = parser.parse_args(argv)
    if not args.tiny and not all((args.sd, args.clip, args.faces, args.prompts)):
        parser.error("give --sd, --clip, --faces and --prompts (and optionally --arcface, --masks), or --tiny")
    base = OneWaySettings(prompt="-", seeds=tuple(args.seeds), num_steps=args.steps, cycles=args.cycles,
                          cfg_scale=args.cfg_scale, seed_size=args.seed_size, planner_kind=args.planner,
                          keep=args.keep)
    out = Path(args.out)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="celeba_tv2i_tiny_") as tmp:
        if args.tiny:
            sd_path, clip_path, arcface_path, prompts, faces = build_tiny(tmp)
        else:
            sd_path, clip_path, arcface_path = args.sd, args.clip, args.arcface
            prompts, faces = read_prompts(args.prompts), face_files(args.faces, args.masks)
        from zmagic_jax.ports import load_arcface

        sd, clip = load_stable_diffusion(sd_path), load_clip(clip_path)
        arcface = None if arcface_path is None else load_arcface(arcface_path)
        result = run(sd, clip, arcface, faces, prompts, base, images_dir=out / "images" if args.images else None,
                     progress=lambda label: print(label, file=sys.stderr, flush=True))
    settings = {k: v for k, v in dataclasses.asdict(base).items() if k not in ("prompt", "modulate")}
    report = {"settings": settings, "methods": list(METHODS), "tiny": args.tiny, "id_model": arcface is not None,
              "prompts": [list(p) for p in prompts], "faces": [Path(f).name for f, _ in faces],
              "masks": None if args.masks is None else [Path(m).name for _, m in faces],
              "metric_notes": METRIC_NOTES, "platform": platform.platform(),
              "wall_time_s": round(time.perf_counter() - started, 1), **result}
    atomic_write_bytes(out / "celeba_tv2i.json", json.dumps(report, indent=2, allow_nan=False).encode())
    table = markdown(result)
    atomic_write_bytes(out / "celeba_tv2i.md", table.encode())
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
