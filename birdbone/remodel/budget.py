"""The precision budget: one llama.cpp type per tensor, chosen under a byte cap.

llama.cpp's mixes (Q4_K_M ...) pick types by a fixed rule; a plan picks them from what was
measured. :class:`Planner` measures once — the float source, every tensor's ladder
(:mod:`~birdbone.remodel.ladder`), its usage from the profile and its sensitivity
(:mod:`~birdbone.remodel.sensitivity`) — and plans any cap with either planner
(:mod:`~birdbone.remodel.planners`), giving a :class:`~birdbone.remodel.plan.Plan`.
:func:`budget_model` is the ``birdbone budget`` verb.
"""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from birdbone.io.inputs import note_input
from birdbone.io.errors import BirdboneError, InputError
from birdbone.io.float_form import float_source
from birdbone.io.types import file_type
from birdbone.io.progress import Progress
from birdbone.remodel.ladder import BASE, LADDER, Ladder, grid_artifacts, options_for
from birdbone.remodel.plan import Plan, llama_quantize_command, planned_names, read_plan, write_plan
from birdbone.remodel.planners import plan_greedy, plan_usage
from birdbone.remodel.sensitivity import Sensitivity, SensitivityConfig

log = logging.getLogger(__name__)

METHODS = ("usage", "greedy")
ALIGNMENT_ALLOWANCE = 32  # bytes of padding a GGUF may add per tensor


@dataclass(frozen=True)
class StressConfig:
    delta: float = 0.01  # δ: relative rise of the held-out loss with the tensor alone in its planned type
    gamma: float = 2.0  # γ: gradient RMS above γ × the mean over tensors
    boost_bits: float = 4.0  # Δp: extra bits for a stressed tensor (up to F16)
    check_top: int = 8  # tensors checked exactly: the top of the first-order screen

    def __post_init__(self):
        if self.delta <= 0 or self.gamma <= 0 or self.boost_bits < 0 or self.check_top < 0:
            raise ValueError("stress: delta and gamma must be > 0, boost_bits and check_top ≥ 0")


@dataclass(frozen=True)
class BudgetConfig:
    method: str = "greedy"  # greedy (sensitivity per byte; it won every size in benchmarks/budget_frontier.py) or usage (the bird-bone schedule)
    types: tuple[str, ...] = LADDER  # the ladder, smallest first; ties keep the earlier type
    exclude: tuple[str, ...] = ("auto",)  # never plan these; "auto": the source's own quantization grid
    base: tuple[str, ...] = BASE  # the base precision a low-usage tensor drops to (first legal)
    p_init: float = 8.0  # starting bits per weight
    rounds: int = 5  # R
    alpha_first: float = 0.3
    alpha_last: float = 0.7
    fill: bool = True  # spend bytes left under the cap on the highest-usage tensors (up to p_init)
    stress: StressConfig = field(default_factory=StressConfig)
    sensitivity: SensitivityConfig = field(default_factory=SensitivityConfig)
    max_decode_ms: float | None = None  # time cap: predicted ms per decoded token in llama.cpp on this host (greedy only)
    no_slower_than: str | None = None  # time cap: no slower than this llama.cpp mix of the same model (e.g. Q4_K_M), predicted

    def __post_init__(self):
        from birdbone.io.types import tensor_type

        if self.method not in METHODS:
            raise ValueError(f"method {self.method!r}: choose one of {', '.join(METHODS)}")
        for t in (*self.types, *self.base, *(e for e in self.exclude if e != "auto")):
            tensor_type(t)
        if self.rounds < 1 or not 0.0 <= self.alpha_first <= self.alpha_last <= 1.0:
            raise ValueError("rounds ≥ 1 and 0 ≤ alpha_first ≤ alpha_last ≤ 1")
        if not 1.0 <= self.p_init <= 32.0:
            raise ValueError(f"p_init {self.p_init} is outside [1, 32] bits")
        if self.max_decode_ms is not None and self.no_slower_than is not None:
            raise ValueError("give at most one time cap: max_decode_ms or no_slower_than")
        if (self.max_decode_ms is not None or self.no_slower_than is not None) and self.method != "greedy":
            raise ValueError("a time cap needs method greedy (the usage schedule has no time model)")
        if self.max_decode_ms is not None and self.max_decode_ms <= 0:
            raise ValueError(f"max_decode_ms {self.max_decode_ms} must be > 0")
        if self.no_slower_than is not None:
            file_type(self.no_slower_than)

    def alpha(self, k: int) -> float:
        """α_k, k = 1..R."""
        if self.rounds == 1:
            return self.alpha_first
        return self.alpha_first + (self.alpha_last - self.alpha_first) * (k - 1) / (self.rounds - 1)



def usage_scores(usage, names: list[str]) -> dict[str, float | None]:
    """s_b = ū_b / max ū within the tensor's layer (tensors outside the blocks form their own group)."""
    mean = {n: float(usage.importance(n).mean()) for n in names if n in usage.in_sum2}
    group = {n: n.split(".")[1] if n.startswith("blk.") else n for n in names}
    top: dict[str, float] = {}
    for n, u in mean.items():
        top[group[n]] = max(top.get(group[n], 0.0), u)
    return {n: (mean[n] / top[group[n]] if top[group[n]] > 0 else 1.0) if n in mean else None for n in names}


def cap_bytes(target_bpw: float | None, target_bytes: int | None, n_params: int, header_bytes: int, n_tensors: int) -> int:
    """The cap on tensor bytes: bpw over all parameters, or file bytes less the header and padding."""
    if (target_bpw is None) == (target_bytes is None):
        raise BirdboneError("give exactly one of --target-bpw and --target-bytes")
    if target_bpw is not None:
        if not 0.0 < target_bpw <= 32.0:
            raise BirdboneError(f"--target-bpw {target_bpw}: expected bits per weight in (0, 32]")
        return int(target_bpw * n_params / 8)
    cap = target_bytes - header_bytes - ALIGNMENT_ALLOWANCE * n_tensors
    if cap <= 0:
        raise BirdboneError(f"--target-bytes {target_bytes:,} is below the file's header ({header_bytes:,} bytes)")
    return cap


def dry_mix(source: Path, mix: str, imatrix: str | Path | None):
    """llama.cpp's dry run of a mix (Q4_K_M ...) of ``source``: its file size and type per tensor."""
    from birdbone.io.quantize import quantize_file

    return quantize_file(source, None, mix, imatrix=imatrix, dry_run=True)


@dataclass
class Planner:
    """Everything a plan needs, measured once: the float source, its ladders, usage and sensitivity.
    :meth:`plan` then plans any cap with either method (a benchmark plans many from one measurement)."""

    model: str
    source: Path
    source_sha256: str
    imatrix: Path | None
    cfg: BudgetConfig
    shapes: dict[str, tuple[int, ...]]
    exclude: set[str]
    scores: dict[str, float | None]
    fixed_bytes: int
    header_bytes: int
    n_params: int
    sens: Sensitivity
    notes: list[str]
    tensor_exclude: dict[str, set[str]] = field(default_factory=dict)  # a tensor's own grid and that grid's artifacts
    grids: dict[str, str] = field(default_factory=dict)  # each excluded tensor's own grid

    def excluded_for(self, name: str, shared: frozenset[str] = frozenset()) -> set[str]:
        """``shared``: tensors the reference mix itself puts back on their own grid, which they may keep."""
        own = {self.grids[name]} if name in shared else set()
        return self.exclude | (self.tensor_exclude.get(name, set()) - own)

    def shared_grids(self, mix_types: dict[str, str]) -> frozenset[str]:
        """The tensors the target mix (``mix_types``, its type per tensor) gives their own grid: there
        the reference gets the lossless rebuild as well, so refusing it would lose for a reason that
        is not skill (a Hub Q4_K_M parent at Q4_K_M's size). Elsewhere the grid stays excluded (the
        built-in model's Q4_1, which no K mix writes)."""
        return frozenset(n for n, g in self.grids.items() if mix_types.get(n) == g)

    @classmethod
    def open(cls, model: str | Path, usage_dir: str | Path, text: str | Path | None, cfg: BudgetConfig,
             progress: Progress | None = None, grid: str | dict[str, str] | None = None) -> "Planner":
        """``grid``: the quantized grid ``model``'s weights sit on when ``model`` is already a float file
        (a remodelled form of a quantized input): one type, or each tensor's; by default, the types
        ``model``'s own tensors are stored in, tensor by tensor (a Hub file is a mix)."""
        from birdbone.io.hashing import file_sha256
        from birdbone.io.model_file import open_model
        from birdbone.io.runtime import tokenize_texts
        from birdbone.io.text import load_text
        from birdbone.io.types import canonical
        from birdbone.measure.usage import read_profile
        from birdbone.remodel.sensitivity import measure_sensitivity

        usage = read_profile(usage_dir)
        imatrix = Path(usage_dir) / "imatrix.gguf"
        source, stored_grid = float_source(model, progress)
        with open_model(source) as m:
            names = planned_names(m)
            shapes = {n: m.tensors[n].shape for n in names}
            fixed = sum(t.n_bytes for n, t in m.tensors.items() if n not in shapes)
            header, n_params = m.file_bytes - m.tensor_bytes, m.n_params
        strangers = sorted(set(usage.in_sum2) - set(shapes))
        if strangers:
            raise InputError(usage_dir, f"profile names tensors the model lacks (e.g. {strangers[0]}); it was made for another model")
        for n in usage.in_sum2:
            if usage.in_sum2[n].shape[-1] != shapes[n][-1]:
                raise InputError(usage_dir, f"profile's {n} has {usage.in_sum2[n].shape[-1]} channels, the model's has {shapes[n][-1]}: "
                                            "it was made for another model")
        importance = {n: (usage.importance(n) if n in usage.in_sum2 else None) for n in names}
        grids = tensor_grids(model, names, grid, stored_grid) if "auto" in cfg.exclude else {}
        with open_model(source) as m:
            artifacts = grid_artifacts(m, names, cfg.types, importance, grids) if grids else {}
        exclude = {canonical(e) for e in cfg.exclude if e != "auto"}
        tensor_exclude = {n: {g, *artifacts.get(g, {})} for n, g in grids.items()}
        empty = [n for n in names if not options_for(shapes[n], cfg.types, exclude | tensor_exclude.get(n, set()))]
        if empty:
            raise BirdboneError(f"{empty[0]}: no type on the ladder is legal for its row width {shapes[empty[0]][-1]}")
        text_body, text_name = load_text(text)
        tokens, = tokenize_texts(source, text_body)
        sens = measure_sensitivity(source, tokens, names, importance, cfg.sensitivity, progress)
        notes = [f"sensitivity text: {text_name} ({len(tokens):,} tokens; the last {cfg.sensitivity.val_tokens} held out for exact checks)"]
        for g, n in sorted(Counter(grids.values()).items()):
            also = artifacts.get(g, {})
            notes.append(f"{g} excluded on the {n} tensors stored in it: their F16 form sits on that grid, so {g} would be lossless by construction"
                         + ("; also " + ", ".join(f"{t} (relative error {e:.1e})" for t, e in sorted(also.items()))
                            + ", which rebuild them better than Q8_0 does" if also else ""))
        narrow = sorted({shapes[n][-1] for n in names if shapes[n][-1] % 256})
        if narrow:
            notes.append(f"row widths {', '.join(map(str, narrow))} are not multiples of 256: those tensors cannot take K-quants (32-block types only)")
        return cls(str(model), source, file_sha256(source), imatrix if imatrix.exists() else None, cfg, shapes, exclude,
                   usage_scores(usage, names), fixed, header, n_params, sens, notes, tensor_exclude, grids)

    def cap(self, target_bpw: float | None = None, target_bytes: int | str | None = None) -> tuple[int, str, dict[str, str]]:
        """The cap on planned tensors' bytes, the target in words, and the type per tensor of the
        llama.cpp mix ``target_bytes`` names (``Q4_K_M``; empty when it names none): one dry run."""
        from birdbone.io.types import canonical

        if isinstance(target_bytes, str) and target_bytes.strip().isdigit():
            target_bytes = int(target_bytes)
        mix_types: dict[str, str] = {}
        if isinstance(target_bytes, str):
            mix = canonical(target_bytes)
            ref = dry_mix(self.source, mix, self.imatrix)
            target_bytes, mix_types = ref.file_bytes, ref.types
            words = f"the size of llama.cpp's {mix} with the same importance matrix ({target_bytes:,} bytes)"
        else:
            words = f"{target_bpw:g} bits per weight" if target_bpw is not None else f"{target_bytes:,} bytes"
        cap = cap_bytes(target_bpw, target_bytes, self.n_params, self.header_bytes, len(self.shapes) + 1) - self.fixed_bytes
        return cap, words, mix_types

    def plan(self, target_bpw: float | None = None, target_bytes: int | str | None = None, method: str | None = None,
             progress: Progress | None = None) -> Plan:
        from dataclasses import replace

        from birdbone.io.config import config_dict

        method = method or self.cfg.method
        cfg = replace(self.cfg, method=method)
        cap, words, mix_types = self.cap(target_bpw, target_bytes)
        shared = self.shared_grids(mix_types)
        excluded = {n: self.excluded_for(n, shared) for n in self.shapes}
        ladders = {n: Ladder(n, shape, options_for(shape, cfg.types, excluded[n]), self.scores[n]) for n, shape in self.shapes.items()}
        timing = self.time_cap(cfg)
        if method == "usage":
            plan_usage(ladders, cap, cfg, self.sens, progress)
        else:
            plan_greedy(ladders, cap, self.sens, progress, timing)
        detail = {n: {"bytes": l.option.nbytes, "shape": list(l.shape), "usage": l.usage, "fortress": l.fortress, "reasons": l.reasons,
                      "screen": l.screen, "exact": l.exact} for n, l in ladders.items()}
        types = {n: l.option.type for n, l in ladders.items()}
        notes = list(self.notes)
        for g, k in sorted(Counter(self.grids[n] for n in shared).items()):
            notes.append(f"{g} allowed back on the {k} tensors stored in it that the target mix also puts in {g}: "
                         "the reference keeps that grid there too")
        if timing:
            notes.append(f"time cap {1e3 * timing[1]:.2f} ms a token ({self.cap_words(cfg)}); the plan is predicted at "
                         f"{1e3 * timing[0].seconds(types):.2f} ms by this host's time model")
        return Plan(self.model, str(self.source), self.source_sha256, str(self.imatrix) if self.imatrix else None, method, cap, words,
                    self.fixed_bytes, self.header_bytes, self.n_params, sorted(set().union(*excluded.values())), types, detail, config_dict(cfg), notes,
                    1e3 * timing[0].seconds(types) if timing else None, 1e3 * timing[1] if timing else None)

    def time_cap(self, cfg: BudgetConfig) -> tuple | None:
        """(time model, seconds per token) when the config caps time; None otherwise."""
        if cfg.max_decode_ms is None and cfg.no_slower_than is None:
            return None
        from birdbone.remodel.speed import time_model

        types = tuple(t for t in cfg.types if t not in self.exclude)
        if cfg.max_decode_ms is not None:
            return time_model(self.source, self.shapes, types), cfg.max_decode_ms / 1e3
        mix = dry_mix(self.source, cfg.no_slower_than, self.imatrix).types
        mix = {n: t for n, t in mix.items() if n in self.shapes}
        # the reference mix may use a type the plan may not (Q4_0's mix holds Q4_1 here): the model must price it
        tm = time_model(self.source, self.shapes, tuple(dict.fromkeys([*types, *mix.values()])))
        return tm, tm.seconds(mix)

    @staticmethod
    def cap_words(cfg: BudgetConfig) -> str:
        return f"max_decode_ms {cfg.max_decode_ms:g}" if cfg.max_decode_ms is not None else f"no slower than llama.cpp's {cfg.no_slower_than}, predicted"


def tensor_grids(model: str | Path, names: list[str], grid: str | dict[str, str] | None, stored_grid: str | None) -> dict[str, str]:
    """Each planned tensor's source grid below Q8_0's bits: ``grid`` as given (one type for all, or
    per tensor), else the types ``model``'s own tensors are stored in; empty for a float model.
    A tensor stored in Q8_0 or finer keeps every type: Q8_0 is the honest reference the grid
    artifacts are measured against, so its own grid gains it nothing a float parent would not give."""
    from birdbone.io.float_form import source_grids
    from birdbone.io.model_file import open_model
    from birdbone.io.types import bits_per_weight, tensor_type

    if isinstance(grid, str):
        grids = dict.fromkeys(names, grid)
    elif grid is not None:
        grids = {n: grid[n] for n in names if n in grid}
    elif stored_grid is None:
        return {}
    else:
        with open_model(model) as m:
            stored = source_grids(m)
        grids = {n: stored[n] for n in names if n in stored}
    q8 = bits_per_weight(tensor_type("Q8_0"))
    return {n: g for n, g in grids.items() if bits_per_weight(tensor_type(g)) < q8}


def build_plan(model: str | Path, usage_dir: str | Path, text: str | Path | None, cfg: BudgetConfig,
               target_bpw: float | None = None, target_bytes: int | str | None = None,
               progress: Progress | None = None) -> Plan:
    """Measure and plan once: ``target_bytes`` may name a llama.cpp mix (``Q4_K_M``) to match its size."""
    if (target_bpw is None) == (target_bytes is None):
        raise BirdboneError("give exactly one of --target-bpw and --target-bytes")
    return Planner.open(model, usage_dir, text, cfg, progress).plan(target_bpw, target_bytes, progress=progress)


@dataclass
class BudgetReport:
    plan: Plan
    out: Path | None = None  # where the plan was written
    command: str | None = None  # the plan as a llama-quantize command line (--emit)

    def as_dict(self) -> dict:
        return {**self.plan.as_dict(), "out": str(self.out) if self.out else None, "command": self.command}

    def render(self) -> list:
        from birdbone.io.report import Line, Table, fmt, histogram, mib

        if self.command:
            return [Line(self.command)]
        p = self.plan
        table = Table(["tensor", "type", "bits", "usage", "screen", "exact", "why (last step)"],
                      title=f"{p.method} plan: {p.bits_per_weight:.3f} bits per weight, {mib(p.header_bytes + p.tensor_bytes)} MiB (cap: {p.target})")
        for n, t in p.types.items():
            d = p.detail[n]
            size = 1
            for x in d["shape"]:
                size *= x
            table.add(n + (" ▲" if d.get("fortress") else ""), t, f"{8 * d['bytes'] / max(1, size):.2f}", fmt(d.get("usage"), ".3f"),
                      fmt(d.get("screen"), ".2e"), fmt(None if d.get("exact") is None else 100 * d["exact"], "+.2f", "%"), (d.get("reasons") or [""])[-1])
        blocks = [table, Line(f"types: {histogram(p.histogram())}  (▲ fortress: stressed, given more bits)"), *(Line(n, "dim") for n in p.notes)]
        if self.out:
            blocks.append(Line(f"wrote {self.out}; apply with: birdbone quantize {p.model} --plan {self.out} -o OUT.gguf"))
        return blocks


def _check_torch_takes(model) -> None:
    """A plan needs a usage profile, made in torch: a GGUF the bridge refuses (experts, a family
    outside the table) gets the bridge's one line; per-tensor types still apply (``quantize --tensor-type``)."""
    from birdbone.io.families import check_bridge_takes

    try:
        check_bridge_takes(model)
    except BirdboneError as e:
        raise BirdboneError(f"budget plans from a usage profile, made in torch, and {e}; "
                            "per-tensor types still apply with quantize --tensor-type") from None


def budget_model(model: str | Path = "builtin", usage: str | Path | None = None, cfg: BudgetConfig = BudgetConfig(),
                 text: str | Path | None = None, target_bpw: float | None = None, target_bytes: int | str | None = None,
                 out: str | Path | None = None, plan_in: str | Path | None = None, emit: str | None = None,
                 progress: Progress | None = None) -> BudgetReport:
    """``birdbone budget``: make a plan (or read ``plan_in``), write it to ``out``, or give it as a llama-quantize command."""
    note_input(text, plan_in)  # known before any output is written, so none lands on them
    if emit not in (None, "llama-quantize"):
        raise BirdboneError(f"--emit {emit!r}: the one known form is llama-quantize")
    if plan_in is not None:
        if out is not None:
            raise BirdboneError("--plan reads a finished plan and -o writes a new one: give one of them")
        plan = read_plan(plan_in)
    else:
        if usage is None:
            _check_torch_takes(model)  # a model profile refuses: say so now, not after the detour
            raise BirdboneError("--usage DIR is needed (make one with: birdbone profile MODEL --text FILE -o DIR)")
        plan = build_plan(model, usage, text, cfg, target_bpw, target_bytes, progress)
        if out is not None:
            write_plan(plan, out)
    return BudgetReport(plan, Path(out) if out and plan_in is None else None, llama_quantize_command(plan) if emit else None)
