"""What changed between two models, tensor by tensor: ``birdbone diff A B``.

Stored bytes decide "changed"; the numbers come from the dequantized floats, one pair of tensors
in memory at a time: relative delta norm ‖B − A‖ / ‖A‖, the share of exact zeros on each side,
and how many weights B pruned (zero in B, not in A) and regrew (the reverse). Rows roll up per
role and per layer. Both models must use one naming (two GGUFs, or two Hugging Face folders).
"""

from __future__ import annotations

import json

from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from birdbone.anatomy.roles import classify
from birdbone.io.errors import BirdboneError
from birdbone.io.model_file import open_model


@dataclass(frozen=True)
class TensorDiff:
    name: str
    role: str
    layer: int | None
    changed: bool
    type_a: str
    type_b: str
    shape_a: tuple[int, ...]
    shape_b: tuple[int, ...]
    bytes_a: int
    bytes_b: int
    rel_delta: float | None  # None when the shapes differ
    zeros_a: float
    zeros_b: float
    pruned: int
    regrown: int


@dataclass
class ModelDiff:
    a: str
    b: str
    tensors: list[TensorDiff]
    only_a: list[str] = field(default_factory=list)
    only_b: list[str] = field(default_factory=list)
    structure: dict | None = None  # the units B's structured export removed (its birdbone.structure record)

    def rollup(self, key: Callable[[TensorDiff], object]) -> list[dict]:
        groups: dict = defaultdict(list)
        for t in self.tensors:
            groups[key(t)].append(t)
        rows = []
        for k, ts in sorted(groups.items(), key=lambda kv: (kv[0] is None, str(kv[0]) if not isinstance(kv[0], int) else f"{kv[0]:06d}")):
            deltas = [t.rel_delta for t in ts if t.rel_delta is not None]
            rows.append({"group": k, "tensors": len(ts), "changed": sum(t.changed for t in ts), "bytes_a": sum(t.bytes_a for t in ts),
                         "bytes_b": sum(t.bytes_b for t in ts), "rel_delta_mean": float(np.mean(deltas)) if deltas else None,
                         "pruned": sum(t.pruned for t in ts), "regrown": sum(t.regrown for t in ts)})
        return rows

    def as_dict(self) -> dict:
        return {"a": self.a, "b": self.b, "changed": sum(t.changed for t in self.tensors), "tensors": len(self.tensors),
                "bytes_a": sum(t.bytes_a for t in self.tensors), "bytes_b": sum(t.bytes_b for t in self.tensors),
                "only_a": self.only_a, "only_b": self.only_b, "structure": self.structure,
                "by_role": self.rollup(lambda t: t.role), "by_layer": self.rollup(lambda t: t.layer),
                "per_tensor": [asdict(t) for t in self.tensors]}

    def render(self) -> list:
        from birdbone.io.report import Line, Table, fmt, mib

        s = self.as_dict()
        table = Table(["role", "tensors", "changed", "MiB A", "MiB B", "mean rel. delta", "pruned", "regrown"],
                      title=f"{Path(self.a).name} → {Path(self.b).name}: {s['changed']} of {s['tensors']} tensors changed")
        for r in s["by_role"]:
            table.add(r["group"], r["tensors"], r["changed"], mib(r["bytes_a"]), mib(r["bytes_b"]), fmt(r["rel_delta_mean"], ".4f"),
                      f"{r['pruned']:,}", f"{r['regrown']:,}")
        extra = [Line(f"only in A: {len(self.only_a)} tensors, only in B: {len(self.only_b)}")] if self.only_a or self.only_b else []
        if self.structure:
            r = self.structure
            extra.append(Line("B is structured: removed layers " + (", ".join(map(str, r["layers"])) or "none")
                              + "; query heads " + ("; ".join(f"layer {k}: {', '.join(map(str, v))}" for k, v in r["heads"].items()) or "none")
                              + "; FFN channels " + (", ".join(f"layer {k}: {v}" for k, v in r["ffn"].items()) or "none")
                              + f"; hidden channels {len(r['hidden'])} (layers renumbered after the removed ones; tensors compared by name)"))
        return [table, *extra]


def compare_arrays(a: np.ndarray, b: np.ndarray) -> tuple[float | None, float, float, int, int]:
    """(relative delta norm, zero share of a, zero share of b, pruned, regrown) of two float tensors."""
    za, zb = a == 0, b == 0
    if a.shape != b.shape:
        return None, float(za.mean()), float(zb.mean()), 0, 0
    base = float(np.linalg.norm(a.astype(np.float64)))
    delta = float(np.linalg.norm(b.astype(np.float64) - a.astype(np.float64)))
    rel = delta / base if base > 0 else (0.0 if delta == 0 else float("inf"))
    return rel, float(za.mean()), float(zb.mean()), int((zb & ~za).sum()), int((za & ~zb).sum())


def diff_models(a_path: str | Path, b_path: str | Path, progress: Callable[[int, int], None] | None = None) -> ModelDiff:
    """Compare every tensor the two models share by name."""
    with open_model(a_path) as a, open_model(b_path) as b:
        shared = [n for n in a.tensors if n in b.tensors]
        if not shared:
            raise BirdboneError(f"{a.path} and {b.path} share no tensor names (GGUF and Hugging Face names differ: convert one first)")
        rows = []
        for i, n in enumerate(shared):
            ta, tb = a.tensors[n], b.tensors[n]
            same_bytes = ta.type == tb.type and ta.shape == tb.shape and a.raw(n).tobytes() == b.raw(n).tobytes()
            if same_bytes:
                wa = a.tensor(n)
                zeros = float((wa == 0).mean())
                stats = (0.0, zeros, zeros, 0, 0)
            else:
                stats = compare_arrays(a.tensor(n), b.tensor(n))
            anat = classify(n)
            rows.append(TensorDiff(n, anat.role, anat.layer, not same_bytes, str(ta.type), str(tb.type), tuple(ta.shape), tuple(tb.shape),
                                   ta.n_bytes, tb.n_bytes, *stats))
            if progress:
                progress(i + 1, len(shared))
        record = b.meta("birdbone.structure") if b.format == "gguf" else None
        return ModelDiff(str(a.path), str(b.path), rows, [n for n in a.tensors if n not in b.tensors], [n for n in b.tensors if n not in a.tensors],
                         json.loads(record) if record else None)


def markdown(d: ModelDiff) -> str:
    """A short human summary: totals, per role, the tensors that moved most."""
    s = d.as_dict()
    lines = [f"# diff: {Path(d.a).name} → {Path(d.b).name}", "",
             f"{s['changed']} of {s['tensors']} shared tensors changed; {s['bytes_a']:,} → {s['bytes_b']:,} tensor bytes "
             f"({100 * s['bytes_b'] / max(1, s['bytes_a']):.1f} %).", ""]
    if d.only_a or d.only_b:
        lines += [f"only in A: {len(d.only_a)} tensors; only in B: {len(d.only_b)} tensors", ""]
    lines += ["| role | tensors | changed | bytes A | bytes B | mean rel. delta | pruned | regrown |", "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in s["by_role"]:
        rel = "-" if r["rel_delta_mean"] is None else f"{r['rel_delta_mean']:.4f}"
        lines.append(f"| {r['group']} | {r['tensors']} | {r['changed']} | {r['bytes_a']:,} | {r['bytes_b']:,} | {rel} | {r['pruned']:,} | {r['regrown']:,} |")
    moved = sorted((t for t in d.tensors if t.rel_delta), key=lambda t: -t.rel_delta)[:10]
    if moved:
        lines += ["", "Moved most:", "", "| tensor | type A → B | rel. delta | zeros A → B |", "|---|---|---:|---:|"]
        lines += [f"| {t.name} | {t.type_a} → {t.type_b} | {t.rel_delta:.4f} | {100 * t.zeros_a:.1f} % → {100 * t.zeros_b:.1f} % |" for t in moved]
    return "\n".join(lines) + "\n"
