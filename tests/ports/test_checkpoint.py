"""The torch-free checkpoint reader against ``torch.load``, in both file formats, and the shared
conversion helpers."""
import collections
import importlib.util

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")

from zmagic_jax.checkpoint_io import read_torch_checkpoint  # noqa: E402
from zmagic_jax.ports._checkpoint import (  # noqa: E402
    CheckpointMismatchError,
    StateDict,
    batchnorm_affine,
    conv_kernel,
    state_dict_of,
)
from zmagic_jax.ports._mtcnn import installed_onet_path  # noqa: E402

FORMATS = {"zip": True, "legacy": False}


def read(path):
    return read_torch_checkpoint(path, architecture="test net", published="nowhere")


def save(obj, tmp_path, fmt):
    path = tmp_path / f"ckpt_{fmt}.pt"
    torch.save(obj, path, _use_new_zipfile_serialization=FORMATS[fmt])
    return path


def assert_same(ours, ref, where="root"):
    """``ours`` (the reader's result) equals ``torch.load``'s, tensors as numpy arrays of the same dtype."""
    if isinstance(ref, torch.Tensor):
        assert isinstance(ours, np.ndarray), (where, type(ours))
        expected = ref.detach().numpy()
        assert ours.dtype == expected.dtype and ours.shape == expected.shape, (where, ours.dtype, ours.shape)
        np.testing.assert_array_equal(ours, expected, err_msg=where)
    elif isinstance(ref, dict):
        assert type(ours) is type(ref), (where, type(ours), type(ref))
        assert list(ours) == list(ref), where
        for k in ref:
            assert_same(ours[k], ref[k], f"{where}[{k!r}]")
    elif isinstance(ref, (list, tuple)):  # torch.Size comes back as a plain tuple
        assert isinstance(ours, type(ref) if not isinstance(ref, torch.Size) else tuple), (where, type(ours))
        assert len(ours) == len(ref), where
        for i, (a, b) in enumerate(zip(ours, ref)):
            assert_same(a, b, f"{where}[{i}]")
    elif isinstance(ref, np.ndarray):
        np.testing.assert_array_equal(ours, ref, err_msg=where)
        assert ours.dtype == ref.dtype
    else:
        assert type(ours) is type(ref) and ours == ref, (where, ours, ref)


def dtype_tensors():
    gen = torch.Generator().manual_seed(0)
    base = torch.randn(3, 4, generator=gen)
    return {
        "float32": base,
        "float16": base.half(),
        "bfloat16": base.bfloat16(),
        "float64": base.double(),
        "int64": torch.arange(-5, 7).reshape(3, 4),
        "int32": torch.arange(6, dtype=torch.int32),
        "int16": torch.tensor([-3, 300], dtype=torch.int16),
        "int8": torch.tensor([-128, 127], dtype=torch.int8),
        "uint8": torch.tensor([0, 255], dtype=torch.uint8),
        "bool": base > 0,
        "scalar": torch.tensor(2.5),
        "empty": torch.zeros(0, 3),
        "parameter": torch.nn.Parameter(base.clone()),
    }


@pytest.mark.parametrize("fmt", FORMATS)
def test_dtypes_match_torch_load(tmp_path, fmt):
    obj = dtype_tensors()
    path = save(obj, tmp_path, fmt)
    ours = read(path)
    ref = torch.load(path, weights_only=False)
    # bfloat16 has no numpy dtype in torch; compare it through float32.
    assert ours["bfloat16"].dtype.name == "bfloat16"
    np.testing.assert_array_equal(ours.pop("bfloat16").astype(np.float32), ref.pop("bfloat16").float().numpy())
    assert_same(ours, ref)


@pytest.mark.parametrize("fmt", FORMATS)
def test_views_sharing_a_storage(tmp_path, fmt):
    t = torch.arange(24, dtype=torch.float32).reshape(4, 6)
    obj = {"t": t, "tail": t[1:], "transposed": t.T, "column": t[:, 2], "strided": t[::2, 1::3],
           "expanded": torch.arange(3.0).expand(4, 3), "permuted": t.reshape(2, 3, 4).permute(2, 0, 1),
           "flat_view": t.view(-1)[5:17]}
    path = save(obj, tmp_path, fmt)
    ours = read(path)
    assert_same(ours, torch.load(path, weights_only=False))
    for array in ours.values():  # owned arrays: writing one never changes another
        assert array.flags.writeable and array.flags.owndata
    ours["t"][1, 0] = -1
    assert ours["tail"][0, 0] == 6


@pytest.mark.parametrize("fmt", FORMATS)
def test_nested_containers_and_plain_values(tmp_path, fmt):
    inner = collections.OrderedDict([("w", torch.ones(2, 2)), ("b", torch.zeros(2))])
    obj = {
        "state_dict": inner,
        "layers": [torch.arange(3), (torch.eye(2), "name", None), {"deep": [inner, 7]}],
        "epoch": 12, "lr": 0.125, "arch": "onet", "best": None, "flag": True, "big": 2 ** 40,
        "shape": torch.Size([3, 4]), "text": "é",
    }
    path = save(obj, tmp_path, fmt)
    assert_same(read(path), torch.load(path, weights_only=False))


@pytest.mark.parametrize("fmt", FORMATS)
def test_bytes_and_numpy_values(tmp_path, fmt):
    """torch.save pickles with protocol 2, which builds bytes (and so numpy arrays and scalars, e.g. a
    stored ``best_acc``) through ``_codecs.encode``."""
    obj = {"bytes": b"\x00\x01", "array": np.arange(4, dtype=np.float64), "best": np.float64(0.5),
           "step": np.int64(3)}
    path = save(obj, tmp_path, fmt)
    assert_same(read(path), torch.load(path, weights_only=False))


@pytest.mark.parametrize("fmt", FORMATS)
def test_module_state_dict(tmp_path, fmt):
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.Linear(2, 5))
    path = save(net.state_dict(), tmp_path, fmt)
    ours = read(path)
    assert_same(ours, torch.load(path))
    assert ours["1.num_batches_tracked"].dtype == np.int64


def test_real_onet_checkpoint():
    if importlib.util.find_spec("facenet_pytorch") is None:
        pytest.skip("facenet-pytorch is not installed (pip install --no-deps facenet-pytorch==2.6.0): "
                    "its data/onet.pt is a real legacy-format checkpoint")
    path = installed_onet_path()
    with open(path, "rb") as f:
        assert f.read(2) != b"PK"  # the legacy (non-zip) format
    ours = read(path)
    assert_same(ours, torch.load(path))
    assert len(ours) == 21 and ours["dense5.weight"].shape == (256, 1152)


def test_refuses_arbitrary_objects(tmp_path):
    path = tmp_path / "module.pt"
    torch.save(torch.nn.Linear(2, 2), path)  # a whole pickled module, not a state dict
    with pytest.raises(ValueError, match="test net.*torch.nn.modules.linear.Linear"):
        read(path)


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
    gen = torch.Generator().manual_seed(1)
    conv = torch.nn.Conv2d(4, 6, 3, groups=2, bias=False)
    bn = torch.nn.BatchNorm2d(6, eps=1e-3).eval()
    with torch.no_grad():
        for p in (*conv.parameters(), bn.weight, bn.bias, bn.running_mean):
            p.copy_(torch.randn(p.shape, generator=gen))
        bn.running_var.copy_(torch.rand(6, generator=gen) + 0.5)
    x = torch.randn(2, 4, 7, 7, generator=gen)
    with torch.no_grad():
        ref = bn(conv(x)).permute(0, 2, 3, 1).numpy()
    tensors = {**conv.state_dict(), **{f"bn.{k}": v for k, v in bn.state_dict().items()}}
    sd = StateDict({k: v.numpy() for k, v in tensors.items()}, architecture="conv-bn")
    kernel = conv_kernel(sd.take("weight"))
    affine = batchnorm_affine(sd, "bn", eps=1e-3)
    sd.finish()
    y = jax.lax.conv_general_dilated(x.permute(0, 2, 3, 1).numpy(), kernel, (1, 1), "VALID",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=2)
    ours = np.asarray(y) * affine["scale"] + affine["shift"]
    np.testing.assert_allclose(ours, ref, rtol=1e-5, atol=1e-5)
