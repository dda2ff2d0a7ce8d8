"""A Hugging Face folder (config.json, tokenizer.json, safetensors) to a GGUF llama.cpp runs, with
no parent GGUF: the metadata comes from config.json by the family table, the vocabulary from
tokenizer.json, as llama.cpp's ``convert_hf_to_gguf.py`` writes them.

The tokenizer is the part most easily got wrong: llama.cpp re-implements each pre-tokenizer by a
name (``tokenizer.ggml.pre``). We name it from tokenizer.json's own pre-tokenizer (the regex it
splits with) and then prove the name: llama.cpp and ``tokenizers`` must cut a check text into the
same ids, or nothing is written. A byte-level BPE is the one vocabulary kind handled (GPT-2,
Qwen, Llama 3, SmolLM); SentencePiece folders still need ``--like``.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from gguf.constants import GGUFValueType as V
from gguf.constants import Keys

from birdbone.io.families import Family, attention_scalar, family_of_model_type, ordinal, swa_layer_types
from birdbone.io.errors import BirdboneError, InputError
from birdbone.io.inputs import read_json

# tokenizer.json's Split regexes, by the llama.cpp pre-tokenizer that re-implements each
# (llama.cpp's llama-vocab.cpp keeps the originals beside its adapted forms)
QWEN2_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_REGEX = QWEN2_REGEX.replace(r"|\p{N}|", r"|\p{N}{1,3}|")
SPLIT_PRE = {QWEN2_REGEX: "qwen2", LLAMA3_REGEX: "llama-bpe"}
CHECK_TEXT = ("Hello World! It's 2026; we'll test 12345 numbers, don't we?\n\n  indented\tTabs  and   spaces.\n"
              "Ünïcödé — “quotes” … 日本語 and emoji 🦴.\nFirst Citizen:\nBefore we proceed any further, hear me speak.")
K = Keys.Tokenizer
log = logging.getLogger(__name__)
TOKEN_NORMAL, TOKEN_CONTROL, TOKEN_USER_DEFINED = 1, 3, 4


def pre_tokenizer_name(pre: dict | None, where: Path) -> str:
    """llama.cpp's name for a tokenizer.json pre-tokenizer; a one-line error when it has none."""
    steps = pre.get("pretokenizers", []) if isinstance(pre, dict) and pre.get("type") == "Sequence" else [pre]
    kinds = [s.get("type") if isinstance(s, dict) else None for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        regex = (steps[0].get("pattern") or {}).get("Regex")
        if regex in SPLIT_PRE:
            return SPLIT_PRE[regex]
    raise InputError(where, f"its pre-tokenizer ({' + '.join(map(str, kinds))}) has no llama.cpp counterpart birdbone knows; "
                            "pass --like A.gguf of the same model to take its vocabulary")


def vocab_metadata(folder: Path, config: dict) -> dict:
    """The ``tokenizer.ggml.*`` keys of a byte-level BPE tokenizer.json (and tokenizer_config.json)."""
    path = folder / "tokenizer.json"
    if not path.is_file():
        raise InputError(folder, "has no tokenizer.json; a GGUF needs the vocabulary (or pass --like A.gguf)")
    tok = read_json(path, "tokenizer")
    model = tok.get("model") if isinstance(tok, dict) else None
    if not isinstance(model, dict) or model.get("type") != "BPE" or not isinstance(model.get("vocab"), dict):
        raise InputError(path, "is not a byte-level BPE tokenizer (model.type BPE with a vocab); pass --like A.gguf to take a vocabulary")
    vocab = dict(model["vocab"])
    added = [a for a in tok.get("added_tokens") or [] if isinstance(a, dict) and isinstance(a.get("id"), int) and isinstance(a.get("content"), str)]
    rows = config.get("vocab_size") if isinstance(config.get("vocab_size"), int) else None
    beyond = [a for a in added if rows is not None and a["id"] >= rows]
    if beyond:  # transformers' gemma tokenizer adds <mask> past the embedding: an id no row can embed
        log.warning("%s: %s left out: beyond the model's %d embedding rows", path, ", ".join(f"{a['content']!r} (id {a['id']})" for a in beyond), rows)
        added = [a for a in added if a not in beyond]
    vocab.update({a["content"]: a["id"] for a in added})
    bad = next((k for k, v in vocab.items() if not isinstance(v, int) or isinstance(v, bool)), None)
    if not vocab or bad is not None:
        raise InputError(path, "has an empty vocabulary" if not vocab else f"token {bad!r} has id {vocab[bad]!r}, not a whole number")
    n = max(rows or 0, max(vocab.values()) + 1)
    tokens, types = [f"[PAD{i}]" for i in range(n)], [TOKEN_USER_DEFINED] * n  # ids the tokenizer leaves unused, as llama.cpp pads them
    for s, i in vocab.items():
        if not 0 <= i < n:
            raise InputError(path, f"token {s!r} has id {i}, outside the vocabulary of {n}")
        tokens[i], types[i] = s, TOKEN_NORMAL
    for a in added:
        types[a["id"]] = TOKEN_CONTROL if a.get("special") else TOKEN_USER_DEFINED
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges") or []]
    meta = {"tokenizer.ggml.model": ("gpt2", V.STRING, None),
            "tokenizer.ggml.pre": (pre_tokenizer_name(tok.get("pre_tokenizer"), path), V.STRING, None),
            "tokenizer.ggml.tokens": (tokens, V.ARRAY, V.STRING),
            "tokenizer.ggml.token_type": (types, V.ARRAY, V.INT32),
            "tokenizer.ggml.merges": (merges, V.ARRAY, V.STRING)}
    tc = read_json(folder / "tokenizer_config.json", "tokenizer config") if (folder / "tokenizer_config.json").is_file() else {}
    tc = tc if isinstance(tc, dict) else {}
    for role, key in (("bos", K.BOS_ID), ("eos", K.EOS_ID), ("pad", K.PAD_ID), ("unk", K.UNK_ID)):
        tid = _token_id(tc.get(f"{role}_token"), vocab)
        tid = tid if tid is not None else config.get(f"{role}_token_id") if isinstance(config.get(f"{role}_token_id"), int) else None
        if tid is not None:
            meta[key] = (tid, V.UINT32, None)
    meta["tokenizer.ggml.add_bos_token"] = (bool(tc.get("add_bos_token", False)), V.BOOL, None)
    if isinstance(tc.get("chat_template"), str):
        meta["tokenizer.chat_template"] = (tc["chat_template"], V.STRING, None)
    return meta


def _token_id(token, vocab: dict[str, int]) -> int | None:
    content = token.get("content") if isinstance(token, dict) else token
    return vocab.get(content) if isinstance(content, str) else None


def _int(config: dict, key: str, where: Path) -> int:
    v = config.get(key)
    if not isinstance(v, int) or isinstance(v, bool) or v <= 0:
        raise InputError(where, f"config.json: {key} is {v!r}, not a positive whole number")
    return v


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < float("inf")


def _rope(config: dict, fam: Family, where: Path) -> dict:
    """The rope keys: the global layers' base, and the sliding layers' where they have their own (gemma3)."""
    rope = config.get("rope_parameters") or config.get("rope_scaling") or {}
    if not isinstance(rope, dict):
        raise InputError(where, f"config.json: rope settings {rope!r} are not a mapping")
    by_layer = {k: rope[k] for k in ("full_attention", "sliding_attention") if k in rope}  # per layer type (gemma3)
    if any(not isinstance(v, dict) for v in by_layer.values()):
        raise InputError(where, f"config.json: rope settings {rope!r} are not a mapping per layer type")
    for r in by_layer.values() or [rope]:
        if r.get("rope_type", r.get("type", "default")) not in ("default", None):
            raise InputError(where, f"config.json: rope scaling {r.get('rope_type', r.get('type'))!r} is not supported by birdbone's converter yet")
    theta = by_layer.get("full_attention", rope).get("rope_theta") or config.get("rope_theta") or 10000.0
    local = by_layer.get("sliding_attention", {}).get("rope_theta") or config.get("rope_local_base_freq")
    if not _number(theta) or (local is not None and not _number(local)):
        raise InputError(where, f"config.json: rope_theta {theta!r} must be a positive number")
    if local is not None and local != 10000.0:
        raise InputError(where, f"config.json: the sliding layers' rope_theta is {local!r}; llama.cpp fixes it at 10000 for {fam.arch}")
    return {f"{fam.arch}.rope.freq_base": (float(theta), V.FLOAT32, None)}


def _gemma(config: dict, fam: Family, where: Path, layers: int, hidden: int, heads: int, head_dim: int) -> dict:
    """What llama.cpp's gemma graphs fix or read: soft-caps, the sliding window and its pattern,
    the attention scale, the activation and the tied head. A value it cannot honour is one line."""
    a, meta = fam.arch, {}
    if config.get("hidden_activation", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        raise InputError(where, f"config.json: hidden_activation {config['hidden_activation']!r}; llama.cpp's {a} runs gelu_pytorch_tanh")
    if fam.tied_only and config.get("tie_word_embeddings") is False:
        raise InputError(where, f"config.json: tie_word_embeddings is false; llama.cpp's {a} reads its output head from the embedding")
    want = attention_scalar(a, layers, hidden, heads, head_dim)
    if config.get("query_pre_attn_scalar", want) != want:
        raise InputError(where, f"config.json: query_pre_attn_scalar is {config['query_pre_attn_scalar']!r}; llama.cpp's {a} scales "
                                f"attention by 1/sqrt({want}) at this size")
    for key in ("attn_logit_softcapping", "final_logit_softcapping"):  # the same names in config.json and the GGUF
        v = config.get(key)
        if fam.softcap and not _number(v):
            raise InputError(where, f"config.json: {key} is {v!r}; llama.cpp's {a} always soft-caps, by a positive number")
        if not fam.softcap and v is not None:
            raise InputError(where, f"config.json: {key} is {v!r}; llama.cpp's {a} does not soft-cap")
        if fam.softcap:
            meta[f"{a}.{key}"] = (float(v), V.FLOAT32, None)
    window = _int(config, "sliding_window", where)
    pattern = swa_layer_types(fam, layers)
    if config.get("layer_types", pattern) != pattern:
        raise InputError(where, f"config.json: layer_types is not every {ordinal(fam.swa_period)} layer global, the one pattern llama.cpp's {a} runs")
    meta[f"{a}.attention.sliding_window"] = (window, V.UINT32, None)
    return meta


def model_metadata(config: dict, fam: Family, where: Path) -> dict:
    """The ``{arch}.*`` hyper-parameters llama.cpp's loader reads, from config.json."""
    a = fam.arch
    hidden, layers, heads = _int(config, "hidden_size", where), _int(config, "num_hidden_layers", where), _int(config, "num_attention_heads", where)
    kv = _int(config, "num_key_value_heads", where) if config.get("num_key_value_heads") is not None else heads
    head_dim = _int(config, "head_dim", where) if config.get("head_dim") is not None else hidden // heads
    if config.get("use_sliding_window") and not fam.swa_period:
        raise InputError(where, "config.json: sliding-window attention is not supported by birdbone's converter yet")
    eps = config.get("rms_norm_eps") or 1e-6
    if not _number(eps):
        raise InputError(where, f"config.json: rms_norm_eps {eps!r} must be a positive number")
    context = _int(config, "max_position_embeddings", where) if config.get("max_position_embeddings") is not None else 2048
    meta = {f"{a}.context_length": (context, V.UINT32, None),
            f"{a}.embedding_length": (hidden, V.UINT32, None),
            f"{a}.block_count": (layers, V.UINT32, None),
            f"{a}.feed_forward_length": (_int(config, "intermediate_size", where), V.UINT32, None),
            f"{a}.attention.head_count": (heads, V.UINT32, None),
            f"{a}.attention.head_count_kv": (kv, V.UINT32, None),
            f"{a}.attention.layer_norm_rms_epsilon": (float(eps), V.FLOAT32, None),
            **_rope(config, fam, where),
            f"{a}.rope.dimension_count": (int(head_dim), V.UINT32, None),
            f"{a}.vocab_size": (_int(config, "vocab_size", where), V.UINT32, None)}
    if fam.head_dim_keys or head_dim != hidden // heads:
        meta[f"{a}.attention.key_length"] = (int(head_dim), V.UINT32, None)
        meta[f"{a}.attention.value_length"] = (int(head_dim), V.UINT32, None)
    if fam.arch.startswith("gemma"):
        meta |= _gemma(config, fam, where, layers, hidden, heads, head_dim)
    return meta


def hf_to_gguf(src: Path, out: Path, out_type: str, progress=None) -> Path:
    """A Hugging Face folder (or a .safetensors with config.json beside it) as a GGUF, no parent needed."""
    from birdbone.bridge.names import to_gguf_tensors
    from birdbone.io.gguf_writer import FILE_TYPE_OF, float_specs, write_gguf
    from birdbone.io.model_file import open_model

    folder = src if src.is_dir() else src.parent
    config = read_json(folder / "config.json", "model config")
    if not isinstance(config, dict):
        raise InputError(folder / "config.json", "is not a model config (a JSON object)")
    fam = family_of_model_type(config.get("model_type"))
    meta = {"general.name": (folder.name, V.STRING, None), "general.file_type": (FILE_TYPE_OF[out_type], V.UINT32, None),
            **model_metadata(config, fam, folder / "config.json"), **vocab_metadata(folder, config)}
    heads = config["num_attention_heads"]  # checked by model_metadata above
    with open_model(src) as m:
        state = {n: m.tensor(n) for n in m.tensors}
    tensors = to_gguf_tensors(fam.arch, config["num_hidden_layers"], heads, config.get("num_key_value_heads") or heads, state)
    if "output.weight" in tensors and np.array_equal(tensors["output.weight"], tensors.get("token_embd.weight")):
        del tensors["output.weight"]  # tied: llama.cpp reads the head from the embedding, stored once
    written = write_gguf(out, fam.arch, meta, float_specs(tensors, out_type), progress)
    check_vocab(written, folder / "tokenizer.json")
    return written


def check_vocab(gguf: Path, tokenizer_json: Path) -> None:
    """llama.cpp must cut the check text into the ids ``tokenizers`` does; otherwise the file goes."""
    from tokenizers import Tokenizer

    from birdbone.io.runtime import tokenize_texts

    want = Tokenizer.from_file(str(tokenizer_json)).encode(CHECK_TEXT, add_special_tokens=False).ids
    got = tokenize_texts(gguf, CHECK_TEXT)[0].tolist()
    if list(got) != list(want):
        gguf.unlink(missing_ok=True)
        k = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
        raise BirdboneError(f"{tokenizer_json}: llama.cpp tokenizes differently from tokenizers (first at token {k}); nothing written")
