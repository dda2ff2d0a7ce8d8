"""Healing curves of a prune run: TensorBoard scalars while it runs, an HTML page after.

:func:`log_wave` appends one committed wave to the run's TensorBoard folder (``RUN/tb``):
per wave ppl, Δppl, KLD, density; per healing step the loss (global step = healing steps so
far). :func:`write_report` renders ``metrics.jsonl`` as one self-contained HTML page with PNG
plots: loss per step, ppl and KLD per wave, density per tensor per wave (``birdbone report``).
"""

from __future__ import annotations

import html
import json
from pathlib import Path

import numpy as np

from birdbone.io.atomic import write_text_atomic
from birdbone.io.errors import InputError
from birdbone.io.inputs import note_folder_files, read_json
from birdbone.measure.report import CSS, figure, html_table, png_base64


def read_metrics(run_dir: str | Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise InputError(Path(run_dir), "not a prune run folder (no metrics.jsonl)")
    from birdbone.io.run_folder import read_jsonl

    return read_jsonl(path)


def log_wave(run_dir: str | Path, metrics: list[dict]) -> None:
    """Write the last committed wave's scalars to ``RUN/tb`` (TensorBoard event files)."""
    from torch.utils.tensorboard import SummaryWriter

    m = metrics[-1]
    step0 = sum(len(x.get("heal_losses", [])) for x in metrics[:-1])
    with SummaryWriter(str(Path(run_dir) / "tb")) as tb:
        for key in ("ppl", "dppl_pct", "kld", "density"):
            if m.get(key) is not None:
                tb.add_scalar(f"wave/{key}", m[key], m["wave"])
        for i, loss in enumerate(m.get("heal_losses", [])):
            tb.add_scalar("heal/loss", loss, step0 + i + 1)


def _plot_losses(metrics: list[dict]) -> str:
    fig, ax = figure("healing loss per step (waves separated)", "healing step", "loss")
    step = 0
    for m in metrics:
        losses = m.get("heal_losses") or []
        if losses:
            ax.plot(range(step + 1, step + len(losses) + 1), losses, lw=1)
            ax.axvline(step + 0.5, color="grey", lw=0.5, alpha=0.5)
            step += len(losses)
    return png_base64(fig)


def _plot_waves(metrics: list[dict]) -> str:
    fig, ax = figure("held-out perplexity and KLD per wave", "wave", "perplexity")
    waves = [m["wave"] for m in metrics]
    ax.plot(waves, [m["ppl"] for m in metrics], "o-", label="ppl")
    ax2 = ax.twinx()
    ax2.plot(waves, [m.get("kld") or 0.0 for m in metrics], "s--", color="C1", label="KLD")
    ax2.set_ylabel("KLD vs the source")
    for m in metrics:
        if m.get("phase") == "rollback":
            ax.axvspan(m["wave"] - 0.5, m["wave"] + 0.5, color="C3", alpha=0.1)
    fig.legend(loc="upper left")
    return png_base64(fig)


def _plot_density(metrics: list[dict]) -> str:
    rows = [m for m in metrics if m.get("tensor_density")]
    fig, ax = figure("density per tensor after each wave", "tensor", "wave")
    if not rows:
        ax.text(0.5, 0.5, "no waves yet", ha="center", va="center", transform=ax.transAxes)
        return png_base64(fig)
    names = list(rows[0]["tensor_density"])
    grid = np.array([[m["tensor_density"][n] for n in names] for m in rows])
    im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0, vmax=1, interpolation="nearest")
    ax.set_yticks(range(len(rows)), [str(m["wave"]) for m in rows])
    ax.set_xticks([])
    fig.colorbar(im, ax=ax, label="density")
    return png_base64(fig)


def write_report(run_dir: str | Path, out: str | Path | None = None) -> Path:
    run_dir = Path(run_dir)
    metrics = read_metrics(run_dir)
    note_folder_files(run_dir, own=("report.html",))  # the run is an input; its report.html is the report's own
    config = read_json(run_dir / "config.json")
    state = read_json(run_dir / "state.json") if (run_dir / "state.json").exists() else {}
    out = Path(out) if out else run_dir / "report.html"
    from birdbone.io.run_folder import run_kind

    title = f"birdbone {run_kind(run_dir) or 'prune'} run: {run_dir.name}"
    rows = [[m["wave"], m.get("phase"), m["density"], m["ppl"], m.get("dppl_pct"), m.get("kld"), m.get("heal_steps"),
             ", ".join(map(str, m.get("stressed_layers", []))) or "—", m.get("seconds")] for m in metrics]
    page = [
        f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p>source {html.escape(config['source']['path'])} · phase {html.escape(str(state.get('phase', '?')))} · "
        f"{state.get('waves', 0)} waves committed</p>",
        "<h2>Waves</h2>",
        html_table(["wave", "phase", "density", "ppl", "Δppl %", "KLD", "heal steps", "stressed layers", "seconds"], rows),
        f"<h2>Healing</h2><img alt='loss per step' src='data:image/png;base64,{_plot_losses(metrics)}'>",
        f"<h2>Quality</h2><img alt='ppl and KLD per wave' src='data:image/png;base64,{_plot_waves(metrics)}'>",
        f"<h2>Density</h2><img alt='density per tensor' src='data:image/png;base64,{_plot_density(metrics)}'>",
        f"<h2>Config</h2><pre>{html.escape(json.dumps(config, indent=2))}</pre>",
        "</body></html>\n",
    ]
    write_text_atomic(out, "\n".join(page))
    return out


class RunReport:
    """``birdbone report``: the rendered page and the waves it shows."""

    def __init__(self, out: Path, run_dir: Path, waves: list[dict]):
        self.out, self.run_dir, self.waves = out, run_dir, waves

    def as_dict(self) -> dict:
        return {"out": str(self.out), "waves": self.waves}

    def render(self) -> list:
        from birdbone.io.report import Line
        from birdbone.remodel.prune import waves_table

        return [waves_table(self.waves), Line(f"wrote {self.out} (TensorBoard: tensorboard --logdir {self.run_dir / 'tb'})")]


def report_run(run_dir: str | Path, out: str | Path | None = None) -> RunReport:
    """Render a prune run's healing curves as HTML (default: RUN/report.html)."""
    from birdbone.io.run_folder import reading_run

    with reading_run(run_dir):
        path = write_report(run_dir, out)
        return RunReport(path, Path(run_dir), read_metrics(run_dir))
