"""KL divergence of a model against its parent, as llama.cpp's ``--kl-divergence`` reports it.

Per scored token: KLD(parent || model) over the whole vocabulary, and whether both put their
top probability on the same token ("same top"). Statistics are accumulated chunk by chunk,
so parent log-probabilities can be streamed from disk and never held whole.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


def token_kld(parent_logp: np.ndarray, logp: np.ndarray) -> np.ndarray:
    """Per-row KL(parent || model) from log-probabilities (rows = tokens)."""
    p = np.exp(parent_logp.astype(np.float64))
    return np.sum(p * (parent_logp.astype(np.float64) - logp.astype(np.float64)), axis=-1).clip(min=0.0)


@dataclass
class KLDAccumulator:
    klds: list[np.ndarray] = field(default_factory=list)
    same_top: int = 0
    n: int = 0

    def add(self, parent_logp: np.ndarray, logp: np.ndarray) -> None:
        self.klds.append(token_kld(parent_logp, logp))
        self.same_top += int(np.sum(parent_logp.argmax(-1) == logp.argmax(-1)))
        self.n += len(logp)

    def result(self) -> dict:
        k = np.concatenate(self.klds) if self.klds else np.zeros(0)
        if k.size == 0:
            return {"kld_mean": None, "kld_p99": None, "top1_agreement": None, "n_tokens": 0}
        return {
            "kld_mean": float(k.mean()),
            "kld_mean_stderr": float(k.std() / np.sqrt(max(k.size - 1, 1))),
            "kld_median": float(np.median(k)),
            "kld_p99": float(np.percentile(k, 99)),
            "kld_max": float(k.max()),
            "top1_agreement": self.same_top / self.n,
            "n_tokens": int(self.n),
        }
