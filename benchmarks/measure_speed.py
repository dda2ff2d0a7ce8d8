"""How long the data-free map of the built-in model takes: every tensor, every measure.

Runs :func:`birdbone.measure.measure_model` on the built-in SmolLM2-135M (272 tensors, 211
matrices) with 1 job and with ``--jobs`` jobs (worker threads), ``--repeats`` times each,
interleaved, and reports the median wall time, the CPU time (user + system, all threads) and
the load average around the runs — CPU time is what the work costs whatever else the machine
is doing; wall time is what a user waits. Goal: under 10 s with 2 jobs on 2 cores.

BLAS is held to ``--blas-threads`` threads per call: by ``measure_model`` itself through
threadpoolctl when installed, and by this script through ``OPENBLAS_NUM_THREADS`` /
``OMP_NUM_THREADS`` (set before numpy is imported) otherwise.

    python benchmarks/measure_speed.py [--jobs 2] [--repeats 1] [--blas-threads 1]

Writes benchmarks/results/measure_speed.{json,md}: timings, and for every measure group which
tensors were measured exactly, approximately, or skipped (with the reasons).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent


def cpu_seconds() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def timed_run(jobs: int, blas_threads: int) -> tuple[dict, object]:
    from birdbone.measure import measure_model

    load0, c0, t0 = os.getloadavg()[0], cpu_seconds(), time.perf_counter()
    m = measure_model("builtin", jobs=jobs, blas_threads=blas_threads)
    wall, cpu = time.perf_counter() - t0, cpu_seconds() - c0
    return {"jobs": jobs, "wall_s": wall, "cpu_s": cpu, "cpu_per_wall": cpu / wall,
            "load_before": load0, "load_after": os.getloadavg()[0]}, m


def status_listing(m) -> dict:
    """group → status → count, plus the skipped/approximate tensors with their reasons."""
    out = {}
    for group, counts in m.status_counts().items():
        reasons = Counter(t.reasons[group] for t in m.tensors if group in t.reasons)
        approx = [t.name for t in m.tensors if t.status[group] == "approximate"]
        out[group] = {**counts, "skipped_reasons": dict(reasons), "approximate_tensors": approx}
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--jobs", type=int, default=2, help="worker threads for the parallel run")
    ap.add_argument("--repeats", type=int, default=1, help="runs per setting (median reported)")
    ap.add_argument("--blas-threads", type=int, default=1, help="BLAS threads per call")
    ap.add_argument("--out", default=str(HERE / "results" / "measure_speed"), help="output path without suffix")
    ap.add_argument("--note", default="", help="free text stored with the result (e.g. what else was running)")
    args = ap.parse_args()
    for var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS"):
        os.environ[var] = str(args.blas_threads)  # before numpy loads; threadpoolctl does the same later

    import numpy as np  # noqa: F401  (loads BLAS with the thread count above)

    try:
        import threadpoolctl

        have_tpc = threadpoolctl.__version__
    except ImportError:
        have_tpc = None
    from birdbone.measure import measure_model

    measure_model("builtin", names=["blk.0.attn_q.weight"])  # warm imports and the page cache
    runs, m = [], None
    for _ in range(args.repeats):
        for jobs in sorted({1, args.jobs}):
            r, m_ = timed_run(jobs, args.blas_threads)
            runs.append(r)
            if jobs == args.jobs:
                m = m_
    med = {j: statistics.median(r["wall_s"] for r in runs if r["jobs"] == j) for j in sorted({1, args.jobs})}
    cpu = {j: statistics.median(r["cpu_s"] for r in runs if r["jobs"] == j) for j in sorted({1, args.jobs})}
    slow = sorted(m.tensors, key=lambda t: -t.seconds)[:5]
    o = m.overall()
    result = {
        "benchmark": "measure_speed",
        "model": m.model,
        "tensors": len(m.tensors),
        "matrices": sum(len(t.shape) == 2 for t in m.tensors),
        "cpu_count": os.cpu_count(),
        "blas_threads": args.blas_threads,
        "threadpoolctl": have_tpc,
        "runs": runs,
        "median_wall_s": med,
        "median_cpu_s": cpu,
        "goal": "wall < 10 s with 2 jobs on 2 cores",
        "slowest_tensors_s": {t.name: t.seconds for t in slow},
        "measures": status_listing(m),
        "summary": {"theta_mean": o.theta_mean, "theta_weighted": o.theta_weighted, "alpha_mean": o.alpha_mean},
        "note": args.note,
        "command": "python benchmarks/measure_speed.py " + shlex.join(sys.argv[1:]),
    }
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    md = [f"# measure_speed: {len(m.tensors)} tensors of the built-in model", "",
          "| jobs | median wall | median CPU (user+sys) | CPU / wall | load avg before → after |", "|---:|---:|---:|---:|---|"]
    for j in med:
        loads = [f"{r['load_before']:.1f} → {r['load_after']:.1f}" for r in runs if r["jobs"] == j]
        md.append(f"| {j} | {med[j]:.2f} s | {cpu[j]:.2f} s | {cpu[j] / med[j]:.2f} | {', '.join(loads)} |")
    md += ["", f"{os.cpu_count()} cores; BLAS threads per call: {args.blas_threads}; threadpoolctl: {have_tpc or 'not installed'}. "
           f"Goal: {result['goal']}.", "", "| measure | exact | approximate | skipped | skipped because |", "|---|---:|---:|---:|---|"]
    for g, s in result["measures"].items():
        why = "; ".join(f"{r} ({n})" for r, n in s["skipped_reasons"].items()) or "—"
        md.append(f"| {g} | {s['exact']} | {s['approximate']} | {s['skipped']} | {why} |")
    md += ["", "Slowest tensors (measure time, loading excluded): "
           + ", ".join(f"{n} {s:.2f} s" for n, s in result["slowest_tensors_s"].items()), ""]
    if args.note:
        md += [f"Note: {args.note}", ""]
    md += [f"Command: `{result['command']}`", ""]
    text = "\n".join(md)
    out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
