"""Converters from published PyTorch checkpoints to Flax params (no PyTorch needed to read them),
and the loader of the embedded digits models.

Every network is described by a :class:`Port` (names, config, module, converter); :func:`load_port`
reads a PyTorch checkpoint or a converted ``.safetensors`` file and :func:`convert_file` writes one
(``zmagic convert``). See ``README.md`` in this folder for the rules every converter follows. The
file formats themselves are :mod:`zmagic_jax.checkpoint_io` (its functions are re-exported here).
"""
from zmagic_jax.checkpoint_io import load_params, params_metadata, read_torch_checkpoint, save_params
from zmagic_jax.ports._arcface import ARCFACE, convert_arcface, load_arcface
from zmagic_jax.ports._bisenet import BISENET, convert_bisenet, load_bisenet
from zmagic_jax.ports._checkpoint import (
    CheckpointMismatchError,
    Port,
    StateDict,
    batchnorm_affine,
    convert_file,
    is_converted_file,
    load_port,
    state_dict_of,
)
from zmagic_jax.ports._canvas import CANVAS_ASSETS, CanvasModels, load_canvas_models
from zmagic_jax.ports._ddpm_unet import DDPM_UNET, convert_ddpm_unet, load_ddpm_unet
from zmagic_jax.ports._digits import AssetChecksumError, load_digit_models, verify_checksums
from zmagic_jax.ports._mobilefacenet import MOBILEFACENET, convert_mobilefacenet, load_mobilefacenet
from zmagic_jax.ports._mtcnn import ONET, convert_onet, installed_onet_path, load_onet

PORTS = {port.name: port for port in (DDPM_UNET, ARCFACE, BISENET, MOBILEFACENET, ONET)}
