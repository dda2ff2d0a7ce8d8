"""Hugging Face <-> GGUF tensor names, from gguf-py's own table (``TensorNameMap``).

llama.cpp's converter permutes the rows of q and k for the llama family (its rope pairs
adjacent dimensions, Hugging Face's pairs halves); transformers undoes that on GGUF load, so
writing back must apply it again: :func:`permute_qk`. Gemma's norms are stored as ``weight + 1``
(the family table's ``norm_offset``); transformers subtracts it on GGUF load, writing adds it.
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
from gguf.constants import MODEL_ARCH, MODEL_ARCH_NAMES
from gguf.tensor_mapping import get_tensor_name_map

from birdbone.io.families import ARCHS, family_of_arch
from birdbone.io.errors import BirdboneError

# GGUF architectures whose q/k rows are permuted relative to Hugging Face (the family table's word)
PERMUTED_QK = {arch for arch, f in ARCHS.items() if f.permuted_qk}


def _arch_enum(arch: str) -> MODEL_ARCH:
    for k, v in MODEL_ARCH_NAMES.items():
        if v == arch:
            return k
    raise BirdboneError(f"architecture {arch!r} is unknown to gguf-py")


@lru_cache(maxsize=32)
def _name_map(arch: str, n_layers: int):
    # building gguf-py's table takes milliseconds; leave-one-out asks for it thousands of times
    return get_tensor_name_map(_arch_enum(arch), n_layers)


def hf_to_gguf_name(arch: str, n_layers: int, hf_name: str) -> str | None:
    name = _name_map(arch, n_layers).get_name(hf_name, try_suffixes=(".weight", ".bias"))
    if name is None:
        # gguf-py gives a head only to families that may untie it (not gemma2); a tied head is still the head
        return "output.weight" if hf_name == "lm_head.weight" else None
    # gguf-py returns the suffix it matched with; add it only when it did not
    if name.endswith((".weight", ".bias")):
        return name
    return name + (".bias" if hf_name.endswith(".bias") else ".weight")


def permute_qk(w: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """Hugging Face q/k rows -> llama.cpp order (as convert_hf_to_gguf's ``LlamaModel.permute``)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """llama.cpp q/k rows -> Hugging Face order: the inverse of :func:`permute_qk`."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def to_gguf_tensors(arch: str, n_layers: int, n_head: int, n_head_kv: int, state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rename (and re-permute) a Hugging Face state dict into GGUF tensors."""
    out, unknown = {}, []
    offset = family_of_arch(arch).norm_offset
    for hf_name, arr in state.items():
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue  # recomputed by both runtimes
        name = hf_to_gguf_name(arch, n_layers, hf_name)
        if name is None:
            unknown.append(hf_name)
            continue
        if arch in PERMUTED_QK and name.endswith("attn_q.weight"):
            arr = permute_qk(arr, n_head, n_head)
        elif arch in PERMUTED_QK and name.endswith("attn_k.weight"):
            arr = permute_qk(arr, n_head, n_head_kv)
        elif offset and name.endswith("norm.weight"):
            arr = arr + np.asarray(offset, arr.dtype)  # in the tensor's own precision, as transformers subtracts it
        out[name] = arr
    if unknown:
        raise BirdboneError(f"no GGUF name for {len(unknown)} tensor(s) of a {arch} model: {', '.join(unknown[:5])}")
    return out


def layer_heads(lm, layer: int) -> tuple[int, int]:
    """(query heads, key/value heads) of decoder layer ``layer`` of a transformers model, read off
    its projections (a structured model's layers differ; 0, 0 for a layer with no attention)."""
    attn = lm.model.layers[layer].self_attn
    q = getattr(attn, "q_proj", None)
    if q is None:
        return 0, 0
    hd = lm.config.head_dim if getattr(lm.config, "head_dim", None) else lm.config.hidden_size // lm.config.num_attention_heads
    return q.out_features // hd, attn.k_proj.out_features // hd


def qk_rows(lm, arch: str, name: str) -> tuple[int, int] | None:
    """The (n_head, n_head_kv) to permute a GGUF q/k weight's rows with, or None for any other tensor."""
    if arch not in PERMUTED_QK or not name.startswith("blk."):
        return None
    h, kv = layer_heads(lm, int(name.split(".")[1]))
    if name.endswith("attn_q.weight"):
        return h, h
    if name.endswith("attn_k.weight"):
        return h, kv
    return None


def gguf_linears(lm, arch: str) -> dict[str, tuple[str, object]]:
    """GGUF weight name -> (Hugging Face module name, the ``nn.Linear``), for every linear layer
    of a transformers model that has a GGUF name (the head is ``output.weight``, tied or not).
    The one walk of a model's modules that heal, profile and the sensitivities share."""
    import torch

    n_layers = lm.config.num_hidden_layers
    out = {}
    for mod_name, mod in lm.named_modules():
        if isinstance(mod, torch.nn.Linear):
            g = hf_to_gguf_name(arch, n_layers, f"{mod_name}.weight")
            if g is not None:
                out[g] = (mod_name, mod)
    return out


def gguf_matrices(lm, arch: str) -> dict[str, object]:
    """GGUF name -> the torch parameter behind it, for every 2-D weight (embedding included;
    tied weights appear once, under their first name)."""
    n_layers = lm.config.num_hidden_layers
    out = {}
    for hf_name, p in lm.named_parameters():
        g = hf_to_gguf_name(arch, n_layers, hf_name)
        if g is not None and p.ndim == 2:
            out[g] = p
    return out
