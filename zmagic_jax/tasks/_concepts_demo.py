"""Concept learning by EM on the embedded canvas text model, where the true masks are known.

Each composite is one 32 x 32 canvas holding two held-out digits (writers the model never saw),
the first at rows 8..23, columns 0..15, the second at columns 16..31, on the blank background.
Three concepts are learned from it (:func:`~zmagic_jax.concepts.learn_concepts`): the left digit,
the right digit and the background, starting from rough masks: each digit's 16 x 16 tile (its
box) and the whole canvas for the background. The true masks are the digits' ink (pixels > 0) and
the rest.

* **Mask IoU per EM iteration** against the true masks, next to the once-estimated baseline
  (the initial masks kept through training: Break-A-Scene with the user's boxes; the paper's
  Fig. 3 compares the same two).
* **Generations from each learned digit token alone** ("a photo of <c_i>"), sampled with the
  trained model (adapters merged) and scored by the canvas evaluator, which the training never
  saw: the share of canvases in which it finds the token's digit.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

from zmagic_jax import concepts
from zmagic_jax.models import latent_denoiser
from zmagic_jax.samplers import ddim, step_contexts
from zmagic_jax.schemes import none
from zmagic_jax.tasks._canvas_demo import _evaluate, place
from zmagic_jax.tasks._outputs import save_image_grid
from zmagic_jax.tasks._recipe import PROGRAMS, Programs, format_table, model_grid, sample_batch, skips

POSITIONS = ((8, 0), (8, 16))
# CutLER's constants are tuned on 480-pixel images (its bilateral sxy of 50 spans a whole 32 x 32
# canvas): the canvas's masks are refined with the same kernels at this scale.
# The values below were chosen on the 3-and-7 composite (experiments/concepts_canvas.py sweeps
# them; the IoUs move by about 0.05 over gaussian_sxy 1-1.5, compat 1-3, bilateral_sxy 3-5).
CANVAS_CRF = (("gaussian_sxy", 1.5), ("gaussian_compat", 1.0), ("bilateral_sxy", 3.0), ("bilateral_srgb", 20.0),
              ("bilateral_compat", 10.0))


@dataclasses.dataclass(frozen=True)
class ConceptsDemoSettings:
    """The composites (``pairs`` of digit classes; the first held-out digit of each class), the
    EM schedule (:class:`~zmagic_jax.concepts.ConceptSettings`' fields of the same names), and the
    generations (``samples`` per token, DDIM ``num_steps``, CFG ``cfg``)."""

    pairs: tuple = ((3, 7), (5, 2))
    iterations: int = 4
    steps_per_iteration: int = 100
    phase1_steps: int = 200
    phase2: str = "lora"
    lr_tokens: float = 5e-3
    lambda_attention: float = 0.1
    mask_timesteps: int = 50
    mask_max_timestep: int = 100
    samples: int = 16
    num_steps: int = 25
    cfg: float = 3.0
    seed: int = 0

    def __post_init__(self):
        if not self.pairs or not all(len(p) == 2 and all(isinstance(d, int) and 0 <= d <= 9 for d in p)
                                     for p in self.pairs):
            raise ValueError(f"concepts demo: pairs must be (a, b) digit classes 0..9; got {self.pairs!r}.")
        if isinstance(self.samples, bool) or not isinstance(self.samples, int) or self.samples < 2:
            raise ValueError(f"concepts demo: samples must be an integer >= 2; got {self.samples!r}.")

    def concept_settings(self) -> concepts.ConceptSettings:
        """The EM settings: union-sampled training at these rates, then E-steps reading each digit's
        map from the prompt naming it alone, inside its previous mask (``mask_prior`` 1), refined
        by the CRF at the canvas's scale."""
        return concepts.ConceptSettings(
            iterations=self.iterations, steps_per_iteration=self.steps_per_iteration, phase1_steps=self.phase1_steps,
            phase2=self.phase2, lr_tokens=self.lr_tokens, lambda_attention=self.lambda_attention,
            attention_resolution=16, mask_timesteps=self.mask_timesteps, mask_max_timestep=self.mask_max_timestep,
            assignment="threshold", mask_prompts="each", mask_prior=1.0, crf_options=CANVAS_CRF)


# The demo's section: one composite, tokens only (phase 2 "tokens" reuses phase 1's program);
# experiments/concepts_canvas.py runs every pair with LoRA in phase 2.
DEMO_SETTINGS = ConceptsDemoSettings(pairs=((3, 7),), iterations=3, steps_per_iteration=100, phase1_steps=300,
                                     phase2="tokens", samples=16)
# The full run's settings (experiments/concepts_canvas.py): phase 2 trains low-rank adapters.
FULL_SETTINGS = ConceptsDemoSettings()


def composite(digits, pair) -> tuple:
    """The canvas ``(32, 32, 1)`` of the first held-out digits of the classes ``pair``, the true
    masks ``(3, 32, 32)`` (left ink, right ink, the rest) and the rough initial masks (the two
    tiles, the whole canvas)."""
    held, labels = np.asarray(digits.heldout_images), np.asarray(digits.heldout_labels)
    tiles = [held[int(np.flatnonzero(labels == d)[0])] for d in pair]
    placed = [place(tile, position)[0] for tile, position in zip(tiles, POSITIONS)]
    image = np.maximum(*placed)
    ink = np.stack([p > 0 for p in placed]).astype(np.float32)
    true = np.concatenate([ink, 1.0 - ink.max(0, keepdims=True)])
    boxes = concepts.box_masks([(r, c, r + 16, c + 16) for r, c in POSITIONS], image.shape)
    return image[..., None], true, np.concatenate([boxes, np.ones_like(boxes[:1])])


def _generate(canvas, result, settings: ConceptsDemoSettings, programs: Programs) -> tuple:
    """``samples`` canvases from each digit token alone, and the evaluator's probabilities."""
    sd = result.model(canvas.text)
    grid = model_grid(sd.schedule, settings.num_steps, "concepts demo")
    contexts = step_contexts(sd.schedule, grid)
    shape = (settings.samples, sd.latent_channels, int(sd.sample_size), int(sd.sample_size))
    base = jax.random.PRNGKey(settings.seed)
    images, probs = [], []
    for i in range(2):
        embeds = result.context(canvas.text, [settings_prompt(result.names[i]), ""])
        den = latent_denoiser(sd, embeds[0], embeds[1], jnp.float32(settings.cfg))
        keys = jax.random.split(jax.random.fold_in(base, 2 * i), settings.samples)
        x_T = jax.random.normal(jax.random.fold_in(base, 2 * i + 1), shape)
        scheme = none()
        out, _, _ = programs.call(sample_batch, (keys, x_T, contexts, den, scheme, ddim(0.0)), skips(scheme, contexts))
        x0 = np.clip(np.asarray(out[0] if isinstance(out, tuple) else out), -1.0, 1.0)[:, 0]
        (p, _), _, _ = programs.call(_evaluate, (canvas.evaluator.params, jnp.asarray(x0[..., None])),
                                     {"module": canvas.evaluator.module})
        images.append(x0)
        probs.append(np.asarray(p))
    return images, probs


def settings_prompt(name: str) -> str:
    return f"a photo of {name}"


def run_concepts_demo(canvas, digits, settings: ConceptsDemoSettings = ConceptsDemoSettings(), *,
                      programs: Optional[Programs] = None, progress: Optional[Callable[[str], None]] = None,
                      compiler_options: Optional[dict] = None) -> dict:
    """Learn the concepts of every composite, score the masks per iteration and the generations.
    Returns ``{"pairs": [{"pair", "iou" (iterations + 1, 3), "baseline" (3,), "found" (2,),
    "images", "masks", "image", "true", "generated"}], "timing"}``."""
    import time
    programs = PROGRAMS if programs is None else programs
    em = settings.concept_settings()
    out, timing = [], {}
    for index, pair in enumerate(settings.pairs):
        image, true, initial = composite(digits, pair)
        start = time.perf_counter()
        result = concepts.learn_concepts(canvas.text, image, jax.random.key(settings.seed + index), masks=initial,
                                         settings=em, compiler_options=compiler_options)
        learn_s = time.perf_counter() - start
        start = time.perf_counter()
        generated, probs = _generate(canvas, result, settings, programs)
        found = [float((p[:, digit] >= 0.5).mean()) for p, digit in zip(probs, pair)]
        timing[f"{pair[0]}{pair[1]}"] = {"learn_s": round(learn_s, 2), "generate_s": round(time.perf_counter() - start, 2)}
        out.append({"pair": list(pair), "iou": concepts.mask_iou(result.masks, true[None]).tolist(),
                    "baseline": concepts.mask_iou(initial, true).tolist(), "found": found,
                    "losses": result.losses.tolist(), "masks": result.masks, "image": image[..., 0], "true": true,
                    "generated": generated})
        if progress is not None:
            progress(f"concepts: {pair[0]} and {pair[1]}")
    return {"pairs": out, "timing": timing}


def concepts_table(report: dict) -> str:
    """Mask IoU of the two digits (mean) per iteration, the baseline's, and the generations."""
    first = report["pairs"][0]
    iterations = len(first["iou"])
    rows = [("digits", "baseline") + tuple(f"EM {k}" for k in range(iterations)) + ("gen left", "gen right")]
    for entry in report["pairs"]:
        iou = np.asarray(entry["iou"])
        rows.append((f"{entry['pair'][0]} and {entry['pair'][1]}", f"{np.mean(entry['baseline'][:2]):.2f}")
                    + tuple(f"{np.mean(iou[k, :2]):.2f}" for k in range(iterations))
                    + tuple(f"{f:.2f}" for f in entry["found"]))
    return format_table(rows, notes=["mask IoU of the digits' ink (mean of the two); EM k = after k E-steps (EM 0 "
                                     "= the initial boxes); gen = share of canvases from the token alone in which "
                                     "the evaluator finds its digit"])


def _label_image(masks) -> np.ndarray:
    """Masks (3, H, W) as one [-1, 1] RGB image: left digit red, right digit green, background dark."""
    colours = np.array([[1.0, -0.6, -0.6], [-0.6, 1.0, -0.6], [-0.8, -0.8, -0.5]])
    return np.clip(np.einsum("khw,kc->hwc", np.asarray(masks, np.float64), colours), -1, 1)


def save_concepts_demo(out: Path, report: dict, settings: ConceptsDemoSettings) -> dict:
    """Write ``masks.png`` (per composite: the canvas, the true masks, the masks after each EM
    iteration), ``samples.png`` (generations per token) and ``scores.json`` into ``out``."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows, samples = [], []
    for entry in report["pairs"]:
        label = f"{entry['pair'][0]} and {entry['pair'][1]}"
        rows.append((label, [entry["image"][..., None], _label_image(entry["true"])]
                     + [_label_image(m) for m in entry["masks"]]))
        for name, images in zip(entry["pair"], entry["generated"]):
            samples.append((f"token of {name}", [im[..., None] for im in images[:8]]))
    iterations = len(report["pairs"][0]["masks"])
    save_image_grid(out / "masks.png", rows, column_titles=["canvas", "true"] + ["boxes"]
                    + [f"EM {k}" for k in range(1, iterations)],
                    title="Concept learning by EM: masks of the left digit (red), the right digit (green) and the "
                          "background", cell=1.1)
    save_image_grid(out / "samples.png", samples, title="Generated from each learned token alone "
                                                         "(\"a photo of <c_i>\")", cell=0.8)
    data = {"settings": dataclasses.asdict(settings),
            "pairs": [{k: entry[k] for k in ("pair", "iou", "baseline", "found")} for entry in report["pairs"]],
            "timing": report["timing"]}
    (out / "scores.json").write_text(json.dumps(data, indent=2, allow_nan=False))
    return data


def save_learned(out: Path, result, *, image=None) -> dict:
    """Write what :func:`~zmagic_jax.concepts.learn_concepts` learned into ``out`` (a staging
    folder): ``tokens.safetensors`` (the ``(N, d)`` table; its metadata names the placeholders),
    ``adapters.safetensors`` / ``unet.safetensors`` / ``text_encoder.safetensors`` (what phase 2
    trained, Flax layout), ``masks/iter<k>_<i>.png`` (every iteration's masks, white inside),
    ``curve.png`` (the per-step losses) and, given, ``image.png``. Returns the file names."""
    from zmagic_jax import figures
    from zmagic_jax.checkpoint_io import save_params
    from zmagic_jax.tasks._outputs import save_png

    out = Path(out)
    (out / "masks").mkdir(parents=True, exist_ok=True)
    written = ["tokens.safetensors"]
    save_params(out / "tokens.safetensors", {"tokens": np.asarray(result.tokens)},
                metadata={"names": json.dumps(list(result.names)),
                          "settings": json.dumps(dataclasses.asdict(result.settings))})
    for name, file in (("lora", "adapters.safetensors"), ("unet", "unet.safetensors"),
                       ("text", "text_encoder.safetensors")):
        if name in result.trained:
            save_params(out / file, jax.tree.map(np.asarray, result.trained[name]),
                        metadata={"lora_scale": str(result.settings.lora_alpha / result.settings.lora_rank)}
                        if name == "lora" else None)
            written.append(file)
    for k, masks in enumerate(result.masks):
        for i, mask in enumerate(masks):
            save_png(out / "masks" / f"iter{k}_{i}.png", np.asarray(mask)[..., None] * 2.0 - 1.0)
    plt = figures.plt
    fig, ax = plt.subplots(figsize=(6, 3.2))
    steps = np.arange(1, len(result.losses) + 1)
    for column, label in ((1, "masked diffusion"), (2, "attention (before its weight)"), (3, "prior")):
        values = np.asarray(result.losses)[:, column]
        if np.any(values):
            window = min(25, len(values))
            ax.plot(steps[window - 1:], np.convolve(values, np.ones(window) / window, "valid"), label=label)
    for it in range(1, result.settings.iterations):
        ax.axvline(it * result.settings.steps_per_iteration, color="0.8", lw=0.8)
    ax.set_xlabel("training step (grey: E-steps)")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / "curve.png", dpi=120)
    plt.close(fig)
    written += ["masks/", "curve.png"]
    if image is not None:
        save_png(out / "image.png", image)
        written.append("image.png")
    return {"files": written}
