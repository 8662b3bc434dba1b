"""What concept learning costs: seconds and memory per training step of each trainable set, and
the dense CRF's cost per mask.

    python experiments/bench_concepts.py [--out experiments/results/bench_concepts.json] [--quick]
                                         [--steps 5] [--repeats 3]

Flags: ``--out`` the JSON report (written atomically); ``--quick`` a smoke run for checking the
script (the tiny SD's phase 1 only, 2 steps, one repeat, the CRF at 16 x 16: about 25 s, nearly
all of it one compile; the full run takes about 4.5 min on 2 CPU cores, 90 % of it compiling);
``--steps`` training steps per timed call and ``--repeats`` timed calls per program (defaults:
the mode's).

Sections of the JSON report:

* ``training``: per model, per trainable set, one compiled ``concepts._train_program`` (the
  jitted :func:`~zmagic_jax.concepts.train_steps` that ``learn_concepts`` runs), fed as
  ``learn_concepts`` feeds it: two concepts with box masks, union sampling of
  ``"a photo of {}"``, no prior images, ``concepts._opt_state`` of the phase. Trainable sets:
  ``phase1`` (tokens), ``phase2_full`` (tokens, UNet, text encoder), ``phase2_lora`` (tokens and
  rank-4 adapters of the UNet's attention projections); on the tiny SD also ``phase2_full`` with
  ``concept_model(..., dtype=jnp.bfloat16)`` and with ``remat=True``. Seconds per step = one call
  running ``--steps`` steps (the step count is traced, so one program serves every count) over
  ``--steps``, median of ``--repeats`` calls after a warm-up call, the programs of a model timed
  round robin; ``compile_seconds`` = lower + compile. ``memory``: the compiled program's
  ``memory_analysis()`` (``bench_schemes.memory_report``), ``step_bytes`` = argument + output +
  temp bytes (null where the backend has no analysis). Parameter counts (scalars) of each
  trainable group and of the optimiser state.
* ``crf``: :func:`~zmagic_jax.crf.refine_mask` jitted, CutLER's defaults (10 mean-field
  iterations), on one mask and on 3 masks of one image (``vmap`` over the masks, as the E-step
  calls it) at 16 x 16, 32 x 32 and 64 x 64: milliseconds per mask (median after a warm-up),
  compile seconds and memory.
* ``summary``: the numbers of both sections in one table.

Models (``bench_amdm._models``): ``tiny_sd``, the tiny random SD of ``tiny_models.py`` (16 x 16
x 3 image, 4 x 8 x 8 latents, cross attention at 8 x 8), and ``canvas``, the embedded canvas
text model (pixel space, 32 x 32 x 1 image, the 16 x 16 attention layers).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple, Optional

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from bench_amdm import _models  # noqa: E402
from bench_schemes import machine_info, memory_report, time_round_robin, write_report  # noqa: E402
from zmagic_jax import concepts as C  # noqa: E402
from zmagic_jax.crf import refine_mask  # noqa: E402
from zmagic_jax.models import encode_image  # noqa: E402

CONCEPTS = 2
LORA_RANK = 4
CRF_BATCH = 3


class Variant(NamedTuple):
    """One trainable set: the optimiser's phase, ``ConceptSettings.phase2`` building the set
    (``"tokens"`` for phase 1) and the model's compute dtype and remat."""
    phase: int
    phase2: str
    dtype: Any = None
    remat: bool = False


VARIANTS = {"phase1": Variant(1, "tokens"), "phase2_full": Variant(2, "full"), "phase2_lora": Variant(2, "lora"),
            "phase2_full_bf16": Variant(2, "full", dtype=jnp.bfloat16),
            "phase2_full_remat": Variant(2, "full", remat=True)}


class Setup(NamedTuple):
    """A model's image (H, W, C), the cross-attention resolution of ``concept_model`` and the
    trainable sets (names of VARIANTS) measured on it."""
    image_shape: tuple
    resolution: Optional[int]
    variants: tuple


SETUPS = {"tiny_sd": Setup((16, 16, 3), None, tuple(VARIANTS)),
          "canvas": Setup((32, 32, 1), 16, ("phase1", "phase2_full", "phase2_lora"))}


class Config(NamedTuple):
    steps: int
    repeats: int
    models: tuple
    variants: Optional[tuple]   # None: each model's own (SETUPS)
    crf_sizes: tuple
    crf_repeats: int


FULL = Config(steps=5, repeats=3, models=("tiny_sd", "canvas"), variants=None, crf_sizes=(16, 32, 64), crf_repeats=5)
QUICK = Config(steps=2, repeats=1, models=("tiny_sd",), variants=("phase1",), crf_sizes=(16,), crf_repeats=1)


def _scalars(tree) -> int:
    return int(sum(np.size(leaf) for leaf in jax.tree.leaves(tree)))


def _two_squares(shape) -> tuple:
    """An image in [-1, 1] with a bright square top-left and a dark one bottom-right, and the two
    squares' box masks ``(2, H, W)``."""
    h, w, c = shape
    image = np.full(shape, -0.2, np.float32)
    image[h // 16:h // 2 - h // 16, w // 16:w // 2 - w // 16] = 0.9
    image[h // 2 + h // 16:h - h // 16, w // 2 + w // 16:w - w // 16] = -0.9
    return image, C.box_masks([(0, 0, h // 2, w // 2), (h // 2, w // 2, h, w)], (h, w))


def concept_data(sd, image, masks, settings: C.ConceptSettings) -> tuple:
    """``(data, hyper, latent_hw)`` of one image and its masks, built as ``learn_concepts`` builds
    them (no prior images)."""
    names = C.placeholder_names(len(masks))
    latents = jnp.stack([encode_image(sd, image), encode_image(sd, image[:, ::-1])])
    latent_hw = tuple(latents.shape[2:])
    prompts, selections, sizes = C.union_prompts(names, settings.template, settings.joiner)
    data = C.ConceptData(latents, C.resize_nearest(masks, latent_hw),
                         jnp.asarray(C.tokenize_with_concepts(sd, prompts, names)), jnp.asarray(selections),
                         jnp.asarray([int(np.flatnonzero(sizes == k)[0]) for k in range(1, len(names) + 1)]),
                         jnp.asarray([int((sizes == k).sum()) for k in range(1, len(names) + 1)]),
                         jnp.asarray(C.concept_token_ids(sd, len(names))),
                         jnp.asarray(sd.schedule.alphas_cumprod, jnp.float32))
    hyper = C.Hyper(*(jnp.asarray(v, jnp.float32) for v in (settings.lambda_attention, settings.prior_weight,
                                                          settings.flip_p, settings.lora_alpha / settings.lora_rank)))
    return data, hyper, latent_hw


def _step_bytes(memory: dict) -> Optional[int]:
    parts = [memory.get(f) for f in ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes")]
    return None if None in parts else sum(parts)


def _compiled(program, args, static: dict) -> tuple:
    """``program`` lowered and compiled for ``args``: ``(executable, seconds, memory report)``."""
    start = time.perf_counter()
    executable = program.lower(*args, **static).compile()
    seconds = time.perf_counter() - start
    memory = memory_report(executable)
    return executable, seconds, dict(memory, step_bytes=_step_bytes(memory))


def bench_training(sd, setup: Setup, variants, steps: int, repeats: int) -> dict:
    """Compile seconds, memory and seconds per step of ``concepts._train_program`` for each
    trainable set of ``variants`` (names of VARIANTS), timed round robin."""
    image, masks = _two_squares(setup.image_shape)
    base = C.ConceptSettings(lora_rank=LORA_RANK, attention_resolution=setup.resolution)
    data, hyper, latent_hw = concept_data(sd, image, masks, base)
    key = jax.random.key(0)
    tokens = C.init_tokens(sd, count=len(masks), key=jax.random.fold_in(key, 0))
    losses = jnp.zeros((steps, 4), jnp.float32)
    report, calls = {}, {}
    for name in variants:
        variant = VARIANTS[name]
        settings = C.ConceptSettings(phase2=variant.phase2, lora_rank=LORA_RANK,
                                     attention_resolution=setup.resolution)
        model = C.concept_model(sd, latent_hw, resolution=setup.resolution, dtype=variant.dtype, remat=variant.remat)
        resolution = model.resolution
        trainable = C._phase2_trainable(sd, tokens, settings, key)
        opt_state = C._opt_state(trainable, settings, variant.phase)
        args = (trainable, opt_state, losses, C._frozen(sd, trainable), data, hyper, jax.random.fold_in(key, 1),
                jnp.int32(0), jnp.int32(steps))
        executable, seconds, memory = _compiled(C._train_program, args, {"model": model, "clip": settings.clip})
        print(f"  compiled {name} in {seconds:.1f} s", flush=True)
        calls[name] = (executable, args)
        report[name] = {"trainable": sorted(trainable), "dtype": "bfloat16" if variant.dtype else "float32",
                        "remat": variant.remat, "compile_seconds": round(seconds, 2), "memory": memory,
                        "scalars": {**{group: _scalars(value) for group, value in trainable.items()},
                                    "trainable": _scalars(trainable), "optimizer_state": _scalars(opt_state)}}
    for name, timing in time_round_robin(calls, repeats).items():
        report[name].update(timing, seconds_per_step=timing["seconds_median"] / steps)
    return {"image_shape": list(setup.image_shape), "latent_hw": list(latent_hw),
            "attention_resolution": list(resolution),
            "concepts": len(masks), "prompts": int(data.prompt_ids.shape[0]), "steps_per_call": steps,
            "frozen_scalars": {"unet": _scalars(sd.unet_params), "text": _scalars(sd.text_params)},
            "variants": report}


def bench_crf(sizes, repeats: int) -> dict:
    """Milliseconds per mask of ``refine_mask`` (CutLER's defaults) on one mask and on
    ``CRF_BATCH`` masks of one image, per image side in ``sizes``."""
    rng = np.random.default_rng(0)
    out = {}
    for size in sizes:
        image = jnp.asarray(rng.uniform(0, 255, (size, size, 3)), jnp.float32)
        masks = jnp.asarray(rng.uniform(size=(CRF_BATCH, size, size)) > 0.5, jnp.float32)
        programs = {"single": (jax.jit(refine_mask), (masks[0], image), 1),
                    f"batch_{CRF_BATCH}": (jax.jit(jax.vmap(refine_mask, in_axes=(0, None))), (masks, image),
                                           CRF_BATCH)}
        report, calls = {}, {}
        for name, (program, args, count) in programs.items():
            executable, seconds, memory = _compiled(program, args, {})
            calls[name] = (executable, args)
            report[name] = {"masks": count, "compile_seconds": round(seconds, 2), "memory": memory}
        for name, timing in time_round_robin(calls, repeats).items():
            report[name].update(timing, ms_per_mask=1000 * timing["seconds_median"] / report[name]["masks"])
        out[f"{size}x{size}"] = report
        print(f"  crf {size}x{size}: " + ", ".join(f"{n} {r['ms_per_mask']:.2f} ms/mask" for n, r in report.items()),
              flush=True)
    return out


def _mb(value) -> Optional[float]:
    return None if value is None else round(value / 1e6, 2)


def summary(report: dict) -> dict:
    """The headline numbers: per model and trainable set, ms per step, step and temp MB, compile
    seconds; per CRF size, ms per mask alone and batched."""
    training = {model: {name: {"ms_per_step": round(1000 * row["seconds_per_step"], 2),
                               "step_mb": _mb(row["memory"]["step_bytes"]),
                               "temp_mb": _mb(row["memory"].get("temp_size_in_bytes")),
                               "compile_s": row["compile_seconds"], "trainable_scalars": row["scalars"]["trainable"],
                               "optimizer_scalars": row["scalars"]["optimizer_state"]}
                        for name, row in entry["variants"].items()}
                for model, entry in report["training"].items()}
    crf = {size: {name: {"ms_per_mask": round(row["ms_per_mask"], 3), "compile_s": row["compile_seconds"],
                         "step_mb": _mb(row["memory"]["step_bytes"])} for name, row in entry.items()}
           for size, entry in report["crf"].items()}
    return {"training": training, "crf": crf}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default=str(HERE / "results" / "bench_concepts.json"),
                        help="JSON report path (written atomically)")
    parser.add_argument("--quick", action="store_true", help="smoke run: tiny SD phase 1, CRF 16 x 16")
    parser.add_argument("--steps", type=int, help="training steps per timed call (default: the mode's)")
    parser.add_argument("--repeats", type=int, help="timed calls per training program (default: the mode's)")
    args = parser.parse_args(argv)
    config = QUICK if args.quick else FULL
    config = config._replace(**{k: v for k, v in (("steps", args.steps), ("repeats", args.repeats)) if v})
    start = time.perf_counter()
    report = {"machine": machine_info(), "mode": "quick" if args.quick else "full", "config": config._asdict(),
              "timing": "median of repeats after a warm-up call; a training call runs steps_per_call steps; "
                        "the programs of a model (or a CRF size) timed round robin",
              "memory": "memory_analysis() of each compiled program; step_bytes = argument + output + temp. "
                        "Arguments hold every parameter (frozen and trainable) and the optimiser state; "
                        "temp is the program's own working memory (what bf16 and remat change)."}
    report["training"] = {}
    with tempfile.TemporaryDirectory() as tmp:
        models = _models(Path(tmp))
        for name in config.models:
            sd, weights = models[name]
            print(f"{name} ({weights}) ...", flush=True)
            setup = SETUPS[name]
            variants = setup.variants if config.variants is None else config.variants
            report["training"][name] = {"weights": weights,
                                        **bench_training(sd, setup, variants, config.steps, config.repeats)}
    print("crf ...", flush=True)
    report["crf"] = bench_crf(config.crf_sizes, config.crf_repeats)
    report["summary"] = summary(report)
    print(json.dumps(report["summary"], indent=1), flush=True)
    write_report(Path(args.out), report, start)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
