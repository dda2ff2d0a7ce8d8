"""Every measure of one tensor: :func:`measure_tensor` → :class:`TensorMeasures`.

It never raises for a tensor's content. An empty tensor, an all-zero one, one with NaN/Inf, a
1-D vector (no matrix spectrum) or a tensor with more than two dimensions (stacked experts: one
spectrum per matrix is future work) gets the affected measures as ``None`` and a reason in
``reasons``; ``status`` says for each measure group whether it is ``exact``, ``approximate`` or
``skipped``. (The scale-coherence sample is part of that measure's definition, so it counts as
exact.)
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np

from birdbone.anatomy import classify
from birdbone.measure.basic import bits_per_weight, frobenius_norm, nonfinite_counts, zero_share
from birdbone.measure.config import DEFAULT_CONFIG, MeasureConfig, MeasureSkipped
from birdbone.measure.distribution import Distribution, describe_distribution
from birdbone.measure.spectrum import Spectrum, describe_spectrum
from birdbone.measure.theta import theta_v1

GROUPS = ("basic", "distribution", "theta", "spectrum", "alpha")
EXACT, APPROXIMATE, SKIPPED = "exact", "approximate", "skipped"
_NUMPY_TYPES = {"float32": "F32", "float16": "F16", "float64": "F64", "bfloat16": "BF16"}


@dataclass(frozen=True)
class TensorMeasures:
    name: str
    role: str
    layer: int | None
    organ: str
    shape: tuple[int, ...]
    type: str  # stored type (Q4_1, F16, ...)
    n_params: int
    n_bytes: int
    bits_per_weight: float | None
    frobenius: float | None
    zero_share: float | None
    distribution: Distribution | None
    theta: float | None  # degrees, theta_v1
    spectrum: Spectrum | None
    status: dict[str, str] = field(default_factory=dict)  # group -> exact | approximate | skipped
    reasons: dict[str, str] = field(default_factory=dict)  # group -> why it was skipped
    seconds: float = 0.0  # wall time spent measuring (loading excluded)

    @property
    def alpha(self) -> float | None:
        return self.spectrum.alpha.alpha if self.spectrum and self.spectrum.alpha else None

    def as_dict(self, curves: bool = False) -> dict:
        """JSON-ready; the explained-variance curve only with ``curves=True``."""
        d = asdict(self)
        d["shape"] = list(self.shape)
        if d["spectrum"] is not None and not curves:
            del d["spectrum"]["explained_variance"]
        return d


def theta_of(x: np.ndarray, config: MeasureConfig = DEFAULT_CONFIG) -> float | None:
    """θ_v1 of one float tensor; None where the distribution cannot be measured (empty, NaN, constant)."""
    x = np.asarray(x)
    if x.size == 0 or not np.isfinite(x).all():
        return None
    try:
        dist = describe_distribution(x, config)
    except MeasureSkipped:
        return None
    return theta_v1(dist.entropy, dist.kurtosis, dist.coherence, dist.n_sample)


def _skip_all(reasons: dict[str, str], why: str, groups=("distribution", "theta", "spectrum", "alpha")) -> None:
    for g in groups:
        reasons.setdefault(g, why)


def measure_tensor(
    x: np.ndarray,
    name: str,
    *,
    stored_type: str | None = None,
    n_bytes: int | None = None,
    config: MeasureConfig = DEFAULT_CONFIG,
) -> TensorMeasures:
    """Measure one (dequantized) tensor called ``name``; ``stored_type``/``n_bytes`` describe
    how the file stores it (default: the array's own dtype and size)."""
    t0 = time.perf_counter()
    x = np.asarray(x)
    anatomy = classify(name)
    stored_type = stored_type or _NUMPY_TYPES.get(str(x.dtype), str(x.dtype))
    n_bytes = int(x.nbytes if n_bytes is None else n_bytes)
    reasons: dict[str, str] = {}
    frob = zeros = dist = theta = spec = None

    n_nan, n_inf = nonfinite_counts(x) if x.size else (0, 0)
    if x.size == 0:
        _skip_all(reasons, "empty tensor")
    else:
        zeros = zero_share(x)
        if n_nan or n_inf:
            _skip_all(reasons, f"{n_nan} NaN and {n_inf} Inf values")
        elif zeros == 1.0:
            frob = 0.0
            _skip_all(reasons, "all values are zero")
        else:
            frob = frobenius_norm(x)
    if not reasons:
        try:
            dist = describe_distribution(x, config)
            theta = theta_v1(dist.entropy, dist.kurtosis, dist.coherence, dist.n_sample)
        except MeasureSkipped as e:
            _skip_all(reasons, str(e), ("distribution", "theta"))
        if x.ndim == 1:
            _skip_all(reasons, "1-D tensor: no matrix spectrum", ("spectrum", "alpha"))
        else:
            try:
                spec = describe_spectrum(x, config)
                if spec.alpha is None:
                    reasons["alpha"] = spec.alpha_skipped or "no fit"
            except MeasureSkipped as e:
                _skip_all(reasons, str(e), ("spectrum", "alpha"))

    approx = APPROXIMATE if spec is not None and not spec.exact else EXACT
    status = {g: SKIPPED if g in reasons else (approx if g in ("spectrum", "alpha") else EXACT) for g in GROUPS}
    return TensorMeasures(
        name=name,
        role=anatomy.role,
        layer=anatomy.layer,
        organ=anatomy.organ,
        shape=tuple(int(d) for d in x.shape),
        type=stored_type,
        n_params=int(x.size),
        n_bytes=n_bytes,
        bits_per_weight=bits_per_weight(n_bytes, int(x.size)),
        frobenius=frob,
        zero_share=zeros,
        distribution=dist,
        theta=theta,
        spectrum=spec,
        status=status,
        reasons=reasons,
        seconds=time.perf_counter() - t0,
    )


def unmeasured(name: str, shape: tuple[int, ...], stored_type: str, n_bytes: int, reason: str) -> TensorMeasures:
    """The record of a tensor that could not even be loaded: every measure skipped with ``reason``."""
    anatomy = classify(name)
    n_params = int(np.prod(shape, dtype=np.int64))
    reasons = {g: reason for g in GROUPS}
    return TensorMeasures(
        name=name, role=anatomy.role, layer=anatomy.layer, organ=anatomy.organ, shape=tuple(shape), type=stored_type,
        n_params=n_params, n_bytes=n_bytes, bits_per_weight=bits_per_weight(n_bytes, n_params), frobenius=None,
        zero_share=None, distribution=None, theta=None, spectrum=None, status={g: SKIPPED for g in GROUPS}, reasons=reasons,
    )
