"""Write a GGUF from a parent's metadata and tensors produced one at a time.

A thin layer over :mod:`birdbone.io.gguf_layout`, the one GGUF serializer: metadata is copied
from a parent (every key but ``GGUF.*``; ``general.architecture`` first, as llama.cpp's
writers put it) and then updated; each tensor's bytes come from ``TensorSpec.load`` when its
turn comes, so memory stays bounded by the largest tensor. The file appears only when
complete (temp file, then rename).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from birdbone.io.gguf_layout import KV, Layout, TensorEntry, write_layout
from birdbone.io.gguf_reader import MetaField

# general.file_type (llama_ftype) for the uniform output types birdbone writes itself.
FILE_TYPE_OF = {"F32": 0, "F16": 1, "Q8_0": 7, "BF16": 32}
Metadata = dict[str, tuple[Any, GGUFValueType, GGUFValueType | None]]


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]  # numpy order, in elements
    type: GGMLQuantizationType
    load: Callable[[], np.ndarray]  # returns the stored bytes (uint8) or an array of the type's dtype

    @property
    def n_bytes(self) -> int:
        block, size = GGML_QUANT_SIZES[self.type]
        return int(np.prod(self.shape, dtype=np.int64)) // block * size


def copy_metadata(fields: dict[str, MetaField], skip: Iterable[str] = ()) -> Metadata:
    """Parent metadata as (value, type, item type), ready for :func:`write_gguf`."""
    skip = set(skip) | {"general.architecture"}
    out = {}
    for key, f in fields.items():
        if key in skip or key.startswith("GGUF."):
            continue
        val = f.get()
        if isinstance(val, np.ndarray):
            val = val.tolist()
        out[key] = (val, f.type, f.item_type)
    return out


def write_gguf(out: str | Path, arch: str, metadata: Metadata, tensors: list[TensorSpec],
               progress: Callable[[int, int], None] | None = None) -> Path:
    """Write a GGUF atomically; tensors are loaded one by one, in the order given."""
    kvs = [KV("general.architecture", GGUFValueType.STRING, arch)]
    kvs += [KV(key, vtype, val, sub) for key, (val, vtype, sub) in metadata.items() if key != "general.architecture"]
    specs = {t.name: t for t in tensors}
    entries = [TensorEntry(t.name, tuple(reversed(t.shape)), t.type) for t in tensors]

    def chunks_of(entry: TensorEntry) -> list[bytes]:
        data = np.ascontiguousarray(specs[entry.name].load())
        return [data.tobytes()]

    return write_layout(out, Layout(kvs, entries), chunks_of, progress)
