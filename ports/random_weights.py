"""Random weights of the reference networks, drawn with numpy so that every stack draws the same.

A parity test draws a state dict from the key names and shapes of a ``torch_<network>.py`` module,
converts it with the library (no PyTorch needed) and, where PyTorch is installed, loads the same
numbers into the reference. Each tensor is drawn by its role, read from its key (in sorted key
order, so the draw does not depend on the order of the keys):

* BatchNorm (a sibling ``running_var``): running mean ``0.1 N(0, 1)``, running variance and weight
  ``U(0.5, 1.5)``, bias ``0.1 N(0, 1)``, ``num_batches_tracked`` 0;
* convolution and linear weights (2-D and more): ``N(0, 1 / fan_in)``;
* other 1-D weights: of a GroupNorm (a sibling bias) ``1 + 0.2 N(0, 1)``, of a PReLU (no bias)
  slopes ``U(0, 0.5)``;
* other biases ``0.1 N(0, 1)``.

So an eval-mode comparison exercises every tensor at a realistic scale.
"""
from __future__ import annotations

import numpy as np


def state_dict_shapes(module) -> dict:
    """``{key: shape}`` of a PyTorch module's state dict."""
    return {key: tuple(tensor.shape) for key, tensor in module.state_dict().items()}


def random_state_dict(shapes: dict, seed: int = 0) -> dict:
    """A random state dict (numpy arrays; float32, ``num_batches_tracked`` int64) of ``{key: shape}``."""
    rng = np.random.default_rng(seed)
    state_dict = {}
    for key in sorted(shapes):
        shape = tuple(int(s) for s in np.ravel(shapes[key]))
        prefix, _, leaf = key.rpartition(".")
        batchnorm = f"{prefix}.running_var" in shapes
        if leaf == "num_batches_tracked":
            state_dict[key] = np.zeros(shape, np.int64)
            continue
        if leaf == "running_var" or (batchnorm and leaf == "weight"):
            value = rng.uniform(0.5, 1.5, shape)
        elif leaf == "running_mean":
            value = 0.1 * rng.standard_normal(shape)
        elif len(shape) >= 2:
            value = rng.standard_normal(shape) / np.sqrt(np.prod(shape[1:]))
        elif leaf == "weight" and f"{prefix}.bias" in shapes:
            value = 1.0 + 0.2 * rng.standard_normal(shape)
        elif leaf == "weight":
            value = rng.uniform(0.0, 0.5, shape)
        else:
            value = 0.1 * rng.standard_normal(shape)
        state_dict[key] = value.astype(np.float32)
    return state_dict


def load_weights_(module, state_dict: dict):
    """Load a numpy state dict into ``module`` (strictly: every key, every shape). Returns ``module``
    in eval mode."""
    import torch
    module.load_state_dict({key: torch.from_numpy(np.array(value)) for key, value in state_dict.items()},
                           strict=True)
    return module.eval()


def randomize_(module, seed: int = 0):
    """``module`` with the weights :func:`random_state_dict` draws for its layout, in eval mode."""
    return load_weights_(module, random_state_dict(state_dict_shapes(module), seed))
