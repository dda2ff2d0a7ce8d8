"""How long llama.cpp takes to decode a token with a given type per tensor: a time model for the budget.

Decoding one token multiplies every matrix by a vector once, so its time is close to a fixed part
(attention over the context, norms, the graph) plus, per matrix, its weights times the cost per
weight of its type's kernel at that row width. :func:`time_model` measures both on this host, with
llama.cpp itself, on the model being planned (a kernel's cost depends on the row width, and on this
model's widths it is what matters): the model is written in every type of the ladder in turn (every
matrix in that type, llama.cpp's width fallback applied), plus one mix that separates the fixed part,
each file decoded in interleaved rounds; a least-squares fit of decode time to weights per type
gives the costs (relative to Q8_0's: every file holds every matrix, so only differences between
types can be told from the fixed part) and the fixed part. The fit is cached in the user cache, keyed by the model's
content, the host (CPU model, threads) and the llama.cpp build.

Measured times are only as quiet as the machine: fit on an idle one (a benchmark checks the
predictions against interleaved measurements of other mixes).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)
REFERENCE = "Q8_0"  # the type costs are relative to


def host_key(threads: int) -> str:
    from importlib.metadata import version

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    raw = f"{cpu}|{threads}|llama-cpp-python {version('llama-cpp-python')}"
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def decode_seconds(path: str | Path, threads: int | None, n_decode: int = 128, seed: int = 0) -> float:
    """Seconds per decoded token of a GGUF in llama.cpp (after a short prompt and a warm-up)."""
    from birdbone.io.runtime import LlamaRuntime

    with LlamaRuntime(path, n_ctx=2 * n_decode + 32, threads=threads) as rt:  # speed() keeps half the context for decoding
        return 1.0 / rt.speed(n_prompt=16, n_decode=n_decode, seed=seed)["decode_tok_s"]


def interleaved(paths: list[Path], threads: int | None, rounds: int) -> list[float]:
    """Median seconds per token of each file, measured round by round across all of them."""
    times = [[decode_seconds(p, threads, seed=r) for p in paths] for r in range(rounds)]
    return [float(np.median([t[i] for t in times])) for i in range(len(paths))]


@dataclass
class TimeModel:
    """Predicted seconds per decoded token: ``base`` plus, per matrix, weights × its type's cost."""

    costs: dict[str, float]  # type -> seconds per weight, relative to Q8_0's
    base: float  # the fixed part of this model (attention, norms, graph) plus every weight at Q8_0's cost
    sizes: dict[str, int]  # tensor -> weights

    def seconds(self, types: dict[str, str]) -> float:
        return self.base + sum(self.sizes[n] * self.costs[t] for n, t in types.items() if n in self.sizes)

    def of(self, name: str, type_name: str) -> float:
        return self.sizes[name] * self.costs[type_name]

    def as_dict(self) -> dict:
        return {"costs_ps_per_weight_vs_q8_0": {t: 1e12 * c for t, c in self.costs.items()}, "base_ms": 1e3 * self.base}


def time_model(source: str | Path, shapes: dict[str, tuple[int, ...]], types: tuple[str, ...], threads: int | None = None,
               rounds: int = 5) -> TimeModel:
    """The time model of ``source`` (a float GGUF) on this host, fitted once and cached."""
    from birdbone.io.atomic import write_text_atomic
    from birdbone.io.hashing import file_sha256, user_cache_dir
    from birdbone.io.quantize import quantize_file
    from birdbone.io.types import tensor_type

    threads = threads or len(os.sched_getaffinity(0))
    wanted = sorted({tensor_type(t).name for t in types} | {"Q8_0", "Q4_0"})
    sizes = {n: math.prod(s) for n, s in shapes.items()}
    path = user_cache_dir() / f"speed-{host_key(threads)}-{file_sha256(source)[:16]}.json"
    cached = json.loads(path.read_text()) if path.exists() else {}
    if set(wanted) <= set(cached.get("costs", {})):
        return TimeModel({t: cached["costs"][t] for t in wanted}, cached["base"], sizes)
    log.info("fitting llama.cpp's decode time per type on %s (once per model and host; cached in %s)", Path(source).name, path)
    mixes = [[f".*={t}"] for t in wanted] + [[".*ffn_down.*=Q8_0", ".*=Q4_0"]]  # the last one separates the fixed part
    with tempfile.TemporaryDirectory(prefix="birdbone-speed-") as tmp:
        files, compositions = [], []
        for i, overrides in enumerate(mixes):
            q = quantize_file(source, Path(tmp) / f"m{i}.gguf", "Q8_0", overrides, threads=threads)
            files.append(q.out)
            compositions.append({n: q.types[n] for n in sizes if n in q.types})
        seconds = interleaved(files, threads, rounds)
    # every file holds every matrix, so only differences between types can be told apart from the
    # fixed part: costs are relative to Q8_0's (0), and the fixed part includes all weights at Q8_0's cost
    present = [t for t in sorted({t for c in compositions for t in c.values()}) if t != REFERENCE]
    a = np.array([[sum(sizes[n] for n, t in c.items() if t == ty) for ty in present] + [1.0] for c in compositions], dtype=np.float64)
    scale = a.max(axis=0)
    x = np.linalg.lstsq(a / scale, np.array(seconds), rcond=None)[0] / scale
    costs = {REFERENCE: 0.0, **dict(zip(present, x[:-1]))}
    data = {"costs": {t: float(c) for t, c in costs.items()}, "base": float(x[-1]), "measured": time.strftime("%Y-%m-%d %H:%M:%S"),
            "files": [{"overrides": m, "seconds": s} for m, s in zip(mixes, seconds)], "threads": threads}
    write_text_atomic(path, json.dumps(data, indent=1) + "\n")
    missing = [t for t in wanted if t not in costs]
    for t in missing:  # never written at these widths (llama.cpp fell back everywhere): it cannot be chosen either
        costs[t] = max(costs.values())
    return TimeModel({t: costs[t] for t in wanted}, float(x[-1]), sizes)
