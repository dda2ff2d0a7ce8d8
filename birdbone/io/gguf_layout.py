"""GGUF byte layout: serialize header, metadata and tensor infos exactly, and place tensor
data at given offsets.

gguf-py's writer recomputes key order and offsets as it likes; reassembling a dissected model
byte for byte needs the original key order, value types and tensor offsets kept as they
were. :func:`write_layout` writes exactly what a :class:`Layout` says, streaming each
tensor's bytes from a callback, padding with zeros as the format requires.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from birdbone.io.atomic import atomic_path
from birdbone.io.errors import BirdboneError
from birdbone.io.gguf_reader import _SCALAR_FORMATS, DEFAULT_ALIGNMENT, GGUF_MAGIC, GGUFFile, tensor_nbytes

CHUNK = 16 * 2**20  # bytes copied per step: peak memory does not grow with the model


@dataclass
class KV:
    key: str
    type: GGUFValueType
    value: Any  # scalar, str (or bytes), or list for arrays
    item_type: GGUFValueType | None = None


@dataclass
class TensorEntry:
    name: str
    ne: tuple[int, ...]  # ggml order
    type: GGMLQuantizationType
    offset: int | None = None  # relative to the data section; None = place after the previous one

    @property
    def n_bytes(self) -> int:
        return tensor_nbytes(self.type, self.ne)


@dataclass
class Layout:
    kvs: list[KV]
    tensors: list[TensorEntry]
    version: int = 3
    tail: int = 0  # zero bytes after the last tensor's padding (some writers leave them)
    alignment: int = field(init=False, default=DEFAULT_ALIGNMENT)

    def __post_init__(self):
        for kv in self.kvs:
            if kv.key == "general.alignment":
                self.alignment = int(kv.value)


def _string(s: str | bytes) -> bytes:
    b = s.encode("utf-8", errors="surrogateescape") if isinstance(s, str) else s
    return struct.pack("<Q", len(b)) + b


def pack_value(vtype: GGUFValueType, value: Any, item_type: GGUFValueType | None = None) -> bytes:
    if vtype == GGUFValueType.STRING:
        return _string(value)
    if vtype == GGUFValueType.ARRAY:
        if item_type is None:
            raise BirdboneError("a GGUF array needs an item type")
        head = struct.pack("<IQ", int(item_type), len(value))
        if item_type == GGUFValueType.STRING:
            return head + b"".join(_string(v) for v in value)
        fmt = _SCALAR_FORMATS[item_type]
        return head + struct.pack(f"<{len(value)}{fmt[1:]}", *value)
    return struct.pack(_SCALAR_FORMATS[vtype], value)


def header_bytes(layout: Layout) -> bytes:
    out = [GGUF_MAGIC, struct.pack("<IQQ", layout.version, len(layout.tensors), len(layout.kvs))]
    for kv in layout.kvs:
        out += [_string(kv.key), struct.pack("<I", int(kv.type)), pack_value(kv.type, kv.value, kv.item_type)]
    for t in layout.tensors:
        if t.ne[0] % GGML_QUANT_SIZES[t.type][0]:
            raise BirdboneError(f"{t.name}: row width {t.ne[0]} is not a multiple of the {t.type.name} block")
        out += [_string(t.name), struct.pack("<I", len(t.ne)), struct.pack(f"<{len(t.ne)}Q", *t.ne),
                struct.pack("<I", int(t.type)), struct.pack("<Q", t.offset)]
    return b"".join(out)


def assign_offsets(layout: Layout) -> None:
    """Offsets for tensors that have none, after the previous one, aligned (as llama.cpp writes)."""
    pos = 0
    for t in layout.tensors:
        if t.offset is None:
            t.offset = pos + (-pos) % layout.alignment
        pos = t.offset + t.n_bytes


def check_offsets(layout: Layout) -> None:
    spans = sorted((t.offset, t.offset + t.n_bytes, t.name) for t in layout.tensors)
    for (a0, a1, an), (b0, _, bn) in zip(spans, spans[1:]):
        if b0 < a1:
            raise BirdboneError(f"tensors {an!r} and {bn!r} overlap in the data section")
    for t in layout.tensors:
        if t.offset % layout.alignment:
            raise BirdboneError(f"tensor {t.name!r} offset {t.offset} is not aligned to {layout.alignment}")


def write_layout(out: str | Path, layout: Layout, chunks_of: Callable[[TensorEntry], Iterable[bytes]],
                 progress: Callable[[int, int], None] | None = None) -> Path:
    """Write ``layout`` atomically; each tensor's bytes come from ``chunks_of(entry)``."""
    assign_offsets(layout)
    check_offsets(layout)
    head = header_bytes(layout)
    data_start = len(head) + (-len(head)) % layout.alignment
    out = Path(out)
    with atomic_path(out) as tmp, open(tmp, "wb") as fh:
        fh.write(head)
        fh.write(b"\0" * (data_start - len(head)))
        end = 0
        ordered = sorted(layout.tensors, key=lambda t: t.offset)
        for i, t in enumerate(ordered):
            fh.write(b"\0" * (t.offset - end))
            written = 0
            for chunk in chunks_of(t):
                fh.write(chunk)
                written += len(chunk)
            if written != t.n_bytes:
                raise BirdboneError(f"tensor {t.name!r}: got {written} bytes, its shape and type need {t.n_bytes}")
            end = t.offset + t.n_bytes
            if progress:
                progress(i + 1, len(ordered))
        fh.write(b"\0" * ((-end) % layout.alignment + layout.tail))
    return out


def layout_of(f: GGUFFile) -> Layout:
    """The exact layout of an open GGUF (key order, types, offsets, trailing bytes)."""
    kvs = []
    for key, field_ in f.fields.items():
        value = field_.get()
        if hasattr(value, "tolist"):
            value = value.tolist()
        kvs.append(KV(key, field_.type, value, field_.item_type))
    tensors = [TensorEntry(t.name, t.ne, t.type, t.offset - f.data_offset) for t in f.tensors.values()]
    layout = Layout(kvs, tensors, f.version)
    end = max((t.offset + t.n_bytes for t in f.tensors.values()), default=f.data_offset)
    padded = end + (-(end - f.data_offset)) % layout.alignment
    layout.tail = max(len(f.buf) - padded, 0)
    return layout
