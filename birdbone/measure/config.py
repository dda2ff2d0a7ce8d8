"""The measure room's settings and its one way of saying "this measure is undefined here".

:class:`MeasureConfig` is a frozen, versioned dataclass: every number a measure depends on
(histogram bins, the coherence sample and its seed, where the spectrum stops being exact) lives
here, so a map records exactly how it was made. :class:`MeasureSkipped` is raised by a metric
whose input makes it undefined (a constant tensor has no kurtosis); the per-tensor code turns
it into ``None`` plus the reason, never a crash.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

MEASURE_VERSION = "measure_v1"


class MeasureSkipped(ValueError):
    """A metric is undefined for this input; ``str(e)`` is the reason shown to the user."""


@dataclass(frozen=True)
class MeasureConfig:
    # Histogram entropy: this many equal-width bins between the tensor's min and max.
    entropy_bins: int = 256
    # Scale coherence: at most this many values, drawn without replacement with this seed.
    coherence_sample: int = 100_000
    seed: int = 0
    # Singular values are exact (eigenvalues of the float64 Gram matrix of the smaller side)
    # while the smaller side is at most this; above it a randomized SVD gives the top ones.
    exact_max_side: int = 4096
    # Randomized SVD (Halko, Martinsson & Tropp 2011): top-k values, oversampling, power iterations.
    approx_top_k: int = 256
    approx_oversample: int = 16
    approx_power_iters: int = 3
    # The power-law fit needs at least this many positive eigenvalues.
    alpha_min_eigs: int = 8
    version: str = MEASURE_VERSION

    def __post_init__(self):
        if self.entropy_bins < 2:
            raise ValueError(f"entropy_bins must be at least 2, got {self.entropy_bins}")
        if self.coherence_sample < 4:
            raise ValueError(f"coherence_sample must be at least 4, got {self.coherence_sample}")
        if self.exact_max_side < 1 or self.approx_top_k < 1:
            raise ValueError("exact_max_side and approx_top_k must be positive")
        if self.approx_oversample < 0 or self.approx_power_iters < 0:
            raise ValueError("approx_oversample and approx_power_iters must not be negative")
        if self.alpha_min_eigs < 3:
            raise ValueError(f"alpha_min_eigs must be at least 3, got {self.alpha_min_eigs}")

    def as_dict(self) -> dict:
        return asdict(self)


DEFAULT_CONFIG = MeasureConfig()


@dataclass(frozen=True)
class ProfileConfig:
    """How a usage profile reads its text (``birdbone profile``, a recipe's profile stage)."""

    tokens: int = 4096  # tokens of text to profile (whole windows); 0 = all
    ctx: int = 512  # window length, as llama-imatrix's -c
    gradients: bool = False  # also record mean |dL/dw| per weight (one backward pass per window; the taylor score needs it)

    def __post_init__(self):
        if self.ctx < 16 or (self.tokens and self.tokens < self.ctx):
            raise ValueError(f"profile: ctx ≥ 16 and tokens ≥ ctx (got tokens {self.tokens}, ctx {self.ctx})")
