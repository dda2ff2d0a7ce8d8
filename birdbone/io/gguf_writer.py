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

from birdbone.io.errors import BirdboneError
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


def _encode(arr: np.ndarray, qtype: GGMLQuantizationType, name: str) -> np.ndarray:
    if qtype == GGMLQuantizationType.F32:
        return np.ascontiguousarray(arr, dtype=np.float32)
    if qtype == GGMLQuantizationType.F16:
        return np.ascontiguousarray(arr, dtype=np.float16)
    from birdbone.io.quantize import quantize_tensor

    return quantize_tensor(arr, qtype, name=name).data


def float_specs(tensors: dict[str, np.ndarray | Callable[[], np.ndarray]], out_type: str,
                shapes: dict[str, tuple[int, ...]] | None = None) -> list[TensorSpec]:
    """Float tensors (arrays or loaders) as specs in ``out_type``, in the order given: 1-D tensors
    (norms, biases) stay F32, as llama.cpp's converter keeps them; a shape other than ``shapes``
    says, or NaN or Inf, is refused when its turn comes (before the file appears)."""
    from birdbone.io.types import tensor_type

    qtype = tensor_type(out_type.upper())
    specs = []
    for name, src in tensors.items():
        shape = shapes[name] if shapes is not None else np.shape(src)
        t = GGMLQuantizationType.F32 if len(shape) == 1 else qtype

        def load(src=src, name=name, shape=shape, t=t):
            arr = np.asarray(src() if callable(src) else src, dtype=np.float32)
            if arr.shape != tuple(shape):
                raise BirdboneError(f"{name}: shape {arr.shape} differs from the parent's {tuple(shape)}")
            if not np.isfinite(arr).all():
                raise BirdboneError(f"{name}: holds NaN or Inf; refusing to write it")
            return _encode(arr, t, name)

        specs.append(TensorSpec(name, tuple(shape), t, load))
    return specs


def write_like(parent, out: str | Path, tensors: dict[str, np.ndarray | Callable[[], np.ndarray]],
               out_type: str = "F16", metadata_updates: dict | None = None,
               progress: Callable[[int, int], None] | None = None) -> Path:
    """Write ``tensors`` (GGUF names -> float arrays or loaders) with ``parent``'s metadata and order
    (``parent``: a GGUF :class:`~birdbone.io.model_file.ModelFile`). 1-D tensors (norms, biases) stay
    F32, as llama.cpp's converter keeps them; NaN or Inf is refused before anything is written."""
    if parent.format != "gguf":
        raise BirdboneError(f"{parent.path}: the metadata parent must be a GGUF")
    out_type = out_type.upper()
    if out_type not in FILE_TYPE_OF:
        raise BirdboneError(f"output type {out_type!r}: choose one of {', '.join(FILE_TYPE_OF)}")
    missing = [n for n in parent.tensors if n not in tensors]
    extra = [n for n in tensors if n not in parent.tensors]
    if missing or extra:
        raise BirdboneError(f"tensors do not match the parent {parent.path.name}: missing {missing[:5]}, unexpected {extra[:5]}")
    specs = float_specs({n: tensors[n] for n in parent.tensors}, out_type, {n: info.shape for n, info in parent.tensors.items()})
    meta = copy_metadata(parent.metadata)
    meta["general.file_type"] = (FILE_TYPE_OF[out_type], GGUFValueType.UINT32, None)
    for key, val in (metadata_updates or {}).items():
        meta[key] = val
    return write_gguf(out, parent.architecture, meta, specs, progress)
