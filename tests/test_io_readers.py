"""open_model on every format birdbone reads, checked against the weights that were written.

The tiny fixtures (tests/fixtures/tiny.py) are the reference: an HF folder saved by
transformers, and GGUFs written by gguf-py in llama.cpp's layout. The first section checks
the fixtures themselves against llama.cpp and transformers, so the rest can trust them.
"""

from __future__ import annotations

import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import pytest
from gguf import GGUFReader, GGUFWriter
from gguf.constants import GGUFValueType
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from birdbone.bridge.names import permute_qk
from birdbone.io.gguf_reader import LazyArray
from birdbone.io.model_file import ModelFile, open_model
from tests.fixtures.tiny import (
    CHATML_TEMPLATE, RMS_EPS, expected_gguf, gguf_vocab, hf_state, make_tiny_llama, write_llama_gguf,
)

SENTENCES = [
    "To be, or not to be: that is the question.",
    "Whether 'tis nobler in the mind to suffer (the slings) 123 4567!",
    "  two  spaces\tand a tab\n\nnew lines... héllo wörld 日本 🎉 it's we'll",
]


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp q/k rows -> Hugging Face order: the inverse of permute_qk (n_head = heads of that matrix)."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def stored(arr: np.ndarray, f16: bool) -> np.ndarray:
    """What the fixture GGUF stores for ``arr``: 2-D weights as F16 when ``f16``, the rest F32."""
    return arr.astype(np.float16) if f16 and arr.ndim == 2 else arr.astype(np.float32)


# -- the fixtures themselves, against llama.cpp and transformers ----------------------------------

def test_permute_qk_inverse_roundtrip():
    rng = np.random.default_rng(0)
    for n_head, rows in [(4, 64), (2, 32), (8, 256)]:
        w = rng.standard_normal((rows, 12)).astype(np.float32)
        p = permute_qk(w, n_head)
        assert not np.array_equal(p, w)
        np.testing.assert_array_equal(unpermute_qk(p, n_head), w)


def test_fixture_gguf_names(tiny):
    """The fixture names tensors with birdbone's hf_to_gguf_name: check it against llama.cpp's names."""
    from birdbone.bridge.names import hf_to_gguf_name

    assert hf_to_gguf_name("llama", 2, "model.embed_tokens.weight") == "token_embd.weight"
    assert hf_to_gguf_name("llama", 2, "model.layers.1.self_attn.q_proj.weight") == "blk.1.attn_q.weight"
    assert hf_to_gguf_name("llama", 2, "model.layers.0.post_attention_layernorm.weight") == "blk.0.ffn_norm.weight"
    assert hf_to_gguf_name("llama", 2, "model.norm.weight") == "output_norm.weight"
    assert hf_to_gguf_name("llama", 2, "lm_head.weight") == "output.weight"
    per_layer = ["attn_norm", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_norm", "ffn_gate", "ffn_up", "ffn_down"]
    want = {"token_embd.weight", "output_norm.weight"} | {f"blk.{i}.{t}.weight" for i in range(tiny.layers) for t in per_layer}
    assert set(expected_gguf(tiny)) == want


def test_tiny_tokenizer_files(tiny):
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tiny.tokenizer_json))
    assert 400 <= tok.get_vocab_size() <= 600 and tok.get_vocab_size() == tiny.vocab
    assert [tok.token_to_id(s) for s in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [0, 1, 2]
    cfg = json.loads((tiny.hf_dir / "tokenizer_config.json").read_text())
    assert cfg["chat_template"] == CHATML_TEMPLATE and cfg["bos_token"] == "<|endoftext|>" and cfg["eos_token"] == "<|im_end|>"
    for s in SENTENCES:
        assert tok.decode(tok.encode(s).ids) == s  # byte-level: lossless


def test_fixture_is_deterministic_and_untied_works(tiny, tmp_path):
    """Same seed, same bytes; an untied model gets output.weight and still matches transformers."""
    import torch
    from transformers import AutoModelForCausalLM

    from birdbone.io.runtime import LlamaRuntime

    again = make_tiny_llama(tmp_path / "again")
    for a, b in [(tiny.gguf_f32, again.gguf_f32), (tiny.gguf_f16, again.gguf_f16), (tiny.safetensors, again.safetensors),
                 (tiny.tokenizer_json, again.tokenizer_json)]:
        assert a.read_bytes() == b.read_bytes(), a.name
    untied = make_tiny_llama(tmp_path / "untied", tie_embeddings=False)
    with open_model(untied.gguf_f32) as m:
        assert "output.weight" in m.tensors and m.tensors["output.weight"].shape == (untied.vocab, untied.hidden)
    ids = np.arange(3, 35)
    hf = AutoModelForCausalLM.from_pretrained(str(untied.hf_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.tensor(ids[None])).logits[0].numpy()
    with LlamaRuntime(untied.gguf_f32, n_ctx=64) as rt:
        assert np.abs(rt.logits(ids) - ref).max() < 2e-3 * np.abs(ref).max()


def test_hf_tokenizer_loads_with_chat_template(tiny):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(tiny.hf_dir))
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|endoftext|>", "<|im_end|>", "<|endoftext|>")
    text = tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("which", ["gguf_f32", "gguf_f16"])
def test_llama_cpp_tokenizes_like_tokenizers(tiny, which):
    from tokenizers import Tokenizer

    from birdbone.io.runtime import LlamaRuntime

    tok = Tokenizer.from_file(str(tiny.tokenizer_json))
    with LlamaRuntime(getattr(tiny, which), n_ctx=128) as rt:
        assert rt.n_vocab == tiny.vocab and not rt.add_bos and rt.bos == 0
        assert rt.is_eog(2) and not rt.is_eog(1)
        for s in SENTENCES:
            ids = rt.tokenize(s, add_special=False)
            assert ids.tolist() == tok.encode(s).ids, s
            assert rt.detokenize(ids) == s
        # specials are parsed only when asked, as in the chat path
        assert rt.tokenize("<|im_start|>user", add_special=False, parse_special=True)[0] == 1
        assert "<|im_start|>user\nhi<|im_end|>" in rt.apply_chat_template([_msg("user", "hi")])


def test_llama_cpp_tokenizes_the_whole_corpus_like_tokenizers(tiny):
    """Every line of the training text: the GGUF's tokenizer.ggml.pre must match ByteLevel's regex."""
    from tokenizers import Tokenizer

    from birdbone.io.runtime import LlamaRuntime
    from tests.fixtures.tiny import shakespeare_text

    tok = Tokenizer.from_file(str(tiny.tokenizer_json))
    lines = shakespeare_text().splitlines(keepends=True)
    with LlamaRuntime(tiny.gguf_f32, n_ctx=128) as rt:
        bad = [line for line in lines if rt.tokenize(line, add_special=False).tolist() != tok.encode(line).ids]
    assert not bad, f"{len(bad)} of {len(lines)} lines differ, e.g. {bad[:3]}"


def _msg(role, content):
    from birdbone.io.runtime import Message

    return Message(role, content)


@pytest.mark.parametrize("model,which,tol", [("tiny", "gguf_f32", 2e-3), ("tiny", "gguf_f16", 4e-3), ("tiny_k", "gguf_f32", 2e-3)])
def test_llama_cpp_logits_match_transformers(request, model, which, tol):
    """Same logits as transformers in fp32, up to llama.cpp's F16 KV cache (its default).

    ``tol`` is relative to the largest logit; a wrong q/k permutation or a dropped norm is off by O(1).
    Measured: ~2e-4 (tiny, F32), ~3e-4 (tiny, F16), ~6e-4 (tiny_k, F32)."""
    import torch
    from transformers import AutoModelForCausalLM

    from birdbone.io.runtime import LlamaRuntime

    tiny = request.getfixturevalue(model)
    ids = np.random.default_rng(0).integers(3, tiny.vocab, size=32)
    hf = AutoModelForCausalLM.from_pretrained(str(tiny.hf_dir), dtype=torch.float32).eval()
    with torch.no_grad():
        ref = hf(torch.tensor(ids[None])).logits[0].numpy()
    with LlamaRuntime(getattr(tiny, which), n_ctx=128) as rt:
        got = rt.logits(ids)
    assert got.shape == ref.shape == (32, tiny.vocab)
    assert ref.std() > 0.1  # not degenerate
    assert np.abs(got - ref).max() < tol * np.abs(ref).max()
    assert (got.argmax(-1) == ref.argmax(-1)).all()


def test_transformers_loads_the_gguf(tiny):
    """transformers (with accelerate) reads our GGUF back, undoing the q/k permutation exactly."""
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(tiny.hf_dir), dtype=torch.float32)
    g = AutoModelForCausalLM.from_pretrained(str(tiny.root), gguf_file=tiny.gguf_f32.name, dtype=torch.float32)
    assert g.config.tie_word_embeddings and g.config.num_key_value_heads == tiny.kv_heads
    a, b = hf.state_dict(), g.state_dict()
    assert set(a) == set(b)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)


# -- GGUF ---------------------------------------------------------------------------------------

@pytest.mark.parametrize("f16", [False, True], ids=["f32", "f16"])
def test_open_gguf(tiny, f16):
    path = tiny.gguf_f16 if f16 else tiny.gguf_f32
    want = expected_gguf(tiny)
    with open_model(path) as m:
        assert isinstance(m, ModelFile) and m.format == "gguf" and m.architecture == "llama"
        assert set(m.tensors) == set(want) and "output.weight" not in m.tensors  # tied embeddings
        assert len(m.tensors) == 2 + 9 * tiny.layers
        assert m.files == [path] and m.file_bytes == path.stat().st_size
        for name, arr in want.items():
            info, ref = m.tensors[name], stored(arr, f16)
            assert info.shape == arr.shape and info.ne == arr.shape[::-1] and info.file == path
            assert info.type == ("F16" if ref.dtype == np.float16 else "F32")
            assert info.n_bytes == ref.nbytes and info.offset % 32 == 0
            assert m.raw(name).tobytes() == ref.tobytes()
            got = m.tensor(name)
            assert got.dtype == np.float32 and got.shape == arr.shape
            np.testing.assert_array_equal(got, ref.astype(np.float32), err_msg=name)
        assert m.n_params == sum(a.size for a in want.values())
        assert m.tensor_bytes == sum(stored(a, f16).nbytes for a in want.values())
        assert m.meta("general.file_type") == (1 if f16 else 0)
        assert m.meta("llama.block_count") == tiny.layers and m.meta("llama.attention.head_count_kv") == tiny.kv_heads
        assert m.meta("llama.attention.layer_norm_rms_epsilon") == pytest.approx(RMS_EPS)
        assert m.meta("no.such.key", "dflt") == "dflt"
        tokens, types, merges = gguf_vocab(tiny.tokenizer_json)
        assert m.meta("tokenizer.ggml.tokens") == tokens and m.meta("tokenizer.ggml.merges") == merges
        assert m.meta("tokenizer.ggml.token_type").tolist() == types
        assert m.meta("tokenizer.chat_template") == CHATML_TEMPLATE
        with pytest.raises(KeyError, match="lm_head"):
            m.tensor("lm_head.weight")


def test_gguf_q_k_unpermute_to_hf(tiny):
    src = hf_state(tiny.hf_dir)
    with open_model(tiny.gguf_f32) as m:
        for i in range(tiny.layers):
            q, k = m.tensor(f"blk.{i}.attn_q.weight"), m.tensor(f"blk.{i}.attn_k.weight")
            assert not np.array_equal(q, src[f"model.layers.{i}.self_attn.q_proj.weight"])
            np.testing.assert_array_equal(unpermute_qk(q, tiny.heads), src[f"model.layers.{i}.self_attn.q_proj.weight"])
            np.testing.assert_array_equal(unpermute_qk(k, tiny.kv_heads), src[f"model.layers.{i}.self_attn.k_proj.weight"])
            np.testing.assert_array_equal(m.tensor(f"blk.{i}.ffn_down.weight"), src[f"model.layers.{i}.mlp.down_proj.weight"])


@pytest.mark.parametrize("which", ["gguf_f32", "gguf_f16"])
def test_gguf_agrees_with_gguf_py_reader(tiny, which):
    """Every tensor's name, type, shape, offset and metadata value as gguf-py's own reader sees them."""
    path = getattr(tiny, which)
    ref = GGUFReader(path)
    with open_model(path) as m:
        assert [t.name for t in ref.tensors] == list(m.tensors)
        for t in ref.tensors:
            info = m.tensors[t.name]
            assert (info.type, info.ne, info.offset, info.n_bytes) == (t.tensor_type.name, tuple(int(d) for d in t.shape), t.data_offset, t.n_bytes)
        assert set(ref.fields) - {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"} == set(m.metadata)
        for key, f in m.metadata.items():
            want, got = ref.fields[key].contents(), f.get()
            assert f.type == ref.fields[key].types[0], key
            assert (got.tolist() if isinstance(got, np.ndarray) else got) == want, key


def test_split_gguf(tiny, tmp_path):
    want = expected_gguf(tiny)
    files = write_llama_gguf(tmp_path / "tiny.gguf", tiny, want, f16=False, split_max_tensors=12)
    assert [p.name for p in files] == ["tiny-00001-of-00002.gguf", "tiny-00002-of-00002.gguf"]
    assert all(p.exists() for p in files) and not (tmp_path / "tiny.gguf").exists()
    # gguf-py marks every shard: split.no (0-based), split.count, split.tensors.count (the total)
    for i, p in enumerate(files):
        r = GGUFReader(p)
        assert (r.fields["split.no"].contents(), r.fields["split.count"].contents(), r.fields["split.tensors.count"].contents()) == (i, 2, len(want))
        assert len(r.tensors) == (12 if i == 0 else len(want) - 12)
    for first in files:  # any shard opens the whole set
        with open_model(first) as m:
            assert m.architecture == "llama" and m.files == files
            assert list(m.tensors) == list(want)
            assert m.meta("split.count") == 2 and m.meta("split.tensors.count") == len(want)
            for j, (name, arr) in enumerate(want.items()):
                assert m.tensors[name].file == files[0 if j < 12 else 1]
                np.testing.assert_array_equal(m.tensor(name), arr, err_msg=name)
                assert m.raw(name).tobytes() == arr.tobytes()
            assert m.n_params == sum(a.size for a in want.values())
            assert m.file_bytes == sum(p.stat().st_size for p in files)


def test_split_gguf_loads_in_llama_cpp(tiny, tmp_path):
    from birdbone.io.runtime import LlamaRuntime

    files = write_llama_gguf(tmp_path / "tiny.gguf", tiny, expected_gguf(tiny), f16=False, split_max_tensors=12)
    ids = np.arange(3, 19)
    with LlamaRuntime(files[0], n_ctx=64) as a, LlamaRuntime(tiny.gguf_f32, n_ctx=64) as b:
        np.testing.assert_array_equal(a.logits(ids), b.logits(ids))


# -- safetensors and Hugging Face folders ---------------------------------------------------------

def _check_against(m, src: dict[str, np.ndarray]):
    assert set(m.tensors) == set(src)
    for name, arr in src.items():
        info = m.tensors[name]
        assert info.shape == arr.shape and info.n_bytes == arr.nbytes
        assert info.type == {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16"}[arr.dtype]
        assert m.raw(name).tobytes() == arr.tobytes()
        got = m.tensor(name)
        assert got.dtype == np.float32
        np.testing.assert_array_equal(got, arr.astype(np.float32), err_msg=name)
    assert m.n_params == sum(a.size for a in src.values())
    assert m.tensor_bytes == sum(a.nbytes for a in src.values())


def test_open_hf_folder(tiny):
    src = hf_state(tiny.hf_dir)
    assert "lm_head.weight" not in src  # tied: saved once
    with open_model(tiny.hf_dir) as m:
        assert m.format == "hf" and m.architecture == "LlamaForCausalLM"
        assert m.files == [tiny.safetensors]
        assert m.meta("hidden_size") == tiny.hidden and m.meta("num_key_value_heads") == tiny.kv_heads
        assert m.metadata["config"]["tie_word_embeddings"] is True
        _check_against(m, src)


def test_open_safetensors_file(tiny):
    with open_model(tiny.safetensors) as m:
        assert m.format == "safetensors" and m.architecture == "LlamaForCausalLM"  # config.json beside it
        assert m.files == [tiny.safetensors]
        _check_against(m, hf_state(tiny.hf_dir))


def test_open_safetensors_file_without_config(tiny, tmp_path):
    from safetensors.numpy import save_file

    src = {"a": np.arange(6, dtype=np.float32).reshape(2, 3), "b": np.ones(4, np.float16)}
    save_file(src, str(tmp_path / "w.safetensors"), metadata={"format": "np"})
    with open_model(tmp_path / "w.safetensors") as m:
        assert m.architecture == "unknown" and m.metadata["header"] == {"format": "np"}
        _check_against(m, src)


def _write_sharded(tiny, folder: Path) -> dict[str, np.ndarray]:
    """Two shards (the second in F16) plus model.safetensors.index.json, as save_pretrained would."""
    from safetensors.numpy import save_file

    folder.mkdir()
    (folder / "config.json").write_bytes((tiny.hf_dir / "config.json").read_bytes())
    src = hf_state(tiny.hf_dir)
    names = sorted(src)
    half = len(names) // 2
    parts = {"model-00001-of-00002.safetensors": {n: src[n] for n in names[:half]},
             "model-00002-of-00002.safetensors": {n: src[n].astype(np.float16) for n in names[half:]}}
    weight_map = {}
    for fname, part in parts.items():
        save_file(part, str(folder / fname), metadata={"format": "pt"})
        weight_map.update({n: fname for n in part})
    total = sum(a.nbytes for p in parts.values() for a in p.values())
    (folder / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return {n: a for p in parts.values() for n, a in p.items()}


def test_open_sharded_safetensors(tiny, tmp_path):
    src = _write_sharded(tiny, tmp_path / "sharded")
    shards = [tmp_path / "sharded" / f"model-0000{i}-of-00002.safetensors" for i in (1, 2)]
    for target, fmt in [(tmp_path / "sharded", "hf"), (tmp_path / "sharded" / "model.safetensors.index.json", "safetensors")]:
        with open_model(target) as m:
            assert m.format == fmt and m.architecture == "LlamaForCausalLM"
            assert m.files == shards
            _check_against(m, src)
            assert {m.tensors[n].file for n in src} == set(shards)


# -- the built-in model ---------------------------------------------------------------------------

@pytest.mark.builtin
def test_builtin_opens_lazily(builtin_path):
    psutil = pytest.importorskip("psutil")
    t0 = time.perf_counter()
    open_model(builtin_path).close()  # cold: imports, page cache
    assert time.perf_counter() - t0 < 3.0
    proc = psutil.Process()
    rss0 = proc.memory_info().rss
    t0 = time.perf_counter()
    m = open_model(builtin_path)
    elapsed = time.perf_counter() - t0
    grew = proc.memory_info().rss - rss0
    try:
        assert m.format == "gguf" and m.architecture == "llama"
        assert len(m.tensors) == 272
        assert elapsed < 1.0
        size = builtin_path.stat().st_size
        assert size > 90e6 and m.file_bytes == size
        # memory-mapped: opening touches the header, not ~98 MB of tensor data
        assert grew < 16 * 2**20, f"RSS grew {grew / 2**20:.1f} MiB on open"
        assert m.tensor_bytes > 0.9 * size
        field = m.metadata["tokenizer.ggml.tokens"]
        assert isinstance(field.value, LazyArray) and len(field.value) == 49152  # not parsed yet
        assert field.item_type == GGUFValueType.STRING
        tokens = field.get()
        assert len(tokens) == 49152 and tokens[:3] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
        assert m.meta("llama.block_count") == 30
        types = {t.type for t in m.tensors.values()}
        assert "Q4_1" in types and "F32" in types
        q = m.tensor("blk.0.attn_q.weight")
        assert q.shape == m.tensors["blk.0.attn_q.weight"].shape == (576, 576)
        assert np.isfinite(q).all() and q.std() > 0
    finally:
        m.close()


# -- property: random GGUFs read back equal ------------------------------------------------------

_INT_RANGES = {
    GGUFValueType.UINT8: (0, 2**8 - 1), GGUFValueType.INT8: (-(2**7), 2**7 - 1),
    GGUFValueType.UINT16: (0, 2**16 - 1), GGUFValueType.INT16: (-(2**15), 2**15 - 1),
    GGUFValueType.UINT32: (0, 2**32 - 1), GGUFValueType.INT32: (-(2**31), 2**31 - 1),
    GGUFValueType.UINT64: (0, 2**64 - 1), GGUFValueType.INT64: (-(2**63), 2**63 - 1),
}
_NP = {GGUFValueType.UINT8: np.uint8, GGUFValueType.INT8: np.int8, GGUFValueType.UINT16: np.uint16,
       GGUFValueType.INT16: np.int16, GGUFValueType.UINT32: np.uint32, GGUFValueType.INT32: np.int32,
       GGUFValueType.UINT64: np.uint64, GGUFValueType.INT64: np.int64, GGUFValueType.FLOAT32: np.float32,
       GGUFValueType.FLOAT64: np.float64, GGUFValueType.BOOL: np.bool_}
_SCALAR_TYPES = list(_NP)


def _scalar(vtype: GGUFValueType):
    if vtype in _INT_RANGES:
        return st.integers(*_INT_RANGES[vtype])
    if vtype == GGUFValueType.FLOAT32:
        return st.floats(width=32, allow_nan=False)
    if vtype == GGUFValueType.FLOAT64:
        return st.floats(allow_nan=False)
    if vtype == GGUFValueType.BOOL:
        return st.booleans()
    return st.text(max_size=20)


@st.composite
def _meta_value(draw):
    kind = draw(st.sampled_from(["scalar", "string", "array", "string_array"]))
    if kind == "scalar":
        t = draw(st.sampled_from(_SCALAR_TYPES))
        return draw(_scalar(t)), t, None
    if kind == "string":
        return draw(st.text(max_size=40)), GGUFValueType.STRING, None
    if kind == "array":
        t = draw(st.sampled_from(_SCALAR_TYPES))
        return draw(st.lists(_scalar(t), min_size=1, max_size=8)), GGUFValueType.ARRAY, t
    return draw(st.lists(st.text(max_size=12), min_size=1, max_size=8)), GGUFValueType.ARRAY, GGUFValueType.STRING


_keys = st.text(min_size=1, max_size=24).filter(lambda k: k not in ("general.architecture", "general.alignment"))


@st.composite
def _tensor(draw):
    shape = tuple(draw(st.lists(st.integers(1, 6), min_size=1, max_size=3)))
    dtype = draw(st.sampled_from([np.float32, np.float16]))
    vals = draw(st.lists(st.floats(width=16, allow_nan=False, allow_infinity=False), min_size=math.prod(shape), max_size=math.prod(shape)))
    return np.array(vals, dtype=dtype).reshape(shape)


@settings(max_examples=60, deadline=2000, derandomize=True, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(meta=st.dictionaries(_keys, _meta_value(), max_size=6),
       tensors=st.dictionaries(st.text(min_size=1, max_size=16), _tensor(), max_size=4))
def test_random_gguf_roundtrip(meta, tensors):
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "r.gguf"
        w = GGUFWriter(str(path), arch="rnd")
        for key, (val, vtype, sub) in meta.items():
            w.add_key_value(key, val, vtype, sub)
        for name, arr in tensors.items():
            w.add_tensor(name, arr)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        with open_model(path) as m:
            assert m.architecture == "rnd"
            assert set(m.metadata) == set(meta) | {"general.architecture"}
            for key, (val, vtype, sub) in meta.items():
                f = m.metadata[key]
                assert f.type == vtype and f.item_type == sub
                got = f.get()
                if vtype == GGUFValueType.ARRAY and sub != GGUFValueType.STRING:
                    assert isinstance(got, np.ndarray) and got.dtype == _NP[sub]
                    np.testing.assert_array_equal(got, np.array(val, dtype=_NP[sub]))
                else:
                    assert got == val and type(got) is type(val)
            assert list(m.tensors) == list(tensors)
            for name, arr in tensors.items():
                info = m.tensors[name]
                assert info.shape == arr.shape and info.type == ("F16" if arr.dtype == np.float16 else "F32")
                assert info.n_bytes == arr.nbytes
                assert m.raw(name).tobytes() == arr.tobytes()
                np.testing.assert_array_equal(m.tensor(name), arr.astype(np.float32))
