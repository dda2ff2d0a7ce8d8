"""``birdbone compress``: run a recipe from model to a verified, served-ready GGUF.

The run folder is the pipeline's memory. It holds the resolved recipe, the text split
(calibration / verify), one output per stage (``map.json``, ``profile/``, ``waves/`` — a prune
run folder with its DeltaHistory — ``waves.gguf``, ``scaffold.gguf``, ``plan.json``), the
metrics log (one JSONL row per stage), the verify report, the diff bundle (parent → output) and
``provenance.json``. ``state.json`` records each finished stage and what it left; a killed run
resumes after its last finished stage (the waves stage resumes inside its own run folder), and
since every stage is seeded, a resumed run writes the same bytes as an uninterrupted one.

Data flows one way through the stages: the float parent (a quantized input's F16 form) → remodelled
float models (waves, scaffold) → a plan → the quantized GGUF → verify → the output, stamped with
``birdbone.*`` metadata (only deterministic facts: version, recipe hash, parent hash, stage
summary, guardrail verdict). Timings and command lines live in ``provenance.json``.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from birdbone.io.atomic import write_text_atomic
from birdbone.io.errors import BirdboneError, InputError
from birdbone.recipe.config import Recipe, check_out_path

log = logging.getLogger(__name__)
Progress = Callable[[str, int, int], None]
STATE = "state.json"
EXPORTED = "export.gguf"  # the quantized file before verify stamps it and it moves to -o
PACKAGES = ("birdbone", "torch", "llama-cpp-python", "gguf", "transformers", "peft", "safetensors", "numpy")


@dataclass
class Work:
    """What the stages pass along: paths inside the run folder, and the stages' summaries."""

    run: Path
    recipe: Recipe
    input: Path  # the user's model file
    input_grid: str | None  # the quantized grid the input is stored in (excluded from plans)
    parent: Path  # the float form every stage starts from and verify compares against
    current: Path  # the float model the next stage works on
    calibration: Path
    verify_text: Path
    state: dict = field(default_factory=dict)

    @property
    def done(self) -> dict:
        return self.state.setdefault("done", {})

    def path(self, key: str) -> Path | None:
        value = self.state.get("paths", {}).get(key)
        return self.run / value if value else None

    def keep(self, key: str, path: Path) -> None:
        inside = path.resolve().is_relative_to(self.run.resolve())  # the parent lives outside (the user's file, or the cache)
        self.state.setdefault("paths", {})[key] = str(path.resolve().relative_to(self.run.resolve()) if inside else path.resolve())

    def save(self) -> None:
        write_text_atomic(self.run / STATE, json.dumps(self.state, indent=1) + "\n")


# -- setup ------------------------------------------------------------------------------------------
def _split_text(text: Path | None, eval_text: Path | None, holdout: float) -> tuple[str, str, str]:
    """Calibration body, verify body, and a note on where each came from."""
    from birdbone.io.text import load_text

    body, name = load_text(text)
    if eval_text is not None:
        held, held_name = load_text(eval_text)
        return body, held, f"calibration: {name}; verify: {held_name}"
    cut = int(len(body) * (1 - holdout))
    cut = body.rfind("\n", 0, cut) + 1 or cut  # at a line break, so no word is split
    return body[:cut], body[cut:], f"{name}: the first {100 * (1 - holdout):.0f} % calibrates, the last {100 * holdout:.0f} % verifies"


def open_work(model: str | Path, recipe: Recipe, run_dir: Path, out: Path, text: Path | None, eval_text: Path | None,
              progress: Progress | None = None) -> Work:
    """Create the run folder, or check that it belongs to this model, recipe and text, and load its state."""
    from birdbone.io.atomic import check_output
    from birdbone.io.hashing import file_sha256
    from birdbone.io.model_file import resolve_model_path
    from birdbone.remodel.budget import plan_source

    input_path = resolve_model_path(model)
    check_out_path(out, run_dir)
    check_output(out, [input_path, *(p for p in (text, eval_text) if p)])
    calibration, held, note = _split_text(text, eval_text, recipe.verify.holdout)
    identity = {"input_sha256": file_sha256(input_path), "recipe_sha256": recipe.sha256,
                "calibration_sha256": _sha(calibration), "verify_sha256": _sha(held)}
    run_dir = Path(run_dir)
    if run_dir.exists() and any(run_dir.iterdir()):
        if not (run_dir / STATE).exists():
            raise InputError(run_dir, "exists and is not a compress run folder (no state.json); use a new --run-dir")
        state = json.loads((run_dir / STATE).read_text())
        changed = [k.removesuffix("_sha256") for k, v in identity.items() if state.get("identity", {}).get(k) != v]
        if changed:
            raise InputError(run_dir, f"this run was started with another {', '.join(changed)}; use a new --run-dir")
        log.info("resuming %s after %s", run_dir, ", ".join(state.get("done", {})) or "no finished stage")
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        state = {"identity": identity, "done": {}, "paths": {}}
        write_text_atomic(run_dir / STATE, json.dumps(state, indent=1) + "\n")  # first: a folder killed now is still ours
    parent, grid = plan_source(input_path, progress)
    work = Work(run_dir, recipe, input_path, grid, parent, parent, run_dir / "calibration.txt", run_dir / "verify.txt", state)
    if not work.calibration.exists():
        write_text_atomic(work.calibration, calibration)
        write_text_atomic(work.verify_text, held)
        write_text_atomic(run_dir / "recipe.json", json.dumps(recipe.as_dict(), indent=1) + "\n")
        state["text"] = note
        work.save()
    if state.get("parent") != str(parent):
        state["parent"] = str(parent)
        work.save()
    work.current = work.path("current") or parent
    return work


def _sha(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# -- stages -----------------------------------------------------------------------------------------
def stage_map(w: Work, progress: Progress | None) -> dict:
    from birdbone.measure import measure_model
    from birdbone.measure.report import write_json

    cb = (lambda name, i, n: progress("map", i, n)) if progress else None
    m = measure_model(w.parent, jobs=2, progress=cb)
    write_json(m, w.run / "map.json")
    roles = {a.role: {"tensors": a.tensors, "theta_mean": a.theta_mean, "alpha_mean": a.alpha_mean} for a in m.by_role()}
    return {"tensors": len(m.tensors), "theta_version": m.theta_version, "by_role": roles}


def usage_of(w: Work, progress: Progress | None) -> Path:
    """The usage profile of the current model: the profile stage's, or a fresh one after remodelling."""
    from birdbone.measure import profile, write_profile

    key = f"profile:{w.current.name}"
    if w.path(key) is not None:
        return w.path(key)
    folder = w.run / ("profile" if w.current == w.parent else f"profile-{w.current.stem}")
    cfg = w.recipe.profile
    prof = profile(w.current, w.calibration, cfg.tokens, cfg.ctx, progress=progress)
    write_profile(prof, folder)
    w.keep(key, folder)
    w.save()
    return folder


def stage_profile(w: Work, progress: Progress | None) -> dict:
    folder = usage_of(w, progress)
    summary = json.loads((folder / "usage.json").read_text())
    return {"tokens": summary["tokens"], "chunks": summary["chunks"], "weights": len(summary["tensors"])}


def stage_waves(w: Work, progress: Progress | None) -> dict:
    from birdbone.remodel.prune import export, run_prune

    run = run_prune(w.current, w.run / "waves", w.recipe.waves, w.calibration, progress)
    out = w.run / "waves.gguf"
    res = export(w.run / "waves", out, None, "F16", (lambda i, n: progress("export waves", i, n)) if progress else None)
    w.current = out
    last = run.metrics[-1]
    return {"waves": res["wave"], "density": res["density"], "phase": run.state.phase,
            "heldout_ppl": last.get("ppl"), "heldout_dppl_pct": last.get("dppl_pct")}


def stage_scaffold(w: Work, progress: Progress | None) -> dict:
    from gguf.constants import GGUFValueType

    from birdbone.anatomy.selection import parse_layers
    from birdbone.io.model_file import open_model
    from birdbone.io.runtime import tokenize_texts
    from birdbone.measure.usage import read_profile
    from birdbone.remodel.rewrite import export_weights
    from birdbone.remodel.scaffold import run_scaffold

    cfg = w.recipe.scaffold
    prof = read_profile(usage_of(w, progress)) if cfg.activation_aware else None
    tokens, = tokenize_texts(w.current, w.calibration.read_text(encoding="utf-8"))
    with open_model(w.current) as m:
        n_layers = int(m.meta(f"{m.architecture}.block_count", 0) or 0)
    res = run_scaffold(w.current, prof, tokens, cfg, parse_layers(cfg.layers, n_layers), progress)
    out = w.run / "scaffold.gguf"
    with open_model(w.current) as m:
        export_weights(m, out, res.weights, "F16", {"birdbone.scaffold.rank": (cfg.rank, GGUFValueType.UINT32, None)})
    w.current = out
    explained = [t.get("explained") for t in res.tensors.values() if t.get("explained") is not None]
    return {"matrices": len(res.tensors), "steps": len(res.steps),
            "mean_explained": sum(explained) / len(explained) if explained else None,
            "threshold_scale": res.steps[-1]["threshold_scale"] if res.steps else None}


def stage_budget(w: Work, progress: Progress | None) -> dict:
    from birdbone.remodel.budget import Planner, write_plan

    cfg = w.recipe.budget
    # the current model is a float file, but its weights may still sit on the input's grid
    planner = Planner.open(w.current, usage_of(w, progress), w.calibration, cfg, progress, grid=w.input_grid)
    plan = planner.plan(cfg.target_bpw, cfg.target_bytes, progress=progress)
    write_plan(plan, w.run / "plan.json")
    w.keep("plan", w.run / "plan.json")
    return {"method": plan.method, "target": plan.target, "bits_per_weight": plan.bits_per_weight,
            "tensor_bytes": plan.tensor_bytes, "types": plan.histogram(),
            "fortresses": sum(bool(d.get("fortress")) for d in plan.detail.values())}


def stage_export(w: Work, progress: Progress | None) -> dict:
    from birdbone.io.quantize import quantize_file
    from birdbone.remodel.budget import apply_plan, read_plan

    imatrix = usage_of(w, progress) / "imatrix.gguf" if w.recipe.export.imatrix else None
    out = w.run / EXPORTED
    plan = w.path("plan")
    if plan is not None:
        res = apply_plan(w.current, read_plan(plan), out, imatrix)
        how = "plan"
    else:
        res = quantize_file(w.current, out, w.recipe.export.type, imatrix=imatrix)
        how = res.file_type
    w.keep("exported", out)
    return {"how": how, "imatrix": imatrix is not None, "file_bytes": res.file_bytes, "bits_per_weight": res.bits_per_weight,
            "types": res.type_histogram(), "fallbacks": len(res.fallbacks)}


def guardrails(recipe: Recipe, report: dict, reference: dict | None) -> list[dict]:
    """Each guardrail the recipe sets, with the measured value and whether it held."""
    v = recipe.verify
    checks = []

    def check(name: str, value, limit, ok: bool) -> None:
        checks.append({"guardrail": name, "value": value, "limit": limit, "passed": bool(ok)})

    if v.max_dppl_pct is not None:
        check("Δppl % ≤", report["delta_ppl_pct"], v.max_dppl_pct, report["delta_ppl_pct"] <= v.max_dppl_pct)
    if v.max_kld is not None:
        check("KLD mean ≤", report["kld_mean"], v.max_kld, report["kld_mean"] <= v.max_kld)
    if v.min_canary is not None:
        check("canaries identical ≥", report["canary_exact"], v.min_canary, report["canary_exact"] >= v.min_canary)
    if reference is not None:
        ref_bytes, ref_ppl = reference["model"]["file_bytes"], reference["model"]["ppl"]
        limit = ref_ppl * (1 + v.reference_slack_pct / 100)
        check(f"bytes ≤ {v.reference}", report["model"]["file_bytes"], ref_bytes, report["model"]["file_bytes"] <= ref_bytes)
        check(f"ppl ≤ {v.reference}" + (f" + {v.reference_slack_pct:g} %" if v.reference_slack_pct else ""),
              report["model"]["ppl"], limit, report["model"]["ppl"] <= limit)
    return checks


def stage_verify(w: Work, progress: Progress | None, threads: int | None = None) -> dict:
    from birdbone.evaluate.compare import EvalConfig, evaluate
    from birdbone.io.quantize import quantize_file

    v = w.recipe.verify
    cfg = EvalConfig(ctx=v.ctx, tokens=v.tokens, decode=v.decode, canary_tokens=v.canary_tokens, threads=threads)
    report = evaluate(w.path("exported"), w.parent, w.verify_text, cfg, progress).as_dict()
    reference = None
    if v.reference:
        ref = w.run / f"reference-{v.reference.upper()}.gguf"
        imatrix = usage_of(w, progress) / "imatrix.gguf" if w.recipe.export.imatrix else None
        quantize_file(w.parent, ref, v.reference, imatrix=imatrix)
        reference = evaluate(ref, w.parent, w.verify_text, cfg, progress).as_dict()
        ref.unlink()
    checks = guardrails(w.recipe, report, reference)
    result = {"eval": report, "reference": reference, "guardrails": checks, "passed": all(c["passed"] for c in checks)}
    write_text_atomic(w.run / "verify.json", json.dumps(result, indent=1) + "\n")
    return {"passed": result["passed"], "guardrails": [{k: c[k] for k in ("guardrail", "limit", "passed")} for c in checks]}


STAGE_RUNNERS = {"map": stage_map, "profile": stage_profile, "waves": stage_waves, "scaffold": stage_scaffold,
                 "budget": stage_budget, "export": stage_export, "verify": stage_verify}


# -- the pipeline -----------------------------------------------------------------------------------
@dataclass
class CompressResult:
    out: Path
    run: Path
    stages: dict  # stage -> summary
    verify: dict | None  # the verify report (eval, reference, guardrails, passed)
    passed: bool | None  # None without a verify stage
    seconds: dict


def output_metadata(w: Work) -> dict:
    """The ``birdbone.*`` keys of the output: deterministic facts only (no timings, no paths)."""
    from gguf.constants import GGUFValueType as V

    from birdbone import __version__

    values = {
        "birdbone.version": (V.STRING, __version__, None),
        "birdbone.recipe.name": (V.STRING, w.recipe.name, None),
        "birdbone.recipe.sha256": (V.STRING, w.recipe.sha256, None),
        "birdbone.parent.sha256": (V.STRING, w.state["identity"]["input_sha256"], None),
        "birdbone.stages": (V.ARRAY, list(w.recipe.stages), V.STRING),
        "birdbone.stage_summary": (V.STRING, json.dumps(w.done, sort_keys=True), None),
    }
    if "verify" in w.done:
        values["birdbone.verify.passed"] = (V.BOOL, bool(w.done["verify"]["passed"]), None)
    return values


def package_versions() -> dict:
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for p in PACKAGES:
        try:
            out[p] = version(p)
        except PackageNotFoundError:
            out[p] = None
    return out


def write_provenance(w: Work, out: Path, text: Path | None, eval_text: Path | None, seconds: dict) -> None:
    from birdbone.io.hashing import file_sha256

    prov = {
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "cwd": os.getcwd(),
        "input": {"path": str(w.input), "sha256": w.state["identity"]["input_sha256"]},
        "parent_float_form": {"path": str(w.parent), "sha256": file_sha256(w.parent)},
        "text": {"calibration": str(text) if text else "builtin", "verify": str(eval_text) if eval_text else "held-out tail",
                 **{k: w.state["identity"][k] for k in ("calibration_sha256", "verify_sha256")}, "note": w.state.get("text")},
        "recipe": {"name": w.recipe.name, "sha256": w.recipe.sha256},
        "output": {"path": str(out), "sha256": file_sha256(out)},
        "packages": package_versions(),
        "python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count(),
        "seconds": seconds,
    }
    write_text_atomic(w.run / "provenance.json", json.dumps(prov, indent=1) + "\n")


def write_diff_bundle(w: Work, out: Path, progress: Progress | None) -> dict:
    from birdbone.anatomy.diff import diff_models, markdown

    d = diff_models(w.parent, out, (lambda i, n: progress("diff", i, n)) if progress else None)
    data = d.as_dict()
    write_text_atomic(w.run / "diff.json", json.dumps(data, indent=1) + "\n")
    write_text_atomic(w.run / "diff.md", markdown(d))
    return {"changed": data["changed"], "tensors": data["tensors"], "bytes_a": data["bytes_a"], "bytes_b": data["bytes_b"]}


def compress(model: str | Path, recipe: Recipe, out: str | Path, run_dir: str | Path, text: str | Path | None = None,
             eval_text: str | Path | None = None, progress: Progress | None = None, threads: int | None = None) -> CompressResult:
    """Run (or resume) ``recipe`` on ``model``; writes ``out`` even when a guardrail fails (marked in its metadata)."""
    from birdbone.anatomy.body import with_metadata

    out, run_dir = Path(out), Path(run_dir)
    text, eval_text = (Path(text) if text else None), (Path(eval_text) if eval_text else None)
    w = open_work(model, recipe, run_dir, out, text, eval_text, progress)
    seconds = dict(w.state.get("seconds", {}))
    for i, stage in enumerate(recipe.stages):
        if stage in w.done:
            continue
        log.info("stage %d/%d: %s", i + 1, len(recipe.stages), stage)
        t0 = time.perf_counter()
        runner = STAGE_RUNNERS[stage]
        summary = runner(w, progress, threads) if stage == "verify" else runner(w, progress)
        seconds[stage] = round(time.perf_counter() - t0, 2)
        w.done[stage] = summary
        w.keep("current", w.current)
        w.state["seconds"] = seconds
        w.save()
        rows = [{"stage": s, "seconds": seconds.get(s), **w.done[s]} for s in recipe.stages if s in w.done]
        write_text_atomic(w.run / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    with_metadata(w.path("exported"), out, output_metadata(w))
    if "diff" not in w.state:
        w.state["diff"] = write_diff_bundle(w, out, progress)
        w.save()
    write_provenance(w, out, text, eval_text, seconds)
    verify = json.loads((w.run / "verify.json").read_text()) if (w.run / "verify.json").exists() else None
    report = {"out": str(out), "run": str(run_dir), "recipe": recipe.name, "stages": w.done, "diff": w.state["diff"], "verify": verify,
              "seconds": seconds}
    write_text_atomic(w.run / "report.json", json.dumps(report, indent=1) + "\n")
    return CompressResult(out, run_dir, dict(w.done), verify, verify["passed"] if verify else None, seconds)



def revert_to_stage(run_dir: str | Path, stage: str, out: str | Path, out_type: str = "F16") -> dict:
    """The model as it stood after ``stage`` of a compress run: a float stage's model (written in
    ``out_type`` by llama.cpp), or the quantized export byte for byte."""
    from birdbone.io.atomic import atomic_path, check_output
    from birdbone.io.quantize import quantize_file
    from birdbone.recipe.config import STAGES

    run_dir, out = Path(run_dir), Path(out)
    if not (run_dir / STATE).exists():
        raise InputError(run_dir, "not a compress run folder (no state.json)")
    state = json.loads((run_dir / STATE).read_text())
    if stage not in STAGES:
        raise BirdboneError(f"--to-stage {stage!r}: stages are {', '.join(STAGES)}")
    if stage not in state["done"]:
        raise BirdboneError(f"--to-stage {stage}: this run has not finished that stage (finished: {', '.join(state['done']) or 'none'})")
    check_out_path(out, run_dir)
    check_output(out)
    paths = {k: run_dir / v for k, v in state["paths"].items()}
    if stage in ("export", "verify"):  # the quantized file as verify saw it, byte for byte
        with atomic_path(out) as tmp:
            shutil.copyfile(paths["exported"], tmp)
        return {"out": str(out), "stage": stage, "type": "as exported"}
    after = {"waves": run_dir / "waves.gguf", "scaffold": run_dir / "scaffold.gguf"}
    # map and profile leave the parent as it was; a later float stage replaces it
    model = next((after[s] for s in reversed(STAGES[:STAGES.index(stage) + 1]) if s in after and s in state["done"]), Path(state["parent"]))
    quantize_file(model, out, out_type)
    return {"out": str(out), "stage": stage, "type": out_type}
