"""Torch bridge: GGUF -> transformers -> GGUF keeps metadata and logits (llama.cpp vs torch)."""

from __future__ import annotations

import numpy as np
import pytest

from birdbone.bridge import load_causal_lm, state_dict_to_gguf
from birdbone.bridge.convert import convert
from birdbone.bridge.names import permute_qk
from birdbone.bridge.torch_eval import state_dict_numpy, torch_logits
from birdbone.evaluate.kld import token_kld
from birdbone.evaluate.perplexity import log_softmax
from birdbone.io.runtime import LlamaRuntime
from birdbone.io import open_model
from birdbone.io.errors import BirdboneError

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\nAll:\nSpeak, speak. You are all resolved rather to die than to famish?"


def llama_vs_torch(gguf_path, lm, n=48):
    """Tokenize once with the GGUF's tokenizer; the same ids go to both sides."""
    with LlamaRuntime(gguf_path, n_ctx=128, threads=2) as rt:
        toks = rt.tokenize(TEXT * 3)[:n]
        a = rt.logits(toks)
    b = torch_logits(lm, toks)
    kl = token_kld(log_softmax(b), log_softmax(a))
    return float(np.abs(a - b).max()), float(kl.mean()), float(kl.max())


def assert_metadata_kept(parent_path, child_path, changed=("general.file_type",)):
    with open_model(parent_path) as p, open_model(child_path) as c:
        assert set(p.metadata) == set(c.metadata)
        for key, f in p.metadata.items():
            if key in changed:
                continue
            a, b = f.get(), c.metadata[key].get()
            assert f.type == c.metadata[key].type, key
            assert (np.array_equal(a, b) if isinstance(a, np.ndarray) else a == b), key
        assert list(p.tensors) == list(c.tensors)


def test_permute_qk_is_llama_cpp_row_order():
    w = np.arange(8 * 3).reshape(8, 3)  # 2 heads of 4 rows: halves -> interleaved pairs
    p = permute_qk(w, 2)
    assert p[:, 0].tolist() == [0, 6, 3, 9, 12, 18, 15, 21]


def test_tiny_round_trip_gguf_torch_gguf(tiny, tmp_path):
    lm = load_causal_lm(tiny.gguf_f32)
    # transformers' GGUF loading gives the same model as the HF folder
    ref = load_causal_lm(tiny.hf_dir)
    for k, v in ref.state_dict().items():
        np.testing.assert_array_equal(v.numpy(), lm.state_dict()[k].numpy(), err_msg=k)
    out = tmp_path / "rt-f16.gguf"
    with open_model(tiny.gguf_f32) as parent:
        state_dict_to_gguf(state_dict_numpy(lm), parent, out, "F16")
    assert_metadata_kept(tiny.gguf_f32, out)
    with open_model(out) as m:
        assert m.meta("general.file_type") == 1
        assert m.tensors["blk.0.attn_norm.weight"].type == "F32" and m.tensors["blk.0.attn_q.weight"].type == "F16"
    max_abs, kl_mean, kl_max = llama_vs_torch(out, lm)
    assert max_abs < 5e-3 and kl_mean < 1e-6 and kl_max < 1e-5, (max_abs, kl_mean, kl_max)
    # F32 output is exact: the same bytes as the F32 parent's tensors
    out32 = tmp_path / "rt-f32.gguf"
    with open_model(tiny.gguf_f32) as parent:
        state_dict_to_gguf(state_dict_numpy(lm), parent, out32, "F32")
    with open_model(tiny.gguf_f32) as a, open_model(out32) as b:
        for n in a.tensors:
            assert a.raw(n).tobytes() == b.raw(n).tobytes(), n


def test_writer_refuses_mismatched_tensors(tiny, tmp_path):
    lm = load_causal_lm(tiny.hf_dir)
    state = state_dict_numpy(lm)
    state.pop("model.norm.weight")
    with open_model(tiny.gguf_f32) as parent, pytest.raises(BirdboneError, match="missing"):
        state_dict_to_gguf(state, parent, tmp_path / "x.gguf")
    state = state_dict_numpy(lm)
    state["model.norm.weight"][0] = np.nan
    with open_model(tiny.gguf_f32) as parent, pytest.raises(BirdboneError, match="NaN"):
        state_dict_to_gguf(state, parent, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists() and not list(tmp_path.glob(".birdbone-tmp-*"))


def test_convert_gguf_hf_gguf(tiny, tmp_path):
    hf = tmp_path / "hf"
    convert(tiny.gguf_f32, hf, "F32")
    assert (hf / "config.json").exists() and (hf / "model.safetensors").exists()
    back = tmp_path / "back.gguf"
    convert(hf, back, "F32", like=tiny.gguf_f32)
    with open_model(tiny.gguf_f32) as a, open_model(back) as b:
        for n in a.tensors:
            assert a.raw(n).tobytes() == b.raw(n).tobytes(), n
    # without --like: config.json and tokenizer.json give the metadata; the tensors are the fixture's own F16 file's
    convert(tiny.hf_dir, tmp_path / "nolike.gguf", "F16")
    with open_model(tiny.gguf_f16) as a, open_model(tmp_path / "nolike.gguf") as b:
        assert set(a.tensors) == set(b.tensors) and all(a.raw(n).tobytes() == b.raw(n).tobytes() for n in a.tensors)
        assert b.meta("tokenizer.ggml.pre") == "gpt-2" and list(b.meta("tokenizer.ggml.tokens")) == list(a.meta("tokenizer.ggml.tokens"))
    q8 = tmp_path / "q8.gguf"
    convert(tiny.gguf_f32, q8, "Q8_0")
    with open_model(q8) as m:
        assert m.tensors["blk.0.ffn_up.weight"].type == "Q8_0" and m.meta("general.file_type") == 7
    with LlamaRuntime(q8, n_ctx=64) as rt:
        assert rt.logits(rt.tokenize(TEXT)[:16]).shape[0] == 16
    st = tmp_path / "w.safetensors"
    convert(tiny.gguf_f32, st, "F16")
    with open_model(st) as m:
        assert m.tensors["model.layers.0.mlp.up_proj.weight"].type == "F16"
    with pytest.raises(BirdboneError, match="choose one of"):
        convert(tiny.gguf_f32, tmp_path / "k.gguf", "Q4_K")


@pytest.mark.builtin
def test_builtin_round_trip(tmp_path, builtin_path):
    lm = load_causal_lm("builtin")
    out = tmp_path / "rt-f16.gguf"
    with open_model(builtin_path) as parent:
        state_dict_to_gguf(state_dict_numpy(lm), parent, out, "F16")
    assert_metadata_kept(builtin_path, out)
    max_abs, kl_mean, kl_max = llama_vs_torch(out, lm, n=96)
    # F16 storage + llama.cpp's F16 matmuls vs torch fp32: measured 0.08 max-abs, 4e-6 mean KL
    assert max_abs < 0.25 and kl_mean < 1e-4 and kl_max < 1e-3, (max_abs, kl_mean, kl_max)
