"""Inputs made to hurt: special files, documents nested or expanded past reason, values no config
holds. Each is a one-line :class:`InputError` naming the file, before any real work."""

from __future__ import annotations

import json
import os
import shutil
import threading

import pytest

from birdbone.io.errors import BirdboneError

DEEP_JSON = "[" * 100_000 + "]" * 100_000
# nine anchors, each nine times the one before: 369 bytes that expand to 9**9 strings
ALIAS_BOMB = 'name: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]\n' + "".join(
    f"x{i}: &{chr(98 + i)} [{', '.join(['*' + chr(97 + i)] * 9)}]\n" for i in range(8)) + "description: *i\n"


def one_line(e: BaseException) -> str:
    assert isinstance(e, BirdboneError) and "\n" not in str(e), repr(e)
    return str(e)


def refused(call, *needles: str) -> str:
    """``call()`` must raise a one-line BirdboneError holding every needle, and within 30 s (a hang fails)."""
    box: dict = {}

    def run():
        try:
            call()
            box["error"] = AssertionError("accepted")
        except BaseException as e:  # noqa: BLE001 - judged below
            box["error"] = e

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(30)
    assert not t.is_alive(), "hung"
    msg = one_line(box["error"])
    assert all(n in msg for n in needles), msg
    return msg


@pytest.fixture
def organs(tiny, tmp_path):
    from birdbone.anatomy.dissect import dissect

    dissect(tiny.gguf_f16, tmp_path / "organs")
    return tmp_path / "organs"


def readers(tiny, tmp_path):
    """(name, file a reader opens, the call) for every reader of a small document or a weights file."""
    from birdbone.anatomy.manifest import load_manifest
    from birdbone.io.model_file import open_model
    from birdbone.io.run_folder import read_run
    from birdbone.recipe.config import load_recipe
    from birdbone.remodel.plan import read_plan

    hf = tmp_path / "hf"
    shutil.copytree(tiny.hf_dir, hf)
    (tmp_path / "run").mkdir()
    (tmp_path / "organs").mkdir()
    return {
        "config.json": (hf / "config.json", lambda: open_model(hf).close()),
        "model.safetensors": (hf / "model.safetensors", lambda: open_model(hf).close()),
        "GGUF": (tmp_path / "m.gguf", lambda: open_model(tmp_path / "m.gguf").close()),
        "manifest.json": (tmp_path / "organs" / "manifest.json", lambda: load_manifest(tmp_path / "organs")),
        "plan.json": (tmp_path / "plan.json", lambda: read_plan(tmp_path / "plan.json")),
        "recipe": (tmp_path / "r.yaml", lambda: load_recipe(tmp_path / "r.yaml")),
        "run.json": (tmp_path / "run" / "run.json", lambda: read_run(tmp_path / "run")),
    }


@pytest.mark.parametrize("reader", ["config.json", "model.safetensors", "GGUF", "manifest.json", "plan.json", "recipe", "run.json"])
@pytest.mark.parametrize("kind", ["fifo", "/dev/zero", "folder"])
def test_a_special_file_is_refused_not_read(tiny, tmp_path, reader, kind):
    path, call = readers(tiny, tmp_path)[reader]
    path.unlink(missing_ok=True)
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "folder":
        path.mkdir()
    else:
        path.symlink_to("/dev/zero")
    msg = refused(call, str(path))
    # a folder's file that is a link to /dev/zero leads outside it: refused by the folder policy first
    assert ("folder" if kind == "folder" else "not a regular file") in msg or (kind == "/dev/zero" and "leads outside" in msg), msg


@pytest.mark.parametrize("reader", ["config.json", "manifest.json", "plan.json", "run.json"])
def test_json_nested_too_deep_is_a_clean_error(tiny, tmp_path, reader):
    path, call = readers(tiny, tmp_path)[reader]
    path.write_text(DEEP_JSON)
    refused(call, str(path), "nested too deep")


def test_a_safetensors_header_nested_too_deep(tmp_path):
    from birdbone.io.model_file import open_model

    header = DEEP_JSON.encode()
    path = tmp_path / "m.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header)
    refused(lambda: open_model(path), str(path), "nested too deep")


@pytest.mark.parametrize("text, needle", [
    (ALIAS_BOMB, "expands to more than"),
    ("name: a\nname: b\n", "appears twice"),
    ("name: a\n1: b\n", "keys are names"),
    ("name: [" * 3000 + "]" * 3000 + "\n", "not valid YAML"),
    ("verify:\n  max_dppl_pct: .nan\n", "finite number"),
    ("verify:\n  holdout: .inf\n", "finite number"),
    ("name: " + "x" * 500_000 + "\n", "at most 4,096"),
    ("name: " + "x" * (2**20 + 10) + "\n", "too big"),
])
def test_hostile_recipes(tmp_path, text, needle):
    from birdbone.recipe.config import load_recipe

    path = tmp_path / "r.yaml"
    path.write_text(text)
    msg = refused(lambda: load_recipe(path), str(path), needle)
    assert len(msg) < 400  # no expanded value is ever printed whole


def test_recipe_not_utf8_and_set_values_are_checked(tmp_path):
    from birdbone.recipe.config import load_recipe

    path = tmp_path / "r.yaml"
    path.write_bytes(b"name: caf\xe9\n")
    refused(lambda: load_recipe(path), str(path), "not UTF-8")
    refused(lambda: load_recipe("gentle", ["verify.holdout=nan"]), "finite number")


def test_nul_byte_in_a_path():
    from birdbone.io.atomic import check_output
    from birdbone.io.model_file import open_model

    refused(lambda: open_model("model\0.gguf"), "NUL byte")
    refused(lambda: check_output("out\0.gguf"), "NUL byte")


def test_a_plan_of_the_wrong_shape(tmp_path):
    from birdbone.remodel.plan import read_plan

    path = tmp_path / "plan.json"
    for doc in ([], {"version": "x"}, {"types": []}):
        path.write_text(json.dumps(doc))
        refused(lambda: read_plan(path), str(path))


def _set(path: tuple, value):
    def mutate(d):
        node = d
        for k in path[:-1]:
            node = node[k]
        node[path[-1]] = value
    return mutate


def _drop(path: tuple):
    def mutate(d):
        node = d
        for k in path[:-1]:
            node = node[k]
        del node[path[-1]]
    return mutate


def _alignment_0(d):
    found = [m for m in d["metadata"] if m["key"] == "general.alignment"]
    if found:
        found[0]["value"] = 0
    else:
        d["metadata"].append({"key": "general.alignment", "type": "UINT32", "item_type": None, "value": 0})


MANIFEST_FORGERIES = {
    "tensors not a list": _set(("tensors",), {}),
    "metadata not a list": _set(("metadata",), "x"),
    "gguf missing": _drop(("gguf",)),
    "gguf version a string": _set(("gguf", "version"), "3"),
    "gguf version 7": _set(("gguf", "version"), 7),
    "tail huge": _set(("gguf", "tail"), 10**15),
    "tail negative": _set(("gguf", "tail"), -1),
    "metadata entry a list": _set(("metadata", 0), []),
    "metadata key missing": _drop(("metadata", 0, "key")),
    "metadata value missing": _drop(("metadata", 0, "value")),
    "metadata value of the wrong type": _set(("metadata", 0, "value"), {"a": 1}),
    "metadata type unknown": _set(("metadata", 0, "type"), "FLOAT128"),
    "alignment 0": _alignment_0,
    "tensor entry a string": _set(("tensors", 0), "x"),
    "tensor name missing": _drop(("tensors", 0, "name")),
    "tensor name a number": _set(("tensors", 0, "name"), 7),
    "tensor name of 64 bytes": _set(("tensors", 0, "name"), "n" * 64),
    "tensor type unknown": _set(("tensors", 0, "type"), "Q9_9"),
    "ne floats": _set(("tensors", 0, "ne"), [64.0, 64.0]),
    "ne negative": _set(("tensors", 0, "ne"), [-64, 64]),
    "ne zero": _set(("tensors", 0, "ne"), [0, 64]),
    "ne empty": _set(("tensors", 0, "ne"), []),
    "ne of 2^63": _set(("tensors", 0, "ne"), [2**63, 1]),
    "ne product wraps": _set(("tensors", 0, "ne"), [2**40, 2**40]),
    "ne five dims": _set(("tensors", 0, "ne"), [1, 1, 1, 1, 1]),
    "offset 2^40": _set(("tensors", 1, "offset"), 2**40),
    "offset a string": _set(("tensors", 0, "offset"), "0"),
    "file a number": _set(("tensors", 0, "file"), 3),
    "file outside": _set(("tensors", 0, "file"), "../../etc/passwd"),
}


@pytest.mark.parametrize("forgery", MANIFEST_FORGERIES)
def test_forged_manifests_are_one_line_errors(organs, tmp_path, forgery):
    from birdbone.anatomy.assemble import assemble
    from birdbone.anatomy.manifest import load_manifest

    path = organs / "manifest.json"
    data = json.loads(path.read_text())
    MANIFEST_FORGERIES[forgery](data)
    path.write_text(json.dumps(data))
    refused(lambda: load_manifest(organs), str(path))
    refused(lambda: assemble(organs, tmp_path / "out.gguf"))
    assert not (tmp_path / "out.gguf").exists()


def test_a_manifest_bytes_field_is_not_trusted(organs, tmp_path):
    """``bytes: 10**15`` once read as "not enough disk space"; the size comes from type and shape."""
    from birdbone.anatomy.assemble import assemble

    path = organs / "manifest.json"
    data = json.loads(path.read_text())
    data["tensors"][0]["bytes"] = 10**15
    path.write_text(json.dumps(data))
    assert assemble(organs, tmp_path / "out.gguf").outputs == [tmp_path / "out.gguf"]


@pytest.fixture(scope="module")
def aborting(tiny, tmp_path_factory):
    """The tiny model with llama.block_count 0, which llama.cpp's loader answers with GGML_ASSERT
    (SIGABRT, the process gone); our reader accepts it, as a header it is well formed."""
    from birdbone.io.gguf_layout import layout_of, write_layout
    from birdbone.io.gguf_reader import GGUFFile

    out = tmp_path_factory.mktemp("abort") / "layers0.gguf"
    with GGUFFile(tiny.gguf_f16) as f:
        layout = layout_of(f)
        next(kv for kv in layout.kvs if kv.key == "llama.block_count").value = 0
        write_layout(out, layout, lambda t: [bytes(f.buf[f.tensors[t.name].offset:][:f.tensors[t.name].n_bytes])])
    return out


@pytest.mark.parametrize("verb", [["quantize", "-o", "{tmp}/q.gguf", "--type", "Q8_0"], ["generate", "--prompt", "hi", "-n", "2"],
                                  ["eval", "--tokens", "64", "--ctx", "32"], ["dissect-assemble"], ["dissect-assemble", "--no-validate"],
                                  ["dissect-graft", "--no-validate"]])
def test_a_file_llama_cpp_aborts_on_is_a_one_line_error(aborting, tmp_path, verb):
    from tests.test_cli import birdbone

    if verb[0].startswith("dissect-"):  # the file is written by us from a user's organ folder, then evaluated
        birdbone("dissect", aborting, "-o", tmp_path / "organs")
        text = tmp_path / "t.txt"
        text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
        write = (["assemble", tmp_path / "organs"] if verb[0] == "dissect-assemble" else
                 ["graft", "--base", tmp_path / "organs", "--donor", aborting, "--tensors", "output_norm.weight"])
        p = birdbone(*write, "-o", tmp_path / "a.gguf", *verb[1:], "--text", text, check=False)
    else:
        p = birdbone(verb[0], aborting, *[a.format(tmp=tmp_path) for a in verb[1:]], check=False)
    lines = [line for line in p.stderr.splitlines() if line.strip()]
    assert p.returncode == 2 and len(lines) == 1, p.stderr[-2000:]
    assert "llama.cpp aborts on this file" in lines[0] and "n_layer" in lines[0]


def test_a_folder_file_that_leads_outside_is_refused_but_the_hf_cache_layout_opens(tiny, tmp_path):
    """The symlink policy (io/inputs.folder_member): a folder's files stay inside it, except a
    Hugging Face cache snapshot's links into its own blob store."""
    from birdbone.io.model_file import open_model

    outside = tmp_path / "elsewhere.safetensors"
    shutil.copy(tiny.hf_dir / "model.safetensors", outside)
    hf = tmp_path / "hf"
    shutil.copytree(tiny.hf_dir, hf)
    (hf / "model.safetensors").unlink()
    (hf / "model.safetensors").symlink_to(outside)
    refused(lambda: open_model(hf), "leads outside it")

    repo = tmp_path / "hub" / "models--org--tiny"
    snap, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for f in tiny.hf_dir.iterdir():
        if f.is_file():
            shutil.copy(f, blobs / f"sha-{f.name}")
            (snap / f.name).symlink_to(f"../../blobs/sha-{f.name}")
    with open_model(snap) as m:
        assert m.n_params > 0 and all(snap in p.parents for p in m.files)


@pytest.mark.parametrize("patch", [{"cap_tensor_bytes": "ten"}, {"types": {"a": 3}}, {"detail": {"a": 3}}, {"detail": []}, {"excluded": 3},
                                   {"n_params": 1.5}, {"imatrix": [1]}, {"types": {"a": "Q8_0"}, "model": None}])
def test_plan_values_of_the_wrong_type(tmp_path, patch):
    from birdbone.remodel.plan import PLAN_VERSION, read_plan

    doc = {"version": PLAN_VERSION, "model": "m", "source": "s", "source_sha256": "x", "imatrix": None, "method": "greedy",
           "cap_tensor_bytes": 10, "target": "t", "fixed_bytes": 0, "header_bytes": 0, "n_params": 5, "excluded": [], "types": {"a": "Q8_0"}}
    path = tmp_path / "p.json"
    path.write_text(json.dumps(doc))
    assert read_plan(path).types == {"a": "Q8_0"}
    doc.update(patch)
    path.write_text(json.dumps({k: v for k, v in doc.items() if v is not None or k == "imatrix"}))
    refused(lambda: read_plan(path), str(path))


def _imatrix_with(tmp_path, kv=None, counts_rows: int = 1):
    """A one-entry GGUF imatrix, with one metadata value replaced (key, GGUF type, value)."""
    import numpy as np
    from gguf.constants import GGMLQuantizationType, GGUFValueType

    from birdbone.io.gguf_layout import KV, Layout, TensorEntry, write_layout

    kvs = [KV("general.type", GGUFValueType.STRING, "imatrix"), KV("imatrix.datasets", GGUFValueType.ARRAY, ["t"], GGUFValueType.STRING),
           KV("imatrix.chunk_count", GGUFValueType.UINT32, 1), KV("imatrix.chunk_size", GGUFValueType.UINT32, 64)]
    if kv:
        kvs = [k for k in kvs if k.key != kv[0]] + [KV(kv[0], kv[1], kv[2], GGUFValueType.INT32 if kv[1] == GGUFValueType.ARRAY else None)]
    arrays = {"w.in_sum2": np.ones((1, 10), np.float32), "w.counts": np.ones((counts_rows, 1), np.float32)}
    entries = [TensorEntry(n, tuple(reversed(a.shape)), GGMLQuantizationType.F32) for n, a in arrays.items()]
    path = tmp_path / "im.gguf"
    write_layout(path, Layout(kvs, entries), lambda e: [arrays[e.name].tobytes()])
    return path


def test_imatrix_metadata_of_the_wrong_type_or_shape(tmp_path):
    from gguf.constants import GGUFValueType

    from birdbone.io.imatrix import read_imatrix

    assert read_imatrix(_imatrix_with(tmp_path)).chunk_count == 1
    for kv in [("imatrix.datasets", GGUFValueType.ARRAY, [1, 2]), ("imatrix.datasets", GGUFValueType.UINT32, 3),
               ("imatrix.chunk_count", GGUFValueType.STRING, "many"), ("imatrix.chunk_size", GGUFValueType.FLOAT32, 1.5)]:
        path = _imatrix_with(tmp_path, kv)
        refused(lambda: read_imatrix(path), str(path))
    path = _imatrix_with(tmp_path, counts_rows=3)  # 10 sums do not split into 3 rows
    refused(lambda: read_imatrix(path), "cannot split")


@pytest.mark.parametrize("shape", [[2**63, 1], [2**40, 2**40, 2**40], [True, 4]])
def test_safetensors_dimensions_that_overflow(tmp_path, shape):
    from birdbone.io.model_file import open_model

    header = json.dumps({"t": {"dtype": "F32", "shape": shape, "data_offsets": [0, 16]}}).encode()
    path = tmp_path / "m.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" * 16)
    refused(lambda: open_model(path), str(path))


def test_a_path_the_file_system_refuses(tmp_path):
    """A 300-character name (the fuzzer's find, from a damaged run's config.json): one line, not OSError."""
    from birdbone.io.model_file import open_model

    refused(lambda: open_model(tmp_path / ("x" * 300)), "not a usable path")


@pytest.fixture(scope="module")
def finished_runs(tiny, tmp_path_factory):
    """A finished prune run and a synapse run of the tiny model, to damage and resume."""
    from tests.kill_targets import PRUNE_SETS, SYNAPSE_SETS
    from tests.test_cli import birdbone

    root = tmp_path_factory.mktemp("runs")
    birdbone("prune", tiny.gguf_f32, *PRUNE_SETS, "--run-dir", root / "prune", "-o", root / "p.gguf")
    birdbone("synapse", "train", *SYNAPSE_SETS, "-o", root / "syn")
    return root


# (run, file, its damaged text): resuming must say which file is damaged, in one line
DAMAGED_STATES = {
    "prune state not an object": ("prune", "state.json", "[1, 2]"),
    "prune waves a string": ("prune", "state.json", '{"waves": "2", "phase": "done", "breaches": 0, "rollback_left": 0, "rollback_of": 0}'),
    "prune waves a boolean": ("prune", "state.json", '{"waves": true, "phase": "done", "breaches": 0, "rollback_left": 0, "rollback_of": 0}'),
    "prune phase missing": ("prune", "state.json", '{"waves": 2, "breaches": 0, "rollback_left": 0, "rollback_of": 0}'),
    "prune metrics line garbage": ("prune", "metrics.jsonl", '{"wave": 0}\nnot json\n'),
    "prune metrics row without its wave": ("prune", "metrics.jsonl", '{"density": 1.0}\n'),
    "synapse step a string": ("syn", "state.json", '{"step": "4"}'),
}


@pytest.mark.parametrize("case", DAMAGED_STATES)
def test_resuming_a_damaged_run_folder_is_one_line(finished_runs, tiny, tmp_path, case):
    from typer.testing import CliRunner

    from birdbone.cli import app
    from tests.kill_targets import PRUNE_SETS, SYNAPSE_SETS

    run, name, text = DAMAGED_STATES[case]
    shutil.copytree(finished_runs / run, tmp_path / run)
    (tmp_path / run / name).write_text(text)
    argv = (["prune", str(tiny.gguf_f32), *PRUNE_SETS, "--run-dir", str(tmp_path / run), "-o", str(tmp_path / "p.gguf")] if run == "prune"
            else ["synapse", "train", *SYNAPSE_SETS, "-o", str(tmp_path / run)])
    r = CliRunner().invoke(app, argv)
    assert isinstance(r.exception, BirdboneError) and "\n" not in str(r.exception), (r.exception, r.output[-2000:])
    assert "damaged or was edited" in str(r.exception) and not (tmp_path / "p.gguf").exists()
