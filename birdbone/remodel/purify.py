"""Purification: the organ architecture's two denoising transforms of weight rows, as pure
functions over arrays, and :func:`purify_model`, which applies one to a model file.

Both read each row of a 2-D weight (one output unit's weights over the input channels) as a
signal and attenuate what they call noise by ``1 − strength`` (0: identity, 1: removed):

* ``fft`` (spectral): the real FFT of each row; the *core* is the smallest set of frequency
  coefficients carrying :data:`CORE_ENERGY` of the row's energy; every other coefficient is
  attenuated. Rows are not re-normalised (the core keeps the mean, which is the 0-frequency
  coefficient whenever it matters).
* ``haar`` (fractal): a Haar wavelet decomposition of each row over all scales (PyWavelets,
  periodized). A detail coefficient at scale s is *coherent* when its parent at scale 2s is
  significant, i.e. larger than the row's robust noise level σ = median|d₁| / 0.6745 taken
  from the finest details d₁ (structure persists across scales; isolated fine-scale detail
  does not). Incoherent
  coefficients are attenuated; the coarsest details and the approximation are kept. After
  reconstruction the tensor's mean and standard deviation are restored to the input's.

These are hypotheses from the organ architecture, not known improvements:
``benchmarks/measure_evidence.py`` measures what they do to perplexity (docs/evidence.md).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
from gguf.constants import GGUFValueType

from birdbone.anatomy.body import Body
from birdbone.anatomy.selection import parse_layers, select
from birdbone.io.inputs import note_input
from birdbone.io.errors import BirdboneError
from birdbone.measure.tensor import theta_of
from birdbone.remodel.rewrite import relative_change, rewrite_tensors

log = logging.getLogger(__name__)
CORE_ENERGY = 0.9  # share of a row's spectral energy the fft core keeps untouched
MAD_TO_SIGMA = 0.6745  # median |x| of a standard normal: σ ≈ median|d| / 0.6745 (Donoho's noise estimate)


def _check(x: np.ndarray, strength: float) -> np.ndarray:
    if not 0.0 <= strength <= 1.0:
        raise BirdboneError(f"purify strength {strength} is outside [0, 1]")
    x = np.asarray(x, dtype=np.float32)
    if x.ndim != 2:
        raise BirdboneError(f"purify works on 2-D weights, got shape {x.shape}")
    return x


def fft_purify(x: np.ndarray, strength: float, core_energy: float = CORE_ENERGY) -> np.ndarray:
    """Attenuate, row by row, the FFT coefficients outside the core carrying ``core_energy``."""
    x = _check(x, strength)
    n = x.shape[1]
    c = np.fft.rfft(x.astype(np.float64), axis=1)
    # one-sided spectrum: every bin but 0 (and n/2 for even n) stands for two conjugate bins
    weight = np.full(c.shape[1], 2.0)
    weight[0] = 1.0
    if n % 2 == 0:
        weight[-1] = 1.0
    power = np.abs(c) ** 2 * weight
    order = np.argsort(-power, axis=1, kind="stable")
    ranked = np.take_along_axis(power, order, axis=1)
    total = ranked.sum(axis=1, keepdims=True)
    before = np.cumsum(ranked, axis=1) - ranked  # energy of the stronger coefficients
    in_core_ranked = before < core_energy * np.where(total > 0, total, 1.0)
    in_core = np.empty_like(in_core_ranked)
    np.put_along_axis(in_core, order, in_core_ranked, axis=1)
    c = np.where(in_core, c, c * (1.0 - strength))
    return np.fft.irfft(c, n=n, axis=1).astype(np.float32)


def haar_purify(x: np.ndarray, strength: float) -> np.ndarray:
    """Attenuate Haar details whose parent one scale coarser is not significant; restore mean/std."""
    import pywt

    x = _check(x, strength)
    n = x.shape[1]
    levels = pywt.dwt_max_level(n, "haar")
    if levels < 2:
        return x.copy()  # no parent/child pair of scales to compare
    coeffs = pywt.wavedec(x.astype(np.float64), "haar", mode="periodization", level=levels, axis=1)
    # coeffs = [approx, d_levels (coarsest), ..., d_1 (finest)]; the parent of details[i] is details[i - 1]
    details = coeffs[1:]
    # the noise level comes from the finest scale, where a row is mostly noise (Donoho & Johnstone)
    sigma = np.median(np.abs(details[-1]), axis=1, keepdims=True) / MAD_TO_SIGMA
    for i in range(1, len(details)):
        parent, child = details[i - 1], details[i]
        significant = np.abs(parent) > sigma
        coherent = np.repeat(significant, 2, axis=1)[:, : child.shape[1]]
        details[i] = np.where(coherent, child, child * (1.0 - strength))
    y = pywt.waverec([coeffs[0], *details], "haar", mode="periodization", axis=1)[:, :n]
    sd_in, sd_out = float(x.std()), float(y.std())
    y = (y - y.mean()) * (sd_in / sd_out if sd_out > 0 else 1.0) + float(x.mean())
    return y.astype(np.float32)


METHODS: dict[str, Callable[[np.ndarray, float], np.ndarray]] = {"fft": fft_purify, "haar": haar_purify}


@dataclass
class PurifyResult:
    out: Path
    method: str
    strength: float
    tensors: list[str]
    types: dict[str, str] = field(default_factory=dict)  # name -> written type
    theta_before: dict[str, float | None] = field(default_factory=dict)
    theta_after: dict[str, float | None] = field(default_factory=dict)
    relative_change: dict[str, float] = field(default_factory=dict)  # ||after − before|| / ||before||, as stored

    eval: object | None = None  # an EvalReport against the input, when asked for

    def as_dict(self) -> dict:
        return {"out": str(self.out), "method": self.method, "strength": self.strength, "tensors": self.tensors,
                "types": self.types, "theta_before": self.theta_before, "theta_after": self.theta_after,
                "relative_change": self.relative_change, "eval": self.eval.as_dict() if self.eval is not None else None}

    def render(self) -> list:
        from birdbone.io.report import Line, Table, fmt

        table = Table(["tensor", "type", "θ before", "θ after", "‖Δ‖/‖W‖"], title=f"{self.method} purify, strength {self.strength:g}")
        for n in self.tensors:
            table.add(n, self.types[n], fmt(self.theta_before[n], ".2f"), fmt(self.theta_after[n], ".2f"), f"{self.relative_change[n]:.4f}")
        return [table, Line(f"wrote {self.out} ({len(self.tensors)} tensor(s) purified)"), *(self.eval.render() if self.eval is not None else [])]


def purify_model(src: str | Path, out: str | Path, method: str, strength: float = 0.5, roles: Iterable[str] | None = None,
                 layers: str | None = None, tensors: str | None = None, out_type: str | None = None,
                 progress: Callable[[int, int], None] | None = None, evaluate_with=None, text: str | Path | None = None) -> PurifyResult:
    """Purify the chosen 2-D weights of a GGUF (or organ folder) and write a GGUF.

    Each purified tensor is stored in its input type (requantized with ggml) or in ``out_type``;
    everything else is copied byte for byte. Provenance goes under ``birdbone.purify.*``. With
    ``evaluate_with`` (an ``EvalConfig``), the output is scored against the input on ``text`` (an
    organ folder has no file to compare with, so then the output is scored alone).
    """
    note_input(text)  # known before any output is written, so none lands on them
    if method not in METHODS:
        raise BirdboneError(f"--method {method!r}: choose one of {', '.join(METHODS)}")
    purify = METHODS[method]
    with Body(src) as body:
        n_layers = body.meta(f"{body.architecture}.block_count")
        names = [n for n in select(body, parse_layers(layers, n_layers), roles, tensors) if len(body.entries[n].ne) == 2]
        if not names:
            raise BirdboneError(f"{body.path}: the selection matches no 2-D weight (check --roles, --layers, --tensors)")
        result = PurifyResult(Path(out), method, strength, names)

        def observe(name: str, before: np.ndarray, after: np.ndarray) -> None:
            result.theta_before[name] = theta_of(before)
            result.theta_after[name] = theta_of(after)
            result.relative_change[name] = relative_change(before, after)

        provenance = {
            "birdbone.purify.source": (GGUFValueType.STRING, body.name, None),
            "birdbone.purify.source_sha256": (GGUFValueType.STRING, body.sha256, None),
            "birdbone.purify.method": (GGUFValueType.STRING, method, None),
            "birdbone.purify.strength": (GGUFValueType.FLOAT32, float(strength), None),
            "birdbone.purify.tensors": (GGUFValueType.ARRAY, names, GGUFValueType.STRING),
        }
        result.types = rewrite_tensors(body, out, names, lambda name, x: purify(x, strength), out_type, provenance, observe, progress)
    log.info("purified %d tensor(s) with %s at strength %g", len(names), method, strength)
    if evaluate_with is not None:
        from birdbone.evaluate.compare import evaluate

        result.eval = evaluate(out, None if Path(src).is_dir() else src, text, evaluate_with)
    return result
