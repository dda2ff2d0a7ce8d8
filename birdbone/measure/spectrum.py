"""The singular-value spectrum of a 2-D weight and what is read from it.

**Singular values.** Exact: σ² are the eigenvalues of the float64 Gram matrix of the smaller side
(WᵀW or WWᵀ, accumulated over row or column chunks, so memory stays at one float64 chunk plus an
n×n Gram). Every matrix of the built-in model has a side ≤ 1536, and the 49152×576 token embedding
needs only a 576×576 Gram. Squaring costs resolution at the bottom: eigenvalues below
λ_max·N·ε (N the Gram size, ε float64's epsilon — LAPACK's backward-error bound) are noise and are
set to 0, i.e. singular values under about 1e-6·σ_max read as 0. Above
``MeasureConfig.exact_max_side`` (4096) on the smaller side, a randomized SVD (Halko, Martinsson &
Tropp 2011; power iterations, fixed seed) gives the top ``approx_top_k`` values only, and every
spectrum measure is flagged approximate; the explained-variance curve then ends below 1 (the
exact ‖W‖_F² is its denominator) and effective rank, which needs every value, is not given.

**Measures.** ExplainedVar[k] = Σ_{i≤k} σ_i² / Σ σ_i² (σ descending); rank90/95/99 = the
smallest k with ExplainedVar[k] ≥ 0.90/0.95/0.99; stable rank = ‖W‖_F² / σ_max²; effective
rank = exp(entropy of σ_i / Σσ_j) (Roy & Vetterli 2007).

**α** is the power-law exponent of the eigenvalue spectrum λ = σ², fitted as WeightWatcher does
with the ``powerlaw`` package (Clauset, Shalizi & Newman 2009, continuous): for each candidate
x_min (every distinct eigenvalue but the two largest, as ``powerlaw.Fit`` does) the MLE
α = 1 + n / Σ ln(λ_i / x_min) over the n eigenvalues ≥ x_min, and the x_min whose fit has the
smallest Kolmogorov–Smirnov distance wins. All candidates are fitted at once with numpy. Unlike
``powerlaw`` ≥ 2.0, whose default bounds α to (0, 3) and refits numerically outside (1.5, 3], α
is not bounded (WeightWatcher reads 2–6 as well trained, larger as noise-like, below 2 as
over-fitted).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from birdbone.measure.basic import frobenius_norm
from birdbone.measure.config import DEFAULT_CONFIG, MeasureConfig, MeasureSkipped

GRAM_CHUNK = 1 << 20  # values of W per float64 chunk while the Gram matrix is accumulated
KS_BLOCK = 1 << 21  # candidate × eigenvalue cells per block of the vectorised x_min search


@dataclass(frozen=True)
class PowerLawFit:
    alpha: float
    xmin: float
    ks_distance: float
    n_tail: int  # eigenvalues ≥ xmin
    n_eigs: int  # positive eigenvalues offered to the fit


@dataclass(frozen=True)
class Spectrum:
    exact: bool
    method: str  # "gram_eigh" or "randomized_svd"
    min_side: int
    n_values: int  # singular values computed (min_side when exact)
    sigma_max: float
    stable_rank: float
    effective_rank: float | None  # None when approximate
    rank90: int | None  # None when not reached by the computed values
    rank95: int | None
    rank99: int | None
    alpha: PowerLawFit | None
    alpha_skipped: str | None  # why alpha is None
    explained_variance: tuple[float, ...]  # ExplainedVar[k] for k = 1..n_values


def gram(x: np.ndarray) -> np.ndarray:
    """Float64 Gram matrix of the smaller side of a 2-D ``x``: WᵀW if rows ≥ cols, else WWᵀ."""
    w = np.asarray(x)
    if w.ndim != 2:
        raise MeasureSkipped(f"{w.ndim}-D tensor: the spectrum needs a matrix")
    if w.shape[0] < w.shape[1]:
        w = w.T  # rows of w.T are columns of x: WWᵀ = (Wᵀ)ᵀ(Wᵀ)
    rows, n = w.shape
    step = max(1, GRAM_CHUNK // max(n, 1))
    g = np.zeros((n, n), dtype=np.float64)
    for i in range(0, rows, step):
        c = w[i : i + step].astype(np.float64)  # (step, n), contiguous copy
        g += c.T @ c
    return g


def exact_singular_values(x: np.ndarray) -> np.ndarray:
    """All min(rows, cols) singular values, descending, from the Gram matrix's eigenvalues."""
    g = gram(x)
    lam = np.linalg.eigvalsh(g)[::-1]  # descending
    top = float(lam[0]) if lam.size else 0.0
    lam = np.where(lam > top * lam.size * np.finfo(np.float64).eps, lam, 0.0)
    return np.sqrt(lam)


def randomized_singular_values(x: np.ndarray, k: int, oversample: int = 16, power_iters: int = 3, seed: int = 0) -> np.ndarray:
    """The top ``k`` singular values, descending, by randomized range finding (approximate)."""
    a = np.asarray(x, dtype=np.float32)
    if a.ndim != 2:
        raise MeasureSkipped(f"{a.ndim}-D tensor: the spectrum needs a matrix")
    if a.shape[0] < a.shape[1]:
        a = a.T  # (m, n) with m ≥ n
    n = a.shape[1]
    width = min(n, k + oversample)
    omega = np.random.default_rng(seed).standard_normal((n, width), dtype=np.float32)
    q, _ = np.linalg.qr(a @ omega)  # (m, width)
    for _ in range(power_iters):  # re-orthonormalise each half-step, or float32 loses the tail
        z, _ = np.linalg.qr(a.T @ q)  # (n, width)
        q, _ = np.linalg.qr(a @ z)  # (m, width)
    b = (q.T @ a).astype(np.float64)  # (width, n)
    return np.linalg.svd(b, compute_uv=False)[: min(k, n)]


def explained_variance(s: np.ndarray, total: float | None = None) -> np.ndarray:
    """ExplainedVar[k] = Σ_{i≤k} σ_i² / total (total = Σ σ_i² unless given, e.g. ‖W‖_F²)."""
    e = np.asarray(s, dtype=np.float64) ** 2
    total = float(e.sum()) if total is None else float(total)
    if total <= 0:
        raise MeasureSkipped("all singular values are zero")
    return np.minimum(np.cumsum(e) / total, 1.0)


def rank_for(curve: np.ndarray, share: float) -> int | None:
    """Smallest k with ExplainedVar[k] ≥ share (1-based); None if the curve never gets there."""
    k = int(np.searchsorted(curve, share - 1e-12, side="left"))  # 1e-12: float rounding of sums
    return k + 1 if k < len(curve) else None


def stable_rank(s: np.ndarray, total: float | None = None) -> float:
    """‖W‖_F² / σ_max² (total = ‖W‖_F², default Σ σ_i²): n for an n×n orthogonal matrix."""
    s = np.asarray(s, dtype=np.float64)
    if s.size == 0 or s.max() <= 0:
        raise MeasureSkipped("all singular values are zero")
    total = float(np.dot(s, s)) if total is None else float(total)
    return total / float(s.max()) ** 2


def effective_rank(s: np.ndarray) -> float:
    """exp(H(p)) with p_i = σ_i / Σσ_j (Roy & Vetterli 2007): between 1 and the number of σ."""
    s = np.asarray(s, dtype=np.float64)
    total = float(s.sum())
    if total <= 0:
        raise MeasureSkipped("all singular values are zero")
    p = s[s > 0] / total
    return float(np.exp(-np.dot(p, np.log(p))))


def power_law_fit(eigs: np.ndarray, min_eigs: int = 8) -> PowerLawFit:
    """Clauset–Shalizi–Newman continuous power-law fit of positive eigenvalues, x_min by KS."""
    x = np.sort(np.asarray(eigs, dtype=np.float64).reshape(-1))
    if not np.all(np.isfinite(x)):
        raise MeasureSkipped("eigenvalues are not finite")
    x = x[x > 0]  # powerlaw.Fit drops values ≤ 0 too
    n = x.size
    if n < min_eigs:
        raise MeasureSkipped(f"{n} positive eigenvalues: the power-law fit needs at least {min_eigs}")
    first = np.flatnonzero(np.r_[True, x[1:] != x[:-1]])  # first index of each distinct value
    cand = first[:-2]  # powerlaw.Fit never tries the two largest distinct values as x_min
    if cand.size < 2:
        raise MeasureSkipped(f"{first.size} distinct positive eigenvalues: the power-law fit needs at least 4")
    logx = np.log(x)
    suffix = np.cumsum(logx[::-1])[::-1]  # suffix[k] = Σ_{i≥k} ln x_i
    below = np.searchsorted(x, x, side="left")  # values strictly below x_i (ties share a CDF step)
    m = (n - cand).astype(np.float64)  # tail sizes
    alpha = 1.0 + m / (suffix[cand] - m * logx[cand])
    ks = np.empty(cand.size)
    step = max(1, KS_BLOCK // n)
    for b in range(0, cand.size, step):
        k, a, mm = cand[b : b + step, None], alpha[b : b + step, None], m[b : b + step, None]
        # model CDF 1 − (x/x_min)^(1−α) against the empirical CDF of the tail, at each tail point
        model = -np.expm1((1.0 - a) * np.maximum(logx[None, :] - logx[k], 0.0))  # 0 below x_min
        empirical = (below[None, :] - k) / mm
        diff = np.where(np.arange(n)[None, :] >= k, np.abs(model - empirical), 0.0)
        ks[b : b + step] = diff.max(axis=1)
    best = int(np.argmin(ks))
    return PowerLawFit(float(alpha[best]), float(x[cand[best]]), float(ks[best]), int(m[best]), int(n))


def describe_spectrum(x: np.ndarray, config: MeasureConfig = DEFAULT_CONFIG) -> Spectrum:
    """Every spectrum measure of a 2-D ``x``; raises :class:`MeasureSkipped` when undefined."""
    w = np.asarray(x)
    if w.ndim != 2:
        raise MeasureSkipped(f"{w.ndim}-D tensor: the spectrum needs a matrix")
    min_side = min(w.shape)
    if min_side == 0:
        raise MeasureSkipped("empty matrix")
    exact = min_side <= config.exact_max_side
    if exact:
        s = exact_singular_values(w)
        total = float(np.dot(s, s))
    else:
        s = randomized_singular_values(w, config.approx_top_k, config.approx_oversample, config.approx_power_iters, config.seed)
        total = frobenius_norm(w) ** 2
    if s.size == 0 or s[0] <= 0:
        raise MeasureSkipped("all singular values are zero")
    curve = explained_variance(s, total)
    try:
        fit, why = power_law_fit(s * s, config.alpha_min_eigs), None
    except MeasureSkipped as e:
        fit, why = None, str(e)
    return Spectrum(
        exact=exact,
        method="gram_eigh" if exact else "randomized_svd",
        min_side=min_side,
        n_values=int(s.size),
        sigma_max=float(s[0]),
        stable_rank=stable_rank(s, total),
        effective_rank=effective_rank(s) if exact else None,
        rank90=rank_for(curve, 0.90),
        rank95=rank_for(curve, 0.95),
        rank99=rank_for(curve, 0.99),
        alpha=fit,
        alpha_skipped=why,
        explained_variance=tuple(float(v) for v in curve),
    )
