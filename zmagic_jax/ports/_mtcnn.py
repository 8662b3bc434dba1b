"""MTCNN ONet weights from facenet-pytorch (timesler/facenet-pytorch, MIT) to Flax params.

The published weights ship inside the facenet-pytorch wheel as ``facenet_pytorch/data/onet.pt``, a
legacy-format ``torch.save`` of ONet's state dict. facenet-pytorch pins ``torch<2.3`` and
``numpy<2``, so install it without its dependencies (``pip install --no-deps facenet-pytorch==2.6.0``);
only its data files are read here, never its code (importing it needs torchvision).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path


from zmagic_jax.models._mtcnn import ONet, ONetConfig
from zmagic_jax.ports._checkpoint import (Port, StateDict, check_param_shapes, conv_kernel, dense_kernel, image_input,
                                         load_port)

ARCHITECTURE = "MTCNN ONet (facenet-pytorch)"
PUBLISHED = ("the facenet-pytorch wheel (timesler/facenet-pytorch, MIT) as facenet_pytorch/data/onet.pt; "
             "install it with `pip install --no-deps facenet-pytorch==2.6.0`")


def convert_onet(state_dict: dict, config: ONetConfig | None = None, *, path: str = "<memory>") -> dict:
    """Flax params of :class:`ONet` from facenet-pytorch's ONet state dict.

    Every tensor is used: conv1..conv4 (OIHW -> HWIO), prelu1..prelu5, dense5 and the three heads
    dense6_1 (face logits), dense6_2 (box), dense6_3 (landmarks). Missing or left-over keys, or
    tensors whose shapes do not fit ``config``, raise
    :class:`~zmagic_jax.ports._checkpoint.CheckpointMismatchError` listing all of them.
    """
    config = ONetConfig() if config is None else config
    sd = StateDict(state_dict, architecture=ARCHITECTURE, path=path)
    params = {}
    for i in range(1, 5):
        params[f"conv{i}"] = {"kernel": conv_kernel(sd.take(f"conv{i}.weight")), "bias": sd.take(f"conv{i}.bias")}
    for i in range(1, 6):
        params[f"prelu{i}"] = {"alpha": sd.take(f"prelu{i}.weight")}
    for name in ("dense5", "dense6_1", "dense6_2", "dense6_3"):
        params[name] = {"kernel": dense_kernel(sd.take(f"{name}.weight")), "bias": sd.take(f"{name}.bias")}
    sd.finish()
    check_param_shapes(ONET, ONet(config), params, config, path=path)
    return params


ONET = Port(name="onet", architecture=ARCHITECTURE, published=PUBLISHED, config_type=ONetConfig,
            default_config=ONetConfig(), module=ONet,
            convert=lambda sd, config, path: convert_onet(sd, config, path=path), example=image_input)


def installed_onet_path() -> Path:
    """``onet.pt`` of the installed facenet-pytorch, found without importing the package."""
    spec = importlib.util.find_spec("facenet_pytorch")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "load_onet: facenet-pytorch is not installed, so its MTCNN ONet weights (data/onet.pt) cannot be "
            "found. Install it with `pip install --no-deps facenet-pytorch==2.6.0` (its own pins, torch<2.3 and "
            "numpy<2, are not needed to read the weights), or pass the path of an onet.pt.")
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "data" / "onet.pt"
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(
        f"load_onet: facenet-pytorch is installed at {list(spec.submodule_search_locations)} but has no "
        "data/onet.pt; reinstall it with `pip install --no-deps --force-reinstall facenet-pytorch==2.6.0` "
        "or pass the path of an onet.pt.")


def load_onet(path=None, config: ONetConfig | None = None) -> tuple:
    """``(ONet(config), params)`` from facenet-pytorch's ``onet.pt`` (any PyTorch checkpoint of
    ONet's state dict) or a ``.safetensors`` written by ``convert_file(ONET, ...)``.

    ``path=None`` reads the weights of the installed facenet-pytorch package.
    """
    return load_port(ONET, installed_onet_path() if path is None else path, config)
