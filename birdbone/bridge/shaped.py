"""A torch model for any per-layer widths: transformers' Llama modules, resized layer by layer.

transformers (5.24) maps the ``deci`` GGUF keys but has no ``deci`` model class, and its Llama
takes every layer's shapes from one config. :func:`load_shaped_lm` reads a llama or deci GGUF
with our own reader and builds a ``LlamaForCausalLM`` whose layers each get their own widths
(:func:`resize_layer`): smaller q/k/v/o and gate/up/down, the query-per-group count set per
layer, an attention that returns zeros for a layer with no heads (llama.cpp's deci computes
``x + FFN(norm(x))`` there: the same). So a structured file opens again in torch, to be profiled,
healed further and evaluated, and every tool that walks a Llama (peft, hooks) works unchanged.

:func:`cut_lm` cuts a :class:`~birdbone.remodel.surgery.Keep`'s removed units out of a torch model
(values copied; nothing removed gives the same model, bit for bit).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from birdbone.io.dims import Dims, read_dims
from birdbone.io.errors import BirdboneError, InputError


class NoAttention(nn.Module):
    """The attention of a layer with no heads left: it adds nothing to the residual stream."""

    def __init__(self, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx

    def forward(self, hidden_states, *args, **kwargs):
        return torch.zeros_like(hidden_states), None


def layer_widths(lm, i: int) -> tuple[int, int, int]:
    """(query heads, key/value heads, FFN channels) of layer i, read off its modules."""
    layer = lm.model.layers[i]
    hd = lm.config.head_dim
    attn = layer.self_attn
    if isinstance(attn, NoAttention):
        return 0, 0, layer.mlp.gate_proj.out_features
    return attn.q_proj.out_features // hd, attn.k_proj.out_features // hd, layer.mlp.gate_proj.out_features


def lm_dims(lm) -> Dims:
    """The widths of a (possibly resized) transformers Llama."""
    widths = [layer_widths(lm, i) for i in range(len(lm.model.layers))]
    return Dims(lm.config.hidden_size, lm.config.head_dim, *(tuple(w[j] for w in widths) for j in range(3)))


def _linear(n_in: int, n_out: int, like: nn.Linear) -> nn.Linear:
    return nn.Linear(n_in, n_out, bias=like.bias is not None, dtype=like.weight.dtype, device=like.weight.device)


def resize_layer(layer, n_embd: int, head_dim: int, h: int, kv: int, ff: int) -> None:
    """Give one decoder layer these widths (fresh weights; the caller loads values)."""
    attn, mlp = layer.self_attn, layer.mlp
    if h == 0:
        layer.self_attn = NoAttention(attn.layer_idx)
    else:
        attn.q_proj = _linear(n_embd, h * head_dim, attn.q_proj)
        attn.k_proj = _linear(n_embd, kv * head_dim, attn.k_proj)
        attn.v_proj = _linear(n_embd, kv * head_dim, attn.v_proj)
        attn.o_proj = _linear(h * head_dim, n_embd, attn.o_proj)
        attn.num_key_value_groups = h // kv
    mlp.gate_proj, mlp.up_proj = _linear(n_embd, ff, mlp.gate_proj), _linear(n_embd, ff, mlp.up_proj)
    mlp.down_proj = _linear(ff, n_embd, mlp.down_proj)


def build_lm(dims: Dims, vocab: int, rms_eps: float, rope_theta: float, context: int, tied: bool):
    """An untrained ``LlamaForCausalLM`` with ``dims``' per-layer widths (float32, eval mode)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    # the config's head counts only have to be legal: every layer's real widths are set below
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=dims.n_embd, intermediate_size=max(dims.n_ff), num_hidden_layers=dims.n_layer,
                      num_attention_heads=1, num_key_value_heads=1, head_dim=dims.head_dim, rms_norm_eps=rms_eps,
                      rope_parameters={"rope_type": "default", "rope_theta": rope_theta}, max_position_embeddings=context,
                      tie_word_embeddings=tied, bos_token_id=None, eos_token_id=None)
    with torch.device("meta"):
        lm = LlamaForCausalLM(cfg)
    for i, layer in enumerate(lm.model.layers):
        resize_layer(layer, dims.n_embd, dims.head_dim, dims.n_head[i], dims.n_kv[i], dims.n_ff[i])
    lm = lm.to_empty(device="cpu")
    lm.model.rotary_emb = type(lm.model.rotary_emb)(cfg)  # its inv_freq buffer is computed, not loaded
    return lm


def load_shaped_lm(path):
    """A llama or deci GGUF of any per-layer widths as a transformers Llama (float32, eval mode),
    q/k rows brought back to Hugging Face's order per layer."""
    from birdbone.bridge.names import hf_to_gguf_name, unpermute_qk
    from birdbone.io.model_file import open_model

    with open_model(path) as m:
        arch = m.architecture
        dims = read_dims(m)
        if m.meta(f"{arch}.rope.scaling.type") not in (None, "none"):
            raise InputError(m.path, "rope scaling is not supported by the structured torch loader yet")
        lm = build_lm(dims, len(m.meta("tokenizer.ggml.tokens")), float(m.meta(f"{arch}.attention.layer_norm_rms_epsilon")),
                      float(m.meta(f"{arch}.rope.freq_base", 10000.0)), int(m.meta(f"{arch}.context_length", 2048)),
                      "output.weight" not in m.tensors)
        state = {}
        for hf_name, p in lm.state_dict().items():
            if hf_name == "lm_head.weight" and lm.config.tie_word_embeddings:
                continue
            name = hf_to_gguf_name("llama", dims.n_layer, hf_name)
            if name and name.endswith("attn_norm.weight") and dims.n_head[int(name.split(".")[1])] == 0:
                state[hf_name] = torch.ones_like(p, device="cpu")  # an attention-free layer has no attention norm (unused)
                continue
            if name is None or name not in m.tensors:
                raise InputError(m.path, f"has no tensor for {hf_name} (a {dims.n_layer}-layer model of these widths needs {name})")
            w = m.tensor(name).astype(np.float32)
            i = int(name.split(".")[1]) if name.startswith("blk.") else -1
            if name.endswith("attn_q.weight"):
                w = unpermute_qk(w, dims.n_head[i], dims.n_head[i])
            elif name.endswith("attn_k.weight"):
                w = unpermute_qk(w, dims.n_head[i], dims.n_kv[i])
            if tuple(w.shape) != tuple(p.shape):
                raise InputError(m.path, f"{name} has shape {w.shape}, the widths say {tuple(p.shape)}")
            state[hf_name] = torch.from_numpy(np.ascontiguousarray(w))
    missing, unexpected = lm.load_state_dict(state, strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        raise BirdboneError(f"{path}: weights do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    if lm.config.tie_word_embeddings:
        lm.lm_head.weight = lm.model.embed_tokens.weight
    lm.birdbone_dims = dims
    return lm.eval()


def cut_lm(lm, keep):
    """A copy of the torch Llama ``lm`` with ``keep``'s removed units cut out (the same widths
    everywhere but what was removed; with nothing removed, the same model bit for bit)."""
    import copy

    k = keep.settled()
    k.check()
    hd = lm.config.head_dim
    new = copy.deepcopy(lm)
    hidden = torch.from_numpy(k.hidden)
    scale = math.sqrt(k.dims.n_embd / int(k.hidden.sum()))

    def take(lin: nn.Linear, rows, cols) -> nn.Linear:
        rows = torch.ones(lin.out_features, dtype=torch.bool) if rows is None else torch.as_tensor(rows)
        cols = torch.ones(lin.in_features, dtype=torch.bool) if cols is None else torch.as_tensor(cols)
        out = _linear(int(cols.sum()), int(rows.sum()), lin)
        out.weight.data = lin.weight.data[rows][:, cols].clone()
        if lin.bias is not None:
            out.bias.data = lin.bias.data[rows].clone()
        return out

    layers = []
    for i, layer in enumerate(new.model.layers):
        if not k.layers[i]:
            continue
        attn, mlp = layer.self_attn, layer.mlp
        if not k.heads[i].any():
            layer.self_attn = NoAttention(len(layers))
        elif not isinstance(attn, NoAttention):
            heads, groups = np.repeat(k.heads[i], hd), np.repeat(k.groups[i], hd)
            attn.q_proj, attn.k_proj = take(attn.q_proj, heads, k.hidden), take(attn.k_proj, groups, k.hidden)
            attn.v_proj, attn.o_proj = take(attn.v_proj, groups, k.hidden), take(attn.o_proj, k.hidden, heads)
            attn.num_key_value_groups = int(k.heads[i].sum()) // int(k.groups[i].sum())
            attn.layer_idx = len(layers)
        mlp.gate_proj, mlp.up_proj = take(mlp.gate_proj, k.ffn[i], k.hidden), take(mlp.up_proj, k.ffn[i], k.hidden)
        mlp.down_proj = take(mlp.down_proj, k.hidden, k.ffn[i])
        for norm in (layer.input_layernorm, layer.post_attention_layernorm):
            norm.weight.data = norm.weight.data[hidden].clone() * scale
        layers.append(layer)
    new.model.layers = nn.ModuleList(layers)
    new.config.num_hidden_layers = len(layers)
    if not k.hidden.all():
        new.model.norm.weight.data = new.model.norm.weight.data[hidden].clone() * scale
        emb = new.model.embed_tokens
        emb.weight = nn.Parameter(emb.weight.data[:, hidden].clone(), requires_grad=emb.weight.requires_grad)
        emb.embedding_dim = int(hidden.sum())
        if new.config.tie_word_embeddings:
            new.lm_head.weight = emb.weight
        else:
            new.lm_head = take(new.lm_head, None, k.hidden)
        new.config.hidden_size = int(hidden.sum())
    return new.eval()
