"""The kill -9 campaign: every command that writes, killed at many random points, then rerun.

For each of the ten writers in ``tests/kill_targets.py`` (on the tiny test model): one uncut run
gives its time T and its bytes; then ``--kills`` runs are each killed (SIGKILL to the whole
process group) at a time drawn uniformly from [0, 1.1 T], and rerun with the same command. Each
kill is judged:

* ``partial``: the output says it is complete after the kill (a file exists; a run folder's state
  reached its last step) and fails its completeness check (a defect);
* ``rerun failed``: the rerun neither succeeds nor refuses a finished folder output (a defect);
* ``resumed differently``: a writer whose run folder resumes gave other bytes than the uncut run
  (a defect);
* ``temps left``: temporaries still there once the dead run is stale (a defect);
* ``other bytes``: a one-shot writer's rerun wrote other bytes than the uncut run (reported, not
  a defect: such a writer promises completeness, not determinism).

Results commit after every writer, so a stopped campaign resumes at the next one.

    python benchmarks/kill_campaign.py [--writers quantize,compress,...] [--kills 16] [--seed 0]

Writes benchmarks/results/kill_campaign.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "results" / "kill_campaign"
sys.path.insert(0, str(ROOT))

def run_writer(verb: str, inputs: dict, work: Path, kills: int, seed: int) -> dict:
    from tests.kill_targets import DEFECTS, WRITERS, command, kill_and_rerun, start

    w = WRITERS[verb]
    whole = work / f"{verb.replace(' ', '_')}-whole"
    shutil.rmtree(whole, ignore_errors=True)
    whole.mkdir(parents=True)
    t0 = time.time()
    p = start(command(verb, inputs, whole / w.name))
    if p.wait(timeout=900) != 0:
        raise SystemExit(f"{verb}: the uncut run failed: {p.stderr.read().decode(errors='replace')[-400:]}")
    uncut_s = time.time() - t0
    uncut = w.bytes_of(whole / w.name)
    rng = random.Random(f"{seed}-{verb}")
    rows = []
    for k in range(kills):
        folder = work / f"{verb.replace(' ', '_')}-cut{k}"
        rows.append(kill_and_rerun(verb, inputs, folder, rng.uniform(0, 1.1 * uncut_s), uncut))
        shutil.rmtree(folder)
        print(f"  {verb} {k + 1}/{kills}: {rows[-1]}", flush=True)
    shutil.rmtree(whole)
    counts = {d: sum(1 for r in rows if d in r) for d in (*DEFECTS, "other_bytes")}
    return {"writer": verb, "resumes": w.resumes, "uncut_s": round(uncut_s, 2), "kills": kills,
            "killed_mid_run": sum(1 for r in rows if r["killed"] and not r["finished"]),
            "killed_after_output": sum(1 for r in rows if r["killed"] and r["finished"]),
            "ended_before_kill": sum(1 for r in rows if not r["killed"]), **counts, "runs": rows}


def markdown(res: dict) -> str:
    lines = ["| writer | kills | mid-run | after output | ended first | partial | rerun failed | resumed differently | temps left | other bytes | uncut s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in res["writers"].values():
        lines.append(f"| {r['writer']}{' (resumes)' if r['resumes'] else ''} | {r['kills']} | {r['killed_mid_run']} | {r['killed_after_output']} | "
                     f"{r['ended_before_kill']} | {r['partial']} | {r['rerun_failed']} | {r['resumed_differently']} | {r['temps_left']} | "
                     f"{r['other_bytes']} | {r['uncut_s']} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    from tests.kill_targets import WRITERS

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--writers", default=",".join(WRITERS), help="any of: " + ", ".join(WRITERS))
    ap.add_argument("--kills", type=int, default=16, help="random kill points per writer")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", type=Path, default=OUT, help="results prefix (.json and .md are written)")
    args = ap.parse_args()
    from birdbone.io.atomic import write_text_atomic
    from tests.fixtures.tiny import make_tiny_llama
    from tests.kill_targets import make_inputs

    work = args.out.parent / "work" / args.out.name
    result_json = args.out.with_suffix(".json")
    res = json.loads(result_json.read_text()) if result_json.exists() else {"writers": {}}
    res.update(seed=args.seed, command="python benchmarks/kill_campaign.py " + " ".join(sys.argv[1:]))
    todo = [v for v in args.writers.split(",") if v not in res["writers"]]
    if not todo:
        print("every writer is done; delete", result_json, "to run again")
        return 0
    models = work / "inputs"
    if not (models / "tiny" / "tiny-f16.gguf").exists():
        make_tiny_llama(models / "tiny", seed=0)
    inputs = make_inputs(models / "tiny" / "tiny-f16.gguf", models / "tiny" / "tiny-f32.gguf", models)
    for verb in todo:
        print(f"{verb}: {args.kills} kills", flush=True)
        res["writers"][verb] = run_writer(verb, inputs, work, args.kills, args.seed)
        write_text_atomic(result_json, json.dumps(res, indent=1) + "\n")
        write_text_atomic(args.out.with_suffix(".md"), markdown(res))
    print(markdown(res))
    from tests.kill_targets import DEFECTS

    bad = sum(r[d] for r in res["writers"].values() for d in DEFECTS)
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
