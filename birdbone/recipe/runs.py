"""What a run folder holds, for the verbs that look into finished runs: ``revert`` and ``diff``.

One resolver knows the layouts: a prune run keeps its waves itself; a compress run keeps them in
its ``waves/`` prune run, and its stages' models under the names its plan gives them
(:mod:`birdbone.recipe.plan`). ``RUN@K`` names wave K of either kind.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from birdbone.io.errors import BirdboneError, InputError
from birdbone.io.inputs import note_input, read_json
from birdbone.io.progress import Progress, tick
from birdbone.io.run_folder import STATE_FILE, read_run, reading_run, run_kind
from birdbone.recipe.plan import EXPORTED, OUTPUT_MODEL


def waves_folder(run_dir: str | Path) -> Path:
    """The run inside a run folder that holds waves: a prune or structure run itself, or a compress
    run's ``structure/`` or ``waves/``."""
    run_dir = Path(run_dir)
    kind = read_run(run_dir).get("kind")
    note_input(run_dir, folder=True)  # a finished run is read: nothing of this command lands inside it
    if kind in ("prune", "structure"):
        return run_dir
    if kind == "compress":
        for stage in ("structure", "waves"):
            if run_kind(run_dir / stage) in ("prune", "structure"):
                return run_dir / stage
        raise InputError(run_dir, "this compress run has no waves or structure stage (nothing to revert wave by wave)")
    raise InputError(run_dir, f"is a {kind} run folder; waves live in prune, structure and compress runs")


def export_wave(run_dir: str | Path, out: str | Path, wave: int | None, out_type: str, progress: Progress | None = None) -> dict:
    """Wave ``wave`` of the run's waves, written as the kind of run that made them writes it."""
    folder = waves_folder(run_dir)
    if run_kind(folder) == "structure":
        from birdbone.remodel.structure import export_structure

        return export_structure(folder, out, wave, out_type, progress)
    from birdbone.remodel.prune import export

    return export(folder, out, wave, out_type, tick(progress, "export"))


def wave_spec(spec: str) -> tuple[Path, int] | None:
    """``RUN@K`` → (run folder, K) when RUN is a folder; None for anything else (a model path)."""
    run, _, wave = spec.rpartition("@")
    if not run or not wave.isdigit() or not Path(run).is_dir():
        return None
    return Path(run), int(wave)


def model_at(spec: str, tmp: Path) -> str:
    """A model path for ``spec``: wave K of a run (``RUN@K``) replayed from its history as F32 into ``tmp``, or ``spec`` itself."""
    found = wave_spec(spec)
    if found is None:
        return spec
    with reading_run(found[0]):
        export_wave(found[0], tmp, found[1], "F32")
    return str(tmp)


@dataclass
class Reverted:
    out: Path
    wave: int | None = None
    stage: str | None = None
    type: str = "F16"
    density: float | None = None

    def as_dict(self) -> dict:
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self.__dict__.items() if v is not None}

    def render(self) -> list:
        from birdbone.io.report import Line

        if self.wave is not None:
            return [Line(f"wrote {self.out} (wave {self.wave}, density {self.density:.3f}, {self.type})")]
        return [Line(f"wrote {self.out} (after stage {self.stage}, {self.type})")]


def revert_run(run_dir: str | Path, out: str | Path, to_wave: int | None = None, to_stage: str | None = None, out_type: str = "F16",
               progress: Progress | None = None) -> Reverted:
    """The model as it was after wave ``to_wave`` (prune or compress runs, replayed bit for bit) or
    after stage ``to_stage`` of a compress run."""
    if (to_wave is None) == (to_stage is None):
        raise BirdboneError("give exactly one of --to-wave and --to-stage")
    with reading_run(run_dir):
        if to_stage is not None:
            return revert_to_stage(run_dir, to_stage, out, out_type)
        res = export_wave(run_dir, out, to_wave, out_type, progress)
    return Reverted(Path(res["out"]), wave=res["wave"], type=res["type"], density=res["density"])


def revert_to_stage(run_dir: str | Path, stage: str, out: str | Path, out_type: str = "F16") -> Reverted:
    """A float stage's model (written in ``out_type`` by llama.cpp), or the quantized export byte for byte."""
    from birdbone.io.atomic import atomic_path, check_output
    from birdbone.io.quantize import quantize_file
    from birdbone.recipe.config import STAGES, check_out_path

    run_dir, out = Path(run_dir), Path(out)
    if read_run(run_dir).get("kind") != "compress":
        raise InputError(run_dir, "not a compress run folder (--to-stage reverts compress runs)")
    note_input(run_dir, folder=True)
    state = read_json(run_dir / STATE_FILE, "run state")
    if stage not in STAGES:
        raise BirdboneError(f"--to-stage {stage!r}: stages are {', '.join(STAGES)}")
    if stage not in state["done"]:
        raise BirdboneError(f"--to-stage {stage}: this run has not finished that stage (finished: {', '.join(state['done']) or 'none'})")
    check_out_path(out, run_dir)
    check_output(out)
    if stage in ("export", "verify"):  # the quantized file as verify saw it, byte for byte
        with atomic_path(out) as tmp:
            shutil.copyfile(run_dir / EXPORTED, tmp)
        return Reverted(out, stage=stage, type="as exported")
    # map and profile leave the parent as it was; a later float stage replaces it
    done_float = [s for s in STAGES[: STAGES.index(stage) + 1] if s in OUTPUT_MODEL and s in state["done"]]
    model = run_dir / OUTPUT_MODEL[done_float[-1]] if done_float else Path(state["parent"])
    quantize_file(model, out, out_type)
    return Reverted(out, stage=stage, type=out_type)


def diff(a: str, b: str, out: str | Path | None = None, progress: Progress | None = None):
    """``birdbone diff``: two models (``RUN@K`` names a wave of a run), or two recipes after defaults.
    Writes ``out`` as Markdown (``.md``) or JSON when given."""
    from birdbone.io.atomic import write_text_atomic
    from birdbone.recipe.config import RecipeDiff, diff_recipes, is_recipe, load_recipe

    if is_recipe(a) and is_recipe(b):
        result = RecipeDiff(a, b, diff_recipes(load_recipe(a), load_recipe(b)))
        if out:
            write_text_atomic(out, json.dumps(result.changes, indent=1) + "\n")
        return result
    from birdbone.anatomy.diff import diff_models, markdown

    with tempfile.TemporaryDirectory(prefix="birdbone-diff-") as tmp:
        paths = [model_at(x, Path(tmp) / f"{side}.gguf") for x, side in ((a, "a"), (b, "b"))]
        if out:
            from birdbone.io.atomic import check_output

            check_output(out, [p for p in paths if Path(p).exists()])
        d = diff_models(*paths, tick(progress, "diff"))
    d.a, d.b = a, b  # name waves as the user wrote them
    if out:
        write_text_atomic(out, json.dumps(d.as_dict(), indent=1) + "\n" if Path(out).suffix == ".json" else markdown(d))
    return d
