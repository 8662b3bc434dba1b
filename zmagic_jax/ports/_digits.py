"""Loading the embedded digits models from ``zmagic_jax/assets/digits`` (or a folder written by
``experiments/train_digits.py``), every file checked against its recorded SHA-256 first.

The networks themselves are in :mod:`zmagic_jax.models._digits`. The UNet file is a converted DDPM
UNet like a user's and is read by :func:`~zmagic_jax.ports.load_ddpm_unet` (which checks its stored
config against the parameter shapes); the small networks by :func:`~zmagic_jax.checkpoint_io.load_params`.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from zmagic_jax.checkpoint_io import load_params
from zmagic_jax.models._digits import NETWORKS, DigitModels, build_networks
from zmagic_jax.models._layers import Net
from zmagic_jax.ports._ddpm_unet import load_ddpm_unet

DIGITS_ASSETS = Path(__file__).resolve().parent.parent / "assets" / "digits"
HELDOUT_FILE = "heldout.npz"
CONFIG_FILE = "config.json"
CHECKSUM_FILE = "checksums.json"
RESTORE_HINT = ("Restore it with `git checkout -- zmagic_jax/assets/digits` (or reinstall the package), or "
                "retrain every file with `python experiments/train_digits.py`.")


def sha256_of(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


class AssetChecksumError(ValueError):
    """An embedded asset file is missing or does not have the SHA-256 recorded in ``checksums.json``."""


def verify_checksums(directory, *, what: str = "digits assets", hint: str = RESTORE_HINT) -> None:
    """Check every file listed in ``directory/checksums.json`` (paths relative to ``directory``);
    raise :class:`AssetChecksumError` naming the file, the expected and actual SHA-256 and how to
    restore it (``what`` names the assets in the message, ``hint`` says how to restore them)."""
    directory = Path(os.fspath(directory))
    listing = directory / CHECKSUM_FILE
    if not listing.is_file():
        raise AssetChecksumError(f"{what}: {listing} is missing. {hint}")
    expected = json.loads(listing.read_text())
    for name, digest in sorted(expected.items()):
        path = directory / name
        if not path.is_file():
            raise AssetChecksumError(f"{what}: {path} is missing. {hint}")
        actual = sha256_of(path)
        if actual != digest:
            raise AssetChecksumError(
                f"{what}: {path} is damaged: its SHA-256 is {actual} but checksums.json expects "
                f"{digest}. {hint}")


def load_digit_models(directory=None, *, verify: bool = True) -> DigitModels:
    """Load the embedded digits models (default: the package's ``assets/digits``) or a folder written
    by ``experiments/train_digits.py``: ``config.json``, ``<network>.safetensors`` for each of
    ``unet, classifier, segmenter, features, evaluator``, ``heldout.npz`` and ``checksums.json``
    (SHA-256 of every other file, checked first unless ``verify=False``)."""
    directory = DIGITS_ASSETS if directory is None else Path(os.fspath(directory)).expanduser()
    if verify:
        verify_checksums(directory)
    config_path = directory / CONFIG_FILE
    if not config_path.is_file():
        raise FileNotFoundError(f"digits assets: {config_path} is missing. {RESTORE_HINT}")
    config = json.loads(config_path.read_text())
    modules = build_networks(config["networks"])
    nets = {name: Net(modules[name], load_params(directory / f"{name}.safetensors")) for name in NETWORKS
            if name != "unet"}
    # The UNet is a converted DDPM UNet file like a user's: the same loader reads it (and checks
    # its stored config against the parameter shapes).
    nets["unet"] = Net(*load_ddpm_unet(directory / "unet.safetensors"))
    with np.load(directory / HELDOUT_FILE) as heldout:
        images = heldout["images"].astype(np.float32) / 127.5 - 1.0
        labels = heldout["labels"].astype(np.int32)
    return DigitModels(**nets, heldout_images=images[..., None], heldout_labels=labels,
                       info=config.get("training", {}))
