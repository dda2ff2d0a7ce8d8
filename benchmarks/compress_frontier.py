"""The shipped recipes against llama.cpp's frontier, with the same importance matrix, in one run.

Per subject (the built-in model, whose input is the shipped Q4_1 file, and the float subject from
make_float_model.py):

* ``birdbone compress`` with each recipe (default: gentle, bird-bone), calibrating and healing on
  ../shared/data/wikitext-2-tok/valid.txt and verifying on ../shared/data/wikitext-2-raw/wiki.test.raw;
* llama.cpp's mixes (default: Q3_K_M, Q4_K_M, Q5_K_M) of the same float parent, quantized with the
  importance matrix the gentle run profiled (same text, same tokens).

Every file is scored by llama.cpp on the same first ``--tokens`` tokens of wiki.test.raw, ctx 512:
bytes, % of F16, ppl, Δppl, KLD, top-1, decode tok/s. On the built-in model the parent's own grid
(Q4_1) is excluded from plans and from the mixes: requantizing onto it is lossless by construction.

    python benchmarks/compress_frontier.py [--subjects builtin,float] [--recipes gentle,bird-bone] [--tokens 8192]

Writes benchmarks/results/compress_frontier.{json,md}; run folders and files go to results/work/compress/.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from budget_frontier import subject_file  # noqa: E402  (the same subjects as the budget frontier)

DATA = HERE.parent.parent / "shared" / "data"
WORK = HERE / "results" / "work" / "compress"
OUT = HERE / "results" / "compress_frontier"
log = logging.getLogger("compress_frontier")


def columns(report: dict) -> dict:
    """The frontier's columns from one evaluation report (``EvalReport.as_dict``)."""
    return {"bytes": report["model"]["file_bytes"], "pct_of_f16": report["pct_of_parent_bytes"], "bpw": report["model"]["bits_per_weight"],
            "ppl": report["model"]["ppl"], "dppl_pct": report["delta_ppl_pct"], "kld": report.get("kld_mean"),
            "top1": report.get("top1_agreement"), "decode_tok_s": report["model"]["speed"].get("decode_tok_s"),
            "parent_ppl": report["parent"]["ppl"]}


def run_subject(name: str, args) -> dict:
    from birdbone.evaluate.compare import EvalConfig, evaluate
    from birdbone.io.quantize import quantize_file
    from birdbone.io.run_folder import StaleRun
    from birdbone.recipe.compress import compress
    from birdbone.recipe.config import load_recipe

    parent = subject_file(name)
    model = "builtin" if name == "builtin" else parent
    calibration, test = DATA / "wikitext-2-tok" / "valid.txt", DATA / "wikitext-2-raw" / "wiki.test.raw"
    verify = [f"verify.tokens={args.tokens}", "verify.ctx=512", "verify.canary_tokens=0", "verify.decode=32", f"seed={args.seed}"]
    rows = []
    for recipe_name in args.recipes.split(","):
        recipe = load_recipe(recipe_name, [*verify, *args.set])
        out, run = WORK / f"{name}-{recipe_name}.gguf", WORK / f"{name}-{recipe_name}.run"
        t0 = time.time()
        try:
            res = compress(model, recipe, out, run, calibration, test, threads=args.threads)
        except StaleRun as e:  # made by other code: its bytes may not be what this code computes, so start over
            log.warning("%s; recomputing", e)
            shutil.rmtree(run)
            t0 = time.time()
            res = compress(model, recipe, out, run, calibration, test, threads=args.threads)
        rows.append({"kind": "recipe", "label": f"birdbone compress -r {recipe_name}", "recipe": recipe_name, "stages": list(recipe.stages),
                     "passed": res.passed, "stage_seconds": res.seconds, "seconds": round(time.time() - t0, 1),
                     "types": res.stages["export"]["types"], **columns(res.verify["eval"])})
        log.info("%s %s: %s", name, recipe_name, {k: rows[-1][k] for k in ("bytes", "ppl", "kld")})
    imatrix = WORK / f"{name}-{args.recipes.split(',')[0]}.run" / "profile" / "imatrix.gguf"
    cfg = EvalConfig(ctx=512, tokens=args.tokens, decode=32, canary_tokens=0, threads=args.threads)
    for mix in args.mixes.split(","):
        path = WORK / f"{name}-{mix}.gguf"
        q = quantize_file(parent, path, mix, imatrix=imatrix, threads=args.threads or 0)
        rows.append({"kind": "llama.cpp", "label": f"llama.cpp {mix} + imatrix", "mix": mix, "types": q.type_histogram(),
                     **columns(evaluate(path, parent, test, cfg).as_dict())})
        path.unlink()
        log.info("%s %s: %s", name, mix, {k: rows[-1][k] for k in ("bytes", "ppl", "kld")})
    return {"subject": name, "parent": str(parent), "imatrix": str(imatrix), "rows": rows}


def markdown(results: dict) -> str:
    lines = []
    for s in results["subjects"]:
        lines += [f"### {s['subject']} (F16 parent ppl {s['rows'][0]['parent_ppl']:.3f})", "",
                  "| file | bytes | % F16 | bpw | ppl | Δppl | KLD | top-1 | decode tok/s | guardrails |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
        for r in sorted(s["rows"], key=lambda r: r["bytes"]):
            verdict = "" if r["kind"] != "recipe" else ("pass" if r["passed"] else "FAIL")
            lines.append(f"| {r['label']} | {r['bytes']:,} | {r['pct_of_f16']:.1f} | {r['bpw']:.2f} | {r['ppl']:.3f} | {r['dppl_pct']:+.2f} % | "
                         f"{r['kld']:.4f} | {100 * r['top1']:.1f} % | {r['decode_tok_s'] or 0:.0f} | {verdict} |")
        lines.append("")
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--subjects", default="builtin,float")
    ap.add_argument("--recipes", default="gentle,bird-bone", help="the first one's profile gives the mixes their imatrix")
    ap.add_argument("--mixes", default="Q3_K_M,Q4_K_M,Q5_K_M")
    ap.add_argument("--tokens", type=int, default=8192, help="wiki.test.raw tokens llama.cpp scores per file")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--set", action="append", default=[], help="recipe override key=value (as birdbone compress --set)")
    ap.add_argument("--out", default=str(OUT), help="results prefix (.json, .md)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    if "Q4_1" in args.mixes.upper().split(",") and "builtin" in args.subjects:
        raise SystemExit("Q4_1 is the built-in model's own grid (lossless by construction): leave it out of --mixes")
    WORK.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    results = {"command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]), "args": vars(args),
               "machine": {"platform": platform.platform(), "python": platform.python_version()}, "subjects": []}
    run_subjects(out, results, args.subjects.split(","), lambda name: run_subject(name, args), markdown)
    return 0


def run_subjects(out: Path, results: dict, names: list[str], run_one, markdown) -> None:
    """Run each subject, writing ``out``.json/.md after each; the other subjects of an earlier run are kept."""
    if out.with_suffix(".json").exists():
        old = json.loads(out.with_suffix(".json").read_text())
        results["subjects"] = [s for s in old.get("subjects", []) if s["subject"] not in names]
    for name in names:
        results["subjects"].append(run_one(name))
        out.with_suffix(".json").write_text(json.dumps(results, indent=1) + "\n")
        out.with_suffix(".md").write_text(markdown(results))
    print(markdown(results))


if __name__ == "__main__":
    sys.exit(main())
