"""``birdbone graft``: take organs from a donor and put them into a base.

Everything is checked before anything is written: same architecture, the chosen tensors
present in both, same shapes, same types (or ``convert``: the donor's tensor is requantized to
the base's type with :func:`quantize_tensor`, and the share of weights that actually changed is
reported — a small change can round back onto the base's codes). The output is the base,
streamed, with the chosen tensors' bytes replaced and provenance under ``birdbone.graft.*``:
the base's and donor's sha256 and the grafted tensor names, enough to undo it from the base.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from gguf.constants import GGUFValueType

from birdbone.anatomy.body import Body, copy_layout, decode, set_kvs
from birdbone.anatomy.selection import parse_layers, select
from birdbone.io.inputs import note_input
from birdbone.io.atomic import check_output
from birdbone.io.codes import code_change
from birdbone.io.errors import BirdboneError
from birdbone.io.gguf_layout import write_layout
from birdbone.io.quantize import quantize_tensor
from birdbone.io.progress import Progress, tick
from birdbone.io.report import Line

log = logging.getLogger(__name__)


class GraftRefused(BirdboneError):
    """The bodies do not fit together; the message lists every mismatch."""


@dataclass
class GraftResult:
    out: Path
    tensors: list[str]
    converted: dict[str, float] = field(default_factory=dict)  # name -> share of codes changed vs the base (None: not readable)
    changed_share: dict[str, float] = field(default_factory=dict)  # name -> share of dequantized values changed
    codes_changed: dict[str, float | None] = field(default_factory=dict)  # name -> share of integer codes changed


def check_fit(base: Body, donor: Body, names: list[str], convert: bool) -> list[str]:
    problems = []
    if base.architecture != donor.architecture:
        problems.append(f"architecture: base {base.architecture}, donor {donor.architecture}")
    arch = base.architecture
    for key in (f"{arch}.block_count", f"{arch}.embedding_length", f"{arch}.attention.head_count", f"{arch}.attention.head_count_kv"):
        if base.meta(key) != donor.meta(key):
            problems.append(f"{key}: base {base.meta(key)}, donor {donor.meta(key)}")
    for n in names:
        if n not in base.entries:
            problems.append(f"{n}: the base has no such tensor")
            continue
        b, d = base.entries[n], donor.entries[n]
        if b.ne != d.ne:
            problems.append(f"{n}: shape base {list(reversed(b.ne))}, donor {list(reversed(d.ne))}")
        elif b.type != d.type and not convert:
            problems.append(f"{n}: type base {b.type.name}, donor {d.type.name} (pass --convert to requantize the donor's tensor)")
    return problems


def graft(base_path: str | Path, donor_path: str | Path, out: str | Path, layers: str | None = None,
          roles: Iterable[str] | None = None, tensors: str | None = None, convert: bool = False,
          progress: Callable[[int, int], None] | None = None) -> GraftResult:
    out = Path(out)
    with Body(base_path) as base, Body(donor_path) as donor:
        arch = base.architecture
        n_layers = base.meta(f"{arch}.block_count")
        names = select(donor, parse_layers(layers, n_layers), roles, tensors)
        if not names:
            raise GraftRefused("the selection matches no donor tensor (check --layers, --roles, --tensors)")
        problems = check_fit(base, donor, names, convert)
        if problems:
            raise GraftRefused(f"cannot graft {donor.name} into {base.name}: " + "; ".join(problems))
        check_output(out, [base.path, donor.path], need_bytes=sum(t.n_bytes for t in base.layout.tensors) + 2**20)
        replacement: dict[str, bytes] = {}
        result = GraftResult(out, names)
        for n in names:
            b, d = base.entries[n], donor.entries[n]
            if b.type != d.type:
                replacement[n] = quantize_tensor(donor.tensor(n), b.type, name=n).data.tobytes()
            else:
                replacement[n] = donor.raw(n).tobytes()
            new = np.frombuffer(replacement[n], dtype=np.uint8)
            result.changed_share[n] = float(np.mean(decode(new, b) != base.tensor(n)))
            change = code_change(base.raw(n), new, b.type)
            result.codes_changed[n] = None if change is None else change.codes
            if b.type != d.type:
                # a small change can round back onto the base's codes: say how much really moved
                result.converted[n] = result.codes_changed[n] if change is not None else result.changed_share[n]
        layout = copy_layout(base.layout)
        set_kvs(layout, {
            "birdbone.graft.base": (GGUFValueType.STRING, base.name, None),
            "birdbone.graft.base_sha256": (GGUFValueType.STRING, base.sha256, None),
            "birdbone.graft.donor": (GGUFValueType.STRING, donor.name, None),
            "birdbone.graft.donor_sha256": (GGUFValueType.STRING, donor.sha256, None),
            "birdbone.graft.tensors": (GGUFValueType.ARRAY, names, GGUFValueType.STRING),
            "birdbone.graft.converted": (GGUFValueType.ARRAY, sorted(result.converted) or [""], GGUFValueType.STRING),
        })

        def chunks_of(t):
            if t.name in replacement:
                return [replacement[t.name]]
            return base.chunks(t.name)

        write_layout(out, layout, chunks_of, progress)
    log.info("grafted %d tensor(s) from %s", len(names), donor_path)
    return result


@dataclass
class GraftReport:
    result: GraftResult
    validation: dict | None = None
    eval: object | None = None  # an EvalReport against the base, when a text was given

    def as_dict(self) -> dict:
        r = self.result
        d = {"out": str(r.out), "tensors": r.tensors, "converted": r.converted, "changed_share": r.changed_share,
             "codes_changed": r.codes_changed, "validation": self.validation}
        if self.eval is not None:
            d["eval"] = self.eval.as_dict()
        return d

    def render(self) -> list:
        r = self.result
        blocks = [Line(f"grafted {len(r.tensors)} tensor(s) into {r.out}")]
        if r.converted:
            mean = sum(r.converted.values()) / len(r.converted)
            blocks.append(Line(f"{len(r.converted)} converted to the base's types; on average {100 * mean:.2f}% of their quantized codes changed "
                               "(a small change rounds back onto the base's codes)"))
        return blocks + (self.eval.render() if self.eval is not None else [])


def graft_model(base: str | Path, donor: str | Path, out: str | Path, layers: str | None = None, roles: Iterable[str] | None = None,
                tensors: str | None = None, convert: bool = False, validate: bool = True, text: str | Path | None = None,
                threads: int | None = None, progress: Progress | None = None) -> GraftReport:
    """``birdbone graft``: the donor's selected organs in the base, checked in llama.cpp, optionally
    evaluated against the base on ``text`` (an organ-folder base has no file to compare with)."""
    note_input(text)  # known before any output is written, so none lands on them
    from birdbone.anatomy.validate import check_written

    res = graft(base, donor, out, layers, roles, tensors, convert, tick(progress, "graft"))
    report = GraftReport(res, check_written(res.out, validate, text is not None, threads))
    if text is not None:
        from birdbone.evaluate.compare import EvalConfig, evaluate

        base_file = Path(base).is_file()
        report.eval = evaluate(res.out, base if base_file else None, text, EvalConfig(canary_tokens=16 if base_file else 0, threads=threads), progress)
    return report
