"""``birdbone assemble``: an organ folder becomes a GGUF again.

From an untouched dissection the output is byte-identical to the source: metadata in its
order and types, tensor infos in their order, data at the original offsets. Edits are
allowed where they are visible: a metadata value changed in the manifest is written as
changed; a tensor file whose sha256 no longer matches the manifest is an edit only with
``accept_edits`` (otherwise it is treated as corruption), and it must keep the byte size its
type and shape need. ``split_max_size`` writes shards the way llama.cpp's gguf-split does.
"""

from __future__ import annotations

import hashlib
import logging
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator

from gguf.constants import GGUFValueType

from birdbone.anatomy.manifest import Manifest, load_manifest
from birdbone.io.atomic import check_output
from birdbone.io.errors import BirdboneError, InputError
from birdbone.io.inputs import note_input
from birdbone.io.gguf_layout import CHUNK, KV, Layout, TensorEntry, write_layout
from birdbone.io.progress import Progress, tick
from birdbone.io.report import Line, mib

log = logging.getLogger(__name__)
SPLIT_KEYS = ("split.no", "split.count", "split.tensors.count")
SIZE_UNITS = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


@dataclass
class AssembleResult:
    outputs: list[Path]
    edited: list[str] = field(default_factory=list)
    bytes: int = 0


def parse_size(text: str) -> int:
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)B?\s*", text.upper())
    if not m:
        raise BirdboneError(f"size {text!r}: expected a number with an optional K, M, G or T suffix (e.g. 2G)")
    return int(float(m[1]) * SIZE_UNITS[m[2]])


def _chunks(manifest: Manifest, accept_edits: bool, edited: list[str]) -> Callable[[TensorEntry], Iterator[bytes]]:
    def chunks_of(t: TensorEntry) -> Iterator[bytes]:
        entry = manifest.by_name[t.name]
        path = manifest.file_of(t.name)
        h = hashlib.sha256()
        with open(path, "rb") as fh:
            for block in iter(lambda: fh.read(CHUNK), b""):
                h.update(block)
                yield block
        if entry.get("sha256") and h.hexdigest() != entry["sha256"]:
            if not accept_edits:
                raise InputError(path, f"sha256 differs from the manifest for tensor {t.name!r} (corrupt, or edited: pass --accept-edits)")
            edited.append(t.name)

    return chunks_of


def assemble(organ_dir: str | Path, out: str | Path, accept_edits: bool = False, split_max_size: int | None = None,
             progress: Callable[[int, int], None] | None = None) -> AssembleResult:
    manifest = load_manifest(organ_dir)
    layout = manifest.layout()
    out = Path(out)
    need = sum(t.n_bytes for t in layout.tensors) + 2**20  # from type and shape, checked; not the manifest's word
    edited: list[str] = []
    chunks_of = _chunks(manifest, accept_edits, edited)
    if not split_max_size:
        check_output(out, [], need_bytes=need)
        write_layout(out, layout, chunks_of, progress)
        result = AssembleResult([out], edited, out.stat().st_size)
    else:
        shards = split_layout(layout, split_max_size)
        paths = [out.with_name(f"{out.name.removesuffix('.gguf')}-{i + 1:05d}-of-{len(shards):05d}.gguf") for i in range(len(shards))]
        for p in paths:
            check_output(p, [], need_bytes=need // len(shards))
        for p, shard in zip(paths, shards):
            write_layout(p, shard, chunks_of, progress)
        result = AssembleResult(paths, edited, sum(p.stat().st_size for p in paths))
    if edited:
        log.warning("assembled with %d edited tensor(s): %s", len(edited), ", ".join(edited[:5]))
    return result


def split_layout(layout: Layout, max_size: int) -> list[Layout]:
    """Shards as llama.cpp's gguf-split writes them: all metadata in the first, split keys in each."""
    groups: list[list[TensorEntry]] = [[]]
    size = 0
    for t in layout.tensors:
        if groups[-1] and size + t.n_bytes > max_size:
            groups.append([])
            size = 0
        groups[-1].append(TensorEntry(t.name, t.ne, t.type, None))
        size += t.n_bytes
    kvs = [kv for kv in layout.kvs if kv.key not in SPLIT_KEYS]
    shards = []
    for i, g in enumerate(groups):
        split = [KV("split.no", GGUFValueType.UINT16, i), KV("split.count", GGUFValueType.UINT16, len(groups)),
                 KV("split.tensors.count", GGUFValueType.INT32, len(layout.tensors))]
        # later shards carry only the split keys (and the alignment their offsets rely on)
        shard_kvs = kvs + split if i == 0 else [kv for kv in kvs if kv.key == "general.alignment"] + split
        shards.append(Layout(shard_kvs, g, layout.version))
    return shards


@dataclass
class AssembleReport:
    result: AssembleResult
    identical_to_source: bool  # one output, byte for byte the file the organ folder was dissected from
    validation: dict | None = None  # llama.cpp loaded it and generated (None: --no-validate)
    eval: object | None = None  # an EvalReport, when a text was given

    def as_dict(self) -> dict:
        r = self.result
        d = {"outputs": [str(p) for p in r.outputs], "bytes": r.bytes, "edited": r.edited, "identical_to_source": self.identical_to_source,
             "validation": self.validation}
        if self.eval is not None:
            d["eval"] = self.eval.as_dict()
        return d

    def render(self) -> list:
        r = self.result
        blocks = [Line(f"wrote {', '.join(map(str, r.outputs))} ({mib(r.bytes)} MiB)" + ("; byte-identical to the source" if self.identical_to_source else "")
                       + (f"; edited: {', '.join(r.edited)}" if r.edited else ""))]
        if self.validation:
            blocks.append(Line(f"llama.cpp loads it and generates: {self.validation['generated']!r}"))
        return blocks + (self.eval.render() if self.eval is not None else [])


def assemble_model(organ_dir: str | Path, out: str | Path, accept_edits: bool = False, split_max_size: str | int | None = None,
                   validate: bool = True, text: str | Path | None = None, threads: int | None = None,
                   progress: Progress | None = None) -> AssembleReport:
    """``birdbone assemble``: the organ folder back as a GGUF, checked in llama.cpp, optionally evaluated on ``text``."""
    from birdbone.anatomy.validate import check_written
    from birdbone.io.hashing import file_sha256

    note_input(text)  # known before any output is written, so none lands on it
    size = parse_size(split_max_size) if isinstance(split_max_size, str) else split_max_size
    res = assemble(organ_dir, out, accept_edits, size, tick(progress, "assemble"))
    source = load_manifest(organ_dir).data["source"]
    identical = len(res.outputs) == 1 and file_sha256(res.outputs[0]) == source["sha256"]
    report = AssembleReport(res, identical, check_written(res.outputs[0], validate, text is not None, threads))
    if text is not None:
        from birdbone.evaluate.compare import EvalConfig, evaluate

        report.eval = evaluate(res.outputs[0], None, text, EvalConfig(canary_tokens=0, threads=threads), progress)
    return report
