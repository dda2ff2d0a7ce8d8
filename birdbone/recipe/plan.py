"""A compress run as a frozen plan: each step names the stage, what it reads and what it writes.

:func:`plan_compress` turns a model, a recipe and the paths a user gave into a
:class:`CompressPlan` without running anything and without writing anything (``birdbone compress
--dry-run`` prints it). The executor in :mod:`birdbone.recipe.compress` runs the steps in order,
checks before each step that what it reads is there and after it that what it declared it
writes is there, so the declarations below are tested by every run.

Paths are relative to the run folder; two names stand outside it: ``input`` (the user's model)
and ``parent`` (its float form: the input itself, or its cached F16 form when it is quantized).
Later stages read what earlier ones wrote instead of computing it again: waves score with the
profile stage's usage and allocate densities from the map's α; budget, export and verify use
the usage profile of the model they work on (``profile/`` for the parent, ``profile-NAME/`` for a
remodelled ``NAME.gguf``, written by the first step that needs it).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from birdbone.io.inputs import read_json
from birdbone.io.errors import InputError
from birdbone.io.run_folder import RUN_FILE, STATE_FILE
from birdbone.recipe.config import Recipe, check_out_path

# The stage each float stage leaves as the model later stages work on.
OUTPUT_MODEL = {"structure": "structure.gguf", "waves": "waves.gguf", "scaffold": "scaffold.gguf"}
EXPORTED = "export.gguf"  # the quantized file before verify stamps it and it moves to -o
SETUP_FILES = ("calibration.txt", "verify.txt", "recipe.json")


def usage_dir(model: str) -> str:
    """The run-folder profile of a model the plan names (``parent`` or ``NAME.gguf``)."""
    return "profile" if model == "parent" else f"profile-{Path(model).stem}"


@dataclass(frozen=True)
class Step:
    stage: str
    model: str  # the model the stage works on (``parent`` or a run-folder GGUF)
    reads: tuple[str, ...]
    writes: tuple[str, ...]
    config: dict  # the recipe's section for the stage ({} when it has none)

    def as_dict(self) -> dict:
        return {"stage": self.stage, "model": self.model, "reads": list(self.reads), "writes": list(self.writes), "config": self.config}


@dataclass(frozen=True)
class CompressPlan:
    model: str
    input: Path
    out: Path
    run: Path
    text: Path | None
    eval_text: Path | None
    recipe: Recipe
    steps: tuple[Step, ...]
    done: tuple[str, ...] = ()  # stages an existing run folder already finished (resumed, not rerun)

    def as_dict(self) -> dict:
        return {"model": self.model, "input": str(self.input), "out": str(self.out), "run": str(self.run),
                "text": str(self.text) if self.text else "builtin", "eval_text": str(self.eval_text) if self.eval_text else None,
                "recipe": self.recipe.as_dict(), "recipe_sha256": self.recipe.sha256,
                "setup": {"reads": ["input", "text"], "writes": [RUN_FILE, STATE_FILE, *SETUP_FILES]},
                "steps": [s.as_dict() for s in self.steps], "done": list(self.done)}

    def render(self) -> list:
        import yaml

        from birdbone.io.report import Line, Table

        table = Table(["#", "stage", "works on", "reads", "writes", ""], title=f"{self.recipe.name}: the plan (dry run, nothing written)")
        for i, s in enumerate(self.steps, 1):
            table.add(i, s.stage, s.model, ", ".join(s.reads), ", ".join(s.writes), "done (resumed)" if s.stage in self.done else "")
        return [Line(f"{self.input} → {self.out}; run folder {self.run}; text: {self.text or 'builtin'}"
                     + (f", verify on {self.eval_text}" if self.eval_text else "")),
                table, Line("resolved recipe:", "bold"), Line(yaml.safe_dump(self.recipe.as_dict(), sort_keys=False).rstrip("\n"))]


# the stages that run the model in torch (a usage profile, healing, sensitivities); map, export (unless its imatrix
# asks for a profile) and verify read files
TORCH_STAGES = {"profile", "structure", "waves", "scaffold", "budget"}


def plan_steps(recipe: Recipe) -> tuple[Step, ...]:
    """The steps of ``recipe``, in the fixed stage order, each with what it reads and writes."""
    steps: list[Step] = []
    current, profiled = "parent", set()
    sections = recipe.as_dict()

    def usage_of(model: str, writes: list[str]) -> str:
        folder = usage_dir(model)
        if folder not in profiled:  # the first step that needs it profiles the model
            profiled.add(folder)
            writes.append(folder)
        return folder

    for stage in recipe.stages:
        reads: list[str] = []
        writes: list[str] = []
        if stage == "map":
            reads, writes = [current], ["map.json"]
        elif stage == "profile":
            reads, writes = [current, "calibration.txt"], []
            usage_of(current, writes)
        elif stage == "structure":
            reads = [current, "calibration.txt", *([usage_dir(current)] if usage_dir(current) in profiled else [])]
            writes = ["structure", OUTPUT_MODEL["structure"]]
        elif stage == "waves":
            reads = [current, "calibration.txt"]
            if recipe.waves.score != "magnitude" and usage_dir(current) in profiled:
                reads.append(usage_dir(current))
            if recipe.waves.allocation != "uniform" and recipe.has("map"):
                reads.append("map.json")
            writes = ["waves", OUTPUT_MODEL["waves"]]
        elif stage == "scaffold":
            reads = [current, "calibration.txt"]
            if recipe.scaffold.activation_aware:
                reads.append(usage_of(current, writes))
            writes.append(OUTPUT_MODEL["scaffold"])
        elif stage == "budget":
            reads = [current, "calibration.txt", usage_of(current, writes)]
            writes.append("plan.json")
        elif stage == "export":
            reads = [current, *(["plan.json"] if recipe.has("budget") else []),
                     *([usage_of(current, writes)] if recipe.export.imatrix else [])]
            writes.append(EXPORTED)
        elif stage == "verify":
            reads = [EXPORTED, "parent", "verify.txt"]
            if recipe.verify.reference and recipe.export.imatrix:
                reads.append(usage_dir("parent"))  # the reference is a llama.cpp mix of the parent, with the parent's imatrix
            writes = ["verify.json"]
        steps.append(Step(stage, current, tuple(dict.fromkeys(reads)), tuple(writes), sections.get(stage, {})))
        current = OUTPUT_MODEL.get(stage, current)
    return tuple(steps)


def finished_stages(run_dir: Path) -> tuple[str, ...]:
    """The stages an existing compress run folder has finished (read only; nothing checked or written)."""
    try:
        return tuple(read_json(run_dir / STATE_FILE).get("done", {}))
    except (OSError, ValueError, AttributeError, InputError):
        return ()


def plan_compress(model: str | Path, recipe: Recipe, out: str | Path, run_dir: str | Path | None = None,
                  text: str | Path | None = None, eval_text: str | Path | None = None) -> CompressPlan:
    """The frozen plan of a compress run: checks the request (paths, inputs) and writes nothing."""
    from birdbone.io.atomic import check_output
    from birdbone.io.families import check_bridge_takes
    from birdbone.io.model_file import resolve_model_path

    out = Path(out)
    run_dir = Path(run_dir) if run_dir else default_run_dir(out)
    text, eval_text = (Path(text) if text else None), (Path(eval_text) if eval_text else None)
    input_path = resolve_model_path(model)
    if not input_path.exists():
        raise InputError(input_path, "no such file or folder")
    for t in (text, eval_text):
        if t is not None and not t.is_file():
            raise InputError(t, "no such file")
    check_out_path(out, run_dir)
    check_output(out, [input_path, *(p for p in (text, eval_text) if p)])
    if set(recipe.stages) & TORCH_STAGES or (recipe.has("export") and recipe.export.imatrix):  # a usage profile: refuse now, not after the map
        check_bridge_takes(input_path)
    return CompressPlan(str(model), input_path, out, run_dir, text, eval_text, recipe, plan_steps(recipe), finished_stages(run_dir))


def default_run_dir(out: Path) -> Path:
    """``OUT.run`` beside ``OUT.gguf``."""
    return out.with_name(out.name.removesuffix(".gguf") + ".run")
