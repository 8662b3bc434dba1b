"""``zmagic concepts``: learn concept tokens and their masks from one image by EM, on a Stable
Diffusion folder (``--sd``) or on the embedded canvas text model (``--embedded``, a composite of two
held-out digits whose true masks are known)."""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from pathlib import Path

import numpy as np
from tqdm import tqdm

from zmagic_jax._cli_face import FlagError

_SD_ONLY = (("image", "--image"), ("masks", "--masks"), ("boxes", "--boxes"), ("words", "--words"),
            ("concepts", "--concepts"), ("prompts", "--prompts"))
_EMBEDDED_ONLY = (("pair", "--pair"),)
# ConceptSettings fields set from the flags of the same name (argparse dests) -> their flags, also for
# the errors the settings raise
_FIELDS = (("iterations", "--iterations"), ("steps_per_iteration", "--steps-per-iteration"),
           ("phase1_steps", "--phase1-steps"), ("phase2", "--phase2"), ("lora_rank", "--lora-rank"),
           ("mask_timesteps", "--mask-timesteps"))


def add_concepts(sub) -> None:
    from zmagic_jax.cli import HelpFormatter, add_overwrite
    from zmagic_jax.concepts import PHASE2_TARGETS

    p = sub.add_parser("concepts", formatter_class=HelpFormatter,
                       help="learn tokens for the concepts of one image (and their masks) by EM",
                       description="Concept learning by EM (Rahman et al.): Break-A-Scene's two-phase training of "
                                   "new tokens <c0>, <c1>, ... under the current masks (M-step), then each mask "
                                   "re-estimated from its token's cross-attention and refined by a dense CRF (E-step). "
                                   "Writes tokens.safetensors, what phase 2 trained (adapters.safetensors, or "
                                   "unet.safetensors and text_encoder.safetensors), masks/iter<k>_<i>.png, curve.png, "
                                   "samples.png (--prompts) and report.json. --embedded learns the two digits and "
                                   "the background of a canvas of two held-out digits and scores the masks against "
                                   "the true ones.")
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--sd", help="local diffusers Stable Diffusion folder")
    mode.add_argument("--embedded", action="store_true", help="the embedded canvas text model (no weights needed)")
    p.add_argument("--image", help="the image (PNG / JPEG), resized to the model's native size; with --sd")
    p.add_argument("--concepts", type=int, metavar="N", help="number of concepts (or give --words / --masks / --boxes)")
    p.add_argument("--words", nargs="+", help="one initial word per concept (its first token's embedding)")
    p.add_argument("--masks", nargs="+", help="one initial mask per concept (PNG / JPEG, white inside)")
    p.add_argument("--boxes", nargs="+", metavar="T,L,B,R",
                   help="one initial box per concept: top,left,bottom,right in pixels of the model's native size")
    p.add_argument("--pair", type=int, nargs=2, metavar=("A", "B"), help="--embedded: the two digits (default 3 7)")
    p.add_argument("--iterations", type=int, help="EM iterations (default 4; --embedded 3)")
    p.add_argument("--steps-per-iteration", type=int, help="training steps per M-step (default 200; --embedded 100)")
    p.add_argument("--phase1-steps", type=int, help="steps of phase 1, tokens only (default 400; --embedded 300)")
    p.add_argument("--phase2", choices=PHASE2_TARGETS,
                   help="what phase 2 trains with the tokens: full (UNet + text encoder), unet, lora, tokens "
                        "(default full; --embedded tokens, as the demo)")
    p.add_argument("--lora-rank", type=int, help="rank of the adapters of --phase2 lora (default 4)")
    p.add_argument("--mask-timesteps", type=int, help="timesteps averaged by each E-step (default 50)")
    p.add_argument("--no-reestimate", action="store_true", help="keep the initial masks (the once-estimated baseline)")
    p.add_argument("--bf16", action="store_true", help="compute in bfloat16 (weights stay float32)")
    p.add_argument("--remat", action="store_true", help="recompute each UNet block in the backward pass")
    p.add_argument("--prompts", nargs="+", help="prompts to sample after learning, naming <c0>, <c1>, ...; with --sd")
    p.add_argument("--seed", type=int, default=0, help="random seed (>= 0)")
    p.add_argument("--checkpoint", help="checkpoint file: written after every iteration; resumed from if it exists "
                                        "(from the same run)")
    p.add_argument("--out", default="out/concepts",
                   help="output folder (new, empty, or a previous zmagic output with --overwrite)")
    add_overwrite(p)


def _settings(args, base):
    options = {field: getattr(args, field) for field, _ in _FIELDS if getattr(args, field) is not None}
    if args.no_reestimate:
        options["reestimate"] = False
    if args.bf16:
        options["dtype"] = "bfloat16"
    if args.remat:
        options["remat"] = True
    try:
        return dataclasses.replace(base, **options)
    except ValueError as err:
        for field, flag in _FIELDS:
            if f" {field} " in f" {err} ".replace(":", " "):
                raise FlagError(f"{flag}: {err}") from err
        raise FlagError(str(err)) from err


def _check_mode(args) -> None:
    wrong = _EMBEDDED_ONLY if args.sd else _SD_ONLY
    for dest, flag in wrong:
        if getattr(args, dest) not in (None, False):
            raise FlagError(f"{flag}: only with {'--embedded' if args.sd else '--sd'}.")
    if args.seed < 0:
        raise FlagError(f"--seed: must be >= 0; got {args.seed}.")
    if args.sd:
        if args.image is None:
            raise FlagError("--image: required with --sd.")
        if args.masks and args.boxes:
            raise FlagError("--masks / --boxes: give one of them, not both.")
        counts = {flag: len(v) for flag, v in (("--words", args.words), ("--masks", args.masks),
                                               ("--boxes", args.boxes)) if v}
        if args.concepts is not None:
            counts["--concepts"] = args.concepts
        if not counts or len(set(counts.values())) != 1 or min(counts.values()) < 1:
            raise FlagError(f"--concepts / --words / --masks / --boxes: give the number of concepts (>= 1) once, "
                            f"consistently; got {counts or 'none'}.")
    elif args.pair is not None and not all(0 <= d <= 9 for d in args.pair):
        raise FlagError(f"--pair: two digits 0..9; got {args.pair}.")


def _boxes(values, size):
    boxes = []
    for text in values:
        try:
            box = [float(v) for v in text.split(",")]
        except ValueError:
            box = []
        if len(box) != 4:
            raise FlagError(f"--boxes: each box is top,left,bottom,right in pixels; got {text!r}.")
        boxes.append(box)
    try:
        from zmagic_jax.concepts import box_masks
        box_masks(boxes, size)
    except ValueError as err:
        raise FlagError(f"--boxes: {err} (pixels of the {size[0]} x {size[1]} image the model samples)") from err
    return boxes


def _sample(sd, result, prompts, seed, programs):
    """One image per prompt (DDIM 50, CFG 7.5, as Break-A-Scene's inference), decoded to [-1, 1]."""
    import jax
    import jax.numpy as jnp

    from zmagic_jax.models import decode_latents, latent_denoiser
    from zmagic_jax.samplers import ddim, step_contexts
    from zmagic_jax.schemes import none
    from zmagic_jax.tasks._recipe import model_grid, sample_batch, skips

    model = result.model(sd)
    grid = model_grid(sd.schedule, 50, "zmagic concepts")
    contexts = step_contexts(sd.schedule, grid)
    size = int(sd.sample_size)
    images = []
    for i, prompt in enumerate(prompts):
        embeds = result.context(sd, [prompt, ""])
        den = latent_denoiser(model, embeds[0], embeds[1], jnp.float32(7.5))
        key = jax.random.fold_in(jax.random.PRNGKey(seed), i)
        x_T = jax.random.normal(key, (1, sd.latent_channels, size, size))
        out, _, _ = programs.call(sample_batch, (jax.random.split(key, 1), x_T, contexts, den, none(), ddim(0.0)),
                                  skips(none(), contexts))
        z = np.asarray(out[0] if isinstance(out, tuple) else out)[0]
        images.append(np.clip(np.asarray(decode_latents(model, jnp.asarray(z))), -1.0, 1.0))
    return images


def _run_sd(args) -> int:
    import jax

    from zmagic_jax import concepts
    from zmagic_jax._cli_one_way import _native_size
    from zmagic_jax._io import atomic_output_dir, check_output_dir
    from zmagic_jax.models import load_stable_diffusion
    from zmagic_jax.tasks._concepts_demo import save_learned
    from zmagic_jax.tasks._outputs import load_image, save_image_grid
    from zmagic_jax.tasks._recipe import PROGRAMS

    settings = _settings(args, concepts.ConceptSettings())
    check_output_dir(args.out, overwrite=args.overwrite, flag="--out")
    if not os.path.isdir(args.sd):
        raise FlagError(f"--sd: {args.sd!r} is not a folder; give a local diffusers Stable Diffusion folder.")
    native = _native_size(args.sd)
    if native is None:
        raise FlagError(f"--sd: cannot read {args.sd}/unet/config.json and vae/config.json; give a diffusers "
                        "Stable Diffusion folder.")
    size = native[0]
    try:
        image = load_image(args.image, size, "--image")
        masks = None if not args.masks else np.stack([load_image(m, size, "--masks")[..., 0] * 0.5 + 0.5 > 0.5
                                                      for m in args.masks]).astype(np.float32)
    except (OSError, ValueError) as err:
        raise FlagError(f"--image / --masks: {err}") from err
    boxes = None if not args.boxes else _boxes(args.boxes, size)
    count = None if (args.words or args.masks or args.boxes) else args.concepts
    with atomic_output_dir(args.out, overwrite=args.overwrite, flag="--out", command="concepts") as tmp:
        with tqdm(total=settings.iterations + 2, desc="zmagic concepts: load the model", unit="stage",
                  file=sys.stderr) as bar:
            try:
                sd = load_stable_diffusion(args.sd)
            except (OSError, ValueError) as err:
                raise FlagError(f"--sd: {err}") from err
            bar.update(1)
            bar.set_description("zmagic concepts: EM")

            def progress(iteration, masks, losses):
                bar.update(1)
                bar.set_description(f"zmagic concepts: iteration {iteration}, loss {losses[-20:, 0].mean():.4f}")
            try:
                result = concepts.learn_concepts(sd, image, jax.random.key(args.seed), count=count, words=args.words,
                                                 masks=masks, boxes=boxes, settings=settings,
                                                 checkpoint=args.checkpoint, progress=progress)
            except ValueError as err:
                raise FlagError(str(err)) from err
            files = save_learned(Path(tmp), result, image=image)["files"]
            if args.prompts:
                bar.set_description("zmagic concepts: sample")
                try:
                    images = _sample(sd, result, args.prompts, args.seed, PROGRAMS)
                except ValueError as err:
                    raise FlagError(f"--prompts: {err}") from err
                save_image_grid(Path(tmp) / "samples.png", [(p[:40], [im]) for p, im in zip(args.prompts, images)])
                files.append("samples.png")
            bar.update(1)
            report = {"names": list(result.names), "settings": dataclasses.asdict(settings),
                      "final_loss": float(np.asarray(result.losses)[-20:, 0].mean()),
                      "mask_area": np.asarray(result.masks).mean((-2, -1)).tolist(), "files": files}
            (Path(tmp) / "report.json").write_text(json.dumps(report, indent=2, allow_nan=False))
    print(f"\nlearned {', '.join(result.names)} on {args.sd} ({settings.iterations} EM iterations x "
          f"{settings.steps_per_iteration} steps, phase 2 {settings.phase2} after {settings.phase1_steps}); final "
          f"loss {report['final_loss']:.4f}")
    print(f"wrote {args.out}/" + ", ".join(files) + ", report.json")
    return 0


def _run_embedded(args) -> int:
    from zmagic_jax._io import atomic_output_dir
    from zmagic_jax.ports import load_canvas_models, load_digit_models
    from zmagic_jax.tasks._concepts_demo import DEMO_SETTINGS, concepts_table, run_concepts_demo, save_concepts_demo

    base = dataclasses.replace(DEMO_SETTINGS, pairs=(tuple(args.pair),) if args.pair else DEMO_SETTINGS.pairs,
                               seed=args.seed)
    em = _settings(args, base.concept_settings())
    settings = dataclasses.replace(base, **{f: getattr(em, f) for f in (
        "iterations", "steps_per_iteration", "phase1_steps", "phase2", "mask_timesteps")})
    if args.checkpoint or args.bf16 or args.remat or args.no_reestimate or args.lora_rank:
        raise FlagError("--checkpoint / --bf16 / --remat / --no-reestimate / --lora-rank: only with --sd (the "
                        "embedded run reports the EM masks against the once-estimated baseline itself).")
    with atomic_output_dir(args.out, overwrite=args.overwrite, flag="--out", command="concepts") as tmp:
        with tqdm(total=2, desc="zmagic concepts: load the models", unit="stage", file=sys.stderr) as bar:
            digits, canvas = load_digit_models(), load_canvas_models()
            bar.update(1)
            bar.set_description("zmagic concepts: EM and samples")
            report = run_concepts_demo(canvas, digits, settings)
            save_concepts_demo(Path(tmp), report, settings)
            bar.update(1)
    pair = settings.pairs[0]
    print(f"\nConcept learning by EM on the embedded canvas text model: held-out {pair[0]} (left) and {pair[1]} "
          f"(right) on one canvas, from their 16 x 16 tiles ({settings.iterations} iterations x "
          f"{settings.steps_per_iteration} steps, phase 2 {settings.phase2} after {settings.phase1_steps}).")
    print(concepts_table(report))
    print(f"wrote {args.out}/scores.json, masks.png and samples.png")
    return 0


def run_concepts_command(args) -> int:
    _check_mode(args)
    return _run_sd(args) if args.sd else _run_embedded(args)
