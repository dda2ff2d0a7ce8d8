"""A synaptic GPT behind :class:`~birdbone.io.chat.ChatSession`, and greedy sampling from a run.

The whole transcript is the model's input, read in chunks of the training window with the fast
state carried from chunk to chunk (:func:`~birdbone.synapse.evaluate.read_chunks`), so what its
synapses took up early in a conversation still shapes replies after the attention window has
moved past it. Each message is encoded on its own, followed by a newline; a reply ends at a blank
line or after ``max_tokens``.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from birdbone.io.report import Line
from birdbone.io.runtime import Message
from birdbone.synapse.evaluate import greedy, load_run, read_chunks
from birdbone.synapse.train import encode


class SynapseChat:
    def __init__(self, run: str | Path):
        self.run = load_run(run)
        c = self.run.cfg.model
        self.name = f"{run}: {c.n_layer} layers, presynaptic {c.presynaptic}, hebbian {c.hebbian}"
        self.carry_norm = 0.0  # the size of the fast state the last reply was read with

    def transcript(self, messages: list[Message]) -> np.ndarray:
        return np.concatenate([np.zeros(0, np.int64), *(encode(self.run.tok, m.content + "\n") for m in messages)])

    def reply(self, messages: list[Message], max_tokens: int) -> Iterator[str]:
        last, carry = read_chunks(self.run.model, self.transcript(messages), self.run.cfg.seq)
        self.carry_norm = carry_norm(carry)
        text = self.run.tok.decode(greedy(self.run.model, last, max_tokens, carry)).split("\n\n")[0]
        yield text.strip()

    def vitals(self) -> dict[str, float]:
        return {**self.run.model.vitals(), "carried_state_norm": self.carry_norm}

    def reset(self) -> None:
        self.carry_norm = 0.0


def carry_norm(carry) -> float:
    """The Frobenius norm of a carried fast state (0 when nothing is carried)."""
    import torch

    if not carry:
        return 0.0
    total = 0.0
    for item in carry:
        for t in (item if isinstance(item, (list, tuple)) else [item]):
            if torch.is_tensor(t):
                total += float((t.float() ** 2).sum())
            elif isinstance(t, dict):
                total += sum(float((v.float() ** 2).sum()) for v in t.values() if torch.is_tensor(v))
    return total ** 0.5


@dataclass
class Sample:
    prompt: str
    completion: str
    tokens: list[int]
    vitals: dict

    def as_dict(self) -> dict:
        return dict(self.__dict__)

    def render(self) -> list:
        return [Line(self.prompt + self.completion)]


def sample(run: str | Path, prompt: str = "", n_tokens: int = 64) -> Sample:
    """Continue ``prompt`` greedily (no KV cache: each step recomputes the window exactly as training does)."""
    r = load_run(run)
    ids = encode(r.tok, prompt) if prompt else encode(r.tok, "\n")
    last, carry = read_chunks(r.model, ids, r.cfg.seq)
    new = greedy(r.model, last, n_tokens, carry)
    return Sample(prompt, r.tok.decode(new), new, r.model.vitals())
