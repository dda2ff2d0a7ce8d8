"""One call opens any model file: :func:`open_model`.

It returns a :class:`ModelFile`, a lazy view shared by every format: the architecture, the
metadata, and per tensor its name, shape, stored type, byte size and offset. ``tensor(name)``
dequantizes one tensor to float32; ``raw(name)`` returns its stored bytes. Nothing is read
until asked: files are memory-mapped and GGUF metadata arrays (the tokenizer) stay lazy.

Shapes are in numpy / torch order (rows first). GGUF stores dims the other way round
(``ne[0]`` is the row width); :attr:`TensorInfo.ne` keeps that order too.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from birdbone.io.errors import InputError, shown
from birdbone.io.inputs import note_input, refuse_nul, regular_file

BUILTIN = "builtin"


@dataclass(frozen=True)
class TensorInfo:
    name: str
    shape: tuple[int, ...]  # numpy order
    type: str  # GGML type name (Q4_K, F16, ...) or safetensors dtype (F32, BF16, ...)
    n_bytes: int
    offset: int  # absolute byte offset in `file`
    file: Path

    @property
    def ne(self) -> tuple[int, ...]:
        return tuple(reversed(self.shape))

    @property
    def n_params(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


@dataclass
class ModelFile:
    """A lazy view of a model on disk. Close it (or use ``with``) to release the maps."""

    path: Path
    format: str  # "gguf" | "safetensors" | "hf"
    architecture: str
    tensors: dict[str, TensorInfo]
    _backend: Any = field(repr=False)

    @property
    def metadata(self) -> dict[str, Any]:
        """GGUF: key -> MetaField (typed; arrays lazy). safetensors/HF: the config and header metadata."""
        return self._backend.metadata

    def meta(self, key: str, default: Any = None) -> Any:
        return self._backend.meta(key, default)

    def tensor(self, name: str) -> np.ndarray:
        self._check(name)
        return self._backend.tensor(name)

    def raw(self, name: str) -> np.ndarray:
        self._check(name)
        return self._backend.raw(name)

    def _check(self, name: str) -> None:
        if name not in self.tensors:
            raise KeyError(f"{self.path}: no tensor named {name!r}")

    @property
    def n_params(self) -> int:
        return sum(t.n_params for t in self.tensors.values())

    @property
    def tensor_bytes(self) -> int:
        return sum(t.n_bytes for t in self.tensors.values())

    @property
    def file_bytes(self) -> int:
        return sum(p.stat().st_size for p in self._backend.files)

    @property
    def files(self) -> list[Path]:
        return list(self._backend.files)

    def close(self) -> None:
        self._backend.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def resolve_model_path(model: str | os.PathLike) -> Path:
    """``builtin`` names the packaged SmolLM2-135M-Instruct GGUF; anything else is a path."""
    if str(model) == BUILTIN:
        from birdbone.io.builtin import builtin_model_path

        return builtin_model_path()
    return Path(model)


def open_model(model: str | os.PathLike) -> ModelFile:
    """Open a GGUF (single or split), a safetensors file or sharded set, or a Hugging Face folder."""
    m = _open(resolve_model_path(model))
    note_input(*m.files)
    return m


def _open(path: Path) -> ModelFile:
    refuse_nul(path)
    try:
        found = path.exists()
    except OSError as e:  # a name the file system refuses (too long, a loop)
        raise InputError(shown(str(path)), f"is not a usable path ({e.strerror})") from None
    if not found:
        raise InputError(path, "no such file or folder")
    if path.is_dir():
        from birdbone.io.safetensors_reader import open_hf_folder

        return open_hf_folder(path)
    if path.suffix == ".safetensors" or path.name.endswith(".safetensors.index.json"):
        from birdbone.io.safetensors_reader import open_safetensors

        return open_safetensors(path)
    with open(regular_file(path, "model file"), "rb") as fh:
        magic = fh.read(4)
    if magic == b"GGUF":
        from birdbone.io.gguf_model import open_gguf

        return open_gguf(path)
    if path.suffix in (".bin", ".pt", ".pth", ".ckpt") or magic[:2] == b"PK":
        raise InputError(path, "looks like a pickled PyTorch checkpoint; birdbone never unpickles files (convert it to safetensors)")
    if path.suffix == ".json":
        raise InputError(path, "a JSON file is not a model; pass the folder or the .safetensors file")
    raise InputError(path, f"unknown model format (magic {magic!r}); expected a GGUF, a .safetensors file or a Hugging Face folder")


