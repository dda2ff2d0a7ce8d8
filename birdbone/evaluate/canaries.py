"""Canary prompts: greedy continuations through the model's chat template.

A quantized model that still answers these the way its parent does, token for token, has
kept its behaviour where a user notices. Agreement is measured on the first N tokens.
"""

from __future__ import annotations

from dataclasses import dataclass

CANARY_PROMPTS = (
    "What is the capital of France?",
    "Write a haiku about the sea.",
    "List three prime numbers.",
    "Explain in one sentence what a compiler does.",
    "Translate 'good morning' into Spanish.",
    "What is 12 times 7?",
    "Give me a name for a grey cat.",
    "Why is the sky blue?",
)


@dataclass(frozen=True)
class CanaryResult:
    exact: float  # share of prompts whose first N tokens equal the parent's
    prefix: float  # mean share of the first N tokens before the first difference
    n_prompts: int
    n_tokens: int

    def as_dict(self) -> dict:
        return {"canary_exact": self.exact, "canary_prefix": self.prefix, "canary_prompts": self.n_prompts, "canary_tokens": self.n_tokens}


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def compare_continuations(model_out: list[list[int]], parent_out: list[list[int]], n: int) -> CanaryResult:
    exact, prefix = 0, 0.0
    for a, b in zip(model_out, parent_out):
        a, b = a[:n], b[:n]
        exact += a == b
        prefix += common_prefix(a, b) / max(min(n, max(len(a), len(b))), 1)
    k = max(len(model_out), 1)
    return CanaryResult(exact / k, prefix / k, len(model_out), n)
