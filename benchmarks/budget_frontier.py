"""Precision plans against llama.cpp's own mixes at equal bytes, given the same importance matrix.

Per subject (the built-in model's F16 form, and the float subjects from make_float_model.py:
``float`` the llama one, ``float-qwen2`` the one made with ``--arch qwen2``, and so on):

* llama.cpp's Q3_K_M, Q4_K_M, Q5_K_M, without and with birdbone's importance matrix (``birdbone
  profile`` of the F16 file on ../shared/data/wikitext-2-tok/valid.txt);
* birdbone plans capped at the byte size of each mix *with* the imatrix (so ≤ its bytes), both
  planners: ``usage`` (the bird-bone schedule with stress fortresses) and ``greedy`` (first-order
  sensitivity per byte), fitted on the same valid.txt, quantized with the same imatrix.

Every file is scored by llama.cpp on the first ``--tokens`` tokens of wiki.test.raw (ctx 512):
ppl, Δppl vs the F16 parent, KLD, top-1 agreement, decode tok/s. With ``--heal-steps`` > 0, each
imatrix mix and each plan is also healed once, QLoRA-style: masked LoRA on the linear layers trained
on valid.txt against the base fake-quantized to that file's own per-tensor types, merged into the
float weights, quantized again with the same mix or plan.

One more row per subject measures the low-rank scaffold (``birdbone scaffold``, default config)
at ``--scaffold-mix``: scaffolded, then quantized with the same mix and imatrix as the plain row.

    python benchmarks/budget_frontier.py [--subjects builtin,float] [--mixes Q3_K_M,Q4_K_M,Q5_K_M] [--tokens 8192]

Writes benchmarks/results/budget_frontier.{json,md,png}; files go to results/work/budget/.
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DATA = REPO.parent / "shared" / "data"
WORK = HERE / "results" / "work" / "budget"
OUT = HERE / "results" / "budget_frontier"
log = logging.getLogger("budget_frontier")


def subject_file(name: str) -> Path:
    """The F16 parent of a subject: ``builtin``, ``float`` (the llama float subject) or ``float-ARCH``."""
    from birdbone.io.float_form import float_form
    from make_float_model import subject_paths

    if name == "builtin":
        return float_form("builtin")
    if name != "float" and not name.startswith("float-"):
        raise SystemExit(f"subject {name!r}: builtin, float or float-ARCH (a float subject of another family)")
    arch = name.removeprefix("float").removeprefix("-") or "llama"
    f16 = subject_paths(arch)[2]
    if not f16.exists():
        raise SystemExit(f"{f16} is missing: run python benchmarks/make_float_model.py --arch {arch} first (about an hour)")
    return f16


def score(path: Path, parent: Path, args) -> dict:
    from birdbone.evaluate.compare import EvalConfig, evaluate

    r = evaluate(path, parent, DATA / "wikitext-2-raw" / "wiki.test.raw",
                 EvalConfig(ctx=512, tokens=args.tokens, decode=32, canary_tokens=0, threads=args.threads))
    return {"bytes": r.model.file_bytes, "pct_of_f16": r.pct_of_parent_bytes, "bpw": r.model.bits_per_weight,
            "ppl": r.model.ppl.ppl, "dppl_pct": r.delta_ppl_pct, "kld": r.kld["kld_mean"], "top1": r.kld["top1_agreement"],
            "decode_tok_s": r.model.speed.get("decode_tok_s"), "parent_ppl": r.parent.ppl.ppl}


def histogram(path: Path) -> dict[str, int]:
    from collections import Counter

    from birdbone.io.model_file import open_model

    with open_model(path) as m:
        return dict(Counter(t.type for t in m.tensors.values() if len(t.shape) >= 2).most_common())


def written_types(path: Path) -> dict[str, str]:
    from birdbone.io.model_file import open_model

    with open_model(path) as m:
        return {n: t.type for n, t in m.tensors.items() if len(t.shape) >= 2}


def healed_source(parent: Path, planner, tokens, types: dict[str, str], args) -> Path:
    """The parent with one QLoRA-style healing pass against these types merged in, as F32."""
    from birdbone.io.model_file import open_model
    from birdbone.remodel.heal import heal_quantized
    from birdbone.remodel.heal import HealConfig
    from birdbone.remodel.rewrite import export_weights

    imp = {n: v for n, v in planner.sens.importance.items() if v is not None}
    merged = heal_quantized(parent, types, tokens, HealConfig(steps=args.heal_steps, seed=args.seed), imp)
    out = WORK / "healed-f32.gguf"
    with open_model(parent) as m:
        export_weights(m, out, merged, "F32")
    return out


def scaffold_row(parent: Path, usage_dir: Path, tokens, imatrix: Path, work: Path, args) -> dict:
    """The scaffold's value at one export type: scaffolded (default config) then the same mix and imatrix."""
    from birdbone.io.config import load_config
    from birdbone.io.model_file import open_model
    from birdbone.io.quantize import quantize_file
    from birdbone.measure.usage import read_profile
    from birdbone.remodel.rewrite import export_weights
    from birdbone.remodel.scaffold import ScaffoldConfig, run_scaffold

    cfg = load_config(ScaffoldConfig, None, [f"seed={args.seed}"])
    res = run_scaffold(parent, read_profile(usage_dir), tokens, cfg)
    f32 = work / "scaffold-f32.gguf"
    with open_model(parent) as m:
        export_weights(m, f32, res.weights, "F32")
    path = work / f"scaffold-{args.scaffold_mix}.gguf"
    quantize_file(f32, path, args.scaffold_mix, imatrix=imatrix, threads=args.threads)
    row = {"kind": "scaffold", "label": f"scaffold (rank {cfg.rank}) → {args.scaffold_mix} + imatrix", "mix": args.scaffold_mix, "imatrix": True,
           "types": histogram(path), "scaffold_steps": res.steps, "scaffold_seconds": round(res.seconds, 1),
           "mean_explained": float(sum(t["explained"] for t in res.tensors.values()) / len(res.tensors)), **score(path, parent, args)}
    path.unlink()
    f32.unlink()
    return row


def run_subject(name: str, args) -> dict:
    from birdbone.io.config import load_config
    from birdbone.io.quantize import quantize_file
    from birdbone.measure import profile, write_profile
    from birdbone.remodel.budget import BudgetConfig, Planner
    from birdbone.remodel.plan import apply_plan, write_plan

    parent = subject_file(name)
    work = WORK / name
    work.mkdir(parents=True, exist_ok=True)
    calib = DATA / "wikitext-2-tok" / "valid.txt"
    usage = work / "usage"
    t0 = time.time()
    write_profile(profile(parent, calib, args.calibration_tokens, 512), usage)
    imatrix = usage / "imatrix.gguf"
    profile_s = time.time() - t0
    t0 = time.time()
    # the built-in F16 form is dequantized Q4_1: its grid (and types that hold it) never a plan's choice
    sets = list(args.set)
    planner = Planner.open(parent, usage, calib, load_config(BudgetConfig, None, sets), grid="Q4_1" if name == "builtin" else None)
    measure_s = time.time() - t0
    log.info("%s: profile %.0f s, sensitivity %.0f s", name, profile_s, measure_s)
    tokens = healing_tokens(parent, calib)
    rows = []
    for mix in args.mixes.split(","):
        for with_imatrix in (False, True):
            path = work / f"{mix}{'-imatrix' if with_imatrix else ''}.gguf"
            quantize_file(parent, path, mix, imatrix=imatrix if with_imatrix else None, threads=args.threads)
            rows.append({"kind": "llama.cpp", "label": f"{mix}{' + imatrix' if with_imatrix else ''}", "mix": mix, "imatrix": with_imatrix,
                         "types": histogram(path), **score(path, parent, args)})
            log.info("%s %s: %.2f MiB ppl %.3f KLD %.4f", name, rows[-1]["label"], rows[-1]["bytes"] / 2**20, rows[-1]["ppl"], rows[-1]["kld"])
            if with_imatrix:
                cap_bytes = rows[-1]["bytes"]
                if args.heal_steps:
                    healed = healed_source(parent, planner, tokens, written_types(path), args)
                    hpath = work / f"{mix}-imatrix-healed.gguf"
                    quantize_file(healed, hpath, mix, imatrix=imatrix, threads=args.threads)
                    rows.append({**rows[-1], "kind": "llama.cpp healed", "label": f"{mix} + imatrix + healing", "healed": True,
                                 **score(hpath, parent, args)})
                    log.info("%s %s: ppl %.3f KLD %.4f", name, rows[-1]["label"], rows[-1]["ppl"], rows[-1]["kld"])
                    hpath.unlink()
            path.unlink()
        for method in ("usage", "greedy"):
            t0 = time.time()
            plan = planner.plan(target_bytes=cap_bytes, method=method)
            plan_s = time.time() - t0
            write_plan(plan, work / f"plan-{method}-{mix}.json")
            path = work / f"plan-{method}-{mix}.gguf"
            apply_plan(parent, plan, path, threads=args.threads)
            rows.append({"kind": f"birdbone {method}", "label": f"{method} plan ≤ {mix} + imatrix", "mix": mix, "imatrix": True,
                         "types": histogram(path), "plan_seconds": round(plan_s, 1), "fortresses": sum(d["fortress"] for d in plan.detail.values()),
                         **score(path, parent, args)})
            log.info("%s %s: %.2f MiB ppl %.3f KLD %.4f", name, rows[-1]["label"], rows[-1]["bytes"] / 2**20, rows[-1]["ppl"], rows[-1]["kld"])
            if args.heal_steps:
                healed = healed_source(parent, planner, tokens, plan.types, args)
                apply_plan(healed, plan, path, threads=args.threads)
                rows.append({**rows[-1], "kind": f"birdbone {method} healed", "label": f"{method} plan + healing", "healed": True,
                             **score(path, parent, args)})
                log.info("%s %s: ppl %.3f KLD %.4f", name, rows[-1]["label"], rows[-1]["ppl"], rows[-1]["kld"])
            path.unlink()
    if args.scaffold_mix:
        rows.append(scaffold_row(parent, usage, tokens, imatrix, work, args))
        log.info("%s %s: ppl %.3f KLD %.4f", name, rows[-1]["label"], rows[-1]["ppl"], rows[-1]["kld"])
    return {"command": "python benchmarks/budget_frontier.py " + " ".join(sys.argv[1:]), "file": parent.name, "profile_seconds": round(profile_s, 1), "sensitivity_seconds": round(measure_s, 1),
            "notes": planner.notes, "rows": rows}


def healing_tokens(parent: Path, calib: Path):
    from birdbone.io.runtime import tokenize_texts

    return tokenize_texts(parent, calib.read_text(encoding="utf-8"))[0]


def markdown(res: dict) -> str:
    out = [f"`{res['command']}` · wiki.test.raw first {res['args']['tokens']} tokens, ctx 512, llama.cpp · plans and imatrix fitted on "
           "wikitext-2 valid.txt", ""]
    for name, sub in res["subjects"].items():
        out += [f"### {name} ({sub['file']})", "", f"`{sub.get('command', res['command'])}`", "",
                f"Profile {sub['profile_seconds']:.0f} s, sensitivity (Fisher screen, held-out slice) {sub['sensitivity_seconds']:.0f} s. "
                + " ".join(n.rstrip(".") + "." for n in sub["notes"][1:]), "",
                "| file | bytes | % of F16 | bpw | types | ppl | Δppl | KLD | top-1 | decode tok/s |", "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|"]
        for r in sub["rows"]:
            types = ", ".join(f"{k}×{v}" for k, v in r["types"].items())
            out.append(f"| {r['label']} | {r['bytes']:,} | {r['pct_of_f16']:.1f} | {r['bpw']:.2f} | {types} | {r['ppl']:.3f} | {r['dppl_pct']:+.2f} % | "
                       f"{r['kld']:.4f} | {100 * r['top1']:.1f} % | {r['decode_tok_s']:.0f} |")
        out.append("")
    return "\n".join(out)


def plot(res: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    subs = list(res["subjects"].items())
    fig, axes = plt.subplots(1, len(subs), figsize=(6 * len(subs), 4.2), squeeze=False)
    styles = {("llama.cpp", False): ("grey", "o-", "llama.cpp mixes"), ("llama.cpp", True): ("C0", "o-", "llama.cpp mixes + imatrix"),
              ("birdbone usage", True): ("C1", "s", "birdbone usage plan"), ("birdbone greedy", True): ("C2", "^", "birdbone greedy plan"),
              ("llama.cpp healed", True): ("C0", "x", "llama.cpp + imatrix, healed"), ("birdbone usage healed", True): ("C1", "x", "usage plan, healed"),
              ("birdbone greedy healed", True): ("C2", "+", "greedy plan, healed"),
              ("scaffold", True): ("C3", "D", "scaffold + imatrix mix")}
    for ax, (name, sub) in zip(axes[0], subs):
        for (kind, imat), (color, marker, label) in styles.items():
            pts = sorted((r["bytes"] / 2**20, r["ppl"]) for r in sub["rows"] if r["kind"] == kind and r["imatrix"] == imat)
            if pts:
                ax.plot(*zip(*pts), marker, color=color, label=label, ms=6)
        ax.axhline(sub["rows"][0]["parent_ppl"], color="black", lw=0.8, ls=":", label="F16 parent")
        ax.set_xlabel("file size (MiB)")
        ax.ticklabel_format(axis="x", useOffset=False)  # one mix alone spans a few kB: show real sizes
        ax.set_ylabel("perplexity, wiki.test.raw")
        ax.set_title(f"{name}: plans vs llama.cpp at equal bytes")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--subjects", default="builtin,float")
    ap.add_argument("--mixes", default="Q3_K_M,Q4_K_M,Q5_K_M")
    ap.add_argument("--tokens", type=int, default=8192, help="wiki.test.raw tokens llama.cpp scores per file")
    ap.add_argument("--calibration-tokens", type=int, default=8192)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--heal-steps", type=int, default=20, help="steps of the QLoRA-style healing pass (0: no healed rows)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--scaffold-mix", default="Q4_K_M", help="export type for the with/without-scaffold row ('' : no scaffold row)")
    ap.add_argument("--set", action="append", default=[], help="budget config key=value (as birdbone budget --set)")
    ap.add_argument("--out", default=str(OUT), help="results prefix (.json, .md, .png)")
    args = ap.parse_args()
    out = Path(args.out)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("birdbone.llama", "gguf", "birdbone.evaluate", "birdbone.io.quantize", "birdbone.remodel.budget"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    sys.path.insert(0, str(REPO))
    res = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(".json").exists() else {}
    res.update({"command": "python benchmarks/budget_frontier.py " + " ".join(sys.argv[1:]), "args": vars(args),
                "machine": {"python": platform.python_version(), "cpu_count": len(__import__("os").sched_getaffinity(0))}})
    res.setdefault("subjects", {})
    for name in args.subjects.split(","):
        res["subjects"][name] = run_subject(name, args)
        out.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
        out.with_suffix(".md").write_text(markdown(res))
        plot(res, out.with_suffix(".png"))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
