"""Pruning scores and density-loss waves, as pure functions over one weight matrix.

A weight matrix is (rows = output units, columns = input channels), numpy order as GGUF
stores it. A mask is a bool array of the same shape: True = the weight lives.

Scores (higher = more worth keeping):

* ``magnitude``: |W|;
* ``wanda``: |W| · ‖a_j‖ with ‖a_j‖ the RMS of input channel j over calibration text (the square
  root of what llama.cpp's imatrix stores: ``birdbone profile``), Sun et al. 2023;
* ``taylor``: |W · ∂L/∂W|, the first-order loss change of removing the weight;
* ``usage``: |W| · f_j with f_j the share of tokens on which input channel j is active.

A wave (:func:`wave`) removes the lowest-scoring live weights, at most ``max_wave`` of what is
still alive (default and upper limit 10 %), never going below the target density:

* ``row`` granularity: every row loses the same share (scores compare within a row, as Wanda
  does), so no output unit is starved;
* ``N:M`` granularity (2:4, 4:8): the target is N/M; a weight may go only while its group of M
  consecutive weights along a row still holds more than N live ones, so groups reach N:M
  progressively over waves.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import numpy as np

from birdbone.io.errors import BirdboneError

MAX_WAVE = 0.10  # the bird-bone rule: shed at most a tenth of what is left per wave
SCORES = ("magnitude", "wanda", "taylor", "usage")


@dataclass(frozen=True)
class Granularity:
    kind: str  # "row" or "nm"
    n: int = 0
    m: int = 0

    @property
    def implied_density(self) -> float | None:
        return self.n / self.m if self.kind == "nm" else None

    def __str__(self) -> str:
        return "row" if self.kind == "row" else f"{self.n}:{self.m}"


def parse_granularity(spec: str) -> Granularity:
    """``row``, ``2:4``, ``4:8``, ... (N < M)."""
    if spec == "row":
        return Granularity("row")
    m = re.fullmatch(r"(\d+):(\d+)", spec.strip())
    if not m or not 0 < int(m[1]) < int(m[2]):
        raise BirdboneError(f"granularity {spec!r}: expected 'row' or N:M with 0 < N < M (e.g. 2:4)")
    return Granularity("nm", int(m[1]), int(m[2]))


def check_wave(max_wave: float, target_density: float) -> None:
    if not 0.0 < target_density <= 1.0:
        raise BirdboneError(f"target density {target_density} is outside (0, 1] (target_density)")
    if not 0.0 < max_wave <= MAX_WAVE:
        raise BirdboneError(f"wave size {max_wave} is outside (0, {MAX_WAVE}] (max_wave): a wave sheds at most a tenth of what is left")


# -- scores ---------------------------------------------------------------------------------------
def _per_column(w: np.ndarray, v: np.ndarray | None, what: str) -> np.ndarray:
    if v is None:
        raise BirdboneError(f"the {what} score needs per-input-channel statistics (birdbone profile)")
    v = np.asarray(v, dtype=np.float32).reshape(-1)
    if v.size != w.shape[1]:
        raise BirdboneError(f"{what}: {v.size} channel values for a matrix with {w.shape[1]} input channels")
    return v


def score(kind: str, w: np.ndarray, importance: np.ndarray | None = None, grad: np.ndarray | None = None,
          act_freq: np.ndarray | None = None) -> np.ndarray:
    """Score every weight of ``w`` (higher = keep). ``importance``: mean squared input activation per
    channel (imatrix values); ``grad``: ∂L/∂W (or its mean |·| over calibration); ``act_freq``: share
    of tokens each input channel is active on."""
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise BirdboneError(f"pruning scores need a 2-D weight, got shape {w.shape}")
    if kind == "magnitude":
        return np.abs(w)
    if kind == "wanda":
        return np.abs(w) * np.sqrt(np.maximum(_per_column(w, importance, "wanda"), 0.0))[None, :]
    if kind == "taylor":
        if grad is None or np.shape(grad) != w.shape:
            raise BirdboneError(f"the taylor score needs a gradient of shape {w.shape}")
        return np.abs(w * np.asarray(grad, dtype=np.float32))
    if kind == "usage":
        return np.abs(w) * _per_column(w, act_freq, "usage")[None, :]
    raise BirdboneError(f"score {kind!r}: choose one of {', '.join(SCORES)}")


# -- waves ------------------------------------------------------------------------------------------
def _lowest_live(scores: np.ndarray, eligible: np.ndarray, quota: np.ndarray) -> np.ndarray:
    """Per row, the ``quota[row]`` lowest-scoring eligible positions (ties broken by position)."""
    out = np.zeros_like(eligible)
    s = np.where(eligible, scores, np.inf)
    order = np.argsort(s, axis=1, kind="stable")
    take = np.arange(s.shape[1])[None, :] < quota[:, None]
    np.put_along_axis(out, order, take, axis=1)
    return out & eligible


def wave(scores: np.ndarray, mask: np.ndarray, target_density: float, max_wave: float = MAX_WAVE,
         granularity: Granularity = Granularity("row")) -> np.ndarray:
    """The weights this wave removes (bool, same shape): lowest scores first, at most ``max_wave``
    of the live ones, never below ``target_density``. Empty when the target is reached."""
    check_wave(max_wave, target_density)
    scores, mask = np.asarray(scores), np.asarray(mask, dtype=bool)
    if scores.shape != mask.shape or scores.ndim != 2:
        raise BirdboneError(f"scores {scores.shape} and mask {mask.shape} must be the same 2-D shape")
    rows, cols = mask.shape
    if granularity.kind == "row":
        live = mask.sum(axis=1)
        floor_live = math.ceil(target_density * cols - 1e-9)
        quota = np.minimum(np.floor(max_wave * live).astype(np.int64), np.maximum(live - floor_live, 0))
        return _lowest_live(scores, mask, quota)
    n, m = granularity.n, granularity.m
    if cols % m:
        raise BirdboneError(f"{granularity} sparsity needs rows whose width is a multiple of {m}, got {cols}")
    if not math.isclose(target_density, n / m) and target_density != 1.0:
        raise BirdboneError(f"{granularity} sparsity means density {n / m:g}; got target density {target_density}")
    g_scores = np.where(mask, scores, np.inf).reshape(rows, cols // m, m)
    # rank of each weight among its group's live weights (0 = lowest score)
    g_rank = np.argsort(np.argsort(g_scores, axis=2, kind="stable"), axis=2, kind="stable")
    g_live = mask.reshape(rows, cols // m, m).sum(axis=2, keepdims=True)
    eligible = (mask.reshape(rows, cols // m, m) & (g_rank < g_live - n)).reshape(rows, cols)
    live = mask.sum(axis=1)
    quota = np.minimum(np.floor(max_wave * live).astype(np.int64), eligible.sum(axis=1))
    return _lowest_live(scores, eligible, quota)


def density(mask: np.ndarray) -> float:
    return float(np.mean(mask)) if mask.size else 1.0


def rigl_swap(grad: np.ndarray, scores: np.ndarray, mask: np.ndarray, share: float) -> tuple[np.ndarray, np.ndarray]:
    """RigL redistribution (Evci et al. 2020), row by row: regrow up to ``share`` of each row's
    pruned weights where |∂L/∂W| is largest (they start at zero), and prune as many of the row's
    lowest-scoring live weights, so density stays where it is. Returns (revive, kill)."""
    if not 0.0 <= share <= 0.05:
        raise BirdboneError(f"RigL share {share} is outside [0, 0.05]")
    mask = np.asarray(mask, dtype=bool)
    dead = ~mask
    quota = np.minimum(np.floor(share * dead.sum(axis=1)).astype(np.int64), mask.sum(axis=1))
    revive = _lowest_live(-np.abs(np.asarray(grad, dtype=np.float32)), dead, quota)
    kill = _lowest_live(np.asarray(scores), mask, revive.sum(axis=1))
    return revive, kill


def one_shot(scores: np.ndarray, target_density: float, granularity: Granularity = Granularity("row")) -> np.ndarray:
    """The mask a one-shot pruner (Wanda, SparseGPT-style) reaches in a single step: per row the
    highest-scoring ``ceil(density · width)`` weights, or per N:M group its top N. The baseline the
    waves are measured against."""
    if not 0.0 < target_density <= 1.0:
        raise BirdboneError(f"target density {target_density} is outside (0, 1]")
    scores = np.asarray(scores)
    rows, cols = scores.shape
    full = np.ones(scores.shape, dtype=bool)
    if granularity.kind == "row":
        drop = np.full(rows, cols - math.ceil(target_density * cols - 1e-9), dtype=np.int64)
        return ~_lowest_live(scores, full, drop)
    n, m = granularity.n, granularity.m
    if cols % m:
        raise BirdboneError(f"{granularity} sparsity needs rows whose width is a multiple of {m}, got {cols}")
    rank = np.argsort(np.argsort(-scores.reshape(rows, cols // m, m), axis=2, kind="stable"), axis=2, kind="stable")
    return (rank < n).reshape(rows, cols)


# -- layer-wise allocation ----------------------------------------------------------------------
ALLOCATIONS = ("uniform", "alpha")


def allocate_densities(alpha: dict[str, float | None], sizes: dict[str, int], target: float, spread: float) -> dict[str, float]:
    """Per-tensor target densities whose size-weighted mean is ``target``, spread by the baseline
    map's heavy-tail exponent α (as AlphaPruning, Lu et al. 2024): a lower α — a more heavy-tailed
    spectrum, read as a better-trained matrix — keeps more weights. α is mapped linearly onto
    [target − spread, target + spread] (lowest α densest), then shifted so the mean holds, and
    kept inside (0, 1]. Tensors without an α get the target itself."""
    if not 0.0 <= spread < 1.0:
        raise BirdboneError(f"allocation spread {spread} is outside [0, 1)")
    known = {n: a for n, a in alpha.items() if a is not None and math.isfinite(a)}
    out = {n: target for n in sizes}
    if len(known) < 2 or spread == 0.0:
        return out
    lo, hi = min(known.values()), max(known.values())
    for n, a in known.items():
        z = 0.0 if hi == lo else 2.0 * (a - lo) / (hi - lo) - 1.0  # −1 at the lowest α, +1 at the highest
        out[n] = target - spread * z
    total = sum(sizes.values())
    for _ in range(50):  # shift to the target mean; the clip to (0, 1] may need a few rounds
        mean = sum(out[n] * sizes[n] for n in sizes) / total
        if abs(mean - target) < 1e-9:
            break
        out = {n: min(1.0, max(1e-3, d + target - mean)) for n, d in out.items()}
    return out
