"""One evaluation of a GGUF against its parent, in one run: bytes, perplexity, KLD, canaries
and speed, both sides scored on the same token ids.

The parent's log-probabilities on the text are cached (content-hash key) and streamed chunk
by chunk, so a second evaluation against the same parent only runs the model.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from birdbone.evaluate.cache import LogprobStore, tokens_sha256
from birdbone.evaluate.canaries import CANARY_PROMPTS, compare_continuations
from birdbone.evaluate.kld import KLDAccumulator
from birdbone.evaluate.perplexity import PerplexityResult, chunk_nll, summarize_nll
from birdbone.io.runtime import LlamaRuntime, Message
from birdbone.io.errors import BirdboneError, InputError
from birdbone.io.hashing import file_sha256
from birdbone.io.model_file import BUILTIN, open_model, resolve_model_path
from birdbone.io.text import Windows, iter_windows, load_text, tokenize_windows
from birdbone.io.float_form import describe_parent, float_form
from birdbone.io.progress import Progress
from birdbone.io.report import Block, Line, Table, fmt, mib

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EvalConfig:
    ctx: int = 512  # context window; the second half of each window is scored, as llama-perplexity does
    tokens: int | None = 4096  # tokens of text to score, in whole windows (0 or null: all)
    decode: int = 64  # decode steps for the speed test (0: skip)
    canary_tokens: int = 16  # greedy tokens per canary prompt compared with the parent (0: skip)
    threads: int | None = None  # CPU threads for llama.cpp (null: all cores)
    batch: int = 512  # llama.cpp's batch size

    def __post_init__(self):
        if self.ctx < 16 or self.decode < 0 or self.canary_tokens < 0 or self.batch < 1:
            raise ValueError("ctx ≥ 16, decode ≥ 0, canary_tokens ≥ 0 and batch ≥ 1")
        if self.tokens is not None and self.tokens <= 0:
            object.__setattr__(self, "tokens", None)  # 0 means all, as on the command line


# -- inputs -----------------------------------------------------------------------------------
def resolve_parent(model: str | Path, parent: str | Path | None, progress: Progress | None = None) -> Path | None:
    """``builtin`` as a parent (or as the model, with no parent given) means its F16 form."""
    if parent is None and str(model) == BUILTIN:
        parent = BUILTIN
    if parent is None:
        return None
    if str(parent) == BUILTIN:
        return float_form(BUILTIN, progress)
    p = resolve_model_path(parent)
    if not p.exists():
        raise InputError(p, "no such file")
    return p


# -- scoring ----------------------------------------------------------------------------------
@dataclass
class SideReport:
    """Figures for one model."""

    path: str
    file_bytes: int
    n_params: int
    bits_per_weight: float
    types: dict[str, int]
    ppl: PerplexityResult | None = None
    speed: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        d = {k: v for k, v in asdict(self).items() if k not in ("ppl",)}
        if self.ppl:
            d.update(self.ppl.as_dict())
        return d


@dataclass
class EvalReport:
    model: SideReport
    parent: SideReport | None
    text: str
    n_ctx: int
    kld: dict = field(default_factory=dict)
    canaries: dict = field(default_factory=dict)

    @property
    def delta_ppl_pct(self) -> float | None:
        if not (self.parent and self.parent.ppl and self.model.ppl):
            return None
        return 100.0 * (self.model.ppl.ppl / self.parent.ppl.ppl - 1.0)

    @property
    def pct_of_parent_bytes(self) -> float | None:
        return 100.0 * self.model.file_bytes / self.parent.file_bytes if self.parent else None

    def as_dict(self) -> dict:
        return {
            "model": self.model.as_dict(), "parent": self.parent.as_dict() if self.parent else None,
            "text": self.text, "n_ctx": self.n_ctx, "delta_ppl_pct": self.delta_ppl_pct,
            "pct_of_parent_bytes": self.pct_of_parent_bytes, **self.kld, **self.canaries,
        }

    def render(self) -> list[Block]:
        """Metrics as rows, parent and model as columns: fits an 80-column terminal."""
        sides = [("parent", self.parent), ("model", self.model)] if self.parent else [("model", self.model)]
        table = Table(["", *[f"{label}\n{Path(side.path).name}" for label, side in sides]],
                      title=f"{self.text}: {self.model.ppl.n_tokens if self.model.ppl else 0} tokens scored, ctx {self.n_ctx}")

        def row(name, *cells):
            table.add(name, *cells[-len(sides):])

        row("size (MiB)", *[mib(s.file_bytes) for _, s in sides])
        if self.parent:
            row("% of parent bytes", "100.0%", fmt(self.pct_of_parent_bytes, ".1f", "%"))
        row("bits per weight", *[f"{s.bits_per_weight:.2f}" for _, s in sides])
        row("perplexity", *[f"{s.ppl.ppl:.3f} ± {s.ppl.ppl_stderr:.3f}" if s.ppl else "-" for _, s in sides])
        if self.parent:
            row("Δppl", "", fmt(self.delta_ppl_pct, "+.2f", "%"))
            row("KLD mean / p99", "", f"{fmt(self.kld.get('kld_mean'), '.5f')} / {fmt(self.kld.get('kld_p99'), '.4f')}")
            top1 = self.kld.get("top1_agreement")
            row("top-1 agreement", "", fmt(None if top1 is None else 100 * top1, ".1f", "%"))
            if self.canaries:
                row(f"canaries ({self.canaries['canary_prompts']} prompts, first {self.canaries['canary_tokens']} tokens)", "",
                    f"{100 * self.canaries['canary_exact']:.0f}% identical")
        row("prompt tok/s", *[fmt(s.speed.get("prompt_tok_s"), ".0f") for _, s in sides])
        row("decode tok/s", *[fmt(s.speed.get("decode_tok_s"), ".0f") for _, s in sides])
        note = describe_parent(Path(self.parent.path)) if self.parent else None
        return [table, *([Line(note, "dim")] if note else [])]


def describe_file(path: Path) -> SideReport:
    with open_model(path) as m:
        hist: dict[str, int] = {}
        for t in m.tensors.values():
            hist[t.type] = hist.get(t.type, 0) + 1
        return SideReport(str(path), m.file_bytes, m.n_params, 8.0 * m.tensor_bytes / max(m.n_params, 1),
                          dict(sorted(hist.items(), key=lambda kv: -kv[1])))


def score_chunks(logits_of: Callable[[np.ndarray], np.ndarray], tokens: np.ndarray, w: Windows,
                 progress: Progress | None = None, label: str = "score") -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield (nll, log-probs) of each window's scored positions."""
    for i, chunk in enumerate(iter_windows(tokens, w)):
        original = tokens[i * w.n_ctx : (i + 1) * w.n_ctx]
        logits = logits_of(chunk)
        yield chunk_nll(logits, original[w.first + 1 : w.n_ctx], w)
        if progress:
            progress(label, i + 1, w.n_chunks)


def parent_logprobs(parent: Path, tokens: np.ndarray, w: Windows, cfg: EvalConfig,
                    progress: Progress | None = None) -> Iterator[np.ndarray]:
    """The parent's log-probabilities per window, from the cache or computed and cached."""
    key = f"{file_sha256(parent)[:16]}-{tokens_sha256(tokens[: w.n_chunks * w.n_ctx])[:16]}-c{w.n_ctx}-n{w.n_chunks}-b{w.bos}"
    store = LogprobStore(key)
    if store.complete:
        log.info("parent log-probabilities from cache %s", store.data)
        yield from store.read()
        return
    with LlamaRuntime(parent, n_ctx=cfg.ctx, n_batch=cfg.batch, threads=cfg.threads) as rt:
        yield from store.write(logp for _, logp in score_chunks(rt.logits, tokens, w, progress, "score parent"))


def score_against_parent(logits_of: Callable[[np.ndarray], np.ndarray], tokens: np.ndarray, w: Windows,
                         parent: Path | None, cfg: EvalConfig, progress: Progress | None, label: str):
    """Score every window; against the parent's (cached) log-probabilities when there is one.

    Returns (model NLLs, parent NLLs or None, KLD statistics).
    """
    nlls, parent_nlls, kld = [], [], KLDAccumulator()
    parent_stream = parent_logprobs(parent, tokens, w, cfg, progress) if parent is not None else None
    for i, (nll, logp) in enumerate(score_chunks(logits_of, tokens, w, progress, label)):
        nlls.append(nll)
        if parent_stream is None:
            continue
        plogp = next(parent_stream)
        if plogp.shape != logp.shape:
            raise BirdboneError(f"{parent}: vocabulary ({plogp.shape[-1]}) differs from the model's ({logp.shape[-1]})")
        targets = tokens[i * w.n_ctx + w.first + 1 : (i + 1) * w.n_ctx]
        parent_nlls.append(-plogp[np.arange(len(targets)), targets])
        kld.add(plogp, logp)
    if parent_stream is None:
        return np.concatenate(nlls), None, {}
    for _ in parent_stream:  # finish the stream so the cache entry completes
        pass
    return np.concatenate(nlls), np.concatenate(parent_nlls), kld.result()


def greedy_canaries(rt: LlamaRuntime, n: int) -> list[list[int]]:
    return [rt.greedy(rt.chat_tokens([Message("user", p)]), n) for p in CANARY_PROMPTS]


def evaluate(model: str | Path, parent: str | Path | None = None, text: str | Path | None = None,
             cfg: EvalConfig = EvalConfig(), progress: Progress | None = None) -> EvalReport:
    """Evaluate a GGUF in llama.cpp, against its parent when one is given (or implied)."""
    model_path = resolve_model_path(model)
    parent_path = resolve_parent(model, parent, progress)
    if parent_path is not None and model_path.resolve() == parent_path.resolve():
        raise BirdboneError(f"{model_path}: the model and its parent are the same file")
    body, text_name = load_text(text)
    report = EvalReport(describe_file(model_path), describe_file(parent_path) if parent_path else None, text_name, cfg.ctx)
    with LlamaRuntime(model_path, n_ctx=cfg.ctx, n_batch=cfg.batch, threads=cfg.threads) as rt:
        tokens, w = tokenize_windows(rt, body, text_name, cfg.ctx, cfg.tokens)
        nll, parent_nll, report.kld = score_against_parent(rt.logits, tokens, w, parent_path, cfg, progress, "score model")
        report.model.ppl = summarize_nll(nll, w)
        if cfg.canary_tokens:
            model_out = greedy_canaries(rt, cfg.canary_tokens)
        if cfg.decode:
            report.model.speed = rt.speed(n_decode=cfg.decode)
    if parent_path is not None:
        report.parent.ppl = summarize_nll(parent_nll, w)
        if cfg.canary_tokens or cfg.decode:
            with LlamaRuntime(parent_path, n_ctx=cfg.ctx, n_batch=cfg.batch, threads=cfg.threads) as prt:
                if cfg.canary_tokens:
                    report.canaries = compare_continuations(model_out, greedy_canaries(prt, cfg.canary_tokens), cfg.canary_tokens).as_dict()
                if cfg.decode:
                    report.parent.speed = prt.speed(n_decode=cfg.decode)
    return report


def evaluate_torch(lm, tokenizer_gguf: str | Path, parent: str | Path | None = None, text: str | Path | None = None,
                   cfg: EvalConfig = EvalConfig(), progress: Progress | None = None) -> EvalReport:
    """Evaluate a ``transformers`` model on the same windows and token ids as :func:`evaluate`.

    Token ids come from ``tokenizer_gguf`` (llama.cpp's tokenizer of a GGUF of the same
    vocabulary, usually the parent), so both sides score identical ids.
    """
    from birdbone.bridge.torch_eval import torch_logits

    parent_path = resolve_parent(tokenizer_gguf, parent, progress) if parent is not None else None
    body, text_name = load_text(text)
    with LlamaRuntime(tokenizer_gguf, n_ctx=cfg.ctx, n_batch=cfg.batch, threads=cfg.threads) as rt:
        tokens, w = tokenize_windows(rt, body, text_name, cfg.ctx, cfg.tokens)
    n_params = sum(p.numel() for p in lm.parameters())
    n_bytes = sum(p.numel() * p.element_size() for p in lm.parameters())
    side = SideReport(f"torch:{type(lm).__name__}", n_bytes, n_params, 8.0 * n_bytes / max(n_params, 1), {})
    report = EvalReport(side, describe_file(parent_path) if parent_path else None, text_name, cfg.ctx)
    nll, parent_nll, report.kld = score_against_parent(lambda c: torch_logits(lm, c), tokens, w, parent_path, cfg, progress, "score torch model")
    report.model.ppl = summarize_nll(nll, w)
    if parent_path is not None:
        report.parent.ppl = summarize_nll(parent_nll, w)
    return report
