"""MobileFaceNet landmark checkpoints (cunjian/pytorch_face_landmark, ``mobilefacenet_model_best.pth.tar``)
to Flax.

PyTorch key -> Flax parameter: ``conv1``, ``conv2_dw``, ``conv_23``, ``conv_34``, ``conv_45``,
``conv_6_sep`` keep their names; residual units ``conv_{3,4,5}.model.{i}`` -> ``conv_{3,4,5}_{i}``;
inside blocks ``conv``/``bn``/``prelu`` -> ``conv``/``bn`` (``Affine``)/``prelu``; the GDC head
``output_layer.conv_6_dw``, ``output_layer.linear``, ``output_layer.bn`` -> ``gdc_dw``,
``gdc_linear``, ``gdc_bn``. BatchNorms are folded into ``Affine`` (eps 1e-5); only
``num_batches_tracked`` buffers are skipped.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from zmagic_jax.models._mobilefacenet import MobileFaceNet, MobileFaceNetConfig
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

ARCHITECTURE = "MobileFaceNet 68-point landmark regressor (cunjian/pytorch_face_landmark, GDC head)"
PUBLISHED = ("the cunjian/pytorch_face_landmark repository as checkpoint/mobilefacenet_model_best.pth.tar "
             "(FreeDoM expects it as Face-GD/functions/landmark/checkpoint/mobilefacenet_model_best.pth.tar)")


def _conv_bn(sd: StateDict, prefix: str, config: MobileFaceNetConfig, prelu: bool = True) -> dict:
    weight = sd.take(f"{prefix}.conv.weight")
    params = {"conv": {"kernel": conv_kernel(weight) if weight.ndim == 4 else weight},  # missing: stays empty
              "bn": batchnorm_affine(sd, prefix=f"{prefix}.bn", eps=config.bn_eps)}
    if prelu:
        params["prelu"] = {"alpha": sd.take(f"{prefix}.prelu.weight")}
    return params


def _depth_wise(sd: StateDict, prefix: str, config: MobileFaceNetConfig) -> dict:
    return {"conv": _conv_bn(sd, f"{prefix}.conv", config), "conv_dw": _conv_bn(sd, f"{prefix}.conv_dw", config),
            "project": _conv_bn(sd, f"{prefix}.project", config, prelu=False)}


def convert_mobilefacenet(state_dict: dict, config: MobileFaceNetConfig | None = None, *,
                          path: str = "<memory>") -> dict:
    """Flax params of :class:`~zmagic_jax.models.MobileFaceNet` from the PyTorch state dict.

    Every tensor is used (mapping in the module docstring). Missing or left-over keys, or tensors whose
    shapes do not fit ``config``, raise ``CheckpointMismatchError`` listing all of them.
    """
    config = MobileFaceNetConfig() if config is None else config
    sd = StateDict(state_dict, architecture=f"{ARCHITECTURE} with {config}", path=path)
    params = {"conv1": _conv_bn(sd, "conv1", config), "conv2_dw": _conv_bn(sd, "conv2_dw", config)}
    for name in ("conv_23", "conv_34", "conv_45"):
        params[name] = _depth_wise(sd, name, config)
    for name, units in zip(("conv_3", "conv_4", "conv_5"), config.residual_units):
        for i in range(units):
            params[f"{name}_{i}"] = _depth_wise(sd, f"{name}.model.{i}", config)
    params["conv_6_sep"] = _conv_bn(sd, "conv_6_sep", config)
    params["gdc_dw"] = _conv_bn(sd, "output_layer.conv_6_dw", config, prelu=False)
    params["gdc_linear"] = {"kernel": dense_kernel(sd.take("output_layer.linear.weight"))}
    params["gdc_bn"] = batchnorm_affine(sd, prefix="output_layer.bn", eps=config.bn_eps)
    sd.finish()
    params = jax.tree_util.tree_map(jnp.asarray, params)
    check_param_shapes(MOBILEFACENET, MobileFaceNet(config), params, config, path=path)
    return params


MOBILEFACENET = Port(name="mobilefacenet", architecture=ARCHITECTURE, published=PUBLISHED,
                     config_type=MobileFaceNetConfig, default_config=MobileFaceNetConfig(), module=MobileFaceNet,
                     convert=convert_mobilefacenet, example=image_input)


def load_mobilefacenet(path, config: MobileFaceNetConfig | None = None) -> tuple:
    """``(MobileFaceNet(config), params)`` from ``mobilefacenet_model_best.pth.tar`` (a training checkpoint
    ``{'state_dict': ...}`` or a plain state dict, read without PyTorch; ``config`` defaults to the published
    network) or from a ``.safetensors`` file written by ``convert_file(MOBILEFACENET, ...)`` (its stored
    config is used unless given)."""
    return load_port(MOBILEFACENET, path, config)
