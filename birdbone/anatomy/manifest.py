"""The organ folder's ``manifest.json``: everything exact reassembly needs, as plain JSON.

Format (``format_version`` 1): the source (name, bytes, sha256), the GGUF version,
alignment and trailing bytes, every metadata key in file order with its GGUF value type
(and item type for arrays), and per tensor, in file order: name, role, layer, organ, shape
(numpy order), ne (ggml order), type, bytes, original offset, sha256 and file (relative).
Strings that are not valid UTF-8 survive the trip (surrogate escapes).
"""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path

from gguf.constants import GGMLQuantizationType, GGUFValueType

from birdbone.io.errors import BirdboneError, InputError, shown
from birdbone.io.gguf_layout import DEFAULT_ALIGNMENT, KV, Layout, TensorEntry, pack_value
from birdbone.io.inputs import folder_member, note_input, read_json
from birdbone.io.gguf_reader import tensor_nbytes

FORMAT = "birdbone-organs"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
# folder per role ("organ" tensors live in organs/)
ROLE_DIRS = {"skeleton": "skeleton", "organ": "organs", "embed": "embed", "norm": "norm", "adapter": "adapter", "other": "other"}


@dataclass
class Manifest:
    folder: Path
    data: dict

    @property
    def tensors(self) -> list[dict]:
        return self.data["tensors"]

    def layout(self) -> Layout:
        g = self.data["gguf"]
        kvs = [KV(m["key"], GGUFValueType[m["type"]], m["value"], GGUFValueType[m["item_type"]] if m.get("item_type") else None)
               for m in self.data["metadata"]]
        tensors = [TensorEntry(t["name"], tuple(t["ne"]), GGMLQuantizationType[t["type"]], t.get("offset")) for t in self.tensors]
        layout = Layout(kvs, tensors, g["version"])
        layout.tail = g.get("tail", 0)
        return layout

    def file_of(self, name: str) -> Path:
        return self.folder / self.by_name[name]["file"]

    @property
    def by_name(self) -> dict[str, dict]:
        if not hasattr(self, "_by_name"):
            self._by_name = {t["name"]: t for t in self.tensors}
        return self._by_name


def dumps(data: dict) -> str:
    return json.dumps(data, indent=1, ensure_ascii=True)


# (key, type, whether it may be missing) of the manifest's parts; anything else is refused
_GGUF_FIELDS = {"version": int, "alignment": int, "tail": int}
_KV_FIELDS = {"key": str, "type": str}
_TENSOR_FIELDS = {"name": str, "type": str, "ne": list, "file": str}
GGUF_MAX_NAME = 64  # llama.cpp's GGML_MAX_NAME, the terminating NUL included
MAX_TAIL = 2**20  # trailing bytes some writers leave; more is no model


def _fields(obj, spec: dict, what: str, path: Path) -> None:
    if not isinstance(obj, dict):
        raise InputError(path, f"{what} is not a JSON object")
    for key, kind in spec.items():
        if key not in obj:
            raise InputError(path, f"{what} has no {key!r}")
        if not isinstance(obj[key], kind) or isinstance(obj[key], bool):
            raise InputError(path, f"{what}: {key} {shown(obj[key])} is not {kind.__name__}")


def _check_shape(data: dict, path: Path) -> None:
    """Every part present and of its type, before any is used (one-line errors, never a traceback)."""
    for key, kind in (("gguf", dict), ("metadata", list), ("tensors", list)):
        if not isinstance(data.get(key), kind):
            raise InputError(path, f"manifest has no {key!r} {'object' if kind is dict else 'list'}")
    g = data["gguf"]
    _fields(g, {"version": int}, "gguf", path)
    if g["version"] not in (2, 3):
        raise InputError(path, f"gguf version {shown(g['version'])}: birdbone writes GGUF 2 and 3")
    tail = g.get("tail", 0)
    if not isinstance(tail, int) or isinstance(tail, bool) or not 0 <= tail <= MAX_TAIL:
        raise InputError(path, f"gguf tail {shown(tail)}: expected 0 to {MAX_TAIL} trailing bytes")
    for i, m in enumerate(data["metadata"]):
        _fields(m, _KV_FIELDS, f"metadata entry {i}", path)
        if "value" not in m:
            raise InputError(path, f"metadata entry {i} ({shown(m['key'])}) has no value")
    for i, t in enumerate(data["tensors"]):
        _fields(t, _TENSOR_FIELDS, f"tensor entry {i}", path)
        ne = t["ne"]
        if not 1 <= len(ne) <= 4 or not all(isinstance(d, int) and not isinstance(d, bool) and 0 < d < 2**62 for d in ne):
            raise InputError(path, f"tensor {shown(t['name'])}: ne {shown(ne)} is not 1 to 4 positive whole dimensions")
        size = 1
        for d in ne:
            size *= d
        if size >= 2**62:
            raise InputError(path, f"tensor {shown(t['name'])}: ne {shown(ne)} has more elements than any file holds")
        for key in ("offset", "bytes"):
            v = t.get(key)
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 0):
                raise InputError(path, f"tensor {shown(t['name'])}: {key} {shown(v)} is not a whole number of bytes")


def load_manifest(folder: str | Path) -> Manifest:
    """Read and check a manifest against its folder: every file present, inside, of the right size."""
    folder = Path(folder)
    path = folder / MANIFEST
    if not path.exists():
        raise InputError(folder, f"not an organ folder: no {MANIFEST}")
    note_input(folder, folder=True)  # an organ folder is read whole: nothing of this command lands inside it
    data = read_json(path, "organ manifest")
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise InputError(path, f"not a birdbone organ manifest (format must be {FORMAT!r})")
    if data.get("format_version") != FORMAT_VERSION:
        raise InputError(path, f"manifest format_version {data.get('format_version')} is not supported (this birdbone reads {FORMAT_VERSION})")
    _check_shape(data, path)
    seen = set()
    alignment = DEFAULT_ALIGNMENT
    for m in data["metadata"]:
        key = m["key"]
        try:
            vtype = GGUFValueType[m["type"]]
            item = GGUFValueType[m["item_type"]] if m.get("item_type") else None
            pack_value(vtype, m["value"], item)  # the value must be what its type says
        except (KeyError, TypeError):
            raise InputError(path, f"metadata key {shown(key)} has an unknown GGUF value type {shown(m.get('type'))}") from None
        except (struct.error, ValueError, OverflowError, AttributeError, BirdboneError) as e:
            raise InputError(path, f"metadata key {shown(key)}: value {shown(m['value'])} is not a GGUF {m['type']} ({shown(str(e))})") from None
        if key == "general.alignment":
            alignment = m["value"]
            if not isinstance(alignment, int) or alignment < 1 or alignment & (alignment - 1):
                raise InputError(path, f"general.alignment {shown(alignment)} is not a power of two (llama.cpp refuses it)")
    pos = 0
    for t in data["tensors"]:
        name = t["name"]
        if name in seen:
            raise InputError(path, f"tensor {shown(name)} is listed twice")
        seen.add(name)
        if len(name.encode("utf-8", errors="surrogateescape")) >= GGUF_MAX_NAME:
            raise InputError(path, f"tensor name {shown(name)} is {GGUF_MAX_NAME} bytes or longer (llama.cpp refuses it)")
        try:
            qtype = GGMLQuantizationType[t["type"]]
            n_bytes = tensor_nbytes(qtype, tuple(t["ne"]))
        except (KeyError, TypeError, ValueError):
            raise InputError(path, f"tensor {shown(name)}: unknown type {shown(t.get('type'))} or bad shape {shown(t['ne'])}") from None
        expected = pos + (-pos) % alignment
        if t.get("offset") not in (None, expected):
            raise InputError(path, f"tensor {shown(name)}: offset {shown(t['offset'])}, but llama.cpp needs the tensors packed in order "
                                   f"({expected} here); set it to null to place it anew")
        pos = expected + n_bytes
        try:  # by name or by symlink: the folder policy of io/inputs.folder_member
            file = folder_member(folder, folder / t["file"], "tensor file").resolve()
        except InputError:
            raise InputError(path, f"tensor {shown(name)}: file {shown(t['file'])} leaves the organ folder or is no file name") from None
        if not file.is_file():
            raise InputError(path, f"tensor {shown(name)}: file {shown(t['file'])} is missing")
        size = file.stat().st_size
        if size != n_bytes:
            raise InputError(file, f"tensor {shown(name)} has {size} bytes; its type {t['type']} and shape {t['ne']} need {n_bytes}")
        if t.get("bytes") not in (None, n_bytes):
            t["offset"] = None  # type or shape edited: place the tensor anew
    return Manifest(folder, data)
