"""A bounded, lazy GGUF reader.

Why not gguf-py's ``GGUFReader``: it parses every metadata array up front (the tokenizer's
tens of thousands of strings) and, fed a corrupted header, raises raw IndexError /
ValueError / UnicodeDecodeError or spends seconds on absurd counts. This reader memory-maps
the file, checks every count and length against the bytes that are actually there, keeps
metadata arrays as :class:`LazyArray` until asked, and turns every problem into a one-line
:class:`InputError` naming the file and the byte offset.

Format (GGUF v2/v3): magic, version, tensor count, kv count, the kv pairs, the tensor infos
(name, dims in ggml order ``ne[0]`` first, type, offset), padding to ``general.alignment``,
then tensor data.
"""

from __future__ import annotations

import mmap
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
from gguf.constants import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFValueType

from birdbone.io.errors import InputError, shown
from birdbone.io.inputs import regular_file

GGUF_MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32
GGML_MAX_DIMS = 4
GGML_MAX_NAME = 64  # llama.cpp refuses a tensor name this long or longer (the NUL included)
# stored as plain numbers: numpy reads them; gguf-py's dequantize does not
_PLAIN = {GGMLQuantizationType.I8: np.int8, GGMLQuantizationType.I16: np.int16, GGMLQuantizationType.I32: np.int32,
          GGMLQuantizationType.I64: np.int64, GGMLQuantizationType.F64: np.float64}

_SCALAR_FORMATS = {
    GGUFValueType.UINT8: "<B", GGUFValueType.INT8: "<b",
    GGUFValueType.UINT16: "<H", GGUFValueType.INT16: "<h",
    GGUFValueType.UINT32: "<I", GGUFValueType.INT32: "<i",
    GGUFValueType.FLOAT32: "<f", GGUFValueType.BOOL: "<?",
    GGUFValueType.UINT64: "<Q", GGUFValueType.INT64: "<q",
    GGUFValueType.FLOAT64: "<d",
}
_NUMPY_DTYPES = {
    GGUFValueType.UINT8: np.uint8, GGUFValueType.INT8: np.int8,
    GGUFValueType.UINT16: np.uint16, GGUFValueType.INT16: np.int16,
    GGUFValueType.UINT32: np.uint32, GGUFValueType.INT32: np.int32,
    GGUFValueType.FLOAT32: np.float32, GGUFValueType.BOOL: np.bool_,
    GGUFValueType.UINT64: np.uint64, GGUFValueType.INT64: np.int64,
    GGUFValueType.FLOAT64: np.float64,
}
SPLIT_RE = re.compile(r"^(?P<stem>.*)-(?P<no>\d{5})-of-(?P<count>\d{5})\.gguf$")


@dataclass(frozen=True)
class LazyArray:
    """A metadata array left in the file until :meth:`load` is called."""

    buf: Any
    item_type: GGUFValueType
    count: int
    offset: int  # of the first element

    def load(self) -> list | np.ndarray:
        if self.item_type == GGUFValueType.STRING:
            out, pos = [], self.offset
            for _ in range(self.count):
                (n,) = struct.unpack_from("<Q", self.buf, pos)
                out.append(bytes(self.buf[pos + 8 : pos + 8 + n]).decode("utf-8", errors="surrogateescape"))
                pos += 8 + n
            return out
        if self.item_type == GGUFValueType.ARRAY:
            raise NotImplementedError("nested GGUF arrays are not supported")
        dt = np.dtype(_NUMPY_DTYPES[self.item_type]).newbyteorder("<")
        return np.frombuffer(self.buf, dtype=dt, count=self.count, offset=self.offset).copy()

    def __len__(self) -> int:
        return self.count


@dataclass(frozen=True)
class MetaField:
    """One metadata key: its GGUF value type (and item type for arrays) and its value."""

    key: str
    type: GGUFValueType
    value: Any  # python scalar, str, or LazyArray
    item_type: GGUFValueType | None = None

    def get(self) -> Any:
        return self.value.load() if isinstance(self.value, LazyArray) else self.value


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    ne: tuple[int, ...]  # ggml order: ne[0] is the row width
    type: GGMLQuantizationType
    offset: int  # absolute, in the file
    n_bytes: int


class _Cursor:
    """Reads little-endian values from a buffer, refusing to run past its end."""

    def __init__(self, path: Path, buf, pos: int = 0):
        self.path, self.buf, self.pos, self.size = path, buf, pos, len(buf)

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise InputError(self.path, f"truncated or corrupt GGUF: {what} at byte {self.pos} needs {n} bytes, file has {self.size}")

    def unpack(self, fmt: str, what: str):
        n = struct.calcsize(fmt)
        self.need(n, what)
        vals = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += n
        return vals[0] if len(vals) == 1 else vals

    def string(self, what: str) -> str:
        n = self.unpack("<Q", f"{what} length")
        self.need(n, what)
        raw = bytes(self.buf[self.pos : self.pos + n])
        self.pos += n
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise InputError(self.path, f"corrupt GGUF: {what} at byte {self.pos - n} is not UTF-8") from None

    def skip_strings(self, count: int, what: str) -> None:
        for _ in range(count):
            n = self.unpack("<Q", f"{what} length")
            self.need(n, what)
            self.pos += n


def _value_type(cur: _Cursor, raw: int, key: str) -> GGUFValueType:
    try:
        return GGUFValueType(raw)
    except ValueError:
        raise InputError(cur.path, f"corrupt GGUF: metadata key {key!r} has unknown value type {raw}") from None


def _read_value(cur: _Cursor, vtype: GGUFValueType, key: str) -> tuple[Any, GGUFValueType | None]:
    if vtype == GGUFValueType.STRING:
        return cur.string(f"value of {key!r}"), None
    if vtype != GGUFValueType.ARRAY:
        return cur.unpack(_SCALAR_FORMATS[vtype], f"value of {key!r}"), None
    item_type = _value_type(cur, cur.unpack("<I", f"array type of {key!r}"), key)
    count = cur.unpack("<Q", f"array length of {key!r}")
    start = cur.pos
    if item_type == GGUFValueType.STRING:
        if count * 8 > cur.size - cur.pos:
            raise InputError(cur.path, f"corrupt GGUF: array {key!r} claims {count} strings, more than the file holds")
        cur.skip_strings(count, f"array {key!r}")
    elif item_type == GGUFValueType.ARRAY:
        raise InputError(cur.path, f"unsupported GGUF: nested array in {key!r}")
    else:
        cur.need(count * struct.calcsize(_SCALAR_FORMATS[item_type]), f"array {key!r} of {count} items")
        cur.pos += count * struct.calcsize(_SCALAR_FORMATS[item_type])
    return LazyArray(cur.buf, item_type, count, start), item_type


def to_float32(raw: np.ndarray, qtype: GGMLQuantizationType, ne: tuple[int, ...], where: str | os.PathLike) -> np.ndarray:
    """A tensor's stored bytes as float32 in numpy order; a one-line error for a type no
    dequantizer knows (Q8_1 and Q8_K live only inside llama.cpp's kernels)."""
    from gguf.quants import dequantize

    if qtype in _PLAIN:
        arr = raw.view(_PLAIN[qtype])
    else:
        try:
            arr = dequantize(raw, qtype)
        except NotImplementedError:
            raise InputError(where, f"tensor type {qtype.name} cannot be read as numbers (no dequantizer; llama.cpp uses it only "
                                    "inside its kernels)") from None
    return np.asarray(arr, dtype=np.float32).reshape(tuple(reversed(ne)))


def tensor_nbytes(qtype: GGMLQuantizationType, ne: tuple[int, ...]) -> int:
    block, type_size = GGML_QUANT_SIZES[qtype]
    n = 1
    for d in ne:
        n *= d
    return n // block * type_size


class GGUFFile:
    """One GGUF file, memory-mapped and parsed lazily. Use as a context manager or ``close()``."""

    def __init__(self, path: str | os.PathLike):
        self.path = regular_file(path, "GGUF file")  # a FIFO or a device would block or never end
        try:
            self._fh = open(self.path, "rb")
        except OSError as e:
            raise InputError(self.path, f"cannot open: {e.strerror}") from None
        size = os.fstat(self._fh.fileno()).st_size
        if size < 24:
            self._fh.close()
            raise InputError(self.path, f"not a GGUF file: only {size} bytes")
        self._mm = mmap.mmap(self._fh.fileno(), 0, access=mmap.ACCESS_READ)
        self.buf = memoryview(self._mm)
        try:
            self._parse()
        except Exception:
            self.close()
            raise

    def _parse(self) -> None:
        cur = _Cursor(self.path, self.buf)
        if bytes(self.buf[:4]) != GGUF_MAGIC:
            raise InputError(self.path, f"not a GGUF file: magic is {bytes(self.buf[:4])!r}, expected b'GGUF'")
        cur.pos = 4
        self.version = cur.unpack("<I", "version")
        if self.version not in (2, 3):
            raise InputError(self.path, f"unsupported GGUF version {self.version} (birdbone reads 2 and 3)")
        n_tensors = cur.unpack("<Q", "tensor count")
        n_kv = cur.unpack("<Q", "metadata count")
        # Each kv needs >= 8+1+4+1 bytes, each tensor info >= 8+1+4+8+4+8: reject absurd counts at once.
        if n_kv * 14 > cur.size or n_tensors * 33 > cur.size:
            raise InputError(self.path, f"corrupt GGUF header: claims {n_tensors} tensors and {n_kv} metadata keys, more than {cur.size} bytes can hold")
        self.fields: dict[str, MetaField] = {}
        for _ in range(n_kv):
            key = cur.string("metadata key")
            if key in self.fields:
                raise InputError(self.path, f"corrupt GGUF: duplicate metadata key {key!r}")
            vtype = _value_type(cur, cur.unpack("<I", f"type of {key!r}"), key)
            value, item_type = _read_value(cur, vtype, key)
            self.fields[key] = MetaField(key, vtype, value, item_type)
        align_field = self.fields.get("general.alignment")
        if align_field and align_field.type not in (GGUFValueType.UINT8, GGUFValueType.UINT16, GGUFValueType.UINT32, GGUFValueType.UINT64):
            raise InputError(self.path, f"corrupt GGUF: general.alignment has type {align_field.type.name}, expected an unsigned integer")
        self.alignment = int(align_field.value) if align_field else DEFAULT_ALIGNMENT
        if self.alignment <= 0 or self.alignment & (self.alignment - 1):
            raise InputError(self.path, f"corrupt GGUF: alignment {self.alignment} is not a power of two")
        infos = []
        for _ in range(n_tensors):
            name = cur.string("tensor name")
            if len(name.encode("utf-8", errors="surrogateescape")) >= GGML_MAX_NAME:
                raise InputError(self.path, f"corrupt GGUF: tensor name {shown(name)} is {GGML_MAX_NAME} bytes or longer (llama.cpp refuses it)")
            n_dims = cur.unpack("<I", f"dims of {name!r}")
            if not 1 <= n_dims <= GGML_MAX_DIMS:
                raise InputError(self.path, f"corrupt GGUF: tensor {name!r} has {n_dims} dimensions")
            ne = tuple(cur.unpack("<Q", f"shape of {name!r}") for _ in range(n_dims))
            raw_type = cur.unpack("<I", f"type of {name!r}")
            offset = cur.unpack("<Q", f"offset of {name!r}")
            try:
                qtype = GGMLQuantizationType(raw_type)
            except ValueError:
                raise InputError(self.path, f"corrupt GGUF: tensor {name!r} has unknown type {raw_type}") from None
            if qtype not in GGML_QUANT_SIZES:
                raise InputError(self.path, f"unsupported GGUF: tensor {name!r} has type {qtype.name}")
            if ne[0] % GGML_QUANT_SIZES[qtype][0]:
                raise InputError(self.path, f"corrupt GGUF: tensor {name!r} row width {ne[0]} is not a multiple of the {qtype.name} block")
            infos.append((name, ne, qtype, offset))
        self.tensor_info_end = cur.pos
        pad = (-cur.pos) % self.alignment
        self.data_offset = cur.pos + pad
        self.tensors: dict[str, GGUFTensor] = {}
        expected = 0  # llama.cpp's rule: tensors packed in info order, each padded to the alignment
        for name, ne, qtype, offset in infos:
            if name in self.tensors:
                raise InputError(self.path, f"corrupt GGUF: duplicate tensor name {name!r}")
            if any(d > 2**40 for d in ne) or any(d == 0 for d in ne):
                raise InputError(self.path, f"corrupt GGUF: tensor {name!r} claims shape {ne}")
            n_bytes = tensor_nbytes(qtype, ne)
            if offset != expected:
                raise InputError(self.path, f"corrupt GGUF: tensor {name!r} has data offset {offset}, llama.cpp expects {expected} "
                                            "(tensors must be packed in order, aligned, without overlap)")
            expected += n_bytes + (-n_bytes) % self.alignment
            start = self.data_offset + offset
            if start + n_bytes > cur.size:
                raise InputError(self.path, f"truncated GGUF: tensor {name!r} needs bytes {start}..{start + n_bytes}, file has {cur.size}")
            self.tensors[name] = GGUFTensor(name, ne, qtype, start, n_bytes)

    # -- access ---------------------------------------------------------------------------
    def value(self, key: str, default: Any = None) -> Any:
        f = self.fields.get(key)
        return default if f is None else f.get()

    def raw(self, name: str) -> np.ndarray:
        t = self.tensors[name]
        return np.frombuffer(self.buf, dtype=np.uint8, count=t.n_bytes, offset=t.offset)

    def chunks(self, start: int, n: int, size: int = 16 * 2**20) -> Iterator[bytes]:
        """Bytes ``start .. start+n`` in pieces; each piece's pages are released from this
        process after it is read (the data stays in the page cache), so streaming a file of
        any size keeps the resident set at one piece."""
        for pos in range(start, start + n, size):
            end = min(pos + size, start + n)
            yield bytes(self.buf[pos:end])
            page = pos - pos % mmap.PAGESIZE
            self._mm.madvise(mmap.MADV_DONTNEED, page, end - page)

    def close(self) -> None:
        buf, self.buf = getattr(self, "buf", None), None
        if buf is not None:
            buf.release()
        if getattr(self, "_mm", None) is not None:
            try:
                self._mm.close()
            except BufferError:
                pass  # a numpy view is still alive; the map closes when it is collected
        self._fh.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def split_paths(path: Path) -> list[Path]:
    """All shards of a split GGUF given any one of them (llama.cpp's ``-0000k-of-0000N`` naming)."""
    m = SPLIT_RE.match(path.name)
    if not m:
        return [path]
    count = int(m["count"])
    paths = [path.with_name(f"{m['stem']}-{i:05d}-of-{count:05d}.gguf") for i in range(1, count + 1)]
    missing = [p.name for p in paths if not p.exists()]
    if missing:
        raise InputError(path, f"split GGUF is missing shard(s): {', '.join(missing)}")
    return paths
