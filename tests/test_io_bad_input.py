"""Bad files fail fast with an InputError that names the file and the problem.

Never an IndexError / ValueError / UnicodeDecodeError / struct.error from deep inside a
parser, never seconds spent on a count the file cannot hold, never an unpickled checkpoint.
Raw GGUFs are crafted byte by byte (:func:`gguf_bytes`) or patched from the tiny fixture.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import struct
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader
from gguf.constants import GGMLQuantizationType as QT
from gguf.constants import GGUFValueType as VT
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from birdbone.io.errors import InputError
from birdbone.io.model_file import open_model
from tests.fixtures.tiny import expected_gguf, write_llama_gguf

FAST_S = 1.0


def expect_input_error(path: Path, *needles: str, any_of: tuple[str, ...] = ()) -> InputError:
    """open_model(path) raises InputError within FAST_S naming ``path`` and every needle."""
    t0 = time.perf_counter()
    with pytest.raises(InputError) as ei:
        open_model(path).close()
    elapsed = time.perf_counter() - t0
    msg = str(ei.value)
    assert str(path) in msg and ei.value.path == str(path), msg
    for n in needles:
        assert n in msg, f"{n!r} not in {msg!r}"
    if any_of:
        assert any(n in msg for n in any_of), f"none of {any_of} in {msg!r}"
    assert elapsed < FAST_S, f"{elapsed:.2f}s: {msg}"
    return ei.value


# -- raw GGUF bytes -------------------------------------------------------------------------------

def s(b: bytes | str) -> bytes:
    b = b.encode() if isinstance(b, str) else b
    return struct.pack("<Q", len(b)) + b


def kv(key: bytes | str, vtype: int, payload: bytes) -> bytes:
    return s(key) + struct.pack("<I", vtype) + payload


def ti(name: bytes | str, ne: tuple[int, ...], qtype: int, offset: int) -> bytes:
    return s(name) + struct.pack("<I", len(ne)) + b"".join(struct.pack("<Q", d) for d in ne) + struct.pack("<I", qtype) + struct.pack("<Q", offset)


ARCH = kv("general.architecture", VT.STRING, s("llama"))
F32_T = ti("t", (8,), QT.F32, 0)


def gguf_bytes(kvs: list[bytes], tis: list[bytes], data: bytes = b"\0" * 32, version: int = 3,
               n_kv: int | None = None, n_tensors: int | None = None, alignment: int = 32) -> bytes:
    head = b"GGUF" + struct.pack("<IQQ", version, len(tis) if n_tensors is None else n_tensors, len(kvs) if n_kv is None else n_kv)
    body = head + b"".join(kvs) + b"".join(tis)
    return body + b"\0" * ((-len(body)) % alignment) + data


def write(tmp_path: Path, name: str, data: bytes) -> Path:
    p = tmp_path / name
    p.write_bytes(data)
    return p


def test_raw_builder_makes_a_valid_gguf(tmp_path):
    data = np.arange(8, dtype=np.float32).tobytes()
    p = write(tmp_path, "ok.gguf", gguf_bytes([ARCH], [F32_T], data))
    with open_model(p) as m:
        assert m.architecture == "llama" and list(m.tensors) == ["t"]
        np.testing.assert_array_equal(m.tensor("t"), np.arange(8, dtype=np.float32))


# -- not a model at all -----------------------------------------------------------------------------

def test_missing_file(tmp_path):
    expect_input_error(tmp_path / "nope.gguf", "no such file")
    expect_input_error(tmp_path / "nope" / "model.safetensors", "no such file")


@pytest.mark.parametrize("name", ["notes.txt", "model.gguf", "weights"])
def test_text_file(tmp_path, name):
    p = write(tmp_path, name, b"hello, I am not a model\n" * 10)
    expect_input_error(p, "unknown model format")


@pytest.mark.parametrize("name,needle", [("empty.gguf", "unknown model format"), ("empty", "unknown model format"),
                                         ("empty.safetensors", "too short")])
def test_empty_file(tmp_path, name, needle):
    expect_input_error(write(tmp_path, name, b""), needle)


def test_json_file_is_not_a_model(tiny):
    expect_input_error(tiny.hf_dir / "config.json", "JSON file is not a model")


def test_folder_named_like_a_gguf(tmp_path):
    (tmp_path / "x.gguf").mkdir()
    expect_input_error(tmp_path / "x.gguf", "no config.json")


# -- truncated GGUF -------------------------------------------------------------------------------------

def _layout(path: Path) -> dict[str, int]:
    r = GGUFReader(path)
    ti_start = min(t.field.offset for t in r.tensors)
    data_start = min(t.data_offset for t in r.tensors)
    data_end = max(t.data_offset + t.n_bytes for t in r.tensors)
    return {"ti_start": ti_start, "data_start": data_start, "data_end": data_end}


N_CUTS = 50


@pytest.fixture(scope="module")
def cut_points(tiny) -> list[int]:
    """~50 prefix lengths: inside the header, the metadata, the tensor infos and the tensor data."""
    lay = _layout(tiny.gguf_f32)
    pts = {0, 1, 3, 4, 5, 8, 12, 16, 20, 23, 24, 25, 31, 32,
           lay["ti_start"] - 1, lay["ti_start"], lay["ti_start"] + 1,
           lay["data_start"] - 1, lay["data_start"], lay["data_start"] + 1, lay["data_end"] - 1}
    pts |= {int(x) for x in np.linspace(33, lay["ti_start"] - 2, 14)}
    pts |= {int(x) for x in np.linspace(lay["ti_start"] + 2, lay["data_start"] - 2, 7)}
    pts |= {int(x) for x in np.linspace(lay["data_start"] + 2, lay["data_end"] - 2, 8)}
    # cuts inside the padding after the last tensor leave a complete file: not a truncation
    pts = sorted(p for p in pts if p < lay["data_end"])
    assert 45 <= len(pts) <= N_CUTS, len(pts)
    return pts


@pytest.mark.parametrize("i", range(N_CUTS))
def test_truncated_gguf(tiny, cut_points, tmp_path, i):
    if i >= len(cut_points):
        pytest.skip("fewer distinct cut points")
    n = cut_points[i]
    p = write(tmp_path, f"cut{n}.gguf", tiny.gguf_f32.read_bytes()[:n])
    if n < 4:
        expect_input_error(p, "unknown model format")
    elif n < 24:
        expect_input_error(p, f"not a GGUF file: only {n} bytes")
    else:
        expect_input_error(p, any_of=("truncated", "corrupt"))


def test_truncated_f16_gguf_tensor_data(tiny, tmp_path):
    lay = _layout(tiny.gguf_f16)
    for n in (lay["data_start"] + 100, lay["data_end"] - 1):
        p = write(tmp_path, f"cut{n}.gguf", tiny.gguf_f16.read_bytes()[:n])
        expect_input_error(p, "truncated GGUF: tensor", f"file has {n}")


# -- GGUF headers and metadata that lie ----------------------------------------------------------------

def _patched(tiny, tmp_path: Path, name: str, offset: int, fmt: str, value) -> Path:
    data = bytearray(tiny.gguf_f32.read_bytes())
    struct.pack_into(fmt, data, offset, value)
    return write(tmp_path, name, bytes(data))


def _counts(tiny) -> tuple[int, int]:
    return struct.unpack_from("<QQ", tiny.gguf_f32.read_bytes(), 8)


@pytest.mark.parametrize("n_tensors,n_kv", [
    (2**64 - 1, None), (None, 2**64 - 1), (2**40, 2**40), (2**63, 0), (10**6, None), (None, 10**6),
])
def test_absurd_header_counts(tiny, tmp_path, n_tensors, n_kv):
    t, k = _counts(tiny)
    data = bytearray(tiny.gguf_f32.read_bytes())
    struct.pack_into("<QQ", data, 8, t if n_tensors is None else n_tensors, k if n_kv is None else n_kv)
    expect_input_error(write(tmp_path, "counts.gguf", bytes(data)), "corrupt GGUF header", "claims")


@pytest.mark.parametrize("dt,dk", [(1, 0), (2, 0), (50, 0), (0, 1), (0, -1), (0, 200)])
def test_wrong_but_plausible_header_counts(tiny, tmp_path, dt, dk):
    """Counts the file could hold, but wrong: the parser walks into the wrong section and must say so.

    (One tensor too few cannot be detected: the last info is then read as the start of the data.)"""
    t, k = _counts(tiny)
    data = bytearray(tiny.gguf_f32.read_bytes())
    struct.pack_into("<QQ", data, 8, t + dt, k + dk)
    expect_input_error(write(tmp_path, "counts.gguf", bytes(data)), any_of=("corrupt", "truncated", "unknown"))


def test_zero_counts_opens_nothing_then_complains(tiny, tmp_path):
    data = bytearray(tiny.gguf_f32.read_bytes())
    struct.pack_into("<QQ", data, 8, 0, 0)
    expect_input_error(write(tmp_path, "zero.gguf", bytes(data)), "no general.architecture")


def _offset_after(data: bytes, key: str) -> int:
    """Byte offset just after the key string ``key`` (at its value type)."""
    i = data.index(s(key))
    return i + len(s(key))


@pytest.mark.parametrize("where", ["first key", "arch value", "token count", "first token", "tensor name", "chat template"])
@pytest.mark.parametrize("length", [2**63, 2**40, 10**7])
def test_absurd_string_lengths(tiny, tmp_path, where, length):
    raw = tiny.gguf_f32.read_bytes()
    if where == "first key":
        off, fmt = 24, "<Q"
    elif where == "arch value":
        off, fmt = _offset_after(raw, "general.architecture") + 4, "<Q"
    elif where == "token count":
        off, fmt = _offset_after(raw, "tokenizer.ggml.tokens") + 8, "<Q"  # after type and item type
    elif where == "first token":
        off, fmt = _offset_after(raw, "tokenizer.ggml.tokens") + 16, "<Q"
    elif where == "tensor name":
        off, fmt = _layout(tiny.gguf_f32)["ti_start"], "<Q"
    else:
        off, fmt = _offset_after(raw, "tokenizer.chat_template") + 4, "<Q"
    p = _patched(tiny, tmp_path, "len.gguf", off, fmt, length)
    expect_input_error(p, any_of=("truncated", "corrupt"))


@pytest.mark.parametrize("where,vtype", [("arch type", 99), ("arch type", 13), ("arch type", 2**32 - 1),
                                         ("tokens item type", 77), ("tokens item type", 9)])
def test_unknown_value_types(tiny, tmp_path, where, vtype):
    raw = tiny.gguf_f32.read_bytes()
    off = _offset_after(raw, "general.architecture" if where == "arch type" else "tokenizer.ggml.tokens")
    if where == "tokens item type":
        off += 4
    p = _patched(tiny, tmp_path, "vtype.gguf", off, "<I", vtype)
    if vtype == 9:
        expect_input_error(p, "nested array", "tokenizer.ggml.tokens")
    else:
        expect_input_error(p, f"unknown value type {vtype}")


def test_bad_version(tiny, tmp_path):
    for v in (0, 1, 4, 2**31):
        expect_input_error(_patched(tiny, tmp_path, f"v{v}.gguf", 4, "<I", v), f"unsupported GGUF version {v}")


def test_bad_magic(tiny, tmp_path):
    data = b"GGUX" + tiny.gguf_f32.read_bytes()[4:]
    expect_input_error(write(tmp_path, "magic.gguf", data), "unknown model format")


def test_missing_architecture(tiny, tmp_path):
    raw = tiny.gguf_f32.read_bytes()
    p = write(tmp_path, "noarch.gguf", raw.replace(b"general.architecture", b"general.architectur_", 1))
    expect_input_error(p, "no general.architecture")


def test_tensor_type_and_shape_lies(tiny, tmp_path):
    raw = tiny.gguf_f32.read_bytes()
    ti_start = _layout(tiny.gguf_f32)["ti_start"]
    (name_len,) = struct.unpack_from("<Q", raw, ti_start)
    name = raw[ti_start + 8 : ti_start + 8 + name_len].decode()
    ndims_at = ti_start + 8 + name_len
    (n_dims,) = struct.unpack_from("<I", raw, ndims_at)
    type_at = ndims_at + 4 + 8 * n_dims
    expect_input_error(_patched(tiny, tmp_path, "a.gguf", type_at, "<I", 1234), f"tensor {name!r} has unknown type 1234")
    expect_input_error(_patched(tiny, tmp_path, "b.gguf", ndims_at, "<I", 0), "has 0 dimensions")
    expect_input_error(_patched(tiny, tmp_path, "c.gguf", ndims_at, "<I", 7), "has 7 dimensions")
    expect_input_error(_patched(tiny, tmp_path, "d.gguf", ndims_at + 4, "<Q", 2**50), "claims shape")
    expect_input_error(_patched(tiny, tmp_path, "e.gguf", ndims_at + 4, "<Q", 2**30), "truncated GGUF: tensor")
    expect_input_error(_patched(tiny, tmp_path, "f.gguf", type_at + 4, "<Q", 2**40), "llama.cpp expects 0")
    # F32 -> Q4_K: 64 is not a multiple of the 256-wide block
    expect_input_error(_patched(tiny, tmp_path, "g.gguf", type_at, "<I", int(QT.Q4_K)), "not a multiple of the Q4_K block")


@pytest.mark.parametrize("tis, data, needle", [
    ([ti("a", (8,), QT.F32, 0), ti("b", (8,), QT.F32, 0)], 64, "'b' has data offset 0, llama.cpp expects 32"),  # overlap
    ([ti("a", (8,), QT.F32, 0), ti("b", (8,), QT.F32, 36)], 96, "'b' has data offset 36"),  # unaligned
    ([ti("a", (8,), QT.F32, 32), ti("b", (8,), QT.F32, 0)], 64, "'a' has data offset 32"),  # out of order
    ([ti("a", (8,), QT.F32, 0), ti("b", (8,), QT.F32, 64)], 96, "'b' has data offset 64"),  # a gap
    ([ti("n" * 64, (8,), QT.F32, 0)], 32, "64 bytes or longer"),
    ([ti("z", (8, 0), QT.F32, 0)], 32, "claims shape"),
])
def test_gguf_reader_keeps_llama_cpps_rules(tmp_path, tis, data, needle):
    """What llama.cpp refuses at load is refused at open (a dissection of it would not reassemble)."""
    expect_input_error(write(tmp_path, "x.gguf", gguf_bytes([ARCH], tis, b"\0" * data)), needle)


def test_a_gguf_of_63_byte_names_and_plain_number_types_opens(tmp_path):
    tis = [ti("n" * 63, (8,), QT.F32, 0), ti("i", (8,), QT.I32, 32), ti("d", (8,), QT.F64, 64), ti("q", (32,), QT.Q8_1, 128)]
    # 32 + 32 + 64 bytes packed at 0, 32, 64; one Q8_1 block (40 bytes) at 128
    data = np.ones(8, np.float32).tobytes() + np.arange(8, dtype=np.int32).tobytes() + np.full(8, -2.5).tobytes() + b"\0" * 40
    with open_model(write(tmp_path, "x.gguf", gguf_bytes([ARCH], tis, data))) as m:
        np.testing.assert_array_equal(m.tensor("i"), np.arange(8, dtype=np.float32))
        np.testing.assert_array_equal(m.tensor("d"), np.full(8, -2.5, np.float32))
        with pytest.raises(InputError, match="Q8_1 cannot be read as numbers"):
            m.tensor("q")


@pytest.mark.parametrize("case,needle", [
    ("duplicate key", "duplicate metadata key 'general.architecture'"),
    ("duplicate tensor", "duplicate tensor name 't'"),
    ("key not utf-8", "is not UTF-8"),
    ("tensor name not utf-8", "is not UTF-8"),
    ("nested array", "nested array in 'x'"),
    ("alignment 3", "alignment 3 is not a power of two"),
    ("alignment 0", "alignment 0 is not a power of two"),
    ("array too long", "claims"),
    ("scalar array too long", "array 'x'"),
    ("truncated scalar", "value of 'x'"),
    pytest.param("alignment string", "alignment"),
    pytest.param("alignment array", "alignment"),
])
def test_crafted_gguf(tmp_path, case, needle):
    u32 = lambda v: struct.pack("<I", v)  # noqa: E731
    kvs, tis = [ARCH], [F32_T]
    if case == "duplicate key":
        kvs = [ARCH, ARCH]
    elif case == "duplicate tensor":
        tis = [F32_T, ti("t", (8,), QT.F32, 32)]
    elif case == "key not utf-8":
        kvs = [ARCH, kv(b"bad\xff\xfekey", VT.UINT32, u32(1))]
    elif case == "tensor name not utf-8":
        tis = [ti(b"t\xc3", (8,), QT.F32, 0)]
    elif case == "nested array":
        kvs = [ARCH, kv("x", VT.ARRAY, u32(VT.ARRAY) + struct.pack("<Q", 1))]
    elif case.startswith("alignment "):
        val = case.split()[1]
        payload = {"3": (VT.UINT32, u32(3)), "0": (VT.UINT32, u32(0)), "string": (VT.STRING, s("abc")),
                   "array": (VT.ARRAY, u32(VT.UINT32) + struct.pack("<Q", 1) + u32(32))}[val]
        kvs = [ARCH, kv("general.alignment", *payload)]
    elif case == "array too long":
        kvs = [ARCH, kv("x", VT.ARRAY, u32(VT.STRING) + struct.pack("<Q", 2**20) + s("a"))]
    elif case == "scalar array too long":
        kvs = [ARCH, kv("x", VT.ARRAY, u32(VT.FLOAT64) + struct.pack("<Q", 2**20))]
    elif case == "truncated scalar":
        p = write(tmp_path, "c.gguf", b"GGUF" + struct.pack("<IQQ", 3, 0, 2) + ARCH + kv("x", VT.UINT64, b"\1\2"))
        expect_input_error(p, needle)
        return
    p = write(tmp_path, "c.gguf", gguf_bytes(kvs, tis, b"\0" * 64))
    expect_input_error(p, needle)


def test_split_gguf_missing_shard(tiny, tmp_path):
    files = write_llama_gguf(tmp_path / "tiny.gguf", tiny, expected_gguf(tiny), f16=False, split_max_tensors=12)
    files[1].unlink()
    expect_input_error(files[0], "missing shard", "tiny-00002-of-00002.gguf")


# -- random corruption -----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_bytes(tiny) -> tuple[bytes, int, int]:
    lay = _layout(tiny.gguf_f32)
    return tiny.gguf_f32.read_bytes(), lay["ti_start"], lay["data_start"]


@settings(max_examples=150, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(data=st.data())
def test_random_byte_flips(tiny_bytes, data):
    raw, ti_start, data_start = tiny_bytes
    region = data.draw(st.sampled_from(["head", "tensor infos"]))
    lo, hi = (0, 2048) if region == "head" else (ti_start, data_start)
    flips = data.draw(st.lists(st.tuples(st.integers(lo, hi - 1), st.integers(0, 255)), min_size=1, max_size=8))
    buf = bytearray(raw)
    for pos, val in flips:
        buf[pos] = val
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "flipped.gguf"
        p.write_bytes(bytes(buf))
        t0 = time.perf_counter()
        try:
            with open_model(p) as m:
                for f in m.metadata.values():
                    f.get()  # lazy arrays must load too
                for name, info in m.tensors.items():
                    if info.type in ("F32", "F16"):
                        assert m.tensor(name).shape == info.shape
            event("opened")
        except InputError as e:
            assert str(p) in str(e)
            event("InputError")
        assert time.perf_counter() - t0 < 2.0


# -- safetensors -------------------------------------------------------------------------------------

def safetensors_bytes(header, data: bytes = b"", declared: int | None = None) -> bytes:
    h = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(h) if declared is None else declared) + h + data


W8 = {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}


def _named(rows: list, name=lambda values: values[0]) -> list:
    """pytest params whose ids are the case names (not reprs of headers and bytes)."""
    out = []
    for r in rows:
        r = r if hasattr(r, "marks") else pytest.param(*r)
        out.append(r._replace(id=str(name(r.values))))
    return out


@pytest.mark.parametrize("case,header,data,needle", _named([
    ("too short", None, b"\1\2\3", "too short"),
    ("header longer than file", {"w": W8}, b"\0" * 8, "header claims"),
    ("absurd header length", None, b"{}" + b"\0" * 16, "header claims"),
    ("not json", b"{this is not json", b"", "corrupt safetensors header"),
    ("not utf-8", b'{"\xff\xfe": 1}', b"", "corrupt safetensors header"),
    ("empty header", b"", b"\0" * 8, "corrupt safetensors header"),
    ("entry not an object", {"w": 5}, b"", "corrupt safetensors header entry for 'w'"),
    ("entry missing dtype", {"w": {"shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8, "header entry for 'w'"),
    ("shape not a list", {"w": {**W8, "shape": "ab"}}, b"\0" * 8, "header entry for 'w'"),
    ("three offsets", {"w": {**W8, "data_offsets": [0, 4, 8]}}, b"\0" * 8, "header entry for 'w'"),
    ("unknown dtype", {"w": {**W8, "dtype": "F8_E4M3"}}, b"\0" * 8, "unsupported dtype F8_E4M3"),
    ("data outside file", {"w": {**W8, "data_offsets": [0, 800]}}, b"\0" * 8, "lies outside the file"),
    ("reversed offsets", {"w": {**W8, "data_offsets": [8, 0]}}, b"\0" * 8, "lies outside the file"),
    pytest.param("header is a list", [1, 2], b"", "header"),
    pytest.param("string offsets", {"w": {**W8, "data_offsets": ["0", "8"]}}, b"\0" * 8, "'w'"),
    pytest.param("dtype not a string", {"w": {**W8, "dtype": ["F32"]}}, b"\0" * 8, "'w'"),
    pytest.param("shape disagrees with bytes", {"w": {**W8, "shape": [4, 4]}}, b"\0" * 8, "'w'"),
    pytest.param("negative dim", {"w": {**W8, "shape": [-2]}}, b"\0" * 8, "'w'"),
]))
def test_corrupt_safetensors(tmp_path, case, header, data, needle):
    if case == "too short":
        raw = data
    elif case == "absurd header length":
        raw = safetensors_bytes(b"", data, declared=2**62)
    elif case == "header longer than file":
        raw = safetensors_bytes(header, data, declared=len(json.dumps(header)) + 100)
    else:
        raw = safetensors_bytes(header, data)
    p = write(tmp_path, "w.safetensors", raw)
    expect_input_error(p, needle)


def test_truncated_model_safetensors(tiny, tmp_path):
    raw = tiny.safetensors.read_bytes()
    (hlen,) = struct.unpack_from("<Q", raw)
    for n in (4, 8, 8 + hlen // 2, 8 + hlen, len(raw) - 1):
        p = write(tmp_path, f"cut{n}.safetensors", raw[:n])
        expect_input_error(p, any_of=("too short", "header claims", "truncated safetensors"))


# -- Hugging Face folders and indexes -----------------------------------------------------------------

def test_folder_without_config(tiny, tmp_path):
    d = tmp_path / "noconfig"
    d.mkdir()
    shutil.copy(tiny.safetensors, d / "model.safetensors")
    expect_input_error(d, "no config.json")


def test_folder_with_config_but_no_weights(tiny, tmp_path):
    d = tmp_path / "noweights"
    d.mkdir()
    shutil.copy(tiny.hf_dir / "config.json", d / "config.json")
    expect_input_error(d, "no .safetensors weights")


@pytest.mark.parametrize("content,needle", [
    ("{not json", "invalid JSON"),
    (b"\xff\xfe{}", "is not UTF-8"),
    pytest.param("[1, 2]", "config.json"),
])
def test_bad_config_json(tiny, tmp_path, content, needle):
    d = tmp_path / "badconfig"
    d.mkdir()
    shutil.copy(tiny.safetensors, d / "model.safetensors")
    (d / "config.json").write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(InputError) as ei:
        open_model(d).close()
    assert "config.json" in str(ei.value) and needle in str(ei.value)


@pytest.mark.parametrize("index,needle", _named([
    ({"metadata": {}}, "no weight_map"),
    ([1, 2], "no weight_map"),
    ({"weight_map": {}}, "no weight_map"),
    ({"weight_map": {"w": "missing.safetensors"}}, "missing shard: missing.safetensors"),
    ({"weight_map": {"w": "../outside.safetensors"}}, "outside its folder"),
    ("{broken", "invalid JSON"),
    pytest.param({"weight_map": {"w": 5}}, "weight_map"),
], name=lambda v: json.dumps(v[0]) if not isinstance(v[0], str) else v[0]))
def test_bad_safetensors_index(tiny, tmp_path, index, needle):
    d = tmp_path / "idx"
    d.mkdir()
    shutil.copy(tiny.hf_dir / "config.json", d / "config.json")
    (tmp_path / "outside.safetensors").write_bytes(tiny.safetensors.read_bytes())
    p = d / "model.safetensors.index.json"
    p.write_text(index if isinstance(index, str) else json.dumps(index))
    expect_input_error(p, needle)
    with pytest.raises(InputError, match="index"):  # the folder reports the same index
        open_model(d).close()


class _Bomb:
    """Pickles to a call of os.mkdir(marker): unpickling it leaves a trace."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def _pickle_folder(tmp_path: Path, with_config: bool, tiny) -> tuple[Path, Path]:
    d = tmp_path / "pickled"
    d.mkdir()
    marker = tmp_path / "UNPICKLED"
    (d / "pytorch_model.bin").write_bytes(pickle.dumps({"w": _Bomb(marker)}))
    if with_config:
        shutil.copy(tiny.hf_dir / "config.json", d / "config.json")
    return d, marker


def test_pickle_bomb_is_live(tmp_path):
    """The payload used below really runs code when unpickled (so its absence means something)."""
    marker = tmp_path / "armed"
    pickle.loads(pickle.dumps(_Bomb(marker)))
    assert marker.is_dir()


def test_folder_with_pytorch_bin_refuses_to_unpickle(tiny, tmp_path):
    d, marker = _pickle_folder(tmp_path, with_config=True, tiny=tiny)
    expect_input_error(d, "pytorch_model.bin", "pickled checkpoints are never loaded")
    expect_input_error(d / "pytorch_model.bin", "never unpickles")
    assert not marker.exists()


def test_folder_with_only_pytorch_bin_and_no_config_says_why(tiny, tmp_path):
    d, marker = _pickle_folder(tmp_path, with_config=False, tiny=tiny)
    try:
        expect_input_error(d, "pytorch_model.bin", "pickle")
    finally:
        assert not marker.exists()
