"""Reading and writing parameter files, whatever network they hold.

* Flax params as ``.safetensors`` (:func:`save_params`, :func:`load_params`), with str -> str
  metadata in the header (:func:`params_metadata`: a converted file records its network and config);
* PyTorch checkpoints (``torch.save`` files, zip or legacy format) read without PyTorch
  (:func:`read_torch_checkpoint`), tensors as numpy arrays.

Which tensor becomes which Flax parameter is the converters' business (``zmagic_jax.ports``); this
module knows file formats only, so the models and the converters can both use it.
"""
from __future__ import annotations

import json
import os
import struct
from pathlib import Path
from typing import Optional

import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from safetensors.numpy import load as safetensors_load
from safetensors.numpy import save as safetensors_save

from zmagic_jax._io import atomic_write_bytes
from zmagic_jax._torch_pickle import load_torch_file

TORCH_SUFFIXES = (".pt", ".pth", ".ckpt", ".tar", ".bin")


def missing_file_error(path, *, architecture: str, published: str) -> FileNotFoundError:
    """The error for a checkpoint that is not there: the file, the network expected and where such
    weights are published (nothing is downloaded)."""
    return FileNotFoundError(
        f"checkpoint not found: {path}. Expected {architecture}; such weights are published at {published}. "
        "Download it there (nothing is downloaded by this library) and pass its local path.")


def is_torch_checkpoint(path) -> bool:
    """True for a PyTorch checkpoint suffix (``.pt``, ``.pth``, ``.ckpt``, ``.tar``, ``.bin``)."""
    return str(path).lower().endswith(TORCH_SUFFIXES)


def read_torch_checkpoint(path, *, architecture: str, published: str) -> object:
    """The object stored in a PyTorch checkpoint file, tensors as numpy arrays (no PyTorch needed).
    ``architecture`` and ``published`` name the expected network and its source in the errors."""
    path = Path(os.fspath(path)).expanduser()
    if not path.is_file():
        raise missing_file_error(path, architecture=architecture, published=published)
    try:
        return load_torch_file(path)
    except Exception as error:
        raise ValueError(f"could not read {path} as a PyTorch checkpoint of {architecture}: {error}") from error


def save_params(path, params, metadata: Optional[dict] = None) -> None:
    """Write a parameter pytree (nested dicts of arrays) to a safetensors file, atomically.

    ``metadata`` (str -> str), e.g. ``{"network": ..., "config": json}``, is stored in the
    file's header, so a converted file describes the network it holds (:func:`params_metadata`)."""
    flat = traverse_util.flatten_dict(params, sep="/")
    arrays = {k: np.ascontiguousarray(np.asarray(v)) for k, v in flat.items()}
    atomic_write_bytes(path, safetensors_save(arrays, metadata=metadata))


def load_params(path) -> dict:
    """Read a safetensors file written by :func:`save_params` back into nested dicts of jnp arrays."""
    path = Path(os.fspath(path)).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"params file not found: {path}")
    flat = safetensors_load(path.read_bytes())
    return traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in flat.items()}, sep="/")


def params_metadata(path) -> dict:
    """The str -> str metadata in a safetensors file's header (``{}`` when it has none)."""
    with open(os.fspath(path), "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    return dict(header.get("__metadata__", {}))
