"""ArcFace IR-SE checkpoints (TreB1eN/InsightFace_Pytorch ``Backbone``, ``model_ir_se50.pth``) to Flax.

PyTorch key -> Flax parameter (``i`` is the unit index over all stages, as in ``body.{i}``):

* ``input_layer.{0,1,2}`` -> ``input_conv``, ``input_bn``, ``input_prelu``;
* ``body.{i}.shortcut_layer.{0,1}`` -> ``body_{i}/shortcut_conv``, ``shortcut_bn`` (width-changing
  units only; the others subsample with ``MaxPool2d(1, s)``, which has no tensors);
* ``body.{i}.res_layer.{0,1,2,3,4}`` -> ``res_bn1``, ``res_conv1``, ``res_prelu``, ``res_conv2``,
  ``res_bn2``; ``body.{i}.res_layer.5.fc{1,2}`` (1x1 convs) -> ``se/fc{1,2}`` (dense kernels);
* ``output_layer.{0,3,4}`` -> ``output_bn``, ``output_dense`` (input axis permuted from PyTorch's
  channel-major flatten to the NHWC flatten), ``embedding_bn``.

BatchNorms are folded into ``Affine`` (eps 1e-5); only ``num_batches_tracked`` buffers are skipped.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from zmagic_jax.models._arcface import ArcFace, ArcFaceConfig
from zmagic_jax.ports._checkpoint import (
    image_input,
    Port,
    StateDict,
    batchnorm_affine,
    check_param_shapes,
    conv_kernel,
    dense_kernel,
    load_port,
)

ARCHITECTURE = "ArcFace IR-SE (TreB1eN/InsightFace_Pytorch Backbone, mode='ir_se')"
PUBLISHED = ("the TreB1eN/InsightFace_Pytorch README ('IR-SE50 @ Onedrive / BaiduNetdisk', file model_ir_se50.pth; "
             "FreeDoM expects it as Face-GD/functions/arcface/model_ir_se50.pth)")


def _bn(sd: StateDict, prefix: str, config: ArcFaceConfig) -> dict:
    return batchnorm_affine(sd, prefix=prefix, eps=config.bn_eps)


def _conv(sd: StateDict, name: str) -> dict:
    weight = sd.take(f"{name}.weight")
    return {"kernel": conv_kernel(weight) if weight.ndim == 4 else weight}  # a missing tensor stays empty


def _pointwise(weight: np.ndarray) -> np.ndarray:
    """1x1 ``Conv2d`` weight (out, in, 1, 1) -> Dense kernel (in, out)."""
    return dense_kernel(weight.reshape(weight.shape[0], -1)) if weight.size else weight


def _unit(sd: StateDict, prefix: str, changes_width: bool, config: ArcFaceConfig) -> dict:
    res = f"{prefix}.res_layer"
    params = {
        "res_bn1": _bn(sd, f"{res}.0", config), "res_conv1": _conv(sd, f"{res}.1"),
        "res_prelu": {"alpha": sd.take(f"{res}.2.weight")}, "res_conv2": _conv(sd, f"{res}.3"),
        "res_bn2": _bn(sd, f"{res}.4", config),
        "se": {fc: {"kernel": _pointwise(sd.take(f"{res}.5.{fc}.weight"))} for fc in ("fc1", "fc2")},
    }
    if changes_width:
        params["shortcut_conv"] = _conv(sd, f"{prefix}.shortcut_layer.0")
        params["shortcut_bn"] = _bn(sd, f"{prefix}.shortcut_layer.1", config)
    return params


def _flatten_to_nhwc(weight: np.ndarray, config: ArcFaceConfig) -> np.ndarray:
    """``Linear`` weight (E, C*S*S) over PyTorch's NCHW flatten -> Dense kernel (S*S*C, E) over NHWC.
    A weight of another size is only transposed, for the shape check to report."""
    side, width = config.feature_size, config.widths[-1]
    if weight.ndim != 2 or weight.shape[1] != width * side * side:
        return dense_kernel(weight) if weight.ndim == 2 else weight
    out = weight.shape[0]
    return weight.reshape(out, width, side, side).transpose(2, 3, 1, 0).reshape(side * side * width, out)


def convert_arcface(state_dict: dict, config: ArcFaceConfig | None = None, *, path: str = "<memory>") -> dict:
    """Flax params of :class:`~zmagic_jax.models.ArcFace` from a PyTorch IR-SE ``Backbone`` state dict.

    Every tensor is used (mapping in the module docstring). Missing or left-over keys, or tensors whose
    shapes do not fit ``config``, raise ``CheckpointMismatchError`` listing all of them.
    """
    config = ArcFaceConfig() if config is None else config
    sd = StateDict(state_dict, architecture=f"{ARCHITECTURE} with {config}", path=path)
    params = {"input_conv": _conv(sd, "input_layer.0"), "input_bn": _bn(sd, "input_layer.1", config),
              "input_prelu": {"alpha": sd.take("input_layer.2.weight")}}
    index, width = 0, config.widths[0]
    for depth, units in zip(config.widths, config.units):
        for unit in range(units):
            params[f"body_{index}"] = _unit(sd, f"body.{index}", unit == 0 and width != depth, config)
            index, width = index + 1, depth
    params["output_bn"] = _bn(sd, "output_layer.0", config)
    params["output_dense"] = {"kernel": _flatten_to_nhwc(sd.take("output_layer.3.weight"), config),
                              "bias": sd.take("output_layer.3.bias")}
    params["embedding_bn"] = _bn(sd, "output_layer.4", config)
    sd.finish()
    params = jax.tree_util.tree_map(jnp.asarray, params)
    check_param_shapes(ARCFACE, ArcFace(config), params, config, path=path)
    return params


ARCFACE = Port(name="arcface", architecture=ARCHITECTURE, published=PUBLISHED, config_type=ArcFaceConfig,
               default_config=ArcFaceConfig(), module=ArcFace, convert=convert_arcface, example=image_input)


def load_arcface(path, config: ArcFaceConfig | None = None) -> tuple:
    """``(ArcFace(config), params)`` from ``model_ir_se50.pth`` (any PyTorch checkpoint of the IR-SE
    ``Backbone``'s state dict, read without PyTorch; ``config`` defaults to IR-SE50) or from a
    ``.safetensors`` file written by ``convert_file(ARCFACE, ...)`` (its stored config is used unless
    given)."""
    return load_port(ARCFACE, path, config)
