"""How long llama.cpp takes to decode a token with a given type per tensor: a time model for the budget.

Decoding one token multiplies every matrix by a vector once, so its time is close to a fixed part
(attention over the context, norms, the graph) plus, per matrix, its weights times the cost per
weight of its type's kernel. The cost per weight of each type is measured on this host once, with
llama.cpp itself (:func:`type_costs`): two synthetic models of the same widths, 2 and 6 layers deep,
every matrix in the type; the slope of decode time over weights is the type's cost. The fixed part of
a real model comes from one decode of it in a known mix (:func:`base_seconds`). Both are cached in
the user cache, keyed by the host (CPU model, threads) and the llama.cpp build.

Measured costs are only as quiet as the machine: measure on an idle one (the figures say when they
were taken, and a benchmark checks the predictions against interleaved measurements).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from birdbone.io.errors import BirdboneError

log = logging.getLogger(__name__)
SYNTH = {"n_embd": 1024, "n_ff": 2816, "n_head": 16, "n_kv": 4, "vocab": 256}  # rows fit every type's blocks (256)
DEPTHS = (2, 6)


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
    raw = f"{cpu}|{threads}|llama-cpp-python {version('llama-cpp-python')}|{json.dumps(SYNTH, sort_keys=True)}"
    return hashlib.sha256(raw.encode()).hexdigest()[:16]


def synthetic_model(path: Path, qtype: str, layers: int) -> Path:
    """A random llama of the synthetic widths, every matrix stored in ``qtype``, with a tokenizer-free
    vocabulary (llama.cpp's ``none``): only its speed matters."""
    from gguf.constants import GGMLQuantizationType as Q
    from gguf.constants import GGUFValueType as V

    from birdbone.io.gguf_writer import TensorSpec, _encode, write_gguf
    from birdbone.io.types import tensor_type

    e, ff, h, kv, voc = (SYNTH[k] for k in ("n_embd", "n_ff", "n_head", "n_kv", "vocab"))
    hd = e // h
    meta = {"llama.block_count": (layers, V.UINT32, None), "llama.context_length": (512, V.UINT32, None),
            "llama.embedding_length": (e, V.UINT32, None), "llama.feed_forward_length": (ff, V.UINT32, None),
            "llama.attention.head_count": (h, V.UINT32, None), "llama.attention.head_count_kv": (kv, V.UINT32, None),
            "llama.attention.layer_norm_rms_epsilon": (1e-5, V.FLOAT32, None), "llama.rope.dimension_count": (hd, V.UINT32, None),
            "llama.vocab_size": (voc, V.UINT32, None), "tokenizer.ggml.model": ("none", V.STRING, None), "general.file_type": (1, V.UINT32, None)}
    rng = np.random.default_rng(0)
    qt = tensor_type(qtype)

    def spec(name: str, shape: tuple[int, ...]) -> TensorSpec:
        t = qt if len(shape) == 2 else Q.F32
        return TensorSpec(name, shape, t, lambda: _encode((rng.standard_normal(shape) * 0.02).astype(np.float32), t, name))

    specs = [spec("token_embd.weight", (voc, e))]
    for i in range(layers):
        specs += [spec(f"blk.{i}.attn_norm.weight", (e,)), spec(f"blk.{i}.attn_q.weight", (h * hd, e)), spec(f"blk.{i}.attn_k.weight", (kv * hd, e)),
                  spec(f"blk.{i}.attn_v.weight", (kv * hd, e)), spec(f"blk.{i}.attn_output.weight", (e, h * hd)),
                  spec(f"blk.{i}.ffn_norm.weight", (e,)), spec(f"blk.{i}.ffn_gate.weight", (ff, e)), spec(f"blk.{i}.ffn_up.weight", (ff, e)),
                  spec(f"blk.{i}.ffn_down.weight", (e, ff))]
    specs.append(spec("output_norm.weight", (e,)))
    return write_gguf(path, "llama", meta, specs)


def decode_seconds(path: str | Path, threads: int | None, n_decode: int = 32, rounds: int = 3) -> float:
    """Median seconds per decoded token of a GGUF in llama.cpp (a short prompt first)."""
    from birdbone.io.runtime import LlamaRuntime

    times = []
    with LlamaRuntime(path, n_ctx=128, threads=threads) as rt:
        for r in range(rounds):
            times.append(1.0 / rt.speed(n_prompt=16, n_decode=n_decode, seed=r)["decode_tok_s"])
    return float(np.median(times))


def _synthetic_weights(layers: int) -> int:
    e, ff, h, kv = (SYNTH[k] for k in ("n_embd", "n_ff", "n_head", "n_kv"))
    hd = e // h
    return layers * ((2 * h + 2 * kv) * hd * e + 3 * ff * e)


def type_costs(types: tuple[str, ...], threads: int | None = None, refresh: bool = False) -> dict[str, float]:
    """Seconds per weight of one matrix-vector product, per llama.cpp type, on this host (cached)."""
    import tempfile

    from birdbone.io.atomic import write_text_atomic
    from birdbone.io.hashing import user_cache_dir
    from birdbone.io.types import tensor_type

    threads = threads or len(os.sched_getaffinity(0))
    path = user_cache_dir() / f"speed-{host_key(threads)}.json"
    cached = json.loads(path.read_text()) if path.exists() and not refresh else {"costs": {}}
    wanted = [tensor_type(t).name for t in types if tensor_type(t).name not in cached["costs"]]
    if wanted:
        log.info("measuring llama.cpp's decode cost per weight of %s on this host (once; cached in %s)", ", ".join(wanted), path)
        with tempfile.TemporaryDirectory(prefix="birdbone-speed-") as tmp:
            for t in wanted:
                files = [synthetic_model(Path(tmp) / f"{t}-{d}.gguf", t, d) for d in DEPTHS]
                times = [decode_seconds(f, threads) for f in files]
                cached["costs"][t] = max((times[1] - times[0]) / (_synthetic_weights(DEPTHS[1]) - _synthetic_weights(DEPTHS[0])), 1e-15)
                for f in files:
                    f.unlink()
        cached.update({"threads": threads, "measured": time.strftime("%Y-%m-%d %H:%M:%S"), "synthetic": SYNTH, "depths": DEPTHS})
        write_text_atomic(path, json.dumps(cached, indent=1) + "\n")
    return {tensor_type(t).name: cached["costs"][tensor_type(t).name] for t in types}


@dataclass
class TimeModel:
    """Predicted seconds per decoded token: ``base`` plus, per matrix, weights × its type's cost."""

    costs: dict[str, float]  # type -> seconds per weight
    base: float  # the fixed part of this model (attention, norms, graph)
    sizes: dict[str, int]  # tensor -> weights

    def seconds(self, types: dict[str, str]) -> float:
        return self.base + sum(self.sizes[n] * self.costs[t] for n, t in types.items() if n in self.sizes)

    def of(self, name: str, type_name: str) -> float:
        return self.sizes[name] * self.costs[type_name]


def time_model(source: str | Path, shapes: dict[str, tuple[int, ...]], types: tuple[str, ...], threads: int | None = None) -> TimeModel:
    """The time model of ``source`` (a float GGUF): the host's costs, and its fixed part measured once
    (decoding its Q8_0 form, less what the costs say its matrices take)."""
    import math
    import tempfile

    from birdbone.io.atomic import write_text_atomic
    from birdbone.io.hashing import file_sha256, user_cache_dir
    from birdbone.io.quantize import quantize_file
    from birdbone.io.types import legal_type, tensor_type

    threads = threads or len(os.sched_getaffinity(0))
    costs = type_costs(tuple(dict.fromkeys([*types, "Q8_0", "F16", "Q4_0", "Q5_0"])), threads)
    sizes = {n: math.prod(s) for n, s in shapes.items()}
    path = user_cache_dir() / f"speed-base-{host_key(threads)}-{file_sha256(source)[:16]}.json"
    if path.exists():
        base = json.loads(path.read_text())["base"]
    else:
        with tempfile.TemporaryDirectory(prefix="birdbone-speed-") as tmp:
            q = quantize_file(source, Path(tmp) / "q8.gguf", "Q8_0", [".*=Q8_0"])
            measured = decode_seconds(q.out, threads)
        used = {n: legal_type(tensor_type(q.types[n]), shapes[n][-1]).name for n in shapes if n in q.types}
        base = max(measured - sum(sizes[n] * costs.get(t, costs["F16"]) for n, t in used.items()), 0.0)
        write_text_atomic(path, json.dumps({"base": base, "measured_q8_0": measured}) + "\n")
    missing = [t for t in types if tensor_type(t).name not in costs]
    if missing:
        raise BirdboneError(f"no measured cost for {missing}")
    return TimeModel(costs, base, sizes)
