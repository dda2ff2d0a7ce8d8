"""θ: one angle in [0°, 90°] that places a tensor between "flat" and "outlier-dominated".

Upstream's θ formula is unpublished; this is birdbone's own, versioned ``theta_v1``. Any change
to it gets a new name (``theta_v2``) so maps made with different formulas are never compared.

    θ_v1 = 90° · (u_H + u_κ + u_c) / 3

    u_H = 1 − H                          H = histogram entropy / ln(bins), in [0, 1]
    u_κ = κ⁺ / (κ⁺ + 3)                  κ⁺ = max(excess kurtosis, 0)
    u_c = ln(max(CV, 1)) / ln(√(N − 1))  CV = scale coherence over N gaps, clipped to [0, 1]

**Rationale.** The three distribution measures are three views of one property — how much of
the mass sits in a narrow bulk while a few values lie far out — which is what decides how well a
tensor takes a uniform quantization grid. Each is mapped to [0, 1] by a monotone squashing that
is 0 for a flat, evenly spread distribution (uniform: H = 1, κ < 0, CV ≈ 1) and tends to 1 as
outliers dominate (a single spike: H → 0, κ → ∞, CV → its maximum √(N − 1)):

* entropy is already in [0, 1], so u_H is its deficit;
* kurtosis is unbounded, so u_κ uses the rational squashing x / (x + 3) whose half-way point is
  the Laplace distribution (κ = 3); sub-Gaussian shapes (κ < 0) are all "flat" (u_κ = 0);
* coherence spans orders of magnitude (Gaussian ≈ 24, Cauchy ≈ 150 at 100,000 values), so u_c
  is its logarithm relative to the largest value possible for that many gaps; this also makes a
  576-value norm vector comparable with a 100,000-value sample.

No component is known to matter more than another, so the weights are equal; the mean of three
[0, 1] numbers scaled by 90° keeps θ bounded and stable (no division by a measured quantity).

**What it separates** (synthetic 1536×576 arrays, see ``tests/test_measure.py``): uniform ≈ 0°,
Gaussian noise ≈ 21°, a rank-3 product of Gaussians ≈ 34°, Laplace ≈ 40°, Student-t(3) ≈ 73°,
Cauchy ≈ 86°. θ sees only the multiset of values: shuffling a matrix's entries leaves it
unchanged up to the coherence sample, which is drawn by position (its CV hangs on the few
extreme values drawn: a reshuffled 768×288 matrix moved θ by about 2°), so a low-rank matrix differs from
noise only through its heavier-tailed entries. Structure in the arrangement is what the spectrum
measures (stable rank, rank99, α) are for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

THETA_VERSION = "theta_v1"
KURTOSIS_HALF = 3.0  # u_κ = 1/2 at the Laplace distribution's excess kurtosis


@dataclass(frozen=True)
class ThetaParts:
    u_entropy: float
    u_kurtosis: float
    u_coherence: float
    theta: float  # degrees, in [0, 90]


def _clip01(v: float) -> float:
    return min(1.0, max(0.0, v))


def theta_parts_v1(entropy: float, kurtosis: float, coherence: float, n_sample: int) -> ThetaParts:
    """The three squashed components and θ_v1 (degrees); ``n_sample`` values gave ``coherence``."""
    if n_sample < 4:
        raise ValueError(f"theta_v1 needs a coherence sample of at least 4 values, got {n_sample}")
    for name, v in (("entropy", entropy), ("kurtosis", kurtosis), ("coherence", coherence)):
        if not math.isfinite(v):
            raise ValueError(f"theta_v1: {name} is not finite ({v})")
    u_h = _clip01(1.0 - entropy)
    k = max(kurtosis, 0.0)
    u_k = k / (k + KURTOSIS_HALF)
    n_gaps = n_sample - 1
    u_c = _clip01(math.log(max(coherence, 1.0)) / (0.5 * math.log(n_gaps - 1)))
    return ThetaParts(u_h, u_k, u_c, 90.0 * (u_h + u_k + u_c) / 3.0)


def theta_v1(entropy: float, kurtosis: float, coherence: float, n_sample: int) -> float:
    """θ_v1 in degrees, in [0, 90]; see the module docstring for the formula and its rationale."""
    return theta_parts_v1(entropy, kurtosis, coherence, n_sample).theta
