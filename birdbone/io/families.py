"""The model families the torch bridge knows, as data: one row per Hugging Face ``model_type``.

Each row says what llama.cpp's own converter (``convert_hf_to_gguf.py``) does for that family and
what the bridge must do alike, both ways:

* ``arch``: the ``general.architecture`` llama.cpp loads it under (Mistral is written as llama);
* ``permuted_qk``: q/k rows interleaved for llama.cpp's rope (the llama family only);
  transformers undoes it on GGUF load, so writing back applies it again;
* ``attn_bias``: q/k/v carry biases (qwen2), stored as F32 ``attn_{q,k,v}.bias``;
* ``qk_norm``: per-head RMS norms on q and k (qwen3), ``attn_{q,k}_norm.weight``;
* ``head_dim_keys``: the head width is its own hyper-parameter, written as
  ``attention.key_length`` / ``value_length`` (qwen3 decouples it from hidden / heads);
* ``fused``: q/k/v are one matrix (``attn_qkv``) and gate/up one (``ffn_up``, gate rows first), as
  phi3 stores them on both sides;
* ``norm_offset``: every RMS norm scales by ``1 + weight`` in transformers (gemma), so the GGUF
  stores ``weight + 1``; transformers subtracts it again on GGUF load;
* ``post_norms``: a norm after attention and one after the FFN (``post_attention_norm``,
  ``post_ffw_norm``), beside the two before (gemma);
* ``tied_only``: llama.cpp's graph has no output head of its own; the embedding is the head (gemma2);
* ``softcap``: attention and final logits are soft-capped, ``cap * tanh(x / cap)`` (gemma2);
* ``swa_period``: every ``swa_period``-th layer attends globally, the others within
  ``attention.sliding_window`` tokens, a pattern llama.cpp fixes per architecture (gemma2 2,
  gemma3 6); the same holds for the attention scale, ``1 / sqrt(head_dim)``.

Tensor names come from gguf-py's own table (:mod:`birdbone.bridge.names`). Families llama.cpp
runs but the bridge does not handle yet are listed in :data:`NOT_YET` with what stands in the way,
so a user gets that one line, not a wrong file.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from birdbone.io.errors import BirdboneError, InputError


@dataclass(frozen=True)
class Family:
    model_type: str  # config.json's model_type
    arch: str  # GGUF general.architecture
    hf_class: str  # the transformers class (config.json's architectures[0])
    permuted_qk: bool = False
    attn_bias: bool = False
    qk_norm: bool = False
    head_dim_keys: bool = False
    fused: bool = False
    norm_offset: float = 0.0
    post_norms: bool = False
    tied_only: bool = False
    softcap: bool = False
    swa_period: int = 0


FAMILIES = {f.model_type: f for f in (
    Family("llama", "llama", "LlamaForCausalLM", permuted_qk=True),
    Family("mistral", "llama", "MistralForCausalLM", permuted_qk=True),
    Family("qwen2", "qwen2", "Qwen2ForCausalLM", attn_bias=True),
    Family("qwen3", "qwen3", "Qwen3ForCausalLM", qk_norm=True, head_dim_keys=True),
    Family("phi3", "phi3", "Phi3ForCausalLM", fused=True),
    Family("gemma2", "gemma2", "Gemma2ForCausalLM", head_dim_keys=True, norm_offset=1.0, post_norms=True, tied_only=True, softcap=True,
           swa_period=2),
    Family("gemma3_text", "gemma3", "Gemma3ForCausalLM", qk_norm=True, head_dim_keys=True, norm_offset=1.0, post_norms=True, swa_period=6),
)}
# GGUF architectures the bridge reads and writes: every family's, and deci (per-layer widths, bridge/shaped.py)
ARCHS = {f.arch: f for f in reversed(FAMILIES.values())} | {"deci": FAMILIES["llama"]}
MOE = "a mixture of experts, which the bridge has no expert map for yet; inspect, measure, dissect, assemble, graft, quantize and eval take it"
NOT_YET = {
    "gemma3": "the multimodal Gemma3ForConditionalGeneration; its text model, model_type gemma3_text, is supported",
    # GGUF architectures and Hugging Face model_types of the mixture-of-experts families
    "qwen2moe": MOE, "qwen3moe": MOE, "qwen2_moe": MOE, "qwen3_moe": MOE, "mixtral": MOE,
}


def traits(fam: Family) -> list[str]:
    """What sets a family apart, in words (``inspect``'s family line)."""
    return [t for t, on in (("q/k rows permuted", fam.permuted_qk), ("q/k/v biases", fam.attn_bias), ("q/k norms", fam.qk_norm),
                            ("fused q/k/v and gate/up", fam.fused), ("norms store weight + 1", fam.norm_offset),
                            ("norms after attention and FFN", fam.post_norms), ("soft-capped logits", fam.softcap),
                            (f"sliding window, every {ordinal(fam.swa_period)} layer global", fam.swa_period)) if on]


def ordinal(n: int) -> str:
    return f"{n}{'th' if 10 <= n % 100 < 20 else {1: 'st', 2: 'nd', 3: 'rd'}.get(n % 10, 'th')}"


def supported_list() -> str:
    return ", ".join(sorted(FAMILIES))


def family_of_arch(arch: str) -> Family:
    """The family of a GGUF architecture; a one-line error naming the supported ones otherwise."""
    if arch in ARCHS:
        return ARCHS[arch]
    why = f" ({NOT_YET[arch]})" if arch in NOT_YET else ""
    raise BirdboneError(f"the torch bridge supports {supported_list()}; {arch!r} is not supported yet{why}")


def family_of_file(m) -> Family:
    """The family of an open GGUF: its architecture's, unless it routes among experts (a Mixtral
    GGUF is architecture llama, with ``llama.expert_count``)."""
    experts = m.meta(f"{m.architecture}.expert_count", 0)
    if experts:
        raise BirdboneError(f"the torch bridge supports {supported_list()}; this {m.architecture} model is not supported yet "
                            f"({experts} experts: {MOE})")
    return family_of_arch(m.architecture)


def check_bridge_takes(model) -> None:
    """Before any work: the bridge's one line when a torch verb's GGUF is outside the table or
    routes among experts (a Hugging Face folder is checked as transformers loads it)."""
    from birdbone.io.model_file import open_model

    with open_model(model) as m:
        if m.format == "gguf":
            family_of_file(m)


def family_of_model_type(model_type: str | None) -> Family:
    """The family of a Hugging Face config's ``model_type``."""
    if model_type in FAMILIES:
        return FAMILIES[model_type]
    why = f" ({NOT_YET[model_type]})" if model_type in NOT_YET else ""
    raise BirdboneError(f"the torch bridge supports {supported_list()}; model_type {model_type!r} is not supported yet{why}")


def family_of_lm(lm) -> Family:
    """The family of a loaded transformers model (a structured model is a llama)."""
    return family_of_model_type(getattr(lm.config, "model_type", None))


def expected_shapes(m, fam: Family) -> tuple[dict[str, tuple[int, ...]], set[str]]:
    """The tensors a GGUF of ``fam`` must hold (numpy shapes, from its hyper-parameters), and
    the ones it may (an untied head). The vocabulary is the embedding's own row count."""
    a = m.architecture

    def hp(key: str, default=None) -> int:
        v = m.meta(f"{a}.{key}", default)
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v <= 0:
            raise InputError(m.path, f"{a}.{key} is {v!r}, not a positive whole number")
        return int(v)

    n_embd, n_layer, n_head, n_ff = hp("embedding_length"), hp("block_count"), hp("attention.head_count"), hp("feed_forward_length")
    n_kv = hp("attention.head_count_kv", n_head)
    hd = hp("attention.key_length", n_embd // n_head or 1)
    emb = m.tensors.get("token_embd.weight")
    vocab = emb.shape[0] if emb is not None and len(emb.shape) == 2 else -1
    shapes = {"token_embd.weight": (vocab, n_embd), "output_norm.weight": (n_embd,)}
    for i in range(n_layer):
        b = f"blk.{i}."
        shapes |= {b + "attn_norm.weight": (n_embd,), b + "attn_output.weight": (n_embd, n_head * hd), b + "ffn_norm.weight": (n_embd,),
                   b + "ffn_down.weight": (n_embd, n_ff)}
        if fam.fused:
            shapes |= {b + "attn_qkv.weight": ((n_head + 2 * n_kv) * hd, n_embd), b + "ffn_up.weight": (2 * n_ff, n_embd)}
        else:
            shapes |= {b + "attn_q.weight": (n_head * hd, n_embd), b + "attn_k.weight": (n_kv * hd, n_embd), b + "attn_v.weight": (n_kv * hd, n_embd),
                       b + "ffn_gate.weight": (n_ff, n_embd), b + "ffn_up.weight": (n_ff, n_embd)}
        if fam.attn_bias:
            shapes |= {b + "attn_q.bias": (n_head * hd,), b + "attn_k.bias": (n_kv * hd,), b + "attn_v.bias": (n_kv * hd,)}
        if fam.qk_norm:
            shapes |= {b + "attn_q_norm.weight": (hd,), b + "attn_k_norm.weight": (hd,)}
        if fam.post_norms:
            shapes |= {b + "post_attention_norm.weight": (n_embd,), b + "post_ffw_norm.weight": (n_embd,)}
    return shapes, set() if fam.tied_only else {"output.weight"}


def check_fits(m, fam: Family) -> None:
    """A one-line error naming the first tensor of a GGUF that does not fit its family's map
    (missing, of another shape, or one the family has no place for)."""
    shapes, optional = expected_shapes(m, fam)
    vocab_n_embd = shapes["token_embd.weight"]
    for name, shape in [*shapes.items(), *((n, vocab_n_embd) for n in optional if n in m.tensors)]:
        t = m.tensors.get(name)
        if t is None:
            raise InputError(m.path, f"has no {name}, which a {fam.model_type} model of these hyper-parameters needs")
        if tuple(t.shape) != tuple(shape):
            raise InputError(m.path, f"{name} has shape {tuple(t.shape)}; its hyper-parameters say {tuple(shape)}")
    extra = next((n for n in m.tensors if n not in shapes and n not in optional), None)
    if extra is not None:
        raise InputError(m.path, f"holds {extra}, which a {fam.model_type} model has no place for")


# llama.cpp's values where a gemma GGUF leaves a key out (llama_hparams' defaults)
GEMMA_DEFAULTS = {"attn_logit_softcapping": 50.0, "final_logit_softcapping": 30.0, "attention.sliding_window": 4096}
BIG_GEMMA_LAYERS = {"gemma2": 46, "gemma3": 62}  # the 27B models, which llama.cpp scales by hidden / heads


def attention_scalar(arch: str, n_layer: int, hidden: int, heads: int, head_dim: int) -> int:
    """The ``query_pre_attn_scalar`` llama.cpp's gemma graphs use: not read from the file, fixed by size."""
    return hidden // heads if BIG_GEMMA_LAYERS.get(arch) == n_layer else head_dim


def hf_config_overrides(m, fam: Family) -> dict:
    """The transformers config values a GGUF of ``fam`` sets the way llama.cpp reads them, where
    transformers' own GGUF config reader leaves them out (its defaults would be another model)."""
    a = m.architecture
    out = {}
    if m.meta(f"{a}.attention.key_length"):
        out["head_dim"] = int(m.meta(f"{a}.attention.key_length"))  # a head width of its own (qwen3), which transformers' mapping does not read
    if not a.startswith("gemma"):
        return out
    hidden, layers, heads = (int(m.meta(f"{a}.{k}")) for k in ("embedding_length", "block_count", "attention.head_count"))
    head_dim = out.get("head_dim", hidden // heads)
    out["query_pre_attn_scalar"] = attention_scalar(a, layers, hidden, heads, head_dim)
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):
        out[key] = float(m.meta(f"{a}.{key}", GEMMA_DEFAULTS[key])) if fam.softcap else None
    out["sliding_window"] = int(m.meta(f"{a}.attention.sliding_window", GEMMA_DEFAULTS["attention.sliding_window"]))
    out["layer_types"] = swa_layer_types(fam, layers)
    if a == "gemma3":  # global layers at the file's base, sliding ones at llama.cpp's fixed 10000
        theta = float(m.meta(f"{a}.rope.freq_base", 1_000_000.0))
        out["rope_parameters"] = {"full_attention": {"rope_type": "default", "rope_theta": theta},
                                  "sliding_attention": {"rope_type": "default", "rope_theta": 10000.0}}
    return out


def swa_layer_types(fam: Family, n_layer: int) -> list[str]:
    """transformers' ``layer_types`` for llama.cpp's fixed pattern: every ``swa_period``-th layer global."""
    return ["full_attention" if (i + 1) % fam.swa_period == 0 else "sliding_attention" for i in range(n_layer)]
