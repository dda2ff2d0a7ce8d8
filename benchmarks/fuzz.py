"""The fuzz campaign: ≥ 100k mutants per in-process reader, ≥ 10k per folder reader, each judged
as a clean one-line error, an acceptance, another exception, a hang or a crash.

The mutants and the way each reader is called live in ``tests/fuzz_targets.py`` (the test suite
runs a slice of the same). Here every reader runs in worker processes, in chunks of ``--chunk``
inputs, under a watchdog: the worker writes the index it is on before each input, so a worker that
dies (a signal: a crash) or stops moving for ``--hang-s`` seconds (a hang) is charged with that
input and a new worker goes on after it. A worker's address space is capped (``--max-gib``), so
a resource bomb is a MemoryError (an "other"), not a dead machine. Results commit after every
chunk, so the hours-long campaign resumes where it stopped.

    python benchmarks/fuzz.py [--readers gguf,recipe,...] [--inputs 100000] [--folder-inputs 10000]

Writes benchmarks/results/fuzz.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
OUT = HERE / "results" / "fuzz"
WORK = HERE / "results" / "work" / "fuzz"
sys.path.insert(0, str(ROOT))


def worker(args) -> int:
    """One chunk of one reader, in this process: each input's index before it runs (``--progress``),
    its outcome after (a line of ``--result``), so the parent loses nothing when this process dies."""
    import logging
    import warnings

    from tests.fuzz_targets import Seeds, run_target

    logging.disable(logging.WARNING)
    warnings.simplefilter("ignore")
    cap = int(args.max_gib * 2**30)
    resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
    progress = Path(args.progress)
    with open(args.result, "a", encoding="utf-8") as log:
        def mark(i: int) -> None:
            progress.write_text(str(i))

        def record(i: int, outcome: str, detail: str | None) -> None:
            rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
            log.write(json.dumps([i, outcome, detail, rss]) + "\n")
            log.flush()

        run_target(args.worker, Seeds(args.work / "seeds"), args.work / f"work-{args.worker.replace(' ', '_')}", args.seed, args.n,
                   args.start, mark, record)
    return 0


def run_chunk(reader: str, start: int, n: int, args) -> dict:
    """Inputs ``start .. start+n`` of ``reader`` in workers; a crash or hang is charged to its input
    and a new worker goes on after it."""
    merged = {"counts": {"clean": 0, "accepted": 0, "other": 0, "hang": 0, "crash": 0}, "other_by_type": {}, "examples": [],
              "peak_rss_mib": 0.0}
    progress, result = args.work / "progress.txt", args.work / "result.jsonl"
    result.unlink(missing_ok=True)
    end = start + n
    while start < end:
        progress.write_text(str(start))
        cmd = [sys.executable, __file__, "--worker", reader, "--start", str(start), "--n", str(end - start), "--seed", str(args.seed),
               "--progress", str(progress), "--result", str(result), "--max-gib", str(args.max_gib), "--out", str(args.out)]
        p = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        last, moved, hung = progress.read_text(), time.time(), False
        while p.poll() is None:
            time.sleep(0.2)
            now = progress.read_text() if progress.exists() else last
            if now != last:
                last, moved = now, time.time()
            elif time.time() - moved > args.hang_s:
                hung = True
                p.kill()
                p.wait()
        if p.returncode == 0 and not hung:
            break
        at = int(progress.read_text() or start)  # the input it was on: a crash or a hang
        outcome = "hang" if hung else "crash"
        merged["counts"][outcome] += 1
        merged["examples"].append({"input": at, "detail": f"{outcome} (exit {p.returncode}): {(p.stderr.read() or '')[-300:]}"})
        start = at + 1
    for line in result.read_text().splitlines() if result.exists() else []:
        i, outcome, detail, rss = json.loads(line)
        merged["counts"][outcome] = merged["counts"].get(outcome, 0) + 1
        merged["peak_rss_mib"] = max(merged["peak_rss_mib"], rss)
        if outcome == "other":
            kind = detail.split(":")[0]
            merged["other_by_type"][kind] = merged["other_by_type"].get(kind, 0) + 1
            if len(merged["examples"]) < 20:
                merged["examples"].append({"input": i, "detail": detail})
    return merged


def markdown(res: dict) -> str:
    lines = ["| reader | inputs | clean | accepted | other | hangs | crashes | peak RSS MiB | s |", "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, r in res["readers"].items():
        c = r["counts"]
        lines.append(f"| {name} | {r['inputs']:,} | {c['clean']:,} | {c['accepted']:,} | {c['other']} | {c['hang']} | {c['crash']} | "
                     f"{r['peak_rss_mib']:.0f} | {r['seconds']:.0f} |")
    return "\n".join(lines) + "\n"


def main() -> int:
    from tests.fuzz_targets import FOLDER_TARGETS, NEEDS_RUNS, TARGETS, Seeds

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--readers", default=",".join(TARGETS), help="any of: " + ", ".join(TARGETS))
    ap.add_argument("--inputs", type=int, default=100_000, help="per in-process reader")
    ap.add_argument("--folder-inputs", type=int, default=10_000, help="per folder reader (HF folder, organ folder)")
    ap.add_argument("--chunk", type=int, default=5000)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--hang-s", type=float, default=30.0, help="an input that takes longer is a hang")
    ap.add_argument("--max-gib", type=float, default=4.0, help="address-space cap of a worker")
    ap.add_argument("--out", type=Path, default=OUT, help="results prefix (.json and .md are written)")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--start", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--n", type=int, default=0, help=argparse.SUPPRESS)
    ap.add_argument("--progress", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    # each results file has its own work folder: two campaigns never share a worker's files
    args.work = WORK if args.out == OUT else args.out.with_name(args.out.name + ".work")
    if args.worker:
        return worker(args)

    args.work.mkdir(parents=True, exist_ok=True)
    seeds = Seeds(args.work / "seeds").build()
    if NEEDS_RUNS & set(args.readers.split(",")):
        seeds.build_runs()
    path = args.out.with_suffix(".json")
    res = json.loads(path.read_text()) if path.exists() else {"readers": {}}
    res["command"] = " ".join(sys.argv)
    res["seed"] = args.seed
    for reader in args.readers.split(","):
        want = args.folder_inputs if reader in FOLDER_TARGETS else args.inputs
        r = res["readers"].setdefault(reader, {"inputs": 0, "counts": {"clean": 0, "accepted": 0, "other": 0, "hang": 0, "crash": 0},
                                               "other_by_type": {}, "examples": [], "peak_rss_mib": 0.0, "seconds": 0.0})
        while r["inputs"] < want:
            n = min(args.chunk, want - r["inputs"])
            t0 = time.time()
            c = run_chunk(reader, r["inputs"], n, args)
            r["inputs"] += n
            r["seconds"] += time.time() - t0
            for k, v in c["counts"].items():
                r["counts"][k] = r["counts"].get(k, 0) + v
            for k, v in c["other_by_type"].items():
                r["other_by_type"][k] = r["other_by_type"].get(k, 0) + v
            r["examples"] = (r["examples"] + c["examples"])[:20]
            r["peak_rss_mib"] = max(r["peak_rss_mib"], c["peak_rss_mib"])
            tmp = path.with_suffix(".tmp")
            tmp.write_text(json.dumps(res, indent=1) + "\n")
            os.replace(tmp, path)
            args.out.with_suffix(".md").write_text(markdown(res))
            print(f"{reader}: {r['inputs']:,}/{want:,} {r['counts']}", flush=True)
    print(markdown(res))
    bad = sum(r["counts"]["other"] + r["counts"]["hang"] + r["counts"]["crash"] for r in res["readers"].values())
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
