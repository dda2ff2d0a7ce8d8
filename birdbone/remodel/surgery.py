"""Structural surgery: which units of a llama-family model stay, as masks and as a smaller model.

A :class:`Keep` says, for every unit a structured prune can remove, whether it stays: per layer
its query heads, its key/value groups (a removed group takes its query heads along, as GQA
requires) and its FFN channels (a gate/up row with its down column); whole layers; and the hidden
(embedding) channels, as Minitron removes them.

The prune loop works on the full-size model with those units masked (:func:`unit_masks`): a
masked unit contributes exactly nothing — a head whose output columns are zero adds nothing to
the residual, an FFN channel whose gate and up rows are zero has activation silu(0)·0 = 0, a layer
with every matrix zero passes its input through — so healing, scoring and the DeltaHistory (which
records the removed units' bits and values and reverts them exactly) need nothing new. Only the
export cuts the units out (:func:`cut_tensors`, :func:`write_structured`): the file is smaller and
llama.cpp multiplies less. One correction makes the cut model equal the masked one when hidden
channels go: RMSNorm divides by the root mean square over the channels it sees, so with E' of E
channels left every norm weight is scaled by √(E / E').
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from birdbone.io.dims import Dims, check_dims, dims_metadata
from birdbone.io.errors import BirdboneError

ATTN = ("attn_q", "attn_k", "attn_v", "attn_output")
FFN = ("ffn_gate", "ffn_up", "ffn_down")
NORMS = ("attn_norm", "ffn_norm", "output_norm")
BLK = re.compile(r"^blk\.(\d+)\.(.+)$")


@dataclass
class Keep:
    dims: Dims
    heads: list[np.ndarray]  # per layer, bool[n_head]
    groups: list[np.ndarray]  # per layer, bool[n_kv]
    ffn: list[np.ndarray]  # per layer, bool[n_ff]
    layers: np.ndarray  # bool[n_layer]
    hidden: np.ndarray  # bool[n_embd]

    @classmethod
    def everything(cls, dims: Dims) -> "Keep":
        return cls(dims, [np.ones(h, bool) for h in dims.n_head], [np.ones(kv, bool) for kv in dims.n_kv],
                   [np.ones(ff, bool) for ff in dims.n_ff], np.ones(dims.n_layer, bool), np.ones(dims.n_embd, bool))

    def copy(self) -> "Keep":
        return Keep(self.dims, [h.copy() for h in self.heads], [g.copy() for g in self.groups], [f.copy() for f in self.ffn],
                    self.layers.copy(), self.hidden.copy())

    def group_of(self, i: int) -> np.ndarray:
        """Layer i's key/value group of each query head (llama.cpp and transformers: head j → group j // (h / kv))."""
        h, kv = self.dims.n_head[i], self.dims.n_kv[i]
        return np.arange(h) // max(h // max(kv, 1), 1)

    def settled(self) -> "Keep":
        """The same choice with its consequences spelled out: a removed group takes its heads, a
        group with no head left goes, a removed layer takes everything in it."""
        k = self.copy()
        for i in range(self.dims.n_layer):
            if not k.layers[i]:
                k.heads[i][:], k.groups[i][:], k.ffn[i][:] = False, False, False
                continue
            k.heads[i] &= k.groups[i][k.group_of(i)]
            for g in range(len(k.groups[i])):
                k.groups[i][g] &= bool(k.heads[i][k.group_of(i) == g].any())
        return k

    def kept_dims(self) -> Dims:
        """The widths after the cut (removed layers gone, the others renumbered)."""
        k = self.settled()
        rows = [i for i in range(self.dims.n_layer) if k.layers[i]]
        return Dims(int(k.hidden.sum()), self.dims.head_dim, tuple(int(k.heads[i].sum()) for i in rows),
                    tuple(int(k.groups[i].sum()) for i in rows), tuple(int(k.ffn[i].sum()) for i in rows))

    def check(self, arch: str | None = None) -> Dims:
        """The kept widths, refused with a one-line reason when llama.cpp could not run them: a
        group must keep as many query heads as every other kept group of its layer."""
        k = self.settled()
        for i in np.flatnonzero(k.layers):
            per_group = {int(k.heads[i][k.group_of(i) == g].sum()) for g in np.flatnonzero(k.groups[i])}
            if len(per_group) > 1:
                raise BirdboneError(f"layer {i} would keep {sorted(per_group)} query heads in different key/value groups: "
                                    "llama.cpp maps head j to group j // (heads / groups), so every group must keep as many")
        d = k.kept_dims()
        check_dims(d, arch)
        return d

    def removed(self) -> dict:
        """What is gone, in words a diff can print: layers, heads and groups per layer, FFN channels per layer, hidden channels."""
        k = self.settled()
        out = {"layers": [int(i) for i in np.flatnonzero(~k.layers)], "heads": {}, "groups": {}, "ffn": {},
               "hidden": [int(i) for i in np.flatnonzero(~k.hidden)]}
        for i in np.flatnonzero(k.layers):
            for key, arr in (("heads", k.heads[i]), ("groups", k.groups[i]), ("ffn", k.ffn[i])):
                gone = np.flatnonzero(~arr)
                if gone.size:
                    out[key][int(i)] = [int(j) for j in gone] if key != "ffn" else int(gone.size)
        return out

    def as_dict(self) -> dict:
        pack = lambda a: "".join("1" if x else "0" for x in a)  # noqa: E731  (compact and diffable)
        return {"dims": self.dims.__dict__, "heads": [pack(h) for h in self.heads], "groups": [pack(g) for g in self.groups],
                "ffn": [pack(f) for f in self.ffn], "layers": pack(self.layers), "hidden": pack(self.hidden)}

    @classmethod
    def from_dict(cls, data: dict) -> "Keep":
        unpack = lambda s: np.array([c == "1" for c in s], bool)  # noqa: E731
        d = data["dims"]
        dims = Dims(d["n_embd"], d["head_dim"], tuple(d["n_head"]), tuple(d["n_kv"]), tuple(d["n_ff"]))
        return cls(dims, [unpack(s) for s in data["heads"]], [unpack(s) for s in data["groups"]], [unpack(s) for s in data["ffn"]],
                   unpack(data["layers"]), unpack(data["hidden"]))


# -- masks on the full-size model ---------------------------------------------------------------------
def _rows_cols(k: Keep, i: int, kind: str) -> tuple[np.ndarray, np.ndarray]:
    """(row mask, column mask) of layer i's ``kind`` matrix, in GGUF's numpy layout (out, in)."""
    hd = k.dims.head_dim
    heads, groups = np.repeat(k.heads[i], hd), np.repeat(k.groups[i], hd)
    on = bool(k.layers[i])
    rows_cols = {"attn_q": (heads, k.hidden), "attn_k": (groups, k.hidden), "attn_v": (groups, k.hidden), "attn_output": (k.hidden, heads),
                 "ffn_gate": (k.ffn[i], k.hidden), "ffn_up": (k.ffn[i], k.hidden), "ffn_down": (k.hidden, k.ffn[i])}[kind]
    return rows_cols[0] & on, rows_cols[1] & on


def unit_masks(keep: Keep) -> dict[str, np.ndarray]:
    """Per block matrix (GGUF names, (out, in) layout), True where a weight belongs to a kept unit."""
    k = keep.settled()
    out = {}
    for i in range(k.dims.n_layer):
        for kind in (*ATTN, *FFN):
            rows, cols = _rows_cols(k, i, kind)
            out[f"blk.{i}.{kind}.weight"] = rows[:, None] & cols[None, :]
    return out


def keep_from_masks(dims: Dims, masks: dict[str, np.ndarray], hidden: np.ndarray | None = None) -> Keep:
    """The units a set of block masks keeps alive (a unit stays while any of its weights does)."""
    k = Keep.everything(dims)
    hd = dims.head_dim
    if hidden is None:  # a hidden channel stays while any matrix still reads it
        readers = [mk for n, mk in masks.items() if n.endswith(("attn_q.weight", "ffn_gate.weight"))]
        alive = np.logical_or.reduce([mk.any(axis=0) for mk in readers]) if readers else None
        hidden = alive if alive is not None and alive.any() else None
    if hidden is not None:
        k.hidden = hidden.copy()
    for i in range(dims.n_layer):
        q, o = masks.get(f"blk.{i}.attn_q.weight"), masks.get(f"blk.{i}.attn_output.weight")
        kk, v = masks.get(f"blk.{i}.attn_k.weight"), masks.get(f"blk.{i}.attn_v.weight")
        g, u, dn = masks.get(f"blk.{i}.ffn_gate.weight"), masks.get(f"blk.{i}.ffn_up.weight"), masks.get(f"blk.{i}.ffn_down.weight")
        if o is not None:
            k.heads[i] = o.reshape(o.shape[0], -1, hd).any(axis=(0, 2)) & (q.reshape(-1, hd, q.shape[1]).any(axis=(1, 2)) if q is not None else True)
        if kk is not None:
            k.groups[i] = kk.reshape(-1, hd, kk.shape[1]).any(axis=(1, 2)) | v.reshape(-1, hd, v.shape[1]).any(axis=(1, 2))
        if dn is not None:
            k.ffn[i] = dn.any(axis=0) & g.any(axis=1) & u.any(axis=1)
        k.layers[i] = bool(k.heads[i].any() or k.ffn[i].any())
    return k.settled()


# -- the cut --------------------------------------------------------------------------------------------
def cut_tensors(get: Callable[[str], np.ndarray], names: list[str], keep: Keep) -> dict[str, np.ndarray]:
    """Every tensor of the cut model (GGUF names, removed layers gone and the rest renumbered),
    from ``get(name)`` (float32, the full-size model's tensors)."""
    k = keep.settled()
    d = k.dims
    norm_scale = math.sqrt(d.n_embd / max(int(k.hidden.sum()), 1))  # RMSNorm over E' instead of E channels
    new_index = {int(i): j for j, i in enumerate(np.flatnonzero(k.layers))}
    out: dict[str, np.ndarray] = {}
    for name in names:
        m = BLK.match(name)
        if m is None:
            w = get(name)
            if name in ("token_embd.weight", "output.weight"):
                out[name] = w[:, k.hidden]
            elif name.startswith("output_norm"):
                out[name] = w[k.hidden] * np.float32(norm_scale)
            else:
                out[name] = w  # rope_freqs and the like: global, untouched
            continue
        i, rest = int(m.group(1)), m.group(2)
        if i not in new_index:
            continue
        kind = rest.split(".")[0]
        attention = bool(k.heads[i].any())
        if (kind in ATTN or kind == "attn_norm") and not attention:
            continue  # an attention-free layer: llama.cpp expects none of these (deci, head_count 0)
        w = get(name)
        target = f"blk.{new_index[i]}.{rest}"
        if kind in NORMS:
            out[target] = w[k.hidden] * np.float32(norm_scale)
        elif rest.endswith(".weight") and kind in (*ATTN, *FFN):
            rows, cols = _rows_cols(k, i, kind)
            out[target] = w[np.ix_(rows, cols)]
        elif rest.endswith(".bias") and kind in (*ATTN, *FFN):
            rows, _ = _rows_cols(k, i, kind)
            out[target] = w[rows]
        else:
            raise BirdboneError(f"{name}: structured surgery does not know this tensor (llama family only so far)")
    return out


def write_structured(source, out: str | Path, keep: Keep, weights: dict[str, np.ndarray] | None = None, out_type: str = "F16",
                     metadata: dict | None = None, progress: Callable[[int, int], None] | None = None) -> Path:
    """Write ``source`` (a float GGUF, llama family) with the units ``keep`` drops cut out, as arch
    ``llama`` when every layer keeps the same widths and ``deci`` otherwise; ``weights`` replaces
    tensors (the healed, masked full-size weights); F16/F32, or a llama.cpp type (written as F32,
    then quantized by llama.cpp). The record of what was cut goes under ``birdbone.structure``."""
    from gguf.constants import GGMLQuantizationType, GGUFValueType

    from birdbone.io.gguf_writer import FILE_TYPE_OF, TensorSpec, _encode, copy_metadata, write_gguf
    from birdbone.io.model_file import open_model
    from birdbone.io.quantize import via_float

    out = Path(out)
    weights = weights or {}
    with open_model(source) as m, via_float(out, out_type) as (target, float_type):
        d = keep.check()
        arch, old = d.arch, m.architecture
        tensors = cut_tensors(lambda n: weights[n] if n in weights else m.tensor(n).astype(np.float32), list(m.tensors), keep)
        meta = {}
        for key, value in copy_metadata(m.metadata).items():
            meta[f"{arch}.{key[len(old) + 1:]}" if key.startswith(old + ".") else key] = value
        meta.update(dims_metadata(d, arch))
        meta["general.file_type"] = (FILE_TYPE_OF[float_type], GGUFValueType.UINT32, None)
        meta["birdbone.structure"] = (json.dumps(keep.removed(), sort_keys=True), GGUFValueType.STRING, None)
        meta.update(metadata or {})
        qtype = GGMLQuantizationType[float_type]
        specs = [TensorSpec(n, w.shape, GGMLQuantizationType.F32 if w.ndim == 1 else qtype,
                            lambda n=n, w=w, t=(GGMLQuantizationType.F32 if w.ndim == 1 else qtype): _encode(_finite(n, w), t, n))
                 for n, w in tensors.items()]
        write_gguf(target, arch, meta, specs, progress)
    return out


def _finite(name: str, w: np.ndarray) -> np.ndarray:
    if not np.isfinite(w).all():
        raise BirdboneError(f"{name}: holds NaN or Inf; refusing to write it")
    return np.ascontiguousarray(w, dtype=np.float32)
