"""``birdbone compress``: run a recipe from model to a verified, served-ready GGUF.

:func:`compress` is :func:`~birdbone.recipe.plan.plan_compress` (a frozen list of steps, each
declaring what it reads and writes) run by :func:`execute`. The run folder (a
:class:`~birdbone.io.run_folder.RunFolder` of kind ``compress``) is the pipeline's memory. It
holds the resolved recipe, the text split (calibration / verify), one output per step
(``map.json``, ``profile/``, ``waves/`` — a prune run folder with its DeltaHistory —
``waves.gguf``, ``scaffold.gguf``, ``plan.json``, ``export.gguf``), the metrics log (one JSONL
row per stage), the verify report, the diff bundle (parent → output) and ``provenance.json``.
``state.json`` records each finished stage; a killed run resumes after its last finished stage
(the waves stage resumes inside its own run folder), and since every stage is seeded, a resumed
run writes the same bytes as an uninterrupted one.

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
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from birdbone.io.inputs import read_json
from birdbone.io.atomic import write_text_atomic
from birdbone.io.errors import BirdboneError
from birdbone.io.run_folder import RunFolder, sha256_text
from birdbone.recipe.config import Recipe
from birdbone.recipe.plan import EXPORTED, OUTPUT_MODEL, CompressPlan, Step, plan_compress, usage_dir
from birdbone.io.progress import Progress, tick, relabel

log = logging.getLogger(__name__)
PACKAGES = ("birdbone", "torch", "llama-cpp-python", "gguf", "transformers", "peft", "safetensors", "numpy")


@dataclass
class Work:
    """What the steps share: the plan, the run folder and its state, the float parent."""

    plan: CompressPlan
    rf: RunFolder
    parent: Path  # the float form every stage starts from and verify compares against
    input_grid: str | None  # the quantized grid the input is stored in (excluded from plans)
    progress: Progress | None = None
    threads: int | None = None

    @property
    def run(self) -> Path:
        return self.rf.path

    @property
    def recipe(self) -> Recipe:
        return self.plan.recipe

    @property
    def state(self) -> dict:
        return self.rf.state

    @property
    def done(self) -> dict:
        return self.state.setdefault("done", {})

    @property
    def calibration(self) -> Path:
        return self.run / "calibration.txt"

    @property
    def verify_text(self) -> Path:
        return self.run / "verify.txt"

    def model(self, name: str) -> Path:
        """A model the plan names: ``parent``, or a GGUF in the run folder."""
        return self.parent if name == "parent" else self.run / name

    def usage(self, name: str) -> Path:
        """The usage profile of model ``name`` in the run folder, profiled on the calibration text the first time."""
        from birdbone.measure import profile, write_profile

        folder = self.run / usage_dir(name)
        if not folder.is_dir():  # a profile folder appears whole (written aside, then renamed)
            cfg = self.recipe.profile
            write_profile(profile(self.model(name), self.calibration, cfg.tokens, cfg.ctx, cfg.gradients, progress=self.progress), folder)
        return folder


# -- setup ------------------------------------------------------------------------------------------
def split_texts(text: Path | None, eval_text: Path | None, holdout: float) -> tuple[str, str, str]:
    """Calibration body, verify body, and a note on where each came from."""
    from birdbone.io.text import load_text, split_holdout

    body, name = load_text(text)
    if eval_text is not None:
        held, held_name = load_text(eval_text)
        return body, held, f"calibration: {name}; verify: {held_name}"
    calibration, held = split_holdout(body, holdout)
    return calibration, held, f"{name}: the first {100 * (1 - holdout):.0f} % calibrates, the last {100 * holdout:.0f} % verifies"


def open_work(plan: CompressPlan, progress: Progress | None = None, threads: int | None = None) -> Work:
    """Create the run folder, or check that it belongs to this model, recipe and text, and load its state."""
    from birdbone.io.float_form import float_source
    from birdbone.io.hashing import file_sha256

    calibration, held, note = split_texts(plan.text, plan.eval_text, plan.recipe.verify.holdout)
    identity = {"input_sha256": file_sha256(plan.input), "recipe_sha256": plan.recipe.sha256,
                "calibration_sha256": sha256_text(calibration), "verify_sha256": sha256_text(held)}
    rf = RunFolder.open(plan.run, "compress", identity, {"done": {}, "seconds": {}})
    if rf.state.get("done"):
        log.info("resuming %s after %s", plan.run, ", ".join(rf.state["done"]))
    parent, grid = float_source(plan.input, progress)
    if not (plan.run / "recipe.json").exists():
        rf.commit({"calibration.txt": calibration, "verify.txt": held, "recipe.json": json.dumps(plan.recipe.as_dict(), indent=1) + "\n"},
                  text=note)
    if rf.state.get("parent") != str(parent):
        rf.commit(parent=str(parent))
    return Work(plan, rf, parent, grid, progress, threads)


# -- stages: each reads what its step declares and writes what it declares --------------------------
def stage_map(w: Work, step: Step) -> dict:
    from birdbone.measure import measure_model
    from birdbone.measure.report import write_json

    m = measure_model(w.model(step.model), jobs=2, progress=relabel(w.progress, "map"))
    write_json(m, w.run / "map.json")
    roles = {a.role: {"tensors": a.tensors, "theta_mean": a.theta_mean, "alpha_mean": a.alpha_mean} for a in m.by_role()}
    return {"tensors": len(m.tensors), "theta_version": m.theta_version, "by_role": roles}


def stage_profile(w: Work, step: Step) -> dict:
    summary = json.loads((w.usage(step.model) / "usage.json").read_text())
    return {"tokens": summary["tokens"], "chunks": summary["chunks"], "weights": len(summary["tensors"])}


def map_alpha(run: Path) -> dict[str, float | None]:
    """Per tensor α from the map stage's ``map.json``."""
    return {t["name"]: t.get("alpha") for t in read_json(run / "map.json")["tensors"]}


def stage_structure(w: Work, step: Step) -> dict:
    from birdbone.remodel.structure import export_structure, run_structure

    usage = w.run / usage_dir(step.model) if usage_dir(step.model) in step.reads else None
    run = run_structure(w.model(step.model), w.run / "structure", w.recipe.structure, w.calibration, w.progress, usage=usage)
    res = export_structure(w.run / "structure", w.run / OUTPUT_MODEL["structure"], None, "F16", w.progress)
    last = run.metrics[-1]
    r = res["removed"]
    return {"waves": res["wave"], "block_params": res["density"], "arch": res["arch"], "phase": run.state.phase,
            "layers_removed": len(r["layers"]), "heads_removed": sum(len(v) for v in r["heads"].values()),
            "ffn_removed": sum(r["ffn"].values()), "hidden_removed": len(r["hidden"]),
            "heldout_ppl": last.get("ppl"), "heldout_dppl_pct": last.get("dppl_pct")}


def stage_waves(w: Work, step: Step) -> dict:
    from birdbone.remodel.prune import export, run_prune

    usage = w.run / usage_dir(step.model) if usage_dir(step.model) in step.reads else None
    alpha = map_alpha(w.run) if "map.json" in step.reads else None
    run = run_prune(w.model(step.model), w.run / "waves", w.recipe.waves, w.calibration, w.progress, usage=usage, alpha=alpha)
    res = export(w.run / "waves", w.run / OUTPUT_MODEL["waves"], None, "F16", tick(w.progress, "export waves"))
    last = run.metrics[-1]
    return {"waves": res["wave"], "density": res["density"], "phase": run.state.phase,
            "heldout_ppl": last.get("ppl"), "heldout_dppl_pct": last.get("dppl_pct")}


def stage_scaffold(w: Work, step: Step) -> dict:
    from birdbone.remodel.scaffold import scaffold_model

    cfg = w.recipe.scaffold
    usage = w.usage(step.model) if cfg.activation_aware else None
    res = scaffold_model(w.model(step.model), w.run / OUTPUT_MODEL["scaffold"], cfg, w.calibration, usage, cfg.layers, "F16", progress=w.progress)
    explained = [t.get("explained") for t in res.tensors.values() if t.get("explained") is not None]
    return {"matrices": len(res.tensors), "steps": len(res.steps),
            "mean_explained": sum(explained) / len(explained) if explained else None,
            "threshold_scale": res.steps[-1]["threshold_scale"] if res.steps else None}


def input_grids(w: Work, model: Path) -> dict[str, str] | str | None:
    """The grid each of ``model``'s tensors sits on: the input's own, tensor by tensor, while the
    stages kept every tensor's name and shape; the input's main grid once they reshaped it."""
    from birdbone.io.float_form import source_grids
    from birdbone.io.model_file import open_model

    if w.input_grid is None:
        return None
    with open_model(w.plan.input) as a, open_model(model) as b:
        same = {n: t.shape for n, t in a.tensors.items()} == {n: t.shape for n, t in b.tensors.items()}
        return source_grids(a) if same else w.input_grid


def stage_budget(w: Work, step: Step) -> dict:
    from birdbone.remodel.budget import Planner
    from birdbone.remodel.plan import write_plan

    cfg = w.recipe.budget
    # the model is a float file, but its weights may still sit on the input's grid
    planner = Planner.open(w.model(step.model), w.usage(step.model), w.calibration, cfg, w.progress, grid=input_grids(w, w.model(step.model)))
    plan = planner.plan(cfg.target_bpw, cfg.target_bytes, progress=w.progress)
    write_plan(plan, w.run / "plan.json")
    return {"method": plan.method, "target": plan.target, "bits_per_weight": plan.bits_per_weight,
            "tensor_bytes": plan.tensor_bytes, "types": plan.histogram(),
            "fortresses": sum(bool(d.get("fortress")) for d in plan.detail.values())}


def stage_export(w: Work, step: Step) -> dict:
    from birdbone.io.quantize import quantize_file
    from birdbone.remodel.plan import apply_plan, read_plan

    imatrix = w.usage(step.model) / "imatrix.gguf" if w.recipe.export.imatrix else None
    out = w.run / EXPORTED
    if "plan.json" in step.reads:
        res = apply_plan(w.model(step.model), read_plan(w.run / "plan.json"), out, imatrix)
        how = "plan"
    else:
        res = quantize_file(w.model(step.model), out, w.recipe.export.type, imatrix=imatrix)
        how = res.file_type
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


def stage_verify(w: Work, step: Step) -> dict:
    from birdbone.evaluate.compare import EvalConfig, evaluate
    from birdbone.io.quantize import quantize_file

    v = w.recipe.verify
    cfg = EvalConfig(ctx=v.ctx, tokens=v.tokens, decode=v.decode, canary_tokens=v.canary_tokens, threads=w.threads)
    report = evaluate(w.run / EXPORTED, w.parent, w.verify_text, cfg, w.progress).as_dict()
    reference = None
    if v.reference:
        ref = w.run / f"reference-{v.reference.upper()}.gguf"
        usage = [r for r in step.reads if r.startswith("profile")]
        quantize_file(w.parent, ref, v.reference, imatrix=w.run / usage[0] / "imatrix.gguf" if usage else None)
        reference = evaluate(ref, w.parent, w.verify_text, cfg, w.progress).as_dict()
        ref.unlink()
    checks = guardrails(w.recipe, report, reference)
    result = {"eval": report, "reference": reference, "guardrails": checks, "passed": all(c["passed"] for c in checks)}
    write_text_atomic(w.run / "verify.json", json.dumps(result, indent=1) + "\n")
    return {"passed": result["passed"], "guardrails": [{k: c[k] for k in ("guardrail", "limit", "passed")} for c in checks]}


STAGE_RUNNERS = {"map": stage_map, "profile": stage_profile, "structure": stage_structure, "waves": stage_waves, "scaffold": stage_scaffold,
                 "budget": stage_budget, "export": stage_export, "verify": stage_verify}


# -- the executor -------------------------------------------------------------------------------------
@dataclass
class CompressResult:
    out: Path
    run: Path
    recipe: str
    stages: dict  # stage -> summary
    verify: dict | None  # the verify report (eval, reference, guardrails, passed)
    passed: bool | None  # None without a verify stage
    seconds: dict
    extras: dict = field(default_factory=dict)  # other files written beside the output (Modelfile, dvc.yaml)

    def as_dict(self) -> dict:
        return {"out": str(self.out), "run": str(self.run), "recipe": self.recipe, "passed": self.passed, "stages": self.stages,
                "verify": self.verify, "seconds": self.seconds, **self.extras}

    def render(self) -> list:
        from birdbone.io.report import Line, Table, fmt, mib

        table = Table(["stage", "s", "what it did"], title=f"{self.recipe}: {' → '.join(self.stages)}")
        for stage, summary in self.stages.items():
            table.add(stage, f"{self.seconds.get(stage, 0):.0f}", stage_words(stage, summary))
        blocks: list = [table]
        if self.verify:
            for c in self.verify["guardrails"]:
                blocks.append(Line(f"{'pass' if c['passed'] else 'FAIL'} {c['guardrail']} {fmt(c['limit'], '.4g')}: measured {fmt(c['value'], '.4g')}",
                                   "green" if c["passed"] else "red"))
            ev = self.verify["eval"]
            blocks.append(Line(f"{self.out}: {mib(ev['model']['file_bytes'])} MiB ({fmt(ev['pct_of_parent_bytes'], '.1f')} % of the F16 parent), "
                               f"ppl {ev['model']['ppl']:.3f} vs {ev['parent']['ppl']:.3f} ({fmt(ev['delta_ppl_pct'], '+.2f')} %), "
                               f"KLD {fmt(ev.get('kld_mean'), '.4f')}, decode {fmt(ev['model']['speed'].get('decode_tok_s'), '.0f')} tok/s"))
        blocks.append(Line(f"wrote {self.out}; run folder {self.run} (report.json, provenance.json, diff.md)"
                           + "".join(f"; {k}: {v}" for k, v in self.extras.items())))
        return blocks


def stage_words(stage: str, s: dict) -> str:
    """One line per compress stage for the table."""
    from birdbone.io.report import fmt, histogram, mib

    return {
        "map": lambda: f"{s['tensors']} tensors measured ({s['theta_version']})",
        "profile": lambda: f"{s['tokens']:,} tokens profiled, {s['weights']} weights",
        "structure": lambda: (f"{s['waves']} waves to {100 * s['block_params']:.1f} % of the block parameters ({s['arch']}): {s['layers_removed']} layers, "
                              f"{s['heads_removed']} heads, {s['ffn_removed']} FFN channels, {s['hidden_removed']} hidden channels removed; "
                              f"held-out Δppl {fmt(s['heldout_dppl_pct'], '+.2f')} %"),
        "waves": lambda: f"{s['waves']} waves to density {s['density']:.3f} ({s['phase']}), held-out Δppl {fmt(s['heldout_dppl_pct'], '+.2f')} %",
        "scaffold": lambda: f"{s['matrices']} matrices, {s['steps']} rank steps, mean explained {fmt(s['mean_explained'], '.3f')}",
        "budget": lambda: f"{s['method']}: {s['bits_per_weight']:.2f} bpw ({histogram(s['types'])}), {s['fortresses']} fortresses; cap: {s['target']}",
        "export": lambda: f"{s['how']}{' + imatrix' if s['imatrix'] else ''}: {mib(s['file_bytes'])} MiB, {s['bits_per_weight']:.2f} bpw",
        "verify": lambda: "guardrails " + ("passed" if s["passed"] else "FAILED"),
    }[stage]()


def output_metadata(w: Work) -> dict:
    """The ``birdbone.*`` keys of the output: deterministic facts only (no timings, no paths)."""
    from gguf.constants import GGUFValueType as V

    from birdbone import __version__

    values = {
        "birdbone.version": (V.STRING, __version__, None),
        "birdbone.recipe.name": (V.STRING, w.recipe.name, None),
        "birdbone.recipe.sha256": (V.STRING, w.recipe.sha256, None),
        "birdbone.parent.sha256": (V.STRING, w.rf.identity["input_sha256"], None),
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


def write_provenance(w: Work) -> None:
    from birdbone.io.hashing import file_sha256
    from birdbone.io.run_folder import code_identity

    plan = w.plan
    prov = {
        "command": [Path(sys.argv[0]).name, *sys.argv[1:]],
        "cwd": os.getcwd(),
        "input": {"path": str(plan.input), "sha256": w.rf.identity["input_sha256"]},
        "parent_float_form": {"path": str(w.parent), "sha256": file_sha256(w.parent)},
        "text": {"calibration": str(plan.text) if plan.text else "builtin", "verify": str(plan.eval_text) if plan.eval_text else "held-out tail",
                 **{k: w.rf.identity[k] for k in ("calibration_sha256", "verify_sha256")}, "note": w.state.get("text")},
        "recipe": {"name": w.recipe.name, "sha256": w.recipe.sha256},
        "output": {"path": str(plan.out), "sha256": file_sha256(plan.out)},
        "code": code_identity(),
        "packages": package_versions(),
        "python": sys.version.split()[0], "platform": platform.platform(), "cpus": os.cpu_count(),
        "seconds": w.state.get("seconds", {}),
    }
    write_text_atomic(w.run / "provenance.json", json.dumps(prov, indent=1) + "\n")


def write_diff_bundle(w: Work) -> dict:
    from birdbone.anatomy.diff import diff_models, markdown

    d = diff_models(w.parent, w.plan.out, tick(w.progress, "diff"))
    data = d.as_dict()
    write_text_atomic(w.run / "diff.json", json.dumps(data, indent=1) + "\n")
    write_text_atomic(w.run / "diff.md", markdown(d))
    return {"changed": data["changed"], "tensors": data["tensors"], "bytes_a": data["bytes_a"], "bytes_b": data["bytes_b"]}


def run_step(w: Work, step: Step) -> None:
    """One step: its inputs checked, the stage run, its declared outputs checked, then committed."""
    missing = [r for r in step.reads if r not in ("parent", "input", *step.writes) and not (w.run / r).exists()]
    if missing:
        raise BirdboneError(f"{w.run}: the {step.stage} step reads {', '.join(missing)}, which no earlier step wrote")
    t0 = time.perf_counter()
    summary = STAGE_RUNNERS[step.stage](w, step)
    absent = [f for f in step.writes if not (w.run / f).exists()]
    if absent:  # the plan promised these to later steps
        raise BirdboneError(f"the {step.stage} step did not write {', '.join(absent)} (a bug: please report it)")
    seconds = {**w.state.get("seconds", {}), step.stage: round(time.perf_counter() - t0, 2)}
    done = {**w.done, step.stage: summary}
    rows = [{"stage": s, "seconds": seconds.get(s), **done[s]} for s in w.recipe.stages if s in done]
    w.rf.commit({"metrics.jsonl": "".join(json.dumps(r) + "\n" for r in rows)}, done=done, seconds=seconds)


def execute(plan: CompressPlan, progress: Progress | None = None, threads: int | None = None) -> CompressResult:
    """Run (or resume) a compress plan; writes ``plan.out`` even when a guardrail fails (marked in its metadata)."""
    from birdbone.anatomy.body import with_metadata

    w = open_work(plan, progress, threads)
    for i, step in enumerate(plan.steps):
        if step.stage in w.done:
            continue
        log.info("stage %d/%d: %s", i + 1, len(plan.steps), step.stage)
        run_step(w, step)
    with_metadata(w.run / EXPORTED, plan.out, output_metadata(w))
    if "diff" not in w.state:
        w.rf.commit(diff=write_diff_bundle(w))
    write_provenance(w)
    verify = read_json(w.run / "verify.json") if (w.run / "verify.json").exists() else None
    seconds = dict(w.state.get("seconds", {}))
    report = {"out": str(plan.out), "run": str(plan.run), "recipe": plan.recipe.name, "stages": w.done, "diff": w.state["diff"],
              "verify": verify, "seconds": seconds}
    write_text_atomic(w.run / "report.json", json.dumps(report, indent=1) + "\n")
    return CompressResult(plan.out, plan.run, plan.recipe.name, dict(w.done), verify, verify["passed"] if verify else None, seconds)


def compress(model: str | Path, recipe: Recipe, out: str | Path, run_dir: str | Path | None = None, text: str | Path | None = None,
             eval_text: str | Path | None = None, progress: Progress | None = None, threads: int | None = None) -> CompressResult:
    """Plan and run ``recipe`` on ``model`` (resuming ``run_dir`` when it holds this run)."""
    return execute(plan_compress(model, recipe, out, run_dir, text, eval_text), progress, threads)


def compress_model(model: str | Path = "builtin", recipe: str | Path | None = None, sets: list[str] | tuple[str, ...] = (),
                   out: str | Path = "out.gguf", run_dir: str | Path | None = None, text: str | Path | None = None,
                   eval_text: str | Path | None = None, ollama: bool = False, dvc: str | Path | None = None, dry_run: bool = False,
                   progress: Progress | None = None, threads: int | None = None) -> CompressResult | CompressPlan:
    """``birdbone compress``: load the recipe (a shipped name or a YAML file, ``--set`` applied), plan,
    and run it — or, with ``dry_run``, return the plan having written nothing. ``ollama`` writes a
    Modelfile beside the output; ``dvc`` names a folder whose ``dvc.yaml`` gets a stage that reruns it."""
    from birdbone.recipe.config import load_recipe, recipe_path, unused_sections, unused_warning

    r = load_recipe(recipe, sets)
    for key in unused_sections(r, sets):
        log.warning(unused_warning(key))
    plan = plan_compress(model, r, out, run_dir, text, eval_text)
    if dry_run:
        return plan
    if text is None:
        log.warning("no --text: calibrating on the package's built-in Shakespeare excerpt (pass your own text for real use)")
    res = execute(plan, progress, threads)
    if ollama:
        from birdbone.recipe.ship import write_modelfile

        res.extras["modelfile"] = str(write_modelfile(plan.out))
    if dvc is not None:
        from birdbone.recipe.ship import write_dvc_stage

        res.extras["dvc"] = str(write_dvc_stage(Path(dvc), str(model), recipe_path(recipe), list(sets), plan.text, plan.eval_text,
                                                plan.out, plan.run))
    return res
