"""The organ folder's ``manifest.json``: everything exact reassembly needs, as plain JSON.

Format (``format_version`` 1): the source (name, bytes, sha256), the GGUF version,
alignment and trailing bytes, every metadata key in file order with its GGUF value type
(and item type for arrays), and per tensor, in file order: name, role, layer, organ, shape
(numpy order), ne (ggml order), type, bytes, original offset, sha256 and file (relative).
Strings that are not valid UTF-8 survive the trip (surrogate escapes).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from gguf.constants import GGMLQuantizationType, GGUFValueType

from birdbone.io.errors import InputError
from birdbone.io.inputs import note_input, read_json
from birdbone.io.gguf_layout import KV, Layout, TensorEntry
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
    for key in ("gguf", "metadata", "tensors"):
        if key not in data:
            raise InputError(path, f"manifest has no {key!r}")
    root = folder.resolve()
    seen = set()
    for m in data["metadata"]:
        try:
            GGUFValueType[m["type"]]
            if m.get("item_type"):
                GGUFValueType[m["item_type"]]
        except (KeyError, TypeError):
            raise InputError(path, f"metadata key {m.get('key')!r} has an unknown GGUF value type {m.get('type')!r}") from None
    for t in data["tensors"]:
        name = t.get("name")
        if name in seen:
            raise InputError(path, f"tensor {name!r} is listed twice")
        seen.add(name)
        try:
            qtype = GGMLQuantizationType[t["type"]]
            n_bytes = tensor_nbytes(qtype, tuple(t["ne"]))
        except (KeyError, TypeError):
            raise InputError(path, f"tensor {name!r}: unknown type {t.get('type')!r} or bad shape") from None
        file = (folder / t["file"]).resolve()
        if not file.is_relative_to(root):
            raise InputError(path, f"tensor {name!r}: file {t['file']!r} leaves the organ folder")
        if not file.is_file():
            raise InputError(path, f"tensor {name!r}: file {t['file']} is missing")
        size = file.stat().st_size
        if size != n_bytes:
            raise InputError(file, f"tensor {name!r} has {size} bytes; its type {t['type']} and shape {t['ne']} need {n_bytes}")
        if t.get("bytes") not in (None, n_bytes):
            t["offset"] = None  # type or shape edited: place the tensor anew
    return Manifest(folder, data)
