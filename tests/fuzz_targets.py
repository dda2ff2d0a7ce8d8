"""Fuzz targets for every reader: seeds, mutators and the call that judges one input.

Shared by the CI slice (``tests/test_fuzz.py``) and the campaign (``benchmarks/fuzz.py``). Each
target turns (seed files, a random generator) into one mutated input on disk, then calls the
reader the way a command would, and uses what it accepted the way a command would (every
tensor decoded, the manifest assembled, the recipe rendered). An input ends in one of:

* ``clean``: a one-line :class:`BirdboneError` (what every user error must be);
* ``accepted``: read and used without complaint;
* ``other``: any other exception (a defect);
* ``hang`` / ``crash``: judged by the campaign's watchdog (a defect).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

INTERESTING_INTS = [0, 1, -1, 2, 3, 7, 8, 31, 32, 63, 64, 255, 256, 511, 512, 513, 2**15, 2**16, 2**31 - 1, 2**31, 2**32 - 1, 2**32,
                    2**40, 2**62, 2**63 - 1, 2**63, 2**64 - 1]
DEEP = "@@deep@@"
INTERESTING_VALUES: list[Any] = [None, True, False, "", "x" * 300, "🦴", "\0", "../../etc/passwd", [], {}, [1, 2], {"a": 1}, 1.5, -0.0,
                                 1e308, -1e308, "nan", "inf", *INTERESTING_INTS]


# -- byte mutators ------------------------------------------------------------------------------

def mutate_bytes(data: bytes, rng: random.Random) -> bytes:
    """One to four of: flip bytes, write an interesting integer, truncate, duplicate or drop a slice."""
    b = bytearray(data)
    for _ in range(rng.randint(1, 4)):
        if not b:
            break
        op = rng.random()
        i = rng.randrange(len(b))
        if op < 0.35:
            for _ in range(rng.randint(1, 8)):
                b[rng.randrange(len(b))] = rng.randrange(256)
        elif op < 0.65:
            fmt = rng.choice(["<B", "<H", "<I", "<Q", "<i", "<q"])
            v = rng.choice(INTERESTING_INTS)
            lo, hi = {"<B": (0, 255), "<H": (0, 2**16 - 1), "<I": (0, 2**32 - 1), "<Q": (0, 2**64 - 1), "<i": (-2**31, 2**31 - 1),
                      "<q": (-2**63, 2**63 - 1)}[fmt]
            v = min(max(v, lo), hi)
            j = i - i % 4 if rng.random() < 0.7 else i
            chunk = struct.pack(fmt, v)
            b[j:j + len(chunk)] = chunk
        elif op < 0.8:
            del b[rng.randrange(len(b)):]
        elif op < 0.9:
            n = rng.randint(1, 64)
            b[i:i] = b[i:i + n]
        else:
            del b[i:i + rng.randint(1, 64)]
    return bytes(b)


# -- structured (JSON/YAML document) mutators ---------------------------------------------------------

def _nodes(doc: Any, path: tuple = ()) -> list[tuple]:
    out = [path]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _nodes(v, (*path, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc[:50]):
            out += _nodes(v, (*path, i))
    return out


def _set_at(doc: Any, path: tuple, value: Any) -> Any:
    if not path:
        return value
    node = doc
    for k in path[:-1]:
        node = node[k]
    node[path[-1]] = value
    return doc


def _del_at(doc: Any, path: tuple) -> Any:
    if not path:
        return doc
    node = doc
    for k in path[:-1]:
        node = node[k]
    del node[path[-1]]
    return doc


def mutate_doc(doc: Any, rng: random.Random) -> Any:
    """A deep copy of ``doc`` with one to three values replaced, removed or nested."""
    doc = json.loads(json.dumps(doc))
    for _ in range(rng.randint(1, 3)):
        nodes = _nodes(doc)
        path = rng.choice(nodes)
        op = rng.random()
        if op < 0.6:
            doc = _set_at(doc, path, rng.choice(INTERESTING_VALUES))
        elif op < 0.8 and path:
            doc = _del_at(doc, path)
        elif op < 0.9:  # nested: a marker that doc_text expands (a deep value would not survive copying)
            doc = _set_at(doc, path, f"{DEEP}{rng.choice([3, 50, 2000, 100_000])}")
        else:
            node = doc
            for k in path:
                node = node[k]
            if isinstance(node, dict):
                node[rng.choice(["extra", "", "0"])] = rng.choice(INTERESTING_VALUES)
    return doc


def doc_text(doc: Any, rng: random.Random, kind: str = "json") -> str:
    """``doc`` serialized, sometimes with text-level damage (bytes, aliases, duplicate keys, tags)."""
    if kind == "yaml":
        import yaml

        text = yaml.safe_dump(doc, sort_keys=False)
        r = rng.random()
        if r < 0.1:
            text = 'bomb: &a ["x","x","x","x","x","x","x","x"]\n' + "".join(
                f"b{i}: &a{i} [{', '.join(['*' + ('a' if i == 0 else f'a{i - 1}')] * 8)}]\n" for i in range(8)) + text
        elif r < 0.2:
            text = text + text.splitlines()[0] + "\n"  # a duplicate key
        elif r < 0.25:
            text = "name: !!python/object/apply:os.system ['true']\n" + text
    else:
        text = json.dumps(doc)
    text = re.sub(rf'(["\']?){DEEP}(\d+)\1', lambda m: "[" * int(m[2]) + "]" * int(m[2]), text)
    if rng.random() < 0.2:
        text = mutate_bytes(text.encode("utf-8", errors="surrogatepass"), rng).decode("utf-8", errors="replace")
    return text


# -- seeds ------------------------------------------------------------------------------------------

def write_seed_gguf(path: Path, f16: bool = False) -> Path:
    """A micro llama GGUF (one layer, width 8, a 32-wide Q8_0 tensor): small, so a mutant is cheap."""
    from gguf.constants import GGMLQuantizationType as QT
    from gguf.constants import GGUFValueType as VT

    from birdbone.io.gguf_layout import KV, Layout, TensorEntry, write_layout
    from birdbone.io.quantize import quantize_tensor

    rng = np.random.default_rng(0)
    kvs = [KV("general.architecture", VT.STRING, "llama"), KV("general.name", VT.STRING, "seed"),
           KV("llama.block_count", VT.UINT32, 1), KV("llama.embedding_length", VT.UINT32, 8),
           KV("llama.feed_forward_length", VT.UINT32, 32), KV("llama.attention.head_count", VT.UINT32, 2),
           KV("llama.attention.head_count_kv", VT.UINT32, 1), KV("llama.context_length", VT.UINT32, 64),
           KV("tokenizer.ggml.tokens", VT.ARRAY, [f"t{i}" for i in range(16)], VT.STRING),
           KV("tokenizer.ggml.scores", VT.ARRAY, [0.0] * 16, VT.FLOAT32)]
    ftype = QT.F16 if f16 else QT.F32
    arrays = {"token_embd.weight": (rng.standard_normal((16, 8)), ftype), "blk.0.attn_norm.weight": (np.ones(8), QT.F32),
              "blk.0.attn_q.weight": (rng.standard_normal((8, 8)), ftype), "blk.0.ffn_down.weight": (rng.standard_normal((8, 32)), QT.Q8_0),
              "output_norm.weight": (np.ones(8), QT.F32)}
    stored = {}
    for name, (a, t) in arrays.items():
        if t == QT.Q8_0:
            stored[name] = quantize_tensor(a.astype(np.float32), "Q8_0").data.tobytes()
        else:
            stored[name] = a.astype(np.float16 if t == QT.F16 else np.float32).tobytes()
    entries = [TensorEntry(n, tuple(reversed(a.shape)), t) for n, (a, t) in arrays.items()]
    write_layout(path, Layout(kvs, entries), lambda e: [stored[e.name]])
    return path


def write_seed_safetensors(path: Path) -> Path:
    from safetensors.numpy import save_file

    rng = np.random.default_rng(0)
    save_file({"model.embed_tokens.weight": rng.standard_normal((16, 8)).astype(np.float32),
               "model.layers.0.self_attn.q_proj.weight": rng.standard_normal((8, 8)).astype(np.float16),
               "model.norm.weight": np.ones(8, np.float32)}, str(path), metadata={"format": "pt"})
    return path


HF_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 8, "intermediate_size": 32,
             "num_hidden_layers": 1, "num_attention_heads": 2, "num_key_value_heads": 1, "vocab_size": 16, "rms_norm_eps": 1e-5,
             "tie_word_embeddings": True, "torch_dtype": "float32"}


@dataclass
class Seeds:
    """Valid inputs of every kind, made once per campaign (or test module) under ``root``."""

    root: Path

    def build(self) -> "Seeds":
        from birdbone.anatomy.dissect import dissect
        from birdbone.io.imatrix import write_imatrix
        from birdbone.remodel.plan import PLAN_VERSION

        r = self.root
        r.mkdir(parents=True, exist_ok=True)
        write_seed_gguf(r / "seed.gguf")
        write_seed_safetensors(r / "seed.safetensors")
        hf = r / "hf"
        hf.mkdir(exist_ok=True)
        (hf / "config.json").write_text(json.dumps(HF_CONFIG))
        shutil.copy(r / "seed.safetensors", hf / "model.safetensors")
        if not (r / "organs").exists():
            dissect(r / "seed.gguf", r / "organs")
        from birdbone.io.model_file import open_model

        with open_model(r / "seed.gguf") as m:
            mats = {n: t for n, t in m.tensors.items() if len(t.ne) == 2}
        write_imatrix(r / "imatrix.gguf", {n: np.ones((1, t.ne[0]), np.float32) for n, t in mats.items()},
                      {n: np.ones((1, 1), np.float32) for n in mats}, ["seed"], 1, 64)
        (r / "plan.json").write_text(json.dumps({
            "version": PLAN_VERSION, "model": "seed.gguf", "source": "seed.gguf", "source_sha256": "0" * 64, "imatrix": "imatrix.gguf",
            "method": "greedy", "cap_tensor_bytes": 4096, "target": "4.5 bpw", "fixed_bytes": 64, "header_bytes": 512, "n_params": 600,
            "excluded": [], "types": {n: "Q8_0" for n in mats}, "detail": {n: {"bytes": 100} for n in mats}}))
        return self

    def build_runs(self) -> "Seeds":
        """The slow seeds: a finished prune run and a synapse checkpoint, on a tiny model with a tokenizer."""
        import subprocess
        import sys

        from tests.fixtures.tiny import make_tiny_llama

        r = self.root
        if not (r / "prune-run" / "state.json").exists():
            tiny = make_tiny_llama(r / "tiny", hidden=16, intermediate=32, layers=1, heads=2, kv_heads=1)
            text = r / "text.txt"
            text.write_text("the bone is light and the bird is strong. " * 400)
            common = ["--text", str(text)]
            subprocess.run([sys.executable, "-m", "birdbone", "prune", str(tiny.gguf_f32), "--run-dir", str(r / "prune-run"), "-o",
                            str(r / "pruned.gguf"), "--target-density", "0.8", "--score", "magnitude", "--heal-steps", "0", "--type", "F32",
                            "--set", "eval_tokens=128", "--set", "eval_ctx=32", "--set", "calibration_tokens=128", *common], check=True,
                           capture_output=True)
            subprocess.run([sys.executable, "-m", "birdbone", "synapse", "train", "-o", str(r / "synapse-run"), *common,
                            "--set", "steps=2", "--set", "vocab=300", "--set", "batch=2", "--set", "seq=16", "--set", "model.n_layer=1",
                            "--set", "model.n_embd=16", "--set", "model.intermediate=32", "--set", "model.hebbian=true",
                            "--set", "eval_every=2", "--set", "eval_windows=1", "--set", "checkpoint_every=2"], check=True, capture_output=True)
        return self


# -- targets ------------------------------------------------------------------------------------------

def _use_model(path: Path) -> None:
    from birdbone.io.model_file import open_model

    with open_model(path) as m:
        for name in m.tensors:
            m.tensor(name)
        for key in m.metadata:
            m.meta(key)


def _gguf(seeds: Seeds, work: Path, rng: random.Random) -> Callable[[], None]:
    p = work / "m.gguf"
    p.write_bytes(mutate_bytes((seeds.root / "seed.gguf").read_bytes(), rng))
    return lambda: _use_model(p)


def _split_gguf(seeds: Seeds, work: Path, rng: random.Random) -> Callable[[], None]:
    from birdbone.anatomy.assemble import assemble

    shards = sorted(work.glob("s-*.gguf"))
    if not shards:  # the seed split once per work folder: two shards of the seed model
        assemble(seeds.root / "organs", work / "s.gguf", split_max_size=600)
        shards = sorted(work.glob("s-*.gguf"))
        for s in shards:
            shutil.copy(s, s.with_suffix(".seed"))
    for s in shards:
        shutil.copy(s.with_suffix(".seed"), s)
    victim = rng.choice(shards)
    victim.write_bytes(mutate_bytes(victim.read_bytes(), rng))
    return lambda: _use_model(shards[0])


def _safetensors(seeds: Seeds, work: Path, rng: random.Random) -> Callable[[], None]:
    p = work / "m.safetensors"
    raw = (seeds.root / "seed.safetensors").read_bytes()
    if rng.random() < 0.5:  # the JSON header, structurally
        (n,) = struct.unpack("<Q", raw[:8])
        header = doc_text(mutate_doc(json.loads(raw[8:8 + n]), rng), rng).encode("utf-8", errors="surrogatepass")
        raw = struct.pack("<Q", len(header)) + header + raw[8 + n:]
    else:
        raw = mutate_bytes(raw, rng)
    p.write_bytes(raw)
    return lambda: _use_model(p)


def _hf_folder(seeds: Seeds, work: Path, rng: random.Random) -> Callable[[], None]:
    hf = work / "hf"
    shutil.rmtree(hf, ignore_errors=True)
    shutil.copytree(seeds.root / "hf", hf)
    r = rng.random()
    if r < 0.5:
        (hf / "config.json").write_text(doc_text(mutate_doc(HF_CONFIG, rng), rng), errors="surrogatepass")
    elif r < 0.8:
        index = {"metadata": {"total_size": 600}, "weight_map": {"model.norm.weight": "model.safetensors",
                                                                  "model.embed_tokens.weight": "model.safetensors"}}
        (hf / "model.safetensors.index.json").write_text(doc_text(mutate_doc(index, rng), rng), errors="surrogatepass")
    else:
        (hf / "model.safetensors").write_bytes(mutate_bytes((hf / "model.safetensors").read_bytes(), rng))
    return lambda: _use_model(hf)


def _manifest(seeds: Seeds, work: Path, rng: random.Random) -> Callable[[], None]:
    from birdbone.anatomy.assemble import assemble

    organs = work / "organs"
    shutil.rmtree(organs, ignore_errors=True)
    shutil.copytree(seeds.root / "organs", organs)
    if rng.random() < 0.85:
        doc = json.loads((organs / "manifest.json").read_text())
        (organs / "manifest.json").write_text(doc_text(mutate_doc(doc, rng), rng), errors="surrogatepass")
    else:  # an organ file itself
        victim = rng.choice([p for p in organs.rglob("*") if p.is_file() and p.name != "manifest.json"])
        victim.write_bytes(mutate_bytes(victim.read_bytes(), rng))
    out = work / "assembled.gguf"

    def call():
        out.unlink(missing_ok=True)
        assemble(organs, out)
        _use_model(out)
    return call


def _recipe(seeds: Seeds, work: Path, rng: random.Random) -> Callable[[], None]:
    import yaml

    from birdbone.recipe.config import RECIPES, show_recipe

    name = rng.choice(sorted(p.name for p in RECIPES.glob("*.yaml")))
    doc = yaml.safe_load((RECIPES / name).read_text())
    p = work / "r.yaml"
    p.write_text(doc_text(mutate_doc(doc, rng), rng, "yaml"), errors="surrogatepass")
    return lambda: show_recipe(p).as_dict()


def _plan(seeds: Seeds, work: Path, rng: random.Random) -> Callable[[], None]:
    from birdbone.remodel.plan import overrides, read_plan

    p = work / "plan.json"
    p.write_text(doc_text(mutate_doc(json.loads((seeds.root / "plan.json").read_text()), rng), rng), errors="surrogatepass")

    def call():
        plan = read_plan(p)
        overrides(plan.types)
        _ = plan.tensor_bytes, plan.bits_per_weight
    return call


def _imatrix(seeds: Seeds, work: Path, rng: random.Random) -> Callable[[], None]:
    from birdbone.io.imatrix import read_imatrix

    p = work / "im.gguf"
    p.write_bytes(mutate_bytes((seeds.root / "imatrix.gguf").read_bytes(), rng))

    def call():
        im = read_imatrix(p)
        for v in im.values.values():
            np.asarray(v, np.float32).sum()
    return call


def _mutate_folder(src: Path, dst: Path, rng: random.Random) -> None:
    """A copy of the folder ``src`` with one of its files damaged (a JSON document structurally, any file as bytes)."""
    shutil.rmtree(dst, ignore_errors=True)
    shutil.copytree(src, dst)
    victim = rng.choice(sorted(p for p in dst.rglob("*") if p.is_file()))
    if victim.suffix == ".json" and rng.random() < 0.7:
        victim.write_text(doc_text(mutate_doc(json.loads(victim.read_text()), rng), rng), errors="surrogatepass")
    elif victim.suffix == ".jsonl" and rng.random() < 0.7:
        lines = victim.read_text().splitlines()
        i = rng.randrange(len(lines))
        lines[i] = doc_text(mutate_doc(json.loads(lines[i]), rng), rng)
        victim.write_text("\n".join(lines) + "\n", errors="surrogatepass")
    else:
        victim.write_bytes(mutate_bytes(victim.read_bytes(), rng))


def _run_folder(seeds: Seeds, work: Path, rng: random.Random) -> Callable[[], None]:
    from birdbone.recipe.runs import revert_run
    from birdbone.remodel.report import read_metrics

    run = work / "run"
    _mutate_folder(seeds.root / "prune-run", run, rng)
    out = work / "reverted.gguf"

    def call():
        out.unlink(missing_ok=True)
        read_metrics(run)
        revert_run(run, out, to_wave=rng.choice([0, 1]), out_type="F32")
        _use_model(out)
    return call


def _synapse_checkpoint(seeds: Seeds, work: Path, rng: random.Random) -> Callable[[], None]:
    from birdbone.synapse.evaluate import load_run

    run = work / "syn"
    _mutate_folder(seeds.root / "synapse-run", run, rng)
    return lambda: load_run(run)


TARGETS: dict[str, Callable[[Seeds, Path, random.Random], Callable[[], None]]] = {
    "gguf": _gguf, "split gguf": _split_gguf, "safetensors": _safetensors, "imatrix": _imatrix, "recipe": _recipe, "plan": _plan,
    "hf folder": _hf_folder, "organ folder": _manifest, "run folder": _run_folder, "synapse checkpoint": _synapse_checkpoint,
}
FOLDER_TARGETS = {"hf folder", "organ folder", "run folder", "synapse checkpoint"}  # ≥ 10k inputs in the campaign; the others ≥ 100k
NEEDS_RUNS = {"run folder", "synapse checkpoint"}  # their seeds take a minute: Seeds.build_runs


def judge(call: Callable[[], None]) -> tuple[str, str | None]:
    """(outcome, detail) of one input: clean, accepted, or other (with the exception's type)."""
    from birdbone.io.errors import BirdboneError
    from birdbone.io.inputs import input_scope

    try:
        with input_scope():
            call()
    except BirdboneError as e:
        msg = str(e)
        if "\n" in msg or len(msg) > 2000:
            return "other", f"BirdboneError of {len(msg)} characters over {msg.count(chr(10)) + 1} lines"
        return "clean", None
    except MemoryError:
        return "other", "MemoryError"
    except Exception as e:  # noqa: BLE001 - the defect being counted
        return "other", f"{type(e).__name__}: {str(e)[:200]}"
    return "accepted", None


def run_target(name: str, seeds: Seeds, work: Path, seed: int, n: int, start: int = 0,
               on_input: Callable[[int], None] | None = None, on_result: Callable[[int, str, str | None], None] | None = None) -> dict:
    """Inputs ``start .. start+n`` of target ``name`` (input i is mutated from ``random.Random(seed, i)``):
    the count per outcome and the first examples of ``other``."""
    counts = {"clean": 0, "accepted": 0, "other": 0}
    others: dict[str, int] = {}
    examples: list[dict] = []
    work.mkdir(parents=True, exist_ok=True)
    for i in range(start, start + n):
        if on_input:
            on_input(i)
        rng = random.Random(f"{seed}-{name}-{i}")
        try:
            call = TARGETS[name](seeds, work, rng)
        except Exception:  # noqa: BLE001 - a mutator that cannot write its input is skipped, and counted
            counts.setdefault("unwritable", 0)
            counts["unwritable"] += 1
            if on_result:
                on_result(i, "unwritable", None)
            continue
        outcome, detail = judge(call)
        if on_result:
            on_result(i, outcome, detail)
        counts[outcome] += 1
        if outcome == "other":
            kind = detail.split(":")[0]
            others[kind] = others.get(kind, 0) + 1
            if len(examples) < 20:
                examples.append({"input": i, "detail": detail})
    return {"counts": counts, "other_by_type": others, "examples": examples, "pid": os.getpid()}


def _selftest(seeds: Seeds, work: Path, rng: random.Random) -> Callable[[], None]:
    """The watchdog's own check: this target crashes on one input and hangs on another."""
    i = int(rng.random() * 10)

    def call():
        if i == 3:
            os.abort()
        if i == 6:
            import time

            time.sleep(3600)
    return call


if os.environ.get("BIRDBONE_FUZZ_SELFTEST"):
    TARGETS["selftest"] = _selftest
