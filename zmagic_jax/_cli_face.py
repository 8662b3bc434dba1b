"""``zmagic face`` (face creation on the CelebA-HQ DDPM) and ``zmagic convert`` (PyTorch -> Flax)."""
from __future__ import annotations

import sys

from tqdm import tqdm


class FlagError(ValueError):
    """A bad command-line value, reported with the flag that carries it."""


def add_face(sub) -> None:
    from zmagic_jax.cli import HelpFormatter, add_nan_policy, add_overwrite
    from zmagic_jax.tasks import FACE_SCHEMES, FACE_TASKS

    p = sub.add_parser("face", formatter_class=HelpFormatter,
                       help="face creation on the CelebA-HQ DDPM: text, parsing, identity, landmarks",
                       description="Sample faces from the pixel DDPM guided by a reference face's identity (ArcFace), "
                                   "a parsing map (BiSeNet), landmarks and/or a prompt (CLIP). Defaults follow "
                                   "FreeDoM's face settings. Writes one PNG per seed and run, grid.png and "
                                   "metrics.json (per-image metrics).")
    p.add_argument("--task", default="id_landmarks", choices=sorted(FACE_TASKS),
                   help="text_seg_id (Table 1), seg_text (Table 3) or id_landmarks (Table 4)")
    p.add_argument("--unet", required=True, help="CelebA-HQ DDPM checkpoint (celeba_hq.ckpt) or converted .safetensors")
    p.add_argument("--clip", help="transformers CLIP folder (tasks with text)")
    p.add_argument("--bisenet", help="BiSeNet face parsing checkpoint (79999_iter.pth) or .safetensors")
    p.add_argument("--arcface", help="ArcFace IR-SE50 checkpoint (model_ir_se50.pth) or .safetensors")
    p.add_argument("--landmarks", help="landmark checkpoint (MobileFaceNet .pth.tar / ONet .pt) or .safetensors; "
                                       "with --landmark-net onet and no file, the installed facenet-pytorch ONet")
    p.add_argument("--landmark-net", default="mobilefacenet", choices=("mobilefacenet", "onet"))
    p.add_argument("--reference",
                   help="reference face image: its identity, and by default its parsing map and landmarks")
    p.add_argument("--parsing-source", help="image whose parsing map is the target (default --reference)")
    p.add_argument("--landmark-source", help="image whose landmarks are the target (default --reference)")
    p.add_argument("--landmark-box", type=int, nargs=4, metavar=("TOP", "LEFT", "H", "W"),
                   help="face box the landmark net sees (default the whole image)")
    p.add_argument("--prompt", default="a photo of a smiling person", help="CLIP text (tasks with text)")
    p.add_argument("--scheme", default="independent", choices=FACE_SCHEMES,
                   help="independent = FreeDoM; dependent = Z-Magic Algorithm 1; multi = CAGrad over ordered pairs")
    p.add_argument("--order", type=int, nargs=2, default=[0, 1], metavar=("LEADER", "FOLLOWER"),
                   help="dependent: which condition of the task leads (1 0 = the second)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one image per seed (distinct, >= 0)")
    p.add_argument("--steps", type=int, default=100, help="sampling steps (2..the model's training steps)")
    p.add_argument("--eta", type=float, default=0.5, help="noise fraction of FreeDoM's mixing sampler (0..1)")
    p.add_argument("--text-factor", type=float, default=0.02, help="text: norm rule factor (finite, > 0)")
    for name, scale, stop in (("segmentation", 0.2, 200), ("identity", 100.0, 100), ("landmark", 500.0, 200)):
        p.add_argument(f"--{name}-scale", type=float, default=scale,
                       help=f"{name}: rho_t = sqrt(ab_t) * scale (finite, > 0)")
        p.add_argument(f"--{name}-stop", type=int, default=stop, help=f"{name}: guided for t > stop")
    p.add_argument("--parse-size", type=int, default=512, help="BiSeNet input size")
    p.add_argument("--out", default="out/face",
                   help="output folder (new, empty, or a previous zmagic output with --overwrite)")
    add_overwrite(p)
    add_nan_policy(p)


_FLAGS = {"landmark_box": "--landmark-box", "seeds": "--seeds", "num_steps": "--steps", "eta": "--eta",
          "prompt": "--prompt", "order": "--order", "scheme": "--scheme", "text_factor": "--text-factor",
          "parse_size": "--parse-size", "nan_policy": "--nan-policy",
          **{f"{name}_{kind}": f"--{name}-{kind}" for name in ("segmentation", "identity", "landmark")
             for kind in ("scale", "stop")}}


def _settings(args):
    from zmagic_jax.tasks import FaceSettings
    try:
        return FaceSettings(task=args.task, scheme=args.scheme, order=tuple(args.order), prompt=args.prompt,
                            seeds=tuple(args.seeds), num_steps=args.steps, eta=args.eta, text_factor=args.text_factor,
                            segmentation_scale=args.segmentation_scale, segmentation_stop=args.segmentation_stop,
                            identity_scale=args.identity_scale, identity_stop=args.identity_stop,
                            landmark_scale=args.landmark_scale, landmark_stop=args.landmark_stop,
                            parse_size=args.parse_size, landmark_net=args.landmark_net,
                            landmark_box=None if args.landmark_box is None else tuple(args.landmark_box),
                            nan_policy=args.nan_policy)
    except ValueError as err:
        text = str(err)
        for field, flag in _FLAGS.items():
            if f" {field} " in text or f" {field}=" in text or text.startswith(f"FaceSettings: {field}"):
                raise FlagError(f"{flag}: {text}") from err
        raise FlagError(text) from err


def _table(report: dict) -> str:
    from zmagic_jax.tasks._recipe import format_table

    runs = report["runs"]
    metrics = sorted({name for r in runs.values() for name in r["mean"]})
    rows = [("run", *metrics, "guided steps", "compile s", "sample s")]
    for label, r in runs.items():
        rows.append((label, *(f"{r['mean'][m]:.4g} ± {r['std'][m]:.2g}" for m in metrics), str(r["guided_steps"]),
                     f"{r['compile_s']:.1f}", f"{r['run_s']:.1f}"))
    return format_table(rows)


def _load_models(args, settings):
    from zmagic_jax.tasks import load_face_models
    from zmagic_jax.tasks._face import NETWORK_OF

    needed = {NETWORK_OF[name] for name in settings.conditions}
    flags = {"clip": "--clip", "parser": "--bisenet", "arcface": "--arcface", "landmarks": "--landmarks"}
    for network in sorted(needed):
        if network == "landmarks" and settings.landmark_net == "onet":
            continue
        if getattr(args, flags[network].lstrip("-")) is None:
            raise FlagError(f"{flags[network]}: task {settings.task!r} needs this network; give its local file.")
    kwargs = {"clip": args.clip if "clip" in needed else None,
              "bisenet": args.bisenet if "parser" in needed else None,
              "arcface": args.arcface if "arcface" in needed else None,
              "landmarks": args.landmarks if "landmarks" in needed else None}
    try:
        return load_face_models(args.unet, landmark_net=settings.landmark_net,
                                onet_default="landmarks" in needed, **kwargs)
    except (OSError, ValueError) as err:
        raise FlagError(f"loading the networks: {err}") from err


def _references(args, settings, resolution: int):
    from zmagic_jax.tasks import FaceReferences
    from zmagic_jax.tasks._face import REFERENCE_OF
    from zmagic_jax.tasks._outputs import load_image

    sources = {"identity": ("--reference", args.reference),
               "parsing": ("--parsing-source", args.parsing_source or args.reference),
               "landmarks": ("--landmark-source", args.landmark_source or args.reference)}
    images = {}
    for name in settings.conditions:
        if name not in REFERENCE_OF:
            continue
        kind = REFERENCE_OF[name]
        flag, path = sources[kind]
        if path is None:
            raise FlagError(f"{flag}: condition {name!r} needs a reference image (or give --reference).")
        try:
            images[kind] = load_image(path, (resolution, resolution), f"{kind} image")
        except (OSError, ValueError) as err:
            raise FlagError(f"{flag}: {err}") from err
    return FaceReferences(**images)


def run_face(args) -> int:
    from zmagic_jax._io import check_output_dir
    from zmagic_jax.tasks import run_faces, save_faces

    settings = _settings(args)
    check_output_dir(args.out, overwrite=args.overwrite, flag="--out")
    with tqdm(total=4, desc="zmagic face: load networks", unit="stage", file=sys.stderr) as bar:
        models = _load_models(args, settings)
        references = _references(args, settings, int(models.unet.module.config.resolution))

        def progress(label):
            bar.update(1)
            bar.set_description(f"zmagic face: {label}")
        result = run_faces(models, settings, references, progress=progress)
        bar.update(bar.total - bar.n)
    report = save_faces(args.out, result, references, overwrite=args.overwrite)
    print(f"\n{settings.task} ({settings.num_steps} steps, eta {settings.eta}, seeds {list(settings.seeds)}); "
          "metrics: mean ± std over seeds (lower is closer to the target).")
    print(_table(report))
    print(f"wrote {args.out}/metrics.json, grid.png and {len(report['images'])} images")
    return 0


def add_convert(sub) -> None:
    from zmagic_jax.cli import HelpFormatter
    from zmagic_jax.ports import PORTS

    p = sub.add_parser("convert", formatter_class=HelpFormatter,
                       help="convert a PyTorch checkpoint of a ported network to .safetensors",
                       description="Read a published PyTorch checkpoint (no PyTorch needed), check that every tensor "
                                   "maps onto the Flax network, and write Flax params with the network name and "
                                   "config in the file header (loaded back without a config).")
    p.add_argument("network", choices=sorted(PORTS))
    p.add_argument("source", help="PyTorch checkpoint (.pt, .pth, .ckpt, .tar, .bin)")
    p.add_argument("destination", help="output .safetensors file (new, or a file zmagic converted with --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace a destination that zmagic converted earlier")


def run_convert(args) -> int:
    from zmagic_jax.ports import PORTS, CheckpointMismatchError, convert_file

    try:
        convert_file(PORTS[args.network], args.source, args.destination, overwrite=args.overwrite)
    except CheckpointMismatchError as err:
        raise FlagError(str(err)) from err
    except FileNotFoundError as err:
        raise FlagError(f"source: {err}") from err
    print(f"wrote {args.destination} ({args.network})")
    return 0
