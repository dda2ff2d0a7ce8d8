"""GGUF behind the :class:`ModelFile` view, split files merged into one tensor table."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from birdbone.io.errors import InputError
from birdbone.io.gguf_reader import GGUFFile, split_paths, to_float32
from birdbone.io.model_file import ModelFile, TensorInfo


class _GGUFBackend:
    def __init__(self, paths: list[Path]):
        self.shards: list[GGUFFile] = []
        try:
            for p in paths:
                self.shards.append(GGUFFile(p))
        except Exception:
            self.close()
            raise
        self.files = paths
        self.by_name: dict[str, tuple[GGUFFile, Any]] = {}
        for shard in self.shards:
            for name, t in shard.tensors.items():
                if name in self.by_name:
                    raise InputError(shard.path, f"tensor {name!r} appears in more than one shard")
                self.by_name[name] = (shard, t)

    @property
    def metadata(self):
        return self.shards[0].fields

    def meta(self, key: str, default: Any = None) -> Any:
        return self.shards[0].value(key, default)

    def raw(self, name: str) -> np.ndarray:
        shard, _ = self.by_name[name]
        return shard.raw(name)

    def tensor(self, name: str) -> np.ndarray:
        shard, t = self.by_name[name]
        return to_float32(shard.raw(name), t.type, t.ne, shard.path)

    def close(self) -> None:
        for s in self.shards:
            s.close()


def open_gguf(path: Path) -> ModelFile:
    paths = split_paths(Path(path))
    backend = _GGUFBackend(paths)
    arch = backend.meta("general.architecture")
    if not isinstance(arch, str):
        backend.close()
        raise InputError(path, "GGUF has no general.architecture key")
    tensors = {
        name: TensorInfo(name, tuple(reversed(t.ne)), t.type.name, t.n_bytes, t.offset, shard.path)
        for name, (shard, t) in backend.by_name.items()
    }
    return ModelFile(Path(path), "gguf", arch, tensors, backend)
