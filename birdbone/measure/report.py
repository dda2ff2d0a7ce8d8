"""Writers for a :class:`~birdbone.measure.map.ModelMap`: JSON, CSV, and a self-contained HTML report.

The HTML report embeds its plots as base64 PNGs (matplotlib's Agg canvas on a bare ``Figure``,
no pyplot state, so it is safe in threads and never opens a window): θ by layer and role, the
explained-variance curves of a few representative tensors (one per organ, from its middle
layer), and α by layer and organ. Every file is written atomically (temp file, then rename).
"""

from __future__ import annotations

import base64
import csv
import html
import io
import json
import os
from collections.abc import Iterable, Sequence
from dataclasses import asdict, fields

from birdbone.anatomy import ROLES
from birdbone.io.atomic import write_text_atomic
from birdbone.measure.map import Aggregate, FleetRow, ModelMap
from birdbone.measure.tensor import GROUPS, TensorMeasures

MAX_CURVES = 8


def tensor_row(t: TensorMeasures) -> dict:
    """One flat CSV row: identity, basic, distribution, θ, spectrum, status and reasons."""
    d, s = t.distribution, t.spectrum
    fit = s.alpha if s else None
    row = {
        "name": t.name, "role": t.role, "layer": t.layer, "organ": t.organ, "shape": "x".join(map(str, t.shape)),
        "type": t.type, "n_params": t.n_params, "n_bytes": t.n_bytes, "bits_per_weight": t.bits_per_weight,
        "frobenius": t.frobenius, "zero_share": t.zero_share,
        "entropy": d and d.entropy, "kurtosis": d and d.kurtosis, "coherence": d and d.coherence,
        "coherence_nonzero": d and d.coherence_nonzero, "zero_gap_share": d and d.zero_gap_share, "theta": t.theta,
        "spectrum_method": s and s.method, "sigma_max": s and s.sigma_max, "stable_rank": s and s.stable_rank,
        "effective_rank": s and s.effective_rank, "rank90": s and s.rank90, "rank95": s and s.rank95, "rank99": s and s.rank99,
        "alpha": fit and fit.alpha, "alpha_xmin": fit and fit.xmin, "alpha_ks": fit and fit.ks_distance,
        "alpha_n_tail": fit and fit.n_tail,
    }
    row.update({f"status_{g}": t.status.get(g) for g in GROUPS})
    row["reasons"] = "; ".join(f"{g}: {r}" for g, r in t.reasons.items())
    return row


def _csv_text(rows: Sequence[dict]) -> str:
    buf = io.StringIO()
    if rows:
        w = csv.DictWriter(buf, fieldnames=list(rows[0]), lineterminator="\n")
        w.writeheader()
        w.writerows([{k: "" if v is None else v for k, v in r.items()} for r in rows])
    return buf.getvalue()


def write_json(m: ModelMap, path: str | os.PathLike, curves: bool = False) -> None:
    write_text_atomic(path, json.dumps(m.as_dict(curves), indent=1, allow_nan=False) + "\n")


def write_csv(m: ModelMap, path: str | os.PathLike) -> None:
    """One row per tensor (see :func:`tensor_row` for the columns)."""
    write_text_atomic(path, _csv_text([tensor_row(t) for t in m.tensors]))


def write_fleet_csv(rows: Iterable[FleetRow], path: str | os.PathLike) -> None:
    write_text_atomic(path, _csv_text([asdict(r) for r in rows]))


# ---- HTML ---------------------------------------------------------------------------------------


def png_base64(fig) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    buf = io.BytesIO()
    FigureCanvasAgg(fig).print_png(buf)
    return base64.b64encode(buf.getvalue()).decode("ascii")


def figure(title: str, xlabel: str, ylabel: str):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 4.2), dpi=100, layout="constrained")
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    return fig, ax


def _no_data(ax) -> None:
    ax.text(0.5, 0.5, "no data", ha="center", va="center", transform=ax.transAxes)


def plot_theta(m: ModelMap) -> str:
    fig, ax = figure(f"θ ({m.theta_version}) by layer and role", "layer", "θ (degrees)")
    cells = [a for a in m.by_layer_role() if a.theta_mean is not None]
    for role in ROLES:
        pts = [(a.layer, a.theta_mean) for a in cells if a.role == role]
        if pts:
            line = ax.plot(*zip(*pts, strict=True), marker="o", ms=3, label=f"{role} (mean)")[0]
            each = [(t.layer, t.theta) for t in m.tensors if t.role == role and t.layer is not None and t.theta is not None]
            ax.scatter(*zip(*each, strict=True), s=8, alpha=0.35, color=line.get_color())
    if cells:
        ax.set_ylim(0, 90)
        ax.legend(fontsize=8)
    else:
        _no_data(ax)
    return png_base64(fig)


def representative(m: ModelMap, limit: int = MAX_CURVES) -> list[TensorMeasures]:
    """One tensor with a spectrum per organ (the one at its middle layer), roles in ROLES order."""
    by_organ: dict[str, list[TensorMeasures]] = {}
    for t in m.tensors:
        if t.spectrum is not None:
            by_organ.setdefault(t.organ, []).append(t)
    picks = []
    for ts in by_organ.values():
        ts = sorted(ts, key=lambda t: (t.layer is None, t.layer or 0))
        picks.append(ts[(len(ts) - 1) // 2])
    picks.sort(key=lambda t: (ROLES.index(t.role) if t.role in ROLES else len(ROLES), t.organ))
    return picks[:limit]


def plot_explained_variance(m: ModelMap) -> str:
    fig, ax = figure("Explained variance (representative tensors)", "k / number of singular values", "ExplainedVar[k]")
    picks = representative(m)
    for t in picks:
        ev = t.spectrum.explained_variance
        n = len(ev)
        ax.plot([(i + 1) / n for i in range(n)], ev, label=f"{t.name} ({n}{'' if t.spectrum.exact else ', approx.'})")
    for q in (0.9, 0.99):
        ax.axhline(q, color="grey", lw=0.7, ls="--")
    if picks:
        ax.set_ylim(0, 1.01)
        ax.legend(fontsize=7)
    else:
        _no_data(ax)
    return png_base64(fig)


def plot_alpha(m: ModelMap) -> str:
    fig, ax = figure("Power-law exponent α of the eigenvalue spectrum, by layer", "layer", "α")
    organs = sorted({t.organ for t in m.tensors if t.alpha is not None and t.layer is not None})
    for organ in organs:
        pts = sorted((t.layer, t.alpha) for t in m.tensors if t.organ == organ and t.alpha is not None and t.layer is not None)
        ax.plot(*zip(*pts, strict=True), marker="o", ms=3, label=organ)
    if organs:
        ax.axhspan(2, 6, color="green", alpha=0.06, label="2 ≤ α ≤ 6")
        ax.legend(fontsize=7, ncol=2)
    else:
        _no_data(ax)
    return png_base64(fig)


def fmt_cell(v, digits: int = 3) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.{digits}g}" if abs(v) < 1e4 else f"{v:.3e}"
    return html.escape(str(v))


def html_table(head: Sequence[str], rows: Iterable[Sequence]) -> str:
    th = "".join(f"<th>{html.escape(h)}</th>" for h in head)
    body = "".join("<tr>" + "".join(f"<td>{fmt_cell(c)}</td>" for c in r) + "</tr>" for r in rows)
    return f"<table><thead><tr>{th}</tr></thead><tbody>{body}</tbody></table>"


def _aggregate_table(aggs: Sequence[Aggregate], key: str) -> str:
    cols = [f.name for f in fields(Aggregate) if f.name not in ("role", "layer")]
    return html_table([key, *cols], ([getattr(a, key), *(getattr(a, c) for c in cols)] for a in aggs))


CSS = """body{font-family:system-ui,sans-serif;margin:2em;max-width:75em}table{border-collapse:collapse;font-size:12px;margin:1em 0}
td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}th{background:#f4f4f4}td:first-child{text-align:left}img{max-width:100%}"""


def render_html(m: ModelMap, title: str | None = None) -> str:
    """The report as one self-contained HTML string."""
    title = title or f"birdbone measure: {os.path.basename(m.model)}"
    o = m.overall()
    status = m.status_counts()
    skipped = m.skipped()
    parts = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p>{html.escape(m.model)} · {html.escape(m.architecture)} · {m.n_params:,} parameters · {len(m.tensors)} tensors · "
        f"θ mean {fmt_cell(o.theta_mean)}° (parameter-weighted {fmt_cell(o.theta_weighted)}°) · α mean {fmt_cell(o.alpha_mean)} · "
        f"{html.escape(m.config.version)} / {html.escape(m.theta_version)} · measured in {m.seconds:.1f} s with {m.jobs} job(s)</p>",
        "<h2>Exact, approximate, skipped</h2>",
        html_table(["measure", "exact", "approximate", "skipped"], ([g, *status[g].values()] for g in GROUPS)),
        "<h2>By role</h2>", _aggregate_table(m.by_role(), "role"),
        f"<h2>θ</h2><img alt='theta by layer' src='data:image/png;base64,{plot_theta(m)}'>",
        f"<h2>Explained variance</h2><img alt='explained variance' src='data:image/png;base64,{plot_explained_variance(m)}'>",
        f"<h2>α</h2><img alt='alpha by layer' src='data:image/png;base64,{plot_alpha(m)}'>",
        "<h2>By layer</h2>", _aggregate_table(m.by_layer(), "layer"),
        f"<h2>Skipped measures ({len(skipped)} tensors)</h2>",
        html_table(["tensor", "measure", "reason"], ([n, g, r] for n, rs in skipped.items() for g, r in rs.items())),
        "<h2>Tensors</h2>",
        html_table(["tensor", "role", "layer", "type", "bits/weight", "θ", "entropy", "kurtosis", "coherence", "stable rank",
                "effective rank", "rank99", "α", "spectrum"],
               ([t.name, t.role, t.layer, t.type, t.bits_per_weight, t.theta, t.distribution and t.distribution.entropy,
                 t.distribution and t.distribution.kurtosis, t.distribution and t.distribution.coherence,
                 t.spectrum and t.spectrum.stable_rank, t.spectrum and t.spectrum.effective_rank, t.spectrum and t.spectrum.rank99,
                 t.alpha, t.status["spectrum"]] for t in m.tensors)),
        "</body></html>\n",
    ]
    return "\n".join(parts)


def write_html(m: ModelMap, path: str | os.PathLike, title: str | None = None) -> None:
    """Write the self-contained HTML report (plots embedded as base64 PNG) atomically."""
    write_text_atomic(path, render_html(m, title))
