"""The organ table: every tensor kind birdbone knows, its anatomical role, and the source names
that mean it. Pure data, read by :mod:`birdbone.anatomy.roles`; no code runs here.

It is kept as a Python literal rather than JSON so each odd name can carry its reason in a
comment, and so it ships with the package without a package-data entry.

Organ names are gguf-py's tensor kind names: the GGUF name with ``blk.N.`` and the
``.weight``/``.bias`` suffix removed (``attn_q``, ``ffn_down_exps``, ``output_norm``).

How a name is read (see ``roles.classify``):

1. A segment matching ``ADAPTER_MARKERS`` (``lora_A``, ``lora_b``, ...) makes the tensor an
   ``adapter``; the segments before the marker name the organ it adapts.
2. One trailing segment in ``SUFFIXES`` is dropped (``weight``, ``bias``, quantizer sidecars).
3. The layer is the number after the first segment in ``LAYER_CONTAINERS`` (``blk.3.``,
   ``layers.3.``, ``layer.3.``, ``h.3.``, ...). For a layer tensor the rest of the name (the
   tail), with an expert index after ``experts`` removed, must equal one of the organ's
   ``block`` names exactly. Whatever sits before the layer is ignored, so
   ``language_model.model.layers.3.self_attn.q_proj`` and ``enc.blk.3.attn_q`` both work.
4. A name without a layer matches the organ's ``model`` names by its longest dotted suffix:
   ``bert.embeddings.LayerNorm`` finds ``embeddings.LayerNorm`` (token_embd_norm) before the
   bare ``norm`` (output_norm) would ever be tried.
5. Otherwise the ``FALLBACKS`` regexes (full match, first wins) give a role, else the tensor is
   ``other`` with organ ``unknown``. Nothing is dropped.

The block and model names come from gguf-py's ``tensor_mapping.py`` (0.19) for llama, qwen2,
qwen3, gemma2, gemma3, phi3, deepseek2, deci and bert, which pulls in the other families'
spellings of those same kinds; ``tests/test_anatomy_roles.py`` checks every one of them against
gguf-py. Model names are kept in their shortest form that stays unambiguous (``wte`` covers
``transformer.wte`` and ``model.transformer.wte``).
"""

# Trailing segments that say which part of an organ a tensor is, not which organ.
SUFFIXES = (
    "weight", "bias", "scale",
    # quantizer sidecars (FP8 block scales, GPTQ/AWQ, compressed-tensors): same organ
    "weight_scale", "weight_scale_inv", "input_scale", "weight_packed", "weight_shape",
    "weight_zero_point", "qweight", "qzeros", "scales", "g_idx",
)

# A segment here followed by a number marks a layer: `blk.3.` (GGUF), `layers.3.` (llama-hf,
# llama-pth), `layer.3.` (bert), `h.3.` (gpt2, bloom, falcon). The others are spellings in
# gguf-py's map (rwkv/mpt/dbrx `blocks`, grok `decoder_layer`, `transformer_encoder`).
LAYER_CONTAINERS = ("blk", "layers", "layer", "h", "blocks", "decoder_layer", "transformer_encoder")

# A number right after one of these in a layer tail is an expert index (Mixtral, Qwen-MoE,
# DeepSeek store one tensor per expert; GGUF stacks them into one `*_exps` tensor).
EXPERT_CONTAINERS = ("experts",)

# Full-match regexes over one dotted segment. PEFT: `q_proj.lora_A.weight`,
# `q_proj.lora_A.default.weight`, `embed_tokens.lora_embedding_A`, DoRA's
# `lora_magnitude_vector`; llama.cpp LoRA GGUF: `blk.3.attn_q.weight.lora_a`.
ADAPTER_MARKERS = (
    r"lora_[ABab]",
    r"lora_embedding_[AB]",
    r"lora_magnitude_vector",
)

# organ -> {"role", "block": exact layer tails, "model": non-layer names, matched by suffix}
ORGANS = {
    # ---- skeleton: attention -------------------------------------------------------------
    "attn_q": {"role": "skeleton", "block": [
        "attn_q", "self_attn.q_proj", "self_attn.q_proj_no_perm", "attention.wq",
        "attention.self.query", "attention.q_lin", "attn.q_proj", "multi_head_attention.query",
        "attn.attention.q_proj", "q_proj", "mixer.q_proj",
    ]},
    "attn_k": {"role": "skeleton", "block": [
        "attn_k", "self_attn.k_proj", "self_attn.k_proj_no_perm", "attention.wk",
        "attention.self.key", "attention.k_lin", "attn.k_proj", "attn.k",
        "multi_head_attention.key", "attn.attention.k_proj", "k_proj", "mixer.k_proj",
    ]},
    "attn_v": {"role": "skeleton", "block": [
        "attn_v", "self_attn.v_proj", "attention.wv", "attention.self.value", "attention.v_lin",
        "attn.v_proj", "attn.v", "multi_head_attention.value", "attn.attention.v_proj", "v_proj",
        "mixer.v_proj",
    ]},
    "attn_qkv": {"role": "skeleton", "block": [
        # phi3 `qkv_proj`, gpt2 `c_attn`, falcon/bloom `query_key_value`: q, k, v fused
        "attn_qkv", "self_attn.qkv_proj", "attention.query_key_value", "attn.c_attn", "attn.Wqkv",
        "norm_attn_norm.attn.Wqkv", "self_attention.query_key_value",
        "self_attn.query_key_value", "mixer.Wqkv", "mixer.qkv_proj", "attn.qkv_proj", "qkv",
        "self_attn.language_expert_query_key_value", "linear_attn.in_proj_qkv",
    ]},
    "attn_output": {"role": "skeleton", "block": [
        "attn_output", "self_attn.o_proj", "attention.wo", "attention.output.dense",
        "attention.dense", "attn.c_proj", "attn.out_proj", "self_attention.dense",
        "self_attn.out_proj", "attn.Wo", "attention.out_lin", "self_attn.dense",
        "mixer.out_proj", "mixer.o_proj", "multi_head_attention.linear",
        "norm_attn_norm.attn.out_proj", "attn.attention.out_proj", "wo", "attn_out",
        "self_attn.language_expert_dense",
        "self_attn.linear_attn",  # deci: a layer whose attention is one linear map
    ]},
    # MLA (deepseek2): low-rank q and a shared compressed kv, then per-head k/v up-projections
    "attn_q_a": {"role": "skeleton", "block": ["attn_q_a", "self_attn.q_a_proj", "attention.wq_a"]},
    "attn_q_b": {"role": "skeleton", "block": ["attn_q_b", "self_attn.q_b_proj", "attention.wq_b"]},
    "attn_kv_a_mqa": {"role": "skeleton", "block": [
        "attn_kv_a_mqa", "self_attn.kv_a_proj_with_mqa", "attention.wkv_a_with_mqa",
    ]},
    "attn_kv_b": {"role": "skeleton", "block": ["attn_kv_b", "self_attn.kv_b_proj"]},
    "attn_k_b": {"role": "skeleton", "block": [
        "attn_k_b", "self_attn.k_b_proj", "attention.k_b_proj",
    ]},
    "attn_v_b": {"role": "skeleton", "block": [
        "attn_v_b", "self_attn.v_b_proj", "attention.v_b_proj",
    ]},

    # ---- organ: feed-forward, experts, router --------------------------------------------
    "ffn_gate": {"role": "organ", "block": [
        "ffn_gate", "mlp.gate_proj", "feed_forward.w1", "feed_forward.gate_proj", "mlp.w2",
        "mlp.c_fc2", "mlp.fc12", "mlp.gated_layers_w", "mlp.linear_1", "residual_mlp.w1",
        "mlp.c_fc_0", "ff_proj", "mlp.language_mlp.gate_proj",
    ]},
    "ffn_up": {"role": "organ", "block": [
        "ffn_up", "mlp.up_proj", "feed_forward.w3", "feed_forward.up_proj",
        "intermediate.dense",  # bert
        # phi3 fuses gate and up into one `gate_up_proj`; llama.cpp stores it whole as ffn_up
        "mlp.gate_up_proj",
        "mlp.dense_h_to_4h", "mlp.c_fc", "ffn.up_proj", "mlp.Wi", "ffn.lin1", "mlp.fc_in",
        "mlp.linear_3", "mlp.w1", "mlp.fc1", "mlp.fc11", "mlp.gated_layers_v",
        "mlp.gated_layers", "mlp.up_gated_layer", "residual_mlp.w3", "mlp.c_fc_1", "ffn.w12",
        "block_sparse_moe.up", "up_proj", "mixer.up_proj", "mlp.language_mlp.up_proj",
    ]},
    "ffn_down": {"role": "organ", "block": [
        "ffn_down", "mlp.down_proj", "feed_forward.w2", "feed_forward.down_proj",
        "output.dense",  # bert: the FFN output, not attention (that is attention.output.dense)
        "mlp.dense_4h_to_h", "mlp.c_proj", "ffn.down_proj", "mlp.Wo", "ffn.lin2", "mlp.fc_out",
        "mlp.fc2", "mlp.wo", "ffn.proj_2", "residual_mlp.w2", "mlp.down_layer", "ffn.w3",
        "block_sparse_moe.down", "ff_out", "mixer.down_proj", "mlp.language_mlp.down_proj",
    ]},
    "ffn_gate_exps": {"role": "organ", "block": [
        "ffn_gate_exps", "mlp.experts.gate_proj", "block_sparse_moe.experts.w1",
        "feed_forward.experts.w1", "feed_forward.experts.gate_proj", "moe.linear",
        "ffn.experts.mlp.w1", "block_sparse_moe.experts.gate", "moe.gate_proj",
    ]},
    "ffn_up_exps": {"role": "organ", "block": [
        "ffn_up_exps", "mlp.experts.up_proj", "block_sparse_moe.experts.w3",
        "feed_forward.experts.w3", "feed_forward.experts.up_proj", "moe.linear_v",
        "ffn.experts.mlp.v1", "mlp.experts.mlp.w1", "block_sparse_moe.experts.up", "moe.up_proj",
    ]},
    "ffn_down_exps": {"role": "organ", "block": [
        "ffn_down_exps", "mlp.experts.down_proj", "block_sparse_moe.experts.w2",
        "feed_forward.experts.w2", "feed_forward.experts.down_proj", "moe.linear_1",
        "ffn.experts.mlp.w2", "block_sparse_moe.output_linear", "mlp.experts.mlp.w2",
        "block_sparse_moe.experts.down", "moe.down_proj", "experts.down_proj",
    ]},
    "ffn_gate_shexp": {"role": "organ", "block": [
        "ffn_gate_shexp", "mlp.shared_experts.gate_proj", "mlp.shared_expert.gate_proj",
        "feed_forward.shared_expert.gate_proj", "mlp.shared_mlp.gate_proj", "shared_experts.w1",
        "block_sparse_moe.shared_experts.gate_proj", "share_expert.gate_proj",
    ]},
    "ffn_up_shexp": {"role": "organ", "block": [
        "ffn_up_shexp", "mlp.shared_experts.up_proj", "mlp.shared_expert.up_proj",
        "feed_forward.shared_expert.up_proj", "mlp.shared_mlp.up_proj", "shared_experts.w3",
        "mixer.shared_experts.up_proj", "block_sparse_moe.shared_experts.up_proj",
        "share_expert.up_proj",
    ]},
    "ffn_down_shexp": {"role": "organ", "block": [
        "ffn_down_shexp", "mlp.shared_experts.down_proj", "mlp.shared_expert.down_proj",
        "feed_forward.shared_expert.down_proj", "shared_mlp.output_linear",
        "mlp.shared_mlp.down_proj", "shared_experts.w2", "mixer.shared_experts.down_proj",
        "block_sparse_moe.shared_experts.down_proj", "share_expert.down_proj",
    ]},
    # The router: deepseek and qwen-moe call it `mlp.gate` (a Linear), not to be confused
    # with the FFN's `mlp.gate_proj`.
    "ffn_gate_inp": {"role": "organ", "block": [
        "ffn_gate_inp", "mlp.gate", "block_sparse_moe.gate", "feed_forward.gate", "router",
        "ffn.router.layer", "block_sparse_moe.router.layer", "feed_forward.router",
        "mlp.router.layer", "mlp.router", "mlp.gate.wg", "block_sparse_moe.primary_router",
        "mlp.router.gate", "gate", "mixer.gate", "moe.gate", "router.proj",
    ]},
    "ffn_gate_inp_shexp": {"role": "organ", "block": [
        "ffn_gate_inp_shexp", "mlp.shared_expert_gate",  # qwen2moe: a sigmoid gate on the shared expert
    ]},
    # Per-expert bias added to the router's scores before top-k (deepseek v3's
    # aux-loss-free balancing). HF stores `e_score_correction_bias` with `_bias` in the segment.
    "exp_probs_b": {"role": "organ", "block": [
        "exp_probs_b", "mlp.gate.e_score_correction", "mlp.gate.e_score_correction_bias",
        "mlp.moe_statics.e_score_correction", "mlp.gate.expert_bias", "mlp.expert_bias",
        "feed_forward.expert_bias", "block_sparse_moe.e_score_correction",
        "block_sparse_moe.e_score_correction_bias", "mixer.gate.e_score_correction",
        "mlp.e_score_correction", "block_sparse_moe.gate.e_score_correction",
        "moe.router_bias",
    ]},

    # ---- embed: token and position embeddings, output heads ------------------------------
    "token_embd": {"role": "embed", "model": [
        "token_embd", "embed_tokens", "word_embeddings", "tok_embeddings", "wte", "embed_in",
        "embedding", "embeddings", "in_out_embed", "token_embeddings",
        "shared", "encoder",  # t5 keeps its embedding under these bare names
    ]},
    "position_embd": {"role": "embed", "model": [
        "position_embd", "wpe", "position_embeddings", "embed_positions",
    ]},
    "token_types": {"role": "embed", "model": ["token_types", "token_type_embeddings"]},
    "output": {"role": "embed", "model": [
        "output", "lm_head", "embed_out", "word_embeddings_for_head", "lm_head.linear",
        "output_layer", "head", "head.out", "head.decoder", "ff_out",
    ]},
    # Classification heads (bert rerankers) count as output heads: they read the last hidden
    # state the way `output` does. `dense` alone is the pooler-style projection before them.
    "cls": {"role": "embed", "model": ["cls", "classifier", "pre_classifier", "dense"]},
    "cls.output": {"role": "embed", "model": ["cls.output", "classifier.out_proj"]},

    # ---- norm ----------------------------------------------------------------------------
    "attn_norm": {"role": "norm", "block": [
        "attn_norm", "input_layernorm", "attention_norm", "ln_1", "norm_1", "ln_mlp", "ln1",
        "ln", "norm", "pre_mixer_norm", "rms_norm", "pre_attn_norm", "norm_attn_norm.norm_1",
        "operator_norm", "attention_layernorm", "pre_attention_layernorm",
    ]},
    "ffn_norm": {"role": "norm", "block": [
        "ffn_norm",
        # See AMBIGUOUS: gemma2/3 use this name for the norm *after* attention.
        "post_attention_layernorm",
        "pre_feedforward_layernorm", "ln_2", "norm_2", "ln2", "rms_norm_2", "pre_moe_norm",
        "pre_ff_layernorm", "pre_moe_layernorm", "pre_mlp_norm", "ff_norm",
        "feedforward_layernorm", "pre_mlp_layernorm", "mlp_norm",
    ]},
    "post_attention_norm": {"role": "norm", "block": [
        "post_attention_norm", "post_self_attn_layernorm",
        "post_mixer_norm",  # plamo2 (gguf-py lists it with its `.weight`)
    ]},
    "post_ffw_norm": {"role": "norm", "block": [
        "post_ffw_norm", "post_feedforward_layernorm", "post_mlp_layernorm", "post_mlp_norm",
        "post_moe_norm",
    ]},
    "attn_q_norm": {"role": "norm", "block": [
        "attn_q_norm", "self_attn.q_norm", "self_attention.q_layernorm", "self_attn.q_layernorm",
        "self_attn.query_layernorm", "attention.query_layernorm", "attn.q_ln",
        "attention.self.layer_norm_q", "attn.q_norm", "mixer.q_norm",
        "mixer.q",  # plamo2 names its q norm `mixer.q_weight`; gguf-py maps the stem `mixer.q`
    ]},
    "attn_k_norm": {"role": "norm", "block": [
        "attn_k_norm", "self_attn.k_norm", "self_attention.k_layernorm", "self_attn.k_layernorm",
        "self_attn.key_layernorm", "attention.key_layernorm", "attn.k_ln",
        "attention.self.layer_norm_k", "attn.k_norm", "mixer.k_norm",
        "mixer.k",  # plamo2, as mixer.q
    ]},
    "attn_q_a_norm": {"role": "norm", "block": [
        "attn_q_a_norm", "self_attn.q_a_layernorm", "attention.q_a_norm",
    ]},
    "attn_kv_a_norm": {"role": "norm", "block": [
        "attn_kv_a_norm", "self_attn.kv_a_layernorm", "attention.kv_a_norm",
    ]},
    # bert: post-norm blocks. The norm after attention, and the one closing the layer.
    "attn_output_norm": {"role": "norm", "block": [
        "attn_output_norm", "attention.output.LayerNorm", "sa_layer_norm", "norm1", "rms_norm_1",
        "post_attn_norm", "norm_attn_norm.norm_2",
    ]},
    "layer_output_norm": {"role": "norm", "block": [
        "layer_output_norm", "output.LayerNorm", "output_layer_norm", "norm2", "rms_norm_3",
        "mlp.layernorm", "layer_norm_2", "final_layernorm",
    ]},
    "output_norm": {"role": "norm", "model": [
        "output_norm", "norm", "final_layer_norm", "final_layernorm", "ln_f", "norm_f",
        "rms_norm", "ln_out", "final_norm", "lm_head.ln",
    ]},
    # The norm right after the embedding. Two families keep it inside layer 0's namespace
    # (`model.layers.0.pre_norm`, rwkv `blocks.0.pre_ln`), hence the block names too.
    "token_embd_norm": {"role": "norm", "model": [
        "token_embd_norm", "embeddings.LayerNorm", "embeddings.norm", "word_embeddings_layernorm",
        "emb_ln", "pre_ln", "backbone.norm", "embedding_norm",
    ], "block": ["pre_norm", "pre_ln"]},

    # ---- other: rope tables (computed from the config, not learned) ----------------------
    "rope_freqs": {"role": "other", "model": ["rope_freqs", "rope.freqs", "inv_freq"],
                   "block": ["self_attention.rotary_emb.inv_freq"]},
    "rope_factors_long": {"role": "other", "model": ["rope_factors_long"]},
    "rope_factors_short": {"role": "other", "model": ["rope_factors_short"]},
    "attn_rot_embd": {"role": "other", "block": [
        "attn_rot_embd", "self_attn.rotary_emb.inv_freq", "attn.rotary_emb.inv_freq",
        "attention.inner_attention.rope.freqs",
    ]},
}

# Layer tails that gguf-py maps to different kinds depending on the architecture. The table
# lists each under its first kind; the others are the alternatives gguf-py may give.
AMBIGUOUS = {
    # llama, qwen2/3, phi3, deepseek2, deci: the norm before the FFN. gemma2/3 put a norm after
    # attention *and* one before the FFN (`pre_feedforward_layernorm`), and gguf-py maps this
    # name to post_attention_norm there. The role is `norm` either way; callers that need the
    # gemma reading can rename by architecture.
    "post_attention_layernorm": ("ffn_norm", "post_attention_norm"),
}

# Tried in order on the whole stem (suffix and adapter marker removed) when the table has no
# match. `organ` is either given or taken from the `organ` group; else "unknown".
FALLBACKS = (
    # GGUF names are kind names already: an unlisted `blk.N.*_norm` (ssm_norm, attn_sub_norm,
    # ...) keeps its own name as organ.
    {"pattern": r"(?:.+\.)?blk\.\d+\.(?P<organ>\w*norm)", "role": "norm"},
    {"pattern": r"(?:.+\.)?blk\.\d+\.(?P<organ>ffn_\w+_(?:exps|chexps|shexp))", "role": "organ"},
    # Any other name whose last segment reads as a norm (LayerNorm, q_ln, ln_f, norm3, ...).
    {"pattern": r"(?:.+\.)?(?:\w*[Nn]orm\w*|(?:\w+_)?ln(?:_\w+|\d+)?)", "role": "norm", "organ": "norm"},
    # Rotary tables under names the table does not list.
    {"pattern": r"(?:.+\.)?(?:inv_freq|rope_\w+)", "role": "other", "organ": "rope_freqs"},
)
