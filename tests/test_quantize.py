"""llama.cpp's quantizer through birdbone: whole files and single tensors, types read back."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from gguf import quants as gq
from gguf.constants import GGMLQuantizationType as T

from birdbone.io import open_model
from birdbone.io.errors import BirdboneError, InputError
from birdbone.io.imatrix import read_imatrix, write_imatrix
from birdbone.io.quantize import parse_tensor_types, quantize_file, quantize_tensor
from birdbone.io.types import legal_type, tensor_type
from tests.fixtures import assert_llama_cpp_uses_imatrix


def written_types(path) -> dict[str, str]:
    with open_model(path) as m:
        return {n: t.type for n, t in m.tensors.items()}


# -- single tensors ---------------------------------------------------------------------------
@pytest.mark.parametrize("qtype", [T.Q8_0, T.Q4_0, T.Q5_0])
def test_quantize_tensor_bit_exact_with_gguf_py(qtype):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((8, 256)).astype(np.float32)
    x[0, :32] = 0.0  # an all-zero block
    x[1] *= 1e-3  # tiny scales
    ours = quantize_tensor(x, qtype)
    ref = gq.quantize(x, qtype)
    assert ours.type == qtype and not ours.fell_back
    assert ours.data.tobytes() == np.ascontiguousarray(ref).tobytes()


def test_quantize_tensor_roundtrip_error_shrinks_with_bits():
    x = np.random.default_rng(1).standard_normal((16, 512)).astype(np.float32)
    errs = {t: float(np.abs(quantize_tensor(x, t).dequantize() - x).mean()) for t in ("Q2_K", "Q4_K", "Q6_K", "Q8_0")}
    assert errs["Q2_K"] > errs["Q4_K"] > errs["Q6_K"] > errs["Q8_0"] > 0
    assert errs["Q8_0"] < 0.01


def test_quantize_tensor_falls_back_like_llama_cpp(caplog):
    x = np.random.default_rng(2).standard_normal((4, 576)).astype(np.float32)
    with caplog.at_level(logging.WARNING):
        q = quantize_tensor(x, "Q4_K", name="w576")
    assert q.type == T.Q5_0 and q.fell_back
    assert "w576" in caplog.text and "Q5_0" in caplog.text
    assert quantize_tensor(x, "Q6_K").type == T.Q8_0
    assert quantize_tensor(x, "Q2_K").type == T.Q4_0
    # a width that even 32-blocks cannot take becomes F16, as in llama.cpp
    assert quantize_tensor(np.ones((2, 40), np.float32), "Q4_K").type == T.F16
    assert legal_type(T.Q4_K, 1536) == T.Q4_K


def test_quantize_tensor_checks_imatrix():
    x = np.random.default_rng(3).standard_normal((4, 256)).astype(np.float32)
    with pytest.raises(BirdboneError, match="needs an importance matrix"):
        quantize_tensor(x, "IQ2_XXS")
    with pytest.raises(BirdboneError, match="importance matrix has 10 values"):
        quantize_tensor(x, "Q4_K", imatrix=np.ones(10))
    imat = np.random.default_rng(4).random(256).astype(np.float32) + 0.1
    weighted = quantize_tensor(x, "Q4_K", imatrix=imat)
    assert weighted.data.tobytes() != quantize_tensor(x, "Q4_K").data.tobytes()
    assert quantize_tensor(x, "IQ2_XXS", imatrix=imat).type == T.IQ2_XXS
    with pytest.raises(BirdboneError, match="NaN"):
        quantize_tensor(np.full((1, 32), np.nan, np.float32), "Q8_0")


def test_type_names():
    assert tensor_type("q6_k") == T.Q6_K
    with pytest.raises(BirdboneError, match="unknown tensor type"):
        tensor_type("Q7_K")
    with pytest.raises(BirdboneError, match="PATTERN=TYPE"):
        parse_tensor_types(["ffn_down"])
    with pytest.raises(BirdboneError, match="bad regex"):
        parse_tensor_types(["(=Q8_0"])


# -- whole files ------------------------------------------------------------------------------
def test_quantize_file_types_overrides_and_dry_run(tiny_k, tmp_path):
    out = tmp_path / "q4km.gguf"
    dry = quantize_file(tiny_k.gguf_f16, None, "Q4_K_M", tensor_types=["ffn_down=Q8_0", "attn_v=Q6_K"], dry_run=True)
    res = quantize_file(tiny_k.gguf_f16, out, "Q4_K_M", tensor_types=["ffn_down=Q8_0", "attn_v=Q6_K"])
    types = written_types(out)
    assert res.types == types == dry.types
    assert dry.tensor_bytes == res.tensor_bytes
    assert abs(dry.file_bytes - res.file_bytes) < 4096
    for name, t in types.items():
        if name.endswith("norm.weight"):
            assert t == "F32"
        elif "ffn_down" in name:
            assert t == "Q8_0"
        elif "attn_v" in name:
            assert t == "Q6_K"
    assert {types["blk.0.attn_q.weight"], types["blk.0.ffn_up.weight"]} <= {"Q4_K", "Q5_K", "Q6_K"}
    assert not res.fallbacks  # 256-wide rows take K-quants


def test_quantize_file_reports_fallbacks(tiny, tmp_path):
    res = quantize_file(tiny.gguf_f16, tmp_path / "q.gguf", "Q4_K_M")  # 64-wide rows: no K-quants
    types = written_types(tmp_path / "q.gguf")
    assert res.fallbacks and all("falling back" in f for f in res.fallbacks)
    assert "Q4_K" not in types.values() and "Q5_0" in types.values()


def test_quantize_file_with_imatrix(tiny_k, tmp_path):
    rng = np.random.default_rng(5)
    with open_model(tiny_k.gguf_f16) as m:
        names = [n for n, t in m.tensors.items() if len(t.shape) == 2 and n != "token_embd.weight"]
        widths = {n: m.tensors[n].shape[-1] for n in names}
    sums = {n: (rng.random((1, widths[n])) * 10 + 1).astype(np.float32) for n in names}
    counts = {n: np.array([[10.0]], np.float32) for n in names}
    path = tmp_path / "imatrix.gguf"
    write_imatrix(path, sums, counts, ["test"], 1, 512)
    im = read_imatrix(path)
    assert set(im.values) == set(names)
    np.testing.assert_allclose(im.values[names[0]], sums[names[0]][0] / 10, rtol=1e-6)
    assert_llama_cpp_uses_imatrix(tiny_k.gguf_f16, path, tmp_path)


def test_legacy_imatrix_is_read(tmp_path):
    import struct

    vals = np.arange(1, 9, dtype=np.float32) * 3
    blob = struct.pack("<i", 1) + struct.pack("<i", 4) + b"w.ab" + struct.pack("<ii", 3, 8) + vals.tobytes()
    blob += struct.pack("<i", 7) + struct.pack("<i", 4) + b"wiki"
    (tmp_path / "im.dat").write_bytes(blob)
    im = read_imatrix(tmp_path / "im.dat")
    np.testing.assert_allclose(im.values["w.ab"], vals / 3)
    assert im.chunk_count == 7 and im.datasets == ["wiki"]
    (tmp_path / "bad.dat").write_bytes(b"\x01\x00")
    with pytest.raises(InputError, match="not an imatrix file"):
        read_imatrix(tmp_path / "bad.dat")


def test_quantize_file_refuses_bad_requests(tiny, tmp_path):
    with pytest.raises(BirdboneError, match="unknown llama.cpp file type"):
        quantize_file(tiny.gguf_f16, tmp_path / "x.gguf", "Q7_K_M")
    with pytest.raises(InputError, match="same file as an input"):
        quantize_file(tiny.gguf_f16, tiny.gguf_f16, "Q8_0")
    with pytest.raises(InputError, match="quantizes GGUF"):
        quantize_file(tiny.hf_dir, tmp_path / "x.gguf", "Q8_0")
    assert not (tmp_path / "x.gguf").exists()


@pytest.mark.builtin
def test_builtin_q4_k_m_falls_back_on_width_576(tmp_path):
    res = quantize_file("builtin", tmp_path / "q.gguf", "Q4_K_M")
    types = written_types(tmp_path / "q.gguf")
    assert res.types == types
    k_tensors = {n for n, t in types.items() if t in ("Q4_K", "Q5_K", "Q6_K")}
    assert k_tensors and all("ffn_down" in n for n in k_tensors)  # only the 1536-wide rows take K-quants
    assert len(res.fallbacks) == 180
