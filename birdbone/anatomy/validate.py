"""Every assembled or grafted file is loaded by llama.cpp and generates before a command
reports success; an untouched reassembly must give exactly the source's tokens and logits."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from birdbone.io.errors import BirdboneError

PROBE = "The surgeon looked at the bones and said"


@dataclass
class Validation:
    path: str
    generated: str
    n_tokens: int
    logits_equal_source: bool | None = None

    def as_dict(self) -> dict:
        return self.__dict__.copy()


def validate(path: str | Path, source: str | Path | None = None, n_tokens: int = 8, threads: int | None = None) -> Validation:
    from birdbone.io.llama import probe_loadable
    from birdbone.io.runtime import LlamaRuntime

    probe_loadable(path, force=True)  # its metadata may be a user's edit: an abort must not kill us
    with LlamaRuntime(path, n_ctx=128, threads=threads) as rt:
        prompt = rt.tokenize(PROBE)
        out = rt.greedy(prompt, n_tokens, stop_at_eog=False)
        logits = rt.logits(prompt)
        v = Validation(str(path), rt.detokenize(out), len(out))
    if len(out) != n_tokens:
        raise BirdboneError(f"{path}: llama.cpp loaded the file but generated {len(out)} of {n_tokens} tokens")
    if source is not None:
        with LlamaRuntime(source, n_ctx=128, threads=threads) as rt:
            same = rt.greedy(prompt, n_tokens, stop_at_eog=False) == out and np.array_equal(rt.logits(prompt), logits)
        v.logits_equal_source = same
        if not same:
            raise BirdboneError(f"{path}: greedy tokens or logits differ from the source {source}")
    return v


def check_written(path: Path, validate_it: bool, loads_next: bool, threads: int | None = None) -> dict | None:
    """What assemble and graft do with a file they wrote from a user's organs: validate it in
    llama.cpp; or, unvalidated but about to be loaded in this process (``--text``), at least make
    sure llama.cpp will not abort on its header (a forged manifest's ``block_count`` 0 would)."""
    if validate_it:
        return validate(path, None, threads=threads).as_dict()
    if loads_next:
        from birdbone.io.llama import probe_loadable

        probe_loadable(path, force=True)
    return None
