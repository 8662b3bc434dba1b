"""Reading one component folder of a diffusers / transformers checkpoint: its ``config.json`` and
its PyTorch weights, without PyTorch.

A component folder (``unet/``, ``vae/``, ``text_encoder/`` of a Stable Diffusion folder, or a CLIP
folder) holds ``config.json`` and the weights under one base name, in the first of these forms
that is present::

    <base>.safetensors            <base>.bin
    <base>.fp16.safetensors       <base>.fp16.bin                 (the "fp16" variant files)
    <base>.safetensors.index.json <base>.bin.index.json           (sharded: {"weight_map": ...})

diffusers names the base ``diffusion_pytorch_model``, transformers ``model`` (safetensors) and
``pytorch_model`` (``.bin``). safetensors files are read by the checked reader of
:mod:`zmagic_jax.checkpoint_io`, ``.bin`` files by its torch-free unpickler; tensors come back as
numpy arrays in their stored dtype (float16 / bfloat16 variants included).

Flax ``*.msgpack`` files (written by the Flax classes diffusers and transformers have removed) are
not read: every published repository that has them also has the PyTorch weights.
"""
from __future__ import annotations

import json
import os
from typing import NamedTuple

import numpy as np

from zmagic_jax.checkpoint_io import DamagedFileError, read_safetensors, read_torch_checkpoint


class Weights(NamedTuple):
    """A component's tensors by PyTorch name and the file(s) they came from (for messages)."""
    tensors: dict
    source: str


def read_config(folder: str, who: str, help_text: str) -> dict:
    """``folder/config.json`` as a dict; a missing or unparsable file is an error naming it."""
    file = os.path.join(folder, "config.json")
    if not os.path.isfile(file):
        raise FileNotFoundError(f"{who}: missing config file {file!r}. {help_text}")
    try:
        with open(file, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as error:
        raise ValueError(f"{who}: cannot parse {file!r} as JSON ({error}); get a good copy of "
                         f"the folder. {help_text}") from error
    if not isinstance(config, dict):
        raise ValueError(f"{who}: {file!r} must hold a JSON object; got {type(config).__name__}.")
    return config


def _candidates(bases: tuple) -> list:
    """File names to look for, in order of preference (see the module docstring)."""
    names = []
    for variant in ("", ".fp16"):
        for base in bases:
            for suffix in (".safetensors", ".bin"):
                names.append(f"{base}{variant}{suffix}")
    for base in bases:
        for suffix in (".safetensors", ".bin"):
            names.append(f"{base}{suffix}.index.json")
    return names


def _read_file(file: str, who: str, architecture: str, published: str) -> dict:
    if file.endswith(".safetensors"):
        tensors, _ = read_safetensors(file, f"{who} weight file")
        return tensors
    obj = read_torch_checkpoint(file, architecture=architecture, published=published)
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, np.ndarray) for v in obj.values()):
        raise DamagedFileError(f"{who}: {file!r} is not a state dict (name -> tensor) of "
                               f"{architecture}; get a good copy ({published}).")
    return obj


def _read_index(file: str, who: str, architecture: str, published: str) -> dict:
    folder = os.path.dirname(file)
    try:
        with open(file, encoding="utf-8") as f:
            weight_map = json.load(f)["weight_map"]
        shards = sorted(set(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
        raise DamagedFileError(f"{who}: cannot read the shard index {file!r} ({error}); get a "
                               f"good copy ({published}).") from error
    tensors = {}
    for shard in shards:
        path = os.path.join(folder, shard)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{who}: the shard index {file!r} names {shard!r}, which is "
                                    f"missing from {folder!r}; download every shard ({published}).")
        tensors.update(_read_file(path, who, architecture, published))
    return tensors


def read_weights(folder: str, bases: tuple, who: str, *, architecture: str, published: str,
                 help_text: str) -> Weights:
    """The PyTorch tensors of the component in ``folder`` (see the module docstring)."""
    for name in _candidates(bases):
        file = os.path.join(folder, name)
        if os.path.isfile(file):
            if name.endswith(".index.json"):
                return Weights(_read_index(file, who, architecture, published), file)
            return Weights(_read_file(file, who, architecture, published), file)
    flax_files = [n for n in sorted(os.listdir(folder)) if n.endswith(".msgpack")] \
        if os.path.isdir(folder) else []
    wanted = " or ".join(f"{b}.safetensors / {b}.bin" for b in bases)
    extra = (f" It has Flax weights ({', '.join(flax_files)}), written by the Flax classes that "
             "diffusers and transformers removed; they are not read here: download the PyTorch "
             "weights of the same repository." if flax_files else "")
    raise FileNotFoundError(f"{who}: no weight file in {folder!r}: expected {wanted} (or their "
                            f".fp16 variants, or a sharded .index.json).{extra} {help_text}")
