"""A parent's log-probabilities on a text, in the user cache (:mod:`birdbone.io.cache`): streamed
chunk by chunk, stored as float32 so cached and fresh runs agree exactly, never held whole.
"""

from __future__ import annotations

import hashlib
import json
import logging
from typing import Iterator

import numpy as np

from birdbone.io.inputs import read_json
from birdbone.io.atomic import atomic_path, clean_stale_temps, write_text_atomic
from birdbone.io.hashing import user_cache_dir

log = logging.getLogger(__name__)


def tokens_sha256(tokens: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(tokens, dtype=np.int32).tobytes()).hexdigest()


class LogprobStore:
    """Per-chunk log-probabilities of a parent, appended to one float32 file."""

    def __init__(self, key: str):
        self.data = user_cache_dir() / f"logprobs-{key}.f32"
        self.meta = user_cache_dir() / f"logprobs-{key}.json"

    @property
    def complete(self) -> bool:
        return self.meta.exists() and self.data.exists()

    def read(self) -> Iterator[np.ndarray]:
        info = read_json(self.meta)
        rows, vocab = info["rows_per_chunk"], info["n_vocab"]
        mm = np.memmap(self.data, dtype=np.float32, mode="r", shape=(info["n_chunks"], rows, vocab))
        for i in range(info["n_chunks"]):
            yield np.asarray(mm[i])

    def write(self, chunks: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
        """Pass chunks through while appending them; the entry completes when the iterator ends."""
        clean_stale_temps(self.data.parent)
        n, shape = 0, None
        with atomic_path(self.data) as tmp:
            with open(tmp, "wb") as fh:
                for logp in chunks:
                    shape = logp.shape
                    fh.write(np.ascontiguousarray(logp, dtype=np.float32).tobytes())
                    n += 1
                    yield logp
        if shape is not None:
            write_text_atomic(self.meta, json.dumps({"n_chunks": n, "rows_per_chunk": shape[0], "n_vocab": shape[1]}))
