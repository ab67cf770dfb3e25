"""Test helper: the GGUF metadata keys llama.cpp's converter writes per family (the
set_gguf_parameters of its model classes; gguf_writer.py holds the tensors and the vocabulary).
Each writer adds its family's keys to `w` (a gguf.GGUFWriter) and returns the tensor-name
transformations it needs."""
from __future__ import annotations

import math

import gguf
import torch

# ---- metadata, one function per converter class ------------------------------------------
def _text_model(w, hp: dict, rope: dict) -> None:
    """TextModel.set_gguf_parameters."""
    w.add_block_count(hp["num_hidden_layers"])
    w.add_context_length(hp["max_position_embeddings"])
    w.add_embedding_length(hp["hidden_size"])
    w.add_feed_forward_length(hp["intermediate_size"])
    w.add_head_count(hp["num_attention_heads"])
    w.add_head_count_kv(hp["num_key_value_heads"])
    kind, factor = rope.get("rope_type"), rope.get("factor")
    if kind == "linear" and factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(factor)
    elif kind == "yarn" and factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(factor)
        w.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
        for key, add in (("extrapolation_factor", w.add_rope_scaling_yarn_ext_factor),
                         ("attention_factor", w.add_rope_scaling_yarn_attn_factor),
                         ("beta_fast", w.add_rope_scaling_yarn_beta_fast),
                         ("beta_slow", w.add_rope_scaling_yarn_beta_slow)):
            if rope.get(key) is not None:
                add(rope[key])
    elif kind == "longrope":
        w.add_rope_scaling_type(gguf.RopeScalingType.LONGROPE)
    if rope.get("rope_theta") is not None:
        w.add_rope_freq_base(rope["rope_theta"])
    w.add_layer_norm_rms_eps(hp["rms_norm_eps"])
    experts = hp.get("num_local_experts", hp.get("num_experts"))
    if experts is not None:
        w.add_expert_count(experts)
    if hp.get("num_experts_per_tok") is not None:
        w.add_expert_used_count(hp["num_experts_per_tok"])
    if hp.get("head_dim") is not None:
        w.add_key_length(hp["head_dim"])
        w.add_value_length(hp["head_dim"])


def _llama(w, hp: dict, rope: dict) -> list:
    """LlamaModel.set_gguf_parameters / generate_extra_tensors."""
    _text_model(w, hp, rope)
    w.add_vocab_size(hp["vocab_size"])
    dim = hp.get("head_dim") or hp["hidden_size"] // hp["num_attention_heads"]
    w.add_rope_dimension_count(dim)
    if hp.get("sliding_window"):                      # ours, see the module docstring
        w.add_sliding_window(hp["sliding_window"])
    if rope.get("rope_type") != "llama3":
        return []
    base, factor = rope.get("rope_theta", 10000.0), rope.get("factor", 8.0)
    lo, hi = rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old = rope.get("original_max_position_embeddings", 8192)
    factors = []
    for freq in 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)):
        wavelen = 2 * math.pi / float(freq)
        if wavelen < old / hi:
            factors.append(1.0)
        elif wavelen > old / lo:
            factors.append(factor)
        else:
            smooth = (old / wavelen - lo) / (hi - lo)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return [("rope_freqs.weight", factors)]


def _llama4(w, hp: dict, rope: dict) -> list:
    """Llama4Model: intermediate_size_mlp as feed_forward_length, the experts' intermediate_size
    as expert_feed_forward_length, interleave_moe_layer_step; LlamaModel's keys otherwise."""
    extra = _llama(w, {**hp, "intermediate_size": hp["intermediate_size_mlp"]}, rope)
    w.add_interleave_moe_layer_step(hp["interleave_moe_layer_step"])
    w.add_expert_feed_forward_length(hp["intermediate_size"])
    return extra


def _qwen(w, hp: dict, rope: dict) -> list:
    """Qwen2Model / Qwen3Model.set_gguf_parameters: the TextModel keys only."""
    _text_model(w, hp, rope)
    return []


def _qwen_moe(w, hp: dict, rope: dict) -> list:
    """Qwen2MoeModel.set_gguf_parameters (Qwen3MoeModel inherits it)."""
    _text_model(w, hp, rope)
    if hp.get("moe_intermediate_size") is not None:
        w.add_expert_feed_forward_length(hp["moe_intermediate_size"])
    if hp.get("shared_expert_intermediate_size") is not None:
        w.add_expert_shared_feed_forward_length(hp["shared_expert_intermediate_size"])
    return []


def _phi3(w, hp: dict, rope: dict) -> list:
    """Phi3MiniModel.set_gguf_parameters / generate_extra_tensors (no super() call)."""
    n_embd, n_head = hp["hidden_size"], hp["num_attention_heads"]
    max_pos = hp["max_position_embeddings"]
    orig = rope.get("original_max_position_embeddings", hp.get("original_max_position_embeddings"))
    rot_pct = rope.get("partial_rotary_factor", hp.get("partial_rotary_factor") or 1.0)
    rope_dims = int(rot_pct * n_embd) // n_head
    w.add_context_length(max_pos)
    w.add_rope_scaling_orig_ctx_len(orig)
    w.add_embedding_length(n_embd)
    w.add_feed_forward_length(hp["intermediate_size"])
    w.add_block_count(hp["num_hidden_layers"])
    w.add_head_count(n_head)
    w.add_head_count_kv(hp["num_key_value_heads"])
    w.add_layer_norm_rms_eps(hp["rms_norm_eps"])
    w.add_rope_dimension_count(rope_dims)
    w.add_rope_freq_base(rope["rope_theta"])
    w.add_sliding_window(hp.get("sliding_window") or 0)
    long, short = rope.get("long_factor"), rope.get("short_factor")
    if not long:
        return []
    scale = max_pos / orig
    if rope["rope_type"] in ("su", "longrope"):
        attn = math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1.0 else 1.0
    else:
        attn = 0.1 * math.log(scale) + 1.0 if scale > 1.0 else 1.0
    w.add_rope_scaling_attn_factors(attn)
    assert len(long) == len(short) == rope_dims // 2
    return [("rope_factors_long.weight", long), ("rope_factors_short.weight", short)]


def _gemma2(w, hp: dict, rope: dict) -> list:
    """Gemma2Model.set_gguf_parameters (no super() call: no rope.freq_base)."""
    w.add_context_length(hp["max_position_embeddings"])
    w.add_embedding_length(hp["hidden_size"])
    w.add_block_count(hp["num_hidden_layers"])
    w.add_feed_forward_length(hp["intermediate_size"])
    w.add_head_count(hp["num_attention_heads"])
    w.add_head_count_kv(hp.get("num_key_value_heads", hp["num_attention_heads"]))
    w.add_layer_norm_rms_eps(hp["rms_norm_eps"])
    w.add_key_length(hp["head_dim"])
    w.add_value_length(hp["head_dim"])
    w.add_attn_logit_softcapping(hp["attn_logit_softcapping"])
    w.add_final_logit_softcapping(hp["final_logit_softcapping"])
    w.add_sliding_window(hp["sliding_window"])
    return []


def _glm4_moe(w, hp: dict, rope: dict) -> list:
    """Glm4MoeModel.set_gguf_parameters (no NextN layers here)."""
    _text_model(w, hp, rope)
    head_dim = hp.get("head_dim") or hp["hidden_size"] // hp["num_attention_heads"]
    w.add_rope_dimension_count(int(head_dim * rope.get("partial_rotary_factor", 0.5)))
    w.add_expert_count(hp["n_routed_experts"])
    w.add_expert_feed_forward_length(hp["moe_intermediate_size"])
    w.add_expert_shared_count(hp["n_shared_experts"])
    w.add_leading_dense_block_count(hp["first_k_dense_replace"])
    w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    w.add_expert_weights_scale(hp["routed_scaling_factor"])
    w.add_expert_weights_norm(hp["norm_topk_prob"])
    return []


def _granite(w, hp: dict, rope: dict) -> list:
    """GraniteModel.set_gguf_parameters: LlamaModel's keys without head_dim, the multipliers
    as *_scale where non-zero."""
    out = _llama(w, {k: v for k, v in hp.items() if k != "head_dim"}, rope)
    for key, add in (("attention_multiplier", w.add_attention_scale),
                     ("embedding_multiplier", w.add_embedding_scale),
                     ("residual_multiplier", w.add_residual_scale),
                     ("logits_scaling", w.add_logit_scale)):
        if hp.get(key):
            add(hp[key])
    return out


def _gpt_oss(w, hp: dict, rope: dict) -> list:
    """GptOssModel.set_gguf_parameters: TextModel's keys (yarn), the window, the experts'
    width."""
    _text_model(w, hp, rope)
    w.add_sliding_window(hp["sliding_window"])
    w.add_expert_feed_forward_length(hp["intermediate_size"])
    return []


def _olmo2(w, hp: dict, rope: dict) -> list:
    """Olmo2Model.set_gguf_parameters (OLMo-2 and OLMo-3): TextModel's keys, and for OLMo-3
    the window with a per-layer sliding_window_pattern."""
    _text_model(w, hp, rope)
    if hp.get("sliding_window"):
        w.add_sliding_window(hp["sliding_window"])
        w.add_sliding_window_pattern([t == "sliding_attention" for t in hp["layer_types"]])
    return []


def _gemma3(w, hp: dict, rope: dict) -> list:
    """Gemma3Model.set_gguf_parameters: TextModel's keys, then head_dim, the global rope
    base, a final soft-cap where there is one and the window (llama.cpp fixes the pattern)."""
    _text_model(w, hp, rope)
    if hp.get("final_logit_softcapping"):
        w.add_final_logit_softcapping(hp["final_logit_softcapping"])
    w.add_sliding_window(hp["sliding_window"])
    return []


METADATA = {"llama": _llama, "mistral": _llama, "qwen2": _qwen, "qwen3": _qwen,
             "phi3": _phi3, "gemma2": _gemma2, "gemma3_text": _gemma3, "smollm3": _llama,
             "olmo2": _olmo2, "olmo3": _olmo2, "glm4_moe": _glm4_moe, "olmoe": _qwen,
             "gpt_oss": _gpt_oss, "granite": _granite,
             "mixtral": _llama, "llama4_text": _llama4,
             "qwen2_moe": _qwen_moe, "qwen3_moe": _qwen_moe}
