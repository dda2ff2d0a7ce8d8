"""The data-free map of a model: :func:`measure_model` → :class:`ModelMap`; :func:`fleet` for many.

Tensors are dequantized one at a time inside the worker that measures them and dropped as soon
as their measures are taken, so memory stays near ``jobs`` × (largest tensor + its float64
working chunk + one Gram matrix). The biggest tensors are handed out first so that the
workers finish together. Workers are threads: the heavy parts (dequantizing, sorting,
histograms, Gram products, ``eigvalsh``) run in numpy with the GIL released.

BLAS threads: the matrices are small (a 576×576 ``eigvalsh`` takes ~20 ms), so threads inside
each BLAS call buy little, and on a busy machine OpenBLAS's spinning threads cost a lot (the
built-in model took 123 s instead of 17 s with 2 BLAS threads per call on a loaded 2-core box).
While :func:`measure_model` runs it therefore limits BLAS to ``blas_threads`` (default 1) per
call through ``threadpoolctl`` when that is installed — a process-wide setting, restored
afterwards; without it a warning says to set ``OPENBLAS_NUM_THREADS=1``. The library never
reads or writes environment variables itself.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from pathlib import Path

from birdbone.anatomy import ROLES
from birdbone.io import ModelFile, open_model
from birdbone.measure.config import DEFAULT_CONFIG, MeasureConfig
from birdbone.measure.tensor import GROUPS, SKIPPED, TensorMeasures, measure_tensor, unmeasured
from birdbone.measure.theta import THETA_VERSION
from birdbone.io.progress import Progress

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class Aggregate:
    """Means over one group of tensors (a role, a layer, or a layer × role cell)."""

    role: str | None
    layer: int | None
    tensors: int
    parameters: int
    bits_per_weight: float | None  # Σ bytes · 8 / Σ parameters
    theta_mean: float | None  # over tensors with a θ
    theta_weighted: float | None  # weighted by parameters
    alpha_mean: float | None
    stable_rank_mean: float | None
    effective_rank_mean: float | None
    kurtosis_mean: float | None
    entropy_mean: float | None


def _mean(values: Iterable[float | None]) -> float | None:
    v = [x for x in values if x is not None]
    return sum(v) / len(v) if v else None


def aggregate(tensors: Sequence[TensorMeasures], by: tuple[str, ...]) -> list[Aggregate]:
    """One :class:`Aggregate` per distinct value of ``by`` (a tuple of "role" and/or "layer"; empty:
    one group of everything); grouping by layer leaves out tensors outside the layer stack."""
    if not set(by) <= {"role", "layer"}:
        raise ValueError(f"aggregate by role and/or layer, not {by!r}")
    groups: dict[tuple, list[TensorMeasures]] = {}
    for t in tensors:
        if "layer" in by and t.layer is None:
            continue
        groups.setdefault(tuple(getattr(t, k) for k in by), []).append(t)

    def order(key: tuple) -> tuple:
        return tuple(
            ROLES.index(v) if k == "role" and v in ROLES else (v if k == "layer" else len(ROLES)) for k, v in zip(by, key, strict=True)
        )

    out = []
    for key in sorted(groups, key=order):
        ts = groups[key]
        g = dict(zip(by, key, strict=True))
        params = sum(t.n_params for t in ts)
        with_theta = [t for t in ts if t.theta is not None]
        weight = sum(t.n_params for t in with_theta)
        out.append(Aggregate(
            role=g.get("role"),
            layer=g.get("layer"),
            tensors=len(ts),
            parameters=params,
            bits_per_weight=sum(t.n_bytes for t in ts) * 8 / params if params else None,
            theta_mean=_mean(t.theta for t in ts),
            theta_weighted=sum(t.theta * t.n_params for t in with_theta) / weight if weight else None,
            alpha_mean=_mean(t.alpha for t in ts),
            stable_rank_mean=_mean(t.spectrum.stable_rank if t.spectrum else None for t in ts),
            effective_rank_mean=_mean(t.spectrum.effective_rank if t.spectrum else None for t in ts),
            kurtosis_mean=_mean(t.distribution.kurtosis if t.distribution else None for t in ts),
            entropy_mean=_mean(t.distribution.entropy if t.distribution else None for t in ts),
        ))
    return out


@dataclass(frozen=True)
class ModelMap:
    model: str  # the path measured
    architecture: str
    format: str
    tensors: tuple[TensorMeasures, ...]  # in file order
    config: MeasureConfig
    jobs: int
    seconds: float  # wall time of measure_model
    theta_version: str = THETA_VERSION

    @property
    def n_params(self) -> int:
        return sum(t.n_params for t in self.tensors)

    def tensor(self, name: str) -> TensorMeasures:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)

    def by_role(self) -> list[Aggregate]:
        return aggregate(self.tensors, ("role",))

    def by_layer(self) -> list[Aggregate]:
        return aggregate(self.tensors, ("layer",))

    def by_layer_role(self) -> list[Aggregate]:
        return aggregate(self.tensors, ("layer", "role"))

    def overall(self) -> Aggregate:
        whole = aggregate(self.tensors, ())
        return whole[0] if whole else Aggregate(None, None, 0, 0, *([None] * 8))

    def status_counts(self) -> dict[str, dict[str, int]]:
        """group → {exact, approximate, skipped} → number of tensors."""
        out = {g: {"exact": 0, "approximate": 0, "skipped": 0} for g in GROUPS}
        for t in self.tensors:
            for g, s in t.status.items():
                out[g][s] += 1
        return out

    def skipped(self) -> dict[str, dict[str, str]]:
        """tensor name → group → reason, for every tensor with a skipped measure."""
        return {t.name: dict(t.reasons) for t in self.tensors if any(s == SKIPPED for s in t.status.values())}

    def as_dict(self, curves: bool = False) -> dict:
        """JSON-ready (no NaN); explained-variance curves only with ``curves=True``."""
        return {
            "model": self.model,
            "architecture": self.architecture,
            "format": self.format,
            "measure_version": self.config.version,
            "theta_version": self.theta_version,
            "config": self.config.as_dict(),
            "jobs": self.jobs,
            "seconds": self.seconds,
            "parameters": self.n_params,
            "overall": asdict(self.overall()),
            "status": self.status_counts(),
            "by_role": [asdict(a) for a in self.by_role()],
            "by_layer": [asdict(a) for a in self.by_layer()],
            "tensors": [t.as_dict(curves) for t in self.tensors],
        }


def _measure_one(model: ModelFile, name: str, config: MeasureConfig) -> TensorMeasures:
    info = model.tensors[name]
    try:
        x = model.tensor(name)
    except Exception as e:  # an unsupported quant type must not sink the whole map
        log.warning("%s: could not dequantize %s (%s): %s", model.path, name, info.type, e)
        return unmeasured(name, info.shape, info.type, info.n_bytes, f"could not dequantize {info.type}: {e}")
    return measure_tensor(x, name, stored_type=info.type, n_bytes=info.n_bytes, config=config)


def limit_blas_threads(threads: int | None):
    """A context that caps BLAS threads (``threadpoolctl``); a no-op for ``None`` or without it."""
    if threads is None:
        return contextlib.nullcontext()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        log.info("threadpoolctl is not installed: BLAS threads are not limited; "
                    "set OPENBLAS_NUM_THREADS=1 if measuring is slow on a busy machine")
        return contextlib.nullcontext()
    return threadpool_limits(limits=threads, user_api="blas")


def _run(mf: ModelFile, order: list[str], jobs: int, config: MeasureConfig, progress: Progress | None) -> dict[str, TensorMeasures]:
    results: dict[str, TensorMeasures] = {}
    total = len(order)
    if jobs == 1:
        for i, n in enumerate(order, 1):
            results[n] = _measure_one(mf, n, config)
            if progress:
                progress(n, i, total)
        return results
    with ThreadPoolExecutor(max_workers=jobs, thread_name_prefix="measure") as pool:
        futures = {pool.submit(_measure_one, mf, n, config): n for n in order}
        for i, f in enumerate(as_completed(futures), 1):
            results[futures[f]] = f.result()
            if progress:
                progress(futures[f], i, total)
    return results


def measure_model(
    model: ModelFile | str | os.PathLike,
    jobs: int = 1,
    progress: Progress | None = None,
    config: MeasureConfig = DEFAULT_CONFIG,
    names: Sequence[str] | None = None,
    blas_threads: int | None = 1,
) -> ModelMap:
    """Measure every tensor of ``model`` (a :class:`ModelFile`, a path or ``"builtin"``; or only
    those in ``names``) with ``jobs`` worker threads, each BLAS call limited to ``blas_threads``
    threads (``None``: leave BLAS alone). ``progress(name, done, total)`` runs in the caller's thread."""
    if jobs < 1:
        raise ValueError(f"jobs must be at least 1, got {jobs}")
    owned = not isinstance(model, ModelFile)
    mf = open_model(model) if owned else model
    try:
        names = list(mf.tensors) if names is None else list(names)
        missing = [n for n in names if n not in mf.tensors]
        if missing:
            raise KeyError(f"{mf.path}: no tensor named {missing[0]!r}")
        order = sorted(names, key=lambda n: -mf.tensors[n].n_params)  # biggest first: even finish
        log.info("measuring %d tensors of %s with %d job(s)", len(order), mf.path, jobs)
        t0 = time.perf_counter()
        with limit_blas_threads(blas_threads):
            results = _run(mf, order, jobs, config, progress)
        seconds = time.perf_counter() - t0
        log.info("measured %d tensors in %.2f s", len(order), seconds)
        return ModelMap(
            model=str(mf.path),
            architecture=mf.architecture,
            format=mf.format,
            tensors=tuple(results[n] for n in names),
            config=config,
            jobs=jobs,
            seconds=seconds,
        )
    finally:
        if owned:
            mf.close()


@dataclass(frozen=True)
class FleetRow:
    model: str
    architecture: str
    parameters: int
    tensors: int
    measured: int  # tensors with a θ
    skipped: int  # tensors with at least one skipped measure
    theta_mean: float | None
    theta_weighted: float | None
    alpha_mean: float | None
    bits_per_weight: float | None


def fleet(maps: Iterable[ModelMap]) -> list[FleetRow]:
    """One row per model: parameters, θ mean (per tensor and parameter-weighted), tensors."""
    rows = []
    for m in maps:
        o = m.overall()
        rows.append(FleetRow(
            model=m.model, architecture=m.architecture, parameters=m.n_params, tensors=len(m.tensors),
            measured=sum(t.theta is not None for t in m.tensors), skipped=len(m.skipped()),
            theta_mean=o.theta_mean, theta_weighted=o.theta_weighted, alpha_mean=o.alpha_mean,
            bits_per_weight=o.bits_per_weight,
        ))
    return rows


@dataclass
class FleetReport:
    """``birdbone measure``: one model's map, or several models side by side."""

    maps: list[ModelMap]
    written: list[str]  # the CSV / HTML files written

    def as_dict(self) -> dict:
        if len(self.maps) == 1:
            return self.maps[0].as_dict()
        return {"fleet": [r.__dict__ for r in fleet(self.maps)], "models": [m.as_dict() for m in self.maps]}

    def render(self) -> list:
        from birdbone.io.report import Line, Table, fmt

        blocks: list = []
        for m in self.maps:
            table = Table(["role", "tensors", "parameters", "θ mean", "θ weighted", "α mean", "stable rank", "kurtosis", "bpw"],
                          title=f"{Path(m.model).name}: {len(m.tensors)} tensors in {m.seconds:.1f} s ({m.theta_version})")
            for a in m.by_role():
                table.add(a.role, a.tensors, f"{a.parameters:,}", fmt(a.theta_mean, ".1f", "°"), fmt(a.theta_weighted, ".1f", "°"),
                          fmt(a.alpha_mean, ".2f"), fmt(a.stable_rank_mean, ".1f"), fmt(a.kurtosis_mean, ".2f"), fmt(a.bits_per_weight, ".2f"))
            blocks.append(table)
            skipped = m.skipped()
            if skipped:
                name, why = next(iter(skipped.items()))
                blocks.append(Line(f"{len(skipped)} tensor(s) with skipped measures (e.g. {name}: {next(iter(why.values()))})", "dim"))
        if len(self.maps) > 1:
            table = Table(["model", "architecture", "parameters", "tensors", "θ mean", "α mean", "bpw"], title="fleet")
            for r in fleet(self.maps):
                table.add(Path(r.model).name, r.architecture, f"{r.parameters:,}", r.tensors, fmt(r.theta_mean, ".1f", "°"),
                          fmt(r.alpha_mean, ".2f"), fmt(r.bits_per_weight, ".2f"))
            blocks.append(table)
        return blocks + [Line(f"wrote {p}") for p in self.written]


def measure_models(models: Sequence[str | os.PathLike] = ("builtin",), jobs: int = 2, csv: str | os.PathLike | None = None,
                   html: str | os.PathLike | None = None, progress: Progress | None = None) -> FleetReport:
    """Map every model; write the per-tensor CSV (several models: the fleet table) and the first model's HTML page."""
    from birdbone.io.progress import relabel
    from birdbone.measure.report import write_csv, write_fleet_csv, write_html

    maps = [measure_model(m, jobs=jobs, progress=relabel(progress, "measure")) for m in models]
    if csv:
        write_fleet_csv(fleet(maps), csv) if len(maps) > 1 else write_csv(maps[0], csv)
    if html:
        write_html(maps[0], html)
    return FleetReport(maps, [str(p) for p in (csv, html) if p])
