"""``birdbone compress`` on a parent that came quantized in a mix, as a GGUF from the Hub does.

Part 5 of the family issue. A Hub GGUF is a mix: llama.cpp's Q4_K_M puts Q4_K on most matrices
and Q6_K (or a 32-block fallback where a row width is not a multiple of 256) on others. Two
subjects, each first quantized by llama.cpp's ``--parent-mix`` (default Q4_K_M, no importance
matrix, as most model makers ship) into that mixed-grid parent:

* ``float-qwen2``: the float qwen2 subject of make_float_model.py (run that first). Its true float
  weights are known, so every file is also scored against them, not only against the parent's
  float form. This is the quality claim.
* ``random-qwen2``: a qwen2 of Qwen2.5-0.5B's shapes (hidden 896, FFN 4864, 24 layers, 14 heads /
  2 KV heads, 151,936 vocabulary rows, untied output) with transformers' random initialisation
  and a 4,096-token BPE (the other rows are padding, as llama.cpp pads a vocabulary). Its
  perplexity means nothing; this is the time claim (≤ 45 min on 2 cores).

For each: ``birdbone compress PARENT -r gentle --text wikitext-2-tok/valid.txt --eval-text
tinyshakespeare/input.txt --set verify.reference=Q4_K_M --json`` runs in a fresh process (wall
time and peak RSS recorded), so calibration and verification are different domains. Beside it,
llama.cpp's Q4_K_M with the run's importance matrix, made two ways: from the parent's float form
(the reference verify makes) and from the quantized parent itself (``--allow-requantize``, what a
Hub user would run; llama.cpp copies a tensor whose type does not change). Scored by llama.cpp on
the same Shakespeare tokens, ctx 512: against the parent's float form and, for the float subject,
against its true float weights. A float subject is also compressed below the parent's size
(``--smaller``, default Q3_K_M), where a plan has choices to make, against llama.cpp's mix of
that size made both ways.

    python benchmarks/mixed_parent.py [--subjects float-qwen2,random-qwen2] [--parent-mix Q4_K_M] [--smaller Q3_K_M]

Writes benchmarks/results/mixed_parent.{json,md}; files go to results/work/mixed/.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import resource
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(REPO))
from budget_frontier import subject_file  # noqa: E402
from compress_frontier import columns, run_subjects  # noqa: E402

DATA = REPO.parent / "shared" / "data"
CALIBRATION, OTHER_DOMAIN = DATA / "wikitext-2-tok" / "valid.txt", DATA / "tinyshakespeare" / "input.txt"
WORK = HERE / "results" / "work" / "mixed"
OUT = HERE / "results" / "mixed_parent"
QWEN05 = {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14,
          "num_key_value_heads": 2, "vocab_size": 151936}  # Qwen2.5-0.5B's shapes (its head is untied here)
log = logging.getLogger("mixed_parent")


def random_qwen2(shapes: dict) -> Path:
    """The F16 GGUF of a random-weight qwen2 of ``shapes`` (made once, kept in WORK)."""
    f16 = WORK / "random-qwen2-f16.gguf"
    if f16.exists():
        return f16
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from birdbone.bridge.convert import convert
    from make_float_model import training_text
    from tests.fixtures.tiny import BOS_ID, EOS_ID, PAD_ID, save_tokenizer, train_tokenizer

    folder = WORK / "random-qwen2"
    folder.mkdir(parents=True, exist_ok=True)
    save_tokenizer(train_tokenizer(4096, training_text()), folder)
    config = AutoConfig.for_model("qwen2", **shapes, max_position_embeddings=32768, rms_norm_eps=1e-6, tie_word_embeddings=False,
                                  rope_parameters={"rope_type": "default", "rope_theta": 1e6}, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
                                  pad_token_id=PAD_ID)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config).to(torch.float16)
    model.config.architectures = [type(model).__name__]
    model.save_pretrained(str(folder), safe_serialization=True)
    log.info("random qwen2: %.1f M parameters", sum(p.numel() for p in model.parameters()) / 1e6)
    del model
    convert(folder, f16, "F16")
    shutil.rmtree(folder)  # the GGUF is the subject; the folder was only its way there
    return f16


def run_compress(parent: Path, stem: str, sets: list[str], args) -> tuple[dict, float, float]:
    """``birdbone compress`` in a fresh process: its JSON report, wall seconds and peak RSS (GiB)."""
    out, run = WORK / f"{stem}.gguf", WORK / f"{stem}.run"
    shutil.rmtree(run, ignore_errors=True)  # a fresh run: the time is the user's time
    out.unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "birdbone", "compress", str(parent), "-r", "gentle", "-o", str(out), "--run-dir", str(run),
           "--text", str(CALIBRATION), "--eval-text", str(OTHER_DOMAIN), "--json",
           "--set", "verify.reference=Q4_K_M", "--set", f"verify.tokens={args.tokens}", "--set", "verify.canary_tokens=0", *(x for kv in sets for x in ("--set", kv))]
    log.info("%s", " ".join(cmd))
    t0 = time.time()
    p = subprocess.run(cmd, cwd=WORK, capture_output=True, text=True)
    seconds = time.time() - t0
    if p.returncode not in (0, 3):  # 3: a guardrail failed, which the report says
        raise SystemExit(f"{stem}: compress failed ({p.returncode}):\n{p.stderr[-3000:]}")
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # the largest child so far: run the heavy subject alone
    return json.loads(p.stdout), seconds, peak


def run_subject(name: str, args) -> dict:
    from birdbone.evaluate.compare import EvalConfig, evaluate
    from birdbone.io.float_form import float_form
    from birdbone.io.model_file import open_model
    from birdbone.io.quantize import quantize_file

    true_f16 = random_qwen2(QWEN05) if name == "random-qwen2" else subject_file(name)
    parent = WORK / f"{name}-{args.parent_mix}.gguf"
    if not parent.exists():
        quantize_file(true_f16, parent, args.parent_mix, threads=args.threads)
    with open_model(parent) as m:
        parent_types = dict(sorted(Counter(t.type for t in m.tensors.values() if len(t.shape) >= 2).items()))
        n_params = m.n_params
    report, seconds, peak = run_compress(parent, f"{name}-gentle", [], args)
    ev, ref = report["verify"]["eval"], report["verify"]["reference"]
    row = {"seconds": round(seconds, 1), "peak_rss_gib": round(peak, 2), "stage_seconds": report["seconds"], "passed": report["passed"],
           "guardrails": report["verify"]["guardrails"], "types": report["stages"]["export"]["types"]}
    result = {"subject": name, "n_params": n_params, "parent_mix": args.parent_mix, "parent_types": parent_types,
              "parent_bytes": parent.stat().st_size, "compress": row,
              "vs_float_form": {"birdbone compress -r gentle": columns(ev), "llama.cpp Q4_K_M + imatrix, from the float form": columns(ref)}}
    if name == "random-qwen2":
        return result  # its ppl means nothing: the time and the bytes are the claim
    cfg = EvalConfig(ctx=512, tokens=args.tokens, decode=0, canary_tokens=0, threads=args.threads)
    imatrix = WORK / f"{name}-gentle.run" / "profile" / "imatrix.gguf"
    files = {"the parent as shipped": parent, "birdbone compress -r gentle": WORK / f"{name}-gentle.gguf"}
    for i, variant in enumerate(args.variant):
        stem, label = f"{name}-gentle-v{i + 1}", f"birdbone compress -r gentle --set {variant}"
        r, sec, _ = run_compress(parent, stem, [variant], args)
        result["vs_float_form"][label] = columns(r["verify"]["eval"])
        result.setdefault("variants", {})[label] = {"seconds": round(sec, 1), "passed": r["passed"], "types": r["stages"]["export"]["types"]}
        files[label] = WORK / f"{stem}.gguf"
    form = float_form(parent)
    files.update(llama_cpp_files(name, parent, form, "Q4_K_M", imatrix, args))
    result["vs_true_float"] = {label: columns(evaluate(path, true_f16, OTHER_DOMAIN, cfg).as_dict()) for label, path in files.items()}
    for label in ("the parent as shipped", "llama.cpp Q4_K_M + imatrix, from the quantized parent"):
        result["vs_float_form"][label] = columns(evaluate(files[label], form, OTHER_DOMAIN, cfg).as_dict())
    for target in filter(None, args.smaller.split(",")):  # below the parent's size, where a plan has choices to make
        stem = f"{name}-gentle-{target}"
        r, sec, _ = run_compress(parent, stem, [f"budget.target_bytes={target}", f"verify.reference={target}"], args)
        files = {f"birdbone compress -r gentle --set budget.target_bytes={target}": WORK / f"{stem}.gguf",
                 **llama_cpp_files(name, parent, form, target, WORK / f"{stem}.run" / "profile" / "imatrix.gguf", args)}
        result.setdefault("smaller", {})[target] = {
            "seconds": round(sec, 1), "passed": r["passed"], "types": r["stages"]["export"]["types"],
            "vs_true_float": {label: columns(evaluate(path, true_f16, OTHER_DOMAIN, cfg).as_dict()) for label, path in files.items()}}
    return result


def llama_cpp_files(name: str, parent: Path, form: Path, mix: str, imatrix: Path, args) -> dict[str, Path]:
    """llama.cpp's ``mix`` with ``imatrix``, made from the parent's float form ``form`` and from the quantized parent itself."""
    from birdbone.io.quantize import quantize_file

    files = {}
    for label, src in (("from the float form", form), ("from the quantized parent", parent)):
        path = WORK / f"{name}-{mix}-{src.stem}.gguf"
        quantize_file(src, path, mix, imatrix=imatrix, threads=args.threads)
        files[f"llama.cpp {mix} + imatrix, {label}"] = path
    return files


def table(rows: dict) -> list[str]:
    lines = ["| file | bytes | ppl | Δppl | KLD | top-1 |", "|---|---:|---:|---:|---:|---:|"]
    for label, r in sorted(rows.items(), key=lambda kv: kv[1]["bytes"]):
        lines.append(f"| {label} | {r['bytes']:,} | {r['ppl']:.3f} | {r['dppl_pct']:+.2f} % | {r['kld']:.5f} | {100 * r['top1']:.2f} % |")
    return lines


def markdown(results: dict) -> str:
    lines = [f"# compress on a mixed-grid parent (`{results['command']}`)", ""]
    for s in results["subjects"]:
        c = s["compress"]
        lines += [f"## {s['subject']}: {s['n_params'] / 1e6:.1f} M parameters, parent {s['parent_mix']} "
                  f"({', '.join(f'{k}×{v}' for k, v in s['parent_types'].items())}; {s['parent_bytes']:,} bytes)", "",
                  f"`birdbone compress` wall {c['seconds'] / 60:.1f} min, peak RSS {c['peak_rss_gib']:.2f} GiB, guardrails "
                  f"{'pass' if c['passed'] else 'FAIL'}; stages " + ", ".join(f"{k} {v:.0f} s" for k, v in c["stage_seconds"].items()), "",
                  "Against the parent's float form (Shakespeare, the other domain):", "", *table(s["vs_float_form"]), ""]
        if "vs_true_float" in s:
            lines += ["Against the subject's true float weights (same tokens):", "", *table(s["vs_true_float"]), ""]
        for target, t in s.get("smaller", {}).items():
            lines += [f"At {target}'s size, against the true float weights (gentle's guardrails {'pass' if t['passed'] else 'FAIL'}):", "",
                      *table(t["vs_true_float"]), ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--subjects", default="float-qwen2,random-qwen2")
    ap.add_argument("--parent-mix", default="Q4_K_M", help="the llama.cpp mix the parent is shipped in")
    ap.add_argument("--smaller", default="Q3_K_M", help="also compress float subjects to these mixes' sizes, below the parent's")
    ap.add_argument("--variant", action="append", default=[], help="also run gentle with this --set key=value (float subjects only)")
    ap.add_argument("--tokens", type=int, default=8192, help="Shakespeare tokens scored per file")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(OUT), help="results prefix (.json, .md)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    WORK.mkdir(parents=True, exist_ok=True)
    out = Path(args.out)
    results = {"command": " ".join(["python benchmarks/mixed_parent.py", *sys.argv[1:]]), "args": vars(args),
               "machine": {"platform": platform.platform(), "python": platform.python_version(),
                           "cpus": len(os.sched_getaffinity(0))}, "subjects": []}
    run_subjects(out, results, args.subjects.split(","), lambda name: run_subject(name, args), markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
