"""A tensor's ladder: the llama.cpp types it can be stored in without falling back, smallest first.

Sizes are exact bytes of the types llama.cpp will write: only types whose block fits the row
width are on a ladder, so nothing falls back. The source's own quantization grid is kept off
(the built-in model's F16 form is dequantized Q4_1, so Q4_1 would be lossless by construction
and measure nothing), and :func:`grid_artifacts` finds the other types that hold that grid (Q5_1's
imatrix-guided scale search finds half of Q4_1's step and reproduces Q4_1 weights almost exactly).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

# llama.cpp's per-tensor types by size; at equal size the earlier one is preferred (K > IQ > legacy).
LADDER = ("Q2_K", "Q3_K", "Q4_K", "IQ4_NL", "Q4_0", "Q4_1", "Q5_K", "Q5_0", "Q5_1", "Q6_K", "Q8_0", "F16")
BASE = ("Q4_K", "IQ4_NL", "Q4_0")  # the 4-bit class, best first


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


def grid_artifacts(m, names: list[str], types: tuple[str, ...], importance: dict[str, np.ndarray | None],
                   grids: dict[str, str]) -> dict[str, dict[str, float]]:
    """Per source grid (each tensor's stored type, ``grids``): the types below Q8_0's bits that
    rebuild the float form of tensors on that grid better than Q8_0 does (relative error, with the
    imatrix), on one tensor per grid and row width. Such a type sits on the source's grid, and a
    plan choosing it would measure that artifact, not skill. Returns grid → type → error."""
    from gguf.constants import GGML_QUANT_SIZES

    from birdbone.io.quantize import quantize_tensor
    from birdbone.io.types import tensor_type

    sample = {}
    for n in names:
        if n in grids:
            sample.setdefault((grids[n], m.tensors[n].shape[-1]), n)

    def error(w: np.ndarray, t: str, imp) -> float:
        return float(np.linalg.norm(quantize_tensor(w, t, imp).dequantize() - w) / max(np.linalg.norm(w), 1e-30))

    q8_bits = 8.0 * GGML_QUANT_SIZES[tensor_type("Q8_0")][1] / GGML_QUANT_SIZES[tensor_type("Q8_0")][0]
    found: dict[str, dict[str, float]] = {}
    for (grid, width), n in sample.items():
        w, imp = m.tensor(n).astype(np.float32), importance.get(n)
        reference = error(w, "Q8_0", imp)
        on_grid = found.setdefault(grid, {})
        for t in types:
            block, size = GGML_QUANT_SIZES[tensor_type(t)]
            if width % block or 8.0 * size / block >= q8_bits or tensor_type(t).name == grid:
                continue
            e = error(w, t, imp)
            if e < reference:
                on_grid[tensor_type(t).name] = min(e, on_grid.get(tensor_type(t).name, e))
    return found
