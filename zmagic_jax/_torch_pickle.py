"""Read PyTorch checkpoints (``torch.save`` files) without PyTorch.

Both on-disk formats are supported:

- the zip format (PyTorch >= 1.6): ``<name>/data.pkl`` holds the object graph, tensors point to
  storages stored as raw little-endian bytes in ``<name>/data/<key>``;
- the legacy format (older checkpoints such as MTCNN's ``onet.pt`` or ``model_ir_se50.pth``): five
  pickles in a row (magic number, protocol, system info, the object graph, the storage keys) followed
  by each storage as an int64 element count and raw bytes.

Tensors come back as numpy arrays (bfloat16 via ``ml_dtypes``). The unpickler is restricted: it
rebuilds containers, tensors, storages and plain numpy values, and refuses any other class, so a
checkpoint cannot run code while it is read.
"""
from __future__ import annotations

import codecs
import collections
import io
import pickle
import struct
import zipfile

import ml_dtypes
import numpy as np

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C

_STORAGE_DTYPES = {
    "FloatStorage": np.float32,
    "DoubleStorage": np.float64,
    "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16,
    "LongStorage": np.int64,
    "IntStorage": np.int32,
    "ShortStorage": np.int16,
    "CharStorage": np.int8,
    "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}

_TORCH_DTYPES = {
    "float32": np.float32, "float": np.float32, "float64": np.float64, "double": np.float64,
    "float16": np.float16, "half": np.float16, "bfloat16": ml_dtypes.bfloat16,
    "int64": np.int64, "long": np.int64, "int32": np.int32, "int": np.int32, "int16": np.int16,
    "short": np.int16, "int8": np.int8, "uint8": np.uint8, "bool": np.bool_,
}


class _StorageType:
    """Stands for ``torch.<Name>Storage`` in the pickle: only its element dtype matters."""

    def __init__(self, name: str):
        self.name = name
        self.dtype = np.dtype(_STORAGE_DTYPES.get(name, np.uint8))  # untyped storages hold bytes


class _TorchDtype:
    def __init__(self, name: str):
        self.dtype = np.dtype(_TORCH_DTYPES[name])


def _rebuild_tensor(storage, storage_offset, size, stride, *_ignored):
    return _view(storage, storage_offset, size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks, dtype,
                       *_ignored):
    if storage.dtype != dtype.dtype:  # an untyped storage (bytes) carries the dtype here
        storage = storage.view(dtype.dtype)
    return _view(storage, storage_offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, backward_hooks=None, *_ignored):
    return data


def _view(storage: np.ndarray, offset: int, size, stride) -> np.ndarray:
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    if 0 in size:
        return np.zeros(size, storage.dtype)
    extent = offset + 1 + sum((n - 1) * s for n, s in zip(size, stride))
    if extent > storage.size:
        raise ValueError(f"corrupt checkpoint: a tensor of size {size} and stride {stride} at offset "
                         f"{offset} reaches past its storage of {storage.size} elements")
    base = storage[offset:]
    view = np.lib.stride_tricks.as_strided(base, shape=size,
                                           strides=tuple(s * storage.itemsize for s in stride))
    return np.array(view)  # an owned, contiguous copy: never aliases the storage


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("_codecs", "encode"): codecs.encode,  # protocol 2 pickles bytes (numpy payloads) through it
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v3"): _rebuild_tensor_v3,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("builtins", "complex"): complex,
    ("numpy", "dtype"): np.dtype,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy.core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
    ("numpy._core.multiarray", "_reconstruct"): np._core.multiarray._reconstruct,
    ("numpy.core.multiarray", "scalar"): np._core.multiarray.scalar,
    ("numpy._core.multiarray", "scalar"): np._core.multiarray.scalar,
    ("torch", "Size"): tuple,
}


class _Unpickler(pickle.Unpickler):
    def __init__(self, file, load_storage):
        super().__init__(file, encoding="latin1")  # legacy files written by Python 2 carry bytes as str
        self._load_storage = load_storage

    def find_class(self, module, name):
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if (module, name) in (("torch", "UntypedStorage"), ("torch.storage", "UntypedStorage")):
            return _StorageType("UntypedStorage")
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if module == "torch" and name in _TORCH_DTYPES:
            return _TorchDtype(name)
        raise pickle.UnpicklingError(
            f"the checkpoint contains an object of class {module}.{name}, which a weights file should not "
            "need; only tensors, containers and plain values are read (nothing in a checkpoint is executed)")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and pid and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id in checkpoint: {pid!r}")
        return self._load_storage(pid)


def _read_zip(path) -> object:
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pkl = [n for n in names if n.endswith("data.pkl")]
        if len(pkl) != 1:
            raise ValueError(f"{path}: a zip file but not a PyTorch checkpoint (no single data.pkl inside)")
        root = pkl[0][: -len("data.pkl")]
        if root + "byteorder" in names and archive.read(root + "byteorder").strip() != b"little":
            raise ValueError(f"{path}: big-endian checkpoints are not supported")
        cache = {}

        def load_storage(pid):
            _, storage_type, key, _location, numel = pid[:5]
            if key not in cache:
                raw = archive.read(f"{root}data/{key}")
                cache[key] = np.frombuffer(raw, dtype=storage_type.dtype).copy()
            storage = cache[key]
            if storage.size < int(numel):
                raise ValueError(f"{path}: storage {key} holds {storage.size} elements, {numel} expected")
            return storage

        return _Unpickler(io.BytesIO(archive.read(pkl[0])), load_storage).load()


def _read_legacy(path) -> object:
    # Read from memory: every length the file claims is then bounded by what it holds (a damaged
    # length reads short and fails; it never allocates more than the file's size).
    with open(path, "rb") as handle:
        f = io.BytesIO(handle.read())

    def plain():
        return _Unpickler(f, _no_storage).load()

    if plain() != LEGACY_MAGIC:
        raise ValueError(f"{path}: not a PyTorch checkpoint (neither a zip archive nor the legacy format)")
    plain()  # protocol version
    plain()  # system info (endianness, type sizes)
    roots: dict = {}
    views: list = []

    def load_storage(pid):
        _, storage_type, key, _location, numel = pid[:5]
        view = pid[5] if len(pid) > 5 else None
        if key not in roots:
            roots[key] = (storage_type.dtype, int(numel), [])
        if view is None:
            holder: list = []
            roots[key][2].append(holder)
            return _LazyStorage(holder)
        view_key, offset, view_size = view
        holder = []
        views.append((key, int(offset), int(view_size), holder))
        return _LazyStorage(holder)

    obj = _Unpickler(f, load_storage).load()
    keys = plain()
    data = {}
    for key in keys:
        if key not in roots:
            raise ValueError(f"{path}: storage {key!r} is listed but no tensor uses it (damaged file)")
        dtype, numel, _ = roots[key]
        head = f.read(8)
        if len(head) != 8:
            raise ValueError(f"{path}: storage {key} is truncated")
        (count,) = struct.unpack("<q", head)
        if count != numel or count < 0:
            raise ValueError(f"{path}: storage {key} is damaged ({count} elements, {numel} expected)")
        raw = f.read(count * dtype.itemsize)
        if len(raw) != count * dtype.itemsize:
            raise ValueError(f"{path}: storage {key} is truncated or damaged")
        data[key] = np.frombuffer(raw, dtype=dtype).copy()
    for key, (_, _, holders) in roots.items():
        for holder in holders:
            holder.append(data[key])
    for key, offset, view_size, holder in views:
        holder.append(data[key][offset: offset + view_size])
    return _resolve(obj)


def _no_storage(pid):
    raise pickle.UnpicklingError("tensor data outside the object graph")


class _LazyStorage:
    """A storage whose bytes come after the object graph in a legacy file."""

    def __init__(self, holder: list):
        self.holder = holder
        self.dtype = None


class _LazyTensor:
    def __init__(self, storage: _LazyStorage, offset, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def resolve(self) -> np.ndarray:
        return _view(self.storage.holder[0], self.offset, self.size, self.stride)


def _resolve(obj):
    if isinstance(obj, _LazyTensor):
        return obj.resolve()
    if isinstance(obj, collections.OrderedDict):
        return collections.OrderedDict((k, _resolve(v)) for k, v in obj.items())
    if isinstance(obj, dict):
        return {k: _resolve(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_resolve(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(_resolve(v) for v in obj)
    return obj


def _lazy_aware(rebuild):
    def wrapped(storage, storage_offset, size, stride, *rest):
        if isinstance(storage, _LazyStorage):
            return _LazyTensor(storage, storage_offset, size, stride)
        return rebuild(storage, storage_offset, size, stride, *rest)
    return wrapped


_ALLOWED[("torch._utils", "_rebuild_tensor")] = _lazy_aware(_rebuild_tensor)
_ALLOWED[("torch._utils", "_rebuild_tensor_v2")] = _lazy_aware(_rebuild_tensor)


def load_torch_file(path) -> object:
    """The object ``torch.save`` wrote to ``path``, with every tensor as a numpy array."""
    if zipfile.is_zipfile(path):
        return _read_zip(path)
    return _read_legacy(path)
