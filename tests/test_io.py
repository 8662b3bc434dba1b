import os
import stat

import pytest

from zmagic_jax._io import atomic_output_dir, atomic_write_bytes


def test_atomic_write_replaces_whole_file_with_normal_mode(tmp_path):
    target = tmp_path / "sub" / "a.bin"
    atomic_write_bytes(target, b"one")
    atomic_write_bytes(target, b"two")
    assert target.read_bytes() == b"two"
    assert stat.S_IMODE(os.stat(target).st_mode) & 0o044  # readable by others, as a normal file
    assert [p.name for p in target.parent.iterdir()] == ["a.bin"]


def test_atomic_output_dir_swaps_in_and_cleans_up(tmp_path):
    out = tmp_path / "out"
    with atomic_output_dir(out) as staging:
        (staging / "x.txt").write_text("new")
        assert not out.exists()
    assert (out / "x.txt").read_text() == "new"
    assert stat.S_IMODE(os.stat(out).st_mode) & 0o055
    with pytest.raises(RuntimeError):
        with atomic_output_dir(out, overwrite=True) as staging:
            (staging / "x.txt").write_text("half")
            raise RuntimeError("fails midway")
    assert (out / "x.txt").read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]
