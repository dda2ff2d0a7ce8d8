"""Text in: a user's file (or the built-in excerpt), and the windows it is scored or profiled in.

Text is read as the bytes it is (CRLF stays CRLF, as llama.cpp reads it) and decoded as UTF-8.
Windows follow llama.cpp's perplexity and imatrix tools: ``n_chunks`` windows of ``n_ctx``
tokens, each window's first token replaced by BOS when the vocabulary adds one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

from birdbone.io.errors import InputError
from birdbone.io.inputs import note_input, regular_file


def load_text(path: str | Path | None) -> tuple[str, str]:
    """The text and a name for reports; the built-in Shakespeare excerpt when None."""
    if path is None:
        from birdbone.io.builtin import builtin_text_path

        p = builtin_text_path()
        return p.read_bytes().decode("utf-8"), "builtin:shakespeare.txt"
    p = regular_file(path, "text file")
    note_input(p)
    try:
        text = p.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(p, "is not UTF-8 text") from None
    if not text.strip():
        raise InputError(p, "text file is empty")
    return text, str(p)


def split_holdout(body: str, share: float) -> tuple[str, str]:
    """(train, held): the text's first 1 − ``share`` and the rest, cut at the last line break at or
    before that character, so no line is split (at the character itself when no line break
    precedes it). The one rule every run folder's split follows."""
    if not 0.0 < share < 1.0:
        raise ValueError(f"holdout share {share} is outside (0, 1)")
    cut = int(len(body) * (1.0 - share))
    cut = body.rfind("\n", 0, cut) + 1 or cut
    return body[:cut], body[cut:]


@dataclass(frozen=True)
class Windows:
    n_ctx: int
    n_chunks: int
    bos: int | None  # replaces each window's first token when the vocabulary adds BOS

    @property
    def first(self) -> int:
        return self.n_ctx // 2

    @property
    def scored_per_chunk(self) -> int:
        return self.n_ctx - 1 - self.first

    @property
    def n_scored(self) -> int:
        return self.n_chunks * self.scored_per_chunk


def plan_windows(n_tokens: int, n_ctx: int, max_tokens: int | None, bos: int | None) -> Windows:
    if n_ctx < 8:
        raise ValueError(f"context {n_ctx} is too small to score (need at least 8)")
    usable = n_tokens if max_tokens is None else min(n_tokens, max_tokens)
    n_chunks = usable // n_ctx
    if n_chunks < 1:
        raise ValueError(f"the text has {n_tokens} tokens, fewer than one context window of {n_ctx}; pass a longer text or a smaller --ctx")
    return Windows(n_ctx, n_chunks, bos)


def iter_windows(tokens: np.ndarray, w: Windows) -> Iterator[np.ndarray]:
    for i in range(w.n_chunks):
        chunk = np.array(tokens[i * w.n_ctx : (i + 1) * w.n_ctx], dtype=np.int32)
        if w.bos is not None:
            chunk[0] = w.bos
        yield chunk




def tokenize_windows(rt, body: str, text_name: str, n_ctx: int, max_tokens: int | None) -> tuple[np.ndarray, Windows]:
    """Tokenize once with a llama.cpp runtime's vocabulary (special tokens added as it says) and plan the windows."""
    tokens = rt.tokenize(body, add_special=True)
    try:
        return tokens, plan_windows(len(tokens), n_ctx, max_tokens, rt.bos if rt.add_bos else None)
    except ValueError as e:
        raise InputError(text_name, str(e)) from None
