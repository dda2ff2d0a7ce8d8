"""Verbs that change weights: purify, prune (and revert, report), budget, scaffold."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from birdbone.cli.common import CONFIG_OPT, JSON_OPT, MODEL_ARG, SET_OPT, G, app, configure, keys_help, opt, progress_bar, show, split_list
from birdbone.evaluate.compare import EvalConfig
from birdbone.io.progress import tick
from birdbone.remodel.budget import BudgetConfig
from birdbone.remodel.config import PruneConfig, ScaffoldConfig, StructureConfig


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
    ctx: Optional[int] = opt(EvalConfig, "ctx"),
    as_json: bool = JSON_OPT,
):
    """Purify 2-D weights (FFT or Haar), then report θ before/after and ppl/KLD against the input.

    The built-in model sits on the Q4_1 grid: requantizing to its own type snaps purified weights
    back onto that grid, so use --type F16 to see what the transform itself does.
    """
    from birdbone.remodel import purify_model

    cfg = configure(EvalConfig, None, [], ctx=ctx, tokens=tokens, decode=0, canary_tokens=0, threads=G.threads) if tokens else None
    with progress_bar() as cb:
        show(purify_model(model, out, method, strength, split_list(roles), layers, tensors, out_type, tick(cb, f"purify ({method})"), cfg, text),
             as_json)


@app.command(help="Shed density in waves (at most 10 % of what is left per wave), heal each wave with masked LoRA, stop and roll back "
                  "when Δppl exceeds the stop-loss, then export and check in llama.cpp. llama.cpp has no sparse types: the exported "
                  "file is as large as a dense one.\n\n" + keys_help(PruneConfig))
def prune(
    model: str = MODEL_ARG,
    out: Path = typer.Option(..., "-o", "--out", help="Output GGUF of the final wave."),
    run_dir: Path = typer.Option(..., "--run-dir", help="Run folder: created, or resumed when it holds this model and config."),
    target_density: Optional[float] = opt(PruneConfig, "target_density"),
    score_kind: Optional[str] = opt(PruneConfig, "score"),
    heal_steps: Optional[int] = opt(PruneConfig, "heal.steps"),
    granularity: Optional[str] = opt(PruneConfig, "granularity"),
    out_type: str = typer.Option("F16", "--type", help="Type of the exported GGUF (F16, F32, or any llama.cpp type, e.g. Q8_0, Q4_K_M)."),
    text: Optional[Path] = typer.Option(None, "--text", help="Calibration text; its last tenth is held out for the guardrail (default: the built-in Shakespeare excerpt)."),
    config: Optional[Path] = CONFIG_OPT,
    sets: List[str] = SET_OPT,
    as_json: bool = JSON_OPT,
):
    from birdbone.remodel.prune import prune_model

    cfg = configure(PruneConfig, config, sets, target_density=target_density, score=score_kind, heal__steps=heal_steps, granularity=granularity)
    with progress_bar() as cb:
        show(prune_model(model, out, run_dir, cfg, text, out_type, cb, G.threads), as_json)


@app.command(help="Shed whole structures in waves — FFN channels, query heads, key/value groups, layers, hidden channels — "
                  "healing each wave with masked LoRA distilled from the parent, then export a smaller GGUF llama.cpp runs faster "
                  "(arch llama when every layer keeps the same widths, deci otherwise) and score it in llama.cpp on the held-out text."
                  "\n\n" + keys_help(StructureConfig))
def structure(
    model: str = MODEL_ARG,
    out: Path = typer.Option(..., "-o", "--out", help="Output GGUF of the final wave, its removed units cut out."),
    run_dir: Path = typer.Option(..., "--run-dir", help="Run folder: created, or resumed when it holds this model, text and config."),
    target: Optional[float] = opt(StructureConfig, "target"),
    score_kind: Optional[str] = opt(StructureConfig, "score"),
    drop_layers: Optional[int] = opt(StructureConfig, "drop_layers"),
    hidden: Optional[int] = opt(StructureConfig, "hidden"),
    heal_steps: Optional[int] = opt(StructureConfig, "heal.steps"),
    out_type: str = typer.Option("F16", "--type", help="Type of the exported GGUF (F16, F32, or a llama.cpp type, e.g. Q8_0, Q4_K_M)."),
    text: Optional[Path] = typer.Option(None, "--text", help="Calibration and healing text; its last tenth is held out (default: the built-in Shakespeare excerpt)."),
    config: Optional[Path] = CONFIG_OPT,
    sets: List[str] = SET_OPT,
    as_json: bool = JSON_OPT,
):
    from birdbone.remodel.structure import structure_model

    cfg = configure(StructureConfig, config, sets, target=target, score=score_kind, drop_layers=drop_layers, hidden=hidden, heal__steps=heal_steps)
    with progress_bar() as cb:
        show(structure_model(model, out, run_dir, cfg, text, out_type, cb, G.threads), as_json)


@app.command()
def revert(
    run_dir: Path = typer.Argument(..., help="A run folder made by birdbone prune, structure or compress."),
    to_wave: Optional[int] = typer.Option(None, "--to-wave", help="Wave to export (0 = the original model, bit for bit)."),
    to_stage: Optional[str] = typer.Option(None, "--to-stage", help="compress runs: the float model after this stage (map, profile, structure, waves, scaffold) "
                                                                    "or the quantized one (export, verify)."),
    out: Path = typer.Option(..., "-o", "--out", help="Output GGUF."),
    out_type: str = typer.Option("F16", "--type", help="Type of the exported GGUF (--to-wave, and float stages)."),
    as_json: bool = JSON_OPT,
):
    """Export the model as it was after any committed wave, replayed exactly from the run's history,
    or (compress runs) as it was after any stage."""
    from birdbone.recipe.runs import revert_run

    with progress_bar() as cb:
        show(revert_run(run_dir, out, to_wave, to_stage, out_type, cb), as_json)


@app.command()
def report(
    run_dir: Path = typer.Argument(..., help="A run folder made by birdbone prune."),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="HTML file (default: RUN/report.html)."),
    as_json: bool = JSON_OPT,
):
    """Render a prune run's healing curves (loss per step, ppl/KLD per wave, density per tensor) as HTML."""
    from birdbone.remodel.report import report_run

    show(report_run(run_dir, out), as_json)


@app.command(help="Plan one llama.cpp type per tensor under a byte cap, from measured sensitivity or usage. "
                  "--method greedy (default) starts every tensor at its smallest legal type and buys the upgrade that lowers a "
                  "first-order loss estimate (gradients × quantization error) most per byte, while it fits. --method usage is the "
                  "bird-bone schedule: every tensor starts at 8 bits; rounds of a rising usage threshold drop the least-used to the "
                  "4-bit base; tensors whose held-out loss suffers alone in their type (or with large gradients) get 4 more bits; "
                  "then the least-used are lowered until the cap holds. Apply with: birdbone quantize --plan PLAN -o OUT.\n\n"
                  + keys_help(BudgetConfig))
def budget(
    model: str = MODEL_ARG,
    usage: Optional[Path] = typer.Option(None, "--usage", help="Usage profile folder from birdbone profile (its imatrix.gguf is used to quantize)."),
    target_bpw: Optional[float] = typer.Option(None, "--target-bpw", help="Cap: bits per weight over all parameters."),
    target_bytes: Optional[str] = typer.Option(None, "--target-bytes", help="Cap: file bytes, or a llama.cpp mix (e.g. Q4_K_M) whose size with the same importance matrix to match."),
    method: Optional[str] = opt(BudgetConfig, "method"),
    text: Optional[Path] = typer.Option(None, "--text", help="Text for the gradient screen and exact checks; its end is held out (default: the built-in Shakespeare excerpt)."),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="Plan JSON to write."),
    plan_in: Optional[Path] = typer.Option(None, "--plan", help="Show (or --emit) an existing plan instead of making one."),
    emit: Optional[str] = typer.Option(None, "--emit", help="llama-quantize: print the equivalent llama.cpp command line."),
    config: Optional[Path] = CONFIG_OPT,
    sets: List[str] = SET_OPT,
    as_json: bool = JSON_OPT,
):
    from birdbone.remodel.budget import budget_model

    cfg = configure(BudgetConfig, config, sets, method=method)
    with progress_bar() as cb:
        show(budget_model(model, usage, cfg, text, target_bpw, target_bytes, out, plan_in, emit, cb), as_json)


@app.command(help="Rebuild matrices rank by rank from their top (activation-aware) singular triplets, keep only the large residual, "
                  "micro-heal one synergy bundle per step, and merge back into dense weights.\n\n" + keys_help(ScaffoldConfig))
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
    from birdbone.remodel.scaffold import scaffold_model

    cfg = configure(ScaffoldConfig, config, sets)
    with progress_bar() as cb:
        show(scaffold_model(model, out, cfg, text, usage, layers, out_type, evaluate_after, cb), as_json)
