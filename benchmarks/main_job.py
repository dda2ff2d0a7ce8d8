"""The README's main job and the full bird-bone recipe, run as a user runs them, on the built-in model.

* ``birdbone compress -o smollm2.gguf --set verify.reference=Q4_K_M``: the gentle recipe with its
  default text (the built-in Shakespeare excerpt: the first three quarters calibrate, the last
  quarter verifies), and llama.cpp's Q4_K_M made with the same importance matrix judged on the
  same text by the same verify stage;
* ``birdbone compress -r bird-bone -o smollm2-bb.gguf``: the whole loop (map, profile, one Wanda
  wave with healing, scaffold, budget, export, verify) on the same default text.

Each runs in a fresh process (the real console entry point); wall time, stage times, the verify
report and, for bird-bone, the size of one wave's DeltaHistory (as a share of the model's fp32
bytes) are recorded.

    python benchmarks/main_job.py [--jobs gentle,bird-bone]

Writes benchmarks/results/main_job.{json,md}; run folders and files go to results/work/main_job/.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = HERE / "results" / "work" / "main_job"
OUT = HERE / "results" / "main_job"
JOBS = {
    "gentle": ["compress", "-o", "smollm2.gguf", "--set", "verify.reference=Q4_K_M"],
    "bird-bone": ["compress", "-r", "bird-bone", "-o", "smollm2-bb.gguf"],
}


def run_job(name: str) -> dict:
    args = JOBS[name]
    out = WORK / args[args.index("-o") + 1]
    run_dir = out.with_name(out.name.removesuffix(".gguf") + ".run")
    shutil.rmtree(run_dir, ignore_errors=True)  # a fresh run: the time is the user's time
    out.unlink(missing_ok=True)
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "birdbone", *args, "--json"], cwd=WORK, capture_output=True, text=True)
    seconds = round(time.time() - t0, 1)
    if p.returncode not in (0, 3):
        raise SystemExit(f"{name} failed ({p.returncode}):\n{p.stderr[-3000:]}")
    r = json.loads(p.stdout)
    ev = r["verify"]["eval"]
    row = {"command": "birdbone " + " ".join(args), "seconds": seconds, "stage_seconds": r["seconds"], "passed": r["passed"],
           "guardrails": r["verify"]["guardrails"], "file_bytes": ev["model"]["file_bytes"], "pct_of_f16": ev["pct_of_parent_bytes"],
           "ppl": ev["model"]["ppl"], "parent_ppl": ev["parent"]["ppl"], "dppl_pct": ev["delta_ppl_pct"], "kld": ev["kld_mean"],
           "top1": ev["top1_agreement"], "decode_tok_s": ev["model"]["speed"].get("decode_tok_s"), "text": ev["text"],
           "tokens_scored": ev["model"]["n_tokens_scored"], "types": r["stages"]["export"]["types"]}
    ref = r["verify"].get("reference")
    if ref:
        row["reference"] = {"mix": "Q4_K_M + the run's imatrix", "file_bytes": ref["model"]["file_bytes"], "ppl": ref["model"]["ppl"],
                            "dppl_pct": ref["delta_ppl_pct"], "kld": ref["kld_mean"], "top1": ref["top1_agreement"]}
    waves = run_dir / "waves" / "metrics.jsonl"
    if waves.exists():
        rows = [json.loads(line) for line in waves.read_text().splitlines() if line.strip()]
        row["waves"] = [{k: w.get(k) for k in ("wave", "density", "ppl", "dppl_pct", "kld", "heal_steps", "history_share")} for w in rows]
    return row


def markdown(res: dict) -> str:
    lines = ["# The main job and the bird-bone recipe on the built-in model", "",
             "| job | wall s | bytes | % F16 | ppl (parent) | Δppl | KLD | top-1 | guardrails |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for name, r in res["jobs"].items():
        lines.append(f"| `{r['command']}` | {r['seconds']:.0f} | {r['file_bytes']:,} | {r['pct_of_f16']:.1f} | {r['ppl']:.3f} ({r['parent_ppl']:.3f}) | "
                     f"{r['dppl_pct']:+.2f} % | {r['kld']:.4f} | {100 * r['top1']:.1f} % | {'pass' if r['passed'] else 'FAIL'} |")
        if "reference" in r:
            q = r["reference"]
            lines.append(f"| ↳ llama.cpp {q['mix']} | | {q['file_bytes']:,} | | {q['ppl']:.3f} | {q['dppl_pct']:+.2f} % | {q['kld']:.4f} | "
                         f"{100 * q['top1']:.1f} % | |")
    lines.append("")
    for name, r in res["jobs"].items():
        lines.append(f"- {name}: stages " + ", ".join(f"{k} {v:.0f} s" for k, v in r["stage_seconds"].items()))
        for w in r.get("waves", []):
            if w["wave"]:
                lines.append(f"  - wave {w['wave']}: density {w['density']:.3f}, {w['heal_steps']} healing steps, "
                             f"history {100 * w['history_share']:.1f} % of the model's fp32 bytes")
    return "\n".join(lines) + "\n"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", default=",".join(JOBS))
    args = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    res = json.loads(OUT.with_suffix(".json").read_text()) if OUT.with_suffix(".json").exists() else {"jobs": {}}
    res["machine"] = {"platform": platform.platform(), "python": platform.python_version(), "cpus": len(__import__("os").sched_getaffinity(0))}
    for name in args.jobs.split(","):
        res["jobs"][name] = run_job(name)
        OUT.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
        OUT.with_suffix(".md").write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
