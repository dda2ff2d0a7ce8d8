"""Evaluating a synapse run: perplexity, passkeys, calibration, associative recall, speed.

Everything runs in eval mode (deterministic release) with the per-sequence fast state on, and
the trained weights are hashed before and after: no evaluation may change them. Text longer
than the context is read in chunks with the fast state carried from one chunk to the next — the
only memory that reaches beyond the attention window.
"""

from __future__ import annotations

import hashlib
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from birdbone.io.errors import InputError
from birdbone.io.inputs import note_folder_files, note_input, read_json
from birdbone.io.run_folder import read_jsonl
from birdbone.synapse.model import SynapticGPT
from birdbone.io.text import split_holdout
from birdbone.synapse.train import TrainConfig, encode, load_tokenizer, load_weights, read_config, recall_text

ECE_BINS = 15


@dataclass
class LoadedRun:
    path: Path
    cfg: TrainConfig
    model: SynapticGPT
    tok: object
    text_name: str


def load_run(run: str | Path) -> LoadedRun:
    from birdbone.io.run_folder import reading_run

    with reading_run(run):
        return _load_run(Path(run))


def _load_run(run: Path) -> LoadedRun:
    cfg = read_config(run)
    note_folder_files(run, own=("reliability.png",))  # the run is an input; its reliability plot is eval's own
    if not (run / "model.safetensors").exists():
        raise InputError(run, "has no checkpoint yet (model.safetensors)")
    model = SynapticGPT(cfg.model)
    load_weights(run, model)
    return LoadedRun(run, cfg, model.eval(), load_tokenizer(run), read_json(run / "config.json")["text"]["name"])


def weights_hash(model: SynapticGPT) -> str:
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def windows(ids: np.ndarray, seq: int, limit: int) -> list[np.ndarray]:
    n = min(limit, (len(ids) - 1) // seq)
    return [ids[i * seq : i * seq + seq + 1] for i in range(n)]


@torch.no_grad()
def perplexity_and_calibration(model: SynapticGPT, ids: np.ndarray, seq: int, limit: int) -> dict:
    """Token-weighted perplexity over consecutive windows, and top-1 calibration (15 bins)."""
    nll, n_tok = 0.0, 0
    conf_all, hit_all = [], []
    t0 = time.perf_counter()
    for w in windows(ids, seq, limit):
        x = torch.from_numpy(w[None, :].astype(np.int64))
        logits, _ = model(x[:, :-1])
        logp = torch.log_softmax(logits[0].float(), dim=-1)
        target = x[0, 1:]
        nll -= float(logp.gather(1, target[:, None]).sum())
        n_tok += len(target)
        conf, pred = logp.exp().max(dim=-1)
        conf_all.append(conf.numpy())
        hit_all.append((pred == target).numpy())
    seconds = time.perf_counter() - t0
    conf, hit = np.concatenate(conf_all), np.concatenate(hit_all)
    edges = np.linspace(0.0, 1.0, ECE_BINS + 1)
    which = np.clip(np.digitize(conf, edges[1:-1]), 0, ECE_BINS - 1)
    bins = []
    ece = 0.0
    for b in range(ECE_BINS):
        sel = which == b
        if sel.any():
            ece += sel.mean() * abs(float(hit[sel].mean()) - float(conf[sel].mean()))
        bins.append({"lo": float(edges[b]), "hi": float(edges[b + 1]), "count": int(sel.sum()),
                     "confidence": float(conf[sel].mean()) if sel.any() else None, "accuracy": float(hit[sel].mean()) if sel.any() else None})
    return {"ppl": math.exp(nll / max(n_tok, 1)), "tokens": n_tok, "ece": float(ece), "top1_accuracy": float(hit.mean()),
            "reliability": bins, "infer_tok_s": n_tok / max(seconds, 1e-9)}


@torch.no_grad()
def greedy(model: SynapticGPT, ids: np.ndarray, n_new: int, carry: list | None = None) -> list[int]:
    """Greedy continuation of ``ids`` (at most one window) from a carried fast state; no cache: every
    step recomputes the window, exactly as training computes it."""
    seq = model.cfg.block_size
    out = list(map(int, ids))
    new = []
    for _ in range(n_new):
        x = torch.tensor([out[-seq:]], dtype=torch.long)
        logits, _ = model(x, carry=carry)
        new.append(int(logits[0, -1].argmax()))
        out.append(new[-1])
    return new


@torch.no_grad()
def read_chunks(model: SynapticGPT, ids: np.ndarray, chunk: int) -> tuple[np.ndarray, list | None]:
    """Read all but the last chunk of ``ids`` to build the fast state; returns the last chunk and the state."""
    carry = None
    cut = max(0, ((len(ids) - 1) // chunk) * chunk)
    for s in range(0, cut, chunk):
        model(torch.from_numpy(ids[None, s : s + chunk].astype(np.int64)), carry=carry)
        carry = model.carry() or None
    return ids[cut:], carry


def passkey(run: LoadedRun, corpus: np.ndarray, lengths: list[int], depths: list[float], trials: int, seed: int = 0) -> list[dict]:
    """Needle in a haystack: a passkey at a depth of a filler text of a given length, asked for at
    the end. Lengths beyond the context are read in chunks with the fast state carried."""
    rng = np.random.default_rng(seed)
    tok, model, seq = run.tok, run.model, run.cfg.seq
    rows = []
    for length in lengths:
        for depth in depths:
            hits = 0
            for _ in range(trials):
                key = str(int(rng.integers(10000, 100000)))
                needle = encode(tok, f" The passkey is {key}. Remember it. ")
                question = encode(tok, " What is the passkey? The passkey is ")
                n_fill = max(0, length - len(needle) - len(question))
                s = int(rng.integers(0, len(corpus) - n_fill - 1))
                fill = corpus[s : s + n_fill]
                at = int(depth * n_fill)
                ids = np.concatenate([fill[:at], needle, fill[at:], question])
                last, carry = read_chunks(model, ids, seq)
                answer = tok.decode(greedy(model, last, len(encode(tok, key)) + 1, carry))
                hits += answer.strip().startswith(key)
            rows.append({"length": length, "depth": depth, "beyond_context": length > seq, "accuracy": hits / trials, "trials": trials})
    return rows


def associative_recall(run: LoadedRun, corpus: np.ndarray, trials: int, seed: int = 1) -> float:
    """Key–value lists queried at the end (the training mix's kind, fresh keys): exact answers."""
    rng = np.random.default_rng(seed)
    hits = 0
    done = 0
    while done < trials:
        context, answer = recall_text(rng, "")
        if "=" not in context:  # the generator also makes passkeys; only key–value lists count here
            continue
        ids = encode(run.tok, context)[-run.cfg.seq:]
        got = run.tok.decode(greedy(run.model, ids, len(encode(run.tok, answer)) + 1))
        hits += got.strip().startswith(answer)
        done += 1
    return hits / trials


def gini(values: list[float]) -> float:
    """Gini coefficient of non-negative values: 0 when all are equal, → 1 when one holds everything."""
    v = np.sort(np.asarray(values, dtype=np.float64))
    n = len(v)
    if n == 0 or v.sum() <= 0:
        return 0.0
    return float((2 * np.arange(1, n + 1) - n - 1) @ v / (n * v.sum()))


def moe_summary(run: LoadedRun, dead_share_of_fair: float = 0.1) -> dict:
    """Experts per layer now; the Gini of their running load share and the share of dead experts
    (load under ``dead_share_of_fair`` of a fair 1/E share), averaged over layers; how many splits,
    rejected splits and merges the lineage holds, and their rates per 1000 training steps and per
    metabolism round (a round per layer every ``splitmerge_every`` steps)."""
    lineage = run.path / "lineage.jsonl"
    events = read_jsonl(lineage) if lineage.exists() else []
    counts = {kind: sum(e["event"] == kind for e in events) for kind in ("split", "split rejected", "merge")}
    layers = run.model.expert_layers()
    loads = [layer.load.tolist() for layer in layers]
    steps = read_json(run.path / "state.json")["step"] if (run.path / "state.json").exists() else 0
    rounds = len(layers) * (steps // run.cfg.model.splitmerge_every)
    return {"experts": [layer.experts for layer in layers], **counts,
            "load_gini": float(np.mean([gini(v) for v in loads])) if loads else None,
            "dead_share": float(np.mean([np.mean([x < dead_share_of_fair / len(v) for x in v]) for v in loads])) if loads else None,
            "rounds": rounds, "splits_per_1k_steps": 1000 * counts["split"] / max(steps, 1),
            "merges_per_1k_steps": 1000 * counts["merge"] / max(steps, 1),
            "splits_per_round": counts["split"] / rounds if rounds else None, "merges_per_round": counts["merge"] / rounds if rounds else None}


def training_text(run: LoadedRun) -> tuple[str, str]:
    """The text the run was trained on, found where config.json says and checked by its sha256."""
    from birdbone.io.text import load_text

    record = read_json(run.path / "config.json")["text"]
    where = None if record["name"].startswith("builtin:") else Path(record["name"])
    if where is not None and not where.exists():
        raise InputError(run.path, f"its training text {where} is gone: pass --text FILE to score another text")
    body, name = load_text(where)
    if hashlib.sha256(body.encode("utf-8")).hexdigest() != record["sha256"]:
        raise InputError(run.path, f"its training text {name} has changed since training: pass --text FILE to score another text")
    return body, name


def evaluate_run(run_dir: str | Path, text: str | Path | None = None, windows_limit: int = 32, trials: int = 5) -> dict:
    """Every measure of a run on its held-out text (or on ``text``)."""
    from birdbone.io.text import load_text

    run = load_run(run_dir)
    before = weights_hash(run.model)
    if text is None:  # the run's own text, as trained on: its last tenth was never seen
        body, name = training_text(run)
        held = encode(run.tok, split_holdout(body, run.cfg.holdout)[1])
        name += f" (held-out {run.cfg.holdout:.0%})"
    else:
        body, name = load_text(Path(text))
        held = encode(run.tok, body)
    seq = run.cfg.seq
    report = {"run": str(run.path), "text": name, **perplexity_and_calibration(run.model, held, seq, windows_limit)}
    report["passkey"] = passkey(run, held, [seq // 2, seq, 2 * seq, 4 * seq], [0.1, 0.5, 0.9], trials)
    inside = [r["accuracy"] for r in report["passkey"] if not r["beyond_context"]]
    beyond = [r["accuracy"] for r in report["passkey"] if r["beyond_context"]]
    report["passkey_inside"] = float(np.mean(inside)) if inside else None
    report["passkey_beyond"] = float(np.mean(beyond)) if beyond else None
    report["recall_accuracy"] = associative_recall(run, held, 10 * trials)
    metrics = read_jsonl(run.path / "metrics.jsonl")
    report["train_tok_s"] = metrics[-1].get("train_tok_s") if metrics else None
    report["moe"] = moe_summary(run) if run.cfg.model.moe else None
    report["weights_unchanged"] = weights_hash(run.model) == before
    if not report["weights_unchanged"]:
        raise AssertionError("an evaluation changed trained weights")
    return report


def reliability_plot(report: dict, out: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bins = [b for b in report["reliability"] if b["count"]]
    fig, ax = plt.subplots(figsize=(4.5, 4.5))
    ax.plot([0, 1], [0, 1], ":", color="grey", label="perfect calibration")
    ax.bar([(b["lo"] + b["hi"]) / 2 for b in bins], [b["accuracy"] for b in bins], width=1 / ECE_BINS, alpha=0.6, edgecolor="k", label="accuracy")
    ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], "o", color="C1", label="bin confidence")
    ax.set_xlabel("top-1 confidence")
    ax.set_ylabel("top-1 accuracy")
    ax.set_title(f"reliability (ECE {report['ece']:.3f})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    from birdbone.io.atomic import atomic_path

    with atomic_path(out) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
    return Path(out)


class RunEvaluation:
    """``birdbone synapse eval``: every measure of a run, and its reliability diagram."""

    def __init__(self, report: dict):
        self.report = report

    def as_dict(self) -> dict:
        return {k: v for k, v in self.report.items() if k != "reliability"} | {"reliability": self.report["reliability"]}

    def render(self) -> list:
        from birdbone.io.report import Line, Table

        r = self.report
        table = Table(["length", "depth", "beyond context", "passkey accuracy"], title="needle in a haystack")
        for p in r["passkey"]:
            table.add(p["length"], f"{p['depth']:.1f}", "yes" if p["beyond_context"] else "no", f"{100 * p['accuracy']:.0f} %")
        return [Line(f"{r['text']}: {r['tokens']:,} tokens, perplexity {r['ppl']:.2f}, top-1 {100 * r['top1_accuracy']:.1f} %, "
                     f"ECE {r['ece']:.3f}, {r['infer_tok_s']:.0f} tok/s"), table,
                Line(f"associative recall {100 * r['recall_accuracy']:.0f} %; weights unchanged: {r['weights_unchanged']}; reliability diagram: {r['plot']}")]


def eval_run(run_dir: str | Path, text: str | Path | None = None, windows_limit: int = 32, trials: int = 5,
             plot: str | Path | None = None) -> RunEvaluation:
    """:func:`evaluate_run`, plus the reliability diagram (default: RUN/reliability.png)."""
    note_input(text)  # known before any output is written, so none lands on them
    report = evaluate_run(run_dir, text, windows_limit, trials)
    report["plot"] = str(reliability_plot(report, plot or Path(run_dir) / "reliability.png"))
    return RunEvaluation(report)
