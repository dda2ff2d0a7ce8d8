"""Dissect -> assemble is byte-identical; edits show exactly where they were made; grafts are
checked before they are written and carry their provenance."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest

from birdbone.anatomy.assemble import assemble, parse_size
from birdbone.anatomy.dissect import dissect
from birdbone.anatomy.graft import GraftRefused, graft
from birdbone.anatomy.manifest import load_manifest
from birdbone.anatomy.validate import validate
from birdbone.io import open_model
from birdbone.io.errors import BirdboneError, InputError
from birdbone.io.quantize import quantize_file


def sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def folder_bytes(folder) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def test_dissect_assemble_is_byte_identical(tiny_k, tmp_path):
    organs = tmp_path / "organs"
    manifest = dissect(tiny_k.gguf_f16, organs)
    assert {p.name for p in organs.iterdir()} == {"skeleton", "organs", "embed", "norm", "adapter", "other", "manifest.json"}
    assert manifest["source"]["sha256"] == sha(tiny_k.gguf_f16)
    with open_model(tiny_k.gguf_f16) as m:
        assert [t["name"] for t in manifest["tensors"]] == list(m.tensors)
        tensor_bytes = m.tensor_bytes
        for t in manifest["tensors"]:
            assert (organs / t["file"]).read_bytes() == m.raw(t["name"]).tobytes()
    # the folder is the tensor bytes plus the manifest: no hidden copy of the source
    assert folder_bytes(organs) == tensor_bytes + (organs / "manifest.json").stat().st_size
    roles = {t["name"]: t["role"] for t in manifest["tensors"]}
    assert roles["blk.0.attn_q.weight"] == "skeleton" and roles["blk.1.ffn_down.weight"] == "organ"
    assert roles["token_embd.weight"] == "embed" and roles["output_norm.weight"] == "norm"
    out = tmp_path / "back.gguf"
    res = assemble(organs, out)
    assert sha(out) == sha(tiny_k.gguf_f16) and not res.edited
    v = validate(out, tiny_k.gguf_f16)
    assert v.logits_equal_source and v.n_tokens == 8


def test_edits_differ_exactly_where_made(tiny_k, tmp_path):
    edit_and_check(tiny_k.gguf_f16, tmp_path, "blk.1.ffn_up.weight", "llama.rope.freq_base", 20000.0)


def edit_and_check(src, tmp_path, tensor, key, value):
    """Zero the first 64 bytes of one tensor file and change one float32 metadata value."""
    organs = tmp_path / "organs"
    dissect(src, organs)
    m = load_manifest(organs)
    entry = m.by_name[tensor]
    f = organs / entry["file"]
    data = bytearray(f.read_bytes())
    data[:64] = bytes(64)  # F16: the first 32 weights; Q4_1: the first blocks (scale 0)
    f.write_bytes(bytes(data))
    with pytest.raises(InputError, match="sha256 differs"):
        assemble(organs, tmp_path / "refused.gguf")
    assert not (tmp_path / "refused.gguf").exists()
    manifest = json.loads((organs / "manifest.json").read_text())
    for kv in manifest["metadata"]:
        if kv["key"] == key:
            old = kv["value"]
            kv["value"] = value
    (organs / "manifest.json").write_text(json.dumps(manifest))
    out = tmp_path / "edited.gguf"
    res = assemble(organs, out, accept_edits=True)
    assert res.edited == [tensor]
    with open_model(src) as a, open_model(out) as b:
        assert b.meta(key) == value and a.meta(key) == old
        for name in a.tensors:
            same = a.raw(name).tobytes() == b.raw(name).tobytes()
            assert same == (name != tensor), name
        diff = np.flatnonzero(a.raw(tensor) != b.raw(tensor))
        assert diff.max() < 64
    before, after = src.read_bytes(), out.read_bytes()
    assert len(before) == len(after)
    changed = np.flatnonzero(np.frombuffer(before, np.uint8) != np.frombuffer(after, np.uint8))
    assert len(changed) <= 64 + 4  # the zeroed bytes and the four bytes of the float32 key
    validate(out)


def test_split_assembly_loads_in_llama_cpp(tiny_k, tmp_path):
    organs = tmp_path / "organs"
    dissect(tiny_k.gguf_f16, organs)
    res = assemble(organs, tmp_path / "split.gguf", split_max_size=600_000)
    assert len(res.outputs) >= 2 and res.outputs[0].name.endswith("-00001-of-%05d.gguf" % len(res.outputs))
    with open_model(res.outputs[0]) as m, open_model(tiny_k.gguf_f16) as src:
        assert list(m.tensors) == list(src.tensors)
        for n in src.tensors:
            assert m.raw(n).tobytes() == src.raw(n).tobytes()
    validate(res.outputs[0], tiny_k.gguf_f16)
    assert parse_size("2G") == 2 * 2**30 and parse_size("512M") == 512 * 2**20


@pytest.mark.parametrize("damage, message", [
    ("missing", "is missing"),
    ("resize", "bytes; its type"),
    ("escape", "leaves the organ folder"),
    ("duplicate", "listed twice"),
])
def test_bad_manifest(tiny, tmp_path, damage, message):
    organs = tmp_path / "organs"
    dissect(tiny.gguf_f16, organs)
    manifest = json.loads((organs / "manifest.json").read_text())
    t = manifest["tensors"][3]
    if damage == "missing":
        (organs / t["file"]).unlink()
    elif damage == "resize":
        (organs / t["file"]).write_bytes(b"\0" * 10)
    elif damage == "escape":
        t["file"] = "../../etc/passwd"
    elif damage == "duplicate":
        manifest["tensors"].append(dict(t))
    (organs / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match=message):
        assemble(organs, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_dissect_refuses_non_empty_output(tiny, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    with pytest.raises(InputError, match="not empty"):
        dissect(tiny.gguf_f16, tmp_path / "full")
    assert (tmp_path / "full" / "keep.txt").read_text() == "mine"


def test_graft_same_type_and_undo(tiny_k, tmp_path):
    donor = tmp_path / "donor.gguf"
    # a donor: the same model with its layer-1 FFN scaled (written through dissect/assemble edits)
    organs = tmp_path / "d"
    dissect(tiny_k.gguf_f16, organs)
    m = load_manifest(organs)
    for name in ("blk.1.ffn_up.weight", "blk.1.ffn_gate.weight", "blk.1.ffn_down.weight"):
        f = m.file_of(name)
        w = np.frombuffer(f.read_bytes(), np.float16) * np.float16(1.5)
        f.write_bytes(w.astype(np.float16).tobytes())
    assemble(organs, donor, accept_edits=True)
    out = tmp_path / "chimera.gguf"
    res = graft(tiny_k.gguf_f16, donor, out, layers="1", roles=["organ"])
    assert sorted(res.tensors) == ["blk.1.ffn_down.weight", "blk.1.ffn_gate.weight", "blk.1.ffn_up.weight"]
    assert all(s > 0.5 for s in res.changed_share.values())
    with open_model(out) as c, open_model(tiny_k.gguf_f16) as b, open_model(donor) as d:
        for n in b.tensors:
            want = d if n in res.tensors else b
            assert c.raw(n).tobytes() == want.raw(n).tobytes(), n
        assert c.meta("birdbone.graft.base_sha256") == sha(tiny_k.gguf_f16)
        assert list(c.meta("birdbone.graft.tensors")) == res.tensors
    validate(out)
    # undo from the base: graft the base's tensors back
    undone = tmp_path / "undone.gguf"
    graft(out, tiny_k.gguf_f16, undone, tensors="|".join(res.tensors).replace(".", r"\."))
    with open_model(undone) as u, open_model(tiny_k.gguf_f16) as b:
        assert all(u.raw(n).tobytes() == b.raw(n).tobytes() for n in b.tensors)
    # organ folders work as donors too
    res2 = graft(tiny_k.gguf_f16, organs, tmp_path / "from-folder.gguf", layers="1", roles=["organ"])
    assert res2.tensors == res.tensors


def test_graft_convert_reports_changed_codes(tiny_k, tmp_path):
    q = tmp_path / "q8.gguf"
    quantize_file(tiny_k.gguf_f16, q, "Q8_0")
    with pytest.raises(GraftRefused, match="type base Q8_0, donor F16"):
        graft(q, tiny_k.gguf_f16, tmp_path / "x.gguf", roles=["skeleton"], layers="0")
    assert not (tmp_path / "x.gguf").exists()
    res = graft(q, tiny_k.gguf_f16, tmp_path / "c.gguf", roles=["skeleton"], layers="0", convert=True)
    assert set(res.converted) == set(res.tensors) and len(res.tensors) == 4
    # the F16 donor is the Q8_0 base's own source: requantizing it lands on the same codes
    assert all(v == 0.0 for v in res.converted.values())
    with open_model(tmp_path / "c.gguf") as c:
        assert c.tensors["blk.0.attn_q.weight"].type == "Q8_0"
    validate(tmp_path / "c.gguf")


def test_graft_refuses_incompatible_bodies(tiny, tiny_k, tmp_path):
    with pytest.raises(GraftRefused) as e:
        graft(tiny.gguf_f16, tiny_k.gguf_f16, tmp_path / "x.gguf", layers="0")
    msg = str(e.value)
    assert "llama.embedding_length" in msg and "shape base" in msg
    with pytest.raises(BirdboneError, match="the model has layers 0-1"):
        graft(tiny.gguf_f16, tiny.gguf_f32, tmp_path / "x.gguf", layers="5-20")
    with pytest.raises(BirdboneError, match="matches no donor tensor"):
        graft(tiny.gguf_f16, tiny.gguf_f32, tmp_path / "x.gguf", tensors="nothing_like_this")
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.builtin
def test_builtin_dissect_assemble_identical(tmp_path, builtin_path):
    organs = tmp_path / "organs"
    dissect("builtin", organs)
    out = tmp_path / "back.gguf"
    assemble(organs, out)
    assert sha(out) == sha(builtin_path)
    validate(out, builtin_path)
    shutil.rmtree(organs)
    out.unlink()
    edit_and_check(builtin_path, tmp_path, "blk.10.ffn_up.weight", "llama.rope.freq_base", 50000.0)
