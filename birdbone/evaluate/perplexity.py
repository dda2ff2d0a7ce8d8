"""Perplexity as llama.cpp's ``llama-perplexity`` computes it, for any logits provider.

The token stream is cut into ``n_chunks`` windows of ``n_ctx`` tokens. With a BOS-adding
vocabulary the first token of each window is replaced by BOS. Only the second half of each
window is scored (positions ``n_ctx/2 .. n_ctx-2`` predict the next token), so every scored
token sees at least ``n_ctx/2`` tokens of context. ppl = exp(mean NLL); the uncertainty is
the standard error of the mean NLL carried through exp, as llama.cpp prints it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from birdbone.io.text import Windows

LogitsFn = Callable[[np.ndarray], np.ndarray]  # (n_ctx,) token ids -> (n_ctx, n_vocab) float32 logits


def log_softmax(logits: np.ndarray) -> np.ndarray:
    x = logits.astype(np.float64, copy=False)
    m = x.max(axis=-1, keepdims=True)
    return (x - m - np.log(np.exp(x - m).sum(axis=-1, keepdims=True))).astype(np.float32)


@dataclass
class PerplexityResult:
    ppl: float
    ppl_stderr: float
    mean_nll: float
    n_tokens: int
    n_ctx: int
    n_chunks: int
    chunk_ppl: list[float]

    def as_dict(self) -> dict:
        return {"ppl": self.ppl, "ppl_stderr": self.ppl_stderr, "mean_nll": self.mean_nll, "n_tokens_scored": self.n_tokens,
                "n_ctx": self.n_ctx, "n_chunks": self.n_chunks}


def summarize_nll(nll: np.ndarray, w: Windows) -> PerplexityResult:
    nll = np.asarray(nll, dtype=np.float64)
    mean = float(nll.mean())
    se = float(nll.std() / math.sqrt(max(len(nll) - 1, 1)))
    ppl = math.exp(mean)
    chunks = nll.reshape(w.n_chunks, w.scored_per_chunk)
    return PerplexityResult(ppl, ppl * se, mean, len(nll), w.n_ctx, w.n_chunks, [math.exp(c.mean()) for c in chunks])


def chunk_nll(logits: np.ndarray, targets: np.ndarray, w: Windows) -> tuple[np.ndarray, np.ndarray]:
    """NLL of the scored positions and their log-probabilities (for KLD)."""
    logp = log_softmax(logits[w.first : w.n_ctx - 1])
    nll = -logp[np.arange(len(targets)), targets]
    return nll, logp
