"""A precision plan as a file, and a plan applied by llama.cpp.

A plan names one llama.cpp type per matrix of a float GGUF (1-D norms stay as they are), with the
reason for every choice. :func:`apply_plan` hands llama.cpp's quantizer one anchored override per
tensor and checks it wrote exactly the plan; :func:`llama_quantize_command` gives the same plan as
``llama-quantize`` arguments.
"""

from __future__ import annotations

import json
import logging
import re
from collections import Counter
from dataclasses import MISSING, asdict, dataclass, field
from pathlib import Path

from birdbone.io.errors import BirdboneError, InputError, shown
from birdbone.io.inputs import note_input, read_json
from birdbone.io.float_form import float_source

log = logging.getLogger(__name__)
PLAN_VERSION = 1
FILE_TYPE_FOR_OVERRIDES = "Q8_0"  # llama.cpp applies per-tensor overrides only under a quantized file type


@dataclass
class Plan:
    model: str
    source: str  # the float GGUF llama.cpp quantizes
    source_sha256: str
    imatrix: str | None
    method: str
    cap_tensor_bytes: int
    target: str  # what the user asked for, in words
    fixed_bytes: int  # tensors not planned (1-D norms, kept as they are)
    header_bytes: int
    n_params: int
    excluded: list[str]
    types: dict[str, str]  # tensor -> type
    detail: dict[str, dict] = field(default_factory=dict)  # tensor -> bytes, usage, fortress, reasons, screen, exact
    config: dict = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    decode_ms: float | None = None  # predicted by the host's time model (when the plan had a time cap)
    decode_ms_cap: float | None = None

    @property
    def tensor_bytes(self) -> int:
        return self.fixed_bytes + sum(d["bytes"] for d in self.detail.values())

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.tensor_bytes / max(self.n_params, 1)

    def histogram(self) -> dict[str, int]:
        return dict(Counter(self.types.values()).most_common())

    def as_dict(self) -> dict:
        d = asdict(self)
        d = {"version": PLAN_VERSION, **d, "tensor_bytes": self.tensor_bytes, "file_bytes_estimate": self.header_bytes + self.tensor_bytes,
             "bits_per_weight": self.bits_per_weight, "type_histogram": self.histogram()}
        return d


def write_plan(plan: Plan, out: str | Path) -> Path:
    from birdbone.io.atomic import write_text_atomic

    write_text_atomic(out, json.dumps(plan.as_dict(), indent=1) + "\n")
    return Path(out)


def read_plan(path: str | Path) -> Plan:
    path = Path(path)
    note_input(path)
    d = read_json(path, "precision plan")
    if not isinstance(d, dict) or d.get("version") != PLAN_VERSION or not isinstance(d.get("types"), dict):
        raise InputError(path, f"is not a birdbone precision plan (version {PLAN_VERSION} with a 'types' map)")
    from birdbone.io.config import ConfigError, config_from_dict

    keys = {f for f in Plan.__dataclass_fields__}
    missing = sorted(k for k, f in Plan.__dataclass_fields__.items() if k not in d and f.default is MISSING and f.default_factory is MISSING)
    if missing:
        raise InputError(path, f"plan is missing {', '.join(missing)}")
    try:  # every field of its declared type, as a config would be checked
        plan = config_from_dict(Plan, {k: v for k, v in d.items() if k in keys})
    except ConfigError as e:
        raise InputError(path, f"plan: {e}") from None
    for name in ("detail", "config"):
        if not isinstance(getattr(plan, name), dict):
            raise InputError(path, f"plan: {name} {shown(getattr(plan, name))} is not a mapping")
    bad = next(((k, v) for k, v in plan.types.items() if not isinstance(k, str) or not isinstance(v, str)), None)
    bad = bad or next(((k, v) for k, v in plan.detail.items() if not isinstance(v, dict) or not isinstance(v.get("bytes"), int)), None)
    if bad:
        raise InputError(path, f"plan entry {shown(bad[0])}: {shown(bad[1])} is not a type name (types) or a detail with bytes")
    plan.excluded = list(plan.excluded)
    return plan


def overrides(plan_types: dict[str, str]) -> list[str]:
    """One anchored ``REGEX=TYPE`` per tensor, as llama.cpp's quantizer (and llama-quantize) take them."""
    return [f"^{re.escape(n)}$={t}" for n, t in sorted(plan_types.items())]


def llama_quantize_command(plan: Plan, out: str = "OUT.gguf") -> str:
    import shlex

    args = ["llama-quantize"]
    if plan.imatrix:
        args += ["--imatrix", plan.imatrix]
    for o in overrides(plan.types):
        pattern, t = o.rsplit("=", 1)
        args += ["--tensor-type", f"{pattern}={t.lower()}"]
    args += [plan.source, out, FILE_TYPE_FOR_OVERRIDES]
    return " ".join(shlex.quote(a) for a in args)


def planned_names(m) -> list[str]:
    """What a plan assigns a type to: every matrix (1-D norms stay as they are)."""
    return [n for n, t in m.tensors.items() if len(t.shape) >= 2]


def apply_plan(model: str | Path, plan: Plan, out: str | Path, imatrix: str | Path | None = None, threads: int = 0):
    """Quantize ``model`` (its float form) with one type per tensor from ``plan``; checks every
    tensor exists, the type is legal for its width, and llama.cpp wrote exactly the plan."""
    from birdbone.io.hashing import file_sha256
    from birdbone.io.model_file import open_model
    from birdbone.io.quantize import quantize_file
    from birdbone.io.types import legal_type, tensor_type

    source, _ = float_source(model)
    if file_sha256(source) != plan.source_sha256:
        log.warning("the plan was made for %s; %s differs (same names and shapes are still checked)", plan.source, source)
    with open_model(source) as m:
        for n, t in plan.types.items():
            if n not in m.tensors:
                raise BirdboneError(f"the plan names {n}, which {source.name} lacks")
            qt = tensor_type(t)
            if legal_type(qt, m.tensors[n].shape[-1]) != qt:
                raise BirdboneError(f"the plan gives {n} type {t}, illegal for its row width {m.tensors[n].shape[-1]}")
        unplanned = [n for n in planned_names(m) if n not in plan.types]
    if unplanned:
        raise BirdboneError(f"the plan has no type for {len(unplanned)} matrices (e.g. {unplanned[0]})")
    imatrix = imatrix if imatrix is not None else plan.imatrix
    res = quantize_file(source, out, FILE_TYPE_FOR_OVERRIDES, overrides(plan.types), imatrix, threads=threads)
    wrong = {n: (t, res.types.get(n)) for n, t in plan.types.items() if res.types.get(n) != tensor_type(t).name}
    if wrong:
        Path(out).unlink(missing_ok=True)
        n, (want, got) = next(iter(wrong.items()))
        raise BirdboneError(f"llama.cpp wrote {len(wrong)} tensors in other types than planned (e.g. {n}: {got} instead of {want}); nothing written")
    return res
