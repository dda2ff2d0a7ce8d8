"""Structured density loss against llama.cpp's frontier: bytes, quality and speed, in one run.

Subject: the built-in model (its F16 form is the parent). Every structured row is a real
``birdbone compress`` run (profile → structure → budget → export → verify) calibrated and healed
on ../shared/data/wikitext-2-tok/valid.txt; every file — llama.cpp's types made with the same
importance matrix (the parent's profile on that text), the gentle recipe, and the structured rows —
is then scored by llama.cpp on text of another domain (the first ``--tokens`` tokens of
../shared/data/tinyshakespeare/input.txt, ctx 512): ppl, Δppl and KLD against the parent. Speeds
(prompt 256 and decode 64 tokens) come from one pass at the end over every file, interleaved,
median of ``--rounds`` rounds, so they compare within the run.

Rows (``--rows`` picks some; each row resumes: a finished one is kept, so the hours-long table
survives being stopped):

* ``llama.cpp TYPE`` for the mixes in ``--mixes``;
* ``gentle``: the gentle recipe (no structure) at Q4_K_M's bytes;
* ``budget-IQ4_XS-fast``: the control: no structure, the budget at IQ4_XS's bytes and no slower than Q4_0;
* ``hollow-T``: the hollow recipe at structure target T (share of the block parameters kept),
  its budget at the structured model's own Q4_K_M size, no slower than it (time model);
* ``oneshot-T``: the same units removed in one wave, healed for the same total steps;
* ``layers-N``: ShortGPT, N whole layers by block influence, nothing else;
* ``width-T``: Minitron-style width only, the same widths in every layer (arch llama);
* ``hidden512-T``: the hidden width cut to 512 as well, K-quants allowed on 512-wide rows.

    python benchmarks/structure_frontier.py [--rows ...] [--tokens 8192] [--rounds 3]

Writes benchmarks/results/structure_frontier.{json,md} and two plots (ppl against decode tok/s,
ppl against bytes); files and run folders go to results/work/structure/.
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
DATA = HERE.parent.parent / "shared" / "data"
WORK = HERE / "results" / "work" / "structure"
OUT = HERE / "results" / "structure_frontier"
CALIBRATION = DATA / "wikitext-2-tok" / "valid.txt"
SCORED = DATA / "tinyshakespeare" / "input.txt"
log = logging.getLogger("structure_frontier")

# every structured row is the hollow recipe plus these overrides
ROWS = {
    "hollow-0.85": ["structure.target=0.85"],
    "hollow-0.75": ["structure.target=0.75"],
    "hollow-0.65": ["structure.target=0.65"],
    "oneshot-0.75": ["structure.target=0.75", "structure.oneshot=true"],
    "layers-4": ["structure.target=1.0", "structure.drop_layers=4", "structure.layer_score=influence"],
    "width-0.75": ["structure.target=0.75", "structure.arch=llama", "structure.units=ffn,qhead"],
    "hidden512-0.8": ["structure.target=0.8", "structure.hidden=512", "structure.ffn_multiple=256"],
}
DEFAULT_MIXES = "Q2_K,Q3_K_S,Q3_K_M,IQ4_XS,Q4_0,Q4_K_M,Q5_K_M,Q8_0"
# the control that answers whether the structure pays: no unit removed, the same byte and time caps
CONTROLS = {"budget-IQ4_XS-fast": ("gentle", ["budget.target_bytes=IQ4_XS", "budget.no_slower_than=Q4_0"])}


def score(path: Path, parent: Path, args) -> dict:
    from birdbone.evaluate.compare import EvalConfig, evaluate

    r = evaluate(path, parent, SCORED, EvalConfig(ctx=512, tokens=args.tokens, decode=0, canary_tokens=0, threads=args.threads))
    return {"bytes": r.model.file_bytes, "pct_of_f16": r.pct_of_parent_bytes, "bpw": r.model.bits_per_weight, "ppl": r.model.ppl.ppl,
            "parent_ppl": r.parent.ppl.ppl, "dppl_pct": r.delta_ppl_pct, "kld": r.kld.get("kld_mean"), "top1": r.kld.get("top1_agreement"),
            "types": r.model.types}


def mix_row(mix: str, parent: Path, imatrix: Path, args) -> dict:
    from birdbone.io.quantize import quantize_file

    path = WORK / f"llama.cpp-{mix}.gguf"
    quantize_file(parent, path, mix, imatrix=imatrix, threads=args.threads or 0)
    return {"kind": "llama.cpp", "label": f"llama.cpp {mix} + imatrix", "file": str(path), **score(path, parent, args)}


def recipe_row(name: str, recipe: str, sets: list[str], parent: Path, args) -> dict:
    from birdbone.io.run_folder import StaleRun
    from birdbone.recipe.compress import compress
    from birdbone.recipe.config import load_recipe

    r = load_recipe(recipe, [*sets, f"seed={args.seed}", "verify.canary_tokens=0", "verify.decode=0", f"verify.tokens={min(args.tokens, 4096)}"])
    out, run = WORK / f"{name}.gguf", WORK / f"{name}.run"
    t0 = time.time()
    try:
        res = compress("builtin", r, out, run, CALIBRATION, None, threads=args.threads)
    except StaleRun as e:  # made by other code: recompute
        log.warning("%s; recomputing", e)
        shutil.rmtree(run)
        t0 = time.time()
        res = compress("builtin", r, out, run, CALIBRATION, None, threads=args.threads)
    row = {"kind": "birdbone", "label": f"{recipe} {' '.join(sets)}".strip(), "recipe": recipe, "sets": sets, "file": str(out),
           "seconds": round(time.time() - t0, 1), "stage_seconds": res.seconds, "stages": res.stages, **score(out, parent, args)}
    return row


SCORE_ROWS = {  # which score wins: the same one-shot removal, no healing, the F16 cut scored directly
    "activation": ["target=0.85", "score=activation"],
    "fluctuation": ["target=0.85", "score=fluctuation"],
    "wanda": ["target=0.85", "score=wanda"],
    "loo": ["target=0.85", "score=loo"],
    "layers-influence": ["target=1.0", "drop_layers=4", "layer_score=influence"],
    "layers-loo": ["target=1.0", "drop_layers=4", "layer_score=loo"],
}


def score_row(name: str, parent: Path, args) -> dict:
    """One score kind's removal, in one wave with no healing, exported as F16 and scored: the scores
    compared on their own, before healing hides their differences."""
    from birdbone.io.config import load_config
    from birdbone.remodel.config import StructureConfig
    from birdbone.remodel.structure import export_structure, run_structure

    cfg = load_config(StructureConfig, None, [*SCORE_ROWS[name], "oneshot=true", "heal.steps=0", f"seed={args.seed}"])
    run, out = WORK / f"score-{name}.run", WORK / f"score-{name}.gguf"
    shutil.rmtree(run, ignore_errors=True)
    t0 = time.time()
    run_structure("builtin", run, cfg, CALIBRATION, usage=WORK / "parent-profile")
    res = export_structure(run, out, None, "F16")
    row = {"kind": "score", "label": f"score {name}", "sets": SCORE_ROWS[name], "seconds": round(time.time() - t0, 1), "arch": res["arch"],
           "block_params": res["density"], "loo_windows": cfg.loo_windows, "calibration_tokens": cfg.calibration_tokens, **score(out, parent, args)}
    out.unlink()
    return row


def speed_pass(rows: list[dict], args) -> None:
    """Prompt and decode tok/s of every file, interleaved round by round, medians."""
    import numpy as np

    from birdbone.io.runtime import LlamaRuntime

    samples: dict[str, list[tuple[float, float]]] = {r["label"]: [] for r in rows}
    for k in range(args.rounds):
        for r in rows:
            with LlamaRuntime(r["file"], n_ctx=512, threads=args.threads) as rt:
                s = rt.speed(n_prompt=256, n_decode=64, seed=k)
            samples[r["label"]].append((s["prompt_tok_s"], s["decode_tok_s"]))
        log.info("speed round %d/%d done", k + 1, args.rounds)
    for r in rows:
        arr = np.array(samples[r["label"]])
        r["prompt_tok_s"], r["decode_tok_s"] = float(np.median(arr[:, 0])), float(np.median(arr[:, 1]))
        r["speed_rounds"] = arr.tolist()


def markdown(res: dict) -> str:
    rows = sorted(res["rows"], key=lambda r: r["bytes"])
    q4 = next((r for r in rows if r["label"].startswith("llama.cpp Q4_K_M")), None)
    lines = [f"# Structured density loss against llama.cpp (built-in model; scored on {res['scored']}, {res['args']['tokens']} tokens)", "",
             "| file | bytes | % F16 | ppl | Δppl | KLD | prompt tok/s | decode tok/s | decode × Q4_K_M |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        rel = f"{r['decode_tok_s'] / q4['decode_tok_s']:.2f}" if q4 and r.get("decode_tok_s") else "-"
        lines.append(f"| {r['label']} | {r['bytes']:,} | {r['pct_of_f16']:.1f} | {r['ppl']:.3f} | {r['dppl_pct']:+.2f} % | {r['kld']:.4f} | "
                     f"{r.get('prompt_tok_s', 0):.0f} | {r.get('decode_tok_s', 0):.0f} | {rel} |")
    if res.get("scores"):
        lines += ["", "Which score wins (one wave, no healing, F16 cut):", "",
                  "| score | removal | block params kept | ppl | Δppl | KLD |", "|---|---|---:|---:|---:|---:|"]
        for label, r in res["scores"].items():
            lines.append(f"| {label} | {' '.join(r['sets'])} | {100 * r['block_params']:.1f} % | {r['ppl']:.3f} | {r['dppl_pct']:+.2f} % | {r['kld']:.4f} |")
    return "\n".join(lines) + "\n"


def plots(res: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in res["rows"] if r.get("decode_tok_s")]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    for ax, x, label in ((axes[0], "decode_tok_s", "decode tok/s (llama.cpp, 2 threads)"), (axes[1], "bytes", "file bytes (MiB)")):
        for kind, marker in (("llama.cpp", "o"), ("birdbone", "s")):
            pts = [r for r in rows if r["kind"] == kind]
            xs = [r[x] / (2**20 if x == "bytes" else 1) for r in pts]
            ax.scatter(xs, [r["ppl"] for r in pts], marker=marker, label=kind)
            for r, xv in zip(pts, xs):
                ax.annotate(r["label"].replace("llama.cpp ", "").replace(" + imatrix", "").replace("hollow structure.", "")[:22],
                            (xv, r["ppl"]), fontsize=6, xytext=(3, 3), textcoords="offset points")
        ax.set_xlabel(label)
        ax.set_ylabel(f"ppl on {Path(res['scored']).name}")
        ax.axhline(rows[0]["parent_ppl"], ls=":", color="grey", label="F16 parent")
        ax.legend(fontsize=7)
    fig.suptitle("structured density loss vs llama.cpp's types (same imatrix)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default=",".join(["mixes", "gentle", *CONTROLS, "scores", *ROWS]),
                    help="mixes, gentle, scores (which unit score wins, one-shot without healing), and any of: " + ", ".join(ROWS))
    ap.add_argument("--mixes", default=DEFAULT_MIXES)
    ap.add_argument("--tokens", type=int, default=8192, help="tokens of the scored text llama.cpp scores per file")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--speed-only", action="store_true", help="only redo the interleaved speed pass over the files of the rows done")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("birdbone.llama", "gguf", "birdbone.evaluate", "birdbone.io.quantize"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    sys.path.insert(0, str(HERE.parent))
    from birdbone.io.float_form import float_form
    from birdbone.measure import profile, write_profile

    WORK.mkdir(parents=True, exist_ok=True)
    parent = float_form("builtin")
    res = json.loads(OUT.with_suffix(".json").read_text()) if OUT.with_suffix(".json").exists() else {"rows": []}
    res.update({"scored": str(SCORED.relative_to(DATA.parent)), "calibration": str(CALIBRATION.relative_to(DATA.parent)), "args": vars(args),
                "machine": {"platform": platform.platform(), "python": platform.python_version()}})
    done = {r["label"]: r for r in res["rows"]}
    imatrix = WORK / "parent-profile" / "imatrix.gguf"
    if not imatrix.exists():
        write_profile(profile(parent, CALIBRATION, 4096, 512), WORK / "parent-profile")

    def save() -> None:
        res["rows"] = list(done.values())
        OUT.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
        OUT.with_suffix(".md").write_text(markdown(res))

    wanted = args.rows.split(",")
    if not args.speed_only:
        for name in wanted:
            if name == "mixes":
                for mix in args.mixes.split(","):
                    label = f"llama.cpp {mix} + imatrix"
                    if label not in done:
                        done[label] = {**mix_row(mix, parent, imatrix, args), "command": " ".join(sys.argv)}
                        save()
                continue
            if name == "scores":
                continue  # below: they are not files of the table
            recipe, sets = ("gentle", []) if name == "gentle" else CONTROLS[name] if name in CONTROLS else ("hollow", ROWS[name])
            label = f"{recipe} {' '.join(sets)}".strip()
            if label in done:
                continue
            log.info("row %s", name)
            done[label] = {**recipe_row(name, recipe, sets, parent, args), "row": name, "command": " ".join(sys.argv)}
            save()
    if "scores" in wanted:
        for name in SCORE_ROWS:
            if f"score {name}" not in res.setdefault("scores", {}):
                res["scores"][f"score {name}"] = score_row(name, parent, args)
                save()
    speed_pass([r for r in done.values() if Path(r["file"]).exists()], args)
    save()
    plots(res, OUT.with_name(OUT.name + ".png"))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
