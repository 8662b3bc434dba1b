"""Damaged weight files: one checked reader names the file, what is wrong and how to get a good copy,
in every loader; random and truncated bytes never crash, hang or allocate from a bad length."""
import io
import resource
import struct
import time
import zipfile

import numpy as np
import pytest

from zmagic_jax import cli
from zmagic_jax._torch_pickle import load_torch_file
from zmagic_jax.checkpoint_io import (DamagedFileError, load_params, params_metadata, read_safetensors,
                                      read_torch_checkpoint, save_params)
from zmagic_jax.ports import installed_onet_path, load_ddpm_unet


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    path = tmp_path_factory.mktemp("good") / "params.safetensors"
    save_params(path, {"a": {"w": np.arange(12, dtype=np.float32).reshape(3, 4)}, "b": np.ones(5, np.int8)},
                metadata={"network": "test"})
    return path


def damaged_kinds(good, folder):
    data = good.read_bytes()
    rng = np.random.default_rng(0)
    kinds = {"empty": b"", "four bytes": b"\x01\x02\x03\x04", "random": rng.bytes(4096),
             "huge header length": struct.pack("<Q", 2 ** 63) + data[8:],
             "truncated": data[:len(data) - 7], "header only": data[:8 + struct.unpack("<Q", data[:8])[0]]}
    paths = {}
    for name, content in kinds.items():
        paths[name] = folder / f"{name.replace(' ', '_')}.safetensors"
        paths[name].write_bytes(content)
    return paths


def test_the_checked_reader_round_trips_and_reads_metadata(good):
    tensors, metadata = read_safetensors(good)
    assert metadata == {"network": "test"} and params_metadata(good) == metadata
    np.testing.assert_array_equal(tensors["a/w"], np.arange(12, dtype=np.float32).reshape(3, 4))
    assert tensors["b"].dtype == np.int8
    assert float(load_params(good)["a"]["w"][2, 3]) == 11.0


def test_each_damaged_kind_is_a_clear_error_in_every_loader(good, tmp_path, capsys):
    for kind, path in damaged_kinds(good, tmp_path).items():
        for load in (read_safetensors, load_params, params_metadata, load_ddpm_unet):
            with pytest.raises(DamagedFileError) as err:
                load(path)
            message = str(err.value)
            assert str(path) in message and "good copy" in message, (kind, load.__name__, message)
    path = tmp_path / "truncated.safetensors"
    for argv in (["face", "--unet", str(path), "--arcface", str(path), "--landmarks", str(path)],
                 ["convert", "ddpm_unet", str(tmp_path / "random.pt"), str(tmp_path / "new.safetensors")]):
        (tmp_path / "random.pt").write_bytes(np.random.default_rng(1).bytes(1000))
        with pytest.raises(SystemExit) as exit_info:
            cli.main(argv + ["--out", str(tmp_path / "out")] if argv[0] == "face" else argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert "good copy" in err and ("truncated.safetensors" in err or "random.pt" in err), err
    assert not (tmp_path / "out").exists() and not (tmp_path / "new.safetensors").exists()


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def test_fuzzed_safetensors_fail_cleanly_in_bounded_time_and_memory(good, tmp_path):
    data = good.read_bytes()
    rng = np.random.default_rng(2)
    path = tmp_path / "fuzz.safetensors"
    start, peak = time.perf_counter(), _peak_mb()
    outcomes = {"error": 0, "read": 0}
    for trial in range(400):
        if trial % 3 == 0:
            content = rng.bytes(int(rng.integers(0, 512)))
        elif trial % 3 == 1:
            content = data[:int(rng.integers(0, len(data)))]
        else:  # a few random bytes changed anywhere, the header length included
            content = bytearray(data)
            for pos in rng.integers(0, len(data), int(rng.integers(1, 4))):
                content[pos] = int(rng.integers(0, 256))
            content = bytes(content)
        path.write_bytes(content)
        try:
            read_safetensors(path)
            outcomes["read"] += 1  # a change inside tensor bytes is still a valid file
        except DamagedFileError:
            outcomes["error"] += 1
    assert outcomes["error"] > 250
    assert time.perf_counter() - start < 10.0 and _peak_mb() - peak < 50


def test_fuzzed_torch_checkpoints_fail_cleanly_in_bounded_time_and_memory(tmp_path):
    legacy = installed_onet_path().read_bytes()  # ONet ships in the legacy torch.save format
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:  # the zip layout torch.save uses, a tiny tensor-free one
        archive.writestr("archive/data.pkl", b"\x80\x02}q\x00.")
    rng = np.random.default_rng(3)
    path = tmp_path / "fuzz.pt"
    start, peak = time.perf_counter(), _peak_mb()
    errors = 0
    for trial in range(120):
        source = legacy if trial % 2 else buffer.getvalue()
        kind = trial % 3
        if kind == 0:
            content = source[:int(rng.integers(0, len(source)))]
        elif kind == 1:
            content = bytearray(source)
            for pos in rng.integers(0, min(len(source), 4096), 3):  # the object graph, where lengths live
                content[pos] = int(rng.integers(0, 256))
            content = bytes(content)
        else:
            content = rng.bytes(int(rng.integers(0, 2048)))
        path.write_bytes(content)
        try:
            read_torch_checkpoint(path, architecture="ONet", published="facenet-pytorch")
        except DamagedFileError as err:
            assert str(path) in str(err) and "good copy" in str(err)
            errors += 1
    assert errors > 80
    assert time.perf_counter() - start < 60.0 and _peak_mb() - peak < 200
    assert load_torch_file(installed_onet_path())  # the intact file still reads
