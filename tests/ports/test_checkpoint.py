"""The torch-free checkpoint reader against ``torch.load``, in both file formats, and the shared
conversion helpers.

The files were written by ``torch.save`` (``experiments/make_parity_fixtures.py``, the objects of
its ``_reader_cases``); ``EXPECTED`` is what they hold, with numpy arrays for the tensors. Where
PyTorch is installed, ``torch.load`` of each file must read the same."""
import collections
import hashlib
import importlib.util

import jax
import ml_dtypes
import numpy as np
import pytest

from experiments.make_parity_fixtures import TORCH_SAVE_FORMATS
from ports.random_weights import random_state_dict
from tests.parity import CHECKPOINTS
from tests.references import have_torch, torch_reference
from zmagic_jax.checkpoint_io import read_torch_checkpoint
from zmagic_jax.ports._checkpoint import (
    CheckpointMismatchError,
    StateDict,
    batchnorm_affine,
    conv_kernel,
    state_dict_of,
)
from zmagic_jax.ports._mtcnn import installed_onet_path

GROUP = "ports_checkpoint"


def _expected() -> dict:
    base = np.random.default_rng(0).standard_normal((3, 4)).astype(np.float32)
    t = np.arange(24, dtype=np.float32).reshape(4, 6)
    inner = collections.OrderedDict([("w", np.ones((2, 2), np.float32)), ("b", np.zeros(2, np.float32))])
    state_dict = collections.OrderedDict([  # of Sequential(Conv2d(3, 4, 3), BatchNorm2d(4), Linear(2, 5))
        ("0.weight", (4, 3, 3, 3)), ("0.bias", (4,)), ("1.weight", (4,)), ("1.bias", (4,)),
        ("1.running_mean", (4,)), ("1.running_var", (4,)), ("1.num_batches_tracked", ()), ("2.weight", (5, 2)),
        ("2.bias", (5,))])
    weights = random_state_dict(state_dict, 0)
    return {
        "dtypes": {"float32": base, "float16": base.astype(np.float16), "bfloat16": base.astype(ml_dtypes.bfloat16),
                   "float64": base.astype(np.float64), "int64": np.arange(-5, 7).reshape(3, 4),
                   "int32": np.arange(6, dtype=np.int32), "int16": np.array([-3, 300], np.int16),
                   "int8": np.array([-128, 127], np.int8), "uint8": np.array([0, 255], np.uint8), "bool": base > 0,
                   "scalar": np.array(2.5, np.float32), "empty": np.zeros((0, 3), np.float32), "parameter": base},
        "views": {"t": t, "tail": t[1:], "transposed": t.T, "column": t[:, 2], "strided": t[::2, 1::3],
                  "expanded": np.broadcast_to(np.arange(3, dtype=np.float32), (4, 3)),
                  "permuted": t.reshape(2, 3, 4).transpose(2, 0, 1), "flat_view": t.reshape(-1)[5:17]},
        "containers": {"state_dict": inner,
                       "layers": [np.arange(3), (np.eye(2, dtype=np.float32), "name", None), {"deep": [inner, 7]}],
                       "epoch": 12, "lr": 0.125, "arch": "onet", "best": None, "flag": True, "big": 2 ** 40,
                       "shape": (3, 4), "text": "é"},
        "values": {"bytes": b"\x00\x01", "array": np.arange(4, dtype=np.float64), "best": np.float64(0.5),
                   "step": np.int64(3)},
        "state_dict": collections.OrderedDict((key, weights[key]) for key in state_dict),
    }


EXPECTED = _expected()


def read(path):
    return read_torch_checkpoint(path, architecture="test net", published="nowhere")


def torch_load_as_numpy(path):
    """``torch.load`` of ``path`` with every tensor as a numpy array (bfloat16 as ml_dtypes') and
    ``torch.Size`` as a tuple, the containers' types kept."""
    import torch

    def convert(obj):
        if isinstance(obj, torch.Tensor):
            obj = obj.detach()
            return obj.float().numpy().astype(ml_dtypes.bfloat16) if obj.dtype == torch.bfloat16 else obj.numpy()
        if isinstance(obj, torch.Size):
            return tuple(obj)
        if isinstance(obj, dict):
            return type(obj)((k, convert(v)) for k, v in obj.items())
        if isinstance(obj, (list, tuple)):
            return type(obj)(convert(v) for v in obj)
        return obj
    return convert(torch.load(path, weights_only=False))


def assert_same(ours, ref, where="root"):
    """``ours`` (the reader's result) equals ``ref``: the same containers, arrays of the same dtype
    and shape, the same plain values."""
    if isinstance(ref, np.ndarray):
        assert isinstance(ours, np.ndarray), (where, type(ours))
        assert ours.dtype == ref.dtype and ours.shape == ref.shape, (where, ours.dtype, ours.shape)
        np.testing.assert_array_equal(ours, ref, err_msg=where)
    elif isinstance(ref, dict):
        assert type(ours) is type(ref), (where, type(ours), type(ref))
        assert list(ours) == list(ref), where
        for k in ref:
            assert_same(ours[k], ref[k], f"{where}[{k!r}]")
    elif isinstance(ref, (list, tuple)):  # torch.Size comes back as a plain tuple
        assert type(ours) is type(ref), (where, type(ours))
        assert len(ours) == len(ref), where
        for i, (a, b) in enumerate(zip(ours, ref)):
            assert_same(a, b, f"{where}[{i}]")
    else:
        assert type(ours) is type(ref) and ours == ref, (where, ours, ref)


def check_file(name, fmt):
    """The reader's result for ``<name>_<fmt>.pt``, checked against ``EXPECTED`` and, where
    PyTorch is installed, against ``torch.load``."""
    path = CHECKPOINTS / f"{name}_{fmt}.pt"
    ours = read(path)
    assert_same(ours, EXPECTED[name])
    if have_torch():
        assert_same(ours, torch_load_as_numpy(path))
    return ours


@pytest.mark.parametrize("fmt", TORCH_SAVE_FORMATS)
def test_dtypes_match_torch_load(fmt):
    assert check_file("dtypes", fmt)["bfloat16"].dtype.name == "bfloat16"


@pytest.mark.parametrize("fmt", TORCH_SAVE_FORMATS)
def test_views_sharing_a_storage(fmt):
    ours = check_file("views", fmt)
    for array in ours.values():  # owned arrays: writing one never changes another
        assert array.flags.writeable and array.flags.owndata
    ours["t"][1, 0] = -1
    assert ours["tail"][0, 0] == 6


@pytest.mark.parametrize("fmt", TORCH_SAVE_FORMATS)
def test_nested_containers_and_plain_values(fmt):
    check_file("containers", fmt)


@pytest.mark.parametrize("fmt", TORCH_SAVE_FORMATS)
def test_bytes_and_numpy_values(fmt):
    """torch.save pickles with protocol 2, which builds bytes (and so numpy arrays and scalars, e.g. a
    stored ``best_acc``) through ``_codecs.encode``."""
    check_file("values", fmt)


@pytest.mark.parametrize("fmt", TORCH_SAVE_FORMATS)
def test_module_state_dict(fmt):
    assert check_file("state_dict", fmt)["1.num_batches_tracked"].dtype == np.int64


def _digests(state_dict) -> dict:
    """``{key: SHA-256 of the tensor's dtype, shape and bytes}`` (uint8 arrays): exact equality of a
    real checkpoint's weights, from a reference of a few KB."""
    def digest(array):
        described = f"{array.dtype.str}{array.shape}".encode() + np.ascontiguousarray(array).tobytes()
        return np.frombuffer(hashlib.sha256(described).digest(), np.uint8)
    return {key: digest(array) for key, array in state_dict.items()}


def test_real_onet_checkpoint():
    if importlib.util.find_spec("facenet_pytorch") is None:
        pytest.skip("facenet-pytorch is not installed (pip install --no-deps facenet-pytorch==2.6.0): "
                    "its data/onet.pt is a real legacy-format checkpoint")
    path = installed_onet_path()
    with open(path, "rb") as f:
        assert f.read(2) != b"PK"  # the legacy (non-zip) format
    ours = read(path)
    assert len(ours) == 21 and ours["dense5.weight"].shape == (256, 1152)
    if have_torch():
        assert_same(ours, torch_load_as_numpy(path))
    expected = torch_reference(GROUP, "onet_digests", lambda: _digests(torch_load_as_numpy(path)))
    assert sorted(ours) == sorted(expected)
    for key, digest in _digests(ours).items():
        np.testing.assert_array_equal(digest, expected[key], err_msg=key)


def test_refuses_arbitrary_objects():
    with pytest.raises(ValueError, match="test net.*torch.nn.modules.linear.Linear"):
        read(CHECKPOINTS / "whole_module.pt")  # a whole pickled module, not a state dict


def test_missing_and_foreign_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing.pt.*test net.*nowhere"):
        read(tmp_path / "missing.pt")
    (tmp_path / "junk.pt").write_bytes(b"not a checkpoint at all")
    with pytest.raises(ValueError, match="junk.pt"):
        read(tmp_path / "junk.pt")


def test_state_dict_of_unwraps_training_checkpoints():
    sd = {"module.conv.weight": np.ones(2, np.float32), "module.conv.bias": np.zeros(2, np.float32)}
    for obj in (sd, {"state_dict": sd, "epoch": 3}, [sd, {"other": 1}]):
        assert sorted(state_dict_of(obj, path="x.pt", architecture="a")) == ["conv.bias", "conv.weight"]
    with pytest.raises(ValueError, match="x.pt.*state dict of a.*epoch"):
        state_dict_of({"epoch": 3}, path="x.pt", architecture="a")


def test_state_dict_finish_lists_all_mismatches():
    sd = StateDict({"a": np.ones(1), "b": np.ones(1), "c": np.ones(1)}, architecture="net", path="p.pt")
    sd.take("a")
    sd.take("missing_1")
    sd.take("missing_2")
    with pytest.raises(CheckpointMismatchError) as info:
        sd.finish()
    for name in ("p.pt", "net", "missing_1", "missing_2", "b", "c"):
        assert name in str(info.value)


def test_conv_kernel_and_batchnorm_affine_match_torch():
    rng = np.random.default_rng(1)
    weight = rng.standard_normal((6, 2, 3, 3)).astype(np.float32)
    bn = {name: rng.standard_normal(6).astype(np.float32) for name in ("weight", "bias", "running_mean")}
    bn.update(running_var=rng.uniform(0.5, 1.5, 6).astype(np.float32), num_batches_tracked=np.array(0))
    x = rng.standard_normal((2, 7, 7, 4)).astype(np.float32)

    def torch_values():
        import torch
        conv = torch.nn.Conv2d(4, 6, 3, groups=2, bias=False)
        conv.load_state_dict({"weight": torch.from_numpy(weight)})
        norm = torch.nn.BatchNorm2d(6, eps=1e-3).eval()
        norm.load_state_dict({k: torch.from_numpy(v) for k, v in bn.items()})
        with torch.no_grad():
            return norm(conv(torch.from_numpy(x).permute(0, 3, 1, 2))).permute(0, 2, 3, 1).numpy()

    sd = StateDict({"weight": weight, **{f"bn.{k}": v for k, v in bn.items()}}, architecture="conv-bn")
    kernel = conv_kernel(sd.take("weight"))
    affine = batchnorm_affine(sd, "bn", eps=1e-3)
    sd.finish()
    y = jax.lax.conv_general_dilated(x, kernel, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     feature_group_count=2)
    ours = np.asarray(y) * affine["scale"] + affine["shift"]
    np.testing.assert_allclose(ours, torch_reference(GROUP, "conv_bn", torch_values), rtol=1e-5, atol=1e-5)
