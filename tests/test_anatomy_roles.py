"""anatomy.roles against gguf-py's own name tables, then named cases, then summarize().

The reference is gguf-py: ``MODEL_TENSORS[arch]`` / ``TENSOR_NAMES`` give every GGUF name an
architecture can hold, and ``get_tensor_name_map(arch).mapping`` every Hugging Face (and pth)
spelling it converts from, with the GGUF kind it becomes. Each must get a real role (rope tables
are ``other``) and the same organ gguf-py gives it. Nothing is downloaded.
"""

from __future__ import annotations

import dataclasses
import json
import re
from types import SimpleNamespace

import pytest
from gguf.constants import MODEL_ARCH, MODEL_TENSORS, TENSOR_NAMES
from gguf.tensor_mapping import get_tensor_name_map

from birdbone.anatomy.roles import AMBIGUOUS, ORGAN_ROLES, ROLES, Anatomy, classify, summarize
from birdbone.io import TensorInfo

ARCHS = ["LLAMA", "QWEN2", "QWEN3", "GEMMA2", "GEMMA3", "PHI3", "DEEPSEEK2", "DECI", "BERT"]
ROPE = {"rope_freqs", "rope_factors_long", "rope_factors_short", "attn_rot_embd"}
N_BLOCKS = 4


def _kind(gguf_name: str) -> tuple[str, int | None]:
    """``blk.3.attn_q`` -> ("attn_q", 3); ``output_norm`` -> ("output_norm", None)."""
    m = re.fullmatch(r"blk\.(\d+)\.(.+)", gguf_name)
    return (m[2], int(m[1])) if m else (gguf_name, None)


def _check(name: str, kind: str, layer: int | None, allowed: set[str]) -> str | None:
    a = classify(name)
    want_role = "other" if kind in ROPE else ORGAN_ROLES.get(kind)
    if kind not in ROPE and a.role == "other":
        return f"{name}: role other (gguf-py: {kind})"
    if a.role != want_role or a.organ not in allowed:
        return f"{name}: {a} (gguf-py: {kind})"
    if layer is not None and a.layer != layer:
        return f"{name}: layer {a.layer}, want {layer}"
    return None


@pytest.mark.parametrize("arch_name", ARCHS)
def test_every_gguf_name_of_arch(arch_name):
    arch = MODEL_ARCH[arch_name]
    bad, n = [], 0
    for t in MODEL_TENSORS[arch]:
        kind, layer = _kind(TENSOR_NAMES[t].format(bid=3, xid=0))
        for suffix in (".weight", ".bias"):
            n += 1
            name = TENSOR_NAMES[t].format(bid=3, xid=0) + suffix
            bad.append(_check(name, kind, layer, {kind}))
    bad = [b for b in bad if b]
    assert not bad, "\n".join(bad)
    assert n == 2 * len(MODEL_TENSORS[arch]) > 0


@pytest.mark.parametrize("arch_name", ARCHS)
def test_every_hf_name_of_arch(arch_name):
    arch = MODEL_ARCH[arch_name]
    gguf_names = {TENSOR_NAMES[t].format(bid=b, xid=0) for t in MODEL_TENSORS[arch] for b in range(N_BLOCKS)}
    mapping = get_tensor_name_map(arch, n_blocks=N_BLOCKS).mapping
    hf = {k: v[1] for k, v in mapping.items() if k not in gguf_names}
    assert len(hf) > 500  # the map holds every family's spelling of this arch's kinds
    bad = []
    for key, target in hf.items():
        kind, layer = _kind(target)
        allowed = {kind}
        for tail, alts in AMBIGUOUS.items():
            if key == tail or key.endswith("." + tail):
                allowed |= set(alts)
        # gguf-py keys are stems, a few already with `.weight`; a real file adds the suffix.
        names = [key] if key.endswith(".weight") else [key, key + ".weight", key + ".bias"]
        bad += [_check(name, kind, layer, allowed) for name in names]
    bad = [b for b in bad if b]
    assert not bad, f"{len(bad)} of {len(hf)} names:\n" + "\n".join(bad[:40])


# name -> (role, layer, organ)
CASES = {
    # GGUF
    "blk.3.attn_q.weight": ("skeleton", 3, "attn_q"),
    "blk.0.attn_qkv.bias": ("skeleton", 0, "attn_qkv"),
    "blk.12.attn_q_norm.weight": ("norm", 12, "attn_q_norm"),
    "blk.5.attn_kv_a_mqa.weight": ("skeleton", 5, "attn_kv_a_mqa"),
    "blk.5.attn_kv_a_norm.weight": ("norm", 5, "attn_kv_a_norm"),
    "blk.5.attn_k_b.weight": ("skeleton", 5, "attn_k_b"),
    "blk.5.ffn_gate_exps.weight": ("organ", 5, "ffn_gate_exps"),
    "blk.5.ffn_gate_inp.weight": ("organ", 5, "ffn_gate_inp"),
    "blk.5.ffn_gate_inp_shexp.weight": ("organ", 5, "ffn_gate_inp_shexp"),
    "blk.5.exp_probs_b.bias": ("organ", 5, "exp_probs_b"),
    "blk.5.ffn_down_shexp.weight": ("organ", 5, "ffn_down_shexp"),
    "blk.1.post_ffw_norm.weight": ("norm", 1, "post_ffw_norm"),
    "token_embd.weight": ("embed", None, "token_embd"),
    "output.weight": ("embed", None, "output"),
    "output_norm.weight": ("norm", None, "output_norm"),
    "position_embd.weight": ("embed", None, "position_embd"),
    "token_types.weight": ("embed", None, "token_types"),
    "token_embd_norm.weight": ("norm", None, "token_embd_norm"),
    "cls.output.weight": ("embed", None, "cls.output"),
    "rope_freqs.weight": ("other", None, "rope_freqs"),
    "rope_factors_long.weight": ("other", None, "rope_factors_long"),
    "enc.blk.2.attn_o.weight": ("other", 2, "unknown"),
    # Hugging Face: llama / qwen / mistral
    "model.layers.3.self_attn.q_proj.weight": ("skeleton", 3, "attn_q"),
    "model.layers.3.self_attn.k_proj.bias": ("skeleton", 3, "attn_k"),
    "model.layers.3.self_attn.o_proj.weight": ("skeleton", 3, "attn_output"),
    "model.layers.3.mlp.gate_proj.weight": ("organ", 3, "ffn_gate"),
    "model.layers.3.input_layernorm.weight": ("norm", 3, "attn_norm"),
    "model.layers.3.post_attention_layernorm.weight": ("norm", 3, "ffn_norm"),
    "model.layers.3.self_attn.rotary_emb.inv_freq": ("other", 3, "attn_rot_embd"),
    "model.embed_tokens.weight": ("embed", None, "token_embd"),
    "lm_head.weight": ("embed", None, "output"),
    "model.norm.weight": ("norm", None, "output_norm"),
    "layers.3.attention.wq.weight": ("skeleton", 3, "attn_q"),  # llama/mistral pth
    "layers.3.feed_forward.experts.7.w1.weight": ("organ", 3, "ffn_gate_exps"),  # mixtral pth
    "model.layers.3.block_sparse_moe.experts.7.w2.weight": ("organ", 3, "ffn_down_exps"),
    # MoE: qwen2/3-moe, deepseek
    "model.layers.3.mlp.experts.7.down_proj.weight": ("organ", 3, "ffn_down_exps"),
    "model.layers.3.mlp.gate.weight": ("organ", 3, "ffn_gate_inp"),
    "model.layers.3.mlp.gate.e_score_correction_bias": ("organ", 3, "exp_probs_b"),
    "model.layers.3.mlp.shared_experts.up_proj.weight": ("organ", 3, "ffn_up_shexp"),
    "model.layers.3.mlp.shared_expert_gate.weight": ("organ", 3, "ffn_gate_inp_shexp"),
    # deepseek MLA
    "model.layers.3.self_attn.kv_a_proj_with_mqa.weight": ("skeleton", 3, "attn_kv_a_mqa"),
    "model.layers.3.self_attn.q_a_proj.weight": ("skeleton", 3, "attn_q_a"),
    "model.layers.3.self_attn.q_b_proj.weight": ("skeleton", 3, "attn_q_b"),
    "model.layers.3.self_attn.kv_b_proj.weight": ("skeleton", 3, "attn_kv_b"),
    "model.layers.3.self_attn.q_a_layernorm.weight": ("norm", 3, "attn_q_a_norm"),
    # phi3: fused projections
    "model.layers.3.self_attn.qkv_proj.weight": ("skeleton", 3, "attn_qkv"),
    "model.layers.3.mlp.gate_up_proj.weight": ("organ", 3, "ffn_up"),
    # gemma2/3, including the multimodal checkpoint's prefix
    "model.layers.3.pre_feedforward_layernorm.weight": ("norm", 3, "ffn_norm"),
    "model.layers.3.post_feedforward_layernorm.weight": ("norm", 3, "post_ffw_norm"),
    "language_model.model.layers.3.self_attn.q_norm.weight": ("norm", 3, "attn_q_norm"),
    "model.language_model.embed_tokens.weight": ("embed", None, "token_embd"),
    # bert
    "encoder.layer.2.attention.self.query.weight": ("skeleton", 2, "attn_q"),
    "bert.encoder.layer.2.attention.output.dense.bias": ("skeleton", 2, "attn_output"),
    "encoder.layer.2.attention.output.LayerNorm.weight": ("norm", 2, "attn_output_norm"),
    "encoder.layer.2.intermediate.dense.weight": ("organ", 2, "ffn_up"),
    "encoder.layer.2.output.dense.weight": ("organ", 2, "ffn_down"),
    "encoder.layer.2.output.LayerNorm.weight": ("norm", 2, "layer_output_norm"),
    "embeddings.word_embeddings.weight": ("embed", None, "token_embd"),
    "bert.embeddings.position_embeddings.weight": ("embed", None, "position_embd"),
    "bert.embeddings.token_type_embeddings.weight": ("embed", None, "token_types"),
    "bert.embeddings.LayerNorm.bias": ("norm", None, "token_embd_norm"),
    # gpt2-style `h.N.` and nested containers
    "transformer.h.11.mlp.c_fc.weight": ("organ", 11, "ffn_up"),
    "transformer.h.11.attn.c_attn.weight": ("skeleton", 11, "attn_qkv"),
    "model.layers.layers.2.mixer.q_proj.weight": ("skeleton", 2, "attn_q"),
    # LoRA: the adapter, and the organ it attaches to
    "blk.3.attn_q.weight.lora_a": ("adapter", 3, "attn_q"),
    "blk.3.ffn_down.weight.lora_b": ("adapter", 3, "ffn_down"),
    "token_embd.weight.lora_a": ("adapter", None, "token_embd"),
    "base_model.model.model.layers.3.self_attn.v_proj.lora_A.weight": ("adapter", 3, "attn_v"),
    "base_model.model.model.layers.3.mlp.down_proj.lora_B.weight": ("adapter", 3, "ffn_down"),
    "base_model.model.model.layers.3.self_attn.q_proj.lora_A.default.weight": ("adapter", 3, "attn_q"),
    "base_model.model.lm_head.lora_B.weight": ("adapter", None, "output"),
    "base_model.model.model.embed_tokens.lora_embedding_A": ("adapter", None, "token_embd"),
    "model.layers.3.self_attn.q_proj.lora_a.weight": ("adapter", 3, "attn_q"),
    "model.layers.3.self_attn.o_proj.lora_magnitude_vector": ("adapter", 3, "attn_output"),
    "model.layers.3.mystery.lora_B.weight": ("adapter", 3, "unknown"),
    # fallbacks and the unknown
    "blk.3.ssm_norm.weight": ("norm", 3, "ssm_norm"),
    "blk.2.ffn_gate_chexps.weight": ("organ", 2, "ffn_gate_chexps"),
    "model.layers.4.mixer.custom_layernorm.weight": ("norm", 4, "norm"),
    "model.layers.3.mystery_gizmo.weight": ("other", 3, "unknown"),
    "totally.unknown": ("other", None, "unknown"),
    "": ("other", None, "unknown"),
}


@pytest.mark.parametrize("name", list(CASES))
def test_named_cases(name):
    assert classify(name) == Anatomy(*CASES[name])


def test_vocabulary_and_api():
    assert ROLES == ("skeleton", "organ", "embed", "norm", "adapter", "other")
    assert set(ORGAN_ROLES.values()) <= set(ROLES) - {"adapter"}
    # organ names are gguf-py kind names wherever gguf-py has the kind
    gguf_kinds = {_kind(n.format(bid=0, xid=0))[0] for n in TENSOR_NAMES.values()}
    assert set(ORGAN_ROLES) <= gguf_kinds
    a = classify("blk.3.attn_q.weight")
    assert classify("blk.3.attn_q.weight") is a  # cached
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.role = "organ"
    assert dataclasses.asdict(a) == {"role": "skeleton", "layer": 3, "organ": "attn_q"}


def test_summarize_adds_up(tmp_path):
    names = [
        "token_embd.weight", "output_norm.weight", "output.weight", "rope_freqs.weight", "mystery",
        *(f"blk.{i}.{k}.weight" for i in range(3) for k in ("attn_q", "attn_norm", "ffn_up", "ffn_down")),
        "blk.1.attn_q.weight.lora_a", "model.layers.7.strange",
    ]
    tensors = [
        TensorInfo(n, shape=(i + 1, 3), type="F16", n_bytes=(i + 1) * 6, offset=0, file=tmp_path / "m.gguf")
        for i, n in enumerate(names)
    ]
    s = summarize(tensors)
    assert json.loads(json.dumps(s)) == s
    assert s == summarize({t.name: t for t in tensors})  # a ModelFile.tensors mapping works too

    want = {"n_tensors": len(tensors), "n_bytes": sum(t.n_bytes for t in tensors),
            "n_params": sum(t.n_params for t in tensors)}
    assert s["total"] == want
    assert list(s["roles"]) == list(ROLES)
    for key in want:
        assert sum(r[key] for r in s["roles"].values()) == want[key]
        parts = [s["unlayered"], *s["layers"]]
        assert sum(p[key] for p in parts) == want[key]
        for p in parts:
            assert sum(r[key] for r in p["roles"].values()) == p[key]
    assert [l["layer"] for l in s["layers"]] == [0, 1, 2, 7]
    l1 = s["layers"][1]
    assert l1["n_tensors"] == 5 and l1["roles"]["adapter"]["n_tensors"] == 1
    by = {t.name: t for t in tensors}
    assert l1["roles"]["skeleton"]["n_bytes"] == by["blk.1.attn_q.weight"].n_bytes
    assert s["roles"]["other"]["n_tensors"] == 3  # rope, mystery, model.layers.7.strange
    assert s["unknown"] == ["model.layers.7.strange", "mystery"]
    assert s["unlayered"]["n_tensors"] == 5


def test_summarize_duck_typed_and_empty():
    s = summarize([SimpleNamespace(name="blk.0.ffn_up.weight", n_bytes=10, n_params=5)])
    assert s["roles"]["organ"] == {"n_tensors": 1, "n_bytes": 10, "n_params": 5}
    empty = summarize([])
    assert empty["total"] == {"n_tensors": 0, "n_bytes": 0, "n_params": 0} and empty["layers"] == []
