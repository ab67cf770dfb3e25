"""What differs between the GGUF architectures flexrun reads, as llama.cpp writes and reads them.

Each entry undoes what llama.cpp's convert_hf_to_gguf.py (conversion/*.py upstream) did to an HF
checkpoint: the tensor names (gguf-py/gguf/tensor_mapping.py), the q/k row permutation, the +1
on Gemma norms, and which config.json values it kept in the metadata and how src/llama-model.cpp
reads them back (defaults included). The result is what transformers' config.json and state dict
hold for the family.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

# blk.N.<gguf name> -> model.layers.N.<HF name> (gguf-py tensor_mapping.py, MODEL_TENSORS)
_ATTN_MLP = {
    "attn_norm": "input_layernorm", "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
}
# Mixture of experts: each layer's experts stacked in one tensor (ffn_*_exps, HF shape (E, ffn,
# hidden) / (E, hidden, ffn) once the GGUF dims are reversed), named here per expert ("{e}",
# gguf.py splits them), router ffn_gate_inp; Qwen2-MoE's shared expert ffn_*_shexp and its gate
# ffn_gate_inp_shexp. Mixtral (LlamaModel.modify_tensors stacks block_sparse_moe.experts.N.w1 /
# w2 / w3 as ffn_gate / ffn_down / ffn_up_exps) is the llama architecture with experts.
MIXTRAL_EXPERTS = {"ffn_gate_inp": "block_sparse_moe.gate",
                   "ffn_gate_exps": "block_sparse_moe.experts.{e}.w1",
                   "ffn_up_exps": "block_sparse_moe.experts.{e}.w3",
                   "ffn_down_exps": "block_sparse_moe.experts.{e}.w2"}
QWEN_EXPERTS = {"ffn_gate_inp": "mlp.gate", "ffn_gate_exps": "mlp.experts.{e}.gate_proj",
                "ffn_up_exps": "mlp.experts.{e}.up_proj",
                "ffn_down_exps": "mlp.experts.{e}.down_proj",
                "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
                "ffn_up_shexp": "mlp.shared_expert.up_proj",
                "ffn_down_shexp": "mlp.shared_expert.down_proj",
                "ffn_gate_inp_shexp": "mlp.shared_expert_gate"}
DENSE_LAYERS = {**_ATTN_MLP, "ffn_norm": "post_attention_layernorm"}
LLAMA_LAYERS = {**DENSE_LAYERS, **MIXTRAL_EXPERTS}
# Qwen3: q_norm / k_norm -> attn_q_norm / attn_k_norm (MODEL_TENSOR.ATTN_Q_NORM, ATTN_K_NORM)
_QK_NORMS = {"attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm"}
QWEN3_LAYERS = {**DENSE_LAYERS, **_QK_NORMS}
QWEN2_MOE_LAYERS = {**DENSE_LAYERS, **QWEN_EXPERTS}
QWEN3_MOE_LAYERS = {**QWEN2_MOE_LAYERS, **_QK_NORMS}
OLMOE_LAYERS = QWEN3_MOE_LAYERS         # (its q/k norms span all heads: same tensor names)
# gpt-oss: sinks, the router ffn_gate_inp (with a bias), experts de-interleaved by the converter
# into ffn_gate_exps / ffn_up_exps / ffn_down_exps (each with a bias), post_attention_norm the
# norm before the MLP
GPT_OSS_LAYERS = {**_ATTN_MLP, "post_attention_norm": "post_attention_layernorm",
                  "attn_sinks": "self_attn.sinks", "ffn_gate_inp": "mlp.router",
                  "ffn_gate_exps": "mlp.experts.{e}.gate_proj",
                  "ffn_up_exps": "mlp.experts.{e}.up_proj",
                  "ffn_down_exps": "mlp.experts.{e}.down_proj"}
# Phi-3 keeps HF's fused tensors: qkv_proj -> attn_qkv, gate_up_proj -> ffn_up (holding
# [gate; up], llama-model.cpp loads it as {n_embd, 2 * n_ff} and runs LLM_FFN_SWIGLU on it)
PHI3_LAYERS = {"attn_norm": "input_layernorm", "attn_qkv": "self_attn.qkv_proj",
               "attn_output": "self_attn.o_proj", "ffn_norm": "post_attention_layernorm",
               "ffn_up": "mlp.gate_up_proj", "ffn_down": "mlp.down_proj"}
# Gemma-2's sandwich norms: post_attention_layernorm -> post_attention_norm (ATTN_POST_NORM),
# pre_feedforward_layernorm -> ffn_norm, post_feedforward_layernorm -> post_ffw_norm
GEMMA2_LAYERS = {**_ATTN_MLP, "post_attention_norm": "post_attention_layernorm",
                 "ffn_norm": "pre_feedforward_layernorm",
                 "post_ffw_norm": "post_feedforward_layernorm"}
GEMMA3_LAYERS = {**GEMMA2_LAYERS, **_QK_NORMS}
# GLM-4.5: post_attention_layernorm -> post_attention_norm; routed experts as Qwen's, shared
# ones ffn_*_shexp (mlp.shared_experts, ungated), the router's choice bias exp_probs_b.bias
GLM4_MOE_LAYERS = {**{k: v for k, v in QWEN_EXPERTS.items() if "shexp" not in k},
                   **_ATTN_MLP, **_QK_NORMS, "post_attention_norm": "post_attention_layernorm",
                   "ffn_gate_shexp": "mlp.shared_experts.gate_proj",
                   "ffn_up_shexp": "mlp.shared_experts.up_proj",
                   "ffn_down_shexp": "mlp.shared_experts.down_proj",
                   "exp_probs_b": "mlp.gate.e_score_correction"}
# OLMo-2 / 3: no pre-norms; post_attention_layernorm -> post_attention_norm, post_feedforward_
# layernorm -> post_ffw_norm, q/k norms over all heads as attn_q_norm / attn_k_norm
OLMO2_LAYERS = {k: v for k, v in _ATTN_MLP.items() if k != "attn_norm"} | {
    "post_attention_norm": "post_attention_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm", **_QK_NORMS}
# Llama 4 (Llama4Model: LlamaModel's names, q/k not permuted): MLPs, router and shared expert
# under feed_forward; the experts stacked as its checkpoint stacks them (gguf.py fuses gate and
# up back into gate_up_proj: GGUFArch.hf_stacked_experts)
LLAMA4_LAYERS = {**DENSE_LAYERS, **{k: v.replace("mlp.", "feed_forward.") for k, v in
                                    _ATTN_MLP.items() if k.startswith("ffn_")},
                 "ffn_gate_inp": "feed_forward.router",
                 "ffn_gate_exps": "feed_forward.experts.gate_proj",
                 "ffn_up_exps": "feed_forward.experts.up_proj",
                 "ffn_down_exps": "feed_forward.experts.down_proj",
                 "ffn_gate_shexp": "feed_forward.shared_expert.gate_proj",
                 "ffn_up_shexp": "feed_forward.shared_expert.up_proj",
                 "ffn_down_shexp": "feed_forward.shared_expert.down_proj"}
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


@dataclass(frozen=True)
class GGUFArch:
    hf_class: str                 # architectures[0] of the HF config
    model_type: str
    layers: dict[str, str]
    permute_qk: bool = False      # convert_hf_to_gguf permuted q/k rows (LLAMA_ROPE_TYPE_NORM)
    norm_shift: float = 0.0       # the converter stored every *norm.weight as w + norm_shift
    head_dim_from_rope: bool = False   # old files: rope.dimension_count stands for head_dim
    hf_stacked_experts: bool = False   # experts read back stacked as HF's checkpoint holds them
    extra: Callable[[object, dict], None] = lambda m, cfg: None   # family-specific config


# ---- family-specific config (m: arch-prefixed metadata getter with .names and .tensor) ------
def _llama(m, cfg: dict) -> None:
    cfg.update(hidden_act="silu", attention_bias="blk.0.attn_q.bias" in m.names,
               mlp_bias="blk.0.ffn_up.bias" in m.names)
    window = m("attention.sliding_window")
    if m("expert_count"):
        # Mixtral: LlamaModel (TextModel.set_gguf_parameters) writes expert_count and
        # expert_used_count; feed_forward_length is the experts' intermediate_size.
        # llama.cpp's llama graph renormalises the top-k (softmax over the top-k logits)
        cfg.update(model_type="mixtral", architectures=["MixtralForCausalLM"],
                   num_local_experts=int(m("expert_count")),
                   num_experts_per_tok=int(m("expert_used_count", 2)),
                   sliding_window=int(window) if window else None)
        return
    if window:
        # Mistral-7B-v0.1 style: llama architecture plus a window. HF's LlamaConfig has no
        # sliding window, MistralConfig has (convert_hf_to_gguf's LlamaModel, which converts
        # MistralForCausalLM, does not write the key; GGUFs that carry it get Mistral back)
        cfg.update(model_type="mistral", architectures=["MistralForCausalLM"],
                   sliding_window=int(window))


def _qwen2(m, cfg: dict) -> None:
    # Qwen2Model(TextModel) writes no window: HF Qwen2/2.5/3 configs run with it off
    cfg.update(hidden_act="silu", use_sliding_window=False, sliding_window=None)


def _qwen3(m, cfg: dict) -> None:
    _qwen2(m, cfg)
    cfg["attention_bias"] = "blk.0.attn_q.bias" in m.names


def _qwen_moe(m, cfg: dict, shared: bool, norm_topk: bool) -> None:
    """Qwen2MoeModel.set_gguf_parameters (Qwen3MoeModel inherits it): expert_count,
    expert_used_count, expert_feed_forward_length (moe_intermediate_size) and, for Qwen2-MoE,
    expert_shared_feed_forward_length; llama-model.cpp defaults the two lengths to n_ff / k and
    n_ff. Its graphs renormalise the top-k for qwen3moe, not for qwen2moe (expert_weights_norm
    overrides). A layer without ffn_gate_inp keeps a dense MLP (mlp_only_layers: flexrun's
    reading; llama.cpp's qwen MoE graphs have none)."""
    n, ff = cfg["num_hidden_layers"], cfg["intermediate_size"]
    E, k = int(m("expert_count", 0)), int(m("expert_used_count", 0))
    if not E or not k:
        raise ValueError(f"{m.arch} GGUF without {m.arch}.expert_count / expert_used_count")
    cfg.update(num_experts=E, num_experts_per_tok=k, decoder_sparse_step=1,
               moe_intermediate_size=int(m("expert_feed_forward_length") or ff // k),
               norm_topk_prob=bool(m("expert_weights_norm", norm_topk)),
               mlp_only_layers=[i for i in range(n) if f"blk.{i}.ffn_gate_inp.weight"
                                not in m.names])
    if shared:
        cfg.update(shared_expert_intermediate_size=int(
            m("expert_shared_feed_forward_length") or ff),
            qkv_bias="blk.0.attn_q.bias" in m.names)


def _qwen2_moe(m, cfg: dict) -> None:
    _qwen2(m, cfg)
    _qwen_moe(m, cfg, shared=True, norm_topk=False)


def _qwen3_moe(m, cfg: dict) -> None:
    _qwen3(m, cfg)
    _qwen_moe(m, cfg, shared=False, norm_topk=True)


def _phi3(m, cfg: dict) -> None:
    """Phi3MiniModel.set_gguf_parameters: context_length = max_position_embeddings,
    rope.scaling.original_context_length = original_max_position_embeddings, rope.dimension_count
    = int(partial_rotary_factor * n_embd) // n_head, attention.sliding_window (0 for None);
    longrope (128k models) as rope_factors_long/short.weight tensors plus rope.scaling.attn_factor
    (no rope.scaling.type key is written)."""
    if "blk.0.attn_qkv.weight" not in m.names:
        raise ValueError("phi3 GGUF without fused blk.N.attn_qkv tensors is not supported")
    hd, n_ctx = cfg["head_dim"], cfg["max_position_embeddings"]
    orig = int(m("rope.scaling.original_context_length") or n_ctx)
    window = int(m("attention.sliding_window", 0) or 0)
    cfg.update(hidden_act="silu", original_max_position_embeddings=orig,
               sliding_window=window or None)   # llama.cpp runs Phi-3 without it; HF with it
    rot = int(m("rope.dimension_count") or hd)
    if rot != hd:
        cfg["partial_rotary_factor"] = rot / hd
    long, short = m.tensor("rope_factors_long.weight"), m.tensor("rope_factors_short.weight")
    if long is None or short is None:
        return
    sc = {"rope_type": "longrope", "long_factor": [float(x) for x in long.ravel()],
          "short_factor": [float(x) for x in short.ravel()]}
    # the converter stores sqrt(1 + ln(scale) / ln(orig)), which HF derives itself; keep only
    # a value that differs from it
    scale = n_ctx / orig
    default = math.sqrt(1 + math.log(scale) / math.log(orig)) if scale > 1 else 1.0
    attn = m("rope.scaling.attn_factor")
    if attn is not None and abs(float(attn) - default) > 1e-5:
        sc["attention_factor"] = float(attn)
    cfg["rope_scaling"] = sc


def _gemma2(m, cfg: dict) -> None:
    """Gemma2Model.set_gguf_parameters writes key_length = head_dim, the two soft-caps and
    attention.sliding_window, no rope.freq_base, no query_pre_attn_scalar. llama-model.cpp
    (LLM_ARCH_GEMMA2) defaults n_swa 4096 and the caps to 50 / 30 (llama-hparams.h), and scales
    queries by 1/sqrt(n_embd / n_head) for the 46-layer 27B, else 1/sqrt(n_embd_head_k): that
    is HF's query_pre_attn_scalar (144 for gemma-2-27b, head_dim 256 for 2B / 9B)."""
    heads, layers = cfg["num_attention_heads"], cfg["num_hidden_layers"]
    scalar = cfg["hidden_size"] // heads if layers == 46 else cfg["head_dim"]
    cfg.update(hidden_act="gelu_pytorch_tanh", hidden_activation="gelu_pytorch_tanh",
               attention_bias=False, query_pre_attn_scalar=scalar,
               attn_logit_softcapping=float(m("attn_logit_softcapping", 50.0)),
               final_logit_softcapping=float(m("final_logit_softcapping", 30.0)),
               sliding_window=int(m("attention.sliding_window", 4096)),
               tie_word_embeddings=True)   # llama.cpp always reads the head from token_embd


def sliding_flags(m, layers: int, period: int) -> list[bool]:
    """Which layers slide: attention.sliding_window_pattern as a per-layer bool array (OLMo-3)
    or a period (every period-th layer global), else `period`."""
    v = m("attention.sliding_window_pattern")
    if isinstance(v, list):
        if len(v) != layers:
            raise ValueError(f"{m.arch}.attention.sliding_window_pattern has {len(v)} entries "
                             f"for {layers} layers")
        return [bool(x) for x in v]
    period = int(v or period)
    return [bool((i + 1) % period) for i in range(layers)]


def _gemma3(m, cfg: dict) -> None:
    """Gemma3Model.set_gguf_parameters writes TextModel's keys (rope.freq_base of the global
    layers, their linear rope scaling), key_length = head_dim, attention.sliding_window and a
    final soft-cap only where the model has one. llama-model.cpp (LLM_ARCH_GEMMA3) fixes the
    rest: every 6th layer global (set_swa_pattern(6)), the sliding layers' rope base 10000
    unscaled, queries scaled as for Gemma-2 with the 62-layer 27B at n_embd / n_head."""
    heads, layers = cfg["num_attention_heads"], cfg["num_hidden_layers"]
    cfg.update(model_type="gemma3_text", hidden_activation="gelu_pytorch_tanh",
               attention_bias=False, tie_word_embeddings=True,
               query_pre_attn_scalar=cfg["hidden_size"] // heads if layers == 62
               else cfg["head_dim"],
               sliding_window=int(m("attention.sliding_window", 4096)),
               layer_types=["sliding_attention" if s else "full_attention"
                            for s in sliding_flags(m, layers, 6)],
               rope_local_base_freq=10000.0, attn_logit_softcapping=None)
    cap = m("final_logit_softcapping")
    cfg["final_logit_softcapping"] = None if cap is None else float(cap)


def _granite(m, cfg: dict) -> None:
    """GraniteModel is LlamaModel (q/k permuted) plus its multipliers, renamed *_scale and
    written where non-zero: attention.scale, embedding_scale, residual_scale, logit_scale;
    no head_dim (popped by the converter)."""
    cfg.update(hidden_act="silu", attention_bias="blk.0.attn_q.bias" in m.names,
               mlp_bias="blk.0.ffn_up.bias" in m.names,
               attention_multiplier=float(m("attention.scale", 1.0) or 1.0),
               embedding_multiplier=float(m("embedding_scale", 1.0) or 1.0),
               residual_multiplier=float(m("residual_scale", 1.0) or 1.0),
               logits_scaling=float(m("logit_scale", 1.0) or 1.0))


def _smollm3(m, cfg: dict) -> None:
    """SmolLM3Model is LlamaModel under its own name (q/k permuted, no extra keys); llama.cpp
    skips RoPE on every 4th layer (n_no_rope_layer_step, read from no key) and runs no window."""
    cfg.update(hidden_act="silu", attention_bias="blk.0.attn_q.bias" in m.names,
               mlp_bias="blk.0.ffn_up.bias" in m.names, no_rope_layer_interval=4,
               use_sliding_window=False)


def _olmo2(m, cfg: dict) -> None:
    """Olmo2Model (Olmo2ForCausalLM and Olmo3ForCausalLM) writes TextModel's keys and, for
    OLMo-3, attention.sliding_window with a per-layer sliding_window_pattern: then it reads
    back as OLMo-3 (its yarn, where there is one, on the global layers as HF's Olmo3Config
    puts it)."""
    cfg.update(hidden_act="silu", attention_bias="blk.0.attn_q.bias" in m.names)
    window = m("attention.sliding_window")
    if window:
        cfg.update(model_type="olmo3", architectures=["Olmo3ForCausalLM"],
                   sliding_window=int(window),
                   layer_types=["sliding_attention" if s else "full_attention"
                                for s in sliding_flags(m, cfg["num_hidden_layers"], 4)])


def _gpt_oss(m, cfg: dict) -> None:
    """GptOssModel.set_gguf_parameters: TextModel's keys (yarn rope, expert counts),
    attention.sliding_window and expert_feed_forward_length; llama.cpp slides every other
    layer (the first) and fixes the SwiGLU's alpha 1.702 and limit 7; HF's yarn for gpt-oss
    does not truncate its correction range."""
    E, k = int(m("expert_count", 0)), int(m("expert_used_count", 0))
    if not E or not k:
        raise ValueError(f"{m.arch} GGUF without {m.arch}.expert_count / expert_used_count")
    layers = cfg["num_hidden_layers"]
    cfg.update(hidden_act="silu", num_local_experts=E, num_experts_per_tok=k,
               intermediate_size=int(m("expert_feed_forward_length")
                                     or cfg["intermediate_size"]),
               sliding_window=int(m("attention.sliding_window", 128)),
               layer_types=["sliding_attention" if s else "full_attention"
                            for s in sliding_flags(m, layers, 2)],
               attention_bias=True, tie_word_embeddings=False)
    if cfg.get("rope_scaling"):
        cfg["rope_scaling"] = {"beta_fast": 32.0, "beta_slow": 1.0, **cfg["rope_scaling"],
                               "truncate": False}


def _olmoe(m, cfg: dict) -> None:
    """OlmoeModel.set_gguf_parameters: TextModel's keys with expert_count / expert_used_count
    (feed_forward_length is the experts' width); llama.cpp's olmoe graph does not renormalise
    the top-k, as OLMoE's norm_topk_prob is off."""
    E, k = int(m("expert_count", 0)), int(m("expert_used_count", 0))
    if not E or not k:
        raise ValueError(f"{m.arch} GGUF without {m.arch}.expert_count / expert_used_count")
    cfg.update(hidden_act="silu", num_experts=E, num_experts_per_tok=k, norm_topk_prob=False,
               attention_bias="blk.0.attn_q.bias" in m.names)


def _glm4_moe(m, cfg: dict) -> None:
    """Glm4MoeModel.set_gguf_parameters: block_count counts the NextN (MTP) layers too
    (nextn_predict_layers: dropped here), expert_count the routed experts, expert_shared_count,
    leading_dense_block_count, expert_weights_scale / _norm, a sigmoid gating function and
    rope.dimension_count = head_dim * partial_rotary_factor; no expert groups (llama.cpp
    reads expert_group_count / expert_group_used_count where a file has them)."""
    n = cfg["num_hidden_layers"] - int(m("nextn_predict_layers", 0) or 0)
    E, k = int(m("expert_count", 0)), int(m("expert_used_count", 0))
    if not E or not k:
        raise ValueError(f"{m.arch} GGUF without {m.arch}.expert_count / expert_used_count")
    if int(m("expert_gating_func", 2) or 2) != 2:
        raise ValueError(f"{m.arch} GGUF with a gating function other than sigmoid")
    rot = int(m("rope.dimension_count") or cfg["head_dim"])
    cfg.update(num_hidden_layers=n, hidden_act="silu", n_routed_experts=E,
               num_experts_per_tok=k,
               moe_intermediate_size=int(m("expert_feed_forward_length")),
               n_shared_experts=int(m("expert_shared_count", 0) or 0),
               first_k_dense_replace=int(m("leading_dense_block_count", 0) or 0),
               routed_scaling_factor=float(m("expert_weights_scale", 1.0) or 1.0),
               norm_topk_prob=bool(m("expert_weights_norm", True)),
               n_group=int(m("expert_group_count", 1) or 1),
               topk_group=int(m("expert_group_used_count", 1) or 1),
               partial_rotary_factor=rot / cfg["head_dim"],
               attention_bias="blk.0.attn_q.bias" in m.names,
               use_qk_norm="blk.0.attn_q_norm.weight" in m.names)


def _llama4(m, cfg: dict) -> None:
    """Llama4Model: feed_forward_length is intermediate_size_mlp (the dense layers'),
    expert_feed_forward_length the experts' intermediate_size, interleave_moe_layer_step the
    MoE layers' period. llama.cpp's llama4 graph: no RoPE on every 4th layer and chunked
    attention (8,192: where flexrun's positions stop) unless attention.sliding_window is 0,
    q/k L2-normed unless the model has 128 experts (Maverick)."""
    E, k = int(m("expert_count", 0)), int(m("expert_used_count", 0))
    if not E or not k:
        raise ValueError(f"{m.arch} GGUF without {m.arch}.expert_count / expert_used_count")
    n, window = cfg["num_hidden_layers"], m("attention.sliding_window")
    chunked = window is None or int(window) != 0
    cfg.update(hidden_act="silu", intermediate_size_mlp=cfg["intermediate_size"],
               intermediate_size=int(m("expert_feed_forward_length")),
               num_local_experts=E, num_experts_per_tok=k,
               interleave_moe_layer_step=int(m("interleave_moe_layer_step", 1) or 1),
               use_qk_norm=E != 128, attention_chunk_size=8192 if chunked else None,
               no_rope_layers=[int(not chunked or (i + 1) % 4 != 0) for i in range(n)])


# llama.cpp's llama_model_rope_type: LLM_ARCH_LLAMA is LLAMA_ROPE_TYPE_NORM (interleaved pairs,
# hence LlamaModel.permute of q/k in the converter); QWEN2, QWEN3, PHI3, GEMMA2 and GEMMA3 are
# LLAMA_ROPE_TYPE_NEOX, HF's own rotate-half layout, and their converters do not permute
# (QWEN2MOE and QWEN3MOE too).
ARCHS = {
    "llama": GGUFArch("LlamaForCausalLM", "llama", LLAMA_LAYERS, permute_qk=True,
                      head_dim_from_rope=True, extra=_llama),
    "smollm3": GGUFArch("SmolLM3ForCausalLM", "smollm3", DENSE_LAYERS, permute_qk=True,
                        extra=_smollm3),
    "granite": GGUFArch("GraniteForCausalLM", "granite", DENSE_LAYERS, permute_qk=True,
                        head_dim_from_rope=True, extra=_granite),
    "olmo2": GGUFArch("Olmo2ForCausalLM", "olmo2", OLMO2_LAYERS, extra=_olmo2),
    # Llama4Model.undo_permute = False: q/k as HF holds them (interleaved pairs, which the
    # loader reorders for Llama 4 from either source)
    "llama4": GGUFArch("Llama4ForCausalLM", "llama4_text", LLAMA4_LAYERS,
                       hf_stacked_experts=True, extra=_llama4),
    "olmoe": GGUFArch("OlmoeForCausalLM", "olmoe", OLMOE_LAYERS, extra=_olmoe),
    "gpt-oss": GGUFArch("GptOssForCausalLM", "gpt_oss", GPT_OSS_LAYERS, extra=_gpt_oss),
    "glm4moe": GGUFArch("Glm4MoeForCausalLM", "glm4_moe", GLM4_MOE_LAYERS, extra=_glm4_moe),
    "qwen2": GGUFArch("Qwen2ForCausalLM", "qwen2", DENSE_LAYERS, extra=_qwen2),
    "qwen3": GGUFArch("Qwen3ForCausalLM", "qwen3", QWEN3_LAYERS, extra=_qwen3),
    "qwen2moe": GGUFArch("Qwen2MoeForCausalLM", "qwen2_moe", QWEN2_MOE_LAYERS,
                         extra=_qwen2_moe),
    "qwen3moe": GGUFArch("Qwen3MoeForCausalLM", "qwen3_moe", QWEN3_MOE_LAYERS,
                         extra=_qwen3_moe),
    "phi3": GGUFArch("Phi3ForCausalLM", "phi3", PHI3_LAYERS, extra=_phi3),
    # GemmaModel / Gemma2Model.modify_tensors: `if name.endswith("norm.weight"): data + 1`
    "gemma2": GGUFArch("Gemma2ForCausalLM", "gemma2", GEMMA2_LAYERS, norm_shift=1.0,
                       extra=_gemma2),
    # Gemma3Model.modify_tensors: norms + 1 too (norm_shift), token_embd cut to the tokenizer's
    # real vocabulary (vocab_size reads its rows)
    "gemma3": GGUFArch("Gemma3ForCausalLM", "gemma3_text", GEMMA3_LAYERS, norm_shift=1.0,
                       extra=_gemma3),
}


def gguf_arch(name: str) -> GGUFArch:
    if name not in ARCHS:
        raise ValueError(f"unsupported GGUF architecture {name!r}: flexrun reads "
                         f"{', '.join(ARCHS)} GGUF files (Llama, Mistral, Mixtral, SmolLM, "
                         "SmolLM3, Granite, OLMo-2/3, OLMoE, Llama 4, Qwen2/2.5, Qwen3, "
                         "Qwen2-MoE, Qwen3-MoE, GLM-4.5, gpt-oss, Phi-3, Gemma-2, Gemma-3)")
    return ARCHS[name]
