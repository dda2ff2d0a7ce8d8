"""``birdbone dissect``: a GGUF becomes a folder of organs, one file per tensor.

One sequential pass over the source: header and padding feed the whole-file sha256, each
tensor's bytes go untouched into its own file and its own sha256. Memory stays bounded by the
copy chunk. The folder appears only when complete (built under a temporary name, renamed).
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from birdbone.anatomy.manifest import FORMAT, FORMAT_VERSION, MANIFEST, ROLE_DIRS, dumps
from birdbone.anatomy.roles import classify
from birdbone.io.atomic import atomic_folder, check_output_folder
from birdbone.io.errors import InputError
from birdbone.io.gguf_layout import layout_of
from birdbone.io.gguf_reader import SPLIT_RE, GGUFFile
from birdbone.io.inputs import note_input
from birdbone.io.model_file import resolve_model_path
from birdbone.io.progress import Progress, tick
from birdbone.io.report import Line

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


def dissect(model: str | Path, out: str | Path, progress: Callable[[int, int], None] | None = None) -> dict:
    src = resolve_model_path(model)
    out = Path(out)
    if SPLIT_RE.match(src.name):
        raise InputError(src, "dissect takes a single-file GGUF; this is one shard of a split model")
    check_output_folder(out, [src])
    with GGUFFile(src) as f, atomic_folder(out) as tmp:
        note_input(src)
        return _dissect_into(f, src, tmp, progress)


def _dissect_into(f: GGUFFile, src: Path, folder: Path, progress) -> dict:
    layout = layout_of(f)
    for d in ROLE_DIRS.values():
        (folder / d).mkdir(parents=True)
    whole = hashlib.sha256()
    pos = 0

    def feed_until(end: int) -> None:  # header / padding bytes between tensors
        nonlocal pos
        if end > pos:
            for piece in f.chunks(pos, end - pos):
                whole.update(piece)
        pos = max(pos, end)

    entries, used = {}, set()
    ordered = sorted(f.tensors.values(), key=lambda t: t.offset)
    for i, t in enumerate(ordered):
        feed_until(t.offset)
        a = classify(t.name)
        base = _UNSAFE.sub("_", t.name)
        rel = f"{ROLE_DIRS[a.role]}/{base}.bin"
        k = 1
        while rel in used:
            k += 1
            rel = f"{ROLE_DIRS[a.role]}/{base}.{k}.bin"
        used.add(rel)
        h = hashlib.sha256()
        with open(folder / rel, "wb") as fh:
            for piece in f.chunks(t.offset, t.n_bytes):
                h.update(piece)
                whole.update(piece)
                fh.write(piece)
        pos = t.offset + t.n_bytes
        entries[t.name] = {
            "name": t.name, "role": a.role, "layer": a.layer, "organ": a.organ,
            "shape": list(reversed(t.ne)), "ne": list(t.ne), "type": t.type.name, "bytes": t.n_bytes,
            "offset": t.offset - f.data_offset, "sha256": h.hexdigest(), "file": rel,
        }
        if progress:
            progress(i + 1, len(ordered))
    feed_until(len(f.buf))
    manifest = {
        "format": FORMAT, "format_version": FORMAT_VERSION,
        "source": {"name": src.name, "bytes": len(f.buf), "sha256": whole.hexdigest()},
        "gguf": {"version": layout.version, "alignment": layout.alignment, "tail": layout.tail},
        "metadata": [{"key": kv.key, "type": kv.type.name, "item_type": kv.item_type.name if kv.item_type else None, "value": kv.value}
                     for kv in layout.kvs],
        "tensors": [entries[t.name] for t in f.tensors.values()],  # file (tensor info) order
    }
    (folder / MANIFEST).write_text(dumps(manifest), encoding="utf-8")
    return manifest


@dataclass
class DissectReport:
    out: Path
    manifest: dict

    @property
    def roles(self) -> dict[str, int]:
        roles: dict[str, int] = {}
        for t in self.manifest["tensors"]:
            roles[t["role"]] = roles.get(t["role"], 0) + 1
        return roles

    def as_dict(self) -> dict:
        return {"out": str(self.out), "source": self.manifest["source"], "tensors": len(self.manifest["tensors"]), "roles": self.roles}

    def render(self) -> list:
        src = self.manifest["source"]
        return [Line(f"dissected {src['name']} into {self.out}: {len(self.manifest['tensors'])} tensors ("
                     + ", ".join(f"{k} {v}" for k, v in self.roles.items()) + f"); source sha256 {src['sha256'][:16]}…")]


def dissect_model(model: str | Path = "builtin", out: str | Path = "organs", progress: Progress | None = None) -> DissectReport:
    """``birdbone dissect``: one file per tensor (stored bytes untouched) plus ``manifest.json``."""
    return DissectReport(Path(out), dissect(model, out, tick(progress, "dissect")))
