"""Verbs of the organ architecture and the map: dissect, assemble, graft, measure, profile."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from birdbone.cli.common import CONFIG_OPT, JSON_OPT, MODEL_ARG, SET_OPT, G, app, configure, keys_help, opt, progress_bar, show, split_list
from birdbone.measure.config import ProfileConfig


@app.command()
def dissect(
    model: str = MODEL_ARG,
    out: Path = typer.Option(..., "-o", "--out", help="Organ folder to create (must not exist, or be empty)."),
    as_json: bool = JSON_OPT,
):
    """Take a GGUF apart: one file per tensor (stored bytes untouched) by role, plus manifest.json."""
    from birdbone.anatomy.dissect import dissect_model

    with progress_bar() as cb:
        show(dissect_model(model, out, cb), as_json)


@app.command()
def assemble(
    organ_dir: Path = typer.Argument(..., help="An organ folder written by birdbone dissect."),
    out: Path = typer.Option(..., "-o", "--out", help="Output GGUF."),
    accept_edits: bool = typer.Option(False, "--accept-edits", help="Tensor files whose sha256 differs from the manifest are edits, not corruption."),
    split_max_size: Optional[str] = typer.Option(None, "--split-max-size", help="Write shards of at most this size (e.g. 2G), as llama.cpp's gguf-split."),
    do_validate: bool = typer.Option(True, "--validate/--no-validate", help="Load the result in llama.cpp and generate before reporting success."),
    text: Optional[Path] = typer.Option(None, "--text", help="Also report birdbone eval figures (perplexity, speed) of the result on this text."),
    as_json: bool = JSON_OPT,
):
    """Put an organ folder back together as a GGUF (byte-identical when untouched)."""
    from birdbone.anatomy.assemble import assemble_model

    with progress_bar() as cb:
        show(assemble_model(organ_dir, out, accept_edits, split_max_size, do_validate, text, G.threads, cb), as_json)


@app.command()
def graft(
    base: Path = typer.Option(..., "--base", help="Base GGUF or organ folder."),
    donor: Path = typer.Option(..., "--donor", help="Donor GGUF or organ folder."),
    out: Path = typer.Option(..., "-o", "--out", help="Output GGUF."),
    layers: Optional[str] = typer.Option(None, "--layers", help="Layer range, e.g. 5-20 or 1,4-6."),
    roles: List[str] = typer.Option([], "--roles", help="Roles to take: skeleton, organ, embed, norm, adapter, other (repeatable or comma-separated)."),
    tensors: Optional[str] = typer.Option(None, "--tensors", help="Regex on tensor names."),
    convert_types: bool = typer.Option(False, "--convert", help="Requantize donor tensors whose type differs from the base's."),
    do_validate: bool = typer.Option(True, "--validate/--no-validate", help="Load the result in llama.cpp and generate before reporting success."),
    text: Optional[Path] = typer.Option(None, "--text", help="Also evaluate the result against the base on this text."),
    as_json: bool = JSON_OPT,
):
    """Graft organs from a donor into a base (checked first; nothing is written on a mismatch)."""
    from birdbone.anatomy.graft import graft_model

    with progress_bar() as cb:
        show(graft_model(base, donor, out, layers, split_list(roles), tensors, convert_types, do_validate, text, G.threads, cb), as_json)


@app.command()
def measure(
    models: Optional[List[str]] = typer.Argument(None, help="One or more models (default: builtin). Several give a fleet table."),
    jobs: int = typer.Option(2, "--jobs", "-j", help="Tensors measured in parallel."),
    csv: Optional[Path] = typer.Option(None, "--csv", help="Write the per-tensor table as CSV (several models: the fleet table)."),
    html: Optional[Path] = typer.Option(None, "--html", help="Write an HTML report with plots (θ by layer and role, explained variance, α by layer)."),
    as_json: bool = JSON_OPT,
):
    """Data-free map of every tensor: norms, distribution, θ (theta_v1), spectrum, α; per role and layer."""
    from birdbone.measure import measure_models

    with progress_bar() as cb:
        show(measure_models(models or ["builtin"], jobs, csv, html, cb), as_json)


@app.command(help="Usage map in torch: per linear layer what llama.cpp's imatrix stores, activation frequency, head contributions.\n\n"
                  + keys_help(ProfileConfig))
def profile(
    model: str = MODEL_ARG,
    out: Path = typer.Option(..., "-o", "--out", help="Folder for usage.safetensors, usage.json and imatrix.gguf."),
    text: Optional[Path] = typer.Option(None, "--text", help="Calibration text (default: the built-in Shakespeare excerpt)."),
    tokens: Optional[int] = opt(ProfileConfig, "tokens"),
    ctx: Optional[int] = opt(ProfileConfig, "ctx"),
    gradients: Optional[bool] = opt(ProfileConfig, "gradients", "--gradients/--no-gradients"),
    config: Optional[Path] = CONFIG_OPT,
    sets: List[str] = SET_OPT,
    as_json: bool = JSON_OPT,
):
    from birdbone.measure import profile_model

    cfg = configure(ProfileConfig, config, sets, tokens=tokens, ctx=ctx, gradients=gradients)
    with progress_bar() as cb:
        show(profile_model(model, out, text, cfg, cb, G.threads), as_json)
