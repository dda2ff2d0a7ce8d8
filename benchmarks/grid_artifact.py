"""Why Q5_K_M loses to Q4_K_M on the built-in model: pure Q5_1 against pure Q5_0 of its F16 form.

The built-in model ships as Q4_1, so its F16 "parent" is that Q4_1 dequantized. Q4_K_M falls back
to Q5_0 on the 576-wide matrices and Q5_K_M to Q5_1; this measures the two fallback types alone,
every matrix in one type (``--tensor-type '.*=TYPE'``, no importance matrix), scored by llama.cpp
against the F16 form on the built-in Shakespeare excerpt. Q4_1 itself is shown as the artifact of
construction it is (lossless by design).

    python benchmarks/grid_artifact.py [--types Q5_1,Q5_0,Q4_1] [--tokens 4096]

Writes benchmarks/results/grid_artifact.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
WORK = HERE / "results" / "work" / "grid"
OUT = HERE / "results" / "grid_artifact"


def main() -> int:
    from birdbone.evaluate.compare import EvalConfig, evaluate
    from birdbone.io.float_form import float_form
    from birdbone.io.quantize import quantize_file

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--types", default="Q5_1,Q5_0,Q4_1")
    ap.add_argument("--tokens", type=int, default=4096)
    args = ap.parse_args()
    WORK.mkdir(parents=True, exist_ok=True)
    parent = float_form("builtin")
    rows = []
    for t in args.types.split(","):
        path = WORK / f"pure-{t}.gguf"
        q = quantize_file(parent, path, "Q8_0", [f".*={t}"])
        r = evaluate(path, parent, None, EvalConfig(tokens=args.tokens, decode=0, canary_tokens=0))
        rows.append({"type": t, "types_written": q.type_histogram(), "file_bytes": r.model.file_bytes, "ppl": r.model.ppl.ppl,
                     "parent_ppl": r.parent.ppl.ppl, "dppl_pct": r.delta_ppl_pct, "kld": r.kld["kld_mean"]})
        path.unlink()
    res = {"command": "python benchmarks/grid_artifact.py " + " ".join(sys.argv[1:]), "text": r.text, "tokens": args.tokens,
           "machine": {"platform": platform.platform(), "python": platform.python_version()}, "rows": rows}
    OUT.with_suffix(".json").write_text(json.dumps(res, indent=1) + "\n")
    md = ["| every matrix in | bytes | ppl | Δppl vs F16 form | KLD |", "|---|---:|---:|---:|---:|"]
    md += [f"| {r['type']} | {r['file_bytes']:,} | {r['ppl']:.3f} | {r['dppl_pct']:+.2f} % | {r['kld']:.4f} |" for r in rows]
    OUT.with_suffix(".md").write_text("\n".join(md) + "\n")
    print("\n".join(md))
    return 0


if __name__ == "__main__":
    sys.exit(main())
