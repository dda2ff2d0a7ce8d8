"""``birdbone quantize``: llama.cpp's own quantizer by a file mix or by a precision plan, and
(optionally) the result judged against the input's float form in the same call."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from birdbone.evaluate.compare import EvalConfig, EvalReport
from birdbone.io.inputs import note_input
from birdbone.io.errors import BirdboneError
from birdbone.io.progress import Progress
from birdbone.io.quantize import QuantizeResult
from birdbone.io.report import Block, Line, histogram, mib


def fallback_widths(fallbacks: list[str]) -> list[int]:
    """The row widths llama.cpp named in its fallback warnings (``ncols 576 not divisible by 256``)."""
    return sorted({int(w) for line in fallbacks for w in re.findall(r"ncols (\d+)", line)})


@dataclass
class QuantizeReport:
    result: QuantizeResult
    plan: str | None = None  # the plan file, when quantized by a plan
    eval: EvalReport | None = None

    def as_dict(self) -> dict:
        r = self.result
        d = {"out": str(r.out) if r.out else None, "file_type": r.file_type, "dry_run": r.dry_run, "plan": self.plan,
             "file_bytes": r.file_bytes, "tensor_bytes": r.tensor_bytes, "bits_per_weight": r.bits_per_weight,
             "type_histogram": r.type_histogram(), "n_fallbacks": len(r.fallbacks), "fallbacks": r.fallbacks,
             "fallback_widths": fallback_widths(r.fallbacks), "types": r.types}
        if self.eval is not None:
            d["eval"] = self.eval.as_dict()
        return d

    def render(self) -> list[Block]:
        r = self.result
        verb = "would write" if r.dry_run else "wrote"
        mix = f"plan {Path(self.plan).name}" if self.plan else r.file_type
        blocks: list[Block] = [Line(f"{verb} {r.out or '(dry run)'}: {mix}, {mib(r.file_bytes)} MiB, {r.bits_per_weight:.2f} bits per weight"),
                               Line(f"types llama.cpp {verb}: {histogram(r.type_histogram())}")]
        if r.fallbacks:
            widths = ", ".join(map(str, fallback_widths(r.fallbacks))) or "some"
            blocks.append(Line(f"{len(r.fallbacks)} tensor(s) fell back to another type: row widths {widths} are not multiples of "
                               "the type's block (256 for K-quants, 32 for the legacy types)", "yellow"))
        if self.eval is not None:
            blocks += self.eval.render()
        return blocks


def quantize_model(model: str | Path = "builtin", out: str | Path | None = None, type_: str = "Q4_K_M", tensor_types: list[str] = (),
                   imatrix: str | Path | None = None, plan: str | Path | None = None, dry_run: bool = False,
                   evaluate_with: EvalConfig | None = None, text: str | Path | None = None, threads: int | None = None,
                   progress: Progress | None = None) -> QuantizeReport:
    """Quantize ``model`` with a llama.cpp file mix (plus per-tensor overrides), or with one type per
    tensor from a ``plan``; with ``evaluate_with``, score the output against the input's float form."""
    note_input(imatrix, plan, text)  # known before any output is written, so none lands on them
    from birdbone.io.quantize import quantize_file

    if plan is not None:
        from birdbone.remodel.plan import apply_plan, read_plan

        if tensor_types or dry_run or out is None:
            raise BirdboneError("--plan sets every tensor's type and writes a file: give -o/--out, and no --tensor-type or --dry-run")
        res = apply_plan(model, read_plan(plan), out, imatrix, threads=threads or 0)
    else:
        res = quantize_file(model, out, type_, list(tensor_types), imatrix, dry_run=dry_run, threads=threads or 0)
    report = QuantizeReport(res, str(plan) if plan else None)
    if evaluate_with is not None and not dry_run:
        from birdbone.evaluate.compare import evaluate

        report.eval = evaluate(res.out, model, text, evaluate_with, progress)
    return report
