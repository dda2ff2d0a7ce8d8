"""The whole loop: compress, recipes, and the diff of two models or two recipes."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from birdbone.cli.common import JSON_OPT, MODEL_ARG, SET_OPT, G, app, progress_bar, show
from birdbone.recipe.config import Recipe

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
    from birdbone.recipe.config import show_recipe

    show(show_recipe(recipe, sets), as_json)


@recipe_app.command("check")
def recipe_check(
    recipe: str = typer.Argument(..., help="Shipped recipe name or YAML file."),
    sets: List[str] = SET_OPT,
    as_json: bool = JSON_OPT,
):
    """Validate a recipe without running it: keys, types, ranges, and that every guardrail can be evaluated."""
    from birdbone.recipe.config import check_recipe

    show(check_recipe(recipe, sets), as_json)


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
    dry_run: bool = typer.Option(False, "--dry-run", help="Print the plan (steps, what each reads and writes, the resolved recipe) and write nothing."),
    sets: List[str] = SET_OPT,
    as_json: bool = JSON_OPT,
):
    """Run a recipe from model to a verified GGUF: map, profile, density waves with healing, scaffold,
    precision budget, quantize, verify in llama.cpp against the float parent.

    Shipped recipes: gentle (profile + budget at Q4_K_M's size + verify: minutes) and bird-bone (the full
    loop: tens of minutes on 2 cores). See them with: birdbone recipe show gentle. Overrides go through the
    same typed recipe: --set waves.max_wave=0.05 --set budget.target_bytes=Q5_K_M.
    """
    from birdbone.recipe.compress import compress_model

    with progress_bar() as cb:
        res = compress_model(model, recipe, sets, out, run_dir, text, eval_text, ollama, Path.cwd() if dvc else None, dry_run, cb, G.threads)
    show(res, as_json)
    if getattr(res, "passed", None) is False:
        raise typer.Exit(3)


@app.command()
def diff(
    a: str = typer.Argument(..., help="A model (GGUF, .safetensors, HF folder), a wave of a run (RUN@K: prune or compress run folder), or a recipe YAML."),
    b: str = typer.Argument(..., help="Another of the same kind."),
    out: Optional[Path] = typer.Option(None, "-o", "--out", help="Also write the diff as Markdown (.md) or JSON (.json)."),
    as_json: bool = JSON_OPT,
):
    """What changed between two models (per tensor: type, shape, relative delta, sparsity, pruned and
    regrown weights; rolled up per role and layer), or between two recipes after defaults are applied."""
    from birdbone.recipe.runs import diff as run

    with progress_bar() as cb:
        show(run(a, b, out, cb), as_json)


__all__ = ["Recipe"]
