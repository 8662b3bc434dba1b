"""PyTorch reference values for the parity tests, on both ends of the supported range.

A parity test asks ``torch_reference(group, name, compute)`` for what the PyTorch reference
produces (an array or a flat ``{str: array}`` dict, e.g. a random state dict and the outputs of
that model). Where PyTorch is installed (``make test-oldest``: Python 3.11, the local torch wheel)
``compute()`` runs live and its result is also checked against the committed copy, so a stale
fixture fails. Where it is not (``make test``: Python 3.12, newest jax, no torch wheel without
CUDA packages) the committed copy in ``tests/references/<group>.safetensors`` is used.

Regenerate the copies (after changing a test's inputs or its reference model) with
``python experiments/make_parity_fixtures.py``, which runs the parity tests in the oldest-stack
environment with ``ZMAGIC_WRITE_REFERENCES=1``: every value computed is then written (atomically,
one file per group, merged with the entries other tests of that group wrote).
"""
from __future__ import annotations

import atexit
import os
from pathlib import Path

import numpy as np
import pytest

REFERENCE_DIR = Path(__file__).parent / "references"
_WRITE = os.environ.get("ZMAGIC_WRITE_REFERENCES") == "1"
_pending: dict = {}
_loaded: dict = {}


def have_torch() -> bool:
    try:
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def _file(group: str) -> Path:
    return REFERENCE_DIR / f"{group}.safetensors"


def _stored(group: str) -> dict:
    if group not in _loaded:
        from zmagic_jax.checkpoint_io import read_safetensors
        file = _file(group)
        _loaded[group] = read_safetensors(file, "parity reference file")[0] if file.is_file() else {}
    return _loaded[group]


def _flatten(name: str, value) -> dict:
    if isinstance(value, dict):
        return {f"{name}/{k}": np.array(v) for k, v in value.items()}
    return {name: np.array(value)}


def _unflatten(name: str, entries: dict):
    if name in entries:
        return entries[name]
    prefix = f"{name}/"
    found = {k[len(prefix):]: v for k, v in entries.items() if k.startswith(prefix)}
    return found or None


def text_array(text: str) -> np.ndarray:
    """``text`` as a uint8 array of its UTF-8 bytes, so names, key lists and JSON can be references."""
    return np.frombuffer(text.encode(), np.uint8)


def array_text(array) -> str:
    """The text of a :func:`text_array` reference."""
    return bytes(np.asarray(array, np.uint8)).decode()


def torch_reference(group: str, name: str, compute, *, rtol: float = 1e-5):
    """The PyTorch reference ``name`` of ``group``: live with torch, else the committed copy."""
    if have_torch():
        value = compute()
        flat = _flatten(name, value)
        if _WRITE:
            _pending.setdefault(group, {}).update(flat)
        else:
            stored = _stored(group)
            for key, array in flat.items():
                if key not in stored:
                    pytest.fail(f"parity reference {group}:{key} is not committed; regenerate with "
                                "python experiments/make_parity_fixtures.py")
                scale = max(float(np.max(np.abs(array.astype(np.float64)))), 1e-30) if array.size else 1.0
                diff = float(np.max(np.abs(array.astype(np.float64) - stored[key].astype(np.float64)))) \
                    if array.size else 0.0
                assert stored[key].shape == array.shape and diff <= rtol * scale, (
                    f"committed reference {group}:{key} differs from the live PyTorch value "
                    f"(max abs {diff:.3g}); regenerate with python experiments/make_parity_fixtures.py")
        return value
    value = _unflatten(name, _stored(group))
    if value is None:
        pytest.fail(f"no PyTorch here and parity reference {group}:{name} is not committed in "
                    f"{_file(group)}; regenerate with python experiments/make_parity_fixtures.py")
    return value


@atexit.register
def _write_pending() -> None:
    if not _pending:
        return
    from zmagic_jax.checkpoint_io import read_safetensors, save_params
    REFERENCE_DIR.mkdir(exist_ok=True)
    for group, entries in _pending.items():
        file = _file(group)
        merged = read_safetensors(file)[0] if file.is_file() else {}
        merged.update(entries)
        # save_params nests on "/"; these are flat names, stored as written
        save_params(file, {k: v for k, v in sorted(merged.items())},
                    metadata={"producer": "tests/references.py (PyTorch parity references)"})
