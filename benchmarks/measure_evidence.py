"""Does any data-free measure predict anything? Evidence for (or against) θ and purification.

Two subjects: the built-in model (SmolLM2-135M-Instruct; weights on the Q4_1 grid, scored from
its F16 form) and the float subject of ``make_float_model.py`` (F32, widths multiples of 256).
Perplexity and KLD are llama.cpp's, on the first ``--tokens`` tokens of wiki.test.raw (ctx
512), against the unmodified subject. Calibration (imatrix) text is wikitext-2 *valid*.

1. **Sensitivity.** A fixed sample of block weights (every matrix of evenly spaced layers, at
   least 40 tensors; the float subject's output head too). For each tensor alone: (a) quantized
   to Q2_K, or the type llama.cpp falls back to for its row width (Q4_0 for rows of 576),
   and (b) 50 % magnitude-pruned (the smallest |w| of the tensor set to 0); every other tensor
   untouched and the modified one stored back in the subject's float type. The response is
   KLD and Δppl. Spearman's ρ (bootstrap 95 % CI over tensors, 2,000 resamples) between the
   response and each measure: θ_v1, α, stable rank, excess kurtosis, Frobenius norm, imatrix
   mass (Σ of the tensor's importance values), and two controls: parameter count, and the
   activation-weighted energy Σ_j a_j ‖W[:, j]‖² (a_j = importance of input channel j), which
   is what a first-order error model says should matter.
2. **Quantization confound** (float subject). θ of the sampled tensors at F32, Q8_0 and Q4_K_M
   (upstream's θ table came from quantized files).
3. **Purification.** fft and haar at strengths 0.25 / 0.5 / 1 on every block weight (stored
   F16 for the built-in model: requantizing to Q4_1 snaps back onto the grid; F32 for the
   float subject), against the input; plus a control per setting: Gaussian noise of the same
   norm per tensor as the purification removed. Purification "helps" only if ppl drops below
   the input's, and it is "structured" only if it beats the equal-norm noise.

4. **Importance matrix** (float subject; the built-in model's rows are in quant_frontier.py):
   Q4_K_M and IQ4_XS without an imatrix, with birdbone's, and with it channel-shuffled.

    python benchmarks/measure_evidence.py [--subjects builtin,float] [--parts sensitivity,confound,purify] [--tokens 8192]

Writes benchmarks/results/measure_evidence.json (after every part, so a rerun with --resume
skips finished parts) and docs/evidence.md. Variant GGUFs go to results/work/ and are deleted.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
DATA = REPO.parent / "shared" / "data"
WORK = HERE / "results" / "work" / "evidence"
RESULT = HERE / "results" / "measure_evidence.json"
DOC = REPO / "docs" / "evidence.md"
TEST_TEXT = DATA / "wikitext-2-raw" / "wiki.test.raw"
CALIBRATION = DATA / "wikitext-2-tok" / "valid.txt"
MATRICES = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
MEASURES = ("theta", "alpha", "stable_rank", "kurtosis", "frobenius", "imatrix_mass", "n_params", "act_energy")
CONTROLS = ("n_params", "act_energy")
STRENGTHS = (0.25, 0.5, 1.0)
READING_MARK = "<!-- reading: written by hand, kept when the tables are regenerated -->\n"
log = logging.getLogger("measure_evidence")
sys.path.insert(0, str(REPO))


# -- statistics -------------------------------------------------------------------------------------
def ranks(x: np.ndarray) -> np.ndarray:
    """Ranks 1..n with ties averaged (as Spearman's ρ needs)."""
    order = np.argsort(x, kind="mergesort")
    r = np.empty(len(x))
    r[order] = np.arange(1, len(x) + 1)
    for v in np.unique(x):
        tied = x == v
        if tied.sum() > 1:
            r[tied] = r[tied].mean()
    return r


def spearman(x: np.ndarray, y: np.ndarray) -> float:
    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return float("nan")
    return float(np.corrcoef(rx, ry)[0, 1])


def spearman_ci(x, y, n_boot: int = 2000, seed: int = 0) -> dict:
    """ρ with a percentile bootstrap 95 % CI (tensors resampled with replacement)."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    keep = np.isfinite(x) & np.isfinite(y)
    x, y = x[keep], y[keep]
    rho = spearman(x, y)
    rng = np.random.default_rng(seed)
    boots = []
    for _ in range(n_boot):
        i = rng.integers(0, len(x), len(x))
        b = spearman(x[i], y[i])
        if math.isfinite(b):
            boots.append(b)
    lo, hi = (np.percentile(boots, [2.5, 97.5]) if boots else (float("nan"), float("nan")))
    return {"rho": rho, "lo": float(lo), "hi": float(hi), "n": int(len(x))}


# -- subjects ---------------------------------------------------------------------------------------
def subject_file(subject: str) -> Path:
    if subject == "builtin":
        from birdbone.io.float_form import float_form

        return float_form("builtin")
    from make_float_model import SUBJECT_F32

    if not SUBJECT_F32.exists():
        raise SystemExit(f"{SUBJECT_F32} is missing: run benchmarks/make_float_model.py first")
    return SUBJECT_F32


def sample_tensors(names: list[str], n_layers: int, at_least: int) -> list[str]:
    per_layer = len(MATRICES)
    k = min(n_layers, math.ceil(at_least / per_layer))
    layers = sorted({round(i * (n_layers - 1) / max(k - 1, 1)) for i in range(k)})
    chosen = [f"blk.{i}.{m}.weight" for i in layers for m in MATRICES]
    if "output.weight" in names:
        chosen.append("output.weight")
    return [n for n in chosen if n in names]


def imatrix_of(subject: str, path: Path, tokens: int) -> dict[str, np.ndarray]:
    """birdbone's importance values (mean squared input activation per channel), cached in WORK."""
    from birdbone.io.imatrix import read_imatrix
    from birdbone.measure import profile, write_profile

    folder = WORK / f"profile-{subject}-{tokens}"
    if not (folder / "imatrix.gguf").exists():
        write_profile(profile(path, CALIBRATION, tokens, 512), folder)
    return read_imatrix(folder / "imatrix.gguf").values


def measures_of(name: str, w: np.ndarray, imat: dict[str, np.ndarray]) -> dict:
    from birdbone.measure import measure_tensor

    m = measure_tensor(w, name)
    a = imat.get(name)
    return {
        "theta": m.theta, "alpha": m.alpha, "stable_rank": m.spectrum.stable_rank if m.spectrum else None,
        "kurtosis": m.distribution.kurtosis if m.distribution else None, "frobenius": m.frobenius,
        "imatrix_mass": float(a.sum()) if a is not None else None, "n_params": int(w.size),
        "act_energy": float((a * (w.astype(np.float64) ** 2).sum(axis=0)).sum()) if a is not None else None,
    }


# -- perturbations ----------------------------------------------------------------------------------
def quantize_roundtrip(w: np.ndarray, name: str) -> tuple[np.ndarray, str]:
    from gguf.constants import GGMLQuantizationType

    from birdbone.io.quantize import quantize_tensor
    from birdbone.io.types import legal_type

    q = quantize_tensor(w, legal_type(GGMLQuantizationType.Q2_K, w.shape[-1]), name=name)
    return q.dequantize(), q.type.name


def magnitude_prune(w: np.ndarray, share: float = 0.5) -> np.ndarray:
    k = int(share * w.size)
    cut = np.partition(np.abs(w).reshape(-1), k)[k]
    return np.where(np.abs(w) < cut, 0.0, w).astype(np.float32)


class Scorer:
    """llama.cpp ppl + KLD of variant files against the subject (its logprobs cached once)."""

    def __init__(self, parent: Path, tokens: int, threads: int | None):
        from birdbone.evaluate.compare import EvalConfig

        self.parent = parent
        self.cfg = EvalConfig(ctx=512, tokens=tokens, decode=0, canary_tokens=0, threads=threads)
        self.base = None

    def __call__(self, path: Path) -> dict:
        from birdbone.evaluate.compare import evaluate

        r = evaluate(path, self.parent, TEST_TEXT, self.cfg)
        self.base = r.parent.ppl.ppl
        return {"ppl": r.model.ppl.ppl, "dppl_pct": r.delta_ppl_pct, "kld": r.kld["kld_mean"], "top1": r.kld.get("top1_agreement")}


def variant(body, name: str, fn, tag: str) -> Path:
    from birdbone.remodel import rewrite_tensors

    out = WORK / f"{tag}.gguf"
    out.unlink(missing_ok=True)
    rewrite_tensors(body, out, [name], lambda n, w: fn(w))
    return out


# -- parts --------------------------------------------------------------------------------------------
def sensitivity(subject: str, args) -> dict:
    from birdbone.anatomy.body import Body

    path = subject_file(subject)
    imat = imatrix_of(subject, path, args.calibration_tokens)
    score = Scorer(path, args.tokens, args.threads)
    rows = []
    with Body(path) as body:
        n_layers = int(body.meta(f"{body.architecture}.block_count"))
        names = sample_tensors(list(body.entries), n_layers, args.sample)
        for i, name in enumerate(names):
            t0 = time.time()
            w = body.tensor(name)
            row = {"name": name, **measures_of(name, w, imat)}
            qtype = {}

            def quantized(x, name=name):
                y, qtype["type"] = quantize_roundtrip(x, name)
                return y

            p = variant(body, name, quantized, "q")
            row["quant"] = {**score(p), "type": qtype["type"]}
            p.unlink()
            p = variant(body, name, magnitude_prune, "prune")
            row["prune"] = score(p)
            p.unlink()
            rows.append(row)
            log.info("%s %d/%d %s: quant KLD %.5f, prune KLD %.5f (%.0f s)", subject, i + 1, len(names), name,
                     row["quant"]["kld"], row["prune"]["kld"], time.time() - t0)
    correlations = {}
    for pert in ("quant", "prune"):
        for resp in ("kld", "dppl_pct"):
            y = [r[pert][resp] for r in rows]
            correlations[f"{pert}/{resp}"] = {
                m: spearman_ci([np.nan if r[m] is None else r[m] for r in rows], y) for m in MEASURES}
    return {"file": str(path), "parent_ppl": score.base, "tensors": rows, "spearman": correlations}


def confound(subject: str, args) -> dict:
    from birdbone.anatomy.body import Body
    from birdbone.io.quantize import quantize_file
    from birdbone.measure.tensor import theta_of

    path = subject_file(subject)
    files = {"F32": path}
    for t in ("Q8_0", "Q4_K_M"):
        files[t] = WORK / f"{subject}-{t}.gguf"
        if not files[t].exists():
            quantize_file(path, files[t], t)
    thetas: dict[str, dict[str, float]] = {}
    types: dict[str, dict[str, str]] = {}
    for label, f in files.items():
        with Body(f) as body:
            names = sample_tensors(list(body.entries), int(body.meta(f"{body.architecture}.block_count")), args.sample)
            thetas[label] = {n: theta_of(body.tensor(n)) for n in names}
            types[label] = {n: body.entries[n].type.name for n in names}
    names = list(thetas["F32"])
    summary = {}
    for label in files:
        d = np.array([thetas[label][n] - thetas["F32"][n] for n in names])
        summary[label] = {"theta_mean": float(np.mean([thetas[label][n] for n in names])), "shift_mean": float(d.mean()),
                          "shift_abs_max": float(np.abs(d).max()),
                          "spearman_vs_f32": spearman_ci([thetas["F32"][n] for n in names], [thetas[label][n] for n in names])}
    by_role = {}
    for m in MATRICES + ("output",):
        sel = [n for n in names if n.split(".")[-2] == m]
        if sel:
            by_role[m] = {label: float(np.mean([thetas[label][n] for n in sel])) for label in files}
    return {"files": {k: str(v) for k, v in files.items()}, "theta": thetas, "types": types, "summary": summary, "by_matrix": by_role}


def purification(subject: str, args) -> dict:
    from birdbone.anatomy.body import Body
    from birdbone.remodel import purify_model, rewrite_tensors

    path = subject_file(subject)
    score = Scorer(path, args.tokens, args.threads)
    out_type = "F16" if subject == "builtin" else None
    rows = []
    for method in ("fft", "haar"):
        for s in STRENGTHS:
            t0 = time.time()
            out = WORK / f"purify-{subject}.gguf"
            out.unlink(missing_ok=True)
            res = purify_model(path, out, method, s, roles=["skeleton", "organ"], out_type=out_type)
            row = {"method": method, "strength": s, "tensors": len(res.tensors),
                   "relative_change_mean": float(np.mean(list(res.relative_change.values()))),
                   "theta_before_mean": float(np.mean([v for v in res.theta_before.values() if v is not None])),
                   "theta_after_mean": float(np.mean([v for v in res.theta_after.values() if v is not None])),
                   "purified": score(out)}
            out.unlink()
            # control: Gaussian noise with the same norm per tensor as the purification's change
            rng = np.random.default_rng(0)
            change = res.relative_change

            def noise(name, w):
                e = rng.standard_normal(w.shape)
                return (w + e * (change[name] * np.linalg.norm(w) / np.linalg.norm(e))).astype(np.float32)

            with Body(path) as body:
                rewrite_tensors(body, out, res.tensors, noise, out_type)
            row["noise_control"] = score(out)
            out.unlink()
            rows.append(row)
            log.info("%s %s %.2f: ppl %+.2f%% (noise %+.2f%%), KLD %.4f (noise %.4f) (%.0f s)", subject, method, s,
                     row["purified"]["dppl_pct"], row["noise_control"]["dppl_pct"], row["purified"]["kld"],
                     row["noise_control"]["kld"], time.time() - t0)
    return {"file": str(path), "parent_ppl": score.base, "stored_as": out_type or "input types", "rows": rows}


def imatrix_check(subject: str, args) -> dict:
    """Q4_K_M and IQ4_XS without an imatrix, with birdbone's, and with its channel-shuffled control."""
    from birdbone.io.imatrix import shuffle_channels
    from birdbone.io.quantize import quantize_file

    path = subject_file(subject)
    imatrix_of(subject, path, args.calibration_tokens)
    real = WORK / f"profile-{subject}-{args.calibration_tokens}" / "imatrix.gguf"
    variants = {"none": None, "birdbone": real, "shuffled": shuffle_channels(real, WORK / f"imatrix-{subject}-shuffled.gguf")}
    score = Scorer(path, args.tokens, args.threads)
    rows = []
    for qtype in ("Q4_K_M", "IQ4_XS"):
        for label, imat in variants.items():
            out = WORK / f"{subject}-{qtype}-{label}.gguf"
            q = quantize_file(path, out, qtype, imatrix=imat)
            rows.append({"type": qtype, "imatrix": label, "types_written": q.type_histogram(), **score(out)})
            out.unlink()
            log.info("%s %s imatrix=%s: ppl %.3f KLD %.5f", subject, qtype, label, rows[-1]["ppl"], rows[-1]["kld"])
    return {"file": str(path), "parent_ppl": score.base, "rows": rows}


PARTS = {"sensitivity": sensitivity, "confound": confound, "purify": purification, "imatrix": imatrix_check}


# -- report ---------------------------------------------------------------------------------------
def fmt_ci(c: dict) -> str:
    if not math.isfinite(c["rho"]):
        return "–"
    return f"{c['rho']:+.2f} [{c['lo']:+.2f}, {c['hi']:+.2f}]"


def write_doc(result: dict) -> None:
    cmds = " then ".join(f"`{c}`" for c in result.get("commands", [result.get("command", "")]))
    tokens = {s: next(iter(p.values())).get("tokens", result["args"]["tokens"]) for s, p in result["subjects"].items() if p}
    lines = ["# Evidence: do the data-free measures predict anything?", "",
             f"Generated by {cmds} from `benchmarks/results/measure_evidence.json`. "
             f"Scores: llama.cpp, the first {', '.join(f'{n} tokens ({s})' for s, n in tokens.items())} of wiki.test.raw, "
             "ctx 512, against the unmodified "
             "subject. Imatrix: birdbone's profile on wikitext-2 *valid*. Subjects: the built-in model (SmolLM2-135M-Instruct, "
             "its Q4_1 weights dequantized to F16) and the float subject (`make_float_model.py`, F32).", ""]
    for subject, parts in result["subjects"].items():
        lines += [f"## {subject}", ""]
        sens = parts.get("sensitivity")
        if sens:
            rows = sens["tensors"]
            qt = sorted({r["quant"]["type"] for r in rows})
            lines += [f"### Sensitivity ({len(rows)} tensors, parent ppl {sens['parent_ppl']:.3f})", "",
                      f"Each tensor alone quantized (types used: {', '.join(qt)}) or 50 % magnitude-pruned. "
                      "Spearman ρ with bootstrap 95 % CI; `n_params` and `act_energy` are controls, not θ-style measures.", "",
                      "| measure | quant → KLD | quant → Δppl | prune → KLD | prune → Δppl |", "|---|---|---|---|---|"]
            for m in MEASURES:
                cells = [fmt_ci(sens["spearman"][k][m]) for k in ("quant/kld", "quant/dppl_pct", "prune/kld", "prune/dppl_pct")]
                lines.append(f"| {m} | " + " | ".join(cells) + " |")
            top = sorted(rows, key=lambda r: -r["quant"]["kld"])[:5]
            lines += ["", "Most sensitive to quantization: " + ", ".join(f"`{r['name']}` (KLD {r['quant']['kld']:.4f})" for r in top), ""]
        conf = parts.get("confound")
        if conf:
            lines += ["### Quantization confound: θ of the same tensors at F32, Q8_0, Q4_K_M", "",
                      "| file | θ mean | mean shift vs F32 | max |shift| | Spearman vs F32 |", "|---|---:|---:|---:|---|"]
            for label, s in conf["summary"].items():
                lines.append(f"| {label} | {s['theta_mean']:.2f}° | {s['shift_mean']:+.2f}° | {s['shift_abs_max']:.2f}° | {fmt_ci(s['spearman_vs_f32'])} |")
            lines += ["", "| matrix | " + " | ".join(conf["summary"]) + " |", "|---|" + "---:|" * len(conf["summary"])]
            for m, v in conf["by_matrix"].items():
                lines.append(f"| {m} | " + " | ".join(f"{x:.2f}°" for x in v.values()) + " |")
            lines.append("")
        pur = parts.get("purify")
        if pur:
            lines += [f"### Purification (every block weight, stored as {pur['stored_as']}; input ppl {pur['parent_ppl']:.3f})", "",
                      "| method | strength | ‖Δ‖/‖W‖ | θ before → after | ppl | Δppl | KLD | noise control Δppl | noise control KLD |",
                      "|---|---:|---:|---|---:|---:|---:|---:|---:|"]
            for r in pur["rows"]:
                p, n = r["purified"], r["noise_control"]
                lines.append(f"| {r['method']} | {r['strength']:g} | {r['relative_change_mean']:.3f} | {r['theta_before_mean']:.1f}° → "
                             f"{r['theta_after_mean']:.1f}° | {p['ppl']:.3f} | {p['dppl_pct']:+.2f}% | {p['kld']:.4f} | "
                             f"{n['dppl_pct']:+.2f}% | {n['kld']:.4f} |")
            lines.append("")
        imc = parts.get("imatrix")
        if imc:
            lines += [f"### Importance matrix check (input ppl {imc['parent_ppl']:.3f})", "",
                      "| type | imatrix | ppl | Δppl | KLD | top-1 |", "|---|---|---:|---:|---:|---:|"]
            for r in imc["rows"]:
                lines.append(f"| {r['type']} | {r['imatrix']} | {r['ppl']:.3f} | {r['dppl_pct']:+.2f}% | {r['kld']:.5f} | {100 * r['top1']:.1f}% |")
            lines.append("")
    # the hand-written reading below the marker survives regeneration
    old = DOC.read_text(encoding="utf-8") if DOC.exists() else ""
    reading = old.split(READING_MARK, 1)[1] if READING_MARK in old else "\n## Reading\n\n(not written yet)\n"
    DOC.write_text("\n".join(lines) + READING_MARK + reading, encoding="utf-8")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--subjects", default="builtin,float")
    ap.add_argument("--parts", default="sensitivity,confound,purify,imatrix")
    ap.add_argument("--tokens", type=int, default=8192, help="tokens of wiki.test.raw scored per variant")
    ap.add_argument("--calibration-tokens", type=int, default=8192)
    ap.add_argument("--sample", type=int, default=40, help="at least this many tensors (whole layers of 7 matrices)")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--resume", action="store_true", help="keep finished parts from the previous JSON")
    ap.add_argument("--doc-only", action="store_true", help="rewrite docs/evidence.md from the JSON")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    for noisy in ("birdbone.llama", "gguf", "birdbone.io.quantize", "birdbone.remodel", "birdbone.evaluate"):
        logging.getLogger(noisy).setLevel(logging.ERROR)
    result = json.loads(RESULT.read_text()) if (args.resume or args.doc_only) and RESULT.exists() else {}
    if args.doc_only:
        write_doc(result)
        return 0
    WORK.mkdir(parents=True, exist_ok=True)
    import torch

    command = "python benchmarks/measure_evidence.py " + " ".join(sys.argv[1:])
    result["commands"] = [*result.get("commands", []), command]
    result.update({"what": "measure evidence (benchmarks/measure_evidence.py)", "args": vars(args), "command": command,
                   "machine": {"cpu_count": len(__import__("os").sched_getaffinity(0)), "python": platform.python_version(),
                               "torch": torch.__version__}})
    result.setdefault("subjects", {})
    for subject in args.subjects.split(","):
        for part in args.parts.split(","):
            done = result["subjects"].get(subject, {}).get(part)
            if done and args.resume:
                log.info("%s/%s: kept from the previous run", subject, part)
                continue
            if subject == "builtin" and part in ("confound", "imatrix"):
                # confound: its float weights are not shipped, θ of the Q4_1 grid is all there is;
                # imatrix: the rows are in benchmarks/quant_frontier.py
                continue
            t0 = time.time()
            out = PARTS[part](subject, args)
            out["seconds"] = round(time.time() - t0, 1)
            out["tokens"] = args.tokens
            result["subjects"].setdefault(subject, {})[part] = out
            RESULT.write_text(json.dumps(result, indent=1, default=float) + "\n", encoding="utf-8")
            write_doc(result)
            log.info("%s/%s done in %.0f s", subject, part, out["seconds"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
