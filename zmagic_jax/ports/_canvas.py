"""Loading the embedded canvas-digits models from ``zmagic_jax/assets/canvas`` (or a folder written
by ``experiments/train_canvas_digits.py``), every file checked against its recorded SHA-256 first.

The models are pixel-space Stable Diffusion folders of the library's own architecture (a
``UNet2DConditionModel`` with self- and cross-attention, a CLIP text encoder, a CLIP BPE tokenizer,
a DDIM scheduler config; no ``vae/``), read by :func:`~zmagic_jax.models.load_stable_diffusion`
like a user's folder:

* ``text/``: conditioned on a prompt naming the digits left to right (``"a 3"``, ``"a 3 and a 7"``,
  ``"a photo of 3 and 7"``) on a 32 x 32 canvas in ``[-1, 1]`` (background -1);
* ``layout/`` (when present): conditioned on a layout channel (1 inside the digits' boxes, 0
  outside; ``extra`` of :func:`~zmagic_jax.models.latent_denoiser`), its prompt always ``""``.

``evaluator.safetensors`` is a classifier of which digits a canvas holds (10 sigmoid outputs,
:class:`~zmagic_jax.models._digits.DigitClassifier` at 32 x 32), trained separately.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import NamedTuple, Optional

from zmagic_jax.checkpoint_io import load_params
from zmagic_jax.models._digits import DigitClassifier, DigitClassifierConfig
from zmagic_jax.models._layers import Net
from zmagic_jax.models._stable_diffusion import StableDiffusion, load_stable_diffusion
from zmagic_jax.ports._digits import CONFIG_FILE, verify_checksums

CANVAS_ASSETS = Path(__file__).resolve().parent.parent / "assets" / "canvas"
CANVAS_HINT = ("Restore it with `git checkout -- zmagic_jax/assets/canvas` (or reinstall the package), or "
               "retrain every file with `python experiments/train_canvas_digits.py`.")


class CanvasModels(NamedTuple):
    """The embedded canvas models: ``text`` (and ``layout``, or ``None``) as
    :class:`~zmagic_jax.models.StableDiffusion`, the ``evaluator`` network and the training record."""

    text: StableDiffusion
    layout: Optional[StableDiffusion]
    evaluator: Net
    info: dict


def load_canvas_models(directory=None, *, verify: bool = True) -> CanvasModels:
    """Load the embedded canvas models (default: the package's ``assets/canvas``) or a folder written
    by ``experiments/train_canvas_digits.py``: ``config.json``, ``text/`` (and ``layout/``),
    ``evaluator.safetensors`` and ``checksums.json`` (SHA-256 of every other file, checked first
    unless ``verify=False``)."""
    if directory is None and not CANVAS_ASSETS.is_dir():
        raise FileNotFoundError(f"canvas assets: {CANVAS_ASSETS} does not exist: this release does not ship the "
                                "canvas models yet. Train them with `python experiments/train_canvas_digits.py` "
                                "(it writes that folder), or pass the folder it wrote.")
    directory = CANVAS_ASSETS if directory is None else Path(os.fspath(directory)).expanduser()
    if verify:
        verify_checksums(directory, what="canvas assets", hint=CANVAS_HINT)
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"canvas assets: {config_path} is missing. {CANVAS_HINT}")
    config = json.loads(config_path.read_text())
    models = {name: load_stable_diffusion(directory / name) for name in config["models"]}
    evaluator = Net(DigitClassifier(config=DigitClassifierConfig(**config["evaluator"])),
                    load_params(directory / "evaluator.safetensors"))
    return CanvasModels(models["text"], models.get("layout"), evaluator, config.get("training", {}))
