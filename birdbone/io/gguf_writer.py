"""Streaming GGUF writer on top of gguf-py's ``GGUFWriter``.

Tensor infos are declared first, then each tensor's bytes are produced and written one at a
time (``TensorSpec.load``), so memory stays bounded by the largest tensor. Metadata is copied
from a parent (every key but ``GGUF.*`` and ``general.architecture``, which the writer adds)
and then updated. The file appears only when complete (temp file, then rename).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
from gguf import GGUFWriter
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from birdbone.io.atomic import atomic_path
from birdbone.io.gguf_reader import MetaField

# general.file_type (llama_ftype) for the uniform output types birdbone writes itself.
FILE_TYPE_OF = {"F32": 0, "F16": 1, "Q8_0": 7, "BF16": 32}


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


def copy_metadata(fields: dict[str, MetaField], skip: Iterable[str] = ()) -> dict[str, tuple[Any, GGUFValueType, GGUFValueType | None]]:
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


def write_gguf(out: str | Path, arch: str, metadata: dict[str, tuple[Any, GGUFValueType, GGUFValueType | None]],
               tensors: list[TensorSpec], progress: Callable[[int, int], None] | None = None) -> Path:
    """Write a GGUF atomically; tensors are loaded one by one, in the order given."""
    out = Path(out)
    with atomic_path(out) as tmp:
        w = GGUFWriter(str(tmp), arch=arch, use_temp_file=False)
        for key, (val, vtype, sub) in metadata.items():
            w.add_key_value(key, val, vtype, sub)
        for t in tensors:
            if t.type in (GGMLQuantizationType.F32, GGMLQuantizationType.F16):
                dtype = np.float32 if t.type == GGMLQuantizationType.F32 else np.float16
                w.add_tensor_info(t.name, t.shape, np.dtype(dtype), t.n_bytes, raw_dtype=t.type)
            else:
                block, size = GGML_QUANT_SIZES[t.type]
                byte_shape = (*t.shape[:-1], t.shape[-1] // block * size)
                w.add_tensor_info(t.name, byte_shape, np.dtype(np.uint8), t.n_bytes, raw_dtype=t.type)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_ti_data_to_file()
        for i, t in enumerate(tensors):
            data = np.ascontiguousarray(t.load())
            if data.nbytes != t.n_bytes:
                raise ValueError(f"{t.name}: produced {data.nbytes} bytes, expected {t.n_bytes} for {t.type.name} {t.shape}")
            w.write_tensor_data(data)
            if progress:
                progress(i + 1, len(tensors))
        w.close()
    return out
