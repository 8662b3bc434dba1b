"""What every converter shares: finding the state dict, consuming every tensor, checking shapes.
(Files are read and written by :mod:`zmagic_jax.checkpoint_io`.)

A converter walks the Flax parameter tree it builds and ``take``s each PyTorch tensor by name from a
:class:`StateDict`; ``finish`` then fails if any name it asked for was missing or any tensor of the
checkpoint was never used, listing all of them. So a checkpoint of the wrong architecture is an
error that names the mismatched keys, never a silent partial load.
"""
from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from zmagic_jax._io import check_output_file
from zmagic_jax._state_dict import (  # noqa: F401  (re-exported for the ports)
    CheckpointMismatchError,
    StateDict,
    conv_kernel,
    dense_kernel,
    params_from_torch,
    torch_from_params,
    torch_key,
)
from zmagic_jax.checkpoint_io import (
    TORCH_SUFFIXES,
    is_torch_checkpoint,
    load_params,
    missing_file_error,
    params_metadata,
    read_torch_checkpoint,
    save_params,
)


def is_converted_file(path) -> bool:
    """Whether ``path`` is a ``.safetensors`` file written by :func:`convert_file` (its header
    names a ported network); unreadable or foreign files are not."""
    try:
        metadata = params_metadata(path)
    except (OSError, ValueError):
        return False
    return metadata.get("network") in _port_names()


def _port_names() -> set:
    from zmagic_jax.ports import PORTS
    return set(PORTS)


def is_state_dict(obj) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(
        isinstance(k, str) and isinstance(v, np.ndarray) for k, v in obj.items())


def strip_prefix(state_dict: dict, prefix: str = "module.") -> dict:
    """Drop ``prefix`` (``DataParallel``'s ``module.``) when every key carries it."""
    if state_dict and all(k.startswith(prefix) for k in state_dict):
        return {k[len(prefix):]: v for k, v in state_dict.items()}
    return dict(state_dict)


def state_dict_of(obj, *, path, architecture: str) -> dict:
    """The parameter dict inside a loaded checkpoint.

    Accepts a plain state dict, ``{"state_dict": sd, ...}`` (training checkpoints) and a list or tuple
    whose first item is a state dict; a leading ``module.`` is stripped. Anything else is an error
    naming what was found.
    """
    if isinstance(obj, dict) and "state_dict" in obj and is_state_dict(obj["state_dict"]):
        obj = obj["state_dict"]
    elif isinstance(obj, (list, tuple)) and obj and is_state_dict(obj[0]):
        obj = obj[0]
    if not is_state_dict(obj):
        found = type(obj).__name__
        if isinstance(obj, dict):
            found += f" with keys {sorted(map(str, obj))[:8]}"
        elif isinstance(obj, (list, tuple)):
            found += f" of {len(obj)} items ({', '.join(type(o).__name__ for o in obj[:6])})"
        raise ValueError(f"{path}: expected a state dict of {architecture} (name -> tensor), found a {found}")
    return strip_prefix(obj)


def batchnorm_affine(sd: StateDict, prefix: str, eps: float, affine: bool = True) -> dict:
    """Eval-mode BatchNorm as a per-channel affine map: ``scale = w / sqrt(var + eps)``,
    ``shift = b - mean * scale`` (float64 arithmetic, stored as float32)."""
    mean = sd.take(f"{prefix}.running_mean", np.float64)
    var = sd.take(f"{prefix}.running_var", np.float64)
    sd.skip(f"{prefix}.num_batches_tracked")
    if affine:
        weight = sd.take(f"{prefix}.weight", np.float64)
        bias = sd.take(f"{prefix}.bias", np.float64)
    else:
        weight, bias = np.ones_like(mean), np.zeros_like(mean)
    if mean.size == 0 or var.size == 0 or weight.size == 0 or bias.size == 0:
        return {"scale": np.zeros((0,), np.float32), "shift": np.zeros((0,), np.float32)}
    scale = weight / np.sqrt(var + eps)
    return {"scale": scale.astype(np.float32), "shift": (bias - mean * scale).astype(np.float32)}


@dataclasses.dataclass(frozen=True)
class Port:
    """How one published network is read: its names, config type and default, Flax module,
    converter and an example input for shape checks.

    ``convert(state_dict, config, path=...) -> params``; ``pick(obj, path=..., **options) ->
    state_dict`` finds the parameter dict in the loaded checkpoint object (default
    :func:`state_dict_of`); ``example(config) -> tuple`` of ``jax.ShapeDtypeStruct`` inputs of
    ``module.init``.
    """

    name: str
    architecture: str
    published: str
    config_type: type
    default_config: Any
    module: Callable
    convert: Callable
    example: Callable
    pick: Optional[Callable] = None


def image_input(config) -> tuple:
    """``Port.example`` of a network on one square RGB image of ``config.input_size``."""
    return (jax.ShapeDtypeStruct((1, config.input_size, config.input_size, 3), jnp.float32),)


def config_to_json(config) -> str:
    return json.dumps(dataclasses.asdict(config), sort_keys=True)


def config_from_json(config_type: type, text: str):
    def tuples(value):
        return tuple(tuples(v) for v in value) if isinstance(value, list) else value
    fields = {f.name for f in dataclasses.fields(config_type)}
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError(f"config of {config_type.__name__} must be a JSON object of its fields; got {text!r}")
    unknown = sorted(set(data) - fields)
    if unknown:
        raise ValueError(f"config of {config_type.__name__} has unknown fields {unknown}")
    return config_type(**{k: tuples(v) for k, v in data.items()})


def check_param_shapes(port: Port, module, params, config, *, path) -> None:
    """Raise :class:`CheckpointMismatchError` unless ``params`` has exactly the names and shapes
    ``module`` needs (names alone do not pin the widths)."""
    expected = jax.eval_shape(module.init, jax.random.key(0), *port.example(config))["params"]
    expected = traverse_util.flatten_dict(expected, sep="/")
    found = traverse_util.flatten_dict(params, sep="/")
    problems = [f"missing {k} {tuple(v.shape)}" for k, v in expected.items() if k not in found]
    problems += [f"unexpected {k}" for k in found if k not in expected]
    problems += [f"{k}: shape {tuple(np.shape(found[k]))}, expected {tuple(v.shape)}"
                 for k, v in expected.items() if k in found and tuple(np.shape(found[k])) != tuple(v.shape)]
    if problems:
        raise CheckpointMismatchError(
            f"{path} does not match {port.architecture} with {config} ({len(problems)} problems, Flax names): "
            + "; ".join(problems[:40]) + (" ..." if len(problems) > 40 else "")
            + ". Check that the checkpoint and the config are the same network.")


def load_port(port: Port, path, config=None, **pick_options) -> tuple:
    """``(module, params)`` of ``port`` from a local file.

    ``path``: a PyTorch checkpoint (``.pt``/``.pth``/``.ckpt``/``.tar``/``.bin``, read without
    PyTorch and converted with ``config``, default the published architecture) or a ``.safetensors``
    file written by :func:`convert_file` (its stored config is used unless ``config`` is given).
    """
    path = Path(os.fspath(path)).expanduser()
    if config is not None and not isinstance(config, port.config_type):
        raise ValueError(f"load {port.name}: config must be a {port.config_type.__name__}; got {config!r}.")
    if is_torch_checkpoint(path):
        obj = read_torch_checkpoint(path, architecture=port.architecture, published=port.published)
        pick = port.pick or (lambda o, path, **_: state_dict_of(o, path=path, architecture=port.architecture))
        config = port.default_config if config is None else config
        params = port.convert(pick(obj, path=path, **pick_options), config, path=str(path))
    elif path.suffix.lower() == ".safetensors":
        if not path.is_file():
            raise missing_file_error(path, architecture=port.architecture, published=port.published)
        what = f"{port.name} weights file"
        metadata = params_metadata(path, what)
        if metadata.get("network", port.name) != port.name:
            raise CheckpointMismatchError(f"{path} holds converted {metadata['network']} params, not {port.name}.")
        if config is None:
            config = (config_from_json(port.config_type, metadata["config"]) if "config" in metadata
                      else port.default_config)
        params = load_params(path, what)
    else:
        raise ValueError(f"load {port.name}: {path} is neither a PyTorch checkpoint ({', '.join(TORCH_SUFFIXES)}) "
                         "nor a .safetensors file of converted params.")
    module = port.module(config)
    check_param_shapes(port, module, params, config, path=path)
    return module, params


def convert_file(port: Port, source, destination, config=None, *, overwrite: bool = False, **pick_options) -> None:
    """Convert a PyTorch checkpoint of ``port`` into a ``.safetensors`` file that records the
    network name and its config (read back by :func:`load_port`), written atomically.

    ``destination`` must be new, or (``overwrite=True``) a file this tool converted earlier; it is
    checked before the conversion (:func:`~zmagic_jax._io.check_output_file`)."""
    if not str(destination).lower().endswith(".safetensors"):
        raise ValueError(f"convert {port.name}: the output must be a .safetensors file; got {destination}.")
    check_output_file(destination, overwrite=overwrite, flag="destination", ours=is_converted_file)
    module, params = load_port(port, source, config, **pick_options)
    save_params(destination, params, metadata={"network": port.name, "config": config_to_json(module.config),
                                               "producer": "zmagic_jax convert"})
