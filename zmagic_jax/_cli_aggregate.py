"""``zmagic aggregate``: AMDM on Stable Diffusion folders (several models, or one model with several prompts)."""
from __future__ import annotations

import os
import sys

from tqdm import tqdm

from zmagic_jax._cli_face import FlagError

_FLAGS = (("prompts", "--prompt"), ("weights", "--weights"), ("steps", "--p"), ("window", "--window"),
          ("seeds", "--seeds"), ("num_steps", "--steps"), ("cfg_scale", "--cfg-scale"), ("eta", "--eta"),
          ("latent_size", "--latent-size"), ("rule", "--rule"), ("mu", "--mu"))


def add_aggregate(sub) -> None:
    from zmagic_jax.aggregation import MU_RULES, RULES
    from zmagic_jax.cli import HelpFormatter, add_nan_policy, add_overwrite

    p = sub.add_parser("aggregate", formatter_class=HelpFormatter,
                       help="AMDM: several Stable Diffusion models (or prompts) sampled together, latents aggregated",
                       description="Sample two or three Stable Diffusion models on one grid, each with its own "
                                   "prompt, and aggregate their latents (AMDM: spherical aggregation, then each "
                                   "model's state moved a fixed length toward its own posterior mean). Defaults are "
                                   "the released code's. Writes each model's image per seed, the merged latent's "
                                   "image, grid.png and metrics.json.")
    p.add_argument("--sd", required=True, nargs="+",
                   help="local diffusers folders: one per --prompt, or one for every prompt")
    p.add_argument("--prompt", required=True, action="append", help="a model's prompt (give it once per model)")
    p.add_argument("--negative-prompt", default="", help="CFG's unconditional prompt (default empty)")
    p.add_argument("--weights", type=float, nargs="+", default=None,
                   help="w of the K - 1 merges (default the release's: 0.5; three models 0.47 0.5)")
    p.add_argument("--p", type=float, nargs="+", default=None, metavar="P",
                   help="deviation step lengths, one per model (default the release's 55 45 / 45 40 35 rescaled "
                        "to the latent size)")
    p.add_argument("--window", type=int, nargs=2, default=[1, 3], metavar=("FIRST", "LAST"),
                   help="aggregate loop indices FIRST..LAST (index 0 never)")
    p.add_argument("--rule", default="released", choices=RULES,
                   help="released = w x1 + sqrt(1-w^2) x2 (the code); slerp = the paper's spherical "
                        "interpolation; mean = weighted mean")
    p.add_argument("--mu", default="released", choices=MU_RULES,
                   help="posterior mean: released (one-iteration index offset) or level (this step's)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="one image per model and seed")
    p.add_argument("--steps", type=int, default=50, help="DDIM steps")
    p.add_argument("--eta", type=float, default=0.0, help="DDIM eta (the release: 0)")
    p.add_argument("--cfg-scale", type=float, default=7.5, help="classifier-free guidance scale of every model")
    p.add_argument("--latent-size", type=int, nargs=2, default=None, metavar=("H", "W"),
                   help="latent size (image = 8x); default the UNet's sample_size")
    p.add_argument("--condition", nargs=2, action="append", default=[], metavar=("K", "IMAGE"),
                   help="model K's conditioning image (a UNet with more input than output channels, e.g. the "
                        "embedded canvas layout model): a PNG of the latent's size, pixel values / 255 as the "
                        "channels (grey for one channel)")
    p.add_argument("--condition-cfg", action="store_true",
                   help="the unconditional branch sees a blank (all-zero) conditioning image, so the CFG scale "
                        "also guides on it (for models trained with it dropped); default: both branches see it")
    p.add_argument("--out", default="out/aggregate",
                   help="output folder (new, empty, or a previous zmagic output with --overwrite)")
    add_overwrite(p)
    add_nan_policy(p)


def _settings(args):
    from zmagic_jax.tasks import AggregateSettings

    try:
        return AggregateSettings(
            prompts=tuple(args.prompt), negative_prompt=args.negative_prompt, seeds=tuple(args.seeds),
            num_steps=args.steps, cfg_scale=args.cfg_scale,
            weights=None if args.weights is None else tuple(args.weights),
            steps=None if args.p is None else tuple(args.p), window=tuple(args.window), rule=args.rule, mu=args.mu,
            eta=args.eta, latent_size=None if args.latent_size is None else tuple(args.latent_size),
            nan_policy=args.nan_policy)
    except ValueError as err:
        flag = next((flag for field, flag in _FLAGS if f" {field} " in f" {err} ".replace(":", " ")), None)
        raise FlagError(f"{flag}: {err}" if flag else str(err)) from err


def _conditions(args, models, settings) -> tuple:
    """Per model ``None`` or its conditioning channels ``(2, c, h, w)`` ([unconditional, conditional])
    from ``--condition K IMAGE``; every model that takes them must have one."""
    import numpy as np
    from zmagic_jax.tasks._outputs import load_image

    extras = [None] * len(models)
    for k, path in args.condition:
        if not k.isdigit() or not 1 <= int(k) <= len(models):
            raise FlagError(f"--condition: K must be a model number 1..{len(models)}; got {k!r}.")
        sd = models[int(k) - 1]
        c, shape = sd.extra_channels, settings.latent_size or (int(sd.sample_size),) * 2
        if c not in (1, 3):
            raise FlagError(f"--condition: model {k} takes {c} conditioning channels; an image gives 1 (grey) or 3.")
        try:
            image = (load_image(path, shape, what="--condition image") + 1.0) / 2.0
        except (OSError, ValueError) as err:
            raise FlagError(f"--condition: {err}") from err
        channels = image.mean(-1, keepdims=True) if c == 1 else image
        cond = np.transpose(channels, (2, 0, 1)).astype(np.float32)
        extras[int(k) - 1] = np.stack([np.zeros_like(cond) if args.condition_cfg else cond, cond])
    missing = [i + 1 for i, sd in enumerate(models) if sd.extra_channels and extras[i] is None]
    if missing:
        raise FlagError(f"--condition: model(s) {missing} take conditioning channels; give --condition K IMAGE "
                        "for each.")
    return tuple(extras)


def run_aggregate_command(args) -> int:
    from zmagic_jax._io import check_output_dir
    from zmagic_jax.tasks import load_aggregate_models, run_aggregate, save_aggregate

    settings = _settings(args)
    check_output_dir(args.out, overwrite=args.overwrite, flag="--out")
    if len(args.sd) not in (1, settings.num_models):
        raise FlagError(f"--sd: give one folder for all {settings.num_models} prompts or one per prompt; got "
                        f"{len(args.sd)}.")
    for path in args.sd:
        if not os.path.isdir(path):
            raise FlagError(f"--sd: {path!r} is not a folder; give a local diffusers Stable Diffusion folder.")
    names = list(args.sd) * settings.num_models if len(args.sd) == 1 else list(args.sd)
    with tqdm(total=3, desc="zmagic aggregate: load models", unit="stage", file=sys.stderr) as bar:
        try:
            models = load_aggregate_models(args.sd, settings.num_models)
        except (OSError, ValueError) as err:
            raise FlagError(f"--sd: {err}") from err
        extras = _conditions(args, models, settings)
        bar.update(1)
        bar.set_description(f"zmagic aggregate: sample {settings.num_models} models")
        result = run_aggregate(models, settings, extras=extras)
        bar.update(1)
        bar.set_description("zmagic aggregate: write")
        report = save_aggregate(args.out, result, names, overwrite=args.overwrite)
        bar.update(1)
    print(f"\nAMDM ({settings.rule} rule, mu {settings.mu}, w {', '.join(f'{w:g}' for w in result.weights)}, "
          f"p {', '.join(f'{p:.3g}' for p in result.steps)}, window {settings.window[0]}..{settings.window[1]}, "
          f"{settings.num_steps} DDIM steps eta {settings.eta:g}, CFG {settings.cfg_scale:g})")
    for i, prompt in enumerate(settings.prompts):
        print(f"  model {i + 1}: {names[i]}  {prompt!r}")
    print(f"compile {report['compile_s']:.1f} s, sample {report['run_s']:.1f} s")
    print(f"wrote {args.out}/metrics.json, grid.png and {len(report['images'])} images")
    return 0
