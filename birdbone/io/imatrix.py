"""Importance matrices in llama.cpp's formats.

Current llama.cpp writes a GGUF with, per weight, ``<name>.in_sum2`` (sums of squared input
activations per input channel, one row per expert) and ``<name>.counts`` (tokens seen per
expert), plus ``imatrix.datasets`` / ``imatrix.chunk_count`` / ``imatrix.chunk_size``. The
legacy ``.dat`` holds per entry ``(name, ncall, values)`` with values = mean × ncall.

Either way, what ``llama_model_quantize`` wants is the per-channel mean, which
:func:`read_imatrix` returns (as llama.cpp's ``load_imatrix`` computes it).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from birdbone.io.errors import InputError, shown
from birdbone.io.inputs import note_input, regular_file
from birdbone.io.gguf_reader import GGUFFile

SUM_SUFFIX, COUNT_SUFFIX = ".in_sum2", ".counts"


@dataclass
class Imatrix:
    values: dict[str, np.ndarray]  # weight name -> mean squared activation per input channel
    datasets: list[str] = field(default_factory=list)
    chunk_count: int = 0
    chunk_size: int = 0
    sums: dict[str, np.ndarray] = field(default_factory=dict)  # raw sums (GGUF format only)
    counts: dict[str, np.ndarray] = field(default_factory=dict)


def read_imatrix(path: str | Path) -> Imatrix:
    path = regular_file(path, "imatrix file")
    note_input(path)
    with open(path, "rb") as fh:
        magic = fh.read(4)
    return _read_gguf(path) if magic == b"GGUF" else _read_legacy(path)


def _read_gguf(path: Path) -> Imatrix:
    with GGUFFile(path) as f:
        sums, counts = {}, {}
        for name, t in f.tensors.items():
            if t.type.name != "F32":
                raise InputError(path, f"imatrix tensor {name!r} must be F32, is {t.type.name}")
            arr = f.raw(name).view(np.float32).reshape(tuple(reversed(t.ne))).copy()
            if name.endswith(SUM_SUFFIX):
                sums[name[: -len(SUM_SUFFIX)]] = arr
            elif name.endswith(COUNT_SUFFIX):
                counts[name[: -len(COUNT_SUFFIX)]] = arr
        if not sums:
            raise InputError(path, "GGUF holds no imatrix data (no *.in_sum2 tensors)")
        if set(sums) != set(counts):
            odd = sorted(set(sums) ^ set(counts))[:3]
            raise InputError(path, f"imatrix sums and counts do not pair up: {odd}")
        ds = f.value("imatrix.datasets", [])
        chunks = [f.value(k, 0) for k in ("imatrix.chunk_count", "imatrix.chunk_size")]
        if not isinstance(ds, (list, tuple)) or not all(isinstance(d, str) for d in ds):
            raise InputError(path, f"imatrix.datasets {shown(ds)} is not a list of names")
        if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in chunks):  # an array is not a count
            raise InputError(path, f"imatrix.chunk_count / chunk_size {shown(chunks)} are not whole numbers")
        out = Imatrix({}, list(ds), chunks[0], chunks[1], sums, counts)
    for name, s in sums.items():
        c = np.rint(counts[name]).reshape(-1)
        if c.size == 0 or s.size % c.size:
            raise InputError(path, f"imatrix {shown(name)}: {s.size} sums cannot split into {c.size} count rows")
        rows = s.reshape(len(c), -1)
        mean = np.where(c[:, None] > 0, rows / np.maximum(c[:, None], 1), 1.0)
        out.values[name] = mean.reshape(-1).astype(np.float32)
    return out


def _read_legacy(path: Path) -> Imatrix:
    data = path.read_bytes()
    pos = 0

    def take(fmt: str, what: str):
        nonlocal pos
        n = struct.calcsize(fmt)
        if pos + n > len(data):
            raise InputError(path, f"not an imatrix file (GGUF or legacy .dat): truncated at {what}, byte {pos}")
        v = struct.unpack_from(fmt, data, pos)
        pos += n
        return v[0]

    n_entries = take("<i", "entry count")
    if not 0 < n_entries < 1_000_000:
        raise InputError(path, f"not an imatrix file (GGUF or legacy .dat): entry count {n_entries}")
    values = {}
    for _ in range(n_entries):
        n = take("<i", "name length")
        if not 0 < n <= 4096 or pos + n > len(data):
            raise InputError(path, f"corrupt legacy imatrix: name length {n} at byte {pos}")
        name = data[pos : pos + n].decode("utf-8", errors="replace")
        pos += n
        ncall, nval = take("<i", "ncall"), take("<i", "nval")
        if nval < 1 or pos + 4 * nval > len(data):
            raise InputError(path, f"corrupt legacy imatrix: {nval} values for {shown(name)}")
        vals = np.frombuffer(data, dtype="<f4", count=nval, offset=pos).astype(np.float32)
        pos += 4 * nval
        values[name] = vals / ncall if ncall > 0 else vals.copy()
    chunk_count, datasets = 0, []
    if pos + 4 <= len(data):
        chunk_count = take("<i", "chunk count")
        if pos + 4 <= len(data):
            n = take("<i", "dataset name length")
            if 0 < n and pos + n <= len(data):
                datasets.append(data[pos : pos + n].decode("utf-8", errors="replace"))
    return Imatrix(values, datasets, chunk_count)


def write_imatrix(path: str | Path, sums: dict[str, np.ndarray], counts: dict[str, np.ndarray],
                  datasets: list[str], chunk_count: int, chunk_size: int) -> None:
    """Write the GGUF imatrix format current llama.cpp reads (atomically)."""
    from gguf.constants import GGMLQuantizationType, GGUFValueType

    from birdbone.io.gguf_layout import KV, Layout, TensorEntry, write_layout

    # an imatrix GGUF has general.type instead of an architecture
    kvs = [KV("general.type", GGUFValueType.STRING, "imatrix"),
           KV("imatrix.datasets", GGUFValueType.ARRAY, list(datasets), GGUFValueType.STRING),
           KV("imatrix.chunk_count", GGUFValueType.UINT32, int(chunk_count)),
           KV("imatrix.chunk_size", GGUFValueType.UINT32, int(chunk_size))]
    arrays = {}
    for name in sorted(sums):
        arrays[name + SUM_SUFFIX] = np.atleast_2d(np.ascontiguousarray(sums[name], dtype=np.float32))
        arrays[name + COUNT_SUFFIX] = np.ascontiguousarray(counts[name], dtype=np.float32).reshape(-1, 1)
    entries = [TensorEntry(n, tuple(reversed(a.shape)), GGMLQuantizationType.F32) for n, a in arrays.items()]
    write_layout(path, Layout(kvs, entries), lambda e: [arrays[e.name].tobytes()])


def shuffle_channels(path: str | Path, out: str | Path, seed: int = 0) -> Path:
    """A control imatrix: each weight's importance values permuted across its input channels.

    Same totals, same distribution, same names and counts — only *which* channel is important
    is destroyed. If a real imatrix helps quantization and this one does not, the help comes
    from knowing the channels, not from the values' overall scale.
    """
    im = read_imatrix(path)
    if not im.sums:
        raise InputError(Path(path), "only the GGUF imatrix format keeps the sums a shuffled copy needs")
    rng = np.random.default_rng(seed)
    sums = {}
    for name, s in im.sums.items():
        rows = s.reshape(s.shape[0] if s.ndim > 1 else 1, -1)
        perm = rng.permutation(rows.shape[1])
        sums[name] = rows[:, perm].reshape(s.shape)
    write_imatrix(out, sums, im.counts, im.datasets + [f"channel-shuffled (seed {seed})"], im.chunk_count, im.chunk_size)
    return Path(out)
