"""The ``zmagic`` command: parse, call the library, write files."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from tqdm import tqdm

from zmagic_jax._cli_aggregate import add_aggregate, run_aggregate_command
from zmagic_jax._cli_concepts import add_concepts, run_concepts_command
from zmagic_jax._cli_face import add_convert, add_face, run_convert, run_face
from zmagic_jax._cli_one_way import add_one_way, run_one_way_command


def _table(report: dict) -> str:
    from zmagic_jax.tasks._recipe import format_table

    rows = [("d", "setting", "scheme", "E class", "E meas_1", "E meas_2", "ED", "SW", "cos", "diverged",
             "dropped", "time s")]
    for r in report["results"]:
        e = r["final_energy"]
        fmt = lambda name: f"{e[name]['mean']:.3g}" if name in e and e[name]["mean"] is not None else "-"
        cos = r["mean_guided_cosine"]
        dist = lambda name: "-" if r[name] is None else f"{r[name]:.3f}"
        rows.append((str(r["dim"]), r["setting"], r["scheme"], fmt("class"), fmt("measurement_1"),
                     fmt("measurement_2"), dist("energy_distance"), dist("sliced_wasserstein"),
                     "-" if cos is None else f"{cos:+.3f}",
                     str(r["diverged_samples"]) + (" (all)" if r.get("all_diverged") else ""),
                     f"{100 * r['dropped_guidance_steps']:.2g}%",
                     "-" if r["wall_time_s"] is None else f"{r['wall_time_s']:.1f}"))
    return format_table(rows)


def _demo(args) -> int:
    from zmagic_jax._io import atomic_output_dir
    from zmagic_jax.tasks import DemoSettings
    from zmagic_jax.tasks._recipe import PROGRAMS
    from zmagic_jax.tasks._testbed_demo import prepare_testbed_demo, write_testbed_demo

    settings = DemoSettings(seed=args.seed, dims=tuple(args.dims), num_samples=args.samples,
                            num_steps=args.steps, sampler=args.sampler, guidance_scale=args.scale)
    from zmagic_jax.ports import load_digit_models

    run_digits_too = not args.no_digits
    if run_digits_too:
        from zmagic_jax.tasks._digits import DEFAULT_RUNS, DigitSettings

        if args.digit_seeds < 2:
            raise ValueError(f"--digit-seeds must be >= 2 (scores report mean and std); got {args.digit_seeds}.")
        if not 0 <= args.digit_class <= 9:
            raise ValueError(f"--digit-class must be a digit 0..9; got {args.digit_class}.")
        digit_settings = DigitSettings(target_class=args.digit_class, seeds=tuple(range(args.digit_seeds)),
                                       nan_policy=args.nan_policy)
    run_canvas = not args.no_canvas
    if run_canvas:
        from zmagic_jax.tasks._canvas_demo import RUNS, CanvasDemoSettings

        if not 0 <= args.canvas_digit <= 9:
            raise ValueError(f"--canvas-digit must be a digit 0..9; got {args.canvas_digit}.")
        try:
            canvas_settings = CanvasDemoSettings(digit=args.canvas_digit, count=args.canvas_count,
                                                 num_steps=args.canvas_steps)
        except ValueError as err:
            raise ValueError(f"--canvas-count / --canvas-steps: {err}") from err
    run_one_way = not args.no_one_way
    if run_one_way:
        from zmagic_jax.tasks._one_way import RUNS as ONE_WAY_RUNS, OneWayDemoSettings

        try:
            one_way_settings = OneWayDemoSettings(digit=args.one_way_digit, piece=args.one_way_piece,
                                                  count=args.one_way_count)
        except ValueError as err:
            raise ValueError(f"--one-way-digit / --one-way-piece / --one-way-count: {err}") from err
    run_concepts = not args.no_concepts
    if run_concepts:
        from zmagic_jax.tasks._concepts_demo import DEMO_SETTINGS as concepts_settings
    # The staging folder is made first (so --out is checked and known writable before any work)
    # and swapped in once, at the end.
    with atomic_output_dir(args.out, overwrite=args.overwrite, flag="--out", command="demo") as tmp:
        # checksums first: a damaged file stops here
        digits = load_digit_models() if run_digits_too or run_canvas or run_one_way or run_concepts else None
        if run_canvas or run_one_way or run_concepts:
            from zmagic_jax.ports import load_canvas_models
            canvas = load_canvas_models()
        with tqdm(desc="zmagic demo: tracing", unit="run", file=sys.stderr) as bar:
            def progress(label):
                bar.update(1)
                bar.set_description(label)
            # Every program is traced first, then all compile together on the machine's cores (XLA
            # releases the interpreter lock while compiling); the runs follow.
            plan = prepare_testbed_demo(settings)
            bar.total = sum(len(item.runs) for item in plan.dims) + (len(DEFAULT_RUNS) if run_digits_too else 0) + \
                (len(RUNS) if run_canvas else 0) + (len(ONE_WAY_RUNS) if run_one_way else 0) + \
                (len(concepts_settings.pairs) if run_concepts else 0) + 1
            bar.refresh()
            if run_digits_too:
                from zmagic_jax.tasks._digits import prepare_digits, run_digits, save_digits
                prepare_digits(digits, digit_settings)
            if run_canvas:
                from zmagic_jax.tasks._canvas_demo import prepare_canvas_demo, run_canvas_demo, save_canvas_demo
                canvas_plan = prepare_canvas_demo(canvas, digits, canvas_settings)
            if run_one_way:
                from zmagic_jax.tasks._one_way import prepare_one_way_demo, run_one_way_demo, save_one_way_demo
                one_way_plan = prepare_one_way_demo(canvas, digits, one_way_settings)
            bar.set_description("zmagic demo: compiling")
            compile_s = PROGRAMS.compile_pending(workers=2)
            report = write_testbed_demo(Path(tmp), plan, progress, compile_s=compile_s)
            if run_digits_too:
                result = run_digits(digits, digit_settings, progress=progress)
                digit_report = save_digits(Path(tmp) / "digits", result, digits)
            if run_canvas:
                canvas_report = run_canvas_demo(canvas, canvas_plan, canvas_settings, progress=progress)
                save_canvas_demo(Path(tmp) / "canvas", canvas_report, canvas_plan, canvas_settings)
            if run_one_way:
                one_way_report = run_one_way_demo(canvas, one_way_plan, one_way_settings, progress=progress)
                save_one_way_demo(Path(tmp) / "one_way", one_way_report, one_way_plan, one_way_settings)
            if run_concepts:
                from zmagic_jax.tasks._concepts_demo import run_concepts_demo, save_concepts_demo
                concepts_report = run_concepts_demo(canvas, digits, concepts_settings, progress=progress)
                save_concepts_demo(Path(tmp) / "concepts", concepts_report, concepts_settings)
            bar.update(bar.total - bar.n)
    print(f"\nExact testbed ({settings.sampler}, {settings.num_steps} steps, {settings.num_samples} samples, "
          f"seed {settings.seed}). E = final energy (mean), ED / SW = energy distance / sliced W2 to exact "
          "posterior samples, cos = mean guided-step cosine, dropped = share of (sample, step) pairs "
          "whose guidance was non-finite and left out.")
    print(_table(report))
    if run_digits_too:
        from zmagic_jax.tasks._digits import digit_table

        print(f"\nDigits (the embedded 16x16 MNIST DDPM, {digit_settings.num_steps} {digit_settings.sampler} steps, "
              f"target class {digit_settings.target_class}, {len(digit_settings.seeds)} seeds; scores by the "
              "evaluator network, never used for guidance; mean±std over seeds).")
        print(digit_table(digit_report))
    if run_canvas:
        from zmagic_jax.tasks._canvas_demo import canvas_table

        s = canvas_settings
        print(f"\nAMDM on the canvas models (32x32; text model prompted \"a {s.digit}\", layout model given one box; "
              f"{s.count} samples, DDIM {s.num_steps}, CFG {s.text_cfg:g} / {s.layout_cfg:g}, window "
              f"{s.window[0]}..{s.window[1]}; \"A -> m\" = model m's own canvas under AMDM). Scores by the canvas "
              "evaluator, never used for guidance: digit = it finds the digit, exact = that digit only; box IoU "
              "of the ink's bounding box; FD of evaluator features to real canvases of the digit in the box.")
        print(canvas_table(canvas_report))
    if run_one_way:
        from zmagic_jax.tasks._one_way import one_way_table

        s = one_way_settings
        print(f"\nCOW / SOW on the canvas text model (the {s.piece} half of {s.count} held-out {s.digit}s kept, "
              f"prompt \"{one_way_plan.prompt}\"; DDIM {s.num_steps}, C = {s.cycles} cycles, CFG {s.cfg:g}). Scores by "
              "the canvas evaluator: digit found, its probability, FD to the real whole digits; region error = mean "
              "|change| inside the kept half; seam = mean |difference| of neighbours across the half's border.")
        print(one_way_table(one_way_report))
    if run_concepts:
        from zmagic_jax.tasks._concepts_demo import concepts_table

        s = concepts_settings
        print(f"\nConcept learning by EM on the canvas text model (two held-out digits and the background on one "
              f"canvas, learned from the digits' 16 x 16 tiles: {s.iterations} iterations x {s.steps_per_iteration} "
              f"steps, phase 2 {s.phase2} after {s.phase1_steps}; the full run is experiments/concepts_canvas.py).")
        print(concepts_table(concepts_report))
    print(f"\ncompiling every program: {compile_s:.0f} s (all at once, 2 threads)")
    print(f"wrote {args.out}/report.json and figures" + (f", {args.out}/digits/" if run_digits_too else "")
          + (f", {args.out}/canvas/" if run_canvas else "") + (f", {args.out}/one_way/" if run_one_way else "")
          + (f", {args.out}/concepts/" if run_concepts else ""))
    return 0


_SETTING_FLAGS = (("guidance window", "--window"), ("time-travel window", "--time-travel-window"),
                  ("num_steps", "--steps"), ("cfg_scale", "--cfg-scale"), ("guidance_scale", "--scale"),
                  ("time_travel_repeats", "--time-travel"), ("seeds", "--seeds"), ("latent_size", "--latent-size"),
                  ("clip_prompt", "--clip-prompt"), ("prompt", "--prompt"), ("sampler", "--sampler"))


class _FlagError(ValueError):
    """A bad command-line value, reported with the flag that carries it."""


def _text_style_settings(args):
    from zmagic_jax.tasks import TextStyleSettings

    try:
        return TextStyleSettings(
            prompt=args.prompt, clip_prompt=args.clip_prompt, negative_prompt=args.negative_prompt,
            style_image=args.style, scheme=args.scheme, seeds=tuple(args.seeds), num_steps=args.steps,
            cfg_scale=args.cfg_scale, guidance_start=args.window[0], guidance_stop=args.window[1],
            time_travel_repeats=args.time_travel, time_travel_start=args.time_travel_window[0],
            time_travel_stop=args.time_travel_window[1], rule=args.rule, guidance_scale=args.scale,
            text_guidance=args.text_guidance, sampler=args.sampler,
            latent_size=None if args.latent_size is None else tuple(args.latent_size), remat=args.remat,
            nan_policy=args.nan_policy)
    except ValueError as err:
        raise _flagged(err) from err


def _flagged(err: ValueError) -> "_FlagError":
    flag = next((flag for field, flag in _SETTING_FLAGS if field in str(err)), None)
    return _FlagError(f"{flag}: {err}" if flag else str(err))


def _text_style_table(report: dict) -> str:
    from zmagic_jax.tasks._recipe import format_table

    rows = [("seed", "method", "content loss", "style loss", "text distance")]
    for r in report["images"]:
        rows.append((str(r["seed"]), r["method"], f"{r['content_loss']:.4g}", f"{r['style_loss']:.4g}",
                     f"{r['text_distance']:.4f}"))
    for scheme, means in report["mean"].items():
        label = next(r["method"] for r in report["images"] if r["scheme"] == scheme)
        rows.append(("mean", label, f"{means['content_loss']:.4g}", f"{means['style_loss']:.4g}",
                     f"{means['text_distance']:.4f}"))
    return format_table(rows)


def _text_style(args) -> int:
    import os

    from zmagic_jax.energies import load_clip
    from zmagic_jax.models import load_stable_diffusion
    from zmagic_jax.tasks import TextStyleModels, load_style_image, run_text_style, save_text_style

    from zmagic_jax._io import check_output_dir

    settings = _text_style_settings(args)
    check_output_dir(args.out, overwrite=args.overwrite, flag="--out")
    for flag, path in (("--sd", args.sd), ("--clip", args.clip)):
        if not os.path.isdir(path):
            raise _FlagError(f"{flag}: {path!r} is not a folder; give a local "
                             f"{'diffusers Stable Diffusion' if flag == '--sd' else 'transformers CLIP'} folder.")
    try:
        load_style_image(args.style, 8)
    except (OSError, ValueError) as err:
        raise _FlagError(f"--style: {err}") from err

    with tqdm(total=4, desc="zmagic text-style: load models", unit="stage", file=sys.stderr) as bar:
        models = []
        for flag, loader, path in (("--sd", load_stable_diffusion, args.sd), ("--clip", load_clip, args.clip)):
            try:
                models.append(loader(path))
            except (OSError, ValueError) as err:
                raise _FlagError(f"{flag}: {err}") from err
        models = TextStyleModels(*models)
        try:  # the windows against the model's own schedule, before any work
            settings.grid(models.sd.schedule)
        except ValueError as err:
            raise _flagged(err) from err

        def progress(label):
            bar.update(1)
            bar.set_description(f"zmagic text-style: {label}")
        result = run_text_style(models, settings, progress=progress)
        bar.update(bar.total - bar.n)
    report = save_text_style(args.out, result, models, overwrite=args.overwrite)
    runs = report["runs"]
    print(f"\n{settings.prompt!r} in the style of {settings.style_image} ({settings.num_steps} steps, "
          f"CFG {settings.cfg_scale}, {settings.sampler}, rule {settings.rule} x {settings.guidance_scale}). "
          "content loss: CLIP features vs the plain image of the same seed; style loss: CLIP Gram distance to "
          "the style; text distance: 1 - CLIP cosine to the prompt.")
    print(_text_style_table(report))
    print("\n" + "; ".join(f"{scheme}: compile {r['compile_s']:.1f} s, sample {r['run_s']:.1f} s"
                           for scheme, r in runs.items()))
    print(f"wrote {args.out}/metrics.json, grid.png and {len(report['images'])} images")
    return 0


def _add_text_style(sub) -> None:
    from zmagic_jax.tasks import TEXT_STYLE_SCHEMES

    from zmagic_jax.tasks._recipe import SAMPLERS

    p = sub.add_parser("text-style", formatter_class=HelpFormatter,
                       help="Stable Diffusion prompt + CLIP style guidance (FreeDoM / Z-Magic)",
                       description="Sample Stable Diffusion with a prompt (classifier-free guidance) and a style "
                                   "image (CLIP Gram energy). Defaults follow FreeDoM's SD style recipe.")
    p.add_argument("--sd", required=True, help="local diffusers Stable Diffusion folder")
    p.add_argument("--clip", required=True, help="local transformers CLIP folder (style energy and metrics)")
    p.add_argument("--prompt", required=True, help="Stable Diffusion prompt")
    p.add_argument("--clip-prompt", default=None, help="prompt CLIP measures (and guides); default --prompt")
    p.add_argument("--negative-prompt", default="", help="CFG's unconditional prompt (default empty)")
    p.add_argument("--style", required=True, help="style reference image (PNG/JPEG)")
    p.add_argument("--scheme", default="dependent", choices=TEXT_STYLE_SCHEMES,
                   help="none = CFG only; independent = FreeDoM; dependent = Z-Magic (prompt leads); "
                        "multi = CAGrad over CLIP text and style")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one image per seed (distinct, >= 0)")
    p.add_argument("--steps", type=int, default=100, help="sampling steps (2..the model's training steps)")
    p.add_argument("--cfg-scale", type=float, default=5.0, help="classifier-free guidance scale (finite, >= 0)")
    p.add_argument("--window", type=int, nargs=2, default=[699, 299], metavar=("START", "STOP"),
                   help="style guidance for STOP < t <= START")
    p.add_argument("--time-travel", type=int, default=3, metavar="REPEATS", help="repeats per step (1 = off)")
    p.add_argument("--time-travel-window", type=int, nargs=2, default=[699, 399], metavar=("START", "STOP"),
                   help="time-travel for STOP < t <= START")
    p.add_argument("--rule", default="cfg_relative", choices=("cfg_relative", "freedom"),
                   help="cfg_relative: rho = scale rms(CFG correction) / rms(grad); freedom: rho = sqrt(ab_t) scale")
    p.add_argument("--scale", type=float, default=0.2, help="factor (cfg_relative) or scale (freedom); finite, > 0")
    p.add_argument("--text-guidance", action="store_true",
                   help="also guide the CLIP text distance (independent / dependent; multi always does)")
    p.add_argument("--sampler", default="ddpm_posterior", choices=sorted(SAMPLERS), help="sampler")
    p.add_argument("--latent-size", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="latent size (image = 8x); default the UNet's sample_size")
    p.add_argument("--remat", action="store_true", help="rematerialise UNet/VAE activations (less memory)")
    p.add_argument("--out", default="out/text-style",
                   help="output folder (new, empty, or a previous zmagic output with --overwrite)")
    add_overwrite(p)
    add_nan_policy(p)


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows each option's default, except where there is none (``None``) or it is a switch."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def add_overwrite(p) -> None:
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out if it holds a previous zmagic output (a folder zmagic did not write is "
                        "never replaced)")


def add_nan_policy(p) -> None:
    p.add_argument("--nan-policy", default="raise", choices=("raise", "skip"),
                   help="non-finite guidance: raise = stop with an error naming the condition, seed and step; "
                        "skip = warn and keep the samples (those steps unguided)")


def _add_demo(sub) -> None:
    from zmagic_jax.tasks._recipe import SAMPLERS

    demo = sub.add_parser("demo", formatter_class=HelpFormatter,
                          help="every guidance scheme on the exact Gaussian-mixture testbed and on the embedded "
                               "digits model; AMDM, COW / SOW and concept learning on the embedded canvas models",
                          description="Run none / independent (FreeDoM) / dependent (Z-Magic Alg. 1) / multi "
                                      "(Z-Magic Alg. 2) on the exact Gaussian-mixture testbed (scored against exact "
                                      "posterior samples) and on the embedded 16x16 digits DDPM; AMDM, COW / SOW and "
                                      "concept learning by EM on the embedded canvas models; write report.json, PNG figures and image grids into "
                                      "--out and print the tables.")
    demo.add_argument("--out", default="out/demo", help="output folder (new, empty, or a previous zmagic output "
                                                        "with --overwrite; swapped in at the end)")
    add_overwrite(demo)
    demo.add_argument("--seed", type=int, default=0, help="testbed seed (>= 0)")
    demo.add_argument("--dims", type=int, nargs="+", default=[2, 64], help="testbed dimensions (distinct, >= 2)")
    demo.add_argument("--samples", type=int, default=1000, help="samples per scheme (>= 16)")
    demo.add_argument("--steps", type=int, default=100, help="sampling steps (2..1000)")
    demo.add_argument("--sampler", default="ddpm_posterior", choices=sorted(SAMPLERS), help="sampler")
    demo.add_argument("--scale", type=float, default=1.0, help="guidance scale of the score rule (finite, > 0)")
    demo.add_argument("--no-digits", action="store_true",
                      help="skip the image part (the embedded digits model; written to OUT/digits/)")
    demo.add_argument("--digit-class", type=int, default=3, help="target class of the digits runs (0..9)")
    demo.add_argument("--digit-seeds", type=int, default=6, help="images per digits run, seeds 0..N-1 (>= 2)")
    demo.add_argument("--no-canvas", action="store_true",
                      help="skip the AMDM part (the embedded canvas text and layout models; written to OUT/canvas/)")
    demo.add_argument("--canvas-digit", type=int, default=3, help="digit the canvas text model is prompted for (0..9)")
    demo.add_argument("--canvas-count", type=int, default=24, help="canvases per AMDM-section run (>= 2)")
    demo.add_argument("--canvas-steps", type=int, default=25, help="DDIM steps of the AMDM section (4..1000)")
    demo.add_argument("--no-one-way", action="store_true",
                      help="skip the COW / SOW part (the canvas text model; written to OUT/one_way/)")
    demo.add_argument("--one-way-digit", type=int, default=3, help="class of the held-out digits kept in part (0..9)")
    demo.add_argument("--one-way-piece", default="top", choices=["top", "bottom", "left", "right"],
                      help="which half of each digit is the visual condition")
    demo.add_argument("--one-way-count", type=int, default=8, help="samples per COW / SOW run (>= 2)")
    demo.add_argument("--no-concepts", action="store_true",
                      help="skip the concept-learning part (EM on the canvas text model; written to OUT/concepts/)")
    add_nan_policy(demo)


def main(argv=None) -> int:
    from zmagic_jax import __version__
    from zmagic_jax._io import interrupts_cancel_outputs

    parser = argparse.ArgumentParser(prog="zmagic", formatter_class=HelpFormatter,
                                     description="Zero-shot multi-attribute guided diffusion: FreeDoM and Z-Magic "
                                                 "guidance on pretrained diffusion models, without training.")
    parser.add_argument("--version", action="version", version=f"zmagic {__version__}")
    sub = parser.add_subparsers(dest="command", required=True,
                                metavar="{demo,text-style,face,aggregate,one-way,concepts,convert}")
    _add_demo(sub)
    _add_text_style(sub)
    add_face(sub)
    add_aggregate(sub)
    add_one_way(sub)
    add_concepts(sub)
    add_convert(sub)
    args = parser.parse_args(argv)
    commands = {"demo": _demo, "text-style": _text_style, "face": run_face, "aggregate": run_aggregate_command,
                "one-way": run_one_way_command, "concepts": run_concepts_command, "convert": run_convert}

    try:  # Ctrl-C and SIGTERM cancel the run: no half-written output is left, nothing is swapped in
        with interrupts_cancel_outputs():
            return commands[args.command](args)
    except ValueError as err:
        parser.exit(2, f"zmagic {args.command}: error: {err}\n")
    except FloatingPointError as err:
        parser.exit(1, f"zmagic {args.command}: error: {err}\n")


if __name__ == "__main__":
    sys.exit(main())
