"""A body to operate on: a GGUF file or an organ folder, behind one interface.

Both give the exact layout (metadata and tensor entries), each tensor's stored bytes as a
stream of chunks or whole, and the source's sha256, so grafting works in any mix.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from birdbone.anatomy.manifest import MANIFEST, load_manifest
from birdbone.io.errors import InputError
from birdbone.io.gguf_layout import CHUNK, KV, Layout, TensorEntry, layout_of, write_layout
from birdbone.io.gguf_reader import GGUFFile, to_float32
from birdbone.io.hashing import file_sha256
from birdbone.io.model_file import resolve_model_path


class Body:
    def __init__(self, path: str | Path):
        self.path = resolve_model_path(path)
        self._gguf = None
        if self.path.is_dir():
            self.manifest = load_manifest(self.path)
            self.layout = self.manifest.layout()
            self.name = self.manifest.data["source"]["name"]
            self.sha256 = self.manifest.data["source"]["sha256"]
        elif self.path.is_file():
            self._gguf = GGUFFile(self.path)
            self.layout = layout_of(self._gguf)
            self.name = self.path.name
            self.sha256 = file_sha256(self.path)
        else:
            raise InputError(self.path, f"no such GGUF file or organ folder (with {MANIFEST})")
        self.entries: dict[str, TensorEntry] = {t.name: t for t in self.layout.tensors}

    def meta(self, key: str, default=None):
        for kv in self.layout.kvs:
            if kv.key == key:
                return kv.value
        return default

    @property
    def architecture(self) -> str | None:
        return self.meta("general.architecture")

    def chunks(self, name: str) -> Iterator[bytes]:
        t = self.entries[name]
        if self._gguf is not None:
            yield from self._gguf.chunks(self._gguf.data_offset + t.offset, t.n_bytes)
            return
        with open(self.manifest.file_of(name), "rb") as fh:
            yield from iter(lambda: fh.read(CHUNK), b"")

    def raw(self, name: str) -> np.ndarray:
        return np.frombuffer(b"".join(self.chunks(name)), dtype=np.uint8)

    def tensor(self, name: str) -> np.ndarray:
        return decode(self.raw(name), self.entries[name])

    def close(self) -> None:
        if self._gguf is not None:
            self._gguf.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def decode(raw: np.ndarray | bytes, entry: TensorEntry) -> np.ndarray:
    """Stored bytes of ``entry`` -> float32 array in numpy order."""
    raw = np.frombuffer(raw, dtype=np.uint8) if isinstance(raw, bytes) else raw
    return to_float32(raw, entry.type, entry.ne, entry.name)


def copy_layout(layout: Layout) -> Layout:
    from copy import deepcopy

    return deepcopy(layout)


def set_kvs(layout: Layout, values: dict) -> None:
    """Replace or append metadata: ``values`` maps key -> (value type, value, item type)."""
    keep = [kv for kv in layout.kvs if kv.key not in values]
    layout.kvs = keep + [KV(k, t, v, it) for k, (t, v, it) in values.items()]


def with_metadata(src: str | Path, out: str | Path, values: dict) -> Path:
    """Copy the GGUF ``src`` to ``out`` (atomically) with metadata replaced or added; tensor bytes untouched.
    ``values`` maps key -> (value type, value, item type), as :func:`set_kvs` takes them."""
    with Body(src) as body:
        layout = copy_layout(body.layout)
        set_kvs(layout, values)
        return write_layout(out, layout, lambda t: body.chunks(t.name))
