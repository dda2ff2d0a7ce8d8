"""Rewrite chosen tensors of a model file: the one write path every remodelling takes.

:func:`rewrite_tensors` streams a GGUF (or organ folder) to a new GGUF, replacing each chosen
tensor by ``transform(name, weights)``, stored in its input type (requantized with ggml) or in
``out_type``; every other tensor is copied byte for byte, one tensor in memory at a time.
Provenance keys go into the metadata. ``observe(name, before, after)`` sees each rewritten
tensor as float arrays, ``after`` exactly as stored (decoded back from its type).
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Callable

import numpy as np
from gguf.constants import GGUFValueType

from birdbone.anatomy.body import Body, copy_layout, set_kvs
from birdbone.io.atomic import check_output
from birdbone.io.errors import BirdboneError
from birdbone.io.gguf_layout import write_layout
from birdbone.io.gguf_writer import FILE_TYPE_OF
from birdbone.io.quantize import quantize_tensor
from birdbone.io.types import legal_type, tensor_type

log = logging.getLogger(__name__)
Transform = Callable[[str, np.ndarray], np.ndarray]
Observer = Callable[[str, np.ndarray, np.ndarray], None]


def relative_change(before: np.ndarray, after: np.ndarray) -> float:
    """‖after − before‖ / ‖before‖ (0 for an all-zero tensor)."""
    norm = float(np.linalg.norm(before))
    return float(np.linalg.norm(after - before)) / norm if norm > 0 else 0.0


def rewrite_tensors(body: Body, out: str | Path, names: list[str], transform: Transform, out_type: str | None = None,
                    provenance: dict | None = None, observe: Observer | None = None,
                    progress: Callable[[int, int], None] | None = None) -> dict[str, str]:
    """Write ``body`` to ``out`` with ``names`` transformed; returns name -> type written."""
    unknown = [n for n in names if n not in body.entries]
    if unknown:
        raise BirdboneError(f"{body.path}: no tensor(s) {unknown[:5]}")
    check_output(out, [body.path], need_bytes=sum(t.n_bytes for t in body.layout.tensors) * 2 + 2**20)
    forced = tensor_type(out_type) if out_type else None
    layout = copy_layout(body.layout)
    entries = {t.name: t for t in layout.tensors}
    for t in layout.tensors:
        t.offset = None  # sizes may change: place tensors one after another
    types = {}
    for name in names:  # types are fixed before writing, as the layout's offsets depend on them
        wanted = forced or body.entries[name].type
        entries[name].type = legal_type(wanted, entries[name].ne[0])
        if entries[name].type != wanted:
            log.warning("%s: rows of %d values do not fit %s; writing %s (as llama.cpp does)",
                        name, entries[name].ne[0], wanted.name, entries[name].type.name)
        types[name] = entries[name].type.name
    kvs = dict(provenance or {})
    two_d = [t for t in layout.tensors if len(t.ne) == 2]
    if forced is not None and out_type.upper() in FILE_TYPE_OF and all(t.type == forced for t in two_d):
        kvs["general.file_type"] = (GGUFValueType.UINT32, FILE_TYPE_OF[out_type.upper()], None)
    set_kvs(layout, kvs)
    done = 0

    def rewritten(name: str) -> bytes:
        nonlocal done
        before = body.tensor(name)
        q = quantize_tensor(transform(name, before), entries[name].type, name=name)
        if observe is not None:
            observe(name, before, q.dequantize())
        done += 1
        if progress:
            progress(done, len(names))
        return q.data.tobytes()

    def chunks_of(t):  # one tensor in memory at a time
        return [rewritten(t.name)] if t.name in types else body.chunks(t.name)

    write_layout(out, layout, chunks_of)
    return types


def export_weights(m, out: str | Path, weights: dict[str, np.ndarray], out_type: str = "F16", metadata: dict | None = None,
                   check: Callable[[Path], None] | None = None, progress: Callable[[int, int], None] | None = None) -> Path:
    """Write ``m`` with ``weights`` (GGUF name -> float array) replacing its tensors, as F16/F32 or
    any llama.cpp file type (written as F32 first, then quantized by llama.cpp). ``check(path)``
    sees the float file before it is quantized (a prune run counts its zeros there)."""
    from birdbone.io.gguf_writer import write_like
    from birdbone.io.quantize import via_float

    tensors: dict = {n: (lambda n=n: m.tensor(n)) for n in m.tensors}
    tensors.update(weights)
    with via_float(out, out_type) as (target, float_type):
        write_like(m, target, tensors, float_type, metadata_updates=metadata, progress=progress)
        if check:
            check(target)
    return Path(out)
