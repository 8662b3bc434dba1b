"""Reading and writing parameter files, whatever network they hold.

* Flax params as ``.safetensors`` (:func:`save_params`, :func:`load_params`), with str -> str
  metadata in the header (:func:`params_metadata`: a converted file records its network and config);
* PyTorch checkpoints (``torch.save`` files, zip or legacy format) read without PyTorch
  (:func:`read_torch_checkpoint`), tensors as numpy arrays.

Which tensor becomes which Flax parameter is the converters' business (``zmagic_jax.ports``); this
module knows file formats only, so the models and the converters can both use it.
"""
from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path
from typing import Optional

import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import traverse_util
from safetensors.numpy import save as safetensors_save

from zmagic_jax._io import atomic_write_bytes
from zmagic_jax._torch_pickle import load_torch_file

TORCH_SUFFIXES = (".pt", ".pth", ".ckpt", ".tar", ".bin")


def missing_file_error(path, *, architecture: str, published: str) -> FileNotFoundError:
    """The error for a checkpoint that is not there: the file, the network expected and where such
    weights are published (nothing is downloaded)."""
    return FileNotFoundError(
        f"checkpoint not found: {path}. Expected {architecture}; such weights are published at {published}. "
        "Download it there (nothing is downloaded by this library) and pass its local path.")


def is_torch_checkpoint(path) -> bool:
    """True for a PyTorch checkpoint suffix (``.pt``, ``.pth``, ``.ckpt``, ``.tar``, ``.bin``)."""
    return str(path).lower().endswith(TORCH_SUFFIXES)


def read_torch_checkpoint(path, *, architecture: str, published: str) -> object:
    """The object stored in a PyTorch checkpoint file, tensors as numpy arrays (no PyTorch needed).
    ``architecture`` and ``published`` name the expected network and its source in the errors."""
    path = Path(os.fspath(path)).expanduser()
    if not path.is_file():
        raise missing_file_error(path, architecture=architecture, published=published)
    try:
        return load_torch_file(path)
    except Exception as error:
        raise DamagedFileError(f"could not read {path} as a PyTorch checkpoint of {architecture}: "
                               f"{type(error).__name__}: {error}. The file is damaged, truncated or not such a "
                               f"checkpoint; get a good copy again ({published}).") from error


def save_params(path, params, metadata: Optional[dict] = None) -> None:
    """Write a parameter pytree (nested dicts of arrays) to a safetensors file, atomically.

    ``metadata`` (str -> str), e.g. ``{"network": ..., "config": json}``, is stored in the
    file's header, so a converted file describes the network it holds (:func:`params_metadata`)."""
    flat = traverse_util.flatten_dict(params, sep="/")
    # C-order copies (np.array keeps a transposed layout, whose bytes safetensors would write as
    # they lie in memory); 0-d stays 0-d (np.ascontiguousarray makes it 1-d)
    arrays = {k: np.array(v, order="C") for k, v in flat.items()}
    atomic_write_bytes(path, safetensors_save(arrays, metadata=metadata))


# The safetensors format: an 8-byte little-endian header length N, N bytes of JSON
# {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {str: str}}, then the
# tensors' bytes (offsets relative to the end of the header). The reader checks every one of these
# against the file before allocating anything (the header length is bounded by the file and by
# 100 MB, as in the safetensors library).
SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16,
                      "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U64": np.uint64,
                      "U32": np.uint32, "U16": np.uint16, "U8": np.uint8, "BOOL": np.bool_}
MAX_HEADER_BYTES = 100_000_000


class DamagedFileError(ValueError):
    """A weights file that cannot be what it claims to be (the message names it and the fix)."""


def _damaged(path, what: str, problem: str) -> DamagedFileError:
    return DamagedFileError(f"{what} {path} is not a valid .safetensors file: {problem}. The file is damaged, "
                            "truncated or of another format; get a good copy again (download it again, or "
                            "re-create it with `zmagic convert`).")


def read_safetensors_header(path, what: str = "weights file") -> tuple:
    """Check a ``.safetensors`` file's structure without reading its tensors: ``(entries, metadata,
    data_start)``, ``entries = {name: (dtype, shape, begin, end)}`` (offsets from ``data_start``).
    Raises ``FileNotFoundError`` or :class:`DamagedFileError` naming the file and the problem."""
    path = Path(os.fspath(path)).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    size = path.stat().st_size
    if size < 8:
        raise _damaged(path, what, f"it holds {size} bytes, fewer than the 8-byte header length")
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        if length > min(size - 8, MAX_HEADER_BYTES):
            raise _damaged(path, what, f"its header claims {length} bytes but the file holds {size - 8} after the "
                                       "length field" if length > size - 8 else
                                       f"its header claims {length} bytes, more than the {MAX_HEADER_BYTES} allowed")
        raw = f.read(length)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise _damaged(path, what, f"its header is not JSON ({err})") from None
    if not isinstance(header, dict):
        raise _damaged(path, what, "its header is not a JSON object")
    metadata = header.pop("__metadata__", {}) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in metadata.items()):
        raise _damaged(path, what, "its __metadata__ is not a str -> str map")
    data_size = size - 8 - length
    entries, spans = {}, []
    for name, entry in header.items():
        ok = (isinstance(entry, dict) and entry.get("dtype") in SAFETENSORS_DTYPES
              and isinstance(entry.get("shape"), list) and isinstance(entry.get("data_offsets"), list)
              and len(entry["data_offsets"]) == 2
              and all(isinstance(v, int) and not isinstance(v, bool) and v >= 0
                      for v in entry["shape"] + entry["data_offsets"]))
        if not ok:
            raise _damaged(path, what, f"tensor {name!r} has a malformed entry {str(entry)[:200]}")
        dtype = np.dtype(SAFETENSORS_DTYPES[entry["dtype"]])
        begin, end = entry["data_offsets"]
        expected = math.prod(entry["shape"]) * dtype.itemsize
        if not begin <= end <= data_size or end - begin != expected:
            raise _damaged(path, what, f"tensor {name!r} ({entry['dtype']} {entry['shape']}, {expected} bytes) "
                                       f"points at bytes [{begin}, {end}) of a {data_size}-byte data section")
        entries[name] = (dtype, tuple(entry["shape"]), begin, end)
        spans.append((begin, end, name))
    spans.sort()
    for (_, end_a, a), (begin_b, _, b) in zip(spans, spans[1:]):
        if begin_b < end_a:
            raise _damaged(path, what, f"tensors {a!r} and {b!r} overlap")
    return entries, dict(metadata), 8 + length


def read_safetensors(path, what: str = "weights file") -> tuple:
    """``(tensors as numpy arrays by name, metadata)`` of a checked ``.safetensors`` file
    (:func:`read_safetensors_header`)."""
    entries, metadata, data_start = read_safetensors_header(path, what)
    path = Path(os.fspath(path)).expanduser()
    data = bytearray(path.stat().st_size - data_start)
    with open(path, "rb") as f:  # one read into one buffer; the tensors are writable views of it
        f.seek(data_start)
        f.readinto(data)
    tensors = {name: np.frombuffer(data, dtype, count=math.prod(shape), offset=begin).reshape(shape)
               for name, (dtype, shape, begin, _) in entries.items()}
    return tensors, metadata


def load_params(path, what: str = "params file") -> dict:
    """Read a safetensors file written by :func:`save_params` back into nested dicts of jnp arrays
    (checked: a damaged file is a :class:`DamagedFileError` naming it)."""
    flat, _ = read_safetensors(path, what)
    return traverse_util.unflatten_dict({k: jnp.asarray(v) for k, v in flat.items()}, sep="/")


def params_metadata(path, what: str = "weights file") -> dict:
    """The str -> str metadata in a safetensors file's header (``{}`` when it has none)."""
    return read_safetensors_header(path, what)[1]
