"""``zmagic one-way``: COW / SOW, a visual condition kept while the image grows around it, on a
Stable Diffusion folder (``--sd``) or on the embedded canvas text model (``--embedded``)."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from tqdm import tqdm

from zmagic_jax._cli_face import FlagError

# Setting (or input) names in error messages -> the flag that carries them.
_FLAGS = (("negative_prompt", "--negative-prompt"), ("masked_cfg_prompts", "--prompt"), ("prompt", "--prompt"),
          ("num_steps", "--steps"), ("cycles", "--cycles"), ("cfg_scale", "--cfg-scale"), ("cfg", "--cfg-scale"),
          ("seed_size", "--seed-size"), ("position", "--position"), ("planner_kind", "--planner"),
          ("mask", "--mask"), ("keep", "--keep"), ("image", "--image"), ("seeds", "--seeds"), ("seed", "--seeds"),
          ("suppress_strength", "--suppress-strength"), ("enhance_strength", "--enhance-strength"),
          ("digit", "--digit"), ("piece", "--piece"), ("count", "--count"))
# Flags of one mode only: (argparse dest, flag).
_SD_ONLY = (("image", "--image"), ("mask", "--mask"), ("prompt", "--prompt"), ("negative_prompt", "--negative-prompt"),
            ("keep", "--keep"), ("seed_size", "--seed-size"), ("position", "--position"), ("planner", "--planner"),
            ("modulate", "--modulate"))
_EMBEDDED_ONLY = (("digit", "--digit"), ("piece", "--piece"), ("count", "--count"))
_MODULATION_FLAGS = (("suppress_strength", "--suppress-strength"), ("enhance_strength", "--enhance-strength"),
                     ("no_suppress", "--no-suppress"), ("no_enhance", "--no-enhance"),
                     ("no_temporal_decay", "--no-temporal-decay"), ("no_spatial_decay", "--no-spatial-decay"),
                     ("no_indicator", "--no-indicator"))


def add_one_way(sub) -> None:
    from zmagic_jax.cli import HelpFormatter, add_overwrite
    from zmagic_jax.oneway import KEEP, PLAN_KINDS
    from zmagic_jax.tasks._one_way import PIECES

    p = sub.add_parser("one-way", formatter_class=HelpFormatter,
                       help="COW / SOW: keep a visual condition (a face, an object) and grow the image around it",
                       description="Cyclic one-way diffusion (COW, the released recipe: 10 DDIM steps, cycles "
                                   "between levels 5 and 7, C = 10, the condition's inverted levels pasted back after "
                                   "every step) on a Stable Diffusion folder; --modulate adds SOW's attention "
                                   "modulation in the cycles. The condition is resized to the seed size, placed by "
                                   "the offline planner (or --position) on a gray canvas and kept in its mask's "
                                   "region. Writes seed<S>.png per seed, canvas.png, grid.png and metrics.json. "
                                   "--embedded runs the replacement / COW / SOW comparison on the embedded canvas "
                                   "text model (half of a held-out digit kept).")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--sd", help="local diffusers Stable Diffusion folder")
    mode.add_argument("--embedded", action="store_true",
                      help="the embedded canvas text model (no weights needed): replacement, COW and SOW compared")
    p.add_argument("--image", help="the visual condition (PNG / JPEG); with --sd")
    p.add_argument("--mask", help="its mask, a PNG / JPEG of the image's size (grey levels, binarised at half); "
                                  "with --sd")
    p.add_argument("--prompt", help="what to generate around the condition; with --sd")
    p.add_argument("--negative-prompt", help="CFG's unconditional prompt (default empty)")
    p.add_argument("--keep", choices=KEEP, help="which mask pixels are the condition: ones = white (default), zeros "
                                                "= black (the released COW masks)")
    p.add_argument("--seed-size", type=int, metavar="N",
                   help="the condition's side on the canvas in pixels (default half the image's side: 256 of 512)")
    p.add_argument("--position", type=int, nargs=2, metavar=("ROW", "COL"),
                   help="the condition's top-left pixel (default: the planner places it)")
    p.add_argument("--planner", choices=PLAN_KINDS,
                   help="the offline planner's rule (default: face if the prompt names a person, else object)")
    p.add_argument("--modulate", action="store_true", help="SOW: modulate self-attention in the cycles")
    p.add_argument("--suppress-strength", type=float, metavar="W",
                   help="SOW's suppression strength (condition -> elsewhere; default 0.3)")
    p.add_argument("--enhance-strength", type=float, metavar="W",
                   help="SOW's enhancement strength (related box -> condition; default 0.3)")
    for name, what in (("suppress", "the suppression"), ("enhance", "the enhancement"),
                       ("temporal-decay", "the decay over cycles"), ("spatial-decay", "the decay with distance"),
                       ("indicator", "the closest-fifth indicator")):
        p.add_argument(f"--no-{name}", action="store_true", help=f"SOW without {what}")
    p.add_argument("--cycles", type=int, help="COW's cycles C (default 10)")
    p.add_argument("--steps", type=int, help="DDIM steps (default 10; levels r, b, p = 0.5, 0.7, 0.4 of them)")
    p.add_argument("--cfg-scale", type=float, help="classifier-free guidance scale (default 7.5; --embedded 3)")
    p.add_argument("--seeds", type=int, nargs="+", help="one image per seed (default 0; --embedded: one seed)")
    p.add_argument("--digit", type=int, help="--embedded: the held-out digits' class (default 3)")
    p.add_argument("--piece", choices=PIECES, help="--embedded: which half of each digit is kept (default top)")
    p.add_argument("--count", type=int, help="--embedded: samples per run (default 16)")
    p.add_argument("--out", default="out/one-way",
                   help="output folder (new, empty, or a previous zmagic output with --overwrite)")
    add_overwrite(p)


def _flagged(err: Exception) -> FlagError:
    """The error with the flag of the setting or input it names first."""
    text = f" {err} ".replace(":", " ").replace("'", " ")
    found = [(min(i for i in (text.find(f" {field} "), text.find(f" {field}=")) if i >= 0), flag)
             for field, flag in _FLAGS if f" {field} " in text or f" {field}=" in text]
    return FlagError(f"{min(found)[1]}: {err}" if found else str(err))


def _given(args, dest) -> bool:
    value = getattr(args, dest)
    return value not in (None, False)


def _check_mode(args) -> None:
    wrong = _EMBEDDED_ONLY if args.sd else _SD_ONLY
    for dest, flag in wrong:
        if _given(args, dest):
            raise FlagError(f"{flag}: only with {'--embedded' if args.sd else '--sd'}.")
    if args.sd:
        for dest, flag in (("image", "--image"), ("mask", "--mask"), ("prompt", "--prompt")):
            if not _given(args, dest):
                raise FlagError(f"{flag}: required with --sd.")
        if not args.modulate:
            for dest, flag in _MODULATION_FLAGS:
                if _given(args, dest):
                    raise FlagError(f"{flag}: SOW's modulation settings need --modulate.")
    elif args.seeds is not None and len(args.seeds) != 1:
        raise FlagError(f"--seeds: --embedded takes one seed (its runs' keys); got {len(args.seeds)}.")


def _modulation(args):
    from zmagic_jax.modulation import Modulation

    options = {"suppress": not args.no_suppress, "enhance": not args.no_enhance,
               "temporal_decay": not args.no_temporal_decay, "spatial_decay": not args.no_spatial_decay,
               "indicator": not args.no_indicator}
    for name in ("suppress_strength", "enhance_strength"):
        if getattr(args, name) is not None:
            options[name] = getattr(args, name)
    try:
        return Modulation(**options)
    except ValueError as err:
        raise _flagged(err) from err


def _sd_settings(args):
    from zmagic_jax.tasks._one_way_sd import OneWaySettings

    options = {"prompt": args.prompt, "keep": args.keep or "ones", "modulate": args.modulate,
               "modulation": _modulation(args), "seed_size": args.seed_size,
               "position": None if args.position is None else tuple(args.position), "planner_kind": args.planner}
    for dest, field in (("negative_prompt", "negative_prompt"), ("steps", "num_steps"), ("cycles", "cycles"),
                        ("cfg_scale", "cfg_scale")):
        if getattr(args, dest) is not None:
            options[field] = getattr(args, dest)
    if args.seeds is not None:
        options["seeds"] = tuple(args.seeds)
    try:
        return OneWaySettings(**options)
    except ValueError as err:
        raise _flagged(err) from err


def _native_size(folder: str):
    """``((H, W), factor)`` of the canvas a diffusers folder samples, read from its configs before
    the weights are loaded; ``None`` when they cannot be read (the loader then says what is wrong)."""
    try:
        unet = json.loads(Path(folder, "unet", "config.json").read_text())
        vae = json.loads(Path(folder, "vae", "config.json").read_text())
        size = unet.get("sample_size", 64)
        size = int(size[0] if isinstance(size, (list, tuple)) else size)
        factor = 2 ** (len(vae["block_out_channels"]) - 1)
    except (OSError, ValueError, KeyError, TypeError, IndexError):
        return None
    return (size * factor, size * factor), factor


def _run_sd(args) -> int:
    from zmagic_jax._io import check_output_dir
    from zmagic_jax.models import load_stable_diffusion
    from zmagic_jax.tasks import _one_way_sd

    settings = _sd_settings(args)
    check_output_dir(args.out, overwrite=args.overwrite, flag="--out")
    if not os.path.isdir(args.sd):
        raise FlagError(f"--sd: {args.sd!r} is not a folder; give a local diffusers Stable Diffusion folder.")
    native = _native_size(args.sd)
    if native is not None:  # the image, the mask and the layout, before any weight is read
        try:
            _one_way_sd.one_way_layout(args.image, args.mask, settings, native[0], native[1])
        except (OSError, ValueError) as err:
            raise _flagged(err) from err
    with tqdm(total=3, desc="zmagic one-way: load the model", unit="stage", file=sys.stderr) as bar:
        try:
            sd = load_stable_diffusion(args.sd)
        except (OSError, ValueError) as err:
            raise FlagError(f"--sd: {err}") from err
        bar.update(1)
        bar.set_description(f"zmagic one-way: {'SOW' if settings.modulate else 'COW'}, {len(settings.seeds)} seed(s)")
        try:
            result = _one_way_sd.run_one_way(sd, args.image, args.mask, settings)
        except (OSError, ValueError) as err:
            raise _flagged(err) from err
        bar.update(1)
        bar.set_description("zmagic one-way: write")
        report = _one_way_sd.save_one_way(args.out, result, overwrite=args.overwrite)
        bar.update(1)
    levels = report["levels"]
    print(f"\n{'SOW' if settings.modulate else 'COW'} on {args.sd}: \"{report['prompt']}\", DDIM {settings.num_steps} "
          f"(levels r {levels['replace']}, b {levels['back']}, p {levels['preserve']}), C = {settings.cycles} cycles, "
          f"CFG {settings.cfg_scale:g}; condition box {tuple(report['plan']['condition_box'])} (top, left, bottom, "
          f"right) on the {report['image_size'][0]} x {report['image_size'][1]} canvas, related box "
          f"{tuple(report['plan']['related_box'])}")
    for m in report["metrics"]:
        print(f"  seed {m['seed']}: region error {m['region_error']:.4f}")
    print(f"  (the VAE's own round trip of the canvas: {report['region_error_floor']:.4f})")
    print(f"compile {report['compile_s']:.1f} s, sample {report['run_s']:.1f} s")
    print(f"wrote {args.out}/metrics.json, canvas.png, grid.png and {len(report['metrics'])} image(s)")
    return 0


def _embedded_settings(args):
    from zmagic_jax.tasks._one_way import OneWayDemoSettings

    options = {"modulation": _modulation(args)}
    for dest, field in (("digit", "digit"), ("piece", "piece"), ("count", "count"), ("steps", "num_steps"),
                        ("cycles", "cycles"), ("cfg_scale", "cfg")):
        if getattr(args, dest) is not None:
            options[field] = getattr(args, dest)
    if args.seeds is not None:
        options["seed"] = args.seeds[0]
    try:
        return OneWayDemoSettings(**options)
    except ValueError as err:
        raise _flagged(err) from err


def _run_embedded(args) -> int:
    from zmagic_jax._io import atomic_output_dir
    from zmagic_jax.ports import load_canvas_models, load_digit_models
    from zmagic_jax.tasks._one_way import RUNS, one_way_table, prepare_one_way_demo, run_one_way_demo, \
        save_one_way_demo
    from zmagic_jax.tasks._recipe import PROGRAMS

    settings = _embedded_settings(args)
    with atomic_output_dir(args.out, overwrite=args.overwrite, flag="--out", command="one-way") as tmp:
        with tqdm(total=len(RUNS) + 2, desc="zmagic one-way: load the models", unit="stage", file=sys.stderr) as bar:
            digits, canvas = load_digit_models(), load_canvas_models()
            bar.update(1)
            bar.set_description("zmagic one-way: trace and compile")
            try:
                plan = prepare_one_way_demo(canvas, digits, settings)
            except ValueError as err:
                raise _flagged(err) from err
            compile_s = PROGRAMS.compile_pending(workers=2)
            bar.update(1)

            def progress(label):
                bar.update(1)
                bar.set_description(f"zmagic {label}")
            report = run_one_way_demo(canvas, plan, settings, progress=progress)
            save_one_way_demo(Path(tmp), report, plan, settings)
    print(f"\nCOW / SOW on the embedded canvas text model (the {settings.piece} half of {settings.count} held-out "
          f"{settings.digit}s kept, prompt \"{plan.prompt}\"; DDIM {settings.num_steps}, C = {settings.cycles} cycles, "
          f"CFG {settings.cfg:g}). Scores by the canvas evaluator: digit found, its probability, FD to the real whole "
          "digits; region error = mean |change| inside the kept half; seam = mean |difference| of neighbours across "
          "the half's border.")
    print(one_way_table(report))
    print(f"compiling: {compile_s:.0f} s; wrote {args.out}/scores.json and grid.png")
    return 0


def run_one_way_command(args) -> int:
    _check_mode(args)
    return _run_sd(args) if args.sd else _run_embedded(args)
