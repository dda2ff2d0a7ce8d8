"""Basic measures: bits per weight, Frobenius norm, share of exact zeros, non-finite counts.

Shape, stored type and parameter count come from the file's tensor index, not the array; the
rest are pure functions of a float array. Large tensors are walked in float64 chunks so that a
49152×576 embedding never needs a second full-size copy.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

CHUNK = 1 << 20  # values per float64 chunk (8 MiB)


def chunks(x: np.ndarray, size: int = CHUNK) -> Iterator[np.ndarray]:
    """The values of ``x``, flattened, as float64 pieces of at most ``size`` values."""
    flat = np.asarray(x).reshape(-1)
    for i in range(0, flat.size, size):
        yield flat[i : i + size].astype(np.float64, copy=False)


def bits_per_weight(n_bytes: int, n_params: int) -> float | None:
    """Stored bits per parameter (``n_bytes * 8 / n_params``); ``None`` for an empty tensor."""
    return n_bytes * 8 / n_params if n_params else None


def frobenius_norm(x: np.ndarray) -> float:
    """‖x‖_F = sqrt(Σ x²), accumulated in float64."""
    return float(np.sqrt(sum(float(np.einsum("i,i->", c, c)) for c in chunks(x))))


def zero_share(x: np.ndarray) -> float:
    """Share of values that are exactly 0 (``-0.0`` counts); 0 for an empty tensor."""
    x = np.asarray(x)
    return float(x.size - np.count_nonzero(x)) / x.size if x.size else 0.0


def nonfinite_counts(x: np.ndarray) -> tuple[int, int]:
    """(number of NaNs, number of ±Inf) in ``x``."""
    flat = np.asarray(x).reshape(-1)
    n_nan = n_inf = 0
    for i in range(0, flat.size, CHUNK):
        c = flat[i : i + CHUNK]
        n_nan += int(np.count_nonzero(np.isnan(c)))
        n_inf += int(np.count_nonzero(np.isinf(c)))
    return n_nan, n_inf
