"""The precision budget: one llama.cpp type per tensor, chosen under a byte cap.

llama.cpp's mixes (Q4_K_M ...) pick types by a fixed rule; a plan picks them from what was
measured. Two planners share one ladder of types per tensor:

* ``usage`` (the bird-bone plan): every tensor starts at 8 bits; over R rounds the threshold
  α_k = α₁ + (α_R − α₁)(k − 1)/(R − 1) rises and tensors whose usage s_b = ū_b / max ū (within
  their layer, ū the mean squared input activation from ``profile``) is below it drop to the
  4-bit base, until the cap holds; stressed tensors — alone in their type they raise the held-out
  loss by more than δ, or their gradient RMS is above γ × the mean — get Δp more bits (the
  "fortresses"); then the lowest-usage tensors are lowered step by step until the cap holds, and
  spare bytes go to the highest-usage ones (up to 8 bits).
* ``greedy`` (what a skeptic tries first): every tensor starts at its smallest type; repeatedly
  upgrade the tensor whose first-order loss estimate falls most per byte spent, while it fits.

Sizes are exact bytes of the types llama.cpp will write (only types legal for the row width are
on a tensor's ladder, so nothing falls back); ``apply_plan`` checks them against what llama.cpp
wrote. The ladder excludes the source's own quantization grid: the built-in model's F16 form is
dequantized Q4_1, so Q4_1 would be lossless by construction and measure nothing. Other types can
hold that grid too (Q5_1's imatrix-guided scale search finds half of Q4_1's step and reproduces
Q4_1 weights almost exactly), so :func:`grid_artifacts` measures every cheaper type on the float
form and excludes those that reconstruct it better than Q8_0 does.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from birdbone.io.errors import BirdboneError, InputError
from birdbone.remodel.sensitivity import Sensitivity, SensitivityConfig

log = logging.getLogger(__name__)
Progress = Callable[[str, int, int], None]

PLAN_VERSION = 1
# llama.cpp's per-tensor types by size; at equal size the earlier one is preferred (K > IQ > legacy).
LADDER = ("Q2_K", "Q3_K", "Q4_K", "IQ4_NL", "Q4_0", "Q4_1", "Q5_K", "Q5_0", "Q5_1", "Q6_K", "Q8_0", "F16")
BASE = ("Q4_K", "IQ4_NL", "Q4_0")  # the 4-bit class, best first
METHODS = ("usage", "greedy")
FILE_TYPE_FOR_OVERRIDES = "Q8_0"  # llama.cpp applies per-tensor overrides only under a quantized file type
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
    method: str = "greedy"  # it beat the usage schedule at every size in benchmarks/budget_frontier.py
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

    def alpha(self, k: int) -> float:
        """α_k, k = 1..R."""
        if self.rounds == 1:
            return self.alpha_first
        return self.alpha_first + (self.alpha_last - self.alpha_first) * (k - 1) / (self.rounds - 1)


# -- the ladder of one tensor -------------------------------------------------------------------
@dataclass(frozen=True)
class Option:
    type: str
    nbytes: int
    bpw: float


def options_for(shape: tuple[int, ...], types: tuple[str, ...], exclude: set[str]) -> list[Option]:
    """The types llama.cpp can write for a tensor of this shape without falling back, smallest first."""
    from gguf.constants import GGML_QUANT_SIZES

    from birdbone.io.types import canonical, tensor_type

    width, n = shape[-1], math.prod(shape)
    by_size: dict[int, Option] = {}
    for name in types:
        qt = tensor_type(name)
        block, size = GGML_QUANT_SIZES[qt]
        if canonical(name) in exclude or width % block:
            continue
        nbytes = n // block * size
        by_size.setdefault(nbytes, Option(qt.name, nbytes, 8.0 * size / block))
    return [by_size[k] for k in sorted(by_size)]


@dataclass
class Ladder:
    """One tensor's options and where the plan stands on them."""

    name: str
    shape: tuple[int, ...]
    options: list[Option]
    usage: float | None  # s_b; None when the profile has no activations for it (embeddings)
    i: int = 0
    fortress: bool = False
    reasons: list[str] = field(default_factory=list)
    screen: float | None = None
    exact: float | None = None

    @property
    def option(self) -> Option:
        return self.options[self.i]

    @property
    def s(self) -> float:
        return 1.0 if self.usage is None else self.usage

    def at_least(self, bits: float) -> int:
        """Index of the smallest option with at least ``bits`` bits per weight (the top one if none)."""
        return next((j for j, o in enumerate(self.options) if o.bpw >= bits - 1e-9), len(self.options) - 1)

    def base_index(self, base: tuple[str, ...]) -> int:
        types = [o.type for o in self.options]
        for t in base:
            if t in types:
                return types.index(t)
        return self.at_least(4.0)

    def move(self, j: int, why: str) -> None:
        self.reasons.append(f"{why} → {self.options[j].type}")
        self.i = j


def total(ladders: dict[str, Ladder]) -> int:
    return sum(l.option.nbytes for l in ladders.values())


# -- planners (pure: ladders in, ladders moved) -----------------------------------------------------
def plan_usage(ladders: dict[str, Ladder], cap: int, cfg: BudgetConfig, sens: Sensitivity | None,
               progress: Progress | None = None) -> None:
    for l in ladders.values():
        l.move(l.at_least(cfg.p_init), f"start at p_init {cfg.p_init:g} bits")
    for k in range(1, cfg.rounds + 1):
        if total(ladders) <= cap:
            break
        a = cfg.alpha(k)
        for l in ladders.values():
            b = l.base_index(cfg.base)
            if l.s < a and l.i > b:
                l.move(b, f"round {k}: usage {l.s:.3f} < α {a:.3f}, base precision")
    if sens is not None:
        _boost_stressed(ladders, cfg, sens, progress)
    _rebalance(ladders, cap, cfg)
    if cfg.fill:
        _fill(ladders, cap, cfg)


def _boost_stressed(ladders: dict[str, Ladder], cfg: BudgetConfig, sens: Sensitivity, progress: Progress | None) -> None:
    names = list(ladders)
    for j, n in enumerate(names):
        ladders[n].screen = sens.estimate(n, ladders[n].option.type)
        if progress:
            progress("first-order screen", j + 1, len(names))
    top = sorted(names, key=lambda n: -ladders[n].screen)[: cfg.stress.check_top]
    stressed: dict[str, str] = {}
    for j, n in enumerate(top):
        l = ladders[n]
        l.exact = sens.exact(n, l.option.type)
        if l.exact > cfg.stress.delta:
            stressed[n] = f"stressed: alone in {l.option.type} it raises the held-out loss {100 * l.exact:+.2f} % (> δ {100 * cfg.stress.delta:g} %)"
        if progress:
            progress("exact checks", j + 1, len(top))
    rms = sens.grad_rms()
    mean = sum(rms.values()) / max(len(rms), 1)
    for n, g in rms.items():
        if g > cfg.stress.gamma * mean and n not in stressed:
            stressed[n] = f"stressed: gradient RMS {g:.3g} > γ {cfg.stress.gamma:g} × mean {mean:.3g}"
    for n, why in stressed.items():
        l = ladders[n]
        l.fortress = True
        l.move(l.at_least(l.option.bpw + cfg.stress.boost_bits), f"{why}; fortress, +{cfg.stress.boost_bits:g} bits")


def _rebalance(ladders: dict[str, Ladder], cap: int, cfg: BudgetConfig) -> None:
    """Lower the lowest-usage tensor one step at a time until the cap holds: first down to the base
    precision, then below it, fortresses last."""
    tiers = [lambda l: not l.fortress and l.i > l.base_index(cfg.base), lambda l: not l.fortress and l.i > 0, lambda l: l.i > 0]
    while (over := total(ladders) - cap) > 0:
        for tier in tiers:
            cands = [l for l in ladders.values() if tier(l)]
            if cands:
                break
        else:
            raise BirdboneError(f"the cap is {over:,} bytes below the smallest legal plan ({total(ladders):,} bytes of tensors); raise the target")
        l = min(cands, key=lambda l: (l.s, -l.option.nbytes, l.name))
        l.move(l.i - 1, f"rebalance: lowest usage {l.s:.3f}, over the cap")


def _fill(ladders: dict[str, Ladder], cap: int, cfg: BudgetConfig) -> None:
    """Spend what is left under the cap on the highest-usage tensors, one step at a time, up to p_init."""
    spare = cap - total(ladders)
    while True:
        cands = [l for l in ladders.values() if not l.fortress and l.i + 1 < len(l.options)
                 and l.options[l.i + 1].bpw <= l.options[l.at_least(cfg.p_init)].bpw + 1e-9
                 and l.options[l.i + 1].nbytes - l.option.nbytes <= spare]
        if not cands:
            return
        l = max(cands, key=lambda l: (l.s, -(l.options[l.i + 1].nbytes - l.option.nbytes), l.name))
        spare -= l.options[l.i + 1].nbytes - l.option.nbytes
        l.move(l.i + 1, f"fill: usage {l.s:.3f}, spare bytes under the cap")


def plan_greedy(ladders: dict[str, Ladder], cap: int, sens: Sensitivity, progress: Progress | None = None) -> None:
    """Smallest types first, then the best loss-per-byte upgrade (any step up) while it fits."""
    names = list(ladders)
    est: dict[str, list[float]] = {}
    for j, n in enumerate(names):
        est[n] = [sens.estimate(n, o.type) for o in ladders[n].options]
        if progress:
            progress("first-order estimates", j + 1, len(names))
    for l in ladders.values():
        l.move(0, "start at the smallest legal type")
    if total(ladders) > cap:
        raise BirdboneError(f"the cap is {total(ladders) - cap:,} bytes below the smallest legal plan ({total(ladders):,} bytes of tensors); raise the target")
    spare = cap - total(ladders)
    while True:
        best, best_ratio = None, 0.0
        for n, l in ladders.items():
            e0, b0 = est[n][l.i], l.option.nbytes
            for j in range(l.i + 1, len(l.options)):
                db = l.options[j].nbytes - b0
                gain = e0 - est[n][j]
                if db <= spare and gain > 0 and gain / db > best_ratio:
                    best, best_ratio = (n, j), gain / db
        if best is None:
            break
        n, j = best
        l = ladders[n]
        spare -= l.options[j].nbytes - l.option.nbytes
        l.move(j, f"greedy: first-order loss {est[n][l.i]:.3g} → {est[n][j]:.3g}, {best_ratio * 2**20:.3g} per MiB")
    for n, l in ladders.items():
        l.screen = est[n][l.i]


# -- the plan as a file ---------------------------------------------------------------------------
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
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(path, "no such file") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InputError(path, f"is not a JSON plan: {e}") from None
    if not isinstance(d, dict) or d.get("version") != PLAN_VERSION or not isinstance(d.get("types"), dict):
        raise InputError(path, f"is not a birdbone precision plan (version {PLAN_VERSION} with a 'types' map)")
    keys = {f for f in Plan.__dataclass_fields__}
    try:
        return Plan(**{k: v for k, v in d.items() if k in keys})
    except TypeError as e:
        raise InputError(path, f"plan is missing a field: {e}") from None


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


# -- from a model to a plan, and a plan to a file ----------------------------------------------------
def source_grid(m) -> str | None:
    """The quantized type most of a GGUF's matrices are stored in, or None for a float file."""
    from birdbone.io.types import TENSOR_TYPES

    kinds = Counter(t.type for t in m.tensors.values() if len(t.shape) >= 2)
    quantized = [(c, k) for k, c in kinds.items() if k in TENSOR_TYPES and k not in ("F32", "F16", "BF16")]
    return max(quantized)[1] if quantized else None


def plan_source(model: str | Path, progress: Progress | None = None) -> tuple[Path, str | None]:
    """The float GGUF a plan quantizes (a quantized input's F16 form) and the input's own grid."""
    from birdbone.evaluate.compare import f16_form
    from birdbone.io.model_file import open_model, resolve_model_path

    path = resolve_model_path(model)
    with open_model(path) as m:
        if m.format != "gguf":
            raise InputError(path, "precision plans quantize GGUF files; convert it first (birdbone convert --type F16)")
        grid = source_grid(m)
    return (f16_form(model, progress) if grid else path), grid


def planned_names(m) -> list[str]:
    """What a plan assigns a type to: every matrix (1-D norms stay as they are)."""
    return [n for n, t in m.tensors.items() if len(t.shape) >= 2]


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


def mix_bytes(source: Path, mix: str, imatrix: str | Path | None) -> int:
    """The file size of a llama.cpp mix (Q4_K_M ...) of ``source``, from llama.cpp's dry run."""
    from birdbone.io.quantize import quantize_file

    return quantize_file(source, None, mix, imatrix=imatrix, dry_run=True).file_bytes


def grid_artifacts(m, names: list[str], types: tuple[str, ...], importance: dict[str, np.ndarray | None]) -> dict[str, float]:
    """Types below Q8_0's bits that rebuild the float form of a grid-quantized model better than Q8_0
    does (relative error, with the imatrix), on one tensor per row width: such a type sits on the
    source's grid, and a plan choosing it would measure that artifact, not skill. Returns type → error."""
    from gguf.constants import GGML_QUANT_SIZES

    from birdbone.io.quantize import quantize_tensor
    from birdbone.io.types import tensor_type

    sample = {}
    for n in names:
        sample.setdefault(m.tensors[n].shape[-1], n)

    def error(w: np.ndarray, t: str, imp) -> float:
        return float(np.linalg.norm(quantize_tensor(w, t, imp).dequantize() - w) / max(np.linalg.norm(w), 1e-30))

    q8_bits = 8.0 * GGML_QUANT_SIZES[tensor_type("Q8_0")][1] / GGML_QUANT_SIZES[tensor_type("Q8_0")][0]
    found: dict[str, float] = {}
    for width, n in sample.items():
        w, imp = m.tensor(n).astype(np.float32), importance.get(n)
        reference = error(w, "Q8_0", imp)
        for t in types:
            block, size = GGML_QUANT_SIZES[tensor_type(t)]
            if width % block or 8.0 * size / block >= q8_bits:
                continue
            e = error(w, t, imp)
            if e < reference:
                found[tensor_type(t).name] = min(e, found.get(tensor_type(t).name, e))
    return found


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

    @classmethod
    def open(cls, model: str | Path, usage_dir: str | Path, text: str | Path | None, cfg: BudgetConfig,
             progress: Progress | None = None, grid: str | None = None) -> "Planner":
        """``grid``: the quantized grid ``model``'s weights sit on when ``model`` is already a float file
        (a remodelled form of a quantized input); by default, the grid ``model`` is stored in."""
        from birdbone.io.hashing import file_sha256
        from birdbone.io.model_file import open_model
        from birdbone.io.runtime import tokenize_texts
        from birdbone.io.text import load_text
        from birdbone.io.types import canonical
        from birdbone.measure.usage import read_profile
        from birdbone.remodel.sensitivity import measure_sensitivity

        usage = read_profile(usage_dir)
        imatrix = Path(usage_dir) / "imatrix.gguf"
        source, stored_grid = plan_source(model, progress)
        grid = grid or stored_grid
        auto = bool(grid) and "auto" in cfg.exclude
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
        with open_model(source) as m:
            artifacts = grid_artifacts(m, names, cfg.types, importance) if auto else {}
        exclude = {canonical(e) for e in cfg.exclude if e != "auto"} | ({grid, *artifacts} if auto else set())
        empty = [n for n in names if not options_for(shapes[n], cfg.types, exclude)]
        if empty:
            raise BirdboneError(f"{empty[0]}: no type on the ladder is legal for its row width {shapes[empty[0]][-1]}")
        text_body, text_name = load_text(text)
        tokens, = tokenize_texts(source, text_body)
        sens = measure_sensitivity(source, tokens, names, importance, cfg.sensitivity, progress)
        notes = [f"sensitivity text: {text_name} ({len(tokens):,} tokens; the last {cfg.sensitivity.val_tokens} held out for exact checks)"]
        if auto:
            notes.append(f"{grid} excluded: the input is stored in {grid}, so its F16 form sits on that grid and {grid} would be lossless by construction")
        if artifacts:
            notes.append("also excluded, as they rebuild the F16 form better than Q8_0 does (they hold the input's grid): "
                         + ", ".join(f"{t} (relative error {e:.1e})" for t, e in sorted(artifacts.items())))
        narrow = sorted({shapes[n][-1] for n in names if shapes[n][-1] % 256})
        if narrow:
            notes.append(f"row widths {', '.join(map(str, narrow))} are not multiples of 256: those tensors cannot take K-quants (32-block types only)")
        return cls(str(model), source, file_sha256(source), imatrix if imatrix.exists() else None, cfg, shapes, exclude,
                   usage_scores(usage, names), fixed, header, n_params, sens, notes)

    def cap(self, target_bpw: float | None = None, target_bytes: int | str | None = None) -> tuple[int, str]:
        """The cap on planned tensors' bytes, and the target in words; ``target_bytes`` may name a mix."""
        from birdbone.io.types import canonical

        if isinstance(target_bytes, str) and target_bytes.strip().isdigit():
            target_bytes = int(target_bytes)
        if isinstance(target_bytes, str):
            mix = canonical(target_bytes)
            target_bytes = mix_bytes(self.source, mix, self.imatrix)
            words = f"the size of llama.cpp's {mix} with the same importance matrix ({target_bytes:,} bytes)"
        else:
            words = f"{target_bpw:g} bits per weight" if target_bpw is not None else f"{target_bytes:,} bytes"
        cap = cap_bytes(target_bpw, target_bytes, self.n_params, self.header_bytes, len(self.shapes) + 1) - self.fixed_bytes
        return cap, words

    def plan(self, target_bpw: float | None = None, target_bytes: int | str | None = None, method: str | None = None,
             progress: Progress | None = None) -> Plan:
        from dataclasses import replace

        from birdbone.io.config import config_dict

        method = method or self.cfg.method
        cfg = replace(self.cfg, method=method)
        cap, words = self.cap(target_bpw, target_bytes)
        ladders = {n: Ladder(n, shape, options_for(shape, cfg.types, self.exclude), self.scores[n]) for n, shape in self.shapes.items()}
        if method == "usage":
            plan_usage(ladders, cap, cfg, self.sens, progress)
        else:
            plan_greedy(ladders, cap, self.sens, progress)
        detail = {n: {"bytes": l.option.nbytes, "shape": list(l.shape), "usage": l.usage, "fortress": l.fortress, "reasons": l.reasons,
                      "screen": l.screen, "exact": l.exact} for n, l in ladders.items()}
        return Plan(self.model, str(self.source), self.source_sha256, str(self.imatrix) if self.imatrix else None, method, cap, words,
                    self.fixed_bytes, self.header_bytes, self.n_params, sorted(self.exclude), {n: l.option.type for n, l in ladders.items()},
                    detail, config_dict(cfg), list(self.notes))


def build_plan(model: str | Path, usage_dir: str | Path, text: str | Path | None, cfg: BudgetConfig,
               target_bpw: float | None = None, target_bytes: int | str | None = None,
               progress: Progress | None = None) -> Plan:
    """Measure and plan once: ``target_bytes`` may name a llama.cpp mix (``Q4_K_M``) to match its size."""
    if (target_bpw is None) == (target_bytes is None):
        raise BirdboneError("give exactly one of --target-bpw and --target-bytes")
    return Planner.open(model, usage_dir, text, cfg, progress).plan(target_bpw, target_bytes, progress=progress)


def heal_quantized(source: str | Path, types: dict[str, str], tokens, cfg, importance: dict[str, np.ndarray] | None = None,
                   roles: tuple[str, ...] = ("skeleton", "organ"), progress: Progress | None = None) -> dict[str, np.ndarray]:
    """A QLoRA-style healing pass for any per-tensor typing (a plan, or the types a llama.cpp mix
    writes): masked LoRA on the linear layers is trained against the base fake-quantized to each
    tensor's type (with its imatrix row), then merged into the float weights, which the caller
    quantizes with the same types again. Returns the merged weights (GGUF names and rows)."""
    from birdbone.bridge import load_causal_lm
    from birdbone.io.model_file import open_model
    from birdbone.remodel.heal import heal, set_weights
    from birdbone.remodel.history import lora_product
    from birdbone.remodel.prune import fake_quantize, prunable

    importance = importance or {}
    with open_model(source) as m:
        arch = m.architecture
        names = [n for n in prunable(m, roles) if n in types]
        weights = {n: m.tensor(n).astype(np.float32) for n in names}
    lm = load_causal_lm(source)
    lm.eval()
    set_weights(lm, {n: (fake_quantize(w, types[n], n, importance.get(n)), np.ones(w.shape, dtype=bool)) for n, w in weights.items()}, arch)
    cb = (lambda i, total: progress("healing against the quantized base", i, total)) if progress else None
    res = heal(lm, names, tokens, cfg, arch=arch, progress=cb)
    return {n: (weights[n] + lora_product(*res.lora[n])).astype(np.float32) for n in names}


def apply_plan(model: str | Path, plan: Plan, out: str | Path, imatrix: str | Path | None = None, threads: int = 0):
    """Quantize ``model`` (its float form) with one type per tensor from ``plan``; checks every
    tensor exists, the type is legal for its width, and llama.cpp wrote exactly the plan."""
    from birdbone.io.hashing import file_sha256
    from birdbone.io.model_file import open_model
    from birdbone.io.quantize import quantize_file
    from birdbone.io.types import legal_type, tensor_type

    source, _ = plan_source(model)
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
