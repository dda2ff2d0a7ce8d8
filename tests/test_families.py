"""The family battery: one row per model family of the bridge's table (birdbone/io/families.py),
each a tiny random Hugging Face model built from a transformers config (nothing downloaded), put
through every verb that crosses between torch and llama.cpp."""

from __future__ import annotations

import json

import numpy as np
import pytest

from birdbone.io.families import FAMILIES
from birdbone.io.errors import BirdboneError
from tests.fixtures.tiny import FAMILY_CONFIGS, make_tiny_family
from tests.test_bridge import llama_vs_torch

ROWS = sorted(FAMILY_CONFIGS)
SMALL = ["--set", "heal.batch=2", "--set", "heal.seq=32", "--set", "eval_tokens=256", "--set", "eval_ctx=64", "--set", "calibration_tokens=256"]


def test_every_family_of_the_table_has_a_row():
    assert sorted(FAMILIES) == ROWS


@pytest.fixture(scope="module", params=ROWS)
def family(request, tmp_path_factory):
    """(model_type, HF folder, the torch model, its GGUF in F32 written without --like)."""
    from birdbone.bridge.convert import convert

    root = tmp_path_factory.mktemp(request.param)
    hf, model = make_tiny_family(root, request.param)
    convert(hf, root / "m.gguf", "F32")
    return request.param, hf, model, root / "m.gguf"


@pytest.fixture(scope="module")
def usage(family, tmp_path_factory):
    """The family's usage profile (activations and imatrix), made once for the tests that read it."""
    from tests.test_cli import birdbone

    out = tmp_path_factory.mktemp("usage") / "usage"
    birdbone("profile", family[3], "--ctx", "64", "--tokens", "256", "-o", out)
    return out


def tensors(path) -> dict[str, bytes]:
    from birdbone.io.model_file import open_model

    with open_model(path) as m:
        return {n: m.raw(n).tobytes() for n in m.tensors}


def test_convert_without_like_runs_in_llama_cpp_as_in_transformers(family):
    from birdbone.io.model_file import open_model

    model_type, hf, model, gguf = family
    max_abs, kl_mean, kl_max = llama_vs_torch(gguf, model)
    assert max_abs < 5e-3 and kl_mean < 1e-6 and kl_max < 1e-5, (model_type, max_abs, kl_mean, kl_max)
    with open_model(gguf) as m:
        assert m.architecture == FAMILIES[model_type].arch
        assert ("output.weight" in m.tensors) == (not model.config.tie_word_embeddings)
        assert ("blk.0.attn_q.bias" in m.tensors) == FAMILIES[model_type].attn_bias
        assert ("blk.0.attn_q_norm.weight" in m.tensors) == FAMILIES[model_type].qk_norm
        assert ("blk.0.post_ffw_norm.weight" in m.tensors) == FAMILIES[model_type].post_norms
        assert (f"{m.architecture}.final_logit_softcapping" in m.metadata) == FAMILIES[model_type].softcap
        assert (f"{m.architecture}.attention.sliding_window" in m.metadata) == bool(FAMILIES[model_type].swa_period)


def test_gguf_torch_gguf_is_bit_exact(family, tmp_path):
    from birdbone.bridge import load_causal_lm, state_dict_to_gguf
    from birdbone.bridge.convert import convert
    from birdbone.bridge.torch_eval import state_dict_numpy
    from birdbone.io.model_file import open_model

    model_type, hf, model, gguf = family
    lm = load_causal_lm(gguf)
    for k, v in model.state_dict().items():  # transformers' GGUF loader gives back the model that was written
        if FAMILIES[model_type].norm_offset and k.endswith("norm.weight"):
            # gemma stores 1 + w: float32 keeps that sum to half an ulp of 1 (2^-24), as llama.cpp's converter does;
            # the stored sum itself comes back exactly (the round trip below)
            np.testing.assert_allclose(v.numpy(), lm.state_dict()[k].numpy(), rtol=0, atol=2**-24, err_msg=f"{model_type} {k}")
        else:
            np.testing.assert_array_equal(v.numpy(), lm.state_dict()[k].numpy(), err_msg=f"{model_type} {k}")
    # and the config transformers reads from the GGUF is the model llama.cpp runs (gemma's scale, caps, window, rope per layer type)
    max_abs, kl_mean, kl_max = llama_vs_torch(gguf, lm)
    assert max_abs < 5e-3 and kl_mean < 1e-6 and kl_max < 1e-5, (model_type, max_abs, kl_mean, kl_max)
    with open_model(gguf) as parent:
        state_dict_to_gguf(state_dict_numpy(lm), parent, tmp_path / "back.gguf", "F32")
    assert tensors(tmp_path / "back.gguf") == tensors(gguf)
    # and through a Hugging Face folder and back, in F16
    convert(gguf, tmp_path / "hf", "F32")
    convert(tmp_path / "hf", tmp_path / "f16.gguf", "F16")
    convert(hf, tmp_path / "direct-f16.gguf", "F16")
    assert tensors(tmp_path / "f16.gguf") == tensors(tmp_path / "direct-f16.gguf")


def test_profile_gives_an_imatrix_llama_cpp_quantizes_with(family, usage, tmp_path):
    from tests.test_cli import birdbone

    model_type, hf, model, gguf = family
    birdbone("quantize", gguf, "--type", "Q8_0", "--imatrix", usage / "imatrix.gguf", "-o", tmp_path / "q.gguf")
    r = json.loads(birdbone("eval", tmp_path / "q.gguf", "--parent", gguf, "--tokens", "128", "--ctx", "64", "--json").stdout)
    assert 0 < r["kld_mean"] < 0.05, r


def test_a_healed_prune_wave_reverts_bit_exact(family, tmp_path):
    from tests.test_cli import birdbone

    model_type, hf, model, gguf = family
    birdbone("prune", gguf, "--target-density", "0.8", "--score", "magnitude", "--heal-steps", "2", *SMALL, "--type", "F32",
             "--run-dir", tmp_path / "run", "-o", tmp_path / "p.gguf")
    pruned, source = tensors(tmp_path / "p.gguf"), tensors(gguf)
    assert pruned.keys() == source.keys() and pruned != source
    birdbone("revert", tmp_path / "run", "--to-wave", "0", "--type", "F32", "-o", tmp_path / "w0.gguf")
    assert tensors(tmp_path / "w0.gguf") == source


def test_a_greedy_budget_plan_runs_in_llama_cpp(family, usage, tmp_path):
    from birdbone.io.model_file import open_model
    from tests.test_cli import birdbone

    model_type, hf, model, gguf = family
    birdbone("budget", gguf, "--usage", usage, "--method", "greedy", "--target-bpw", "6", "--set", "sensitivity.val_tokens=128",
             "--set", "sensitivity.val_ctx=64", "--set", "sensitivity.seq=32", "-o", tmp_path / "plan.json")
    birdbone("quantize", gguf, "--plan", tmp_path / "plan.json", "-o", tmp_path / "q.gguf")
    plan = json.loads((tmp_path / "plan.json").read_text())["types"]
    with open_model(tmp_path / "q.gguf") as m:
        assert {n: m.tensors[n].type for n in plan} == plan and len(set(plan.values())) >= 2  # a real mix, written as planned
    # llama.cpp runs it, close to its parent (a random model may end a generated reply at once, so measure logits instead)
    r = json.loads(birdbone("eval", tmp_path / "q.gguf", "--parent", gguf, "--tokens", "128", "--ctx", "64", "--json").stdout)
    assert 0 < r["kld_mean"] < 0.05, r


def test_a_family_outside_the_table_is_one_line(tmp_path):
    from birdbone.bridge.convert import convert

    hf, _ = make_tiny_family(tmp_path, "qwen2")
    config = json.loads((hf / "config.json").read_text())
    config["model_type"] = "gemma3"
    (hf / "config.json").write_text(json.dumps(config))
    with pytest.raises(BirdboneError, match=r"supports gemma2, gemma3_text, llama, mistral, phi3, qwen2, qwen3; model_type 'gemma3' "
                                            r"is not supported yet \(the multimodal"):
        convert(hf, tmp_path / "x.gguf", "F32")
    assert not (tmp_path / "x.gguf").exists()


def test_structured_pruning_runs_on_the_llama_family_and_refuses_others_in_one_line(family, tmp_path):
    from birdbone.io.model_file import open_model
    from tests.test_cli import birdbone

    model_type, hf, model, gguf = family
    args = ["structure", gguf, "--target", "0.8", "--heal-steps", "1", *SMALL, "--set", "ffn_multiple=16", "--type", "F32",
            "--run-dir", tmp_path / "run", "-o", tmp_path / "s.gguf"]
    if FAMILIES[model_type].arch != "llama":  # llama.cpp's per-layer widths (deci) hold llama-family tensors only
        p = birdbone(*args, check=False)
        assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1 and f"not {FAMILIES[model_type].arch!r}" in p.stderr, p.stderr
        return
    birdbone(*args)
    with open_model(tmp_path / "s.gguf") as s, open_model(gguf) as m:
        assert s.n_params < 0.95 * m.n_params
    r = json.loads(birdbone("generate", tmp_path / "s.gguf", "-p", "First Citizen:", "-n", "4", "--json").stdout)
    assert r["n_tokens"] == 4 and r["reply"], r


def test_compress_passes_its_guardrails(family, tmp_path):
    """gentle's stages at the tiny model's sizes (tests/fixtures/tiny.TINY_RECIPE): map, profile,
    healed waves, the greedy budget at Q4_K_M's bytes, export, and the guardrails."""
    from tests.fixtures.tiny import TINY_RECIPE
    from tests.test_cli import birdbone

    model_type, hf, model, gguf = family
    (tmp_path / "tiny.yaml").write_text(TINY_RECIPE)
    r = json.loads(birdbone("compress", gguf, "-r", tmp_path / "tiny.yaml", "-o", tmp_path / "c.gguf", "--json").stdout)
    assert r["passed"] is True and all(g["passed"] for g in r["verify"]["guardrails"]), r["verify"]
    assert list(r["stages"]) == ["map", "profile", "waves", "budget", "export", "verify"]


def test_a_gguf_that_does_not_fit_its_family_is_one_line_naming_the_tensor(family, tmp_path):
    from birdbone.bridge import load_causal_lm
    from birdbone.io.families import family_of_arch
    from birdbone.io.gguf_layout import layout_of, write_layout
    from birdbone.io.gguf_reader import GGUFFile

    model_type, hf, model, gguf = family
    fam = FAMILIES[model_type]
    drop = "blk.1.attn_k.bias" if fam.attn_bias else "blk.1.attn_k_norm.weight" if fam.qk_norm else "blk.1.ffn_up.weight"

    def forged(name, edit):
        out = tmp_path / f"{name}.gguf"
        with GGUFFile(gguf) as f:
            layout = layout_of(f)
            edit(layout)
            for t in layout.tensors:
                t.offset = None  # packed again, as llama.cpp writes
            write_layout(out, layout, lambda t: [bytes(f.buf[f.tensors[t.name].offset:][:f.tensors[t.name].n_bytes])])
        return out

    missing = forged("missing", lambda lay: lay.tensors.remove(next(t for t in lay.tensors if t.name == drop)))
    with pytest.raises(BirdboneError, match=f"has no {drop}, which a {family_of_arch(fam.arch).model_type} model"):
        load_causal_lm(missing)
    narrow = forged("kv1", lambda lay: setattr(next(kv for kv in lay.kvs if kv.key.endswith(".attention.head_count_kv")), "value", 1))
    with pytest.raises(BirdboneError, match=r"blk\.0\.attn_qkv\.weight has shape" if fam.fused else r"blk\.0\.attn_k\.weight has shape"):
        load_causal_lm(narrow)


def test_inspect_names_the_family_and_what_sets_it_apart(family):
    from birdbone.anatomy.inspect import inspect_model
    from birdbone.io.families import family_of_arch

    model_type, hf, model, gguf = family
    fam = FAMILIES[model_type]
    for path, named in ((gguf, family_of_arch(fam.arch).model_type), (hf, model_type)):  # a Mistral GGUF is a llama, as llama.cpp writes it
        f = inspect_model(path, tensors=False).info["family"]
        assert f["family"] == named and f["torch"] and f["tied_embeddings"] == model.config.tie_word_embeddings, (path, f)
        assert ("q/k/v biases" in f["traits"]) == fam.attn_bias and ("q/k norms" in f["traits"]) == fam.qk_norm
        assert ("fused q/k/v and gate/up" in f["traits"]) == fam.fused and ("norms store weight + 1" in f["traits"]) == bool(fam.norm_offset)
        assert ("soft-capped logits" in f["traits"]) == fam.softcap


def test_a_vocabulary_birdbone_cannot_write_asks_for_like_in_one_line(tmp_path):
    """A SentencePiece (Unigram) vocabulary, and a BPE whose pre-tokenizer llama.cpp has no name for."""
    from birdbone.bridge.convert import convert

    hf, _ = make_tiny_family(tmp_path, "llama")
    tok = json.loads((hf / "tokenizer.json").read_text())
    unigram = dict(tok, model={"type": "Unigram", "vocab": [["a", 0.0]]})
    (hf / "tokenizer.json").write_text(json.dumps(unigram))
    with pytest.raises(BirdboneError, match="is not a byte-level BPE tokenizer.*pass --like"):
        convert(hf, tmp_path / "x.gguf", "F32")
    odd = dict(tok, pre_tokenizer={"type": "Whitespace"})
    (hf / "tokenizer.json").write_text(json.dumps(odd))
    with pytest.raises(BirdboneError, match=r"its pre-tokenizer \(Whitespace\) has no llama.cpp counterpart.*--like"):
        convert(hf, tmp_path / "x.gguf", "F32")
    assert not (tmp_path / "x.gguf").exists()


@pytest.fixture(scope="module")
def plain_hf(tmp_path_factory):
    return make_tiny_family(tmp_path_factory.mktemp("plain"), "llama")[0]


@pytest.mark.parametrize("file, edit, needle", [
    ("config.json", {"hidden_size": "64"}, "hidden_size is '64', not a positive whole number"),
    ("config.json", {"num_key_value_heads": 0}, "num_key_value_heads is 0"),
    ("config.json", {"head_dim": 2.5}, "head_dim is 2.5"),
    ("config.json", {"rope_parameters": "fast"}, "rope settings 'fast' are not a mapping"),
    ("config.json", {"rms_norm_eps": "tiny"}, "must be a positive number"),
    ("config.json", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0}}, "rope scaling 'yarn' is not supported"),
    ("tokenizer.json", {"model": {"type": "BPE", "vocab": {}, "merges": []}, "added_tokens": []}, "has an empty vocabulary"),
    ("tokenizer.json", {"model": {"type": "BPE", "vocab": {"a": "zero"}, "merges": []}}, "token 'a' has id 'zero'"),
])
def test_a_malformed_folder_is_one_line_naming_the_file(plain_hf, tmp_path, file, edit, needle):
    import shutil

    from birdbone.bridge.convert import convert

    hf = tmp_path / "hf"
    shutil.copytree(plain_hf, hf)
    doc = json.loads((hf / file).read_text())
    (hf / file).write_text(json.dumps({**doc, **edit}))
    with pytest.raises(BirdboneError) as e:
        convert(hf, tmp_path / "x.gguf", "F32")
    assert needle in str(e.value) and file in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert not (tmp_path / "x.gguf").exists()


@pytest.fixture(scope="module")
def gemma_hf(tmp_path_factory):
    return make_tiny_family(tmp_path_factory.mktemp("gemma"), "gemma2")[0]


@pytest.mark.parametrize("edit, needle", [
    ({"query_pre_attn_scalar": 256}, "query_pre_attn_scalar is 256; llama.cpp's gemma2 scales attention by 1/sqrt(16)"),
    ({"attn_logit_softcapping": None}, "attn_logit_softcapping is None; llama.cpp's gemma2 always soft-caps"),
    ({"hidden_activation": "gelu"}, "hidden_activation 'gelu'; llama.cpp's gemma2 runs gelu_pytorch_tanh"),
    ({"tie_word_embeddings": False}, "tie_word_embeddings is false; llama.cpp's gemma2 reads its output head from the embedding"),
    ({"layer_types": ["full_attention", "full_attention"]}, "layer_types is not every 2nd layer global"),
    ({"sliding_window": 0}, "sliding_window is 0, not a positive whole number"),
    ({"rope_parameters": {"sliding_attention": {"rope_theta": 20000.0}, "full_attention": {"rope_theta": 10000.0}}},
     "the sliding layers' rope_theta is 20000.0; llama.cpp fixes it at 10000"),
])
def test_a_gemma_config_llama_cpp_cannot_run_is_one_line(gemma_hf, tmp_path, edit, needle):
    """llama.cpp's gemma graphs fix what the config could vary: converting such a model would
    write a file that runs another model, so the converter says which value, before writing."""
    import re
    import shutil

    from birdbone.bridge.convert import convert

    hf = shutil.copytree(gemma_hf, tmp_path / "hf")
    config = json.loads((hf / "config.json").read_text()) | edit
    (hf / "config.json").write_text(json.dumps(config))
    with pytest.raises(BirdboneError, match=re.escape(needle)) as e:
        convert(hf, tmp_path / "x.gguf", "F32")
    assert "config.json" in str(e.value) and "\n" not in str(e.value) and not (tmp_path / "x.gguf").exists()
