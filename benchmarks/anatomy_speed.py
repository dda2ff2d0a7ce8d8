"""Dissect and assemble throughput, as a ratio to ``cp`` followed by ``sha256sum`` of the same file.

Dissect hashes every tensor (and the whole source), so the fair baseline copies the file and
hashes it: with coreutils' ``sha256sum`` (as the goal is stated) and, because that tool is
about 4x slower than OpenSSL here, also with ``openssl dgst -sha256``. Each measurement starts from the same page-cache state: the source is read once
(warm) before every timed run, outputs are deleted and ``sync``ed after it, and nothing is
fsynced inside the timed region (neither cp nor birdbone fsyncs). Runs are interleaved
(baseline, dissect, assemble) and the median of 3 is reported, with each run's peak RSS
(from ``wait4``) — peak memory must not grow with the model's size.

Models: the built-in model (94 MiB) and a synthetic GGUF of at least 2 GB that this script
writes itself (random bytes in Q8_0/F16/F32 tensors of a 2048-wide llama layout).

    python benchmarks/anatomy_speed.py [--synthetic-gb 2.2] [--repeats 3]

Writes benchmarks/results/anatomy_speed.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
RUN_DISSECT = "import sys; from birdbone.anatomy.dissect import dissect; dissect(sys.argv[1], sys.argv[2])"
RUN_ASSEMBLE = "import sys; from birdbone.anatomy.assemble import assemble; assemble(sys.argv[1], sys.argv[2])"


def timed(argv: list[str]) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one child process."""
    t0 = time.perf_counter()
    p = subprocess.Popen(argv, stdout=subprocess.DEVNULL)
    _, status, usage = os.wait4(p.pid, 0)
    dt = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{argv[:3]} failed")
    return dt, usage.ru_maxrss * 1024


def warm(path: Path) -> None:
    with open(path, "rb") as fh:
        while fh.read(1 << 24):
            pass


def baseline(src: Path, dst: Path, hasher: list[str]) -> tuple[float, int]:
    t1, r1 = timed(["cp", str(src), str(dst)])
    t2, r2 = timed([*hasher, str(dst)])
    return t1 + t2, max(r1, r2)


# coreutils' sha256sum has no SHA-NI path (about 190 MB/s here); OpenSSL's (which Python's
# hashlib uses) has. Both baselines are reported so the ratio is not flattered by a slow tool.
HASHERS = {"baseline": ["sha256sum"], "baseline_openssl": ["openssl", "dgst", "-sha256"]}


def make_synthetic(path: Path, gigabytes: float) -> None:
    import numpy as np
    from gguf.constants import GGMLQuantizationType as T
    from gguf.constants import GGUFValueType as V

    from birdbone.io.gguf_layout import KV, Layout, TensorEntry, write_layout

    width, ffn = 2048, 5632
    per_layer = [("attn_q", (width, width), T.Q8_0), ("attn_k", (width, width), T.Q8_0), ("attn_v", (width, width), T.Q8_0),
                 ("attn_output", (width, width), T.Q8_0), ("ffn_gate", (width, ffn), T.F16), ("ffn_up", (width, ffn), T.F16),
                 ("ffn_down", (ffn, width), T.F16), ("attn_norm", (width,), T.F32), ("ffn_norm", (width,), T.F32)]
    tensors = [TensorEntry("token_embd.weight", (width, 32000), T.Q8_0)]
    layer = 0
    while sum(t.n_bytes for t in tensors) < gigabytes * 1e9:
        tensors += [TensorEntry(f"blk.{layer}.{n}.weight", ne, qt) for n, ne, qt in per_layer]
        layer += 1
    kvs = [KV("general.architecture", V.STRING, "llama"), KV("general.name", V.STRING, "birdbone synthetic"),
           KV("llama.block_count", V.UINT32, layer), KV("llama.embedding_length", V.UINT32, width)]
    rng = np.random.default_rng(0)
    block = rng.integers(0, 255, size=1 << 24, dtype=np.uint8).tobytes()

    def chunks(t):
        left = t.n_bytes
        while left:
            n = min(left, len(block))
            yield block[:n]
            left -= n

    write_layout(path, Layout(kvs, tensors), chunks)


def measure(name: str, src: Path, work: Path, repeats: int) -> dict:
    py = sys.executable
    kinds = (*HASHERS, "dissect", "assemble")
    runs = {k: [] for k in kinds}
    rss = {k: [] for k in kinds}
    organs, back, copy = work / "organs", work / "back.gguf", work / "copy.gguf"
    for _ in range(repeats):
        for kind in kinds:
            warm(src)
            if kind in HASHERS:
                t, r = baseline(src, copy, HASHERS[kind])
            elif kind == "dissect":
                shutil.rmtree(organs, ignore_errors=True)
                subprocess.run(["sync"])
                t, r = timed([py, "-c", RUN_DISSECT, str(src), str(organs)])
            else:
                back.unlink(missing_ok=True)
                subprocess.run(["sync"])
                t, r = timed([py, "-c", RUN_ASSEMBLE, str(organs), str(back)])
            runs[kind].append(t)
            rss[kind].append(r)
            copy.unlink(missing_ok=True)
            subprocess.run(["sync"])
    size = src.stat().st_size
    med = {k: statistics.median(v) for k, v in runs.items()}
    identical = subprocess.run(["cmp", "-s", str(src), str(back)]).returncode == 0 if back.exists() else False
    shutil.rmtree(organs, ignore_errors=True)
    back.unlink(missing_ok=True)
    return {
        "model": name, "bytes": size, "seconds": runs, "median_s": med,
        "throughput_MBps": {k: size / v / 1e6 for k, v in med.items()},
        "ratio_to_cp_sha256sum": {"dissect": med["baseline"] / med["dissect"], "assemble": med["baseline"] / med["assemble"]},
        "ratio_to_cp_openssl": {"dissect": med["baseline_openssl"] / med["dissect"], "assemble": med["baseline_openssl"] / med["assemble"]},
        "peak_rss_MiB": {k: max(v) / 2**20 for k, v in rss.items()}, "assembled_identical": identical,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--synthetic-gb", type=float, default=2.2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary folder under benchmarks/results/work)")
    ap.add_argument("--out", default=str(HERE / "results" / "anatomy_speed"))
    args = ap.parse_args()
    from birdbone.io.builtin import builtin_model_path

    base = HERE / "results" / "work"
    base.mkdir(parents=True, exist_ok=True)
    work = Path(args.work or tempfile.mkdtemp(dir=base, prefix="anatomy-"))
    rows = [measure("builtin SmolLM2-135M Q4_1", builtin_model_path(), work, args.repeats)]
    synth = work / "synthetic.gguf"
    make_synthetic(synth, args.synthetic_gb)
    rows.append(measure(f"synthetic {synth.stat().st_size / 1e9:.2f} GB", synth, work, args.repeats))
    synth.unlink()
    shutil.rmtree(work, ignore_errors=True)
    result = {"benchmark": "anatomy_speed", "repeats": args.repeats, "rows": rows,
              "command": "python benchmarks/anatomy_speed.py " + " ".join(sys.argv[1:]),
              "page_cache": "source read once before every timed run (warm); outputs deleted and synced after; no fsync inside timed runs"}
    out = Path(args.out)
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    md = ["| model | size | cp+sha256sum | cp+openssl | dissect | assemble | dissect ratio (sha256sum / openssl) | assemble ratio (sha256sum / openssl) | peak RSS dissect / assemble | identical |",
          "|---|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        m = r["median_s"]
        a, b = r["ratio_to_cp_sha256sum"], r["ratio_to_cp_openssl"]
        md.append(f"| {r['model']} | {r['bytes'] / 2**20:,.0f} MiB | {m['baseline']:.2f} s | {m['baseline_openssl']:.2f} s | {m['dissect']:.2f} s | "
                  f"{m['assemble']:.2f} s | {a['dissect']:.2f} / {b['dissect']:.2f} | {a['assemble']:.2f} / {b['assemble']:.2f} | "
                  f"{r['peak_rss_MiB']['dissect']:.0f} / {r['peak_rss_MiB']['assemble']:.0f} MiB | {r['assembled_identical']} |")
    text = "\n".join(md) + f"\n\nMedian of {args.repeats} interleaved runs; ratio = baseline time / birdbone time (goal ≥ 0.8). {result['page_cache']}.\n\nCommand: `{result['command']}`\n"
    out.with_suffix(".md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
