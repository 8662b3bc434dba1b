"""What the parity tests of the ports share besides ``tests/references.py``: random weights in the
layout of a PyTorch reference network, the checkpoints ``torch.save`` wrote, and compact references
of whole images. None of it needs PyTorch.

The weights are numpy draws (``ports/random_weights.py``) over the key names and shapes of the
reference module, themselves a committed reference; a test converts them with the library and,
inside its ``torch_reference`` compute, loads the same numbers into the PyTorch module."""
from __future__ import annotations

import importlib
import json
from pathlib import Path

import numpy as np

from experiments.make_parity_fixtures import PORT_FILE_CONFIGS, PORT_FILE_SEED, PORT_FILES_DIR
from ports.random_weights import random_state_dict, state_dict_shapes
from ports.verify import REFERENCES
from tests.references import array_text, text_array, torch_reference

# The files of experiments/make_parity_fixtures.py's write_port_fixtures.
CHECKPOINTS: Path = PORT_FILES_DIR


def reference_state_dict(group: str, name: str, build, seed: int) -> dict:
    """The numpy random state dict (``seed``) in the layout of the PyTorch module ``build()``, whose
    ``{key: shape}`` is the reference ``layout/<name>`` of ``group`` (stored as its JSON text, a
    third of the bytes of an entry per key)."""
    def layout():
        return text_array(json.dumps(state_dict_shapes(build()), sort_keys=True, separators=(",", ":")))
    return random_state_dict(json.loads(array_text(torch_reference(group, f"layout/{name}", layout))), seed)


def file_state_dict(group: str, network: str, seed: int = PORT_FILE_SEED) -> dict:
    """The weights of ``network``'s checkpoint in ``CHECKPOINTS`` (``seed``: another draw of that
    layout, e.g. the EMA weights of the DDPM training list); the layout is the reference
    ``layout/file`` of ``group``."""
    def build():
        return importlib.import_module(f"ports.{REFERENCES[network].torch_module}").from_config(
            PORT_FILE_CONFIGS[network])
    return reference_state_dict(group, "file", build, seed)


def _projection(n: int, k: int, axis: int) -> np.ndarray:
    if n <= k:
        return np.eye(n)
    columns = np.random.default_rng([n, axis]).standard_normal((n, k))
    return columns / np.abs(columns).sum(axis=0)


def sketch(images, k: int = 8) -> np.ndarray:
    """``images`` (..., H, W, C) projected along each of H, W and C onto ``k`` fixed random Gaussian
    directions of unit L1 norm (the identity along an axis of at most ``k``), in float64.

    A difference of at most ``atol`` in every pixel moves no entry by more than ``atol``, and a
    difference anywhere moves every entry (almost surely), so a parity check of whole images
    compares sketches: at most k x k x k numbers per image to commit instead of H x W x C."""
    x = np.asarray(images, np.float64)
    height, width, channels = x.shape[-3:]
    return np.einsum("...hwc,hi,wj,cl->...ijl", x, _projection(height, k, 0), _projection(width, k, 1),
                     _projection(channels, k, 2))
