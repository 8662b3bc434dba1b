"""BiSeNet face parser: PyTorch ``79999_iter.pth`` (zllrunning/face-parsing.PyTorch) -> Flax params."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from zmagic_jax.models._bisenet import BiSeNet, BiSeNetConfig
from zmagic_jax.ports._checkpoint import Port, StateDict, batchnorm_affine, check_param_shapes, conv_kernel, load_port

ARCHITECTURE = "BiSeNet face parser (ResNet-18 context path, zllrunning/face-parsing.PyTorch)"
PUBLISHED = ("the zllrunning/face-parsing.PyTorch README (79999_iter.pth, Google Drive link), "
             "as used by FreeDoM Face-GD/functions/face_parsing")
_BN_EPS = 1e-5


def _conv(sd: StateDict, name: str) -> dict:
    weight = sd.take(f"{name}.weight")
    # A missing or malformed tensor is reported by ``finish`` / ``check_param_shapes``, not here.
    return {"kernel": conv_kernel(weight) if weight.ndim == 4 else weight}


def _bn(sd: StateDict, prefix: str) -> dict:
    return batchnorm_affine(sd, prefix=prefix, eps=_BN_EPS)


def _conv_bn_relu(sd: StateDict, prefix: str) -> dict:
    return {"conv": _conv(sd, f"{prefix}.conv"), "bn": _bn(sd, f"{prefix}.bn")}


def _resnet(sd: StateDict, prefix: str, config: BiSeNetConfig) -> dict:
    params = {"conv1": _conv(sd, f"{prefix}.conv1"), "bn1": _bn(sd, f"{prefix}.bn1")}
    cin = config.resnet_widths[0]
    for stage, (width, blocks) in enumerate(zip(config.resnet_widths, config.resnet_blocks)):
        for block in range(blocks):
            p = f"{prefix}.layer{stage + 1}.{block}"
            stride = 2 if stage > 0 and block == 0 else 1
            block_params = {"conv1": _conv(sd, f"{p}.conv1"), "bn1": _bn(sd, f"{p}.bn1"),
                            "conv2": _conv(sd, f"{p}.conv2"), "bn2": _bn(sd, f"{p}.bn2")}
            if cin != width or stride != 1:
                block_params["downsample_conv"] = _conv(sd, f"{p}.downsample.0")
                block_params["downsample_bn"] = _bn(sd, f"{p}.downsample.1")
            params[f"layer{stage + 1}_{block}"] = block_params
            cin = width
    return params


def _arm(sd: StateDict, prefix: str) -> dict:
    return {"conv": _conv_bn_relu(sd, f"{prefix}.conv"), "conv_atten": _conv(sd, f"{prefix}.conv_atten"),
            "bn_atten": _bn(sd, f"{prefix}.bn_atten")}


def _output(sd: StateDict, prefix: str) -> dict:
    return {"conv": _conv_bn_relu(sd, f"{prefix}.conv"), "conv_out": _conv(sd, f"{prefix}.conv_out")}


def convert_bisenet(state_dict: dict, config: BiSeNetConfig | None = None, *, path: str = "<memory>") -> dict:
    """Flax params of :class:`~zmagic_jax.models.BiSeNet` from a PyTorch BiSeNet state dict.

    Every tensor is used (aux heads ``conv_out16`` / ``conv_out32`` included; only
    ``num_batches_tracked`` buffers are skipped); BatchNorms are folded into ``Affine`` with
    eps 1e-5. A checkpoint of another shape raises :class:`CheckpointMismatchError` naming the keys.
    """
    config = BiSeNetConfig() if config is None else config
    sd = StateDict(state_dict, architecture=f"{ARCHITECTURE} with {config}", path=path)
    cp = {"resnet": _resnet(sd, "cp.resnet", config), "arm16": _arm(sd, "cp.arm16"), "arm32": _arm(sd, "cp.arm32"),
          "conv_head32": _conv_bn_relu(sd, "cp.conv_head32"), "conv_head16": _conv_bn_relu(sd, "cp.conv_head16"),
          "conv_avg": _conv_bn_relu(sd, "cp.conv_avg")}
    ffm = {"convblk": _conv_bn_relu(sd, "ffm.convblk"), "conv1": _conv(sd, "ffm.conv1"),
           "conv2": _conv(sd, "ffm.conv2")}
    params = {"cp": cp, "ffm": ffm, "conv_out": _output(sd, "conv_out"),
              "conv_out16": _output(sd, "conv_out16"), "conv_out32": _output(sd, "conv_out32")}
    sd.finish()
    params = jax.tree_util.tree_map(jnp.asarray, params)
    check_param_shapes(BISENET, BiSeNet(config), params, config, path=path)
    return params


def _example(config: BiSeNetConfig) -> tuple:
    return (jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32),)


BISENET = Port(name="bisenet", architecture=ARCHITECTURE, published=PUBLISHED, config_type=BiSeNetConfig,
               default_config=BiSeNetConfig(), module=BiSeNet, convert=convert_bisenet, example=_example)


def load_bisenet(path, config: BiSeNetConfig | None = None):
    """``(BiSeNet(config), params)`` from the published PyTorch checkpoint (``.pth`` etc., converted
    here without PyTorch; ``config`` defaults to the published network) or from a ``.safetensors``
    file written by ``convert_file(BISENET, ...)`` (its stored config is used unless given)."""
    return load_port(BISENET, path, config)
