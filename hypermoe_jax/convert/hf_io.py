"""Hugging Face model folders read and written with numpy only (no torch, ``safetensors`` or
``transformers``).

A Hugging Face model folder holds ``config.json`` and the weights in one of these forms (the
first one present is read, safetensors before torch, as ``transformers`` does):

* ``model.safetensors``: one safetensors file;
* ``model.safetensors.index.json``: shards (``model-00001-of-00002.safetensors``, ...); the index
  is ``{"metadata": {"total_size": ...}, "weight_map": {tensor name: shard file name}}``;
* ``pytorch_model.bin``: a ``torch.save`` checkpoint of the state dict;
* ``pytorch_model.bin.index.json``: ``torch.save`` shards, indexed like the safetensors shards.

**safetensors**: an 8-byte little-endian unsigned header length ``N``; ``N`` bytes of UTF-8 JSON,
``{name: {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]}, ...}`` with an optional
``"__metadata__": {str: str}`` entry, padded with spaces to a multiple of 8; then the tensors'
bytes, C order, little-endian. Offsets are relative to the end of the header and the tensors
cover the data exactly, without gaps or overlaps. ``write_safetensors`` writes the tensors in the
order the ``safetensors`` library does (largest dtype first, then by name), with the same compact
JSON, so its files are byte-identical to that library's.

**torch** (``torch.save`` since torch 1.6): a zip archive ``<name>/data.pkl`` (the pickled
object), ``<name>/data/<key>`` (the raw little-endian bytes of each storage; ``<name>/byteorder``
says when they are not) and a few small records. In the pickle, each tensor is
``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks[, metadata])``
(or ``_rebuild_tensor_v3(..., dtype)`` over an untyped byte storage), a parameter wraps one in
``torch._utils._rebuild_parameter``, and a storage is a persistent id ``("storage",
torch.FloatStorage, key, location, numel)``. Views (transposes, slices) share their storage and
keep their own offset and strides. ``read_torch_bin`` unpickles with a restricted unpickler that
knows only these names: any other global in the pickle is refused, so no pickled code is run.
The legacy (pre-1.6, non-zip) format is refused.

Arrays come back in their stored dtype: bf16 as ``ml_dtypes.bfloat16``, fp16 as ``np.float16``;
callers cast.
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import io
import json
import math
import os
import pickle
import re
import struct
import sys
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import ml_dtypes
import numpy as np

CONFIG_NAME = "config.json"
SAFETENSORS_NAME = "model.safetensors"
SAFETENSORS_INDEX_NAME = "model.safetensors.index.json"
TORCH_NAME = "pytorch_model.bin"
TORCH_INDEX_NAME = "pytorch_model.bin.index.json"
# In the order read_state_dict looks for them.
WEIGHT_NAMES = (SAFETENSORS_NAME, SAFETENSORS_INDEX_NAME, TORCH_NAME, TORCH_INDEX_NAME)
HUB_PATTERNS = ["config.json", "*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin",
                "*.bin.index.json"]

# safetensors dtype codes, in the order the safetensors library writes tensors (its Dtype enum,
# largest first; ties by name).
_ST_DTYPES: dict[str, np.dtype] = {
    "U64": np.dtype(np.uint64), "I64": np.dtype(np.int64), "F64": np.dtype(np.float64),
    "C64": np.dtype(np.complex64), "F32": np.dtype(np.float32), "U32": np.dtype(np.uint32),
    "I32": np.dtype(np.int32), "BF16": np.dtype(ml_dtypes.bfloat16),
    "F16": np.dtype(np.float16), "U16": np.dtype(np.uint16), "I16": np.dtype(np.int16),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
    "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_ST_CODES: dict[np.dtype, str] = {dtype: code for code, dtype in _ST_DTYPES.items()}
_ST_RANK = {code: rank for rank, code in enumerate(_ST_DTYPES)}
_MAX_HEADER = 100_000_000  # the safetensors library's limit

# torch storage classes and dtypes (both spellings torch pickles) -> numpy dtypes.
_TORCH_STORAGES: dict[str, np.dtype] = {
    "FloatStorage": np.dtype(np.float32), "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(ml_dtypes.bfloat16), "DoubleStorage": np.dtype(np.float64),
    "LongStorage": np.dtype(np.int64), "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16), "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8), "BoolStorage": np.dtype(np.bool_),
    "ComplexFloatStorage": np.dtype(np.complex64), "ComplexDoubleStorage": np.dtype(np.complex128),
}
_TORCH_DTYPES: dict[str, np.dtype] = {
    "float32": np.dtype(np.float32), "float": np.dtype(np.float32),
    "float16": np.dtype(np.float16), "half": np.dtype(np.float16),
    "bfloat16": np.dtype(ml_dtypes.bfloat16),
    "float64": np.dtype(np.float64), "double": np.dtype(np.float64),
    "int64": np.dtype(np.int64), "long": np.dtype(np.int64),
    "int32": np.dtype(np.int32), "int": np.dtype(np.int32),
    "int16": np.dtype(np.int16), "short": np.dtype(np.int16),
    "int8": np.dtype(np.int8), "uint8": np.dtype(np.uint8), "bool": np.dtype(np.bool_),
    "uint16": np.dtype(np.uint16), "uint32": np.dtype(np.uint32), "uint64": np.dtype(np.uint64),
    "complex64": np.dtype(np.complex64), "complex128": np.dtype(np.complex128),
    "float8_e4m3fn": np.dtype(ml_dtypes.float8_e4m3fn),
    "float8_e5m2": np.dtype(ml_dtypes.float8_e5m2),
}
# What torch.save (protocol 2) writes before the archive format: pickle of this magic number.
_LEGACY_TORCH_MAGIC = pickle.dumps(0x1950A86A20F9469CFC6C, protocol=2)
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9][A-Za-z0-9_.-]*$")


# ----------------------------------------------------------------------------------- folders


def _listing(folder: Path, limit: int = 20) -> str:
    names = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir())
    if not names:
        return "it is empty"
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return "it holds " + ", ".join(names[:limit]) + more


def resolve_source(src: str | os.PathLike, *, cache_dir: str | None = None) -> Path:
    """The local folder of a Hugging Face model: ``src`` itself when it is a folder with
    ``config.json``; otherwise, when ``src`` looks like a hub id (``org/name``), the folder
    ``huggingface_hub.snapshot_download`` downloads it to (config and weights only)."""
    path = Path(src).expanduser()
    if path.is_dir():
        if (path / CONFIG_NAME).is_file():
            return path
        raise FileNotFoundError(
            f"{path} is not a Hugging Face model folder: it has no {CONFIG_NAME} "
            f"({_listing(path)}). Pass the folder that holds {CONFIG_NAME} and the weights "
            f"({SAFETENSORS_NAME} or {TORCH_NAME}).")
    if path.exists():
        raise ValueError(f"{path} is a file; pass the folder that holds {CONFIG_NAME} and the "
                         "weights, not a file in it.")
    name = os.fspath(src)
    if not _HUB_ID.match(name):
        raise FileNotFoundError(
            f"{path} does not exist. Pass an existing Hugging Face model folder (with "
            f"{CONFIG_NAME}) or a hub id of the form org/name.")
    try:
        import huggingface_hub
    except ImportError:
        raise FileNotFoundError(
            f"{name!r} is not a local folder, and downloading it as a Hugging Face Hub id needs "
            "huggingface_hub, which is not installed: pip install huggingface_hub, or download "
            "the folder and pass its path.") from None
    try:
        folder = Path(huggingface_hub.snapshot_download(
            repo_id=name, cache_dir=cache_dir, allow_patterns=list(HUB_PATTERNS)))
    except Exception as e:
        raise FileNotFoundError(
            f"{name!r} is not a local folder, and downloading it from the Hugging Face Hub "
            f"failed ({type(e).__name__}: {e}). Check the id and the network (an offline machine "
            "cannot download), or download the folder elsewhere and pass its local path.") from e
    if not (folder / CONFIG_NAME).is_file():
        raise FileNotFoundError(
            f"The Hugging Face Hub repository {name!r} (downloaded to {folder}) has no "
            f"{CONFIG_NAME}: it is not a model repository. Check the id.")
    return folder


def read_config(folder: str | os.PathLike) -> dict[str, Any]:
    """``config.json`` of a model folder, as a dict."""
    path = Path(folder) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist; a Hugging Face model folder holds "
                                f"{CONFIG_NAME} next to its weights.")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); download or write it again.") from e
    if not isinstance(config, dict):
        raise ValueError(f"{path} holds a JSON {type(config).__name__}, not an object; "
                         "download or write it again.")
    return config


def _read_index(folder: Path, index_name: str) -> dict[str, str]:
    path = folder / index_name
    try:
        index = json.loads(path.read_text(encoding="utf-8"))
        weight_map = index["weight_map"]
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a shard index (JSON with a 'weight_map' of tensor "
                         f"name -> shard file) ({type(e).__name__}: {e}); download it again."
                         ) from e
    if not isinstance(weight_map, dict) or not all(
            isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
        raise ValueError(f"{path}: 'weight_map' must map tensor names to shard file names.")
    return weight_map


def _read_sharded(folder: Path, index_name: str, reader) -> dict[str, np.ndarray]:
    weight_map = _read_index(folder, index_name)
    shards = list(dict.fromkeys(weight_map.values()))
    for shard in shards:
        if Path(shard).is_absolute() or ".." in Path(shard).parts:
            raise ValueError(f"{folder / index_name} names the shard {shard!r}, outside the "
                             "folder; shards must be files of the folder.")
    missing = [shard for shard in shards if not (folder / shard).is_file()]
    if missing:
        raise FileNotFoundError(
            f"{folder} is incomplete: {index_name} lists {len(shards)} shard(s) and "
            f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing. Download the "
            "missing shard(s) (or the whole folder) again.")
    tensors: dict[str, np.ndarray] = {}
    for shard in shards:
        for name, value in reader(folder / shard).items():
            if name in tensors:
                raise ValueError(f"{folder}: tensor {name!r} is in more than one shard.")
            tensors[name] = value
    absent = [name for name in weight_map if name not in tensors]
    if absent:
        raise ValueError(
            f"{folder}: {len(absent)} tensor(s) that {index_name} lists are not in their shards "
            f"(e.g. {absent[0]!r} in {weight_map[absent[0]]}); the shards do not match the "
            "index: download the folder again.")
    return tensors


def read_state_dict(folder: str | os.PathLike) -> dict[str, np.ndarray]:
    """All weights of a model folder by name, in their stored dtypes (see ``WEIGHT_NAMES`` for
    the files looked for, in order)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"{folder} is not a folder; pass a Hugging Face model folder.")
    if (folder / SAFETENSORS_NAME).is_file():
        return read_safetensors(folder / SAFETENSORS_NAME)
    if (folder / SAFETENSORS_INDEX_NAME).is_file():
        return _read_sharded(folder, SAFETENSORS_INDEX_NAME, read_safetensors)
    if (folder / TORCH_NAME).is_file():
        return read_torch_bin(folder / TORCH_NAME)
    if (folder / TORCH_INDEX_NAME).is_file():
        return _read_sharded(folder, TORCH_INDEX_NAME, read_torch_bin)
    raise FileNotFoundError(
        f"{folder} holds no weights: expected one of {', '.join(WEIGHT_NAMES)}, but "
        f"{_listing(folder)}. Download the weights into it (or pass the folder that has them).")


def _write_atomic(path: Path, write) -> None:
    """``write(file)`` into a temporary file next to ``path``, then renames it to ``path``: an
    interrupted write leaves ``path`` as it was."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_hf_folder(folder: str | os.PathLike, config: dict[str, Any],
                    tensors: Mapping[str, np.ndarray], *, overwrite: bool = False) -> Path:
    """Writes a Hugging Face model folder: ``config.json`` (indent 2) and ``model.safetensors``
    (metadata ``{"format": "pt"}``, as ``transformers`` writes). A non-empty ``folder`` is
    refused unless ``overwrite``; with it, the two files are replaced and other weight files
    (shards, their indexes, ``pytorch_model*.bin``), which would be read instead of or along
    with the new ones, are removed. Returns the folder."""
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise FileExistsError(f"{folder} is a file, not a folder; pass a folder path.")
    if folder.is_dir() and any(folder.iterdir()) and not overwrite:
        raise FileExistsError(
            f"{folder} exists and is not empty ({_listing(folder)}); nothing was written. Pass "
            "an empty or new folder, or overwrite=True to replace the model in it.")
    if not isinstance(config, dict):
        raise ValueError(f"config must be a dict, not {type(config).__name__}.")
    try:
        config_text = json.dumps(config, indent=2) + "\n"
    except (TypeError, ValueError) as e:
        raise ValueError(f"config cannot be written as JSON ({e}); give it only JSON values "
                         "(str, numbers, bool, None, lists, dicts with str keys).") from e
    header, arrays = _safetensors_layout(tensors, {"format": "pt"})  # validates before writing
    folder.mkdir(parents=True, exist_ok=True)
    _write_atomic(folder / SAFETENSORS_NAME, lambda f: _write_layout(f, header, arrays))
    _write_atomic(folder / CONFIG_NAME, lambda f: f.write(config_text.encode("utf-8")))
    for stale in sorted(folder.iterdir()):
        if stale.name != SAFETENSORS_NAME and stale.is_file() and (
                re.fullmatch(r"model.*\.safetensors(\.index\.json)?", stale.name)
                or re.fullmatch(r"pytorch_model.*\.bin(\.index\.json)?", stale.name)):
            stale.unlink()
    return folder


# ------------------------------------------------------------------------------- safetensors


def _read_header(f, path: Path, size: int) -> tuple[int, dict[str, Any]]:
    """(header length, parsed header) of an open safetensors file, checked."""
    head = f.read(8)
    if len(head) < 8:
        raise ValueError(f"{path} is not a safetensors file: it has {size} bytes, fewer than the "
                         "8 of the header length. The file is truncated; write or download it "
                         "again.")
    (n,) = struct.unpack("<Q", head)
    if n > min(_MAX_HEADER, size - 8):
        raise ValueError(f"{path} is not a safetensors file or is truncated: its header length "
                         f"{n} exceeds the {size - 8} bytes after it. Write or download it again.")
    raw = f.read(n)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path} is not a safetensors file: its header is not JSON ({e}).") from e
    if not isinstance(header, dict):
        raise ValueError(f"{path} is not a safetensors file: its header is not a JSON object.")
    return n, header


def _check_entries(path: Path, header: dict[str, Any], data_size: int
                   ) -> list[tuple[str, np.dtype, tuple[int, ...], int, int]]:
    """(name, dtype, shape, begin, end) of each tensor, by offset; checks that they cover the
    data exactly."""
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            code, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path}: the header entry of {name!r} is malformed ({info!r}); "
                             "it needs dtype, shape and data_offsets [begin, end].") from e
        if code not in _ST_DTYPES:
            raise ValueError(f"{path}: tensor {name!r} has dtype {code!r}, which is not "
                             f"supported (supported: {', '.join(_ST_DTYPES)}).")
        if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise ValueError(f"{path}: tensor {name!r} has an invalid shape {shape!r}.")
        dtype = _ST_DTYPES[code]
        nbytes = math.prod(shape) * dtype.itemsize
        if not (isinstance(begin, int) and isinstance(end, int) and end - begin == nbytes):
            raise ValueError(f"{path}: tensor {name!r} ({code} {shape}) has data_offsets "
                             f"[{begin}, {end}], not {nbytes} bytes; the file is damaged.")
        entries.append((name, dtype, tuple(shape), begin, end))
    entries.sort(key=lambda e: (e[3], e[4]))
    at = 0
    for name, _, _, begin, end in entries:
        if begin != at:
            raise ValueError(f"{path}: tensor {name!r} starts at byte {begin} of the data, not "
                             f"{at}: the tensors overlap or leave a gap; the file is damaged.")
        at = end
    if at != data_size:
        raise ValueError(f"{path}: the tensors take {at} bytes but the file holds {data_size} "
                         "after the header; it is truncated or damaged. Write or download it "
                         "again.")
    return entries


def read_safetensors_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file ({} when it has none)."""
    path = Path(path)
    with open(path, "rb") as f:
        _, header = _read_header(f, path, path.stat().st_size)
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict):
        raise ValueError(f"{path}: __metadata__ is not a JSON object.")
    return metadata


def read_safetensors(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """All tensors of a safetensors file, in file order (writable arrays, stored dtypes)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist.")
    size = path.stat().st_size
    tensors: dict[str, np.ndarray] = {}
    with open(path, "rb") as f:
        n, header = _read_header(f, path, size)
        for name, dtype, shape, begin, end in _check_entries(path, header, size - 8 - n):
            buf = bytearray(end - begin)
            f.seek(8 + n + begin)
            if f.readinto(buf) != len(buf):
                raise ValueError(f"{path}: short read of tensor {name!r}; the file changed while "
                                 "being read or is damaged.")
            array = np.frombuffer(buf, dtype=dtype).reshape(shape)
            if sys.byteorder == "big" and dtype.itemsize > 1:
                array = array.byteswap()
            tensors[name] = array
    return tensors


def _safetensors_layout(tensors: Mapping[str, np.ndarray], metadata: dict[str, str] | None
                        ) -> tuple[bytes, list[np.ndarray]]:
    """(padded header with its length prefix, arrays in data order): the whole file but the
    data, checked."""
    if not isinstance(tensors, Mapping):
        raise ValueError(f"tensors must be a dict of name -> array, not "
                         f"{type(tensors).__name__}.")
    if metadata is not None and not (isinstance(metadata, Mapping) and all(
            isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())):
        raise ValueError(f"safetensors metadata must map str to str, got {metadata!r}; convert "
                         "the values with str() (or json.dumps).")
    items = []
    for name, value in tensors.items():
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise ValueError(f"tensor name {name!r} cannot be written: names are non-empty "
                             "strings other than '__metadata__'.")
        array = np.asarray(value)
        if array.dtype.byteorder not in "=|":
            array = array.astype(array.dtype.newbyteorder("="))
        code = _ST_CODES.get(array.dtype)
        if code is None:
            raise ValueError(f"tensor {name!r} has dtype {array.dtype}, which safetensors cannot "
                             f"hold here (supported: {', '.join(map(str, _ST_CODES))}); cast it "
                             "first.")
        if not array.flags.c_contiguous:
            array = array.copy(order="C")  # (np.ascontiguousarray would make 0-d arrays 1-d)
        if sys.byteorder == "big" and array.dtype.itemsize > 1:
            array = array.byteswap()
        items.append((code, name, array))
    items.sort(key=lambda item: (_ST_RANK[item[0]], item[1]))
    header: dict[str, Any] = {}
    if metadata is not None:
        header["__metadata__"] = dict(metadata)
    at = 0
    for code, name, array in items:
        header[name] = {"dtype": code, "shape": list(array.shape),
                        "data_offsets": [at, at + array.nbytes]}
        at += array.nbytes
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return struct.pack("<Q", len(raw)) + raw, [array for _, _, array in items]


def _write_layout(f, header: bytes, arrays: list[np.ndarray]) -> None:
    f.write(header)
    for array in arrays:
        if array.size:
            f.write(array.reshape(-1).view(np.uint8).data)


def write_safetensors(path: str | os.PathLike, tensors: Mapping[str, np.ndarray],
                      metadata: dict[str, str] | None = None) -> None:
    """Writes ``tensors`` (any layout and byte order; written C order, little-endian) as a
    safetensors file, through a temporary file renamed into place."""
    header, arrays = _safetensors_layout(tensors, metadata)
    _write_atomic(Path(path), lambda f: _write_layout(f, header, arrays))


# ------------------------------------------------------------------------------------- torch


@dataclasses.dataclass(frozen=True)
class _StorageType:
    name: str
    dtype: np.dtype | None  # None: UntypedStorage (bytes; the tensor gives its dtype)


@dataclasses.dataclass(frozen=True)
class _TorchDtype:
    name: str
    dtype: np.dtype


@dataclasses.dataclass(frozen=True)
class _TorchClass:
    name: str


@dataclasses.dataclass(frozen=True)
class _Storage:
    key: str
    data: bytes
    dtype: np.dtype | None
    swap: bool  # stored in the other byte order than this machine's


def _strided(storage: _Storage, dtype: np.dtype, offset: int, size, stride) -> np.ndarray:
    """The elements a torch tensor (offset, size, stride, in elements) views in ``storage``,
    as a new C-order array."""
    size, stride = tuple(int(s) for s in size), tuple(int(s) for s in stride)
    where = f"tensor on storage {storage.key}"
    if len(size) != len(stride) or any(s < 0 for s in size) or any(s < 0 for s in stride):
        raise ValueError(f"torch checkpoint: {where} has an invalid size {size} / stride "
                         f"{stride}; the file is damaged.")
    if len(storage.data) % dtype.itemsize:
        raise ValueError(f"torch checkpoint: {where}: {len(storage.data)} bytes are not a whole "
                         f"number of {dtype} elements; the file is damaged.")
    count = len(storage.data) // dtype.itemsize
    if math.prod(size) == 0:
        return np.zeros(size, dtype)
    last = offset + sum((n - 1) * s for n, s in zip(size, stride))
    if offset < 0 or last >= count:
        raise ValueError(f"torch checkpoint: {where} reaches element {last} of a storage of "
                         f"{count}; the file is damaged.")
    base = np.frombuffer(storage.data, dtype=dtype, count=count)[offset:]
    view = np.lib.stride_tricks.as_strided(
        base, shape=size, strides=tuple(s * dtype.itemsize for s in stride), writeable=False)
    array = np.array(view, copy=True, order="C")
    return array.byteswap() if storage.swap and dtype.itemsize > 1 else array


def _rebuild_tensor_v2(storage, storage_offset, size, stride, requires_grad=False,
                       backward_hooks=None, metadata=None) -> np.ndarray:
    if not isinstance(storage, _Storage) or storage.dtype is None:
        raise ValueError("torch checkpoint: _rebuild_tensor_v2 without a typed storage; the "
                         "file is damaged or not a state dict.")
    return _strided(storage, storage.dtype, int(storage_offset), size, stride)


def _rebuild_tensor_v3(storage, storage_offset, size, stride, requires_grad, backward_hooks,
                       dtype, metadata=None) -> np.ndarray:
    if not isinstance(storage, _Storage) or not isinstance(dtype, _TorchDtype):
        raise ValueError("torch checkpoint: _rebuild_tensor_v3 without a storage and a dtype; "
                         "the file is damaged or not a state dict.")
    return _strided(storage, dtype.dtype, int(storage_offset), size, stride)


def _rebuild_parameter(data, requires_grad=True, backward_hooks=None) -> np.ndarray:
    return data


def _rebuild_parameter_with_state(data, requires_grad, backward_hooks, state) -> np.ndarray:
    return data


def _rebuild_from_type_v2(func, new_type, args, state) -> np.ndarray:
    if not (isinstance(func, functools.partial) and func.func in _REBUILDERS.values()
            and isinstance(new_type, _TorchClass) and new_type.name in _TENSOR_CLASSES.values()):
        raise ValueError(f"torch checkpoint: tensor subclass {new_type!r} is not supported; "
                         "save a plain state dict of tensors.")
    return func(*args)


_REBUILDERS = {f.__name__: f for f in (_rebuild_tensor_v2, _rebuild_tensor_v3,
                                       _rebuild_parameter, _rebuild_parameter_with_state)}
_TENSOR_CLASSES = {("torch", "Tensor"): "torch.Tensor",
                   ("torch.nn.parameter", "Parameter"): "torch.nn.Parameter"}


class _TorchUnpickler(pickle.Unpickler):
    """Unpickles a torch state dict; refuses every global that is not a tensor part."""

    def __init__(self, file, path: Path, archive: zipfile.ZipFile, prefix: str, swap: bool):
        super().__init__(file)
        self._path, self._archive, self._prefix, self._swap = path, archive, prefix, swap
        self._storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        # Fresh objects each time (partials, not the functions themselves): the pickle can
        # alter what it is given (BUILD), but nothing of this module.
        if (module, name) == ("collections", "OrderedDict"):
            return collections.OrderedDict
        if module == "torch._utils" and name in _REBUILDERS:
            return functools.partial(_REBUILDERS[name])
        if (module, name) == ("torch._tensor", "_rebuild_from_type_v2"):
            return functools.partial(_rebuild_from_type_v2)
        if (module, name) in _TENSOR_CLASSES:
            return _TorchClass(_TENSOR_CLASSES[module, name])
        if module == "torch" and name in _TORCH_STORAGES:
            return _StorageType(name, _TORCH_STORAGES[name])
        if module in ("torch", "torch.storage") and name == "UntypedStorage":
            return _StorageType(name, None)
        if module == "torch" and name in _TORCH_DTYPES:
            return _TorchDtype(name, _TORCH_DTYPES[name])
        raise ValueError(
            f"{self._path} refers to {module}.{name}, which is not part of a tensor state dict; "
            "it is refused (unpickling it could run arbitrary code). Only tensors, parameters "
            "and dicts of them are read: save the state dict alone (model.state_dict()) or "
            "convert the checkpoint to safetensors.")

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _StorageType)):
            raise ValueError(f"{self._path}: unknown persistent id {pid!r} in the pickle; the "
                             "file is damaged or not a torch.save checkpoint.")
        _, storage_type, key, _location, numel = pid
        key = str(key)
        if key not in self._storages:
            record = f"{self._prefix}data/{key}"
            try:
                data = self._archive.read(record)
            except KeyError:
                raise ValueError(f"{self._path}: storage record {record} is missing; the file "
                                 "is truncated or damaged.") from None
            itemsize = 1 if storage_type.dtype is None else storage_type.dtype.itemsize
            nbytes = int(numel) * itemsize
            if len(data) < nbytes:
                raise ValueError(f"{self._path}: storage {record} has {len(data)} bytes, fewer "
                                 f"than its {nbytes}; the file is truncated or damaged.")
            self._storages[key] = _Storage(key, data[:nbytes], storage_type.dtype, self._swap)
        return self._storages[key]


def read_torch_bin(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """The state dict of a ``torch.save`` zip checkpoint (``pytorch_model.bin``), as numpy
    arrays in their stored dtypes, without torch; nothing in the pickle is executed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist.")
    if not zipfile.is_zipfile(path):
        with open(path, "rb") as f:
            start = f.read(len(_LEGACY_TORCH_MAGIC))
        if start == _LEGACY_TORCH_MAGIC:
            raise ValueError(
                f"{path} is in torch's legacy (before 1.6) serialization format, which is not "
                "read here. Re-save it with a recent torch (torch.save(torch.load(path), path)) "
                "or convert it to safetensors.")
        raise ValueError(f"{path} is not a torch.save checkpoint (not a zip archive); it may be "
                         "truncated, or another format.")
    with zipfile.ZipFile(path) as archive:
        pickles = [n for n in archive.namelist()
                   if n == "data.pkl" or (n.endswith("/data.pkl") and n.count("/") == 1)]
        if len(pickles) != 1:
            kind = ("a TorchScript archive" if any(n.endswith("constants.pkl")
                                                   for n in archive.namelist())
                    else "not a torch.save checkpoint")
            raise ValueError(f"{path} is {kind}: expected one <name>/data.pkl, found "
                             f"{len(pickles)}. Save the state dict with torch.save.")
        prefix = pickles[0][: -len("data.pkl")]
        try:
            order = archive.read(f"{prefix}byteorder").decode().strip()
        except KeyError:
            order = "little"
        if order not in ("little", "big"):
            raise ValueError(f"{path}: unknown byteorder record {order!r}.")
        unpickler = _TorchUnpickler(io.BytesIO(archive.read(pickles[0])), path, archive, prefix,
                                    swap=order != sys.byteorder)
        try:
            state = unpickler.load()
        except ValueError:
            raise
        except Exception as e:
            raise ValueError(f"{path}: its pickle cannot be read as a state dict "
                             f"({type(e).__name__}: {e}); the file is damaged or holds more "
                             "than tensors.") from e
    if not isinstance(state, dict):
        raise ValueError(f"{path} holds a {type(state).__name__}, not a state dict (a dict of "
                         "name -> tensor).")
    bad = [f"{k!r} ({type(v).__name__})" for k, v in state.items()
           if not (isinstance(k, str) and isinstance(v, np.ndarray))]
    if bad:
        raise ValueError(f"{path} is not a flat state dict of tensors: {', '.join(bad[:5])}"
                         f"{' ...' if len(bad) > 5 else ''} are not name -> tensor entries. "
                         "Save model.state_dict() itself.")
    return dict(state)
