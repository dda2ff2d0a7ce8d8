"""safetensors files (single or sharded with an index) and Hugging Face folders, lazily.

The header is a little-endian u64 length followed by JSON; tensor offsets are relative to
the end of the header. Files are memory-mapped, never unpickled (``*.bin`` / ``*.pt``
checkpoints are refused: loading them would run arbitrary code).
"""

from __future__ import annotations

import os
import math
import mmap
import struct
from pathlib import Path
from typing import Any

import numpy as np

from birdbone.io.errors import InputError, shown
from birdbone.io.inputs import folder_member, note_input, parse_json, read_json, regular_file
from birdbone.io.model_file import ModelFile, TensorInfo

_DTYPES = {
    "F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": np.uint16,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
}
MAX_HEADER = 100 * 2**20


class _SafetensorsShard:
    def __init__(self, path: Path):
        self.path = regular_file(path, "safetensors file")
        self._fh = open(path, "rb")
        size = os.fstat(self._fh.fileno()).st_size
        if size < 8:
            self._fh.close()
            raise InputError(path, "not a safetensors file: too short")
        (n,) = struct.unpack("<Q", self._fh.read(8))
        if n > min(size - 8, MAX_HEADER):
            self._fh.close()
            raise InputError(path, f"not a safetensors file: header claims {n} bytes")
        try:
            header = parse_json(self._fh.read(n).decode("utf-8"), path, "safetensors header")
        except UnicodeDecodeError as e:
            self._fh.close()
            raise InputError(path, f"corrupt safetensors header: {e}") from None
        except InputError as e:
            self._fh.close()
            raise InputError(path, f"corrupt safetensors header ({e.problem})") from None
        if not isinstance(header, dict):
            self._fh.close()
            raise InputError(path, "corrupt safetensors header: not a JSON object")
        self.header_meta = header.pop("__metadata__", None) or {}
        self.data_offset = 8 + n
        self._mm = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_READ) if size > 0 else None
        self.entries: dict[str, TensorInfo] = {}
        for name, e in header.items():
            try:
                dtype, shape, (a, b) = e["dtype"], tuple(e["shape"]), e["data_offsets"]
                if not isinstance(dtype, str) or not all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v < 2**62 for v in (*shape, a, b)):
                    raise TypeError  # a dimension of 2**63 or more is no tensor (and overflows int64)
            except (KeyError, TypeError, ValueError):
                self.close()
                raise InputError(path, f"corrupt safetensors header entry for {name!r}") from None
            if dtype not in _DTYPES:
                self.close()
                raise InputError(path, f"tensor {name!r} has unsupported dtype {dtype}")
            if not a <= b or self.data_offset + b > size:
                self.close()
                raise InputError(path, f"truncated safetensors: tensor {name!r} lies outside the file")
            if b - a != math.prod(shape) * np.dtype(_DTYPES[dtype]).itemsize:  # exact: an int64 product could wrap
                self.close()
                raise InputError(path, f"corrupt safetensors: tensor {name!r} has {b - a} bytes, its shape {list(shape)} and {dtype} need another size")
            self.entries[name] = TensorInfo(name, shape, dtype, b - a, self.data_offset + a, path)

    def raw(self, name: str) -> np.ndarray:
        t = self.entries[name]
        return np.frombuffer(self._mm, dtype=np.uint8, count=t.n_bytes, offset=t.offset)

    def tensor(self, name: str) -> np.ndarray:
        t = self.entries[name]
        raw = self.raw(name)
        if t.type == "BF16":
            arr = (raw.view(np.uint16).astype(np.uint32) << 16).view(np.float32)
        else:
            arr = raw.view(_DTYPES[t.type]).astype(np.float32)
        return arr.reshape(t.shape)

    def close(self) -> None:
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:
                pass
        self._fh.close()


class _SafetensorsBackend:
    def __init__(self, shard_paths: list[Path], config: dict | None):
        self.files = shard_paths
        self.shards: list[_SafetensorsShard] = []
        try:
            for p in shard_paths:
                self.shards.append(_SafetensorsShard(p))
        except Exception:
            self.close()
            raise
        self.by_name: dict[str, _SafetensorsShard] = {}
        for s in self.shards:
            for name in s.entries:
                self.by_name[name] = s
        self.config = config or {}
        self.metadata = {"config": self.config, "header": self.shards[0].header_meta if self.shards else {}}

    def meta(self, key: str, default: Any = None) -> Any:
        return self.config.get(key, default)

    def raw(self, name: str) -> np.ndarray:
        return self.by_name[name].raw(name)

    def tensor(self, name: str) -> np.ndarray:
        return self.by_name[name].tensor(name)

    def close(self) -> None:
        for s in self.shards:
            s.close()


def _shards_from_index(index_path: Path) -> list[Path]:
    note_input(index_path)
    index = read_json(index_path, "safetensors index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise InputError(index_path, "safetensors index has no weight_map")
    if not all(isinstance(v, str) for v in weight_map.values()):
        raise InputError(index_path, "safetensors index weight_map values must be file names")
    files = sorted(set(weight_map.values()))
    paths = [index_path.parent / f for f in files]
    for f, p in zip(files, paths):
        try:
            if Path(f).name != f:
                raise InputError(index_path, "")
            folder_member(index_path.parent, p, "shard")
        except InputError:
            raise InputError(index_path, f"index names a shard outside its folder: {shown(f)}") from None
        if not p.exists():
            raise InputError(index_path, f"index names a missing shard: {p.name}")
    return paths


def _architecture(config: dict) -> str:
    archs = config.get("architectures") or []
    if isinstance(archs, list) and archs and isinstance(archs[0], str):
        return archs[0]
    return str(config.get("model_type", "unknown"))


def _read_config(path: Path) -> dict:
    note_input(path)
    config = read_json(path, "config.json")
    if not isinstance(config, dict):
        raise InputError(path, "config.json is not a JSON object")
    return config


def _build(path: Path, shard_paths: list[Path], config: dict | None, fmt: str) -> ModelFile:
    backend = _SafetensorsBackend(shard_paths, config)
    tensors = {name: s.entries[name] for name, s in backend.by_name.items()}
    return ModelFile(path, fmt, _architecture(backend.config), tensors, backend)


def open_safetensors(path: Path) -> ModelFile:
    config_path = path.parent / "config.json"
    config = _read_config(config_path) if config_path.exists() else None
    shards = _shards_from_index(path) if path.name.endswith(".index.json") else [path]
    return _build(path, shards, config, "safetensors")


def open_hf_folder(path: Path) -> ModelFile:
    config_path = path / "config.json"
    pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
    pickle_hint = f" (found {', '.join(pickles)}: pickled checkpoints are never loaded, convert them to safetensors)" if pickles else ""
    if not config_path.exists():
        raise InputError(path, "folder has no config.json; not a Hugging Face model folder" + pickle_hint)
    config = _read_config(folder_member(path, config_path, "config.json"))
    index = path / "model.safetensors.index.json"
    if index.exists():
        folder_member(path, index, "index")
        shards = _shards_from_index(index)
    elif (path / "model.safetensors").exists():
        shards = [path / "model.safetensors"]
    else:
        found = sorted(path.glob("*.safetensors"))
        if not found:
            raise InputError(path, "folder has no .safetensors weights" + pickle_hint)
        shards = found
    return _build(path, [folder_member(path, p, "shard") for p in shards], config, "hf")
