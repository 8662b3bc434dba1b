"""PyTorch state dicts -> Flax parameter trees: consuming every tensor by name, layouts, errors.

Low in the package (the models' own converters and the ports both use it). A converter ``take``s
each tensor by its PyTorch name from a :class:`StateDict`; ``finish`` then fails if any name it
asked for was missing or any tensor of the checkpoint was never used, listing all of them. So a
checkpoint of the wrong architecture is an error naming the mismatched keys, never a silent
partial load.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
from flax import traverse_util


class CheckpointMismatchError(ValueError):
    """A checkpoint's tensors do not match the architecture a converter expects."""


class StateDict:
    """Tensors of a checkpoint, consumed by name; ``finish`` checks that the mapping covered them all."""

    def __init__(self, state_dict: dict, *, architecture: str, path: str = "<memory>"):
        self._tensors = dict(state_dict)
        self._used: set = set()
        self._missing: list = []
        self.architecture = architecture
        self.path = str(path)

    def take(self, name: str, dtype=np.float32) -> np.ndarray:
        """The tensor ``name`` as ``dtype``; a missing name is recorded and reported by ``finish``."""
        if name not in self._tensors:
            self._missing.append(name)
            return np.zeros((0,), dtype)
        self._used.add(name)
        return np.asarray(self._tensors[name], dtype=dtype)

    def skip(self, name: str) -> None:
        """Consume a non-parameter buffer on purpose (e.g. ``num_batches_tracked``) if present."""
        if name in self._tensors:
            self._used.add(name)

    def has(self, name: str) -> bool:
        return name in self._tensors

    def keys(self) -> list:
        return sorted(self._tensors)

    def finish(self) -> None:
        unexpected = sorted(set(self._tensors) - self._used)
        if not self._missing and not unexpected:
            return
        lines = [f"{self.path} does not match {self.architecture}:"]
        if self._missing:
            lines.append(f"  missing from the checkpoint ({len(self._missing)}): " + ", ".join(self._missing[:40])
                         + (" ..." if len(self._missing) > 40 else ""))
        if unexpected:
            lines.append(f"  not used by the architecture ({len(unexpected)}): " + ", ".join(unexpected[:40])
                         + (" ..." if len(unexpected) > 40 else ""))
        lines.append("  Check that the checkpoint and the config (depth, widths, classes) are the same network.")
        raise CheckpointMismatchError("\n".join(lines))


def conv_kernel(weight: np.ndarray) -> np.ndarray:
    """PyTorch ``Conv2d`` weight (out, in/groups, kh, kw) -> Flax ``nn.Conv`` kernel (kh, kw, in/groups, out).
    A tensor of another rank (e.g. the empty stand-in of a missing key) passes unchanged, so
    ``StateDict.finish`` can report every problem at once."""
    return np.transpose(weight, (2, 3, 1, 0)) if weight.ndim == 4 else weight


def dense_kernel(weight: np.ndarray) -> np.ndarray:
    """PyTorch ``Linear`` weight (out, in) -> Flax ``nn.Dense`` kernel (in, out) (other ranks pass unchanged)."""
    return np.transpose(weight) if weight.ndim == 2 else weight


# --- Flax trees whose module names follow PyTorch's ----------------------------------------------
# The library's own Stable Diffusion and CLIP modules name every submodule as the PyTorch module
# path does (diffusers / transformers), with ``name_N`` for item N of a ModuleList or Sequential.
# The mapping to state-dict keys is then mechanical, both ways.

_LEAF_TO_TORCH = {"kernel": "weight", "scale": "weight", "embedding": "weight", "bias": "bias"}


def torch_key(flax_path: tuple, lists: frozenset) -> str:
    """The PyTorch state-dict key of the Flax parameter at ``flax_path``: a module ``name_N`` with
    ``name`` in ``lists`` is item ``N`` of the ModuleList/Sequential ``name``; the leaf
    ``kernel``/``scale``/``embedding`` is ``weight``. A leaf not in that table keeps its name
    (e.g. ``class_embedding``, a bare ``nn.Parameter``)."""
    parts = []
    for name in flax_path[:-1]:
        head, _, index = name.rpartition("_")
        parts.append(f"{head}.{index}" if head in lists and index.isdigit() else name)
    parts.append(_LEAF_TO_TORCH.get(flax_path[-1], flax_path[-1]))
    return ".".join(parts)


def _from_torch_layout(value: np.ndarray, leaf: str, shape: tuple) -> np.ndarray:
    """A PyTorch tensor in the layout of the Flax leaf of ``shape`` (convolutions OIHW -> HWIO,
    linear (out, in) -> (in, out); a 1x1 convolution stored for a linear layer or a linear
    weight for a 1x1 convolution is reshaped, as checkpoints of either kind exist). Anything
    that cannot fit is returned unchanged and reported by the shape check."""
    if leaf != "kernel":
        return value
    if len(shape) == 4 and value.ndim == 4:
        return conv_kernel(value)
    if len(shape) == 4 and value.ndim == 2 and shape[:2] == (1, 1):
        return dense_kernel(value)[None, None]
    if len(shape) == 2 and value.ndim == 4 and value.shape[2:] == (1, 1):
        return dense_kernel(value[:, :, 0, 0])
    if len(shape) == 2 and value.ndim == 2:
        return dense_kernel(value)
    return value


def params_from_torch(state_dict: dict, shapes: dict, key_of: Callable, *, architecture: str,
                      path: str = "<memory>", renames: Optional[dict] = None) -> dict:
    """Flax params (nested dicts of float32 numpy arrays) for the parameter ``shapes``
    (``{flax path tuple: shape}``), each taken from ``state_dict`` under ``key_of(flax path)``.

    ``renames`` maps older key spellings to the current ones (applied to the state dict first).
    Every tensor must be used and have the expected shape: otherwise
    :class:`CheckpointMismatchError` lists every missing, left-over and misshapen key."""
    if renames:
        state_dict = {renames.get(k, k): v for k, v in state_dict.items()}
    sd = StateDict(state_dict, architecture=architecture, path=path)
    flat, wrong = {}, []
    for flax_path, shape in shapes.items():
        key = key_of(flax_path)
        value = sd.take(key)
        if value.size == 0 and not sd.has(key):
            continue
        value = _from_torch_layout(value, flax_path[-1], tuple(shape))
        if tuple(value.shape) != tuple(shape):
            wrong.append(f"{key}: shape {tuple(value.shape)} in the file, the config expects "
                         f"{tuple(shape)} (Flax layout)")
        flat[flax_path] = value
    try:
        sd.finish()
    except CheckpointMismatchError as error:
        if wrong:
            raise CheckpointMismatchError(f"{error}\n  wrong shapes ({len(wrong)}): "
                                          + "; ".join(wrong[:20])) from None
        raise
    if wrong:
        raise CheckpointMismatchError(
            f"{path} does not match {architecture}: wrong shapes ({len(wrong)}): "
            + "; ".join(wrong[:20]) + ". Check that the checkpoint and its config.json agree.")
    return traverse_util.unflatten_dict(flat)


def torch_from_params(params, key_of: Callable) -> dict:
    """The inverse of :func:`params_from_torch`: a PyTorch-layout state dict (numpy) of Flax
    ``params`` (used to write random checkpoints in the real formats without PyTorch)."""
    out = {}
    for flax_path, value in traverse_util.flatten_dict(params).items():
        value = np.asarray(value)
        if flax_path[-1] == "kernel":
            value = np.transpose(value, (3, 2, 0, 1)) if value.ndim == 4 else np.transpose(value)
        # a C-order copy: np.array alone keeps a transposed layout, which safetensors' writers
        # dump in memory order; 0-d stays 0-d (ascontiguousarray makes it 1-d)
        out[key_of(flax_path)] = np.array(value, order="C")
    return out
